"""The graph IR: immutable `Value`s, `Node`s and `Graph`s.

A `Graph` holds its inputs, its parameters (named weights, never inlined), its nodes in topological
order, and its outputs. A `Node` applies a registered op to input values and produces typed output
values; program ops (generate, ensemble, ...) carry sub-graphs in `regions`. Passes build new graphs
with `GraphBuilder` (or `dataclasses.replace`) rather than mutating one.

Weights live beside the structure in `Graph.weights` (name -> tensor). They are not part of equality,
hashing or JSON: the structure round-trips through `to_json`, the weights through safetensors.

Example:
    >>> b = GraphBuilder("mlp")
    >>> x = b.input("x", TensorType(("batch", 16)))
    >>> w = b.param("w", TensorType((32, 16)))
    >>> y = b.op("linear", [x, w, None])
    >>> g = b.build([y])
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Iterator, Mapping, Sequence

import networkx as nx

from lmforge.ir.types import TensorType, _freeze, _thaw


@dataclass(frozen=True)
class Value:
    """A named, typed SSA value: a graph input, a parameter, or a node output."""

    name: str
    type: TensorType

    def __str__(self) -> str:
        return f"%{self.name}"


@dataclass(frozen=True)
class Node:
    """One op application. `inputs` may hold None for an absent optional input (e.g. a linear's bias)."""

    op: str
    inputs: tuple[Value | None, ...]
    outputs: tuple[Value, ...]
    attrs: tuple[tuple[str, Any], ...] = ()
    regions: tuple["Graph", ...] = ()
    source: str = ""  # where the node came from in the user's code ("model.py:42 in forward")

    def __post_init__(self):
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "outputs", tuple(self.outputs))
        object.__setattr__(self, "regions", tuple(self.regions))
        if isinstance(self.attrs, Mapping):
            object.__setattr__(self, "attrs", _freeze(dict(self.attrs)))

    @property
    def attr(self) -> dict[str, Any]:
        """The attributes as a plain dict (tuples stay tuples)."""
        return dict(self.attrs)

    @property
    def output(self) -> Value:
        assert len(self.outputs) == 1, f"{self.op} has {len(self.outputs)} outputs"
        return self.outputs[0]

    def with_attrs(self, **changes) -> "Node":
        attrs = self.attr
        attrs.update(changes)
        return replace(self, attrs=_freeze(attrs))


