"""ONNX model -> IR Graph: `import_onnx(model_or_path)`.

Each ONNX node maps to IR ops through the table `_HANDLERS`. Values fall in two kinds:

- run-time tensors, which become IR `Value`s (initializers read as tensors become parameters, with weights);
- static values known at import time: constants, small initializers, and *shape arithmetic*. `Shape(x)`
  of a tensor typed `[batch, seq, 64]` is the static vector `["batch", "seq", 64]`; Gather/Concat/Add/...
  over static values are folded (symbolic entries combine as dimension expressions), so the
  `Shape -> Gather -> Concat -> Reshape` chains that exporters emit for symbolic sizes become
  `reshape(x; shape=["batch", "seq", 4, 16])`. A static value read as a tensor is materialized.

Recovered patterns: MatMul/Gemm with a 2-D initializer weight -> `linear` (the weight transposed back; a
name ending in "__transposed" loses the suffix), Gather on an initializer -> `embedding`,
RMSNormalization/LayerNormalization/Attention -> `rmsnorm`/`layernorm`/`attention`, com.microsoft
MatMulNBits -> `linear_wo`, "ai.lmforge" nodes -> the lmforge op they name. Decomposed patterns
(rotate-half RoPE, matmul-softmax-matmul) are left to lmforge's recognition passes, which `compile` runs;
the exact-GELU form `x * 0.5 * (1 + Erf(x / sqrt(2)))` becomes `gelu` at import.

ONNX semantics kept exactly (or refused with UnsupportedOpError, never approximated): opset <= 12
Softmax/LogSoftmax/Hardmax coerce the input to 2-D at `axis`; Split sizes come from the attribute (opset <= 12)
or input #2; integer Div truncates and integer Pow stays integer; ArgMax/ArgMin honour `select_last_index`;
Gather and Slice take negative indices (counted from the end). Ops with no IR form (Erf, integer Div) become
`torch_fallback` nodes, run by torch.

    graph = import_onnx("model.onnx")          # dim_params ("batch") become symbolic dims
    compiled = lmforge.compile(graph)
"""
from __future__ import annotations

import json
import math
import operator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper

from lmforge.errors import CaptureError, LmforgeError, UnsupportedOpError
from lmforge.ir.graph import Graph, GraphBuilder, Value
from lmforge.ir.ops import get_op
from lmforge.ir.ops.registry import broadcast_shapes
from lmforge.ir.types import TensorType, parse_dim, simplify_dim, torch_dtype
from lmforge.ir.verify import verify

from lmforge.backends.onnx_export import (BINARY, COMPARE, CUSTOM_DOMAIN, MS_DOMAIN, ONNX_DTYPES, REDUCE,
                                          TRANSPOSED_SUFFIX, UNARY)

IR_DTYPES = {v: k for k, v in ONNX_DTYPES.items()}
FOLD_LIMIT = 4096  # static values larger than this are not folded at import time


@dataclass
class Static:
    """A value known at import time: a numpy array (object dtype when it holds symbolic dims) and its dtype."""

    array: np.ndarray
    dtype: str

    def __post_init__(self):
        if not isinstance(self.array, np.ndarray):  # numpy hands back bare elements of object arrays
            box = np.empty((), dtype=object)
            box[()] = self.array
            self.array = box

    @property
    def symbolic(self) -> bool:
        return any(isinstance(x, str) for x in self.array.reshape(-1).tolist())

    def item(self):
        x = self.array.reshape(-1).tolist()[0]
        return x


class NotFoldable(Exception):
    """Raised inside folding when a static computation needs run-time values; the node becomes IR ops."""


def _dim_op(fn, sym: str):
    """Elementwise op over the entries of a static holding symbolic dims (str) and ints: ints compute exactly,
    symbols build a dimension expression. Float entries are not folded (see `_fold_elementwise`)."""

    def apply(a, b):
        if isinstance(a, float) or isinstance(b, float):
            raise NotFoldable()
        if isinstance(a, str) or isinstance(b, str):
            if fn is operator.floordiv and not (_nonnegative(a) and _nonnegative(b)):
                raise NotFoldable()  # `//` floors, ONNX truncates: the same only for operands >= 0
            return simplify_dim(f"({a}) {sym} ({b})")
        if fn is operator.floordiv:  # ONNX integer Div truncates toward zero (C semantics), Python's // floors
            q = abs(a) // abs(b)
            return q if (a < 0) == (b < 0) else -q
        return fn(a, b)

    return np.frompyfunc(apply, 2, 1)


def _nonnegative(d) -> bool:
    """Whether a dim (an int or an expression over sizes, which are >= 0) is provably >= 0."""
    return d >= 0 if isinstance(d, int) else bool(parse_dim(d).is_nonnegative)


_FOLD_SYMBOLIC = {"Add": _dim_op(operator.add, "+"), "Sub": _dim_op(operator.sub, "-"),
                  "Mul": _dim_op(operator.mul, "*"), "Div": _dim_op(operator.floordiv, "//")}

_FOLD_NUMERIC = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.true_divide,
                 "Equal": np.equal, "Less": np.less, "Greater": np.greater, "LessOrEqual": np.less_equal,
                 "GreaterOrEqual": np.greater_equal, "Max": np.maximum, "Min": np.minimum, "Neg": np.negative,
                 "Not": np.logical_not, "And": np.logical_and, "Or": np.logical_or, "Where": np.where}


def _tensor_from_proto(t: onnx.TensorProto) -> torch.Tensor:
    if t.data_location == onnx.TensorProto.EXTERNAL:  # onnx would read it relative to the current directory
        where = {e.key: e.value for e in t.external_data}.get("location", "?")
        raise CaptureError(f"tensor {t.name!r} keeps its data in the external file {where!r}, which was not loaded; "
                           "pass lmforge the .onnx path (with its data file beside it), or load the model with "
                           "onnx.load(path) (load_external_data=True)")
    dtype = IR_DTYPES.get(t.data_type)
    if dtype is None or dtype == "int4":
        raise UnsupportedOpError(f"initializer {t.name!r} has ONNX type {t.data_type}, which lmforge has no dtype for")
    tdt = torch_dtype(dtype)
    if t.raw_data:
        buf = bytearray(t.raw_data)
        store = torch.uint8 if tdt == torch.bool else tdt
        out = torch.frombuffer(buf, dtype=store) if buf else torch.empty(0, dtype=store)
        return out.reshape(tuple(t.dims)).to(tdt)
    arr = onnx.numpy_helper.to_array(t)
    if dtype in ("bfloat16", "float8_e4m3fn"):
        return torch.from_numpy(np.asarray(arr, dtype=np.float32)).to(tdt)
    return torch.from_numpy(np.array(arr))


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        if a.type == onnx.AttributeProto.FLOAT:  # float32 attribute: its shortest decimal (1e-05, not 9.99e-06)
            v = float(str(np.float32(v)))
        elif a.type == onnx.AttributeProto.FLOATS:
            v = [float(str(np.float32(x))) for x in v]
        elif isinstance(v, bytes):
            v = v.decode()
        elif isinstance(v, list) and v and isinstance(v[0], bytes):
            v = [x.decode() for x in v]
        out[a.name] = v
    return out


def _ident(name: str) -> str:
    s = "".join(c if c.isalnum() or c == "_" else "_" for c in name) or "v"
    return s if not s[0].isdigit() else "v" + s


