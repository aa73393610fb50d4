"""Tuning studies as lmforge stores and reads them: where they live (`default_storage`, `open_storage`), how
they are named (`study_key`: graph signature, target fingerprint, objectives, mode, then a hash of the constraints
and settings, the model's weights and quality data among them: `model_settings`), which trials count
(`counted_trials`), and the one ranking of a study's trials (`ranked_trials`) that `lmforge.tune`'s best config,
`compile(config="best")` (`tuned_config`: of the most recently run study, `tuned_studies`) and `lmforge report`
all take.
`lmforge.search.tuner` runs the studies; this module only reads and names them.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import optuna

from lmforge.errors import LmforgeError
from lmforge.ir.graph import Graph

DIRECTIONS = {"latency": "minimize", "throughput": "maximize", "memory": "minimize", "quality": "maximize",
              "kl": "minimize", "accuracy": "maximize"}
COMPLETE, PRUNED, FAIL, WAITING = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
                                   optuna.trial.TrialState.FAIL, optuna.trial.TrialState.WAITING)


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


def model_settings(graph: Graph, eval_inputs: Sequence[tuple], *, logits_index: int = 0, quality_positions=None,
                   checker=None) -> dict[str, Any]:
    """The settings that say which model and which quality data a study's numbers are of: a fingerprint of the
    graph's weights (`weights_fingerprint`) and of the eval inputs, the logits index, the quality positions and the
    checker's name. Graph signatures see only the structure, so without these a retrained model of the same
    architecture (or other eval data) would resume the old study and take its quality numbers as its own."""
    positions = None if quality_positions is None else [quality_positions.start, quality_positions.stop,
                                                        quality_positions.step]
    name = None if checker is None else getattr(checker, "__qualname__", type(checker).__qualname__)
    return {"weights": weights_fingerprint(graph),
            "quality_data": {"eval_inputs": data_fingerprint(eval_inputs), "logits_index": logits_index,
                             "positions": positions, "checker": name}}


def weights_fingerprint(graph: Graph) -> str:
    """A digest of the graph's weights (names, types and values): the one the program runtime keys generations by
    (`lmforge.programs.runtime.weights_fingerprint`), cached per tensor."""
    from lmforge.programs.runtime import weights_fingerprint as digest

    return digest(graph, graph.weights)


def data_fingerprint(values) -> str:
    """16 hex digits of sha256 over `values` (nested tuples, lists and dicts: their structure, dicts by sorted key,
    then the leaves in order): each tensor's dtype, shape and bytes; other leaves by their type and, for numbers,
    strings and None, their value."""
    import hashlib

    import torch
    import torch.utils._pytree as pytree

    def keyed(v):   # dicts by sorted key, so that the order keys were written in does not matter
        if isinstance(v, dict):
            return {k: keyed(v[k]) for k in sorted(v, key=repr)}
        if isinstance(v, (list, tuple)):
            return tuple(keyed(x) for x in v)
        return v

    leaves, spec = pytree.tree_flatten(keyed(values))
    h = hashlib.sha256(str(spec).encode())
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            t = leaf.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            plain = isinstance(leaf, (bool, int, float, str, type(None)))
            h.update(f"{type(leaf).__name__}:{leaf!r}".encode() if plain else type(leaf).__name__.encode())
    return h.hexdigest()[:16]


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


def counted_trials(study) -> int:
    """The trials `budget` counts: every trial that ended (finished, pruned or failed), of every run and worker,
    less those Ctrl-C cut off (study attr "interrupted_trials"; a killed process's trial never ends)."""
    interrupted = set(study.user_attrs.get("interrupted_trials", ()))
    return sum(t.number not in interrupted for t in study.get_trials(deepcopy=False, states=(COMPLETE, PRUNED, FAIL)))


def _feasible(study) -> list:
    return [t for t in study.trials if t.state == COMPLETE
            and all(c <= 0 for c in t.user_attrs.get("constraints", [0.0]))]


def _signs(study) -> list[int]:
    """+1 for each minimized objective of `study`, -1 for each maximized one (from the study's directions, so a
    study that lmforge.tune did not write reads too)."""
    return [1 if d == optuna.study.StudyDirection.MINIMIZE else -1 for d in study.directions]


def measured_latencies(study) -> dict[int, float]:
    """Hybrid studies: trial number -> latency measured on the tuning machine, for the configs the last run
    measured (empty for other studies, and for a hybrid study whose measurement did not finish:
    `measurement_unfinished`)."""
    attrs = study.user_attrs
    if "hybrid_measured" in attrs:
        return {int(n): float(v) for n, v in (attrs["hybrid_measured"] or {}).items()}
    if measurement_unfinished(study):
        return {}
    # a study from before "hybrid_measured": every measurement it holds
    return {int(k.split(":", 1)[1]): float(v) for k, v in attrs.items() if k.startswith("measured_latency:")}


def measurement_unfinished(study) -> bool:
    """Whether `study` is a hybrid study whose measurement of its best predicted configs did not finish (Ctrl-C,
    a killed process): it has no measured best until the same `tune` command runs again. `tune` sets study attr
    "hybrid_measured" to None when it starts measuring and to the measurements when it is done. A hybrid study
    without that attr and with the weights fingerprint in its settings did not finish either (every lmforge that
    records the fingerprint records that attr); one without the fingerprint may be from before the attr, and its
    `measured_latency:N` attrs count."""
    attrs = study.user_attrs
    if attrs.get("mode") != "hybrid":
        return False
    if "hybrid_measured" in attrs:
        return attrs["hybrid_measured"] is None
    return "weights" in (attrs.get("settings") or {})


def measured_values(values: Mapping[str, float], latency: float) -> dict[str, float]:
    """A hybrid trial's values with its measured latency (and the throughput that follows) in place of the
    predicted ones; "predicted_latency" keeps the prediction."""
    out = dict(values)
    out["throughput"] = out["throughput"] * out["latency"] / latency
    out["latency"] = out["measured_latency"] = latency
    return out


def measured_violations(values: Mapping[str, float], latency: float, constraints: Mapping[str, Any]) -> list[str]:
    """The latency / throughput constraints a config breaks at its measured latency (as `constraint_tag`s)."""
    timed = {k: b for k, b in constraints.items() if k in ("latency", "throughput")}
    return [constraint_tag(k, b) for (k, b), c in zip(timed.items(), constraint_values(measured_values(values, latency),
                                                                                         timed)) if c > 0]


def ranked_trials(study, measured: Mapping[int, float] | None = None,
                  constraints: Mapping[str, Any] | None = None) -> list:
    """The feasible trials of `study`, best first: the one ranking that `TuneResult.best_config` and
    `compile(..., config="best")` (through `best_configs`) both take their first from.

    Predict and measure studies: by the objectives in order (the first decides, ties go to the next, then to the
    earlier trial), so one objective gives its best and several give the Pareto point best in the first.
    Hybrid studies (`measured`, default: the study's own measurements): only the measured trials, by measured
    latency, less those whose measured latency breaks a latency or throughput constraint (`constraints`, default:
    the study's own); none while the study's measurement is unfinished (`measurement_unfinished`). A trial that
    repeated an evaluated config (user attr "duplicate_of") is left out."""
    if measured is None:
        if measurement_unfinished(study):  # no measured best yet, and the predicted best is not hybrid's best
            return []
        measured = measured_latencies(study)
    if constraints is None:
        constraints = (study.user_attrs.get("settings") or {}).get("constraints") or {}
    trials = [t for t in _feasible(study) if "duplicate_of" not in t.user_attrs]
    if measured:
        kept = [t for t in trials if t.number in measured
                and not measured_violations(t.user_attrs["values"], measured[t.number], constraints)]
        return sorted(kept, key=lambda t: (measured[t.number], t.number))
    signs = _signs(study)
    return sorted(trials, key=lambda t: ([s * v for s, v in zip(signs, t.values)], t.number))


def _pareto(trials, objectives, signs: Sequence[int] | None = None) -> list[dict]:
    """The non-dominated trials, sorted by the objectives in order. signs: +1 minimize / -1 maximize per objective
    (default: from DIRECTIONS); a trial's config is its user attr "config", else its params."""
    if signs is None:
        signs = [1 if DIRECTIONS.get(o, "minimize") == "minimize" else -1 for o in objectives]
    vals = [[s * v for s, v in zip(signs, t.values)] for t in trials]
    front = []
    for i, t in enumerate(trials):
        dominated = any(all(a <= b for a, b in zip(vals[j], vals[i])) and vals[j] != vals[i]
                        for j in range(len(trials)) if j != i)
        if not dominated:
            front.append({"trial": t.number, "config": t.user_attrs.get("config", t.params),
                          "values": dict(zip(objectives, t.values)), "_trial": t})
    front.sort(key=lambda p: [s * p["values"][o] for s, o in zip(signs, objectives)])
    return front


def best_configs(graph: Graph, target, storage=None, limit: int = 1, tensor_parallel: bool = False,
                 same_weights: bool = True) -> list[dict]:
    """The configs of `best_trials` (the same arguments)."""
    return [b["config"] for b in best_trials(graph, target, storage, limit, tensor_parallel, same_weights)]


def best_trials(graph: Graph, target, storage=None, limit: int = 1, tensor_parallel: bool = False,
                same_weights: bool = True) -> list[dict]:
    """The best configs found so far for this graph (by signature, after the canonical passes) on `target` (a name
    or a Hardware), as {"study": name, "trial": number, "config": {...}}: those of the most recently run study
    first (`tuned_studies`: studies differ by objectives, mode, constraints and calibration; the last one run is
    the one asked for), then of older ones. Within a study the order is `ranked_trials`', so the first config is
    the `best_config` that `tune` returned for that study (in hybrid mode the measured best)."""
    out: list[dict] = []
    for study in tuned_studies(graph, target, storage, tensor_parallel=tensor_parallel, same_weights=same_weights):
        out += [{"study": study.study_name, "trial": t.number, "config": dict(t.user_attrs["config"])}
                for t in ranked_trials(study)[:limit - len(out)]]
        if len(out) >= limit:
            break
    return out


def tuned_studies(graph: Graph, target, storage=None, *, tensor_parallel: bool = False,
                  same_weights: bool = True) -> list:
    """The studies of this graph (by signature, after the canonical passes) on `target`, the most recently run
    first (`last_run`).

    Only studies of these weights count (settings "weights", `model_settings`): a study of another model of the same
    architecture, or one from before lmforge recorded the weights, is not this model's (same_weights=False takes
    them too: a warm start from another checkpoint's knob values).
    Studies that searched tensor parallelism (`shard.tp`, several GPUs) count only with tensor_parallel=True:
    their latencies are those of a group of GPUs, not of one."""
    from lmforge.hwmodels import get_target

    storage = storage or default_storage()
    prefix = f"{graph.signature()}:{get_target(target).fingerprint()}:"
    weights = weights_fingerprint(graph)
    out = []
    for summary in optuna.get_all_study_summaries(storage=storage, include_best_trial=False):
        if not summary.study_name.startswith(prefix) or (":tp<=" in summary.study_name and not tensor_parallel):
            continue
        if same_weights and (summary.user_attrs.get("settings") or {}).get("weights") != weights:
            continue
        out.append(optuna.load_study(study_name=summary.study_name, storage=storage))
    return sorted(out, key=last_run, reverse=True)


def last_run(study):
    """When `study` last ran: the end of its newest trial (the start of a running one), or when `tune` last opened
    it (study attr "last_run": a rerun whose study already holds its budget runs no trial), whichever is later.
    Not Optuna's `datetime_start`, the start of the first trial: a resumed older study would lose to any study
    started after it."""
    import datetime

    stamps = [t.datetime_complete or t.datetime_start for t in study.get_trials(deepcopy=False)]
    stamps = [s for s in stamps if s is not None]
    try:
        stamps.append(datetime.datetime.fromisoformat(study.user_attrs["last_run"]))
    except (KeyError, TypeError, ValueError):  # a study tune did not write, or from before the attr
        pass
    return max(stamps, default=datetime.datetime.min)


def run_stamp() -> str:
    """Now, as `last_run` reads study attr "last_run" (local time without a zone, as Optuna records trials)."""
    import datetime

    return datetime.datetime.now().isoformat()


def tuned_config(graph: Graph, target, storage, url: str, study: str | None = None) -> dict:
    """What `compile(config="best")` takes: {"study": name, "trial": number, "config": {...}, "passed_over":
    [(name, why), ...]}: the best trial (`ranked_trials`) of the most recently run study of this graph, weights and
    target that has one (`tuned_studies`), or of `study` (a study name, or a unique part of one); "passed_over":
    the more recently run studies without a best trial. An LmforgeError when there is none, saying why and what to
    do. url: the storage as the user gave it, for messages.
    Studies that searched tensor parallelism count like the others: their config holds its `shard.tp`, and
    `compile` splits the model for it as for any config with shard.tp > 1."""
    found = tuned_studies(graph, target, storage, tensor_parallel=True)  # a --max-tp tune is a tune too
    if study is not None:
        found = [_named_study(found, study, target, storage, url)]
    passed_over = []
    for s in found:
        ranked = ranked_trials(s)
        if ranked:
            return {"study": s.study_name, "trial": ranked[0].number, "config": dict(ranked[0].user_attrs["config"]),
                    "objectives": trial_objectives(s, ranked[0]), "passed_over": passed_over}
        passed_over.append((s.study_name, no_best_reason(s)))
    if passed_over:  # studies of this model, but not one with a trial to take
        which = "; ".join(f"study {name}: {why}" for name, why in passed_over)
        unmeasured = [s for s in found if measurement_unfinished(s)]
        what = "best config" if unmeasured else "feasible trial"
        lead = f"its study has no {what}" if len(found) == 1 else f"none of its {len(found)} studies has a {what}"
        todo = "rerun the same tune command to finish its measurement" if len(unmeasured) == len(found) else \
            "relax the constraints or raise the budget and tune again"
        raise LmforgeError(f"no tuned configuration to take for this model on {target!r} in the tuning database "
                           f"{url}: {lead} ({which}): {todo}, or pass a config dict (CLI: --config JSON)")
    other = tuned_studies(graph, target, storage, same_weights=False)
    why = (" (it has studies of this architecture, but of other weights: another checkpoint, or tuned before "
           "lmforge recorded the weights; their knob values can seed a study: tune(..., "
           f"warm_start_from={target!r}))") if other else ""
    raise LmforgeError(f"no tuned configuration for this model on {target!r} in the tuning database {url}{why}: run "
                       f"`lmforge.tune(..., target={target!r})` (CLI: `lmforge tune WORKLOAD --target {target}`) "
                       "first (with the same storage), or pass a config dict (CLI: --config JSON)")


PREDICTED = ("latency", "throughput", "memory", "fits", "eflops")   # the cost model's numbers for the target
MEASURED = ("quality", "kl", "accuracy")   # run on the tuning machine's CPU, whatever the mode


def trial_objectives(study, trial) -> dict[str, Any]:
    """The numbers behind a tuned config, as an artifact's manifest records them (`objectives`):

        {"mode": "predict", "target": "h100", "bindings": {"batch": 32, ...},
         "predicted": {"latency": s, "throughput": tokens/s, "memory": bytes, "fits": bool, "eflops": ...},
         "measured": {"quality": top-1 agreement, "kl": ..., "accuracy": ..., "latency": s (measure / hybrid)}}

    predicted: the cost model on the study's target at the `bindings` sizes. measured: what was run, on the
    tuning machine: the task quality of the config's model (its CPU run against the reference), and the
    latency only where the study measured it (measure mode: every trial; hybrid: the best predicted ones, on
    the tuning machine's device). A predict-mode study measured no latency, so none is listed as measured."""
    values = dict(trial.user_attrs.get("values") or {})
    mode = study.user_attrs.get("mode", "predict")
    predicted = {k: values[k] for k in PREDICTED if k in values}
    if "predicted_latency" in values:   # "latency" is the measured one in measure mode
        predicted["latency"] = values["predicted_latency"]
        if mode != "predict":
            predicted.pop("throughput", None)   # the study's throughput follows the measured latency
    if "fits" in predicted:
        predicted["fits"] = bool(predicted["fits"])
    measured = {k: values[k] for k in MEASURED if k in values}
    hybrid = measured_latencies(study) if mode == "hybrid" else {}
    if mode == "measure" and "measured_latency" in values:
        measured["latency"] = values["measured_latency"]
    elif trial.number in hybrid:
        measured["latency"] = hybrid[trial.number]
    settings = study.user_attrs.get("settings") or {}
    return {"mode": mode, "target": study.user_attrs.get("target"), "bindings": dict(settings.get("bindings") or {}),
            "predicted": predicted, "measured": measured}


def _named_study(found: Sequence, name: str, target, storage, url: str):
    """The study of `found` named `name` (exactly, else the one whose name holds it), or an LmforgeError."""
    matches = [s for s in found if s.study_name == name] or [s for s in found if name in s.study_name]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise LmforgeError(f"{len(matches)} studies of this model on {target!r} match study={name!r} in {url}: give "
                           f"the full name or a unique part of one of {[s.study_name for s in matches]}")
    names = optuna.get_all_study_names(storage)
    elsewhere = [n for n in names if name in n]
    mine = [s.study_name for s in found]
    raise LmforgeError(f"no study of this model (these weights) on {target!r} matches study={name!r} in {url}"
                       + (f"; {elsewhere} {'is' if len(elsewhere) == 1 else 'are'} of another model, weights or "
                          "target" if elsewhere else "")
                       + (f": its studies are {mine}" if mine else ": it has no study of this model on that target "
                          "(`lmforge report` lists the studies)"))


def no_best_reason(study) -> str:
    """Why `study` has no best trial (`ranked_trials` is empty), in words."""
    if measurement_unfinished(study):
        return "its hybrid measurement of the best predicted configs did not finish"
    complete = study.get_trials(deepcopy=False, states=(COMPLETE,))
    if not complete:
        return "no trial finished"
    cons = (study.user_attrs.get("settings") or {}).get("constraints") or {}
    if not _feasible(study):
        tags = ", ".join(constraint_tag(k, v) for k, v in sorted(cons.items()))
        return f"none of its {len(complete)} finished trials meets its constraints" + (f" ({tags})" if tags else "")
    return "every config it measured breaks a latency or throughput constraint as measured"
