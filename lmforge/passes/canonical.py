"""Canonical passes: dead-code elimination, common-subexpression elimination, shape folding, and
recognition of the matmul-softmax-matmul chain as one `attention` op.
"""
from __future__ import annotations

import json
from dataclasses import replace

from lmforge.ir.graph import Graph, Node, Value, region_params
from lmforge.ir.ops import get_op
from lmforge.ir.ops.registry import SYMBOLIC_KINDS
from lmforge.ir.ops.tensor_ops import result_dtype
from lmforge.ir.types import TensorType, simplify_dim
from lmforge.passes.base import graph_pass
from lmforge.passes.rewrite import RewriteContext, rewrite, types_agree


@graph_pass("dce")
def dce(graph: Graph) -> Graph:
    """Remove nodes whose outputs nobody reads, and parameters no node reads (all IR ops are pure).

        %a = exp(%x); %b = neg(%x); return %b      ->      %b = neg(%x); return %b
    """
    live = {v.name for v in graph.outputs}
    kept: list[Node] = []
    for node in reversed(graph.nodes):
        if any(v.name in live for v in node.outputs):
            kept.append(node)
            live.update(v.name for v in node.inputs if v is not None)
            for r in node.regions:
                live.update(_free_names(r), (p.name for p in (*r.params, *region_params(r))))
    params = tuple(p for p in graph.params if p.name in live)
    weights = {k: w for k, w in graph.weights.items() if k in live}
    return replace(graph, nodes=tuple(reversed(kept)), params=params, weights=weights)


def _free_names(region: Graph) -> set[str]:
    defined = {v.name for v in (*region.inputs, *region.params)} | {v.name for n in region.nodes for v in n.outputs}
    used = {v.name for n in region.nodes for v in n.inputs if v is not None} | {v.name for v in region.outputs}
    return used - defined


@graph_pass("cse")
def cse(graph: Graph) -> Graph:
    """Merge nodes that apply the same op with the same attributes to the same inputs. Random draws are never
    merged: rand_like(x) - rand_like(x) takes two draws.

        %a = rsqrt(%x); %b = rsqrt(%x); %c = add(%a, %b)   ->   %a = rsqrt(%x); %c = add(%a, %a)
    """
    seen: dict[tuple, Node] = {}

    def rule(node: Node, ctx: RewriteContext):
        if node.regions or _random(node):
            return None
        key = (node.op, tuple(None if v is None else v.name for v in node.inputs), json.dumps(node.attrs, default=str),
               tuple(v.type for v in node.outputs))
        if key in seen:
            twin = seen[key]
            if len(node.outputs) == 1:
                return twin.outputs[0]
            return None
        seen[key] = node
        return None

    return dce(rewrite(graph, rule))


def _random(node: Node) -> bool:
    """A node whose value is a fresh random draw: `sample`, or a torch fallback of a random ATen op (rand, randn,
    bernoulli, dropout, ...: torch tags them nondeterministic_seeded). A target lmforge cannot resolve counts as
    random, so it is never merged."""
    if node.op == "sample":
        return True
    if node.op != "torch_fallback":
        return False
    import torch

    from lmforge.ir.ops.tensor_ops import aten_op

    op = aten_op(node.attr["target"])
    return op is None or torch.Tag.nondeterministic_seeded in op.tags


def _simplify_type(t: TensorType) -> TensorType:
    return replace(t, shape=tuple(simplify_dim(d) for d in t.shape))


