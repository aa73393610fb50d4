"""Attention variants the sparsity passes produce, and KV-cache quantize-dequantize.

- block_topk_attention: decode attention over the KV blocks with the top-k scores (Kinetics: mean key;
  Quest: min/max key bounds), always keeping the sink and local-window blocks; shared across a GQA group.
- block_sparse_attention: prefill attention restricted to a boolean block mask (an input).
- flex_prefill_attention: FlexPrefill's adaptive prefill: per head, a pattern (query-aware or vertical-slash,
  chosen by a Jensen-Shannon test on the last query block) covering `gamma` of the attention mass.
- flex_prefill_mask: the first half of flex_prefill_attention, the block mask it chooses; the sparsity pass
  lowers FlexPrefill to flex_prefill_mask + block_sparse_attention, so any backend with a block-sparse kernel
  runs it (the mask is cheap: the last query block against all keys, and pooled blocks).
- shared_prefix_attention: Hydragen: queries of B sequences over shared prefixes (G of them, each read once
  for its B / G consecutive sequences) plus each sequence's own suffix, merged exactly by log-sum-exp.
- kv_qdq: what attention reads from a KV cache stored in int8 / fp8 (quantize then dequantize).
"""
from __future__ import annotations

from lmforge.errors import VerifyError
from lmforge.ir.cost import Cost
from lmforge.ir.ops.nn_ops import attention_cost, kv_bytes, visible_keys
from lmforge.ir.ops.registry import OpDef, attr, nbytes


def _out_like_q(ins, attrs):
    q, v = ins[0], ins[2]
    if q.rank != 4:
        raise VerifyError(f"attention variants take q [batch, heads, seq, head_dim], got {q}")
    return [q.with_(shape=(*q.shape[:3], v.shape[3]))]


def _flops(b, hq, pairs, d, dv):
    return 2.0 * b * hq * pairs * (d + dv) + 5.0 * b * hq * pairs


# ---- block top-k decode ---------------------------------------------------------------------------------------

def _topk_infer(ins, attrs):
    if attrs["block_size"] < 1 or min(attrs["topk_blocks"], attrs["sinks"], attrs["window"]) < 0:
        raise VerifyError(f"block_topk_attention: block_size {attrs['block_size']} must be >= 1 and topk_blocks, "
                          "sinks, window >= 0")
    if attrs["topk_blocks"] == attrs["sinks"] == attrs["window"] == 0:
        raise VerifyError("block_topk_attention with topk_blocks = sinks = window = 0 attends to no key: keep at "
                          "least one block")
    return _out_like_q(ins, attrs)


def _topk_ref(q, k, v, *, block_size, topk_blocks, sinks=4, window=64, summary="mean", scale=None, kv_dtype=None):
    from lmforge.ir.ops.attention_ref import decode_block_topk_ref

    return decode_block_topk_ref(q, k, v, block_size=block_size, topk_blocks=topk_blocks, sinks=sinks,
                                 window=window, summary=summary, scale=scale)


