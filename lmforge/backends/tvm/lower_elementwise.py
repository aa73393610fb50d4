"""Elementwise ops and `fused` elementwise regions lowered to ONE TE compute (and RoPE, which is one too).

A `fused` node's region is a small Graph of elementwise ops; its body becomes a single expression evaluated
per output element, so the intermediates never touch memory:

    fused(%a, %b) { %s = silu(%a); %y = mul(%s, %b) }   ->   out[i, j] = a[i, j] * sigmoid(a[i, j]) * b[i, j]

A lone elementwise node (a residual add) is lowered the same way, as a one-op region. exp (and so sigmoid,
silu) is `fast_math.exp_f32`, plain arithmetic that vectorizes, instead of a scalar libm call.

Broadcasting: inputs align to the output from the right; an axis where an input's IR size is 1 and the
output's is not reads index 0. Every output axis but the last is symbolic in the TE (one build serves every
batch and sequence length); the last stays static when it is, so the schedule can vectorize it.
"""
from __future__ import annotations

import math

from lmforge.backends.tvm.build import Lowered, OpKernel, ready
from lmforge.backends.tvm.fast_math import exp_f32
from lmforge.ir.graph import Graph, Node

UNARY = ("neg", "exp", "log", "sqrt", "rsqrt", "abs", "sin", "cos", "tanh", "sigmoid", "relu", "silu", "reciprocal")
BINARY = ("add", "sub", "mul", "div", "pow", "maximum", "minimum")
OTHER = ("gelu", "pow_scalar", "cast")
ELEMENTWISE = frozenset(UNARY + BINARY + OTHER)


def _const(value) -> "object":
    from tvm import tirx

    return tirx.const(float(value), "float32")


def _sigmoid(x):
    return _const(1.0) / (_const(1.0) + exp_f32(-x))


def unary_expr(op: str, x, attrs: dict):
    """The TE expression of one unary elementwise op applied to the scalar expression x (fp32)."""
    from tvm import te, tirx

    if op == "neg":
        return -x
    if op == "relu":
        return tirx.Select(x < _const(0.0), _const(0.0), x)   # NaN stays NaN, as in torch (max would give 0)
    if op == "silu":
        return x * _sigmoid(x)
    if op == "sigmoid":
        return _sigmoid(x)
    if op == "reciprocal":
        return _const(1.0) / x
    if op == "rsqrt":
        return _const(1.0) / te.sqrt(x)
    if op == "gelu":
        if attrs.get("approximate", "none") == "tanh":
            inner = _const(math.sqrt(2.0 / math.pi)) * (x + _const(0.044715) * x * x * x)
            return _const(0.5) * x * (_const(1.0) + te.tanh(inner))
        return _const(0.5) * x * (_const(1.0) + te.erf(x * _const(1.0 / math.sqrt(2.0))))
    if op == "pow_scalar":
        return _power(x, float(attrs["exponent"]))
    if op == "cast":
        return x
    return {"exp": exp_f32, "log": te.log, "sqrt": te.sqrt, "abs": te.abs, "sin": te.sin, "cos": te.cos,
            "tanh": te.tanh}[op](x)


def _power(x, exponent: float):
    from tvm import te

    exact = {1.0: lambda: x, 2.0: lambda: x * x, 3.0: lambda: x * x * x, 0.5: lambda: te.sqrt(x),
             -1.0: lambda: _const(1.0) / x, 0.0: lambda: _const(1.0)}
    return exact[exponent]() if exponent in exact else te.power(x, _const(exponent))