class Importer:
    """Converts one ONNX graph; see the module docstring."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.props = {p.key: p.value for p in model.metadata_props}
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        self.b = GraphBuilder(self.props.get("lmforge.graph_name") or model.graph.name or "onnx_model")
        self.values: dict[str, Value] = {}
        self.static: dict[str, Static] = {}
        self.inits = {t.name: t for t in model.graph.initializer}
        self.params: dict[str, Value] = {}
        self.used: set[str] = set()
        self.producers: dict[str, tuple] = {}  # IR value name -> (op, inputs, attrs), for peepholes (silu, gelu)
        self.declared = {vi.name: vi for vi in model.graph.value_info}

    # ---- value access ------------------------------------------------------------------------------
    def get_static(self, name: str) -> Static | None:
        if name in self.static:
            return self.static[name]
        t = self.inits.get(name)
        if t is not None and int(np.prod(t.dims)) <= FOLD_LIMIT:
            self.static[name] = Static(_tensor_from_proto(t).numpy() if t.data_type != onnx.TensorProto.BFLOAT16
                                       else _tensor_from_proto(t).float().numpy(), IR_DTYPES[t.data_type])
            return self.static[name]
        return None

    def tensor(self, name: str) -> Value:
        """The IR value of an ONNX tensor name (an initializer becomes a parameter, a static is materialized)."""
        if name in self.values:
            return self.values[name]
        if name in self.inits:
            return self.param(name, _tensor_from_proto(self.inits[name]))
        if name in self.static:
            return self.materialize(name, self.static[name])
        raise CaptureError(f"ONNX tensor {name!r} is read before any node produces it")

    def param(self, name: str, weight: torch.Tensor, key: Any = None) -> Value:
        """A parameter holding `weight`, cached under `key`: an ONNX initializer name (the exact content) or a
        tuple (transform, name) for a derived tensor (a transposed or unpacked copy)."""
        key = name if key is None else key
        if key in self.params:
            return self.params[key]
        pname, i = name, 0
        while pname in self.used:
            i += 1
            pname = f"{name}_{i}"
        self.used.add(pname)
        v = self.b.param(pname, TensorType.of(weight), weight.contiguous())
        self.params[key] = v
        if isinstance(key, str):
            self.values[key] = v
        return v

    def derived(self, transform: str, onnx_name: str, weight: torch.Tensor, base: str | None = None) -> Value:
        """A parameter for a transformed initializer; the plain initializer when the contents agree (tied weights)."""
        base = base or onnx_name
        if base != onnx_name and base in self.inits and tuple(self.inits[base].dims) == tuple(weight.shape) and \
                torch.equal(_tensor_from_proto(self.inits[base]), weight):
            return self.tensor(base)
        return self.param(base, weight, key=(transform, onnx_name))

    def op(self, op: str, inputs, attrs=None, hint: str = "v", out_types=None):
        outs = self.b.op(op, inputs, attrs or {}, name=_ident(hint), out_types=out_types)
        for v in (outs if isinstance(outs, tuple) else (outs,)):
            self.used.add(v.name)
            self.producers[v.name] = (op, tuple(inputs), dict(attrs or {}))
        return outs

    def materialize(self, name: str, s: Static) -> Value:
        """A static value as a run-time tensor: a constant parameter, or arange/concat for symbolic entries."""
        if not s.symbolic:
            wide = np.float64 if s.dtype.startswith(("float", "bfloat")) else np.int64
            t = torch.tensor(s.array.astype(wide)).to(torch_dtype(s.dtype)).reshape(s.array.shape)
            return self.param(f"const_{_ident(name)}", t, key=name)
        items = [self.op("arange", [], {"start": d, "end": simplify_dim(f"({d}) + 1")}, hint=f"{name}_dim")
                 for d in s.array.reshape(-1).tolist()]
        flat = items[0] if len(items) == 1 else self.op("concat", items, {"dim": 0}, hint=name)
        out = self.op("reshape", [flat], {"shape": tuple(s.array.shape)}, hint=name)
        return out if s.dtype == "int64" else self.op("cast", [out], {"dtype": s.dtype}, hint=name)

    # ---- the graph ---------------------------------------------------------------------------------
    def run(self) -> Graph:
        g = self.model.graph
        for vi in g.input:
            if vi.name in self.inits:  # old exporters list initializers as inputs too
                continue
            tt = vi.type.tensor_type
            if tt.elem_type not in IR_DTYPES or not vi.type.HasField("tensor_type"):
                raise UnsupportedOpError(f"ONNX input {vi.name!r} is not a tensor of a dtype lmforge knows "
                                         f"(elem_type {tt.elem_type}); lmforge imports tensor inputs only")
            shape = tuple(self._dim(vi.name, i, d) for i, d in enumerate(tt.shape.dim))
            v = self.b.input(_ident(vi.name), TensorType(shape, IR_DTYPES[tt.elem_type]))
            self.values[vi.name] = v
            self.used.add(v.name)
        for node in g.node:
            try:
                self.convert(node)
            except (LmforgeError, NotFoldable, ValueError, KeyError, IndexError, TypeError) as e:
                label = f"ONNX node {node.name or '?'} ({node.domain + '::' if node.domain else ''}{node.op_type})"
                if isinstance(e, UnsupportedOpError):
                    raise UnsupportedOpError(f"{label}: {e}") from None
                raise CaptureError(f"{label} could not be imported: {e}") from None
        outputs = [self.tensor(o.name) for o in g.output]
        meta = {}
        if "lmforge.meta" in self.props:
            from lmforge.ir.serialize import _attr_from_json

            meta = {k: _attr_from_json(v) for k, v in json.loads(self.props["lmforge.meta"])}
        return verify(self.b.build(outputs, meta))

    def _dim(self, input_name: str, axis: int, d):
        if d.HasField("dim_value"):
            return int(d.dim_value)
        if d.HasField("dim_param"):
            p = d.dim_param
            if p.isidentifier():
                return p
            try:
                return simplify_dim(p)
            except Exception:  # sympy cannot parse it: keep it as a plain symbol
                return _ident(p)
        return f"{_ident(input_name)}_{axis}"

    def convert(self, node: onnx.NodeProto) -> None:
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
        if node.domain == CUSTOM_DOMAIN:
            outs = self.custom(node)
        else:
            if key not in _HANDLERS:
                raise UnsupportedOpError(f"lmforge has no mapping for ONNX op {key!r}; supported: "
                                         f"{sorted(_HANDLERS)}. Rewrite that part of the model or open an issue")
            outs = None
            if key in _FOLDERS and all(i == "" or self.get_static(i) is not None or (key in ("Shape", "Size") and
                                                                                     i in self.values)
                                       for i in node.input):
                try:
                    outs = _FOLDERS[key](self, node)
                except (NotFoldable, ValueError, TypeError):  # needs run-time values: emit IR ops instead
                    outs = None
            if outs is None:
                outs = _HANDLERS[key](self, node)
        for name, v in zip(node.output, outs):
            if name == "" or v is None:
                continue
            if isinstance(v, Static):
                self.static[name] = v
            else:
                self.values[name] = v

    def custom(self, node: onnx.NodeProto) -> list:
        """An ai.lmforge node back to the IR op it names, attributes decoded with the op's schema."""
        opdef = get_op(node.op_type)
        raw = _attrs(node)
        json_keys = set(raw.pop("lmforge_json_attrs", []))
        from lmforge.ir.serialize import _attr_from_json

        attrs = {}
        for k, v in raw.items():
            if k in json_keys:
                attrs[k] = _attr_from_json(json.loads(v))
            elif opdef.attrs[k].kind == "bool":
                attrs[k] = bool(v)
            else:
                attrs[k] = tuple(v) if isinstance(v, list) else v
        ins = [None if i == "" else self.tensor(i) for i in node.input]
        declared = [self.declared.get(o) for o in node.output]
        types = None
        if opdef.infer_fn is None and all(declared):
            types = [TensorType(tuple(self._dim(o, i, d) for i, d in enumerate(vi.type.tensor_type.shape.dim)),
                                IR_DTYPES[vi.type.tensor_type.elem_type]) for o, vi in zip(node.output, declared)]
        outs = self.op(node.op_type, ins, attrs, hint=node.output[0], out_types=types)
        return list(outs) if isinstance(outs, tuple) else [outs]


# ---- static folding -------------------------------------------------------------------------------------

def _fold_shape(im: Importer, node):
    x = node.input[0]
    shape = im.values[x].type.shape if x in im.values else im.get_static(x).array.shape
    a = _attrs(node)
    dims = list(shape)[a.get("start", 0):a.get("end", len(shape))]
    return [Static(np.array(dims, dtype=object), "int64")]


