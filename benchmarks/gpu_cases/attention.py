"""Attention kernels on the GPU against torch SDPA: prefill (dense causal, GQA, sliding window + sinks, block
sparse, FlexPrefill compiled end to end) and decode (dense at 32k / 128k, block top-k at 128k with a 1/16
budget, shared prefix), fp16, plus a dense prefill and decode in bf16 (default configs) and the Triton block
selection (`select_largest`) against its stable-sort reference.

Every reference is `lmforge.ir.ops.attention_ref` computed in fp32 on the GPU from the same inputs (fine at
batch 1; the shared-prefix one expands the prefix to the 16 sequences, ~9 GB). Baselines are what a torch
model runs instead: F.scaled_dot_product_attention in fp16 (enable_gqa=True where SDPA has a fused GQA path;
with a boolean mask SDPA has none, so the masked baseline gets K / V already repeated to every query head,
outside its timing), pinned to FlashAttention (torch.nn.attention.sdpa_kernel) where flash runs the case, else
to the first of torch's other backends that does (e.g. memory-efficient for the boolean mask); the baseline's
label ends with the backend that ran, e.g. "[flash]" or "[efficient: flash cannot run it]". Block top-k and
shared prefix are compared with dense SDPA decode over the full cache, which is what they replace. Unless
--quick, each case's config is picked by a quick measurement over the module's CANDIDATE_CONFIGS (named in the
note). `bytes` is the minimal traffic (each tensor read or written
once; for the sparse cases only the kept KV blocks and the block summaries), `flops` counts 4 * D per
visible (query, key) pair.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.gpu_cases import Pending, describe, device, pending, pick_fastest
from lmforge.backends.triton import attention_decode, attention_prefill
from lmforge.ir.ops.attention_ref import (attention_ref, decode_block_topk_ref, shared_prefix_attention_ref,
                                          top_indices)

D = 128
HALF = 2  # bytes per fp16 element
TOL = {"rtol": 2e-2, "atol": 2e-2}
TOL_FOR = {torch.float16: TOL, torch.bfloat16: {"rtol": 5e-2, "atol": 5e-2}}   # bf16 keeps 8 mantissa bits


def _randn(gen: torch.Generator, *shape: int, dtype=torch.float16) -> torch.Tensor:
    return torch.randn(*shape, device=device(), generator=gen, dtype=dtype)


def _dtype_tag(dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


def _tuned(quick: bool, default, candidates, make_kernel):
    """(kernel, note): the default config under --quick, else the fastest candidate."""
    configs = [default] if quick else list(candidates)
    config, kernel = pick_fastest(make_kernel, configs)
    return kernel, describe(config)


# SDPA's backends in the order the baselines try them, pinned one at a time: FlashAttention (what the issue
# compares against), then torch's others; the first that runs the case is the baseline, named in its label.
SDPA_BACKENDS = (("flash", "FLASH_ATTENTION"), ("efficient", "EFFICIENT_ATTENTION"), ("cudnn", "CUDNN_ATTENTION"),
                 ("math", "MATH"))


def _sdpa(what: str, *args, **kwargs) -> tuple:
    """(baseline, baseline_name): a zero-arg F.scaled_dot_product_attention(*args, **kwargs) pinned to the first
    backend of SDPA_BACKENDS that runs it (tried once now), and `what` labelled with that backend. A pinned backend
    that cannot run the case raises (torch: "No available kernel"); if none can, the baseline is unpinned."""
    import warnings

    from torch.nn.attention import SDPBackend, sdpa_kernel

    for name, member in SDPA_BACKENDS:
        backend = getattr(SDPBackend, member)

        def pinned(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(*args, **kwargs)

        try:
            with warnings.catch_warnings():   # torch warns why each backend it was not allowed to use was not used
                warnings.simplefilter("ignore")
                pinned()
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError:
            continue
        return pinned, f"{what} [{name}]" if name == "flash" else f"{what} [{name}: flash cannot run it]"
    return (lambda: F.scaled_dot_product_attention(*args, **kwargs)), f"{what} [torch default: no pinned backend ran]"


def _baseline(what: str, *args, **kwargs) -> dict:
    """A case's "baseline" and "baseline_name" entries for SDPA on these arguments (see `_sdpa`)."""
    baseline, name = _sdpa(what, *args, **kwargs)
    return {"baseline": baseline, "baseline_name": name}


