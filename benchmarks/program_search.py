"""Program search vs an exhaustive grid: best accuracy under a fixed eFLOPs budget, and evaluations used.

    python benchmarks/program_search.py --out docs/figures/program_search.png

Space: model {tiny-early, tiny} x strategy {greedy, best_of_n (n, vote | perfect verifier), first_finish (n),
beam (width)} x max new tokens {3, 4} x decode window {dense, 4 (+4 sinks)} x KV cache {fp32, int8}
(lmforge.programs.search.program_space). Dev set: held-out addition problems. eFLOPs per prompt on the H100
preset (tensor cost model over the token accounting). Budget: 4x the eFLOPs of greedy decoding with "tiny".
The grid evaluates every config on the whole dev set; the search (TPE, multi-fidelity with the median
pruner) is counted in dev-problem evaluations, and its trial count is <= 20% of the grid's configs.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples.models.tiny_task import EOS, make_problems  # noqa: E402
from examples.test_time_scaling import capture_steps, plot_front, register_task_functions, task_models  # noqa: E402
from lmforge.hwmodels import get_target  # noqa: E402
from lmforge.programs.search import ProgramEvaluator, grid, grid_search, program_space, search  # noqa: E402


def describe(e) -> str:
    knobs = {k.split(".")[-1]: v for k, v in e.config.items()}
    return f"acc {e.accuracy:6.3f}  eFLOPs {e.eflops:10.3e}  Kinetics {e.kinetics_eflops:10.3e}  {knobs}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="program_search.png")
    ap.add_argument("--problems", type=int, default=64)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args(argv)
    register_task_functions()
    steps = capture_steps(task_models())
    prompts, answers = make_problems(args.problems, seed=2024)
    hw = get_target("h100")
    space = program_space(list(steps), scorer="addition_checker")
    make = lambda: ProgramEvaluator(steps, prompts, answers, hw, eos_id=EOS, scorer="addition_checker")  # noqa: E731
    ev_grid = make()
    greedy = ev_grid({"program.model": "tiny", "program.strategy": "greedy", "program.n": 2,
                      "program.aggregator": "vote", "program.width": 2, "program.max_new_tokens": 4,
                      "attn.decode_window": 0, "quant.kv": "none"})
    budget = 4 * greedy.eflops
    t0 = time.perf_counter()
    g = grid_search(ev_grid, space, budget)
    t_grid = time.perf_counter() - t0
    n_configs = len(grid(space))
    trials = n_configs // 5
    print(f"grid: {n_configs} configs x {args.problems} problems = {g.problems_evaluated} problem evaluations, "
          f"{t_grid:.0f} s; budget {budget:.3e} eFLOPs/prompt (4x greedy tiny)")
    print(f"grid best under budget: {describe(g.best)}")
    print("grid Pareto front (all configs):")
    for e in g.front:
        print("  " + describe(e))
    for seed in range(args.seeds):
        ev = make()
        ev.cache = ev_grid.cache  # generations are cached across runs; evaluations are counted per run
        t0 = time.perf_counter()
        s = search(ev, space, budget, n_trials=trials, seed=seed)
        dt = time.perf_counter() - t0
        gap = (g.best.accuracy - (s.best.accuracy if s.best else 0.0)) * 100
        print(f"search seed {seed}: {trials} trials ({s.pruned} pruned) = {trials / n_configs:.0%} of the grid's "
              f"configs, {s.problems_evaluated} problem evaluations = {s.problems_evaluated / g.problems_evaluated:.1%}"
              f" of the grid's; {dt:.0f} s; best {describe(s.best) if s.best else None}; gap {gap:.1f} points")
    by_model = {m: [e for e in g.evaluations if e.config["program.model"] == m] for m in steps}
    plot_front(by_model, args.out, "Program search space: accuracy vs eFLOPs (H100 cost model)")
    print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
