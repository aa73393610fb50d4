"""Causal-mask recognition: `attention(q, k, v, mask)` whose mask is provably the causal mask becomes
`attention(q, k, v; causal=True)`, so that the sparsity passes, which rewrite mask-free attention, apply to
models that build their mask from sizes (Hugging Face's models called without an attention_mask). A provably
causal sliding-window mask of a constant width (Mistral's) becomes `attention(...; causal=True, window=W)`, which
the backends' windowed kernels run (they read only the window's keys).

    %a = arange(; end='seq')                      %o = attention(%q, %k, %v; causal=True, scale=0.25)
    %i = reshape(%a; [1, 1, seq, 1]); %j = reshape(%a; [1, 1, 1, seq])
    %m = le(%j, %i)                          ->
    %o = attention(%q, %k, %v, %m; scale=0.25)

How it is proven, for every size (nothing is tried at sample sizes, so a 4096-token sliding window is not taken
for the causal mask because the sizes tried were smaller): `lmforge.passes.element_values` describes the mask
element-wise as sympy cases over its index variables and the symbolic dims. Graph inputs and parameters are
opaque there: a mask that reads an attention_mask input's data (even one of all ones) or a weight (a registered
causal buffer) is unknown and stays, as does one built by an op the interpreter does not model.

The mask is broadcast to the scores' [batch, heads, Sq, Skv] index space and the condition under which it lets
key `_i3` through to query `_i2` is formed: a bool mask's True; an additive float mask's 0, its other values being
-inf or its dtype's finfo.min (a key under finfo.min gets weight exactly 0 when its row sees some key, which c >= 0
below guarantees, unless its score exceeds the row's maximum by about |finfo.min|). Relations that hold (or fail)
on the whole index box are decided from their linear bounds, the rest is simplified as propositional logic, and
relations on the same `_i3 - _i2` are merged; what remains must be exactly `_i3 <= _i2 + c` with c >= 0 for every
size (query i at position c + i: c = Skv - Sq is attention's default alignment, another c becomes `q_offset`),
or True (every key visible: the mask is dropped, as in a decode step over its whole KV cache), possibly and-ed
with `_i2 - _i3 <= b` where b + c + 1 is one integer W >= 1 for every size (the window: position p = i + c sees
key j iff p - j < W; a decode step may have the window alone). A window whose width depends on the sizes, a band
that lets later keys through, a packed-sequence mask that could split rows, a mask whose first rows could see no
key, or anything else stays an explicit mask. Numerics do not change: the rewritten node computes the same
attention.
"""
from __future__ import annotations

from dataclasses import replace

import sympy
import torch

from lmforge.ir.graph import Graph, Node
from lmforge.ir.types import TensorType, simplify_dim, torch_dtype
from lmforge.passes.base import graph_pass
from lmforge.passes.canonical import dce
from lmforge.passes.element_values import (FALSE, INDEX, TRUE, Elems, box_bounds, elements_of, holds, linear_form,
                                           read_at, size_expr)

_MAX_ATOMS = 8  # relations in a visibility condition: propositional simplification is exponential in them


def _decide(atom, sizes: dict):
    """A relation over index symbols and dims: True / False where it holds / fails on the whole box (every box
    is taken as non-empty), else the relation itself."""
    if not isinstance(atom, sympy.core.relational.Relational):
        return atom
    b = box_bounds(atom.lhs - atom.rhs, sizes)
    if b is None:
        return atom
    lo, hi = b
    kind = type(atom)
    equal, differ = sympy.And(sympy.Eq(lo, 0), sympy.Eq(hi, 0)), sympy.Or(lo > 0, hi < 0)
    rules = {sympy.Le: (hi <= 0, lo > 0), sympy.Lt: (hi < 0, lo >= 0), sympy.Ge: (lo >= 0, hi < 0),
             sympy.Gt: (lo > 0, hi <= 0), sympy.Eq: (equal, differ), sympy.Ne: (differ, equal)}
    if kind not in rules:
        return atom
    yes, no = rules[kind]
    return TRUE if holds(yes) else FALSE if holds(no) else atom


def _resolve(cond, sizes: dict):
    """`cond` with every atom decided on the box replaced by True / False."""
    if cond in (TRUE, FALSE) or not isinstance(cond, sympy.Basic):
        return cond
    atoms = cond.atoms(sympy.core.relational.Relational)
    subs = {a: _decide(a, sizes) for a in atoms}
    return cond.xreplace({a: d for a, d in subs.items() if d is not a})


def _canonical(atom):
    """An integer relation as (coefficients of the index symbols, bound): sum(c * s) <= bound; else None."""
    if not isinstance(atom, (sympy.Le, sympy.Lt, sympy.Ge, sympy.Gt)):
        return None
    lhs = atom.lhs - atom.rhs if isinstance(atom, (sympy.Le, sympy.Lt)) else atom.rhs - atom.lhs
    lin = linear_form(lhs + 1 if isinstance(atom, (sympy.Lt, sympy.Gt)) else lhs, INDEX)  # integers: x < 0 iff x+1 <= 0
    if lin is None or not lin[1].is_integer:
        return None
    return tuple(sorted(lin[0].items(), key=lambda kv: kv[0].name)), -lin[1]


