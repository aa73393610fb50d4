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

from lmforge.backends.tvm.knobs import parallel_on


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
