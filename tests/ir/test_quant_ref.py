"""The weight-only / KV quantization reference (lmforge.ir.ops.quant_ref) against plain torch math."""
import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.ir.ops.quant_ref import (QuantizedWeight, awq_scale_search, dequantize_weight, kv_dequantize_fp8,
                                      kv_dequantize_int8, kv_quantize_fp8, kv_quantize_int8, linear_weight_only_ref,
                                      pack_int4, quantize_weight, unpack_codes, unpack_int4)

QUANT_CASES = [(bits, gs, sym, dtype) for bits in (4, 8) for gs in (32, 64, 128) for sym in (True, False)
               for dtype in (torch.float32, torch.float16)]


def _weight(n, k, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=g) * 0.05 + 0.01).to(dtype)


def test_pack_unpack_int4_round_trip_and_layout():
    g = torch.Generator().manual_seed(1)
    q = torch.randint(0, 16, (5, 64), generator=g, dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (5, 32) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), q)
    # Layout: element k in byte k // 2, even k in the low nibble, odd k in the high nibble.
    assert int(packed[2, 3]) == int(q[2, 6]) + 16 * int(q[2, 7])


def test_pack_int4_rejects_bad_input():
    with pytest.raises(LmforgeError):
        pack_int4(torch.full((2, 4), 16, dtype=torch.uint8))
    with pytest.raises(LmforgeError):
        pack_int4(torch.zeros(2, 3, dtype=torch.uint8))


