"""IR graph -> ONNX model (standard opset 23 ops; com.microsoft MatMulNBits; lmforge-only ops in "ai.lmforge").

`to_onnx(graph)` emits one ONNX sub-sequence per IR node, from the table `_LOWERINGS`:

    linear(x, w)               ->  MatMul(x, w__transposed)  [+ Add(b)]       (Gemm(transB=1) when x is 2-D)
    rmsnorm(x, w; eps)         ->  RMSNormalization(x, w; epsilon=eps)
    attention(q, k, v; causal) ->  Attention(q, k, v [, bool mask])           (GQA: Attention broadcasts heads)
    rope(x, cos, sin)          ->  x * cos + Concat(-x[..., D/2:], x[..., :D/2]) * sin
    fused(...){region}         ->  the region's nodes, inlined
    merge_lse(...)             ->  ai.lmforge::merge_lse(...) carrying every attribute (no onnxruntime kernel)
    torch_fallback             ->  UnsupportedOpError (an ATen call has no faithful ONNX form)

Symbolic dimensions ("batch", "past + 1") become ONNX dim_params on inputs and outputs; wherever an op
needs a size at run time (Reshape, Expand, Range, Slice), it is computed from `Shape` of the graph input
that binds the symbol, with integer arithmetic for expressions. Nothing is approximated: an op with no
exact ONNX form is either a custom-domain node (visible, it just will not run in onnxruntime) or an error.
"""
from __future__ import annotations

import json
from typing import Any, Callable

import numpy as np
import onnx
import sympy
import torch
from onnx import TensorProto, helper

from lmforge.errors import LmforgeError, UnsupportedOpError
from lmforge.ir.graph import Graph, Node, Value, unique_name
from lmforge.ir.ops import get_op
from lmforge.ir.types import TensorType, parse_dim, simplify_dim, torch_dtype

OPSET = 23               # onnxruntime >= 1.22 runs RMSNormalization and Attention at this opset
IR_VERSION = 11          # the ONNX IR version that goes with opset 23
CUSTOM_DOMAIN = "ai.lmforge"
MS_DOMAIN = "com.microsoft"
TRANSPOSED_SUFFIX = "__transposed"   # initializer name of a linear weight stored as w.T (onnx_import strips it)
INT64_MAX = 2**63 - 1

ONNX_DTYPES = {
    "float64": TensorProto.DOUBLE, "float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16,
    "bfloat16": TensorProto.BFLOAT16, "float8_e4m3fn": TensorProto.FLOAT8E4M3FN, "int64": TensorProto.INT64,
    "int32": TensorProto.INT32, "int16": TensorProto.INT16, "int8": TensorProto.INT8, "uint8": TensorProto.UINT8,
    "bool": TensorProto.BOOL, "int4": TensorProto.INT4,
}

UNARY = {"neg": "Neg", "exp": "Exp", "log": "Log", "sqrt": "Sqrt", "abs": "Abs", "sin": "Sin", "cos": "Cos",
         "tanh": "Tanh", "sigmoid": "Sigmoid", "relu": "Relu", "reciprocal": "Reciprocal", "logical_not": "Not"}
BINARY = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "pow": "Pow", "maximum": "Max",
          "minimum": "Min", "logical_and": "And", "logical_or": "Or"}
COMPARE = {"eq": "Equal", "lt": "Less", "le": "LessOrEqual", "gt": "Greater", "ge": "GreaterOrEqual"}
REDUCE = {"sum": "ReduceSum", "mean": "ReduceMean", "amax": "ReduceMax", "amin": "ReduceMin"}


def tensor_proto(name: str, tensor: torch.Tensor) -> TensorProto:
    """A torch tensor as an ONNX initializer (raw little-endian bytes; bf16 and fp8 included)."""
    t = tensor.detach().cpu().contiguous()
    from lmforge.ir.types import dtype_name

    dtype = dtype_name(t.dtype)
    flat = t.reshape(-1)
    raw = (flat.to(torch.uint8) if t.dtype == torch.bool else flat).view(torch.uint8).numpy().tobytes()
    return helper.make_tensor(name, ONNX_DTYPES[dtype], list(t.shape), raw, raw=True)


def value_info(name: str, t: TensorType) -> onnx.ValueInfoProto:
    """A typed ONNX value; symbolic dims become dim_params (expressions kept as text, e.g. "past + 1")."""
    return helper.make_tensor_value_info(name, ONNX_DTYPES[t.dtype], [d if isinstance(d, int) else str(d)
                                                                      for d in t.shape])


