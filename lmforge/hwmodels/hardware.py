"""`Hardware`: the numbers of a target that the cost model needs, as one frozen, JSON-serializable value.

A `Hardware` describes one device (a GPU, or the host CPU): peak FLOP/s per dtype (dense, no 2:4
sparsity), memory capacity and bandwidth, caches, SM resources, links to other devices and to the host,
kernel launch overhead, and per-op-class efficiency factors (the fraction of peak compute and of peak
bandwidth that kernels of that class reach in practice; calibration fits them, see `calibrate.py`).

Units are SI throughout: FLOP/s, bytes, bytes/s (per direction for links), seconds.

    >>> from lmforge.hwmodels import get_target
    >>> hw = get_target("h100")
    >>> hw.peak("bfloat16") / hw.memory_bandwidth   # ridge point, FLOP per byte
    295.3...
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from lmforge.errors import TargetError
from lmforge.ir.cost import OP_CLASSES

# The dtypes every Hardware gives a peak for (dense tensor-core / vector peak, no sparsity).
PEAK_DTYPES = ("float32", "tfloat32", "float16", "bfloat16", "float8_e4m3fn", "int8")

# dtypes a Cost may carry that have no peak of their own: the peak they run at.
# float64 is not modeled (LLM inference does not use it); it is charged at the float32 peak.
_PEAK_ALIASES = {  # float16 and bfloat16 run on the same tensor cores: a description with one has both
    "float16": "bfloat16", "bfloat16": "float16",
    "float64": "float32", "float8_e5m2": "float8_e4m3fn", "int4": "int8", "uint8": "int8",
    "int16": "float32", "int32": "float32", "int64": "float32", "bool": "float32",
}

# Default efficiency factors (fraction of peak compute, fraction of peak bandwidth) per op class, used until
# a calibration replaces them. Typical values of tuned vendor kernels: GEMMs reach 70-80% of tensor-core peak
# and streaming kernels 80-90% of DRAM bandwidth; the classes below are rougher guesses.
DEFAULT_EFFICIENCY: dict[str, tuple[float, float]] = {
    "matmul": (0.75, 0.85),
    "attention": (0.55, 0.75),
    "norm": (0.30, 0.75),
    "elementwise": (0.30, 0.80),
    "reduction": (0.30, 0.70),
    "data_movement": (0.30, 0.80),
    "gather": (0.30, 0.60),
    "collective": (0.50, 0.80),   # interconnect bytes ("peer" tier) at 80 % of the link; not calibrated
    "program": (0.50, 0.70),
    "other": (0.50, 0.70),
}

# Plausible ranges, to catch unit mistakes (GB/s typed as B/s, TFLOP/s as FLOP/s) in presets and probes.
_RANGES = {
    "gpu": {"bandwidth": (1e10, 1e14), "peak": (1e11, 1e16), "launch": (1e-7, 1e-3)},
    "cpu": {"bandwidth": (1e8, 1e13), "peak": (1e8, 1e16), "launch": (1e-8, 1e-2)},
}


@dataclass(frozen=True)
class Hardware:
    """One target device. See the module docstring for units; `validate()` checks them.

    `interconnect` is the device-to-device link (NVLink, or PCIe when there is none) and `host_link` the
    link to host memory (PCIe); each is (name, bytes/s per direction). Bytes an op moves in memory tier
    "host" (an offloaded KV cache) go at `host_link` speed, tier "peer" at `interconnect` speed.
    `launch_by_class` overrides `launch_overhead_s` for some op classes: calibration fits it, because an
    op's fixed cost depends on how many kernels (and how much dispatch) its implementation takes.
    On a CPU, `sm_count` is the number of threads torch uses, `smem_per_sm` / `max_smem_per_block` the L1
    data cache per core, and `regs_per_sm` is 0 (not meaningful).
    """

    name: str
    arch: str
    kind: str
    peak_flops: Mapping[str, float]
    memory_bytes: float
    memory_bandwidth: float
    l2_bytes: float
    sm_count: int
    smem_per_sm: int
    regs_per_sm: int
    max_smem_per_block: int
    interconnect: tuple[str, float]
    host_link: tuple[str, float]
    launch_overhead_s: float
    efficiency: Mapping[str, tuple[float, float]] = field(default_factory=lambda: dict(DEFAULT_EFFICIENCY))
    launch_by_class: Mapping[str, float] = field(default_factory=dict)
    caches: Mapping[str, float] = field(default_factory=dict)
    notes: str = ""

    def __post_init__(self):
        # Normalize containers so that equality, hashing and JSON round trips are exact.
        object.__setattr__(self, "peak_flops", {k: float(v) for k, v in sorted(self.peak_flops.items())})
        eff = dict(DEFAULT_EFFICIENCY)
        eff.update({k: (float(v[0]), float(v[1])) for k, v in self.efficiency.items()})
        object.__setattr__(self, "efficiency", dict(sorted(eff.items())))
        object.__setattr__(self, "caches", {k: float(v) for k, v in sorted(self.caches.items())})
        object.__setattr__(self, "launch_by_class", {k: float(v) for k, v in sorted(self.launch_by_class.items())})
        object.__setattr__(self, "interconnect", (str(self.interconnect[0]), float(self.interconnect[1])))
        object.__setattr__(self, "host_link", (str(self.host_link[0]), float(self.host_link[1])))

    def __hash__(self) -> int:
        return hash(self.fingerprint())

    # ---- lookups used by the roofline -------------------------------------------------------------------

    def peak(self, dtype: str) -> float:
        """Peak FLOP/s for compute in `dtype` (dtypes without a peak of their own use their nearest kin)."""
        if dtype in self.peak_flops:
            return self.peak_flops[dtype]
        alias = _PEAK_ALIASES.get(dtype, "float32")
        if alias in self.peak_flops:
            return self.peak_flops[alias]
        raise TargetError(f"{self.name} has no peak FLOP/s for {dtype!r} (nor {alias!r}); it lists "
                          f"{sorted(self.peak_flops)}. Add the missing peak to the target description.")

    def tier_bandwidth(self, tier: str) -> float:
        """Bandwidth (B/s) of a memory tier: "dram" (device memory), "host" (host_link), "peer"
        (interconnect); a tier this description does not know moves at DRAM bandwidth."""
        if tier == "host":
            return self.host_link[1]
        if tier == "peer":
            return self.interconnect[1]
        return self.memory_bandwidth

    def eff(self, op_class: str) -> tuple[float, float]:
        """(compute, memory) efficiency factors of an op class (the "other" factors for unknown classes)."""
        return self.efficiency.get(op_class, self.efficiency["other"])

    def launch(self, op_class: str) -> float:
        """Fixed cost (s) of running one op of a class: its own fitted value, else `launch_overhead_s`."""
        return self.launch_by_class.get(op_class, self.launch_overhead_s)

    def with_efficiency(self, efficiency: Mapping[str, tuple[float, float]], launch_overhead_s: float | None = None,
                        launch_by_class: Mapping[str, float] | None = None) -> "Hardware":
        """A copy with some efficiency factors (and optionally the launch overheads) replaced."""
        eff = dict(self.efficiency)
        eff.update(efficiency)
        launch = self.launch_overhead_s if launch_overhead_s is None else launch_overhead_s
        by_class = dict(self.launch_by_class) if launch_by_class is None else dict(launch_by_class)
        return dataclasses.replace(self, efficiency=eff, launch_overhead_s=launch, launch_by_class=by_class)

    # ---- identity and serialization ---------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["peak_flops"] = dict(self.peak_flops)
        d["efficiency"] = {k: list(v) for k, v in self.efficiency.items()}
        d["interconnect"] = list(self.interconnect)
        d["host_link"] = list(self.host_link)
        d["caches"] = dict(self.caches)
        d["launch_by_class"] = dict(self.launch_by_class)
        return d

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> "Hardware":
        names = {f.name for f in dataclasses.fields(Hardware)}
        unknown = set(d) - names
        if unknown:
            raise TargetError(f"hardware description has unknown field(s) {sorted(unknown)}; "
                              f"known fields: {sorted(names)}")
        args = dict(d)
        args["interconnect"] = tuple(args["interconnect"])
        args["host_link"] = tuple(args["host_link"])
        args["efficiency"] = {k: tuple(v) for k, v in args.get("efficiency", {}).items()}
        return Hardware(**args)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def fingerprint(self) -> str:
        """Stable hash of the name and every number (16 hex digits): keys caches, studies and artifacts."""
        payload = {k: v for k, v in self.to_dict().items() if k != "notes"}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    # ---- checks and display -----------------------------------------------------------------------------

    def validate(self) -> "Hardware":
        """Raise TargetError naming every number that is missing, non-positive or outside its plausible
        range for this kind of device (which usually means a unit mistake); return self when all is well."""
        problems = []
        if self.kind not in _RANGES:
            problems.append(f"kind {self.kind!r} is not 'gpu' or 'cpu'")
            ranges = _RANGES["gpu"]
        else:
            ranges = _RANGES[self.kind]
        for dt in PEAK_DTYPES:
            v = self.peak_flops.get(dt)
            lo, hi = ranges["peak"]
            if v is None:
                problems.append(f"no peak for {dt}")
            elif not lo <= v <= hi:
                problems.append(f"peak[{dt}]={v:.3g} FLOP/s outside [{lo:.0e}, {hi:.0e}]")
        lo, hi = ranges["bandwidth"]
        if not lo <= self.memory_bandwidth <= hi:
            problems.append(f"memory_bandwidth={self.memory_bandwidth:.3g} B/s outside [{lo:.0e}, {hi:.0e}]")
        for what, (_, v) in (("interconnect", self.interconnect), ("host_link", self.host_link)):
            if not 1e8 <= v <= self.memory_bandwidth * 1.01:  # a link is never faster than device memory
                problems.append(f"{what}={v:.3g} B/s implausible (expected 1e8 B/s .. memory bandwidth)")
        lo, hi = ranges["launch"]
        for what, v in (("launch_overhead_s", self.launch_overhead_s),
                        *((f"launch_by_class[{c}]", v) for c, v in self.launch_by_class.items())):
            if not lo <= v <= hi:
                problems.append(f"{what}={v:.3g} outside [{lo:.0e}, {hi:.0e}] s")
        positive = {"memory_bytes": self.memory_bytes, "l2_bytes": self.l2_bytes, "sm_count": self.sm_count,
                    "smem_per_sm": self.smem_per_sm, "max_smem_per_block": self.max_smem_per_block}
        if self.kind == "gpu":
            positive["regs_per_sm"] = self.regs_per_sm
            if self.memory_bytes < 1e9:
                problems.append(f"memory_bytes={self.memory_bytes:.3g} is under 1 GB: bytes, not GB?")
        problems += [f"{k}={v} must be positive" for k, v in positive.items() if not v > 0]
        if self.max_smem_per_block > self.smem_per_sm:
            problems.append("max_smem_per_block exceeds smem_per_sm")
        for cls, (ec, em) in self.efficiency.items():
            if cls not in OP_CLASSES:
                problems.append(f"efficiency for unknown op class {cls!r} (known: {OP_CLASSES})")
            if not (0 < ec <= 2 and 0 < em <= 2):
                problems.append(f"efficiency[{cls}]=({ec}, {em}) must lie in (0, 2]")
        if problems:
            raise TargetError(f"hardware {self.name!r} is inconsistent: " + "; ".join(problems))
        return self

    def summary(self) -> str:
        """One line: name, bf16 peak, bandwidth, memory."""
        return (f"{self.name:<14} {self.arch:<7} {self.peak('bfloat16') / 1e12:8.4g} TFLOP/s bf16  "
                f"{self.memory_bandwidth / 1e9:7.0f} GB/s  {self.memory_bytes / 2**30:6.1f} GiB")

    def describe(self) -> str:
        """Every number, one per line (what `lmforge targets show NAME` prints)."""
        lines = [f"{self.name} ({self.kind}, {self.arch}), fingerprint {self.fingerprint()}"]
        lines += [f"  peak {dt:<14} {v / 1e12:10.2f} TFLOP/s" for dt, v in self.peak_flops.items()]
        lines += [f"  memory           {self.memory_bytes / 2**30:10.1f} GiB at {self.memory_bandwidth / 1e9:.0f} GB/s",
                  f"  L2               {self.l2_bytes / 2**20:10.1f} MiB",
                  f"  SMs              {self.sm_count:10d}  smem/SM {self.smem_per_sm // 1024} KiB, "
                  f"max smem/block {self.max_smem_per_block // 1024} KiB, regs/SM {self.regs_per_sm}",
                  f"  interconnect     {self.interconnect[0]} {self.interconnect[1] / 1e9:.0f} GB/s per direction",
                  f"  host link        {self.host_link[0]} {self.host_link[1] / 1e9:.0f} GB/s per direction",
                  f"  launch overhead  {self.launch_overhead_s * 1e6:10.2f} us"]
        lines += [f"  efficiency {c:<14} compute {ec:.2f} memory {em:.2f}"
                  + (f" launch {self.launch_by_class[c] * 1e6:.2f} us" if c in self.launch_by_class else "")
                  for c, (ec, em) in self.efficiency.items()]
        if self.caches:
            lines.append("  caches           " + ", ".join(f"{k} {v / 1024:.0f} KiB" for k, v in self.caches.items()))
        if self.notes:
            lines.append(f"  notes            {self.notes}")
        return "\n".join(lines)
