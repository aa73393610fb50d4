"""Weight-only quantized linear (int4 / int8 weights, fp16 / bf16 / fp32 activations) as Triton kernels.

y = x @ dequant(W).T + bias for a `QuantizedWeight` in the layout of `lmforge.ir.ops.quant_ref` (MatMulNBits):
qweight uint8 [N, K * bits / 8], per-group scales and zero points [N, K / group_size].

Two kernels, picked by the number of rows M of x (flattened to [M, K]):

- `_wo_gemv_kernel` (M <= GEMV_MAX_ROWS, decode): memory bound, so the point is to stream the packed weight
  at full bandwidth. Each program owns BLOCK_N output rows and walks its K range GROUPS_PER_STEP
  quantization groups per loop trip (their loads in flight together). SPLIT_K > 1 splits K across programs
  (fp32 atomic adds into a zeroed workspace, cast at the end) so that small weights still fill every SM.
  The config's WORD_TILES picks the loop body (int4 and int8 alike):
  - 0, byte tiles (the default, measured in docs/benchmarks.md): a [BLOCK_N, group bytes] uint8 tile per
    group, unpacked with shifts, masks and the 2^23 float trick, even and odd k against stride-2 x loads,
    products accumulated elementwise and scaled per element; ~20 SASS instructions per weight byte on sm_90.
  - 1, word tiles: a [BLOCK_N, GROUPS_PER_STEP * group words] int32 tile per trip (loaded as one 1-D tile,
    so that its layout is the same under every Triton version), one word of one group per thread and the
    BLOCK_N rows in its registers, so one contiguous x load (16 bytes for int4 and fp16 / bf16) serves BLOCK_N
    words; codes become floats with one LOP3 and one FFMA each, zero point and scale are applied once per
    word; ~10-11 instructions per weight byte (benchmarks/sass_stats.py). With fp32 activations the x tile
    (32 bytes per thread) gets a layout of its own and a shared-memory conversion in the loop.
  - 2, fp16-pair word tiles (fp16 activations; with others the plan runs 1): the codes as
    pairs of fp16 in int32 words and one HFMA2 (inline PTX fma.rn.f16x2) per pair for code - zero and one
    for the product with x (emulated lane by lane under the interpreter). WORDS_PER_THREAD consecutive
    words of a group per thread (a "slot") share one scale / zero load and one fp32 conversion: int4 9.0
    instructions per weight byte with 1, 6.6 with 2, 5.3 with 4 (int8: 2.8 with 8); all rows of x in one
    pass (see _gemv_rows_half_words).
- `_wo_gemm_kernel` (prefill, the default GEMM configs): tiled [BLOCK_M, BLOCK_N] output; each K step loads a
  [BLOCK_K, BLOCK_N] weight tile (int4: the [BLOCK_K / 2, BLOCK_N] bytes once, as an even-k and an odd-k half,
  each its own tl.dot against the matching x columns), dequantizes it in registers to (q - zero) * scale in the
  activation dtype and accumulates tl.dot into one fp32 tile. BLOCK_K never exceeds group_size, so one K step sees
  exactly one group and loads one scale and zero per column. Measured 0.1-0.7x cuBLAS fp16 on an H100. (Under
  Triton's interpreter bf16 dots take fp32 operands: quant_common.dot_ieee.)
- `quant_gemm._wo_gemm_swapped_kernel` (prefill, GEMM configs with SWAP_AB=1): y^T = dequant(W) @ x^T, the
  dequantized weight as the MMA's register operand and x streamed to shared memory; see quant_gemm.py.

Only long-standing tl APIs are used (program_id, arange, load/store with masks, dot, sum, where, shifts,
atomic_add, reshape, split, join, pointer casts, inline_asm_elementwise), so the kernels compile on Triton 3.6
through 3.9 (built and tested with 3.9 and with 3.6, `make test-triton36`; the word-tile K loops compile to the
same SASS instruction mix on both: their loads are 1-D tiles because the two versions order the threads of a
tile with no contiguous dimension differently, and 3.6 then converted x through shared memory in every trip).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from lmforge.backends.triton import quant_gemm as swapped
from lmforge.backends.triton.config import KernelConfig
from lmforge.backends.triton.quant_common import TRITON_TYPES, _check_inputs, _memoized, _packed, dot_ieee
from lmforge.ir.ops.quant_ref import QuantizedWeight

GEMV_MAX_ROWS = 4


@triton.jit
def _gemv_row_byte_tiles(x_row, qw_ptr, scales_ptr, zeros_ptr, offs_n, mask_n, stride_qn, stride_sn, g_begin, g_end,
                         BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                         GROUPS_PER_STEP: tl.constexpr):
    """sum_k x[k] * (q[n, k] - zero[n, g]) * scale[n, g] over groups [g_begin, g_end) -> [BLOCK_N] fp32.

    Byte tiles (WORD_TILES=0, the kernel measured in docs/benchmarks.md): products accumulate elementwise in
    a [BLOCK_N, GROUP_BYTES] fp32 tile that is reduced once at the end: no per-group reduction or layout
    change in the loop. Codes become floats without a conversion instruction: OR-ing a code into the
    mantissa of 2^23 (0x4B000000) gives the float 2^23 + q, and subtracting 2^23 + zero leaves q - zero.
    """
    GROUP_BYTES: tl.constexpr = GROUP_SIZE * BITS // 8
    offs_b = tl.arange(0, GROUP_BYTES)
    w_rows = qw_ptr + offs_n[:, None] * stride_qn + offs_b[None, :]
    acc = tl.zeros((BLOCK_N, GROUP_BYTES), dtype=tl.float32)
    for g0 in range(g_begin, g_end, GROUPS_PER_STEP):
        for s in tl.static_range(GROUPS_PER_STEP):
            g = g0 + s
            packed = tl.load(w_rows + g * GROUP_BYTES, mask=mask_n[:, None], other=0).to(tl.int32)
            scale = tl.load(scales_ptr + offs_n * stride_sn + g, mask=mask_n, other=0).to(tl.float32)
            zero = tl.load(zeros_ptr + offs_n * stride_sn + g, mask=mask_n, other=0).to(tl.float32)
            offset = (zero + 8388608.0)[:, None]  # 2^23 + zero
            x_group = x_row + g * GROUP_SIZE
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
    return tl.sum(acc, axis=1)


@triton.jit
def _load_flat(ptrs):
    """tl.load of a 2-D pointer tile as one 1-D tile, given back in the tile's shape (register moves only).

    The compiler picks a load's thread order from the pointers' contiguity; with none along any dimension
    it falls back to dimension order, and Triton 3.6 and 3.9 break that tie in opposite directions (3.6
    spreads a [BLOCK_N, words] tile's threads over the rows first, 3.9 over the words). A 1-D load has no
    such choice: consecutive elements go to consecutive threads, wrapping into registers, whatever the version.
    """
    return tl.reshape(tl.load(tl.reshape(ptrs, (ptrs.numel,))), ptrs.shape)


@triton.jit
def _split_codes(x, CODES: tl.constexpr):
    """x [W, CODES] -> CODES tensors [W], x[:, i] for i = 0 .. CODES - 1 (register moves only)."""
    W: tl.constexpr = x.shape[0]
    even, odd = tl.split(tl.reshape(x, (W, CODES // 2, 2)))  # codes 0, 2, 4, ... and 1, 3, 5, ...
    if CODES == 4:
        e0, e1 = tl.split(even)
        o0, o1 = tl.split(odd)
        return e0, o0, e1, o1
    else:
        e0, e1 = tl.split(tl.reshape(even, (W, 2, 2)))  # codes 0, 4 and 2, 6
        o0, o1 = tl.split(tl.reshape(odd, (W, 2, 2)))  # codes 1, 5 and 3, 7
        e00, e01 = tl.split(e0)
        e10, e11 = tl.split(e1)
        o00, o01 = tl.split(o0)
        o10, o11 = tl.split(o1)
        return e00, o00, e10, o10, e01, o01, e11, o11


@triton.jit
def _word_tile_offsets(x_row, qw_ptr, offs_n, n_last, stride_qn, stride_sn, CODES: tl.constexpr,
                       WORDS: tl.constexpr, SLOTS: tl.constexpr, PER_SLOT: tl.constexpr):
    """The word tiles' pointers at group 0 (the loops add the step's offset): SLOTS word slots per row and step,
    each PER_SLOT consecutive words of one group (word r of a slot: add r to the words, r * CODES to x).
    Weight words [BLOCK_N, SLOTS] (int32), x [SLOTS, CODES], and the scale / zero offsets [BLOCK_N, SLOTS]
    (add the scales' or zeros' pointer). Rows past N repeat the last one (never stored).
    """
    PER_GROUP: tl.constexpr = WORDS // PER_SLOT
    s = tl.arange(0, SLOTS)
    group = s // PER_GROUP
    # slots permuted within their group ((q * 5) % PER_GROUP): no contiguity for the compiler to vectorise
    word = group * WORDS + PER_SLOT * ((s * 5) % PER_GROUP)
    rows = tl.minimum(offs_n, n_last)[:, None]
    w_tile = qw_ptr.to(tl.pointer_type(tl.int32)) + rows * (stride_qn // 4) + word[None, :]
    x_tile = x_row + (word * CODES)[:, None] + tl.arange(0, CODES)[None, :]
    # scales and zeros as [BLOCK_N, SLOTS] tiles too (constant along a group's words), so that their
    # loads get the words' layout instead of one of their own that would need a conversion
    s_tile = rows * stride_sn + group[None, :]
    return w_tile, x_tile, s_tile


@triton.jit
def _gemv_row_word_tiles(x_row, qw_ptr, scales_ptr, zeros_ptr, offs_n, n_last, stride_qn, stride_sn, g_begin, g_end,
                         BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                         GROUPS_PER_STEP: tl.constexpr):
    """The same sum as _gemv_row_byte_tiles, over 32-bit words (WORD_TILES=1).

    A loop trip covers GROUPS_PER_STEP groups of the BLOCK_N rows as a [BLOCK_N, STEP_WORDS] tile of int32
    words (STEP_WORDS = GROUPS_PER_STEP * GROUP_SIZE * BITS / 32, the step's words of a row). The tile is
    loaded as one 1-D tile (_load_flat), so that thread t gets word t of every row, with the BLOCK_N rows in
    its registers, on every Triton version; the words are permuted within their group ((w * 5) % WORDS) so
    that the compiler sees no contiguity and does not vectorise along them. The x tile [STEP_WORDS, CODES]
    (CODES = 32 / BITS) is then one contiguous 16-byte load per thread (contiguous along the codes, so its
    thread order does not depend on a tie either) whose layout matches the words' once split into CODES
    [STEP_WORDS] tiles, and one x load serves BLOCK_N words. Scales and zeros are loaded as [BLOCK_N,
    STEP_WORDS] tiles too (constant along a group's words), so they share that layout; no layout conversion,
    no barrier in the loop (tests/backends/triton/test_aot.py checks the PTX under the Triton installed).
    Code i of a word sits at bit BITS * i; one AND-OR (a LOP3) moves it into the mantissa of 1.0 (codes that
    would reach bit 23 come from the word shifted right by 16): f = 1 + code * 2^-E with E = 23 - its bit
    position, and f * 2^E - 2^E = code exactly (one FFMA). Zero point and scale are applied once per word:
    scale * (sum_i code_i x_i - zero * sum_i x_i). Rows past N are clamped to N - 1 (loaded, never stored).
    """
    CODES: tl.constexpr = 32 // BITS
    WORDS: tl.constexpr = GROUP_SIZE // CODES
    STEP_WORDS: tl.constexpr = GROUPS_PER_STEP * WORDS
    w_tile, x_tile, s_tile = _word_tile_offsets(x_row, qw_ptr, offs_n, n_last, stride_qn, stride_sn,
                                                CODES, WORDS, STEP_WORDS, 1)
    # 1.0f as an opaque value (program ids stay below 2^30), so the AND-OR of each code below is one LOP3
    # with its mask as the immediate and this constant in a register, instead of a MOV per code.
    one_bits = (tl.program_id(0) >> 30) | 0x3F800000
    acc = tl.zeros((BLOCK_N, STEP_WORDS), dtype=tl.float32)
    for g0 in range(g_begin, g_end, GROUPS_PER_STEP):  # a whole number of steps (see gemv_plan)
        words = _load_flat(w_tile + g0 * WORDS)
        scale = _load_flat(s_tile + g0 + scales_ptr).to(tl.float32)
        zero_bits = _load_flat(s_tile + g0 + zeros_ptr).to(tl.int32) | 0x4B000000
        zero = zero_bits.to(tl.float32, bitcast=True) - 8388608.0  # 2^23 + zero - 2^23
        xs = _split_codes(tl.load(x_tile + g0 * GROUP_SIZE).to(tl.float32), CODES)
        x_sum = xs[0]
        for i in tl.static_range(1, CODES):
            x_sum += xs[i]
        t = tl.zeros((BLOCK_N, STEP_WORDS), dtype=tl.float32)
        for i in tl.static_range(CODES):
            high = BITS * i + BITS > 23  # the code would reach the exponent: take it from the word >> 16
            field = BITS * i - 16 if high else BITS * i
            exp2 = (1 << (23 - field)) * 1.0
            src = words >> 16 if high else words
            f = ((src & (((1 << BITS) - 1) << field)) | one_bits).to(tl.float32, bitcast=True)
            t += (f * exp2 - exp2) * xs[i][None, :]
        acc += scale * (t - zero * x_sum[None, :])
    return tl.sum(acc, axis=1)


# fp16-pair arithmetic (WORD_TILES=2) as PTX f16x2 instructions when compiling, emulated lane by lane under
# Triton's interpreter, which has no inline assembly (read when this module is imported; the CPU tests set
# TRITON_INTERPRET first, and AOT builds run in a process without it).
PAIR_ASM = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"))


@triton.jit
def _lanes(pair):
    """int32 words holding two fp16 bit patterns -> (low, high) as fp32 tensors."""
    low = (pair & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True)
    high = (pair >> 16).to(tl.uint16).to(tl.float16, bitcast=True)
    return low.to(tl.float32), high.to(tl.float32)


@triton.jit
def _pair(low, high):
    """Two fp16 tensors -> int32 words with `low` in bits 0-15 and `high` in bits 16-31."""
    return low.to(tl.uint16, bitcast=True).to(tl.int32) | (high.to(tl.uint16, bitcast=True).to(tl.int32) << 16)


@triton.jit
def _fma_f16x2(a, b, c):
    """a * b + c on fp16 pairs packed in int32 words: one fma.rn.f16x2 (HFMA2) per word when compiled. The
    interpreter's emulation rounds the fp32 result to fp16 (the product of two fp16 is exact in fp32)."""
    if PAIR_ASM:
        return tl.inline_asm_elementwise("fma.rn.f16x2 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                         dtype=tl.int32, is_pure=True, pack=1)
    else:
        a_low, a_high = _lanes(a)
        b_low, b_high = _lanes(b)
        c_low, c_high = _lanes(c)
        return _pair((a_low * b_low + c_low).to(tl.float16), (a_high * b_high + c_high).to(tl.float16))


@triton.jit
def _slot_products(t, d0, d1, d2, d3, x_slot, x_scale, x_zeros, CODES: tl.constexpr):
    """t + the products of one word's code pairs (code - zero, as fp16 pairs: d0-d3 for int4, d0-d1 for int8)
    with its CODES x values [SLOTS, CODES] (fp16), x scaled by x_scale (1/16 or 1/64, exact) and paired as the
    codes are: (0, 4), (1, 5), (2, 6), (3, 7) for int4, (0, 2), (1, 3) for int8."""
    xs = _split_codes(x_slot, CODES)
    HALF: tl.constexpr = CODES // 2
    t = _fma_f16x2(d0, _fma_f16x2(_pair(xs[0], xs[HALF]), x_scale, x_zeros)[None, :], t)
    t = _fma_f16x2(d1, _fma_f16x2(_pair(xs[1], xs[HALF + 1]), x_scale, x_zeros)[None, :], t)
    if CODES == 8:
        t = _fma_f16x2(d2, _fma_f16x2(_pair(xs[2], xs[6]), x_scale, x_zeros)[None, :], t)
        t = _fma_f16x2(d3, _fma_f16x2(_pair(xs[3], xs[7]), x_scale, x_zeros)[None, :], t)
    return t


@triton.jit
def _slot_total(t, scale):
    """A slot's fp16 pair sums -> their fp32 total times the slot's scale."""
    t_low, t_high = _lanes(t)
    return (t_low + t_high) * scale


@triton.jit
def _gemv_rows_half_words(x_ptr, stride_xm, qw_ptr, scales_ptr, zeros_ptr, offs_n, n_last, stride_qn, stride_sn,
                          g_begin, g_end, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, GROUPS_PER_STEP: tl.constexpr, WORDS_PER_THREAD: tl.constexpr):
    """The word-tile sums of rows 0-3 with fp16 arithmetic on code pairs (WORD_TILES=2: fp16 activations).

    The word tiles' layout, with WORDS_PER_THREAD (R) consecutive words of one group per thread and row (a
    slot; R = 1 is _gemv_row_word_tiles' layout): the slot's scale and zero are loaded once for its R words.
    All BLOCK_M (<= 4) rows of x in one pass: the codes are dequantized once and each row adds its own
    products (rows past BLOCK_M return zeros), where the other loops walk the weights once per row.
    The loop body works on int32 words that hold two fp16 values, with one f16x2 fused multiply-add (HFMA2)
    per instruction (inline PTX: written as fp16 tensor arithmetic, the compiler pairs lanes as its
    vectoriser likes and shuffles them with PRMTs). Codes k and k + CODES / 2 of a weight word sit 16 bits
    apart, so one AND-OR with 0x64006400 (two fp16 1024.0) puts both into the mantissas of one pair: 1024 +
    code (int4 codes 1, 3, 5, 7 come out as 1024 + 16 * code; int8 codes fill 8 of the 10 mantissa bits).
    One HFMA2 gives code - zero exactly: pair * 1 - (1024 + zero), or pair * 1/16 - (64 + zero) for the 16x
    codes (every value is an integer below 2^11, exact in fp16). A second multiplies by the matching pair of
    x / 16 (int4) or x / 64 (int8) and adds to the slot's fp16 sums; these are added in fp32 and scaled once
    per slot, and the row's total is multiplied back at the end.
    SASS per weight byte (sm_90, benchmarks/sass_stats.py, BLOCK_N 8, one row): int4 9.0 (R = 1), 6.6 (2),
    5.3 (4) against 10.75 for word tiles; int8 4.4 (2), 3.4 (4), 2.8 (8) against 7.3 / 8.2 for word / byte
    tiles. Range: each fp16 sum holds R * CODES / 2 products of |code - zero| * |x| / 16 with |code - zero| <= 15
    (int4), or of |code - zero| * |x| / 64 with |code - zero| <= 255 (int8), so it overflows only past |x| ~
    17471 / R (int4) or ~ 8220 / R (int8) (fp32 word tiles have no such limit); precision: 11 bits per sum.
    The scaled x is exact except for fp16 subnormals (|x| < 2^-10 for int4, 2^-8 for int8).
    """
    tl.static_assert(BLOCK_M <= 4, "the GEMV takes at most 4 rows")
    CODES: tl.constexpr = 32 // BITS
    WORDS: tl.constexpr = GROUP_SIZE // CODES
    STEP_WORDS: tl.constexpr = GROUPS_PER_STEP * WORDS
    SLOTS: tl.constexpr = STEP_WORDS // WORDS_PER_THREAD
    # x is scaled by 1/16 (int4) or 1/64 (int8), exact bar fp16 subnormals, to keep the fp16 sums in range
    X_SCALE: tl.constexpr = 16.0 if BITS == 4 else 64.0
    X_SCALE_BITS: tl.constexpr = 0x2C002C00 if BITS == 4 else 0x24002400  # fp16 (1/16, 1/16) or (1/64, 1/64)
    w_tile, x_tile, s_tile = _word_tile_offsets(x_ptr, qw_ptr, offs_n, n_last, stride_qn, stride_sn,
                                                CODES, WORDS, SLOTS, WORDS_PER_THREAD)
    # two fp16 1024.0 as an opaque value (program ids stay below 2^30): each AND-OR below is then one LOP3 with
    # its mask as the immediate and this constant in a register, instead of a constant move per code pair
    magic = (tl.program_id(0) >> 30) | 0x64006400
    ones = tl.full((BLOCK_N, SLOTS), 0x3C003C00, tl.int32)      # fp16 (1, 1)
    sixteenths = tl.full((BLOCK_N, SLOTS), 0x2C002C00, tl.int32)  # fp16 (1/16, 1/16)
    x_scale = tl.full((SLOTS,), X_SCALE_BITS, tl.int32)
    x_zeros = tl.zeros((SLOTS,), dtype=tl.int32)
    acc0 = tl.zeros((BLOCK_N, SLOTS), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N, SLOTS), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, SLOTS), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_N, SLOTS), dtype=tl.float32)
    for g0 in range(g_begin, g_end, GROUPS_PER_STEP):  # a whole number of steps (see gemv_plan)
        scale = _load_flat(s_tile + g0 + scales_ptr).to(tl.float32)
        zero = _load_flat(s_tile + g0 + zeros_ptr).to(tl.int32)
        minus_z = (zero * 0x10001 | magic) ^ -0x7FFF8000  # -(1024 + zero) in both halves (sign bits 0x80008000)
        # -(64 + zero): fp16 64.0 is 0x5400 and its mantissa counts sixteenths; sign bits set (int4 only)
        minus_z16 = ((zero << 4) * 0x10001 | 0x54005400) ^ -0x7FFF8000
        t0 = tl.zeros((BLOCK_N, SLOTS), dtype=tl.int32)  # (+0, +0): the slot's fp16 pair sums, per row
        t1 = tl.zeros((BLOCK_N, SLOTS), dtype=tl.int32)
        t2 = tl.zeros((BLOCK_N, SLOTS), dtype=tl.int32)
        t3 = tl.zeros((BLOCK_N, SLOTS), dtype=tl.int32)
        for r in tl.static_range(WORDS_PER_THREAD):
            words = _load_flat(w_tile + (g0 * WORDS + r))
            shifted = words >> 8
            if BITS == 4:
                d0 = _fma_f16x2((words & 0x000F000F) | magic, ones, minus_z)  # codes 0, 4
                d1 = _fma_f16x2((words & 0x00F000F0) | magic, sixteenths, minus_z16)  # codes 1, 5 (16x)
                d2 = _fma_f16x2((shifted & 0x000F000F) | magic, ones, minus_z)  # codes 2, 6
                d3 = _fma_f16x2((shifted & 0x00F000F0) | magic, sixteenths, minus_z16)  # codes 3, 7 (16x)
            else:
                d0 = _fma_f16x2((words & 0x00FF00FF) | magic, ones, minus_z)  # codes 0, 2
                d1 = _fma_f16x2((shifted & 0x00FF00FF) | magic, ones, minus_z)  # codes 1, 3
                d2 = d0  # unused
                d3 = d1
            x_slot = x_tile + (g0 * GROUP_SIZE + r * CODES)
            t0 = _slot_products(t0, d0, d1, d2, d3, tl.load(x_slot), x_scale, x_zeros, CODES)
            if BLOCK_M > 1:
                t1 = _slot_products(t1, d0, d1, d2, d3, tl.load(x_slot + stride_xm), x_scale, x_zeros, CODES)
            if BLOCK_M > 2:
                t2 = _slot_products(t2, d0, d1, d2, d3, tl.load(x_slot + 2 * stride_xm), x_scale, x_zeros, CODES)
            if BLOCK_M > 3:
                t3 = _slot_products(t3, d0, d1, d2, d3, tl.load(x_slot + 3 * stride_xm), x_scale, x_zeros, CODES)
        acc0 += _slot_total(t0, scale)
        if BLOCK_M > 1:
            acc1 += _slot_total(t1, scale)
        if BLOCK_M > 2:
            acc2 += _slot_total(t2, scale)
        if BLOCK_M > 3:
            acc3 += _slot_total(t3, scale)
    # undo the scaling of x
    return tl.sum(acc0, axis=1) * X_SCALE, tl.sum(acc1, axis=1) * X_SCALE, tl.sum(acc2, axis=1) * X_SCALE, \
        tl.sum(acc3, axis=1) * X_SCALE