@graph_pass("fold_shapes")
def fold_shapes(graph: Graph) -> Graph:
    """Constant-fold shape arithmetic and drop no-op data movement.

    Symbolic dims are simplified (`(past + 1) - 1` -> `past`); reshape/expand to the same shape, identity
    permutes, full-range slices and same-dtype casts become aliases; reshape(reshape(x)) and
    permute(permute(x)) collapse into one.

        %a: f32[b, 4] = reshape(%x: f32[b, 4]; shape=[b, 4])   ->   (uses of %a read %x)
    """
    # 1. simplify every symbolic dim in value types and dim attributes
    subst: dict[str, Value] = {}

    def fix(v):
        if v is None:
            return None
        if v.name not in subst:
            subst[v.name] = Value(v.name, _simplify_type(v.type))
        return subst[v.name]

    nodes = []
    for n in graph.nodes:
        opdef = get_op(n.op)
        attrs = tuple((k, _simplify_attr(v) if opdef.attrs[k].kind in SYMBOLIC_KINDS and not isinstance(v, float)
                       else v) for k, v in n.attrs)
        nodes.append(replace(n, inputs=tuple(fix(v) for v in n.inputs), outputs=tuple(fix(v) for v in n.outputs),
                             attrs=attrs))
    graph = replace(graph, inputs=tuple(fix(v) for v in graph.inputs), params=tuple(fix(v) for v in graph.params),
                    nodes=tuple(nodes), outputs=tuple(fix(v) for v in graph.outputs))
    # 2. drop or merge no-op data movement
    return dce(rewrite(graph, _fold_rule))


def _simplify_attr(v):
    if isinstance(v, tuple):
        return tuple(simplify_dim(x) for x in v)
    return simplify_dim(v) if isinstance(v, (int, str)) else v


def _fold_rule(node: Node, ctx: RewriteContext):
    x = node.inputs[0] if node.inputs else None
    if node.op in ("reshape", "expand") and x is not None and tuple(x.type.shape) == tuple(node.output.type.shape):
        return x
    if node.op == "cast" and x is not None and x.type.dtype == node.output.type.dtype:
        return x
    if node.op == "permute" and tuple(node.attr["perm"]) == tuple(range(len(node.attr["perm"]))):
        return x
    if node.op == "slice" and node.attr["start"] == 0 and node.attr["step"] == 1 and (
            node.attr["end"] is None or node.attr["end"] == x.type.shape[node.attr["dim"]]):
        return x
    inner = ctx.producers.get(x.name) if x is not None else None
    if inner is not None and inner.op == node.op == "reshape":
        return [replace(node, inputs=(ctx.sub(inner.inputs[0]),))]
    if inner is not None and inner.op == node.op == "permute":
        p_in, p_out = inner.attr["perm"], node.attr["perm"]
        merged = tuple(p_in[i] for i in p_out)
        if merged == tuple(range(len(merged))):
            return ctx.sub(inner.inputs[0])
        return [replace(node, inputs=(ctx.sub(inner.inputs[0]),)).with_attrs(perm=merged)]
    return None


