"""Launch specs of the attention ops for an artifact's cubins (see launch_specs.py for the contract and the
table of every op's launches): `attention` (split-K decode + merge, or flash prefill), `block_topk_attention`
(block scores, a torch top-k, sparse split, merge), `shared_prefix_attention` (prefix split, suffix split,
merge) and `block_sparse_attention` (the mask's block lists in torch, then flash prefill in SPARSE mode). Each
call allocates its workspaces (and block lists) first, then lists its steps; CubinBackend checks every launch
before the first one runs.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import triton

from lmforge.backends.triton.config import KernelConfig
from lmforge.backends.triton.launch_specs import (Built, Call, Hint, Launch, Unservable, Variant, _ints,
                                                  _ttype)
from lmforge.errors import LmforgeError
from lmforge.ir.graph import Node

# ---- attention: several launches per call -------------------------------------------------------------------
#
# The launchers (attention_decode / attention_prefill, chosen per call as attention_glue chooses) are mirrored
# step by step: same workspaces (attention_decode._Partials), same split plan (plan_splits: the device's SM
# count at load time, DEFAULT_SM_COUNT on the CPU, as the JIT), same arguments in the same order. Integer
# arguments get hints from the static types: a stride of q / k / v is only known to be a multiple of the head
# dim (views of a larger cache or of a fused QKV projection keep that, whatever their layout); a stride of a
# buffer the call allocates is the product of its trailing dims. DOT_FP32 is False: it only upcasts bf16 dots
# for Triton's interpreter, and an artifact's kernels are compiled.

MERGE_CONFIG = KernelConfig.make(num_warps=4, num_stages=3)   # the JIT passes num_warps=4, Triton's default stages
SCORE_CONFIG = KernelConfig.make(num_warps=4, num_stages=3)
_SPLIT_GRID = ("grid_bh", "grid_splits", ["cdiv", "ROWS", "BLOCK_M"])
_SPLIT_STRIDES = ("stride_qb", "stride_qh", "stride_qs", "stride_kb", "stride_kh", "stride_ks",
                  "stride_vb", "stride_vh", "stride_vs", "stride_pb", "stride_ph", "stride_ps", "stride_pn",
                  "stride_lb", "stride_lh", "stride_ls")


def _attention_types(values) -> tuple[str, int, Any]:
    """(Triton dtype, head dim, torch dtype) of q, k, v (, ...): one float dtype and one static head dim."""
    import torch

    t = _ttype(values[0])
    if t not in ("fp16", "bf16", "fp32"):
        raise Unservable(f"attention kernels take float16, bfloat16 or float32, not {values[0].type.dtype}")
    if any(_ttype(v) != t for v in values[1:]):
        raise Unservable("q, k and v have different dtypes")
    dims = {v.type.shape[-1] for v in values}
    d = dims.pop()
    if dims or not isinstance(d, int):
        raise Unservable("the head dims are symbolic or differ (the kernels are built for one head dim)")
    return t, d, getattr(torch, values[0].type.dtype)


def _ratio(a, b) -> int | str:
    """a // b when both are static (query heads per KV head), else a symbolic placeholder."""
    return a // b if isinstance(a, int) and isinstance(b, int) and b else "group"


def _row_blocks(rows: Hint, max_block_m: int) -> list[int]:
    """The BLOCK_M values attention_decode._row_block can give for `rows` query rows: one when rows is known."""
    from lmforge.backends.triton.attention_decode import _row_block

    if rows.exact is not None:
        return [_row_block(rows.exact, max_block_m)]
    top = triton.next_power_of_2(max_block_m)
    return sorted({_row_block(2 ** i, max_block_m) for i in range(top.bit_length())
                   if 2 ** i >= rows.multiple or 2 ** i >= top})


