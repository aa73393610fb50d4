"""RMSNorm written the Hugging Face way in half precision (upcast to fp32, normalise, cast back, times the
weight) is recognized as one `rmsnorm` that computes what the model computes: compiled equals eager within
fp16/bf16 tolerance (a whole Hugging Face Llama in half precision: tests/test_transformers_models.py)."""
import pytest
import torch

import lmforge
from lmforge.compiler import CompiledModel
from lmforge.ir import verify
from lmforge.passes import PassManager, cse, fold_shapes, recognize_rmsnorm

TOL = {torch.float16: dict(rtol=1e-2, atol=1e-2), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
       torch.float32: dict(rtol=1e-5, atol=1e-5)}


class HFRMSNorm(torch.nn.Module):
    """transformers' LlamaRMSNorm."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(dim) + 0.1 * torch.randn(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class CastToHalfRMSNorm(HFRMSNorm):
    """fp32 in, normalised, rounded to fp16, times an fp32 weight: the result is fp32."""

    def forward(self, x):
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.half()


class HalfWeightOnFloat(HFRMSNorm):
    """fp32 activations, no casts, a half weight: the result is fp32."""

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


CASES = [  # (module, weight dtype, input dtype)
    (HFRMSNorm, torch.float16, torch.float16),
    (HFRMSNorm, torch.bfloat16, torch.bfloat16),
    (HFRMSNorm, torch.float32, torch.float32),
    (HFRMSNorm, torch.float32, torch.float16),
    (CastToHalfRMSNorm, torch.float32, torch.float32),
    (HalfWeightOnFloat, torch.float16, torch.float32),
]


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
@pytest.mark.parametrize("cls,w_dtype,x_dtype", CASES,
                         ids=[f"{c.__name__}-w_{w}-x_{x}".replace("torch.", "") for c, w, x in CASES])
def test_hf_style_rmsnorm_is_recognized_and_matches_eager(cls, w_dtype, x_dtype):
    torch.manual_seed(0)
    m = cls(64).to(w_dtype).eval()
    x = torch.randn(2, 5, 64, dtype=x_dtype) * 3
    graph = lmforge.capture(m, (x,), dynamic={"x": {0: "batch", 1: "seq"}})
    fused = PassManager([fold_shapes, cse, recognize_rmsnorm]).run(graph)
    verify(fused)
    ops = [n.op for n in fused.nodes]
    assert ops.count("rmsnorm") == 1 and "rsqrt" not in ops, ops
    if x_dtype == w_dtype != torch.float32:
        assert ops == ["rmsnorm"], "the round trip through fp32 is what rmsnorm does inside"
    compiled = lmforge.compile(m, (x,), dynamic={"x": {0: "batch", 1: "seq"}})
    # the model rounds to its narrowest dtype somewhere on the way: that one sets the tolerance
    narrow = min((x_dtype, w_dtype, torch.float16 if cls is CastToHalfRMSNorm else torch.float32),
                 key=lambda d: torch.finfo(d).bits)
    for shape in [(2, 5, 64), (3, 7, 64)]:
        xi = torch.randn(shape, dtype=x_dtype) * 3
        want = m(xi)
        for out in (compiled(xi), CompiledModel(fused)(xi)):
            assert out.dtype == want.dtype
            torch.testing.assert_close(out, want, **TOL[narrow])