def binary_expr(op: str, a, b, attrs: dict):
    """The TE expression of a binary op; `b` is None when the op takes the `scalar` attribute."""
    from tvm import te, tirx

    other = _const(attrs["scalar"]) if b is None else b
    x, y = (other, a) if attrs.get("swap") else (a, other)
    alpha = float(attrs.get("alpha", 1.0))
    if op in ("add", "sub") and alpha != 1.0:
        y = y * _const(alpha)
    return {"add": lambda: x + y, "sub": lambda: x - y, "mul": lambda: x * y, "div": lambda: x / y,
            "pow": lambda: te.power(x, y), "maximum": lambda: _nan_or(x, y, tirx.Select(x > y, x, y)),
            "minimum": lambda: _nan_or(x, y, tirx.Select(x < y, x, y))}[op]()


def _nan_or(x, y, value):
    """`value`, or NaN where x or y is NaN: torch.maximum / minimum propagate NaN, tirx.max / min do not."""
    from tvm import tirx

    return tirx.Select(tirx.isnan(x), x, tirx.Select(tirx.isnan(y), y, value))


def op_expr(op: str, attrs: dict, args: list):
    if op in BINARY:
        return binary_expr(op, args[0], args[1] if len(args) > 1 else None, attrs)
    return unary_expr(op, args[0], attrs)


def node_is_lowerable(node: Node) -> bool:
    """An elementwise node on fp32 tensors whose attributes the TE expressions cover."""
    if node.op not in ELEMENTWISE or len(node.outputs) != 1 or node.output.type.dtype != "float32":
        return False
    if any(v is not None and v.type.dtype != "float32" for v in node.inputs):
        return False
    if node.op in BINARY and node.inputs[1] is None:
        scalar = node.attr.get("scalar")
        return isinstance(scalar, (int, float)) and not isinstance(scalar, bool)
    return True


# ---- broadcasting -------------------------------------------------------------------------------------

def broadcast_plan(out_shape: tuple, in_shapes: list[tuple]) -> list[tuple[int, ...]]:
    """Per input, the output axes it broadcasts along (its IR size is 1 there, the output's is not)."""
    rank = len(out_shape)
    plans = []
    for shape in in_shapes:
        off = rank - len(shape)
        plans.append(tuple(a for a in range(off, rank) if shape[a - off] == 1 and out_shape[a] != 1))
    return plans


class BroadcastTE:
    """Placeholders and loads for inputs broadcast against an output with symbolic leading axes."""

    def __init__(self, out_shape: tuple, in_shapes: list[tuple], plans: list[tuple], names: list[str]):
        from tvm import te

        self.rank = len(out_shape)
        last = out_shape[-1] if out_shape else 1
        self.out_dims = [te.var(f"d{a}") for a in range(self.rank - 1)]
        if self.rank:
            self.out_dims.append(last if isinstance(last, int) else te.var(f"d{self.rank - 1}"))
        self.plans = plans
        self.tensors = []
        for shape, plan, name in zip(in_shapes, plans, names):
            off = self.rank - len(shape)
            dims = [1 if a in plan else self.out_dims[a] for a in range(off, self.rank)]
            self.tensors.append(te.placeholder(tuple(dims), "float32", name=name))

    def load(self, i: int, idx):
        shape_rank = len(self.tensors[i].shape)
        off = self.rank - shape_rank
        return self.tensors[i][tuple(0 if a in self.plans[i] else idx[a] for a in range(off, self.rank))]


def out_shape_source(out_shape: tuple, in_shapes: list[tuple], plans: list[tuple]):
    """How to get the output shape at run time: the index of an input with the output's full shape, or
    per-axis (input, axis) sources."""
    rank = len(out_shape)
    for i, (shape, plan) in enumerate(zip(in_shapes, plans)):
        if len(shape) == rank and not plan:
            return i
    sources = []
    for a in range(rank):
        for i, (shape, plan) in enumerate(zip(in_shapes, plans)):
            off = rank - len(shape)
            if a >= off and a not in plan:
                sources.append((i, a - off))
                break
        else:
            sources.append(None)  # every input broadcasts here: the output size is 1
    return sources


