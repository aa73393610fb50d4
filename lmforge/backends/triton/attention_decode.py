"""Decode attention as Triton kernels: flash-decoding split-K, block top-k (Kinetics / Quest), shared prefix.

Layout: q [B, Hq, Sq, D] (Sq = 1 for a decode step; a few rows, e.g. speculative tokens, also work, causally
aligned to the end of the cache), caches [B, Hkv, S, D], GQA when Hq is a multiple of Hkv.

How the work is split (why it is fast at long context):
- `_decode_split_kernel`, grid (B * Hkv, splits, row blocks): each program takes one chunk of the KV tiles of
  one KV head and ALL the query rows that read it (the Hq / Hkv heads of the group x Sq rows: the M dimension
  of tl.dot, padded to >= 16), so every K/V byte is loaded once per step, as 16-byte vectors along D. Splits
  are chosen so that B * Hkv * splits fills the GPU's SMs several times over. Each split writes a partial
  output (normalized) and its log-sum-exp. SPARSE=True: the tiles are those of a list of KV blocks (block
  top-k); the list is read in the loop, so only the selected blocks are ever loaded.
- `_merge_splits_kernel`, one program per query row: the exact log-sum-exp merge of the splits.
- Block top-k: `_block_score_kernel` scores every KV block of a KV head from per-block key summaries
  ("mean": q . mean(K_block), summed over the group; "minmax": Quest's bound sum_d max(q_d kmin_d, q_d kmax_d)),
  giving +inf to the sink and local-window blocks, so one top-k selection picks the forced blocks plus
  topk_blocks more (ties to the lowest block index, as the reference; a stable torch sort, or
  `_select_blocks_kernel`); then the sparse split-K kernel and the merge. Serving keeps the summaries beside the cache
  (`build_block_summary`), so a step never reads the whole K to score it.
- Shared prefix (Hydragen): the prefix pass treats the queries of all B sequences as rows of one tile (M = B x
  group x Sq), so the prefix KV is read once for the batch; the suffix pass is the per-sequence decode; both
  write splits of one partial buffer and one merge combines them.

Knobs (KernelConfig): BLOCK_N (keys per tile; clamped to the block size for block top-k), MAX_BLOCK_M (most
query rows per tile), num_warps, num_stages; tiles of >= 64 rows (the shared-prefix pass) run with at least 8
warps, since 4 spill registers there on sm_90. DEFAULT_CONFIG suits an H100; CANDIDATE_CONFIGS is what to try.
The backend's config (and the search's knobs) key them by template: "attention_decode" for decode steps and block
top-k, "attention_shared_prefix" for the shared-prefix passes (whose M tiles hold many sequences' rows).

Semantics are those of `lmforge.ir.ops.attention_ref` (attention_ref, decode_block_topk_ref,
shared_prefix_attention_ref); all math is fp32, outputs in q's dtype, lse natural-log fp32 [B, Hq, Sq].
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from lmforge.backends.triton.attention_prefill import (LOG2E, check_attention_inputs, dot_precision, head_block,
                                                       interpreter_dot_fp32, last_dim_contiguous,
                                                       online_softmax_tile)
from lmforge.backends.triton.config import KernelConfig
from lmforge.errors import LmforgeError
from lmforge.ir.ops.attention_ref import top_indices

DEFAULT_CONFIG = KernelConfig.make(num_warps=4, num_stages=3, BLOCK_N=64, MAX_BLOCK_M=64)
CANDIDATE_CONFIGS = [
    DEFAULT_CONFIG,
    KernelConfig.make(num_warps=4, num_stages=4, BLOCK_N=64, MAX_BLOCK_M=64),
    KernelConfig.make(num_warps=4, num_stages=2, BLOCK_N=128, MAX_BLOCK_M=64),
    KernelConfig.make(num_warps=8, num_stages=3, BLOCK_N=128, MAX_BLOCK_M=64),
    KernelConfig.make(num_warps=4, num_stages=4, BLOCK_N=32, MAX_BLOCK_M=64),
    KernelConfig.make(num_warps=8, num_stages=3, BLOCK_N=64, MAX_BLOCK_M=128),
]
PROGRAMS_PER_SM = 4       # split until B * Hkv * splits >= this many programs per SM
MAX_SPLITS = 256
MERGE_BLOCK_S = 16
DEFAULT_SM_COUNT = 132    # an H100 SXM, used where there is no GPU (interpreter)


# ---- kernels --------------------------------------------------------------------------------------------------------

@triton.jit
def _decode_split_kernel(Q, K, V, PO, PL, LENS, BIDX, qk_scale,
                         stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
                         stride_vb, stride_vh, stride_vs, stride_pb, stride_ph, stride_ps, stride_pn,
                         stride_lb, stride_lh, stride_ls, stride_ib, stride_ih,
                         kv_len, n_tiles, tiles_per_split, split_base, HKV, GROUP, SQ, ROWS, D,
                         SPARSE: tl.constexpr, CAUSAL: tl.constexpr, HAS_LENS: tl.constexpr,
                         BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_D: tl.constexpr, HEAD_MASK: tl.constexpr, PRECISION: tl.constexpr,
                         DOT_FP32: tl.constexpr):
    """Partial attention of one KV head's query rows over one split of its KV tiles.

    Row r of the program's M dimension is query (batch b * R + r // (GROUP * SQ), head h * GROUP + (r // SQ) % GROUP,
    row r % SQ) with R = ROWS // (GROUP * SQ) query sequences per K / V sequence; b / h from program_id(0) =
    b * HKV + h. A decode step has ROWS = GROUP * SQ (R = 1); shared prefixes (K / V of batch G, each shared by
    R = B / G consecutive sequences) have ROWS = R * GROUP * SQ, so one program reads its prefix for all R.
    """
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // HKV
    h = (pid_bh % HKV).to(tl.int64)
    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < ROWS
    q_batch = (b * (ROWS // (GROUP * SQ)) + rows // (GROUP * SQ)).to(tl.int64)
    q_head = h * GROUP + (rows // SQ) % GROUP
    q_row = rows % SQ
    q = tl.load(Q + q_batch[:, None] * stride_qb + q_head[:, None] * stride_qh + q_row[:, None] * stride_qs
                + offs_d[None, :], mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    seq_len = kv_len
    if HAS_LENS:  # per-sequence lengths, clamped to the cache so a bad one cannot read out of bounds
        seq_len = tl.minimum(tl.load(LENS + b), kv_len)
    pos = seq_len - SQ + q_row
    k_base = K + b.to(tl.int64) * stride_kb + h * stride_kh + offs_d[None, :]
    v_base = V + b.to(tl.int64) * stride_vb + h * stride_vh + offs_d[None, :]

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    t_begin = split * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, n_tiles)
    if SPARSE:
        idx_base = BIDX + b.to(tl.int64) * stride_ib + h * stride_ih
        for t in range(t_begin, t_end):
            kv_block = tl.load(idx_base + t // (BLOCK_SIZE // BLOCK_N))
            cols = kv_block * BLOCK_SIZE + (t % (BLOCK_SIZE // BLOCK_N)) * BLOCK_N + offs_n
            acc, m_i, l_i = online_softmax_tile(
                acc, m_i, l_i, q, k_base + cols[:, None] * stride_ks, v_base + cols[:, None] * stride_vs, cols,
                pos, seq_len, 0, 0, qk_scale, D, True, CAUSAL, False, HEAD_MASK, BLOCK_D, PRECISION, DOT_FP32)
    else:
        t_end = tl.minimum(t_end, tl.cdiv(seq_len, BLOCK_N))
        for t in range(t_begin, t_end):
            cols = t * BLOCK_N + offs_n
            acc, m_i, l_i = online_softmax_tile(
                acc, m_i, l_i, q, k_base + cols[:, None] * stride_ks, v_base + cols[:, None] * stride_vs, cols,
                pos, seq_len, 0, 0, qk_scale, D, True, CAUSAL, False, HEAD_MASK, BLOCK_D, PRECISION, DOT_FP32)

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) / 1.4426950408889634)
    slot = split_base + split
    row_off = q_batch * stride_pb + q_head * stride_ph + q_row * stride_ps
    tl.store(PO + row_off[:, None] + slot * stride_pn + offs_d[None, :], out,
             mask=row_ok[:, None] & (offs_d[None, :] < D))
    tl.store(PL + q_batch * stride_lb + q_head * stride_lh + q_row * stride_ls + slot, lse, mask=row_ok)


@triton.jit
def _merge_splits_kernel(PO, PL, O, LSE, n_splits, D, WRITE_LSE: tl.constexpr, BLOCK_S: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    """out = sum_s exp(lse_s - lse) * out_s, lse = log sum_s exp(lse_s), for one query row (contiguous buffers)."""
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    lse_row = PL + row * n_splits
    m_vec = tl.full([BLOCK_S], float("-inf"), dtype=tl.float32)
    for s0 in range(0, n_splits, BLOCK_S):
        m_vec = tl.maximum(m_vec, tl.load(lse_row + s0 + offs_s, mask=s0 + offs_s < n_splits, other=float("-inf")))
    m = tl.max(m_vec, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    w_sum = tl.zeros([BLOCK_S], dtype=tl.float32)
    for s0 in range(0, n_splits, BLOCK_S):
        s_ok = s0 + offs_s < n_splits
        w = tl.exp(tl.load(lse_row + s0 + offs_s, mask=s_ok, other=float("-inf")) - m_safe)
        part = tl.load(PO + (row * n_splits + s0 + offs_s[:, None]) * D + offs_d[None, :],
                       mask=s_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        acc += tl.sum(w[:, None] * part, 0)
        w_sum += w
    total = tl.sum(w_sum, 0)
    empty = total == 0.0
    out = acc / tl.where(empty, 1.0, total)
    tl.store(O + row * D + offs_d, out.to(O.dtype.element_ty), mask=offs_d < D)
    if WRITE_LSE:
        tl.store(LSE + row, tl.where(empty, float("-inf"), m_safe + tl.log(tl.where(empty, 1.0, total))))


@triton.jit
def _block_score_kernel(Q, S_A, S_B, OUT, stride_qb, stride_qh, stride_ab, stride_ah, stride_an,
                        stride_bb, stride_bh, stride_bn, stride_ob, stride_oh,
                        n_blocks, sink_blocks, first_window_block, HKV, GROUP, D,
                        MINMAX: tl.constexpr, BLOCK_NB: tl.constexpr, BLOCK_D: tl.constexpr):
    """Score [B, Hkv, nblocks] of each KV block for the group's decode queries; forced blocks get +inf."""
    pid_bh = tl.program_id(0)
    b = (pid_bh // HKV).to(tl.int64)
    h = (pid_bh % HKV).to(tl.int64)
    blocks = tl.program_id(1) * BLOCK_NB + tl.arange(0, BLOCK_NB)
    offs_d = tl.arange(0, BLOCK_D)
    tile_mask = (blocks[:, None] < n_blocks) & (offs_d[None, :] < D)
    a = tl.load(S_A + b * stride_ab + h * stride_ah + blocks[:, None] * stride_an + offs_d[None, :],
                mask=tile_mask, other=0.0).to(tl.float32)
    score = tl.zeros([BLOCK_NB], dtype=tl.float32)
    if MINMAX:
        hi = tl.load(S_B + b * stride_bb + h * stride_bh + blocks[:, None] * stride_bn + offs_d[None, :],
                     mask=tile_mask, other=0.0).to(tl.float32)
        for g in range(0, GROUP):
            qg = tl.load(Q + b * stride_qb + (h * GROUP + g) * stride_qh + offs_d, mask=offs_d < D,
                         other=0.0).to(tl.float32)
            score += tl.sum(tl.maximum(qg[None, :] * a, qg[None, :] * hi), 1)
    else:
        q_sum = tl.zeros([BLOCK_D], dtype=tl.float32)  # sum_g q_g . mean_k = (sum_g q_g) . mean_k
        for g in range(0, GROUP):
            q_sum += tl.load(Q + b * stride_qb + (h * GROUP + g) * stride_qh + offs_d, mask=offs_d < D,
                             other=0.0).to(tl.float32)
        score = tl.sum(a * q_sum[None, :], 1)
    forced = (blocks < sink_blocks) | (blocks >= first_window_block)
    score = tl.where(forced, float("inf"), score)
    tl.store(OUT + b * stride_ob + h * stride_oh + blocks, score, mask=blocks < n_blocks)


@triton.jit
def _order_key(row, start, n, CHUNK: tl.constexpr):
    """uint32 keys of scores row[start:start + CHUNK] whose unsigned order is the floats' order (0 past n)."""
    offs = start + tl.arange(0, CHUNK)
    bits = tl.load(row + offs, mask=offs < n, other=0.0).to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, ~bits, bits | -2147483648).to(tl.uint32, bitcast=True)
    return tl.where(offs < n, key, 0), offs


