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
  accuracy   maximize  task accuracy from the workload's checker
Constraints ({"fits": True, "quality": 0.99, "accuracy": 0.9, "latency": 1e-3}) go through Optuna's
constraints support: an infeasible trial is kept and marked, never scored with a made-up number. A config
whose passes fail is recorded as a failed trial and the search goes on.

Sizes: predict mode prices the graph at the workload's serving sizes (`extras["serving_dims"]`, e.g. batch 32
with 2048 cached tokens; else the example inputs' sizes; `bindings=` overrides). Measure and hybrid modes time
the first eval input (the example inputs when there are none) and predict at that input's sizes too, so the
measured and predicted numbers of a trial describe the same shapes (`TuneResult.bindings` says which; `bindings=`
that disagree with that input are an error there).
In hybrid mode `best_config` is the measured best among the `hybrid_top` best predicted configs, and
`TuneResult.table()` lists those configs with their measured and predicted latency.

`layer_groups=G` tunes the per-layer knobs (attention pattern, window, sinks, top-k; weight bits and group size)
separately for G groups of consecutive layers instead of sharing one value across layers.

Measure mode times the graph on `backends` (e.g. ("tvm",) on the host), and their schedule knobs join the
search space, so kernel schedules are tuned together with the passes against real timings.
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

The tuning database is Optuna storage: SQLite under `cache_dir("tuning")` unless `storage` gives another
URL (PostgreSQL for many workers). The study is keyed by the workload's graph signature and the target's
fingerprint, so re-running resumes it and `compile(..., config="best")` finds its best config. The key also
holds the objectives, the mode, the constraints and a hash of the other settings that change what a trial's
numbers mean (sizes, backends, layer groups, the knob space): the same command resumes its study (`budget` counts
the finished trials of earlier runs too), a changed one starts a new study. A study named by `study_name`
stores those settings and refuses to resume with different ones.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import optuna

from lmforge.errors import LmforgeError
from lmforge.ir.graph import Graph
from lmforge.passes.base import Knob, PassManager
from lmforge.search.space import suggest

DIRECTIONS = {"latency": "minimize", "throughput": "maximize", "memory": "minimize", "quality": "maximize",
              "kl": "minimize", "accuracy": "maximize"}


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
    n_failed: int
    measured: dict[int, float] = field(default_factory=dict)  # trial number -> measured latency (hybrid)
    n_pruned: int = 0
    pruned_reasons: dict[str, int] = field(default_factory=dict)  # why trials were pruned -> how many
    n_infeasible: int = 0  # finished trials that break a constraint
    n_earlier: int = 0  # finished trials that were in the study before this call (a resumed study)
    mode: str = "predict"
    bindings: dict[str, int] = field(default_factory=dict)  # the symbolic sizes latency/memory are priced at

    def summary(self) -> str:
        """One paragraph: the study, its trials by outcome (and why trials were pruned), whether it resumed."""
        parts = [f"{self.n_complete} trials finished"]
        if self.n_infeasible:
            parts[0] += f" ({self.n_infeasible} infeasible)"
        parts += [f"{self.n_pruned} pruned", f"{self.n_failed} failed"]
        lines = [f"study {self.study_name} in {self.storage}: " + ", ".join(parts)]
        if self.n_earlier:
            lines.append(f"  resumed a study with {self.n_earlier} finished trials from earlier runs (the budget "
                         "counts them); ran " + f"{max(0, self.n_complete - self.n_earlier)} new")
        for reason, n in self.pruned_reasons.items():
            lines.append(f"  pruned {n}x: {reason}")
        return "\n".join(lines)

    def table(self, defaults: Mapping[str, Any] | None = None) -> str:
        """The Pareto front, one row per distinct objective vector; configs show the knobs off their default.

        Hybrid mode: the configs measured on this machine instead, best (lowest measured latency) first, with
        their measured and predicted latency (same sizes) and the other objectives' values."""
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
        others = [o for o in self.objectives if o != "latency"]
        rows = [f"{'trial':>5}  {'measured latency':>16}  {'predicted latency':>17}  "
                + "".join(f"{o:>12}  " for o in others) + "config (non-default knobs)"]
        trials = {t.number: t for t in self.study.trials}
        for number in sorted(self.measured, key=self.measured.get):
            t = trials[number]
            values = t.user_attrs["values"]
            changed = {k: v for k, v in t.user_attrs["config"].items() if defaults.get(k, object()) != v}
            rows.append(f"{number:>5}  {self.measured[number]:>16.4g}  {values['predicted_latency']:>17.4g}  "
                        + "".join(f"{values[o]:>12.4g}  " for o in others) + str(changed))
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

    def compiled(self, graph: Graph, config: Mapping[str, Any]):
        """The graph on the chosen backends, each configured with its own knob values (torch takes the rest)."""
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

            return TensorParallelModel(graph, instances)
        return CompiledModel(graph, instances)


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
    if measure_latency or any(o in objectives for o in ("quality", "kl", "accuracy")):
        compiled = ctx.compiled(graph, config)
    if measure_latency:
        from lmforge.search.measure import measure

        args = ctx.eval_inputs[0]
        values["latency"] = values["measured_latency"] = measure(lambda: compiled(*args)).median_s
    tokens = ctx.graph.inputs[0].type.numel(ctx.bindings) if ctx.graph.inputs else 1
    values["throughput"] = tokens / values["latency"]
    if "quality" in objectives or "kl" in objectives:
        report = compare(ctx.reference, compiled, ctx.eval_inputs)
        values["quality"], values["kl"] = report.top1_agreement, report.kl
    if "accuracy" in objectives:
        if ctx.checker is None:
            raise LmforgeError("objective 'accuracy' needs a workload with a checker")
        values["accuracy"] = float(ctx.checker(compiled))
    return values