def _storage(dtype: str) -> np.dtype:
    """The numpy dtype a static of IR `dtype` is computed in (bfloat16 and float8 in float32, rounded after)."""
    return np.dtype(np.float32) if dtype in ("bfloat16", "float8_e4m3fn") else \
        torch.empty(0, dtype=torch_dtype(dtype)).numpy().dtype


def _fold_elementwise(im: Importer, node):
    """An elementwise op over statics. Numbers are computed by numpy in the statics' own dtype, as a runtime
    would: float32 rounds at each step ((1e8f + 1f) - 1e8f is 0, and 0.7f * 10f is exactly 7), integers wrap
    around. Statics holding symbolic dims take the exact object path (`_dim_op`) for Add/Sub/Mul/integer Div."""
    ins = [im.get_static(i) for i in node.input]
    op = node.op_type
    dtype = "bool" if op in ("Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Not", "And", "Or") \
        else ins[-1].dtype
    if any(s.symbolic for s in ins):
        if op not in _FOLD_SYMBOLIC or op == "Div" and _is_float(dtype):
            raise NotFoldable()
        arr = _FOLD_SYMBOLIC[op](ins[0].array.astype(object), ins[1].array.astype(object))
        return [Static(np.asarray(arr, dtype=object), dtype)]
    arrs = [s.array.astype(_storage(s.dtype)) for s in ins]
    with np.errstate(all="ignore"):  # integer wrap-around, inf and nan: what the runtime computes too
        if op == "Div" and not _is_float(dtype):
            a, b = arrs
            if (b == 0).any():  # left to run time, which says so
                raise NotFoldable()
            arr = (a - np.fmod(a, b)) // b  # ONNX integer Div truncates toward zero; the division is exact
        else:
            arr = _FOLD_NUMERIC[op](*arrs)
    arr = np.asarray(arr).astype(_storage(dtype))
    if dtype in ("bfloat16", "float8_e4m3fn"):  # round to the static's own precision
        arr = torch.from_numpy(np.ascontiguousarray(arr)).to(torch_dtype(dtype)).float().numpy()
    return [Static(arr, dtype)]


def _fold(fn):
    def fold(im: Importer, node):
        ins = [None if i == "" else im.get_static(i) for i in node.input]
        out = fn(ins, _attrs(node), im)
        if out.array.size > FOLD_LIMIT:
            raise NotFoldable()
        return [out]

    return fold


def _ints(s: Static | None) -> list:
    return [] if s is None else [x if isinstance(x, str) else int(x) for x in s.array.reshape(-1).tolist()]


def _slice_attributes(a: dict) -> tuple[list, list, list, list]:
    """starts, ends, axes, steps of a Slice before opset 10, which has them as attributes (and no steps)."""
    starts, ends = list(a["starts"]), list(a["ends"])
    return starts, ends, list(a.get("axes", range(len(starts)))), [1] * len(starts)


def _fold_slice(ins, a, im):
    x = ins[0].array
    if len(ins) == 1:
        starts, ends, axes, steps = _slice_attributes(a)
    else:
        starts, ends = _ints(ins[1]), _ints(ins[2])
        axes = _ints(ins[3]) if len(ins) > 3 and ins[3] is not None else list(range(len(starts)))
        steps = _ints(ins[4]) if len(ins) > 4 and ins[4] is not None else [1] * len(starts)
    if any(isinstance(v, str) for v in starts + ends):
        raise NotFoldable()
    idx = [slice(None)] * x.ndim
    for s, e, ax, st in zip(starts, ends, axes, steps):
        idx[ax] = slice(s, e, st)
    return Static(x[tuple(idx)], ins[0].dtype)


def _fold_reshape(ins, a, im):
    x, shape = ins[0].array, _ints(ins[1])
    if any(isinstance(v, str) for v in shape):
        raise NotFoldable()
    shape = [x.shape[i] if d == 0 and not a.get("allowzero") else d for i, d in enumerate(shape)]
    return Static(x.reshape(shape), ins[0].dtype)


def _axes(ins, a, key="axes"):
    return _ints(ins[1]) if len(ins) > 1 and ins[1] is not None else list(a.get(key, []))


def _fold_unsqueeze(ins, a, im):
    x = ins[0].array
    for ax in sorted(ax % (x.ndim + len(_axes(ins, a))) for ax in _axes(ins, a)):
        x = np.expand_dims(x, ax)
    return Static(x, ins[0].dtype)


def _fold_squeeze(ins, a, im):
    x = ins[0].array
    axes = _axes(ins, a)
    return Static(np.squeeze(x, axis=tuple(axes) if axes else None), ins[0].dtype)


def _fold_cast(ins, a, im):
    dtype = IR_DTYPES[a["to"]]
    x = ins[0].array
    if ins[0].symbolic:  # a size as another number type: still the same symbolic value
        if dtype == "bool":
            raise NotFoldable()
        return Static(x, dtype)
    return Static(x.astype(_storage(dtype)), dtype)


def _fold_range(ins, a, im):
    start, limit, delta = (s.item() for s in ins)
    if any(isinstance(v, str) for v in (start, limit, delta)):
        raise NotFoldable()
    return Static(np.arange(start, limit, delta).astype(ins[0].array.dtype), ins[0].dtype)


def _fold_constant_of_shape(ins, a, im):
    shape = _ints(ins[0])
    if any(isinstance(d, str) for d in shape) or int(np.prod(shape)) > FOLD_LIMIT:
        raise NotFoldable()
    value = a.get("value")
    arr = onnx.numpy_helper.to_array(value) if value is not None else np.zeros(1, np.float32)
    dtype = IR_DTYPES[value.data_type] if value is not None else "float32"
    return Static(np.full(shape, arr.reshape(-1)[0], dtype=arr.dtype), dtype)


_FOLDERS = {
    "Shape": _fold_shape,
    **{op: _fold_elementwise for op in ("Add", "Sub", "Mul", "Div", "Equal", "Less", "Greater",
                                         "LessOrEqual", "GreaterOrEqual", "Max", "Min", "Neg", "Not", "And", "Or",
                                         "Where")},
    "Gather": _fold(lambda ins, a, im: Static(np.take(ins[0].array, ins[1].array.astype(np.int64),
                                                      axis=a.get("axis", 0)), ins[0].dtype)),
    "Concat": _fold(lambda ins, a, im: Static(np.concatenate([s.array.astype(object) if any(
        t.symbolic for t in ins) else s.array for s in ins], axis=a["axis"]), ins[0].dtype)),
    "Slice": _fold(_fold_slice), "Reshape": _fold(_fold_reshape), "Unsqueeze": _fold(_fold_unsqueeze),
    "Squeeze": _fold(_fold_squeeze), "Cast": _fold(_fold_cast), "Range": _fold(_fold_range),
    "ConstantOfShape": _fold(_fold_constant_of_shape), "Identity": _fold(lambda ins, a, im: ins[0]),
}


# ---- IR handlers ------------------------------------------------------------------------------------------

def _scalar_value(s: Static, dtype: str):
    """A size-1 static as a scalar attribute for an operand of `dtype` (symbolic sizes stay symbolic)."""
    v = s.item()
    if isinstance(v, str):
        return v
    return bool(v) if dtype == "bool" else float(v) if dtype.startswith(("float", "bfloat")) else int(v)


def _is_float(dtype: str) -> bool:
    return dtype.startswith(("float", "bfloat"))


def _dtype_of(im: Importer, name: str) -> str:
    """The dtype of an ONNX tensor name, without materializing it."""
    if name in im.values:
        return im.values[name].type.dtype
    s = im.get_static(name)
    if s is not None:
        return s.dtype
    if name in im.inits:
        return IR_DTYPES[im.inits[name].data_type]
    return im.tensor(name).type.dtype


def _fallback(im: Importer, target: str, ins: list, out_type: TensorType, hint: str, **kwargs):
    """A `torch_fallback` node calling ATen `target` on the tensors `ins` (run by torch; no IR op has the
    semantics, and approximating them would give wrong results)."""
    args = tuple(("$input", i) for i in range(len(ins)))
    return im.op("torch_fallback", ins, {"target": target, "args": args, "kwargs": tuple(kwargs.items())},
                 hint=hint, out_types=[out_type])