@triton.jit
def _select_blocks_kernel(SCORES, OUT, n_blocks, keep, stride_sb, stride_sh, stride_ob, stride_oh, HKV,
                          CHUNK: tl.constexpr):
    """OUT[b, h, :keep]: the indices of the `keep` largest scores of row (b, h), in increasing order (ties at the
    threshold: the lowest indices). The keep-th largest key is found bit by bit (32 counting passes over the
    row, which stays in L1 / L2), then one pass writes the indices with a running prefix sum."""
    pid = tl.program_id(0)
    b = (pid // HKV).to(tl.int64)
    h = (pid % HKV).to(tl.int64)
    row = SCORES + b * stride_sb + h * stride_sh
    threshold = tl.full([], 0, tl.uint32)
    bit = tl.full([], 2147483648, tl.uint32)
    for step in range(32):
        candidate = threshold | bit
        count = 0
        for start in range(0, n_blocks, CHUNK):
            key, offs = _order_key(row, start, n_blocks, CHUNK)
            count += tl.sum((key >= candidate).to(tl.int32), 0)
        threshold = tl.where(count >= keep, candidate, threshold)
        bit = bit >> 1
    above = 0
    for start in range(0, n_blocks, CHUNK):
        key, offs = _order_key(row, start, n_blocks, CHUNK)
        above += tl.sum((key > threshold).to(tl.int32), 0)
    need = keep - above                       # how many of the scores equal to the threshold to take
    equal_seen = 0
    taken = 0
    out = OUT + b * stride_ob + h * stride_oh
    for start in range(0, n_blocks, CHUNK):
        key, offs = _order_key(row, start, n_blocks, CHUNK)
        equal = (key == threshold) & (offs < n_blocks)
        take = (key > threshold) | (equal & (equal_seen + tl.cumsum(equal.to(tl.int32), 0) - 1 < need))
        tl.store(out + taken + tl.cumsum(take.to(tl.int32), 0) - 1, offs.to(tl.int64), mask=take)
        equal_seen += tl.sum(equal.to(tl.int32), 0)
        taken += tl.sum(take.to(tl.int32), 0)


# ---- planning -------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int | None) -> int:
    if device_index is None or not torch.cuda.is_available():
        return DEFAULT_SM_COUNT
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def plan_splits(n_tiles: int, programs_per_split: int, device: torch.device, num_splits: int | None = None):
    """(splits, tiles_per_split): enough splits that programs fill every SM PROGRAMS_PER_SM times, none empty."""
    if n_tiles <= 0:
        return 0, 0
    if num_splits is None:
        sms = _sm_count(device.index if device.type == "cuda" else None)
        num_splits = triton.cdiv(PROGRAMS_PER_SM * sms, max(1, programs_per_split))
    splits = max(1, min(int(num_splits), n_tiles, MAX_SPLITS))
    tiles_per_split = triton.cdiv(n_tiles, splits)
    return triton.cdiv(n_tiles, tiles_per_split), tiles_per_split


def _config(config: KernelConfig | None) -> tuple[dict, KernelConfig]:
    cfg = DEFAULT_CONFIG if config is None else DEFAULT_CONFIG.with_(
        num_warps=config.num_warps, num_stages=config.num_stages, **dict(config.params))
    return dict(cfg.params), cfg


def _row_block(rows: int, max_block_m: int) -> int:
    return max(16, min(triton.next_power_of_2(rows), triton.next_power_of_2(max_block_m)))


class _Partials:
    """The partial buffers [B, Hq, Sq, splits, D] / [B, Hq, Sq, splits] that split kernels write into."""

    def __init__(self, q: torch.Tensor, n_splits: int):
        b, hq, sq, d = q.shape
        self.out = torch.empty((b, hq, sq, n_splits, d), dtype=torch.float32, device=q.device)
        self.lse = torch.empty((b, hq, sq, n_splits), dtype=torch.float32, device=q.device)
        self.n_splits = n_splits

    def merge(self, q: torch.Tensor, return_lse: bool):
        b, hq, sq, d = q.shape
        out = torch.empty((b, hq, sq, d), dtype=q.dtype, device=q.device)
        lse = torch.empty((b, hq, sq), dtype=torch.float32, device=q.device)
        if self.n_splits == 0:
            out.zero_(), lse.fill_(float("-inf"))
        elif out.numel():
            _merge_splits_kernel[(b * hq * sq,)](self.out, self.lse, out, lse, self.n_splits, d,
                                                 WRITE_LSE=return_lse, BLOCK_S=MERGE_BLOCK_S,
                                                 BLOCK_D=head_block(d), num_warps=4)
        return (out, lse) if return_lse else out


def _launch_split(q, k, v, parts: _Partials, *, grid_bh, rows, splits, tiles_per_split, n_tiles, split_base,
                  kv_len, lens, block_idx, block_size, causal, scale, params, cfg):
    """One `_decode_split_kernel` launch writing splits [split_base, split_base + splits) of `parts`."""
    if splits == 0 or rows == 0:
        return
    d = q.shape[3]
    block_m = _row_block(rows, params["MAX_BLOCK_M"])
    block_n = params["BLOCK_N"] if block_idx is None else min(params["BLOCK_N"], block_size)
    sparse = block_idx is not None
    idx = block_idx if sparse else parts.lse
    # A tile of >= 64 query rows (the shared-prefix pass) needs 8 warps: with 4 it spills registers on sm_90.
    num_warps = max(cfg.num_warps, 8) if block_m >= 64 else cfg.num_warps
    _decode_split_kernel[(grid_bh, splits, triton.cdiv(rows, block_m))](
        q, k, v, parts.out, parts.lse, parts.lse if lens is None else lens, idx, scale * LOG2E,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *parts.out.stride()[:4], *parts.lse.stride()[:3],
        *(idx.stride()[:2] if sparse else (0, 0)),
        kv_len, n_tiles, tiles_per_split, split_base, k.shape[1], q.shape[1] // k.shape[1], q.shape[2], rows, d,
        SPARSE=sparse, CAUSAL=causal, HAS_LENS=lens is not None, BLOCK_SIZE=block_size if sparse else 1,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=head_block(d), HEAD_MASK=head_block(d) != d,
        PRECISION=dot_precision(q.dtype), DOT_FP32=interpreter_dot_fp32(q.dtype), num_warps=num_warps,
        num_stages=cfg.num_stages)


def _check_decode(q, k, v, what):
    check_attention_inputs(q, k, v, what)
    if q.shape[0] != k.shape[0]:
        raise LmforgeError(f"{what}: q has batch {q.shape[0]} but the cache has batch {k.shape[0]}")
    return last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)