@triton.jit
def _wo_gemv_kernel(x_ptr, qw_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr,
                    N, K, stride_xm, stride_qn, stride_sn, stride_om, groups_per_split,
                    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS_PER_STEP: tl.constexpr,
                    SPLIT_K: tl.constexpr, WORD_TILES: tl.constexpr, WORDS_PER_THREAD: tl.constexpr):
    """out[m, n] (+)= sum_k x[m, k] * (q[n, k] - zero[n, g]) * scale[n, g] over this program's K groups.

    BLOCK_M is the exact row count M (<= 4); each row walks the program's groups with the byte-tile
    (WORD_TILES=0) or the word-tile (WORD_TILES=1) loop; the fp16-pair word tiles (WORD_TILES=2) walk them
    once for all rows.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    g_begin = pid_k * groups_per_split
    g_end = tl.minimum(g_begin + groups_per_split, K // GROUP_SIZE)  # both multiples of GROUPS_PER_STEP
    if WORD_TILES == 2:  # every row in one pass
        rows = _gemv_rows_half_words(x_ptr, stride_xm, qw_ptr, scales_ptr, zeros_ptr, offs_n, N - 1, stride_qn,
                                     stride_sn, g_begin, g_end, BITS, GROUP_SIZE, BLOCK_M, BLOCK_N, GROUPS_PER_STEP,
                                     WORDS_PER_THREAD)
    for m in tl.static_range(BLOCK_M):
        x_row = x_ptr + m * stride_xm
        if WORD_TILES == 2:
            row = rows[m]
        elif WORD_TILES:
            row = _gemv_row_word_tiles(x_row, qw_ptr, scales_ptr, zeros_ptr, offs_n, N - 1, stride_qn, stride_sn,
                                       g_begin, g_end, BITS, GROUP_SIZE, BLOCK_N, GROUPS_PER_STEP)
        else:
            row = _gemv_row_byte_tiles(x_row, qw_ptr, scales_ptr, zeros_ptr, offs_n, mask_n, stride_qn, stride_sn,
                                       g_begin, g_end, BITS, GROUP_SIZE, BLOCK_N, GROUPS_PER_STEP)
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
            acc = dot_ieee(x, w_even, acc)
            acc = dot_ieee(x_odd, w_odd, acc)
        else:
            w = ((packed.to(tl.float32) - zero) * scale).to(x.dtype)
            acc = dot_ieee(x, w, acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# Byte-tile GEMV candidates (WORD_TILES=0) use 8 warps: with fewer, Triton (3.9, sm_90) gives the x vectors a
# layout of their own and converts them through shared memory inside the K loop (bar.sync in the PTX).
GEMV_DEFAULT_CONFIG = KernelConfig.make(num_warps=8, num_stages=2, BLOCK_N=16, GROUPS_PER_STEP=8, SPLIT_K=1)
GEMM_DEFAULT_CONFIG = KernelConfig.make(num_warps=4, num_stages=3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8)

# The measured designs' candidates: what the tuner's kernel knobs (lmforge.search.kernel_templates) offer.
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

# The new designs' candidates: word-tile GEMV (~10-11 loop instructions per weight byte against ~19.8 for the
# default; benchmarks/sass_stats.py), its fp16-pair variant (fp16 only, else it runs as 1; int4: 9.0 per byte
# with a word per thread, 6.6 with 2, 5.3 with 4 at BLOCK_N 8, 4.9 with 4 at BLOCK_N 16) and the swapped GEMM
# (quant_gemm: register-A wgmma, x by cp.async on sm_90). Each GEMV design's first entry is its statically best
# config: gpu_check tries only the first once its --sweep-budget is spent.
# Built and tested, chosen from their compiled code, NOT timed on a GPU yet: benchmarks/gpu_check.py times them
# beside CANDIDATE_CONFIGS, and any caller may pass one as a config, but the tuner does not offer them. Its kernel
# model prices launch geometry and occupancy, not the dequantization work that tells the designs apart, so it
# would choose between untimed designs by geometry alone (and 9 more values of the GEMM knob took TPE from 0.29
# to 0.79 of random search's trials on the 100m benchmark; docs/benchmarks.md). Move them into
# CANDIDATE_CONFIGS once a GPU run shows where they win.
UNTIMED_CONFIGS: dict[str, list[KernelConfig]] = {
    "wo_gemv": [
        KernelConfig.make(num_warps=4, num_stages=2, BLOCK_N=8, GROUPS_PER_STEP=8, SPLIT_K=1, WORD_TILES=1),
        KernelConfig.make(num_warps=4, num_stages=2, BLOCK_N=4, GROUPS_PER_STEP=8, SPLIT_K=1, WORD_TILES=1),
        KernelConfig.make(num_warps=4, num_stages=2, BLOCK_N=16, GROUPS_PER_STEP=8, SPLIT_K=1, WORD_TILES=1),
        KernelConfig.make(num_warps=4, num_stages=2, BLOCK_N=8, GROUPS_PER_STEP=16, SPLIT_K=1, WORD_TILES=1),
        KernelConfig.make(num_warps=8, num_stages=2, BLOCK_N=8, GROUPS_PER_STEP=16, SPLIT_K=1, WORD_TILES=1),
        KernelConfig.make(num_warps=4, num_stages=2, BLOCK_N=16, GROUPS_PER_STEP=8, SPLIT_K=2, WORD_TILES=1),
    ] + [  # fp16 pairs: (BLOCK_N, WORDS_PER_THREAD)
        KernelConfig.make(num_warps=4, num_stages=2, BLOCK_N=block_n, GROUPS_PER_STEP=8, SPLIT_K=1, WORD_TILES=2,
                          WORDS_PER_THREAD=per_thread)
        for block_n, per_thread in ((8, 4), (8, 8), (8, 2), (8, 1), (16, 2), (16, 4))
    ],
    "wo_gemm": [c.with_(SWAP_AB=1) for c in swapped.CANDIDATE_CONFIGS],
}
DEFAULT_CONFIGS = {"wo_gemv": GEMV_DEFAULT_CONFIG, "wo_gemm": GEMM_DEFAULT_CONFIG}


def _param(config: KernelConfig, name: str, kernel: str) -> int:
    return config.require(name, kernel)


@_memoized
def gemv_plan(config: KernelConfig | None, n_groups: int, words_per_group: int | None = None,
              activation: torch.dtype | str | None = None) -> tuple[KernelConfig, int]:
    """The GEMV config that really runs for a weight of `n_groups` groups per row, and groups per split.

    GROUPS_PER_STEP is halved until it divides the group count (so every program's range is a whole
    number of unrolled steps and needs no bounds check) and SPLIT_K is capped by the number of steps.
    With WORD_TILES=1 or 2 and `words_per_group` (group_size * bits / 32) given, GROUPS_PER_STEP is first
    raised to 32 * num_warps / words_per_group, so that every thread owns a word of the step's tile (with
    fewer, threads hold copies and Triton converts layouts through shared memory in the loop).
    WORD_TILES=2 (fp16 pairs) is for fp16 activations: with another `activation` (a torch dtype or the IR's
    dtype name) it becomes 1. Its WORDS_PER_THREAD (default 1; other designs: 1)
    is rounded down to a power of two that divides a group's words (1 when `words_per_group` is not given),
    and the step is raised to WORDS_PER_THREAD words per thread (WORDS_PER_THREAD is halved until such a step
    divides the row's groups).
    Cached: decode calls it once per token and layer, so it must cost nothing after the first time.
    """
    config = config or GEMV_DEFAULT_CONFIG
    word_tiles = min(2, max(0, int(config.get("WORD_TILES", 0))))
    if word_tiles == 2 and activation is not None and str(activation).removeprefix("torch.") != "float16":
        word_tiles = 1
    per_thread = 1
    if word_tiles == 2 and words_per_group:
        per_thread = min(max(1, int(config.get("WORDS_PER_THREAD", 1))), words_per_group)
        per_thread = 1 << (per_thread.bit_length() - 1)  # a power of two, so that it divides the group's words
    groups_per_step = max(1, _param(config, "GROUPS_PER_STEP", "wo_gemv"))
    if word_tiles and words_per_group:
        # a step of one slot per thread must divide the row's groups, else the halving below leaves threads
        # without a slot of their own (copies, converted through shared memory): fewer words per slot instead
        while per_thread > 1 and n_groups % max(1, per_thread * 32 * config.num_warps // words_per_group):
            per_thread //= 2
        groups_per_step = max(groups_per_step, per_thread * 32 * config.num_warps // words_per_group)
    while n_groups % groups_per_step:
        groups_per_step //= 2
    split_k = max(1, _param(config, "SPLIT_K", "wo_gemv"))
    groups_per_split = triton.cdiv(n_groups // groups_per_step, split_k) * groups_per_step
    split_k = triton.cdiv(n_groups, groups_per_split)
    plan = KernelConfig.make(num_warps=config.num_warps, num_stages=config.num_stages,
                             BLOCK_N=_param(config, "BLOCK_N", "wo_gemv"), GROUPS_PER_STEP=groups_per_step,
                             SPLIT_K=split_k, WORD_TILES=word_tiles, WORDS_PER_THREAD=per_thread)
    return plan, groups_per_split


@_memoized
def gemm_plan(config: KernelConfig | None, group_size: int) -> KernelConfig:
    """The GEMM config that really runs: BLOCK_K clamped to group_size, so one K step sees one group.
    A config with SWAP_AB=1 runs the swapped kernel (quant_gemm.plan), and its plan keeps SWAP_AB=1."""
    config = config or GEMM_DEFAULT_CONFIG
    if config.get("SWAP_AB", 0):
        return swapped.plan(config, group_size).with_(SWAP_AB=1)
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
    plan, groups_per_split = gemv_plan(config, k // qw.group_size, qw.group_size * qw.bits // 32, x2.dtype)
    block_n, split_k = plan.get("BLOCK_N"), plan.get("SPLIT_K")
    qweight, scales, zeros = _packed(qw)
    if plan.get("WORD_TILES") and qweight.data_ptr() % 4:
        qweight = qweight.clone()  # word tiles read qweight as int32: its start must be 4-byte aligned
    out = torch.zeros((m, n), device=x2.device, dtype=torch.float32) if split_k > 1 else \
        torch.empty((m, n), device=x2.device, dtype=x2.dtype)
    grid = (triton.cdiv(n, block_n), split_k)
    _wo_gemv_kernel[grid](
        x2, qweight, scales, zeros, bias if bias is not None else out, out,
        n, k, x2.stride(0), qweight.stride(0), scales.stride(0), out.stride(0), groups_per_split,
        BITS=qw.bits, GROUP_SIZE=qw.group_size, HAS_BIAS=bias is not None,
        BLOCK_M=m, BLOCK_N=block_n, GROUPS_PER_STEP=plan.get("GROUPS_PER_STEP"),
        SPLIT_K=split_k, WORD_TILES=plan.get("WORD_TILES"), WORDS_PER_THREAD=plan.get("WORDS_PER_THREAD"),
        num_warps=plan.num_warps, num_stages=plan.num_stages)
    return out.to(x2.dtype) if split_k > 1 else out


def wo_gemm(x2: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None,
            config: KernelConfig | None = None) -> torch.Tensor:
    """The tiled GEMM kernel on x2 [M, K] (last dim contiguous) -> [M, N] in x2's dtype (a config with
    SWAP_AB=1: quant_gemm.wo_gemm_swapped)."""
    if config is not None and config.get("SWAP_AB", 0):
        return swapped.wo_gemm_swapped(x2, qw, bias, config)
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


def aot_specs(activation: torch.dtype = torch.float16, group_size: int = 128, in_features: int = 4096,
              rows: int = 1) -> list:
    """KernelSpecs (lmforge.backends.triton.aot) of the GEMV and GEMM kernels, int4 and int8, no bias, then
    those of the swapped GEMM (quant_gemm.aot_specs, for configs with SWAP_AB=1).

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
            GEMV_DEFAULT_CONFIG, divisible,
            adapt=lambda c, g=n_groups, w=group_size * bits // 32: gemv_plan(c, g, w, activation)[0]))
        specs.append(KernelSpec(
            f"wo_gemm_int{bits}_g{group_size}_{act}", _wo_gemm_kernel, {**pointers, **ints, "M": "i32"}, fixed,
            GEMM_DEFAULT_CONFIG, divisible, adapt=lambda c, gs=group_size: gemm_plan(c, gs)))
    return specs + swapped.aot_specs(activation, group_size, in_features)
