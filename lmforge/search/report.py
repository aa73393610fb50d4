"""Tuning reports: a Pareto plot (PNG), the best-so-far curve, and a Markdown table of the front.

    lmforge report --storage sqlite:///... --study NAME --out reports/
"""
from __future__ import annotations

from pathlib import Path

import optuna

from lmforge.errors import LmforgeError
from lmforge.search.tuner import DIRECTIONS, _feasible, _pareto


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
    objectives = study.user_attrs.get("objectives") or [f"objective{i}" for i in range(len(study.directions))]
    trials = _feasible(study)
    front = _pareto(trials, objectives) if trials else []
    paths = {}

    fig, ax = plt.subplots(figsize=(6, 4.2))
    if len(objectives) >= 2:
        xs, ys = [t.values[0] for t in trials], [t.values[1] for t in trials]
        ax.scatter(xs, ys, s=14, alpha=0.5, label="feasible trials")
        fx = [p["values"][objectives[0]] for p in front]
        fy = [p["values"][objectives[1]] for p in front]
        order = sorted(range(len(fx)), key=lambda i: fx[i])
        ax.plot([fx[i] for i in order], [fy[i] for i in order], "o-", color="C3", label="Pareto front")
        ax.set_xlabel(f"{objectives[0]} ({DIRECTIONS.get(objectives[0], '')})")
        ax.set_ylabel(f"{objectives[1]} ({DIRECTIONS.get(objectives[1], '')})")
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
    sign = 1 if DIRECTIONS.get(objectives[0], "minimize") == "minimize" else -1
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

    lines = [f"# Tuning report: {study.study_name}", "",
             f"target: {study.user_attrs.get('target')}  ", f"trials: {len(study.trials)} "
             f"({len(trials)} feasible)", "", "| trial | " + " | ".join(objectives) + " | config |",
             "|---|" + "---|" * len(objectives) + "---|"]
    for p in front:
        vals = " | ".join(f"{p['values'][o]:.4g}" for o in objectives)
        lines.append(f"| {p['trial']} | {vals} | `{p['config']}` |")
    paths["table"] = out / "report.md"
    paths["table"].write_text("\n".join(lines) + "\n")
    return paths
