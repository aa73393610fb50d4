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
    """What runs one node: the callable, the backend that owns it, and a short description."""

    fn: Callable
    backend: str
    detail: str = ""


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
    for i, (node, kernel) in enumerate(zip(graph.nodes, kernels)):
        opdef = get_op(node.op)
        static = {k: v for k, v in node.attrs if not (opdef.attrs[k].kind in SYMBOLIC_KINDS and _is_symbolic(v))}
        dynamic = {k: v for k, v in node.attrs if k not in static}
        if region_fns and i in region_fns:
            static["regions"] = region_fns[i]
        env[f"_k{i}"] = functools.partial(kernel.fn, **static) if static else kernel.fn
        call_args = [("None" if v is None else names[v.name]) for v in node.inputs]
        call_args += [f"{k}={_render(v)}" for k, v in dynamic.items()]
        if opdef.arity == (0, 0):
            call_args.append(f"device={device_src}")
        outs = [_local(v.name) for v in node.outputs]
        for v in node.outputs:
            names[v.name] = _local(v.name)
        target = outs[0] if len(outs) == 1 else ", ".join(outs)
        lines.append(f"    {target} = _k{i}({', '.join(call_args)})")
    lines.append("    return (" + "".join(f"{names[v.name]}, " for v in graph.outputs) + ")")
    source = "\n".join(lines) + "\n"
    code = compile(source, f"<lmforge:{graph.name}>", "exec")
    exec(code, env)
    fn = env[fn_name]
    fn.__lmforge_source__ = source
    return fn
