"""Row-wise ops lowered to TE: rmsnorm, softmax (last axis), rope, embedding.

Each works on rows of a static-length last axis with a symbolic number of rows, so one build serves every
batch / sequence length:

    rmsnorm    x [rows, H]:  part[l] = sum_h0 x[h0 * vec + l]^2;  inv = 1 / sqrt(sum_l part[l] / H + eps)
               out = x * inv * w                     (eps None -> torch.finfo(float32).eps, as F.rms_norm)
    softmax    x [rows, n]:  m = max x; e = exp(x - m); out = e / sum e   (log: x - m - log(sum e))
    rope       out = x * cos + rotate_half(x) * sin, broadcast like elementwise ops; rotate_half(x)[d] =
               -x[d + D/2] for d < D/2, x[d - D/2] after, read as sign(d) * x[(d + D/2) % D] (always in bounds)
    embedding  out[i, :] = weight[ids[i], :]; an id outside [0, V) gives a row of NaN (no out-of-bounds read)
"""
from __future__ import annotations

import torch

from lmforge.backends.tvm.build import Lowered, OpKernel, ready
from lmforge.backends.tvm.fast_math import exp_f32
from lmforge.backends.tvm.knobs import largest_divisor
from lmforge.backends.tvm.lower_elementwise import BroadcastTE, broadcast_plan, out_shape_source
from lmforge.ir.graph import Node

F32_EPS = float(torch.finfo(torch.float32).eps)


def _f32(v) -> bool:
    return v is not None and v.type.dtype == "float32"


def _lead_vars(rank: int) -> list:
    from tvm import te

    return [te.var(f"r{i}") for i in range(rank)]


