"""Quantization passes: weight-only int8/int4 (group-wise, symmetric or not, optional AWQ scaling) and KV-cache
int8 / fp8 storage.

Weight-only quantization rewrites `linear(x, W)` into `linear_wo(x, qweight, scales, zeros)` with packed
parameters in onnxruntime's MatMulNBits layout (see lmforge.ir.ops.quant_ref); its cost rule reads the packed
bytes, which is the saving it claims (4x / 8x fewer weight bytes than fp32). KV-cache quantization makes
attention read K/V stored as int8 (per-token or per-head scales) or fp8 e4m3: numerically, the K/V that
attention sees go through quantize-dequantize (`kv_qdq`, fused into the attention read on a real backend),
and the attention node's `kv_dtype` attribute makes the cost model charge the smaller bytes.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch

from lmforge.ir.graph import Graph, Node, Value
from lmforge.ir.ops import get_op
from lmforge.ir.types import TensorType, dtype_name
from lmforge.passes.base import Knob, Pass
from lmforge.passes.canonical import dce

WEIGHT_KNOBS = (
    Knob("quant.weight_bits", "categorical", 16, choices=(16, 8, 4), closed=True,
         doc="weight-only bits (16 = not quantized)",
         per_layer=True),
    Knob("quant.group_size", "categorical", 128, choices=(32, 64, 128), condition=("quant.weight_bits", (8, 4)),
         per_layer=True),
    Knob("quant.symmetric", "bool", True, choices=(True, False), condition=("quant.weight_bits", (8, 4))),
    Knob("quant.awq", "bool", False, choices=(True, False), condition=("quant.weight_bits", (4,)),
         doc="AWQ activation-aware scaling from calibration inputs"),
    Knob("quant.lm_head", "bool", False, choices=(True, False), condition=("quant.weight_bits", (8, 4)),
         doc="also quantize the linear whose output is a graph output (the LM head)"),
)
KV_KNOBS = (
    Knob("quant.kv", "categorical", "none", choices=("none", "int8", "fp8"), doc="KV-cache storage format"),
    Knob("quant.kv_axis", "categorical", "token", choices=("token", "head"), condition=("quant.kv", ("int8",))),
)


def _node(op, inputs, outputs, attrs=None, source=""):
    return Node(op, tuple(inputs), tuple(outputs), get_op(op).normalize_attrs(attrs or {}), (), source)


def quantize_weights(graph: Graph, weight_bits: int = 16, group_size: int = 128, symmetric: bool = True,
                     awq: bool = False, lm_head: bool = False, calibration: Sequence[tuple] | None = None,
                     layer_config=None) -> Graph:
    """Weight-only quantization of every linear whose weight is a parameter (K divisible by the group).

        %y = linear(%x, w)    ->   %y = linear_wo(%x, w.qweight, w.scales, w.zeros; bits=4, group_size=128)

    With `awq`, each linear's input channels are scaled by AWQ's s (searched on activations collected from the
    calibration inputs): W*s is quantized and the input is multiplied by 1/s (`mul` by a parameter), exact in
    real arithmetic.

    `layer_config` may hold per-layer-group values (`quant.weight_bits@g0`, `quant.group_size@g1`, ...): a
    linear's layer is the first integer in its weight's name (`model.layers.3.attention.wq.weight` -> 3, as
    torch names the modules of an nn.ModuleList); linears without one (the LM head) take the last group's values
    (the shared values when the config has no group copies).
    """
    per_linear = _per_layer_quant(graph, weight_bits, group_size, layer_config)
    params = {p.name for p in graph.params}
    outputs = {v.name for v in graph.outputs}
    targets = [i for i, n in enumerate(graph.nodes) if n.op == "linear" and n.inputs[1].name in params
               and per_linear[i][0] != 16 and n.inputs[1].type.shape[1] % per_linear[i][1] == 0
               and (lm_head or n.output.name not in outputs)]
    if not targets:
        return graph
    acts = _linear_inputs(graph, [graph.nodes[i] for i in targets], calibration) if awq and calibration else {}
    weights = dict(graph.weights)
    new_params = list(graph.params)
    nodes: list[Node] = []
    from lmforge.ir.ops.quant_ref import awq_scale_search, quantize_weight

    # A module called several times (one weight, several linears) is quantized once; AWQ then searches its
    # scale on the activations of every call.
    uses: dict[str, list[str]] = {}
    for i in targets:
        uses.setdefault(graph.nodes[i].inputs[1].name, []).append(graph.nodes[i].output.name)
    done: dict[str, tuple] = {}      # weight name -> (packed values, AWQ inverse scale or None)
    target_set = set(targets)
    for i, n in enumerate(graph.nodes):
        if i not in target_set:
            nodes.append(n)
            continue
        weight_bits, group_size = per_linear[i]
        x, w = n.inputs[0], n.inputs[1]
        if w.name not in done:
            wt, inv = weights[w.name].float(), None
            if n.output.name in acts:
                seen = torch.cat([acts[name] for name in uses[w.name]])
                s, _ = awq_scale_search(wt, seen, weight_bits, group_size, symmetric=symmetric)
                inv = Value(f"{w.name}.awq_inv_scale", TensorType((wt.shape[1],), x.type.dtype))
                weights[inv.name] = (1.0 / s).to(weights[w.name].dtype)
                new_params.append(inv)
                wt = wt * s
            qw = quantize_weight(wt, weight_bits, group_size, symmetric, scale_dtype=weights[w.name].dtype)
            packed = []
            for suffix, tensor in (("qweight", qw.qweight), ("scales", qw.scales), ("zeros", qw.zeros)):
                v = Value(f"{w.name}.{suffix}", TensorType(tuple(tensor.shape), dtype_name(tensor.dtype)))
                weights[v.name] = tensor
                new_params.append(v)
                packed.append(v)
            done[w.name] = (packed, inv)
        packed, inv = done[w.name]
        if inv is not None:
            scaled = Value(f"{n.output.name}_awq_in", x.type)
            nodes.append(_node("mul", [x, inv], [scaled], source=n.source))
            x = scaled
        bias = [n.inputs[2]] if len(n.inputs) > 2 and n.inputs[2] is not None else []
        nodes.append(_node("linear_wo", [x, *packed, *bias], n.outputs,
                           {"bits": weight_bits, "group_size": group_size}, n.source))
    return dce(replace(graph, params=tuple(new_params), nodes=tuple(nodes), weights=weights))


def layer_of(weight_name: str) -> int | None:
    """The layer index of a weight: the first integer component of its dotted name (None when it has none)."""
    for part in weight_name.split("."):
        if part.isdigit():
            return int(part)
    return None


def _per_layer_quant(graph: Graph, weight_bits: int, group_size: int, layer_config) -> dict[int, tuple[int, int]]:
    """Node index -> (bits, group size) of every linear, per layer group when `layer_config` has group copies."""
    from lmforge.search.space import knob_value

    linears = {i: layer_of(n.inputs[1].name) for i, n in enumerate(graph.nodes) if n.op == "linear"}
    layers = [l for l in linears.values() if l is not None]
    n_layers = max(layers) + 1 if layers else None
    cfg = layer_config or {}
    last = n_layers - 1 if n_layers else None   # linears after the layers (the LM head) take the last group's values
    return {i: (knob_value(cfg, "quant.weight_bits", weight_bits, last if layer is None else layer, n_layers),
                knob_value(cfg, "quant.group_size", group_size, last if layer is None else layer, n_layers))
            for i, layer in linears.items()}


def _linear_inputs(graph: Graph, linears: list[Node], calibration: Sequence[tuple]) -> dict[str, torch.Tensor]:
    """Each linear's input activations [tokens, K] over the calibration inputs."""
    from lmforge.passes.probe import probe_values

    got = probe_values(graph, [n.inputs[0] for n in linears], calibration)
    return {n.output.name: torch.cat([a.reshape(-1, a.shape[-1]).float() for a in acts])
            for n, acts in zip(linears, got)}