def constraint_values(values: Mapping[str, float], constraints: Mapping[str, Any]) -> list[float]:
    """Optuna's convention: each value <= 0 means satisfied."""
    out = []
    for name, bound in constraints.items():
        if name == "fits":
            out.append(0.0 if values["fits"] or not bound else 1.0)
        elif DIRECTIONS.get(name) == "maximize":
            out.append(float(bound) - values[name])
        else:
            out.append(values[name] - float(bound))
    return out


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


def default_storage() -> str:
    from lmforge.cache import cache_dir

    return f"sqlite:///{cache_dir('tuning') / 'studies.db'}"


def open_storage(storage: str | None = None, must_exist: bool = False):
    """The Optuna storage for a URL (default: `default_storage()`), or an LmforgeError saying what is wrong with
    the URL. must_exist: an SQLite file that does not exist is an error (reading studies) instead of created."""
    import os

    url = storage or default_storage()
    if not isinstance(url, str):  # an Optuna storage object
        return url
    if "://" not in url:
        raise LmforgeError(f"storage {url!r} is not a URL: give an Optuna storage URL, e.g. "
                           f"sqlite:///{os.path.abspath(url)} for an SQLite file (three slashes, then the path) or "
                           "postgresql://user@host/db")
    if url.startswith("sqlite:///") and url[len("sqlite:///"):] not in ("", ":memory:"):
        path = url[len("sqlite:///"):]
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise LmforgeError(f"storage {url!r}: the folder {folder} does not exist; create it or give another path")
        if must_exist and not os.path.exists(path):
            raise LmforgeError(f"storage {url!r}: there is no tuning database at {path}; run `lmforge tune` first "
                               "or give the --storage URL it used")
    import time

    try:
        for attempt in range(5):
            try:
                return optuna.storages.get_storage(url)
            except Exception as e:   # another worker creating the same new database's tables at the same moment
                racing = any(w in str(e) for w in ("alembic_version", "already exists", "database is locked"))
                if not racing or attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))
    except ImportError as e:
        raise LmforgeError(f"storage {url!r}: the database driver for it is not installed ({e})") from e
    except Exception as e:  # SQLAlchemy: an unknown dialect, an unreachable server, an unreadable file
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise LmforgeError(f"cannot open the tuning storage {url!r}: {type(e).__name__}: {first}. Give an Optuna "
                           "storage URL such as sqlite:///path/to/studies.db or postgresql://user@host/db") from e


def study_key(name: str, graph: Graph, hw, objectives: Sequence[str], mode: str,
              constraints: Mapping[str, Any] | None = None, settings: Mapping[str, Any] | None = None) -> str:
    """Graph signature and target fingerprint first, so a lookup by (workload, target) is a prefix match; then
    objectives, mode, name, the constraints (readable) and a hash of the other `settings` that change what a
    trial's numbers mean, so a changed constraint or size never resumes a study run under other ones."""
    return f"{graph.signature()}:{hw.fingerprint()}:{'+'.join(objectives)}:{mode}:{name}" + settings_suffix(
        constraints, settings)


def settings_suffix(constraints: Mapping[str, Any] | None, settings: Mapping[str, Any] | None) -> str:
    """`:quality>=0.99,fits:s1a2b3c4d`: the constraints, readable, and a hash of the other settings."""
    out = ""
    if constraints:
        out += ":" + ",".join(constraint_tag(c, b) for c, b in sorted(constraints.items()))
    if settings:
        out += ":s" + settings_hash(settings)
    return out