@graph_pass("recognize_linear")
def recognize_linear(graph: Graph) -> Graph:
    """A matmul of activations by a weight parameter becomes `linear`, so weight-only quantization, merging and the
    linear kernels apply to models that write their projections as matmuls (GPT-2's Conv1D, addmm(b, x, W) with W
    [in, out]; Falcon-style x @ W.T):

        %y = matmul(%x, W)                  (W [K, N], a parameter)  ->  %y = linear(%x, W.T)   (stored [N, K])
        %y = matmul(%x, permute(W; [1, 0]))  (W [N, K], a parameter)  ->  %y = linear(%x, W)
        %z = add(%y, b)                     (b [N], a parameter)     ->  %z = linear(%x, W', b)

    W is stored transposed only when every reader of W is such a matmul (else it would be held twice: the matmuls
    stay). Exact up to rounding: the same products, summed by another GEMM.
    """
    params = {p.name: p for p in graph.params}
    producers, users = graph.producers(), graph.users()
    outputs = {v.name for v in graph.outputs}
    weights, new_params = dict(graph.weights), list(graph.params)
    transposed: dict[str, Value] = {}   # W's name -> the parameter holding W.T

    def by_weight(n: Node) -> bool:   # matmul(x, W) with W a 2-D parameter that only such matmuls read
        w = n.inputs[1]
        return w.name in params and w.type.rank == 2 and w.name not in outputs and all(
            u.op == "matmul" and u.inputs[0].name != w.name and u.inputs[0].type.rank >= 2
            and u.inputs[0].type.dtype == w.type.dtype for u in users.get(w.name, []))

    def weight_of(n: Node) -> Value | None:
        w = n.inputs[1]
        p = producers.get(w.name)
        if p is not None and p.op == "permute" and tuple(p.attr["perm"]) in ((1, 0), (-1, -2), (1, -2), (-1, 0)) \
                and p.inputs[0].name in params and p.inputs[0].type.rank == 2:
            return p.inputs[0]
        if not by_weight(n):
            return None
        if w.name not in transposed:
            transposed[w.name] = Value(f"{w.name}.T", w.type.with_(shape=tuple(reversed(w.type.shape))))
            weights[transposed[w.name].name] = weights[w.name].t().contiguous()
            new_params.append(transposed[w.name])
        return transposed[w.name]

    nodes: list[Node] = []
    linear_of: dict[str, Node] = {}   # output name -> the new bias-free linear that makes it
    for n in graph.nodes:
        if n.op == "matmul" and n.inputs[0].type.rank >= 2:
            w = weight_of(n)
            if w is not None and types_agree("linear", [n.inputs[0], w], {}, n.outputs):
                n = Node("linear", (n.inputs[0], w), n.outputs, (), (), n.source)
                linear_of[n.output.name] = n
        elif n.op == "add" and n.inputs[1] is not None and n.attr["alpha"] == 1.0:
            for y, b in (n.inputs, n.inputs[::-1]):
                lin = linear_of.get(y.name)
                if lin is None or b.name not in params or y.name in outputs or len(users.get(y.name, [])) != 1:
                    continue
                if types_agree("linear", [*lin.inputs, b], {}, n.outputs):
                    nodes = [m for m in nodes if m is not lin]
                    n = Node("linear", (*lin.inputs, b), n.outputs, (), (), n.source)
                    break
        nodes.append(n)
    return dce(replace(graph, nodes=tuple(nodes), params=tuple(new_params), weights=weights))


def _widens(src: str, dst: str) -> bool:
    """Whether a cast from float dtype `src` to `dst` loses nothing (the same dtype, or a wider float)."""
    wider = {"float16": ("float32", "float64"), "bfloat16": ("float32", "float64"), "float32": ("float64",)}
    return src == dst or dst in wider.get(src, ())


