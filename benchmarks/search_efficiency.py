"""How many trials TPE, random search and a grid need to get within 2% of the exhaustive optimum.

    python benchmarks/search_efficiency.py [--preset 5m|100m] [--seeds 10] [--first-seed 0] [--layer-groups 1]
                                          [--target h100] [--batch 8] [--past 1024] [--out result.json]

Space: the pass knobs of the example decode step (attention pattern dense / window / block top-k with its
window, block size and top-k; KV-cache format; weight bits and group size; elementwise fusion) times the kernel
knobs of the Triton templates the graph will run (`lmforge.search.kernel_model`: the tile config of the
weight-only GEMM, which exists only when weights are quantized, of RMSNorm, SwiGLU, the split-K decode attention,
and of the flash kernel that a windowed decode runs). Objective: predicted latency of one decode step of the
example model at `--preset` (random weights; "5m" by default, "100m" is the setting where the knobs matter,
see docs/benchmarks.md) on the `--target` preset for 8 sequences with 1024 cached tokens (the cost model
with the kernel efficiency model, no quality term, so the optimum is well defined). `--layer-groups 2` tunes the
weight bits and group size separately for the first and the second half of the layers (as
`lmforge.tune(layer_groups=2)` does), which multiplies the pass configurations by 5.

Kernel knobs do not change the graph, only node costs, so each pass configuration's graph is built and priced
once (`kernel_table`: the time of its kernel nodes under every candidate config) and every kernel choice is a
sum of table entries: the whole space is evaluated exhaustively. The searches then look configurations up, so
they are compared on trials, not on wall time. Reported: the median over seeds of the trials each method needs,
and the exact chance that one random draw is within the tolerance (`Space.random_hit_probability`).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import optuna  # noqa: E402

from lmforge.passes import PassManager, canonical_pipeline, tunable_pipeline  # noqa: E402
from lmforge.passes.base import Knob  # noqa: E402
from lmforge.search.space import expand_per_group, suggest  # noqa: E402
from lmforge.search.tuner import make_sampler  # noqa: E402

TOPK = ("attn.decode_pattern", ("block_topk",))
PASS_SPACE = [
    Knob("attn.decode_pattern", "categorical", "dense", choices=("dense", "window", "block_topk")),
    Knob("attn.decode_window", "categorical", 256, choices=(64, 256, 1024),
         condition=("attn.decode_pattern", ("window", "block_topk"))),
    Knob("attn.block_size", "categorical", 32, choices=(16, 64), condition=TOPK),
    Knob("attn.topk_blocks", "categorical", 8, choices=(4, 16), condition=TOPK),
    Knob("quant.kv", "categorical", "none", choices=("none", "int8", "fp8")),
    Knob("quant.weight_bits", "categorical", 16, choices=(16, 8, 4)),
    Knob("quant.group_size", "categorical", 64, choices=(32, 64), condition=("quant.weight_bits", (8, 4))),
    Knob("fusion.elementwise", "bool", True, choices=(True, False)),
]
SERVING = {"batch": 8, "past": 1024}
PER_GROUP = ("quant.weight_bits", "quant.group_size")


def pass_space(groups: int) -> list[Knob]:
    return expand_per_group(PASS_SPACE, groups, PER_GROUP)


def applies(knob: Knob, config: dict) -> bool:
    """Whether a trial suggests `knob` given the other values (as lmforge.search.space.suggest decides: with
    per-group copies of the knob it depends on, when any group allows it)."""
    if knob.condition is None:
        return True
    dep, allowed = knob.condition
    values = [v for name, v in config.items() if name.startswith(dep + "@g")] or [config.get(dep)]
    return any(v in allowed for v in values)


def active(space, config: dict) -> tuple:
    """The knobs a trial of `space` suggests for `config` (inactive conditional knobs do not matter)."""
    out = {}
    for k in space:
        if applies(k, {**{j.name: j.default for j in space}, **config}):
            out[k.name] = config.get(k.name, k.default)
    return tuple(sorted(out.items()))


def pass_configs(space) -> list[dict]:
    out = {}
    names = [k.name for k in space]
    for values in itertools.product(*[k.choices for k in space]):
        cfg = dict(zip(names, values))
        out[active(space, cfg)] = dict(active(space, cfg))
    return list(out.values())


def build(groups: int = 1, aot: bool = True, preset: str = "5m", serving: dict | None = None,
          target: str = "h100"):
    """The base graph, the kernel knobs, and every pass configuration's kernel table."""
    serving = serving or SERVING
    import lmforge
    from examples.llama_workload import random_workload
    from lmforge.hwmodels import get_target
    from lmforge.search.kernel_model import kernel_knobs, kernel_table

    wl = random_workload(preset, phase="decode")
    base = PassManager(canonical_pipeline()).run(lmforge.capture(wl.model, wl.example_inputs, dynamic=wl.dynamic))
    hw = get_target(target)
    kknobs = kernel_knobs(base, tunable_pipeline(), hw, serving, PASS_SPACE)
    pm = PassManager(tunable_pipeline(), verify_each=False)
    space = pass_space(groups)
    tables = {}
    for cfg in pass_configs(space):
        tables[active(space, cfg)] = kernel_table(pm.run(base, cfg), hw, serving, aot=aot)
    return space, kknobs, tables


