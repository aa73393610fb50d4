"""Tensor ops: elementwise, comparisons, reductions, softmax, data movement, creation, torch fallback."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from lmforge.errors import VerifyError
from lmforge.ir.cost import Cost
from lmforge.ir.ops.registry import (OpDef, attr, broadcast_shapes, dims_conflict, nbytes, norm_dim, numel,
                                     streaming_cost, view_cost)
from lmforge.ir.types import TensorType, dtype_name, torch_dtype

# ---- elementwise -----------------------------------------------------------------------------------

# name -> (torch function, FLOPs per element). FLOP counts of transcendental ops follow common practice
# (one "op" per special-function evaluation plus its arithmetic).
UNARY = {
    "neg": (torch.neg, 1), "exp": (torch.exp, 1), "log": (torch.log, 1), "sqrt": (torch.sqrt, 1),
    "rsqrt": (torch.rsqrt, 1), "abs": (torch.abs, 1), "sin": (torch.sin, 1), "cos": (torch.cos, 1),
    "tanh": (torch.tanh, 1), "sigmoid": (torch.sigmoid, 4), "relu": (torch.relu, 1), "silu": (F.silu, 5),
    "reciprocal": (torch.reciprocal, 1), "logical_not": (torch.logical_not, 1),
}
BINARY = {
    "add": (torch.add, 1), "sub": (torch.sub, 1), "mul": (torch.mul, 1), "div": (torch.div, 1),
    "pow": (torch.pow, 1), "maximum": (torch.maximum, 1), "minimum": (torch.minimum, 1),
    "logical_and": (torch.logical_and, 1), "logical_or": (torch.logical_or, 1),
}
COMPARE = {"eq": torch.eq, "ne": torch.ne, "lt": torch.lt, "le": torch.le, "gt": torch.gt, "ge": torch.ge}


def _same_type(ins, attrs):
    return [ins[0]]


# unary ops that torch computes in floating point: integer and bool inputs give float32 (the default dtype)
FLOAT_UNARY = {"exp", "log", "sqrt", "rsqrt", "sin", "cos", "tanh", "sigmoid", "reciprocal"}


def _unary_infer_for(name: str):
    def infer(ins, attrs):
        x = ins[0]
        if name == "logical_not":
            return [x.with_(dtype="bool")]
        if name in FLOAT_UNARY:
            return [x.with_(dtype=result_dtype(x, None, floating=True))]
        return [x]

    return infer


def _unary(name: str, fn, flops: int) -> OpDef:
    def ref(x):
        return fn(x)

    return OpDef(name, f"Elementwise {name}(x).", {}, _unary_infer_for(name), ref,
                 streaming_cost(flops, "elementwise"))


def _meta(t: TensorType) -> torch.Tensor:
    """An empty tensor of t's dtype and rank: what torch's type promotion looks at (a 0-dim tensor counts for
    less than a dimensioned one, as a Python scalar does)."""
    return torch.empty((0,) * t.rank, dtype=torch_dtype(t.dtype), device="meta")


def _scalar(value):
    """A scalar attribute as torch's promotion sees it: a symbolic size ("past") is an int."""
    return 1 if isinstance(value, str) else value


def result_dtype(a: TensorType | bool | int | float | str | None, b: TensorType | bool | int | float | str | None,
                 *, floating: bool = False) -> str:
    """The dtype torch gives an elementwise op on operands a and b (tensor types or Python scalars; None is
    skipped), as `torch.result_type`: an int tensor with a float scalar gives the default float dtype (float32),
    mixed floating tensors the wider one, a dimensioned tensor wins over a 0-dim tensor or a scalar of its
    category. `floating`: the op computes in floating point (true division, exp): an integral or bool result
    becomes float32."""
    ops = [o for o in (a, b) if o is not None]
    tensors = [o for o in ops if isinstance(o, TensorType)]
    if len(ops) == 1 and tensors or len(tensors) == 2 and tensors[0].dtype == tensors[1].dtype:
        dtype = tensors[0].dtype  # the common case; also keeps storage formats (int4) with no torch dtype
    elif not tensors:
        scalars = [_scalar(o) for o in ops]
        dtype = ("float32" if any(isinstance(v, float) for v in scalars) else
                 "int64" if any(not isinstance(v, bool) for v in scalars) else "bool")
    else:
        try:
            other = next(o for o in ops if o is not tensors[0])
            y = _meta(other) if isinstance(other, TensorType) else _scalar(other)
            dtype = dtype_name(torch.result_type(_meta(tensors[0]), y))
        except (ValueError, TypeError, RuntimeError, OverflowError) as e:
            raise VerifyError(f"no torch type promotion for operands {a} and {b}: {e}") from None
    if floating and not dtype.startswith(("float", "bfloat")):
        dtype = dtype_name(torch.get_default_dtype())
    return dtype


