"""Where a split dim goes through a reshape, for the tensor-parallel propagation (lmforge.passes.shard_propagate).

`reshape_split_dim` pairs the dims of the two shapes into groups of equal size (split / merge / same; symbolic
dims match by simplification) and says which output dim carries each rank's block: [b, 1, 256] split on dim 2
-> [b, 1, 8, 32] is split on dim 2, the heads. Re-exported by lmforge.passes.shard.
"""
from __future__ import annotations


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