def constraint_tag(name: str, bound) -> str:
    """`quality>=0.99`, `latency<=0.001`, `fits`: a constraint as it appears in study names."""
    if name == "fits":
        return "fits" if bound else "fits=off"
    return f"{name}{'>=' if DIRECTIONS.get(name) == 'maximize' else '<='}{float(bound):g}"


def settings_hash(settings: Mapping[str, Any]) -> str:
    """8 hex digits of the settings' JSON."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]


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
    graph = PassManager(canonical_pipeline()).run(graph)
    evals = list(wl.eval_inputs or [wl.example_inputs])
    # the first eval inputs calibrate the passes that need activations (AWQ's scales, FlexPrefill's measured
    # density): without them those knobs would do nothing or claim no saving
    return wl, graph, list(pipeline if pipeline is not None else tunable_pipeline(calibration=evals[:2])), evals


def tune(model_or_workload, example_inputs=None, *, target: str = "h100", objectives: Sequence[str] = ("latency",),
         constraints: Mapping[str, Any] | None = None, budget: int = 50, mode: str = "predict",
         storage: str | None = None, study_name: str | None = None, sampler: str | None = None, seed: int = 0,
         warm_start_from: str | None = None, bindings: Mapping[str, int] | None = None, hybrid_top: int = 5,
         pipeline=None, progress: bool = True, dynamic=None, backends: Sequence[str] = (),
         layer_groups: int = 1) -> TuneResult:
    """Tune the knobs of `model_or_workload` for `target`. See the module docstring."""
    from lmforge.compiler import CompiledModel
    from lmforge.hwmodels import calibrated, get_target

    objectives = tuple(objectives)
    unknown = [o for o in objectives if o not in DIRECTIONS]
    if unknown:
        raise LmforgeError(f"unknown objective(s) {unknown}; choose from {sorted(DIRECTIONS)}")
    if not objectives:
        raise LmforgeError(f"tune needs at least one objective; choose from {sorted(DIRECTIONS)}")
    if mode not in ("predict", "measure", "hybrid"):
        raise LmforgeError(f"mode must be predict, measure or hybrid, not {mode!r}")
    check_budget(budget)
    if mode == "hybrid" and hybrid_top < 1:
        raise LmforgeError(f"hybrid_top must be >= 1 (how many predicted-best configs to measure), not {hybrid_top}")
    constraints = dict(constraints or {})
    from lmforge.workload import Workload

    # names, ranges and the checker that accuracy needs, before any slow work (tune() itself takes no checker)
    check_constraints(constraints, objectives,
                      model_or_workload.checker if isinstance(model_or_workload, Workload) else None)
    storage_url = storage if isinstance(storage, str) else (storage or default_storage())
    store = open_storage(storage)
    base_hw = get_target(target) if isinstance(target, str) else target
    hw = calibrated(base_hw)  # a saved calibration (`lmforge calibrate`) refines the preset's efficiencies
    if mode != "predict" and getattr(hw, "kind", "") != "cpu" and target != "host":
        import torch

        if not torch.cuda.is_available():
            raise LmforgeError(f"mode {mode!r} measures on the target, but {target} is not this machine: "
                               "use mode='predict' (cost model), or target='host'")
    wl, graph, pipe, evals = prepare(model_or_workload, example_inputs, dynamic=dynamic, pipeline=pipeline)
    env = dict(graph.get_meta("example_dims") or ())
    if mode == "predict":
        env.update(dict(wl.extras.get("serving_dims", {})) if wl.extras else {})
        env.update(bindings or {})
    else:  # predict at the sizes that are measured (the first eval input), so both numbers describe one shape
        env.update(input_bindings(graph, evals[0]))
        clash = {k: v for k, v in (bindings or {}).items() if env.get(k, v) != v}
        if clash:
            raise LmforgeError(f"mode {mode!r} measures the first eval input, whose sizes are "
                               f"{ {k: env[k] for k in clash} }, but bindings ask for {clash}: drop `bindings` or use "
                               "mode='predict' to price other sizes")
        env.update(bindings or {})
    ctx = TuneContext(graph, pipe, hw, evals, wl.checker, env, mode, CompiledModel(graph), tuple(backends))
    hw = base_hw  # studies are keyed by the target itself, calibrated or not
    knobs = ctx.knobs
    if layer_groups > 1:  # one copy of each per-layer knob per group of consecutive layers
        from lmforge.search.space import expand_per_group

        knobs = expand_per_group(knobs, layer_groups, [k.name for k in knobs if k.per_layer])
    # what a trial's numbers depend on besides graph, target, objectives and mode: a study holds one setting of each
    settings = {"constraints": {k: (bool(v) if k == "fits" else float(v)) for k, v in constraints.items()},
                "bindings": dict(sorted(env.items())), "backends": list(backends), "layer_groups": layer_groups,
                "knobs": sorted(k.name for k in knobs)}
    name = study_name or study_key(wl.name, graph, hw, objectives, mode)
    tp_knobs = [k for p in pipe for k in p.knobs if k.name == "shard.tp"]
    if tp_knobs and not study_name:  # a multi-GPU search is its own study (its space has the shard.tp knob)
        name += f":tp<={max(tp_knobs[0].choices)}"
    if not study_name:
        name += settings_suffix(constraints, settings)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # tune reports a resumed study itself (TuneResult.summary)
    study = optuna.create_study(storage=store, study_name=name, load_if_exists=True,
                                directions=[DIRECTIONS[o] for o in objectives],
                                sampler=make_sampler(sampler, len(objectives), budget, seed))
    _check_same_settings(study, objectives, mode, settings)
    study.set_user_attr("settings", settings)
    study.set_user_attr("mode", mode)
    study.set_user_attr("graph_signature", graph.signature())
    study.set_user_attr("target", target)
    study.set_user_attr("target_fingerprint", hw.fingerprint())
    study.set_user_attr("objectives", list(objectives))
    study.set_user_attr("knob_defaults", {k.name: k.default for k in knobs})
    if not study.trials:
        study.enqueue_trial({k.name: k.default for k in knobs if k.condition is None}, skip_if_exists=True)
    if warm_start_from:
        for cfg in best_configs(graph, warm_start_from, store, limit=3):
            study.enqueue_trial({k: v for k, v in cfg.items() if k in {kn.name for kn in knobs}},
                                skip_if_exists=True)

    def objective(trial: optuna.Trial):
        from lmforge.passes.shard import ShardError
        from lmforge.search.kernel_model import KernelConfigInfeasible

        config = suggest(trial, knobs)
        try:
            values = evaluate_config(ctx, config, tuple(objectives) + tuple(constraints),
                                     measure_latency=(mode == "measure"))
        except (KernelConfigInfeasible, ShardError) as e:  # a tile config over the target's limits, a tp the
            # heads do not divide by: pruned, never scored
            trial.set_user_attr("config", config)
            trial.set_user_attr("pruned_reason", str(e))
            raise optuna.TrialPruned(str(e)) from e
        trial.set_user_attr("config", config)
        trial.set_user_attr("values", {k: float(v) for k, v in values.items()})
        cons = constraint_values(values, constraints) if constraints else [0.0]
        trial.set_user_attr("constraints", cons)
        for (cname, _), c in zip(constraints.items(), cons):
            trial.set_constraint(cname, c)
        return tuple(values[o] for o in objectives) if len(objectives) > 1 else values[objectives[0]]

    done = sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    remaining = max(0, budget - done)
    callbacks = [_progress(remaining, objectives)] if progress and remaining else []
    try:
        study.optimize(objective, n_trials=remaining, catch=(LmforgeError, RuntimeError, ValueError),
                       callbacks=callbacks, gc_after_trial=False)
    except KeyboardInterrupt:
        pass  # every finished trial is already in the storage; the result below covers them
    finally:
        for cb in callbacks:
            cb.close()
    measured = _measure_top(ctx, study, objectives, hybrid_top) if mode == "hybrid" else {}
    result = _result(study, objectives, name, storage_url, measured)
    result.n_earlier, result.mode, result.bindings = done, mode, dict(env)
    return result


def _check_same_settings(study, objectives, mode, settings) -> None:
    """A study (one named by `study_name`, or an older one) created under other settings is not resumed silently."""
    old = study.user_attrs.get("settings")
    if old is None:  # a new study, or one from before lmforge stored its settings
        return
    old_objectives = study.user_attrs.get("objectives")
    diffs = [f"{k}: study has {old.get(k)!r}, this run {v!r}" for k, v in settings.items() if old.get(k) != v]
    if old_objectives is not None and list(old_objectives) != list(objectives):
        diffs.insert(0, f"objectives: study has {old_objectives}, this run {list(objectives)}")
    if study.user_attrs.get("mode", mode) != mode:
        diffs.insert(0, f"mode: study has {study.user_attrs['mode']!r}, this run {mode!r}")
    if diffs:
        raise LmforgeError(f"study {study.study_name!r} was run with other settings, so its trials' numbers mean "
                           f"something else ({'; '.join(diffs)}): give another study name (or none, for a key made "
                           "from the settings), or the same settings to resume it")


def _measure_top(ctx: TuneContext, study, objectives, k: int) -> dict[int, float]:
    """Hybrid mode: measure the k best predicted feasible configs on this machine."""
    trials = _feasible(study)
    trials.sort(key=lambda t: t.user_attrs["values"]["predicted_latency"])
    out = {}
    for t in trials[:k]:
        values = evaluate_config(ctx, t.user_attrs["config"], (), measure_latency=True)
        out[t.number] = values["measured_latency"]
        study.set_user_attr(f"measured_latency:{t.number}", values["measured_latency"])
    return out


def _feasible(study) -> list:
    return [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE
            and all(c <= 0 for c in t.user_attrs.get("constraints", [0.0]))]


def _result(study, objectives, name, storage, measured) -> TuneResult:
    feasible = _feasible(study)
    failed = sum(t.state == optuna.trial.TrialState.FAIL for t in study.trials)
    complete = sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    reasons: dict[str, int] = {}
    for t in pruned:
        reason = t.user_attrs.get("pruned_reason", "pruned by the sampler")
        reasons[reason] = reasons.get(reason, 0) + 1
    if not feasible:
        more = f", {len(pruned)} pruned: {'; '.join(reasons)}" if pruned else ""
        raise LmforgeError(f"no feasible configuration among {complete} finished trials ({failed} failed{more}) of "
                           f"study {name!r}: relax the constraints or raise the budget")
    pareto = _pareto(feasible, objectives)
    if measured:
        best = min((t for t in feasible if t.number in measured), key=lambda t: measured[t.number])
    elif len(objectives) == 1:
        sign = 1 if DIRECTIONS[objectives[0]] == "minimize" else -1
        best = min(feasible, key=lambda t: sign * t.values[0])
    else:
        best = pareto[0]["_trial"]
    front = [{k: v for k, v in p.items() if k != "_trial"} for p in pareto]
    values = dict(best.user_attrs["values"])
    if measured:  # hybrid: the best config's latency (and so its throughput) is its measured one
        values["throughput"] = values["throughput"] * values["latency"] / measured[best.number]
        values["latency"] = values["measured_latency"] = measured[best.number]
    return TuneResult(study, tuple(objectives), dict(best.user_attrs["config"]), values, front, name, storage,
                      complete, failed, measured, n_pruned=len(pruned), pruned_reasons=reasons,
                      n_infeasible=complete - len(feasible))


def _pareto(trials, objectives) -> list[dict]:
    signs = [1 if DIRECTIONS[o] == "minimize" else -1 for o in objectives]
    vals = [[s * v for s, v in zip(signs, t.values)] for t in trials]
    front = []
    for i, t in enumerate(trials):
        dominated = any(all(a <= b for a, b in zip(vals[j], vals[i])) and vals[j] != vals[i]
                        for j in range(len(trials)) if j != i)
        if not dominated:
            front.append({"trial": t.number, "config": t.user_attrs["config"],
                          "values": dict(zip(objectives, t.values)), "_trial": t})
    front.sort(key=lambda p: [s * p["values"][o] for s, o in zip(signs, objectives)])
    return front


def best_configs(graph: Graph, target: str, storage: str | None = None, limit: int = 1,
                 tensor_parallel: bool = False) -> list[dict]:
    """The best configs found so far for this graph (by signature, after the canonical passes) on `target`: those
    of the most recently started study first (studies differ by objectives, mode and constraints; the last one run
    is the one asked for), then of older ones.

    Studies that searched tensor parallelism (`shard.tp`, several GPUs) count only with tensor_parallel=True:
    their latencies are those of a group of GPUs, not of one."""
    import datetime

    from lmforge.hwmodels import get_target

    storage = storage or default_storage()
    prefix = f"{graph.signature()}:{get_target(target).fingerprint()}:"
    out = []
    summaries = sorted(optuna.get_all_study_summaries(storage=storage),
                       key=lambda s: s.datetime_start or datetime.datetime.min, reverse=True)
    for summary in summaries:
        if not summary.study_name.startswith(prefix) or (":tp<=" in summary.study_name and not tensor_parallel):
            continue
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        feasible = _feasible(study)
        if not feasible:
            continue
        objectives = study.user_attrs.get("objectives", ["latency"])
        sign = 1 if DIRECTIONS[objectives[0]] == "minimize" else -1
        feasible.sort(key=lambda t: sign * t.values[0])
        out += [dict(t.user_attrs["config"]) for t in feasible[:limit]]
    return out[:limit]


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
