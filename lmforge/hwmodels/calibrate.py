"""Calibration: time op instances on the machine at hand and fit per-op-class efficiency factors.

    cal = calibrate(get_target("host"))          # measures, fits, saves under cache_dir("calibration")
    hw = calibrated(get_target("host"))          # the Hardware with the fitted factors, for predictions

For each op class the fit finds (eff_compute, eff_memory) minimizing the squared error of log time,

    sum_i (log(max(F_i / eff_c, M_i / eff_m) + launch) - log(measured_i))^2 + prior,

where F_i = flops / peak and M_i = bytes / bandwidth are the instance's ideal compute and memory times. The
launch overhead is fitted too (unless `fit_launch=False`): one shared by all classes, then one per class
(an op class's fixed cost depends on how many kernels its implementation launches). A weak prior pulls
each factor toward the hardware's current value, so a factor the data cannot see (eff_compute of a class
whose instances are all memory-bound) stays where it was instead of drifting. The minimization is a grid
search in log space followed by finer grids around the best point: no derivative of the max() needed.

`measure(fn) -> seconds` is passed in: `default_measure(device)` takes the median (GPU, CUDA events, the
kernels' time without CPU dispatch) or the minimum (CPU, perf_counter; see its docstring) of repeats
after warm-up; tests pass a fake that reads `fn.cost`.
"""
from __future__ import annotations

import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from lmforge.cache import cache_dir
from lmforge.errors import TargetError
from lmforge.hwmodels.hardware import Hardware
from lmforge.hwmodels.instances import OpInstance, op_instances
from lmforge.hwmodels.roofline import node_time
from lmforge.ir.cost import Cost

Measure = Callable[[Callable[[], object]], float]
_PRIOR_WEIGHT = 1e-3
_LAUNCH_PRIOR_WEIGHT = 0.1  # per-class launch: moves off the shared value only when the data insist
_EFF_RANGE = (1e-3, 2.0)
_LAUNCH_RANGE = (1e-8, 1e-2)


@dataclass(frozen=True)
class Sample:
    """One timed instance: its cost, the measured time and the predictions before and after the fit."""

    name: str
    op: str
    op_class: str
    flops: float
    bytes: float
    measured_s: float
    predicted_before_s: float
    predicted_after_s: float


@dataclass(frozen=True)
class Calibration:
    """Fitted efficiency factors and launch overhead for one Hardware (keyed by its fingerprint)."""

    hw_name: str
    hw_fingerprint: str
    efficiency: Mapping[str, tuple[float, float]]
    launch_overhead_s: float
    launch_by_class: Mapping[str, float]
    samples: tuple[Sample, ...]
    device: str
    torch_version: str
    created: float

    def apply(self, hw: Hardware) -> Hardware:
        """`hw` with the fitted factors and launch overheads."""
        return hw.with_efficiency(self.efficiency, self.launch_overhead_s, self.launch_by_class)

    def accuracy(self) -> dict:
        """Rank correlation and median error on the calibration samples, before and after the fit."""
        measured = [s.measured_s for s in self.samples]
        return {"before": accuracy(measured, [s.predicted_before_s for s in self.samples]),
                "after": accuracy(measured, [s.predicted_after_s for s in self.samples])}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["efficiency"] = {k: list(v) for k, v in self.efficiency.items()}
        return d

    @staticmethod
    def from_dict(d: Mapping) -> "Calibration":
        args = dict(d)
        args["efficiency"] = {k: tuple(v) for k, v in d["efficiency"].items()}
        args["samples"] = tuple(Sample(**s) for s in d["samples"])
        return Calibration(**args)


# ---- the public entry points ---------------------------------------------------------------------------