def _binary_infer_for(name: str):
    def infer(ins, attrs):
        a, b = ins[0], ins[1] if len(ins) > 1 else None
        if a is None:
            raise VerifyError(f"{name}: needs a tensor as first input")
        shape = a.shape if b is None else broadcast_shapes(a.shape, b.shape)
        if name.startswith("logical_"):
            return [TensorType(shape, "bool")]
        other = b if b is not None else attrs.get("scalar")
        return [TensorType(shape, result_dtype(a, other, floating=name == "div"))]

    return infer


def _binary(name: str, fn, flops: int) -> OpDef:
    def ref(a, b=None, *, scalar=None, swap=False, alpha=1.0):
        other = b if b is not None else scalar
        if swap and not torch.is_tensor(other):  # a 0-dim tensor promotes as the scalar does
            other = torch.tensor(other, dtype=torch.result_type(a, other), device=a.device)
        x, y = (other, a) if swap else (a, other)
        if name in ("add", "sub") and alpha != 1.0:
            return fn(x, y, alpha=alpha)
        return fn(x, y)

    return OpDef(name, f"Elementwise {name}(a, b); b may be absent, then the `scalar` attribute is used "
                       f"(`swap` puts the scalar first). The result dtype follows torch's type promotion"
                       f"{' (true division: integers give float32)' if name == 'div' else ''}.",
                 {"scalar": attr("scalar", None), "swap": attr("bool", False),
                  "alpha": attr("scalar", 1.0, "multiplies b (add/sub); an int on integer tensors, as torch requires")},
                 _binary_infer_for(name), ref, streaming_cost(flops, "elementwise"), arity=(1, 2))


def _compare(name: str, fn) -> OpDef:
    def infer(ins, attrs):
        a, b = ins[0], ins[1] if len(ins) > 1 else None
        if a is None:
            raise VerifyError(f"{name}: needs a tensor as first input")
        return [TensorType(a.shape if b is None else broadcast_shapes(a.shape, b.shape), "bool")]

    def ref(a, b=None, *, scalar=None):
        return fn(a, b if b is not None else scalar)

    return OpDef(name, f"Comparison {name}(a, b) -> bool.", {"scalar": attr("scalar", None)}, infer, ref,
                 streaming_cost(1, "elementwise"), arity=(1, 2))


def _where_infer(ins, attrs):
    c, a, b = ins
    shapes = [t.shape for t in (c, a, b) if t is not None]
    dtype = result_dtype(a if a is not None else attrs["a_scalar"], b if b is not None else attrs["b_scalar"])
    return [TensorType(broadcast_shapes(*shapes), dtype)]


def _where_ref(cond, a=None, b=None, *, a_scalar=None, b_scalar=None):
    return torch.where(cond, a if a is not None else a_scalar, b if b is not None else b_scalar)


def _gelu_ref(x, *, approximate="none"):
    return F.gelu(x, approximate=approximate)


def _cast_ref(x, *, dtype):
    return x.to(torch_dtype(dtype))


def _pow_exponent(dtype: str, exponent: float):
    """An integral exponent on an integer (or bool) tensor stays an int, so the result stays integral."""
    floating = dtype.startswith(("float", "bfloat"))
    return int(exponent) if not floating and float(exponent).is_integer() else exponent


def _pow_scalar_infer(ins, attrs):
    x = ins[0]
    return [x.with_(dtype=result_dtype(x, _pow_exponent(x.dtype, attrs["exponent"])))]


def _pow_scalar_ref(x, *, exponent):
    return torch.pow(x, _pow_exponent(dtype_name(x.dtype), exponent))


# ---- reductions and softmax ---------------------------------------------------------------------------

