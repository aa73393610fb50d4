"""Torch references of the attention family: the ground truth every attention kernel is tested against.

Layout: q [B, Hq, Sq, D], k / v [B, Hkv, Skv, D]; GQA when Hq is a multiple of Hkv (query head h reads KV
head h // (Hq / Hkv)). Everything is computed in fp32 and returned in q's dtype; the log-sum-exp (natural
log, of the scaled scores) is fp32 [B, Hq, Sq]. A query row that sees no key gets output 0 and lse -inf.

Causal alignment: query i sits at absolute position q_offset + i, with q_offset = Skv - Sq by default, so a
decode step (Sq = 1) sees its whole cache. Key j is visible to position p iff j <= p, and, with a sliding
window (StreamingLLM), also p - j < window or j < sinks.
"""
from __future__ import annotations

import math

import torch


def _expand_kv(x: torch.Tensor, hq: int) -> torch.Tensor:
    return x if x.shape[1] == hq else x.repeat_interleave(hq // x.shape[1], dim=1)


def visibility_mask(sq: int, skv: int, *, causal: bool, window=None, sinks: int = 0, q_offset=None,
                    device=None) -> torch.Tensor:
    """Bool [Sq, Skv]: which keys each query sees."""
    off = skv - sq if q_offset is None else q_offset
    p = torch.arange(sq, device=device)[:, None] + off
    j = torch.arange(skv, device=device)[None, :]
    mask = torch.ones(sq, skv, dtype=torch.bool, device=device)
    if causal:
        mask &= j <= p
    if window is not None:
        mask &= ((p - j) < window) | (j < sinks)
    return mask


def attention_ref(q, k, v, *, causal=True, scale=None, window=None, sinks=0, block_mask=None, block_size=None,
                  q_offset=None, return_lse=False):
    """Softmax attention with causal / sliding-window / block-sparse masks; optionally returns the lse.

    block_mask: bool [B, Hkv or Hq, ceil(Sq/bs), ceil(Skv/bs)] of (query block, key block) pairs to keep, on top
    of the other masks (blocks of `block_size` along both sequence axes).
    """
    b, hq, sq, d = q.shape
    skv = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    kf, vf = _expand_kv(k.float(), hq), _expand_kv(v.float(), hq)
    scores = (q.float() @ kf.transpose(-1, -2)) * scale
    mask = visibility_mask(sq, skv, causal=causal, window=window, sinks=sinks, q_offset=q_offset,
                           device=q.device)[None, None]
    if block_mask is not None:
        bm = _expand_kv(block_mask, hq) if block_mask.shape[1] != hq else block_mask
        full = bm.repeat_interleave(block_size, 2).repeat_interleave(block_size, 3)[:, :, :sq, :skv]
        mask = mask & full
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None].clamp(min=-1e30)).nan_to_num(0.0)
    out = (probs @ vf).to(q.dtype)
    return (out, lse) if return_lse else out


def merge_lse_ref(outs, lses):
    """Exact merge of partial attentions over disjoint key sets: weights exp(lse_i - lse)."""
    lse = torch.logsumexp(torch.stack([l.float() for l in lses]), dim=0)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    out = sum(o.float() * torch.exp(l.float() - safe)[..., None].nan_to_num(0.0) for o, l in zip(outs, lses))
    return out.to(outs[0].dtype), lse


