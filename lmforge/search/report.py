"""Tuning reports: a Pareto plot (PNG), the best-so-far curve, and a Markdown table of the front.

    lmforge report --storage sqlite:///... --study NAME --out reports/

The table marks the best config, the one `compile(..., config="best")` takes (`tuner.ranked_trials`). A hybrid
study adds a table of the configs measured on the tuning machine, with their measured and predicted latency and
the constraints a config breaks as measured. A study that `lmforge.tune` did not write (no stored objective names
or configs) is reported with its own directions, objectives named objective0, objective1, ..., and its params.
"""
from __future__ import annotations

from pathlib import Path

import optuna

from lmforge.errors import LmforgeError
from lmforge.search.studies import (_feasible, _pareto, _signs, measured_latencies, measured_violations,
                                     measurement_unfinished, ranked_trials)


def write_report(study: optuna.Study, out_dir: str | Path) -> dict[str, Path]:
    """Write pareto.png, history.png and report.md for a study; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise LmforgeError(f"report folder {str(out)!r} exists and is not a folder; the report is a folder of files "
                           "(pareto.png, history.png, report.md): give a new or existing folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LmforgeError(f"cannot create the report folder {str(out)!r}: {e.strerror or e}; give another --out")
    signs = _signs(study)
    objectives = study.user_attrs.get("objectives") or [f"objective{i}" for i in range(len(signs))]
    if len(objectives) != len(signs):  # attrs that do not describe this study's values
        objectives = [f"objective{i}" for i in range(len(signs))]
    direction = {o: "minimize" if s == 1 else "maximize" for o, s in zip(objectives, signs)}
    trials = _feasible(study)
    front = _pareto([t for t in trials if "duplicate_of" not in t.user_attrs], objectives, signs) if trials else []
    ranked = ranked_trials(study)
    best_trial = ranked[0].number if ranked else None
    paths = {}

    fig, ax = plt.subplots(figsize=(6, 4.2))
    if len(objectives) >= 2:
        xs, ys = [t.values[0] for t in trials], [t.values[1] for t in trials]
        ax.scatter(xs, ys, s=14, alpha=0.5, label="feasible trials")
        fx = [p["values"][objectives[0]] for p in front]
        fy = [p["values"][objectives[1]] for p in front]
        order = sorted(range(len(fx)), key=lambda i: fx[i])
        ax.plot([fx[i] for i in order], [fy[i] for i in order], "o-", color="C3", label="Pareto front")
        ax.set_xlabel(f"{objectives[0]} ({direction[objectives[0]]})")
        ax.set_ylabel(f"{objectives[1]} ({direction[objectives[1]]})")
    else:
        ax.scatter([t.number for t in trials], [t.values[0] for t in trials], s=14)
        ax.set_xlabel("trial")
        ax.set_ylabel(objectives[0])
    ax.set_title(f"{study.user_attrs.get('target', '')}: {len(trials)} feasible trials")
    ax.legend(loc="best") if len(objectives) >= 2 else None
    fig.tight_layout()
    paths["pareto"] = out / "pareto.png"
    fig.savefig(paths["pareto"], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    sign = signs[0]
    best, xs, ys = None, [], []
    for t in sorted(trials, key=lambda t: t.number):
        v = t.values[0]
        best = v if best is None or sign * v < sign * best else best
        xs.append(t.number)
        ys.append(best)
    ax.step(xs, ys, where="post")
    ax.set_xlabel("trial")
    ax.set_ylabel(f"best {objectives[0]} so far")
    fig.tight_layout()
    paths["history"] = out / "history.png"
    fig.savefig(paths["history"], dpi=120)
    plt.close(fig)

    target = study.user_attrs.get("target")
    lines = [f"# Tuning report: {study.study_name}", ""] + ([f"target: {_target(target)}  "] if target else [])
    lines.append(f"trials: {len(study.trials)} ({len(trials)} feasible)  ")
    measured = measured_latencies(study)
    by_tune = "objectives" in study.user_attrs  # a study lmforge.tune wrote: compile(config="best") reads it
    if best_trial is None and measurement_unfinished(study):
        lines.append("best: none yet (the measurement of the best predicted configs did not finish: rerun the same "
                     "`lmforge tune` command)")
    elif best_trial is None:
        lines.append("best: none (no feasible trial" + (", or every measured config breaks a constraint as "
                                                        "measured)" if measured else ")"))
    else:
        lines.append(f"best: trial {best_trial}" + (" (the config `compile(..., config=\"best\")` takes)"
                                                     if by_tune else ""))
    lines += ["", "| trial | " + " | ".join(objectives) + " | config |", "|---|" + "---|" * len(objectives) + "---|"]
    for p in front:
        vals = " | ".join(f"{p['values'][o]:.4g}" for o in objectives)
        mark = " (best)" if p["trial"] == best_trial else ""
        lines.append(f"| {p['trial']}{mark} | {vals} | `{p['config']}` |")
    if measured:
        lines += _measured_table(study, objectives, measured, best_trial)
    paths["table"] = out / "report.md"
    paths["table"].write_text("\n".join(lines) + "\n")
    return paths


def _target(target) -> str:
    """A study's target attr as text: a name (older studies may hold anything JSON)."""
    if isinstance(target, dict):
        return str(target.get("name", target))
    return str(target)


def _measured_table(study, objectives, measured, best) -> list[str]:
    """Markdown rows of a hybrid study's measured configs: measured and predicted latency (the objectives' table
    above shows predicted numbers), best first, those that break a constraint as measured last and flagged."""
    constraints = (study.user_attrs.get("settings") or {}).get("constraints") or {}
    others = [o for o in objectives if o not in ("latency", "throughput")]
    trials = {t.number: t for t in study.trials}
    rows = []
    for n in measured:
        values = trials[n].user_attrs.get("values", {})
        broken = measured_violations(values, measured[n], constraints) if values else []
        rows.append((bool(broken), measured[n], n, values, broken))
    lines = ["", "Measured on the tuning machine (hybrid mode: the best predicted configs, ranked by measured "
             "latency):", "", "| trial | measured latency | predicted latency | " + "".join(f"{o} | " for o in others)
             + "config | note |", "|---|---|---|" + "---|" * len(others) + "---|---|"]
    for _, latency, n, values, broken in sorted(rows):
        predicted = values.get("predicted_latency", float("nan"))
        note = "best" if n == best else (f"breaks {', '.join(broken)} as measured" if broken else "")
        lines.append(f"| {n} | {latency:.4g} | {predicted:.4g} | " + "".join(f"{values.get(o, float('nan')):.4g} | "
                                                                              for o in others)
                     + f"`{trials[n].user_attrs.get('config', trials[n].params)}` | {note} |")
    return lines