def _int_div(im: Importer, node):
    """ONNX Div of integers truncates toward zero and keeps the integer dtype: torch's div(rounding_mode="trunc").
    The IR `div` is true division, so this is a torch_fallback node."""
    xa, xb = im.tensor(node.input[0]), im.tensor(node.input[1])
    if xa.type.dtype != xb.type.dtype:
        raise CaptureError(f"Div of {xa.type.dtype} by {xb.type.dtype}: ONNX needs both operands of one dtype")
    out = TensorType(broadcast_shapes(xa.type.shape, xb.type.shape), xa.type.dtype)
    return [_fallback(im, "aten.div.Tensor_mode", [xa, xb], out, node.output[0], rounding_mode="trunc")]


def _pow(im: Importer, node):
    """Pow; the result has the base's dtype (ONNX), so an integer base stays integer."""
    a_name, b_name = node.input[:2]
    x, sb = im.tensor(a_name), im.get_static(b_name)
    int_base = not _is_float(x.type.dtype)
    if sb is not None and sb.array.size == 1 and not sb.symbolic and sb.array.ndim <= x.type.rank:
        e = float(sb.item())
        if not int_base:
            return [im.op("pow_scalar", [x], {"exponent": e}, hint=node.output[0])]
        if e != int(e) or e < 0:
            raise UnsupportedOpError(f"Pow of an integer ({x.type.dtype}) base by {e}: lmforge computes integer "
                                     "powers for non-negative integer exponents only")
        return [im.op("pow", [x, None], {"scalar": int(e)}, hint=node.output[0])]
    y = im.tensor(b_name)
    if int_base and _is_float(y.type.dtype):
        raise UnsupportedOpError(f"Pow of an integer ({x.type.dtype}) base by a {y.type.dtype} exponent: ONNX "
                                 "keeps the integer type, which lmforge's pow cannot express")
    out = im.op("pow", [x, y], hint=node.output[0])
    if out.type.dtype != x.type.dtype:
        out = im.op("cast", [out], {"dtype": x.type.dtype}, hint=node.output[0])
    return [out]


def _near(v, want: float) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v - want) <= 1e-6 * abs(want)


def _erf_gelu_input(im: Importer, v: Value) -> Value | None:
    """x when `v` is `1 + erf(x / sqrt(2))` (or `erf(x * (1 / sqrt(2))) + 1`) as imported, else None."""
    op, ins, attrs = im.producers.get(v.name, ("", (), {}))
    if op != "add" or ins[1] is not None or not _near(attrs.get("scalar"), 1.0):
        return None
    op, ins, attrs = im.producers.get(ins[0].name, ("", (), {}))
    if op != "torch_fallback" or attrs.get("target") != "aten.erf.default":
        return None
    op, ins, attrs = im.producers.get(ins[0].name, ("", (), {}))
    if ins and ins[1:] == (None,) and not attrs.get("swap") and (
            op == "div" and _near(attrs.get("scalar"), 2 ** 0.5) or op == "mul" and _near(attrs.get("scalar"),
                                                                                             2 ** -0.5)):
        return ins[0]
    return None


def _gelu_peephole(im: Importer, node) -> Value | None:
    """The exact GELU as exporters write it, x * 0.5 * (1 + erf(x / sqrt(2))), ending at this Mul -> `gelu`.
    Both groupings are recognised: Mul(Mul(x, 1 + erf(..)), 0.5) and Mul(Mul(x, 0.5), 1 + erf(..))."""
    a_name, b_name = node.input[:2]
    for p_name, q_name in ((a_name, b_name), (b_name, a_name)):
        p, q = im.values.get(p_name), im.values.get(q_name)
        if p is None:
            continue
        op, ins, attrs = im.producers.get(p.name, ("", (), {}))
        if op != "mul":
            continue
        sq = im.get_static(q_name)
        if q is None and sq is not None and sq.array.size == 1 and _near(_scalar_value(sq, "float32"), 0.5) and \
                ins[1] is not None:  # Mul(Mul(x, 1 + erf(x / sqrt 2)), 0.5)
            for x, y in ((ins[0], ins[1]), (ins[1], ins[0])):
                g = _erf_gelu_input(im, y)
                if g is not None and g.name == x.name and sq.array.ndim <= x.type.rank:
                    return im.op("gelu", [x], hint=node.output[0])
        if q is not None and ins[1] is None and _near(attrs.get("scalar"), 0.5):  # Mul(Mul(x, 0.5), 1 + erf(..))
            g = _erf_gelu_input(im, q)
            if g is not None and g.name == ins[0].name:
                return im.op("gelu", [g], hint=node.output[0])
    return None


def _binary(ir_op: str):
    def handle(im: Importer, node):
        a_name, b_name = node.input[:2]
        if ir_op == "div" and not _is_float(_dtype_of(im, a_name)):
            return _int_div(im, node)
        if ir_op == "mul":
            g = _gelu_peephole(im, node)
            if g is not None:
                return [g]
        sa, sb = im.get_static(a_name), im.get_static(b_name)
        # torch.maximum / minimum take tensors only: those keep a constant operand as a tensor
        scalar_forms = () if ir_op in ("maximum", "minimum") else ((sb, a_name, False), (sa, b_name, True))
        for s, other, swap in scalar_forms:
            if s is not None and s.array.size == 1 and other not in im.static and other not in im.inits:
                x = im.tensor(other)
                value = _scalar_value(s, x.type.dtype)
                if value is not None and s.array.ndim <= x.type.rank:
                    attrs = {"scalar": value, **({"swap": True} if swap else {})}
                    return [im.op(ir_op, [x, None], attrs, hint=node.output[0])]
        xa, xb = im.tensor(a_name), im.tensor(b_name)
        if ir_op == "mul":  # x * sigmoid(x) is silu (the exporter's form of it)
            for x, y in ((xa, xb), (xb, xa)):
                if im.producers.get(y.name, ("", ()))[0] == "sigmoid" and im.producers[y.name][1][0] == x:
                    return [im.op("silu", [x], hint=node.output[0])]
        return [im.op(ir_op, [xa, xb], hint=node.output[0])]

    return handle


def _variadic(ir_op: str):
    def handle(im: Importer, node):
        if len(node.input) == 2:
            return _binary(ir_op)(im, node)
        out = im.tensor(node.input[0])
        for name in node.input[1:]:
            out = im.op(ir_op, [out, im.tensor(name)], hint=node.output[0])
        return [out]

    return handle


def _compare(ir_op: str):
    """A comparison; a size-1 constant right operand becomes the `scalar` attribute, unless it has more dims
    than the tensor (Less(x[3], c[1, 1]) is [1, 3]: a scalar would lose the broadcast dim)."""
    def handle(im: Importer, node):
        x, s = node.input[0], im.get_static(node.input[1])
        if s is not None and s.array.size == 1 and x not in im.static:
            xv = im.tensor(x)
            if s.array.ndim <= xv.type.rank:
                return [im.op(ir_op, [xv, None], {"scalar": _scalar_value(s, xv.type.dtype)}, hint=node.output[0])]
        return [im.op(ir_op, [im.tensor(x), im.tensor(node.input[1])], hint=node.output[0])]

    return handle


def _where(im: Importer, node):
    """Where; size-1 constant branches become `a_scalar` / `b_scalar`, as long as the inputs that stay tensors
    still give the output its rank (a [1, 1] constant beside [3] tensors makes the output [1, 3]). One branch
    stays a tensor, as two scalars would give torch's default dtype (float32, int64), not the branches' dtype."""
    cond = im.tensor(node.input[0])
    branches = node.input[1:]
    statics = [im.get_static(name) for name in branches]
    scalar = {i for i, s in enumerate(statics) if s is not None and s.array.size == 1}
    scalar.discard(0 if len(scalar) == 2 else None)  # a tensor branch keeps the dtype (two scalars: torch's default)
    while True:  # a scalar candidate with more dims than the tensors left is kept as a tensor; then re-check
        ranks = [cond.type.rank] + [im.tensor(branches[i]).type.rank for i in range(2) if i not in scalar]
        too_big = [i for i in scalar if statics[i].array.ndim > max(ranks)]
        if not too_big:
            break
        scalar.discard(max(too_big, key=lambda i: statics[i].array.ndim))
    ins, attrs = [cond], {}
    for i, (name, key) in enumerate(zip(branches, ("a_scalar", "b_scalar"))):
        if i in scalar:
            ins.append(None)
            attrs[key] = _scalar_value(statics[i], statics[i].dtype)
        else:
            ins.append(im.tensor(name))
    return [im.op("where", ins, attrs, hint=node.output[0])]


