"""CPU schedule of the attention lowering (see lower_attention): one (batch, head, query) row per iteration.

    for row in B * Hq * Sq (parallel when tvm.attention.parallel):
      for j in Skv:  part[:] = 0; for d0: part[:] += q[d0, :] * k[j, d0, :]   (vec lanes)   s[j] = sum(part)
      m = max_j s[j];  p[j] = exp(s[j] - m);  l = sum_j p[j]
      acc[:] = 0;  for j: acc[:] += p[j] * v[j, :]            (Dv lanes)
      out[:] = acc[:] / l;  lse = m + log(l)
The per-row scratch (s, p: Skv floats) is allocated per row; the lane partial sums stay in registers.
"""
from __future__ import annotations

from typing import Any, Mapping

from lmforge.backends.tvm.knobs import largest_divisor, parallel_on


def attention(sch, info: dict, knobs: Mapping[str, Any]) -> None:
    # The row loop is the scores block's (b, h, i); every later stage is moved into it in dataflow order
    # (reverse_compute_at needs a block's producers under the loop already), the lane partials into j.
    scores = sch.get_sblock("scores")
    b, h, i, j_loop = sch.get_loops(scores)[:4]
    row = sch.fuse(b, h, i)
    names = ["row_max", "probs", "row_sum", "acc", "out"] + (["lse"] if info["return_lse"] else [])
    for name in names:
        sch.reverse_compute_at(sch.get_sblock(name), row)
    part = sch.get_sblock("part")
    sch.compute_at(part, j_loop)
    sch.set_scope(part, 0, "local")
    single_step = info["d"] == info["lanes"]  # the d0 loop has extent 1: compute_at emits no loop for it
    if single_step:
        sch.vectorize(sch.get_loops(part)[-1])
    else:
        lane, d0 = sch.get_loops(part)[-2:]
        sch.reorder(d0, lane)
        sch.vectorize(lane)
    acc = sch.get_sblock("acc")
    e_loop, jv = sch.get_loops(acc)[-2:]
    sch.reorder(jv, e_loop)
    sch.vectorize(e_loop)
    sch.vectorize(sch.get_loops(sch.get_sblock("out"))[-1])
    if parallel_on(knobs["tvm.attention.parallel"]):
        sch.parallel(row)
    if not single_step:
        sch.decompose_reduction(part, d0)
    sch.decompose_reduction(acc, jv)


def attention_tiled(sch, info: dict, knobs: Mapping[str, Any]) -> None:
    """attention_tiled_lowered: one (batch, head, query tile) per iteration. Scores: per key tile a keys x rows
    block of accumulators (local, i.e. registers) over d, the rows as vector lanes; P.V: per slice of `lanes`
    value columns a rows x lanes block of accumulators over all keys."""
    lanes = largest_divisor(info["dv"], 16)
    scores = sch.get_sblock("scores")
    b, h, iq, jk, jj, r, dd = sch.get_loops(scores)
    tile = sch.fuse(b, h, iq)
    sch.compute_at(sch.get_sblock("q_t"), tile)
    names = ["row_max", "probs", "row_sum", "acc", "out"] + (["lse"] if info["return_lse"] else [])
    for name in names:
        sch.reverse_compute_at(sch.get_sblock(name), tile)
    sch.reorder(dd, jj, r)                              # s[jj, :] += k[jk, jj, d] * qT[d, :]
    local = sch.cache_write(scores, 0, "local")
    sch.reverse_compute_at(local, jk)
    sch.vectorize(sch.get_loops(local)[-1])
    sch.unroll(jj)
    sch.vectorize(r)
    for name in ("row_max", "row_sum"):                 # m[:] = max over keys of s[., :]: the rows as lanes
        blk = sch.get_sblock(name)
        rr, kk, kj = sch.get_loops(blk)[-3:]
        sch.reorder(kk, kj, rr)
        sch.vectorize(rr)
    sch.vectorize(sch.get_loops(sch.get_sblock("probs"))[-1])
    acc = sch.get_sblock("acc")
    r2, e, vk, vj = sch.get_loops(acc)[-4:]
    eo, ei = sch.split(e, [None, lanes])
    sch.reorder(eo, vk, vj, r2, ei)                     # acc[:, e-slice] += p[., :] * v[., e-slice]
    acc_local = sch.cache_write(acc, 0, "local")
    sch.reverse_compute_at(acc_local, eo)
    sch.vectorize(sch.get_loops(acc_local)[-1])
    sch.unroll(r2)                                      # constant indices: the accumulators stay in registers
    sch.vectorize(ei)
    sch.vectorize(sch.get_loops(sch.get_sblock("out"))[-1])
    if parallel_on(knobs["tvm.attention.parallel"]):
        sch.parallel(tile)
    sch.decompose_reduction(scores, dd)
    for name in ("row_max", "row_sum"):
        blk = sch.get_sblock(name)
        sch.decompose_reduction(blk, sch.get_loops(blk)[-3])
    sch.decompose_reduction(acc, vk)
