"""exp for fp32 as plain arithmetic, so that loops calling it vectorize (LLVM's expf is a scalar libm call).

Cephes' expf: n = round(x / ln 2), r = x - n ln 2 (in two parts for accuracy), exp(r) by a degree-6
polynomial on [-ln2/2, ln2/2], times 2^n built in the exponent bits. Error about 1 ulp over the normal range
(checked against torch.exp in tests/backends/tvm); x below -87.3 gives 0, above 88.72 +inf, NaN stays NaN.
"""
from __future__ import annotations

LOG2E = 1.44269504088896341
LN2_HI = 0.693359375
LN2_LO = -2.12194440e-4
POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
X_MIN, X_MAX = -87.33654, 88.72283


def exp_f32(x):
    """e^x as a TIR expression of the fp32 expression x."""
    from tvm import tirx

    def c(v):
        return tirx.const(v, "float32")

    inf = tirx.const(float("inf"), "float32")
    clamped = tirx.max(tirx.min(x, c(X_MAX)), c(X_MIN))
    n = tirx.floor(clamped * c(LOG2E) + c(0.5))
    r = clamped - n * c(LN2_HI) - n * c(LN2_LO)
    p = c(POLY[0])
    for coeff in POLY[1:]:
        p = p * r + c(coeff)
    p = p * r * r + r + c(1.0)
    # 2^n as 2^(n // 2) * 2^(n - n // 2): each factor's biased exponent stays in 1..254 for n in -126..128
    ni = tirx.Cast("int32", n)
    half = tirx.shift_right(ni, tirx.const(1, "int32"))
    value = p * _pow2(half) * _pow2(ni - half)
    value = tirx.Select(x < c(X_MIN), c(0.0), tirx.Select(x > c(X_MAX), inf, value))
    return tirx.Select(tirx.isnan(x), x, value)  # NaN in, NaN out


def _pow2(e):
    from tvm import tirx

    return tirx.reinterpret("float32", tirx.shift_left(e + tirx.const(127, "int32"), tirx.const(23, "int32")))
