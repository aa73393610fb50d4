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
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any, Mapping

from lmforge.errors import LmforgeError
from lmforge.ir.graph import Graph, Node, Value, unique_name
from lmforge.ir.ops import get_op
from lmforge.ir.ops.tensor_ops import BINARY, COMPARE, UNARY
from lmforge.passes.base import Knob, Pass
from lmforge.passes.rewrite import retype

META_KEY = "tensor_parallel"
ATTENTION_OPS = ("attention", "block_topk_attention", "block_sparse_attention", "flex_prefill_attention",
                 "flex_prefill_mask", "shared_prefix_attention")   # per-head ops: split on dim 1 of q / k / v
ELEMENTWISE = set(UNARY) | set(BINARY) | set(COMPARE) | {"where", "cast", "gelu", "pow_scalar"}
ROW_NORMS = ("rmsnorm", "layernorm", "softmax")   # normalise over the last `ndim` dims (softmax: attrs["dim"])
HEAD_GROUP_OPS = ("block_topk_attention",)        # the query heads of a KV head share their choice of blocks
PROJECTIONS = ("linear", "linear_wo", "matmul")


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


# ---- reshape: where a split dim goes --------------------------------------------------------------------------------

def _reshape_groups(a: tuple, b: tuple) -> list[tuple[list[int], list[int]]] | None:
    """Pair the dims of shape `a` with those of `b` into groups of equal size (split / merge / same), size-1
    dims on their own; symbolic dims must match one to one. None when the shapes cannot be aligned."""
    i = j = 0
    groups = []
    while i < len(a) or j < len(b):
        if i < len(a) and a[i] == 1:
            groups.append(([i], []))
            i += 1
            continue
        if j < len(b) and b[j] == 1:
            groups.append(([], [j]))
            j += 1
            continue
        if i >= len(a) or j >= len(b):
            return None
        if isinstance(a[i], str) or isinstance(b[j], str):
            group = _symbolic_group(a, b, i, j)
            if group is None:
                return None
            groups.append(group)
            i, j = group[0][-1] + 1, group[1][-1] + 1
            continue
        gi, gj, pa, pb = [i], [j], a[i], b[j]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                if i >= len(a) or not isinstance(a[i], int):
                    return None
                pa, gi, i = pa * a[i], gi + [i], i + 1
            else:
                if j >= len(b) or not isinstance(b[j], int):
                    return None
                pb, gj, j = pb * b[j], gj + [j], j + 1
        groups.append((gi, gj))
    return groups


def _symbolic_group(a: tuple, b: tuple, i: int, j: int, widest: int = 3):
    """The smallest group of dims a[i:i+m], b[j:j+n] (m, n <= widest) of equal product when a symbolic dim is
    involved (["batch", "seq"] ~ ["batch*seq"]), or None."""
    from lmforge.ir.types import simplify_dim

    for m in range(1, widest + 1):
        for n in range(1, widest + 1):
            if i + m > len(a) or j + n > len(b) or (m > 1 and n > 1):
                continue
            left = "*".join(f"({d})" for d in a[i:i + m])
            right = "*".join(f"({d})" for d in b[j:j + n])
            if simplify_dim(f"({left}) - ({right})") == 0:
                return list(range(i, i + m)), list(range(j, j + n))
    return None


def reshape_split_dim(in_shape: tuple, out_shape: tuple, dim: int, tp: int) -> int | None:
    """The output dim a split input `dim` lands on through a reshape, or None when the rank's part is not a
    block of whole output rows (the split must be on the major dim of its group, and that output dim must
    divide by tp). Trailing dims both shapes share are matched first, so [b*s, 192] -> [b, s, 192] keeps a
    split of the features whatever the leading symbolic dims do."""
    in_shape, out_shape = tuple(in_shape), tuple(out_shape)
    i, j = len(in_shape) - 1, len(out_shape) - 1
    while i >= dim and j >= 0 and in_shape[i] == out_shape[j] and in_shape[i] != 1:
        if i == dim:
            return j
        i, j = i - 1, j - 1
    groups = _reshape_groups(in_shape, out_shape)
    if groups is None:
        return None
    for gi, gj in groups:
        if dim in gi:
            if not gj or gi[0] != dim:
                return None
            major = out_shape[gj[0]]
            if len(gi) == 1 and len(gj) == 1:
                return gj[0]
            return gj[0] if isinstance(major, int) and major % tp == 0 else None
    return None


