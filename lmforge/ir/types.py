"""Types of IR values: tensors with (possibly symbolic) shapes, a dtype and optional annotations.

A dimension is an `int` or a `str` naming a symbol (`"batch"`) or an expression over symbols
(`"past + 1"`). Symbolic dimensions are bound from the graph inputs' shapes at run time and evaluated
with `eval_dim`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Mapping, Union

import sympy
import torch

Dim = Union[int, str]

# dtype name -> (bytes per element, torch dtype or None for sub-byte storage formats)
DTYPES: dict[str, tuple[float, Any]] = {
    "float64": (8, torch.float64),
    "float32": (4, torch.float32),
    "float16": (2, torch.float16),
    "bfloat16": (2, torch.bfloat16),
    "float8_e4m3fn": (1, torch.float8_e4m3fn),
    "int64": (8, torch.int64),
    "int32": (4, torch.int32),
    "int16": (2, torch.int16),
    "int8": (1, torch.int8),
    "uint8": (1, torch.uint8),
    "int4": (0.5, None),
    "bool": (1, torch.bool),
}
_SHORT = {"float64": "f64", "float32": "f32", "float16": "f16", "bfloat16": "bf16", "float8_e4m3fn": "f8e4m3",
          "int64": "i64", "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8", "int4": "i4", "bool": "bool"}


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.float32` -> `"float32"`."""
    for name, (_, td) in DTYPES.items():
        if td == dtype:
            return name
    raise ValueError(f"dtype {dtype} has no IR name")


def torch_dtype(name: str) -> torch.dtype:
    td = DTYPES[name][1]
    if td is None:
        raise ValueError(f"{name} is a storage format with no torch dtype")
    return td


def itemsize(name: str) -> float:
    return DTYPES[name][0]


# The one NaN object frozen values hold: NaN != NaN, but tuples compare items by identity first, so attrs and
# meta holding this object compare equal after a JSON round trip (which makes a new float NaN).
_NAN = float("nan")


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, float) and value != value:
        return _NAN
    return value


def json_value(value: Any) -> Any:
    """A frozen value as strict JSON: tuples become lists, inf / -inf / NaN become {"float": "inf"} (json.dumps
    would write the bare words Infinity / NaN, which are not JSON)."""
    if isinstance(value, float) and (value != value or value in (math.inf, -math.inf)):
        return {"float": repr(value)}
    if isinstance(value, tuple):
        return [json_value(v) for v in value]
    return value


def from_json_value(value: Any) -> Any:
    """The inverse of `json_value` (lists come back as tuples)."""
    if isinstance(value, dict) and set(value) == {"float"}:
        return float(value["float"])
    if isinstance(value, list):
        return tuple(from_json_value(v) for v in value)
    return value


def _check_dim(d: Any) -> Dim:
    """A dimension as stored: an int >= 0, or a str naming a symbolic size. Floats (2.7 became 2), bools (True
    became 1) and negative sizes (numel -6) are mistakes a pass or a hand-written graph made: refused here."""
    if isinstance(d, str):
        return d
    if isinstance(d, bool) or not hasattr(d, "__index__"):
        raise _dim_error(d, "is not an int or a symbolic size (str)")
    n = d.__index__()
    if n < 0:
        raise _dim_error(d, "is negative")
    return n


def _dim_error(d: Any, why: str) -> Exception:
    from lmforge.errors import VerifyError

    return VerifyError(f"tensor dimension {d!r} ({type(d).__name__}) {why}: a dimension is an int >= 0 or the "
                       "name / expression of a symbolic size such as 'batch' or 'past + 1'; fix the shape where the "
                       "type is built")