def block_summary(k_cache: torch.Tensor, block_size: int, kind: str = "mean"):
    """Per KV block: the mean key (Kinetics), or (min, max) keys (Quest). [B, Hkv, nblocks, D]."""
    b, h, s, d = k_cache.shape
    nb = -(-s // block_size)
    pad = nb * block_size - s
    kf = k_cache.float()
    if kind == "mean":
        total = torch.nn.functional.pad(kf, (0, 0, 0, pad)).reshape(b, h, nb, block_size, d).sum(3)
        counts = torch.full((nb,), float(block_size), device=k_cache.device)
        counts[-1] = block_size - pad
        return total / counts[None, None, :, None]
    if kind == "minmax":
        lo = torch.nn.functional.pad(kf, (0, 0, 0, pad), value=float("inf")).reshape(b, h, nb, block_size, d)
        hi = torch.nn.functional.pad(kf, (0, 0, 0, pad), value=float("-inf")).reshape(b, h, nb, block_size, d)
        return lo.amin(3), hi.amax(3)
    raise ValueError(f"block summary kind must be 'mean' or 'minmax', not {kind!r}")


def block_scores(q: torch.Tensor, summary, kind: str) -> torch.Tensor:
    """Score of each KV block for decode queries q [B, Hq, 1, D], summed over the query heads of a KV head."""
    b, hq, _, d = q.shape
    qf = q.float()[:, :, 0]
    if kind == "mean":
        hkv = summary.shape[1]
        s = torch.einsum("bhd,bhnd->bhn", qf, _expand_kv(summary, hq))
    else:
        lo, hi = summary
        hkv = lo.shape[1]
        lo, hi = _expand_kv(lo, hq), _expand_kv(hi, hq)
        s = torch.maximum(qf[:, :, None] * lo, qf[:, :, None] * hi).sum(-1)
    return s.reshape(b, hkv, hq // hkv, -1).sum(2)  # [B, Hkv, nblocks]


def top_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """int64 [..., k]: the indices of the k largest scores along the last dim, largest first; among equal scores
    the lowest index first (a stable sort: torch.topk leaves the order of ties unspecified, and zero-filled
    cache blocks tie). Block top-k's selections (this reference, the Triton backend's torch and kernel
    selections) all follow this rule."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k].contiguous()


def select_blocks(scores: torch.Tensor, skv: int, block_size: int, topk_blocks: int, sinks: int, window: int):
    """Bool [B, Hkv, nblocks]: the sink blocks, the local-window blocks, and the top-k others by score (ties to
    the lowest block index, see `top_indices`)."""
    nb = scores.shape[-1]
    idx = torch.arange(nb, device=scores.device)
    block_end = ((idx + 1) * block_size).clamp(max=skv)  # the last block may be short
    forced = idx * block_size < (sinks or 0)
    if window:
        forced |= block_end > skv - window
    rest = scores.masked_fill(forced, float("-inf"))
    k = max(0, min(topk_blocks, nb - int(forced.sum())))
    keep = forced.expand_as(scores).clone()
    if k:
        top = top_indices(rest, k)
        keep.scatter_(-1, top, True)
    return keep


def decode_block_topk_ref(q, k_cache, v_cache, *, block_size, topk_blocks, sinks=0, window=0, summary="mean",
                          scale=None, dense_len=None, return_indices=False):
    """Kinetics / Quest block top-k decode attention (Sq == 1): attend to the selected KV blocks only.

    Block scores per KV head (summed over its query heads): "mean" = q . mean(K_block) (Kinetics), "minmax" =
    sum_d max(q_d * kmin_d, q_d * kmax_d) (Quest's upper bound). The blocks holding the first `sinks` tokens
    and the last `window` tokens are always kept; `topk_blocks` more are chosen among the rest. A cache of at
    most `dense_len` tokens is attended densely. return_indices=True also returns the kept-block mask
    bool [B, Hkv, nblocks].
    """
    if q.shape[2] != 1:
        raise ValueError("block top-k attention is for decode steps (one query per sequence)")
    skv = k_cache.shape[2]
    summ = block_summary(k_cache, block_size, summary)
    keep = select_blocks(block_scores(q, summ, summary), skv, block_size, topk_blocks, sinks, window)
    if dense_len is not None and skv <= dense_len:
        keep = torch.ones_like(keep)
    token_keep = keep.repeat_interleave(block_size, -1)[..., :skv]              # [B, Hkv, Skv]
    mask = _expand_kv(token_keep[:, :, None, :], q.shape[1])                    # [B, Hq, 1, Skv]
    b, hq, _, d = q.shape
    sc = 1.0 / math.sqrt(d) if scale is None else scale
    scores = (q.float() @ _expand_kv(k_cache.float(), hq).transpose(-1, -2)) * sc
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1)
    out = (probs @ _expand_kv(v_cache.float(), hq)).to(q.dtype)
    return (out, keep) if return_indices else out


def check_prefix_groups(rows: int, prefixes: int, rows_per_prefix: int) -> None:
    """A batch of `rows` query rows over `prefixes` shared prefixes must be prefixes x rows_per_prefix rows when the
    graph says how many rows share each (the Hydragen pass slices every rows_per_prefix-th row's prefix)."""
    if rows_per_prefix and rows != prefixes * rows_per_prefix:
        from lmforge.errors import LmforgeError

        raise LmforgeError(f"shared_prefix_attention: {rows} rows do not make {prefixes} groups of rows_per_prefix="
                           f"{rows_per_prefix}; this Hydragen step takes batches that are a multiple of "
                           f"{rows_per_prefix} (each group of {rows_per_prefix} consecutive rows sharing one prefix)")


def shared_prefix_attention_ref(q, k_prefix, v_prefix, k_suffix, v_suffix, scale=None):
    """Hydragen: B sequences in G groups of B / G consecutive rows; the rows of group g share prefix g
    (prefix K/V [G, Hkv, P, D], G = 1: one prefix for all). Each row attends to all of its prefix and causally
    to its own suffix."""
    b, g = q.shape[0], k_prefix.shape[0]
    if g < 1 or b % g:
        raise ValueError(f"the {b} query rows do not fall into groups of equal size for the {g} shared prefixes "
                         f"{tuple(k_prefix.shape)}")
    o1, l1 = attention_ref(q, k_prefix.repeat_interleave(b // g, 0), v_prefix.repeat_interleave(b // g, 0),
                           causal=False, scale=scale, return_lse=True)
    o2, l2 = attention_ref(q, k_suffix, v_suffix, causal=True, scale=scale, return_lse=True)
    return merge_lse_ref([o1, o2], [l1, l2])[0]
