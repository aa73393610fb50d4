"""Program search vs an exhaustive grid: best accuracy under a fixed eFLOPs budget, and evaluations used.

    python benchmarks/program_search.py --out docs/figures/program_search.png

Space (lmforge.programs.search.program_space): generator {tiny-early, tiny-mid} (the tiny recipe cut to 700 and
750 steps: weak models) x strategy {greedy, best_of_n (n; aggregator: majority vote | fuse by token vote | fuse
by the generative fuser model), first_finish (n), beam (width)} x max new tokens {4} x decode window {dense,
4 (+4 sinks)} x KV cache {fp32, int8} x weight-only bits {16, 8, 4} (pass knobs, applied to the generator's decode
step through lmforge's tunable pass pipeline). No oracle verifier (a deployable program has none; add it with
--oracle-verifier). The strong "tiny" model is outside the space; its greedy run is printed as a reference.
Dev set: held-out addition problems. eFLOPs per prompt on the H100 preset (tensor cost model over the token
accounting, the fuser's prefill of the k candidates included). Budget: --budget x the eFLOPs of greedy decoding
with a 16-bit generator. The grid evaluates every config on the whole dev set; the search (TPE, multi-fidelity
with the median pruner on 8 / 32 / 64 problems, budget as a constraint, half the trials random) is counted in
dev-problem evaluations and stops at 20 % of the grid's (or at --trials x the grid's configs).

--space ensemble searches a user-written program instead of the template: generate(tiny-early) and
generate(tiny-mid) -> ensemble -> vote, with the decoding lowering's knobs (lmforge.passes.decoding): each
generate node's strategy {greedy, best_of_n (n 2 / 4 / 8, majority vote), beam (width 2 / 4)} and each model's
weight-only bits {16, 8, 4}; budget in units of the program as written (both greedy, 16-bit).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from examples.models.tiny_task import EOS, make_problems  # noqa: E402
from examples.test_time_scaling import (capture_prefills, capture_steps, fuser_prefill,  # noqa: E402
                                        fuser_step, plot_front, register_task_functions, short, task_models)
from lmforge.hwmodels import get_target  # noqa: E402
from lmforge.programs.search import ProgramEvaluator, grid, grid_search, program_space, search  # noqa: E402

GENERATORS = ("tiny-early", "tiny-mid")


def describe(e) -> str:
    what = f"{e.config['program.model']} {short(e.config)}" if "program.model" in e.config else \
        " ".join(f"{k.split('.', 1)[1]}={v}" for k, v in sorted(e.config.items())
                 if not (k.endswith((".n", ".width")) and e.config[k.rsplit(".", 1)[0] + ".strategy"] !=
                         ("beam" if k.endswith(".width") else "best_of_n")))
    return (f"acc {e.accuracy:6.3f}  eFLOPs {e.eflops:10.3e}  Kinetics {e.kinetics_eflops:10.3e}  "
            f"latency {e.latency_s * 1e3:8.3f} ms  {what}")


def ensemble_program(steps: dict, eos: int):
    """The user-written program of --space ensemble, and its decoding knobs."""
    from lmforge.passes.decoding import decoding_knobs
    from lmforge.programs import ProgramBuilder

    b = ProgramBuilder("two_model_vote", steps)
    program = b.build(b.vote(b.ensemble(*(b.generate(m, max_new_tokens=4, eos_id=eos) for m in GENERATORS))))
    return program, decoding_knobs(program, strategies=("greedy", "best_of_n", "beam"), n_choices=(2, 4, 8),
                                   width_choices=(2, 4), weight_bits=(16, 8, 4))


GREEDY = {"program.strategy": "greedy", "program.n": 2, "program.aggregator": "vote", "program.width": 2,
          "program.max_new_tokens": 4, "attn.decode_window": 0, "quant.kv": "none", "quant.weight_bits": 16}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="program_search.png")
    ap.add_argument("--problems", type=int, default=64)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--budget", type=float, default=4.0, help="budget in units of a 16-bit greedy run's eFLOPs")
    ap.add_argument("--trials", type=float, default=0.5,
                    help="at most this fraction of the grid's configs as trials (the search also stops at 20 %% of "
                         "the grid's problem evaluations)")
    ap.add_argument("--oracle-verifier", action="store_true", help="add the task's perfect checker as aggregator")
    ap.add_argument("--cost", choices=("eflops", "latency"), default="eflops",
                    help="what the budget limits: eFLOPs per prompt, or predicted H100 latency per prompt with each "
                         "step's best Triton tile configs (the kernel knobs, tuned per program)")
    ap.add_argument("--prefill", action="store_true",
                    help="give every model its prefill graph (prompts and fuser inputs in one call, charged as one "
                         "prefill run) instead of feeding prompts through the decode step token by token")
    ap.add_argument("--space", choices=("template", "ensemble"), default="template",
                    help="the built-in program template, or a user-written two-model ensemble (see above)")
    ap.add_argument("--one-prompt-at-a-time", action="store_true",
                    help="run the programs prompt by prompt (before batching; same results) to time the difference")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    register_task_functions()
    models = task_models(GENERATORS + ("tiny",))
    steps = capture_steps(models)
    strong = steps.pop("tiny")
    fuser = fuser_step()
    pre = {}
    if args.prefill:
        prefills = capture_prefills(models)
        pre = dict(prefills=prefills, fuser_prefill=fuser_prefill())
    prompts, answers = make_problems(args.problems, seed=2024)
    hw = get_target("h100")
    scorer = "addition_checker" if args.oracle_verifier else ""
    space = program_space(list(GENERATORS), scorer=scorer, fuser=True, weight_bits=(16, 8, 4), max_new_choices=(4,))
    if args.space == "ensemble":
        program, space = ensemble_program(steps, EOS)

    latency = args.cost == "latency"
    cost_of = (lambda e: e.latency_s) if latency else (lambda e: e.eflops)
    unit = "s (predicted latency)" if latency else "eFLOPs"

    def make(gen_steps=steps):
        if args.space == "ensemble" and gen_steps is steps:
            return ProgramEvaluator(None, prompts, answers, hw, program=program, tune_tiles=latency,
                                    batch_prompts=not args.one_prompt_at_a_time)
        return ProgramEvaluator(gen_steps, prompts, answers, hw, eos_id=EOS, scorer=scorer, fuser=fuser,
                                tune_tiles=latency, batch_prompts=not args.one_prompt_at_a_time, **pre)

    def budgets(limit):
        return {"budget_latency_s": limit} if latency else {"budget_eflops": limit}

    ev_grid = make()
    greedy = ev_grid({} if args.space == "ensemble" else {**GREEDY, "program.model": GENERATORS[0]})
    budget = args.budget * cost_of(greedy)
    ref = make({"tiny": strong})({**GREEDY, "program.model": "tiny"})
    print(f"reference outside the space: tiny greedy acc {ref.accuracy:.3f} at {cost_of(ref):.3e} {unit}/prompt "
          f"({cost_of(ref) / budget:.2f}x the budget)")
    if args.space == "ensemble":
        print(f"the program as written (both greedy, 16-bit): acc {greedy.accuracy:.3f}")
    else:
        for m in GENERATORS:
            print(f"{m} greedy: acc {ev_grid({**GREEDY, 'program.model': m}).accuracy:.3f}")
    t0 = time.perf_counter()
    g = grid_search(ev_grid, space, **budgets(budget))
    t_grid = time.perf_counter() - t0
    n_configs = len(grid(space))
    trials = int(n_configs * args.trials)
    max_problems = int(0.2 * g.problems_evaluated) - args.problems  # stop in time to finish the last trial
    print(f"grid: {n_configs} configs x {args.problems} problems = {g.problems_evaluated} problem evaluations, "
          f"{t_grid:.0f} s; budget {budget:.3e} {unit}/prompt ({args.budget:g}x greedy, 16-bit)")
    print(f"grid best under budget: {describe(g.best)}")
    print("grid Pareto front (all configs):")
    for e in g.front:
        print("  " + describe(e))
    gaps, fracs = [], []
    for seed in range(args.seeds):
        ev = make()
        ev.cache = ev_grid.cache  # generations are cached across runs; evaluations are counted per run
        t0 = time.perf_counter()
        s = search(ev, space, n_trials=trials, seed=seed, fidelities=(8, args.problems // 2, args.problems),
                   max_problems=max_problems, startup_trials=trials // 2, **budgets(budget))
        dt = time.perf_counter() - t0
        gap = (g.best.accuracy - (s.best.accuracy if s.best else 0.0)) * 100
        frac = s.problems_evaluated / g.problems_evaluated
        gaps.append(gap)
        fracs.append(frac)
        print(f"search seed {seed}: {s.trials} trials ({s.pruned} pruned), {s.problems_evaluated} problem evaluations "
              f"= {frac:.1%} of the grid's; {dt:.0f} s; best {describe(s.best) if s.best else None}; "
              f"gap {gap:.1f} points")
    ok = statistics.median(gaps) <= 1.0 and statistics.median(fracs) <= 0.20
    print(f"median over {args.seeds} seeds: gap {statistics.median(gaps):.1f} points, "
          f"{statistics.median(fracs):.1%} of the grid's evaluations -> goal (<= 1 point, <= 20 %) "
          f"{'met' if ok else 'NOT met'}")
    if latency:
        print("(no plot with --cost latency: the figure is the eFLOPs front)")
        return
    if args.space == "ensemble":
        by_model = {"two-model ensemble": g.evaluations}
    else:
        by_model = {m: [e for e in g.evaluations if e.config["program.model"] == m] for m in steps}
    plot_front(by_model, args.out, "Program search space: accuracy vs eFLOPs (H100 cost model)", budget=budget)
    print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
