"""The op registry: every IR op is defined once, here or in a sibling module listed in `_FAMILIES`.

An `OpDef` holds everything lmforge knows about an op:
- `attrs`: the attribute schema (name -> AttrSpec with kind and default);
- `infer`: the type rule (input types, attrs -> output types);
- `reference`: the torch implementation, the ground truth of every numerics test;
- `cost`: FLOPs and bytes moved (a `Cost`) for concrete input/output types.

Backends claim ops by name (see `lmforge.backends`); the torch reference runs what nobody claims.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from lmforge.errors import UnsupportedOpError, VerifyError
from lmforge.ir.cost import Cost
from lmforge.ir.types import DTYPES, TensorType, dim_symbols, itemsize, parse_dim

_REQUIRED = object()

# Attribute kinds. "dim"/"dims" may hold symbolic dimensions (str) evaluated at run time, and so may
# "scalar" (a number, or a symbolic size used as a number, e.g. `positions + past`).
ATTR_KINDS = ("int", "float", "bool", "str", "dim", "dims", "scalar", "ints", "floats", "dtype", "any")
SYMBOLIC_KINDS = ("dim", "dims", "scalar")


@dataclass(frozen=True)
class AttrSpec:
    kind: str
    default: Any = _REQUIRED
    doc: str = ""
    choices: tuple | None = None  # the only values a "str" attribute may take, where it is an enum

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED

    def problem(self, value: Any) -> str | None:
        """Why `value` is not of this attribute's kind (a phrase naming the kind expected), or None when it is.

        Checked by `OpDef.normalize_attrs`, so a graph read from JSON with `causal: "false"` or `bits: "4"` fails
        `verify()` instead of running (a non-empty string is truthy) or crashing in a cost rule. None is allowed
        only where it is the default (an optional attribute left unset).
        """
        if value is None and not self.required and self.default is None:
            return None
        if self.choices is not None and value not in self.choices:
            return f"one of {list(self.choices)}"
        check, expected = _KIND_CHECKS[self.kind]
        return None if check(value) else expected


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_float(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _is_dim(v) -> bool:
    if _is_int(v):
        return True
    if not isinstance(v, str):
        return False
    try:
        parse_dim(v)
    except Exception:  # sympy raises SympifyError, SyntaxError, TypeError, ... for what is not an expression
        return False
    return True


def _tuple_of(check):
    return lambda v: isinstance(v, (tuple, list)) and all(check(x) for x in v)


# kind -> (check, the kind named in an error message)
_KIND_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "int": (_is_int, "an int (not a bool or a string)"),
    "float": (_is_float, "a number (int or float, not a bool or a string)"),
    "bool": (lambda v: isinstance(v, bool), "a bool (True or False, not a string or a number)"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "dim": (_is_dim, "a dimension: an int or a symbolic expression such as 'past + 1'"),
    "dims": (_tuple_of(_is_dim), "a tuple of dimensions (ints or symbolic expressions)"),
    # torch takes a Python int operand only within int64 (2**70 raised a raw OverflowError in type promotion)
    "scalar": (lambda v: isinstance(v, bool) or (_is_int(v) and -2**63 <= v < 2**63)
               or (_is_float(v) and not _is_int(v)) or (isinstance(v, str) and _is_dim(v)),
               "a number (an int within int64), a bool or a symbolic expression"),
    "ints": (_tuple_of(_is_int), "a tuple of ints"),
    "floats": (_tuple_of(_is_float), "a tuple of numbers"),
    "dtype": (lambda v: isinstance(v, str) and v in DTYPES, f"a dtype name, one of {sorted(DTYPES)}"),
    "any": (lambda v: True, "anything"),
}


def attr(kind: str, default: Any = _REQUIRED, doc: str = "", choices: Sequence | None = None) -> AttrSpec:
    assert kind in ATTR_KINDS, kind
    return AttrSpec(kind, default, doc, None if choices is None else tuple(choices))


@dataclass(frozen=True)
class OpDef:
    """One op: schema, type rule, torch reference and cost. See the module docstring."""

    name: str
    doc: str
    attrs: Mapping[str, AttrSpec]
    infer_fn: Callable[..., Sequence[TensorType]] | None
    reference: Callable[..., Any]
    cost_fn: Callable[[list, dict, tuple], Cost]
    arity: tuple[int, int | None] = (1, 1)  # (min, max) number of inputs; max None = variadic
    op_class: str = "elementwise"
    kind: str = "tensor"  # "tensor"; "region" (a tensor op with a body graph); "program" (decoding, compound)
    num_outputs: Callable[[dict], int] = field(default=lambda attrs: 1)

    def normalize_attrs(self, attrs: Mapping[str, Any]) -> dict[str, Any]:
        """Fill defaults and reject unknown or missing attributes, or values not of their kind, naming the op."""
        unknown = set(attrs) - set(self.attrs)
        if unknown:
            raise VerifyError(f"op {self.name!r} has no attribute(s) {sorted(unknown)}; "
                              f"it takes {sorted(self.attrs) or 'none'}")
        out = {}
        for k, spec in self.attrs.items():
            if k in attrs:
                expected = spec.problem(attrs[k])
                if expected is not None:
                    raise VerifyError(f"op {self.name!r}: attribute {k!r} = {attrs[k]!r} is not {expected}")
                out[k] = attrs[k]
            elif spec.required:
                raise VerifyError(f"op {self.name!r} needs attribute {k!r} ({spec.kind}) {spec.doc}".rstrip())
            else:
                out[k] = spec.default
        return out

    def size_symbols(self, attrs: Mapping[str, Any]) -> set[str]:
        """The size symbols its symbolic attributes use (a `scalar` of "-s + t" uses s and t): code that runs the
        node must bind them."""

        def symbols(value) -> set[str]:
            if isinstance(value, str):
                return dim_symbols(value)
            if isinstance(value, (tuple, list)):
                return set().union(*(symbols(x) for x in value))
            return set()

        return set().union(*(symbols(v) for k, v in attrs.items()
                             if k in self.attrs and self.attrs[k].kind in SYMBOLIC_KINDS))

    def check_arity(self, n: int) -> None:
        lo, hi = self.arity
        if n < lo or (hi is not None and n > hi):
            want = f"{lo}" if lo == hi else f"{lo}..{hi if hi is not None else 'n'}"
            raise VerifyError(f"op {self.name!r} takes {want} inputs, got {n}")

    def infer(self, in_types: Sequence[TensorType | None], attrs: Mapping[str, Any], regions=()) -> tuple:
        if self.infer_fn is None:
            raise VerifyError(f"op {self.name!r} has no type rule: give its output types explicitly")
        self.check_arity(len(in_types))
        attrs = self.normalize_attrs(attrs)
        out = self.infer_fn(list(in_types), attrs, *(() if self.kind == "tensor" else (regions,)))
        return tuple(out) if isinstance(out, (list, tuple)) else (out,)

    def cost(self, in_types: Sequence[TensorType | None], attrs: Mapping[str, Any],
             out_types: Sequence[TensorType] | None = None) -> Cost:
        """FLOPs and bytes for concrete (all-int) types. Output types are inferred when not given."""
        attrs = self.normalize_attrs(attrs)
        if out_types is None:
            out_types = self.infer(in_types, attrs)
        return self.cost_fn(list(in_types), attrs, tuple(out_types))


# ---- helpers shared by the op families ---------------------------------------------------------------

def nbytes(*types: TensorType | None) -> float:
    return float(sum(t.numel() * itemsize(t.dtype) for t in types if t is not None))


def numel(t: TensorType) -> int:
    return t.numel()


def streaming_cost(flops_per_elem: float, op_class: str):
    """Cost rule of an op that reads its inputs once and writes its outputs once."""

    def rule(ins, attrs, outs):
        flops = flops_per_elem * sum(numel(o) for o in outs)
        return Cost.of(flops, nbytes(*ins, *outs), op_class, _compute_dtype(ins, outs))

    return rule


def view_cost(ins, attrs, outs) -> Cost:
    """Views (reshape, permute, slice, expand) move no bytes: their consumer reads through them."""
    return Cost.of(0.0, 0.0, "data_movement", outs[0].dtype if outs else "float32")


def _compute_dtype(ins, outs) -> str:
    for t in (*ins, *outs):
        if t is not None and t.dtype.startswith(("float", "bfloat")):
            return t.dtype
    return "float32"


def broadcast_shapes(*shapes: Sequence) -> tuple:
    """Numpy broadcasting over possibly symbolic dims (a symbol against a constant > 1 takes the constant)."""
    rank = max(len(s) for s in shapes)
    out = []
    for i in range(rank):
        dims = [s[len(s) - rank + i] for s in shapes if len(s) - rank + i >= 0]
        d = 1
        for x in dims:
            if x == 1 or x == d:
                continue
            if d == 1:
                d = x
            elif isinstance(d, str) and isinstance(x, int):
                d = x
            elif isinstance(d, int) and isinstance(x, str):
                continue
            elif isinstance(d, str) and isinstance(x, str):
                continue  # two symbols: equal at run time by the capture's guards
            else:
                raise VerifyError(f"shapes {[tuple(s) for s in shapes]} do not broadcast")
        out.append(d)
    return tuple(out)


def dims_conflict(a, b) -> bool:
    """Whether two dimensions are known to differ: both static and unequal. A symbol may take any value at run
    time (the capture's guards keep it consistent), so it conflicts with nothing here."""
    return isinstance(a, int) and isinstance(b, int) and a != b


def norm_dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


class Registry:
    def __init__(self):
        self._ops: dict[str, OpDef] = {}

    def add(self, op: OpDef) -> None:
        if op.name in self._ops:
            raise ValueError(f"op {op.name!r} is defined twice")
        self._ops[op.name] = op

    def get(self, name: str) -> OpDef:
        try:
            return self._ops[name]
        except KeyError:
            raise UnsupportedOpError(f"unknown op {name!r}: it is not in lmforge's op registry "
                                     f"({len(self._ops)} ops; `lmforge.ir.ops.all_ops()` lists them)") from None

    def __contains__(self, name: str) -> bool:
        return name in self._ops

    def names(self) -> list[str]:
        return sorted(self._ops)


def prod(xs) -> int:
    return math.prod(xs)
