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

With at least `tvm.attention.rows` queries (prefill) the tiled builds run instead (`attention_tiled_lowered`):
tiles of rows x keys with the rows as vector lanes, so a K / V row is read once per tile of queries. A causal
prefill runs in chunks of CHUNK_QUERIES queries, each scanning only the key tiles up to its last query; causal
attention with a window scans, per query tile, the sink tiles and the tiles its window reaches, and a decode
step with a window over a longer cache reads sinks + window keys per row (the "window" row build): what the
sliding-window pass saves in FLOPs, these builds save in time. On this host (AVX-512, 8 x 1024 x 64, one
thread) dense causal prefill is ~1.3x SDPA, a window of 256 + 4 sinks ~2.4x (docs/benchmarks.md).

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
                      q_offset, return_lse: bool, vec: int, windowed: bool = False) -> Lowered:
    """TE of attention. `q_offset` is None (Skv - Sq), an int, or "dynamic" (a scalar argument).

    windowed (causal with a window; for caches longer than sinks + window): row i scans sinks + window key slots,
    the sinks then keys p - window + 1 .. p, instead of all Skv keys (a decode step over a long cache reads only
    what its window sees)."""
    from tvm import te, tirx

    batch, sq, skv = te.var("batch"), te.var("sq"), te.var("skv")
    q = te.placeholder((batch, hq, sq, d), "float32", name="q")
    k = te.placeholder((batch, hkv, skv, d), "float32", name="k")
    v = te.placeholder((batch, hkv, skv, dv), "float32", name="v")
    scalars = []
    offset = _query_offset(q_offset, sq, skv, scalars)
    info = {"d": d, "dv": dv, "lanes": largest_divisor(d, vec), "return_lse": return_lse}

    if windowed:
        def unclamped(i, t):    # the key of slot t: sink t, or the window's (t - sinks)-th key
            near = offset + i - window + 1 + t - sinks
            return tirx.Select(t < sinks, t, near) if sinks else near

        def slot_visible(b, h, i, t):
            j = unclamped(i, t)
            own = tirx.Select(t < sinks, j <= offset + i, j >= sinks) if sinks else j >= 0
            return tirx.And(tirx.And(j >= 0, j < skv), own)

        outs = _softmax_stages(q, k, v, sinks + window,
                               lambda b, h, i, t: tirx.max(tirx.min(unclamped(i, t), skv - 1), 0), slot_visible,
                               scale=scale, return_lse=return_lse, vec=vec, visible_by_slot=True)
        return Lowered("attention", [q, k, v], outs, scalars, info=info)

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
    return Lowered("attention", [q, k, v], outs, scalars, info=info)


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
        """Variants: 0 (row kernel), "window" (row kernel over the window's keys), "tiled" (scan build),
        "tiled_window" (windowed tiled build)."""
        a = self.attrs
        common = dict(causal=bool(a["causal"]), scale=self.scale, window=a["window"], sinks=int(a["sinks"]),
                      return_lse=self.return_lse)
        if variant in ("tiled", "tiled_window"):
            return attention_tiled_lowered(self.hq, self.hkv, self.d, self.dv, rows=self.rows, keys=self.keys,
                                           windowed=variant == "tiled_window", **common)
        return attention_lowered(self.hq, self.hkv, self.d, self.dv, vec=int(self.knobs["tvm.attention.vec"]),
                                 q_offset=self.offset_mode, windowed=variant == "window", **common)

    @property
    def rows(self) -> int:
        return int(self.knobs["tvm.attention.rows"])

    @property
    def keys(self) -> int:
        return int(self.knobs["tvm.attention.keys"])

    @property
    def windowed(self) -> bool:
        """Causal with a window: the builds that scan only the window (and the sinks) apply."""
        return bool(self.attrs["causal"]) and self.attrs["window"] is not None

    def describe(self) -> str:
        a = self.attrs
        mode = "causal" if a["causal"] else "dense"
        if a["window"] is not None:
            mode += f" window={a['window']} sinks={a['sinks']}"
        tiles = f", {self.rows}x{self.keys} tiles from {self.rows} queries" if self.rows > 1 else ""
        return f"attention {mode} Hq={self.hq} Hkv={self.hkv} D={self.d}{tiles}"

    def __call__(self, q, k, v, mask=None, **attrs):
        if mask is None and self.rows > 1 and q.shape[2] >= self.rows:
            out = self._tiled(q, k, v, attrs)
            if out is not None:
                return out
        fn = None
        slots = self.attrs["window"] + int(self.attrs["sinks"]) if self.windowed else 0
        if mask is None and self.windowed and k.shape[2] > slots >= 2:   # (one slot: no reduction loop to schedule)
            fn = self.fn("window")
        fn = fn or self._main or self.main()
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

    def _offset(self, sq: int, skv: int, attrs) -> int:
        """The position of query row 0 for this call (the q_offset attribute, evaluated)."""
        if self.offset_mode is None:
            return skv - sq
        return int(attrs["q_offset"]) if self.offset_mode == "dynamic" else self.offset_mode

    def _tiled(self, q, k, v, attrs):
        """The tiled builds (None if they failed to build): q padded to whole tiles of rows, k / v to whole tiles
        of keys (views when they divide); the outputs cut back to the real rows. Causal attention runs in chunks
        of CHUNK_QUERIES queries, each scanning only the key tiles up to its last query (about half the work of
        scanning all of them); causal with a window runs the windowed build when it scans fewer key tiles."""
        b, _, sq, _ = q.shape
        rows, keys, skv = self.rows, self.keys, k.shape[2]
        offset = self._offset(sq, skv, attrs)
        tq, tk, tv, nq = _tiles(q, k, v, rows, keys)
        nk = tk.shape[2]

        def seen(last_tile: int) -> int:    # key tiles that query tiles 0 .. last_tile can see (at least one)
            if not self.attrs["causal"]:
                return nk
            return max(1, min(nk, (offset + (last_tile + 1) * rows - 1) // keys + 1))

        step = max(1, CHUNK_QUERIES // rows) if self.attrs["causal"] else nq
        chunks = [(t0, min(step, nq - t0)) for t0 in range(0, nq, step)]
        plan = [("tiled", t0, n, seen(t0 + n - 1)) for t0, n in chunks]
        if self.windowed:
            slots = -(-int(self.attrs["sinks"]) // keys) + (self.attrs["window"] + rows - 2) // keys + 2
            if nq * slots < sum(n * scan for *_, n, scan in plan):
                plan = [("tiled_window", 0, nq, None)]
        fns = {variant: self.fn(variant) for variant, *_ in plan}
        if None in fns.values():
            return None
        outs = [self.empty((b, self.hq, nq, rows, self.dv))]
        if self.return_lse:
            outs.append(self.empty((b, self.hq, nq, rows), slot=1))
        _run_chunks(fns, plan, lambda t0, scan: (tq, tk, tv, sq, skv, offset, t0, *([] if scan is None else [scan])),
                    outs)
        cut = [_untile(o, sq) for o in outs]
        return tuple(cut) if self.return_lse else cut[0]


def _run_chunks(fns: dict, plan: list, args, outs: list) -> None:
    """Run a plan of (variant, first query tile, tiles, key tiles scanned) calls of tiled builds into `outs`
    ([B, H, nQ, rows, ...]): a call over all nQ tiles writes them in place, a chunk a fresh buffer copied in.
    `args(t0, scan)` gives a call's inputs and scalars."""
    nq = outs[0].shape[2]
    for variant, t0, n, scan in plan:
        part = outs if n == nq else [torch.empty((*o.shape[:2], n, *o.shape[3:]), dtype=o.dtype) for o in outs]
        fns[variant](*args(t0, scan), *part)
        if part is not outs:
            for o, p in zip(outs, part):
                o[:, :, t0:t0 + n] = p


CHUNK_QUERIES = 64  # queries per call of a causal prefill (each call scans the key tiles up to its last query):
# on this host (8 x 1024 x 64, 1 thread) chunks of 32-128 queries take ~0.6x the time of one call over all


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
        if variant == "tiled_head":   # one mask head: its hq / hm query heads over one KV head
            return block_sparse_tiled_lowered(self.hq // self.hm, 1, 1, self.d, self.dv, block_size=self.block_size,
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
                per_block, qtiles = self.block_size // self.keys, self.block_size // self.rows
                step = max(1, CHUNK_QUERIES // self.rows)
                for t0 in range(0, nq, step):   # chunks of query tiles, each scanning what its query blocks keep
                    n = min(step, nq - t0)
                    kept = counts[:, :, t0 // qtiles:(t0 + n - 1) // qtiles + 1].amax(-1)    # [B, Hm]
                    top = max(1, int(kept.max()))
                    if int(kept.min()) * 4 < top * 3 and self.fn("tiled_head") is not None:
                        self._per_head(tq, tk, tv, blocks, counts, out, sq, k.shape[2], t0, n, kept, per_block)
                    else:
                        _run_chunks({"tiled": tiled}, [("tiled", t0, n, per_block * top)],
                                    lambda t0_, scan: (tq, tk, tv, blocks, counts, sq, k.shape[2], t0_, scan), [out])
                return _untile(out, sq)
        out = self.empty((b, self.hq, sq, self.dv))
        fn(ready(q), ready(k), ready(v), blocks, counts, out)
        return out


    def _per_head(self, tq, tk, tv, blocks, counts, out, sq, skv, t0, n, kept, per_block) -> None:
        """Query tiles t0 .. t0 + n - 1, one call per (batch row, mask head), each scanning its own kept blocks:
        FlexPrefill's heads keep very different numbers of blocks (query-aware vs vertical-slash), and one call
        for all heads scans the most any head keeps. Slices of the leading dims are contiguous, so no copies
        but the outputs'."""
        fn, qh = self.fn("tiled_head"), self.hq // self.hm
        group = self.hq // self.hkv
        for bi in range(tq.shape[0]):
            for j in range(self.hm):
                kv = j * qh // group
                part = torch.empty((1, qh, n, *out.shape[3:]), dtype=out.dtype)
                fn(ready(tq[bi:bi + 1, j * qh:(j + 1) * qh]), ready(tk[bi:bi + 1, kv:kv + 1]),
                   ready(tv[bi:bi + 1, kv:kv + 1]), ready(blocks[bi:bi + 1, j:j + 1]),
                   ready(counts[bi:bi + 1, j:j + 1]), sq, skv, t0, max(1, per_block * int(kept[bi, j])), part)
                out[bi:bi + 1, j * qh:(j + 1) * qh, t0:t0 + n] = part


def attention_tiled_lowered(hq: int, hkv: int, d: int, dv: int, *, causal: bool, scale: float, window, sinks: int,
                            return_lse: bool, rows: int, keys: int, windowed: bool = False) -> Lowered:
    """TE of attention in tiles of `rows` queries x `keys` keys, for prefill (many query rows).

    The caller pads and views: q as [B, Hq, nQ, rows, D], k / v as [B, Hkv, nK, keys, D]. Scalar arguments: `sq`
    and `skv`, the real query and key counts (padded keys are invisible; padded query rows get positions past the
    real ones and are dropped by the caller), `q_offset`, the position of query row 0, and `tile0`: a call
    computes the nOut query tiles tile0 .. tile0 + nOut - 1 (its outputs are [B, Hq, nOut, rows, ...]), so the
    caller can cut a causal prefill into chunks of query tiles that each scan only the keys they can see.

    Which key tiles a query tile scans (`_tiled_stages` runs the same stages over them):
      - scan build: key tiles 0 .. n_scan - 1 (`n_scan` a scalar argument: nK, or fewer for a causal chunk);
      - windowed build (causal with a window): ceil(sinks / keys) sink tiles, then the (window + rows - 2) // keys
        + 2 tiles its window can reach, starting at the tile of key p0 - window + 1 (p0: the tile's first
        position). The work is O(Sq (window + sinks)) instead of O(Sq Skv); a key is counted by one slot only
        (sink slots count keys < sinks, window slots keys >= sinks).
    """
    from tvm import te, tirx

    batch, nq, nk, n_out = te.var("batch"), te.var("nq"), te.var("nk"), te.var("n_out")
    sq, skv, offset, tile0, n_scan = (te.var(n) for n in ("sq", "skv", "q_offset", "tile0", "n_scan"))
    q = te.placeholder((batch, hq, nq, rows, d), "float32", name="q")
    k = te.placeholder((batch, hkv, nk, keys, d), "float32", name="k")
    v = te.placeholder((batch, hkv, nk, keys, dv), "float32", name="v")

    def position(iq, r):
        return offset + (tile0 + iq) * rows + r

    if windowed:
        sink_tiles = -(-sinks // keys)

        def unclamped(iq, t):   # the key tile of slot t, possibly outside [0, nK): such slots see nothing
            first = tirx.floordiv(position(iq, 0) - window + 1, keys) + t - sink_tiles
            return tirx.Select(t < sink_tiles, t, first) if sink_tiles else first

        def key_tile(b, h, iq, t):
            return tirx.max(tirx.min(unclamped(iq, t), nk - 1), 0)

        def visible(b, h, iq, r, t, jj):
            pos, j = position(iq, r), unclamped(iq, t) * keys + jj
            near = tirx.And(j >= sinks, pos - j < window)
            own = tirx.Select(t < sink_tiles, j < sinks, near) if sink_tiles else near
            return tirx.And(tirx.And(j >= 0, j < skv), tirx.And(j <= pos, own))

        n_tiles, scalars = sink_tiles + (window + rows - 2) // keys + 2, [sq, skv, offset, tile0]
    else:
        def key_tile(b, h, iq, t):
            return t

        def visible(b, h, iq, r, jk, jj):
            pos, j = position(iq, r), jk * keys + jj
            cond = j < skv
            if causal:
                cond = tirx.And(cond, j <= pos)
            if window is not None:
                near = pos - j < window
                cond = tirx.And(cond, tirx.Or(near, j < sinks) if sinks else near)
            return cond

        n_tiles, scalars = n_scan, [sq, skv, offset, tile0, n_scan]

    outs = _tiled_stages(q, k, v, n_out, tile0, n_tiles, key_tile, visible, scale=scale, return_lse=return_lse)
    return Lowered("attention_tiled", [q, k, v], outs, scalars,
                   info={"d": d, "dv": dv, "rows": rows, "keys": keys, "return_lse": return_lse})


def block_sparse_tiled_lowered(hq: int, hkv: int, hm: int, d: int, dv: int, *, block_size: int, scale: float,
                               rows: int, keys: int) -> Lowered:
    """block_sparse_attention_lowered in tiles (`_tiled_stages`): a tile of `rows` queries (inside one query block:
    rows divides block_size) scans the key tiles of its query block's kept key blocks (keys divides block_size):
    n_scan of them, a scalar argument of at most maxk * block_size / keys. q, k, v come padded and viewed as for
    attention_tiled_lowered; a call computes query tiles tile0 .. tile0 + nOut - 1, so the caller can run chunks
    of query tiles that each scan only as many slots as their query blocks keep."""
    from tvm import te, tirx

    batch, nq, nk, sq, skv = te.var("batch"), te.var("nq"), te.var("nk"), te.var("sq"), te.var("skv")
    nqb, maxk, n_out, tile0, n_scan = (te.var(n) for n in ("nqb", "maxk", "n_out", "tile0", "n_scan"))
    q = te.placeholder((batch, hq, nq, rows, d), "float32", name="q")
    k = te.placeholder((batch, hkv, nk, keys, d), "float32", name="k")
    v = te.placeholder((batch, hkv, nk, keys, dv), "float32", name="v")
    blocks = te.placeholder((batch, hm, nqb, maxk), "int32", name="blocks")
    counts = te.placeholder((batch, hm, nqb), "int32", name="counts")
    offset = skv - sq
    mask_group, per_block, qtiles = hq // hm, block_size // keys, block_size // rows

    def kept(b, h, iq, t):       # the key block of slot t
        return blocks[b, h // mask_group, (tile0 + iq) // qtiles, tirx.min(t // per_block, maxk - 1)]

    def key_tile(b, h, iq, t):   # slot t of the tile's scan -> the key tile it reads
        return tirx.min(kept(b, h, iq, t) * per_block + t % per_block, nk - 1)

    def visible(b, h, iq, r, t, jj):
        j = kept(b, h, iq, t) * block_size + (t % per_block) * keys + jj
        real = t // per_block < counts[b, h // mask_group, (tile0 + iq) // qtiles]
        return tirx.And(real, tirx.And(j <= offset + (tile0 + iq) * rows + r, j < skv))

    outs = _tiled_stages(q, k, v, n_out, tile0, n_scan, key_tile, visible, scale=scale, return_lse=False)
    return Lowered("attention_tiled", [q, k, v, blocks, counts], outs, [sq, skv, tile0, n_scan],
                   info={"d": d, "dv": dv, "rows": rows, "keys": keys, "return_lse": False})


def _tiled_stages(q, k, v, n_out, tile0, n_tiles, key_tile, visible, *, scale: float, return_lse: bool) -> list:
    """Per (b, h, query tile iq in [0, n_out): q's tile tile0 + iq), over key-tile slots t in [0, n_tiles) (slot t
    reads key tile key_tile(b, h, iq, t); key jj of it counts iff visible(b, h, iq, r, t, jj)), with the tile's rows
    as vector lanes:

        qT[d, r]      = scale * q[r, d]                                   (the tile transposed, in scratch)
        s[t, jj, r]   = sum_d k[tile(t), jj, d] * qT[d, r]     keys x rows accumulators in registers per slot
        m[r], p[t, jj, r], l[r]                                as in the row kernel, over the visible keys
        acc[r, e]     = sum_{t, jj} p[t, jj, r] * v[tile(t), jj, e]       rows x value lanes in registers

    so every K and V row is read once per tile of rows instead of once per row."""
    from tvm import te, tirx

    batch, hq, _, rows, d = q.shape
    hkv, keys, dv = k.shape[1], k.shape[3], v.shape[4]
    group, nq = hq // hkv, n_out
    qt = te.compute((batch, hq, nq, d, rows), lambda b, h, iq, c, r: q[b, h, tile0 + iq, r, c] *
                    tirx.const(scale, "float32"), name="q_t")
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
