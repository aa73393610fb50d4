"""Fusion and canonicalization: merge linears that share an input (QKV, gate/up), recognize RMSNorm and
RoPE written out in elementwise ops, and group elementwise chains into `fused` regions a backend can
emit as one kernel. All of these are exact rewrites.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from lmforge.ir.graph import Graph, GraphBuilder, Node, Value
from lmforge.ir.ops import get_op
from lmforge.ir.types import TensorType, dim_symbols
from lmforge.passes.base import Knob, graph_pass
from lmforge.passes.canonical import dce
from lmforge.passes.rewrite import RewriteContext, rewrite, types_agree


def _node(op: str, inputs, outputs, attrs=None, source="", regions=()) -> Node:
    return Node(op, tuple(inputs), tuple(outputs), get_op(op).normalize_attrs(attrs or {}), tuple(regions), source)


@graph_pass("merge_linears", knobs=[Knob("fusion.merge_linears", "bool", True, choices=(True, False),
                                         doc="merge linears reading the same input (QKV, gate/up)")])
def merge_linears(graph: Graph, merge_linears: bool = True) -> Graph:
    """Merge linear layers that read the same input into one wider linear followed by slices.

        %q = linear(%h, wq); %k = linear(%h, wk); %v = linear(%h, wv)
        ->  %qkv = linear(%h, wq+wk+wv); %q = slice(%qkv; 0:Nq); %k = slice(...); %v = slice(...)

    One GEMM instead of three reads the activations once and fills the GPU better at small batch.
    Only linears whose weights (and biases, all or none) are parameters are merged.
    """
    if not merge_linears:
        return graph
    params = {p.name for p in graph.params}
    groups: dict[str, list[int]] = {}
    for i, n in enumerate(graph.nodes):
        if n.op == "linear" and n.inputs[1].name in params and (len(n.inputs) < 3 or n.inputs[2] is None
                                                                  or n.inputs[2].name in params):
            groups.setdefault(n.inputs[0].name, []).append(i)
    groups = {k: v for k, v in groups.items() if len(v) > 1 and
              len({len(graph.nodes[i].inputs) > 2 and graph.nodes[i].inputs[2] is not None for i in v}) == 1}
    if not groups:
        return graph
    weights = dict(graph.weights)
    new_params = list(graph.params)
    first_of = {v[0]: v for v in groups.values()}
    skip = {i for v in groups.values() for i in v[1:]}
    nodes: list[Node] = []
    for i, n in enumerate(graph.nodes):
        if i in skip:
            continue
        if i not in first_of:
            nodes.append(n)
            continue
        members = [graph.nodes[j] for j in first_of[i]]
        ws = [m.inputs[1] for m in members]
        name = "+".join(w.name for w in ws)
        w_type = TensorType((sum(w.type.shape[0] for w in ws), ws[0].type.shape[1]), ws[0].type.dtype)
        w_val = Value(name, w_type)
        if name not in weights:   # two inputs that each read the same linears share one merged weight
            weights[name] = torch.cat([weights[w.name] for w in ws], 0)
            new_params.append(w_val)
        ins = [n.inputs[0], w_val]
        if len(n.inputs) > 2 and n.inputs[2] is not None:
            bs = [m.inputs[2] for m in members]
            b_val = Value("+".join(b.name for b in bs), TensorType((w_type.shape[0],), bs[0].type.dtype))
            if b_val.name not in weights:
                weights[b_val.name] = torch.cat([weights[b.name] for b in bs], 0)
                new_params.append(b_val)
            ins.append(b_val)
        x = n.inputs[0]
        merged = Value(n.output.name + "_merged", x.type.with_(shape=(*x.type.shape[:-1], w_type.shape[0])))
        nodes.append(_node("linear", ins, [merged], source=n.source))
        start = 0
        for m in members:
            width = m.inputs[1].type.shape[0]
            nodes.append(_node("slice", [merged], [m.output], {"dim": -1, "start": start, "end": start + width},
                               m.source))
            start += width
    graph = replace(graph, params=tuple(new_params), nodes=tuple(_toposort(nodes, graph)), weights=weights)
    return dce(graph)


def _toposort(nodes: list[Node], graph: Graph) -> list[Node]:
    """Order nodes so every input is defined first (merging moves later linears up to the first one)."""
    defined = {v.name for v in (*graph.inputs, *graph.params)} | {n.inputs[1].name for n in nodes if n.op == "linear"}
    defined |= {n.inputs[2].name for n in nodes if n.op == "linear" and len(n.inputs) > 2 and n.inputs[2] is not None}
    pending, out = list(nodes), []
    while pending:
        for k, n in enumerate(pending):
            if all(v is None or v.name in defined for v in n.inputs):
                out.append(n)
                defined.update(v.name for v in n.outputs)
                del pending[k]
                break
        else:
            raise AssertionError("merge_linears produced a cycle")
    return out


def _scalar_of(node: Node | None, op: str):
    """The constant c of `op(x; scalar=c)` (an add without alpha), or None (a size symbol is not a constant)."""
    if node is not None and node.op == op and node.inputs[1] is None and not node.attr.get("swap") \
            and node.attr.get("alpha", 1.0) == 1.0:
        c = node.attr["scalar"]
        return c if isinstance(c, (int, float)) and not isinstance(c, bool) else None
    return None


@graph_pass("recognize_rmsnorm")
def recognize_rmsnorm(graph: Graph) -> Graph:
    """Fold RMSNorm written out in elementwise ops into one `rmsnorm` op.

        %p = pow_scalar(%x; 2); %m = mean(%p; dims=[-1], keepdim); %e = add(%m; scalar=eps)
        %r = rsqrt(%e); %n = mul(%x, %r); %y = mul(w, %n)        ->   %y = rmsnorm(%x, w; eps)

    Hugging Face normalises half-precision activations in fp32 and casts back before the weight:

        %x32 = cast(%x; f32); ...; %n = mul(%x32, %r); %h = cast(%n; f16); %y = mul(w, %h)
                                                                  ->   %y = rmsnorm(%x, w; eps)

    which is exact up to rounding because `rmsnorm` computes in fp32 whatever the storage dtype (its
    reference and kernels upcast; an fp16 model that squares x in fp16 overflows where |x| > 256 and `rmsnorm`
    does not, a deliberate difference). When the weight's dtype is not the one the model rounds to, that rounding
    stays (`%n = rmsnorm(%x32; eps); %h = cast(%n; f16); %y = mul(w, %h)`). Otherwise, when the dtype the model
    produces differs from the dtype `rmsnorm` gives (x's), a `cast` to the model's dtype follows the `rmsnorm`.
    A weight that is not of the normalized shape (a gain of shape [1], which torch broadcasts) is left alone.
    """

    def rule(node: Node, ctx: RewriteContext):
        if node.op != "mul" or node.inputs[1] is None:
            return None
        a, b = node.inputs
        out = node.output
        for w, nx in ((a, b), (b, a)):
            if w.type.rank != 1 or not ctx.single_use(nx):
                continue
            n = ctx.producers.get(nx.name)
            cast_back = None
            if n is not None and n.op == "cast" and ctx.single_use(n.inputs[0]):
                cast_back = n.attr["dtype"]
                n = ctx.producers.get(n.inputs[0].name)
            if n is None or n.op != "mul" or n.inputs[1] is None:
                continue
            for x, r in (n.inputs, n.inputs[::-1]):
                match = _match_rms(x, r, ctx)
                if match is None or tuple(x.type.shape) != tuple(out.type.shape):
                    continue
                up = ctx.producers.get(x.name)
                round_trip = cast_back is not None and up is not None and up.op == "cast" and \
                    x.type.dtype in ("float32", "float64") and up.inputs[0].type.dtype == cast_back
                if round_trip and cast_back == w.type.dtype == out.type.dtype:
                    x = up.inputs[0]  # the round trip through fp32 is what rmsnorm does inside
                elif cast_back not in (None, x.type.dtype):
                    # the model rounds the normalized x (to fp16, say) before a weight of another dtype: the norm
                    # without its weight, then that rounding and the weight as the model has them
                    normed = Value(ctx.fresh(out.name + "_rms"), x.type)
                    rounded = Value(ctx.fresh(out.name + "_rounded"), x.type.with_(dtype=cast_back))
                    ins = [ctx.sub(w) if v.name == w.name else rounded for v in (a, b)]
                    return [_node("rmsnorm", [ctx.sub(x)], [normed], {"eps": match}, node.source),
                            _node("cast", [normed], [rounded], {"dtype": cast_back}, node.source),
                            replace(node, inputs=tuple(ins))]
                normed = Value(ctx.fresh(out.name + "_rms"), x.type)
                if not types_agree("rmsnorm", [x, w], {"eps": match}, [normed]):
                    continue  # a weight torch broadcasts (shape [1]) is not rmsnorm's
                if x.type.dtype == out.type.dtype:
                    return [_node("rmsnorm", [ctx.sub(x), ctx.sub(w)], node.outputs, {"eps": match}, node.source)]
                return [_node("rmsnorm", [ctx.sub(x), ctx.sub(w)], [normed], {"eps": match}, node.source),
                        _node("cast", [normed], node.outputs, {"dtype": out.type.dtype}, node.source)]
        return None

    return dce(rewrite(graph, rule))


def _match_rms(x: Value, r: Value, ctx: RewriteContext):
    rs = ctx.producers.get(r.name)
    if rs is None or rs.op != "rsqrt":
        return None
    add = ctx.producers.get(rs.inputs[0].name)
    eps = _scalar_of(add, "add")
    if eps is None:
        return None
    mean = ctx.producers.get(add.inputs[0].name)
    if mean is None or mean.op != "mean" or not mean.attr["keepdim"] or tuple(mean.attr["dims"] or ()) not in (
            (-1,), (x.type.rank - 1,)):
        return None
    if mean.attr["dtype"] not in (None, x.type.dtype, "float32", "float64"):
        return None   # the model averages in a narrower dtype (mean(...; dtype=f16) of fp32 squares)
    sq = ctx.producers.get(mean.inputs[0].name)
    if sq is None:
        return None
    if sq.op == "pow_scalar" and sq.attr["exponent"] == 2.0 and sq.inputs[0].name == x.name:
        return float(eps)
    if sq.op == "mul" and sq.inputs[0] is not None and sq.inputs[1] is not None and \
            sq.inputs[0].name == sq.inputs[1].name == x.name:
        return float(eps)
    return None


@graph_pass("recognize_rope")
def recognize_rope(graph: Graph) -> Graph:
    """Fold rotary embedding in rotate-half form into one `rope` op.

        %x1 = slice(%x; :D/2); %x2 = slice(%x; D/2:); %r = concat(neg(%x2), %x1)
        %y = add(mul(%x, %cos), mul(%r, %sin))                    ->   %y = rope(%x, %cos, %sin)
    """

    def rule(node: Node, ctx: RewriteContext):
        if node.op != "add" or node.inputs[1] is None or node.attr["alpha"] != 1.0:
            return None
        for m1, m2 in (node.inputs, node.inputs[::-1]):
            p1, p2 = ctx.producers.get(m1.name), ctx.producers.get(m2.name)
            if p1 is None or p2 is None or p1.op != "mul" or p2.op != "mul" or None in (*p1.inputs, *p2.inputs):
                continue
            for rot, sin in (p2.inputs, p2.inputs[::-1]):
                x = _rotate_half_source(rot, ctx)
                if x is None:
                    continue
                cos = next((c for xx, c in (p1.inputs, p1.inputs[::-1]) if xx.name == x.name), None)
                if cos is None or tuple(node.output.type.shape) != tuple(x.type.shape) or \
                        not types_agree("rope", [x, cos, sin], {}, node.outputs):
                    continue  # e.g. fp32 cos / sin promote an fp16 x: rope keeps x's dtype
                return [_node("rope", [ctx.sub(x), ctx.sub(cos), ctx.sub(sin)], node.outputs, {}, node.source)]
        return None

    return dce(rewrite(graph, rule))


def _rotate_half_source(rot: Value, ctx: RewriteContext):
    cat = ctx.producers.get(rot.name)
    if cat is None or cat.op != "concat" or len(cat.inputs) != 2 or cat.attr["dim"] not in (-1, rot.type.rank - 1):
        return None
    neg = ctx.producers.get(cat.inputs[0].name)
    lo = ctx.producers.get(cat.inputs[1].name)
    if neg is None or neg.op != "neg" or lo is None or lo.op != "slice":
        return None
    hi = ctx.producers.get(neg.inputs[0].name)
    if hi is None or hi.op != "slice" or hi.inputs[0].name != lo.inputs[0].name:
        return None
    x = lo.inputs[0]
    d = x.type.shape[-1]
    last = (-1, x.type.rank - 1)
    if not isinstance(d, int) or d % 2 or lo.attr["dim"] not in last or hi.attr["dim"] not in last:
        return None
    if (lo.attr["start"], lo.attr["end"]) != (0, d // 2) or hi.attr["start"] != d // 2 or hi.attr["end"] not in (None, d):
        return None
    return x


FUSABLE = {"add", "sub", "mul", "div", "neg", "exp", "silu", "sigmoid", "tanh", "relu", "gelu", "rsqrt", "sqrt",
           "reciprocal", "pow_scalar", "cast", "maximum", "minimum", "abs"}


@graph_pass("fuse_elementwise", knobs=[Knob("fusion.elementwise", "bool", True, choices=(True, False),
                                            doc="group elementwise chains into one fused kernel")])
def fuse_elementwise(graph: Graph, elementwise: bool = True) -> Graph:
    """Group chains of elementwise ops whose intermediates have one reader into `fused` regions.

        %g = silu(%a); %y = mul(%g, %b)   ->   %y = fused(%a, %b; kind='swiglu') { silu; mul }

    A chain is grown backwards from its last op through single-reader producers of the same shape, so the
    region reads its inputs once and writes one output (the bytes the cost model charges). A region's code knows
    only the sizes of its inputs, so an op whose attributes use another size (`add(%pos; scalar='t')`, t the length
    of a KV cache the chain does not read) stays outside.
    """
    if not elementwise:
        return graph
    users = graph.users()
    outputs = {v.name for v in graph.outputs}
    producers = graph.producers()
    taken: set[int] = set()
    index = {id(n): i for i, n in enumerate(graph.nodes)}
    groups: dict[int, list[int]] = {}
    def fusable(n: Node) -> bool:
        if n.op not in FUSABLE:
            return False
        bound = {s for v in n.inputs if v is not None for d in v.type.shape for s in dim_symbols(d)}
        return get_op(n.op).size_symbols(n.attr) <= bound

    for i in range(len(graph.nodes) - 1, -1, -1):
        n = graph.nodes[i]
        if i in taken or len(n.outputs) != 1 or not fusable(n):
            continue
        chain, frontier = [i], [n]
        while frontier:
            cur = frontier.pop()
            for v in cur.inputs:
                p = producers.get(v.name) if v is not None else None
                if p is None or index[id(p)] in taken or index[id(p)] in chain or not fusable(p):
                    continue
                if len(users.get(v.name, [])) != 1 or v.name in outputs:
                    continue
                if tuple(p.output.type.shape) != tuple(n.output.type.shape):
                    continue
                chain.append(index[id(p)])
                frontier.append(p)
        if len(chain) > 1:
            taken.update(chain)
            groups[i] = sorted(chain)
    if not groups:
        return graph
    members = {j for g in groups.values() for j in g}
    nodes: list[Node] = []
    for i, n in enumerate(graph.nodes):
        if i in groups:
            nodes.append(_make_fused([graph.nodes[j] for j in groups[i]], n))
        elif i not in members:
            nodes.append(n)
    return graph.with_nodes(nodes)


def _make_fused(chain: list[Node], last: Node) -> Node:
    inside = {v.name for n in chain for v in n.outputs}
    ext: list[Value] = []
    for n in chain:
        for v in n.inputs:
            if v is not None and v.name not in inside and v.name not in {e.name for e in ext}:
                ext.append(v)
    b = GraphBuilder("fused_" + last.output.name)
    mapping = {v.name: b.input(v.name, v.type) for v in ext}
    for n in chain:
        ins = [None if v is None else mapping[v.name] for v in n.inputs]
        out = b.op(n.op, ins, n.attr, name=n.output.name, source=n.source)
        mapping[n.output.name] = out
    body = b.build([mapping[last.output.name]])
    ops = [n.op for n in chain]
    kind = "swiglu" if sorted(ops) == ["mul", "silu"] else "elementwise"
    return Node("fused", tuple(ext), last.outputs, (("kind", kind),), (body,), last.source)