def calibrate(hw: Hardware, instances: Sequence[OpInstance] | None = None, measure: Measure | None = None, *,
              device: str | None = None, save: bool = True, fit_launch: bool = True, per_class_launch: bool = True,
              rotate_inputs: bool = True, progress: bool = False) -> Calibration:
    """Time `instances` (default: `op_instances(hw.kind, "fit")`) with `measure` (default: the device's
    timer), fit efficiency factors, and save the result under cache_dir("calibration") unless save=False.

    With `rotate_inputs` each instance cycles through copies of its inputs filling twice the last-level
    cache, so every call reads them from DRAM (as weights are read in a model) instead of from a cache
    that the previous repeat warmed; the roofline's bandwidth is DRAM's."""
    instances = list(instances) if instances is not None else op_instances(hw.kind, "fit")
    device = device or ("cuda" if hw.kind == "gpu" else "cpu")
    if measure is None:
        _check_device(hw, device)
        measure = default_measure(device)
    costs = [inst.cost() for inst in instances]
    rotate = rotate_bytes(hw) if rotate_inputs else 0
    measured = []
    for i, inst in enumerate(instances):
        measured.append(float(measure(inst.runner(device, rotate))))
        if progress:
            print(f"calibrate {hw.name}: {i + 1}/{len(instances)} {inst.name:<48} {measured[-1] * 1e3:9.3f} ms",
                  file=sys.stderr)
        if not (math.isfinite(measured[-1]) and measured[-1] > 0):   # one inf sank every matmul factor to 0.001
            raise TargetError(f"calibrating {hw.name}: instance {inst.name!r} measured {measured[-1]!r} s; a time must "
                              "be finite and positive. Check the measure function (or the device's timer) and "
                              "calibrate again; nothing was saved")
    fit = fit_efficiency(costs, measured, hw, fit_launch=fit_launch, per_class_launch=per_class_launch)
    after = hw.with_efficiency(fit.efficiency, fit.launch_overhead_s, fit.launch_by_class)
    try:
        after.validate()
    except TargetError as e:
        raise TargetError(f"calibrating {hw.name} fitted values this hardware cannot have ({e}); the measurements "
                          "do not look like this device's (a loaded machine, another device, a wrong measure "
                          "function?). Nothing was saved: check them and calibrate again") from None
    _warn_on_bounds(hw, fit)
    samples = tuple(Sample(inst.name, inst.op, c.op_class, c.flops, c.bytes, t, node_time(c, hw).time_s,
                           node_time(c, after).time_s) for inst, c, t in zip(instances, costs, measured))
    cal = Calibration(hw.name, hw.fingerprint(), fit.efficiency, fit.launch_overhead_s, fit.launch_by_class, samples,
                      device, torch.__version__, time.time())
    if save:
        path = _path(hw)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cal.to_dict(), indent=1))
        tmp.replace(path)
    return cal


def _check_device(hw: Hardware, device: str) -> None:
    """Refuse to time one GPU and file the result under another preset (or under a GPU with none here)."""
    if not device.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        raise TargetError(f"calibrating {hw.name} needs that GPU here, but no CUDA device is present; "
                          f"calibrate on a machine with the GPU, or pass `measure` to supply timings")
    from lmforge.hwmodels.presets import PRESETS, target_for_device_name

    here = torch.cuda.get_device_name(device)
    if hw.name in {p.name for p in PRESETS} and target_for_device_name(here).name != hw.name:
        raise TargetError(f"asked to calibrate {hw.name}, but the GPU here is {here!r}; calibrate the target "
                          f"of this GPU (lmforge.hwmodels.presets.target_for_device_name) or run on a {hw.name}")


def load_calibration(hw: Hardware) -> Calibration | None:
    """The saved calibration of exactly this Hardware (same fingerprint), or None."""
    path = _path(hw)
    if not path.exists():
        return None
    try:
        return Calibration.from_dict(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError):
        return None  # unreadable or from an older schema: as if never calibrated


def calibrated(hw: Hardware) -> Hardware:
    """`hw` with its saved calibration applied (unchanged when it was never calibrated)."""
    cal = load_calibration(hw)
    return cal.apply(hw) if cal is not None else hw


