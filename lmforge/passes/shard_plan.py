"""The tensor-parallel plan: how a split graph records what is split, and the helpers that read it.

`lmforge.passes.shard.tensor_parallel` (its module docstring describes the scheme and the plan's format) keeps
the whole weights in a split graph and writes in `graph.meta[META_KEY]` which params, inputs and outputs are
split, and on which dim. This module holds that record's vocabulary: `Split` (how one value is split, as the
propagation tracks it), `local_shape` (a shape cut to one rank's part), `ShardError`; and what reads the plan
after the rewrite: `plan_of`, `cut` / `rank_weights` / `rank_graph` (a rank's weights) and `whole_param_types` /
`whole_io_types` (the whole tensors a split graph stands for). The runtime (lmforge.backends.collectives, the
artifact export, the program cost) needs only these; lmforge.passes.shard re-exports them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace

from lmforge.errors import LmforgeError
from lmforge.ir.graph import Graph

META_KEY = "tensor_parallel"


class ShardError(LmforgeError):
    """The graph cannot be split as asked (e.g. head counts that do not divide by tp)."""


@dataclass(frozen=True)
class Split:
    """A value split along `dim` over the group; `segments`: the full sizes of consecutive sub-blocks of that
    dim that are each split on their own (a merged QKV output), None for one block; `kept`: the indices of
    segments that are not split but whole on every rank (the K / V blocks of a merged QKV with one KV head)."""

    dim: int
    segments: tuple[int, ...] | None = None
    kept: tuple[int, ...] = ()

    def local_size(self, size, tp: int):
        """The rank's size of the split dim, whole size `size`."""
        if self.segments is None:
            return size // tp
        return sum(n if i in self.kept else n // tp for i, n in enumerate(self.segments))


def local_shape(shape: tuple, dim: int, tp: int, split: Split | None = None) -> tuple:
    """`shape` with dim `dim` cut to one rank's part (as `split` says, for a merged value)."""
    size = shape[dim]
    if not isinstance(size, int) or (size % tp and not (split and split.kept)):
        raise ShardError(f"dim {dim} of shape {tuple(shape)} does not split into {tp} equal parts")
    out = list(shape)
    out[dim] = (split or Split(dim)).local_size(size, tp)
    return tuple(out)


def plan_of(graph: Graph) -> dict | None:
    """The tensor-parallel plan of a graph (None for a graph that is not split)."""
    plan = graph.get_meta(META_KEY)
    return json.loads(plan) if plan else None


def cut(tensor, tp: int, rank: int, dim: int, segments=None, kept=()):
    """Rank `rank`'s part of a whole tensor split along `dim` (each of `segments` split on its own, but those
    numbered in `kept`, which every rank holds whole)."""
    import torch

    if not segments:
        return tensor.chunk(tp, dim)[rank].contiguous()
    blocks = tensor.split(list(segments), dim)
    return torch.cat([b if i in kept else b.chunk(tp, dim)[rank] for i, b in enumerate(blocks)], dim).contiguous()


def whole_param_types(graph: Graph) -> dict:
    """{param name: type of its whole weight} for the split params of a tensor-parallel graph (empty otherwise)."""
    plan = plan_of(graph)
    if plan is None:
        return {}
    out = {}
    for p in graph.params:
        if p.name in plan["params"]:
            dim, segments = plan["params"][p.name][:2]
            out[p.name] = _times(p.type, dim, plan["size"]) if not segments else \
                p.type.with_(shape=tuple(sum(segments) if d == dim else n for d, n in enumerate(p.type.shape)))
    return out


def _times(t, dim: int, size: int):
    shape = list(t.shape)
    shape[dim] = shape[dim] * size if isinstance(shape[dim], int) else f"({shape[dim]}) * {size}"
    return t.with_(shape=tuple(shape))


def whole_io_types(graph: Graph) -> tuple[list, list]:
    """(input types, output types) of the whole tensors a split graph takes and returns (what TensorParallelModel
    is called with); a graph that is not split: its own types."""
    plan = plan_of(graph)
    ins, outs = [v.type for v in graph.inputs], [v.type for v in graph.outputs]
    if plan is None:
        return ins, outs
    ins = [t if v.name not in plan["inputs"] else _times(t, plan["inputs"][v.name], plan["size"])
           for v, t in zip(graph.inputs, ins)]
    outs = [t if str(i) not in plan["outputs"] else _times(t, plan["outputs"][str(i)], plan["size"])
            for i, t in enumerate(outs)]
    return ins, outs


def rank_weights(graph: Graph, rank: int) -> dict:
    """Rank `rank`'s weights of a split graph: each split param cut from the whole weight, the rest as is."""
    plan = plan_of(graph)
    if plan is None:
        return dict(graph.weights)
    if not 0 <= rank < plan["size"]:
        raise ShardError(f"rank {rank} is outside a tensor-parallel group of {plan['size']}")
    out = {}
    for name, w in graph.weights.items():
        spec = plan["params"].get(name)
        out[name] = w if spec is None else cut(w, plan["size"], rank, *spec)
    return out


def rank_graph(graph: Graph, rank: int) -> Graph:
    """The graph rank `rank` runs: the split graph with that rank's weights (marked with its rank)."""
    plan = plan_of(graph)
    if plan is None:
        return graph
    meta = dict(graph.meta)
    meta["tensor_parallel_rank"] = rank
    return replace(graph, weights=rank_weights(graph, rank), meta=meta)
