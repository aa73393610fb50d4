"""Tensor parallelism: one graph becomes the SPMD graph every rank of a group of `tp` GPUs runs on its shard.

Megatron-LM's scheme (Shoeybi et al., 2019), found by propagating where each value is split:
- a linear whose input is whole on every rank is *column-parallel*: each rank keeps 1/tp of the output
  features (rows of W; Q/K/V and gate/up), so its output is split along the last dim;
- a linear whose input is split along its last dim is *row-parallel*: each rank keeps the matching 1/tp of
  the input features (columns of W; the attention output and down projections), its output is a partial
  sum, and an `all_reduce` makes it whole (the bias is added after the sum);
- between the two, ops work on their rank's part: reshapes into heads move the split to the head dim,
  RoPE, the KV-cache append and every attention op run on the rank's heads (query and KV heads must both
  divide by tp), elementwise ops (broadcast numpy-style) and norms over unsplit dims keep the split;
- one KV head (MQA): the projections that make K and V stay whole (a merged QKV keeps just its K and V
  blocks whole), so every rank holds the whole one-head cache and its query heads read it (but for
  block_topk_attention, whose query heads choose their KV blocks together: it runs whole);
- an op that needs a whole value it only has in parts gets an `all_gather` first (one per value, however
  many ops read it; correct, at the cost of the traffic, which the cost model charges); a replicated value
  an op needs in parts is cut locally (`shard_slice`, no traffic), or, when it is a graph input (a KV
  cache), the input itself is split.

    before (one GPU)                                     after, tp = 2 (each rank)
    %q = linear(%x, wq)             f32[b, 1, 256]       %q = linear(%x, wq)            f32[b, 1, 128]  wq rows split
    %h = reshape(%q; [b, 1, 8, 32])                      %h = reshape(%q; [b, 1, 4, 32])
    ... attention over 8 heads ...                       ... attention over 4 heads ...
    %o = linear(%a, wo)             f32[b, 1, 256]       %p = linear(%a, wo)            f32[b, 1, 256]  wo cols split
                                                         %o = all_reduce(%p; group_size=2)

The result keeps the *full* weights in `graph.weights` with the param types of one rank, and says how to cut
them in `graph.meta["tensor_parallel"]`: {"size": tp, "params": {name: [dim, segments(, kept)]}, "inputs":
{name: dim}, "outputs": {index: dim}} (segments: the sizes of the sub-blocks of a merged weight, QKV or gate/up,
each split on its own but for the indices in kept, held whole by every rank; inputs and outputs listed are split
on that dim: the KV caches on their head dim, those a decode step appends to and those a prefill returns, so they
stay on their ranks from the prefill on; every other input and output is whole on every rank).
`rank_weights(graph, r)` cuts rank r's weights; `lmforge.backends.collectives.TensorParallelModel` runs the
ranks (threads in one process, or one rank of a torch.distributed job, which takes the caches whole or, for
serving, as its own parts). A rank's graph has local shapes throughout, so the cost model prices one GPU's
share of the work plus the collectives (interconnect bytes, tier "peer"), and the memory check sees one GPU's
weights and cache: what a job with rank-local caches runs. The rewrite is exact: tests compare the ranks'
result with the unsplit graph.

The pass runs last in a pipeline (after quantization and fusion: it splits int4/int8 packed weights, whose
groups must not straddle ranks, and retypes fused regions). Knob `shard.tp` (1 = off) is offered by
`tensor_parallel_pass(max_tp)`, which a user adds for a multi-GPU target; the default pipelines do not.

Where the code is: this module has the entry points (`tensor_parallel`, `tensor_parallel_regions`,
`tensor_parallel_pass`) and re-exports the other public names; lmforge.passes.shard_propagate holds the
propagation (`Sharder`, one walk over the nodes), lmforge.passes.shard_heads the per-head ops and the
one-KV-head analysis, lmforge.passes.shard_reshape where a split dim goes through a reshape, and
lmforge.passes.shard_plan the plan a split graph carries and what reads it (a rank's weights, the whole types).
"""
from __future__ import annotations

from dataclasses import replace

