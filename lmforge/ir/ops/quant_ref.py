"""Weight-only and KV-cache quantization in pure torch: the format, the reference math, AWQ scale search.

This module is the ground truth that the Triton kernels (`lmforge.backends.triton.quant_matmul`), the
quantization pass and ONNX export all share. The weight layout matches onnxruntime's
com.microsoft MatMulNBits, so export is a reshape and never a repack:

- W [N, K] (out_features, in_features) is quantized along K in groups of `group_size` (K % group_size == 0).
- int4: `qweight` uint8 [N, K // 2]; element k of row n lives in byte k // 2, low nibble for even k,
  high nibble for odd k. int8: `qweight` uint8 [N, K].
- `scales` [N, K // group_size] (float32 or the weight's floating dtype) and `zeros` uint8
  [N, K // group_size], the zero point of each group (symmetric: 8 for int4, 128 for int8).
- w ~= (q - zero) * scale.

Example:
    >>> qw = quantize_weight(torch.randn(64, 128), bits=4, group_size=32)
    >>> y = linear_weight_only_ref(torch.randn(3, 128), qw)          # [3, 64]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from lmforge.errors import LmforgeError

SUPPORTED_BITS = (4, 8)
DEFAULT_AWQ_ALPHAS = tuple(i / 10 for i in range(11))
FP8_E4M3_MAX = 448.0


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """A weight W [N, K] stored packed with per-group scales and zero points (see the module docstring).

    `shape` is the logical (N, K) of the full-precision weight.
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int
    shape: tuple[int, int]

    def __post_init__(self):
        n, k = self.shape
        _check_bits_and_groups(self.bits, self.group_size, k)
        groups = k // self.group_size
        expected = {
            "qweight": (self.qweight, (n, k * self.bits // 8), torch.uint8),
            "zeros": (self.zeros, (n, groups), torch.uint8),
        }
        for name, (tensor, shape, dtype) in expected.items():
            if tuple(tensor.shape) != shape or tensor.dtype != dtype:
                raise LmforgeError(f"QuantizedWeight.{name} must be {dtype} {list(shape)} for a {self.bits}-bit "
                                   f"[{n}, {k}] weight with group_size {self.group_size}, got {tensor.dtype} "
                                   f"{list(tensor.shape)}; build it with quantize_weight().")
        if tuple(self.scales.shape) != (n, groups) or not self.scales.is_floating_point():
            raise LmforgeError(f"QuantizedWeight.scales must be floating [{n}, {groups}], got {self.scales.dtype} "
                               f"{list(self.scales.shape)}; build it with quantize_weight().")

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    def to(self, device) -> "QuantizedWeight":
        """The same weight with its tensors on `device`."""
        return QuantizedWeight(self.qweight.to(device), self.scales.to(device), self.zeros.to(device), self.bits,
                               self.group_size, self.shape)


def _check_bits_and_groups(bits: int, group_size: int, k: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise LmforgeError(f"weight-only quantization supports bits in {SUPPORTED_BITS}, got {bits}.")
    if group_size <= 0 or k % group_size:
        raise LmforgeError(f"in_features {k} must be a multiple of group_size {group_size}; pick a group_size "
                           f"that divides it (e.g. 32, 64 or 128).")
    if bits == 4 and group_size % 2:
        raise LmforgeError(f"int4 groups must hold an even number of elements (two per byte), got {group_size}.")


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack values 0..15 [N, K] (K even) into uint8 [N, K // 2]: even k in the low nibble, odd k in the high."""
    if q.shape[-1] % 2:
        raise LmforgeError(f"pack_int4 needs an even last dimension, got {q.shape[-1]}.")
    q = q.to(torch.uint8)
    if bool((q > 15).any()):
        raise LmforgeError("pack_int4 got values above 15; int4 codes must lie in 0..15.")
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4`: uint8 [N, K // 2] -> uint8 codes [N, K]."""
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def _round_up_to(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`scale` stored in `dtype`, rounded up (never down) so that no code overflows its range; returned as fp32."""
    stored = scale.to(dtype)
    too_small = stored.float() < scale
    stored = torch.where(too_small, torch.nextafter(stored, torch.full_like(stored, float("inf"))), stored)
    return stored.float()


def _group_scales_and_zeros(wg: torch.Tensor, bits: int, symmetric: bool, scale_dtype: torch.dtype):
    """Per-group scale (already rounded to `scale_dtype`, returned as fp32) and integer zero point."""
    qmax = 2 ** bits - 1
    if symmetric:
        zero = torch.full(wg.shape[:-1], 2 ** (bits - 1), dtype=torch.float32, device=wg.device)
        scale = wg.abs().amax(dim=-1) / (2 ** (bits - 1) - 1)
    else:
        # The range always holds 0 (as GPTQ does), so the zero point needs no clamping.
        wmin = wg.amin(dim=-1).clamp(max=0.0)
        wmax = wg.amax(dim=-1).clamp(min=0.0)
        scale = (wmax - wmin) / qmax
    scale = _round_up_to(torch.where(scale > 0, scale, torch.ones_like(scale)), scale_dtype)
    if not symmetric:
        zero = torch.round(-wmin / scale).clamp(0, qmax)
    return scale, zero


def quantize_weight(w: torch.Tensor, bits: int, group_size: int, symmetric: bool = True,
                    scale_dtype: torch.dtype | None = None) -> QuantizedWeight:
    """Quantize W [N, K] along K in groups: round-to-nearest with per-group scale and zero point.

    Symmetric: zero = 2^(bits-1), scale = max|w| / (2^(bits-1) - 1). Asymmetric: scale and zero from the
    group's min/max (range widened to hold 0). Every element then satisfies |w - deq(q)| <= scale / 2.
    `scale_dtype` defaults to w's dtype when it is floating (fp16/bf16 weights keep fp16/bf16 scales).
    """
    if w.dim() != 2 or not w.is_floating_point():
        raise LmforgeError(f"quantize_weight expects a floating [out_features, in_features] weight, got "
                           f"{w.dtype} {list(w.shape)}.")
    n, k = w.shape
    _check_bits_and_groups(bits, group_size, k)
    scale_dtype = scale_dtype or w.dtype
    wg = w.float().reshape(n, k // group_size, group_size)
    scale, zero = _group_scales_and_zeros(wg, bits, symmetric, scale_dtype)
    q = torch.round(wg / scale[..., None]) + zero[..., None]
    q = q.clamp(0, 2 ** bits - 1).to(torch.uint8).reshape(n, k)
    qweight = pack_int4(q) if bits == 4 else q
    return QuantizedWeight(qweight.contiguous(), scale.to(scale_dtype).contiguous(),
                           zero.to(torch.uint8).contiguous(), bits, group_size, (n, k))


def unpack_codes(qw: QuantizedWeight) -> torch.Tensor:
    """The integer codes q [N, K] (uint8) of a quantized weight."""
    return unpack_int4(qw.qweight) if qw.bits == 4 else qw.qweight


def dequantize_weight(qw: QuantizedWeight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """W' [N, K] = (q - zero) * scale, computed in fp32 and returned in `dtype` (default: the scales' dtype)."""
    n, k = qw.shape
    q = unpack_codes(qw).float().reshape(n, k // qw.group_size, qw.group_size)
    w = (q - qw.zeros.float()[..., None]) * qw.scales.float()[..., None]
    return w.reshape(n, k).to(dtype or qw.scales.dtype)


def linear_weight_only_ref(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ dequant(W).T + bias, accumulated in fp32 and returned in x's dtype."""
    if x.shape[-1] != qw.in_features:
        raise LmforgeError(f"linear_weight_only: x has {x.shape[-1]} features but the weight expects "
                           f"{qw.in_features}.")
    y = x.float() @ dequantize_weight(qw, torch.float32).T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def _awq_channel_scales(x_abs_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = mean|x|^alpha, normalised so that sqrt(max(s) * min(s)) = 1 (AWQ's normalisation)."""
    s = x_abs_mean.clamp(min=1e-8).pow(alpha)
    return s / (s.max() * s.min()).sqrt()


def awq_scale_search(w: torch.Tensor, x_calib: torch.Tensor, bits: int, group_size: int,
                     alphas: Sequence[float] = DEFAULT_AWQ_ALPHAS, symmetric: bool = True
                     ) -> tuple[torch.Tensor, list[tuple[float, float]]]:
    """AWQ-style activation-aware scaling: pick per-input-channel scales s that make quantization hurt least.

    For each alpha, s = mean|x|^alpha (normalised); the error is ||x W^T - (x / s) Q(W * s)^T||_F, Q being
    `quantize_weight` + `dequantize_weight`. Scaling up the channels that carry large activations gives
    their weights more resolution. Returns the best s [K] (fp32; divide the input by it, i.e. fold 1/s into
    the previous op, and quantize W * s) and the table [(alpha, error), ...] in the order of `alphas`.
    alpha = 0 is plain round-to-nearest (s = 1).
    """
    if x_calib.shape[-1] != w.shape[1]:
        raise LmforgeError(f"awq_scale_search: calibration inputs have {x_calib.shape[-1]} features, the "
                           f"weight has {w.shape[1]}.")
    if not alphas:
        raise LmforgeError("awq_scale_search needs at least one alpha.")
    x = x_calib.reshape(-1, x_calib.shape[-1]).float()
    wf = w.float()
    y_ref = x @ wf.T
    x_abs_mean = x.abs().mean(dim=0)
    table, best = [], None
    for alpha in alphas:
        s = _awq_channel_scales(x_abs_mean, float(alpha))
        w_q = dequantize_weight(quantize_weight(wf * s, bits, group_size, symmetric), torch.float32)
        err = torch.linalg.vector_norm(y_ref - (x / s) @ w_q.T).item()
        table.append((float(alpha), err))
        if best is None or err < best[1]:
            best = (s, err)
    return best[0], table


def kv_quantize_int8(x: torch.Tensor, axis: str = "token") -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantization of a KV cache x [batch, heads, seq, head_dim] (any rank >= 2 for "token").

    axis="token": one scale per token vector (reduce over head_dim), scale shape [..., seq, 1].
    axis="head": one scale per (batch, head) over all tokens and channels, scale shape [..., 1, 1].
    Returns (q int8 in -127..127, scale fp32) with x ~= q * scale, |x - q * scale| <= scale / 2.
    """
    if axis == "token":
        dims = (-1,)
    elif axis == "head":
        dims = (-2, -1)
    else:
        raise LmforgeError(f"kv_quantize_int8: axis must be 'token' or 'head', got {axis!r}.")
    if x.dim() < len(dims) + (1 if axis == "head" else 0):
        raise LmforgeError(f"kv_quantize_int8 with axis={axis!r} needs more dimensions than {list(x.shape)}.")
    xf = x.float()
    scale = xf.abs().amax(dim=dims, keepdim=True) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(xf / scale).clamp(-127, 127).to(torch.int8)
    return q, scale


def kv_dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x' = q * scale in `dtype` (inverse of `kv_quantize_int8`)."""
    return (q.float() * scale.float()).to(dtype)


def kv_quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float8_e4m3fn quantization with one fp32 scale per row (last dim): x ~= q * scale.

    The row's max |x| maps to 448, the largest e4m3 value, so nothing saturates.
    """
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True) / FP8_E4M3_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = (xf / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


def kv_dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x' = q * scale in `dtype` (inverse of `kv_quantize_fp8`)."""
    return (q.float() * scale.float()).to(dtype)
