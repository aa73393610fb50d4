"""A second try of torch.export with unnamed dynamic dims, kept only when it is provably as general as the first.

torch.export checks each guard on a named `torch.export.Dim` with a value-range analysis that cannot prove some
guards that always hold. Transformers' `repeat_kv` (every GQA model) makes one on a KV cache's length:

    Not all values of past = past_k.size()[3] ... satisfy the generated guard min(16 + 16*past, 32 + 32*past) ==
    (16 + 16*past)

`Dim.DYNAMIC` records guards without that check, so it captures such models, but it also accepts guards that do
restrict the sizes (`seq % 2 == 0`, `seq != 2`, `seq <= 64`) without saying so. `export_unnamed` therefore keeps
the retry only when every user dim is still its own symbol of the program's inputs, with no upper bound, and every
guard torch recorded holds for every size >= 2 of those dims (sympy proves it with each dim written as q + 2,
q >= 0 an integer). Dims the user gave one name and torch kept as two symbols get that one name from the
translator (`_Translator._user_dim_name`), so a compiled model refuses calls where they differ.
"""
from __future__ import annotations

import sympy
import torch
import torch.utils._pytree as pytree
from torch.utils._sympy.numbers import int_oo


def export_unnamed(model, inputs: tuple, names: list[str], dynamic: dict[str, dict[int, str]]):
    """torch.export of `model` with `Dim.DYNAMIC` for every dim named in `dynamic` (as checked by `check_dynamic`),
    or None when that export fails or the program it gives is not valid for every size >= 2 of those dims."""
    auto = torch.export.Dim.DYNAMIC
    shapes = tuple({d: auto for d in dynamic[name]} if name in dynamic else None for name in names)
    try:
        ep = torch.export.export(model, inputs, dynamic_shapes=shapes, strict=False)
        symbols = _user_symbols(ep, inputs, names, dynamic)
    except Exception:  # the retry is a best effort: the caller reports the first export's error
        return None
    if symbols is None or not _valid_for_every_size(ep, symbols):
        return None
    return ep


def _user_symbols(ep, inputs: tuple, names: list[str], dynamic: dict[str, dict[int, str]]):
    """{torch symbol: the user's dim name} for the dims in `dynamic`, or None when torch made one of them a constant
    or an expression, or made two dims the user named differently one symbol (named Dims would have refused both)."""
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    user = [placeholders[s.arg.name] for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    first_leaf, symbols = 0, {}
    for name, x in zip(names, inputs):
        for d, dim_name in dynamic.get(name, {}).items():
            size = user[first_leaf].meta["val"].shape[d]
            if not isinstance(size, torch.SymInt) or not isinstance(size.node.expr, sympy.Symbol):
                return None
            if symbols.setdefault(size.node.expr, dim_name) != dim_name:
                return None
        first_leaf += len(pytree.tree_leaves(x))
    return symbols


def _valid_for_every_size(ep, symbols: dict) -> bool:
    """Whether each user dim ranges over [<= 2, infinity) and each guard torch recorded is true for all sizes >= 2."""
    for sym in symbols:
        bounds = ep.range_constraints.get(sym)
        if bounds is None or bounds.lower > 2 or bounds.upper not in (int_oo, sympy.oo):
            return False
    shape_env = next(iter(_sym_ints(ep)), None)
    if shape_env is None:
        return False
    shape_env = shape_env.node.shape_env
    for guard in shape_env.guards:
        try:
            expr = shape_env.simplify(guard.expr)
            holds = expr.xreplace({s: sympy.Symbol(f"q_{s}", integer=True, nonnegative=True) + 2
                                   for s in expr.free_symbols})
            holds = holds if holds in (sympy.true, sympy.false) else sympy.simplify(holds)
        except Exception:  # torch's sympy functions that sympy cannot take: not proved
            return False
        if holds is not sympy.true:
            return False
    return True


def _sym_ints(ep):
    for n in ep.graph.nodes:
        val = n.meta.get("val") if n.op == "placeholder" else None
        if isinstance(val, torch.Tensor):
            yield from (d for d in val.shape if isinstance(d, torch.SymInt))

