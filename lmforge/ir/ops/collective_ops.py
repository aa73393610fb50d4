"""Collective ops of a tensor-parallel (SPMD) graph: every rank of a group runs the same graph on its shard.

    all_reduce(x; group_size)          the sum of x over the group's ranks (after a row-parallel linear)
    all_gather(x; group_size, dim)     the ranks' x concatenated along `dim`, in rank order
    shard_slice(x; group_size, dim)    this rank's 1/group_size part of a replicated x along `dim` (no traffic)

Their references run through the communicator of the current tensor-parallel run
(`lmforge.backends.collectives.current_group()`): ranks simulated by threads in one process, or a
torch.distributed process group. Outside such a run, a group of size 1 is the identity and anything larger
is an error that says how to run the graph.

Cost: ring algorithms over the interconnect (tier "peer", `Hardware.interconnect`): an all-reduce sends and
receives 2 (g - 1) / g of the tensor per rank, an all-gather (g - 1) / g of its output; each also pays the op
class "collective"'s fixed cost (`hw.launch("collective")`, the latency of a small message).
"""
from __future__ import annotations

from lmforge.errors import VerifyError
from lmforge.ir.cost import Cost
from lmforge.ir.ops.registry import OpDef, attr, nbytes, norm_dim


def _check_group(attrs) -> int:
    g = attrs["group_size"]
    if not isinstance(g, int) or g < 1:
        raise VerifyError(f"a collective's group_size must be an int >= 1, got {g!r}")
    return g


def _same(ins, attrs):
    _check_group(attrs)
    return [ins[0]]


def _group_and_dim(op: str, x, attrs) -> tuple[int, int]:
    dim = norm_dim(attrs["dim"], x.rank)
    if not 0 <= dim < x.rank:
        raise VerifyError(f"{op}: dim {attrs['dim']} is outside a rank-{x.rank} tensor")
    return _check_group(attrs), dim


def _gather_infer(ins, attrs):
    x = ins[0]
    g, dim = _group_and_dim("all_gather", x, attrs)
    shape = list(x.shape)
    shape[dim] = shape[dim] * g if isinstance(shape[dim], int) else f"({shape[dim]}) * {g}"
    return [x.with_(shape=tuple(shape))]


def _slice_infer(ins, attrs):
    x = ins[0]
    g, dim = _group_and_dim("shard_slice", x, attrs)
    size = x.shape[dim]
    if not isinstance(size, int) or size % g:
        raise VerifyError(f"shard_slice: dim {dim} of {x} does not split into {g} equal parts")
    shape = list(x.shape)
    shape[dim] = size // g
    return [x.with_(shape=tuple(shape))]


def _group(group_size: int):
    from lmforge.backends.collectives import current_group

    return current_group(group_size)


def _all_reduce_ref(x, *, group_size):
    return x if group_size == 1 else _group(group_size).all_reduce(x)


def _all_gather_ref(x, *, group_size, dim):
    return x if group_size == 1 else _group(group_size).all_gather(x, dim)


def _shard_slice_ref(x, *, group_size, dim):
    if group_size == 1:
        return x
    return x.chunk(group_size, dim)[_group(group_size).rank].contiguous()


def _all_reduce_cost(ins, attrs, outs):
    g = attrs["group_size"]
    return Cost.of(0.0, 2 * (g - 1) / g * nbytes(ins[0]), "collective", ins[0].dtype, tier="peer")


def _all_gather_cost(ins, attrs, outs):
    g = attrs["group_size"]
    return Cost.of(0.0, (g - 1) / g * nbytes(outs[0]), "collective", outs[0].dtype, tier="peer")


def _shard_slice_cost(ins, attrs, outs):
    # A contiguous copy of this rank's part (the reference makes one; a kernel may read through a view).
    return Cost.of(0.0, 2 * nbytes(outs[0]), "data_movement", outs[0].dtype)


def ops() -> list[OpDef]:
    group = attr("int", doc="ranks in the tensor-parallel group")
    return [
        OpDef("all_reduce", "Sum of x over the ranks of a tensor-parallel group (every rank gets the sum).",
              {"group_size": group}, _same, _all_reduce_ref, _all_reduce_cost, op_class="collective"),
        OpDef("all_gather", "The group's x concatenated along dim in rank order (every rank gets the whole).",
              {"group_size": group, "dim": attr("int")}, _gather_infer, _all_gather_ref, _all_gather_cost,
              op_class="collective"),
        OpDef("shard_slice", "This rank's part of a replicated x: x.chunk(group_size, dim)[rank]; no traffic.",
              {"group_size": group, "dim": attr("int")}, _slice_infer, _shard_slice_ref, _shard_slice_cost,
              op_class="data_movement"),
    ]