def rmsnorm_lowered(lead: int, hidden: int, eps: float, has_weight: bool, vec: int) -> Lowered:
    """x [*rows, H] with `lead` symbolic leading axes."""
    from tvm import te, tirx

    rows = _lead_vars(lead)
    x = te.placeholder((*rows, hidden), "float32", name="x")
    lanes = largest_divisor(hidden, vec)
    h0 = te.reduce_axis((0, hidden // lanes), "h0")
    part = te.compute((*rows, lanes), lambda *i: te.sum(
        x[(*i[:-1], h0 * lanes + i[-1])] * x[(*i[:-1], h0 * lanes + i[-1])], axis=h0), name="part")
    lane = te.reduce_axis((0, lanes), "lane")
    total = te.compute(tuple(rows), lambda *r: te.sum(part[(*r, lane)], axis=lane), name="total")
    inv = te.compute(tuple(rows), lambda *r: tirx.const(1.0, "float32") / te.sqrt(
        total[r] / tirx.const(float(hidden), "float32") + tirx.const(eps, "float32")), name="inv")
    ins = [x]
    if has_weight:
        w = te.placeholder((hidden,), "float32", name="w")
        ins.append(w)
        out = te.compute((*rows, hidden), lambda *i: x[i] * inv[i[:-1]] * w[i[-1]], name="out")
    else:
        out = te.compute((*rows, hidden), lambda *i: x[i] * inv[i[:-1]], name="out")
    return Lowered("rmsnorm", ins, [out], info={"hidden": hidden, "lanes": lanes, "lead": lead})


def softmax_lowered(lead: int, n: int | None, log: bool) -> Lowered:
    """x [*rows, n] with `lead` symbolic leading axes; n symbolic when None."""
    from tvm import te

    rows = _lead_vars(lead)
    length = te.var("n") if n is None else n
    x = te.placeholder((*rows, length), "float32", name="x")
    j = te.reduce_axis((0, length), "j")
    mx = te.compute(tuple(rows), lambda *r: te.max(x[(*r, j)], axis=j), name="row_max")
    e = te.compute((*rows, length), lambda *i: exp_f32(x[i] - mx[i[:-1]]), name="exps")
    js = te.reduce_axis((0, length), "js")
    total = te.compute(tuple(rows), lambda *r: te.sum(e[(*r, js)], axis=js), name="row_sum")
    if log:
        out = te.compute((*rows, length), lambda *i: x[i] - mx[i[:-1]] - te.log(total[i[:-1]]), name="out")
    else:
        out = te.compute((*rows, length), lambda *i: e[i] / total[i[:-1]], name="out")
    return Lowered("softmax", [x], [out], info={"n": n, "log": log, "lead": lead})


def embedding_lowered(lead: int, vocab: int, dim: int) -> Lowered:
    """ids int64 [*rows] (`lead` symbolic axes), weight [vocab, dim] -> [*rows, dim]."""
    from tvm import te, tirx

    rows = _lead_vars(lead)
    ids = te.placeholder(tuple(rows), "int64", name="ids")
    w = te.placeholder((vocab, dim), "float32", name="w")

    def row(*i):
        idx = ids[i[:-1]]
        valid = tirx.And(idx >= tirx.const(0, "int64"), idx < tirx.const(vocab, "int64"))
        safe = tirx.Cast("int32", tirx.max(tirx.min(idx, tirx.const(vocab - 1, "int64")), tirx.const(0, "int64")))
        return tirx.Select(valid, w[safe, i[-1]], tirx.const(float("nan"), "float32"))

    out = te.compute((*rows, dim), row, name="out")
    return Lowered("gather", [ids, w], [out], info={"dim": dim, "lead": lead})


class RMSNormKernel(OpKernel):
    """rmsnorm(x [..., H], w [H]?; eps, ndim=1) on fp32."""

    @staticmethod
    def supports(node: Node) -> bool:
        x = node.inputs[0]
        w = node.inputs[1] if len(node.inputs) > 1 else None
        return (_f32(x) and x.type.rank >= 2 and node.attr["ndim"] == 1 and isinstance(x.type.shape[-1], int)
                and (w is None or (_f32(w) and tuple(w.type.shape) == (x.type.shape[-1],))))

    def __init__(self, node, knobs, cache, target):
        super().__init__(node, knobs, cache, target)
        self.hidden = node.inputs[0].type.shape[-1]
        self.eps = F32_EPS if self.attrs["eps"] is None else float(self.attrs["eps"])
        self.has_weight = len(node.inputs) > 1 and node.inputs[1] is not None
        self.lead = node.inputs[0].type.rank - 1

    def key(self):
        return ("rmsnorm", self.lead, self.hidden, self.eps, self.has_weight)

    def lower(self, variant) -> Lowered:
        return rmsnorm_lowered(self.lead, self.hidden, self.eps, self.has_weight, int(self.knobs["tvm.rowwise.vec"]))

    def describe(self) -> str:
        return f"rmsnorm H={self.hidden}"

    def __call__(self, x, w=None, **attrs):
        fn = self._main or self.main()
        if fn is False:
            return self.run_reference(x, w, **attrs)
        x = ready(x)
        out = self.empty(x.shape)
        if self.has_weight:
            fn(x, ready(w), out)
        else:
            fn(x, out)
        return out


class SoftmaxKernel(OpKernel):
    """softmax / log_softmax over the last axis of an fp32 tensor."""

    @staticmethod
    def supports(node: Node) -> bool:
        x = node.inputs[0]
        return _f32(x) and x.type.rank >= 2 and node.attr["dim"] in (-1, x.type.rank - 1)

    def __init__(self, node, knobs, cache, target):
        super().__init__(node, knobs, cache, target)
        last = node.inputs[0].type.shape[-1]
        self.n = last if isinstance(last, int) else None
        self.log = bool(self.attrs["log"])
        self.lead = node.inputs[0].type.rank - 1

    def key(self):
        return ("softmax", self.lead, self.n, self.log)

    def lower(self, variant) -> Lowered:
        return softmax_lowered(self.lead, self.n, self.log)

    def describe(self) -> str:
        return f"{'log_' if self.log else ''}softmax n={self.n or 'sym'}"

    def __call__(self, x, **attrs):
        fn = self._main or self.main()
        if fn is False or x.numel() == 0:
            return self.run_reference(x, **attrs)
        x = ready(x)
        out = self.empty(x.shape)
        fn(x, out)
        return out


class RopeKernel(OpKernel):
    """rope(x, cos, sin): x * cos + rotate_half(x) * sin with broadcasting, fp32, static even last axis."""

    @staticmethod
    def supports(node: Node) -> bool:
        x, cos, sin = node.inputs
        d = x.type.shape[-1] if _f32(x) and x.type.rank else None
        return (isinstance(d, int) and d % 2 == 0 and _f32(cos) and _f32(sin)
                and tuple(node.output.type.shape) == tuple(x.type.shape)
                and cos.type.shape[-1] == d and sin.type.shape[-1] == d)

    def __init__(self, node, knobs, cache, target):
        super().__init__(node, knobs, cache, target)
        self.out_shape = tuple(node.output.type.shape)
        self.in_shapes = [tuple(v.type.shape) for v in node.inputs]
        self.plans = broadcast_plan(self.out_shape, self.in_shapes)
        self.shape_source = out_shape_source(self.out_shape, self.in_shapes, self.plans)

    def key(self):
        return ("rope", len(self.out_shape), self.out_shape[-1], tuple(len(s) for s in self.in_shapes),
                tuple(self.plans))

    def lower(self, variant) -> Lowered:
        from tvm import te, tirx

        bt = BroadcastTE(self.out_shape, self.in_shapes, self.plans, ["x", "cos", "sin"])
        dim = self.out_shape[-1]
        half = dim // 2

        def compute(*idx):
            d = idx[-1]
            partner = (*idx[:-1], (d + half) % dim)
            sign = tirx.Select(d < half, tirx.const(-1.0, "float32"), tirx.const(1.0, "float32"))
            return bt.load(0, idx) * bt.load(1, idx) + sign * bt.load(0, partner) * bt.load(2, idx)

        out = te.compute(tuple(bt.out_dims), compute, name="out")
        return Lowered("elementwise", bt.tensors, [out], info={"rank": len(self.out_shape), "last": dim})

    def describe(self) -> str:
        return f"rope D={self.out_shape[-1]}"

    def __call__(self, x, cos, sin, **attrs):
        fn = self._main or self.main()
        if fn is False:
            return self.run_reference(x, cos, sin, **attrs)
        x = ready(x)
        out = self.empty(x.shape)
        fn(x, ready(cos), ready(sin), out)
        return out


class EmbeddingKernel(OpKernel):
    """embedding(ids int64 [...], weight fp32 [V, D]) -> [..., D]."""

    @staticmethod
    def supports(node: Node) -> bool:
        ids, w = node.inputs
        return (ids.type.dtype == "int64" and ids.type.rank >= 1 and _f32(w) and w.type.rank == 2
                and w.type.is_static)

    def __init__(self, node, knobs, cache, target):
        super().__init__(node, knobs, cache, target)
        self.vocab, self.dim = node.inputs[1].type.shape
        self.lead = node.inputs[0].type.rank

    def key(self):
        return ("embedding", self.lead, self.vocab, self.dim)

    def lower(self, variant) -> Lowered:
        return embedding_lowered(self.lead, self.vocab, self.dim)

    def describe(self) -> str:
        return f"embedding [{self.vocab}, {self.dim}]"

    def __call__(self, ids, w, **attrs):
        fn = self._main or self.main()
        if fn is False:
            return self.run_reference(ids, w, **attrs)
        out = self.empty((*ids.shape, self.dim))
        fn(ready(ids), ready(w), out)
        return out
