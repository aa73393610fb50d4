"""Fusion and canonicalization are exact: the rewritten graph matches the captured one within fp32
tolerance on fresh random inputs, over a table of shapes (GQA ratios, odd lengths, batch > 1)."""
import pytest
import torch

import lmforge
from lmforge.ir import verify
from lmforge.passes import (PassManager, cse, dce, fold_shapes, fuse_elementwise, merge_linears, recognize_rmsnorm,
                            recognize_rope)
from lmforge.compiler import CompiledModel


class HFStyleBlock(torch.nn.Module):
    """RMSNorm and RoPE written out elementwise (as Hugging Face does), GQA via repeat, SwiGLU MLP."""

    def __init__(self, dim, heads, kv_heads):
        super().__init__()
        self.h, self.kv, self.d = heads, kv_heads, dim // heads
        self.wq = torch.nn.Linear(dim, heads * self.d, bias=False)
        self.wk = torch.nn.Linear(dim, kv_heads * self.d, bias=False)
        self.wv = torch.nn.Linear(dim, kv_heads * self.d, bias=False)
        self.wo = torch.nn.Linear(heads * self.d, dim, bias=False)
        self.gate = torch.nn.Linear(dim, 2 * dim, bias=False)
        self.up = torch.nn.Linear(dim, 2 * dim, bias=False)
        self.down = torch.nn.Linear(2 * dim, dim, bias=False)
        self.norm_w = torch.nn.Parameter(torch.rand(dim) + 0.5)

    def rms(self, x):
        var = x.pow(2).mean(-1, keepdim=True)
        return self.norm_w * (x * torch.rsqrt(var + 1e-6))

    @staticmethod
    def rot(x):
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
        return torch.cat((-x2, x1), dim=-1)

    def forward(self, x, cos, sin):
        b, s, _ = x.shape
        h = self.rms(x)
        q = self.wq(h).view(b, s, self.h, self.d).transpose(1, 2)
        k = self.wk(h).view(b, s, self.kv, self.d).transpose(1, 2)
        v = self.wv(h).view(b, s, self.kv, self.d).transpose(1, 2)
        q, k = q * cos + self.rot(q) * sin, k * cos + self.rot(k) * sin
        rep = self.h // self.kv
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.wo(a.transpose(1, 2).reshape(b, s, -1))
        return x + self.down(torch.nn.functional.silu(self.gate(self.rms(x))) * self.up(self.rms(x)))


SHAPES = [  # (batch, seq, dim, heads, kv_heads)
    (1, 5, 32, 4, 4), (2, 7, 32, 4, 2), (3, 9, 48, 6, 1), (2, 1, 16, 2, 1),
]


@pytest.mark.parametrize("b,s,dim,heads,kv", SHAPES)
def test_fusion_pipeline_is_exact_and_recognizes_patterns(b, s, dim, heads, kv):
    torch.manual_seed(b * 100 + s)
    m = HFStyleBlock(dim, heads, kv).eval()
    d = dim // heads
    inputs = (torch.randn(b, s, dim), torch.randn(s, d), torch.randn(s, d))
    graph = lmforge.capture(m, inputs)
    pm = PassManager([fold_shapes, cse, recognize_rmsnorm, recognize_rope, merge_linears, fuse_elementwise, dce])
    fused = pm.run(graph)
    ops = [n.op for n in fused.nodes]
    assert ops.count("rmsnorm") == 2, "the two distinct RMSNorms are recognized (CSE merged the repeated one)"
    assert ops.count("rope") == 2
    assert ops.count("linear") == 4, "QKV merged, gate/up merged, wo and down stay"
    assert any(n.op == "fused" and n.attr["kind"] == "swiglu" for n in fused.nodes)
    verify(fused)
    ref, out = CompiledModel(graph), CompiledModel(fused)
    for _ in range(2):
        fresh = (torch.randn(b, s, dim), torch.randn(s, d), torch.randn(s, d))
        torch.testing.assert_close(out(*fresh), ref(*fresh), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out(*fresh), m(*fresh), rtol=1e-5, atol=1e-5)


def test_fusion_knobs_turn_passes_off():
    m = HFStyleBlock(16, 2, 1).eval()
    inputs = (torch.randn(1, 3, 16), torch.randn(3, 8), torch.randn(3, 8))
    graph = lmforge.capture(m, inputs)
    off = PassManager([merge_linears, fuse_elementwise]).run(
        graph, {"fusion.merge_linears": False, "fusion.elementwise": False})
    assert off == graph
    assert {k.name for k in PassManager([merge_linears, fuse_elementwise]).knobs()} == {
        "fusion.merge_linears", "fusion.elementwise"}


def test_fused_region_cost_charges_only_boundary_bytes():
    from lmforge.search.cost_model import bindings_for, node_costs

    m = HFStyleBlock(16, 2, 1).eval()
    inputs = (torch.randn(2, 4, 16), torch.randn(4, 8), torch.randn(4, 8))
    graph = PassManager([fold_shapes, cse, recognize_rmsnorm, recognize_rope]).run(lmforge.capture(m, inputs))
    fused = fuse_elementwise(graph)
    env = bindings_for(graph)
    before, after = node_costs(graph, env), node_costs(fused, env)
    assert sum(c.bytes for c in after) < sum(c.bytes for c in before)
    assert sum(c.flops for c in after) == pytest.approx(sum(c.flops for c in before))
