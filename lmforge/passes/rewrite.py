"""The one rewriting engine passes share: walk the nodes in order, let a rule keep, replace or alias each.

A rule gets a node (inputs already substituted) and the `RewriteContext`; it returns
- None: keep the node;
- a Value: the node's single output is replaced by this existing value (an alias);
- a list of new Nodes: emitted in its place. The last new node's outputs replace the old node's outputs
  when they have different names.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Sequence

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


def types_agree(op: str, inputs: Sequence[Value | None], attrs: dict, outputs: Sequence[Value]) -> bool:
    """Whether `op`'s type rule takes these inputs and attributes and gives exactly the types of `outputs`: a
    pattern that matched ops torch broadcasts or promotes differently (a weight of shape [1], an fp16 x with fp32
    cos / sin) is left as the model wrote it, not rewritten into a node that fails verification or computes
    something else."""
    from lmforge.errors import LmforgeError
    from lmforge.ir.ops import get_op

    try:
        types = get_op(op).infer([None if v is None else v.type for v in inputs], attrs)
    except LmforgeError:
        return False
    return tuple(types) == tuple(v.type for v in outputs)


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


def retype(body: Graph, inputs: Sequence[Value] | None = None) -> Graph:
    """`body` with every node's outputs re-inferred by the op registry, after new input types (`inputs`: a fused
    region on a rank's part) or changed attributes (a generate node's strategy); verified."""
    from lmforge.ir.ops import get_op
    from lmforge.ir.verify import verify

    inputs = tuple(body.inputs if inputs is None else inputs)
    vals = {old.name: new for old, new in zip(body.inputs, inputs)}
    vals.update({p.name: p for p in body.params})
    nodes = []
    for n in body.nodes:
        ins = [None if v is None else vals.get(v.name, v) for v in n.inputs]
        types = get_op(n.op).infer([None if v is None else v.type for v in ins], n.attr, n.regions)
        outs = tuple(Value(o.name, t) for o, t in zip(n.outputs, types))
        vals.update({o.name: new for o, new in zip(n.outputs, outs)})
        nodes.append(replace(n, inputs=tuple(ins), outputs=outs))
    new = replace(body, inputs=inputs, nodes=tuple(nodes), outputs=tuple(vals[v.name] for v in body.outputs))
    verify(new)
    return new