# ---- the propagation -------------------------------------------------------------------------------------------------

def _local_shape(shape: tuple, dim: int, tp: int, split: Split | None = None) -> tuple:
    """`shape` with dim `dim` cut to one rank's part (as `split` says, for a merged value)."""
    size = shape[dim]
    if not isinstance(size, int) or (size % tp and not (split and split.kept)):
        raise ShardError(f"dim {dim} of shape {tuple(shape)} does not split into {tp} equal parts")
    out = list(shape)
    out[dim] = (split or Split(dim)).local_size(size, tp)
    return tuple(out)


def _one_head_sources(graph: Graph, producers: Mapping[str, Node], params: set) -> dict[str, frozenset | None]:
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
    scale by a param, as `_Sharder._segments_of` walks down), or None."""
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


class _Sharder:
    """One propagation over `graph`'s nodes in order: `state[name]` says how each old value is held (a Split, or
    None: whole on every rank), `vals[name]` is the new value standing for it, `nodes` the rank program. The
    graph inputs in `split_inputs` start split; inputs found to be needed split are collected in `requests`
    (tensor_parallel reruns the propagation with them)."""

    def __init__(self, graph: Graph, tp: int, split_inputs: Mapping[str, int]):
        self.graph, self.tp = graph, tp
        self.split_inputs = dict(split_inputs)
        self.requests: dict[str, int] = {}          # graph inputs found to be needed split (KV caches)
        self.names = set(graph.values())
        self.vals: dict[str, Value] = {}            # old name -> new value
        self.state: dict[str, Split | None] = {}
        self.nodes: list[Node] = []
        self.param_plan: dict[str, tuple[int, tuple | None, tuple]] = {}   # name -> (dim, segments, kept)
        self.users = graph.users()
        self.producers = graph.producers()
        self.param_names = {p.name for p in graph.params}
        self.input_names = {v.name for v in graph.inputs}
        self.output_names = {v.name for v in graph.outputs}
        self.gathered: dict[str, Value] = {}        # old name -> its all_gather (one per split value)
        self.cuts: dict[tuple[str, int], Value] = {}   # (old name, dim) -> its shard_slice
        self.one_head_sources = _one_head_sources(graph, self.producers, self.param_names)
        self._kv_read: set[str] | None = None       # values attention ops read as K / V (see _is_cache)

    # -- helpers --
    def fresh(self, base: str) -> str:
        return unique_name(base, self.names)

    def emit(self, op: str, inputs: list, attrs: Mapping[str, Any], source: str, base: str | None = None,
             regions=(), names: list[str] | None = None, types=None) -> list[Value]:
        """Append a node; its outputs are named `names` (an old node's own names) or fresh from `base`, and typed
        by the op's type rule (or `types`, for an op without one on whole inputs: a torch fallback)."""
        opdef = get_op(op)
        attrs = opdef.normalize_attrs(attrs)
        if types is None:
            types = list(opdef.infer([v.type if v is not None else None for v in inputs], attrs, regions))
        names = names or [self.fresh(base if i == 0 else f"{base}_{i}") for i in range(len(types))]
        outs = [Value(n, t) for n, t in zip(names, types)]
        self.nodes.append(Node(op, tuple(inputs), tuple(outs), attrs, tuple(regions), source))
        return outs

    def whole(self, v: Value, source: str) -> Value:
        """`v` (an old value) made whole on every rank: an all_gather if it is split (one, however many ops read
        it whole)."""
        new, s = self.vals[v.name], self.state.get(v.name)
        if s is None:
            return new
        if s.segments is not None:
            raise ShardError(f"internal: {v.name} (a merged linear's split output) is read whole")
        if v.name not in self.gathered:
            self.gathered[v.name] = self.emit("all_gather", [new], {"group_size": self.tp, "dim": s.dim}, source,
                                              f"{v.name}_whole")[0]
        return self.gathered[v.name]

    def split(self, v: Value, dim: int, source: str) -> Value:
        """`v` (an old value) split along `dim`: as it is, or cut from a whole value (a whole graph input is
        requested split instead, and the propagation reruns), or gathered first and cut."""
        s = self.state.get(v.name)
        if s is not None and s.dim == dim and s.segments is None:
            return self.vals[v.name]
        source_input = self._input_view(v, dim) if s is None else None
        if source_input is not None and source_input[0] not in self.split_inputs:
            self.requests[source_input[0]] = source_input[1]
        if (v.name, dim) not in self.cuts:
            whole = self.whole(v, source)
            self.cuts[v.name, dim] = self.emit("shard_slice", [whole], {"group_size": self.tp, "dim": dim}, source,
                                               f"{v.name}_part")[0]
        return self.cuts[v.name, dim]

    def _input_view(self, v: Value, dim: int) -> tuple[str, int] | None:
        """(graph input, its dim) when `v` is a view of a graph input through `select`s and `slice`s along other
        dims, with `dim` of `v` being that dim of the input (Llama's stacked caches: select(layer) of
        [L, B, H, S, D] -> [B, H, S, D], head dim 1 -> input dim 2); else None."""
        while v.name not in self.input_names:
            node = self.producers.get(v.name)
            if node is None or node.op not in ("select", "slice"):
                return None
            cut = node.attr["dim"] % node.inputs[0].type.rank
            if node.op == "select":
                dim += 1 if dim >= cut else 0
            elif cut == dim:
                return None
            v = node.inputs[0]
        return v.name, dim

    def keep(self, node: Node, inputs: list, state: Split | None) -> None:
        """Emit `node` on new inputs with re-inferred (local) output types; all outputs get `state`."""
        same = state is None and get_op(node.op).infer_fn is None      # whole in, whole out, as typed before
        outs = self.emit(node.op, inputs, node.attr, node.source, regions=node.regions,
                         names=[o.name for o in node.outputs], types=[o.type for o in node.outputs] if same else None)
        for old, new in zip(node.outputs, outs):
            self.vals[old.name], self.state[old.name] = new, state

    def replicate(self, node: Node) -> None:
        inputs = [None if v is None else self.whole(v, node.source) for v in node.inputs]
        self.keep(node, inputs, None)

    def shard_param(self, p: Value, dim: int, segments=None, kept=()) -> Value | None:
        """The local param of a single-use param split along `dim` (its `segments` each split on its own, but for
        those numbered in `kept`), or None when it cannot be split."""
        if p.name not in self.param_names or len(self.users.get(p.name, [])) != 1 or p.name in self.output_names:
            return None
        size = p.type.shape[dim]
        parts = segments or (size,)
        if not isinstance(size, int) or any(s % self.tp for i, s in enumerate(parts) if i not in kept) or \
                sum(parts) != size:
            return None
        split = Split(dim, tuple(segments) if segments else None, tuple(kept))
        new = Value(p.name, p.type.with_(shape=_local_shape(p.type.shape, dim, self.tp, split)))
        self.param_plan[p.name] = (dim, split.segments, split.kept)
        self.vals[p.name] = new
        return new

    def _segments_of(self, v: Value) -> tuple[int, ...] | None:
        """The sizes of the slices that read `v` along its last dim when they partition it (a merged linear's
        QKV / gate-up outputs; also after a bias add and reshapes that keep the last dim, as GPT-2's c_attn
        is), else None."""
        users = self.users.get(v.name, [])
        while len(users) == 1 and v.name not in self.output_names and (
                (users[0].op == "reshape" and users[0].output.type.shape[-1] == v.type.shape[-1]) or
                (users[0].op in ("add", "mul") and all(i is v or i.name in self.param_names for i in users[0].inputs
                                                       if i is not None))):
            v = users[0].output
            users = self.users.get(v.name, [])
        last = v.type.rank - 1
        if v.name in self.output_names:
            return None
        spans = []
        for u in users:
            a = u.attr if u.op == "slice" else {}
            if u.op != "slice" or a["dim"] not in (last, -1) or a["step"] != 1 or not isinstance(a["start"], int):
                return None
            end = a["end"] if a["end"] is not None else v.type.shape[last]
            if not isinstance(end, int):
                return None
            spans.append((a["start"], min(end, v.type.shape[last])))
        spans = sorted(set(spans))
        if len(users) < 2 or not spans or spans[0][0] != 0 or spans[-1][1] != v.type.shape[last] or any(
                x[1] != y[0] for x, y in zip(spans, spans[1:])):
            return None
        return tuple(e - s for s, e in spans)

    # -- ops --
    def matmul(self, node: Node) -> None:
        """x @ W with W a 2-D param [in, out] (GPT-2's Conv1D): column-parallel splits W's columns, row-parallel
        its rows (then an all_reduce); any other matmul runs whole."""
        x, w = node.inputs
        s = self.state.get(x.name)
        if w.name not in self.param_names or w.type.rank != 2 or len(self.users.get(w.name, [])) != 1:
            return self.replicate(node)
        if s is not None and s.dim == x.type.rank - 1 and not s.kept:
            local = self.shard_param(w, 0, s.segments)
            if local is None:
                return self.replicate(node)
            return self._all_reduce(node, [self.vals[x.name], local], None)
        if s is None and (plan := self._column_plan(node.output)) is not None:
            local = self.shard_param(w, 1, *plan)
            if local is not None:
                return self.keep(node, [self.vals[x.name], local], Split(node.output.type.rank - 1, *plan))
        self.replicate(node)

    def _column_plan(self, out: Value) -> tuple[tuple[int, ...] | None, tuple[int, ...]] | None:
        """(segments, kept) of a column-parallel projection's output features (see Split), or None when it stays
        whole: features that do not divide by tp, or a projection that makes a one-head K / V (MQA: splitting it
        would split the head_dim; a merged QKV keeps just those blocks whole)."""
        size = out.type.shape[-1]
        if not isinstance(size, int):
            return None
        segments = self._segments_of(out)
        keep = self.one_head_sources.get(out.name, frozenset())
        kept: tuple[int, ...] = ()
        if keep is None or (keep and segments is None):
            return None
        if keep:
            starts = [sum(segments[:i]) for i in range(len(segments))]
            if not keep <= set(starts) or len(keep) == len(segments):
                return None
            kept = tuple(i for i, start in enumerate(starts) if start in keep)
        if any(n % self.tp for i, n in enumerate(segments or (size,)) if i not in kept):
            return None
        return segments, kept

    def _all_reduce(self, node: Node, parts: list, bias: Value | None) -> None:
        """`node` on its rank's parts gives a partial sum: all_reduce it (then add the bias, once)."""
        name = node.output.name
        partial = self.emit(node.op, parts, node.attr, node.source, f"{name}_partial")[0]
        if bias is None:
            out = self.emit("all_reduce", [partial], {"group_size": self.tp}, node.source, names=[name])[0]
        else:
            total = self.emit("all_reduce", [partial], {"group_size": self.tp}, node.source, f"{name}_sum")[0]
            out = self.emit("add", [total, self.vals[bias.name]], {}, node.source, names=[name])[0]
        self.vals[name], self.state[name] = out, None

    def expand(self, node: Node) -> None:
        """Broadcast along dims other than the split one (GQA's repeat_kv): the split stays, the shape is local."""
        x = node.inputs[0]
        s = self.state.get(x.name)
        if s is None:
            return self.replicate(node)
        out = node.output.type.shape
        d = s.dim + len(out) - x.type.rank
        if out[d] != x.type.shape[s.dim]:
            return self.replicate(node)
        s = replace(s, dim=d)
        outs = self.emit("expand", [self.vals[x.name]], {"shape": list(_local_shape(out, d, self.tp, s))}, node.source,
                         names=[node.output.name])
        self.vals[node.output.name], self.state[node.output.name] = outs[0], s

    def linear(self, node: Node) -> None:
        x = node.inputs[0]
        bias = node.inputs[-1] if node.op == "linear" and len(node.inputs) == 3 else (
            node.inputs[4] if node.op == "linear_wo" and len(node.inputs) == 5 else None)
        s = self.state.get(x.name)
        last = x.type.rank - 1
        if s is not None and s.dim == last:
            if self._row(node, s, bias):
                return
        elif s is None:
            if self._column(node, bias):
                return
        self.replicate(node)

    def _row(self, node: Node, s: Split, bias: Value | None) -> bool:
        """Row-parallel: weights split on the input features (as x is), partial sums, all_reduce, then bias."""
        tp = self.tp
        if s.kept:               # blocks whole on every rank would be summed tp times
            return False
        if node.op == "linear":
            w = self.shard_param(node.inputs[1], 1, s.segments)
            if w is None:
                return False
            parts = [self.vals[node.inputs[0].name], w]
        else:
            a = node.attr
            k = node.inputs[1].type.shape[1] * 8 // a["bits"]
            if s.segments is not None or k % (tp * a["group_size"]):
                return False
            q, sc, z = (self.shard_param(v, 1) for v in node.inputs[1:4])
            if None in (q, sc, z):
                return False
            parts = [self.vals[node.inputs[0].name], q, sc, z]
        self._all_reduce(node, parts, bias)
        return True

    def _column(self, node: Node, bias: Value | None) -> bool:
        """Column-parallel: weights (and bias) split on the output features; the output stays split."""
        plan = self._column_plan(node.output)
        if plan is None:
            return False
        weights = node.inputs[1:2] if node.op == "linear" else node.inputs[1:4]
        if any(v.name not in self.param_names or len(self.users.get(v.name, [])) != 1 for v in weights) or (
                bias is not None and (bias.name not in self.param_names or len(self.users.get(bias.name, [])) != 1)):
            return False
        local = [self.shard_param(v, 0, *plan) for v in weights]
        if bias is not None:
            local.append(self.shard_param(bias, 0, *plan))
        if None in local:
            return False
        self.keep(node, [self.vals[node.inputs[0].name], *local], Split(node.output.type.rank - 1, *plan))
        return True

    def reshape(self, node: Node) -> None:
        x = node.inputs[0]
        s = self.state.get(x.name)
        if s is None:
            return self.keep(node, [self.vals[x.name]], None)
        full_in, full_out = x.type.shape, node.output.type.shape
        dim = reshape_split_dim(full_in, full_out, s.dim, self.tp)
        if dim is None or (s.segments and full_out[dim] != full_in[s.dim]):   # segments only move as a whole dim
            return self.replicate(node)
        s = replace(s, dim=dim)
        outs = self.emit("reshape", [self.vals[x.name]], {"shape": list(_local_shape(full_out, dim, self.tp, s))},
                         node.source, names=[node.output.name])
        self.vals[node.output.name], self.state[node.output.name] = outs[0], s

    def passthrough_dim(self, node: Node) -> None:
        """permute / select / slice / kv_qdq / rope: the split follows its dim."""
        x = node.inputs[0]
        s = self.state.get(x.name)
        if s is None:
            return self.replicate(node)
        a, rank = node.attr, x.type.rank
        if node.op == "permute":
            return self.keep(node, [self.vals[x.name]], replace(s, dim=list(a["perm"]).index(s.dim)))
        if node.op == "select":
            d = a["dim"] % rank
            if d == s.dim:
                return self.replicate(node)
            return self.keep(node, [self.vals[x.name]], replace(s, dim=s.dim - (1 if d < s.dim else 0)))
        if node.op == "slice":
            d = a["dim"] % rank
            if d != s.dim:
                return self.keep(node, [self.vals[x.name]], s)
            return self._slice_segment(node, s)
        if node.op == "rope":   # rotates pairs along the last dim: a split there needs the whole; else as x * cos
            return self.replicate(node) if s.dim == rank - 1 else self.elementwise(node)
        # kv_qdq: one scale per token (over head_dim), per head (over tokens and head_dim) or per row (fp8)
        scaled = (rank - 2, rank - 1) if a.get("dtype", "int8") == "int8" and a.get("axis") == "head" else (rank - 1,)
        if s.dim in scaled:
            return self.replicate(node)
        return self.keep(node, [self.vals[x.name]], s)

    def _slice_segment(self, node: Node, s: Split) -> None:
        """A slice of a merged linear's output that is one of its segments: the same segment's local part."""
        a = node.attr
        if s.segments is None:
            return self.replicate(node)
        starts = [sum(s.segments[:i]) for i in range(len(s.segments))]
        end = a["end"] if a["end"] is not None else sum(s.segments)
        end = min(end, sum(s.segments))
        if a["start"] not in starts or end != a["start"] + s.segments[starts.index(a["start"])]:
            raise ShardError(f"internal: slice {node.output.name} is not a segment of {node.inputs[0].name}")
        i = starts.index(a["start"])
        local_start = Split(s.dim, s.segments[:i], s.kept).local_size(a["start"], self.tp)
        local_end = local_start + (s.segments[i] if i in s.kept else s.segments[i] // self.tp)
        local = {"dim": a["dim"], "start": local_start, "end": local_end, "step": 1}
        outs = self.emit("slice", [self.vals[node.inputs[0].name]], local, node.source, names=[node.output.name])
        self.vals[node.output.name], self.state[node.output.name] = outs[0], None if i in s.kept else Split(s.dim)

    def elementwise(self, node: Node) -> None:
        """Split operands of equal split, whole operands broadcast along it (or cut to match). Operands broadcast
        numpy-style, aligned on their last dims: an operand's dim d is the output's dim d + out_rank - its rank."""
        out_rank = node.output.type.rank
        splits = {replace(s, dim=s.dim + out_rank - v.type.rank) for v in node.inputs
                  if v is not None and (s := self.state.get(v.name)) is not None}
        if len(splits) != 1:
            return self.replicate(node)
        s = next(iter(splits))                              # the split, as a dim of the output
        inputs = []
        for v in node.inputs:
            if v is None or self.state.get(v.name) is not None:
                inputs.append(None if v is None else self.vals[v.name])
                continue
            d = s.dim - (out_rank - v.type.rank)            # v's dim aligned with the split dim
            if d < 0 or v.type.shape[d] == 1:
                inputs.append(self.vals[v.name])            # broadcast along the split dim: whole is right
            elif v.name in self.param_names and self.shard_param(v, d, s.segments, s.kept) is not None:
                inputs.append(self.vals[v.name])            # a bias: cut as the split is
            elif s.segments is None:
                inputs.append(self.split(v, d, node.source))
            else:
                return self.replicate(node)
        if node.op == "fused":
            return self._fused(node, inputs, s)
        self.keep(node, inputs, s)

    def _fused(self, node: Node, inputs: list, s: Split) -> None:
        """A fused region of elementwise ops runs on the rank's parts (its body retyped); one with a norm, a
        reduction or a param of its own (which may span the split dim) runs whole."""
        body = node.regions[0]
        if body.params or any(n.op not in ELEMENTWISE for n in body.nodes):
            return self.replicate(node)
        body_inputs = [Value(b.name, b.type.with_(shape=v.type.shape)) for b, v in zip(body.inputs, inputs)]
        outs = self.emit("fused", inputs, node.attr, node.source, regions=(retype(body, body_inputs),),
                         names=[o.name for o in node.outputs])
        for old, new in zip(node.outputs, outs):
            self.vals[old.name], self.state[old.name] = new, s

    def norm(self, node: Node) -> None:
        """A norm over dims the split is not on keeps it (its weights are over those dims: whole); a split on a
        normalised dim (the last `ndim` of rmsnorm / layernorm, softmax's `dim`) runs whole."""
        x = node.inputs[0]
        s = self.state.get(x.name)
        rank = x.type.rank
        reduced = (node.attr.get("dim", -1) % rank,) if node.op == "softmax" else \
            range(rank - node.attr.get("ndim", 1), rank)
        if s is None or s.segments is not None or s.dim in reduced:
            return self.replicate(node)
        rest = [None if v is None else self.whole(v, node.source) for v in node.inputs[1:]]
        self.keep(node, [self.vals[x.name], *rest], Split(s.dim))

    def concat(self, node: Node) -> None:
        """Parts concatenated along another dim stay split (whole operands are cut to match: a KV cache
        grown by a plain concat)."""
        splits = {self.state.get(v.name) for v in node.inputs} - {None}
        s = next(iter(splits)) if len(splits) == 1 else None
        if s is None or s.segments is not None or node.attr["dim"] % node.output.type.rank == s.dim:
            return self.replicate(node)
        self.keep(node, [self.split(v, s.dim, node.source) for v in node.inputs], s)

    def kv_append(self, node: Node) -> None:
        cache, new = node.inputs
        s = self.state.get(new.name)
        if s is None or s.segments is not None or s.dim == node.attr["dim"] % new.type.rank:
            return self.replicate(node)
        self.keep(node, [self.split(cache, s.dim, node.source), self.vals[new.name]], Split(s.dim))

    def attention(self, node: Node) -> None:
        """Every attention op runs per head (dim 1 of q / k / v): split them all when q comes split. An input with
        one head (MQA's K / V, a mask shared by all heads) is read whole by every rank's query heads; with one KV
        head, block_topk_attention (whose query heads of a KV head choose their blocks together) runs whole."""
        q = node.inputs[0]
        s = self.state.get(q.name)
        heads = [v.type.shape[1] for v in node.inputs if v is not None and v.type.rank == 4]
        heads_ok = all(h == 1 or (isinstance(h, int) and h % self.tp == 0) for h in heads)
        if node.op in HEAD_GROUP_OPS and 1 in heads[1:]:
            heads_ok = False
        if s is None or s.dim != 1 or s.segments is not None or not heads_ok:
            return self.replicate(node)
        inputs = []
        for v in node.inputs:
            if v is None:
                inputs.append(None)
            elif v.type.rank != 4 or v.type.shape[1] == 1:
                inputs.append(self.whole(v, node.source))
            else:
                inputs.append(self.split(v, 1, node.source))
        self.keep(node, inputs, Split(1))

    def run(self) -> Graph:
        g, tp = self.graph, self.tp
        inputs = []
        for v in g.inputs:
            if v.name in self.split_inputs:
                d = self.split_inputs[v.name]
                new = Value(v.name, v.type.with_(shape=_local_shape(v.type.shape, d, tp)))
                self.state[v.name] = Split(d)
            else:
                new, self.state[v.name] = v, None
            self.vals[v.name] = new
            inputs.append(new)
        for p in g.params:
            self.vals[p.name], self.state[p.name] = p, None
        handlers = {"linear": self.linear, "linear_wo": self.linear, "matmul": self.matmul, "expand": self.expand,
                    "reshape": self.reshape,
                    "permute": self.passthrough_dim, "select": self.passthrough_dim, "slice": self.passthrough_dim,
                    "rope": self.passthrough_dim, "kv_qdq": self.passthrough_dim, "concat": self.concat,
                    "kv_cache_append": self.kv_append, "fused": self.elementwise}
        for node in g.nodes:
            if node.op in handlers:
                handlers[node.op](node)
            elif node.op in ELEMENTWISE:
                self.elementwise(node)
            elif node.op in ROW_NORMS:
                self.norm(node)
            elif node.op in ATTENTION_OPS:
                self.attention(node)
            else:                                  # embedding, program ops, ...: whole inputs, whole outputs
                self.replicate(node)
        outputs, split_outputs = [], {}
        for i, v in enumerate(g.outputs):
            s = self.state.get(v.name)
            if s is not None and self._is_cache(v) and s.segments is None:
                split_outputs[i] = s.dim                      # KV caches stay on their ranks
                outputs.append(self.vals[v.name])
            else:
                outputs.append(self.whole(v, "") if s is not None else self.vals[v.name])
        params = [self.vals.get(p.name, p) for p in g.params]
        plan = {"size": tp, "params": {k: [d, list(seg) if seg else None] + ([list(kept)] if kept else [])
                                       for k, (d, seg, kept) in self.param_plan.items()},
                "inputs": dict(self.split_inputs), "outputs": {str(k): d for k, d in split_outputs.items()}}
        meta = dict(g.meta)
        meta[META_KEY] = json.dumps(plan, sort_keys=True)
        return replace(g, inputs=tuple(inputs), params=tuple(params), nodes=tuple(self.nodes),
                       outputs=tuple(outputs), meta=meta)

    def _is_cache(self, v: Value) -> bool:
        """A graph output that holds a KV cache, possibly through reshapes / concats (a stack of the layers'): made
        by kv_cache_append (a decode step), or the K / V an attention op reads (a prefill), which stays split on
        its heads as the decode step takes it."""
        if self._kv_read is None:
            self._kv_read = {i.name for n in self.graph.nodes if n.op in ATTENTION_OPS for i in n.inputs[1:]
                             if i is not None and i.type.rank == 4 and i.type.dtype != "bool"}
            self._kv_read |= {n.inputs[0].name for n in self.graph.nodes
                              if n.op == "kv_qdq" and n.output.name in self._kv_read}
        seen, todo = set(), [v]
        while todo:
            x = todo.pop()
            node = self.producers.get(x.name)
            if node is None or x.name in seen:
                continue
            seen.add(x.name)
            if node.op == "kv_cache_append" or x.name in self._kv_read:
                return True
            if node.op in ("reshape", "concat", "permute", "select", "slice"):
                todo.extend(i for i in node.inputs if i is not None)
        return False


# ---- public API ------------------------------------------------------------------------------------------------------

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
        sharder = _Sharder(graph, tp, split_inputs)
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