@pytest.mark.parametrize("bits,group_size,symmetric,dtype", QUANT_CASES)
def test_quantize_layout_and_error_bound(bits, group_size, symmetric, dtype):
    n, k = 24, 256
    w = _weight(n, k, dtype)
    qw = quantize_weight(w, bits, group_size, symmetric)
    assert qw.qweight.shape == (n, k * bits // 8) and qw.qweight.dtype == torch.uint8
    assert qw.scales.shape == (n, k // group_size) and qw.scales.dtype == dtype
    assert qw.zeros.shape == (n, k // group_size) and qw.zeros.dtype == torch.uint8
    if symmetric:
        assert bool((qw.zeros == 2 ** (bits - 1)).all())
    codes = unpack_codes(qw).float().reshape(n, k // group_size, group_size)
    expected = ((codes - qw.zeros.float()[..., None]) * qw.scales.float()[..., None]).reshape(n, k)
    deq = dequantize_weight(qw, torch.float32)
    torch.testing.assert_close(deq, expected)
    per_elem_scale = qw.scales.float().repeat_interleave(group_size, dim=1)
    err = (w.float() - deq).abs()
    assert bool((err <= per_elem_scale / 2 + 1e-6).all()), float((err - per_elem_scale / 2).max())


@pytest.mark.parametrize("bits", [4, 8])
def test_asymmetric_beats_symmetric_on_shifted_weights(bits):
    w = _weight(16, 128) + 0.2  # all-positive groups: asymmetric uses the full code range
    sym = (w - dequantize_weight(quantize_weight(w, bits, 32, True))).abs().mean()
    asym = (w - dequantize_weight(quantize_weight(w, bits, 32, False))).abs().mean()
    assert asym < sym


@pytest.mark.parametrize("bits,group_size,symmetric", [(4, 32, True), (4, 64, False), (8, 128, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_linear_weight_only_ref_matches_dequantized_linear(bits, group_size, symmetric, dtype):
    g = torch.Generator().manual_seed(2)
    w = _weight(40, 128)
    qw = quantize_weight(w, bits, group_size, symmetric)
    x = torch.randn(2, 3, 128, generator=g).to(dtype)
    bias = torch.randn(40, generator=g)
    y = linear_weight_only_ref(x, qw, bias)
    assert y.dtype == dtype and y.shape == (2, 3, 40)
    expected = torch.nn.functional.linear(x.double(), dequantize_weight(qw).double(), bias.double())
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(y.double(), expected, rtol=tol, atol=tol)
    # And the quantized linear is close to the full-precision one (the quantization error is small).
    rel = (y.float() - torch.nn.functional.linear(x.float(), w, bias)).norm() / y.float().norm()
    assert rel < (0.1 if bits == 4 else 0.01)


@pytest.mark.parametrize("kwargs", [dict(bits=3, group_size=32), dict(bits=4, group_size=48),
                                    dict(bits=4, group_size=0)])
def test_quantize_rejects_bad_arguments(kwargs):
    with pytest.raises(LmforgeError):
        quantize_weight(_weight(8, 128), **kwargs)


def test_quantized_weight_validates_shapes_and_linear_checks_features():
    qw = quantize_weight(_weight(8, 64), 4, 32)
    with pytest.raises(LmforgeError):
        QuantizedWeight(qw.qweight[:, :16], qw.scales, qw.zeros, 4, 32, (8, 64))
    with pytest.raises(LmforgeError):
        linear_weight_only_ref(torch.randn(2, 32), qw)


def _awq_problem(seed=3):
    """A weight and inputs whose few channels carry large activations (the case AWQ is built for)."""
    g = torch.Generator().manual_seed(seed)
    k = 128
    w = torch.randn(32, k, generator=g) * 0.05
    channel_gain = torch.ones(k)
    channel_gain[torch.randperm(k, generator=g)[:6]] = 30.0
    x = torch.randn(64, k, generator=g) * channel_gain
    return w, x


def test_awq_search_prefers_scaling_outlier_channels():
    w, x = _awq_problem()
    best_s, table = awq_scale_search(w, x, bits=4, group_size=32)
    assert [a for a, _ in table] == pytest.approx([i / 10 for i in range(11)])
    errors = dict(table)
    best_alpha, best_err = min(table, key=lambda row: row[1])
    assert best_err <= errors[0.0]
    assert best_alpha > 0 and best_err < 0.9 * errors[0.0]
    # The returned scales are the ones of the best alpha and reproduce its error when folded in.
    s = x.abs().mean(0).pow(best_alpha)
    s = s / (s.max() * s.min()).sqrt()
    torch.testing.assert_close(best_s, s)
    w_q = dequantize_weight(quantize_weight(w * best_s, 4, 32), torch.float32)
    err = torch.linalg.vector_norm(x @ w.T - (x / best_s) @ w_q.T).item()
    assert err == pytest.approx(best_err, rel=1e-5)


def test_awq_alpha_zero_is_plain_rounding():
    w, x = _awq_problem(seed=4)
    s, table = awq_scale_search(w, x, bits=8, group_size=64, alphas=(0.0,))
    torch.testing.assert_close(s, torch.ones(128))
    plain = dequantize_weight(quantize_weight(w, 8, 64), torch.float32)
    assert table[0][1] == pytest.approx(torch.linalg.vector_norm(x @ w.T - x @ plain.T).item(), rel=1e-5)


@pytest.mark.parametrize("axis,scale_shape", [("token", (2, 3, 5, 1)), ("head", (2, 3, 1, 1))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kv_int8_round_trip(axis, scale_shape, dtype):
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(2, 3, 5, 16, generator=g) * torch.rand(2, 3, 5, 1, generator=g) * 4).to(dtype)
    q, scale = kv_quantize_int8(x, axis)
    assert q.dtype == torch.int8 and scale.shape == scale_shape
    amax = x.float().abs().amax(dim=(-1,) if axis == "token" else (-2, -1), keepdim=True)
    torch.testing.assert_close(scale, amax / 127)
    back = kv_dequantize_int8(q, scale, torch.float32)
    assert bool(((x.float() - back).abs() <= scale / 2 + 1e-6).all())
    assert kv_dequantize_int8(q, scale, dtype).dtype == dtype


def test_kv_int8_rejects_unknown_axis():
    with pytest.raises(LmforgeError):
        kv_quantize_int8(torch.randn(1, 2, 3, 4), axis="channel")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_fp8_round_trip(dtype):
    g = torch.Generator().manual_seed(6)
    x = (torch.randn(2, 4, 7, 32, generator=g) * 3).to(dtype)
    q, scale = kv_quantize_fp8(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (2, 4, 7, 1)
    back = kv_dequantize_fp8(q, scale)
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for normals, plus half a subnormal step (2^-10).
    bound = x.float().abs() * 2 ** -4 + scale * 2 ** -10 + 1e-7
    assert bool(((x.float() - back).abs() <= bound).all())
    assert float(back.abs().amax(dim=-1).sub(x.float().abs().amax(dim=-1)).abs().max()) < 1e-4
