"""The op registry. `get_op(name)` returns the one `OpDef` of an op; `all_ops()` lists them.

The op families are listed here explicitly (no registration by import side effects).
"""
from lmforge.ir.ops import collective_ops, nn_ops, program_ops, region_ops, sparse_attention_ops, tensor_ops
from lmforge.ir.ops.registry import AttrSpec, OpDef, Registry, attr

_FAMILIES = (tensor_ops, nn_ops, region_ops, sparse_attention_ops, program_ops, collective_ops)

REGISTRY = Registry()
for _family in _FAMILIES:
    for _op in _family.ops():
        REGISTRY.add(_op)


def get_op(name: str) -> OpDef:
    return REGISTRY.get(name)


def all_ops() -> list[str]:
    return REGISTRY.names()


__all__ = ["AttrSpec", "OpDef", "REGISTRY", "attr", "get_op", "all_ops"]