def _reduce_infer_for(name: str):
    def infer(ins, attrs):
        x = ins[0]
        dims = {norm_dim(d, x.rank) for d in (attrs["dims"] if attrs["dims"] is not None else range(x.rank))}
        shape = [(1 if i in dims else d) for i, d in enumerate(x.shape) if attrs["keepdim"] or i not in dims]
        dtype = attrs.get("dtype") or ("int64" if attrs.get("_index") else x.dtype)
        if name == "sum" and not attrs.get("dtype") and not x.dtype.startswith(("float", "bfloat")):
            dtype = "int64"  # as torch.sum: bool and integer sums accumulate in int64
        return [TensorType(tuple(shape), dtype)]

    return infer


def _reduction(name: str, fn) -> OpDef:
    def ref(x, *, dims, keepdim=False, dtype=None):
        d = tuple(dims) if dims is not None else tuple(range(x.dim()))
        if dtype is not None and name in ("sum", "mean"):
            x = x.to(torch_dtype(dtype))  # torch's dtype= converts the input before reducing
            return fn(x, d, keepdim).to(x.dtype)  # and keeps it: torch.sum of int32 alone gives int64
        return fn(x, d, keepdim)

    def cost(ins, attrs, outs):
        return Cost.of(numel(ins[0]), nbytes(ins[0], *outs), "reduction", ins[0].dtype)

    doc = f"Reduction {name} over `dims` (None = all); `dtype`: convert the input to it first"
    if name == "sum":
        doc += " (without it, bool and integer inputs sum to int64, as in torch)"
    return OpDef(name, doc + ".",
                 {"dims": attr("ints", None), "keepdim": attr("bool", False), "dtype": attr("dtype", None)},
                 _reduce_infer_for(name), ref, cost, op_class="reduction")


def _argmax_infer(ins, attrs):
    x = ins[0]
    if attrs["dim"] is None:   # the flattened argmax; keepdim keeps every dim, at size 1
        return [TensorType((1,) * x.rank if attrs["keepdim"] else (), "int64")]
    d = norm_dim(attrs["dim"], x.rank)
    shape = [(1 if i == d else s) for i, s in enumerate(x.shape) if attrs["keepdim"] or i != d]
    return [TensorType(tuple(shape), "int64")]


def _argmax_ref(x, *, dim=None, keepdim=False):
    return torch.argmax(x, dim=dim, keepdim=keepdim)


def _softmax_ref(x, *, dim=-1, log=False):
    # half precision computes in fp32; float64 stays float64 (x.float() would round it to fp32)
    wide = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    y = torch.log_softmax(wide, dim) if log else torch.softmax(wide, dim)
    return y.to(x.dtype)


# ---- data movement ----------------------------------------------------------------------------------------

def _reshape_infer(ins, attrs):
    shape = list(attrs["shape"])
    if -1 in shape:
        x = ins[0]
        if not x.is_static or any(isinstance(d, str) for d in shape):
            raise VerifyError("reshape with -1 needs static shapes; give the full symbolic shape")
        known = 1
        for d in shape:
            known *= d if d != -1 else 1
        if known == 0 or x.numel() % known:
            raise VerifyError(f"reshape of {x} to {tuple(attrs['shape'])}: the sizes do not divide")
        shape[shape.index(-1)] = x.numel() // known
    x = ins[0]
    if x.is_static and all(isinstance(d, int) for d in shape) and math.prod(shape) != x.numel():
        raise VerifyError(f"reshape of {x} ({x.numel()} elements) to {tuple(shape)} ({math.prod(shape)} elements)")
    return [ins[0].with_(shape=tuple(shape))]


def _reshape_ref(x, *, shape):
    return x.reshape(tuple(shape))


def _permute_infer(ins, attrs):
    x = ins[0]
    perm = [norm_dim(p, x.rank) for p in attrs["perm"]]
    if sorted(perm) != list(range(x.rank)):
        raise VerifyError(f"permute: {attrs['perm']} is not a permutation of {x.rank} dims")
    return [x.with_(shape=tuple(x.shape[p] for p in perm))]


def _permute_ref(x, *, perm):
    return x.permute(tuple(perm))


def _expand_infer(ins, attrs):
    x = ins[0]
    shape = list(attrs["shape"])
    off = len(shape) - x.rank
    for i in range(len(shape)):
        if shape[i] == -1:
            shape[i] = x.shape[i - off]
    return [x.with_(shape=tuple(shape))]


def _expand_ref(x, *, shape):
    return x.expand(tuple(shape))


