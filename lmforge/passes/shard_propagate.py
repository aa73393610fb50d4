"""The propagation behind lmforge.passes.shard.tensor_parallel: `Sharder` walks a graph's nodes in order,
tracks how each value is held (a `Split`, or whole on every rank) and emits the rank program op by op (column /
row-parallel linears, reshapes into heads, attention per head, norms, elementwise ops, and the all_gather /
shard_slice / all_reduce the splits need), then records the plan (lmforge.passes.shard_plan) in the graph's meta.
The scheme is described in lmforge.passes.shard's docstring; `tensor_parallel` there checks the head counts and
reruns the propagation until the set of split graph inputs settles.
"""
from __future__ import annotations

import json
from dataclasses import replace
from typing import Any, Mapping

from lmforge.ir.graph import Graph, Node, Value, unique_name
from lmforge.ir.ops import get_op
from lmforge.ir.ops.tensor_ops import BINARY, COMPARE, UNARY
from lmforge.passes.rewrite import retype
from lmforge.passes.shard_heads import ATTENTION_OPS, one_head_sources
from lmforge.passes.shard_plan import META_KEY, ShardError, Split, local_shape
from lmforge.passes.shard_reshape import reshape_split_dim

ELEMENTWISE = set(UNARY) | set(BINARY) | set(COMPARE) | {"where", "cast", "gelu", "pow_scalar"}
ROW_NORMS = ("rmsnorm", "layernorm", "softmax")   # normalise over the last `ndim` dims (softmax: attrs["dim"])
HEAD_GROUP_OPS = ("block_topk_attention",)        # the query heads of a KV head share their choice of blocks


class Sharder:
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
        self.one_head_sources = one_head_sources(graph, self.producers, self.param_names)
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
        new = Value(p.name, p.type.with_(shape=local_shape(p.type.shape, dim, self.tp, split)))
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
        outs = self.emit("expand", [self.vals[x.name]], {"shape": list(local_shape(out, d, self.tp, s))}, node.source,
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
        outs = self.emit("reshape", [self.vals[x.name]], {"shape": list(local_shape(full_out, dim, self.tp, s))},
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
                new = Value(v.name, v.type.with_(shape=local_shape(v.type.shape, d, tp)))
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
