"""`lmforge.tune`: search every knob of the pass pipeline with Optuna, under the cost model of a target.

    result = lmforge.tune(workload, target="h100", objectives=("latency", "quality"), budget=100)
    result.best_config, result.pareto

Objectives (name -> direction):
  latency    minimize  seconds per call on the target (predicted by the cost model for any target;
                       measured where the target is this machine: mode "measure", or "hybrid", which
                       screens every trial with the cost model and measures only the best few, see below)
  throughput maximize  tokens per second (tokens = elements of the first input) on the target
  memory     minimize  peak memory in bytes (weights + KV cache + live activations)
  quality    maximize  top-1 next-token agreement with the untransformed model on the eval inputs
  kl         minimize  mean KL divergence of next-token distributions against the untransformed model
                       (both: the logits are the workload's `logits_index` output, at its `quality_positions`)
  accuracy   maximize  task accuracy from the workload's checker (a fraction in [0, 1]; the checker runs once on the
                       untransformed model before the first trial, so a broken one fails up front)
Constraints ({"fits": True, "quality": 0.99, "accuracy": 0.9, "latency": 1e-3}) go through Optuna's
constraints support: an infeasible trial is kept and marked, never scored with a made-up number. A config
whose passes fail is recorded as a failed trial and the search goes on.

Sizes: predict mode prices the graph at the workload's serving sizes (`extras["serving_dims"]`, e.g. batch 32
with 2048 cached tokens; else the example inputs' sizes; `bindings=` overrides). Measure and hybrid modes time
the first eval input (the example inputs when there are none) and predict at that input's sizes too, so the
measured and predicted numbers of a trial describe the same shapes (`TuneResult.bindings` says which; `bindings=`
that disagree with that input are an error there).
Hybrid mode ranks the `hybrid_top` best predicted configs by their latency measured on this machine, so its
first objective must be latency or throughput (anything else is an error: measuring would not change the
ranking). `best_config` is the measured best among them; a latency or throughput constraint is checked again on
the measured number, and a config that breaks it there is flagged (`TuneResult.measured_violations`) and never
chosen. `TuneResult.table()` lists the measured configs with their measured and predicted latency.
`ranked_trials` is the one ranking: `TuneResult.best_config` and `compile(..., config="best")` (`best_configs`)
both take its first trial.

`layer_groups=G` tunes the per-layer knobs (attention pattern, window, sinks, top-k; weight bits and group size)
separately for G groups of consecutive layers instead of sharing one value across layers. G must be from 1 to the
number of layers: a group with no layer would add knobs that change nothing, so a larger G is an error, not clamped
(a clamped G would make a study that is not the one asked for, under another key).

Measure mode times the graph on `backends` (e.g. ("tvm",) on the host), and their schedule knobs join the
search space, so kernel schedules are tuned together with the passes against real timings. For a GPU target the
timed model and its inputs live on the CUDA device (timed with CUDA events); quality is still computed on the CPU.
Measuring a GPU target on a machine without CUDA is an error.
With "triton" in `backends` and a GPU target, the tile configs of the Triton kernel templates the graph will run
become knobs (`triton.<template>`, conditional on the pass choice that creates the template) in every mode; in
predict mode `lmforge.search.kernel_model` prices them, and a config over the target's resource limits is a
pruned trial.

Samplers: TPE by default (seeded, multivariate, 5 random start-up trials: fewer than Optuna's 10, because
on lmforge's spaces the model-guided trials are what beats random search, and a 50-trial budget should not
spend a fifth of itself at random; `benchmarks/search_efficiency.py` measured the choice, see
docs/benchmarks.md); NSGA-II for several objectives with budget >= 100; GP for one objective with budget
<= 20. `sampler=` ("tpe", "nsga2", "gp", "random") overrides. Conditional knobs (a window size that exists only
for the window pattern) are sampled independently by design, so the samplers' warnings about that are off.
A resumed study seeds its sampler with `seed` plus the number of trials it holds, so a resumed run does not replay
the draws of the first one. A sampled config that a finished trial already evaluated is not evaluated again: the
trial takes that trial's numbers (user attr `duplicate_of`), counts toward the budget like any trial (so a small
space cannot loop), and is left out of the ranking, the Pareto front and hybrid's measured set. The default config
runs first unless a finished trial already evaluated it; `warm_start_from` enqueues another target's best configs
(with a warning when that target has no study for this graph).

Budget: `budget` is the number of trials the study holds when tune stops: finished, pruned and failed trials all
count, those of earlier runs and of other workers on the same storage too; a trial cut off by Ctrl-C (or a killed
process) does not. Several workers stop when the study reaches the budget, each after its running trial, so
with N workers the study may end up to N - 1 trials over it. Ctrl-C returns the result of the finished trials;
before any trial has finished it is an LmforgeError that says to rerun the same command to resume, and so it is
in hybrid mode's measurement phase: until a run has measured all of its top configs a hybrid study has no best
config (`studies.measurement_unfinished`), so partial measurements are never taken for the measured best.

The tuning database is Optuna storage: SQLite under `cache_dir("tuning")` unless `storage` gives another
URL (PostgreSQL for many workers). The study is keyed by the workload's graph signature and the target's
fingerprint, so re-running resumes it and `compile(..., config="best")` finds its best config. The key also
holds the objectives, the mode, the constraints and a hash of the other settings that change what a trial's
numbers mean (sizes, backends, layer groups, the knob space, the fingerprint of the calibrated target when
`lmforge calibrate` has refined it, so a recalibration starts a new study instead of mixing two cost models, and
fingerprints of the model's weights and of its quality data: eval inputs, logits index, quality positions, checker):
the same command resumes its study (`budget` counts the trials of earlier runs too), a changed one, or a retrained
model of the same architecture, starts a new study, and `compile(..., config="best")` reads only studies of the
same weights.
A study named by `study_name` stores those settings and refuses to resume with different ones. `target` may be a
preset name or a `Hardware`; the study stores its name and fingerprint.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import optuna

from lmforge.errors import LmforgeError
from lmforge.ir.graph import Graph
from lmforge.passes.base import Knob, PassManager
from lmforge.search.cost_model import check_bindings
from lmforge.search.space import suggest
from lmforge.search.studies import (COMPLETE, DIRECTIONS, FAIL, PRUNED, WAITING, _feasible, _pareto, _signs,
                                    best_configs, constraint_values, counted_trials, default_storage,
                                    measured_values, measured_violations, model_settings, open_storage,
                                    ranked_trials, run_stamp, settings_suffix, study_key)

@dataclass
class TuneResult:
    study: optuna.Study
    objectives: tuple[str, ...]
    best_config: dict[str, Any]
    best_values: dict[str, float]
    pareto: list[dict]
    study_name: str
    storage: str
    n_complete: int
    n_failed: int  # trials whose config failed to compile or run (not those cut off by Ctrl-C)
    measured: dict[int, float] = field(default_factory=dict)  # trial number -> measured latency (hybrid)
    n_pruned: int = 0
    pruned_reasons: dict[str, int] = field(default_factory=dict)  # why trials were pruned -> how many
    n_infeasible: int = 0  # finished trials that break a constraint
    n_earlier: int = 0  # finished trials that were in the study before this call (a resumed study)
    mode: str = "predict"
    bindings: dict[str, int] = field(default_factory=dict)  # the symbolic sizes latency/memory are priced at
    measured_violations: dict[int, list[str]] = field(default_factory=dict)  # hybrid: constraints broken as measured
    n_interrupted: int = 0  # trials cut off by Ctrl-C (not counted as failed, nor by the budget)
    n_duplicates: int = 0  # finished trials that sampled an already evaluated config and took its numbers
    best_trial: int | None = None  # the number of the trial best_config is from

    @property
    def best_objectives(self) -> dict[str, Any]:
        """The best trial's predicted and measured numbers, as an artifact records them
        (`lmforge.export(compiled, path, objectives=result.best_objectives)`; see studies.trial_objectives)."""
        from lmforge.search.studies import trial_objectives

        trial = next(t for t in self.study.get_trials(deepcopy=False) if t.number == self.best_trial)
        return trial_objectives(self.study, trial)

    def summary(self) -> str:
        """One paragraph: the study, its trials by outcome (and why trials were pruned), whether it resumed."""
        parts = [f"{self.n_complete} trials finished"]
        notes = [f"{self.n_infeasible} infeasible"] if self.n_infeasible else []
        notes += [f"{self.n_duplicates} repeated an evaluated config"] if self.n_duplicates else []
        if notes:
            parts[0] += f" ({', '.join(notes)})"
        parts += [f"{self.n_pruned} pruned", f"{self.n_failed} failed"]
        parts += [f"{self.n_interrupted} interrupted"] if self.n_interrupted else []
        lines = [f"study {self.study_name} in {self.storage}: " + ", ".join(parts)]
        if self.n_earlier:
            lines.append(f"  resumed a study with {self.n_earlier} finished trials from earlier runs (the budget "
                         "counts them); ran " + f"{max(0, self.n_complete - self.n_earlier)} new")
        for reason, n in self.pruned_reasons.items():
            lines.append(f"  pruned {n}x: {reason}")
        if self.measured_violations:
            lines.append(f"  {len(self.measured_violations)} of the {len(self.measured)} measured configs break a "
                         "constraint as measured on this machine and were not chosen")
        return "\n".join(lines)

    def table(self, defaults: Mapping[str, Any] | None = None) -> str:
        """The Pareto front, one row per distinct objective vector; configs show the knobs off their default.

        Hybrid mode: the configs measured on this machine instead, best (lowest measured latency) first, with
        their measured and predicted latency (same sizes), the other objectives' values, and the constraints a
        config breaks as measured (such a config is never the best)."""
        defaults = defaults if defaults is not None else self.study.user_attrs.get("knob_defaults", {})
        if self.measured:
            return self._measured_table(defaults)
        rows = [f"{'trial':>5}  " + "  ".join(f"{o:>12}" for o in self.objectives) + "  config (non-default knobs)"]
        seen = set()
        for p in self.pareto:
            key = tuple(round(p["values"][o], 12) for o in self.objectives)
            if key in seen:
                continue
            seen.add(key)
            vals = "  ".join(f"{p['values'][o]:>12.4g}" for o in self.objectives)
            changed = {k: v for k, v in p["config"].items() if defaults.get(k, object()) != v}
            rows.append(f"{p['trial']:>5}  {vals}  {changed}")
        return "\n".join(rows)

    def _measured_table(self, defaults: Mapping[str, Any]) -> str:
        others = [o for o in self.objectives if o not in ("latency", "throughput")]
        rows = [f"{'trial':>5}  {'measured latency':>16}  {'predicted latency':>17}  "
                + "".join(f"{o:>12}  " for o in others) + "config (non-default knobs)"]
        trials = {t.number: t for t in self.study.trials}
        for number in sorted(self.measured, key=lambda n: (n in self.measured_violations, self.measured[n], n)):
            t = trials[number]
            values = t.user_attrs["values"]
            changed = {k: v for k, v in t.user_attrs["config"].items() if defaults.get(k, object()) != v}
            broken = self.measured_violations.get(number)
            rows.append(f"{number:>5}  {self.measured[number]:>16.4g}  {values['predicted_latency']:>17.4g}  "
                        + "".join(f"{values[o]:>12.4g}  " for o in others) + str(changed)
                        + (f"  BREAKS {', '.join(broken)} as measured" if broken else ""))
        return "\n".join(rows)


@dataclass
class TuneContext:
    """What every trial needs: the base graph, the pipeline, the target and the evaluation data."""

    graph: Graph
    pipeline: Sequence
    hw: Any
    eval_inputs: list[tuple]
    checker: Callable | None
    bindings: dict[str, int]
    mode: str
    reference: Any = None  # CompiledModel of the untransformed graph (for quality)
    backends: tuple[str, ...] = ()  # kernel backends whose real timings "measure" mode takes (e.g. "tvm")
    device: str = "cpu"  # where measure / hybrid time the model: "cuda" for a GPU target (see `measure_device`)
    logits_index: int = 0  # which tensor output quality compares as logits (Workload.logits_index)
    quality_positions: slice | None = None  # the sequence positions quality counts (Workload.quality_positions)

    @property
    def knobs(self) -> list[Knob]:
        """The pipeline's knobs for this graph, plus the schedule knobs of the measured kernel backends."""
        knobs = PassManager(self.pipeline).knobs(self.graph)
        if self.mode != "predict" and "tvm" in self.backends:
            from lmforge.backends.tvm import TVMBackend

            knobs += TVMBackend.knobs()
        if self.kernel_knobs:
            from lmforge.search.kernel_model import kernel_knobs

            knobs += kernel_knobs(self.graph, self.pipeline, self.hw, self.bindings, knobs)
        return knobs

    @property
    def kernel_knobs(self) -> bool:
        """Triton tile configs are knobs (and priced by the kernel model) when triton is a backend of a GPU target."""
        return "triton" in self.backends and getattr(self.hw, "kind", "") == "gpu"

    def compiled(self, graph: Graph, config: Mapping[str, Any], device: str = "cpu"):
        """The graph on the chosen backends, each configured with its own knob values (torch takes the rest), with
        its weights on `device`."""
        from lmforge.backends import BACKENDS
        from lmforge.compiler import CompiledModel

        instances = []
        for name in (*self.backends, "torch"):
            cls = BACKENDS[name]()
            own = {k: v for k, v in config.items() if k.startswith(f"{name}.")}
            if name == "triton":
                from lmforge.search.kernel_model import backend_config

                own = backend_config(graph, config)
            instances.append(cls(own) if name in ("tvm", "triton") else cls())
        if graph.get_meta("tensor_parallel"):  # shard.tp > 1: the ranks run as threads of this process
            from lmforge.backends.collectives import TensorParallelModel

            return TensorParallelModel(graph, instances, device=device)
        return CompiledModel(graph, instances, device=device)

    def timing_inputs(self) -> tuple:
        """The first eval input, on the timing device (what measure and hybrid modes time)."""
        import torch

        args = self.eval_inputs[0]
        if self.device == "cpu":
            return args
        return tuple(x.to(self.device) if isinstance(x, torch.Tensor) else x for x in args)


