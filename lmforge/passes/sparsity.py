"""Attention sparsity passes: sliding window + sinks (StreamingLLM), block top-k decode (Kinetics / Quest),
FlexPrefill adaptive prefill, and the exact shared-prefix decomposition (Hydragen).

Decode attention (one query per sequence) and prefill attention (several causal queries) get separate
patterns; the prefill window also applies to a chunk of queries after a KV cache (chunked prefill, at the
node's own alignment), FlexPrefill only to a whole prefill (queries = keys). Knob `attn.dense_layers` keeps the
first layers dense (the i-th attention node is layer i).
"""
from __future__ import annotations

from typing import Sequence

from lmforge.errors import LmforgeError
from lmforge.ir.graph import Graph, Node, Value
from lmforge.ir.ops import get_op
from lmforge.passes.base import Knob, Pass

_DECODE = ("attn.decode_pattern", ("window", "block_topk"))
_TOPK = ("attn.decode_pattern", ("block_topk",))
_FLEX = ("attn.prefill_pattern", ("flex",))
SPARSITY_KNOBS = (
    Knob("attn.decode_pattern", "categorical", "dense", choices=("dense", "window", "block_topk"), per_layer=True),
    Knob("attn.prefill_pattern", "categorical", "dense", choices=("dense", "window", "flex")),
    Knob("attn.sinks", "categorical", 4, choices=(0, 4, 16), doc="attention-sink tokens always kept", per_layer=True),
    Knob("attn.decode_window", "categorical", 256, choices=(16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
         condition=_DECODE, doc="local window (tokens) of decode attention", per_layer=True),
    Knob("attn.prefill_window", "categorical", 1024, choices=(16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
         condition=("attn.prefill_pattern", ("window",))),
    Knob("attn.block_size", "categorical", 32, choices=(8, 16, 32, 64), condition=_TOPK),
    Knob("attn.topk_blocks", "categorical", 8, choices=(1, 2, 4, 8, 16, 32, 64, 128), condition=_TOPK, per_layer=True),
    Knob("attn.summary", "categorical", "mean", choices=("mean", "minmax"), condition=_TOPK,
         doc="block score: mean key (Kinetics) or min/max bounds (Quest)"),
    Knob("attn.dense_layers", "categorical", 0, choices=(0, 1, 2), condition=_TOPK),
    Knob("attn.flex_gamma", "float", 0.9, low=0.7, high=0.99, condition=_FLEX),
    Knob("attn.flex_tau", "float", 0.1, low=0.0, high=0.5, condition=_FLEX),
    Knob("attn.flex_block", "categorical", 64, choices=(16, 32, 64, 128), condition=_FLEX),
    Knob("attn.flex_min_budget", "categorical", 2, choices=(1, 2, 4), condition=_FLEX),
)


def _is_decode(n: Node) -> bool:
    """One query that sees its whole KV cache (a causal node aligned elsewhere, q_offset set, sees a prefix of
    it: the decode patterns, which keep the cache's last keys, do not apply)."""
    return n.inputs[0].type.shape[2] == 1 and (not n.attr["causal"] or n.attr["q_offset"] is None)


def _is_prefill(n: Node) -> bool:
    """A whole causal prefill (queries = keys): where FlexPrefill applies."""
    q, k = n.inputs[0].type, n.inputs[1].type
    return n.attr["causal"] and q.shape[2] == k.shape[2] and q.shape[2] != 1 and n.attr["q_offset"] in (None, 0)


def _is_chunk(n: Node) -> bool:
    """Causal attention of several queries: a prefill, or a chunk of one after a KV cache: where a window applies
    (at the node's own alignment)."""
    return n.attr["causal"] and n.inputs[0].type.shape[2] != 1


def _plain(n: Node) -> bool:
    a = n.attr
    return (n.op == "attention" and len(n.inputs) == 3 and a["window"] is None and a["sinks"] == 0
            and not a["return_lse"])


def sparsify_attention(graph: Graph, decode_pattern="dense", prefill_pattern="dense", sinks=4, decode_window=256,
                       prefill_window=1024, block_size=32, topk_blocks=8, summary="mean", dense_layers=0,
                       flex_gamma=0.9, flex_tau=0.1, flex_block=64, flex_min_budget=2,
                       calibration: Sequence[tuple] | None = None, layer_config=None) -> Graph:
    """Give decode and prefill attention their sparse pattern.

        window:      %o = attention(%q, %k, %v; causal)  ->  attention(...; causal, window=W, sinks=S)
        block_topk:  %o = attention(%q, %k, %v)          ->  block_topk_attention(%q, %k, %v; block_size, topk_blocks, ...)
        flex:        %o = attention(%q, %k, %v; causal)  ->  %m = flex_prefill_mask(%q, %k; gamma, tau, block_size, ...)
                                                          %o = block_sparse_attention(%q, %k, %v, %m; block_size)

    FlexPrefill is lowered into its two halves (choosing the block mask, attending to the kept blocks) so every
    backend with a block-sparse kernel runs it; the result equals flex_prefill_attention's. With calibration
    inputs, the kept fraction is measured on them and recorded as the attention's `density`, which the cost rule
    uses; without, density stays 1 (no saving claimed). `layer_config` may hold per-layer-group
    values of the decode knobs (`attn.decode_window@g0`, ...; the i-th attention node is layer i).
    """
    from lmforge.search.space import knob_value

    nodes: list[Node] = []
    layer = -1
    n_layers = sum(n.op == "attention" for n in graph.nodes)
    flex_nodes: list[int] = []
    base = {"decode_pattern": decode_pattern, "decode_window": decode_window, "sinks": sinks,
            "topk_blocks": topk_blocks}
    for n in graph.nodes:
        if n.op == "attention":
            layer += 1
            per = {k: knob_value(layer_config or {}, f"attn.{k}", v, layer, n_layers) for k, v in base.items()}
            decode_pattern, decode_window, sinks, topk_blocks = (per[k] for k in base)
        if not _plain(n):
            nodes.append(n)
            continue
        if _is_decode(n) and decode_pattern == "window":
            nodes.append(n.with_attrs(causal=True, q_offset=None, window=decode_window, sinks=sinks))
        elif _is_decode(n) and decode_pattern == "block_topk" and layer >= dense_layers:
            attrs = {"block_size": block_size, "topk_blocks": topk_blocks, "sinks": sinks, "window": decode_window,
                     "summary": summary, "scale": n.attr["scale"], "kv_dtype": n.attr["kv_dtype"]}
            nodes.append(Node("block_topk_attention", n.inputs, n.outputs,
                              get_op("block_topk_attention").normalize_attrs(attrs), (), n.source))
        elif _is_chunk(n) and prefill_pattern == "window":
            nodes.append(n.with_attrs(window=prefill_window, sinks=sinks))
        elif _is_prefill(n) and prefill_pattern == "flex":
            q, k, v = n.inputs
            attrs = get_op("flex_prefill_mask").normalize_attrs({
                "gamma": flex_gamma, "tau": flex_tau, "block_size": flex_block, "min_budget": flex_min_budget,
                "scale": n.attr["scale"]})
            mask = Value(f"{n.output.name}_flexmask", get_op("flex_prefill_mask").infer([q.type, k.type], attrs)[0])
            nodes.append(_op("flex_prefill_mask", [q, k], [mask], attrs, n.source))
            flex_nodes.append(len(nodes))
            nodes.append(_op("block_sparse_attention", [q, k, v, mask], n.outputs,
                             {"block_size": flex_block, "scale": n.attr["scale"]}, n.source))
        else:
            nodes.append(n)
    out = graph.with_nodes(nodes)
    if flex_nodes and calibration:
        out = _measure_flex_density(out, flex_nodes, calibration)
    return out


def _measure_flex_density(graph: Graph, idx: list[int], calibration) -> Graph:
    """Record on each FlexPrefill block_sparse_attention node the fraction of causal block pairs its mask keeps
    on the calibration inputs."""
    from lmforge.passes.probe import probe_values

    targets = [graph.nodes[i] for i in idx]
    got = probe_values(graph, [n.inputs[3] for n in targets], calibration)
    nodes = list(graph.nodes)
    for i, n, masks in zip(idx, targets, got):
        kept = total = 0.0
        for mask in masks:
            causal = mask.new_ones(mask.shape[-2:]).tril()
            kept += mask.sum().item()
            total += causal.sum().item() * mask.shape[0] * mask.shape[1]
        nodes[i] = n.with_attrs(density=kept / max(total, 1.0))
    return graph.with_nodes(nodes)


def _relevant(graph: Graph, knob: Knob) -> bool:
    plain = [n for n in graph.nodes if _plain(n)]
    has_decode = any(_is_decode(n) for n in plain)
    has_chunk = any(_is_chunk(n) for n in plain)
    if knob.name.startswith(("attn.decode", "attn.block_size", "attn.topk", "attn.summary", "attn.dense")):
        return has_decode
    if knob.name.startswith("attn.flex"):
        return any(_is_prefill(n) for n in plain)
    if knob.name.startswith("attn.prefill"):
        return has_chunk
    return has_decode or has_chunk


def sparsity_pass(calibration: Sequence[tuple] | None = None) -> Pass:
    def run(graph, **knobs):
        return sparsify_attention(graph, calibration=calibration, **knobs)

    return Pass("sparsify_attention", run, SPARSITY_KNOBS, sparsify_attention.__doc__.strip(), _relevant)


def shared_prefix_decode(graph: Graph, prefix_len: int, rows_per_prefix: int | None = None) -> Graph:
    """Hydragen for decode steps whose batch rows share their first `prefix_len` KV entries: the prefix is read
    once for every sequence that shares it. rows_per_prefix=None: all rows share row 0's prefix (the samples of
    one prompt); r: rows come in groups of r consecutive rows sharing the prefix of the group's first row (r
    samples each of several prompts, a batch of B = G * r rows; another batch size is an error when the step runs,
    never a regrouping). Exact when the precondition holds.

        %o = attention(%q, %k, %v)  ->  %kp = slice(rows 0, r, 2r, ... of %k; :P) ... ; %ks = slice(%k; P:)
                                        %o = shared_prefix_attention(%q, %kp, %vp, %ks, %vs)
    """
    if rows_per_prefix is not None and rows_per_prefix < 1:
        raise LmforgeError(f"shared_prefix_decode: rows_per_prefix must be >= 1, got {rows_per_prefix}")
    rows = {"start": 0, "end": 1} if rows_per_prefix is None else {"start": 0, "end": None, "step": rows_per_prefix}
    nodes: list[Node] = []
    for n in graph.nodes:
        if not (_plain(n) and _is_decode(n)):
            nodes.append(n)
            continue
        q, k, v = n.inputs
        parts = []
        for name, src in (("k", k), ("v", v)):
            attrs = get_op("slice").normalize_attrs({"dim": 0, **rows})
            row0 = Value(f"{n.output.name}_{name}row0" if rows_per_prefix is None else f"{n.output.name}_{name}rows",
                         get_op("slice").infer([src.type], attrs)[0])
            nodes.append(_op("slice", [src], [row0], attrs, n.source))
            pre_shape = (row0.type.shape[0], src.type.shape[1], prefix_len, src.type.shape[3])
            pre = Value(f"{n.output.name}_{name}prefix", src.type.with_(shape=pre_shape))
            nodes.append(_op("slice", [row0], [pre], {"dim": 2, "start": 0, "end": prefix_len}, n.source))
            suf = Value(f"{n.output.name}_{name}suffix", get_op("slice").infer(
                [src.type], {"dim": 2, "start": prefix_len, "end": None})[0])
            nodes.append(_op("slice", [src], [suf], {"dim": 2, "start": prefix_len, "end": None}, n.source))
            parts.append((pre, suf))
        (kp, ks), (vp, vs) = parts
        nodes.append(_op("shared_prefix_attention", [q, kp, vp, ks, vs], n.outputs,
                         {"scale": n.attr["scale"], "rows_per_prefix": rows_per_prefix or 0}, n.source))
    return graph.with_nodes(nodes)


def _op(op, inputs, outputs, attrs, source=""):
    return Node(op, tuple(inputs), tuple(outputs), get_op(op).normalize_attrs(attrs), (), source)
