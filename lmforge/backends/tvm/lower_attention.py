"""Attention lowered to TE: dense or causal, sliding window + sinks, decode over a KV cache, GQA, optional lse.

q [B, Hq, Sq, D], k [B, Hkv, Skv, D], v [B, Hkv, Skv, Dv]; query head h reads KV head h // (Hq / Hkv).
Query i sits at absolute position p = q_offset + i (q_offset defaults to Skv - Sq, so a decode step sees its
whole cache); key j is visible iff (not causal or j <= p) and (window is None or p - j < window or j < sinks)
(the semantics of lmforge.ir.ops.attention_ref). Rows that see no key give 0 and lse = -inf.

The computation, per (b, h, i) row, in stages the schedule keeps in a per-row scratch:

    part[j, l]  = sum_{d0} q[d0 * vec + l] * k[j, d0 * vec + l]      (the dot product in vec-lane partial sums)
    s[j]        = scale * sum_l part[j, l]       (the scale is applied where s is read)
    m           = max_{visible j} s[j]
    p[j]        = visible ? exp(s[j] - m) : 0;  l = sum_j p[j]
    acc[e]      = sum_j p[j] * v[j, e];  out[e] = l > 0 ? acc[e] / l : 0;  lse = l > 0 ? m + log(l) : -inf

With at least `tvm.attention.rows` queries (prefill) the tiled build runs instead (`attention_tiled_lowered`):
tiles of rows x keys with the rows as vector lanes, so a K / V row is read once per tile of queries; on this
host (AVX-512) it is ~3x the row kernel on a causal 8 x 1024 x 64 prefill (docs/benchmarks.md).

B, Sq and Skv are symbolic: one build serves every batch, prompt length and cache length. A symbolic
q_offset (e.g. "past") is passed at call time as a scalar argument.
"""
from __future__ import annotations

import math

import torch

from lmforge.backends.tvm.build import Lowered, OpKernel, ready
from lmforge.backends.tvm.fast_math import exp_f32
from lmforge.backends.tvm.knobs import largest_divisor
from lmforge.ir.graph import Node


def attention_lowered(hq: int, hkv: int, d: int, dv: int, *, causal: bool, scale: float, window, sinks: int,
                      q_offset, return_lse: bool, vec: int) -> Lowered:
    """TE of attention. `q_offset` is None (Skv - Sq), an int, or "dynamic" (a scalar argument)."""
    from tvm import te, tirx

    batch, sq, skv = te.var("batch"), te.var("sq"), te.var("skv")
    q = te.placeholder((batch, hq, sq, d), "float32", name="q")
    k = te.placeholder((batch, hkv, skv, d), "float32", name="k")
    v = te.placeholder((batch, hkv, skv, dv), "float32", name="v")
    scalars = []
    offset = _query_offset(q_offset, sq, skv, scalars)

    def visible(b, h, i, j):
        pos = offset + i
        conds = []
        if causal:
            conds.append(j <= pos)
        if window is not None:
            near = pos - j < window
            conds.append(tirx.Or(near, j < sinks) if sinks else near)
        if not conds:
            return None
        return conds[0] if len(conds) == 1 else tirx.And(conds[0], conds[1])

    outs = _softmax_stages(q, k, v, skv, lambda b, h, i, t: t, visible, scale=scale, return_lse=return_lse,
                           vec=vec)
    return Lowered("attention", [q, k, v], outs, scalars,
                   info={"d": d, "dv": dv, "lanes": largest_divisor(d, vec), "return_lse": return_lse})


def _query_offset(q_offset, sq, skv, scalars: list):
    """The position of query row 0: Skv - Sq (None), a constant, or ("dynamic") a scalar argument appended to
    `scalars`."""
    from tvm import te, tirx

    if q_offset == "dynamic":
        offset = te.var("q_offset")
        scalars.append(offset)
        return offset
    if q_offset is None:
        return skv - sq
    return tirx.const(int(q_offset), "int32")


