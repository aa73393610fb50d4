"""The Triton backend inside a compiled model: it claims the nodes it has kernels for, the generated code
launches them (under the interpreter on the CPU), and outputs match the torch reference."""
import os

import pytest
import torch

import lmforge
from lmforge.backends.torch import TorchReference
from lmforge.backends.triton.backend import TritonBackend
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
