"""Test-time scaling on the 2-digit addition task: search the front of accuracy vs eFLOPs on H100.

    python examples/test_time_scaling.py --out docs/figures/test_time_scaling.png

Models: "tiny" (the trained task model, about 99% greedy accuracy) and "tiny-early" (the same preset
trained for fewer steps, an earlier and weaker model: trained once, about 20 s, cached), so that
test-time scaling has room to show. Best-of-k's aggregators: majority vote, fuse by a token vote, fuse by the
generative fuser model (examples/models/fuser_task.py), and the task's perfect verifier (an oracle). Accuracy is measured by running each program on held-out problems;
eFLOPs per prompt are predicted on the H100 preset from the token accounting.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

try:
    import examples.models.llama  # noqa: F401
except ImportError:
    sys.modules.pop("examples", None)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples.models.tiny_task import ANSWER_LEN, encode  # noqa: E402
from lmforge.programs import register_function  # noqa: E402


def addition_checker(prompt: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """1.0 for each candidate row [k, T] whose first ANSWER_LEN tokens are the right answer to prompt [6]."""
    digits = prompt.tolist()
    a, b = digits[0] * 10 + digits[1], digits[3] * 10 + digits[4]
    _, answer = encode(torch.tensor([a]), torch.tensor([b]))
    if candidates.shape[1] < ANSWER_LEN:
        return torch.zeros(candidates.shape[0])
    return (candidates[:, :ANSWER_LEN] == answer).all(1).float()


EARLY_STEPS = 700  # the "tiny-early" checkpoint: the tiny recipe cut short
CUT_SHORT = {"tiny-early": EARLY_STEPS, "tiny-mid": 750}   # weaker "tiny" models: the recipe cut to these steps


def task_models(names=("tiny-early", "tiny")) -> dict:
    """name -> trained Llama; "tiny-early" / "tiny-mid" are trained with the tiny recipe cut to CUT_SHORT steps
    (cached like the task models)."""
    from dataclasses import replace

    from examples.models.llama import LlamaConfig
    from examples.models.tiny_task import RECIPES, load_or_train, load_or_train_cached, recipe_hash, train_and_describe
    from lmforge.cache import cache_dir

    out = {}
    for name in names:
        if name not in CUT_SHORT:
            out[name] = load_or_train(name)
            continue
        config, recipe = LlamaConfig.preset("tiny"), replace(RECIPES["tiny"], steps=CUT_SHORT[name])
        stem = cache_dir("models") / f"tiny_task-{recipe_hash(config, recipe)}"
        out[name] = load_or_train_cached(config, stem, lambda: train_and_describe(config, recipe))
    return out


def fuser_step():
    """The decode step of the task's generative fuser (examples/models/fuser_task.py; trained once, cached)."""
    from examples.models.fuser_task import load_or_train_fuser

    return capture_steps({"fuser": load_or_train_fuser()})["fuser"]


def capture_prefills(models: dict) -> dict:
    """name -> the captured prefill graph (dynamic batch and sequence), for ProgramEvaluator(prefills=...)."""
    from examples.llama_workload import PREFILL_DYNAMIC
    from examples.models.llama import LlamaPrefill
    from examples.models.tiny_task import make_problems
    from lmforge.ir.frontends.torch_export import capture

    prompts, _ = make_problems(2, seed=0)
    return {name: capture(LlamaPrefill(m), (prompts,), dynamic=PREFILL_DYNAMIC) for name, m in models.items()}


def fuser_prefill():
    """The fuser's prefill graph (reads prompt + candidates in one call)."""
    from examples.models.fuser_task import load_or_train_fuser

    return capture_prefills({"fuser": load_or_train_fuser()})["fuser"]


def capture_steps(models: dict) -> dict:
    """name -> the captured decode-step graph (dynamic batch and cache length)."""
    from examples.llama_workload import DECODE_DYNAMIC, decode_inputs
    from examples.models.llama import LlamaDecodeStep
    from examples.models.tiny_task import make_problems
    from lmforge.ir.frontends.torch_export import capture

    prompts, _ = make_problems(2, seed=0)
    return {name: capture(LlamaDecodeStep(m), decode_inputs(m, prompts, 5), dynamic=DECODE_DYNAMIC)
            for name, m in models.items()}


