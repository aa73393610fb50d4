"""Turn a graph into straight-line Python source over planned buffers (the way torch.fx's GraphModule does).

Each node becomes one line `v_out = _k3(v_a, v_b, n=seq)`, where `_k3` is the callable a backend chose
for that node, looked up once when the code is generated, with its constant attributes bound. Symbolic
dimensions are read off the inputs' shapes once at the top. Nothing is looked up per node per call.

    def forward(tokens, k_cache, v_cache):
        batch = tokens.shape[0]
        past = k_cache.shape[3]
        v_embedding = _k0(tokens, _p0)
        ...
        return (v_linear_7, v_cat_1, v_cat_2)
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from lmforge.ir.graph import Graph, Node
from lmforge.ir.types import dim_to_python


@dataclass
class Kernel:
    """What runs one node: the callable, the backend that owns it, and a short description.

    inline: optional `inline(node, args, attrs) -> str`, a Python expression that does what `fn` does, written
    into the generated code in place of a call (args: the operands' local names; attrs: each attribute as
    Python source). Views (reshape, permute, slice, select) use it: a tensor method called in place costs
    about half of a call through a bound reference function, and a decode step has ~15 views per layer.
    reuse_output: optional `reuse_output()`, called once by `generate` when no output of the node leaves
    the generated function (nor aliases one that does): the kernel may then write every call into the same
    buffer (see `escaping_values`).
    """

    fn: Callable
    backend: str
    detail: str = ""
    inline: Callable[[Node, list, dict], str] | None = None
    reuse_output: Callable[[], None] | None = None


def _is_symbolic(value: Any) -> bool:
    if isinstance(value, str):
        return True
    if isinstance(value, tuple):
        return any(isinstance(v, str) for v in value)
    return False


def _render(value: Any) -> str:
    if isinstance(value, tuple):
        return "(" + "".join(f"{_render(v)}, " for v in value) + ")"
    if isinstance(value, str):
        return f"({dim_to_python(value)})"
    return repr(value)


def _local(name: str) -> str:
    return "v_" + "".join(c if c.isalnum() else "_" for c in name)


def generate(graph: Graph, kernels: Sequence[Kernel], weights: dict[str, Any],
             region_fns: dict[int, tuple] | None = None, fn_name: str = "forward") -> Callable:
    """Compile `graph` into a Python function of its inputs; `kernels[i]` runs `graph.nodes[i]`."""
    from lmforge.ir.ops import get_op
    from lmforge.ir.ops.registry import SYMBOLIC_KINDS

    env: dict[str, Any] = {"_floor": math.floor, "_ceil": math.ceil}
    names: dict[str, str] = {}
    for i, p in enumerate(graph.params):
        env[f"_p{i}"] = weights[p.name]  # a KeyError here means a parameter without weights
        names[p.name] = f"_p{i}"
    args = []
    for v in graph.inputs:
        names[v.name] = _local(v.name)
        args.append(names[v.name])
    lines = [f"def {fn_name}({', '.join(args)}):"]
    bound: set[str] = set()
    for v in graph.inputs:
        for d, dim in enumerate(v.type.shape):
            if isinstance(dim, str) and dim.isidentifier() and dim not in bound:
                lines.append(f"    {dim} = {names[v.name]}.shape[{d}]")
                bound.add(dim)
    device_src = names[graph.inputs[0].name] + ".device" if graph.inputs else "None"
    escaping = escaping_values(graph)
    stacked = plan_stacked_appends(graph, kernels) if graph.inputs else StackPlan({}, {})
    if stacked.appends:
        import torch

        from lmforge.ir.types import torch_dtype

        env["_cat"], env["_empty"], env["_grad_enabled"] = torch.cat, torch.empty, torch.is_grad_enabled
        # out= does not record autograd: with grad enabled the appends and the stack run as plain concats
        lines.append("    _inplace = not _grad_enabled()")
    allocated: set[int] = set()
    for i, (node, kernel) in enumerate(zip(graph.nodes, kernels)):
        opdef = get_op(node.op)
        static = {k: v for k, v in node.attrs if not (opdef.attrs[k].kind in SYMBOLIC_KINDS and _is_symbolic(v))}
        dynamic = {k: v for k, v in node.attrs if k not in static}
        operands = [("None" if v is None else names[v.name]) for v in node.inputs]
        outs = [_local(v.name) for v in node.outputs]
        for v in node.outputs:
            names[v.name] = _local(v.name)
        target = outs[0] if len(outs) == 1 else ", ".join(outs)
        if i in stacked.concats:
            pieces = "".join(f"{names[v.name]}, " for v in node.inputs)
            lines.append(f"    {target} = _stack{i} if _inplace else _cat(({pieces}), 0)")
            continue
        if i in stacked.appends:
            c, offset = stacked.appends[i]
            if c not in allocated:  # the stacked buffer, allocated before its first piece is written
                out_type = graph.nodes[c].outputs[0].type
                env[f"_dtype{c}"] = torch_dtype(out_type.dtype)
                lines.append(f"    _stack{c} = _empty({_render(out_type.shape)}, dtype=_dtype{c}, "
                             f"device={device_src}) if _inplace else None")
                allocated.add(c)
            piece = node.outputs[0].type
            pair, dim = f"({operands[0]}, {operands[1]})", node.attr["dim"]
            lines.append(f"    {target} = _cat({pair}, {dim}, out=_stack{c}[{offset}:{offset + 1}]"
                         f".view({_render(piece.shape)})) if _inplace else _cat({pair}, {dim})")
            continue
        if kernel.inline is not None and not (region_fns and i in region_fns):
            expr = kernel.inline(node, operands, {k: _render(v) for k, v in node.attrs})
            if expr is not None:
                lines.append(f"    {target} = {expr}")
                continue
        if kernel.reuse_output is not None and not any(v.name in escaping for v in node.outputs):
            kernel.reuse_output()
        if region_fns and i in region_fns:
            static["regions"] = region_fns[i]
        env[f"_k{i}"] = functools.partial(kernel.fn, **static) if static else kernel.fn
        call_args = operands + [f"{k}={_render(v)}" for k, v in dynamic.items()]
        if opdef.arity == (0, 0):
            call_args.append(f"device={device_src}")
        lines.append(f"    {target} = _k{i}({', '.join(call_args)})")
    # An output that may share storage with an input (a clone captured as the input itself, a view of an input) is
    # returned as a copy: writing into a model's output must never change the caller's tensors. Every output is
    # contiguous: capture keeps no layout (`x.contiguous()` is the identity), so a view the model made contiguous
    # is made so here (`.contiguous()` returns a contiguous tensor itself, without a copy).
    shared = input_aliases(graph)
    env["_contiguous"] = _contiguous_format()
    lines.append("    return (" + "".join(
        f"{names[v.name]}{'.clone(memory_format=_contiguous)' if v.name in shared else '.contiguous()'}, "
        for v in graph.outputs) + ")")
    source = "\n".join(lines) + "\n"
    code = compile(source, f"<lmforge:{graph.name}>", "exec")
    exec(code, env)
    fn = env[fn_name]
    fn.__lmforge_source__ = source
    return fn


def _contiguous_format():
    import torch

    return torch.contiguous_format


@dataclass
class StackPlan:
    """KV-cache appends written straight into the stacked cache they end up in (see plan_stacked_appends).

    appends: append node index -> (concat node index, row of the stacked buffer it fills)
    concats: concat node index -> the append nodes that fill its buffer (allocated before the first one)
    """

    appends: dict[int, tuple[int, int]]
    concats: dict[int, list[int]]


def plan_stacked_appends(graph: Graph, kernels: Sequence[Kernel]) -> StackPlan:
    """Find `concat(reshape(kv_cache_append(past_l, new_l)) for each layer l, dim=0)`, the stacked KV cache a
    decode step returns, and plan each append to write into its row of the stacked output directly.

    The torch reference would concatenate each layer's cache (one copy) and then stack them (a second copy of
    the whole cache); written in place, the stack costs nothing, which is what the cost model charges for a
    concat marked `inplace`. Applies only where the torch reference runs the appends and the concat, each
    piece is one row of the stack (size 1 along dim 0) and each append feeds exactly one piece.
    """
    producer = {v.name: i for i, n in enumerate(graph.nodes) for v in n.outputs}
    uses: dict[str, int] = {}
    for n in graph.nodes:
        for v in n.inputs:
            if v is not None:
                uses[v.name] = uses.get(v.name, 0) + 1
    for v in graph.outputs:
        if v is not None:
            uses[v.name] = uses.get(v.name, 0) + 1
    plan = StackPlan({}, {})
    for c, node in enumerate(graph.nodes):
        if node.op != "concat" or kernels[c].backend != "torch" or node.regions:
            continue
        out = node.outputs[0].type
        if node.attr["dim"] % out.rank != 0 or any(v is None for v in node.inputs):
            continue
        pieces = []
        for v in node.inputs:
            i = producer.get(v.name)
            if i is not None and graph.nodes[i].op == "reshape" and uses.get(v.name) == 1:
                i = producer.get(graph.nodes[i].inputs[0].name)
            if (i is None or graph.nodes[i].op != "kv_cache_append" or kernels[i].backend != "torch"
                    or v.type.shape[0] != 1 or graph.nodes[i].outputs[0].type.dtype != out.dtype
                    or i in plan.appends or i in (p for p, _ in pieces)):
                break
            pieces.append((i, len(pieces)))
        else:
            for i, row in pieces:
                plan.appends[i] = (c, row)
            plan.concats[c] = [i for i, _ in pieces]
    return plan


# Ops whose output may share storage with an input (torch returns a view where it can; a cast to the same
# dtype returns its input).
VIEW_OPS = frozenset({"reshape", "permute", "slice", "select", "expand", "cast"})


def input_aliases(graph: Graph) -> set[str]:
    """Names of the graph's outputs that are one of its inputs or parameters or may be a view of one: through view
    ops, and through torch fallbacks whose ATen op returns a view (narrow, unbind, .T, ...). A clone is captured
    as its source itself, so `return self.w.clone()` is the weight."""
    producer = {v.name: n for n in graph.nodes for v in n.outputs}
    roots = {v.name for v in (*graph.inputs, *graph.params)}
    memo: dict[str, bool] = {}

    def sources(node: Node) -> list:
        ins = [v for v in node.inputs if v is not None]
        if node.op == "cast" and ins and node.outputs[0].type.dtype != ins[0].type.dtype:
            return []     # a cast to another dtype makes a new tensor
        if node.op in VIEW_OPS:
            return ins[:1]
        if node.op == "torch_fallback" and _returns_view(node.attr["target"]):
            return ins
        return []

    def aliases(name: str) -> bool:
        if name not in memo:
            memo[name] = False         # cycles cannot occur in a graph; this only bounds the recursion
            node = producer.get(name)
            memo[name] = name in roots or (node is not None and any(aliases(v.name) for v in sources(node)))
        return memo[name]

    return {v.name for v in graph.outputs if v is not None and aliases(v.name)}


def _returns_view(target: str) -> bool:
    """Whether an ATen op (by name) may return a view of an argument; True when it cannot be resolved."""
    from lmforge.ir.ops.tensor_ops import aten_op, returns_view

    op = aten_op(target)
    return op is None or returns_view(op)


def escaping_values(graph: Graph) -> set[str]:
    """Names of the values whose storage can be seen after the generated function returns.

    A graph output escapes; so does every value it may be a view of (walking back through view ops), and,
    conservatively, every input of a node whose aliasing is unknown (torch_fallback, ops with regions).
    A kernel whose outputs do not escape may reuse one output buffer across calls (one per thread: see the TVM
    backend's `OpKernel.empty`).
    """
    producer = {v.name: n for n in graph.nodes for v in n.outputs}
    escaping: set[str] = set()
    todo = [v.name for v in graph.outputs if v is not None]
    for n in graph.nodes:
        if n.op == "torch_fallback" or n.regions:
            todo += [v.name for v in n.inputs if v is not None]
    while todo:
        name = todo.pop()
        if name in escaping:
            continue
        escaping.add(name)
        node = producer.get(name)
        if node is not None and node.op in VIEW_OPS:
            todo += [v.name for v in node.inputs if v is not None]
    return escaping
