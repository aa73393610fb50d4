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
        lmforge.capture(m, (x,)), {"quant.weight_bits": 4, "quant.group_size": 32, "quant.lm_head": True})
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