def _tighten(cond):
    """`cond` with relations that differ only in their bound merged where the bounds compare for every size:
    an And keeps the smallest bound, an Or the largest (`j - i <= 0 | j - i <= past` is `j - i <= past`)."""
    if not isinstance(cond, (sympy.And, sympy.Or)):
        return cond
    args = [_tighten(a) for a in cond.args]
    groups: dict = {}
    rest = []
    for a in args:
        canon = _canonical(a)
        if canon is None:
            rest.append(a)
        else:
            groups.setdefault(canon[0], []).append(canon[1])
    for coefs, bounds in groups.items():
        better = (lambda x, y: holds(x <= y)) if isinstance(cond, sympy.And) else (lambda x, y: holds(x >= y))
        best = next((b for b in bounds if all(better(b, o) for o in bounds)), None)
        for b in ([best] if best is not None else bounds):
            rest.append(sympy.Le(sum(c * s for s, c in coefs), b))
    return type(cond)(*rest)


def _visible(mask: Elems, scores: list, mask_dtype: str):
    """The condition under which the mask lets key _i3 through to query _i2 of the scores [B, H, Sq, Skv]."""
    if len(mask.shape) > 4:
        return None
    off = 4 - len(mask.shape)
    for d, s in enumerate(mask.shape):
        if s != 1 and sympy.expand(size_expr(s) - scores[d + off]) != 0:
            return None
    index = [sympy.Integer(0) if s == 1 or scores[d + off] == 1 else INDEX[d + off] for d, s in enumerate(mask.shape)]
    cases = read_at(mask, index)
    if mask.kind == "bool":
        return sympy.Or(*(sympy.And(v, c) for v, c in cases))
    if mask.kind != "float":
        return None
    masked = {float("-inf"), float(torch.finfo(torch_dtype(mask_dtype)).min)}
    if any(v != 0.0 and v not in masked for v, _ in cases):
        return None
    return sympy.Or(*(c for v, c in cases if v == 0.0))


def _window_width(bound, c):
    """The window attr of a relation `i - j <= bound` under causal offset c (position p = i + c, key visible iff
    p - j < window): bound + c + 1, when that is one integer >= 1 for every size, else None."""
    w = sympy.expand(bound + c + 1)
    return int(w) if w.is_Integer and w >= 1 else None


def visibility_rule(mask: Elems, q: TensorType, k: TensorType, mask_dtype: str):
    """What the mask is, as attention attrs: "all" when it lets every key through; {"offset": c, "window": w}
    when it lets key j through to query i iff j <= i + c (c >= 0 for every size) and, with a window w (an
    integer), i + c - j < w; for a decode step (one query) also the window alone; else None."""
    scores = [size_expr(d) for d in (*q.shape[:3], k.shape[2])]
    visible = _visible(mask, scores, mask_dtype)
    if visible is None:
        return None
    visible = _resolve(visible, {INDEX[d]: s for d, s in enumerate(scores) if s != 1})
    if len(visible.atoms(sympy.core.relational.Relational)) > _MAX_ATOMS:
        return None
    visible = _tighten(sympy.simplify_logic(visible, force=True))  # reads `a > b` as not `a <= b`
    if visible is TRUE:
        return "all"
    decode = scores[2] == 1
    causal = ((INDEX[3], 1),) if decode else ((INDEX[2], -1), (INDEX[3], 1))
    window = ((INDEX[3], -1),) if decode else ((INDEX[2], 1), (INDEX[3], -1))
    relations = visible.args if isinstance(visible, sympy.And) else (visible,)
    canon = dict(_canonical(r) or (None, None) for r in relations)
    if len(relations) != len(canon) or not set(canon) <= {causal, window}:
        return None
    if causal not in canon:    # a window alone: the query sits after every key only in a decode step
        if not decode:
            return None
        c = scores[3] - 1
    else:
        c = canon[causal]
        if not holds(c >= 0):
            return None
    width = None
    if window in canon:
        width = _window_width(canon[window], c)
        if width is None:
            return None
    return {"offset": c, "window": width}


def _rewrite(n: Node, producers: dict, memo: dict, decided: dict) -> Node:
    a = n.attr
    if (n.op != "attention" or len(n.inputs) != 4 or n.inputs[3] is None or a["causal"] or a["window"] is not None
            or a["sinks"] or a["return_lse"] or a["q_offset"] is not None):
        return n
    q, k, _, m = n.inputs
    key = (m.name, q.type.shape, k.type.shape)          # the layers of a model share one mask: decide it once
    if key not in decided:
        mask = elements_of(m, producers, memo)
        decided[key] = None if mask is None else visibility_rule(mask, q.type, k.type, m.type.dtype)
    rule = decided[key]
    if rule is None:
        return n
    plain = replace(n, inputs=n.inputs[:3])
    if rule == "all":
        return plain
    c = rule["offset"]
    default = sympy.expand(c - (size_expr(k.type.shape[2]) - size_expr(q.type.shape[2]))) == 0
    return plain.with_attrs(causal=True, window=rule["window"],
                            q_offset=None if default else simplify_dim(str(c)))


@graph_pass("recognize_causal_mask")
def recognize_causal_mask(graph: Graph) -> Graph:
    """An explicit attention mask that is provably the causal mask (built from sizes only) becomes `causal`;
    one under which every key is visible is dropped; the mask's nodes go when nothing else reads them.

        %m: bool[1, 1, seq, seq] = le(%kpos, %qpos)    (%kpos: arange(seq) as [1, 1, 1, seq], %qpos as [1, 1, seq, 1])
        %o = attention(%q, %k, %v, %m; scale=0.25)  ->  %o = attention(%q, %k, %v; causal=True, scale=0.25)

    See the module docstring for how the mask is proven; a mask that reads an input's data stays.
    """
    producers, memo, decided = graph.producers(), {}, {}
    nodes = [_rewrite(n, producers, memo, decided) for n in graph.nodes]
    return dce(graph.with_nodes(nodes))
