"""Flash-attention forward (prefill) as one Triton kernel template, with the masks lmforge's passes produce.

Layout: q [B, Hq, Sq, D], k / v [B, Hkv, Skv, D], GQA when Hq is a multiple of Hkv (query head h reads KV head
h // (Hq / Hkv)). Query i sits at absolute position q_offset + i (q_offset = Skv - Sq by default), as in
`lmforge.ir.ops.attention_ref`, whose semantics every mode reproduces. One program owns BLOCK_M query rows of
one (batch, query head) and walks KV tiles of BLOCK_N keys with the online softmax; scores are scaled by
scale * log2(e) so the exponentials are exp2 (on whole tiles inside the exponent's FMA, after the row max, which
is why the scale must be >= 0); both matmuls are tl.dot with fp16 / bf16 operands (fp32 inputs
use 3xTF32 dots, accurate to fp32 level) and fp32 accumulation. Outputs: out in q's dtype and lse (natural
log) fp32 [B, Hq, Sq].

Modes (constexpr MODE), each visiting only the KV tiles that can be visible:
    DENSE    all keys (non-causal); tiles inside the sequence skip the bounds mask
    CAUSAL   keys up to each row's position; tiles left of the block's first position run unmasked, only the
             diagonal tiles pay for the mask
    WINDOW   sliding window + attention sinks (StreamingLLM): the sink tiles, then the tiles of the window
    SPARSE   block-sparse: per (batch, head, query block) a sorted list of KV-block indices
             (`block_mask_to_index`); the leading blocks wholly visible run unmasked, the rest masked
A row that sees no key gets output 0 and lse -inf.

Tile sizes are knobs (KernelConfig params BLOCK_M, BLOCK_N, plus num_warps, num_stages); `default_config`
picks a good one for an H100 by dtype and head dim, CANDIDATE_CONFIGS lists what a tuner should try. Only
long-standing tl APIs are used (program_id, arange, masked load/store, dot, trans, exp2, max/sum, where), so
the kernel builds on Triton 3.6 through 3.9 and runs under TRITON_INTERPRET=1 (bf16 dots are upcast there:
see `interpreter_dot_fp32`).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from lmforge.backends.triton.config import KernelConfig
from lmforge.errors import LmforgeError

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634
MODE_DENSE, MODE_CAUSAL, MODE_WINDOW, MODE_SPARSE = 0, 1, 2, 3

CANDIDATE_CONFIGS = [
    KernelConfig.make(num_warps=8, num_stages=3, BLOCK_M=128, BLOCK_N=64),
    KernelConfig.make(num_warps=8, num_stages=3, BLOCK_M=128, BLOCK_N=128),
    KernelConfig.make(num_warps=8, num_stages=4, BLOCK_M=128, BLOCK_N=64),
    KernelConfig.make(num_warps=4, num_stages=4, BLOCK_M=64, BLOCK_N=64),
    KernelConfig.make(num_warps=4, num_stages=3, BLOCK_M=64, BLOCK_N=32),
]


def default_config(dtype: torch.dtype, head_dim: int, mode: int = MODE_CAUSAL) -> KernelConfig:
    """A config meant for an H100 (not yet timed on one): 128 x 64 tiles for 16-bit inputs, smaller ones for fp32
    (shared memory). The window + sinks mode at head dim > 64 takes 128 x 32 tiles: its two-sided mask on a
    128 x 64 tile holds 255 registers per thread and spills on sm_80 or sm_89 (which one depends on the Triton
    version: ptxas -v under 3.6 and 3.9), while 128 x 32 needs <= 206 on sm_80 / 89 / 90 under both
    (tests/backends/triton/test_aot.py builds every default without spills)."""
    if dtype == torch.float32:
        return KernelConfig.make(num_warps=4, num_stages=2, BLOCK_M=64, BLOCK_N=32)
    if head_dim <= 64:
        return KernelConfig.make(num_warps=4, num_stages=3, BLOCK_M=128, BLOCK_N=64)
    if mode == MODE_WINDOW:
        return KernelConfig.make(num_warps=8, num_stages=3, BLOCK_M=128, BLOCK_N=32)
    return KernelConfig.make(num_warps=8, num_stages=3, BLOCK_M=128, BLOCK_N=64)


# ---- the shared inner step ------------------------------------------------------------------------------------------

@triton.jit
def online_softmax_tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, cols, pos, kv_len, window, sinks, qk_scale, D,
                        CHECK_BOUND: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr,
                        HEAD_MASK: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
                        DOT_FP32: tl.constexpr):
    """One KV tile of the online softmax: acc, m_i (running max, log2 units), l_i (running sum) updated.

    cols [BLOCK_N]: key positions of the tile; pos [BLOCK_M]: query positions. k_ptrs / v_ptrs point at the
    [BLOCK_N, BLOCK_D] tiles. Masks are compiled in only where the caller says the tile needs them.
    DOT_FP32 (interpreter + bf16 only, see `interpreter_dot_fp32`): the dots take fp32 operands.
    """
    if CHECK_BOUND or HEAD_MASK:
        load_mask = (cols[:, None] < kv_len) & (tl.arange(0, BLOCK_D)[None, :] < D)
        k = tl.load(k_ptrs, mask=load_mask, other=0.0)
        v = tl.load(v_ptrs, mask=load_mask, other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    if DOT_FP32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    if CHECK_BOUND or CAUSAL or WINDOWED:
        s = s * qk_scale
        visible = cols[None, :] < kv_len
        if CAUSAL:
            visible = visible & (cols[None, :] <= pos[:, None])
        if WINDOWED:
            visible = visible & (((pos[:, None] - cols[None, :]) < window) | (cols[None, :] < sinks))
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet stays at 0
        p = tl.exp2(s - m_safe[:, None])
    else:
        # A full tile: every score is finite, so is the new row max, and the scale folds into the exponent's
        # FMA (the steady loop of a causal prefill saves one multiply per score). Needs qk_scale >= 0:
        # max(s) * c = max(s * c) only then; the wrappers refuse negative scales.
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        m_safe = m_new
        p = tl.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
    return acc, m_new, l_i


# ---- the prefill kernel ---------------------------------------------------------------------------------------------

@triton.jit
def _flash_prefill_kernel(Q, K, V, O, LSE, BIDX, BCNT, qk_scale,
                          stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
                          stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_os,
                          stride_lb, stride_lh, stride_ib, stride_ih, stride_iq, stride_cb, stride_ch,
                          HQ, GROUP, IDX_GROUP, SQ, SKV, q_offset, window, sinks, D,
                          MODE: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                          WRITE_LSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_D: tl.constexpr, HEAD_MASK: tl.constexpr, PRECISION: tl.constexpr,
                          DOT_FP32: tl.constexpr):
    """out[b, h, rows] for BLOCK_M query rows of one (batch, query head); grid (cdiv(Sq, BLOCK_M), B * Hq).

    Row blocks run last-first: under a causal mask the last rows see the most keys, so the longest programs
    start first and the short ones fill the tail; heads stay the slow axis, so the programs in flight share
    a few heads' K / V in L2.
    """
    start_m = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // HQ).to(tl.int64)
    hq = bh % HQ
    hk = (hq // GROUP).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    pos = q_offset + offs_m
    row_ok = offs_m < SQ
    q_ptrs = Q + b * stride_qb + hq.to(tl.int64) * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + hk * stride_kh + offs_d[None, :]
    v_base = V + b * stride_vb + hk * stride_vh + offs_d[None, :]

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    first_pos = q_offset + start_m * BLOCK_M
    last_pos = q_offset + tl.minimum(start_m * BLOCK_M + BLOCK_M, SQ) - 1
    if MODE == 3:  # SPARSE: the listed KV blocks of this query block, BLOCK_SIZE // BLOCK_N tiles each
        hi_idx = (hq // IDX_GROUP).to(tl.int64)
        q_block = (start_m * BLOCK_M) // BLOCK_SIZE
        count = tl.load(BCNT + b * stride_cb + hi_idx * stride_ch + q_block)
        idx_base = BIDX + b * stride_ib + hi_idx * stride_ih + q_block * stride_iq
        # The lists are sorted, so the blocks every row sees whole (ending at or before the first row's position,
        # inside the sequence) come first: they run unmasked; the rest (the diagonal block) pays for the mask.
        n_full = count
        last_end = (tl.load(idx_base + tl.maximum(n_full - 1, 0)) + 1) * BLOCK_SIZE
        partial = (n_full > 0) & ((last_end > SKV) | (last_end - 1 > first_pos))
        while partial:
            n_full -= 1
            last_end = (tl.load(idx_base + tl.maximum(n_full - 1, 0)) + 1) * BLOCK_SIZE
            partial = (n_full > 0) & ((last_end > SKV) | (last_end - 1 > first_pos))
        for t in range(0, n_full * (BLOCK_SIZE // BLOCK_N)):
            kv_block = tl.load(idx_base + t // (BLOCK_SIZE // BLOCK_N))
            cols = kv_block * BLOCK_SIZE + (t % (BLOCK_SIZE // BLOCK_N)) * BLOCK_N + offs_n
            acc, m_i, l_i = online_softmax_tile(
                acc, m_i, l_i, q, k_base + cols[:, None] * stride_ks, v_base + cols[:, None] * stride_vs, cols,
                pos, SKV, window, sinks, qk_scale, D, False, False, False, HEAD_MASK, BLOCK_D, PRECISION, DOT_FP32)
        for t in range(n_full * (BLOCK_SIZE // BLOCK_N), count * (BLOCK_SIZE // BLOCK_N)):
            kv_block = tl.load(idx_base + t // (BLOCK_SIZE // BLOCK_N))
            cols = kv_block * BLOCK_SIZE + (t % (BLOCK_SIZE // BLOCK_N)) * BLOCK_N + offs_n
            acc, m_i, l_i = online_softmax_tile(
                acc, m_i, l_i, q, k_base + cols[:, None] * stride_ks, v_base + cols[:, None] * stride_vs, cols,
                pos, SKV, window, sinks, qk_scale, D, True, True, False, HEAD_MASK, BLOCK_D, PRECISION, DOT_FP32)
    elif MODE == 2:  # WINDOW: the sink tiles left of the window, then the window's tiles
        hi = SKV
        if CAUSAL:
            hi = tl.maximum(tl.minimum(last_pos + 1, SKV), 0)
        lo = (tl.maximum(first_pos - window + 1, 0) // BLOCK_N) * BLOCK_N
        sink_hi = tl.minimum(tl.cdiv(sinks, BLOCK_N) * BLOCK_N, tl.minimum(lo, hi))
        for start_n in range(0, sink_hi, BLOCK_N):
            cols = start_n + offs_n
            acc, m_i, l_i = online_softmax_tile(
                acc, m_i, l_i, q, k_base + cols[:, None] * stride_ks, v_base + cols[:, None] * stride_vs, cols,
                pos, SKV, window, sinks, qk_scale, D, True, CAUSAL, True, HEAD_MASK, BLOCK_D, PRECISION, DOT_FP32)
        for start_n in range(lo, hi, BLOCK_N):
            cols = start_n + offs_n
            acc, m_i, l_i = online_softmax_tile(
                acc, m_i, l_i, q, k_base + cols[:, None] * stride_ks, v_base + cols[:, None] * stride_vs, cols,
                pos, SKV, window, sinks, qk_scale, D, True, CAUSAL, True, HEAD_MASK, BLOCK_D, PRECISION, DOT_FP32)
    else:  # DENSE / CAUSAL: whole tiles every row sees run without masks, the rest (diagonal, tail) masked
        hi = SKV
        full_hi = (SKV // BLOCK_N) * BLOCK_N
        if MODE == 1:
            hi = tl.maximum(tl.minimum(last_pos + 1, SKV), 0)
            full_hi = (tl.maximum(tl.minimum(first_pos + 1, SKV), 0) // BLOCK_N) * BLOCK_N
        for start_n in range(0, full_hi, BLOCK_N):
            cols = start_n + offs_n
            acc, m_i, l_i = online_softmax_tile(
                acc, m_i, l_i, q, k_base + cols[:, None] * stride_ks, v_base + cols[:, None] * stride_vs, cols,
                pos, SKV, window, sinks, qk_scale, D, False, False, False, HEAD_MASK, BLOCK_D, PRECISION, DOT_FP32)
        for start_n in range(full_hi, hi, BLOCK_N):
            cols = start_n + offs_n
            acc, m_i, l_i = online_softmax_tile(
                acc, m_i, l_i, q, k_base + cols[:, None] * stride_ks, v_base + cols[:, None] * stride_vs, cols,
                pos, SKV, window, sinks, qk_scale, D, True, MODE == 1, False, HEAD_MASK, BLOCK_D, PRECISION, DOT_FP32)

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    o_ptrs = O + b * stride_ob + hq.to(tl.int64) * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < D))
    if WRITE_LSE:
        lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) / 1.4426950408889634)
        tl.store(LSE + b * stride_lb + hq.to(tl.int64) * stride_lh + offs_m, lse, mask=row_ok)


# ---- wrappers -------------------------------------------------------------------------------------------------------

def check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, what: str) -> None:
    """Raise LmforgeError unless q [B, Hq, Sq, D], k / v [B, Hkv, Skv, D] agree (GQA, dtype, device)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise LmforgeError(f"{what}: {name} must be [batch, heads, seq, head_dim], got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise LmforgeError(f"{what}: {name} has dtype {t.dtype}; use float16, bfloat16 or float32")
    if k.shape != v.shape:
        raise LmforgeError(f"{what}: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if q.shape[3] != k.shape[3]:
        raise LmforgeError(f"{what}: q head_dim {q.shape[3]} differs from k head_dim {k.shape[3]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise LmforgeError(f"{what}: {q.shape[1]} query heads is not a multiple of {k.shape[1]} KV heads (GQA)")
    if not (q.dtype == k.dtype == v.dtype):
        raise LmforgeError(f"{what}: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); cast them to one")
    if not (q.device == k.device == v.device):
        raise LmforgeError(f"{what}: q, k, v are on different devices ({q.device}, {k.device}, {v.device})")


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The kernels index the head dim with stride 1 (16-byte vector loads); copy only if it is not."""
    return t if t.stride(-1) == 1 else t.contiguous()


def head_block(d: int) -> int:
    """The head-dim tile: d rounded up to a power of two, at least 16 (tl.dot's smallest K)."""
    return max(16, triton.next_power_of_2(d))


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get 3xTF32 dots: fp32-level accuracy on tensor cores (IEEE fp32 dots spill registers on
    sm_90 at any useful tile); 16-bit inputs use plain tensor-core dots (the setting is ignored for them)."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


def interpreter_dot_fp32(dtype: torch.dtype) -> bool:
    """True when bf16 dots must be upcast: Triton's interpreter (3.9) multiplies bf16 tl.dot operands as raw
    16-bit integers (fp16 and fp32 are exact), so interpreted kernels feed it fp32. Compiled kernels never do."""
    return dtype == torch.bfloat16 and type(_flash_prefill_kernel).__name__ == "InterpretedFunction"


def _params(config: KernelConfig | None, dtype: torch.dtype, head_dim: int,
            mode: int = MODE_CAUSAL) -> tuple[dict, KernelConfig]:
    base = default_config(dtype, head_dim, mode)
    cfg = base if config is None else base.with_(num_warps=config.num_warps, num_stages=config.num_stages,
                                                 **dict(config.params))
    return dict(cfg.params), cfg


def _launch(q, k, v, *, mode, causal, scale, window, sinks, q_offset, block_idx, block_cnt, block_size,
            config, return_lse):
    b, hq, sq, d = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((b, hq, sq), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or skv == 0:   # no keys: every row sees none (and SPARSE's block lists are empty)
        return out.zero_(), lse.fill_(float("-inf"))
    if scale is not None and scale < 0:
        raise LmforgeError(f"flash attention kernels need a scale >= 0 (got {scale}): their unmasked tiles take the "
                           "row max before scaling; use lmforge.ir.ops.attention_ref for a negative scale")
    params, cfg = _params(config, q.dtype, d, mode)
    block_m, block_n = params["BLOCK_M"], params["BLOCK_N"]
    if mode == MODE_SPARSE:  # a query block of BLOCK_M rows lies in one sparse block; tiles split KV blocks
        block_m, block_n = min(block_m, block_size), min(block_n, block_size)
        idx_stride, cnt_stride = block_idx.stride()[:3], block_cnt.stride()[:2]
        idx_group = hq // block_idx.shape[1]
    else:
        block_idx = block_cnt = lse  # unused pointers
        idx_stride, cnt_stride, idx_group = (0, 0, 0), (0, 0), 1
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    block_d = head_block(d)
    grid = (triton.cdiv(sq, block_m), b * hq)
    _flash_prefill_kernel[grid](
        q, k, v, out, lse, block_idx, block_cnt, scale * LOG2E,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *lse.stride()[:2],
        *idx_stride, *cnt_stride,
        hq, hq // hkv, idx_group, sq, skv, skv - sq if q_offset is None else int(q_offset),
        0 if window is None else int(window), int(sinks), d,
        MODE=mode, CAUSAL=causal, BLOCK_SIZE=block_size, WRITE_LSE=return_lse, BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_D=block_d, HEAD_MASK=block_d != d, PRECISION=dot_precision(q.dtype),
        DOT_FP32=interpreter_dot_fp32(q.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out, lse


def flash_prefill(q, k, v, *, causal=True, scale=None, window=None, sinks=0, q_offset=None, config=None,
                  return_lse=True):
    """Flash-attention forward: dense (causal or not) or sliding window + sinks; GQA; returns (out, lse).

        out, lse = flash_prefill(q, k, v)                          # causal, q_offset = Skv - Sq
        out, lse = flash_prefill(q, k, v, window=256, sinks=4)     # StreamingLLM

    Equals `attention_ref(q, k, v, causal=..., window=..., sinks=..., q_offset=..., return_lse=True)`.
    With return_lse=False only out is returned (and the lse store is compiled out).
    """
    check_attention_inputs(q, k, v, "flash_prefill")
    if window is not None and window < 1:
        raise LmforgeError(f"flash_prefill: window must be >= 1 key (or None for no window), got {window}")
    if sinks and window is None:
        raise LmforgeError("flash_prefill: sinks only make sense with a sliding window; pass window=...")
    mode = MODE_WINDOW if window is not None else MODE_CAUSAL if causal else MODE_DENSE
    out, lse = _launch(q, k, v, mode=mode, causal=bool(causal), scale=scale, window=window, sinks=sinks,
                       q_offset=q_offset, block_idx=None, block_cnt=None, block_size=1, config=config,
                       return_lse=return_lse)
    return (out, lse) if return_lse else out


def block_mask_to_index(block_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool [B, H, nQ, nK] -> (block_idx int32 [B, H, nQ, nK], block_cnt int32 [B, H, nQ]).

    Row (b, h, qb) of block_idx lists the kept KV blocks in increasing order in its first block_cnt entries
    (the rest is padding). No host synchronisation, so it can run inside a captured CUDA graph.
    """
    if block_mask.dim() != 4 or block_mask.dtype != torch.bool:
        raise LmforgeError(f"block_mask must be bool [B, H, nQ, nK], got {block_mask.dtype} {tuple(block_mask.shape)}")
    n_k = block_mask.shape[-1]
    key = torch.where(block_mask, 0, 1).to(torch.int32) * n_k + torch.arange(n_k, device=block_mask.device,
                                                                              dtype=torch.int32)
    block_idx = (key.sort(dim=-1).values % n_k).to(torch.int32).contiguous()
    return block_idx, block_mask.sum(-1, dtype=torch.int32).contiguous()


def block_sparse_prefill(q, k, v, block_idx, block_cnt, *, block_size, scale=None, config=None, return_lse=True):
    """Causal attention over listed KV blocks only; returns (out, lse).

    block_idx int32 [B, H, nQ, max_k], block_cnt int32 [B, H, nQ] with H = Hkv or Hq (see block_mask_to_index),
    blocks of `block_size` (a power of two >= 16) along both sequence axes; the first block_cnt entries of each
    row must be distinct, in increasing order, and lie in [0, nK), as block_mask_to_index writes them (not
    checked on the host, to stay free of synchronisation; the kernel runs the leading blocks that every row of
    the query block sees whole without a mask). Equals
    `attention_ref(q, k, v, causal=True, block_mask=mask, block_size=block_size)` for the mask the lists encode.
    """
    check_attention_inputs(q, k, v, "block_sparse_prefill")
    b, hq, sq, _ = q.shape
    if block_size < 16 or block_size & (block_size - 1):
        raise LmforgeError(f"block_sparse_prefill: block_size must be a power of two >= 16, got {block_size}")
    n_q = triton.cdiv(sq, block_size)
    if block_idx.dim() != 4 or tuple(block_cnt.shape) != tuple(block_idx.shape[:3]):
        raise LmforgeError(f"block_sparse_prefill: block_idx must be [B, H, nQ, max_k] and block_cnt [B, H, nQ], "
                           f"got {tuple(block_idx.shape)} and {tuple(block_cnt.shape)}")
    bb, hh, nq = block_idx.shape[:3]
    if bb != b or hh not in (k.shape[1], hq) or nq != n_q:
        raise LmforgeError(f"block_sparse_prefill: block lists {tuple(block_idx.shape[:3])} do not match "
                           f"(batch {b}, heads {k.shape[1]} or {hq}, {n_q} query blocks of {block_size})")
    block_idx = block_idx.to(device=q.device, dtype=torch.int32)
    block_cnt = block_cnt.to(device=q.device, dtype=torch.int32)
    out, lse = _launch(q, k, v, mode=MODE_SPARSE, causal=True, scale=scale, window=None, sinks=0, q_offset=None,
                       block_idx=block_idx, block_cnt=block_cnt, block_size=block_size, config=config,
                       return_lse=return_lse)
    return (out, lse) if return_lse else out
