"""JSON form of graphs. `graph_from_dict(graph_to_dict(g)) == g` for every valid graph.

Attribute values are JSON scalars and lists; tuples come back as tuples (attrs are stored frozen).
Weights are not part of the JSON: artifacts keep them in safetensors.
"""
from __future__ import annotations

from typing import Any

from lmforge.errors import LmforgeError, VerifyError
from lmforge.ir.graph import Graph, Node, Value
from lmforge.ir.types import TensorType, _freeze, from_json_value, json_value

SCHEMA_VERSION = 1


def _value(v: Value | None) -> Any:
    return None if v is None else {"name": v.name, "type": v.type.to_json()}


# Attribute and meta values use the same strict-JSON form as type annotations (inf / NaN as {"float": ...}).
_attr_to_json, _attr_from_json = json_value, from_json_value


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
    """The graph a dict from `graph_to_dict` describes. Anything else (a missing key, an unknown dtype, attrs that
    are not [name, value] pairs, an undefined name) is a VerifyError saying what is wrong, not a KeyError."""
    try:
        return _graph_from_dict(d, outer)
    except VerifyError:
        raise
    except KeyError as e:
        raise VerifyError(f"graph JSON has no key {e} where a graph, node, value or type needs one: it was not "
                          "written by Graph.to_json (or was edited); export the graph again") from None
    except (ValueError, TypeError, AttributeError, IndexError) as e:
        raise VerifyError(f"graph JSON is malformed ({type(e).__name__}: {e}): it was not written by "
                          "Graph.to_json (or was edited); export the graph again") from None


def _graph_from_dict(d: dict, outer: dict[str, Value] | None = None) -> Graph:
    if not isinstance(d, dict):
        raise VerifyError(f"graph JSON must be an object with inputs, params, nodes and outputs, "
                          f"not {type(d).__name__}")
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
        attrs = _with_added_defaults(nd["op"], tuple((k, _freeze(_attr_from_json(v))) for k, v in nd["attrs"]))
        nodes.append(Node(nd["op"], ins, outs, attrs, regions, nd.get("source", "")))
        scope.update({v.name: v for v in outs})
    undefined = [name for name in d["outputs"] if name not in scope]
    if undefined:
        raise VerifyError(f"graph JSON: outputs {undefined} of graph {d['name']!r} are not defined by its inputs, "
                          "params or nodes")
    outputs = tuple(scope[name] for name in d["outputs"])
    meta = tuple((k, _freeze(_attr_from_json(v))) for k, v in d.get("meta", []))
    return Graph(d["name"], inputs, params, tuple(nodes), outputs, meta)


def _with_added_defaults(op: str, attrs: tuple) -> tuple:
    """A node's attrs with the optional attributes its op gained after the JSON was written set to their defaults
    (whose meaning is "as before": e.g. a generate node's `kv_dtype` "" is float32, a retrieve's `fingerprint` ""
    is not checked), so graphs and artifacts of earlier versions still load: the op's own `normalize_attrs`. An
    unknown op, unknown or ill-kinded attrs are left as written, for the verifier to report."""
    from lmforge.ir.ops import get_op

    try:
        return _freeze(get_op(op).normalize_attrs(dict(attrs)))
    except LmforgeError:
        return attrs
