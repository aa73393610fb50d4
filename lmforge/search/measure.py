"""Timing that resists noise: warm up, repeat until the median is stable or a cap is hit, report the
median with its spread. GPU work is timed with CUDA events, CPU work with perf_counter.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Measurement:
    median_s: float
    p10_s: float
    p90_s: float
    repeats: int
    stable: bool  # the median moved less than `rel_tol` over the last window

    @property
    def spread(self) -> float:
        """(p90 - p10) / median: the relative spread of the samples."""
        return (self.p90_s - self.p10_s) / self.median_s if self.median_s > 0 else 0.0


def _timer(device: str) -> Callable[[Callable], float]:
    if device.startswith("cuda") and torch.cuda.is_available():
        def run(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
        return run

    def run_cpu(fn):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    return run_cpu


def measure(fn: Callable[[], object], *, device: str = "cpu", warmup: int = 2, min_repeats: int = 5,
            max_repeats: int = 50, rel_tol: float = 0.02, max_seconds: float = 5.0) -> Measurement:
    """Median run time of `fn()`.

    Repeats until the median of all samples and the median without the last `min_repeats` samples
    differ by less than `rel_tol`, or `max_repeats` / `max_seconds` is reached.
    """
    timer = _timer(device)
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    stable = False
    t_start = time.perf_counter()
    while len(samples) < max_repeats:
        samples.append(timer(fn))
        if len(samples) >= 2 * min_repeats:
            now = statistics.median(samples)
            before = statistics.median(samples[:-min_repeats])
            if abs(now - before) <= rel_tol * now:
                stable = True
                break
        if time.perf_counter() - t_start > max_seconds and len(samples) >= min_repeats:
            break
    q = statistics.quantiles(samples, n=10) if len(samples) >= 2 else [samples[0]] * 9
    return Measurement(statistics.median(samples), q[0], q[-1], len(samples), stable)