@graph_pass("recognize_attention")
def recognize_attention(graph: Graph) -> Graph:
    """Fold `matmul(softmax(matmul(q, k^T) * scale [+ mask]), v)` into one `attention` op.

        %s = matmul(%q, %kt); %s2 = mul(%s; scalar=0.125); %p = softmax(%s2; dim=-1); %o = matmul(%p, %v)
        ->  %o = attention(%q, %k, %v; scale=0.125)

    Intermediate values must have no other readers; casts around the softmax are allowed where the op does the
    same (it computes its softmax in fp32 and rounds the probabilities to v's dtype): a cast of the scores to a
    wider dtype, of the probabilities back to v's; a cast that rounds the scores or probabilities to a narrower
    dtype keeps the chain as written. The additive mask is q's dtype or float32 (what SDPA takes); a
    narrower one (fp16 on fp32 scores) is cast to q's dtype, as torch's add promotes it; any other (bf16 on
    fp16 scores, which torch adds in fp32) leaves the chain as it is.
    """

    def rule(node: Node, ctx: RewriteContext):
        if node.op != "matmul":
            return None
        p, v = node.inputs
        prod = ctx.producers.get(p.name)
        if prod is not None and prod.op == "cast" and ctx.single_use(p):
            if prod.attr["dtype"] != v.type.dtype or not _widens(prod.attr["dtype"], prod.inputs[0].type.dtype):
                return None   # attention rounds the probabilities to v's dtype only
            p = prod.inputs[0]
            prod = ctx.producers.get(p.name)
        if prod is None or prod.op != "softmax" or prod.attr["log"] or not ctx.single_use(p):
            return None
        if prod.attr["dim"] not in (-1, p.type.rank - 1):
            return None
        s = prod.inputs[0]
        s_prod = ctx.producers.get(s.name)
        if s_prod is not None and s_prod.op == "cast" and ctx.single_use(s):
            if not _widens(s_prod.inputs[0].type.dtype, s_prod.attr["dtype"]):
                return None   # scores rounded to a narrower dtype (bf16, softmax(dtype=f16)) before the softmax
            s = s_prod.inputs[0]
            s_prod = ctx.producers.get(s.name)
        mask = None
        # an additive float mask only: a bool or int addend adds 1 / its values (attention would read a bool mask
        # as which keys to keep), and add's alpha scales the addend
        if s_prod is not None and s_prod.op == "add" and s_prod.inputs[1] is not None and ctx.single_use(s) \
                and s_prod.attr["alpha"] == 1.0 and s_prod.inputs[1].type.dtype.startswith(("float", "bfloat")):
            mask = s_prod.inputs[1]
            s = s_prod.inputs[0]
            s_prod = ctx.producers.get(s.name)
        scale = 1.0
        if s_prod is not None and s_prod.op in ("mul", "div") and s_prod.inputs[1] is None and ctx.single_use(s) \
                and not s_prod.attr["swap"] and isinstance(s_prod.attr["scalar"], (int, float)) \
                and not (s_prod.op == "div" and s_prod.attr["scalar"] == 0):
            scale = float(s_prod.attr["scalar"]) if s_prod.op == "mul" else 1.0 / float(s_prod.attr["scalar"])
            s = s_prod.inputs[0]
            s_prod = ctx.producers.get(s.name)
        if s_prod is None or s_prod.op != "matmul" or not ctx.single_use(s):
            return None
        q, kt = s_prod.inputs
        kt_prod = ctx.producers.get(kt.name)
        if kt_prod is None or kt_prod.op != "permute" or q.type.rank != 4 or v.type.rank != 4:
            return None
        if tuple(kt_prod.attr["perm"]) not in ((0, 1, 3, 2), (0, 1, -1, -2)):
            return None
        k = kt_prod.inputs[0]
        if k.type.rank != 4 or tuple(k.type.shape[:2]) != tuple(q.type.shape[:2]):
            return None
        cast = []
        if mask is not None and mask.type.dtype not in (q.type.dtype, "float32"):   # SDPA's two mask dtypes
            if result_dtype(q.type, mask.type) != q.type.dtype:
                return None   # the scores are computed in the mask's wider dtype: not what attention does
            m = Value(ctx.fresh(f"{mask.name}_{q.type.dtype}"), mask.type.with_(dtype=q.type.dtype))
            cast = [Node("cast", (ctx.sub(mask),), (m,), (("dtype", q.type.dtype),), (), node.source)]
            mask = m
        attrs = get_op("attention").normalize_attrs({"scale": scale})
        ins = tuple(ctx.sub(x) for x in (q, k, v) + ((mask,) if mask is not None else ()))
        if not types_agree("attention", ins, attrs, node.outputs):
            return None  # v or the mask broadcast over batch / heads, or dtypes mixed: torch's, not attention's
        return cast + [Node("attention", ins, node.outputs, tuple(sorted(attrs.items())), (), node.source)]

    return dce(rewrite(graph, rule))