def evaluate_config(ctx: TuneContext, config: Mapping[str, Any], objectives: Sequence[str],
                    measure_latency: bool = False) -> dict[str, float]:
    """Apply a config and compute the named objectives / constrained quantities (plus latency, memory, fits,
    eFLOPs, which the cost model gives at once)."""
    from lmforge.quality import compare
    from lmforge.search.cost_model import graph_cost

    graph = PassManager(ctx.pipeline).run(ctx.graph, config)
    kernels = None
    if ctx.kernel_knobs:  # Triton tile configs priced by lmforge.search.kernel_model (infeasible ones raise)
        from lmforge.search.kernel_model import chosen_kernels

        kernels = chosen_kernels(config)
    cost = graph_cost(graph, ctx.hw, ctx.bindings, kernels=kernels)
    values: dict[str, float] = {"predicted_latency": cost.time_s, "memory": cost.peak_memory_bytes,
                                "fits": float(cost.fits), "eflops": cost.eflops}
    values["latency"] = cost.time_s
    compiled = None
    if any(o in objectives for o in ("quality", "kl", "accuracy")) or (measure_latency and ctx.device == "cpu"):
        compiled = ctx.compiled(graph, config)  # quality is compared on the CPU, as in predict mode
    if measure_latency:
        from lmforge.search import measure as timing

        timed = compiled if ctx.device == "cpu" else ctx.compiled(graph, config, device=ctx.device)
        args = ctx.timing_inputs()
        values["latency"] = values["measured_latency"] = timing.measure(lambda: timed(*args),
                                                                        device=ctx.device).median_s
    tokens = ctx.graph.inputs[0].type.numel(ctx.bindings) if ctx.graph.inputs else 1
    values["throughput"] = tokens / values["latency"]
    if "quality" in objectives or "kl" in objectives:
        report = compare(ctx.reference, compiled, ctx.eval_inputs, logits_index=ctx.logits_index,
                         positions=ctx.quality_positions)
        values["quality"], values["kl"] = report.top1_agreement, report.kl
    if "accuracy" in objectives:
        if ctx.checker is None:
            raise LmforgeError("objective 'accuracy' needs a workload with a checker")
        values["accuracy"] = checker_accuracy(ctx.checker, compiled)
    return values