def _shape_list(im: Importer, name: str) -> list:
    """Input `name` (a shape, axes or slice bounds) as ints and symbolic dims known at import."""
    s = im.get_static(name)
    if s is None:
        raise UnsupportedOpError(f"input {name!r} (a shape, axes or bounds) is computed from run-time values, not "
                                 "from shapes or constants; lmforge needs it at import, expressed with symbolic dims")
    return _ints(s)


def _numel(dims) -> Any:
    return simplify_dim(" * ".join(f"({d})" for d in dims)) if dims else 1


def _reshape(im: Importer, node):
    x = im.tensor(node.input[0])
    shape = _shape_list(im, node.input[1])
    allowzero = _attrs(node).get("allowzero", 0)
    shape = [x.type.shape[i] if d == 0 and not allowzero else d for i, d in enumerate(shape)]
    if -1 in shape:
        known = [d for d in shape if d != -1]
        shape[shape.index(-1)] = simplify_dim(f"({_numel(x.type.shape)}) // ({_numel(known)})")
    return [im.op("reshape", [x], {"shape": tuple(shape)}, hint=node.output[0])]


def _reshape_to(im: Importer, node, shape):
    return [im.op("reshape", [im.tensor(node.input[0])], {"shape": tuple(shape)}, hint=node.output[0])]


def _unsqueeze(im: Importer, node):
    x = im.tensor(node.input[0])
    axes = _shape_list(im, node.input[1]) if len(node.input) > 1 and node.input[1] else _attrs(node)["axes"]
    shape = list(x.type.shape)
    for ax in sorted(ax % (x.type.rank + len(axes)) for ax in axes):
        shape.insert(ax, 1)
    return _reshape_to(im, node, shape)


def _squeeze(im: Importer, node):
    x = im.tensor(node.input[0])
    axes = _shape_list(im, node.input[1]) if len(node.input) > 1 and node.input[1] else _attrs(node).get("axes")
    if not axes and not all(isinstance(d, int) for d in x.type.shape):
        raise UnsupportedOpError(f"Squeeze without axes on an input with symbolic dims {list(x.type.shape)}: which "
                                 "dims are 1 is only known at run time; give the axes")
    drop = {a % x.type.rank for a in axes} if axes else {i for i, d in enumerate(x.type.shape) if d == 1}
    return _reshape_to(im, node, [d for i, d in enumerate(x.type.shape) if i not in drop])


def _flatten(im: Importer, node):
    """Flatten to 2-D, [prod(dims[:axis]), prod(dims[axis:])]; a negative axis counts from the back (axis=-1 on
    [2, 3, 4] is axis 2, giving [6, 4]), so it adds the rank, not rank + 1."""
    x = im.tensor(node.input[0])
    rank, axis = x.type.rank, _attrs(node).get("axis", 1)
    if not -rank <= axis <= rank:
        raise CaptureError(f"Flatten axis {axis} is out of range for a rank-{rank} input")
    axis = axis + rank if axis < 0 else axis
    return _reshape_to(im, node, [_numel(x.type.shape[:axis]), _numel(x.type.shape[axis:])])


def _expand(im: Importer, node):
    x = im.tensor(node.input[0])
    shape = broadcast_shapes(x.type.shape, _shape_list(im, node.input[1]))
    return [im.op("expand", [x], {"shape": tuple(shape)}, hint=node.output[0])]


def _slice(im: Importer, node):
    x = im.tensor(node.input[0])
    if len(node.input) == 1:
        starts, ends, axes, steps = _slice_attributes(_attrs(node))
    else:
        starts, ends = _shape_list(im, node.input[1]), _shape_list(im, node.input[2])
        axes = _shape_list(im, node.input[3]) if len(node.input) > 3 and node.input[3] else list(range(len(starts)))
        steps = _shape_list(im, node.input[4]) if len(node.input) > 4 and node.input[4] else [1] * len(starts)
    for s, e, ax, st in zip(starts, ends, axes, steps):
        if not isinstance(st, int) or st < 1:
            raise UnsupportedOpError(f"Slice step {st} (lmforge slices take positive static steps)")
        ax = ax % x.type.rank
        n = x.type.shape[ax]
        if isinstance(n, int):  # a static dim: ONNX's negative (from the end) and clamped bounds, as plain ints
            s, e = _clamp_index(s, n), _clamp_index(e, n)
            end = None if e == n else e
        else:  # a symbolic dim: negative bounds stay negative (the slice op counts them from the end)
            end = None if isinstance(e, int) and e >= _INT32_MAX else e
        x = im.op("slice", [x], {"dim": ax, "start": s, "end": end, "step": st}, hint=node.output[0])
    return [x]


_INT32_MAX = 2**31 - 1  # exporters write INT32_MAX / INT64_MAX for "to the end"; no dim is that large


def _clamp_index(i, n: int):
    """A Slice bound on a static dim of size n: negative counts from the end, then clamped to [0, n]."""
    if isinstance(i, str):
        return i
    return min(max(i + n if i < 0 else i, 0), n)