class Space:
    """Every configuration of pass knobs x kernel knobs, priced through the per-pass-config kernel tables."""

    def __init__(self, pass_knobs, kknobs, tables):
        self.pass_knobs = pass_knobs
        self.knobs = pass_knobs + kknobs
        self.kknobs = kknobs
        self.tables = tables

    def value(self, config: dict) -> float:
        table = self.tables[active(self.pass_knobs, config)]
        choice = {k.name.split(".", 1)[1]: config.get(k.name, k.default) for k in self.kknobs}
        return table.total(choice)

    def all_values(self) -> tuple[list[float], dict]:
        """The value of every distinct configuration (kernel knobs inactive under a pass config are left out),
        and the best configuration."""
        out, best, best_cfg = [], math.inf, {}
        for key, table in self.tables.items():
            cfg = dict(key)
            live = [k for k in self.kknobs if applies(k, cfg)]
            for combo in itertools.product(*[k.choices for k in live]):
                value = table.total({k.name.split(".", 1)[1]: v for k, v in zip(live, combo)})
                out.append(value)
                if value < best:
                    best, best_cfg = value, {**cfg, **{k.name: v for k, v in zip(live, combo)}}
        return out, best_cfg


    def random_hit_probability(self, target: float) -> float:
        """The chance that one random draw (knob by knob through the conditions, as RandomSampler and TPE's
        start-up trials sample) is within `target`: each pass configuration weighs the product of 1 / #choices
        over its active knobs, times the share of its kernel combinations within `target`."""
        p = 0.0
        for key, table in self.tables.items():
            cfg = dict(key)
            weight = math.prod(1 / len(k.choices) for k in self.pass_knobs if k.name in cfg)
            live = [k for k in self.kknobs if applies(k, cfg)]
            combos = list(itertools.product(*[k.choices for k in live]))
            hits = sum(table.total({k.name.split(".", 1)[1]: v for k, v in zip(live, combo)}) <= target
                       for combo in combos)
            p += weight * hits / len(combos)
        return p


def trials_to_target(values: list[float], target: float) -> int:
    for i, v in enumerate(values, 1):
        if v <= target:
            return i
    return len(values) + 1


def run_sampler(sampler, space: Space, target: float, max_trials: int) -> int:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=sampler)
    for i in range(1, max_trials + 1):
        trial = study.ask()
        value = space.value(suggest(trial, space.knobs))
        if math.isinf(value):  # a kernel config the target cannot launch: pruned, as lmforge.tune does
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            continue
        study.tell(trial, value)
        if value <= target:
            return i
    return max_trials + 1


