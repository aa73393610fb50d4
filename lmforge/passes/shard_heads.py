"""The per-head ops of the tensor-parallel propagation and its one-KV-head (MQA) analysis.

Attention ops run per head, so the propagation (lmforge.passes.shard_propagate) splits them on dim 1 of q / k /
v (`ATTENTION_OPS`). A K / V with one head cannot be split that way: before the propagation runs,
`one_head_sources` finds the projections that make such a K / V, which then stay whole (a merged QKV keeps just
its K and V blocks whole). lmforge.passes.shard re-exports `ATTENTION_OPS` and `PROJECTIONS`.
"""
from __future__ import annotations

from typing import Mapping

from lmforge.ir.graph import Graph, Node, Value

ATTENTION_OPS = ("attention", "block_topk_attention", "block_sparse_attention", "flex_prefill_attention",
                 "flex_prefill_mask", "shared_prefix_attention")   # per-head ops: split on dim 1 of q / k / v
PROJECTIONS = ("linear", "linear_wo", "matmul")


def one_head_sources(graph: Graph, producers: Mapping[str, Node], params: set) -> dict[str, frozenset | None]:
    """The projections an attention op reads as a one-head K / V (MQA; also repeated to every query head by an
    expand, as Hugging Face's repeat_kv does), found upward from there through any op up to the first projection:
    {projection output: None (keep it whole), or the starts of the blocks of its output features to keep whole (a
    merged QKV's K and V)}. Column-splitting them would split the head_dim."""
    found: dict[str, frozenset | None] = {}
    todo = []
    for v in (v for n in graph.nodes if n.op in ATTENTION_OPS for v in n.inputs[1:] if v is not None):
        while v.type.rank != 4 or v.type.shape[1] != 1:
            node = producers.get(v.name)
            if node is None or node.op not in ("reshape", "expand"):
                break
            v = node.inputs[0]
        else:
            todo.append(v)
    seen = set()
    while todo:
        v = todo.pop()
        node = producers.get(v.name)
        if node is None or v.name in seen:
            continue
        seen.add(v.name)
        if node.op in PROJECTIONS:
            found[node.output.name] = None
            continue
        above = _projection_above(node.inputs[0], producers, params) if node.op == "slice" else None
        if above is not None and node.attr["dim"] % v.type.rank == v.type.rank - 1 and isinstance(
                node.attr["start"], int):
            if found.get(above, frozenset()) is not None:
                found[above] = found.get(above, frozenset()) | {node.attr["start"]}
            continue
        todo.extend(i for i in node.inputs if i is not None and i.name not in params)
    return found


def _projection_above(v: Value, producers: Mapping[str, Node], params: set) -> str | None:
    """The projection whose output features `v` is (through reshapes that keep the last dim and a bias add or
    scale by a param, as `shard_propagate.Sharder._segments_of` walks down), or None."""
    while (node := producers.get(v.name)) is not None:
        if node.op in PROJECTIONS:
            return node.output.name
        if node.op == "reshape" and node.inputs[0].type.shape[-1] == v.type.shape[-1]:
            v = node.inputs[0]
        elif node.op in ("add", "mul") and len(rest := [i for i in node.inputs
                                                         if i is not None and i.name not in params]) == 1:
            v = rest[0]
        else:
            return None
    return None