def _scale(scale, d):
    return 1.0 / math.sqrt(d) if scale is None else float(scale)


# ---- public API -----------------------------------------------------------------------------------------------------

def decode_attention(q, k_cache, v_cache, *, kv_len=None, scale=None, num_splits=None, config=None,
                     return_lse=False):
    """Flash-decoding: attention of q [B, Hq, Sq, D] over caches [B, Hkv, S, D] (GQA), split over the cache.

    kv_len: valid cache length, an int for every sequence or an int tensor [B] (default S; tensor values are
    clamped to S on the GPU, no host sync); query row i sits at
    position kv_len - Sq + i (causal among the rows when Sq > 1). Equals `attention_ref(q, k[:, :, :kv_len],
    v[:, :, :kv_len])`. num_splits: KV chunks per (sequence, KV head), default: enough to fill the GPU.
    """
    q, k_cache, v_cache = _check_decode(q, k_cache, v_cache, "decode_attention")
    b, hq, sq, d = q.shape
    s = k_cache.shape[2]
    params, cfg = _config(config)
    lens = None
    if isinstance(kv_len, torch.Tensor):
        lens = kv_len.to(device=q.device, dtype=torch.int32).reshape(b)
        kv_len = s
    kv_len = s if kv_len is None else int(kv_len)
    if not 0 <= kv_len <= s:
        raise LmforgeError(f"decode_attention: kv_len {kv_len} is outside the cache of {s} positions")
    n_tiles = triton.cdiv(kv_len, params["BLOCK_N"])
    splits, per_split = plan_splits(n_tiles, b * k_cache.shape[1], q.device, num_splits)
    parts = _Partials(q, splits)
    _launch_split(q, k_cache, v_cache, parts, grid_bh=b * k_cache.shape[1], rows=(hq // k_cache.shape[1]) * sq,
                  splits=splits, tiles_per_split=per_split, n_tiles=n_tiles, split_base=0, kv_len=kv_len,
                  lens=lens, block_idx=None, block_size=1, causal=sq > 1, scale=_scale(scale, d), params=params,
                  cfg=cfg)
    return parts.merge(q, return_lse)


def build_block_summary(k_cache: torch.Tensor, block_size: int, kind: str = "mean"):
    """Per-block key summaries for block top-k: "mean" -> fp32 [B, Hkv, nblocks, D] (Kinetics), "minmax" ->
    (min, max) fp32 [B, Hkv, nblocks, D] each (Quest). Kept beside the cache, refreshed as blocks fill."""
    from lmforge.ir.ops.attention_ref import block_summary

    if kind not in ("mean", "minmax"):
        raise LmforgeError(f"block summary kind must be 'mean' or 'minmax', not {kind!r}")
    return block_summary(k_cache, block_size, kind)


def forced_blocks(kv_len: int, block_size: int, sinks: int, window: int) -> tuple[int, int, int]:
    """(sink_blocks, first_window_block, count): blocks [0, sink_blocks) hold the sinks, blocks from
    first_window_block on hold the last `window` tokens; count is the size of their union."""
    n_blocks = triton.cdiv(kv_len, block_size)
    sink_blocks = min(n_blocks, triton.cdiv(max(sinks, 0), block_size))
    first_window = max(0, (kv_len - window) // block_size) if window and window > 0 else n_blocks
    return sink_blocks, first_window, sink_blocks + n_blocks - max(first_window, sink_blocks)


SELECT_METHODS = ("torch", "triton")
SELECT_CHUNK = 2048


def select_topk_blocks(q, summary, kind: str, kv_len: int, block_size: int, topk_blocks: int, sinks: int,
                       window: int, method: str = "torch") -> torch.Tensor:
    """int64 [B, Hkv, K] indices of the kept blocks (forced ones plus the topk_blocks best), K uniform; among
    equal scores the lowest block indices, as the reference (attention_ref.top_indices).

    method "torch": a stable descending torch sort of the scores (largest first); "triton":
    `_select_blocks_kernel` (increasing order, one launch with one program per KV head; NOT timed on a GPU
    yet, gpu_check times both)."""
    if method not in SELECT_METHODS:
        raise LmforgeError(f"block selection method must be one of {SELECT_METHODS}, not {method!r}")
    b, hq, _, d = q.shape
    first = summary[0] if kind == "minmax" else summary
    hkv, n_blocks = first.shape[1], first.shape[2]
    if n_blocks != triton.cdiv(kv_len, block_size) or first.shape[3] != d or first.shape[0] != b:
        raise LmforgeError(f"block summary {tuple(first.shape)} does not match a cache of {kv_len} tokens in "
                           f"blocks of {block_size} (batch {b}, head_dim {d}); rebuild it with build_block_summary")
    second = summary[1] if kind == "minmax" else first
    scores = torch.empty((b, hkv, n_blocks), dtype=torch.float32, device=q.device)
    sink_blocks, first_window, n_forced = forced_blocks(kv_len, block_size, sinks, window)
    block_nb = 16 if kind == "minmax" else 64  # two fp32 summary tiles per program: keep them in registers
    _block_score_kernel[(b * hkv, triton.cdiv(n_blocks, block_nb))](
        q, first, second, scores, q.stride(0), q.stride(1), *first.stride()[:3], *second.stride()[:3],
        *scores.stride()[:2], n_blocks, sink_blocks, first_window, hkv, hq // hkv, d,
        MINMAX=kind == "minmax", BLOCK_NB=block_nb, BLOCK_D=head_block(d), num_warps=4)
    keep = min(n_blocks, n_forced + max(0, topk_blocks))
    if method == "torch":
        return top_indices(scores, keep)
    return select_largest(scores, keep)


def select_largest(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """int64 [B, H, keep]: per row of fp32 scores [B, H, n], the indices of the `keep` largest in increasing
    order (among scores equal to the keep-th largest, the lowest indices); the Triton kernel behind
    select_topk_blocks(method="triton")."""
    b, h, n = scores.shape
    if not 0 <= keep <= n:
        raise LmforgeError(f"select_largest: cannot keep {keep} of {n} scores")
    out = torch.empty((b, h, keep), dtype=torch.int64, device=scores.device)
    if out.numel():
        scores = scores.float().contiguous()
        _select_blocks_kernel[(b * h,)](scores, out, n, keep, scores.stride(0), scores.stride(1), out.stride(0),
                                        out.stride(1), h, CHUNK=min(SELECT_CHUNK, triton.next_power_of_2(n)),
                                        num_warps=4)
    return out


def block_topk_decode(q, k_cache, v_cache, *, block_size, topk_blocks, sinks=0, window=0, summary="mean",
                      block_summary=None, scale=None, dense_len=None, num_splits=None, config=None,
                      return_lse=False, return_indices=False, select="torch"):
    """Block top-k decode attention (Kinetics "mean" / Quest "minmax"): reads only the selected KV blocks.

    q [B, Hq, 1, D], caches [B, Hkv, S, D] (all S positions valid); block_size a power of two >= 16. Keeps the
    blocks of the first `sinks` and last `window` tokens plus `topk_blocks` more by score, chosen per KV head
    (shared by its query heads). block_summary: what `build_block_summary(k_cache, block_size, summary)` gives;
    built here (reading all of K) when None. Equals `decode_block_topk_ref`; a cache of at most `dense_len`
    tokens runs dense. return_indices=True also returns the kept block indices int64 [B, Hkv, K]. select: how
    the kept blocks are picked from the scores ("torch": torch.topk; "triton": one selection kernel).
    """
    q, k_cache, v_cache = _check_decode(q, k_cache, v_cache, "block_topk_decode")
    b, hq, sq, d = q.shape
    s = k_cache.shape[2]
    if sq != 1:
        raise LmforgeError(f"block_topk_decode is for decode steps (one query row per sequence), got Sq={sq}")
    if block_size < 16 or block_size & (block_size - 1):
        raise LmforgeError(f"block_topk_decode: block_size must be a power of two >= 16, got {block_size}")
    if summary not in ("mean", "minmax"):
        raise LmforgeError(f"block_topk_decode: summary must be 'mean' or 'minmax', not {summary!r}")
    if select not in SELECT_METHODS:
        raise LmforgeError(f"block_topk_decode: select must be one of {SELECT_METHODS}, not {select!r}")
    n_blocks = triton.cdiv(s, block_size)
    if (dense_len is not None and s <= dense_len) or s == 0:
        result = decode_attention(q, k_cache, v_cache, scale=scale, num_splits=num_splits, config=config,
                                  return_lse=return_lse)
        every = torch.arange(n_blocks, device=q.device).expand(b, k_cache.shape[1], n_blocks)
        return (*result, every) if return_lse and return_indices else (result, every) if return_indices else result
    if block_summary is None:
        block_summary = build_block_summary(k_cache, block_size, summary)
    selected = select_topk_blocks(q, block_summary, summary, s, block_size, topk_blocks, sinks, window, select)
    result = decode_selected_blocks(q, k_cache, v_cache, selected, block_size=block_size, scale=scale,
                                    num_splits=num_splits, config=config, return_lse=return_lse)
    if return_indices:
        return (*result, selected) if return_lse else (result, selected)
    return result


def decode_selected_blocks(q, k_cache, v_cache, selected, *, block_size, scale=None, num_splits=None, config=None,
                           return_lse=False):
    """The second half of block top-k decode: attention of q [B, Hq, 1, D] over the KV blocks listed in
    `selected` int64 [B, Hkv, K] (every list of the same length K, blocks of `block_size` tokens of caches
    [B, Hkv, S, D] whose S positions are all valid): the sparse split kernel, then the merge."""
    b, hq, _, d = q.shape
    params, cfg = _config(config)
    tiles_per_block = block_size // min(params["BLOCK_N"], block_size)
    n_tiles = selected.shape[-1] * tiles_per_block
    splits, per_split = plan_splits(n_tiles, b * k_cache.shape[1], q.device, num_splits)
    parts = _Partials(q, splits)
    _launch_split(q, k_cache, v_cache, parts, grid_bh=b * k_cache.shape[1], rows=hq // k_cache.shape[1],
                  splits=splits, tiles_per_split=per_split, n_tiles=n_tiles, split_base=0, kv_len=k_cache.shape[2],
                  lens=None, block_idx=selected, block_size=block_size, causal=False, scale=_scale(scale, d),
                  params=params, cfg=cfg)
    return parts.merge(q, return_lse)


def shared_prefix_decode(q, k_prefix, v_prefix, k_suffix, v_suffix, *, scale=None, num_splits=None, config=None,
                         return_lse=False):
    """Hydragen decode: B sequences share prefix K/V [G, Hkv, P, D] (rows g * B/G .. (g+1) * B/G - 1 share prefix
    g; G = 1: one prefix for all) and own suffixes [B, Hkv, S, D].

    The prefix pass reads each prefix once for all its B/G x Hq x Sq query rows; the suffix pass is causal per
    sequence (query i of Sq at suffix position S - Sq + i); one log-sum-exp merge combines them. Equals
    `shared_prefix_attention_ref(q, k_prefix, v_prefix, k_suffix, v_suffix)`.
    """
    check_attention_inputs(q, k_prefix, v_prefix, "shared_prefix_decode (prefix)")
    q, k_suffix, v_suffix = _check_decode(q, k_suffix, v_suffix, "shared_prefix_decode (suffix)")
    k_prefix, v_prefix = last_dim_contiguous(k_prefix), last_dim_contiguous(v_prefix)
    groups = k_prefix.shape[0]
    if groups < 1 or q.shape[0] % groups or k_prefix.shape[1] != k_suffix.shape[1]:
        raise LmforgeError(f"shared_prefix_decode: the prefix K/V must be [G, Hkv, P, D] with the suffix's Hkv and G "
                           f"dividing the {q.shape[0]} sequences, got {tuple(k_prefix.shape)} and suffix "
                           f"{tuple(k_suffix.shape)}")
    b, hq, sq, d = q.shape
    hkv, p_len, s_len = k_prefix.shape[1], k_prefix.shape[2], k_suffix.shape[2]
    params, cfg = _config(config)
    group = hq // hkv
    prefix_rows = (b // groups) * group * sq
    row_blocks = triton.cdiv(prefix_rows, _row_block(prefix_rows, params["MAX_BLOCK_M"]))
    p_tiles, s_tiles = triton.cdiv(p_len, params["BLOCK_N"]), triton.cdiv(s_len, params["BLOCK_N"])
    p_splits, p_per = plan_splits(p_tiles, groups * hkv * row_blocks, q.device, num_splits)
    s_splits, s_per = plan_splits(s_tiles, b * hkv, q.device, num_splits)
    parts = _Partials(q, p_splits + s_splits)
    common = dict(lens=None, block_idx=None, block_size=1, scale=_scale(scale, d), params=params, cfg=cfg)
    _launch_split(q, k_prefix, v_prefix, parts, grid_bh=groups * hkv, rows=prefix_rows, splits=p_splits,
                  tiles_per_split=p_per, n_tiles=p_tiles, split_base=0, kv_len=p_len, causal=False, **common)
    _launch_split(q, k_suffix, v_suffix, parts, grid_bh=b * hkv, rows=group * sq, splits=s_splits,
                  tiles_per_split=s_per, n_tiles=s_tiles, split_base=p_splits, kv_len=s_len, causal=True, **common)
    return parts.merge(q, return_lse)