# attention ops whose inputs 1 and 2 are K and V, and whether the op has a `kv_dtype` attribute (its cost rule then
# charges 1-byte K / V); the sparsity pass runs first, so its rewrites must keep the KV format too
KV_READERS = {"attention": True, "block_topk_attention": True, "block_sparse_attention": False}


def quantize_kv(graph: Graph, kv: str = "none", kv_axis: str = "token") -> Graph:
    """Store the KV cache as int8 or fp8: attention (also block top-k and block-sparse) reads K/V through
    `kv_qdq`, and charges 1-byte K/V where it has a `kv_dtype`.

        %o = attention(%q, %k, %v)  ->  %kq = kv_qdq(%k; int8); %vq = kv_qdq(%v; int8)
                                        %o = attention(%q, %kq, %vq; kv_dtype=int8)
    """
    if kv == "none":
        return graph
    fmt = {"int8": "int8", "fp8": "float8_e4m3fn"}[kv]
    nodes: list[Node] = []
    made_by = graph.producers()
    for n in graph.nodes:
        if n.op not in KV_READERS or n.attr.get("kv_dtype") is not None or any(
                getattr(made_by.get(v.name), "op", None) == "kv_qdq" for v in n.inputs[1:3]):
            nodes.append(n)
            continue
        ins = list(n.inputs)
        for j in (1, 2):
            v = ins[j]
            qv = Value(f"{n.outputs[0].name}_{'kv'[j - 1]}q", v.type)
            nodes.append(_node("kv_qdq", [v], [qv], {"dtype": fmt, "axis": kv_axis}, n.source))
            ins[j] = qv
        n = replace(n, inputs=tuple(ins))
        nodes.append(n.with_attrs(kv_dtype=fmt) if KV_READERS[n.op] else n)
    return graph.with_nodes(nodes)


def weight_quant_pass(calibration: Sequence[tuple] | None = None) -> Pass:
    """The weight-only quantization pass, with calibration inputs for AWQ bound in."""

    def run(graph, **knobs):
        return quantize_weights(graph, calibration=calibration, **knobs)

    def relevant(graph: Graph, knob: Knob) -> bool:
        if knob.name == "quant.awq" and not calibration:
            return False
        return any(n.op == "linear" for n in graph.nodes)

    return Pass("quantize_weights", run, WEIGHT_KNOBS, quantize_weights.__doc__.strip(), relevant)


kv_quant_pass = Pass("quantize_kv", quantize_kv, KV_KNOBS, quantize_kv.__doc__.strip(),
                     lambda graph, knob: any(n.op in KV_READERS for n in graph.nodes))
