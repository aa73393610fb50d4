"""Triton RMSNorm / LayerNorm / softmax / SwiGLU kernels against torch.nn.functional.

The reference runs in fp32 on the same (upcast) inputs and is rounded to the input dtype, which is what
the kernels promise (fp32 math, output in the input's dtype).
"""
import pytest
import torch
import torch.nn.functional as F

from lmforge.backends.triton import norms
from lmforge.backends.triton.config import KernelConfig
from lmforge.errors import LmforgeError

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Shapes: rows shorter than a warp, a row length that is not a power of two, many short rows.
SHAPES = [(3, 5, 40), (7, 300), (33, 8)]
LOOPED = KernelConfig.make(num_warps=4, num_stages=1, BLOCK_R=2, BLOCK_D=64)  # forces the chunked sweep


def _inputs(shape, dtype, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * scale + 0.5).to(dtype).to(DEVICE)
    d = shape[-1]
    w = (torch.randn(d, generator=g) * 0.5 + 1).to(dtype).to(DEVICE)
    b = torch.randn(d, generator=g).to(dtype).to(DEVICE)
    return x, w, b


def _close(actual, expected_fp32, dtype):
    assert actual.dtype == dtype and actual.shape == expected_fp32.shape
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.float(), expected_fp32.to(dtype).float(), rtol=tol, atol=tol)


REFERENCES = {
    "rmsnorm": (lambda x, w, b, cfg: norms.rmsnorm(x, w, 1e-6, cfg),
                lambda x, w, b: F.rms_norm(x, x.shape[-1:], w, 1e-6)),
    "rmsnorm_no_weight": (lambda x, w, b, cfg: norms.rmsnorm(x, None, 1e-5, cfg),
                          lambda x, w, b: F.rms_norm(x, x.shape[-1:], None, 1e-5)),
    "layernorm": (lambda x, w, b, cfg: norms.layernorm(x, w, b, 1e-5, cfg),
                  lambda x, w, b: F.layer_norm(x, x.shape[-1:], w, b, 1e-5)),
    "layernorm_plain": (lambda x, w, b, cfg: norms.layernorm(x, None, None, 1e-5, cfg),
                        lambda x, w, b: F.layer_norm(x, x.shape[-1:], None, None, 1e-5)),
    "softmax": (lambda x, w, b, cfg: norms.softmax(x, -1, cfg), lambda x, w, b: torch.softmax(x, -1)),
}


@pytest.mark.parametrize("op", sorted(REFERENCES))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", [None, LOOPED], ids=["default", "looped"])
def test_row_kernels_match_torch(op, shape, dtype, config):
    kernel, reference = REFERENCES[op]
    x, w, b = _inputs(shape, dtype, seed=len(op) + shape[-1])
    _close(kernel(x, w, b, config), reference(x.float(), w.float(), b.float()), dtype)


@pytest.mark.parametrize("kernel", ["rmsnorm", "layernorm", "softmax"])
@pytest.mark.parametrize("index", range(len(norms.CANDIDATE_CONFIGS["rmsnorm"])))
def test_every_row_candidate_config(kernel, index):
    config = norms.CANDIDATE_CONFIGS[kernel][index]
    x, w, b = _inputs((6, 1000), torch.float16, seed=index)
    op, reference = REFERENCES[kernel]
    _close(op(x, w, b, config), reference(x.float(), w.float(), b.float()), torch.float16)


@pytest.mark.parametrize("config", [None, LOOPED], ids=["default", "looped"])
def test_softmax_with_masked_logits_and_large_values(config):
    x, _, _ = _inputs((4, 130), torch.float32, seed=9, scale=60.0)
    x[:, ::3] = float("-inf")       # masked positions
    x[1, :70] = float("-inf")       # a whole first chunk masked (the online sweep starts from -inf)
    _close(norms.softmax(x, -1, config), torch.softmax(x, -1), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 37), (2, 4, 1500)])
@pytest.mark.parametrize("config", [None] + norms.CANDIDATE_CONFIGS["swiglu"][1:2])
def test_swiglu_matches_silu_times_up(dtype, shape, config):
    gate, _, _ = _inputs(shape, dtype, seed=1)
    up, _, _ = _inputs(shape, dtype, seed=2)
    _close(norms.swiglu(gate, up, config), F.silu(gate.float()) * up.float(), dtype)


def test_strided_rows_and_empty_inputs():
    x, w, _ = _inputs((5, 128), torch.float32, seed=4)
    strided = x[:, ::2]  # last dim not contiguous
    _close(norms.rmsnorm(strided, w[:64], 1e-6), F.rms_norm(strided, (64,), w[:64], 1e-6), torch.float32)
    rows_view = x[::2]   # rows strided, last dim contiguous: no copy needed
    _close(norms.softmax(rows_view), torch.softmax(rows_view, -1), torch.float32)
    empty = torch.zeros(0, 16, device=DEVICE)
    assert norms.softmax(empty).shape == (0, 16)
    assert norms.swiglu(empty, empty).shape == (0, 16)


@pytest.mark.parametrize("call", [
    lambda x, w: norms.softmax(x, dim=0),                         # not the last dim
    lambda x, w: norms.rmsnorm(x, w[:3], 1e-6),                   # weight of the wrong length
    lambda x, w: norms.layernorm(x.int(), w, None),               # integer input
    lambda x, w: norms.swiglu(x, x[:, :4]),                       # shape mismatch
    lambda x, w: norms.rmsnorm(x, w, 1e-6, KernelConfig.make(BLOCK_D=64)),  # config lacks BLOCK_R
])
def test_user_errors_raise_lmforge_error(call):
    x, w, _ = _inputs((4, 16), torch.float32)
    with pytest.raises(LmforgeError):
        call(x, w)