def _fp32(*tensors):
    return [t.float() for t in tensors]


def _visible_pairs_causal(sq: int, skv: int, window=None, sinks: int = 0) -> int:
    """Visible (query, key) pairs of one head under the causal (+ window / sinks) rule of attention_ref."""
    pos = torch.arange(sq, dtype=torch.int64) + (skv - sq)
    seen = (pos + 1).clamp(0, skv)
    if window is not None:
        in_window = seen.clamp(max=window)
        seen = in_window + (seen - in_window).clamp(max=sinks)
    return int(seen.sum())


# ---- prefill ---------------------------------------------------------------------------------------------------------

def _prefill_dense(gen, quick, hq, hkv, s, dtype=torch.float16) -> dict:
    q, k, v = (_randn(gen, 1, h, s, D, dtype=dtype) for h in (hq, hkv, hkv))
    default = attention_prefill.default_config(dtype, D)
    kernel, note = _tuned(quick or dtype != torch.float16, default, attention_prefill.CANDIDATE_CONFIGS,
                          lambda c: (lambda: attention_prefill.flash_prefill(q, k, v, config=c, return_lse=False)))
    tag = _dtype_tag(dtype)
    return {"name": f"attention/prefill_causal_B1_H{hq}_KV{hkv}_S{s}_D{D}_{tag}", "kernel": kernel,
            "reference": lambda: attention_ref(*_fp32(q, k, v), causal=True),
            **_baseline(f"torch SDPA {tag} (is_causal)", q, k, v, is_causal=True, enable_gqa=hq != hkv),
            **TOL_FOR[dtype],
            "bytes": (2 * hq + 2 * hkv) * s * D * HALF, "flops": 4 * D * hq * _visible_pairs_causal(s, s),
            "note": note}


def _prefill_window(gen, quick, hq, hkv, s, window, sinks) -> dict:
    q, k, v = _randn(gen, 1, hq, s, D), _randn(gen, 1, hkv, s, D), _randn(gen, 1, hkv, s, D)
    pos = torch.arange(s, device=device())
    mask = (pos[None, :] <= pos[:, None]) & ((pos[:, None] - pos[None, :] < window) | (pos[None, :] < sinks))
    k_rep, v_rep = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
    default = attention_prefill.default_config(torch.float16, D)
    kernel, note = _tuned(quick, default, attention_prefill.CANDIDATE_CONFIGS,
                          lambda c: (lambda: attention_prefill.flash_prefill(q, k, v, window=window, sinks=sinks,
                                                                             config=c, return_lse=False)))
    return {"name": f"attention/prefill_window{window}_sinks{sinks}_B1_H{hq}_KV{hkv}_S{s}_D{D}_fp16",
            "kernel": kernel,
            "reference": lambda: attention_ref(*_fp32(q, k, v), causal=True, window=window, sinks=sinks),
            **_baseline("torch SDPA fp16 (bool mask, K/V repeated)", q, k_rep, v_rep, attn_mask=mask), **TOL,
            "bytes": (2 * hq + 2 * hkv) * s * D * HALF,
            "flops": 4 * D * hq * _visible_pairs_causal(s, s, window, sinks), "note": note}


def _random_block_mask(gen, hkv, n_blocks, keep) -> torch.Tensor:
    """Causal block mask [1, Hkv, n, n]: the diagonal and first blocks, and each other causal block w.p. keep."""
    mask = torch.rand(1, hkv, n_blocks, n_blocks, device=device(), generator=gen) < keep
    eye = torch.eye(n_blocks, dtype=torch.bool, device=device())
    mask |= eye
    mask[..., 0] = True
    return mask & torch.ones_like(eye).tril()