@dataclass(frozen=True)
class TensorType:
    """Shape, dtype and annotations (quantization spec, sharding spec, memory tier) of a tensor value."""

    shape: tuple[Dim, ...]
    dtype: str = "float32"
    annotations: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; known: {sorted(DTYPES)}")
        object.__setattr__(self, "shape", tuple(_check_dim(d) for d in self.shape))
        object.__setattr__(self, "annotations", _freeze(dict(self.annotations)))

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def is_static(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)

    def annotation(self, key: str, default: Any = None) -> Any:
        return dict(self.annotations).get(key, default)

    def with_(self, shape=None, dtype=None, **annotations) -> "TensorType":
        ann = dict(self.annotations)
        ann.update(annotations)
        return TensorType(tuple(self.shape if shape is None else shape), dtype or self.dtype, tuple(ann.items()))

    def numel(self, env: Mapping[str, int] | None = None) -> int:
        return math.prod(eval_dim(d, env or {}) for d in self.shape)

    def nbytes(self, env: Mapping[str, int] | None = None) -> float:
        return self.numel(env) * itemsize(self.dtype)

    def concrete(self, env: Mapping[str, int]) -> "TensorType":
        if self.is_static:
            return self
        out = object.__new__(TensorType)  # dtype and annotations are already checked and frozen
        object.__setattr__(out, "shape", tuple(eval_dim(d, env) for d in self.shape))
        object.__setattr__(out, "dtype", self.dtype)
        object.__setattr__(out, "annotations", self.annotations)
        return out

    def __str__(self) -> str:
        dims = ", ".join(str(d) for d in self.shape)
        ann = "".join(f" {k}={v}" for k, v in self.annotations)
        return f"{_SHORT[self.dtype]}[{dims}]{ann}"

    def to_json(self) -> dict:
        out: dict = {"shape": list(self.shape), "dtype": self.dtype}
        if self.annotations:
            out["annotations"] = [[k, json_value(v)] for k, v in self.annotations]
        return out

    @staticmethod
    def from_json(d: dict) -> "TensorType":
        annotations = tuple((k, _freeze(from_json_value(v))) for k, v in d.get("annotations", []))
        return TensorType(tuple(d["shape"]), d["dtype"], annotations)

    @staticmethod
    def of(t: torch.Tensor) -> "TensorType":
        return TensorType(tuple(t.shape), dtype_name(t.dtype))


def _thaw(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


# ---- symbolic dimensions -------------------------------------------------------------------------

_SYMPY_LOCALS = {"FloorDiv": lambda a, b: sympy.floor(a / b), "floor": sympy.floor, "ceiling": sympy.ceiling,
                 "Max": sympy.Max, "Min": sympy.Min, "Mod": sympy.Mod, "CeilDiv": lambda a, b: sympy.ceiling(a / b)}


@lru_cache(maxsize=4096)
def parse_dim(expr: str) -> sympy.Expr:
    """Parse a symbolic dimension such as `"past + 1"` into a sympy expression (cached)."""
    names = {n: sympy.Symbol(n, integer=True, nonnegative=True) for n in _identifiers(expr)}
    return sympy.sympify(expr, locals={**names, **_SYMPY_LOCALS})


def _identifiers(expr: str) -> list[str]:
    import re

    return [n for n in re.findall(r"[A-Za-z_][A-Za-z_0-9]*", expr) if n not in _SYMPY_LOCALS]


def dim_symbols(d: Dim) -> set[str]:
    return set() if isinstance(d, int) else set(_symbol_names(d))


def simplify_dim(d: Dim) -> Dim:
    """Canonical form of a dimension: an int when it is constant, else sympy's printing of it."""
    if isinstance(d, int):
        return d
    return _simplify(d)


@lru_cache(maxsize=8192)
def _simplify(d: str) -> Dim:
    e = sympy.simplify(parse_dim(d))
    return int(e) if e.is_Integer else str(e)


@lru_cache(maxsize=8192)
def _symbol_names(d: str) -> tuple[str, ...]:
    return tuple(sorted(str(s) for s in parse_dim(d).free_symbols))


@lru_cache(maxsize=65536)
def _evaluate(d: str, values: tuple[tuple[str, int], ...]) -> int:
    """Exact (sympy) value of d for its symbols' values; memoized, as cost models evaluate the same few dims at
    the same few bindings many times."""
    return int(parse_dim(d).subs({sympy.Symbol(k, integer=True, nonnegative=True): v for k, v in values}))


def eval_dim(d: Dim, env: Mapping[str, int]) -> int:
    """Value of a dimension given the symbols' values; raises KeyError naming an unbound symbol."""
    if isinstance(d, int):
        return d
    if d in env:
        return int(env[d])
    names = _symbol_names(d)
    missing = [n for n in names if n not in env]
    if missing:
        raise KeyError(f"symbolic dimension {d!r} needs a value for {missing}")
    return _evaluate(d, tuple((n, int(env[n])) for n in names))


def dim_to_python(d: Dim) -> str:
    """Python source that computes a dimension from local variables named after its symbols."""
    if isinstance(d, int):
        return str(d)
    e = parse_dim(d)
    return sympy.pycode(e).replace("math.floor", "_floor").replace("math.ceil", "_ceil")
