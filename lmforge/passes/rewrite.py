"""The one rewriting engine passes share: walk the nodes in order, let a rule keep, replace or alias each.

A rule gets a node (inputs already substituted) and the `RewriteContext`; it returns
- None: keep the node;
- a Value: the node's single output is replaced by this existing value (an alias);
- a list of new Nodes: emitted in its place. The last new node's outputs replace the old node's outputs
  when they have different names.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from lmforge.ir.graph import Graph, Node, Value, unique_name


@dataclass
class RewriteContext:
    graph: Graph
    producers: dict[str, Node]
    users: dict[str, list[Node]]
    names: set[str]
    subst: dict[str, Value]

    def sub(self, v: Value | None) -> Value | None:
        """The value `v` stands for now (after earlier aliases); use it on inputs of looked-up producers."""
        return None if v is None else self.subst.get(v.name, v)

    def fresh(self, base: str) -> str:
        return unique_name(base, self.names)

    def single_use(self, v: Value) -> bool:
        return len(self.users.get(v.name, [])) == 1 and v.name not in {o.name for o in self.graph.outputs}


def rewrite(graph: Graph, rule: Callable[[Node, RewriteContext], object]) -> Graph:
    subst: dict[str, Value] = {}
    ctx = RewriteContext(graph, graph.producers(), graph.users(), set(graph.values()), subst)
    nodes: list[Node] = []
    sub = ctx.sub

    for node in graph.nodes:
        node = replace(node, inputs=tuple(sub(v) for v in node.inputs)) if any(
            v is not None and v.name in subst for v in node.inputs) else node
        result = rule(node, ctx)
        if result is None:
            nodes.append(node)
        elif isinstance(result, Value):
            subst[node.output.name] = result
        else:
            new = list(result)
            nodes.extend(new)
            for old, fresh in zip(node.outputs, new[-1].outputs if new else ()):
                if old.name != fresh.name:
                    subst[old.name] = fresh
    return graph.with_nodes(nodes, [sub(v) for v in graph.outputs])
