"""CPU schedules: knob values -> a TIR schedule of a lowered computation (tvm.s_tir.Schedule).

One function per kernel kind; `schedule_cpu` dispatches on `Lowered.kind`. Every split divides a static
extent (the knob value is rounded down to a divisor), so no loop carries a tail predicate: predicates stop
LLVM from vectorizing and, on symbolic extents, trip TVM 0.27's buffer compaction.

    gemv       y[m, n] = sum_k x[m, k] W(n, k), m static (decode rows)
               for n_tile-column tiles (parallel):             acc[rows, n_tile, vec] in registers
                 for k in K / vec:  for m, n (unrolled):       acc[m, n, :] += x[m, k, :] * W(n, k, :)
                 y[m, n] = sum over the vec lanes
    gemm       y[o, r, n] = sum_k x[o, r, k] W(n, k): mr x nr register tile, panel of W packed per column tile
               for nr-column panels (parallel, order "nm"): pack panel
                 for row tiles o: for k: for r: acc[r, :nr] += x[o, r, k] * panel[k, :nr]
    bmm        c[z, i, j] = sum_k a[z, i, k] b[z, k, j]: for z (parallel), i, k: c[z, i, :] += a * b[z, k, :]
    attention, rowwise kinds: see their functions.
"""
from __future__ import annotations

from typing import Any, Mapping

from lmforge.backends.tvm.knobs import largest_divisor, parallel_on


def schedule_cpu(mod, lowered, knobs: Mapping[str, Any]):
    """The scheduled IRModule for `lowered` (a `Lowered`) under the knob values."""
    import tvm.s_tir as s_tir

    sch = s_tir.Schedule(mod)
    sch.work_on(mod.get_global_vars()[0].name_hint)
    fn = _kinds()[lowered.kind]
    fn(sch, lowered.info, knobs)
    return sch.mod


def _vector_split(sch, loop, extent: int, width: int):
    """Split `loop` (static `extent`) into (outer, inner) with inner = the largest divisor <= width; vectorize inner."""
    lanes = largest_divisor(extent, width)
    outer, inner = sch.split(loop, [None, lanes])
    if lanes > 1:
        sch.vectorize(inner)
    return outer, inner


def gemv(sch, info: dict, knobs: Mapping[str, Any]) -> None:
    n, k, lead = info["n"], info["k"], info["lead"]
    vec = largest_divisor(k, int(knobs["tvm.gemv.vec"]))
    n_tile = largest_divisor(n, int(knobs["tvm.gemv.n_tile"]))
    k_unroll = largest_divisor(k // vec, int(knobs["tvm.gemv.k_unroll"]))
    acc = sch.get_sblock("acc")
    loops = sch.get_loops(acc)
    if lead > 1:
        sch.fuse(*loops[:lead])
        loops = sch.get_loops(acc)
    m_loop, n_loop, k_loop = loops[:3]
    ko, ki = sch.split(k_loop, [None, vec])
    rf = sch.rfactor(ki, 2)
    rf_loops = sch.get_loops(rf)  # m, n, ko, ki (, p for int4 pairs)
    m_loop, n_loop, ko, ki = rf_loops[:4]
    extra = rf_loops[4:]
    jo, ji = sch.split(n_loop, [None, n_tile])
    if k_unroll > 1:
        ko, ku = sch.split(ko, [None, k_unroll])
        sch.reorder(jo, ko, ku, m_loop, ji, *extra, ki)
        sch.unroll(ku)
    else:
        sch.reorder(jo, ko, m_loop, ji, *extra, ki)
    sch.vectorize(ki)
    for loop in (m_loop, ji, *extra):
        sch.unroll(loop)
    sch.reverse_compute_at(acc, jo)
    sch.set_scope(rf, 0, "local")
    if info["bias"]:
        sch.set_scope(acc, 0, "local")
        sch.reverse_compute_at(sch.get_sblock("out"), jo)
    if parallel_on(knobs["tvm.gemv.parallel"]):
        sch.parallel(jo)
    sch.decompose_reduction(rf, ko)  # last: the update block is no longer a "reduction" for other primitives
    if info.get("pairs"):
        split = sch.get_sblock("x_split")
        sch.unroll(sch.get_loops(split)[-2])
    if info["bias"]:
        out_loops = sch.get_loops(sch.get_sblock("out"))
        sch.vectorize(out_loops[-1]) if n_tile > 1 else None


def gemm(sch, info: dict, knobs: Mapping[str, Any]) -> None:
    nr, k = info["nr"], info["k"]
    acc = sch.get_sblock("acc")
    if info["bias"]:
        sch.set_scope(acc, 0, "local")
        write_back = sch.get_sblock("out")
    else:
        write_back = sch.cache_write(acc, 0, "local")
    o, r, n, kk = sch.get_loops(acc)
    jo, ji = sch.split(n, [None, nr])
    unroll_k = largest_divisor(k, int(knobs["tvm.gemm.unroll_k"]))
    order_nm = knobs["tvm.gemm.order"] == "nm"
    outer, inner = (jo, o) if order_nm else (o, jo)
    if unroll_k > 1:
        kk, ku = sch.split(kk, [None, unroll_k])
        sch.reorder(outer, inner, kk, ku, r, ji)
        sch.unroll(ku)
    else:
        sch.reorder(outer, inner, kk, r, ji)
    sch.vectorize(ji)
    sch.unroll(r)
    sch.reverse_compute_at(write_back, inner)
    wb_loops = sch.get_loops(write_back)
    sch.vectorize(wb_loops[-1])
    if info["pack"]:
        pack = sch.get_sblock("pack")
        if order_nm:
            sch.compute_at(pack, outer)  # pack the panel right before the rows that read it
        elif parallel_on(knobs["tvm.gemm.parallel"]):
            sch.parallel(sch.get_loops(pack)[0])
        _vectorize_inner(sch, pack, nr)
    if parallel_on(knobs["tvm.gemm.parallel"]):
        sch.parallel(outer)
    sch.decompose_reduction(acc, kk)


def _vectorize_inner(sch, block, extent: int, width: int = 16) -> None:
    loops = sch.get_loops(block)
    _vector_split(sch, loops[-1], extent, width)


def bmm(sch, info: dict, knobs: Mapping[str, Any]) -> None:
    acc = sch.get_sblock("acc")
    z, i, j, kk = sch.get_loops(acc)
    sch.reorder(z, i, kk, j)
    if info["n"] is not None:
        _vector_split(sch, j, info["n"], 16)
    if parallel_on(knobs["tvm.gemm.parallel"]):
        sch.parallel(z)
    sch.decompose_reduction(acc, kk)


def _kinds() -> dict:
    """Kernel kind -> schedule function (the attention and row-wise kinds live in their own modules)."""
    from lmforge.backends.tvm import schedule_attention, schedule_rowwise

    return {"gemv": gemv, "gemm": gemm, "bmm": bmm, "attention": schedule_attention.attention,
            "attention_tiled": schedule_attention.attention_tiled,
            **schedule_rowwise.KINDS}