def _concat_infer(ins, attrs):
    ts = [t for t in ins if t is not None]
    dim = norm_dim(attrs["dim"], ts[0].rank)
    for t in ts[1:]:
        if t.rank != ts[0].rank or t.dtype != ts[0].dtype or any(
                dims_conflict(a, b) for i, (a, b) in enumerate(zip(t.shape, ts[0].shape)) if i != dim):
            raise VerifyError(f"concat along dim {attrs['dim']}: {t} does not fit {ts[0]} (same rank, dtype and "
                              "sizes outside the concat dim)")
    total: Any = 0
    for t in ts:
        d = t.shape[dim]
        total = (total + d) if isinstance(total, int) and isinstance(d, int) else f"({total}) + ({d})"
    from lmforge.ir.types import simplify_dim

    shape = list(ts[0].shape)
    shape[dim] = simplify_dim(total)
    return [ts[0].with_(shape=tuple(shape))]


def _concat_ref(*xs, dim, inplace=False):
    return torch.cat(xs, dim)


def _concat_cost(ins, attrs, outs):
    """A plain concat reads its inputs and writes its output. `inplace`: a serving runtime keeps the result in
    one preallocated buffer that its inputs were already written into (the layers' KV caches stacked), so no
    bytes move; the torch reference still materializes the concatenation."""
    if attrs.get("inplace"):
        return Cost.of(0.0, 0.0, "data_movement", outs[0].dtype)
    return Cost.of(0.0, nbytes(*ins, *outs), "data_movement", outs[0].dtype)


def _slice_infer(ins, attrs):
    """Length of x[start:end:step] along `dim`. With a symbolic dim or bound, a negative int bound counts from
    the end (start=-2 on size s: s - 2) and an end past 2**62 (ONNX's INT64_MAX) means the end; as for the
    other bounds, it is assumed to lie within the dim (so start=-2 gives length 2, end=-1 gives s - 1)."""
    from lmforge.ir.types import simplify_dim

    x = ins[0]
    dim = norm_dim(attrs["dim"], x.rank)
    size = x.shape[dim]
    start, end, step = attrs["start"], attrs["end"], attrs["step"]
    if end is None:
        end = size
    if isinstance(start, int) and isinstance(end, int) and isinstance(size, int):
        n = len(range(*slice(start, end, step).indices(size)))
    else:
        if step < 1:
            raise VerifyError(f"slice: step {step} on a symbolic dim or bound must be positive")
        if isinstance(end, int) and end >= 2**62:
            end = size
        start, end = (f"({size}) + ({b})" if isinstance(b, int) and b < 0 else b for b in (start, end))
        n = simplify_dim(f"({end}) - ({start})") if step == 1 else simplify_dim(
            f"(({end}) - ({start}) + {step - 1}) // {step}")
    shape = list(x.shape)
    shape[dim] = n
    return [x.with_(shape=tuple(shape))]


def _slice_ref(x, *, dim, start=0, end=None, step=1):
    idx = [slice(None)] * x.dim()
    idx[dim] = slice(start, end, step)
    return x[tuple(idx)]


def _select_infer(ins, attrs):
    x = ins[0]
    dim = norm_dim(attrs["dim"], x.rank)
    return [x.with_(shape=tuple(d for i, d in enumerate(x.shape) if i != dim))]


def _select_ref(x, *, dim, index):
    return x.select(dim, index)


def _index_select_infer(ins, attrs):
    x, idx = ins
    dim = norm_dim(attrs["dim"], x.rank)
    shape = list(x.shape)
    shape[dim] = idx.shape[0] if idx.rank else 1   # a 0-d index picks one row and keeps the dim
    return [x.with_(shape=tuple(shape))]


def _index_select_ref(x, idx, *, dim):
    return torch.index_select(x, dim, idx)


def _gather_cost(ins, attrs, outs):
    return Cost.of(0.0, 2 * nbytes(*outs) + nbytes(*ins[1:]), "gather", outs[0].dtype)


def _tri_ref(x, *, diagonal=0, upper=False):
    return torch.triu(x, diagonal) if upper else torch.tril(x, diagonal)


# ---- creation --------------------------------------------------------------------------------------------

def _arange_infer(ins, attrs):
    from lmforge.ir.types import simplify_dim

    start, end, step = attrs["start"], attrs["end"], attrs["step"]
    toward = step - 1 if step > 0 else step + 1   # ceil((end - start) / step) for either sign of step
    n = simplify_dim(f"(({end}) - ({start}) + {toward}) // {step}") if not (
        isinstance(start, int) and isinstance(end, int)) else len(range(start, end, step))
    return [TensorType((n,), attrs["dtype"])]