def _split_variants(key: str, t: str, d: int, dtype, config: KernelConfig | None, *, q_shape, hkv, rows: Hint,
                    kv_len: Hint, keys: int | None, split_base: Hint, causal: bool, sparse: bool = False,
                    block_size: int = 1, idx: tuple[Hint, Hint] = (Hint(0), Hint(0))) -> list[Variant]:
    """`_decode_split_kernel` as attention_decode._launch_split runs it: one variant per BLOCK_M the call can
    need (keyed `key`, or `key.m<BLOCK_M>` when the row count is only known at run time). keys: the keys the
    launch tiles (kv_len, or kept blocks x block size), when static."""
    from lmforge.backends.triton import attention_decode as ad
    from lmforge.backends.triton.attention_prefill import dot_precision, head_block

    params, cfg = ad._config(config)
    block_n = min(params["BLOCK_N"], block_size) if sparse else params["BLOCK_N"]
    b, hq, sq = q_shape
    per_d = Hint(None, d)
    hints = {"stride_qb": per_d, "stride_qh": per_d, "stride_qs": per_d, "stride_kb": per_d, "stride_kh": per_d,
             "stride_ks": per_d, "stride_vb": per_d, "stride_vh": per_d, "stride_vs": per_d,
             "stride_pb": Hint.of([hq, sq, "splits", d]), "stride_ph": Hint.of([sq, "splits", d]),
             "stride_ps": Hint.of(["splits", d]), "stride_pn": Hint(d), "stride_lb": Hint.of([hq, sq, "splits"]),
             "stride_lh": Hint.of([sq, "splits"]), "stride_ls": Hint.of(["splits"]),
             "stride_ib": idx[0], "stride_ih": idx[1], "kv_len": kv_len,
             "n_tiles": Hint(triton.cdiv(keys, block_n)) if keys is not None else Hint(), "tiles_per_split": Hint(),
             "split_base": split_base, "HKV": Hint.of([hkv]), "GROUP": Hint.of([_ratio(hq, hkv)]),
             "SQ": Hint.of([sq]), "ROWS": rows, "D": Hint(d)}
    ints, ones, divisible = _ints(hints)
    signature = {"Q": f"*{t}", "K": f"*{t}", "V": f"*{t}", "PO": "*fp32", "PL": "*fp32", "LENS": "*fp32",
                 "BIDX": "*i64" if sparse else "*fp32", "qk_scale": "fp32", **ints}
    block_ms = _row_blocks(rows, params["MAX_BLOCK_M"])
    out = []
    for block_m in block_ms:
        # as the launcher: a tile of >= 64 query rows runs with at least 8 warps
        warps = max(cfg.num_warps, 8) if block_m >= 64 else cfg.num_warps
        constexprs = {"SPARSE": sparse, "CAUSAL": causal, "HAS_LENS": False, "BLOCK_SIZE": block_size if sparse else 1,
                      "BLOCK_M": block_m, "BLOCK_D": head_block(d), "HEAD_MASK": head_block(d) != d,
                      "PRECISION": dot_precision(dtype), "DOT_FP32": False, **ones}
        name = key if len(block_ms) == 1 and rows.exact is not None else f"{key}.m{block_m}"
        out.append(Variant(name, "decode_split", ad._decode_split_kernel, signature, constexprs,
                           cfg.with_(num_warps=warps, BLOCK_N=block_n), divisible, _SPLIT_GRID, {"BLOCK_M": block_m}))
    return out


def _merge_variant(t: str, d: int, write_lse: bool) -> Variant:
    from lmforge.backends.triton import attention_decode as ad
    from lmforge.backends.triton.attention_prefill import head_block

    ints, ones, divisible = _ints({"n_splits": Hint(), "D": Hint(d)})
    return Variant("merge", "merge_splits", ad._merge_splits_kernel,
                   {"PO": "*fp32", "PL": "*fp32", "O": f"*{t}", "LSE": "*fp32", **ints},
                   {"WRITE_LSE": bool(write_lse), "BLOCK_S": ad.MERGE_BLOCK_S, "BLOCK_D": head_block(d), **ones},
                   MERGE_CONFIG, divisible, ("grid_rows",))


def _split_key(built: Mapping[str, Built], key: str, rows: int) -> str | None:
    """The built split variant (`key` or `key.m<BLOCK_M>`) whose BLOCK_M the launcher would pick for `rows`."""
    from lmforge.backends.triton.attention_decode import _row_block

    for name, b in built.items():
        if (name == key or name.startswith(f"{key}.m")) and \
                b.static.get("BLOCK_M") == _row_block(rows, b.config.get("MAX_BLOCK_M")):
            return name
    return None