class Emitter:
    """Collects ONNX nodes and initializers for one graph, with run-time dimension arithmetic."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, TensorProto] = {}
        self.value_infos: list[onnx.ValueInfoProto] = []
        self.names: set[str] = {v.name for v in (*graph.inputs, *graph.params)}
        self.domains: set[str] = set()
        self._dims: dict[str, str] = {}
        self._scalars: dict[str, str] = {}
        self._sources = {}  # symbol -> (input name, axis) that binds it
        for v in graph.inputs:
            for axis, d in enumerate(v.type.shape):
                if isinstance(d, str) and d.isidentifier() and d not in self._sources:
                    self._sources[d] = (v.name, axis)

    # ---- names, nodes, constants --------------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        return unique_name(hint, self.names)

    def node(self, op_type: str, inputs: list[str | None], hint: str = "t", n_out: int = 1, domain: str = "",
             outputs: list[str] | None = None, **attrs) -> Any:
        """Append one ONNX node; returns its output name (or the list when n_out > 1)."""
        outs = outputs or [self.fresh(f"{hint}_{op_type.lower()}" if n_out == 1 else f"{hint}_{i}")
                           for i in range(n_out)]
        ins = ["" if i is None else i for i in inputs]
        while ins and ins[-1] == "":
            ins.pop()
        if domain:
            self.domains.add(domain)
        self.nodes.append(helper.make_node(op_type, ins, outs, name=self.fresh(f"n_{hint}"), domain=domain or None,
                                           **attrs))
        return outs[0] if len(outs) == 1 else outs

    def initializer(self, name: str, tensor: torch.Tensor) -> str:
        if name not in self.initializers:
            self.names.add(name)
            self.initializers[name] = tensor_proto(name, tensor)
        return name

    def const(self, value, dtype: str = "int64", hint: str = "c") -> str:
        return self.initializer(self.fresh(hint), torch.tensor(value, dtype=torch_dtype(dtype)))

    def weight(self, v: Value) -> torch.Tensor:
        if v.name not in self.graph.weights:
            raise LmforgeError(f"parameter {v.name!r} has no weights in graph {self.graph.name!r}; ONNX export "
                               "needs them (export the compiled model, whose graph carries its weights)")
        return self.graph.weights[v.name]

    # ---- run-time dimensions --------------------------------------------------------------------------
    def dim(self, d) -> str:
        """An int64 [1] tensor holding dimension `d` (an int, a symbol or an expression over symbols)."""
        key = str(d)
        if key not in self._dims:
            self._dims[key] = self._expr(parse_dim(d) if isinstance(d, str) else sympy.Integer(d), key)
        return self._dims[key]

    def _expr(self, e, text: str) -> str:
        if e.is_Integer:
            return self.const([int(e)], hint="dim")
        if e.is_Symbol:
            if str(e) not in self._sources:
                raise UnsupportedOpError(f"dimension {text!r} uses symbol {str(e)!r} that no graph input binds; "
                                         "ONNX export computes sizes from the inputs' shapes")
            inp, axis = self._sources[str(e)]
            return self.node("Shape", [inp], hint=str(e), start=axis, end=axis + 1)
        if e.is_Add or e.is_Mul or isinstance(e, (sympy.Max, sympy.Min, sympy.Mod)):
            args = [self.dim(simplify_dim(str(a))) for a in e.args]
            op = "Add" if e.is_Add else "Mul" if e.is_Mul else type(e).__name__
            if op in ("Max", "Min", "Mod"):
                return self.node(op, args, hint="dim")
            out = args[0]
            for a in args[1:]:
                out = self.node(op, [out, a], hint="dim")
            return out
        if e.is_Pow and e.exp.is_Integer and int(e.exp) > 0:
            out = base = self.dim(str(e.base))
            for _ in range(int(e.exp) - 1):
                out = self.node("Mul", [out, base], hint="dim")
            return out
        if isinstance(e, (sympy.floor, sympy.ceiling)):
            num, den = sympy.fraction(sympy.together(e.args[0]))
            n, dd = self.dim(simplify_dim(str(num))), self.dim(simplify_dim(str(den)))
            if isinstance(e, sympy.ceiling):
                n = self.node("Sub", [self.node("Add", [n, dd], hint="dim"), self.const([1])], hint="dim")
            return self.node("Div", [n, dd], hint="dim")  # int64 Div truncates: floor for the sizes here (>= 0)
        raise UnsupportedOpError(f"dimension {text!r} has no ONNX integer form (only +, *, //, ceil, max, min, %)")

    def shape(self, dims) -> str:
        """An int64 [rank] shape tensor; constant when every dim is static."""
        if all(isinstance(d, int) for d in dims):
            return self.const(list(dims), hint="shape")
        return self.node("Concat", [self.dim(d) for d in dims], hint="shape", axis=0)

    def scalar(self, d) -> str:
        """An int64 0-D tensor holding dimension `d` (Range bounds, Gather indices)."""
        key = str(d)
        if key not in self._scalars:
            self._scalars[key] = self.const(d, hint="scalar") if isinstance(d, int) else \
                self.node("Squeeze", [self.dim(d), self.const([0])], hint="scalar")
        return self._scalars[key]

    def cast(self, name: str, src: str, dst: str) -> str:
        return name if src == dst else self.node("Cast", [name], hint="cast", to=ONNX_DTYPES[dst])


# ---- lowerings: (emitter, node, input names) -> output names -----------------------------------------

Lowering = Callable[[Emitter, Node, list], list]


def _in_type(node: Node, i: int) -> TensorType:
    return node.inputs[i].type


def _scalar_const(em: Emitter, value, dtype: str) -> str:
    """A 0-D tensor of `dtype` holding a scalar attribute (a symbolic one is computed from the input shapes)."""
    if isinstance(value, str):
        return em.cast(em.scalar(value), "int64", dtype)
    return em.const(value, dtype, hint="scalar")


def _scalar_operand(em: Emitter, node: Node, dtype: str) -> str:
    return _scalar_const(em, node.attr["scalar"], dtype)


def _binary(op_type: str) -> Lowering:
    """A binary op. `swap` puts the scalar first; then, for Add/Sub only (as in the IR and torch), `alpha` scales
    the second operand: rsub(x, 2, alpha=3) is sub(x; scalar=2, swap, alpha=3) = 2 - 3 * x."""
    def lower(em, node, ins):
        a = node.attr
        out_dtype = node.output.type.dtype
        if op_type in ("And", "Or"):
            out_dtype = "bool"
        x = em.cast(ins[0], _in_type(node, 0).dtype, out_dtype)
        y = em.cast(ins[1], _in_type(node, 1).dtype, out_dtype) if ins[1] is not None else \
            _scalar_operand(em, node, out_dtype)
        if a.get("swap"):
            x, y = y, x
        if op_type in ("Add", "Sub") and a.get("alpha", 1.0) != 1.0:
            y = em.node("Mul", [y, em.const(a["alpha"], out_dtype)], hint=node.output.name)
        return [em.node(op_type, [x, y], hint=node.output.name)]

    return lower


def _compare(op_type: str, negate: bool = False) -> Lowering:
    def lower(em, node, ins):
        ta = _in_type(node, 0).dtype
        if ins[1] is not None:
            tb = _in_type(node, 1).dtype
            common = ta if ta == tb else str(torch.promote_types(torch_dtype(ta), torch_dtype(tb))).split(".")[1]
            x, y = em.cast(ins[0], ta, common), em.cast(ins[1], tb, common)
        else:
            scalar = node.attr["scalar"]
            common = "float32" if isinstance(scalar, float) and not ta.startswith(("float", "bfloat")) else ta
            x, y = em.cast(ins[0], ta, common), _scalar_operand(em, node, common)
        out = em.node(op_type, [x, y], hint=node.output.name)
        return [em.node("Not", [out], hint=node.output.name) if negate else out]

    return lower


def _unary(op_type: str) -> Lowering:
    """A unary op; when the IR's result dtype differs from the input's (exp of an int is float32, as in torch),
    the input is cast to it first, since ONNX's float ops take no integers."""
    def lower(em, node, ins):
        src, dst = _in_type(node, 0).dtype, node.output.type.dtype
        return [em.node(op_type, [em.cast(ins[0], src, dst)], hint=node.output.name)]

    return lower


