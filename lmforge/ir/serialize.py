"""JSON form of graphs. `graph_from_dict(graph_to_dict(g)) == g` for every valid graph.

Attribute values are JSON scalars and lists; tuples come back as tuples (attrs are stored frozen).
Weights are not part of the JSON: artifacts keep them in safetensors.
"""
from __future__ import annotations

from typing import Any

from lmforge.ir.graph import Graph, Node, Value
from lmforge.ir.types import TensorType, _freeze

SCHEMA_VERSION = 1


def _value(v: Value | None) -> Any:
    return None if v is None else {"name": v.name, "type": v.type.to_json()}


def _attr_to_json(value: Any) -> Any:
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return {"float": repr(value)}
    if isinstance(value, tuple):
        return [_attr_to_json(v) for v in value]
    return value


def _attr_from_json(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"float"}:
        return float(value["float"])
    if isinstance(value, list):
        return tuple(_attr_from_json(v) for v in value)
    return value


def graph_to_dict(g: Graph) -> dict:
    return {
        "schema": SCHEMA_VERSION,
        "name": g.name,
        "inputs": [_value(v) for v in g.inputs],
        "params": [_value(v) for v in g.params],
        "nodes": [{
            "op": n.op,
            "inputs": [None if v is None else v.name for v in n.inputs],
            "outputs": [_value(v) for v in n.outputs],
            "attrs": [[k, _attr_to_json(v)] for k, v in n.attrs],
            **({"regions": [graph_to_dict(r) for r in n.regions]} if n.regions else {}),
            **({"source": n.source} if n.source else {}),
        } for n in g.nodes],
        "outputs": [v.name for v in g.outputs],
        "meta": [[k, _attr_to_json(v)] for k, v in g.meta],
    }


def _read_value(d: dict) -> Value:
    return Value(d["name"], TensorType.from_json(d["type"]))


def graph_from_dict(d: dict, outer: dict[str, Value] | None = None) -> Graph:
    from lmforge.errors import VerifyError

    if d.get("schema", SCHEMA_VERSION) != SCHEMA_VERSION:
        raise VerifyError(f"graph JSON schema {d.get('schema')} is not {SCHEMA_VERSION}: "
                          "re-export it with this lmforge version")
    inputs = tuple(_read_value(v) for v in d["inputs"])
    params = tuple(_read_value(v) for v in d["params"])
    scope: dict[str, Value] = dict(outer or {})
    scope.update({v.name: v for v in (*inputs, *params)})
    nodes = []
    for nd in d["nodes"]:
        try:
            ins = tuple(None if name is None else scope[name] for name in nd["inputs"])
        except KeyError as e:
            raise VerifyError(f"graph JSON: node {nd['op']} reads undefined value {e}") from None
        outs = tuple(_read_value(v) for v in nd["outputs"])
        regions = tuple(graph_from_dict(r, scope) for r in nd.get("regions", ()))
        attrs = tuple((k, _freeze(_attr_from_json(v))) for k, v in nd["attrs"])
        nodes.append(Node(nd["op"], ins, outs, attrs, regions, nd.get("source", "")))
        scope.update({v.name: v for v in outs})
    outputs = tuple(scope[name] for name in d["outputs"])
    meta = tuple((k, _freeze(_attr_from_json(v))) for k, v in d.get("meta", []))
    return Graph(d["name"], inputs, params, tuple(nodes), outputs, meta)