def _split_launch(key: str, q, k, v, parts, *, grid_bh: int, rows: int, splits: int, per_split: int, n_tiles: int,
                  split_base: int, kv_len: int, scale: float, block_idx=None) -> list[Launch]:
    """The launch attention_decode._launch_split makes (none when it makes none)."""
    from lmforge.backends.triton.attention_prefill import LOG2E

    if splits == 0 or rows == 0:
        return []
    sparse = block_idx is not None
    idx = block_idx if sparse else parts.lse
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *parts.out.stride()[:4], *parts.lse.stride()[:3])
    values = {"Q": q, "K": k, "V": v, "PO": parts.out, "PL": parts.lse, "LENS": parts.lse, "BIDX": idx,
              "qk_scale": scale * LOG2E, **dict(zip(_SPLIT_STRIDES, strides)),
              "stride_ib": idx.stride(0) if sparse else 0, "stride_ih": idx.stride(1) if sparse else 0,
              "kv_len": kv_len, "n_tiles": n_tiles, "tiles_per_split": per_split, "split_base": split_base,
              "HKV": k.shape[1], "GROUP": q.shape[1] // k.shape[1], "SQ": q.shape[2], "ROWS": rows, "D": q.shape[3],
              "grid_bh": grid_bh, "grid_splits": splits}
    return [Launch(key, values)]


def _merge_steps(q, parts, return_lse: bool) -> tuple[list, Callable[[], Any]]:
    """The steps of attention_decode._Partials.merge (the merge launch, or filling an empty result)."""
    import torch

    b, hq, sq, d = q.shape
    out = torch.empty((b, hq, sq, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, hq, sq), dtype=torch.float32, device=q.device)
    if parts.n_splits == 0:
        steps = [lambda: (out.zero_(), lse.fill_(float("-inf")))]
    elif out.numel():
        steps = [Launch("merge", {"PO": parts.out, "PL": parts.lse, "O": out, "LSE": lse, "n_splits": parts.n_splits,
                                  "D": d, "grid_rows": b * hq * sq})]
    else:
        steps = []
    return steps, ((lambda: (out, lse)) if return_lse else (lambda: out))


def _decodes(window, sinks, q_offset, causal) -> bool:
    """attention_glue's rule (with one query row): split-K decode unless a window, sinks or a causal offset."""
    return window is None and not sinks and (q_offset is None or not causal)


def _static_offset(q_offset, sq, skv) -> Hint:
    """The q_offset argument at export: the node's own, else Skv - Sq when both are static."""
    if isinstance(q_offset, int):
        return Hint(q_offset)
    if q_offset is None and isinstance(skv, int) and isinstance(sq, int):
        return Hint(skv - sq)
    return Hint()


def _flash_variant(key: str, kernel: str, node: Node, cfg: KernelConfig, t: str, d: int, dtype, *,
                   ints: Mapping[str, Hint], pointers: Mapping[str, str], constexprs: Mapping[str, Any]) -> Variant:
    """`_flash_prefill_kernel` for this node's q / k / v types: the integer arguments every mode shares, with
    `ints` adding the mode's own (window, lists' strides, ...), and `pointers` typing BIDX / BCNT."""
    from lmforge.backends.triton import attention_prefill as ap

    (_, hq, sq, _), (_, hkv, skv, _) = node.inputs[0].type.shape, node.inputs[1].type.shape
    per_d = Hint(None, d)
    ints, ones, divisible = _ints({
        "stride_qb": per_d, "stride_qh": per_d, "stride_qs": per_d, "stride_kb": per_d, "stride_kh": per_d,
        "stride_ks": per_d, "stride_vb": per_d, "stride_vh": per_d, "stride_vs": per_d,
        "stride_ob": Hint.of([hq, sq, d]), "stride_oh": Hint.of([sq, d]), "stride_os": Hint(d),
        "stride_lb": Hint.of([hq, sq]), "stride_lh": Hint.of([sq]), "stride_ib": Hint(0), "stride_ih": Hint(0),
        "stride_iq": Hint(0), "stride_cb": Hint(0), "stride_ch": Hint(0), "HQ": Hint.of([hq]),
        "GROUP": Hint.of([_ratio(hq, hkv)]), "IDX_GROUP": Hint(1), "SQ": Hint.of([sq]), "SKV": Hint.of([skv]),
        "q_offset": Hint(), "window": Hint(0), "sinks": Hint(0), "D": Hint(d), **ints})
    block_d = ap.head_block(d)
    signature = {"Q": f"*{t}", "K": f"*{t}", "V": f"*{t}", "O": f"*{t}", "LSE": "*fp32", "BIDX": "*fp32",
                 "BCNT": "*fp32", **pointers, "qk_scale": "fp32", **ints}
    constexprs = {**constexprs, "BLOCK_D": block_d, "HEAD_MASK": block_d != d, "PRECISION": ap.dot_precision(dtype),
                  "DOT_FP32": False, **ones}
    return Variant(key, kernel, ap._flash_prefill_kernel, signature, constexprs, cfg, divisible,
                   (["cdiv", "SQ", "BLOCK_M"], "grid_bh"))