def kept_keys(skv: int, block_size: int, topk_blocks: int, sinks: int, window: int) -> int:
    """Keys block top-k attends to: the top-k blocks plus the blocks of the sinks and the local window."""
    n_blocks = -(-skv // block_size)
    forced = min(n_blocks, -(-sinks // block_size) + -(-window // block_size) + 1)
    return min(skv, (min(n_blocks, forced + topk_blocks)) * block_size)


def block_summary_bytes(k_shape, block_size: int, summary: str) -> float:
    """Bytes of the block summaries of a KV cache of shape [B, Hkv, Skv, D]: per block the fp32 mean key, or its
    fp32 min and max keys (as `attention_ref.block_summary` and the Triton summary kernel build them). They stay in
    device memory beside the cache."""
    b, hkv, skv, d = k_shape
    return (2 if summary == "minmax" else 1) * b * hkv * -(-skv // block_size) * d * 4


def _topk_cost(ins, attrs, outs):
    q, k, v = ins
    b, hq, sq, d = q.shape
    skv = k.shape[2]
    keep = kept_keys(skv, attrs["block_size"], attrs["topk_blocks"], attrs["sinks"], attrs["window"])
    n_blocks = -(-skv // attrs["block_size"])
    summaries = block_summary_bytes(k.shape, attrs["block_size"], attrs["summary"])
    score_flops = 2.0 * b * hq * n_blocks * d * (2 if attrs["summary"] == "minmax" else 1)
    # the block summaries stay in device memory (selection runs there); only the kept blocks come from the cache
    kv_read = kv_bytes(k, v, attrs["kv_dtype"]) * keep / max(skv, 1)
    flops = _flops(b, hq, sq * keep, d, v.shape[3]) + score_flops
    return attention_cost(flops, q.dtype, nbytes(q, *outs) + summaries, k, kv_read)


# ---- block-sparse prefill and FlexPrefill ---------------------------------------------------------------------------

def _block_sparse_ref(q, k, v, block_mask, *, block_size, scale=None, density=1.0):
    from lmforge.ir.ops.attention_ref import attention_ref

    return attention_ref(q, k, v, causal=True, scale=scale, block_mask=block_mask, block_size=block_size)


def _sparse_cost(ins, attrs, outs):
    q, k, v = ins[:3]
    b, hq, sq, d = q.shape
    pairs = visible_keys(sq, k.shape[2], True, None, 0, None) * attrs["density"]
    kv_read = nbytes(k, v) * max(attrs["density"], 1.0 / max(1, q.shape[2]))
    return attention_cost(_flops(b, hq, pairs, d, v.shape[3]), q.dtype, nbytes(q, *outs, *ins[3:]), k, kv_read)


def _flex_ref(q, k, v, *, gamma=0.9, tau=0.1, block_size=64, min_budget=2, scale=None, density=1.0):
    from lmforge.ir.ops.flexprefill_ref import flex_prefill_attention_ref

    return flex_prefill_attention_ref(q, k, v, gamma=gamma, tau=tau, block_size=block_size, min_budget=min_budget,
                                      scale=scale)


def _flex_mask_infer(ins, attrs):
    from lmforge.ir.types import simplify_dim

    q, k = ins
    if q.rank != 4 or k.rank != 4:
        raise VerifyError(f"flex_prefill_mask takes q and k [batch, heads, seq, head_dim], got {q} and {k}")
    s, bs = q.shape[2], attrs["block_size"]
    nb = -(-s // bs) if isinstance(s, int) else simplify_dim(f"ceiling(({s}) / {bs})")
    return [q.with_(shape=(q.shape[0], q.shape[1], nb, nb), dtype="bool")]


def _flex_mask_ref(q, k, *, gamma=0.9, tau=0.1, block_size=64, min_budget=2, scale=None):
    from lmforge.ir.ops.flexprefill_ref import flex_prefill_block_mask

    return flex_prefill_block_mask(q, k, gamma=gamma, tau=tau, block_size=block_size, min_budget=min_budget,
                                   scale=scale)[0]


def _flex_mask_cost(ins, attrs, outs):
    """The last query block against every key (exact block distribution), mean-pooled q / k blocks and their
    block-to-block scores (query-aware pattern); sorts and prefix sums are not counted."""
    q, k = ins
    b, hq, s, d = q.shape
    bs, nb = attrs["block_size"], outs[0].shape[2]
    flops = 2.0 * b * hq * min(bs, s) * s * d + 2.0 * b * hq * nb * nb * d + 2.0 * b * (hq + k.shape[1]) * s * d
    return Cost.of(flops, nbytes(q, k, *outs), "attention", q.dtype)


# ---- shared prefix --------------------------------------------------------------------------------------------------

def _shared_infer(ins, attrs):
    q, kp, vp, ks, vs = ins
    g, b = kp.shape[0], q.shape[0]
    if isinstance(g, int) and isinstance(b, int) and (g < 1 or b % g):
        raise VerifyError(f"shared_prefix_attention: {b} sequences do not fall into equal groups for {g} prefixes "
                          f"(prefix K/V {kp})")
    return [q.with_(shape=(*q.shape[:3], vp.shape[3]))]


def _shared_ref(q, kp, vp, ks, vs, *, scale=None, rows_per_prefix=0):
    from lmforge.ir.ops.attention_ref import check_prefix_groups, shared_prefix_attention_ref

    check_prefix_groups(q.shape[0], kp.shape[0], rows_per_prefix)
    return shared_prefix_attention_ref(q, kp, vp, ks, vs, scale=scale)


def _shared_cost(ins, attrs, outs):
    q, kp, vp, ks, vs = ins
    b, hq, sq, d = q.shape
    pairs = sq * kp.shape[2] + visible_keys(sq, ks.shape[2], True, None, 0, None)
    flops = _flops(b, hq, pairs, d, vp.shape[3])
    prefix = attention_cost(flops, q.dtype, nbytes(q, *outs), kp, nbytes(kp, vp))
    return prefix + attention_cost(0.0, q.dtype, 0.0, ks, nbytes(ks, vs))


# ---- KV quantize-dequantize ------------------------------------------------------------------------------------------

def _kv_qdq_ref(x, *, dtype="int8", axis="token"):
    from lmforge.ir.ops import quant_ref

    if dtype == "int8":
        q, s = quant_ref.kv_quantize_int8(x, axis=axis)
        return quant_ref.kv_dequantize_int8(q, s, x.dtype)
    q, s = quant_ref.kv_quantize_fp8(x)
    return quant_ref.kv_dequantize_fp8(q, s, x.dtype)


def _fused_into_attention(ins, attrs, outs):
    # The attention kernel dequantizes K/V as it reads them; the bytes are charged there (kv_dtype).
    return Cost.of(0.0, 0.0, "elementwise", outs[0].dtype)


def ops() -> list[OpDef]:
    scale = attr("float", None)
    return [
        OpDef("block_topk_attention", "Decode attention over the top-k KV blocks (+ sink and local-window blocks), "
                                      "selection shared by the query heads of a KV head.",
              {"block_size": attr("int"), "topk_blocks": attr("int"), "sinks": attr("int", 4),
               "window": attr("int", 64), "summary": attr("str", "mean", choices=("mean", "minmax")),
               "scale": scale, "kv_dtype": attr("dtype", None)},
              _topk_infer, _topk_ref, _topk_cost, arity=(3, 3), op_class="attention"),
        OpDef("block_sparse_attention", "Causal attention restricted to a boolean block mask [B, H, nQ, nK]; "
                                        "`density` is the expected kept fraction (for the cost model).",
              {"block_size": attr("int"), "scale": scale, "density": attr("float", 1.0)},
              _out_like_q, _block_sparse_ref, _sparse_cost, arity=(4, 4), op_class="attention"),
        OpDef("flex_prefill_attention", "FlexPrefill adaptive sparse prefill (gamma coverage, tau JS threshold); "
                                        "`density` is the kept fraction measured on calibration inputs (1.0 if "
                                        "none were given: no saving is claimed without a measurement).",
              {"gamma": attr("float", 0.9), "tau": attr("float", 0.1), "block_size": attr("int", 64),
               "min_budget": attr("int", 2), "scale": scale, "density": attr("float", 1.0)},
              _out_like_q, _flex_ref, _sparse_cost, arity=(3, 3), op_class="attention"),
        OpDef("flex_prefill_mask", "The causal block mask [B, Hq, nB, nB] FlexPrefill keeps for prefill q / k (what "
                                   "flex_prefill_attention attends to); feeds block_sparse_attention.",
              {"gamma": attr("float", 0.9), "tau": attr("float", 0.1), "block_size": attr("int", 64),
               "min_budget": attr("int", 2), "scale": scale},
              _flex_mask_infer, _flex_mask_ref, _flex_mask_cost, arity=(2, 2), op_class="attention"),
        OpDef("shared_prefix_attention", "Hydragen: attention of B sequences over shared prefixes (batch G: groups "
                                         "of B/G consecutive sequences share one, read once) and their own "
                                         "suffixes, merged exactly by log-sum-exp.",
              {"scale": scale, "rows_per_prefix": attr("int", 0, "rows that share each prefix (0: B / G); set by "
                                                                  "the Hydragen pass, a batch of another size is an "
                                                                  "error, never a regrouping")},
              _shared_infer, _shared_ref, _shared_cost, arity=(5, 5), op_class="attention"),
        OpDef("kv_qdq", "K or V as read from a cache stored in int8 (per-token or per-head scales) or fp8 e4m3.",
              {"dtype": attr("dtype", "int8"), "axis": attr("str", "token", choices=("token", "head"))},
              lambda i, a: [i[0]], _kv_qdq_ref, _fused_into_attention),
    ]