def region_signature(region: Graph) -> tuple:
    """The structure of a region independent of value names (layers with the same body share a build)."""
    index = {v.name: ("in", i) for i, v in enumerate(region.inputs)}
    sig = []
    for k, n in enumerate(region.nodes):
        sig.append((n.op, n.attrs, tuple(None if v is None else index[v.name] for v in n.inputs)))
        for v in n.outputs:
            index[v.name] = ("node", k)
    return tuple(sig), tuple(index[v.name] for v in region.outputs)


class ElementwiseKernel(OpKernel):
    """A `fused` elementwise region, or one elementwise node, as one TE compute ("elementwise" schedule)."""

    family = "rowwise"

    @staticmethod
    def supports(node: Node) -> bool:
        if node.outputs and node.outputs[0].type.rank == 0:
            return False
        if node.op == "fused":
            body = node.regions[0] if len(node.regions) == 1 else None
            return (body is not None and len(body.outputs) == 1 and all(node_is_lowerable(n) for n in body.nodes)
                    and all(v is not None and v.type.dtype == "float32" for v in node.inputs)
                    and node.output.type.dtype == "float32")
        return node_is_lowerable(node)

    def __init__(self, node, knobs, cache, target):
        super().__init__(node, knobs, cache, target)
        self.tensor_inputs = [i for i, v in enumerate(node.inputs) if v is not None]
        self.out_shape = tuple(node.output.type.shape)
        self.in_shapes = [tuple(node.inputs[i].type.shape) for i in self.tensor_inputs]
        self.plans = broadcast_plan(self.out_shape, self.in_shapes)
        self.shape_source = out_shape_source(self.out_shape, self.in_shapes, self.plans)

    def key(self):
        body = region_signature(self.node.regions[0]) if self.node.op == "fused" else (self.op, self.node.attrs)
        last = self.out_shape[-1] if self.out_shape and isinstance(self.out_shape[-1], int) else None
        ranks = tuple(len(s) for s in self.in_shapes)
        return ("elementwise", body, len(self.out_shape), last, ranks, tuple(self.plans))

    def lower(self, variant) -> Lowered:
        from tvm import te

        names = [f"in{i}" for i in range(len(self.in_shapes))]
        bt = BroadcastTE(self.out_shape, self.in_shapes, self.plans, names)
        if self.node.op == "fused":
            body = self.node.regions[0]
            slot = {v.name: k for k, v in enumerate(body.inputs)}

            def compute(*idx):
                env = {name: bt.load(k, idx) for name, k in slot.items()}
                for n in body.nodes:
                    env[n.output.name] = op_expr(n.op, n.attr, [env[v.name] for v in n.inputs if v is not None])
                return env[body.outputs[0].name]
        else:
            def compute(*idx):
                return op_expr(self.op, self.attrs, [bt.load(k, idx) for k in range(len(bt.tensors))])

        out = te.compute(tuple(bt.out_dims), compute, name="out")
        last = self.out_shape[-1] if self.out_shape else 1
        return Lowered("elementwise", bt.tensors, [out], info={"rank": len(self.out_shape),
                                                                "last": last if isinstance(last, int) else None})

    def describe(self) -> str:
        what = f"fused[{','.join(n.op for n in self.node.regions[0].nodes)}]" if self.op == "fused" else self.op
        return f"elementwise {what}"

    def output_shape(self, tensors) -> tuple:
        src = self.shape_source
        if isinstance(src, int):
            return tensors[src].shape
        return tuple(1 if s is None else tensors[s[0]].shape[s[1]] for s in src)

    def __call__(self, *inputs, **attrs):
        fn = self._main or self.main()
        if fn is False:
            return self.run_reference(*inputs, **attrs)
        tensors = [ready(inputs[i]) for i in self.tensor_inputs]
        src = self.shape_source
        out = self.empty(tensors[src].shape if isinstance(src, int) else tuple(self.output_shape(tensors)))
        fn(*tensors, out)
        return out