def plot_front(points_by_model: dict, path: str, title: str, budget: float | None = None) -> None:
    """Accuracy vs eFLOPs per prompt, all evaluated configs faint, the Pareto front as a line (and the budget)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmforge.programs.search import pareto_front

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, evals in points_by_model.items():
        pts = ax.scatter([e.eflops for e in evals], [e.accuracy for e in evals], s=10, alpha=0.3)
        front = pareto_front(evals)
        ax.plot([e.eflops for e in front], [e.accuracy for e in front], "o-", color=pts.get_facecolor()[0][:3],
                label=f"{name} front")
    if budget is not None:
        ax.axvline(budget, color="grey", linestyle="--", label="budget")
    ax.set_xscale("log")
    ax.set_xlabel("eFLOPs per prompt on H100 (tensor cost model)")
    ax.set_ylabel("exact-match accuracy (measured)")
    ax.set_title(title)
    ax.legend()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def main(argv=None) -> None:
    import argparse

    from examples.models.tiny_task import EOS, make_problems
    from lmforge.hwmodels import get_target
    from lmforge.programs.search import ProgramEvaluator, grid, pareto_front, program_space

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="test_time_scaling.png")
    ap.add_argument("--problems", type=int, default=64)
    ap.add_argument("--prefill", action="store_true",
                    help="give every model its prefill graph: prompts (and the fuser's inputs) in one call")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    register_task_functions()
    models = task_models()
    steps = capture_steps(models)
    prompts, answers = make_problems(args.problems, seed=2024)
    pre = dict(prefills=capture_prefills(models), fuser_prefill=fuser_prefill()) if args.prefill else {}
    ev = ProgramEvaluator(steps, prompts, answers, get_target("h100"), eos_id=EOS, scorer="addition_checker",
                          fuser=fuser_step(), **pre)
    by_model = {}
    for name in steps:
        space = program_space([name], scorer="addition_checker", windows=(0,), kv=("none",), fuser=True)
        by_model[name] = [ev(c) for c in grid(space)]
        print(f"\n{name}: front of accuracy vs eFLOPs per prompt (H100)")
        for e in pareto_front(by_model[name]):
            print(f"  acc {e.accuracy:6.3f}  eFLOPs {e.eflops:10.3e}  Kinetics {e.kinetics_eflops:10.3e}  "
                  f"{short(e.config)}")
        print(f"{name}: best-of-k aggregators, max_new_tokens 4 (accuracy / eFLOPs per prompt)")
        print(f"  {'k':>3} {'majority vote':>22} {'fuse: token vote':>22} {'fuse: fuser model':>22} "
              f"{'oracle verifier':>22}")
        greedy = [e for e in by_model[name] if e.config["program.strategy"] == "greedy"
                  and e.config["program.max_new_tokens"] == 4][0]
        print(f"  greedy: {greedy.accuracy:.3f} / {greedy.eflops:.3e}")
        for n in (2, 4, 8, 16):
            row = {e.config["program.aggregator"]: e for e in by_model[name]
                   if e.config["program.strategy"] == "best_of_n" and e.config["program.n"] == n
                   and e.config["program.max_new_tokens"] == 4}
            print(f"  {n:>3} " + " ".join(f"{row[a].accuracy:>12.3f} / {row[a].eflops:.3e}"
                                          for a in ("vote", "fuse_vote", "fuser", "scorer")))
    plot_front(by_model, args.out, "Test-time scaling on 2-digit addition (H100 cost model)")
    print(f"plot: {args.out}")


def short(config: dict) -> dict:
    """The knobs of a config that matter for it, without their prefixes (for printing)."""
    s = config.get("program.strategy")
    drop = {"program.model"}
    if s not in ("best_of_n", "first_finish"):
        drop.add("program.n")
    if s != "best_of_n":
        drop.add("program.aggregator")
    if s != "beam":
        drop.add("program.width")
    return {k.split(".")[-1]: v for k, v in config.items() if k not in drop}


def register_task_functions() -> None:
    """Register the task's perfect verifier as `addition_checker` (programs name it; see docs/programs.md)."""
    register_function("addition_checker", addition_checker, kind="checker")


if __name__ == "__main__":
    main()