def _silu(em, node, ins):
    return [em.node("Mul", [ins[0], em.node("Sigmoid", ins[:1], hint=node.output.name)], hint=node.output.name)]


def _rsqrt(em, node, ins):
    return [em.node("Reciprocal", [em.node("Sqrt", ins[:1], hint=node.output.name)], hint=node.output.name)]


def _where(em, node, ins):
    a, dtype = node.attr, node.output.type.dtype
    x = ins[1] if ins[1] is not None else _scalar_const(em, a["a_scalar"], dtype)
    y = ins[2] if ins[2] is not None else _scalar_const(em, a["b_scalar"], dtype)
    x = em.cast(x, _in_type(node, 1).dtype, dtype) if ins[1] is not None else x
    y = em.cast(y, _in_type(node, 2).dtype, dtype) if ins[2] is not None else y
    return [em.node("Where", [ins[0], x, y], hint=node.output.name)]


def _reduce(op_type: str) -> Lowering:
    def lower(em, node, ins):
        a, x, src = node.attr, ins[0], _in_type(node, 0).dtype
        if node.op in ("sum", "mean") and node.output.type.dtype != src:
            # torch's dtype= converts the input first, and bool / integer sums accumulate in int64
            x, src = em.cast(x, src, node.output.type.dtype), node.output.type.dtype
        axes = [em.const(list(a["dims"]))] if a["dims"] is not None else []
        out = em.node(op_type, [x, *axes], hint=node.output.name, keepdims=int(a["keepdim"]))
        return [em.cast(out, src, node.output.type.dtype)]

    return lower


