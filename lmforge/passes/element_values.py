"""What a tensor computed from sizes holds, element by element: a small abstract interpreter over the graph IR.

Each value is described as `Elems`: `(value, condition)` cases over the value's index variables `INDEX[:rank]`
(`_i0`, `_i1`, ...) and the graph's symbolic dims, in sympy. `arange(end=n)` holds `_i0`; a reshape that adds or
drops unit dims, an expand, permute, slice or select renames indices; elementwise ops combine cases
(symbolically for integer and Boolean values, through the op's torch reference for constant ones, so float
values get torch's exact promotion and rounding); concat, `tri`, `where`, and the torch fallbacks `aten.diff`,
`aten.index.Tensor` (a gather at index values proven non-negative), `aten.cumsum` of a constant,
`aten.masked_fill` and `aten.bitwise_not` are modelled too. Graph inputs and parameters are opaque, and so is
every op without a rule: what depends on them is unknown (None). Nothing is evaluated at sample sizes, so what
is derived holds for every size.

    %a = arange(; end='seq'); %q = reshape(%a; [seq, 1]); %k = reshape(%a; [1, seq]); %m = le(%k, %q)
    elements_of(%m)  ->  Elems(kind='bool', shape=('seq', 'seq'), cases=((_i1 <= _i0, True),))

`lmforge.passes.masks` uses it to prove that an attention mask is the causal mask.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import product
from typing import Callable

import sympy
import torch

from lmforge.ir.graph import Node, Value
from lmforge.ir.ops import get_op
from lmforge.ir.types import TensorType, parse_dim, torch_dtype

_MAX_CASES = 16
_MAX_DEPTH = 64   # ops between a value and the sizes it is built from (masks take ~20; a residual stream more)
INDEX = tuple(sympy.Dummy(f"_i{d}", integer=True, nonnegative=True) for d in range(8))
TRUE, FALSE = sympy.true, sympy.false


class _Unknown(Exception):
    """The interpreter does not model this: the value is unknown."""


@dataclass(frozen=True)
class Elems:
    """What a tensor holds, element by element: `cases` ((value, condition), ...) with conditions that are disjoint
    and cover every index. Values and conditions are sympy expressions over the index variables `INDEX[:rank]` and
    the symbolic dims: integers ("int"), Booleans ("bool"), or Python floats ("float": constants only)."""

    kind: str
    dtype: str
    shape: tuple
    cases: tuple


def _kind(dtype: str) -> str | None:
    if dtype == "bool":
        return "bool"
    if dtype.startswith(("int", "uint")):
        return "int"
    if dtype.startswith(("float", "bfloat")):
        return "float"
    return None


def size_expr(d) -> sympy.Expr:
    """A dim (int, symbolic string or already sympy) as a sympy expression."""
    return d if isinstance(d, sympy.Basic) else sympy.Integer(d) if isinstance(d, int) else parse_dim(d)


def holds(rel) -> bool:
    """Whether a sympy relation holds for every value of the symbols (dims are non-negative integers)."""
    return rel is TRUE or rel is True


def _concrete(v) -> bool:
    return isinstance(v, (bool, float)) or v in (TRUE, FALSE) or isinstance(v, sympy.Integer)


def _python(v):
    if v is TRUE or v is FALSE:
        return bool(v)
    return int(v) if isinstance(v, sympy.Integer) else v


def _value(v, kind: str):
    """A torch/Python scalar as a case value of `kind`."""
    if kind == "bool":
        return sympy.true if v else sympy.false
    return sympy.Integer(int(v)) if kind == "int" else float(v)


def _const(v, dtype: str) -> Elems | None:
    if isinstance(v, str):
        v = parse_dim(v)
    elif isinstance(v, (bool, int, float)):
        v = _value(v, _kind(dtype))
    else:
        return None
    return Elems(_kind(dtype), dtype, (), ((v, TRUE),))


# ---- case bookkeeping ----------------------------------------------------------------------------------

def linear_form(expr, syms):
    """(integer coefficient per index symbol, rest) when `expr` is linear in `syms` with constant coefficients."""
    e = sympy.expand(expr)
    coefs = {}
    for s in syms:
        c = e.coeff(s, 1)
        if c != 0:
            if not c.is_Integer:
                return None
            coefs[s] = int(c)
    rest = sympy.expand(e - sum(c * s for s, c in coefs.items()))
    if rest.free_symbols & set(syms):
        return None
    return coefs, rest


def box_bounds(expr, sizes: dict):
    """(min, max) of `expr` over the box 0 <= s < sizes[s] of its index symbols; None if not linear in them."""
    syms = [s for s in expr.free_symbols if s in INDEX]
    if any(s not in sizes for s in syms):
        return None
    lin = linear_form(expr, syms)
    if lin is None:
        return None
    coefs, lo = lin
    hi = lo
    for s, c in coefs.items():
        top = c * (sizes[s] - 1)
        lo, hi = (lo, hi + top) if c > 0 else (lo + top, hi)
    return lo, hi


def _pin(value, cond):
    """`value` with each index symbol that `cond` pins to one value (e.g. `_i1 < 1` pins _i1 to 0) replaced by it."""
    if not isinstance(value, sympy.Basic) or not value.free_symbols & set(INDEX):
        return value
    atoms = cond.args if isinstance(cond, sympy.And) else (cond,)
    lows: dict = {}
    highs: dict = {}
    for a in atoms:
        if not isinstance(a, (sympy.Le, sympy.Lt, sympy.Ge, sympy.Gt, sympy.Eq)):
            continue
        syms = [s for s in (a.lhs - a.rhs).free_symbols if s in INDEX]
        lin = linear_form(a.lhs - a.rhs, syms) if len(syms) == 1 else None
        if lin is None or abs(lin[0][syms[0]]) != 1:
            continue
        s, sign, rest = syms[0], lin[0][syms[0]], lin[1]
        bound = -rest * sign                       # the relation reads  sign * (s - bound) REL 0
        strict = isinstance(a, (sympy.Lt, sympy.Gt))
        upper = isinstance(a, (sympy.Le, sympy.Lt)) == (sign > 0)
        if isinstance(a, sympy.Eq):
            lows.setdefault(s, []).append(bound)
            highs.setdefault(s, []).append(bound)
        elif upper:
            highs.setdefault(s, []).append(bound - 1 if strict else bound)
        else:
            lows.setdefault(s, []).append(bound + 1 if strict else bound)
    pins = {}
    for s, his in highs.items():
        for hi in his:
            if any(sympy.expand(hi - lo) == 0 for lo in [sympy.Integer(0), *lows.get(s, [])]):
                pins[s] = hi
    return value.xreplace(pins) if pins else value


_SYMBOLIC_INT = 2 ** 31   # sizes are taken below 2**31: int64 index arithmetic with smaller constants cannot wrap


def _int_safe(v, dtype: str) -> bool:
    """Whether an integer case value is exact as unbounded sympy arithmetic: a constant (torch computed it), or an
    index-dependent int64 value whose integer constants are small enough that no size below 2**31 overflows it."""
    if not isinstance(v, sympy.Basic) or not v.free_symbols:
        return True
    return dtype == "int64" and all(abs(int(a)) < _SYMBOLIC_INT for a in v.atoms(sympy.Integer))


def _make(kind: str, dtype: str, shape, cases) -> Elems | None:
    """Normalized cases: values simplified under their condition, false conditions dropped, equal values merged."""
    merged: dict = {}
    for v, c in cases:
        if c is FALSE or c is False:
            continue
        if kind == "int":
            v = sympy.expand(_pin(v, c))
            if not _int_safe(v, dtype):
                return None
        elif kind == "bool":
            v = _pin(v, c)
            v, c = sympy.And(v, c), TRUE  # a bool is one Boolean: True where (value and condition)
        key = (v, math.copysign(1.0, v)) if isinstance(v, float) else v   # 0.0 and -0.0 stay apart
        merged[key] = sympy.Or(merged[key], c) if key in merged else c
    if kind == "bool":
        merged = {sympy.Or(*merged): TRUE} if merged else {FALSE: TRUE}
    if len(merged) == 1:
        merged = {next(iter(merged)): TRUE}
    if len(merged) > _MAX_CASES:
        return None
    items = tuple((k[0] if isinstance(k, tuple) else k, c) for k, c in merged.items())
    return Elems(kind, dtype, tuple(shape), items)


def read_at(e: Elems, index) -> tuple:
    """e's cases read at `index` (one expression per dim of e, over the reader's index symbols)."""
    sub = {INDEX[d]: x for d, x in enumerate(index)}
    return tuple((v.xreplace(sub) if isinstance(v, sympy.Basic) else v, c.xreplace(sub)) for v, c in e.cases)


def _broadcast_index(shape, out_shape) -> list:
    """The index of a tensor of `shape` broadcast to `out_shape` (right-aligned; size-1 dims read index 0)."""
    off = len(out_shape) - len(shape)
    for d, s in enumerate(shape):
        if s != 1 and sympy.expand(size_expr(s) - size_expr(out_shape[d + off])) != 0:
            raise _Unknown   # a symbolic size that might be 1 at run time (and then broadcast)
    return [sympy.Integer(0) if s == 1 else INDEX[d + off] for d, s in enumerate(shape)]


def _boolean(v, c):
    """Cases of any kind as Boolean (value != 0) cases."""
    return (v if isinstance(v, sympy.logic.boolalg.Boolean) else sympy.Ne(v, 0)), c


def _as_numbers(cases, kind: str):
    """Cases of `kind`; bool ones as 0 / 1 integer cases, where arithmetic needs numbers."""
    if kind != "bool":
        return list(cases)
    (b, c), = cases
    return [(sympy.Integer(1), sympy.And(b, c)), (sympy.Integer(0), sympy.And(sympy.Not(b), c))]


# ---- rules: node, input elems -> output elems ------------------------------------------------------------

_SYMBOLIC: dict[str, Callable] = {
    "add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b, "neg": lambda a: -a,
    "maximum": sympy.Max, "minimum": sympy.Min, "eq": sympy.Eq, "ne": sympy.Ne, "lt": sympy.Lt, "le": sympy.Le,
    "gt": sympy.Gt, "ge": sympy.Ge, "logical_and": sympy.And, "logical_or": sympy.Or, "logical_not": sympy.Not,
}
_LOGICAL = {"logical_and", "logical_or", "logical_not"}
_COMPARE = {"eq", "ne", "lt", "le", "gt", "ge"}


def _elementwise(node: Node, ins: list, out: TensorType) -> Elems | None:
    """add/sub/mul/div/neg/maximum/minimum, comparisons, logical ops and cast: constant cases through the op's torch
    reference (torch's exact promotion and rounding), index-dependent integer / Boolean cases through sympy."""
    attrs = node.attr
    tensors = [x for x in node.inputs if x is not None]
    operands = [e for x, e in zip(node.inputs, ins) if x is not None]
    scalar = None
    if attrs.get("scalar") is not None and len(operands) == 1:
        scalar = _const(attrs["scalar"], "float32" if isinstance(attrs["scalar"], float) else "int64")
    if any(e is None for e in operands) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("scalar") is not None \
            and scalar is None:
        return None
    kind = _kind(out.dtype)
    elems = operands + ([scalar] if scalar else [])
    # bools enter arithmetic, comparisons and casts as 0 / 1 (the reference reads them back as bools)
    kinds = [e.kind if node.op in _LOGICAL or e.kind != "bool" else "int" for e in elems]
    per_operand = [read_at(e, _broadcast_index(e.shape, out.shape)) for e in elems]
    per_operand = [_as_numbers(cs, e.kind) if k != e.kind else cs for cs, e, k in zip(per_operand, elems, kinds)]
    swap = scalar is not None and attrs.get("swap")
    cases = []
    for combo in product(*per_operand):
        vals, cond = [v for v, _ in combo], sympy.And(*(c for _, c in combo))
        if all(_concrete(v) for v in vals):
            args = [torch.tensor([_python(v)], dtype=torch_dtype(x.type.dtype)) for v, x in zip(vals, tensors)]
            cases.append((_value(get_op(node.op).reference(*args, **attrs).item(), kind), cond))
            continue
        got = _symbolic(node.op, kinds[::-1] if swap else kinds, combo[::-1] if swap else combo, kind)
        if got is None:
            return None
        cases += [(v, sympy.And(cond, c)) for v, c in got]
    return _make(kind, out.dtype, out.shape, cases)


def _symbolic(op, kinds, combo, kind):
    """[(value, condition)] of one combination of index-dependent integer / Boolean cases (of `kinds`), or None."""
    vals = [v for v, _ in combo]
    if op in _LOGICAL or op == "cast" and kind == "bool":
        return [(_SYMBOLIC.get(op, lambda b: b)(*(_boolean(v, TRUE)[0] for v in vals)), TRUE)]
    if op == "cast":
        return [(vals[0], TRUE)] if kind == "int" and kinds[0] == "int" else None
    if op not in _SYMBOLIC or kind == "float" or any(k != "int" for k in kinds) or kind == "bool" and \
            op not in _COMPARE:
        return None
    return [(_SYMBOLIC[op](*vals), TRUE)]


def _where(node, ins, out):
    cond, a, b = ins
    attrs = node.attr
    a = a if node.inputs[1] is not None else _const(attrs["a_scalar"], out.dtype)
    b = b if node.inputs[2] is not None else _const(attrs["b_scalar"], out.dtype)
    return _select_cases(cond, a, b, out)


def _select_cases(cond, a, b, out):
    """where(cond, a, b) with a and b converted to out's dtype."""
    if cond is None or a is None or b is None:
        return None
    (c, _), = _make("bool", "bool", cond.shape, [_boolean(v, k) for v, k in cond.cases]).cases
    c = c.xreplace({INDEX[d]: x for d, x in enumerate(_broadcast_index(cond.shape, out.shape))})
    kind = _kind(out.dtype)
    cases = []
    for side, keep in ((a, c), (b, sympy.Not(c))):
        for v, k in _convert(side, out):
            cases.append((v, sympy.And(k, keep)))
    return _make(kind, out.dtype, out.shape, cases)


def _convert(e: Elems, out: TensorType):
    """e's cases read at out's index and converted to out's dtype; raises _Unknown where that is not modelled."""
    kind = _kind(out.dtype)
    cases = read_at(e, _broadcast_index(e.shape, out.shape))
    if e.kind == kind and e.dtype == out.dtype:
        return cases
    conv = []
    for v, c in _as_numbers(cases, e.kind) if kind != "bool" else cases:
        if _concrete(v):
            x = torch.tensor([_python(v)], dtype=torch_dtype(e.dtype)).to(torch_dtype(out.dtype)).item()
            conv.append((_value(x, kind), c))
        elif kind == "int" and e.kind == "int":
            conv.append((v, c))
        elif kind == "bool":
            conv.append(_boolean(v, c))
        else:
            raise _Unknown
    return conv


def _tri(node, ins, out):
    (x,) = ins
    if x is None:
        return None
    r, c = INDEX[len(out.shape) - 2], INDEX[len(out.shape) - 1]
    d = node.attr["diagonal"]
    keep = (c - r >= d) if node.attr["upper"] else (c - r <= d)
    zero = {"bool": FALSE, "int": sympy.Integer(0), "float": 0.0}[x.kind]
    cases = [(v, sympy.And(k, keep)) for v, k in x.cases] + [(zero, sympy.Not(keep))]
    return _make(x.kind, x.dtype, out.shape, cases)


def _arange(node, ins, out):
    a = node.attr
    if _kind(a["dtype"]) != "int":
        return None
    return _make("int", out.dtype, out.shape, [(size_expr(a["start"]) + a["step"] * INDEX[0], TRUE)])


def _full(node, ins, out):
    v = node.attr["value"]
    if not isinstance(v, (bool, int, float)) or _kind(out.dtype) is None:
        return None
    x = torch.tensor([v], dtype=torch_dtype(out.dtype)).item()
    return _make(_kind(out.dtype), out.dtype, out.shape, [(_value(x, _kind(out.dtype)), TRUE)])


def _view(index_of):
    """A rule for an op that only moves elements: `index_of(node, x_shape, out_shape)` gives x's index in terms
    of the output's index symbols (or None)."""
    def rule(node, ins, out):
        x = ins[0]
        if x is None:
            return None
        index = index_of(node, [size_expr(d) for d in node.inputs[0].type.shape], [size_expr(d) for d in out.shape])
        if index is None:
            return None
        return _make(x.kind, x.dtype, out.shape, read_at(x, index))

    return rule


def _reshape_index(node, shape, out_shape):
    """Reshapes that insert or drop size-1 dims only."""
    ins = [d for d, s in enumerate(shape) if s != 1]
    outs = [d for d, s in enumerate(out_shape) if s != 1]
    if len(ins) != len(outs) or any(sympy.expand(shape[i] - out_shape[o]) != 0 for i, o in zip(ins, outs)):
        return None
    index = [sympy.Integer(0)] * len(shape)
    for i, o in zip(ins, outs):
        index[i] = INDEX[o]
    return index


def _start(x, size):
    """A slice start or select index as torch reads it: a negative int counts from the end; a symbolic one must
    be provably non-negative."""
    e = parse_dim(x) if isinstance(x, str) else sympy.Integer(x) if x >= 0 else size + x
    return e if holds(e >= 0) else None   # torch clamps a slice start below 0 to 0


def _slice_index(node, shape, out_shape):
    d = node.attr["dim"] % len(shape)
    start = _start(node.attr["start"], shape[d])
    if start is None:
        return None
    return [start + node.attr["step"] * INDEX[i] if i == d else INDEX[i] for i in range(len(shape))]


def _select_index(node, shape, out_shape):
    d = node.attr["dim"] % len(shape)
    at = _start(node.attr["index"], shape[d])
    if at is None:
        return None
    return [INDEX[i] for i in range(d)] + [at] + [INDEX[i] for i in range(d, len(out_shape))]


def _permute_index(node, shape, out_shape):
    perm = [p % len(shape) for p in node.attr["perm"]]
    index = [None] * len(shape)
    for o, p in enumerate(perm):
        index[p] = INDEX[o]
    return index


def _concat_cases(pieces, shapes, dim):
    """Cases of cat(pieces) along `dim`: piece k where its offset <= i < offset + its size."""
    cases, off = [], sympy.Integer(0)
    i = INDEX[dim]
    for e, shape in zip(pieces, shapes):
        n = shape[dim]
        at = sympy.Integer(0) if n == 1 else i - off
        index = [at if d == dim else (sympy.Integer(0) if s == 1 else INDEX[d]) for d, s in enumerate(shape)]
        inside = sympy.And(i >= off, i < off + n)
        cases += [(v, sympy.And(c, inside)) for v, c in read_at(e, index)]
        off = off + n
    return cases


def _concat(node, ins, out):
    if any(e is None or e.kind != ins[0].kind for e in ins):
        return None
    shapes = [[size_expr(d) for d in v.type.shape] for v in node.inputs]
    dim = node.attr["dim"] % len(out.shape)
    return _make(ins[0].kind, out.dtype, out.shape, _concat_cases(ins, shapes, dim))


# ---- torch_fallback ops --------------------------------------------------------------------------------

def _fallback(node, ins, out):
    rule = _FALLBACKS.get(node.attr["target"])
    return None if rule is None else rule(node, ins, out, list(node.attr["args"]), dict(node.attr["kwargs"]))


def _arg(spec, ins):
    """An argument of a fallback call: an input's elems for ('$input', i), else the literal."""
    if isinstance(spec, tuple) and len(spec) == 2 and spec[0] == "$input":
        return ins[spec[1]]
    return spec


def _diff(node, ins, out, args, kwargs):
    """aten.diff(x, n=1, dim=-1, prepend, append) = y[i + 1] - y[i] along dim, y = cat(prepend, x, append)."""
    names = ("self", "n", "dim", "prepend", "append")
    a = {**dict(zip(names, args)), **kwargs}
    if a.get("n", 1) != 1 or out.dtype == "bool":
        return None
    parts = [(a[k], node.inputs[a[k][1]]) for k in ("prepend", "self", "append") if a.get(k) is not None]
    pieces = [ins[spec[1]] for spec, _ in parts]
    if any(e is None or e.kind != "int" for e in pieces):
        return None
    dim = a.get("dim", -1) % len(out.shape)
    shapes = [[size_expr(d) for d in v.type.shape] for _, v in parts]
    y = _make("int", out.dtype, shapes[0][:dim] + [sum(s[dim] for s in shapes)] + shapes[0][dim + 1:],
              _concat_cases(pieces, shapes, dim))
    if y is None:
        return None
    nxt = read_at(y, [INDEX[d] + 1 if d == dim else INDEX[d] for d in range(len(out.shape))])
    cases = [(v1 - v0, sympy.And(c1, c0)) for (v1, c1), (v0, c0) in product(nxt, y.cases)]
    return _make("int", out.dtype, out.shape, cases)


def _cumsum(node, ins, out, args, kwargs):
    """aten.cumsum of a constant tensor only: c * (i + 1) along dim."""
    x, dim = _arg(args[0], ins), kwargs.get("dim", args[1] if len(args) > 1 else None)
    if x is None or dim is None or len(x.cases) != 1 or _kind(out.dtype) != "int":
        return None
    v = x.cases[0][0]
    if not _concrete(v) or isinstance(v, float):
        return None
    return _make("int", out.dtype, out.shape, [(int(_python(v)) * (INDEX[dim % len(out.shape)] + 1), TRUE)])


def _index(node, ins, out, args, kwargs):
    """aten.index.Tensor(x, [i0, i1, ...]) with index tensors for x's leading dims: x[i0[j], i1[j], ...] at j,
    the index values proven non-negative (a negative one would count from the end)."""
    x, idx = _arg(args[0], ins), args[1]
    if x is None or not (isinstance(idx, tuple) and idx[0] == "$list"):
        return None
    specs = idx[1]
    if any(not (isinstance(s, tuple) and s[0] == "$input") for s in specs):
        return None
    index_vals = [node.inputs[s[1]] for s in specs]
    m, xrank = len(specs), len(node.inputs[args[0][1]].type.shape)
    rb = len(out.shape) - (xrank - m)
    if m > xrank or rb < 0:
        return None
    bshape = out.shape[:rb]
    sizes = {INDEX[d]: size_expr(s) for d, s in enumerate(out.shape)}
    choices = []
    for spec, v in zip(specs, index_vals):
        e = ins[spec[1]]
        if e is None or e.kind != "int":
            return None
        cases = read_at(e, _broadcast_index([size_expr(d) for d in v.type.shape], [size_expr(d) for d in bshape]))
        for val, _ in cases:
            b = box_bounds(val, sizes)
            if b is None or not holds(b[0] >= 0):
                return None
        choices.append(cases)
    result = []
    for pick in product(*choices):
        index = [val for val, _ in pick] + [INDEX[rb + j] for j in range(xrank - m)]
        cond = sympy.And(*(c for _, c in pick))
        result += [(v, sympy.And(c, cond)) for v, c in read_at(x, index)]
    return _make(x.kind, out.dtype, out.shape, result)


def _masked_fill(node, ins, out, args, kwargs):
    """aten.masked_fill.Scalar(x, mask, value) = where(mask, value, x)."""
    x, mask, value = _arg(args[0], ins), _arg(args[1], ins), args[2]
    if not isinstance(value, (bool, int, float)):
        return None
    return _select_cases(mask, _const(value, out.dtype), x, out)


def _bitwise_not(node, ins, out, args, kwargs):
    x = _arg(args[0], ins)
    if x is None or x.kind != "bool":
        return None
    return _make("bool", "bool", out.shape, [(sympy.Not(v), c) for v, c in x.cases])


_FALLBACKS = {"aten.diff.default": _diff, "aten.cumsum.default": _cumsum, "aten.index.Tensor": _index,
              "aten.masked_fill.Scalar": _masked_fill, "aten.bitwise_not.default": _bitwise_not}

_RULES: dict[str, Callable] = {
    **{op: _elementwise for op in (*_SYMBOLIC, "cast", "div")},
    "where": _where, "tri": _tri, "arange": _arange, "full": _full, "concat": _concat,
    "reshape": _view(_reshape_index), "expand": _view(lambda n, s, o: _broadcast_index(s, o)),
    "permute": _view(_permute_index), "slice": _view(_slice_index), "select": _view(_select_index),
    "torch_fallback": _fallback,
}


def elements_of(v: Value, producers: dict, memo: dict, depth: int = 0) -> Elems | None:
    """The element-wise description of v (None: unknown, e.g. it reads a graph input's data or a weight).
    `producers` is the graph's value name -> node map; `memo` caches descriptions across calls on one graph."""
    if v.name in memo:
        return memo[v.name]
    memo[v.name] = None
    node = producers.get(v.name)
    if node is None or len(node.outputs) != 1 or node.regions or node.op not in _RULES or depth > _MAX_DEPTH:
        return None
    if _kind(v.type.dtype) is None or len(v.type.shape) > len(INDEX):
        return None
    ins = [None if x is None else elements_of(x, producers, memo, depth + 1) for x in node.inputs]
    try:
        memo[v.name] = _RULES[node.op](node, ins, v.type)
    except (_Unknown, TypeError, ValueError, ArithmeticError, RuntimeError, KeyError, IndexError):
        memo[v.name] = None
    return memo[v.name]
