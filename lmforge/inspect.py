"""`lmforge inspect`: the graph, who runs each node, and what it costs on a target."""
from __future__ import annotations

from typing import Sequence

from lmforge.ir.graph import Graph, Node
from lmforge.ir.printer import format_graph


def _fmt(x: float, unit: str) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{prefix}{unit}"
    return f"{x:.3g}{unit}"


def inspect_graph(graph: Graph, kernels: Sequence | None = None, target: str | None = None,
                  bindings: dict[str, int] | None = None) -> str:
    """Print the graph with a column per node: backend, FLOPs, bytes, and predicted time on `target`."""
    from lmforge.search.cost_model import bindings_for, node_costs

    costs = dict(enumerate(node_costs(graph, bindings_for(graph, bindings))))
    index = {id(n): i for i, n in enumerate(graph.nodes)}
    hw = _target(target)

    def annotate(node: Node) -> str:
        i = index.get(id(node))
        parts = []
        if kernels is not None and i is not None:
            k = kernels[i]
            parts.append(k.backend + (f":{k.detail}" if k.detail else ""))
        c = costs.get(i)
        if c is not None and c.op_class == "program":
            parts.append("program op (cost from what it runs: lmforge.programs.program_cost)")
        elif c is not None and c.flops == 0 and c.bytes == 0:
            parts.append("view (no memory traffic)")
        elif c is not None:
            parts.append(f"{_fmt(c.flops, 'FLOP')} {_fmt(c.bytes, 'B')}")
            if hw is not None:
                from lmforge.hwmodels.roofline import node_time

                est = node_time(c, hw)
                parts.append(f"{est.time_s * 1e6:.2f}us {est.bound}-bound eFLOPs={_fmt(est.eflops, '')}")
        return " ".join(parts)

    text = format_graph(graph, annotate)
    fallbacks = [n for n in graph.nodes if n.op == "torch_fallback"]
    if fallbacks:
        text += "\n\ntorch_fallback nodes (ATen ops with no IR mapping, run by the torch reference):\n"
        text += "\n".join(f"  {n.attr['target']:<40} {n.source or '(no source line)'}" for n in fallbacks)
    return text


def _target(name: str | None):
    if not name:
        return None
    from lmforge.hwmodels import calibrated, get_target

    return calibrated(get_target(name))