def _prefill_variant(node: Node, config: KernelConfig | None, t: str, d: int, dtype) -> Variant:
    """`_flash_prefill_kernel` as attention_prefill.flash_prefill launches it for this node's mask."""
    from lmforge.backends.triton import attention_prefill as ap

    a = node.attr
    window, sinks, causal = a["window"], a["sinks"], a["causal"]
    if window is not None and window < 1:
        raise Unservable(f"window {window} < 1 (flash_prefill refuses it)")
    if sinks and window is None:
        raise Unservable("sinks without a window (flash_prefill refuses them)")
    mode = ap.MODE_WINDOW if window is not None else ap.MODE_CAUSAL if causal else ap.MODE_DENSE
    _, cfg = ap._params(config, dtype, d, mode)
    sq, skv = node.inputs[0].type.shape[2], node.inputs[1].type.shape[2]
    ints = {"q_offset": _static_offset(a["q_offset"], sq, skv), "window": Hint(0 if window is None else window),
            "sinks": Hint(sinks)}
    return _flash_variant("prefill", "flash_prefill", node, cfg, t, d, dtype, ints=ints, pointers={}, constexprs={
        "MODE": mode, "CAUSAL": bool(causal), "BLOCK_SIZE": 1, "WRITE_LSE": bool(a["return_lse"])})


