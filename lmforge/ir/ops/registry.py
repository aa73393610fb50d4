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
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from lmforge.errors import UnsupportedOpError, VerifyError
from lmforge.ir.cost import Cost
from lmforge.ir.types import TensorType, itemsize

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

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED


def attr(kind: str, default: Any = _REQUIRED, doc: str = "") -> AttrSpec:
    assert kind in ATTR_KINDS, kind
    return AttrSpec(kind, default, doc)


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
        """Fill defaults and reject unknown or missing attributes with a message naming the op."""
        unknown = set(attrs) - set(self.attrs)
        if unknown:
            raise VerifyError(f"op {self.name!r} has no attribute(s) {sorted(unknown)}; "
                              f"it takes {sorted(self.attrs) or 'none'}")
        out = {}
        for k, spec in self.attrs.items():
            if k in attrs:
                out[k] = attrs[k]
            elif spec.required:
                raise VerifyError(f"op {self.name!r} needs attribute {k!r} ({spec.kind}) {spec.doc}".rstrip())
            else:
                out[k] = spec.default
        return out

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