def block_sparse_attention_lowered(hq: int, hkv: int, hm: int, d: int, dv: int, *, block_size: int, scale: float,
                                   vec: int) -> Lowered:
    """TE of causal attention over the key blocks listed per (batch, mask head, query block).

    Extra inputs: `blocks` int32 [B, Hm, nQ, maxk], the kept key blocks of each query block (ascending; padded),
    and `counts` int32 [B, Hm, nQ], how many of them are real. Row i of head h scans t in [0, maxk * bs):
    key j = blocks[b, h', i // bs, t // bs] * bs + t % bs, visible iff t // bs < counts and j <= offset + i and
    j < Skv, where h' = h (Hm = Hq) or h // (Hq / Hm). The work per row is maxk * bs keys instead of Skv.
    """
    from tvm import te, tirx

    batch, sq, skv = te.var("batch"), te.var("sq"), te.var("skv")
    nq, maxk = te.var("nq"), te.var("maxk")
    q = te.placeholder((batch, hq, sq, d), "float32", name="q")
    k = te.placeholder((batch, hkv, skv, d), "float32", name="k")
    v = te.placeholder((batch, hkv, skv, dv), "float32", name="v")
    blocks = te.placeholder((batch, hm, nq, maxk), "int32", name="blocks")
    counts = te.placeholder((batch, hm, nq), "int32", name="counts")
    offset = skv - sq
    mask_group = hq // hm

    def key_of(b, h, i, t):
        j = blocks[b, h // mask_group, i // block_size, t // block_size] * block_size + t % block_size
        return tirx.min(j, skv - 1)  # the tail of the last block reads a valid row; visible() drops it

    def visible(b, h, i, t):
        j = blocks[b, h // mask_group, i // block_size, t // block_size] * block_size + t % block_size
        real = t // block_size < counts[b, h // mask_group, i // block_size]
        return tirx.And(real, tirx.And(j <= offset + i, j < skv))

    outs = _softmax_stages(q, k, v, maxk * block_size, key_of, visible, scale=scale, return_lse=False, vec=vec,
                           visible_by_slot=True)
    return Lowered("attention", [q, k, v, blocks, counts], outs, [],
                   info={"d": d, "dv": dv, "lanes": largest_divisor(d, vec), "return_lse": False})


def _softmax_stages(q, k, v, n_keys, key_of, visible, *, scale: float, return_lse: bool, vec: int,
                    visible_by_slot: bool = False) -> list:
    """The stages of the module docstring over key slots t in [0, n_keys): slot t reads key row key_of(b, h, i, t)
    and counts iff visible(b, h, i, j) (j = key_of(...); or the slot t itself when visible_by_slot) holds."""
    from tvm import te, tirx

    batch, hq, sq, d = q.shape
    hkv, dv = k.shape[1], v.shape[3]
    group = hq // hkv
    lanes = largest_divisor(int(d), vec)
    d0 = te.reduce_axis((0, int(d) // lanes), "d0")
    part = te.compute((batch, hq, sq, n_keys, lanes), lambda b, h, i, t, l: te.sum(
        q[b, h, i, d0 * lanes + l] * k[b, h // group, key_of(b, h, i, t), d0 * lanes + l], axis=d0), name="part")
    lane = te.reduce_axis((0, lanes), "lane")
    dots = te.compute((batch, hq, sq, n_keys), lambda b, h, i, t: te.sum(part[b, h, i, t, lane], axis=lane),
                      name="scores")

    def s(b, h, i, t):
        return dots[b, h, i, t] * tirx.const(scale, "float32")

    def vis(b, h, i, t):
        return visible(b, h, i, t if visible_by_slot else key_of(b, h, i, t))

    lowest = tirx.min_value("float32")
    zero = tirx.const(0.0, "float32")
    jr = te.reduce_axis((0, n_keys), "jm")

    def masked(b, h, i, t):
        cond = vis(b, h, i, t)
        return s(b, h, i, t) if cond is None else tirx.Select(cond, s(b, h, i, t), lowest)

    mx = te.compute((batch, hq, sq), lambda b, h, i: te.max(masked(b, h, i, jr), axis=jr), name="row_max")

    def prob(b, h, i, t):
        e = exp_f32(s(b, h, i, t) - mx[b, h, i])
        cond = vis(b, h, i, t)
        return e if cond is None else tirx.Select(cond, e, zero)

    p = te.compute((batch, hq, sq, n_keys), prob, name="probs")
    js = te.reduce_axis((0, n_keys), "js")
    denom = te.compute((batch, hq, sq), lambda b, h, i: te.sum(p[b, h, i, js], axis=js), name="row_sum")
    jv = te.reduce_axis((0, n_keys), "jv")
    acc = te.compute((batch, hq, sq, dv), lambda b, h, i, e: te.sum(
        p[b, h, i, jv] * v[b, h // group, key_of(b, h, i, jv), e], axis=jv), name="acc")
    out = te.compute((batch, hq, sq, dv), lambda b, h, i, e: tirx.Select(
        denom[b, h, i] > zero, acc[b, h, i, e] / denom[b, h, i], zero), name="out")
    outs = [out]
    if return_lse:
        neg_inf = tirx.const(-math.inf, "float32")
        lse = te.compute((batch, hq, sq), lambda b, h, i: tirx.Select(
            denom[b, h, i] > zero, mx[b, h, i] + te.log(denom[b, h, i]), neg_inf), name="lse")
        outs.append(lse)
    return outs


class AttentionKernel(OpKernel):
    """attention(q, k, v; causal, scale, window, sinks, q_offset, return_lse) on fp32, without a mask input."""

    family = "attention"

    @staticmethod
    def supports(node: Node) -> bool:
        if len(node.inputs) > 3 and node.inputs[3] is not None:
            return False  # explicit masks stay with the reference
        q, k, v = node.inputs[:3]
        if any(t is None or t.type.dtype != "float32" or t.type.rank != 4 for t in (q, k, v)):
            return False
        fixed = (q.type.shape[1], k.type.shape[1], q.type.shape[3], k.type.shape[3], v.type.shape[3])
        if not all(isinstance(x, int) for x in fixed):
            return False
        hq, hkv, d, dk, _ = fixed
        return hq % hkv == 0 and d == dk and k.type.shape[1] == v.type.shape[1]

    def __init__(self, node, knobs, cache, target):
        super().__init__(node, knobs, cache, target)
        q, k, v = node.inputs[:3]
        self.hq, self.hkv, self.d = q.type.shape[1], k.type.shape[1], q.type.shape[3]
        self.dv = v.type.shape[3]
        a = self.attrs
        self.scale = float(a["scale"]) if a["scale"] is not None else 1.0 / math.sqrt(self.d)
        off = a["q_offset"]
        masked = a["causal"] or a["window"] is not None
        self.offset_mode = None if (off is None or not masked) else ("dynamic" if isinstance(off, str) else int(off))
        self.return_lse = bool(a["return_lse"])

    def key(self):
        a = self.attrs
        return ("attention", self.hq, self.hkv, self.d, self.dv, bool(a["causal"]), self.scale, a["window"],
                int(a["sinks"]), self.offset_mode, self.return_lse)

    def lower(self, variant) -> Lowered:
        a = self.attrs
        common = dict(causal=bool(a["causal"]), scale=self.scale, window=a["window"], sinks=int(a["sinks"]),
                      q_offset=self.offset_mode, return_lse=self.return_lse)
        if variant == "tiled":
            return attention_tiled_lowered(self.hq, self.hkv, self.d, self.dv, rows=self.rows, keys=self.keys,
                                           **common)
        return attention_lowered(self.hq, self.hkv, self.d, self.dv, vec=int(self.knobs["tvm.attention.vec"]),
                                 **common)

    @property
    def rows(self) -> int:
        return int(self.knobs["tvm.attention.rows"])

    @property
    def keys(self) -> int:
        return int(self.knobs["tvm.attention.keys"])

    def describe(self) -> str:
        a = self.attrs
        mode = "causal" if a["causal"] else "dense"
        if a["window"] is not None:
            mode += f" window={a['window']} sinks={a['sinks']}"
        tiles = f", {self.rows}x{self.keys} tiles from {self.rows} queries" if self.rows > 1 else ""
        return f"attention {mode} Hq={self.hq} Hkv={self.hkv} D={self.d}{tiles}"

    def __call__(self, q, k, v, mask=None, **attrs):
        if mask is None and self.rows > 1 and q.shape[2] >= self.rows:
            fn = self.fn("tiled")
            if fn is not None:
                return self._tiled(fn, q, k, v, attrs)
        fn = self._main or self.main()
        if fn is False or mask is not None:
            return self.run_reference(q, k, v, mask, **attrs)
        b, _, sq, _ = q.shape
        out = self.empty((b, self.hq, sq, self.dv))
        args = [ready(q), ready(k), ready(v)]
        if self.offset_mode == "dynamic":
            args.append(int(attrs["q_offset"]))
        if self.return_lse:
            lse = self.empty((b, self.hq, sq), slot=1)
            fn(*args, out, lse)
            return out, lse
        fn(*args, out)
        return out


    def _tiled(self, fn, q, k, v, attrs):
        """The tiled build: q padded to whole tiles of rows, k / v to whole tiles of keys (views when they divide);
        the real lengths go in as scalars; the outputs are cut back to the real rows."""
        b, _, sq, _ = q.shape
        tq, tk, tv, nq = _tiles(q, k, v, self.rows, self.keys)
        args = [tq, tk, tv, sq, k.shape[2]]
        if self.offset_mode == "dynamic":
            args.append(int(attrs["q_offset"]))
        outs = [self.empty((b, self.hq, nq, self.rows, self.dv))]
        if self.return_lse:
            outs.append(self.empty((b, self.hq, nq, self.rows), slot=1))
        fn(*args, *outs)
        cut = [_untile(o, sq) for o in outs]
        return tuple(cut) if self.return_lse else cut[0]


def _tiles(q, k, v, rows: int, keys: int):
    """q [B, H, Sq, D] as [B, H, nQ, rows, D] and k / v as [B, Hkv, nK, keys, D] (zero rows padded where the tile
    does not divide; views otherwise), and nQ."""
    (qp, nq), (kp, nk), (vp, _) = _padded(q, rows), _padded(k, keys), _padded(v, keys)
    return (qp.view(*q.shape[:2], nq, rows, q.shape[3]), kp.view(*k.shape[:2], nk, keys, k.shape[3]),
            vp.view(*v.shape[:2], nk, keys, v.shape[3]), nq)


def _untile(out: torch.Tensor, sq: int) -> torch.Tensor:
    """A tiled output [B, H, nQ, rows, ...] as [B, H, Sq, ...]: a view when no row was padded, else a copy."""
    b, h, nq, rows = out.shape[:4]
    cut = out.view(b, h, nq * rows, *out.shape[4:])[:, :, :sq]
    return cut if nq * rows == sq else cut.contiguous()


def _padded(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, int]:
    """x [B, H, S, D] with S padded by zero rows to a multiple (aligned for TVM), and the number of tiles."""
    n = -(-x.shape[2] // multiple)
    if n * multiple == x.shape[2]:
        return ready(x), n
    out = torch.zeros((*x.shape[:2], n * multiple, x.shape[3]), dtype=x.dtype)
    out[:, :, :x.shape[2]] = x
    return out, n


class BlockSparseAttentionKernel(OpKernel):
    """block_sparse_attention(q, k, v, block_mask; block_size, scale) on fp32: the boolean block mask becomes
    per-query-block lists of kept key blocks (on the torch side, per call), and the kernel visits only those."""

    family = "attention"

    @staticmethod
    def supports(node: Node) -> bool:
        q, k, v, mask = node.inputs
        if any(t is None or t.type.dtype != "float32" or t.type.rank != 4 for t in (q, k, v)):
            return False
        fixed = (q.type.shape[1], k.type.shape[1], q.type.shape[3], k.type.shape[3], v.type.shape[3],
                 mask.type.shape[1])
        if not all(isinstance(x, int) for x in fixed) or mask.type.dtype != "bool":
            return False
        hq, hkv, d, dk, _, hm = fixed
        return hq % hkv == 0 and d == dk and hm in (hq, hkv)

    def __init__(self, node, knobs, cache, target):
        super().__init__(node, knobs, cache, target)
        q, k, v, mask = node.inputs
        self.hq, self.hkv, self.d = q.type.shape[1], k.type.shape[1], q.type.shape[3]
        self.dv, self.hm = v.type.shape[3], mask.type.shape[1]
        self.block_size = int(self.attrs["block_size"])
        scale = self.attrs["scale"]
        self.scale = float(scale) if scale is not None else 1.0 / math.sqrt(self.d)

    def key(self):
        return ("block_sparse_attention", self.hq, self.hkv, self.hm, self.d, self.dv, self.block_size, self.scale)

    def lower(self, variant) -> Lowered:
        if variant == "tiled":
            return block_sparse_tiled_lowered(self.hq, self.hkv, self.hm, self.d, self.dv, block_size=self.block_size,
                                              scale=self.scale, rows=self.rows, keys=self.keys)
        return block_sparse_attention_lowered(self.hq, self.hkv, self.hm, self.d, self.dv, block_size=self.block_size,
                                              scale=self.scale, vec=int(self.knobs["tvm.attention.vec"]))

    @property
    def rows(self) -> int:
        """Query rows per tile, or 1 (one row at a time) when the knob's tile does not divide the block size."""
        rows = int(self.knobs["tvm.attention.rows"])
        return rows if rows > 1 and self.block_size % rows == 0 and self.block_size % self.keys == 0 else 1

    @property
    def keys(self) -> int:
        return int(self.knobs["tvm.attention.keys"])

    def describe(self) -> str:
        tiles = f", {self.rows}x{self.keys} tiles" if self.rows > 1 else ""
        return f"block-sparse attention bs={self.block_size} Hq={self.hq} Hkv={self.hkv} D={self.d}{tiles}"

    @staticmethod
    def block_lists(mask: torch.Tensor):
        """Bool [B, Hm, nQ, nK] -> (blocks int32 [B, Hm, nQ, maxk] ascending, padded; counts int32 [B, Hm, nQ])."""
        counts = mask.sum(-1, dtype=torch.int32)
        maxk = max(1, int(counts.max())) if counts.numel() else 1
        # a stable sort of ~mask puts the kept blocks first, in ascending order
        blocks = torch.sort((~mask).to(torch.uint8), dim=-1, stable=True).indices[..., :maxk]
        return blocks.to(torch.int32).contiguous(), counts.contiguous()

    def __call__(self, q, k, v, block_mask, **attrs):
        fn = self._main or self.main()
        if fn is False:
            return self.run_reference(q, k, v, block_mask, **attrs)
        b, _, sq, _ = q.shape
        if block_mask.shape[0] != b or block_mask.dtype != torch.bool:
            return self.run_reference(q, k, v, block_mask, **attrs)  # a broadcast mask: not this kernel's layout
        blocks, counts = self.block_lists(block_mask)
        if self.rows > 1 and sq >= self.rows:
            tiled = self.fn("tiled")
            if tiled is not None:
                tq, tk, tv, nq = _tiles(q, k, v, self.rows, self.keys)
                out = self.empty((b, self.hq, nq, self.rows, self.dv))
                tiled(tq, tk, tv, blocks, counts, sq, k.shape[2], out)
                return _untile(out, sq)
        out = self.empty((b, self.hq, sq, self.dv))
        fn(ready(q), ready(k), ready(v), blocks, counts, out)
        return out


def attention_tiled_lowered(hq: int, hkv: int, d: int, dv: int, *, causal: bool, scale: float, window, sinks: int,
                            q_offset, return_lse: bool, rows: int, keys: int) -> Lowered:
    """TE of attention in tiles of `rows` queries x `keys` keys, for prefill (many query rows).

    The caller pads and views: q as [B, Hq, nQ, rows, D], k / v as [B, Hkv, nK, keys, D]; `sq` and `skv`, the real
    query and key counts, are scalar arguments (padded keys are invisible; padded query rows get positions past
    the real ones and are dropped by the caller). The stages are `_tiled_stages`'.
    """
    from tvm import te, tirx

    batch, nq, nk, sq, skv = te.var("batch"), te.var("nq"), te.var("nk"), te.var("sq"), te.var("skv")
    q = te.placeholder((batch, hq, nq, rows, d), "float32", name="q")
    k = te.placeholder((batch, hkv, nk, keys, d), "float32", name="k")
    v = te.placeholder((batch, hkv, nk, keys, dv), "float32", name="v")
    scalars = [sq, skv]
    offset = _query_offset(q_offset, sq, skv, scalars)

    def visible(b, h, iq, r, jk, jj):
        pos, j = offset + iq * rows + r, jk * keys + jj
        cond = j < skv
        if causal:
            cond = tirx.And(cond, j <= pos)
        if window is not None:
            near = pos - j < window
            cond = tirx.And(cond, tirx.Or(near, j < sinks) if sinks else near)
        return cond

    outs = _tiled_stages(q, k, v, nk, lambda b, h, iq, t: t, visible, scale=scale, return_lse=return_lse)
    return Lowered("attention_tiled", [q, k, v], outs, scalars,
                   info={"d": d, "dv": dv, "rows": rows, "keys": keys, "return_lse": return_lse})


def block_sparse_tiled_lowered(hq: int, hkv: int, hm: int, d: int, dv: int, *, block_size: int, scale: float,
                               rows: int, keys: int) -> Lowered:
    """block_sparse_attention_lowered in tiles (`_tiled_stages`): a tile of `rows` queries (inside one query block:
    rows divides block_size) scans the key tiles of its query block's kept key blocks, maxk * block_size / keys
    of them (keys divides block_size). q, k, v come padded and viewed as for attention_tiled_lowered."""
    from tvm import te, tirx

    batch, nq, nk, sq, skv = te.var("batch"), te.var("nq"), te.var("nk"), te.var("sq"), te.var("skv")
    nqb, maxk = te.var("nqb"), te.var("maxk")
    q = te.placeholder((batch, hq, nq, rows, d), "float32", name="q")
    k = te.placeholder((batch, hkv, nk, keys, d), "float32", name="k")
    v = te.placeholder((batch, hkv, nk, keys, dv), "float32", name="v")
    blocks = te.placeholder((batch, hm, nqb, maxk), "int32", name="blocks")
    counts = te.placeholder((batch, hm, nqb), "int32", name="counts")
    offset = skv - sq
    mask_group, per_block, qtiles = hq // hm, block_size // keys, block_size // rows

    def key_tile(b, h, iq, t):   # slot t of the tile's scan -> the key tile it reads
        kept = blocks[b, h // mask_group, iq // qtiles, t // per_block]
        return tirx.min(kept * per_block + t % per_block, nk - 1)

    def visible(b, h, iq, r, t, jj):
        kept = blocks[b, h // mask_group, iq // qtiles, t // per_block]
        j = kept * block_size + (t % per_block) * keys + jj
        real = t // per_block < counts[b, h // mask_group, iq // qtiles]
        return tirx.And(real, tirx.And(j <= offset + iq * rows + r, j < skv))

    outs = _tiled_stages(q, k, v, maxk * per_block, key_tile, visible, scale=scale, return_lse=False)
    return Lowered("attention_tiled", [q, k, v, blocks, counts], outs, [sq, skv],
                   info={"d": d, "dv": dv, "rows": rows, "keys": keys, "return_lse": False})


def _tiled_stages(q, k, v, n_tiles, key_tile, visible, *, scale: float, return_lse: bool) -> list:
    """Per (b, h, query tile), over key-tile slots t in [0, n_tiles) (slot t reads key tile key_tile(b, h, iq, t);
    key jj of it counts iff visible(b, h, iq, r, t, jj)), with the tile's rows as vector lanes:

        qT[d, r]      = scale * q[r, d]                                   (the tile transposed, in scratch)
        s[t, jj, r]   = sum_d k[tile(t), jj, d] * qT[d, r]     keys x rows accumulators in registers per slot
        m[r], p[t, jj, r], l[r]                                as in the row kernel, over the visible keys
        acc[r, e]     = sum_{t, jj} p[t, jj, r] * v[tile(t), jj, e]       rows x value lanes in registers

    so every K and V row is read once per tile of rows instead of once per row."""
    from tvm import te, tirx

    batch, hq, nq, rows, d = q.shape
    hkv, keys, dv = k.shape[1], k.shape[3], v.shape[4]
    group = hq // hkv
    qt = te.compute((batch, hq, nq, d, rows), lambda b, h, iq, c, r: q[b, h, iq, r, c] * tirx.const(scale, "float32"),
                    name="q_t")
    dd = te.reduce_axis((0, d), "dd")
    s = te.compute((batch, hq, nq, n_tiles, keys, rows), lambda b, h, iq, t, jj, r: te.sum(
        k[b, h // group, key_tile(b, h, iq, t), jj, dd] * qt[b, h, iq, dd, r], axis=dd), name="scores")
    lowest, zero = tirx.min_value("float32"), tirx.const(0.0, "float32")
    mk, mj = te.reduce_axis((0, n_tiles), "mk"), te.reduce_axis((0, keys), "mj")
    mx = te.compute((batch, hq, nq, rows), lambda b, h, iq, r: te.max(
        tirx.Select(visible(b, h, iq, r, mk, mj), s[b, h, iq, mk, mj, r], lowest), axis=[mk, mj]), name="row_max")
    p = te.compute((batch, hq, nq, n_tiles, keys, rows), lambda b, h, iq, t, jj, r: tirx.Select(
        visible(b, h, iq, r, t, jj), exp_f32(s[b, h, iq, t, jj, r] - mx[b, h, iq, r]), zero), name="probs")
    sk, sj = te.reduce_axis((0, n_tiles), "sk"), te.reduce_axis((0, keys), "sj")
    denom = te.compute((batch, hq, nq, rows), lambda b, h, iq, r: te.sum(p[b, h, iq, sk, sj, r], axis=[sk, sj]),
                       name="row_sum")
    vk, vj = te.reduce_axis((0, n_tiles), "vk"), te.reduce_axis((0, keys), "vj")
    acc = te.compute((batch, hq, nq, rows, dv), lambda b, h, iq, r, e: te.sum(
        p[b, h, iq, vk, vj, r] * v[b, h // group, key_tile(b, h, iq, vk), vj, e], axis=[vk, vj]), name="acc")
    out = te.compute((batch, hq, nq, rows, dv), lambda b, h, iq, r, e: tirx.Select(
        denom[b, h, iq, r] > zero, acc[b, h, iq, r, e] / denom[b, h, iq, r], zero), name="out")
    outs = [out]
    if return_lse:
        neg_inf = tirx.const(-math.inf, "float32")
        outs.append(te.compute((batch, hq, nq, rows), lambda b, h, iq, r: tirx.Select(
            denom[b, h, iq, r] > zero, mx[b, h, iq, r] + te.log(denom[b, h, iq, r]), neg_inf), name="lse"))
    return outs