def _argmax(em, node, ins):
    a = node.attr
    if a["dim"] is None:
        flat = em.node("Reshape", [ins[0], em.const([-1])], hint=node.output.name)
        if not a["keepdim"]:
            return [em.node("ArgMax", [flat], hint=node.output.name, axis=0, keepdims=0)]
        # torch keeps every dim as a 1: [1] * rank, not the flattened argmax's [1]
        idx = em.node("ArgMax", [flat], hint=node.output.name, axis=0, keepdims=1)
        return [em.node("Reshape", [idx, em.shape(node.output.type.shape)], hint=node.output.name)]
    return [em.node("ArgMax", ins[:1], hint=node.output.name, axis=a["dim"], keepdims=int(a["keepdim"]))]


def _softmax(em, node, ins):
    src = _in_type(node, 0).dtype
    x = em.cast(ins[0], src, "float32")
    y = em.node("LogSoftmax" if node.attr["log"] else "Softmax", [x], hint=node.output.name, axis=node.attr["dim"])
    return [em.cast(y, "float32", src)]


def _reshape(em, node, ins):
    return [em.node("Reshape", [ins[0], em.shape(node.output.type.shape)], hint=node.output.name, allowzero=1)]


def _slice(em, node, ins):
    a = node.attr
    end = INT64_MAX if a["end"] is None or (isinstance(a["end"], int) and a["end"] >= 2**62) else a["end"]
    return [em.node("Slice", [ins[0], em.dim(a["start"]), em.dim(end), em.const([a["dim"]]), em.const([a["step"]])],
                    hint=node.output.name)]


def _select(em, node, ins):
    return [em.node("Gather", [ins[0], em.scalar(node.attr["index"])], hint=node.output.name, axis=node.attr["dim"])]


def _arange(em, node, ins):
    a = node.attr
    end = simplify_dim(str(a["end"]))
    r = em.node("Range", [em.scalar(a["start"]), em.scalar(end), em.scalar(a["step"])], hint=node.output.name)
    return [em.cast(r, "int64", a["dtype"])]


def _full(em, node, ins):
    a = node.attr
    value = tensor_proto("value", torch.tensor([a["value"]], dtype=torch_dtype(a["dtype"])))
    return [em.node("ConstantOfShape", [em.shape(node.output.type.shape)], hint=node.output.name, value=value)]


def _linear(em, node, ins):
    x, w, b = (ins + [None])[:3]
    wv, hint = node.inputs[1], node.output.name
    if wv in em.graph.params and _in_type(node, 0).rank == 2:
        return [em.node("Gemm", [x, em.initializer(wv.name, em.weight(wv)), b], hint=hint, transB=1)]
    if wv in em.graph.params:
        wt = em.initializer(wv.name + TRANSPOSED_SUFFIX, em.weight(wv).t().contiguous())
    else:
        wt = em.node("Transpose", [w], hint=hint, perm=[1, 0])
    y = em.node("MatMul", [x, wt], hint=hint)
    return [em.node("Add", [y, b], hint=hint) if b is not None else y]