def rotate_bytes(hw: Hardware) -> int:
    """Bytes of input copies that overflow the last-level cache: twice the largest cache `hw` lists."""
    return int(2 * max([hw.l2_bytes, *hw.caches.values()]))


def _path(hw: Hardware):
    return cache_dir("calibration") / f"{hw.fingerprint()}.json"


# ---- measuring -----------------------------------------------------------------------------------------

def default_measure(device: str = "cpu", repeats: int = 9, warmup: int = 2, min_sample_s: float = 1e-3,
                    statistic: str | None = None) -> Measure:
    """A `measure(fn) -> seconds`: `statistic` over `repeats` samples after `warmup` calls; each sample runs
    fn enough times to last about `min_sample_s` (so timer resolution and jitter stay small).

    `statistic` is "median" or "min"; by default "median" on a GPU and "min" on the CPU. On a CPU shared
    with other jobs a sample that was descheduled is ms slower, and the fastest sample is the one that
    was not (the advice of Python's timeit); on this project's shared 2-core machine the median of 7
    repeats varied up to 3.4x between runs, the minimum up to 1.7x.
    """
    cuda = device.startswith("cuda")
    statistic = statistic or ("median" if cuda else "min")
    if statistic not in ("median", "min"):
        raise ValueError(f"statistic must be 'median' or 'min', got {statistic!r}")
    reduce = statistics.median if statistic == "median" else min

    def measure(fn) -> float:
        for _ in range(warmup):
            fn()
        first = _elapsed(fn, 1, cuda)
        inner = int(max(1, min(1000, min_sample_s / max(first, 1e-7))))
        return reduce([_elapsed(fn, inner, cuda) / inner for _ in range(repeats)])

    return measure


def _elapsed(fn, reps: int, cuda: bool) -> float:
    """Seconds for `reps` calls of fn.

    On a GPU the stream first sleeps long enough for the CPU to enqueue all the calls, so the events
    time the kernels back to back: the GPU's time alone, without eager PyTorch's per-op CPU dispatch,
    as when lmforge replays the decode step as a CUDA graph.
    """
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        if hasattr(torch.cuda, "_sleep"):
            torch.cuda._sleep(int(min(reps, 2000) * _SLEEP_CYCLES_PER_CALL))
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return time.perf_counter() - t0


_SLEEP_CYCLES_PER_CALL = 100_000  # ~50 us at 2 GHz: more than eager PyTorch needs to enqueue one op


# ---- the fit -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Fit:
    """What `fit_efficiency` found: per-class factors, the shared launch overhead, per-class launches."""

    efficiency: dict[str, tuple[float, float]]
    launch_overhead_s: float
    launch_by_class: dict[str, float]