def _sparse_variant(node: Node, config: KernelConfig | None, t: str, d: int, dtype) -> Variant:
    """`_flash_prefill_kernel` in SPARSE mode as attention_prefill.block_sparse_prefill launches it for
    block_sparse_attention (attention_glue.claim_block_sparse): tiles clamped to the block size, int32 block lists
    [B, Hm, nQ, nK] and counts [B, Hm, nQ] as attention_glue.sparse_block_lists makes them (a batch-1 mask's
    lists expanded with batch stride 0), no lse."""
    from lmforge.backends.triton import attention_prefill as ap

    bs = node.attr["block_size"]
    _, cfg = ap._params(config, dtype, d, ap.MODE_SPARSE)
    cfg = cfg.with_(BLOCK_M=min(cfg.get("BLOCK_M"), bs), BLOCK_N=min(cfg.get("BLOCK_N"), bs))
    (b, hq, sq, _), skv = node.inputs[0].type.shape, node.inputs[1].type.shape[2]
    mask_b, hm = node.inputs[3].type.shape[:2]
    n_q = -(-sq // bs) if isinstance(sq, int) else "n_q"
    n_k = -(-skv // bs) if isinstance(skv, int) else "n_k"
    batch_stride = (Hint.of([hm, n_q, n_k]), Hint.of([hm, n_q])) if mask_b == b else \
        (Hint(0), Hint(0)) if mask_b == 1 and isinstance(b, int) else (Hint(), Hint())   # expanded: stride 0
    ints = {"stride_ib": batch_stride[0], "stride_ih": Hint.of([n_q, n_k]), "stride_iq": Hint.of([n_k]),
            "stride_cb": batch_stride[1], "stride_ch": Hint.of([n_q]), "IDX_GROUP": Hint.of([_ratio(hq, hm)]),
            "q_offset": _static_offset(None, sq, skv)}
    return _flash_variant("sparse", "block_sparse_prefill", node, cfg, t, d, dtype, ints=ints,
                          pointers={"BIDX": "*i32", "BCNT": "*i32"},
                          constexprs={"MODE": ap.MODE_SPARSE, "CAUSAL": True, "BLOCK_SIZE": bs, "WRITE_LSE": False})


def _flash_call(key: str, q, k, v, *, scale, q_offset, window, sinks, return_lse, lists=None) -> Call:
    """The launch attention_prefill._launch makes (flash_prefill, or block_sparse_prefill with `lists` =
    (block_idx, block_cnt)); the inputs are already checked."""
    import torch

    from lmforge.backends.triton import attention_prefill as ap

    b, hq, sq, d = q.shape
    skv = k.shape[2]
    q, k, v = ap.last_dim_contiguous(q), ap.last_dim_contiguous(k), ap.last_dim_contiguous(v)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((b, hq, sq), dtype=torch.float32, device=q.device)
    result = (lambda: (out, lse)) if return_lse else (lambda: out)
    if out.numel() == 0 or skv == 0:          # as the launcher: no launch, every row sees no key
        return Call([lambda: (out.zero_(), lse.fill_(float("-inf")))], result)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *lse.stride()[:2])
    names = ("stride_qb", "stride_qh", "stride_qs", "stride_kb", "stride_kh", "stride_ks", "stride_vb",
             "stride_vh", "stride_vs", "stride_ob", "stride_oh", "stride_os", "stride_lb", "stride_lh")
    if lists is None:
        block_idx = block_cnt = lse                                 # unused pointers
        idx_strides, idx_group = (0, 0, 0, 0, 0), 1
    else:
        block_idx, block_cnt = lists
        idx_strides, idx_group = (*block_idx.stride()[:3], *block_cnt.stride()[:2]), hq // block_idx.shape[1]
    values = {"Q": q, "K": k, "V": v, "O": out, "LSE": lse, "BIDX": block_idx, "BCNT": block_cnt,
              "qk_scale": scale * ap.LOG2E, **dict(zip(names, strides)),
              **dict(zip(("stride_ib", "stride_ih", "stride_iq", "stride_cb", "stride_ch"), idx_strides)),
              "HQ": hq, "GROUP": hq // k.shape[1], "IDX_GROUP": idx_group, "SQ": sq, "SKV": skv,
              "q_offset": skv - sq if q_offset is None else int(q_offset),
              "window": 0 if window is None else int(window), "sinks": int(sinks), "D": d, "grid_bh": b * hq}
    return Call.single(key, values, result)


class AttentionSpec:
    """attention (no mask, K/V not quantized): split-K decode (split, merge) for one query row, flash prefill
    otherwise. A static query length of 1 builds the decode variants only, a static one > 1 the prefill only,
    a symbolic one both (attention_glue chooses per call)."""

    def variants(self, node: Node, configs: Mapping[str, Any]) -> list[Variant]:
        scale = node.attr["scale"]
        if len(node.inputs) != 3 or node.attr["kv_dtype"] is not None or (scale is not None and scale < 0):
            raise Unservable("an explicit mask, a quantized KV cache or a negative scale (the Triton backend does "
                             "not claim these)")
        t, d, dtype = _attention_types(node.inputs)
        a = node.attr
        (b, hq, sq, _), (_, hkv, s, _) = node.inputs[0].type.shape, node.inputs[1].type.shape
        decode = _decodes(a["window"], a["sinks"], a["q_offset"], a["causal"])
        out = []
        if decode and not (isinstance(sq, int) and sq != 1):
            out += _split_variants("decode.split", t, d, dtype, configs.get("attention_decode"), q_shape=(b, hq, 1),
                                   hkv=hkv, rows=Hint.of([_ratio(hq, hkv)]), kv_len=Hint.of([s]),
                                   keys=s if isinstance(s, int) else None, split_base=Hint(0), causal=False)
            out.append(_merge_variant(t, d, a["return_lse"]))
        if not (decode and sq == 1):
            out.append(_prefill_variant(node, configs.get("attention_prefill"), t, d, dtype))
        return out

    def call(self, node: Node, built: Mapping[str, Built], q, k, v, mask=None, *, causal=False, scale=None,
             window=None, sinks=0, q_offset=None, return_lse=False, **_) -> Call | None:
        if mask is not None:
            return None
        if q.dim() == 4 and q.shape[2] == 1 and _decodes(window, sinks, q_offset, causal):
            return self._decode(built, q, k, v, scale, return_lse)
        return self._prefill(built, q, k, v, causal, scale, window, sinks, q_offset, return_lse)

    @staticmethod
    def _decode(built, q, k, v, scale, return_lse) -> Call | None:
        """attention_decode.decode_attention (kv_len = the whole cache, splits to fill the device)."""
        from lmforge.backends.triton import attention_decode as ad

        try:
            q, k, v = ad._check_decode(q, k, v, "decode_attention")
        except LmforgeError:
            return None                     # the reference raises its own error for these inputs
        b, hq, sq, d = q.shape
        hkv, s = k.shape[1], k.shape[2]
        rows = (hq // hkv) * sq
        key = _split_key(built, "decode.split", rows)
        if key is None:
            return None
        n_tiles = triton.cdiv(s, built[key].config.get("BLOCK_N"))
        splits, per_split = ad.plan_splits(n_tiles, b * hkv, q.device, None)
        parts = ad._Partials(q, splits)
        split = _split_launch(key, q, k, v, parts, grid_bh=b * hkv, rows=rows, splits=splits, per_split=per_split,
                              n_tiles=n_tiles, split_base=0, kv_len=s, scale=ad._scale(scale, d))
        merge, result = _merge_steps(q, parts, return_lse)
        return Call(split + merge, result)

    @staticmethod
    def _prefill(built, q, k, v, causal, scale, window, sinks, q_offset, return_lse) -> Call | None:
        """attention_prefill.flash_prefill (dense, causal, or window + sinks)."""
        from lmforge.backends.triton import attention_prefill as ap

        try:
            ap.check_attention_inputs(q, k, v, "flash_prefill")
        except LmforgeError:
            return None
        if (window is not None and window < 1) or (sinks and window is None) or (scale is not None and scale < 0):
            return None                     # flash_prefill refuses these; the reference runs them
        return _flash_call("prefill", q, k, v, scale=scale, q_offset=q_offset, window=window, sinks=sinks,
                           return_lse=return_lse)


class BlockTopKSpec:
    """block_topk_attention: block scores (kernel), a torch top-k (attention_ref.top_indices: ties to the lowest
    block index) into a preallocated index buffer, the sparse split kernel over the kept blocks, the merge
    (attention_decode.block_topk_decode as attention_glue calls it)."""

    def variants(self, node: Node, configs: Mapping[str, Any]) -> list[Variant]:
        from lmforge.backends.triton import attention_decode as ad
        from lmforge.backends.triton.attention_prefill import head_block

        a = node.attr
        block_size, kind = a["block_size"], a["summary"]
        if block_size < 16 or block_size & (block_size - 1) or a["kv_dtype"] is not None:
            raise Unservable("block size not a power of two >= 16, or a quantized KV cache")
        if kind not in ("mean", "minmax"):
            raise Unservable(f"summary {kind!r} is neither 'mean' nor 'minmax'")
        t, d, dtype = _attention_types(node.inputs)
        (b, hq, sq, _), (_, hkv, s, _) = node.inputs[0].type.shape, node.inputs[1].type.shape
        if isinstance(sq, int) and sq != 1:
            raise Unservable(f"block top-k runs decode steps (one query row), this node has {sq}")
        n_blocks = keep = None
        forced = (Hint(), Hint())
        if isinstance(s, int) and s > 0:
            n_blocks = triton.cdiv(s, block_size)
            sink_blocks, first_window, n_forced = ad.forced_blocks(s, block_size, a["sinks"], a["window"])
            keep = min(n_blocks, n_forced + max(0, a["topk_blocks"]))
            forced = (Hint(sink_blocks), Hint(first_window))
        nb = "n_blocks" if n_blocks is None else n_blocks
        ints, ones, divisible = _ints({
            "stride_qb": Hint(None, d), "stride_qh": Hint(None, d), "stride_ab": Hint.of([hkv, nb, d]),
            "stride_ah": Hint.of([nb, d]), "stride_an": Hint(d), "stride_bb": Hint.of([hkv, nb, d]),
            "stride_bh": Hint.of([nb, d]), "stride_bn": Hint(d), "stride_ob": Hint.of([hkv, nb]),
            "stride_oh": Hint.of([nb]), "n_blocks": Hint.of([nb]), "sink_blocks": forced[0],
            "first_window_block": forced[1], "HKV": Hint.of([hkv]), "GROUP": Hint.of([_ratio(hq, hkv)]),
            "D": Hint(d)})
        minmax = kind == "minmax"
        score = Variant("topk.score", "block_score", ad._block_score_kernel,
                        {"Q": f"*{t}", "S_A": "*fp32", "S_B": "*fp32", "OUT": "*fp32", **ints},
                        {"MINMAX": minmax, "BLOCK_NB": 16 if minmax else 64, "BLOCK_D": head_block(d), **ones},
                        SCORE_CONFIG, divisible, ("grid_bh", ["cdiv", "n_blocks", "BLOCK_NB"]))
        kept = "keep" if keep is None else keep
        splits = _split_variants("topk.split", t, d, dtype, configs.get("attention_decode"), q_shape=(b, hq, 1),
                                 hkv=hkv, rows=Hint.of([_ratio(hq, hkv)]), kv_len=Hint.of([s]),
                                 keys=None if keep is None else keep * block_size, split_base=Hint(0), causal=False,
                                 sparse=True, block_size=block_size, idx=(Hint.of([hkv, kept]), Hint.of([kept])))
        return [score, *splits, _merge_variant(t, d, False)]

    def call(self, node: Node, built: Mapping[str, Built], q, k, v, *, block_size, topk_blocks, sinks=4, window=64,
             summary="mean", scale=None, **_) -> Call | None:
        import torch

        from lmforge.backends.triton import attention_decode as ad

        try:
            q, k, v = ad._check_decode(q, k, v, "block_topk_decode")
        except LmforgeError:
            return None
        b, hq, sq, d = q.shape
        hkv, s = k.shape[1], k.shape[2]
        key = _split_key(built, "topk.split", hq // hkv)
        if sq != 1 or s == 0 or key is None or summary not in ("mean", "minmax"):
            return None                     # (s == 0: the launcher's dense path; the reference does the same)
        summ = ad.build_block_summary(k, block_size, summary)
        first, second = summ if summary == "minmax" else (summ, summ)
        n_blocks = triton.cdiv(s, block_size)
        scores = torch.empty((b, hkv, n_blocks), dtype=torch.float32, device=q.device)
        sink_blocks, first_window, n_forced = ad.forced_blocks(s, block_size, sinks, window)
        keep = min(n_blocks, n_forced + max(0, topk_blocks))
        selected = torch.empty((b, hkv, keep), dtype=torch.int64, device=q.device)
        score = Launch("topk.score", {
            "Q": q, "S_A": first, "S_B": second, "OUT": scores, "stride_qb": q.stride(0), "stride_qh": q.stride(1),
            **dict(zip(("stride_ab", "stride_ah", "stride_an"), first.stride()[:3])),
            **dict(zip(("stride_bb", "stride_bh", "stride_bn"), second.stride()[:3])),
            "stride_ob": scores.stride(0), "stride_oh": scores.stride(1), "n_blocks": n_blocks,
            "sink_blocks": sink_blocks, "first_window_block": first_window, "HKV": hkv, "GROUP": hq // hkv, "D": d,
            "grid_bh": b * hkv})

        def select():   # as the JIT's select="torch": ties to the lowest block index
            selected.copy_(ad.top_indices(scores, keep))

        n_tiles = keep * (block_size // min(built[key].config.get("BLOCK_N"), block_size))
        splits, per_split = ad.plan_splits(n_tiles, b * hkv, q.device, None)
        parts = ad._Partials(q, splits)
        split = _split_launch(key, q, k, v, parts, grid_bh=b * hkv, rows=hq // hkv, splits=splits,
                              per_split=per_split, n_tiles=n_tiles, split_base=0, kv_len=s,
                              scale=ad._scale(scale, d), block_idx=selected)
        merge, result = _merge_steps(q, parts, False)
        return Call([score, select, *split, *merge], result)


class SharedPrefixSpec:
    """shared_prefix_attention: the prefix pass (every sequence's rows in one tile, the prefix read once), the
    causal suffix pass, one merge (attention_decode.shared_prefix_decode)."""

    def variants(self, node: Node, configs: Mapping[str, Any]) -> list[Variant]:
        t, d, dtype = _attention_types(node.inputs)
        (b, hq, sq, _), (g, hkv, p, _), (_, _, s, _) = (node.inputs[i].type.shape for i in (0, 1, 3))
        config = configs.get("attention_shared_prefix")   # the template's config, as attention_glue passes it
        common = dict(q_shape=(b, hq, sq), hkv=hkv)
        group = _ratio(hq, hkv)
        per_prefix = b if g == 1 else (b // g if isinstance(b, int) and isinstance(g, int) else "rows_per_prefix")
        prefix = _split_variants("prefix.split", t, d, dtype, config, rows=Hint.of([per_prefix, group, sq]),
                                 kv_len=Hint.of([p]), keys=p if isinstance(p, int) else None, split_base=Hint(0),
                                 causal=False, **common)
        suffix = _split_variants("suffix.split", t, d, dtype, config, rows=Hint.of([group, sq]), kv_len=Hint.of([s]),
                                 keys=s if isinstance(s, int) else None, split_base=Hint(), causal=True, **common)
        return [*prefix, *suffix, _merge_variant(t, d, False)]

    def call(self, node: Node, built: Mapping[str, Built], q, kp, vp, ks, vs, *, scale=None, rows_per_prefix=0,
             **_) -> Call | None:
        from lmforge.backends.triton import attention_decode as ad

        if rows_per_prefix and q.shape[0] != kp.shape[0] * rows_per_prefix:
            return None   # not this step's grouping: the reference raises the error

        try:
            ad.check_attention_inputs(q, kp, vp, "shared_prefix_decode (prefix)")
            q, ks, vs = ad._check_decode(q, ks, vs, "shared_prefix_decode (suffix)")
        except LmforgeError:
            return None
        kp, vp = ad.last_dim_contiguous(kp), ad.last_dim_contiguous(vp)
        groups = kp.shape[0]
        if groups < 1 or q.shape[0] % groups or kp.shape[1] != ks.shape[1]:
            return None
        b, hq, sq, d = q.shape
        hkv, p_len, s_len = kp.shape[1], kp.shape[2], ks.shape[2]
        group = hq // hkv
        prefix_rows = (b // groups) * group * sq
        pkey, skey = _split_key(built, "prefix.split", prefix_rows), _split_key(built, "suffix.split", group * sq)
        if pkey is None or skey is None:
            return None
        row_blocks = triton.cdiv(prefix_rows, built[pkey].static["BLOCK_M"])
        p_tiles = triton.cdiv(p_len, built[pkey].config.get("BLOCK_N"))
        s_tiles = triton.cdiv(s_len, built[skey].config.get("BLOCK_N"))
        p_splits, p_per = ad.plan_splits(p_tiles, groups * hkv * row_blocks, q.device, None)
        s_splits, s_per = ad.plan_splits(s_tiles, b * hkv, q.device, None)
        parts = ad._Partials(q, p_splits + s_splits)
        scale = ad._scale(scale, d)
        prefix = _split_launch(pkey, q, kp, vp, parts, grid_bh=groups * hkv, rows=prefix_rows, splits=p_splits,
                               per_split=p_per, n_tiles=p_tiles, split_base=0, kv_len=p_len, scale=scale)
        suffix = _split_launch(skey, q, ks, vs, parts, grid_bh=b * hkv, rows=group * sq, splits=s_splits,
                               per_split=s_per, n_tiles=s_tiles, split_base=p_splits, kv_len=s_len, scale=scale)
        merge, result = _merge_steps(q, parts, False)
        return Call([*prefix, *suffix, *merge], result)


class BlockSparseSpec:
    """block_sparse_attention: the mask's block lists (torch: attention_glue.sparse_block_lists), then flash
    prefill in SPARSE mode over them (attention_prefill.block_sparse_prefill, as attention_glue calls it)."""

    def variants(self, node: Node, configs: Mapping[str, Any]) -> list[Variant]:
        from lmforge.backends.triton.attention_glue import claim_block_sparse

        if claim_block_sparse(node, {}) is None:   # one rule for what the kernel serves: the backend's claim
            raise Unservable("the Triton backend does not claim this block_sparse_attention node (block size not a "
                             "power of two >= 16, a negative scale, or q / k / v the kernel does not take)")
        t, d, dtype = _attention_types(node.inputs[:3])
        return [_sparse_variant(node, configs.get("attention_prefill"), t, d, dtype)]

    def call(self, node: Node, built: Mapping[str, Built], q, k, v, block_mask, *, block_size, scale=None,
             **_) -> Call | None:
        from lmforge.backends.triton import attention_prefill as ap
        from lmforge.backends.triton.attention_glue import sparse_block_lists

        try:
            ap.check_attention_inputs(q, k, v, "block_sparse_prefill")
        except LmforgeError:
            return None
        lists = sparse_block_lists(block_mask, q, k, block_size)
        if lists is None or (scale is not None and scale < 0):
            return None                     # the JIT backend runs the reference for these too
        return _flash_call("sparse", q, k, v, scale=scale, q_offset=None, window=None, sinks=0, return_lse=False,
                           lists=lists)


SPECS: dict[str, Any] = {"attention": AttentionSpec(), "block_topk_attention": BlockTopKSpec(),
                         "shared_prefix_attention": SharedPrefixSpec(), "block_sparse_attention": BlockSparseSpec()}
