"""The host CPU as a `Hardware`: a short torch microbenchmark (< 5 s), cached per machine.

What is measured: matmul peak in float32 and (where the CPU runs it) bfloat16, memory copy bandwidth
(a tensor larger than the last-level cache), per-op dispatch overhead (a 1-element add) and the thread
count. Cache sizes and memory capacity come from /sys and /proc (lscpu reads the same files). Dtypes that
are not measured are derived, and `notes` says which: tfloat32 = float32 (CPUs have no TF32);
float16 = bfloat16; float8 = bfloat16 (torch runs fp8 matmuls upcast on CPU); int8 = float32.

The result is cached as JSON under `cache_dir("hw")`, keyed by a machine fingerprint (CPU model, core
count, torch version, torch threads), and reused on the next call; `host_hardware(refresh=True)`
measures again.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from pathlib import Path

import torch

from lmforge.cache import cache_dir
from lmforge.hwmodels.hardware import Hardware


def machine_key() -> str:
    """Fingerprint of the things the probe's numbers depend on (16 hex digits)."""
    parts = [_cpu_model(), str(os.cpu_count()), torch.__version__, str(torch.get_num_threads()), platform.machine()]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def cache_file() -> Path:
    return cache_dir("hw") / f"host-{machine_key()}.json"


def host_hardware(refresh: bool = False) -> Hardware:
    """The host CPU's Hardware: from the cache when this machine was probed before, else probed now."""
    path = cache_file()
    if not refresh and path.exists():
        try:
            return Hardware.from_dict(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError):
            pass  # a corrupt or outdated cache file: probe again and overwrite it
    hw = _probe()
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(hw.to_dict(), indent=1, sort_keys=True))
    tmp.replace(path)  # atomic: a concurrent reader never sees half a file
    return hw


def _probe(budget_s: float = 2.4) -> Hardware:
    """Measure the host (about `budget_s` seconds) and build its Hardware."""
    share = budget_s / 4
    fp32 = _matmul_peak(torch.float32, share)
    bf16 = _matmul_peak(torch.bfloat16, share) if _runs(torch.bfloat16) else None
    bandwidth = _copy_bandwidth(share)
    launch = _dispatch_overhead(share / 4)
    caches = _cache_sizes()
    notes = ["tfloat32 = float32 (no TF32 on CPUs)", "int8 = float32 (not measured)"]
    if bf16 is None:
        bf16 = fp32
        notes.append("bfloat16 = float32 (bf16 matmul unsupported)")
    notes += ["float16 = bfloat16 (not measured)", "float8_e4m3fn = bfloat16 (not measured)",
              f"cpu: {_cpu_model()}", f"torch {torch.__version__}"]
    l1 = int(caches.get("L1d", 32 * 1024))
    return Hardware(
        name="host", arch="host", kind="cpu",
        peak_flops={"float32": fp32, "tfloat32": fp32, "float16": bf16, "bfloat16": bf16,
                    "float8_e4m3fn": bf16, "int8": fp32},
        memory_bytes=float(_memory_total()), memory_bandwidth=bandwidth,
        l2_bytes=float(caches.get("L2", caches.get("L3", 1 << 20))),
        sm_count=torch.get_num_threads(), smem_per_sm=l1, regs_per_sm=0, max_smem_per_block=l1,
        interconnect=("host memory", bandwidth), host_link=("host memory", bandwidth),
        launch_overhead_s=launch, caches=caches, notes="; ".join(notes),
    ).validate()


# ---- microbenchmarks -----------------------------------------------------------------------------------

def _best_time(fn, budget_s: float, min_reps: int = 3) -> float:
    """Fastest of repeated calls after one warm-up (peak = best case), within about budget_s."""
    fn()
    best, start, reps = float("inf"), time.perf_counter(), 0
    while reps < min_reps or time.perf_counter() - start < budget_s:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        reps += 1
        if reps >= 200:
            break
    return best


def _runs(dtype: torch.dtype) -> bool:
    try:
        torch.ones(4, 4, dtype=dtype) @ torch.ones(4, 4, dtype=dtype)
        return True
    except RuntimeError:
        return False


def _matmul_peak(dtype: torch.dtype, budget_s: float) -> float:
    """FLOP/s of a square matmul large enough to reach the BLAS's steady state, small enough to be quick."""
    n = 512
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    t = _best_time(lambda: torch.mm(a, b, out=out), budget_s)
    return 2.0 * n ** 3 / t


def _copy_bandwidth(budget_s: float) -> float:
    """Bytes/s of a large tensor copy (read + write counted), sized to overflow the last-level cache."""
    llc = max(_cache_sizes().values(), default=32 << 20)
    nbytes = int(min(max(64 << 20, 4 * llc), 256 << 20))
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    t = _best_time(lambda: dst.copy_(src), budget_s)
    return 2.0 * nbytes / t


def _dispatch_overhead(budget_s: float) -> float:
    """Seconds per eager torch op on a 1-element tensor: the CPU counterpart of a kernel launch."""
    x, y = torch.ones(1), torch.ones(1)
    out = torch.empty(1)
    reps = 200

    def many():
        for _ in range(reps):
            torch.add(x, y, out=out)

    return _best_time(many, budget_s) / reps


# ---- what the OS says ----------------------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def _parse_size(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * mult


def _cache_sizes() -> dict[str, float]:
    """{"L1d": bytes, "L2": bytes, "L3": bytes} for cpu0 from /sys (empty where /sys does not say)."""
    out: dict[str, float] = {}
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for index in sorted(base.glob("index*")) if base.exists() else []:
        try:
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            size = _parse_size((index / "size").read_text())
        except (OSError, ValueError):
            continue
        if kind == "Instruction":
            continue
        out[f"L{level}d" if level == "1" else f"L{level}"] = float(size)
    return out


def _memory_total() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