def _split(im: Importer, node):
    """Split sizes: input #2 (opset >= 13) or the `split` attribute (opset <= 12); else `num_outputs` chunks of
    ceil(size / num_outputs), the last one smaller (opset 18); else equal parts, one per output."""
    x, a = im.tensor(node.input[0]), _attrs(node)
    axis = a.get("axis", 0) % x.type.rank
    size, n = x.type.shape[axis], len(node.output)
    if len(node.input) > 1 and node.input[1]:
        sizes = _shape_list(im, node.input[1])
    elif "split" in a:
        sizes = list(a["split"])
    elif "num_outputs" in a:
        k = a["num_outputs"]
        if k != n:
            raise CaptureError(f"Split with num_outputs={k} has {n} outputs")
        chunk = -(-size // k) if isinstance(size, int) else simplify_dim(f"(({size}) + {k - 1}) // {k}")
        sizes = [chunk] * (k - 1) + [simplify_dim(f"({size}) - {k - 1} * ({chunk})")]
    elif isinstance(size, int):
        if size % n:
            raise CaptureError(f"Split of a dim of size {size} into {n} equal parts")
        sizes = [size // n] * n
    else:
        sizes = [simplify_dim(f"({size}) // {n}")] * n
    if len(sizes) != n:
        raise CaptureError(f"Split into {len(sizes)} parts ({sizes}) has {n} outputs")
    if isinstance(size, int) and all(isinstance(d, int) for d in sizes) and (sum(sizes) != size or min(sizes) < 0):
        raise CaptureError(f"Split sizes {sizes} do not partition a dim of size {size}")
    outs, start = [], 0
    for sz in sizes:
        end = simplify_dim(f"({start}) + ({sz})")
        outs.append(im.op("slice", [x], {"dim": axis, "start": start, "end": end}, hint=node.output[0]))
        start = end
    return outs


def _gather(im: Importer, node):
    """Gather; negative indices count from the end of the gathered dim (constant ones are normalized here,
    run-time ones by `where(idx < 0, idx + size, idx)`). Token ids read from an initializer table become
    `embedding`, after the same fix-up (the embedding op takes row numbers, never negative)."""
    axis = _attrs(node).get("axis", 0)
    data, idx_name = node.input
    s = im.get_static(idx_name)
    if data in im.inits and axis == 0 and idx_name in im.values and len(im.inits[data].dims) == 2:
        ids = im.tensor(idx_name)
        if not ids.type.dtype.startswith("uint"):
            ids = _wrap_negative(im, ids, int(im.inits[data].dims[0]))
        return [im.op("embedding", [ids, im.tensor(data)], hint=node.output[0])]
    x = im.tensor(data)
    axis %= x.type.rank
    n = x.type.shape[axis]
    if s is not None and not s.symbolic:
        raw = s.array.astype(np.int64)
        if isinstance(n, int) and raw.size and (raw.min() < -n or raw.max() >= n):
            raise CaptureError(f"Gather index out of range for a dim of size {n}: {raw.reshape(-1).tolist()}")
        if raw.ndim == 0:
            i = int(raw)
            index = i if i >= 0 else i + n if isinstance(n, int) else simplify_dim(f"({n}) - {-i}")
            return [im.op("select", [x], {"dim": axis, "index": index}, hint=node.output[0])]
        if (raw < 0).any():
            fixed = np.array([int(i) if i >= 0 else i + n if isinstance(n, int) else simplify_dim(f"({n}) - {-i}")
                              for i in raw.reshape(-1).tolist()], dtype=object).reshape(raw.shape)
            idx = im.materialize(f"{idx_name}__from_end", Static(fixed, s.dtype))
        else:
            idx = im.tensor(idx_name)
    else:
        idx = _wrap_negative(im, im.tensor(idx_name), n)
    flat = idx if idx.type.rank == 1 else im.op("reshape", [idx], {"shape": (_numel(idx.type.shape),)}, hint="idx")
    out = im.op("index_select", [x, flat], {"dim": axis}, hint=node.output[0])
    if idx.type.rank == 1:
        return [out]
    shape = (*x.type.shape[:axis], *idx.type.shape, *x.type.shape[axis + 1:])
    return [im.op("reshape", [out], {"shape": shape}, hint=node.output[0])]


def _wrap_negative(im: Importer, idx: Value, n) -> Value:
    """Run-time Gather indices with negative ones counted from the end of a dim of size n (ONNX)."""
    neg = im.op("lt", [idx, None], {"scalar": 0}, hint="idx_neg")
    return im.op("where", [neg, im.op("add", [idx, None], {"scalar": n}, hint="idx"), idx], hint="idx")


def _weight_name(name: str) -> str:
    return name[:-len(TRANSPOSED_SUFFIX)] if name.endswith(TRANSPOSED_SUFFIX) else name


def _linear(im: Importer, node, x: Value, w: torch.Tensor, w_name: str, bias: Value | None = None):
    """linear(x, w) with w [out, in] taken from initializer `w_name` transposed back."""
    wv = im.derived("T", w_name, w.contiguous(), base=_weight_name(w_name))
    return [im.op("linear", [x, wv] + ([bias] if bias is not None else []), hint=node.output[0])]


def _matmul(im: Importer, node):
    a, b = node.input
    if b in im.inits and len(im.inits[b].dims) == 2:
        return _linear(im, node, im.tensor(a), _tensor_from_proto(im.inits[b]).t(), b)
    return [im.op("matmul", [im.tensor(a), im.tensor(b)], hint=node.output[0])]


def _gemm(im: Importer, node):
    at = _attrs(node)
    a, b = node.input[:2]
    c = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if at.get("alpha", 1.0) != 1.0 or at.get("beta", 1.0) != 1.0 or b not in im.inits:
        raise UnsupportedOpError("Gemm is imported with alpha = beta = 1 and an initializer B")
    x = im.tensor(a)
    if at.get("transA", 0):
        x = im.op("permute", [x], {"perm": (1, 0)}, hint=node.output[0])
    bias = None
    n = im.inits[b].dims[0 if at.get("transB", 0) else 1]
    if c is not None and c in im.inits and list(im.inits[c].dims) == [n]:  # else C broadcasts: add it
        bias = im.tensor(c)
    if at.get("transB", 0):
        out = [im.op("linear", [x, im.tensor(b)] + ([bias] if bias is not None else []), hint=node.output[0])]
    else:
        out = _linear(im, node, x, _tensor_from_proto(im.inits[b]).t(), b, bias)
    if c is not None and bias is None:
        out = [im.op("add", [out[0], im.tensor(c)], hint=node.output[0])]
    return out


def _norm(ir_op: str):
    def handle(im: Importer, node):
        a = _attrs(node)
        x = im.tensor(node.input[0])
        if any(o for o in node.output[1:]):
            raise UnsupportedOpError(f"{node.op_type} with mean/inv-std outputs")
        ndim = x.type.rank - a.get("axis", -1) % x.type.rank
        norm_shape = tuple(x.type.shape[x.type.rank - ndim:])
        ins = [x] + [_norm_param(im, node, i, norm_shape) if i else None for i in node.input[1:]]
        return [im.op(ir_op, ins, {"eps": a.get("epsilon", 1e-5), "ndim": ndim}, hint=node.output[0])]

    return handle


def _norm_param(im: Importer, node, name: str, norm_shape: tuple) -> Value:
    """A scale or bias of a normalization, shaped like the normalized dims x.shape[axis:] as the IR op wants it.
    ONNX lets it broadcast to them (scale [4] with axis=1 on [2, 3, 4]): an initializer is expanded to a
    parameter of the full shape, a run-time tensor by an `expand` node."""
    v = im.tensor(name)
    shape = tuple(v.type.shape)
    if shape == norm_shape:
        return v
    try:
        fits = broadcast_shapes(shape, norm_shape) == norm_shape
    except LmforgeError:
        fits = False
    if not fits:
        raise CaptureError(f"{node.op_type} input {name!r} of shape {list(shape)} does not broadcast to the "
                           f"normalized dims {list(norm_shape)} (x.shape[axis:])")
    if name in im.inits and all(isinstance(d, int) for d in norm_shape):
        weight = _tensor_from_proto(im.inits[name]).expand(norm_shape)
        return im.param(name, weight, key=("expand", name, norm_shape))
    return im.op("expand", [v], {"shape": norm_shape}, hint=name)


def _attention(im: Importer, node):
    a = _attrs(node)
    if len(node.input) > 4 and any(node.input[4:]) or any(node.output[1:]) or a.get("softcap", 0.0):
        raise UnsupportedOpError("Attention with a past KV cache, softcap or extra outputs; use plain q, k, v [, mask]")
    ins = [im.tensor(i) if i else None for i in node.input[:4]]
    if ins[0].type.rank != 4:
        raise UnsupportedOpError("Attention with 3-D inputs; lmforge imports the [batch, heads, seq, dim] form")
    attrs = {"causal": bool(a.get("is_causal", 0)), **({"q_offset": 0} if a.get("is_causal") else {})}
    if "scale" in a:
        attrs["scale"] = a["scale"]
    if len(ins) == 4 and ins[3] is None:
        ins = ins[:3]
    return [im.op("attention", ins, attrs, hint=node.output[0])]


def _reduce(ir_op: str):
    def handle(im: Importer, node):
        a = _attrs(node)
        x = im.tensor(node.input[0])
        axes = _shape_list(im, node.input[1]) if len(node.input) > 1 and node.input[1] else a.get("axes")
        if not axes and a.get("noop_with_empty_axes"):
            return [x]
        if ir_op == "mean" and not _is_float(x.type.dtype):
            raise UnsupportedOpError(f"ReduceMean of {x.type.dtype} values: lmforge's mean takes floats only; "
                                     "Cast the input to float before ReduceMean (and back after, if needed)")
        attrs = {"dims": tuple(axes) if axes else None, "keepdim": bool(a.get("keepdims", 1))}
        if ir_op == "sum" and not _is_float(x.type.dtype):  # ONNX sums in the input's type, torch in int64
            attrs["dtype"] = x.type.dtype
        return [im.op(ir_op, [x], attrs, hint=node.output[0])]

    return handle


def _reduce_logsumexp(im: Importer, node):
    """log(sum(exp(x - m))) + m with m = amax(x): the stable form (the IR has no logsumexp op). No axes with
    `noop_with_empty_axes=1` is the identity, as for the other reductions."""
    a = _attrs(node)
    x = im.tensor(node.input[0])
    axes = _shape_list(im, node.input[1]) if len(node.input) > 1 and node.input[1] else a.get("axes")
    if not axes and a.get("noop_with_empty_axes"):
        return [x]
    dims, keep = (tuple(axes) if axes else None), bool(a.get("keepdims", 1))
    m = im.op("amax", [x], {"dims": dims, "keepdim": True}, hint="lse_max")
    e = im.op("exp", [im.op("sub", [x, m], hint="lse")], hint="lse")
    s = im.op("log", [im.op("sum", [e], {"dims": dims, "keepdim": True}, hint="lse")], hint="lse")
    out = im.op("add", [s, m], hint=node.output[0])
    if not keep:
        shape = [d for i, d in enumerate(out.type.shape) if dims is not None and i not in
                 {ax % x.type.rank for ax in dims}]
        out = im.op("reshape", [out], {"shape": tuple(shape)}, hint=node.output[0])
    return [out]


def _range(im: Importer, node):
    """Range that was not folded (a bound over symbolic dims, or too long to fold) -> `arange`, whose bounds and
    step are integers. A float Range is an integer arange cast to float: exact when the start and step are whole
    numbers; a non-whole limit L becomes ceil(L) (floor(L) for a negative step), which keeps the same elements."""
    start, limit, delta = (im.get_static(i) for i in node.input)
    if None in (start, limit, delta) or isinstance(delta.item(), str):
        raise UnsupportedOpError("Range needs bounds computed from shapes or constants and a constant step")
    first, end, step = start.item(), limit.item(), delta.item()
    if step == 0:
        raise CaptureError("Range with a step of 0 (ONNX requires a non-zero delta)")
    if _is_float(start.dtype):
        if any(not isinstance(v, str) and not float(v).is_integer() for v in (first, step)):
            raise UnsupportedOpError(f"Range of {start.dtype} from {first} by {step} with a bound over symbolic "
                                     f"dims or more than {FOLD_LIMIT} elements: lmforge builds it from an integer "
                                     "arange, so it needs a whole-number start and step; scale the range so they are "
                                     "whole (e.g. Range(1, 2N, 2) * 0.5 for 0.5, 1.5, ...)")
        if not isinstance(end, str):
            end = math.ceil(end) if step > 0 else math.floor(end)
    first, end = (v if isinstance(v, str) else int(v) for v in (first, end))
    attrs = {"start": first, "end": end, "step": int(step), "dtype": start.dtype}
    if start.dtype.startswith("float"):
        attrs["dtype"] = "int64"
        return [im.op("cast", [im.op("arange", [], attrs, hint=node.output[0])], {"dtype": start.dtype},
                      hint=node.output[0])]
    return [im.op("arange", [], attrs, hint=node.output[0])]


def _constant_of_shape(im: Importer, node):
    value = _attrs(node).get("value")
    arr = onnx.numpy_helper.to_array(value) if value is not None else np.zeros(1, np.float32)
    dtype = IR_DTYPES[value.data_type] if value is not None else "float32"
    v = arr.reshape(-1)[0].item()
    return [im.op("full", [], {"shape": tuple(_shape_list(im, node.input[0])), "value": v, "dtype": dtype},
                  hint=node.output[0])]


def _static_int(im: Importer, node, i: int, what: str):
    """Input #i of `node` as one int (or symbolic dim) known at import; UnsupportedOpError when it is computed
    at run time, since the IR op takes it as an attribute."""
    s = im.get_static(node.input[i])
    if s is None or s.array.size != 1:
        raise UnsupportedOpError(f"{node.op_type} with {what} {node.input[i]!r} computed at run time: lmforge takes "
                                 f"{what} as an attribute of its op, so it must be known at import (a constant, "
                                 "or computed from shapes)")
    return _ints(s)[0]


def _trilu(im: Importer, node):
    k = _static_int(im, node, 1, "diagonal offset k") if len(node.input) > 1 and node.input[1] else 0
    return [im.op("tri", [im.tensor(node.input[0])], {"diagonal": k, "upper": bool(_attrs(node).get("upper", 1))},
                  hint=node.output[0])]


def _topk(im: Importer, node):
    a = _attrs(node)
    k = _static_int(im, node, 1, "K")
    return list(im.op("topk", [im.tensor(node.input[0])], {"k": k, "dim": a.get("axis", -1),
                                                            "largest": bool(a.get("largest", 1))}, hint=node.output[0]))


def _matmul_nbits(im: Importer, node):
    """MatMulNBits -> linear_wo: qweight [N, K*bits/8], scales and unpacked zero points [N, K/block]."""
    a = _attrs(node)
    k, n, bits, block = a["K"], a["N"], a.get("bits", 4), a["block_size"]
    if len(node.input) > 4 and node.input[4]:
        raise UnsupportedOpError("MatMulNBits with g_idx (act-order) has no lmforge form")
    blocks = k // block
    q = _tensor_from_proto(im.inits[node.input[1]]).reshape(n, k * bits // 8)
    s = _tensor_from_proto(im.inits[node.input[2]]).reshape(n, blocks)
    if len(node.input) > 3 and node.input[3]:
        z = _tensor_from_proto(im.inits[node.input[3]])
        if z.dtype != torch.uint8:  # onnxruntime also takes them in the scales' float type
            raise UnsupportedOpError(f"MatMulNBits zero points {node.input[3]!r} of type "
                                     f"{IR_DTYPES[im.inits[node.input[3]].data_type]}: lmforge's quantized weights "
                                     "take uint8 zero points only; export the model with integer (uint8) zero points")
        if bits == 4:
            z = z.reshape(n, -1)
            z = torch.stack([z & 0xF, z >> 4], dim=-1).reshape(n, -1)[:, :blocks]
        z = z.reshape(n, blocks)
    else:
        z = torch.full((n, blocks), 2 ** (bits - 1), dtype=torch.uint8)
    names = [node.input[i] if i < len(node.input) and node.input[i] else node.input[1] + "_zeros" for i in (1, 2, 3)]
    qv, sv, zv = (im.param(n.removesuffix("__nbits"), t, key=("nbits", n)) for n, t in zip(names, (q, s, z)))
    bias = im.tensor(node.input[5]) if len(node.input) > 5 and node.input[5] else None
    ins = [im.tensor(node.input[0]), qv, sv, zv] + ([bias] if bias is not None else [])
    return [im.op("linear_wo", ins, {"bits": bits, "group_size": block},
                  hint=node.output[0])]


def _constant(im: Importer, node):
    a = _attrs(node)
    if "value" in a:
        t = _tensor_from_proto(a["value"])
        return [Static(t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy(), IR_DTYPES[a["value"].data_type])]
    for key, dtype in (("value_int", "int64"), ("value_float", "float32"), ("value_ints", "int64"),
                       ("value_floats", "float32")):
        if key in a:
            return [Static(np.array(a[key]), dtype)]
    raise UnsupportedOpError("Constant with a sparse or string value")


def _unary(ir_op: str):
    return lambda im, node: [im.op(ir_op, [im.tensor(node.input[0])], hint=node.output[0])]


def _hardmax(im: Importer, x: Value, axis: int, hint: str) -> Value:
    """1.0 at the first maximum along `axis`, 0.0 elsewhere: eq(arange(n), argmax(x)) cast to x's dtype."""
    axis %= x.type.rank
    n = x.type.shape[axis]
    ar = im.op("reshape", [im.op("arange", [], {"end": n}, hint=hint)],
               {"shape": tuple(n if i == axis else 1 for i in range(x.type.rank))}, hint=hint)
    top = im.op("argmax", [x], {"dim": axis, "keepdim": True}, hint=hint)
    return im.op("cast", [im.op("eq", [ar, top], hint=hint)], {"dtype": x.type.dtype}, hint=hint)


def _softmax(kind: str):
    """Softmax / LogSoftmax / Hardmax. From opset 13 they normalize along `axis` (default -1). Up to opset 12
    the input is coerced to 2-D at `axis` (default 1), [prod(dims[:axis]), prod(dims[axis:])], normalized over
    the second dim and reshaped back: the same as along `axis` only when `axis` is the last dim."""

    def normalize(im: Importer, x: Value, axis: int, hint: str) -> Value:
        if kind == "Hardmax":
            return _hardmax(im, x, axis, hint)
        return im.op("softmax", [x], {"dim": axis, **({"log": True} if kind == "LogSoftmax" else {})}, hint=hint)

    def handle(im: Importer, node):
        x, hint = im.tensor(node.input[0]), node.output[0]
        rank, coerce = x.type.rank, 0 < im.opset <= 12
        axis = _attrs(node).get("axis", 1 if coerce else -1)
        if not -rank <= axis < rank:
            raise CaptureError(f"{kind} axis {axis} is out of range for a rank-{rank} input")
        if not coerce or axis % rank == rank - 1:
            return [normalize(im, x, axis, hint)]
        axis %= rank
        shape = x.type.shape
        flat = im.op("reshape", [x], {"shape": (_numel(shape[:axis]), _numel(shape[axis:]))}, hint=hint)
        return [im.op("reshape", [normalize(im, flat, -1, hint)], {"shape": tuple(shape)}, hint=hint)]

    return handle


def _arg_extreme(im: Importer, node):
    """ArgMax / ArgMin (argmax of an order-reversed copy). `select_last_index=1` takes the last extreme: argmax
    of x reversed along `axis` (index_select at n-1-i), mapped back as n-1-i."""
    a, hint = _attrs(node), node.output[0]
    x = im.tensor(node.input[0])
    axis, keep = a.get("axis", 0) % max(x.type.rank, 1), bool(a.get("keepdims", 1))
    dtype = x.type.dtype
    if node.op_type == "ArgMin":
        if _is_float(dtype):
            x = im.op("neg", [x], hint=hint)
        elif dtype in ("int8", "int16", "int32", "int64"):  # -1 - x (= ~x) reverses the order without overflow
            x = im.op("sub", [x, None], {"scalar": -1, "swap": True}, hint=hint)
        else:
            raise UnsupportedOpError(f"ArgMin of {dtype} (lmforge imports it for float and signed int inputs)")
    if not a.get("select_last_index", 0):
        return [im.op("argmax", [x], {"dim": axis, "keepdim": keep}, hint=hint)]
    n = x.type.shape[axis]
    last = n - 1 if isinstance(n, int) else simplify_dim(f"({n}) - 1")
    rev = im.op("sub", [im.op("arange", [], {"end": n}, hint=hint), None], {"scalar": last, "swap": True}, hint=hint)
    i = im.op("argmax", [im.op("index_select", [x, rev], {"dim": axis}, hint=hint)], {"dim": axis, "keepdim": keep},
              hint=hint)
    return [im.op("sub", [i, None], {"scalar": last, "swap": True}, hint=hint)]


def _erf(im: Importer, node):
    """Erf has no IR op: a torch_fallback node (aten.erf). The exact GELU built on it is recognised at its last
    Mul (see `_gelu_peephole`), which leaves this node dead."""
    x = im.tensor(node.input[0])
    return [_fallback(im, "aten.erf.default", [x], x.type, node.output[0])]


def _dropout(im: Importer, node):
    """Dropout at inference: the identity, and its optional mask output all ones (True from opset 10, where the
    mask is bool). A training_mode that is true or computed at run time would drop at random: refused."""
    x = im.tensor(node.input[0])
    if len(node.input) > 2 and node.input[2]:
        mode = im.get_static(node.input[2])
        if mode is None or mode.array.size != 1 or bool(mode.item()):
            raise UnsupportedOpError(f"Dropout with training_mode {node.input[2]!r} true or computed at run time: "
                                     "lmforge imports inference models, where Dropout is the identity")
    if len(node.output) < 2 or not node.output[1]:
        return [x]
    dtype, value = ("bool", True) if im.opset >= 10 else (x.type.dtype, 1)
    mask = im.op("full", [], {"shape": x.type.shape, "value": value, "dtype": dtype}, hint=node.output[1])
    return [x, mask]


def _clip(im: Importer, node):
    """Clip -> maximum(x, min) then minimum(.., max): bounds are optional inputs from opset 11, `min` / `max`
    attributes before. (min > max gives max everywhere, as ONNX says.)"""
    x, a, hint = im.tensor(node.input[0]), _attrs(node), node.output[0]
    for i, key, ir_op in ((1, "min", "maximum"), (2, "max", "minimum")):
        if len(node.input) > i and node.input[i]:
            bound = im.tensor(node.input[i])
        elif key in a:
            bound = im.param(f"{_ident(hint)}_{key}", torch.tensor(a[key], dtype=torch_dtype(x.type.dtype)),
                             key=("clip", node.output[0], key))
        else:
            continue
        x = im.op(ir_op, [x, bound], hint=hint)
    return [x]


_HANDLERS = {
    **{t: _unary(op) for op, t in UNARY.items()},
    **{t: _binary(op) for op, t in BINARY.items() if t not in ("Max", "Min")},
    "Max": _variadic("maximum"), "Min": _variadic("minimum"), "Sum": _variadic("add"),
    **{t: _compare(op) for op, t in COMPARE.items()},
    "Gelu": lambda im, n: [im.op("gelu", [im.tensor(n.input[0])], {"approximate": _attrs(n).get("approximate", "none")},
                                 hint=n.output[0])],
    "Where": _where, "Identity": lambda im, n: [im.tensor(n.input[0])], "Dropout": _dropout,
    "Cast": lambda im, n: [im.op("cast", [im.tensor(n.input[0])], {"dtype": IR_DTYPES[_attrs(n)["to"]]},
                                 hint=n.output[0])],
    "Trilu": _trilu,
    **{t: _reduce(op) for op, t in REDUCE.items()}, "ReduceLogSumExp": _reduce_logsumexp,
    "ArgMax": _arg_extreme, "ArgMin": _arg_extreme,
    **{t: _softmax(t) for t in ("Softmax", "LogSoftmax", "Hardmax")},
    "Pow": _pow, "Erf": _erf, "Clip": _clip,
    "Reshape": _reshape, "Unsqueeze": _unsqueeze, "Squeeze": _squeeze, "Flatten": _flatten, "Expand": _expand,
    "Transpose": lambda im, n: [im.op("permute", [x := im.tensor(n.input[0])], {
        "perm": tuple(_attrs(n).get("perm", range(x.type.rank - 1, -1, -1)))}, hint=n.output[0])],
    "Concat": lambda im, n: [im.op("concat", [im.tensor(i) for i in n.input], {"dim": _attrs(n)["axis"]},
                                   hint=n.output[0])],
    "Slice": _slice, "Split": _split, "Gather": _gather, "MatMul": _matmul, "Gemm": _gemm,
    "RMSNormalization": _norm("rmsnorm"), "LayerNormalization": _norm("layernorm"), "Attention": _attention,
    "Range": _range, "ConstantOfShape": _constant_of_shape, "TopK": _topk, "Constant": _constant,
    "Shape": _fold_shape, f"{MS_DOMAIN}::MatMulNBits": _matmul_nbits,
}


def import_onnx(model_or_path: onnx.ModelProto | str | Path) -> Graph:
    """An ONNX model (a ModelProto or a path to a .onnx file) as an IR Graph with its weights.

    Raises CaptureError when the file cannot be read and UnsupportedOpError naming an ONNX op lmforge
    has no mapping for.
    """
    model = model_or_path
    if not isinstance(model, onnx.ModelProto):
        path = Path(model_or_path)
        if not path.is_file():
            raise CaptureError(f"ONNX model {str(path)!r} does not exist or is not a file")
        try:
            model = onnx.load(str(path))
        except Exception as e:  # protobuf / external-data errors: say what to do, not where protobuf failed
            raise CaptureError(f"cannot read ONNX model {str(path)!r} ({type(e).__name__}: {e}); "
                               "is it a valid .onnx file with its external data beside it?") from None
    return Importer(model).run()