def _arange_ref(*, start=0, end, step=1, dtype="int64", device=None):
    return torch.arange(start, end, step, dtype=torch_dtype(dtype), device=device)


def _full_infer(ins, attrs):
    return [TensorType(tuple(attrs["shape"]), attrs["dtype"])]


def _full_ref(*, shape, value, dtype="float32", device=None):
    return torch.full(tuple(shape), value, dtype=torch_dtype(dtype), device=device)


def _creation_cost(ins, attrs, outs):
    return Cost.of(0.0, nbytes(*outs), "data_movement", outs[0].dtype)


# ---- torch fallback ------------------------------------------------------------------------------------

def resolve_aten(target: str):
    """`"aten.triu.default"` -> torch.ops.aten.triu.default."""
    obj: Any = torch.ops
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def aten_op(target: str):
    """The ATen op of a fallback's target name, or None when this torch has no such op."""
    try:
        return resolve_aten(target)
    except (AttributeError, RuntimeError):
        return None


def returns_view(op) -> bool:
    """Whether an ATen op returns a view of an argument without writing to it (slice, select, unbind, .t(), ...):
    a write to its result writes there."""
    schema = getattr(op, "_schema", None)
    return schema is not None and bool(schema.returns) and schema.returns[0].alias_info is not None \
        and not schema.is_mutable


def _rebuild(spec, inputs):
    """Rebuild one argument of a fallback call. Tagged tuples stand for what JSON cannot hold:
    ("$input", i) is the i-th tensor input, ("$dtype", name) a torch dtype, ("$list", items) a list."""
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str) and spec[0].startswith("$"):
        tag, val = spec
        if tag == "$input":
            return inputs[val]
        if tag == "$dtype":
            return torch_dtype(val)
        if tag == "$device":
            return inputs[0].device if inputs else torch.device("cpu")
        if tag == "$list":
            return [_rebuild(s, inputs) for s in val]
    return spec


def op_library(target: str) -> str | None:
    """The Python module that registered a fallback's op when it is not torch's own (`transformers.integrations.moe`
    for "transformers.grouped_mm_fallback.default"): a process must import it before it can run the op. None for
    torch's ops (aten, prims, ...) and where torch does not say."""
    namespace, name = (target.split(".") + [""])[:2]
    if namespace in ("aten", "prims", "prim", "_c10d_functional", "c10d_functional"):
        return None
    try:
        from torch._library.custom_ops import OPDEFS   # ops made with torch.library.custom_op

        return getattr(getattr(OPDEFS.get(f"{namespace}::{name}"), "_init_fn", None), "__module__", None)
    except (ImportError, AttributeError):
        return None


def missing_op_error(target: str, library: str | None = None):
    """The LmforgeError for a fallback whose op this process does not have (a library's custom op)."""
    from lmforge.errors import LmforgeError

    namespace = target.split(".")[0]
    todo = f"`import {library}` (it registers the op)" if library else \
        f"import the library that registers torch ops of namespace {namespace!r}"
    return LmforgeError(f"the graph calls torch op {target}, which this process does not have: {todo} before "
                        "loading or calling the model")


def _fallback_ref(*inputs, target, args, kwargs=()):
    fn = aten_op(target)
    if fn is None:
        raise missing_op_error(target, op_library(target))
    out = fn(*[_rebuild(a, inputs) for a in args], **{k: _rebuild(v, inputs) for k, v in kwargs})
    return tuple(out) if isinstance(out, (list, tuple)) else out


def _fallback_cost(ins, attrs, outs):
    return Cost.of(0.0, nbytes(*ins, *outs), "other", outs[0].dtype if outs else "float32")


