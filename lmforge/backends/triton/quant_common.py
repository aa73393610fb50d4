"""What the weight-only linear kernels share (quant_matmul: GEMV and GEMM; quant_gemm: the swapped GEMM): input
checks, the packed tensors, Triton's names of the activation dtypes, a memo for the per-call plan functions, and
the GEMMs' tl.dot (`dot_ieee`)."""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from lmforge.errors import LmforgeError
from lmforge.ir.ops.quant_ref import QuantizedWeight

SUPPORTED_ACTIVATIONS = (torch.float16, torch.bfloat16, torch.float32)
TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _interpreted() -> bool:
    """Whether @triton.jit makes interpreted functions in this process (what it reads when decorating)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Triton's interpreter (3.9) multiplies bf16 tl.dot operands as raw 16-bit integers (fp16 and fp32 are exact), so
# interpreted GEMMs upcast bf16 operands to fp32 (the same numbers: bf16 products are exact in fp32, as on tensor
# cores), as attention_prefill.interpreter_dot_fp32 does for attention. Read when this module is imported, like
# quant_matmul.PAIR_ASM; compiled kernels (AOT builds run in a process without the interpreter) never upcast.
INTERPRETED_BF16_DOT_FP32 = tl.constexpr(_interpreted())


@triton.jit
def dot_ieee(a, b, acc):
    """tl.dot(a, b, acc, input_precision="ieee"); compiled, exactly that. Under Triton's interpreter bf16 operands
    are upcast to fp32 first (see INTERPRETED_BF16_DOT_FP32)."""
    if INTERPRETED_BF16_DOT_FP32:
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
        if b.dtype == tl.bfloat16:
            b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision="ieee")


def _check_inputs(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None) -> None:
    if x.shape[-1] != qw.in_features:
        raise LmforgeError(f"linear_weight_only: x has {x.shape[-1]} features but the weight expects "
                           f"{qw.in_features}.")
    if x.dtype not in SUPPORTED_ACTIVATIONS:
        raise LmforgeError(f"linear_weight_only supports activations in {SUPPORTED_ACTIVATIONS}, got {x.dtype}; "
                           "cast x first.")
    gs = qw.group_size
    if gs < 16 or gs & (gs - 1):
        raise LmforgeError(f"the Triton weight-only kernels need a power-of-two group_size >= 16, got {gs}; "
                           "use lmforge.ir.ops.quant_ref.linear_weight_only_ref or requantize with 32/64/128.")
    tensors = {"qweight": qw.qweight, "scales": qw.scales, "zeros": qw.zeros, "bias": bias}
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise LmforgeError(f"linear_weight_only: {name} is on {t.device} but x is on {x.device}; move the "
                               "weight with QuantizedWeight.to(device).")
    if bias is not None and tuple(bias.shape) != (qw.out_features,):
        raise LmforgeError(f"linear_weight_only: bias must be [{qw.out_features}], got {list(bias.shape)}.")


def _packed(qw: QuantizedWeight):
    tensors = (qw.qweight, qw.scales, qw.zeros)
    return tensors if all(t.is_contiguous() for t in tensors) else tuple(t.contiguous() for t in tensors)


def _memoized(fn):
    """functools.lru_cache, falling back to a plain call when an argument (a config) is not hashable."""
    cached = functools.lru_cache(maxsize=1024)(fn)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return cached(*args, **kwargs)
        except TypeError:  # unhashable argument; a TypeError raised by fn itself is raised again below
            return fn(*args, **kwargs)

    return call
