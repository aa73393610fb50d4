"""Weight-only int4 / int8 GEMM for prefill rows with the weight as the MMA's A operand ("swap AB").

y = x @ dequant(W).T + bias, computed as y^T = dequant(W) @ x^T: each program owns a [BLOCK_N, BLOCK_M] tile
of y^T (BLOCK_N output features by BLOCK_M rows of x). Per K step it

- loads x as one contiguous [BLOCK_M, BLOCK_K] tile; it goes straight to shared memory and feeds the MMA as
  its B operand (tl.trans of a loaded tile is a shared-memory view, not a copy), so Triton's software
  pipeline (num_stages) streams it with cp.async;
- loads the packed weight as [BLOCK_N, BLOCK_K * bits / 8] contiguous bytes (one run of bytes per row,
  also pipelined), unpacks it in registers (int4: tl.join of the low and high nibbles + reshape puts every
  k in place, so one tl.dot of depth BLOCK_K per step) and dequantizes it to (q - zero) * scale;
- runs one tl.dot with the dequantized tile as A. On Hopper wgmma reads A from registers, so the weight never
  makes a round trip through shared memory, and a small M (16 rows) is the MMA's narrow N side (wgmma N can
  be 8..256) instead of padding a 64-row M tile.

BLOCK_K never exceeds group_size, so a K step sees one group: one scale and one zero point per weight row.
Rows of x and of W beyond M / N are clamped (index % M, % N) instead of masked, so every load is unmasked;
only the store is masked. SPLIT_K > 1 splits K across programs (fp32 atomic adds into a zeroed workspace,
cast at the end) so that few output tiles (N = 4096, M = 16: 64 tiles of 64) still fill every SM.

Dequantization avoids int-to-float conversion instructions: a code OR-ed into the mantissa of a power of two
is that power plus the code (fp16: 0x6400 | q = 1024 + q; fp32: 0x4B000000 | q = 2^23 + q), and subtracting
the power plus the zero point leaves q - zero exactly; one multiply by the scale then rounds once, as
(q - zero) * scale in fp32 rounded to the activation dtype does (the reference's numbers). fp16 activations
with fp16 scales dequantize in fp16 (two values per instruction), everything else in fp32.

Only long-standing tl APIs (load / store / dot / trans / join / reshape / atomic_add, all in Triton 3.6's
triton.language); compiled and tested here with Triton 3.9.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lmforge.backends.triton.config import KernelConfig
from lmforge.backends.triton.quant_common import TRITON_TYPES, _check_inputs, _memoized, _packed, dot_ieee
from lmforge.ir.ops.quant_ref import QuantizedWeight

KERNEL = "wo_gemm_swapped"


@triton.jit
def _dequant_tile(packed, zero, scale, BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  FP16_MATH: tl.constexpr):
    """packed uint8 [BLOCK_N, BLOCK_K * BITS / 8] -> (q - zero) * scale as [BLOCK_N, BLOCK_K] (fp16 or fp32)."""
    if FP16_MATH:
        codes = packed.to(tl.uint16)
        if BITS == 4:
            codes = tl.join(codes & 0xF, codes >> 4).reshape(BLOCK_N, BLOCK_K)
        w = (codes | 0x6400).to(tl.float16, bitcast=True)        # 1024 + q, exact
        offset = zero.to(tl.float16) + 1024.0                     # 1024 + zero, exact
        w = (w - offset[:, None]) * scale.to(tl.float16)[:, None]
    else:
        codes = packed.to(tl.uint32)
        if BITS == 4:
            codes = tl.join(codes & 0xF, codes >> 4).reshape(BLOCK_N, BLOCK_K)
        w = (codes | 0x4B000000).to(tl.float32, bitcast=True)    # 2^23 + q, exact
        offset = zero.to(tl.float32) + 8388608.0                  # 2^23 + zero, exact
        w = (w - offset[:, None]) * scale.to(tl.float32)[:, None]
    return w


@triton.jit
def _wo_gemm_swapped_kernel(x_ptr, qw_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr,
                            M, N, K, stride_xm, stride_qn, stride_sn, stride_om, k_per_split,
                            BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                            SPLIT_K: tl.constexpr):
    """out^T tile [BLOCK_N, BLOCK_M] = dequant(W)[n, k-range] @ x[m, k-range]^T, one tl.dot per K step.

    Programs along axis 0 walk M fastest, so the programs sharing one weight tile run together and read it
    from DRAM once; axis 1 is the K split. Each split covers k_per_split columns (a multiple of BLOCK_K).
    """
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    pid_m = pid % num_pid_m
    pid_n = pid // num_pid_m
    K_PER_BYTE: tl.constexpr = 8 // BITS
    rows_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = rows_n % N  # clamped rows: loads need no mask, the store drops them
    offs_m = rows_m % M
    offs_k = tl.arange(0, BLOCK_K)
    offs_b = tl.arange(0, BLOCK_K // K_PER_BYTE)
    k_begin = pid_k * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)
    # no tl.multiple_of on byte_begin: 16-byte weight copies make Triton convert the dequantized tile to the
    # wgmma operand layout through shared memory; 4-byte copies let it read the bytes straight into that layout
    byte_begin = k_begin // K_PER_BYTE
    w_ptrs = qw_ptr + offs_n[:, None] * stride_qn + (byte_begin + offs_b)[None, :]
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + (k_begin + offs_k)[None, :]
    s_ptrs = scales_ptr + offs_n * stride_sn
    z_ptrs = zeros_ptr + offs_n * stride_sn
    # Scales and zeros are plain loads in the step that uses them (1-2 bytes per row: too narrow for cp.async).
    # Hiding their latency by carrying them over from the step before, or by loading them as 4-byte words
    # that the pipeline can cp.async, makes Triton 3.9 dequantize in a blocked layout and convert the whole
    # tile to the wgmma operand layout through shared memory (+8 STS, +3 bar.sync, ~+130 instructions per
    # step on sm_90), which costs more than it hides; see benchmarks/gemm_sass.py.
    # fp16 math rounds like the reference only when the scales are fp16 too (fp32 scales: dequantize in fp32)
    FP16_MATH: tl.constexpr = (x_ptr.dtype.element_ty == tl.float16) and (scales_ptr.dtype.element_ty == tl.float16)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        g = k0 // GROUP_SIZE
        scale = tl.load(s_ptrs + g)
        zero = tl.load(z_ptrs + g)
        packed = tl.load(w_ptrs)
        x = tl.load(x_ptrs)
        w = _dequant_tile(packed, zero, scale, BITS, BLOCK_N, BLOCK_K, FP16_MATH).to(x.dtype)
        acc = dot_ieee(w, tl.trans(x), acc)   # (interpreted bf16: fp32 operands, see quant_common)
        w_ptrs += BLOCK_K // K_PER_BYTE
        x_ptrs += BLOCK_K
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n).to(tl.float32)
        acc += tl.where(pid_k == 0, bias, 0.0)[:, None]
    out_ptrs = out_ptr + rows_m[None, :] * stride_om + rows_n[:, None]
    mask = (rows_n < N)[:, None] & (rows_m < M)[None, :]
    if SPLIT_K > 1:
        tl.atomic_add(out_ptrs, acc, mask=mask)
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


DEFAULT_CONFIG = KernelConfig.make(num_warps=4, num_stages=4, BLOCK_N=64, BLOCK_M=64, BLOCK_K=128, SPLIT_K=1)

# BLOCK_N is the wgmma M side (64 per warpgroup of 4 warps); BLOCK_M, the rows of x, its N side (16..256).
# Small M wants SPLIT_K so that N / BLOCK_N tiles still fill the SMs (N = 4096: 64 tiles of 64); large M
# wants BLOCK_M = 128, where the 8 HGMMA.64x128x16 of a step take about as long as its dequantization
# (sm_90 SASS, Triton 3.9), with num_stages = 3 so that two programs fit an SM's shared memory.
CANDIDATE_CONFIGS: list[KernelConfig] = [
    DEFAULT_CONFIG,
    KernelConfig.make(num_warps=4, num_stages=4, BLOCK_N=64, BLOCK_M=16, BLOCK_K=128, SPLIT_K=1),
    KernelConfig.make(num_warps=4, num_stages=4, BLOCK_N=64, BLOCK_M=16, BLOCK_K=128, SPLIT_K=2),
    KernelConfig.make(num_warps=4, num_stages=4, BLOCK_N=64, BLOCK_M=16, BLOCK_K=128, SPLIT_K=4),
    KernelConfig.make(num_warps=8, num_stages=4, BLOCK_N=128, BLOCK_M=16, BLOCK_K=128, SPLIT_K=4),
    KernelConfig.make(num_warps=4, num_stages=4, BLOCK_N=64, BLOCK_M=32, BLOCK_K=128, SPLIT_K=1),
    KernelConfig.make(num_warps=4, num_stages=3, BLOCK_N=64, BLOCK_M=128, BLOCK_K=128, SPLIT_K=1),
    KernelConfig.make(num_warps=8, num_stages=3, BLOCK_N=128, BLOCK_M=128, BLOCK_K=128, SPLIT_K=1),
    # for sm_80 (mma.sync): BLOCK_N >= 8 * BLOCK_M puts all 8 warps along N, so no two warps dequantize the
    # same weight rows (with BLOCK_M >= 32 and BLOCK_N = 64 Triton splits warps over both dims and each
    # weight tile is dequantized twice)
    KernelConfig.make(num_warps=8, num_stages=3, BLOCK_N=256, BLOCK_M=32, BLOCK_K=64, SPLIT_K=1),
]


@_memoized
def plan(config: KernelConfig | None, group_size: int) -> KernelConfig:
    """The config that really runs: BLOCK_K clamped to group_size (one group per K step), SPLIT_K >= 1."""
    config = config or DEFAULT_CONFIG
    return KernelConfig.make(num_warps=config.num_warps, num_stages=config.num_stages,
                             BLOCK_N=config.require("BLOCK_N", KERNEL), BLOCK_M=config.require("BLOCK_M", KERNEL),
                             BLOCK_K=min(config.require("BLOCK_K", KERNEL), group_size),
                             SPLIT_K=max(1, config.require("SPLIT_K", KERNEL)))


def _k_per_split(k: int, block_k: int, split_k: int) -> tuple[int, int]:
    """Columns per split (a multiple of block_k) and the number of splits that really have work."""
    per_split = triton.cdiv(k // block_k, split_k) * block_k
    return per_split, triton.cdiv(k, per_split)


def wo_gemm_swapped(x2: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None,
                    config: KernelConfig | None = None) -> torch.Tensor:
    """x2 [M, K] (last dim contiguous) @ dequant(W).T + bias -> [M, N] in x2's dtype, fp32 accumulation."""
    _check_inputs(x2, qw, bias)
    m, k = x2.shape
    n = qw.out_features
    if m == 0:
        return x2.new_empty((0, n))
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    p = plan(config, qw.group_size)
    block_n, block_m, block_k = p.get("BLOCK_N"), p.get("BLOCK_M"), p.get("BLOCK_K")
    k_per_split, split_k = _k_per_split(k, block_k, p.get("SPLIT_K"))
    qweight, scales, zeros = _packed(qw)
    out = torch.zeros((m, n), device=x2.device, dtype=torch.float32) if split_k > 1 else \
        torch.empty((m, n), device=x2.device, dtype=x2.dtype)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n), split_k)
    _wo_gemm_swapped_kernel[grid](
        x2, qweight, scales, zeros, bias if bias is not None else out, out,
        m, n, k, x2.stride(0), qweight.stride(0), scales.stride(0), out.stride(0), k_per_split,
        BITS=qw.bits, GROUP_SIZE=qw.group_size, HAS_BIAS=bias is not None,
        BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_K=block_k, SPLIT_K=split_k,
        num_warps=p.num_warps, num_stages=p.num_stages)
    return out.to(x2.dtype) if split_k > 1 else out