def _prefill_sparse(gen, quick, hq, hkv, s, block_size, keep) -> dict:
    q, k, v = _randn(gen, 1, hq, s, D), _randn(gen, 1, hkv, s, D), _randn(gen, 1, hkv, s, D)
    n_blocks = s // block_size
    mask = _random_block_mask(gen, hkv, n_blocks, keep)
    block_idx, block_cnt = attention_prefill.block_mask_to_index(mask)
    off_diagonal = int(mask.sum()) - hkv * n_blocks
    pairs_per_kv_head = off_diagonal * block_size ** 2 + hkv * n_blocks * block_size * (block_size + 1) // 2
    density = pairs_per_kv_head / (hkv * _visible_pairs_causal(s, s))
    default = attention_prefill.default_config(torch.float16, D)
    kernel, note = _tuned(quick, default, attention_prefill.CANDIDATE_CONFIGS,
                          lambda c: (lambda: attention_prefill.block_sparse_prefill(
                              q, k, v, block_idx, block_cnt, block_size=block_size, config=c, return_lse=False)))
    return {"name": f"attention/prefill_block_sparse{block_size}_B1_H{hq}_KV{hkv}_S{s}_D{D}_fp16",
            "kernel": kernel,
            "reference": lambda: attention_ref(*_fp32(q, k, v), causal=True, block_mask=mask, block_size=block_size),
            **_baseline("torch SDPA fp16 dense causal", q, k, v, is_causal=True, enable_gqa=hq != hkv), **TOL,
            "bytes": (2 * hq + 2 * hkv) * s * D * HALF, "flops": 4 * D * (hq // hkv) * pairs_per_kv_head,
            "note": f"{note}; kept {density:.0%} of causal pairs"}


def _prefill_flex(gen, quick, hq, hkv, s, block_size) -> dict:
    """FlexPrefill end to end as lmforge compiles it (the sparsity pass's flex_prefill_mask on torch, then
    block_sparse_attention on the Triton kernel), on synthetic q / k with a local band and heavy key columns
    (benchmarks.cpu_backend.structured_prefill_qkv, sharpness 4): the time includes choosing the mask."""
    import lmforge
    from benchmarks.cpu_backend import structured_prefill_qkv
    from lmforge.ir.ops.flexprefill_ref import flex_prefill_attention_ref

    q, k, v = (t.to(device(), torch.float16)
               for t in structured_prefill_qkv(1, hq, hkv, s, D, seed=2, sharpness=4.0))
    cfg = {"attn.prefill_pattern": "flex", "attn.flex_gamma": 0.9, "attn.flex_tau": 0.1,
           "attn.flex_block": block_size}

    def causal(q_, k_, v_):
        return F.scaled_dot_product_attention(q_, k_, v_, is_causal=True, enable_gqa=True)

    model = lmforge.compile(causal, (q, k, v), config=cfg, backends=("triton",), device=device(),
                            calibration=[(q, k, v)])
    density = next(n.attr["density"] for n in model.graph.nodes if n.op == "block_sparse_attention")
    runs = [line.split("#")[1].split()[0] for line in model.inspect().splitlines() if "block_sparse_attention(" in line]
    return {"name": f"attention/prefill_flexprefill{block_size}_B1_H{hq}_KV{hkv}_S{s}_D{D}_fp16",
            "kernel": lambda: model(q, k, v),
            "reference": lambda: flex_prefill_attention_ref(*_fp32(q, k, v), gamma=0.9, tau=0.1,
                                                            block_size=block_size),
            **_baseline("torch SDPA fp16 dense causal", q, k, v, is_causal=True, enable_gqa=True), **TOL,
            "bytes": (2 * hq + 2 * hkv) * s * D * HALF, "flops": 4 * D * hq * _visible_pairs_causal(s, s) * density,
            "note": f"compiled: mask on torch, attention on {runs}; kept {density:.0%} of causal blocks"}


# ---- decode ----------------------------------------------------------------------------------------------------------

def _decode_dense(gen, quick, hq, hkv, s, dtype=torch.float16) -> dict:
    q, k, v = _randn(gen, 1, hq, 1, D, dtype=dtype), _randn(gen, 1, hkv, s, D, dtype=dtype), \
        _randn(gen, 1, hkv, s, D, dtype=dtype)
    kernel, note = _tuned(quick or dtype != torch.float16, attention_decode.DEFAULT_CONFIG,
                          attention_decode.CANDIDATE_CONFIGS,
                          lambda c: (lambda: attention_decode.decode_attention(q, k, v, config=c)))
    tag = _dtype_tag(dtype)
    return {"name": f"attention/decode_B1_H{hq}_KV{hkv}_S{s}_D{D}_{tag}", "kernel": kernel,
            "reference": lambda: attention_ref(*_fp32(q, k, v)),
            **_baseline(f"torch SDPA {tag} decode (enable_gqa)", q, k, v, enable_gqa=True), **TOL_FOR[dtype],
            "bytes": 2 * hkv * s * D * HALF + 2 * hq * D * HALF, "flops": 4 * D * hq * s, "note": note}


def _decode_block_topk(gen, quick, hq, hkv, s, block_size, budget, summary) -> dict:
    q, k, v = _randn(gen, 1, hq, 1, D), _randn(gen, 1, hkv, s, D), _randn(gen, 1, hkv, s, D)
    n_blocks = s // block_size
    sinks, window = 4, 2 * block_size
    _, _, n_forced = attention_decode.forced_blocks(s, block_size, sinks, window)
    kept_blocks = n_blocks // budget
    topk = kept_blocks - n_forced
    kept = attention_decode.build_block_summary(k, block_size, summary)  # serving keeps it beside the cache
    args = dict(block_size=block_size, topk_blocks=topk, sinks=sinks, window=window, summary=summary)
    kernel, note = _tuned(quick, attention_decode.DEFAULT_CONFIG, attention_decode.CANDIDATE_CONFIGS,
                          lambda c: (lambda: attention_decode.block_topk_decode(q, k, v, block_summary=kept, config=c,
                                                                                **args)))
    summary_bytes = (2 if summary == "minmax" else 1) * hkv * n_blocks * D * 4
    selected = attention_decode.select_topk_blocks(q, kept, summary, s, block_size, topk, sinks, window)
    scores = torch.randn(1, hkv, n_blocks, device=device(), generator=gen)
    stages = {  # the pipeline's launches (default config), to show where its time goes
        "scores + torch.topk": lambda: attention_decode.select_topk_blocks(q, kept, summary, s, block_size, topk,
                                                                          sinks, window),
        "torch.topk alone": lambda: scores.topk(selected.shape[-1], dim=-1, sorted=False),
        "scores + Triton select (untimed design)": lambda: attention_decode.select_topk_blocks(
            q, kept, summary, s, block_size, topk, sinks, window, method="triton"),
        "Triton select alone": lambda: attention_decode.select_largest(scores, selected.shape[-1]),
        "sparse split + merge": lambda: attention_decode.decode_selected_blocks(q, k, v, selected,
                                                                                block_size=block_size),
    }
    return {"name": f"attention/decode_block_topk_{summary}_1of{budget}_B1_H{hq}_KV{hkv}_S{s}_D{D}_fp16",
            "kernel": kernel,
            "reference": lambda: decode_block_topk_ref(*_fp32(q, k, v), **args),
            **_baseline("torch SDPA fp16 dense decode", q, k, v, enable_gqa=True), **TOL,
            "bytes": 2 * hkv * kept_blocks * block_size * D * HALF + summary_bytes + 2 * hq * D * HALF,
            "flops": 4 * D * hq * kept_blocks * block_size + 2 * D * hq * n_blocks,
            "stages": stages,
            "note": f"{note}; {kept_blocks} of {n_blocks} blocks of {block_size} (sinks {sinks}, window {window})"}


def _select_largest(gen, hkv, n_blocks, keep) -> dict:
    """The Triton block selection (`select_largest`, behind select_topk_blocks(method="triton")) against the
    stable-sort reference: the same block indices, in increasing order. Scores carry ties (rounded to 1/8) as
    zero-filled cache blocks do."""
    scores = (torch.randn(1, hkv, n_blocks, device=device(), generator=gen) * 8).round() / 8
    return {"name": f"attention/select_largest_{keep}of{n_blocks}_H{hkv}_fp32", "kernel":
            lambda: attention_decode.select_largest(scores, keep),
            "reference": lambda: top_indices(scores, keep).sort(dim=-1).values,
            "baseline": lambda: scores.topk(keep, dim=-1, sorted=False),
            "baseline_name": "torch.topk (sorted=False)", "rtol": 0.0, "atol": 0.0,
            "bytes": scores.numel() * 4 + hkv * keep * 8, "flops": 0,
            "note": "exact indices (ties: lowest first)"}


def _shared_prefix(gen, quick, b, hq, hkv, prefix, suffix, groups: int = 1) -> dict:
    """b sequences; `groups` prefixes, each shared by b / groups consecutive sequences (several prompts' samples)."""
    q = _randn(gen, b, hq, 1, D)
    k_prefix, v_prefix = _randn(gen, groups, hkv, prefix, D), _randn(gen, groups, hkv, prefix, D)
    k_suffix, v_suffix = _randn(gen, b, hkv, suffix, D), _randn(gen, b, hkv, suffix, D)
    per = b // groups   # what a per-sequence cache holds:
    k_full = torch.cat([k_prefix.repeat_interleave(per, 0), k_suffix], 2)
    v_full = torch.cat([v_prefix.repeat_interleave(per, 0), v_suffix], 2)
    kernel, note = _tuned(quick, attention_decode.DEFAULT_CONFIG, attention_decode.CANDIDATE_CONFIGS,
                          lambda c: (lambda: attention_decode.shared_prefix_decode(q, k_prefix, v_prefix, k_suffix,
                                                                                   v_suffix, config=c)))
    grouped = f"_G{groups}" if groups > 1 else ""
    return {"name": f"attention/shared_prefix_decode_B{b}{grouped}_H{hq}_KV{hkv}_P{prefix}_S{suffix}_D{D}_fp16",
            "kernel": kernel,
            "reference": lambda: shared_prefix_attention_ref(*_fp32(q, k_prefix, v_prefix, k_suffix, v_suffix)),
            **_baseline("torch SDPA fp16 decode over each sequence's full KV", q, k_full, v_full, enable_gqa=True),
            **TOL,
            "bytes": 2 * hkv * (groups * prefix + b * suffix) * D * HALF + 2 * b * hq * D * HALF,
            "flops": 4 * D * b * hq * (prefix + suffix), "note": note}


def cases(quick: bool) -> list[Pending]:
    """The attention cases, each built when gpu_check reaches it, its inputs made on `device()` (CUDA) from a
    generator seeded by its label (the same data in every run, whichever cases run before it)."""
    def later(builder, *args, **kwargs) -> Pending:
        return pending("attention", builder, quick, *args, seeded=True, **kwargs)

    out = [
        later(_prefill_dense, 32, 32, 4096),
        later(_prefill_dense, 32, 8, 4096),
        later(_prefill_window, 32, 8, 4096, window=1024, sinks=4),
        later(_prefill_sparse, 32, 8, 4096, block_size=64, keep=0.2),
        later(_prefill_flex, 32, 8, 8192, block_size=64),
        later(_decode_dense, 32, 8, 32768),
        later(_decode_dense, 32, 8, 131072),
        later(_decode_block_topk, 32, 8, 131072, block_size=64, budget=16, summary="mean"),
        later(_shared_prefix, 16, 32, 8, 16384, 256),
        later(_shared_prefix, 32, 32, 8, 4096, 256, groups=4),   # 4 prompts x 8 samples in one batch
        pending("attention", _select_largest, 8, 2048, 128, seeded=True),
        later(_prefill_dense, 32, 8, 4096, dtype=torch.bfloat16),
        later(_decode_dense, 32, 8, 32768, dtype=torch.bfloat16),
    ]
    if not quick:
        out.append(later(_decode_block_topk, 32, 8, 131072, block_size=64, budget=16, summary="minmax"))
    return out