def fit_efficiency(costs: Sequence[Cost], measured: Sequence[float], hw: Hardware, fit_launch: bool = True,
                   per_class_launch: bool = True) -> Fit:
    """Per-class (eff_compute, eff_memory) and launch overheads that best explain `measured`.

    First one launch overhead shared by all classes is fitted with the factors (coarse grid, then finer
    grids); then, with `per_class_launch`, each class gets its own launch overhead, pulled weakly toward
    the shared one (which stays the value of classes that were not measured).
    """
    if len(costs) != len(measured) or not costs:
        raise ValueError("fit_efficiency needs one measured time per cost, and at least one")
    bad = [(i, t) for i, t in enumerate(measured) if not (math.isfinite(t) and t > 0)]
    if bad:
        raise TargetError(f"fit_efficiency: measured times must be finite and positive; sample(s) "
                          f"{', '.join(f'#{i} = {t!r} s' for i, t in bad[:5])} are not. Measure them again")
    unit = hw.with_efficiency({c.op_class: (1.0, 1.0) for c in costs}, 0.0, {})
    groups: dict[str, list[int]] = {}
    for i, c in enumerate(costs):
        groups.setdefault(c.op_class, []).append(i)
    data = {cls: _ClassData(np.array([node_time(costs[i], unit).compute_s for i in idx]),
                            np.array([node_time(costs[i], unit).memory_s for i in idx]),
                            np.log(np.array([measured[i] for i in idx])), np.log(hw.eff(cls)))
            for cls, idx in groups.items()}
    launches = np.geomspace(*_LAUNCH_RANGE, 61) if fit_launch else np.array([hw.launch_overhead_s])
    grid = np.geomspace(*_EFF_RANGE, 49)
    eff_step, launch_step = grid[1] / grid[0], (launches[1] / launches[0] if fit_launch else 1.0)
    # Shared launch: coarse grid over everything, then alternate refining the classes and the launch.
    total = sum(d.loss(grid, grid, launches).min(axis=(1, 2)) for d in data.values())
    shared = float(launches[int(np.argmin(total))])
    best = {c: d.best(grid, grid, np.array([shared])) for c, d in data.items()}
    for _ in range(3):
        best = {c: _search(d, best[c], (1.0, eff_step, eff_step)) for c, d in data.items()}
        if fit_launch:
            fine = _around(shared, launch_step, 41, bounds=_LAUNCH_RANGE)
            loss = sum(d.loss(np.array([best[c][1]]), np.array([best[c][2]]), fine)[:, 0, 0] for c, d in data.items())
            shared = float(fine[int(np.argmin(loss))])
            best = {c: (shared, ec, em) for c, (_, ec, em) in best.items()}
    by_class: dict[str, float] = {}
    if fit_launch and per_class_launch:
        for c, d in data.items():
            d.launch_prior = np.log(shared)
            best[c] = _search(d, d.best(grid, grid, launches), (launch_step, eff_step, eff_step))
            by_class[c] = best[c][0]
    return Fit({c: (float(ec), float(em)) for c, (_, ec, em) in best.items()}, shared, by_class)


def _search(d: "_ClassData", point: tuple[float, float, float], steps: tuple[float, float, float]):
    """Pattern search in log space from point = (launch, eff_c, eff_m): try a 5-point grid of +-step on each
    axis (step 1 = fixed); move to the best point, or halve the log-steps when the center is best."""
    bounds = (_LAUNCH_RANGE, _EFF_RANGE, _EFF_RANGE)
    for _ in range(200):
        axes = [np.array([p]) if st <= 1.0 else _around(p, st, 5, b) for p, st, b in zip(point, steps, bounds)]
        new = d.best(axes[1], axes[2], axes[0])
        if np.allclose(new, point, rtol=1e-12, atol=0):
            steps = tuple(st ** 0.5 for st in steps)
            if max(steps) < 1.0002:
                break
        point = new
    return point


@dataclass
class _ClassData:
    """One op class's instances: ideal compute and memory seconds (efficiency 1), log measured seconds,
    and the log priors of its factors (and of its launch overhead, once the shared one is known)."""

    compute_s: np.ndarray
    memory_s: np.ndarray
    log_t: np.ndarray
    prior: np.ndarray
    launch_prior: float | None = None

    def loss(self, eff_c: np.ndarray, eff_m: np.ndarray, launches: np.ndarray) -> np.ndarray:
        """Loss [launch, eff_c, eff_m]: squared log-time error plus the weak priors."""
        roof = np.maximum(self.compute_s[None, None, None, :] / eff_c[None, :, None, None],
                          self.memory_s[None, None, None, :] / eff_m[None, None, :, None])
        pred = roof + launches[:, None, None, None]
        err = ((np.log(pred) - self.log_t) ** 2).sum(axis=-1)
        reg = (np.log(eff_c)[:, None] - self.prior[0]) ** 2 + (np.log(eff_m)[None, :] - self.prior[1]) ** 2
        out = err + _PRIOR_WEIGHT * reg[None]
        if self.launch_prior is not None:
            out = out + _LAUNCH_PRIOR_WEIGHT * ((np.log(launches) - self.launch_prior) ** 2)[:, None, None]
        return out

    def best(self, eff_c: np.ndarray, eff_m: np.ndarray, launches: np.ndarray) -> tuple[float, float, float]:
        """(launch, eff_c, eff_m) at the grid point of least loss."""
        loss = self.loss(eff_c, eff_m, launches)
        i, a, b = np.unravel_index(int(np.argmin(loss)), loss.shape)
        return float(launches[i]), float(eff_c[a]), float(eff_m[b])