def aot_specs(activation: torch.dtype = torch.float16, group_size: int = 128, in_features: int = 4096) -> list:
    """KernelSpecs (lmforge.backends.triton.aot) of the swapped GEMM, int4 and int8, no bias.

    Scales are in the activation dtype; the output pointer too (SPLIT_K = 1, the default: a split-K config
    accumulates into an fp32 workspace at run time, so its AOT build is of the same code on other types).
    """
    from lmforge.backends.triton.aot import KernelSpec

    act = TRITON_TYPES[activation]
    pointers = {"x_ptr": f"*{act}", "qw_ptr": "*u8", "scales_ptr": f"*{act}", "zeros_ptr": "*u8",
                "bias_ptr": f"*{act}", "out_ptr": f"*{act}"}
    ints = {name: "i32" for name in ("M", "N", "K", "stride_xm", "stride_qn", "stride_sn", "stride_om",
                                     "k_per_split")}
    divisible = ("N", "K", "stride_xm", "stride_qn", "stride_om", "k_per_split")
    return [KernelSpec(f"{KERNEL}_int{bits}_g{group_size}_{act}", _wo_gemm_swapped_kernel, {**pointers, **ints},
                       {"BITS": bits, "GROUP_SIZE": group_size, "HAS_BIAS": False}, DEFAULT_CONFIG, divisible,
                       adapt=lambda c, gs=group_size: plan(c, gs))
            for bits in (4, 8)]
