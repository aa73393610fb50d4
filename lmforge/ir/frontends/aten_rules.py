"""ATen -> IR rules used by the torch.export frontend: one small function per ATen op.

A rule returns the produced Value(s), or None to leave the op to an explicit `torch_fallback` node.
Shapes of views are taken from the exported program's (symbolic) output shape, so the IR never needs
the `sym_size` arithmetic that computed them.
"""
from __future__ import annotations

import torch

from lmforge.ir.graph import Value
from lmforge.ir.types import dtype_name

aten = torch.ops.aten
_INT64_MAX = 9223372036854775807


def _arg(node, i, name, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _out_shape(t, node):
    return tuple(t.dim(d) for d in node.meta["val"].shape)


def _tensor(t, a):
    v = t.value(a)
    return v if isinstance(v, Value) else None


def embedding(t, node):
    return t.emit(node, "embedding", [t.value(node.args[1]), t.value(node.args[0])])


def linear(t, node):
    if t.value(node.args[1]).type.rank != 2:
        return None   # F.linear with a 1-D weight (a dot product per row): torch runs it
    return t.emit(node, "linear", [t.value(a) for a in node.args[:3]])


def matmul(t, node):
    a, b = t.value(node.args[0]), t.value(node.args[1])
    if a.type.rank < 2 or b.type.rank < 2:
        return None
    return t.emit(node, "matmul", [a, b])


def addmm(t, node):
    """addmm(bias, x, w) = bias + x @ w (GPT-2's Conv1D): a matmul and an add."""
    if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
        return None
    bias, x, w = (t.value(a) for a in node.args[:3])
    prod = t.b.op("matmul", [x, w], name=f"{node.name}_mm", source=t.source(node))
    return t.emit(node, "add", [prod, bias])


def split(t, node):
    """split(x, size or sizes, dim) -> one slice per piece."""
    x = t.value(node.args[0])
    dim = int(_arg(node, 2, "dim", 0)) % x.type.rank
    outs, start = [], 0
    for i, piece in enumerate(node.meta["val"]):
        n = t.dim(piece.shape[dim])
        if not isinstance(n, int) or not isinstance(start, int):
            return None
        outs.append(t.b.op("slice", [x], {"dim": dim, "start": start, "end": start + n},
                           name=f"{node.name}_{i}", source=t.source(node)))
        start += n
    return tuple(outs)


def stack(t, node):
    """stack(xs, dim) = concat of xs each with a new size-1 dim."""
    xs = [t.value(a) for a in node.args[0]]
    dim = int(_arg(node, 1, "dim", 0)) % (xs[0].type.rank + 1)
    parts = []
    for i, x in enumerate(xs):
        shape = (*x.type.shape[:dim], 1, *x.type.shape[dim:])
        parts.append(t.b.op("reshape", [x], {"shape": shape}, name=f"{node.name}_in{i}", source=t.source(node)))
    return t.emit(node, "concat", parts, {"dim": dim})


def bool_binary(op: str):
    inner = binary(op)

    def rule(t, node):
        a, b = t.value(node.args[0]), t.value(node.args[1])
        if not (isinstance(a, Value) and isinstance(b, Value) and a.type.dtype == b.type.dtype == "bool"):
            return None  # bitwise ops on integers stay with torch
        return inner(t, node)

    return rule


def rms_norm(t, node):
    shape = _arg(node, 1, "normalized_shape")
    return t.emit(node, "rmsnorm", [t.value(node.args[0]), _tensor(t, _arg(node, 2, "weight"))],
                  {"eps": _arg(node, 3, "eps"), "ndim": len(shape)})


def layer_norm(t, node):
    shape = _arg(node, 1, "normalized_shape")
    return t.emit(node, "layernorm", [t.value(node.args[0]), _tensor(t, _arg(node, 2, "weight")),
                                      _tensor(t, _arg(node, 3, "bias"))],
                  {"eps": float(_arg(node, 4, "eps", 1e-5)), "ndim": len(shape)})


def sdpa(t, node):
    if float(_arg(node, 4, "dropout_p", 0.0)) != 0.0:
        return None
    causal = bool(_arg(node, 5, "is_causal", False))
    mask = _tensor(t, _arg(node, 3, "attn_mask"))
    q, k, v = (t.value(a) for a in node.args[:3])
    if not q.type.rank == k.type.rank == v.type.rank == 4:
        return None   # lmforge's attention is [batch, heads, seq, dim]; other ranks run as torch's SDPA
    hq, hk = q.type.shape[1], k.type.shape[1]
    if hq != hk and not _arg(node, 7, "enable_gqa", False):
        return None
    scale = _arg(node, 6, "scale")
    # torch aligns is_causal to the top-left corner: query i sees keys 0..i.
    attrs = {"causal": causal, "scale": None if scale is None else float(scale), "q_offset": 0 if causal else None}
    return t.emit(node, "attention", [q, k, v] + ([mask] if mask is not None else []), attrs)


def softmax(log: bool):
    def rule(t, node):
        x = t.value(node.args[0])
        if node.target in (aten._softmax.default, aten._log_softmax.default) and node.args[2]:
            return None  # half_to_float: leave to the fallback
        dtype = _arg(node, 2, "dtype")
        if isinstance(dtype, torch.dtype) and node.target not in (aten._softmax.default, aten._log_softmax.default):
            if dtype_name(dtype) != x.type.dtype:   # softmax(x, dim, dtype=...) casts x first (HF eager attention)
                x = t.b.op("cast", [x], {"dtype": dtype_name(dtype)}, name=f"{node.name}_in",
                           source=t.source(node))
        elif dtype not in (None, False) and node.target not in (aten._softmax.default, aten._log_softmax.default):
            return None
        return t.emit(node, "softmax", [x], {"dim": int(node.args[1]), "log": log})

    return rule


def binary(op: str, swap: bool = False):
    def rule(t, node):
        a = t.value(node.args[0])
        b = t.value(node.args[1])
        alpha = node.kwargs.get("alpha", node.args[2] if len(node.args) > 2 else 1)
        if not (isinstance(alpha, int) and not node.meta["val"].dtype.is_floating_point):
            alpha = float(alpha)   # an int alpha stays int on integer tensors only: torch refuses a float one there
        if not isinstance(a, Value):
            return None
        attrs = {"swap": swap}
        if op in ("add", "sub"):
            attrs["alpha"] = alpha
        if isinstance(b, Value):
            return t.emit(node, op, [a, b], attrs)
        attrs["scalar"] = b  # a number, or a symbolic size used as a number ("past")
        return t.emit(node, op, [a, None], attrs)

    return rule


def compare(op: str):
    def rule(t, node):
        a, b = t.value(node.args[0]), t.value(node.args[1])
        if not isinstance(a, Value):
            return None
        if isinstance(b, Value):
            return t.emit(node, op, [a, b])
        return t.emit(node, op, [a, None], {"scalar": b})

    return rule


def unary(op: str):
    def rule(t, node):
        return t.emit(node, op, [t.value(node.args[0])])

    return rule


def gelu(t, node):
    return t.emit(node, "gelu", [t.value(node.args[0])], {"approximate": node.kwargs.get("approximate", "none")})


def pow_scalar(t, node):
    """x ** e: `pow_scalar` on floating x; on integer or bool x a `pow` with the scalar kept as written, so that
    int ** 2 stays int64 and int ** 0.5 becomes float32, as in torch."""
    e = node.args[1]
    if not isinstance(e, (int, float)) or isinstance(e, bool):
        return None
    x = t.value(node.args[0])
    if not x.type.dtype.startswith(("float", "bfloat")):
        return t.emit(node, "pow", [x, None], {"scalar": e})
    return t.emit(node, "pow_scalar", [x], {"exponent": float(e)})


def where(t, node):
    c, a, b = (t.value(x) for x in node.args[:3])
    attrs = {"a_scalar": None if isinstance(a, Value) else a, "b_scalar": None if isinstance(b, Value) else b}
    return t.emit(node, "where", [c, a if isinstance(a, Value) else None, b if isinstance(b, Value) else None], attrs)


def reduction(op: str):
    def rule(t, node):
        dims = _arg(node, 1, "dim")
        if isinstance(dims, int):
            dims = [dims]
        if dims is not None and len(dims) == 0:
            dims = None   # torch.sum(x, dim=[]) reduces every dim, as dim=None does
        dtype = _arg(node, 3, "dtype")
        return t.emit(node, op, [t.value(node.args[0])],
                      {"dims": None if dims is None else tuple(dims), "keepdim": bool(_arg(node, 2, "keepdim", False)),
                       "dtype": None if dtype is None else dtype_name(dtype)})

    return rule


def argmax(t, node):
    return t.emit(node, "argmax", [t.value(node.args[0])],
                  {"dim": _arg(node, 1, "dim"), "keepdim": bool(_arg(node, 2, "keepdim", False))})


def reshape_like(t, node):
    return t.emit(node, "reshape", [t.value(node.args[0])], {"shape": _out_shape(t, node)})


def expand(t, node):
    return t.emit(node, "expand", [t.value(node.args[0])], {"shape": _out_shape(t, node)})


def transpose(t, node):
    x = t.value(node.args[0])
    r = x.type.rank
    a, b = node.args[1] % r, node.args[2] % r
    perm = list(range(r))
    perm[a], perm[b] = perm[b], perm[a]
    return t.emit(node, "permute", [x], {"perm": tuple(perm)})


def permute(t, node):
    return t.emit(node, "permute", [t.value(node.args[0])], {"perm": tuple(node.args[1])})


def t_(t, node):
    x = t.value(node.args[0])
    return t.emit(node, "permute", [x], {"perm": (1, 0) if x.type.rank == 2 else tuple(range(x.type.rank))})


def numpy_t(t, node):
    """`x.T`: every dim reversed."""
    x = t.value(node.args[0])
    return t.emit(node, "permute", [x], {"perm": tuple(reversed(range(x.type.rank)))})


def matrix_t(t, node):
    """`x.mT`: the last two dims swapped."""
    x = t.value(node.args[0])
    perm = list(range(x.type.rank))
    perm[-2:] = perm[-1], perm[-2]
    return t.emit(node, "permute", [x], {"perm": tuple(perm)})


def cat(t, node):
    """cat of mixed dtypes promotes them (int64 with float32 gives float32): a cast of each other input first."""
    dtype = dtype_name(node.meta["val"].dtype)
    xs = []
    for i, a in enumerate(node.args[0]):
        x = t.value(a)
        if x.type.dtype != dtype:
            x = t.b.op("cast", [x], {"dtype": dtype}, name=f"{node.name}_in{i}", source=t.source(node))
        xs.append(x)
    return t.emit(node, "concat", xs, {"dim": int(_arg(node, 1, "dim", 0))})


def slice_(t, node):
    x = t.value(node.args[0])
    dim = _arg(node, 1, "dim", 0)
    start = t.value(_arg(node, 2, "start", 0))
    end = t.value(_arg(node, 3, "end", None))
    step = _arg(node, 4, "step", 1)
    start = 0 if start is None else start
    if end is not None and isinstance(end, int) and end >= _INT64_MAX // 2:
        end = None
    if not isinstance(step, int) or isinstance(start, Value) or isinstance(end, Value):
        return None
    if isinstance(start, int) and start < 0 or isinstance(end, int) and end < 0:
        size = x.type.shape[dim]
        if isinstance(size, int):
            start, end = slice(start, end).indices(size)[:2]
        # on a dynamic dim (x[:, -1:]) a negative bound stays: the slice op counts it from the end
    return t.emit(node, "slice", [x], {"dim": dim, "start": start, "end": end, "step": step})


def select(t, node):
    index = t.value(node.args[2])
    if isinstance(index, int) and index < 0:
        size = t.value(node.args[0]).type.shape[node.args[1]]
        if isinstance(size, int):
            index += size   # on a dynamic dim (x[:, -1]) it stays negative: select counts it from the end
    return t.emit(node, "select", [t.value(node.args[0])], {"dim": node.args[1], "index": index})


def index_select(t, node):
    return t.emit(node, "index_select", [t.value(node.args[0]), t.value(node.args[2])], {"dim": node.args[1]})


def identity(t, node):
    return t.value(node.args[0])


def dropout(t, node):
    """Inference: dropout is the identity. A training-mode dropout (train=True, p > 0) is refused rather than
    silently dropped: the model was captured in training mode."""
    p, train = float(_arg(node, 1, "p", 0.5)), bool(_arg(node, 2, "train", False))
    if train and p > 0:
        from lmforge.errors import CaptureError

        raise CaptureError(f"the model applies dropout (p={p}) in training mode: call model.eval() before "
                           "capturing (lmforge compiles inference)")
    return t.value(node.args[0])


def to_copy(t, node):
    x = t.value(node.args[0])
    out = node.meta["val"]
    if dtype_name(out.dtype) == x.type.dtype:
        return x
    return t.emit(node, "cast", [x], {"dtype": dtype_name(out.dtype)})


def arange(t, node):
    args = [t.value(a) for a in node.args]
    if node.target == aten.arange.default:
        start, end, step = 0, args[0], 1
    elif node.target == aten.arange.start:
        start, end, step = args[0], args[1], 1
    else:
        start, end, step = args[0], args[1], args[2]
    if not all(isinstance(x, (int, str)) for x in (start, end)) or not isinstance(step, int):
        return None
    return t.emit(node, "arange", [], {"start": start, "end": end, "step": step,
                                       "dtype": dtype_name(node.meta["val"].dtype)})


# ATen creation ops -> `full`: the constant they fill with, or the index of the argument holding it
_FILL = {aten.zeros.default: 0, aten.ones.default: 1, aten.new_zeros.default: 0, aten.new_ones.default: 1,
         aten.zeros_like.default: 0, aten.ones_like.default: 1}
_FILL_ARG = {aten.full.default: 1, aten.new_full.default: 2, aten.full_like.default: 1, aten.fill.Scalar: 1}


def full(t, node):
    """full / zeros / ones and their new_* and *_like forms: a `full` of the output's (symbolic) shape."""
    value = _FILL.get(node.target)
    if value is None:
        value = t.value(node.args[_FILL_ARG[node.target]])
    if not isinstance(value, (int, float, bool)):
        return None
    return t.emit(node, "full", [], {"shape": _out_shape(t, node), "value": value,
                                     "dtype": dtype_name(node.meta["val"].dtype)})


def tri(upper: bool):
    def rule(t, node):
        diagonal = _arg(node, 1, "diagonal", 0)
        if not isinstance(diagonal, int):
            return None   # a diagonal computed from symbolic sizes: left to the fallback (which says so)
        return t.emit(node, "tri", [t.value(node.args[0])], {"diagonal": diagonal, "upper": upper})

    return rule


def topk(t, node):
    return t.emit(node, "topk", [t.value(node.args[0])],
                  {"k": int(node.args[1]), "dim": int(_arg(node, 2, "dim", -1)),
                   "largest": bool(_arg(node, 3, "largest", True))})


def slice_scatter(t, node):
    """slice_scatter(x, new, dim, start, ...): x with `new` written at start.. along dim (a KV-cache write, or a
    functionalized `y[:, 2:4] = u`); a negative start on a static dim counts from its end."""
    cache, new = t.value(node.args[0]), t.value(node.args[1])
    dim, start = _arg(node, 2, "dim", 0), t.value(_arg(node, 3, "start", 0))
    step = _arg(node, 5, "step", 1)
    if step != 1 or not isinstance(start, (int, str)) or start is None:
        return None
    size = cache.type.shape[dim]
    if isinstance(start, int) and start < 0:
        if not isinstance(size, int):
            return None
        start = max(start + size, 0)
    return t.emit(node, "kv_cache_update", [cache, new], {"dim": dim, "pos": start})


def copy(t, node):
    """copy(dst, src), the functional form of `dst.copy_(src)` / `dst[...] = src`: src cast to dst's dtype (torch
    also broadcasts src to dst's shape; that case stays with torch)."""
    src = t.value(node.args[1])
    if not isinstance(src, Value) or tuple(src.type.shape) != _out_shape(t, node):
        return None
    dtype = dtype_name(node.meta["val"].dtype)
    return src if src.type.dtype == dtype else t.emit(node, "cast", [src], {"dtype": dtype})


ATEN_RULES = {
    aten.embedding.default: embedding,
    aten.linear.default: linear,
    aten.matmul.default: matmul, aten.mm.default: matmul, aten.bmm.default: matmul,
    aten.rms_norm.default: rms_norm,
    aten.layer_norm.default: layer_norm,
    aten.scaled_dot_product_attention.default: sdpa,
    aten.softmax.int: softmax(False), aten._softmax.default: softmax(False),
    aten.log_softmax.int: softmax(True), aten._log_softmax.default: softmax(True),
    aten.gelu.default: gelu,
    aten.pow.Tensor_Scalar: pow_scalar, aten.pow.Tensor_Tensor: binary("pow"),
    aten.where.self: where, aten.where.ScalarOther: where, aten.where.ScalarSelf: where, aten.where.Scalar: where,
    aten.mean.dim: reduction("mean"), aten.sum.dim_IntList: reduction("sum"), aten.sum.default: reduction("sum"),
    aten.amax.default: reduction("amax"), aten.amin.default: reduction("amin"),
    aten.argmax.default: argmax,
    aten.view.default: reshape_like, aten.reshape.default: reshape_like, aten._unsafe_view.default: reshape_like,
    aten.unsqueeze.default: reshape_like, aten.squeeze.dim: reshape_like, aten.squeeze.dims: reshape_like,
    aten.squeeze.default: reshape_like, aten.flatten.using_ints: reshape_like, aten.unflatten.int: reshape_like,
    aten.expand.default: expand,
    aten.transpose.int: transpose, aten.permute.default: permute, aten.t.default: t_,
    aten.numpy_T.default: numpy_t, aten.mT.default: matrix_t,
    aten.cat.default: cat,
    aten.slice.Tensor: slice_, aten.select.int: select, aten.index_select.default: index_select,
    aten.contiguous.default: identity, aten.clone.default: identity, aten.alias.default: identity,
    aten.detach.default: identity, aten.lift_fresh_copy.default: identity, aten.dropout.default: dropout,
    aten._to_copy.default: to_copy, aten.to.dtype: to_copy, aten.to.dtype_layout: to_copy,
    aten.to.device: to_copy, aten.addmm.default: addmm, aten.split.Tensor: split, aten.chunk.default: split,
    aten.stack.default: stack, aten.unsafe_split.Tensor: split,
    aten.split_with_sizes.default: split, aten.__and__.Tensor: bool_binary("logical_and"),
    aten.__or__.Tensor: bool_binary("logical_or"), aten.bitwise_and.Tensor: bool_binary("logical_and"),
    aten.bitwise_or.Tensor: bool_binary("logical_or"),
    aten.new_zeros.default: full, aten.new_ones.default: full, aten.new_full.default: full,
    aten.type_as.default: to_copy,
    aten.arange.default: arange, aten.arange.start: arange, aten.arange.start_step: arange,
    aten.full.default: full, aten.zeros.default: full, aten.ones.default: full,
    aten.full_like.default: full, aten.zeros_like.default: full, aten.ones_like.default: full,
    aten.triu.default: tri(True), aten.tril.default: tri(False),
    aten.topk.default: topk,
    aten.slice_scatter.default: slice_scatter, aten.copy.default: copy,
    aten.fill.Scalar: full,
}
for _name in ("neg", "exp", "log", "sqrt", "rsqrt", "abs", "sin", "cos", "tanh", "sigmoid", "relu", "silu",
              "reciprocal", "logical_not"):
    ATEN_RULES[getattr(aten, _name).default] = unary(_name)
for _name in ("add", "sub", "mul", "div"):
    ATEN_RULES[getattr(aten, _name).Tensor] = binary(_name)
    ATEN_RULES[getattr(aten, _name).Scalar] = binary(_name)
ATEN_RULES[aten.rsub.Scalar] = binary("sub", swap=True)
ATEN_RULES[aten.maximum.default] = binary("maximum")
ATEN_RULES[aten.minimum.default] = binary("minimum")
ATEN_RULES[aten.logical_and.default] = binary("logical_and")
ATEN_RULES[aten.logical_or.default] = binary("logical_or")
for _name in ("eq", "ne", "lt", "le", "gt", "ge"):
    ATEN_RULES[getattr(aten, _name).Tensor] = compare(_name)
    ATEN_RULES[getattr(aten, _name).Scalar] = compare(_name)