def _norm_scale(em, node, ins, ndim: int) -> str:
    """The norm's weight, or ones of the normalized shape when the IR op has none (ONNX needs a scale)."""
    if len(ins) > 1 and ins[1] is not None:
        return ins[1]
    x = _in_type(node, 0)
    one = tensor_proto("v", torch.ones(1, dtype=torch_dtype(x.dtype)))
    return em.node("ConstantOfShape", [em.shape(x.shape[-ndim:])], hint="ones", value=one)


def _rmsnorm(em, node, ins):
    a = node.attr
    eps = a["eps"] if a["eps"] is not None else torch.finfo(torch.float32).eps   # F.rms_norm's default, any dtype
    return [em.node("RMSNormalization", [ins[0], _norm_scale(em, node, ins, a["ndim"])], hint=node.output.name,
                    axis=-a["ndim"], epsilon=float(eps), stash_type=1)]


def _layernorm(em, node, ins):
    a = node.attr
    bias = ins[2] if len(ins) > 2 else None
    return [em.node("LayerNormalization", [ins[0], _norm_scale(em, node, ins, a["ndim"]), bias],
                    hint=node.output.name, axis=-a["ndim"], epsilon=float(a["eps"]), stash_type=1)]


def _rope(em, node, ins):
    x, cos, sin = ins
    d, hint = _in_type(node, 0).shape[-1], node.output.name
    half = d // 2 if isinstance(d, int) else f"({d}) // 2"
    last = em.const([-1])
    lo = em.node("Slice", [x, em.dim(0), em.dim(half), last], hint=hint)
    hi = em.node("Slice", [x, em.dim(half), em.dim(INT64_MAX), last], hint=hint)
    rot = em.node("Concat", [em.node("Neg", [hi], hint=hint), lo], hint=hint, axis=-1)
    return [em.node("Add", [em.node("Mul", [x, cos], hint=hint), em.node("Mul", [rot, sin], hint=hint)], hint=hint)]


def _attention_mask(em, node, sq, skv, offset) -> str:
    """Bool [Sq, Skv]: key j is visible to query i iff j <= offset + i, and j is in the window or a sink."""
    a = node.attr
    if not a["causal"]:
        raise UnsupportedOpError("attention with a window but causal=False has no defined key order; "
                                 "set causal=True (the IR's window semantics are causal)")
    qpos = em.node("Range", [em.scalar(offset), em.scalar(simplify_dim(f"({offset}) + ({sq})")), em.scalar(1)],
                   hint="qpos")
    qpos = em.node("Unsqueeze", [qpos, em.const([1])], hint="qpos")
    kpos = em.node("Range", [em.scalar(0), em.scalar(skv), em.scalar(1)], hint="kpos")
    mask = em.node("LessOrEqual", [kpos, qpos], hint="causal")
    if a["window"] is not None:
        recent = em.node("Greater", [kpos, em.node("Sub", [qpos, em.const(a["window"])], hint="win")], hint="win")
        if a["sinks"]:
            recent = em.node("Or", [recent, em.node("Less", [kpos, em.const(a["sinks"])], hint="sink")], hint="win")
        mask = em.node("And", [mask, recent], hint="window")
    return mask


