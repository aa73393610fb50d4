"""CPU schedules of the row-wise kinds: elementwise (fused regions, rope), rmsnorm, softmax, gather.

All share one shape: a loop over rows (the leading axes fused; parallel when tvm.rowwise.parallel) and,
inside it, the static last axis split into vectors of `tvm.rowwise.vec` lanes (rounded down to a divisor).
Reductions (the sum of squares of rmsnorm, the max and sum of softmax) are computed per row inside the row
loop, so their results stay in registers or a row-sized scratch.
"""
from __future__ import annotations

from typing import Any, Mapping

from lmforge.backends.tvm.knobs import largest_divisor, parallel_on


def _vectorize(sch, loop, extent, width: int) -> None:
    if not isinstance(extent, int):
        return
    lanes = largest_divisor(extent, width)
    if lanes > 1:
        _, inner = sch.split(loop, [None, lanes])
        sch.vectorize(inner)


def _rows_and_last(sch, block):
    loops = sch.get_loops(block)
    if len(loops) == 1:
        return None, loops[0]
    return sch.fuse(*loops[:-1]), loops[-1]


def elementwise(sch, info: dict, knobs: Mapping[str, Any]) -> None:
    out = sch.get_sblock("out")
    rows, last = _rows_and_last(sch, out)
    _vectorize(sch, last, info["last"], int(knobs["tvm.rowwise.vec"]))
    if rows is not None and parallel_on(knobs["tvm.rowwise.parallel"]):
        sch.parallel(rows)


def rmsnorm(sch, info: dict, knobs: Mapping[str, Any]) -> None:
    vec = int(knobs["tvm.rowwise.vec"])
    out = sch.get_sblock("out")
    row, h = _rows_and_last(sch, out)
    for name in ("inv", "total", "part"):
        sch.compute_at(sch.get_sblock(name), row)
    part = sch.get_sblock("part")
    single_step = info["hidden"] == info["lanes"]
    if single_step:
        sch.vectorize(sch.get_loops(part)[-1])
    else:
        lane, h0 = sch.get_loops(part)[-2:]
        sch.reorder(h0, lane)
        sch.vectorize(lane)
    _vectorize(sch, h, info["hidden"], vec)
    if parallel_on(knobs["tvm.rowwise.parallel"]):
        sch.parallel(row)
    if not single_step:
        sch.decompose_reduction(part, h0)


def softmax(sch, info: dict, knobs: Mapping[str, Any]) -> None:
    vec = int(knobs["tvm.rowwise.vec"])
    out = sch.get_sblock("out")
    row, col = _rows_and_last(sch, out)
    for name in ("row_sum", "exps", "row_max"):
        sch.compute_at(sch.get_sblock(name), row)
    _vectorize(sch, col, info["n"], vec)
    exps = sch.get_sblock("exps")
    _vectorize(sch, sch.get_loops(exps)[-1], info["n"], vec)
    if parallel_on(knobs["tvm.rowwise.parallel"]):
        sch.parallel(row)


def gather(sch, info: dict, knobs: Mapping[str, Any]) -> None:
    out = sch.get_sblock("out")
    row, col = _rows_and_last(sch, out)
    _vectorize(sch, col, info["dim"], int(knobs["tvm.rowwise.vec"]))
    if parallel_on(knobs["tvm.rowwise.parallel"]):
        sch.parallel(row)


KINDS = {"elementwise": elementwise, "rmsnorm": rmsnorm, "softmax": softmax, "gather": gather}