@dataclass(frozen=True)
class Graph:
    name: str
    inputs: tuple[Value, ...]
    params: tuple[Value, ...]
    nodes: tuple[Node, ...]
    outputs: tuple[Value, ...]
    meta: tuple[tuple[str, Any], ...] = ()  # JSON-able facts: output tree spec, captured-from, ...
    weights: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False, hash=False)

    def __post_init__(self):
        for name in ("inputs", "params", "nodes", "outputs"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if isinstance(self.meta, Mapping):
            object.__setattr__(self, "meta", _freeze(dict(self.meta)))

    # ---- queries -----------------------------------------------------------------------------
    def get_meta(self, key: str, default: Any = None) -> Any:
        return dict(self.meta).get(key, default)

    def walk_nodes(self) -> Iterator[Node]:
        """Every node, those of regions (fused bodies, program models) included, each before its regions' nodes."""
        for n in self.nodes:
            yield n
            for r in n.regions:
                yield from r.walk_nodes()

    def producers(self) -> dict[str, Node]:
        """Value name -> the node that produces it."""
        return {v.name: n for n in self.nodes for v in n.outputs}

    def users(self) -> dict[str, list[Node]]:
        """Value name -> the nodes that read it."""
        out: dict[str, list[Node]] = {}
        for n in self.nodes:
            for v in n.inputs:
                if v is not None:
                    out.setdefault(v.name, []).append(n)
        return out

    def values(self) -> dict[str, Value]:
        vals = {v.name: v for v in (*self.inputs, *self.params)}
        for n in self.nodes:
            vals.update((v.name, v) for v in n.outputs)
        return vals

    def symbols(self) -> list[str]:
        """Names of the symbolic dimensions bound by the graph inputs, in input order."""
        seen: list[str] = []
        for v in self.inputs:
            for d in v.type.shape:
                if isinstance(d, str) and d not in seen and d.isidentifier():
                    seen.append(d)
        return seen

    def with_nodes(self, nodes: Iterable[Node], outputs: Sequence[Value] | None = None, **changes) -> "Graph":
        return replace(self, nodes=tuple(nodes), outputs=tuple(self.outputs if outputs is None else outputs), **changes)

    # ---- analyses ----------------------------------------------------------------------------
    def to_networkx(self) -> nx.DiGraph:
        """A DiGraph with one vertex per node index (attrs: op, node) and inputs/params as sources.

        Edges carry the value name. Graph inputs and params are vertices named `"in:<name>"`, outputs
        `"out:<name>"`, so analyses (topological order, critical path, partitioning) come from networkx.
        """
        g = nx.DiGraph()
        where: dict[str, Any] = {}
        for v in self.inputs:
            g.add_node(f"in:{v.name}", kind="input", value=v)
            where[v.name] = f"in:{v.name}"
        for v in self.params:
            g.add_node(f"in:{v.name}", kind="param", value=v)
            where[v.name] = f"in:{v.name}"
        for i, n in enumerate(self.nodes):
            g.add_node(i, kind="node", op=n.op, node=n)
            for v in n.inputs:
                if v is not None:
                    g.add_edge(where[v.name], i, value=v.name)
            for v in n.outputs:
                where[v.name] = i
        for v in self.outputs:
            g.add_node(f"out:{v.name}", kind="output", value=v)
            g.add_edge(where[v.name], f"out:{v.name}", value=v.name)
        return g

    # ---- serialization -----------------------------------------------------------------------
    def to_json(self) -> str:
        from lmforge.ir.serialize import graph_to_dict

        return json.dumps(graph_to_dict(self), indent=1, sort_keys=True)

    @staticmethod
    def from_json(text: str, weights: Mapping[str, Any] | None = None) -> "Graph":
        from lmforge.errors import VerifyError
        from lmforge.ir.serialize import graph_from_dict

        try:
            data = json.loads(text)
        except ValueError as e:  # json.JSONDecodeError, or bytes that are not UTF-8
            raise VerifyError(f"graph JSON is not valid JSON ({e}); give the text Graph.to_json wrote") from None
        g = graph_from_dict(data)
        return replace(g, weights=dict(weights or {}))

    def signature(self) -> str:
        """A stable hash of the structure (ops, attrs, types, param shapes, regions): the workload's tuning key.

        It leaves out what does not change what the graph computes: each node's `source` (a comment added above
        `forward` moves every line number) and the meta that records how the graph was captured (`example_dims`,
        the example sizes of its symbols; `captured_from`). So the same model captured again, or with another
        example batch under the same dynamic spec, resumes its tuning study; the sizes a study ran at are in
        its settings (see `lmforge.search.studies.study_key`).
        """
        from lmforge.ir.serialize import graph_to_dict

        return dict_signature(graph_to_dict(self))

    def __str__(self) -> str:
        from lmforge.ir.printer import format_graph

        return format_graph(self)


# Meta keys that record how a graph was captured, not what it computes: left out of `Graph.signature`.
CAPTURE_META = frozenset({"example_dims", "captured_from"})


def dict_signature(d: dict) -> str:
    """`Graph.signature` of the graph a `graph_to_dict` dict describes, as the dict has it: for a graph read from
    JSON written by an earlier lmforge, the signature it had then (before `graph_from_dict` added the attributes
    its ops gained since, at their defaults)."""
    return hashlib.sha256(json.dumps(_structural(d), sort_keys=True).encode()).hexdigest()[:16]


def _structural(d: dict) -> dict:
    """A graph's JSON dict without node sources and capture meta, regions included."""
    nodes = [{**{k: v for k, v in nd.items() if k != "source"},
              **({"regions": [_structural(r) for r in nd["regions"]]} if "regions" in nd else {})}
             for nd in d["nodes"]]
    return {**d, "nodes": nodes, "meta": [[k, v] for k, v in d.get("meta", []) if k not in CAPTURE_META]}


class GraphBuilder:
    """Builds a graph node by node, inferring output types with the op registry.

    Value names are made unique; `op()` returns the single output `Value` (or a tuple for multi-output ops).
    """

    def __init__(self, name: str, prefix: str = "v"):
        self.name = name
        self._inputs: list[Value] = []
        self._params: list[Value] = []
        self._nodes: list[Node] = []
        self._names: set[str] = set()
        self._prefix = prefix
        self._counter = 0
        self.weights: dict[str, Any] = {}

    def fresh(self, hint: str | None = None) -> str:
        base = hint or self._prefix
        name = base
        while name in self._names:
            self._counter += 1
            name = f"{base}_{self._counter}"
        self._names.add(name)
        return name

    def input(self, name: str, type_: TensorType) -> Value:
        v = Value(self.fresh(name), type_)
        self._inputs.append(v)
        return v

    def param(self, name: str, type_: TensorType, tensor: Any = None) -> Value:
        if name in self._names:
            raise ValueError(f"parameter name {name!r} is taken")
        self._names.add(name)
        v = Value(name, type_)
        self._params.append(v)
        if tensor is not None:
            self.weights[name] = tensor
        return v

    def add_node(self, node: Node) -> Node:
        for v in node.outputs:
            self._names.add(v.name)
        self._nodes.append(node)
        return node

    def mark(self) -> int:
        """A point to come back to with `rollback` (the number of nodes built so far)."""
        return len(self._nodes)

    def nodes_since(self, mark: int) -> list[Node]:
        return self._nodes[mark:]

    def rollback(self, mark: int) -> None:
        """Forget the nodes built since `mark` (and free their names): a frontend tried a translation and
        dropped it."""
        for n in self._nodes[mark:]:
            self._names.difference_update(v.name for v in n.outputs)
        del self._nodes[mark:]

    def op(self, op: str, inputs: Sequence[Value | None], attrs: Mapping[str, Any] | None = None, *,
           name: str | None = None, source: str = "", regions: Sequence[Graph] = (),
           out_types: Sequence[TensorType] | None = None):
        from lmforge.ir.ops import get_op

        opdef = get_op(op)
        attrs = opdef.normalize_attrs(dict(attrs or {}))
        types = tuple(out_types) if out_types is not None else opdef.infer(
            [None if v is None else v.type for v in inputs], attrs, regions)
        outs = tuple(Value(self.fresh(name or op if i == 0 else f"{name or op}_{i}"), t) for i, t in enumerate(types))
        self.add_node(Node(op, tuple(inputs), outs, _freeze(attrs), tuple(regions), source))
        return outs[0] if len(outs) == 1 else outs

    def build(self, outputs: Sequence[Value], meta: Mapping[str, Any] | None = None) -> Graph:
        return Graph(self.name, tuple(self._inputs), tuple(self._params), tuple(self._nodes), tuple(outputs),
                     _freeze(dict(meta or {})), dict(self.weights))


def all_regions(graph: Graph) -> list[Graph]:
    """The regions inside `graph`, at any depth (not the graph itself)."""
    out: list[Graph] = []
    for n in graph.nodes:
        for r in n.regions:
            out += [r, *all_regions(r)]
    return out


def region_params(graph: Graph) -> list[Value]:
    """The parameters of the regions inside `graph`, at any depth (not its own): a program graph holds the weights
    of every model its regions run in its `weights`."""
    return [p for r in all_regions(graph) for p in r.params]


def unique_name(base: str, taken: set[str]) -> str:
    """`base`, or `base_1`, `base_2`, ... : the first not in `taken`, which it is then added to."""
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name


def thaw_attr(value: Any) -> Any:
    """Attributes are stored frozen (tuples); JSON and printing use lists."""
    return _thaw(value)