def checker_accuracy(checker: Callable, model) -> float:
    """`checker(model)` (Workload.checker) as a float, or an LmforgeError when it is not a finite fraction in [0, 1]:
    a percentage (42.0) would pass every accuracy constraint, and NaN would fail every one without a word."""
    import math

    value = checker(model)
    try:
        accuracy = float(value)
    except (TypeError, ValueError, RuntimeError):   # RuntimeError: a tensor of several values
        raise LmforgeError(f"Workload.checker returned {value!r:.80}, not a number: it must return the accuracy as a "
                           "fraction in [0, 1]") from None
    if not math.isfinite(accuracy) or not 0.0 <= accuracy <= 1.0:
        raise LmforgeError(f"Workload.checker returned {accuracy!r}: it must return the accuracy as a finite fraction "
                           "in [0, 1] (return a fraction, not a percent: 0.42 for 42 %)")
    return accuracy


TPE_STARTUP = 5   # random trials before TPE models the results (the module docstring says why 5)


def make_sampler(name: str | None, n_objectives: int, budget: int, seed: int):
    """Constraints reach the samplers through `trial.set_constraint` (Optuna >= 5)."""
    if name is None:
        name = ("nsga2" if n_objectives > 1 and budget >= 100
                else "gp" if n_objectives == 1 and budget <= 20 else "tpe")
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True,   # (Optuna 5's TPE does not warn)
                                          n_startup_trials=min(TPE_STARTUP, max(2, budget // 4)))
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if name == "gp":
        # conditional knobs are sampled independently by design: no warning per trial about it
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=min(5, max(2, budget // 4)),
                                         warn_independent_sampling=False)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise LmforgeError(f"unknown sampler {name!r}; use tpe, nsga2, gp or random")


def check_budget(budget, name: str = "budget") -> None:
    """An LmforgeError for a budget that is not a number of trials >= 1 (`name`: how the caller spells it)."""
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise LmforgeError(f"{name} must be a number of trials >= 1, not {budget!r}")


def check_constraints(constraints: Mapping[str, Any], objectives: Sequence[str], checker=None) -> None:
    """An LmforgeError for an unknown constraint, a bound out of range, or accuracy without a checker."""
    for name, bound in constraints.items():
        if name != "fits" and name not in DIRECTIONS:
            raise LmforgeError(f"unknown constraint {name!r}; constraints are 'fits' or an objective name "
                               f"({', '.join(sorted(DIRECTIONS))})")
        if name == "fits":
            continue
        try:
            value = float(bound)
        except (TypeError, ValueError):
            raise LmforgeError(f"constraint {name!r} needs a number, not {bound!r}") from None
        if name in ("quality", "accuracy") and not 0.0 <= value <= 1.0:
            raise LmforgeError(f"constraint {name} >= {value:g} is out of range: {name} is a fraction in [0, 1] "
                               f"(e.g. 0.99)")
        if name in ("latency", "memory", "kl", "throughput") and value < 0:
            raise LmforgeError(f"constraint {name} bound {value:g} is negative; give a bound >= 0")
    if checker is None and ("accuracy" in objectives or "accuracy" in constraints):
        raise LmforgeError("objective/constraint 'accuracy' needs a workload with a checker (Workload.checker, a "
                           "function `checker(model) -> accuracy in [0, 1]`); this workload has none: use "
                           "'quality' (top-1 agreement with the untransformed model) or 'kl' instead")


def check_serving_dims(graph: Graph, dims) -> None:
    """An LmforgeError naming Workload.extras["serving_dims"] when it is not a dict of this graph's symbolic sizes
    to whole numbers >= 0, before any trial (every trial would fail on it, and the error would not say where)."""
    import numbers

    where = 'Workload.extras["serving_dims"]'
    if dims is None:
        return
    if not isinstance(dims, Mapping):
        raise LmforgeError(f"{where} must be a dict of symbolic sizes, e.g. {{'batch': 32}}, not "
                           f"{type(dims).__name__} {dims!r:.60}")
    check_bindings(graph, dims, where)
    bad = {k: v for k, v in dims.items() if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0}
    if bad:
        raise LmforgeError(f"{where} {bad}: each size must be a whole number >= 0, e.g. {{'batch': 32}}")


def check_checker(checker: Callable, reference) -> None:
    """Run the workload's checker once on the untransformed model (`reference`) before any trial: an LmforgeError
    naming Workload.checker when it raises or returns no fraction in [0, 1] (`checker_accuracy`), where otherwise
    every trial would fail on it and only the end of the budget would say so."""
    try:
        checker_accuracy(checker, reference)
    except LmforgeError as e:
        raise LmforgeError(f"{e} (on the untransformed model, before any trial)") from None
    except Exception as e:
        raise LmforgeError(f"Workload.checker failed on the untransformed model, before any trial: "
                           f"{type(e).__name__}: {e}") from e


def input_bindings(graph: Graph, inputs: Sequence) -> dict[str, int]:
    """The values of the graph's symbolic dims in a tuple of actual inputs (dims that are plain symbols)."""
    import torch

    tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
    out: dict[str, int] = {}
    for v, x in zip(graph.inputs, tensors):
        for d, n in zip(v.type.shape, x.shape):
            if isinstance(d, str) and d.isidentifier():
                out.setdefault(d, int(n))
    return out


def prepare(model_or_workload, example_inputs=None, *, dynamic=None, eval_inputs=None, checker=None,
            name=None, pipeline=None):
    """Capture the workload once and run the canonical (knob-free) passes: the graph every trial starts from."""
    from lmforge.ir.frontends.torch_export import capture
    from lmforge.passes import PassManager, canonical_pipeline, tunable_pipeline
    from lmforge.workload import Workload

    if isinstance(model_or_workload, Workload):
        wl = model_or_workload
    else:
        if example_inputs is None and not isinstance(model_or_workload, Graph):
            raise LmforgeError("tune needs example_inputs (or a lmforge.Workload that carries them)")
        wl = Workload(model=model_or_workload, example_inputs=tuple(example_inputs or ()), dynamic=dynamic,
                      eval_inputs=eval_inputs, checker=checker, name=name or "workload")
    graph = wl.model if isinstance(wl.model, Graph) else capture(wl.model, wl.example_inputs, dynamic=wl.dynamic)
    evals = list(wl.eval_inputs or [wl.example_inputs])
    check_eval_inputs(graph, evals)
    graph = PassManager(canonical_pipeline()).run(graph)
    # the first eval inputs calibrate the passes that need activations (AWQ's scales, FlexPrefill's measured
    # density): without them those knobs would do nothing or claim no saving
    return wl, graph, list(pipeline if pipeline is not None else tunable_pipeline(calibration=evals[:2])), evals


def check_eval_inputs(graph: Graph, evals: Sequence[tuple]) -> None:
    """An LmforgeError naming the first eval input that does not fit the captured graph (count, dtype, rank, a
    static size), before any trial runs: otherwise every trial would fail on it and only the end of the budget
    would say so."""
    from lmforge.compiler import input_leaves

    for i, args in enumerate(evals):
        try:
            input_leaves(graph, args, {})
        except LmforgeError as e:
            first = graph.inputs[0].name if graph.inputs else "x"
            raise LmforgeError(f"eval input {i} does not fit the captured model: {e}. Eval inputs must have the "
                               f"example inputs' count and dtypes, and sizes that differ from theirs need `dynamic` "
                               f"(Workload.dynamic or tune(dynamic=...), e.g. {{{first!r}: {{0: 'batch'}}}})") from None


def tune(model_or_workload, example_inputs=None, *, target: str = "h100", objectives: Sequence[str] = ("latency",),
         constraints: Mapping[str, Any] | None = None, budget: int = 50, mode: str = "predict",
         storage: str | None = None, study_name: str | None = None, sampler: str | None = None, seed: int = 0,
         warm_start_from: str | None = None, bindings: Mapping[str, int] | None = None, hybrid_top: int = 5,
         pipeline=None, progress: bool = True, dynamic=None, backends: Sequence[str] = (),
         layer_groups: int = 1) -> TuneResult:
    """Tune the knobs of `model_or_workload` for `target`. See the module docstring.

    model_or_workload: a `Workload`, or a torch module / function over tensors with `example_inputs` (a tuple)
              and `dynamic` ({input name: {dim: symbol}}, as for `lmforge.capture`).
    target:   a preset name ("h100", "host", ...) or a `lmforge.hwmodels.Hardware`.
    objectives, constraints: see the module docstring (e.g. ("latency", "quality"), {"quality": 0.99}).
    budget:   the number of trials the study holds when tuning stops, earlier runs' and other workers' included
              (finished, pruned and failed trials count; those cut off by Ctrl-C do not).
    mode:     "predict" (the target's cost model), "measure" or "hybrid" (timed on this machine / its GPU).
    storage, study_name: the Optuna storage URL (default: SQLite in the cache) and a study name (default: the
              key described in the module docstring).
    sampler, seed: "tpe", "nsga2", "gp" or "random" (default: chosen as the module docstring says), its seed.
    warm_start_from: a target whose studies of this graph seed the first trials.
    hybrid_top: how many predicted-best configs hybrid mode measures.
    bindings: symbolic sizes to price at (keys must be symbols of the captured graph).
    pipeline: the pass pipeline whose knobs are searched (default: `lmforge.passes.tunable_pipeline`).
    progress: show a progress bar. backends: kernel backends measure mode times ("tvm", "triton").
    layer_groups: knobs per group of layers (1: one value for the whole model)."""
    from lmforge.compiler import CompiledModel
    from lmforge.hwmodels import calibrated, get_target
    from lmforge.workload import Workload

    objectives = tuple(objectives)
    _check_arguments(objectives, mode, budget, hybrid_top, layer_groups, sampler)
    constraints = dict(constraints or {})
    # names, ranges and the checker that accuracy needs, before any slow work (tune() itself takes no checker)
    check_constraints(constraints, objectives,
                      model_or_workload.checker if isinstance(model_or_workload, Workload) else None)
    storage_url = storage if isinstance(storage, str) else (storage or default_storage())
    store = open_storage(storage)
    base_hw = get_target(target)  # studies are keyed by the target itself, calibrated or not
    hw = calibrated(base_hw)  # a saved calibration (`lmforge calibrate`) refines the preset's efficiencies
    device = measure_device(mode, hw, target)
    wl, graph, pipe, evals = prepare(model_or_workload, example_inputs, dynamic=dynamic, pipeline=pipeline)
    check_bindings(graph, bindings)
    check_serving_dims(graph, (wl.extras or {}).get("serving_dims"))
    env = _sizes(graph, wl, evals, mode, bindings)
    ctx = TuneContext(graph, pipe, hw, evals, wl.checker, env, mode, CompiledModel(graph), tuple(backends), device,
                      wl.logits_index, wl.quality_positions)
    if {"quality", "kl"} & {*objectives, *constraints}:  # a wrong logits_index or positions fails here, not per trial
        from lmforge.quality import compare

        compare(ctx.reference, ctx.reference, evals[:1], logits_index=ctx.logits_index,
                positions=ctx.quality_positions)
    if "accuracy" in {*objectives, *constraints}:  # a broken checker fails here, not in every trial
        check_checker(wl.checker, ctx.reference)
    knobs = _space(ctx, layer_groups)
    # what a trial's numbers depend on besides graph, target, objectives and mode: a study holds one setting of each
    settings = {"constraints": {k: (bool(v) if k == "fits" else float(v)) for k, v in constraints.items()},
                "bindings": dict(sorted(env.items())), "backends": list(backends), "layer_groups": layer_groups,
                "knobs": sorted(k.name for k in knobs),
                **model_settings(graph, evals, logits_index=wl.logits_index, quality_positions=wl.quality_positions,
                                 checker=wl.checker)}
    if hw.fingerprint() != base_hw.fingerprint():  # calibrated: trials are priced by another cost model
        settings["calibration"] = hw.fingerprint()
    name = study_name or study_key(wl.name, graph, base_hw, objectives, mode)
    tp_knobs = [k for p in pipe for k in p.knobs if k.name == "shard.tp"]
    if tp_knobs and not study_name:  # a multi-GPU search is its own study (its space has the shard.tp knob)
        name += f":tp<={max(tp_knobs[0].choices)}"
    if not study_name:
        name += settings_suffix(constraints, settings)
    study = _open_study(store, name, objectives, mode, settings, {
        "graph_signature": graph.signature(), "target": target if isinstance(target, str) else base_hw.name,
        "target_fingerprint": base_hw.fingerprint(), "knob_defaults": {k.name: k.default for k in knobs}})
    # a resumed study's sampler must not replay the draws of the first run: seed it past the trials it holds
    study.sampler = make_sampler(sampler, len(objectives), budget, seed + len(study.trials))
    _enqueue_start_points(study, knobs, graph, warm_start_from, store)
    n_earlier = len(study.get_trials(deepcopy=False, states=(COMPLETE,)))
    _run(study, ctx, knobs, objectives, constraints, budget, progress)
    measured = _measure_top(ctx, study, hybrid_top, constraints) if mode == "hybrid" else {}
    result = _result(study, objectives, name, storage_url, measured, constraints)
    result.n_earlier, result.mode, result.bindings = n_earlier, mode, dict(env)
    return result


def _check_arguments(objectives, mode, budget, hybrid_top, layer_groups, sampler) -> None:
    """tune's arguments that need no workload: an LmforgeError for the first one that is wrong."""
    unknown = [o for o in objectives if o not in DIRECTIONS]
    if unknown:
        raise LmforgeError(f"unknown objective(s) {unknown}; choose from {sorted(DIRECTIONS)}")
    if not objectives:
        raise LmforgeError(f"tune needs at least one objective; choose from {sorted(DIRECTIONS)}")
    if mode not in ("predict", "measure", "hybrid"):
        raise LmforgeError(f"mode must be predict, measure or hybrid, not {mode!r}")
    check_budget(budget)
    make_sampler(sampler, len(objectives), budget, 0)  # an unknown sampler name fails before a study is created
    if mode == "hybrid" and hybrid_top < 1:
        raise LmforgeError(f"hybrid_top must be >= 1 (how many predicted-best configs to measure), not {hybrid_top}")
    if mode == "hybrid" and objectives[0] not in ("latency", "throughput"):
        raise LmforgeError(f"mode='hybrid' re-ranks the best predicted configs by their latency measured on this "
                           f"machine, so its first objective must be 'latency' or 'throughput', not "
                           f"{objectives[0]!r}: put latency first (objectives=('latency', {objectives[0]!r})), or "
                           f"use mode='predict' to rank by {objectives[0]} alone")
    if isinstance(layer_groups, bool) or not isinstance(layer_groups, int) or layer_groups < 1:
        raise LmforgeError(f"layer_groups must be a number of groups of layers >= 1 (1: one value of each per-layer "
                           f"knob for all layers), not {layer_groups!r}")


def measure_device(mode: str, hw, target) -> str:
    """Where measure and hybrid modes time trials: "cpu" for a CPU target (the host), "cuda" for a GPU target on a
    machine with a CUDA GPU; an LmforgeError for a GPU target on a machine without one (its timings would be the
    CPU's). Predict mode times nothing: "cpu"."""
    if mode == "predict" or getattr(hw, "kind", "") == "cpu" or target == "host":
        return "cpu"
    import torch

    name = target if isinstance(target, str) else getattr(hw, "name", target)
    if not torch.cuda.is_available():
        raise LmforgeError(f"mode {mode!r} measures on the target, but {name} is not this machine (a GPU target, and "
                           "no CUDA GPU is here): use mode='predict' (cost model), or target='host'")
    import warnings

    from lmforge.hwmodels.presets import target_for_device_name

    try:
        here = torch.cuda.get_device_name(0)
    except (RuntimeError, AssertionError):  # a CUDA that cannot name its device: no warning
        return "cuda"
    try:
        same = target_for_device_name(here).name == hw.name
    except LmforgeError:  # a GPU that no preset describes
        same = False
    if not same:
        warnings.warn(f"mode {mode!r} times trials on this machine's GPU {here!r}, which is not the target {name}: "
                      "the measured latencies are this GPU's", stacklevel=3)
    return "cuda"


def _sizes(graph: Graph, wl, evals, mode: str, bindings) -> dict[str, int]:
    """The symbolic sizes every trial is priced at (module docstring, "Sizes")."""
    env = dict(graph.get_meta("example_dims") or ())
    if mode == "predict":
        env.update(dict(wl.extras.get("serving_dims", {})) if wl.extras else {})
        env.update(bindings or {})
        return env
    # predict at the sizes that are measured (the first eval input), so both numbers describe one shape
    env.update(input_bindings(graph, evals[0]))
    clash = {k: v for k, v in (bindings or {}).items() if env.get(k, v) != v}
    if clash:
        raise LmforgeError(f"mode {mode!r} measures the first eval input, whose sizes are "
                           f"{ {k: env[k] for k in clash} }, but bindings ask for {clash}: drop `bindings` or use "
                           "mode='predict' to price other sizes")
    env.update(bindings or {})
    return env


def layer_count(graph: Graph) -> int:
    """How many layers the per-layer knobs address: attention nodes (the sparsity pass's layers) or numbered weights
    of linears (the quantization pass's), whichever is more."""
    from lmforge.passes.quant import layer_of

    attention = sum(n.op == "attention" for n in graph.nodes)
    numbered = [layer_of(n.inputs[1].name) for n in graph.nodes if n.op == "linear" and len(n.inputs) > 1]
    numbered = [i for i in numbered if i is not None]
    return max(attention, max(numbered) + 1 if numbered else 0)


def _space(ctx: TuneContext, layer_groups: int) -> list[Knob]:
    """The knobs of the study, with one copy of each per-layer knob per group of consecutive layers."""
    from lmforge.search.space import expand_per_group

    knobs = ctx.knobs
    per_layer = [k.name for k in knobs if k.per_layer]
    if layer_groups == 1 or not per_layer:
        return knobs
    n = layer_count(ctx.graph)
    if layer_groups > n:  # a group with no layer: its knobs would change nothing but still be searched
        raise LmforgeError(f"layer_groups={layer_groups}, but this graph has {n} layer{'s' * (n != 1)} for the "
                           f"per-layer knobs ({', '.join(per_layer)}): use layer_groups from 1 to {max(n, 1)}")
    return expand_per_group(knobs, layer_groups, per_layer)


def _open_study(store, name: str, objectives, mode: str, settings: Mapping[str, Any],
                attrs: Mapping[str, Any]) -> optuna.Study:
    """Create or resume the study (refusing one run under other settings) and store what readers need."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # tune reports a resumed study itself (TuneResult.summary)
    study = optuna.create_study(storage=store, study_name=name, load_if_exists=True,
                                directions=[DIRECTIONS[o] for o in objectives])
    _check_same_settings(study, objectives, mode, settings)
    attrs = {"settings": settings, "mode": mode, "objectives": list(objectives), **attrs, "last_run": run_stamp()}
    for key, value in attrs.items():  # "last_run": compile(config="best") takes the most recently run study
        study.set_user_attr(key, value)
    return study


def _config_key(config) -> str:
    """A config as comparable text (a stored config is JSON: its tuples are lists)."""
    import json

    return json.dumps(config, sort_keys=True, default=str)


def _enqueue_start_points(study, knobs: Sequence[Knob], graph: Graph, warm_start_from, store) -> None:
    """Enqueue the default config, then the best configs of `warm_start_from`'s newest study of this graph, each
    unless a finished trial already evaluated it (a trial cut off by Ctrl-C, or failed, does not count) or it is
    already waiting. Each goes in as the params a trial sampling it would hold (`space.active_params`), so a
    warm-start config equal to the default is not run twice."""
    import warnings

    from lmforge.search.space import active_params

    default = {k.name: k.default for k in knobs}
    starts = [default]
    if warm_start_from:
        # knob values carry over between checkpoints of one architecture: studies of other weights count here
        found = best_configs(graph, warm_start_from, store, limit=3, same_weights=False)
        if not found:
            warnings.warn(f"warm_start_from={warm_start_from!r}: the storage has no tuning study of this graph for "
                          "that target with a feasible trial, so no config was enqueued from it", stacklevel=3)
        starts += [{**default, **{k: v for k, v in cfg.items() if k in default}} for cfg in found]
    evaluated = {_config_key(t.user_attrs.get("config")) for t in study.get_trials(deepcopy=False, states=(COMPLETE,))}
    waiting = [t.system_attrs.get("fixed_params") for t in study.get_trials(deepcopy=False, states=(WAITING,))]
    for cfg in starts:
        params = active_params(cfg, knobs)
        if _config_key({k.name: params.get(k.name, k.default) for k in knobs}) in evaluated or params in waiting:
            continue
        study.enqueue_trial(params)
        waiting.append(params)


def _run(study, ctx: TuneContext, knobs, objectives, constraints, budget: int, progress: bool) -> None:
    """Run trials until the study holds `budget` counted trials (`counted_trials`, every worker's). Ctrl-C ends the
    run: the trial it cut off is recorded as interrupted, and with no finished trial yet it is an LmforgeError."""
    remaining = max(0, budget - counted_trials(study))
    if not remaining:
        return
    interrupted: list[int] = []

    def objective(trial: optuna.Trial):
        try:
            return _trial(trial, ctx, knobs, objectives, constraints)
        except KeyboardInterrupt:
            interrupted.append(trial.number)  # Optuna marks it FAIL; it is not a failed config
            raise

    bars = [_progress(remaining, objectives)] if progress else []
    quiet = _QuietInterrupts(interrupted)
    optuna_log = logging.getLogger("optuna.study._optimize")   # where Optuna logs a failed trial
    optuna_log.addFilter(quiet)
    try:
        study.optimize(objective, n_trials=remaining, catch=(LmforgeError, RuntimeError, ValueError),
                       callbacks=[_StopAtBudget(budget), *bars], gc_after_trial=False)
    except KeyboardInterrupt:  # every finished trial is already in the storage; the result covers them
        if interrupted:
            done = list(study.user_attrs.get("interrupted_trials", []))
            study.set_user_attr("interrupted_trials", sorted(set(done + interrupted)))
        if not study.get_trials(deepcopy=False, states=(COMPLETE,)):
            raise LmforgeError(f"tuning was interrupted before any trial finished, so there is no result yet: rerun "
                               f"the same command to resume study {study.study_name!r}") from None
    finally:
        optuna_log.removeFilter(quiet)
        for bar in bars:
            bar.close()


class _QuietInterrupts(logging.Filter):
    """Drops Optuna's warnings about the trial Ctrl-C cut off (its KeyboardInterrupt traceback, 10 to 50 lines,
    and "Trial N failed with value None"): `_run` ends the run and the result or error says what happened. The
    warnings of configs that failed stay. interrupted: the numbers of the trials cut off (filled by `_run`)."""

    def __init__(self, interrupted: Sequence[int]):
        super().__init__()
        self.interrupted = interrupted

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[0] is not None and issubclass(record.exc_info[0], KeyboardInterrupt):
            return False
        return not any(record.getMessage().startswith(f"Trial {n} failed") for n in self.interrupted)


def _trial(trial: optuna.Trial, ctx: TuneContext, knobs, objectives, constraints):
    """One trial: sample a config, evaluate it (or take the numbers of the finished trial that evaluated the same
    config), record its values and constraints, return its objectives."""
    from lmforge.passes.shard import ShardError
    from lmforge.search.kernel_model import KernelConfigInfeasible

    config = suggest(trial, knobs)
    trial.set_user_attr("config", config)
    earlier = _evaluated(trial.study, config)
    if earlier is not None:  # same config, same study settings: the same numbers, without evaluating it again
        trial.set_user_attr("duplicate_of", earlier.number)
        values, cons = earlier.user_attrs["values"], earlier.user_attrs.get("constraints", [0.0])
    else:
        try:
            values = evaluate_config(ctx, config, tuple(objectives) + tuple(constraints),
                                     measure_latency=(ctx.mode == "measure"))
        except (KernelConfigInfeasible, ShardError) as e:  # a tile config over the target's limits, a tp the
            # heads do not divide by: pruned, never scored
            trial.set_user_attr("pruned_reason", str(e))
            raise optuna.TrialPruned(str(e)) from e
        except (LmforgeError, RuntimeError, ValueError) as e:  # a failed config; the search goes on
            trial.set_user_attr("error", f"{type(e).__name__}: {e}"[:1000])
            raise
        values = {k: float(v) for k, v in values.items()}
        cons = constraint_values(values, constraints) if constraints else [0.0]
    trial.set_user_attr("values", values)
    trial.set_user_attr("constraints", cons)
    for (cname, _), c in zip(constraints.items(), cons):
        trial.set_constraint(cname, c)
    return tuple(values[o] for o in objectives) if len(objectives) > 1 else values[objectives[0]]


def _evaluated(study, config) -> optuna.trial.FrozenTrial | None:
    """The finished trial that evaluated `config` (not one that itself repeated another), if any."""
    key = _config_key(config)
    for t in study.get_trials(deepcopy=False, states=(COMPLETE,)):
        if "duplicate_of" not in t.user_attrs and _config_key(t.user_attrs.get("config")) == key:
            return t
    return None


class _StopAtBudget:
    """Stop the study once it holds `budget` counted trials, whichever worker ran them (Optuna's MaxTrialsCallback,
    less the interrupted trials): each worker stops after its running trial, so N workers overshoot by < N."""

    def __init__(self, budget: int):
        self.budget = budget

    def __call__(self, study, trial):
        if counted_trials(study) >= self.budget:
            study.stop()


def _check_same_settings(study, objectives, mode, settings) -> None:
    """A study (one named by `study_name`, or an older one) created under other settings is not resumed silently."""
    old = study.user_attrs.get("settings")
    if old is None:  # a new study, or one from before lmforge stored its settings
        return
    old_objectives = study.user_attrs.get("objectives")
    keys = [*settings, *(k for k in old if k not in settings)]
    diffs = [f"{k}: study has {old.get(k)!r}, this run {settings.get(k)!r}" for k in keys
             if old.get(k) != settings.get(k)]
    if old_objectives is not None and list(old_objectives) != list(objectives):
        diffs.insert(0, f"objectives: study has {old_objectives}, this run {list(objectives)}")
    if study.user_attrs.get("mode", mode) != mode:
        diffs.insert(0, f"mode: study has {study.user_attrs['mode']!r}, this run {mode!r}")
    if diffs:
        raise LmforgeError(f"study {study.study_name!r} was run with other settings, so its trials' numbers mean "
                           f"something else ({'; '.join(diffs)}): give another study name (or none, for a key made "
                           "from the settings), or the same settings to resume it")


def _measure_top(ctx: TuneContext, study, k: int, constraints: Mapping[str, Any]) -> dict[int, float]:
    """Hybrid mode: measure the k best configs by their predicted numbers on this machine; the study keeps the
    measured latencies (study attr "hybrid_measured", which `ranked_trials` reads). Until they are all measured
    the attr is None: a study whose measurement Ctrl-C cut off has no best config (`measurement_unfinished`),
    and its finished trials stay for the rerun that measures them."""
    top = ranked_trials(study, measured={}, constraints=constraints)[:k]
    study.set_user_attr("hybrid_measured", None)
    out = {}
    try:
        for t in top:
            values = evaluate_config(ctx, t.user_attrs["config"], (), measure_latency=True)
            out[t.number] = values["measured_latency"]
            study.set_user_attr(f"measured_latency:{t.number}", values["measured_latency"])
    except KeyboardInterrupt:
        n = len(study.get_trials(deepcopy=False, states=(COMPLETE,)))
        raise LmforgeError(f"tuning was interrupted while measuring the {len(top)} best predicted configs on this "
                           f"machine ({len(out)} measured): study {study.study_name!r} keeps its {n} finished "
                           "trials (they count toward the budget), but a hybrid study has no best config until its "
                           "measurement finishes: rerun the same command to measure them") from None
    study.set_user_attr("hybrid_measured", {str(n): v for n, v in out.items()})
    return out


def _result(study, objectives, name, storage, measured, constraints) -> TuneResult:
    trials = study.get_trials(deepcopy=False)
    interrupted = set(study.user_attrs.get("interrupted_trials", ()))
    failed = sum(t.state == FAIL and t.number not in interrupted for t in trials)
    complete = [t for t in trials if t.state == COMPLETE]
    pruned = [t for t in trials if t.state == PRUNED]
    reasons: dict[str, int] = {}
    for t in pruned:
        reason = t.user_attrs.get("pruned_reason", "pruned by the sampler")
        reasons[reason] = reasons.get(reason, 0) + 1
    feasible = _feasible(study)
    if not feasible:
        more = f", {len(pruned)} pruned: {'; '.join(reasons)}" if pruned else ""
        hint = ("relax the constraints or raise the budget" if complete else
                "no trial finished: the failed trials' errors are in the log above (and their user attr 'error')")
        raise LmforgeError(f"no feasible configuration among {len(complete)} finished trials ({failed} failed{more}) "
                           f"of study {name!r}: {hint}")
    violations = {}  # hybrid: the measured configs that break a latency / throughput constraint as measured
    for t in feasible:
        broken = measured_violations(t.user_attrs["values"], measured[t.number], constraints) if t.number in measured \
            else []
        if broken:
            violations[t.number] = broken
    ranked = ranked_trials(study, measured, constraints)
    if not ranked:  # hybrid: every measured config breaks a latency / throughput constraint on this machine
        raise LmforgeError(f"none of the {len(measured)} configs measured on this machine meets "
                           f"{', '.join(sorted({c for v in violations.values() for c in v}))} when measured "
                           f"(measured latencies {sorted(f'{v:.3g}' for v in measured.values())} s) in study "
                           f"{name!r}: relax the constraint, raise hybrid_top, or use mode='predict'")
    best = ranked[0]
    candidates = [t for t in feasible if "duplicate_of" not in t.user_attrs]
    front = [{k: v for k, v in p.items() if k != "_trial"} for p in _pareto(candidates, objectives, _signs(study))]
    values = dict(best.user_attrs["values"])
    if measured:  # hybrid: the best config's latency (and so its throughput) is its measured one
        values = measured_values(values, measured[best.number])
    return TuneResult(study, tuple(objectives), dict(best.user_attrs["config"]), values, front, name, storage,
                      len(complete), failed, measured, n_pruned=len(pruned), pruned_reasons=reasons,
                      n_infeasible=len(complete) - len(feasible), measured_violations=violations,
                      n_interrupted=sum(t.state == FAIL and t.number in interrupted for t in trials),
                      n_duplicates=sum("duplicate_of" in t.user_attrs for t in complete), best_trial=best.number)


class _progress:
    """A tqdm progress bar showing the best value so far and trials per second."""

    def __init__(self, total: int, objectives):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc="tuning", unit="trial")
        self.objectives = objectives
        self.t0 = time.perf_counter()

    def __call__(self, study, trial):
        self.bar.update(1)
        try:
            if len(self.objectives) == 1 and study.best_trials:
                self.bar.set_postfix({f"best {self.objectives[0]}": f"{study.best_value:.4g}",
                                      "trials/s": f"{self.bar.n / (time.perf_counter() - self.t0):.2f}"})
        except ValueError:
            pass

    def close(self):
        self.bar.close()
