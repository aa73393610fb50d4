"""Graph passes. `default_pipeline()` lists the passes lmforge runs, one line each."""
from lmforge.passes.base import Knob, Pass, PassManager, graph_pass
from lmforge.passes.canonical import (cse, dce, fold_shapes, recognize_attention, recognize_cache_append,
                                     recognize_linear, recognize_repeat_kv)
from lmforge.passes.decoding import decoding_knobs, decoding_pass, lower_decoding
from lmforge.passes.fusion import fuse_elementwise, merge_linears, recognize_rmsnorm, recognize_rope
from lmforge.passes.masks import recognize_causal_mask
from lmforge.passes.quant import kv_quant_pass, weight_quant_pass
from lmforge.passes.sparsity import shared_prefix_decode, sparsity_pass


def canonical_pipeline() -> list[Pass]:
    """Exact clean-ups with no knobs: every graph goes through these first."""
    return [
        recognize_attention,  # matmul-softmax-matmul -> attention (capture runs it too)
        recognize_linear,     # matmul(x, W) / x @ W.T (+ b) with W a weight -> linear
        fold_shapes,          # simplify symbolic dims, drop no-op reshapes/permutes/casts/slices
        cse,                  # merge duplicate computations (RoPE tables shared by layers, ...)
        recognize_repeat_kv,  # attention on repeat_kv'd K/V (GQA as Hugging Face writes it) reads the KV heads
        recognize_causal_mask,  # attention(q, k, v, mask) with a provably causal mask -> attention(...; causal)
        recognize_rmsnorm,    # x * rsqrt(mean(x^2) + eps) * w -> rmsnorm
        recognize_rope,       # x * cos + rotate_half(x) * sin -> rope
        recognize_cache_append,  # concat(past KV, new) -> kv_cache_append (charged as an in-place append)
        dce,                  # drop what nothing reads
    ]


def tunable_pipeline(calibration=None) -> list[Pass]:
    """The passes whose knobs the search tunes, in the order they run. `calibration` (input tuples) lets
    AWQ collect activations and FlexPrefill measure its density."""
    return [
        sparsity_pass(calibration),      # window+sinks, block top-k decode, FlexPrefill prefill  [knobs attn.*]
        kv_quant_pass,                   # KV cache stored as int8 / fp8                         [knobs quant.kv*]
        merge_linears,                   # linears sharing an input (QKV, gate/up) -> one GEMM    [knob]
        weight_quant_pass(calibration),  # weight-only int8 / int4, group-wise, AWQ              [knobs quant.*]
        fuse_elementwise,                # elementwise chains (SwiGLU, residual adds) -> fused    [knob]
        dce,                             # drop what nothing reads
    ]


def default_pipeline() -> list[Pass]:
    """What `lmforge.compile` runs: the canonical passes, then the tunable ones (defaults unless configured)."""
    return canonical_pipeline() + tunable_pipeline()


__all__ = ["decoding_knobs", "decoding_pass", "lower_decoding", "recognize_cache_append", "kv_quant_pass",
           "weight_quant_pass", "shared_prefix_decode", "sparsity_pass", "canonical_pipeline", "tunable_pipeline",
           "fuse_elementwise", "merge_linears", "recognize_rmsnorm", "recognize_rope", "recognize_causal_mask", "Knob",
           "Pass", "PassManager", "graph_pass", "default_pipeline", "cse", "dce", "fold_shapes", "recognize_attention",
           "recognize_repeat_kv"]