SAMPLERS = {
    # lmforge.tune's own choice for one objective and a budget of 100 (multivariate, TPE_STARTUP start-up trials)
    "tpe (lmforge default)": lambda s: make_sampler(None, 1, 100, s),
    "tpe (multivariate, 10 startup: Optuna's default, lmforge's before)":
        lambda s: optuna.samplers.TPESampler(seed=s, multivariate=True, n_startup_trials=10),
    "tpe (multivariate, group)":
        lambda s: optuna.samplers.TPESampler(seed=s, multivariate=True, group=True, n_startup_trials=10),
    # (optuna 5's TPESampler is multivariate unless told otherwise)
    "tpe (multivariate, group, 5 startup)":
        lambda s: optuna.samplers.TPESampler(seed=s, multivariate=True, group=True, n_startup_trials=5),
    "tpe (independent, 10 startup)":
        lambda s: optuna.samplers.TPESampler(seed=s, multivariate=False, n_startup_trials=10),
    "random": lambda s: optuna.samplers.RandomSampler(seed=s),
}


def main(argv=None) -> int:
    import random

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--tolerance", type=float, default=0.02)
    p.add_argument("--max-trials", type=int, default=3000)
    p.add_argument("--layer-groups", type=int, default=1, help="per-layer-group weight bits / group size")
    p.add_argument("--no-aot", action="store_true", help="estimate kernel resources instead of AOT ptxas reports")
    p.add_argument("--target", default="h100", help="hardware preset the cost model prices for")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--preset", default="5m", help="example Llama preset (random weights): 5m | 100m")
    p.add_argument("--batch", type=int, default=SERVING["batch"])
    p.add_argument("--past", type=int, default=SERVING["past"], help="cached tokens per sequence")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    pass_knobs, kknobs, tables = build(args.layer_groups, aot=not args.no_aot, preset=args.preset,
                                       serving={"batch": args.batch, "past": args.past}, target=args.target)
    space = Space(pass_knobs, kknobs, tables)
    values, best_cfg = space.all_values()
    t_exh = time.perf_counter() - t0
    finite = [v for v in values if not math.isinf(v)]
    best = min(finite)
    target = best * (1 + args.tolerance)
    n = len(values)
    good = sum(v <= target for v in values)
    default = space.value({})
    print(f"space: {len(tables)} pass configurations x kernel knobs {[k.name for k in kknobs]} = {n} "
          f"configurations ({n - len(finite)} infeasible); exhaustive evaluation {t_exh:.1f} s")
    print(f"optimum {best * 1e6:.2f} us (default config {default * 1e6:.2f} us); {good} configurations "
          f"({100 * good / n:.2f} %) within {args.tolerance:.0%}")
    print(f"optimum: {best_cfg}")
    hit = space.random_hit_probability(target)
    print(f"a random draw is within {args.tolerance:.0%} with probability {hit:.4f} (median trials for random search "
          f"~ {math.log(0.5) / math.log(1 - hit):.1f})" if 0 < hit < 1 else f"random hit probability {hit}")
    results = {name: [] for name in (*SAMPLERS, "grid (shuffled enumeration)")}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for name, make in SAMPLERS.items():
            results[name].append(run_sampler(make(seed), space, target, args.max_trials))
        order = list(values)
        random.Random(seed).shuffle(order)
        results["grid (shuffled enumeration)"].append(trials_to_target(order, target))
    print(f"| method | median trials to within {args.tolerance:.0%} | mean | % of the space (median) | all seeds |")
    print("|---|---|---|---|---|")
    for name, vals in results.items():
        med = statistics.median(vals)
        print(f"| {name} | {med:.0f} | {statistics.mean(vals):.1f} | {100 * med / n:.3f}% | {vals} |")
    rnd = statistics.median(results["random"])
    for name in SAMPLERS:
        if name.startswith("tpe"):
            print(f"{name}: TPE / random = {statistics.median(results[name]) / rnd:.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"space": n, "pass_configs": len(tables), "optimum_s": best,
                                              "default_s": default, "within": good, "optimum": best_cfg, "random_hit_probability": hit, "exhaustive_s": t_exh,
                                              "trials": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