@graph_pass("recognize_repeat_kv")
def recognize_repeat_kv(graph: Graph) -> Graph:
    """Grouped-query attention written as Hugging Face's `repeat_kv` (each KV head copied n times with
    expand + reshape) reads the KV heads themselves: attention takes fewer KV heads than query heads (query head
    h reads KV head h // n, the order repeat_kv makes), so the cost model and the kernels read the cache once,
    not n times. The expand and reshape go when nothing else reads them.

        %u = reshape(%k; [b, 2, 1, s, d]); %e = expand(%u; [b, 2, 4, s, d]); %kr = reshape(%e; [b, 8, s, d])
        %o = attention(%q, %kr, %vr)   ->   %o = attention(%q, %k, %v)          (the same for v)
    """

    def rule(node: Node, ctx: RewriteContext):
        if node.op != "attention" or len(node.inputs) < 3:
            return None
        k, v = (_repeated_kv(x, ctx.producers) for x in node.inputs[1:3])
        if k is None or v is None or k[1] != v[1] or k[0].type.shape[1] != v[0].type.shape[1]:
            return None
        return [replace(node, inputs=(node.inputs[0], ctx.sub(k[0]), ctx.sub(v[0]), *node.inputs[3:]))]

    return dce(rewrite(graph, rule))


def _repeated_kv(x: Value, producers: dict[str, Node]):
    """(kv, n) when x is repeat_kv(kv, n): reshape(expand(reshape(kv; [b, h, 1, s, d]); [b, h, n, s, d]);
    [b, h*n, s, d]), with h and n static; else None."""
    merge = producers.get(x.name)
    grow = producers.get(merge.inputs[0].name) if merge is not None and merge.op == "reshape" else None
    split = producers.get(grow.inputs[0].name) if grow is not None and grow.op == "expand" else None
    if split is None or split.op != "reshape" or split.inputs[0].type.rank != 4:
        return None
    kv = split.inputs[0]
    b, h, s, d = kv.type.shape
    n = grow.output.type.shape[2] if grow.output.type.rank == 5 else None
    if not isinstance(h, int) or not isinstance(n, int):
        return None
    if tuple(split.output.type.shape) != (b, h, 1, s, d) or tuple(grow.output.type.shape) != (b, h, n, s, d) \
            or tuple(x.type.shape) != (b, h * n, s, d):
        return None
    return kv, n


_VIEW_OPS = {"select", "slice", "reshape", "permute"}


@graph_pass("recognize_cache_append")
def recognize_cache_append(graph: Graph) -> Graph:
    """A functional KV cache grown by concatenation becomes `kv_cache_append`, and the stacking of the layers'
    grown caches an in-place concat, so the cost model charges what a serving runtime moves (the new entries),
    not a copy of the whole cache per step. Numerics are unchanged (the references concatenate).

        %k0 = select(%k_cache; 0, 0); %c = concat(%k0, %k_new; dim=2)   ->   %c = kv_cache_append(%k0, %k_new; dim=2)
        %s = concat(reshape(%c0), reshape(%c1); dim=0)                  ->   ... concat(...; dim=0, inplace=True)
    """
    inputs = {v.name for v in graph.inputs}
    producers = graph.producers()

    def from_input(v) -> bool:
        while v.name not in inputs:
            p = producers.get(v.name)
            if p is None or p.op not in _VIEW_OPS:
                return False
            v = p.inputs[0]
        return True

    appended: set[str] = set()
    nodes = []
    for n in graph.nodes:
        if n.op == "concat" and len(n.inputs) == 2 and from_input(n.inputs[0]):
            attrs = get_op("kv_cache_append").normalize_attrs({"dim": n.attr["dim"]})
            n = Node("kv_cache_append", n.inputs, n.outputs, tuple(sorted(attrs.items())), (), n.source)
            appended.add(n.output.name)
        elif n.op == "concat" and n.inputs and all(_through_reshape(v, producers) in appended for v in n.inputs):
            n = n.with_attrs(inplace=True)
        nodes.append(n)
    return graph.with_nodes(nodes)


def _through_reshape(v, producers) -> str:
    p = producers.get(v.name)
    return p.inputs[0].name if p is not None and p.op == "reshape" else v.name


CANONICAL_PIPELINE = (fold_shapes, cse, dce)