def _attention(em, node, ins):
    q, k, v, mask = (ins + [None])[:4]
    a, hint = node.attr, node.outputs[0].name
    qt, kt = _in_type(node, 0), _in_type(node, 1)
    sq, skv = qt.shape[2], kt.shape[2]
    offset = a["q_offset"] if a["q_offset"] is not None else simplify_dim(f"({skv}) - ({sq})")
    causal = a["causal"] and mask is None
    upper_left = causal and a["window"] is None and simplify_dim(str(offset)) == 0
    if mask is None and (a["window"] is not None or (causal and not upper_left)):
        mask = _attention_mask(em, node, sq, skv, offset)
    elif mask is not None and a["causal"]:   # an explicit mask and causal: both apply (as SDPA's do)
        seen = _attention_mask(em, node, sq, skv, offset)
        mt = node.inputs[3].type.dtype
        mask = em.node("And", [mask, seen], hint="causal") if mt == "bool" else \
            em.node("Where", [seen, mask, em.const(float("-inf"), mt)], hint="causal")
    attrs = {"is_causal": int(upper_left)}
    if a["scale"] is not None:
        attrs["scale"] = float(a["scale"])
    if not a["return_lse"]:
        return [em.node("Attention", [q, k, v, mask], hint=hint, **attrs)]
    # The LSE has no Attention output: compute scores once (fp32) and derive both outputs from them.
    hq, hk = qt.shape[1], kt.shape[1]
    if hq != hk:
        if not (isinstance(hq, int) and isinstance(hk, int)):
            raise UnsupportedOpError("attention with return_lse and GQA needs static head counts for ONNX")
        shape5, shape4 = (kt.shape[0], hk, hq // hk, skv, kt.shape[3]), (kt.shape[0], hq, skv, kt.shape[3])
        rep = []
        for t, vt in ((k, kt), (v, _in_type(node, 2))):
            s5 = (*shape5[:4], vt.shape[3])
            x = em.node("Expand", [em.node("Unsqueeze", [t, em.const([2])], hint=hint), em.shape(s5)], hint=hint)
            rep.append(em.node("Reshape", [x, em.shape((*shape4[:3], vt.shape[3]))], hint=hint))
        k, v = rep
    qf, kf = em.cast(q, qt.dtype, "float32"), em.cast(k, kt.dtype, "float32")
    scale = a["scale"] if a["scale"] is not None else None
    kt_ = em.node("Transpose", [kf], hint=hint, perm=[0, 1, 3, 2])
    scores = em.node("MatMul", [qf, kt_], hint=hint)
    scale_c = em.const(scale, "float32") if scale is not None else em.node(
        "Reciprocal", [em.node("Sqrt", [em.cast(em.dim(qt.shape[3]), "int64", "float32")], hint=hint)], hint=hint)
    scores = em.node("Mul", [scores, scale_c], hint=hint)
    if mask is not None:
        mt = node.inputs[3].type.dtype if len(node.inputs) > 3 and node.inputs[3] is not None else "bool"
        if mt == "bool":
            scores = em.node("Where", [mask, scores, em.const(float("-inf"), "float32")], hint=hint)
        else:
            scores = em.node("Add", [scores, em.cast(mask, mt, "float32")], hint=hint)
    lse = em.node("ReduceLogSumExp", [scores, em.const([-1])], hint=hint, keepdims=0)
    probs = em.node("Softmax", [scores], hint=hint, axis=-1)
    out = em.node("MatMul", [probs, em.cast(v, _in_type(node, 2).dtype, "float32")], hint=hint)
    return [em.cast(out, "float32", node.outputs[0].type.dtype), lse]


def _kv_cache_update(em, node, ins):
    cache, new = ins
    a, hint = node.attr, node.output.name
    n = _in_type(node, 1).shape[a["dim"]]
    axis = em.const([a["dim"]])
    head = em.node("Slice", [cache, em.dim(0), em.dim(a["pos"]), axis], hint=hint)
    tail = em.node("Slice", [cache, em.dim(simplify_dim(f"({a['pos']}) + ({n})")), em.dim(INT64_MAX), axis], hint=hint)
    return [em.node("Concat", [head, new, tail], hint=hint, axis=a["dim"])]


def _topk(em, node, ins):
    a = node.attr
    return em.node("TopK", [ins[0], em.const([a["k"]])], hint=node.outputs[0].name,
                   n_out=2, axis=a["dim"], largest=int(a["largest"]), sorted=1)


def _sample(em, node, ins):
    if node.attr["temperature"] == 0.0:
        return [em.node("ArgMax", ins[:1], hint=node.output.name, axis=-1, keepdims=0)]
    return _custom(em, node, ins)


def _linear_wo(em, node, ins):
    """MatMulNBits: B [N, K/block, block*bits/8], scales [N*K/block], zero points packed low nibble first."""
    a = node.attr
    bits, block = a["bits"], a["group_size"]
    qv, sv, zv = node.inputs[1:4]
    if bits not in (4, 8) or not all(v in em.graph.params for v in (qv, sv, zv)):
        return _custom(em, node, ins)
    q, s, z = em.weight(qv), em.weight(sv), em.weight(zv)
    n, k = q.shape[0], q.shape[1] * 8 // bits
    blocks = k // block
    b = em.initializer(qv.name + "__nbits", q.reshape(n, blocks, block * bits // 8))
    scales = em.initializer(sv.name + "__nbits", s.reshape(-1))
    if z.dtype == torch.uint8 and bits == 4:
        z = z.reshape(n, blocks)
        if blocks % 2:
            z = torch.cat([z, torch.zeros(n, 1, dtype=torch.uint8)], 1)
        z = (z[:, 0::2] & 0xF) | ((z[:, 1::2] & 0xF) << 4)
    zeros = em.initializer(zv.name + "__nbits", z.reshape(-1).to(s.dtype if z.is_floating_point() else torch.uint8))
    bias = ins[4] if len(ins) > 4 else None
    return [em.node("MatMulNBits", [ins[0], b, scales, zeros, None, bias], hint=node.output.name, domain=MS_DOMAIN,
                    K=k, N=n, bits=bits, block_size=block)]


def encode_attr(key: str, value) -> tuple[onnx.AttributeProto, bool]:
    """An IR attribute as an ONNX attribute; (proto, is_json) where JSON carries what ONNX cannot type."""
    from lmforge.ir.serialize import _attr_to_json

    if isinstance(value, bool):
        return helper.make_attribute(key, int(value)), False
    if isinstance(value, float) and not (value != value or float(np.float32(value)) == value):
        return helper.make_attribute(key, json.dumps(_attr_to_json(value))), True  # float32 would round it
    if isinstance(value, (int, float, str)) and not (isinstance(value, float) and value != value):
        return helper.make_attribute(key, value), False
    if isinstance(value, tuple) and value and all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        return helper.make_attribute(key, list(value)), False
    return helper.make_attribute(key, json.dumps(_attr_to_json(value))), True


def _custom(em, node, ins):
    """An lmforge-only op as an `ai.lmforge` node with every attribute; outputs keep their IR types."""
    attrs, json_keys = {}, []
    for k, v in node.attrs:
        proto, is_json = encode_attr(k, v)
        attrs[k] = proto
        if is_json:
            json_keys.append(k)
    outs = [em.fresh(v.name) for v in node.outputs]
    proto = helper.make_node(node.op, ["" if i is None else i for i in ins], outs, name=em.fresh(f"n_{node.op}"),
                             domain=CUSTOM_DOMAIN)
    proto.attribute.extend(attrs.values())
    if json_keys:
        proto.attribute.append(helper.make_attribute("lmforge_json_attrs", json_keys))
    em.domains.add(CUSTOM_DOMAIN)
    em.nodes.append(proto)
    em.value_infos.extend(value_info(o, v.type) for o, v in zip(outs, node.outputs))
    return outs


def _refuse_fallback(em, node, ins):
    where = f" (from {node.source})" if node.source else ""
    raise UnsupportedOpError(f"op torch_fallback ({node.attr.get('target')}){where} has no ONNX form: it is an "
                             "ATen call lmforge does not map. Rewrite that part of the model with mapped ops to "
                             "get model.onnx; the artifact's graph.json runs it with the torch reference")


_LOWERINGS: dict[str, Lowering] = {
    **{op: _unary(t) for op, t in UNARY.items()},
    **{op: _binary(t) for op, t in BINARY.items()},
    **{op: _compare(t) for op, t in COMPARE.items()},
    "ne": _compare("Equal", negate=True), "silu": _silu, "rsqrt": _rsqrt, "where": _where,
    "gelu": lambda em, n, i: [em.node("Gelu", i[:1], hint=n.output.name, approximate=n.attr["approximate"])],
    "pow_scalar": lambda em, n, i: [em.node("Pow", [i[0], em.const(n.attr["exponent"], _in_type(n, 0).dtype)],
                                            hint=n.output.name)],
    "cast": lambda em, n, i: [em.node("Cast", i[:1], hint=n.output.name, to=ONNX_DTYPES[n.attr["dtype"]])],
    "tri": lambda em, n, i: [em.node("Trilu", [i[0], em.const(n.attr["diagonal"])], hint=n.output.name,
                                     upper=int(n.attr["upper"]))],
    **{op: _reduce(t) for op, t in REDUCE.items()},
    "argmax": _argmax, "softmax": _softmax, "reshape": _reshape, "slice": _slice, "select": _select,
    "permute": lambda em, n, i: [em.node("Transpose", i[:1], hint=n.output.name,
                                         perm=[p % _in_type(n, 0).rank for p in n.attr["perm"]])],
    "expand": lambda em, n, i: [em.node("Expand", [i[0], em.shape(n.output.type.shape)], hint=n.output.name)],
    "concat": lambda em, n, i: [em.node("Concat", [x for x in i if x is not None], hint=n.output.name,
                                        axis=n.attr["dim"])],
    "kv_cache_append": lambda em, n, i: [em.node("Concat", [x for x in i if x is not None], hint=n.output.name,
                                        axis=n.attr["dim"])],
    "index_select": lambda em, n, i: [em.node("Gather", i[:2], hint=n.output.name, axis=n.attr["dim"])],
    "embedding": lambda em, n, i: [em.node("Gather", [i[1], i[0]], hint=n.output.name, axis=0)],
    "matmul": lambda em, n, i: [em.node("MatMul", i[:2], hint=n.output.name)],
    "arange": _arange, "full": _full, "linear": _linear, "rmsnorm": _rmsnorm, "layernorm": _layernorm,
    "rope": _rope, "attention": _attention, "kv_cache_update": _kv_cache_update, "topk": _topk,
    "sample": _sample, "linear_wo": _linear_wo, "torch_fallback": _refuse_fallback,
}


def _rename(em: Emitter, start: int, name: str, want: str) -> str:
    """Give a node output its IR name when the lowering's nodes (from `start`) produced it under another."""
    fresh_nodes = em.nodes[start:]
    if name == want or want in em.names or not any(name in n.output for n in fresh_nodes):
        return name
    em.names.add(want)
    for n in fresh_nodes:
        for field in (n.input, n.output):
            renamed = [want if x == name else x for x in field]
            del field[:]
            field.extend(renamed)
    return want


def _emit_graph(em: Emitter, graph: Graph, env: dict[str, str]) -> None:
    """Emit every node of `graph`; `env` maps IR value names to ONNX tensor names (regions are inlined)."""
    for node in graph.nodes:
        ins = [None if v is None else env[v.name] for v in node.inputs]
        if node.op == "fused":
            inner = dict(env)
            inner.update({rv.name: name for rv, name in zip(node.regions[0].inputs, ins)})
            _emit_graph(em, node.regions[0], inner)
            env.update({v.name: inner[rv.name] for v, rv in zip(node.outputs, node.regions[0].outputs)})
            continue
        get_op(node.op)  # an unknown op is an UnsupportedOpError naming it
        if node.regions:
            raise UnsupportedOpError(f"op {node.op!r} holds a region (sub-graph) that ONNX export cannot carry yet")
        lower = _LOWERINGS.get(node.op, _custom)
        start = len(em.nodes)
        outs = lower(em, node, ins)
        outs = [outs] if isinstance(outs, str) else list(outs)
        for i, v in enumerate(node.outputs):
            outs[i] = _rename(em, start, outs[i], v.name)
        env.update({v.name: o for v, o in zip(node.outputs, outs)})


def to_onnx(graph: Graph, *, check: bool = True) -> onnx.ModelProto:
    """The ONNX form of `graph` (with its weights as initializers), or UnsupportedOpError naming the op.

    Graph inputs and outputs keep their IR names and types (symbolic dims -> dim_params); the graph's
    `meta` (output structure, ...) travels in metadata_props["lmforge.meta"] so `import_onnx` restores it.
    """
    from lmforge.ir.serialize import _attr_to_json

    em = Emitter(graph)
    env = {v.name: v.name for v in (*graph.inputs, *graph.params)}
    _emit_graph(em, graph, env)
    used = {i for n in em.nodes for i in n.input}
    for p in graph.params:  # a weight read only through a transposed/packed copy is not stored twice
        if p.name in used and p.name not in em.initializers:
            em.initializer(p.name, em.weight(p))
    sources = {v.name for v in graph.inputs} | set(em.initializers)
    outputs, seen = [], set()
    for v in graph.outputs:
        name = env[v.name]
        if name in seen or name in sources or name != v.name:  # ONNX outputs: unique names, made by nodes
            target = v.name if v.name not in em.names else em.fresh(v.name)
            em.names.add(target)
            name = em.node("Identity", [name], outputs=[target])
        seen.add(name)
        outputs.append(value_info(name, v.type))
    onnx_graph = helper.make_graph(em.nodes, graph.name, [value_info(v.name, v.type) for v in graph.inputs],
                                   outputs, list(em.initializers.values()), value_info=em.value_infos)
    opsets = [helper.make_opsetid("", OPSET)] + [helper.make_opsetid(d, 1) for d in sorted(em.domains)]
    model = helper.make_model(onnx_graph, opset_imports=opsets, producer_name="lmforge", ir_version=IR_VERSION)
    meta = {"lmforge.graph_name": graph.name,
            "lmforge.meta": json.dumps([[k, _attr_to_json(v)] for k, v in graph.meta])}
    helper.set_model_props(model, meta)
    if check and model.ByteSize() < 2**31 - 2**24:
        onnx.checker.check_model(model)
    return model