def _warn_on_bounds(hw: Hardware, fit: "Fit") -> None:
    """Warn about fitted values at the edge of the search grid: the data pushed them there, so the true value
    may lie beyond (or the measurements are off), and predictions for that class deserve suspicion."""
    import warnings

    at_edge = [f"{cls} ({ec:.3g}, {em:.3g})" for cls, (ec, em) in fit.efficiency.items()
               if any(math.isclose(v, b, rel_tol=1e-6) for v in (ec, em) for b in _EFF_RANGE)]
    # a launch at the grid's floor is a real outcome (negligible on a CPU); at its ceiling it is not
    launches = {"shared": fit.launch_overhead_s, **fit.launch_by_class}
    at_edge += [f"launch {cls} {v:.3g} s" for cls, v in launches.items()
                if math.isclose(v, _LAUNCH_RANGE[1], rel_tol=1e-6)]
    if at_edge:
        warnings.warn(f"calibrating {hw.name}: fitted values on the edge of the search range: {', '.join(at_edge)}; "
                      "the measurements may be off for those op classes", stacklevel=3)


def _around(x: float, step: float, n: int = 21, bounds: tuple[float, float] = _EFF_RANGE) -> np.ndarray:
    """n points spaced geometrically over [x / step, x * step], clipped to bounds."""
    return np.clip(x * np.geomspace(1 / step, step, n), *bounds)


# ---- accuracy metrics (numpy only; scipy is not a dependency) ------------------------------------------

def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b (ties in either sequence handled as scipy.stats.kendalltau does)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    i, j = np.triu_indices(len(x), k=1)
    dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
    n_x, n_y = np.count_nonzero(dx), np.count_nonzero(dy)
    if n_x == 0 or n_y == 0:
        return float("nan")
    return float((dx * dy).sum() / np.sqrt(n_x * n_y))


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties getting the mean of the ranks they span."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        tie = x == v
        ranks[tie] = ranks[tie].mean()
    return ranks


def spearman_rho(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho: Pearson correlation of the (tie-averaged) ranks."""
    rx, ry = _ranks(np.asarray(x, float)), _ranks(np.asarray(y, float))
    return float(np.corrcoef(rx, ry)[0, 1])


def median_ape(measured: Sequence[float], predicted: Sequence[float]) -> float:
    """Median of |predicted - measured| / measured."""
    m, p = np.asarray(measured, float), np.asarray(predicted, float)
    return float(np.median(np.abs(p - m) / m))


def accuracy(measured: Sequence[float], predicted: Sequence[float]) -> dict:
    """{"kendall_tau", "spearman_rho", "median_ape"} of predicted against measured times."""
    return {"kendall_tau": kendall_tau(measured, predicted), "spearman_rho": spearman_rho(measured, predicted),
            "median_ape": median_ape(measured, predicted)}


def measure_instances(instances: Iterable[OpInstance], measure: Measure, device: str = "cpu",
                      rotate: int = 0) -> list[float]:
    """Measured seconds of each instance (the evaluation half of the accuracy benchmark); `rotate` as
    `rotate_bytes(hw)` gives, to measure the way `calibrate` does."""
    return [float(measure(inst.runner(device, rotate))) for inst in instances]
