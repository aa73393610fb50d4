"""Time of one op on a target by the roofline, and its Kinetics eFLOPs.

    compute_s = flops / (peak[dtype] * eff_compute)
    memory_s  = sum over tiers t of bytes_t / (bandwidth_t * eff_memory)
    time_s    = max(compute_s, memory_s) + launch overhead (of the op class, `hw.launch(op_class)`)

The efficiency factors come from `hw.efficiency[cost.op_class]` (defaults, or fitted by `calibrate`)
unless `eff` is given. A tier other than "dram" moves at that tier's bandwidth when the hardware defines
one ("host" = host link, "peer" = interconnect), else at DRAM bandwidth.

Kinetics eFLOPs (Sadhukhan et al., "Kinetics: Rethinking Test-Time Scaling Laws", 2025) fold memory
traffic into FLOPs: eFLOPs = flops + I * bytes with I = peak / bandwidth, i.e. a byte costs as much as the
FLOPs the chip could have done while moving it; eFLOPs / peak is the time with compute and memory not
overlapped. Per tier, I_t = peak / bandwidth_t.

An op that moves nothing and computes nothing (a view) launches no kernel and costs 0.
"""
from __future__ import annotations

from dataclasses import dataclass

from lmforge.hwmodels.hardware import Hardware
from lmforge.ir.cost import Cost


@dataclass(frozen=True)
class Estimate:
    """Roofline estimate of one op: times in seconds, intensity and ridge in FLOP/byte."""

    time_s: float
    compute_s: float
    memory_s: float
    launch_s: float
    bound: str          # "compute" or "memory"
    intensity: float    # flops / bytes of the op (inf when it moves nothing)
    ridge: float        # peak[dtype] / DRAM bandwidth: above it an op is compute-bound (at equal efficiency)
    eflops: float


def node_time(cost: Cost, hw: Hardware, eff: tuple[float, float] | None = None) -> Estimate:
    """Roofline time of `cost` on `hw` (see the module docstring)."""
    eff_c, eff_m = hw.eff(cost.op_class) if eff is None else eff
    peak = hw.peak(cost.dtype)
    compute_s = cost.flops / (peak * eff_c)
    memory_s = sum(b / (hw.tier_bandwidth(t) * eff_m) for t, b in cost.bytes_by_tier)
    launch_s = hw.launch(cost.op_class) if (cost.flops > 0 or cost.bytes > 0) else 0.0
    total_bytes = cost.bytes
    return Estimate(
        time_s=max(compute_s, memory_s) + launch_s,
        compute_s=compute_s,
        memory_s=memory_s,
        launch_s=launch_s,
        bound="compute" if compute_s >= memory_s else "memory",
        intensity=cost.flops / total_bytes if total_bytes > 0 else float("inf"),
        ridge=peak / hw.memory_bandwidth,
        eflops=eflops(cost, hw),
    )


def eflops(cost: Cost, hw: Hardware) -> float:
    """Kinetics eFLOPs of one op: flops + sum over tiers of (peak[dtype] / bandwidth_tier) * bytes_tier."""
    peak = hw.peak(cost.dtype)
    return cost.flops + sum(peak / hw.tier_bandwidth(t) * b for t, b in cost.bytes_by_tier)


def roofline_time(cost: Cost, hw: Hardware, eff: tuple[float, float] | None = None) -> float:
    """Just the time in seconds (`node_time(...).time_s`)."""
    return node_time(cost, hw, eff).time_s
