"""Readable text form of a graph, one node a line:

    graph tiny(%x: f32[batch, 16]) params(w: f32[32, 16])
      %linear: f32[batch, 32] = linear(%x, w)                      # model.py:12 in forward
      return %linear

An optional `annotate(node) -> str` adds a column (who runs the node, its predicted cost, ...).
"""
from __future__ import annotations

from typing import Callable

from lmforge.ir.graph import Graph, Node, Value


def _attr_text(value) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(_attr_text(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:g}"
    return repr(value) if isinstance(value, str) else str(value)


def _operand(v: Value | None, params: set[str]) -> str:
    if v is None:
        return "_"
    return v.name if v.name in params else f"%{v.name}"


def format_node(node: Node, params: set[str]) -> str:
    outs = ", ".join(f"%{v.name}: {v.type}" for v in node.outputs)
    args = ", ".join(_operand(v, params) for v in node.inputs)
    from lmforge.ir.ops import REGISTRY

    specs = REGISTRY.get(node.op).attrs if node.op in REGISTRY else {}
    shown = [(k, v) for k, v in node.attrs if not (k in ("args", "kwargs") and node.op == "torch_fallback")
             and not (k in specs and not specs[k].required and specs[k].default == v)]
    attrs = ", ".join(f"{k}={_attr_text(v)}" for k, v in shown)
    call = f"{node.op}({args}{'; ' + attrs if attrs else ''})"
    return f"{outs} = {call}"


def format_graph(g: Graph, annotate: Callable[[Node], str] | None = None, indent: str = "") -> str:
    params = {v.name for v in g.params}
    ins = ", ".join(f"%{v.name}: {v.type}" for v in g.inputs)
    lines = [f"{indent}graph {g.name}({ins})"]
    if g.params:
        shown = ", ".join(f"{v.name}: {v.type}" for v in g.params[:8])
        more = f", ... ({len(g.params)} params)" if len(g.params) > 8 else ""
        lines.append(f"{indent}  params({shown}{more})")
    body = []
    for n in g.nodes:
        text = format_node(n, params)
        notes = [s for s in ((annotate(n) if annotate else ""), n.source) if s]
        body.append((text, "  # " + " | ".join(notes) if notes else ""))
        for r in n.regions:
            body.append((format_graph(r, annotate, indent + "    ").lstrip("\n"), ""))
    width = min(100, max((len(t) for t, _ in body), default=0))
    for text, note in body:
        lines.append(f"{indent}  {text.ljust(width)}{note}" if note else f"{indent}  {text}")
    lines.append(f"{indent}  return " + ", ".join(f"%{v.name}" for v in g.outputs))
    return "\n".join(lines)
