"""Weight-only quantized linear (int4 / int8 weights, fp16 / bf16 / fp32 activations) as Triton kernels.

y = x @ dequant(W).T + bias for a `QuantizedWeight` in the layout of `lmforge.ir.ops.quant_ref` (MatMulNBits):
qweight uint8 [N, K * bits / 8], per-group scales and zero points [N, K / group_size].

Two kernels, picked by the number of rows M of x (flattened to [M, K]):

- `_wo_gemv_kernel` (M <= GEMV_MAX_ROWS, decode): memory bound, so the point is to stream the packed weight
  at full bandwidth. Each program owns BLOCK_N output rows and walks its K range one quantization group at a
  time, GROUPS_PER_STEP groups per loop trip (unrolled so their loads are in flight together); a group is
  one contiguous run of group_size * bits / 8 bytes per row (a wide uint8 load), unpacked in registers
  with shifts, masks and the 2^23 float trick (no int-to-float conversions). Products accumulate
  elementwise, scaled per group, and are reduced once at the end, so each weight byte costs a handful of
  ALU instructions. SPLIT_K > 1 splits K across programs (fp32 atomic adds into a zeroed workspace, cast
  at the end) so that small weights still fill every SM.
- `_wo_gemm_kernel` (prefill): tiled [BLOCK_M, BLOCK_N] output; each K step loads a [BLOCK_K, BLOCK_N]
  weight tile (int4: the [BLOCK_K / 2, BLOCK_N] bytes once, as an even-k and an odd-k half, each its own
  tl.dot against the matching x columns), dequantizes it in registers to (q - zero) * scale in the activation
  dtype and accumulates tl.dot into one fp32 tile. BLOCK_K never exceeds group_size, so one K step sees
  exactly one group and loads one scale and zero per column.

Only long-standing tl APIs are used (program_id, arange, load/store with masks, dot, sum, where, shifts,
atomic_add), so the kernels compile on Triton 3.6 through 3.9.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from lmforge.backends.triton.config import KernelConfig
from lmforge.errors import LmforgeError
from lmforge.ir.ops.quant_ref import QuantizedWeight

GEMV_MAX_ROWS = 4
SUPPORTED_ACTIVATIONS = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _wo_gemv_kernel(x_ptr, qw_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr,
                    N, K, stride_xm, stride_qn, stride_sn, stride_om, groups_per_split,
                    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS_PER_STEP: tl.constexpr,
                    SPLIT_K: tl.constexpr):
    """out[m, n] (+)= sum_k x[m, k] * (q[n, k] - zero[n, g]) * scale[n, g] over this program's K groups.

    BLOCK_M is the exact row count M (<= 4). Products accumulate elementwise in a [BLOCK_N, GROUP_BYTES]
    fp32 tile that is reduced once at the end: no per-group reduction or layout change in the loop.
    Codes become floats without a conversion instruction: OR-ing a code into the mantissa of 2^23
    (0x4B000000) gives the float 2^23 + q, and subtracting 2^23 + zero leaves q - zero exactly.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    GROUP_BYTES: tl.constexpr = GROUP_SIZE * BITS // 8
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_b = tl.arange(0, GROUP_BYTES)
    mask_n = offs_n < N
    g_begin = pid_k * groups_per_split
    g_end = tl.minimum(g_begin + groups_per_split, K // GROUP_SIZE)  # both multiples of GROUPS_PER_STEP
    w_rows = qw_ptr + offs_n[:, None] * stride_qn + offs_b[None, :]
    for m in tl.static_range(BLOCK_M):
        acc = tl.zeros((BLOCK_N, GROUP_BYTES), dtype=tl.float32)
        for g0 in range(g_begin, g_end, GROUPS_PER_STEP):
            for s in tl.static_range(GROUPS_PER_STEP):
                g = g0 + s
                packed = tl.load(w_rows + g * GROUP_BYTES, mask=mask_n[:, None], other=0).to(tl.int32)
                scale = tl.load(scales_ptr + offs_n * stride_sn + g, mask=mask_n, other=0).to(tl.float32)
                zero = tl.load(zeros_ptr + offs_n * stride_sn + g, mask=mask_n, other=0).to(tl.float32)
                offset = (zero + 8388608.0)[:, None]  # 2^23 + zero
                x_group = x_ptr + m * stride_xm + g * GROUP_SIZE
                if BITS == 4:
                    x_even = tl.load(x_group + 2 * offs_b).to(tl.float32)
                    x_odd = tl.load(x_group + 2 * offs_b + 1).to(tl.float32)
                    w_even = ((packed & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - offset
                    w_odd = ((packed >> 4) | 0x4B000000).to(tl.float32, bitcast=True) - offset
                    acc += (w_even * x_even[None, :] + w_odd * x_odd[None, :]) * scale[:, None]
                else:
                    x_vals = tl.load(x_group + offs_b).to(tl.float32)
                    w_vals = (packed | 0x4B000000).to(tl.float32, bitcast=True) - offset
                    acc += w_vals * x_vals[None, :] * scale[:, None]
        row = tl.sum(acc, axis=1)
        if HAS_BIAS:
            row += tl.where(pid_k == 0, tl.load(bias_ptr + offs_n, mask=mask_n, other=0).to(tl.float32), 0.0)
        if SPLIT_K > 1:
            tl.atomic_add(out_ptr + m * stride_om + offs_n, row, mask=mask_n)
        else:
            tl.store(out_ptr + m * stride_om + offs_n, row.to(out_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _wo_gemm_kernel(x_ptr, qw_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr,
                    M, N, K, stride_xm, stride_qn, stride_sn, stride_om,
                    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """out = x @ dequant(W).T over [BLOCK_M, BLOCK_N] tiles; programs grouped GROUP_M-wise along M for L2 reuse."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_per_group = GROUP_M * num_pid_n
    first_m = (pid // pids_per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % pids_per_group) % group_rows
    pid_n = (pid % pids_per_group) // group_rows
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # int4: a byte holds k = 2j (low nibble) and 2j + 1 (high); rather than interleave, split the product
    # into even-k and odd-k halves, each a tl.dot over BLOCK_K / 2.
    K_PER_BYTE: tl.constexpr = 8 // BITS
    offs_j = tl.arange(0, BLOCK_K // K_PER_BYTE)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + K_PER_BYTE * offs_j[None, :]
    w_ptrs = qw_ptr + offs_n[None, :] * stride_qn + offs_j[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        g = k0 // GROUP_SIZE
        scale = tl.load(scales_ptr + offs_n * stride_sn + g, mask=mask_n, other=0).to(tl.float32)[None, :]
        zero = tl.load(zeros_ptr + offs_n * stride_sn + g, mask=mask_n, other=0).to(tl.float32)[None, :]
        packed = tl.load(w_ptrs + k0 // K_PER_BYTE, mask=mask_n[None, :], other=0)
        x = tl.load(x_ptrs + k0, mask=mask_m[:, None], other=0)
        if BITS == 4:
            x_odd = tl.load(x_ptrs + k0 + 1, mask=mask_m[:, None], other=0)
            w_even = (((packed & 0xF).to(tl.float32) - zero) * scale).to(x.dtype)
            w_odd = (((packed >> 4).to(tl.float32) - zero) * scale).to(x.dtype)
            acc = tl.dot(x, w_even, acc, input_precision="ieee")
            acc = tl.dot(x_odd, w_odd, acc, input_precision="ieee")
        else:
            w = ((packed.to(tl.float32) - zero) * scale).to(x.dtype)
            acc = tl.dot(x, w, acc, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# GEMV candidates use 8 warps: with fewer, Triton (3.9, sm_90) gives the x vectors a layout of their own and
# converts them through shared memory inside the K loop (visible as bar.sync in the PTX; see aot.py).
GEMV_DEFAULT_CONFIG = KernelConfig.make(num_warps=8, num_stages=2, BLOCK_N=16, GROUPS_PER_STEP=8, SPLIT_K=1)
GEMM_DEFAULT_CONFIG = KernelConfig.make(num_warps=4, num_stages=3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8)

CANDIDATE_CONFIGS: dict[str, list[KernelConfig]] = {
    "wo_gemv": [
        GEMV_DEFAULT_CONFIG,
        KernelConfig.make(num_warps=8, num_stages=2, BLOCK_N=16, GROUPS_PER_STEP=4, SPLIT_K=1),
        KernelConfig.make(num_warps=8, num_stages=2, BLOCK_N=32, GROUPS_PER_STEP=4, SPLIT_K=1),
        KernelConfig.make(num_warps=8, num_stages=2, BLOCK_N=32, GROUPS_PER_STEP=8, SPLIT_K=1),
        KernelConfig.make(num_warps=8, num_stages=2, BLOCK_N=32, GROUPS_PER_STEP=4, SPLIT_K=2),
        KernelConfig.make(num_warps=8, num_stages=2, BLOCK_N=64, GROUPS_PER_STEP=2, SPLIT_K=2),
        KernelConfig.make(num_warps=8, num_stages=2, BLOCK_N=64, GROUPS_PER_STEP=4, SPLIT_K=4),
    ],
    "wo_gemm": [
        GEMM_DEFAULT_CONFIG,
        KernelConfig.make(num_warps=4, num_stages=4, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=8),
        KernelConfig.make(num_warps=4, num_stages=4, BLOCK_M=32, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
        KernelConfig.make(num_warps=8, num_stages=3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
        KernelConfig.make(num_warps=8, num_stages=4, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8),
    ],
}
DEFAULT_CONFIGS = {"wo_gemv": GEMV_DEFAULT_CONFIG, "wo_gemm": GEMM_DEFAULT_CONFIG}


def _param(config: KernelConfig, name: str, kernel: str) -> int:
    return config.require(name, kernel)


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


@_memoized
def gemv_plan(config: KernelConfig | None, n_groups: int) -> tuple[KernelConfig, int]:
    """The GEMV config that really runs for a weight of `n_groups` groups per row, and groups per split.

    GROUPS_PER_STEP is halved until it divides the group count (so every program's range is a whole
    number of unrolled steps and needs no bounds check) and SPLIT_K is capped by the number of steps.
    Cached: decode calls it once per token and layer, so it must cost nothing after the first time.
    """
    config = config or GEMV_DEFAULT_CONFIG
    groups_per_step = max(1, _param(config, "GROUPS_PER_STEP", "wo_gemv"))
    while n_groups % groups_per_step:
        groups_per_step //= 2
    split_k = max(1, _param(config, "SPLIT_K", "wo_gemv"))
    groups_per_split = triton.cdiv(n_groups // groups_per_step, split_k) * groups_per_step
    split_k = triton.cdiv(n_groups, groups_per_split)
    plan = KernelConfig.make(num_warps=config.num_warps, num_stages=config.num_stages,
                             BLOCK_N=_param(config, "BLOCK_N", "wo_gemv"), GROUPS_PER_STEP=groups_per_step,
                             SPLIT_K=split_k)
    return plan, groups_per_split


@_memoized
def gemm_plan(config: KernelConfig | None, group_size: int) -> KernelConfig:
    """The GEMM config that really runs: BLOCK_K clamped to group_size, so one K step sees one group."""
    config = config or GEMM_DEFAULT_CONFIG
    return KernelConfig.make(num_warps=config.num_warps, num_stages=config.num_stages,
                             BLOCK_M=_param(config, "BLOCK_M", "wo_gemm"),
                             BLOCK_N=_param(config, "BLOCK_N", "wo_gemm"),
                             BLOCK_K=min(_param(config, "BLOCK_K", "wo_gemm"), group_size),
                             GROUP_M=_param(config, "GROUP_M", "wo_gemm"))


def wo_gemv(x2: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None,
            config: KernelConfig | None = None) -> torch.Tensor:
    """The GEMV kernel on x2 [M, K] (M <= GEMV_MAX_ROWS, last dim contiguous) -> [M, N] in x2's dtype."""
    m, k = x2.shape
    n = qw.out_features
    plan, groups_per_split = gemv_plan(config, k // qw.group_size)
    block_n, split_k = plan.get("BLOCK_N"), plan.get("SPLIT_K")
    qweight, scales, zeros = _packed(qw)
    out = torch.zeros((m, n), device=x2.device, dtype=torch.float32) if split_k > 1 else \
        torch.empty((m, n), device=x2.device, dtype=x2.dtype)
    grid = (triton.cdiv(n, block_n), split_k)
    _wo_gemv_kernel[grid](
        x2, qweight, scales, zeros, bias if bias is not None else out, out,
        n, k, x2.stride(0), qweight.stride(0), scales.stride(0), out.stride(0), groups_per_split,
        BITS=qw.bits, GROUP_SIZE=qw.group_size, HAS_BIAS=bias is not None,
        BLOCK_M=m, BLOCK_N=block_n, GROUPS_PER_STEP=plan.get("GROUPS_PER_STEP"),
        SPLIT_K=split_k, num_warps=plan.num_warps, num_stages=plan.num_stages)
    return out.to(x2.dtype) if split_k > 1 else out


def wo_gemm(x2: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None,
            config: KernelConfig | None = None) -> torch.Tensor:
    """The tiled GEMM kernel on x2 [M, K] (last dim contiguous) -> [M, N] in x2's dtype."""
    m, k = x2.shape
    n = qw.out_features
    plan = gemm_plan(config, qw.group_size)
    block_m, block_n = plan.get("BLOCK_M"), plan.get("BLOCK_N")
    qweight, scales, zeros = _packed(qw)
    out = torch.empty((m, n), device=x2.device, dtype=x2.dtype)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    _wo_gemm_kernel[grid](
        x2, qweight, scales, zeros, bias if bias is not None else out, out,
        m, n, k, x2.stride(0), qweight.stride(0), scales.stride(0), out.stride(0),
        BITS=qw.bits, GROUP_SIZE=qw.group_size, HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=plan.get("BLOCK_K"), GROUP_M=plan.get("GROUP_M"),
        num_warps=plan.num_warps, num_stages=plan.num_stages)
    return out


def linear_weight_only(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None,
                       config: KernelConfig | None = None) -> torch.Tensor:
    """y = x @ dequant(W).T + bias for x [..., K]; returns [..., N] in x's dtype (fp32 accumulation).

    Rows M = prod(x.shape[:-1]) <= GEMV_MAX_ROWS go to the GEMV kernel, others to the GEMM kernel; `config`
    is for whichever kernel runs (see DEFAULT_CONFIGS / CANDIDATE_CONFIGS, keys "wo_gemv" and "wo_gemm").
    """
    _check_inputs(x, qw, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] == 0:
        return x.new_empty((*lead, qw.out_features))
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    run = wo_gemv if x2.shape[0] <= GEMV_MAX_ROWS else wo_gemm
    return run(x2, qw, bias, config).reshape(*lead, qw.out_features)


def kernel_for_rows(m: int) -> str:
    """The name ("wo_gemv" or "wo_gemm") of the kernel `linear_weight_only` runs for M rows."""
    return "wo_gemv" if m <= GEMV_MAX_ROWS else "wo_gemm"


TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def aot_specs(activation: torch.dtype = torch.float16, group_size: int = 128, in_features: int = 4096,
              rows: int = 1) -> list:
    """KernelSpecs (lmforge.backends.triton.aot) of the GEMV and GEMM kernels, int4 and int8, no bias.

    The GEMV specs are for `rows` rows (BLOCK_M = rows); scales are in the activation dtype.
    The GEMV output pointer has the activation dtype, as with SPLIT_K = 1 (the default); a split-K config
    accumulates into an fp32 workspace at run time, so its AOT build is of the same code on other types.
    """
    from lmforge.backends.triton.aot import KernelSpec

    act = TRITON_TYPES[activation]
    n_groups = in_features // group_size
    pointers = {"x_ptr": f"*{act}", "qw_ptr": "*u8", "scales_ptr": f"*{act}", "zeros_ptr": "*u8",
                "bias_ptr": f"*{act}", "out_ptr": f"*{act}"}
    ints = {name: "i32" for name in ("N", "K", "stride_xm", "stride_qn", "stride_sn", "stride_om")}
    divisible = ("N", "K", "stride_xm", "stride_qn", "stride_om")
    specs = []
    for bits in (4, 8):
        fixed = {"BITS": bits, "GROUP_SIZE": group_size, "HAS_BIAS": False}
        specs.append(KernelSpec(
            f"wo_gemv_int{bits}_g{group_size}_{act}", _wo_gemv_kernel,
            {**pointers, **ints, "groups_per_split": "i32"}, {**fixed, "BLOCK_M": rows},
            GEMV_DEFAULT_CONFIG, divisible, adapt=lambda c, g=n_groups: gemv_plan(c, g)[0]))
        specs.append(KernelSpec(
            f"wo_gemm_int{bits}_g{group_size}_{act}", _wo_gemm_kernel, {**pointers, **ints, "M": "i32"}, fixed,
            GEMM_DEFAULT_CONFIG, divisible, adapt=lambda c, gs=group_size: gemm_plan(c, gs)))
    return specs
