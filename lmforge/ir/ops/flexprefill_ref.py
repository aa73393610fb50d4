"""FlexPrefill (Lai et al., 2025): context-aware sparse attention for prefill, as a torch reference.

Per (batch, head), from the last block of queries:
1. the true block distribution a_true (their attention summed per key block) and a cheap estimate a_pool
   (mean-pooled query against mean-pooled key blocks) are compared with the Jensen-Shannon distance;
2. if sqrt(JS) < tau the pooled estimate is trusted and each query block keeps the smallest set of key
   blocks whose pooled scores cover `gamma` of the mass ("query-aware"); otherwise the head gets a
   "vertical-slash" pattern: the key columns and diagonals (query - key offsets) that hold `gamma` of the
   last block's attention, for every query block;
3. the first key block (attention sinks), the diagonal block and at least `min_budget` key blocks per query
   block are always kept. Attention then runs on the causal block mask.
"""
from __future__ import annotations

import math

import torch

from lmforge.errors import LmforgeError


def _block_reduce(x: torch.Tensor, block: int, dim: int, op: str) -> torch.Tensor:
    """Sum or mean over consecutive blocks of `block` entries along `dim` (the last block may be short)."""
    dim = dim % x.dim()
    n = x.shape[dim]
    pad = (-n) % block
    if pad:
        shape = list(x.shape)
        shape[dim] = pad
        x = torch.cat([x, x.new_zeros(shape)], dim)
    total = x.unflatten(dim, (-1, block)).sum(dim + 1)
    if op == "sum":
        return total
    counts = torch.full((total.shape[dim],), float(block), device=x.device)
    counts[-1] = block - pad
    shape = [1] * total.dim()
    shape[dim] = total.shape[dim]
    return total / counts.reshape(shape)


def js_distance(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """sqrt of the Jensen-Shannon divergence between distributions over the last dim."""
    m = 0.5 * (p + q)
    kl = lambda a, b: (a * (torch.log(a + eps) - torch.log(b + eps))).sum(-1)
    return (0.5 * kl(p, m) + 0.5 * kl(q, m)).clamp(min=0).sqrt()


def _cover(scores: torch.Tensor, gamma: float) -> torch.Tensor:
    """Boolean mask of the smallest set of entries (largest first) whose normalized mass reaches gamma."""
    p = scores / scores.sum(-1, keepdim=True).clamp(min=1e-30)
    sorted_p, idx = p.sort(-1, descending=True)
    keep_sorted = (sorted_p.cumsum(-1) - sorted_p) < gamma
    return torch.zeros_like(keep_sorted).scatter(-1, idx, keep_sorted)


def slash_blocks(diag: torch.Tensor, nb: int, block_size: int) -> torch.Tensor:
    """Which block diagonals the selected query-key offsets touch: diag bool [..., S] (offset o = query - key
    selected) -> bool [..., nb], entry delta True when block pairs (qb, qb - delta), which hold the offsets
    delta*bs - (bs-1) .. delta*bs + (bs-1), contain a selected one (counted with a prefix sum over offsets)."""
    s = diag.shape[-1]
    seen = torch.nn.functional.pad(diag.to(torch.int32).cumsum(-1), (1, 0))       # [..., S + 1]
    deltas = torch.arange(nb, device=diag.device)
    lo = (deltas * block_size - (block_size - 1)).clamp(0, s)
    hi = (deltas * block_size + block_size).clamp(0, s)
    return (seen[..., hi] - seen[..., lo]) > 0


def flex_prefill_block_mask(q, k, *, gamma=0.9, tau=0.1, block_size=64, min_budget=2, scale=None):
    """The block mask [B, Hq, nB, nB] FlexPrefill chooses, and which heads used the query-aware pattern."""
    b, hq, s, d = q.shape
    if k.shape[2] != s:
        raise LmforgeError("FlexPrefill is a prefill method: queries and keys must have the same length")
    k = k.repeat_interleave(hq // k.shape[1], 1).float()
    q = q.float()
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    nb = -(-s // block_size)
    start = (nb - 1) * block_size
    qh = q[:, :, start:]
    logits = (qh @ k.transpose(-1, -2)) * scale
    qpos = torch.arange(start, s, device=q.device)[:, None]
    kpos = torch.arange(s, device=q.device)[None, :]
    logits = logits.masked_fill(kpos > qpos, float("-inf"))
    a_hat = torch.softmax(logits, -1)                                  # [B, H, bq, S]
    a_true = _block_reduce(a_hat.mean(2), block_size, -1, "sum")       # [B, H, nb]
    k_pool = _block_reduce(k, block_size, 2, "mean")                   # [B, H, nb, D]
    a_pool = torch.softmax((qh.mean(2, keepdim=True) @ k_pool.transpose(-1, -2)).squeeze(2) * scale, -1)
    query_aware = js_distance(a_pool, a_true) < tau                    # [B, H]

    causal = torch.ones(nb, nb, dtype=torch.bool, device=q.device).tril()
    q_pool = _block_reduce(q, block_size, 2, "mean")
    pooled = (q_pool @ k_pool.transpose(-1, -2)) * scale
    pooled = torch.softmax(pooled.masked_fill(~causal, float("-inf")), -1)
    qa_mask = _cover(pooled, gamma) & causal

    cols = _cover(a_hat.sum(2), gamma)                                 # [B, H, S] selected key columns
    offsets = (qpos - kpos).clamp(min=-1)                              # [bq, S]; -1 marks masked pairs
    slash = torch.zeros(b, hq, s, device=q.device).scatter_add_(
        -1, offsets.clamp(min=0).reshape(1, 1, -1).expand(b, hq, -1),
        (a_hat * (offsets >= 0)).reshape(b, hq, -1))
    diag = _cover(slash, gamma)                                        # [B, H, S] selected offsets
    col_blocks = _block_reduce(cols.float(), block_size, -1, "sum") > 0          # [B, H, nb]
    vs_mask = col_blocks[:, :, None, :].expand(b, hq, nb, nb).clone()
    qb = torch.arange(nb, device=q.device)
    delta = qb[:, None] - qb[None, :]
    vs_mask |= slash_blocks(diag, nb, block_size)[..., delta.clamp(min=0)] & (delta >= 0)
    vs_mask &= causal
    mask = torch.where(query_aware[:, :, None, None], qa_mask, vs_mask)
    mask[..., 0] = True                                                # sinks
    mask |= torch.eye(nb, dtype=torch.bool, device=q.device)           # local (diagonal) block
    recent = (delta >= 0) & (delta < min_budget)
    mask |= recent
    return mask & causal, query_aware


def flex_prefill_attention_ref(q, k, v, *, gamma=0.9, tau=0.1, block_size=64, min_budget=2, scale=None):
    from lmforge.ir.ops.attention_ref import attention_ref

    mask, _ = flex_prefill_block_mask(q, k, gamma=gamma, tau=tau, block_size=block_size, min_budget=min_budget,
                                      scale=scale)
    return attention_ref(q, k, v, causal=True, scale=scale, block_mask=mask, block_size=block_size)
