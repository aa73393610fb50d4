"""The IR verifier: the invariants every graph holds after capture and after every pass.

- every op is registered and takes the number of inputs it gets;
- attributes match the op's schema (no unknown, none missing, each value of its declared kind);
- values are defined before use, each name once (inputs, params, node outputs);
- output types agree with the op's type rule, a constant never standing for a symbol (ops without a rule, such
  as torch_fallback, keep theirs);
- graph outputs are defined values; regions are closed graphs and verify on their own.
"""
from __future__ import annotations

from lmforge.errors import LmforgeError, VerifyError
from lmforge.ir.graph import Graph, Node


def verify(g: Graph, outer: dict | None = None) -> Graph:
    """Raise VerifyError naming the first broken invariant; return the graph unchanged when it holds."""
    from lmforge.ir.ops import get_op

    scope = dict(outer or {})
    for v in (*g.inputs, *g.params):
        _define(scope, v, f"graph {g.name!r}")
    for i, n in enumerate(g.nodes):
        where = f"node {i} ({n.op}{', ' + n.source if n.source else ''}) of graph {g.name!r}"
        try:
            opdef = get_op(n.op)
        except LmforgeError as e:
            raise VerifyError(f"{where}: {e}") from None
        for v in n.inputs:
            if v is not None and scope.get(v.name) != v:
                raise VerifyError(f"{where}: input %{v.name} is not defined before use (or has another type)")
        try:
            opdef.check_arity(len(n.inputs))
            attrs = opdef.normalize_attrs(n.attr)
        except VerifyError as e:
            raise VerifyError(f"{where}: {e}") from None
        if set(attrs) != set(n.attr):
            raise VerifyError(f"{where}: attributes {sorted(n.attr)} are not normalized (expected {sorted(attrs)})")
        _check_types(n, opdef, attrs, where)
        for r in n.regions:
            verify(r)  # regions are closed: they see only their own inputs and params
        for v in n.outputs:
            _define(scope, v, where)
    for v in g.outputs:
        if scope.get(v.name) != v:
            raise VerifyError(f"graph {g.name!r}: output %{v.name} is not defined")
    missing = [v.name for v in g.params if g.weights and v.name not in g.weights]
    if missing:
        raise VerifyError(f"graph {g.name!r}: parameters without weights: {missing[:5]}")
    return g


def _define(scope: dict, v, where: str) -> None:
    if v.name in scope:
        raise VerifyError(f"{where}: value name %{v.name} is defined twice")
    scope[v.name] = v


def check_types(n: Node, where: str = "") -> None:
    """Raise VerifyError when the node's output types disagree with its op's type rule (or the rule rejects its
    inputs). The capture frontends ask before keeping a node, so valid model code falls back instead of failing."""
    from lmforge.ir.ops import get_op

    opdef = get_op(n.op)
    _check_types(n, opdef, opdef.normalize_attrs(n.attr), where or f"{n.op} node %{n.outputs[0].name}")


def _check_types(n: Node, opdef, attrs, where: str) -> None:
    if opdef.infer_fn is None:
        return
    try:
        expected = opdef.infer([None if v is None else v.type for v in n.inputs], attrs, n.regions)
    except VerifyError as e:
        raise VerifyError(f"{where}: {e}") from None
    got = tuple(v.type for v in n.outputs)
    if len(expected) != len(got):
        raise VerifyError(f"{where}: {len(got)} outputs, the op's type rule gives {len(expected)}")
    for e, t in zip(expected, got):
        if tuple(e.shape) != tuple(t.shape) and not _equal_dims(e.shape, t.shape) or e.dtype != t.dtype:
            raise VerifyError(f"{where}: output type {t} disagrees with the type rule's {e}")


def _equal_dims(a, b) -> bool:
    from lmforge.ir.types import simplify_dim

    if len(a) != len(b):
        return False
    return all(x == y or simplify_dim(x) == simplify_dim(y) for x, y in zip(a, b))
