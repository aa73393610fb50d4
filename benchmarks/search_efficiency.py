"""How many trials TPE, random search and a grid need to get within 2% of the exhaustive optimum.

    python benchmarks/search_efficiency.py [--seeds 10] [--out result.json]

Space: the example decode step's attention pattern (dense / window / block top-k with window, block size and
top-k), KV-cache format, weight bits and group size, and the two fusion knobs: 3,960 configurations with the
conditions applied. Objective: predicted latency of one decode step of the "5m" example model (random weights)
on the H100 preset for 8 sequences with 1024 cached tokens (the cost model, no quality term, so the optimum is well defined). Every configuration is
evaluated once up front (the exhaustive optimum); the searches then look configurations up in that table, so
they are compared on trials, not on wall time. Reported: the median over seeds of the trials each method needs.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import optuna  # noqa: E402

from lmforge.passes import PassManager, canonical_pipeline, tunable_pipeline  # noqa: E402
from lmforge.passes.base import Knob  # noqa: E402
from lmforge.search.space import suggest  # noqa: E402

TOPK = ("attn.decode_pattern", ("block_topk",))
SPACE = [
    Knob("attn.decode_pattern", "categorical", "dense", choices=("dense", "window", "block_topk")),
    Knob("attn.decode_window", "categorical", 256, choices=(64, 128, 256, 512, 1024),
         condition=("attn.decode_pattern", ("window", "block_topk"))),
    Knob("attn.block_size", "categorical", 32, choices=(16, 32, 64), condition=TOPK),
    Knob("attn.topk_blocks", "categorical", 8, choices=(4, 8, 16, 32), condition=TOPK),
    Knob("quant.kv", "categorical", "none", choices=("none", "int8", "fp8")),
    Knob("quant.weight_bits", "categorical", 16, choices=(16, 8, 4)),
    Knob("quant.group_size", "categorical", 64, choices=(32, 64), condition=("quant.weight_bits", (8, 4))),
    Knob("fusion.merge_linears", "bool", True, choices=(True, False)),
    Knob("fusion.elementwise", "bool", True, choices=(True, False)),
]


SERVING = {"batch": 8, "past": 1024}


def key(config: dict) -> tuple:
    """The active knobs of a config (inactive conditional knobs do not matter)."""
    active = {}
    for k in SPACE:
        if k.condition is None or config.get(k.condition[0]) in k.condition[1]:
            active[k.name] = config.get(k.name, k.default)
    return tuple(sorted(active.items()))


def enumerate_space() -> list[dict]:
    out = {}
    names = [k.name for k in SPACE]
    for values in itertools.product(*[k.choices for k in SPACE]):
        cfg = dict(zip(names, values))
        out[key(cfg)] = dict(key(cfg))
    return list(out.values())


def exhaustive(configs: list[dict]) -> dict[tuple, float]:
    from examples.llama_workload import random_workload
    import lmforge
    from lmforge.hwmodels import get_target
    from lmforge.search.cost_model import graph_cost

    wl = random_workload("5m", phase="decode")
    base = PassManager(canonical_pipeline()).run(lmforge.capture(wl.model, wl.example_inputs, dynamic=wl.dynamic))
    hw = get_target("h100")
    pm = PassManager(tunable_pipeline(), verify_each=False)
    table = {}
    for cfg in configs:
        table[key(cfg)] = graph_cost(pm.run(base, cfg), hw, SERVING).time_s
    return table


def trials_to_target(values: list[float], target: float) -> int:
    for i, v in enumerate(values, 1):
        if v <= target:
            return i
    return len(values) + 1


def run_sampler(sampler, table, target, max_trials) -> int:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=sampler)
    seen = []
    for _ in range(max_trials):
        trial = study.ask()
        value = table[key(suggest(trial, SPACE))]
        study.tell(trial, value)
        seen.append(value)
        if value <= target:
            break
    return trials_to_target(seen, target)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--tolerance", type=float, default=0.02)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import random

    configs = enumerate_space()
    t0 = time.perf_counter()
    table = exhaustive(configs)
    t_exh = time.perf_counter() - t0
    best = min(table.values())
    target = best * (1 + args.tolerance)
    n = len(table)
    good = sum(v <= target for v in table.values())
    print(f"space: {n} configurations, exhaustive evaluation {t_exh:.1f} s; optimum {best * 1e6:.2f} us; "
          f"{good} configurations within {args.tolerance:.0%}")
    results = {"tpe": [], "random": [], "grid": []}
    for seed in range(args.seeds):
        results["tpe"].append(run_sampler(optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=10),
                                          table, target, n))
        results["random"].append(run_sampler(optuna.samplers.RandomSampler(seed=seed), table, target, n))
        order = list(table.values())
        random.Random(seed).shuffle(order)
        results["grid"].append(trials_to_target(order, target))
    print(f"| method | median trials to within {args.tolerance:.0%} | % of the space | all seeds |")
    print("|---|---|---|---|")
    for name, vals in results.items():
        med = statistics.median(vals)
        print(f"| {name} | {med:.0f} | {100 * med / n:.1f}% | {vals} |")
    tpe, rnd = statistics.median(results["tpe"]), statistics.median(results["random"])
    print(f"TPE / random = {tpe / rnd:.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"space": n, "optimum_s": best, "within": good,
                                              "exhaustive_s": t_exh, "trials": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
