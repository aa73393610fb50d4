"""What an op costs, independent of the hardware: FLOPs and bytes moved per memory tier.

The op registry computes a `Cost` for every node from its types and attributes; the hardware models
(`lmforge.hwmodels`) turn a `Cost` into time on a target (roofline) and into Kinetics eFLOPs.
"""
from __future__ import annotations

from dataclasses import dataclass

# Op classes group ops whose efficiency on a target behaves alike; calibration fits one factor each.
OP_CLASSES = ("matmul", "attention", "norm", "elementwise", "reduction", "data_movement", "gather", "collective",
              "program", "other")


@dataclass(frozen=True)
class Cost:
    """FLOPs and bytes of one op instance.

    `bytes_by_tier` maps a memory tier ("dram" unless a type annotation says otherwise, e.g. "host" for
    an offloaded KV cache) to the bytes read plus written there. `op_class` picks the efficiency factor.
    `dtype` is the dtype whose peak FLOP/s applies (the compute dtype).
    """

    flops: float = 0.0
    bytes_by_tier: tuple[tuple[str, float], ...] = ()
    op_class: str = "other"
    dtype: str = "float32"

    @property
    def bytes(self) -> float:
        return float(sum(b for _, b in self.bytes_by_tier))

    def tier_bytes(self, tier: str) -> float:
        return float(sum(b for t, b in self.bytes_by_tier if t == tier))

    @staticmethod
    def of(flops: float, bytes_: float, op_class: str, dtype: str = "float32", tier: str = "dram") -> "Cost":
        return Cost(float(flops), ((tier, float(bytes_)),), op_class, dtype)

    def __add__(self, other: "Cost") -> "Cost":
        merged: dict[str, float] = dict(self.bytes_by_tier)
        for t, b in other.bytes_by_tier:
            merged[t] = merged.get(t, 0.0) + b
        return Cost(self.flops + other.flops, tuple(sorted(merged.items())), self.op_class, self.dtype)
