"""Row-wise Triton kernels: RMSNorm, LayerNorm, softmax over the last dim, and fused SwiGLU.

All math is fp32 whatever the storage dtype; outputs come back in the input's dtype. The row kernels
work on [BLOCK_R, BLOCK_D] tiles (BLOCK_R rows per program, so short rows still fill the threads). When a
row fits in BLOCK_D (`ONE_PASS`) it is read once and kept in registers; longer rows (e.g. softmax over a
150k vocabulary) are walked in BLOCK_D chunks: statistics first, then a second sweep that writes. Softmax's
first sweep is the online form (running max and rescaled sum per lane), so it never overflows.

Tile sizes and warps are knobs (KernelConfig): BLOCK_R (rows per program) and BLOCK_D (largest chunk of a
row, clamped to the row length rounded up to a power of two), num_warps, num_stages.
"""
from __future__ import annotations

from functools import partial

import torch
import triton
import triton.language as tl

from lmforge.backends.triton.config import KernelConfig
from lmforge.errors import LmforgeError

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _rmsnorm_kernel(x_ptr, w_ptr, out_ptr, n_rows, D, stride_x, stride_o, eps,
                    HAS_WEIGHT: tl.constexpr, ONE_PASS: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """out = x / sqrt(mean(x^2) + eps) * w, per row."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    cols = tl.arange(0, BLOCK_D)
    x_rows = x_ptr + rows[:, None] * stride_x
    o_rows = out_ptr + rows[:, None] * stride_o
    if ONE_PASS:
        mask = row_mask[:, None] & (cols[None, :] < D)
        x = tl.load(x_rows + cols[None, :], mask=mask, other=0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
        y = x * rstd[:, None]
        if HAS_WEIGHT:
            y = y * tl.load(w_ptr + cols, mask=cols < D, other=0).to(tl.float32)[None, :]
        tl.store(o_rows + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        sq = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            mask = row_mask[:, None] & (d0 + cols[None, :] < D)
            x = tl.load(x_rows + d0 + cols[None, :], mask=mask, other=0).to(tl.float32)
            sq += x * x
        rstd = 1.0 / tl.sqrt(tl.sum(sq, axis=1) / D + eps)
        for d0 in range(0, D, BLOCK_D):
            mask = row_mask[:, None] & (d0 + cols[None, :] < D)
            y = tl.load(x_rows + d0 + cols[None, :], mask=mask, other=0).to(tl.float32) * rstd[:, None]
            if HAS_WEIGHT:
                y = y * tl.load(w_ptr + d0 + cols, mask=d0 + cols < D, other=0).to(tl.float32)[None, :]
            tl.store(o_rows + d0 + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _layernorm_kernel(x_ptr, w_ptr, b_ptr, out_ptr, n_rows, D, stride_x, stride_o, eps,
                      HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ONE_PASS: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """out = (x - mean) / sqrt(var + eps) * w + b, per row (biased variance, as torch)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    cols = tl.arange(0, BLOCK_D)
    x_rows = x_ptr + rows[:, None] * stride_x
    o_rows = out_ptr + rows[:, None] * stride_o
    if ONE_PASS:
        mask = row_mask[:, None] & (cols[None, :] < D)
        x = tl.load(x_rows + cols[None, :], mask=mask, other=0).to(tl.float32)
        mean = tl.sum(x, axis=1) / D
        xc = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps)
        y = xc * rstd[:, None]
        if HAS_WEIGHT:
            y = y * tl.load(w_ptr + cols, mask=cols < D, other=0).to(tl.float32)[None, :]
        if HAS_BIAS:
            y = y + tl.load(b_ptr + cols, mask=cols < D, other=0).to(tl.float32)[None, :]
        tl.store(o_rows + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        total = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            mask = row_mask[:, None] & (d0 + cols[None, :] < D)
            total += tl.load(x_rows + d0 + cols[None, :], mask=mask, other=0).to(tl.float32)
        mean = tl.sum(total, axis=1) / D
        sq = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            mask = row_mask[:, None] & (d0 + cols[None, :] < D)
            x = tl.load(x_rows + d0 + cols[None, :], mask=mask, other=0).to(tl.float32)
            xc = tl.where(mask, x - mean[:, None], 0.0)
            sq += xc * xc
        rstd = 1.0 / tl.sqrt(tl.sum(sq, axis=1) / D + eps)
        for d0 in range(0, D, BLOCK_D):
            mask = row_mask[:, None] & (d0 + cols[None, :] < D)
            x = tl.load(x_rows + d0 + cols[None, :], mask=mask, other=0).to(tl.float32)
            y = (x - mean[:, None]) * rstd[:, None]
            if HAS_WEIGHT:
                y = y * tl.load(w_ptr + d0 + cols, mask=d0 + cols < D, other=0).to(tl.float32)[None, :]
            if HAS_BIAS:
                y = y + tl.load(b_ptr + d0 + cols, mask=d0 + cols < D, other=0).to(tl.float32)[None, :]
            tl.store(o_rows + d0 + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _softmax_kernel(x_ptr, out_ptr, n_rows, D, stride_x, stride_o,
                    ONE_PASS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """out = exp(x - max) / sum(exp(x - max)) along each row."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    cols = tl.arange(0, BLOCK_D)
    x_rows = x_ptr + rows[:, None] * stride_x
    o_rows = out_ptr + rows[:, None] * stride_o
    if ONE_PASS:
        mask = row_mask[:, None] & (cols[None, :] < D)
        x = tl.load(x_rows + cols[None, :], mask=mask, other=-float("inf")).to(tl.float32)
        x = tl.where(row_mask[:, None], x, 0.0)  # rows past the end: finite filler, never stored
        e = tl.exp(x - tl.max(x, axis=1)[:, None])
        y = e / tl.sum(e, axis=1)[:, None]
        tl.store(o_rows + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        # Online sweep: each lane keeps its own running max and the sum rescaled to it.
        lane_max = tl.full((BLOCK_R, BLOCK_D), -float("inf"), tl.float32)
        lane_sum = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            mask = row_mask[:, None] & (d0 + cols[None, :] < D)
            x = tl.load(x_rows + d0 + cols[None, :], mask=mask, other=-float("inf")).to(tl.float32)
            x = tl.where(row_mask[:, None], x, 0.0)
            new_max = tl.maximum(lane_max, x)
            # A lane that has seen only -inf keeps sum 0; subtracting 0 there avoids -inf - -inf = nan.
            ref = tl.where(new_max > -float("inf"), new_max, 0.0)
            lane_sum = lane_sum * tl.exp(lane_max - ref) + tl.exp(x - ref)
            lane_max = new_max
        row_max = tl.max(lane_max, axis=1)
        rescale = tl.exp(lane_max - tl.where(row_max > -float("inf"), row_max, 0.0)[:, None])
        row_sum = tl.sum(lane_sum * rescale, axis=1)
        for d0 in range(0, D, BLOCK_D):
            mask = row_mask[:, None] & (d0 + cols[None, :] < D)
            x = tl.load(x_rows + d0 + cols[None, :], mask=mask, other=-float("inf")).to(tl.float32)
            x = tl.where(row_mask[:, None], x, 0.0)
            y = tl.exp(x - row_max[:, None]) / row_sum[:, None]
            tl.store(o_rows + d0 + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_kernel(gate_ptr, up_ptr, out_ptr, numel, BLOCK: tl.constexpr):
    """out = silu(gate) * up = gate * sigmoid(gate) * up, elementwise."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    g = tl.load(gate_ptr + offs, mask=mask, other=0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


_ROW_DEFAULT = KernelConfig.make(num_warps=8, num_stages=1, BLOCK_R=1, BLOCK_D=8192)
_ROW_CANDIDATES = [
    _ROW_DEFAULT,
    KernelConfig.make(num_warps=4, num_stages=1, BLOCK_R=1, BLOCK_D=4096),
    KernelConfig.make(num_warps=16, num_stages=1, BLOCK_R=1, BLOCK_D=16384),
    KernelConfig.make(num_warps=4, num_stages=1, BLOCK_R=4, BLOCK_D=1024),
    KernelConfig.make(num_warps=4, num_stages=1, BLOCK_R=16, BLOCK_D=256),
    KernelConfig.make(num_warps=8, num_stages=2, BLOCK_R=1, BLOCK_D=2048),
]
_SWIGLU_DEFAULT = KernelConfig.make(num_warps=4, num_stages=1, BLOCK=1024)

DEFAULT_CONFIGS: dict[str, KernelConfig] = {
    "rmsnorm": _ROW_DEFAULT, "layernorm": _ROW_DEFAULT, "softmax": _ROW_DEFAULT, "swiglu": _SWIGLU_DEFAULT,
}
CANDIDATE_CONFIGS: dict[str, list[KernelConfig]] = {
    "rmsnorm": list(_ROW_CANDIDATES),
    "layernorm": list(_ROW_CANDIDATES),
    "softmax": list(_ROW_CANDIDATES),
    "swiglu": [_SWIGLU_DEFAULT] + [KernelConfig.make(num_warps=w, num_stages=1, BLOCK=b)
                                   for w, b in ((4, 512), (8, 2048), (8, 4096), (16, 8192))],
}


def _param(config: KernelConfig, name: str, kernel: str) -> int:
    return config.require(name, kernel)


def _rows_view(x: torch.Tensor, op: str) -> torch.Tensor:
    """x as [rows, D] with a contiguous last dim (a copy only when x's last dim is strided)."""
    if x.dtype not in SUPPORTED_DTYPES:
        raise LmforgeError(f"{op} supports {SUPPORTED_DTYPES}, got {x.dtype}; cast the input first.")
    if x.dim() == 0:
        raise LmforgeError(f"{op} needs at least one dimension.")
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _check_param(p: torch.Tensor | None, d: int, x: torch.Tensor, name: str, op: str) -> torch.Tensor | None:
    if p is None:
        return None
    if tuple(p.shape) != (d,):
        raise LmforgeError(f"{op}: {name} must have shape [{d}] (the last dim of x), got {list(p.shape)}.")
    if p.device != x.device:
        raise LmforgeError(f"{op}: {name} is on {p.device} but x is on {x.device}.")
    return p.contiguous()


def row_plan(config: KernelConfig | None, d: int, kernel: str) -> KernelConfig:
    """The row-kernel config that really runs for rows of length d: BLOCK_D clamped to next_pow2(d)."""
    config = config or DEFAULT_CONFIGS[kernel]
    return KernelConfig.make(num_warps=config.num_warps, num_stages=config.num_stages,
                             BLOCK_R=_param(config, "BLOCK_R", kernel),
                             BLOCK_D=min(_param(config, "BLOCK_D", kernel), triton.next_power_of_2(max(d, 1))))


def _row_launch(x2: torch.Tensor, config: KernelConfig | None, kernel: str):
    """Grid and the BLOCK_R / BLOCK_D / ONE_PASS constexprs of a row kernel for x2 [rows, D]."""
    n_rows, d = x2.shape
    plan = row_plan(config, d, kernel)
    block_r, block_d = plan.get("BLOCK_R"), plan.get("BLOCK_D")
    meta = dict(ONE_PASS=block_d >= d, BLOCK_R=block_r, BLOCK_D=block_d,
                num_warps=plan.num_warps, num_stages=plan.num_stages)
    return (triton.cdiv(n_rows, block_r),), meta


def rmsnorm(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6,
            config: KernelConfig | None = None) -> torch.Tensor:
    """RMSNorm over the last dim, as torch.nn.functional.rms_norm(x, x.shape[-1:], weight, eps)."""
    x2 = _rows_view(x, "rmsnorm")
    weight = _check_param(weight, x2.shape[1], x, "weight", "rmsnorm")
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if x2.numel():
        grid, meta = _row_launch(x2, config, "rmsnorm")
        _rmsnorm_kernel[grid](x2, weight if weight is not None else x2, out, x2.shape[0], x2.shape[1],
                              x2.stride(0), out.stride(0), float(eps), HAS_WEIGHT=weight is not None, **meta)
    return out.reshape(x.shape)


def layernorm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float = 1e-5,
              config: KernelConfig | None = None) -> torch.Tensor:
    """LayerNorm over the last dim, as torch.nn.functional.layer_norm(x, x.shape[-1:], weight, bias, eps)."""
    x2 = _rows_view(x, "layernorm")
    weight = _check_param(weight, x2.shape[1], x, "weight", "layernorm")
    bias = _check_param(bias, x2.shape[1], x, "bias", "layernorm")
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if x2.numel():
        grid, meta = _row_launch(x2, config, "layernorm")
        _layernorm_kernel[grid](x2, weight if weight is not None else x2, bias if bias is not None else x2, out,
                                x2.shape[0], x2.shape[1], x2.stride(0), out.stride(0), float(eps),
                                HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, **meta)
    return out.reshape(x.shape)


def softmax(x: torch.Tensor, dim: int = -1, config: KernelConfig | None = None) -> torch.Tensor:
    """Softmax along the last dim (fp32 math, output in x's dtype), as torch.softmax(x, -1)."""
    if x.dim() == 0 or dim not in (-1, x.dim() - 1):
        raise LmforgeError(f"the Triton softmax runs along the last dim only, got dim={dim} for a {x.dim()}-d "
                           "input; move that dim last (x.transpose(dim, -1)) first.")
    x2 = _rows_view(x, "softmax")
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if x2.numel():
        grid, meta = _row_launch(x2, config, "softmax")
        _softmax_kernel[grid](x2, out, x2.shape[0], x2.shape[1], x2.stride(0), out.stride(0), **meta)
    return out.reshape(x.shape)


def swiglu(gate: torch.Tensor, up: torch.Tensor, config: KernelConfig | None = None) -> torch.Tensor:
    """silu(gate) * up in one pass over memory (fp32 math, output in gate's dtype)."""
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.device != up.device:
        raise LmforgeError(f"swiglu needs gate and up of one shape, dtype and device; got {gate.dtype} "
                           f"{list(gate.shape)} on {gate.device} and {up.dtype} {list(up.shape)} on {up.device}.")
    if gate.dtype not in SUPPORTED_DTYPES:
        raise LmforgeError(f"swiglu supports {SUPPORTED_DTYPES}, got {gate.dtype}.")
    config = config or DEFAULT_CONFIGS["swiglu"]
    g, u = gate.contiguous(), up.contiguous()
    out = torch.empty_like(g)
    block = _param(config, "BLOCK", "swiglu")
    if g.numel():
        _swiglu_kernel[(triton.cdiv(g.numel(), block),)](g, u, out, g.numel(), BLOCK=block,
                                                         num_warps=config.num_warps, num_stages=config.num_stages)
    return out


TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def aot_specs(dtype: torch.dtype = torch.float16, d: int = 4096, long_d: int = 152064) -> list:
    """KernelSpecs (lmforge.backends.triton.aot) of every kernel here: the row kernels for rows of `d`
    (one pass, with weight/bias) and of `long_d` (the chunked sweep, e.g. softmax over a vocabulary), and
    SwiGLU."""
    from lmforge.backends.triton.aot import KernelSpec

    t = TRITON_TYPES[dtype]
    rows = {"n_rows": "i32", "D": "i32", "stride_x": "i32", "stride_o": "i32"}
    divisible = ("D", "stride_x", "stride_o")
    specs = []
    for length, tag in ((d, "row"), (long_d, "long")):
        one_pass = row_plan(None, length, "rmsnorm").get("BLOCK_D") >= length
        specs += [
            KernelSpec(f"rmsnorm_{tag}_{t}", _rmsnorm_kernel,
                       {"x_ptr": f"*{t}", "w_ptr": f"*{t}", "out_ptr": f"*{t}", **rows, "eps": "fp32"},
                       {"HAS_WEIGHT": True, "ONE_PASS": one_pass}, DEFAULT_CONFIGS["rmsnorm"], divisible,
                       adapt=partial(row_plan, d=length, kernel="rmsnorm")),
            KernelSpec(f"layernorm_{tag}_{t}", _layernorm_kernel,
                       {"x_ptr": f"*{t}", "w_ptr": f"*{t}", "b_ptr": f"*{t}", "out_ptr": f"*{t}", **rows,
                        "eps": "fp32"},
                       {"HAS_WEIGHT": True, "HAS_BIAS": True, "ONE_PASS": one_pass}, DEFAULT_CONFIGS["layernorm"],
                       divisible, adapt=partial(row_plan, d=length, kernel="layernorm")),
            KernelSpec(f"softmax_{tag}_{t}", _softmax_kernel, {"x_ptr": f"*{t}", "out_ptr": f"*{t}", **rows},
                       {"ONE_PASS": one_pass}, DEFAULT_CONFIGS["softmax"], divisible,
                       adapt=partial(row_plan, d=length, kernel="softmax")),
        ]
    specs.append(KernelSpec(f"swiglu_{t}", _swiglu_kernel,
                            {"gate_ptr": f"*{t}", "up_ptr": f"*{t}", "out_ptr": f"*{t}", "numel": "i32"}, {},
                            DEFAULT_CONFIGS["swiglu"], ("numel",)))
    return specs
