"""The Triton backend inside a compiled model: it claims the nodes it has kernels for, the generated code
launches them (under the interpreter on the CPU), and outputs match the torch reference."""
import os

import pytest
import torch

import lmforge
from lmforge.backends.torch import TorchReference
from lmforge.backends.triton.backend import TritonBackend
from lmforge.backends.triton.config import KernelConfig
from lmforge.compiler import CompiledModel
from lmforge.passes import PassManager, canonical_pipeline, tunable_pipeline

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs a GPU or the Triton interpreter")


class Block(torch.nn.Module):
    def __init__(self, d=64, f=128):
        super().__init__()
        self.norm = torch.nn.RMSNorm(d, eps=1e-6)
        self.gate, self.up = torch.nn.Linear(d, f, bias=False), torch.nn.Linear(d, f, bias=False)
        self.down = torch.nn.Linear(f, d, bias=False)

    def forward(self, x):
        h = self.norm(x)
        return x + self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h)), torch.softmax(x, -1)


def test_backend_claims_and_matches_reference():
    torch.manual_seed(0)
    m = Block().eval()
    x = torch.randn(2, 3, 64)
    g = PassManager(canonical_pipeline() + tunable_pipeline()).run(
        lmforge.capture(m, (x,), dynamic={"x": {0: "batch", 1: "seq"}}),
        {"quant.weight_bits": 4, "quant.group_size": 32, "quant.lm_head": True})
    ref = CompiledModel(g)
    tri = CompiledModel(g, backends=[TritonBackend(interpret=True), TorchReference()])
    claimed = {n.op for n, k in zip(g.nodes, tri.kernels) if k.backend == "triton"}
    assert {"linear_wo", "rmsnorm", "fused", "softmax"} <= claimed, claimed
    assert "triton" in tri.inspect()
    x2 = torch.randn(1, 5, 64)
    for got, want in zip(tri(x2), ref(x2)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_backend_claims_nothing_on_cpu_without_interpreter_opt_in():
    m = Block().eval()
    g = lmforge.capture(m, (torch.randn(2, 3, 64),))
    c = CompiledModel(g, backends=[TritonBackend(interpret=False), TorchReference()])
    assert all(k.backend == "torch" for k in c.kernels) or torch.cuda.is_available()


def test_attention_nodes_run_on_the_triton_kernels():
    from lmforge.passes import sparsity_pass, shared_prefix_decode

    def prefill(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def decode(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    g0 = torch.Generator().manual_seed(0)
    qp, kp, vp = torch.randn(1, 4, 20, 16, generator=g0), torch.randn(1, 2, 20, 16, generator=g0), \
        torch.randn(1, 2, 20, 16, generator=g0)
    qd, kd, vd = torch.randn(2, 4, 1, 16, generator=g0), torch.randn(2, 2, 64, 16, generator=g0), \
        torch.randn(2, 2, 64, 16, generator=g0)
    kd[1, :, :48], vd[1, :, :48] = kd[0, :, :48], vd[0, :, :48]  # the two rows share a 48-token prefix
    graphs = [
        (lmforge.capture(prefill, (qp, kp, vp)), (qp, kp, vp)),
        (lmforge.capture(decode, (qd, kd, vd)), (qd, kd, vd)),
        (PassManager([sparsity_pass()]).run(lmforge.capture(decode, (qd, kd, vd)), {
            "attn.decode_pattern": "block_topk", "attn.block_size": 16, "attn.topk_blocks": 1,
            "attn.decode_window": 16, "attn.sinks": 4}), (qd, kd, vd)),
        (shared_prefix_decode(lmforge.capture(decode, (qd, kd, vd)), 48), (qd, kd, vd)),
        (shared_prefix_decode(lmforge.capture(decode, (qd, kd, vd)), 48, rows_per_prefix=1), (qd, kd, vd)),
    ]
    for g, inputs in graphs:
        tri = CompiledModel(g, backends=[TritonBackend(interpret=True), TorchReference()])
        ops = {n.op for n, k in zip(g.nodes, tri.kernels) if k.backend == "triton"}
        assert ops & {"attention", "block_topk_attention", "shared_prefix_attention"}, ops
        torch.testing.assert_close(tri(*inputs), CompiledModel(g)(*inputs), rtol=2e-4, atol=2e-4)


def test_attention_with_a_negative_scale_runs_on_the_reference():
    """flash_prefill takes the row max before scaling (needs scale >= 0): the backend leaves such nodes alone."""
    def fn(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=-0.25)

    from lmforge.ir.ops.attention_ref import attention_ref

    g0 = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 20, 16, generator=g0) for _ in range(3))
    g = lmforge.capture(fn, (q, k, v))
    tri = CompiledModel(g, backends=[TritonBackend(interpret=True), TorchReference()])
    attention = [k.backend for n, k in zip(g.nodes, tri.kernels) if n.op == "attention"]
    assert attention == ["torch"], attention
    expected = attention_ref(q, k, v, causal=True, scale=-0.25)   # torch's CPU SDPA gives NaN here
    torch.testing.assert_close(tri(q, k, v), expected, rtol=1e-5, atol=1e-5)


def test_tensor_parallel_ranks_run_the_triton_kernels_on_their_shards():
    """The tiny Llama's int4 decode step split over 2 ranks (taking turns, so the interpreter is safe): each rank's
    Triton kernels (int4 GEMV, norms, SwiGLU, attention) run on its local shapes and the result equals the
    unsplit graph on the reference."""
    from examples.models.llama import Llama, LlamaConfig, LlamaDecodeStep
    from lmforge.backends.collectives import TensorParallelModel
    from lmforge.passes import default_pipeline
    from lmforge.passes.shard import tensor_parallel

    torch.manual_seed(0)
    model = Llama(LlamaConfig.preset("tiny")).eval()
    with torch.no_grad():
        _, k, v = model.prefill(torch.randint(0, 14, (2, 5)))
    inputs = (torch.randint(0, 14, (2, 1)), k, v)
    g = PassManager(default_pipeline()).run(
        lmforge.capture(LlamaDecodeStep(model), inputs, dynamic={
            "tokens": {0: "batch"}, "k_cache": {1: "batch", 3: "past"}, "v_cache": {1: "batch", 3: "past"}}),
        {"quant.weight_bits": 4, "quant.group_size": 16})
    split = TensorParallelModel(tensor_parallel(g, 2), [TritonBackend(interpret=True), TorchReference()])
    on_triton = {n.op for n, k in zip(split.graph.nodes, split.kernels) if k.backend == "triton"}
    assert {"linear_wo", "rmsnorm", "attention"} <= on_triton, on_triton
    for got, want in zip(split(*inputs), CompiledModel(g)(*inputs)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# ---- block_sparse_attention: block_sparse_prefill over the mask's kept blocks ---------------------------------------

def _block_sparse_graph(q_shape, kv_shape, mask_shape, block_size, dtype="float32", scale=None):
    from lmforge.ir.graph import GraphBuilder
    from lmforge.ir.types import TensorType

    b = GraphBuilder("block_sparse")
    inputs = [b.input("q", TensorType(q_shape, dtype)), b.input("k", TensorType(kv_shape, dtype)),
              b.input("v", TensorType(kv_shape, dtype)), b.input("mask", TensorType(mask_shape, "bool"))]
    return b.build([b.op("block_sparse_attention", inputs, {"block_size": block_size, "scale": scale})])


def _block_sparse_inputs(seed, b, hq, hkv, sq, skv, mask_batch, mask_heads, block_size, dtype):
    """Fresh q, k, v and a random block mask that keeps each query block's diagonal block (and drops others)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, s, 16, generator=g).to(dtype) for h, s in ((hq, sq), (hkv, skv), (hkv, skv)))
    n_q, n_k = -(-sq // block_size), -(-skv // block_size)
    mask = torch.rand(mask_batch, mask_heads, n_q, n_k, generator=g) < 0.5
    diagonal = (skv - sq + torch.arange(n_q) * block_size).clamp(0, skv - 1) // block_size  # first row's key block
    mask[..., torch.arange(n_q), diagonal] = True
    return q, k, v, mask


SMALL_PREFILL = {"attention_prefill": KernelConfig.make(num_warps=4, num_stages=1, BLOCK_M=16, BLOCK_N=16)}
BLOCK_SPARSE_CASES = {  # name: (dtype, b, hq, hkv, (sq, skv) per call, mask batch (0: b), mask heads, block, config)
    "fp32_mask_per_kv_head": (torch.float32, 2, 4, 2, [(40, 40), (64, 64)], 0, "kv", 16, SMALL_PREFILL),
    "fp16_mask_per_q_head": (torch.float16, 1, 4, 2, [(33, 33), (48, 48)], 0, "q", 16, SMALL_PREFILL),
    "fp32_mask_broadcast_over_batch": (torch.float32, 3, 2, 1, [(64, 64)], 1, "kv", 32, {}),  # default config
    "fp16_mask_broadcast_two_tiles": (torch.float16, 2, 4, 2, [(50, 50)], 1, "q", 32, SMALL_PREFILL),
    "fp32_chunk_after_a_cache": (torch.float32, 1, 2, 2, [(20, 45)], 0, "kv", 16, SMALL_PREFILL),  # q_offset 25
}


@pytest.mark.parametrize("case", sorted(BLOCK_SPARSE_CASES))
def test_block_sparse_attention_runs_on_the_triton_kernel(case):
    """The node is claimed by the Triton backend and equals the torch reference on fresh inputs of every call
    (symbolic sequence lengths), whether the mask has one list per KV head or per query head, and a batch-1 mask
    serves every sequence as the reference broadcasts it."""
    dtype, b, hq, hkv, calls, mask_batch, mask_heads, block_size, config = BLOCK_SPARSE_CASES[case]
    hm = hkv if mask_heads == "kv" else hq
    g = _block_sparse_graph((b, hq, "sq", 16), (b, hkv, "skv", 16), (mask_batch or b, hm, "nq", "nk"), block_size,
                            str(dtype).removeprefix("torch."))
    tri = CompiledModel(g, backends=[TritonBackend(config, interpret=True), TorchReference()])
    assert [k.backend for k in tri.kernels] == ["triton"]
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for i, (sq, skv) in enumerate(calls):
        inputs = _block_sparse_inputs(i + len(case), b, hq, hkv, sq, skv, mask_batch or b, hm, block_size, dtype)
        got = tri(*inputs)
        want = CompiledModel(g)(*inputs)
        assert got.dtype == dtype and got.shape == want.shape
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


def test_block_sparse_attention_the_kernel_cannot_run_stays_with_the_reference(monkeypatch):
    """Block size 8 (the kernel takes powers of two >= 16) and a negative scale are not claimed; a claimed node
    whose mask at run time has neither Hkv nor Hq heads (one head for 2 KV heads) runs the reference in that call."""
    from lmforge.backends.triton import attention_prefill
    from lmforge.ir.ops.attention_ref import attention_ref

    for block_size, scale in ((8, None), (16, -0.5)):
        g = _block_sparse_graph((1, 2, 32, 16), (1, 2, 32, 16), (1, 2, 32 // block_size, 32 // block_size),
                                block_size, scale=scale)
        tri = CompiledModel(g, backends=[TritonBackend(interpret=True), TorchReference()])
        assert [k.backend for k in tri.kernels] == ["torch"]
        q, k, v, mask = _block_sparse_inputs(3, 1, 2, 2, 32, 32, 1, 2, block_size, torch.float32)
        torch.testing.assert_close(tri(q, k, v, mask), attention_ref(q, k, v, scale=scale, block_mask=mask,
                                                                     block_size=block_size))
    g = _block_sparse_graph((1, 4, 32, 16), (1, 2, 32, 16), (1, "hm", 2, 2), 16)
    tri = CompiledModel(g, backends=[TritonBackend(SMALL_PREFILL, interpret=True), TorchReference()])
    assert [k.backend for k in tri.kernels] == ["triton"]
    q, k, v, mask = _block_sparse_inputs(4, 1, 4, 2, 32, 32, 1, 1, 16, torch.float32)
    monkeypatch.setattr(attention_prefill, "block_sparse_prefill", None)  # not called: the reference runs
    torch.testing.assert_close(tri(q, k, v, mask), attention_ref(q, k, v, block_mask=mask, block_size=16))


# ---- nodes the kernels refuse stay with the reference (claimed, they would raise or read out of bounds) -------------

def _one_op(op, inputs, attrs, params=()):
    """A graph of one `op` node on inputs [(shape, dtype)] (named x0, x1, ...) and params [(name, tensor)]."""
    from lmforge.ir.graph import GraphBuilder
    from lmforge.ir.types import TensorType

    b = GraphBuilder(op)
    values = [b.input(f"x{i}", TensorType(shape, dtype)) for i, (shape, dtype) in enumerate(inputs)]
    values += [b.param(name, TensorType.of(t), t) for name, t in params]
    return b.build([b.op(op, values, attrs)])


def _quantized(bits, group_size, dtype=torch.float32):
    from lmforge.ir.ops.quant_ref import quantize_weight

    qw = quantize_weight(torch.randn(24, 96, generator=torch.Generator().manual_seed(bits + group_size)).to(dtype),
                         bits, group_size)
    return [("q", qw.qweight), ("s", qw.scales), ("z", qw.zeros)]


def _swiglu(up_shape, up_dtype, gate_dtype=torch.float32):
    """The fused SwiGLU node the pipeline makes from silu(gate) * up, for a gate [4, 8] (float32 by default)."""
    def fn(gate, up):
        return torch.nn.functional.silu(gate) * up

    inputs = (torch.randn(4, 8).to(gate_dtype), torch.randn(up_shape).to(up_dtype))
    g = PassManager(canonical_pipeline() + tunable_pipeline()).run(lmforge.capture(fn, inputs), {})
    assert [(n.op, n.attr.get("kind")) for n in g.nodes] == [("fused", "swiglu")]
    return g


class _Scaled(torch.nn.Module):      # silu(x) * w with a learned per-channel w [D]: `up` broadcasts
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(8))

    def forward(self, x):
        return torch.nn.functional.silu(x) * self.w


NOT_SWIGLU = {  # name: a SwiGLU-like region the SwiGLU kernel refuses; the generated elementwise kernel runs it
    "swiglu_up_broadcasts": lambda: _swiglu((1, 8), torch.float32),
    "swiglu_up_of_another_dtype": lambda: _swiglu((4, 8), torch.float16),
    "swiglu_times_a_weight": lambda: PassManager(canonical_pipeline() + tunable_pipeline()).run(
        lmforge.capture(_Scaled().eval(), (torch.randn(2, 3, 8),)), {}),
}


@pytest.mark.parametrize("case", sorted(NOT_SWIGLU))
def test_swiglu_like_regions_the_swiglu_kernel_refuses_run_the_generated_kernel(case):
    """A broadcast `up`, an `up` of another dtype, silu(x) * w: not the SwiGLU kernel (it would read `up` past
    its end), but the kernel generated from the region, with the reference's outputs."""
    g = NOT_SWIGLU[case]()
    tri = CompiledModel(g, backends=[TritonBackend(interpret=True), TorchReference()])
    assert [(k.backend, k.detail) for k in tri.kernels] == [("triton", "elementwise")]
    inputs = _inputs_for(g, len(case))
    torch.testing.assert_close(tri(*inputs), CompiledModel(g)(*inputs), rtol=1e-6, atol=1e-6)


QKV16 = [((1, 2, 8, 16), "float32")] * 3
UNCLAIMED = {  # name: a graph the Triton backend must leave to the reference (what its kernels refuse)
    "swiglu_float64": lambda: _swiglu((4, 8), torch.float64, torch.float64),
    "attention_v_head_dim_32": lambda: _one_op("attention", QKV16[:2] + [((1, 2, 8, 32), "float32")],
                                               {"causal": True}),
    "attention_sinks_without_window": lambda: _one_op("attention", QKV16, {"causal": True, "sinks": 2}),
    "attention_float64": lambda: _one_op("attention", [((1, 2, 8, 16), "float64")] * 3, {"causal": True}),
    "block_topk_float64": lambda: _one_op("block_topk_attention", [((1, 2, 1, 16), "float64")] +
                                          [((1, 2, 64, 16), "float64")] * 2, {"block_size": 16, "topk_blocks": 1}),
    "shared_prefix_float64": lambda: _one_op("shared_prefix_attention", [((2, 2, 1, 16), "float64")] +
                                             [((1, 2, 8, 16), "float64")] * 2 + [((2, 2, 4, 16), "float64")] * 2,
                                             {}),
    "rmsnorm_float64": lambda: _one_op("rmsnorm", [((3, 16), "float64")], {"eps": 1e-6}),
    "layernorm_float64": lambda: _one_op("layernorm", [((3, 16), "float64")], {}),
    "softmax_float64": lambda: _one_op("softmax", [((3, 16), "float64")], {}),
    "linear_wo_group_48": lambda: _one_op("linear_wo", [(("batch", 96), "float32")], {"bits": 4, "group_size": 48},
                                          _quantized(4, 48)),
    "linear_wo_group_8": lambda: _one_op("linear_wo", [(("batch", 96), "float32")], {"bits": 8, "group_size": 8},
                                         _quantized(8, 8)),
    "linear_wo_float64_activations": lambda: _one_op("linear_wo", [(("batch", 96), "float64")],
                                                     {"bits": 4, "group_size": 32}, _quantized(4, 32, torch.float64)),
}


def _inputs_for(g, seed):
    gen = torch.Generator().manual_seed(seed)
    shapes = [[2 if isinstance(d, str) else d for d in v.type.shape] for v in g.inputs]
    return [torch.randn(s, generator=gen).to(getattr(torch, v.type.dtype)) for s, v in zip(shapes, g.inputs)]


@pytest.mark.parametrize("case", sorted(UNCLAIMED))
def test_nodes_the_kernels_refuse_stay_with_the_reference(case):
    """Attention with another V head dim or sinks without a window, float64 anywhere (SwiGLU included),
    weight-only linears with group sizes the kernels do not take: not claimed (the kernels would raise), and the
    model gives the reference's outputs."""
    g = UNCLAIMED[case]()
    tri = CompiledModel(g, backends=[TritonBackend(interpret=True), TorchReference()])
    assert [k.backend for k in tri.kernels] == ["torch"] * len(g.nodes)
    inputs = _inputs_for(g, len(case))
    got, want = tri(*inputs), CompiledModel(g)(*inputs)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