def ops() -> list[OpDef]:
    out = [_unary(n, fn, f) for n, (fn, f) in UNARY.items()]
    out += [_binary(n, fn, f) for n, (fn, f) in BINARY.items()]
    out += [_compare(n, fn) for n, fn in COMPARE.items()]
    out += [
        OpDef("gelu", "GELU activation.", {"approximate": attr("str", "none", choices=("none", "tanh"))}, _same_type,
              _gelu_ref, streaming_cost(8, "elementwise")),
        OpDef("pow_scalar", "x ** exponent with a constant exponent (an integral one keeps integer x integral; "
                            "a fractional one makes it float32).", {"exponent": attr("float")}, _pow_scalar_infer,
              _pow_scalar_ref, streaming_cost(1, "elementwise")),
        OpDef("cast", "Convert to another dtype.", {"dtype": attr("dtype")},
              lambda ins, a: [ins[0].with_(dtype=a["dtype"])], _cast_ref, streaming_cost(0, "elementwise")),
        OpDef("where", "where(cond, a, b); a or b may be absent, then a_scalar / b_scalar are used. The "
                       "result dtype follows torch's type promotion of a and b.",
              {"a_scalar": attr("scalar", None), "b_scalar": attr("scalar", None)}, _where_infer, _where_ref,
              streaming_cost(1, "elementwise"), arity=(3, 3)),
        OpDef("tri", "Keep the lower (tril) or upper (triu) triangle from `diagonal`.",
              {"diagonal": attr("int", 0), "upper": attr("bool", False)}, _same_type, _tri_ref,
              streaming_cost(0, "elementwise")),
        _reduction("sum", lambda x, d, k: torch.sum(x, d, keepdim=k)),
        _reduction("mean", lambda x, d, k: torch.mean(x, d, keepdim=k)),
        _reduction("amax", lambda x, d, k: torch.amax(x, d, keepdim=k)),
        _reduction("amin", lambda x, d, k: torch.amin(x, d, keepdim=k)),
        OpDef("argmax", "Index of the maximum along `dim` (None = flattened).",
              {"dim": attr("int", None), "keepdim": attr("bool", False)}, _argmax_infer, _argmax_ref,
              lambda i, a, o: Cost.of(numel(i[0]), nbytes(*i, *o), "reduction", i[0].dtype), op_class="reduction"),
        OpDef("softmax", "softmax (or log_softmax when `log`) along `dim`, computed in fp32 (float64 in float64).",
              {"dim": attr("int", -1), "log": attr("bool", False)}, _same_type, _softmax_ref,
              streaming_cost(5, "reduction"), op_class="reduction"),
        OpDef("reshape", "View with a new shape (dims may be symbolic).", {"shape": attr("dims")}, _reshape_infer,
              _reshape_ref, view_cost, op_class="data_movement"),
        OpDef("permute", "Reorder dimensions.", {"perm": attr("ints")}, _permute_infer, _permute_ref, view_cost,
              op_class="data_movement"),
        OpDef("expand", "Broadcast to a larger shape (-1 keeps a dim).", {"shape": attr("dims")}, _expand_infer,
              _expand_ref, view_cost, op_class="data_movement"),
        OpDef("concat", "Concatenate along `dim` (`inplace`: see the cost rule).",
              {"dim": attr("int"), "inplace": attr("bool", False)}, _concat_infer, _concat_ref, _concat_cost,
              arity=(1, None), op_class="data_movement"),
        OpDef("slice", "x[start:end:step] along `dim` (start/end may be symbolic).",
              {"dim": attr("int"), "start": attr("dim", 0), "end": attr("dim", None), "step": attr("int", 1)},
              _slice_infer, _slice_ref, view_cost, op_class="data_movement"),
        OpDef("select", "x.select(dim, index): drops `dim`.", {"dim": attr("int"), "index": attr("dim")},
              _select_infer, _select_ref, view_cost, op_class="data_movement"),
        OpDef("index_select", "Rows of x at the indices along `dim`.", {"dim": attr("int")}, _index_select_infer,
              _index_select_ref, _gather_cost, arity=(2, 2), op_class="gather"),
        OpDef("arange", "Integers start..end by step (bounds may be symbolic).",
              {"start": attr("dim", 0), "end": attr("dim"), "step": attr("int", 1), "dtype": attr("dtype", "int64")},
              _arange_infer, _arange_ref, _creation_cost, arity=(0, 0), op_class="data_movement"),
        OpDef("full", "A tensor filled with `value`.",
              {"shape": attr("dims"), "value": attr("any"), "dtype": attr("dtype", "float32")},
              _full_infer, _full_ref, _creation_cost, arity=(0, 0), op_class="data_movement"),
        OpDef("torch_fallback", "An ATen op with no IR mapping, run by torch. `target` names it "
                                "(aten.<op>.<overload>); `args`/`kwargs` rebuild the call, ('$input', i) "
                                "standing for the i-th input (see `_rebuild`). Output types are recorded at capture.",
              {"target": attr("str"), "args": attr("any", ()), "kwargs": attr("any", ())}, None, _fallback_ref,
              _fallback_cost, arity=(0, None), op_class="other"),
    ]
    return out
