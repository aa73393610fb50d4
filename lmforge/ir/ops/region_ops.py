"""Ops whose body is a region (a sub-graph): `fused` runs a chain of elementwise/norm ops as one unit.

A backend may emit the region as one kernel; the torch reference runs the region's generated code. The
region's inputs correspond one to one to the node's inputs, and its outputs to the node's outputs.
"""
from __future__ import annotations

from lmforge.errors import VerifyError
from lmforge.ir.cost import Cost
from lmforge.ir.ops.registry import OpDef, attr, dims_conflict, nbytes


def _fused_infer(ins, attrs, regions):
    if len(regions) != 1:
        raise VerifyError("fused takes exactly one region")
    (body,) = regions
    if len(body.inputs) != len(ins):
        raise VerifyError(f"fused: {len(ins)} inputs but the region takes {len(body.inputs)}")
    for t, v in zip(ins, body.inputs):
        if t is not None and (t.dtype != v.type.dtype or t.rank != v.type.rank
                              or any(dims_conflict(a, b) for a, b in zip(t.shape, v.type.shape))):
            raise VerifyError(f"fused: input {t} does not match region input {v.type}")
    return [v.type for v in body.outputs]


def _fused_ref(*inputs, regions, kind="elementwise"):
    out = regions[0](*inputs)
    return out[0] if len(out) == 1 else out


def fused_cost(ins, attrs, outs, region_flops: float = 0.0) -> Cost:
    # Only the region's inputs and outputs touch memory; intermediates stay on chip. The FLOPs are the
    # region's (the executor's cost model adds them: see lmforge.search.cost_model).
    return Cost.of(region_flops, nbytes(*ins, *outs), "elementwise", outs[0].dtype if outs else "float32")


def ops() -> list[OpDef]:
    return [
        OpDef("fused", "A chain of elementwise / norm ops run as one unit (one kernel on a GPU). `kind` says "
                       "what the chain is (elementwise, swiglu, norm, ...).",
              {"kind": attr("str", "elementwise")}, _fused_infer, _fused_ref, fused_cost, arity=(1, None),
              op_class="elementwise", kind="region"),
    ]