from lmforge.ir.graph import Graph
from lmforge.ir.ops import get_op
from lmforge.passes.base import Knob, Pass
from lmforge.passes.shard_heads import ATTENTION_OPS, PROJECTIONS
from lmforge.passes.shard_plan import (META_KEY, ShardError, Split, cut, plan_of, rank_graph, rank_weights,
                                       whole_io_types, whole_param_types)
from lmforge.passes.shard_propagate import ELEMENTWISE, HEAD_GROUP_OPS, ROW_NORMS, Sharder
from lmforge.passes.shard_reshape import reshape_split_dim

# the public names, importable from here wherever they are defined
__all__ = ["ATTENTION_OPS", "ELEMENTWISE", "HEAD_GROUP_OPS", "META_KEY", "PROJECTIONS", "ROW_NORMS", "TP_KNOB_DOC",
           "ShardError", "Split", "cut", "plan_of", "rank_graph", "rank_weights", "reshape_split_dim",
           "tensor_parallel", "tensor_parallel_pass", "tensor_parallel_regions", "whole_io_types",
           "whole_param_types"]


def tensor_parallel(graph: Graph, tp: int = 1) -> Graph:
    """The SPMD graph of `graph` split over `tp` ranks (see the module docstring); tp = 1 returns it unchanged."""
    if not isinstance(tp, int) or tp < 1:
        raise ShardError(f"tensor-parallel size must be an int >= 1, got {tp!r}")
    if tp == 1:
        return graph
    if plan_of(graph):
        raise ShardError(f"graph {graph.name!r} is already split over {plan_of(graph)['size']} ranks")
    for node in graph.nodes:
        if node.op in ATTENTION_OPS:
            heads = [v.type.shape[1] for v in node.inputs if v is not None and v.type.rank == 4]
            if any(not isinstance(h, int) or (h != 1 and h % tp) for h in heads):
                raise ShardError(f"{node.op} {node.output.name} ({node.source or 'no source'}) has head counts "
                                 f"{heads}: tensor parallelism over {tp} ranks needs every count to divide by {tp}; "
                                 "choose a tp that divides the query and KV head counts")
    split_inputs: dict[str, int] = {}
    for _ in range(len(graph.inputs) + 1):   # each round may find more graph inputs (caches) to split
        sharder = Sharder(graph, tp, split_inputs)
        result = sharder.run()
        if not sharder.requests:
            return result
        split_inputs.update(sharder.requests)
    raise ShardError("internal: the set of split graph inputs did not settle")


def tensor_parallel_regions(program: Graph, tp: int) -> Graph:
    """A program graph whose model regions (decode steps, prefill graphs of generate / rank / verify / fuse) are
    split over `tp` ranks by `tensor_parallel`: every model of the program runs on tp GPUs. The program ops stay
    whole (they see whole logits and caches: `TensorParallelModel` gathers them); the weights stay whole in the
    program's `weights`. program_cost then charges one rank's time plus the collectives as latency, and all ranks'
    work as eFLOPs."""
    if tp == 1:
        return program
    nodes = []
    for node in program.nodes:
        if node.regions and get_op(node.op).kind == "program":
            node = replace(node, regions=tuple(tensor_parallel(r, tp) for r in node.regions))
        nodes.append(node)
    return program.with_nodes(nodes)


TP_KNOB_DOC = "tensor-parallel GPUs (Megatron column / row split of the linears, heads split over ranks)"


def tensor_parallel_pass(max_tp: int = 8) -> Pass:
    """The tensor-parallel pass with knob `shard.tp` in {1, 2, 4, ...} up to `max_tp` GPUs; add it at the end of a
    pipeline for a multi-GPU target. Values that do not divide the model's heads raise ShardError (a pruned
    trial in the search)."""
    if max_tp < 1:
        raise ShardError(f"max_tp must be >= 1, got {max_tp}")
    choices = tuple(t for t in (1, 2, 4, 8, 16, 32, 64) if t <= max_tp)

    def run(graph: Graph, tp: int = 1) -> Graph:
        return tensor_parallel(graph, tp)

    return Pass("tensor_parallel", run, (Knob("shard.tp", "categorical", 1, choices=choices, doc=TP_KNOB_DOC),),
                tensor_parallel.__doc__.strip())
