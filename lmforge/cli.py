"""The `lmforge` command line (also `python -m lmforge`).

    lmforge inspect WORKLOAD [--target h100] [--knobs] [--print-after PASS|all]
    lmforge compile WORKLOAD [--target h100] [--backend torch]
    lmforge tune WORKLOAD --target h100 --budget 100 [--objective latency --objective quality] [--out DIR]
    lmforge report [--study NAME] [--out DIR]
    lmforge export WORKLOAD --target h100 --out DIR [--config best]
    lmforge run ARTIFACT [--device cpu] [--dim batch=4]
    lmforge calibrate [--target host]
    lmforge targets [show NAME]

WORKLOAD is `path/to/file.py` (its `workload()` function), `file.py:function`, or `package.module:function`;
the function returns a `lmforge.Workload` (see README).
"""
from __future__ import annotations

import argparse
import sys

from lmforge.errors import LmforgeError


def _load(spec: str):
    from lmforge.workload import load_workload

    return load_workload(spec)


def cmd_inspect(args) -> int:
    import lmforge

    wl = _load(args.workload)
    compiled = lmforge.compile(wl.model, wl.example_inputs, dynamic=wl.dynamic, target=args.target)
    print(compiled.inspect(target=args.target))
    if args.knobs:
        from lmforge.passes import default_pipeline, PassManager

        knobs = PassManager(default_pipeline()).knobs()
        print("\nknobs:" if knobs else "\nknobs: none (the default pipeline exposes no tunable knobs yet)")
        for k in knobs:
            print("  " + k.describe())
    return 0


def cmd_compile(args) -> int:
    import lmforge

    wl = _load(args.workload)
    compiled = lmforge.compile(wl.model, wl.example_inputs, dynamic=wl.dynamic, target=args.target,
                               backends=tuple(args.backend))
    out = compiled(*wl.example_inputs)
    print(compiled.pass_report)
    counts: dict[str, int] = {}
    for k in compiled.kernels:
        counts[k.backend] = counts.get(k.backend, 0) + 1
    print(f"compiled {compiled.graph.name}: {len(compiled.graph.nodes)} nodes, backends {counts}, "
          f"{len(compiled.fallback_nodes())} torch_fallback nodes; ran the example inputs "
          f"({type(out).__name__} output)")
    return 0


def cmd_tune(args) -> int:
    from lmforge.search.report import write_report
    from lmforge.search.tuner import tune

    wl = _load(args.workload)
    constraints = {}
    if args.min_quality is not None:
        constraints["quality"] = args.min_quality
    if args.fits:
        constraints["fits"] = True
    pipeline = None
    if args.max_tp > 1:  # the tensor-parallel pass joins the tunable ones: knob shard.tp in 1, 2, ..., max_tp
        from lmforge.passes import tunable_pipeline
        from lmforge.passes.shard import tensor_parallel_pass

        pipeline = tunable_pipeline() + [tensor_parallel_pass(args.max_tp)]
    result = tune(wl, target=args.target, objectives=tuple(args.objective or ["latency"]), budget=args.budget,
                  mode=args.mode, storage=args.storage, constraints=constraints or None, seed=args.seed,
                  warm_start_from=args.warm_start_from, sampler=args.sampler, pipeline=pipeline)
    print(f"study {result.study_name} in {result.storage}: {result.n_complete} trials finished, "
          f"{result.n_failed} failed")
    print("Pareto front:" if len(result.objectives) > 1 else "best:")
    print(result.table())
    print(f"best config: {result.best_config}")
    if args.out:
        paths = write_report(result.study, args.out)
        print("report: " + ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_report(args) -> int:
    import optuna

    from lmforge.search.report import write_report
    from lmforge.search.tuner import default_storage

    storage = args.storage or default_storage()
    names = [s.study_name for s in optuna.get_all_study_summaries(storage=storage)]
    if args.study is None:
        print("studies:\n" + "\n".join(f"  {n}" for n in names) if names else f"no studies in {storage}")
        return 0
    matches = [n for n in names if args.study in n]
    if len(matches) != 1:
        raise LmforgeError(f"{len(matches)} studies match {args.study!r} in {storage}: give a unique part of "
                           f"one of {names}")
    paths = write_report(optuna.load_study(study_name=matches[0], storage=storage), args.out)
    print("report: " + ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_export(args) -> int:
    from lmforge.export import export_workload

    path = export_workload(args.workload, args.target, args.out, config=args.config, gpu_kernels=args.kernels)
    print(f"artifact written to {path}")
    return 0


def cmd_run(args) -> int:
    """Load an artifact (validating every file) and run it once on random inputs of its input types."""
    import torch

    import lmforge
    from lmforge.artifact import inspect_artifact
    from lmforge.ir.types import eval_dim, torch_dtype

    manifest = inspect_artifact(args.artifact)
    model = lmforge.load(args.artifact, device=args.device, kernels=args.kernels)
    dims = dict(model.graph.get_meta("example_dims") or ())
    for item in args.dim or []:
        name, _, value = item.partition("=")
        dims[name] = int(value)
    inputs = []
    for v in model.graph.inputs:
        shape = [eval_dim(d, dims) for d in v.type.shape]
        dtype = torch_dtype(v.type.dtype)
        inputs.append(torch.randint(0, 2, shape, dtype=dtype, device=args.device) if not dtype.is_floating_point
                      else torch.randn(shape, device=args.device))
    out = model(*inputs)
    leaves = [x for x in torch.utils._pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]
    print(f"{manifest.get('name')}: ran on {args.device} with inputs "
          f"{[tuple(x.shape) for x in inputs]} -> outputs {[tuple(x.shape) for x in leaves]}")
    return 0


def cmd_calibrate(args) -> int:
    """Time op instances on the machine at hand, fit the target's efficiency factors, save them."""
    import torch

    from lmforge.hwmodels import get_target
    from lmforge.hwmodels.calibrate import calibrate

    if args.threads:
        torch.set_num_threads(args.threads)
    hw = get_target(args.target)
    cal = calibrate(hw, progress=True)
    print(f"calibrated {hw.name} ({len(cal.samples)} op instances); saved for fingerprint {cal.hw_fingerprint}")
    for cls, (ec, em) in sorted(cal.efficiency.items()):
        print(f"  {cls:<12} compute efficiency {ec:5.2f}  memory efficiency {em:5.2f}")
    print(f"  launch overhead {cal.launch_overhead_s * 1e6:.2f} us")
    return 0


def cmd_targets(args) -> int:
    from lmforge.hwmodels import get_target, targets

    if args.action == "show":
        if not args.name:
            raise LmforgeError("`lmforge targets show` needs a target name, e.g. `lmforge targets show h100`")
        hw = get_target(args.name)
        print(hw.describe() if hasattr(hw, "describe") else hw)
        return 0
    for hw in targets():
        print(hw.summary() if hasattr(hw, "summary") else hw.name)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmforge", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser("inspect", help="print the graph, who runs each node and its cost")
    i.add_argument("workload")
    i.add_argument("--target", default="host")
    i.add_argument("--knobs", action="store_true", help="list the knobs of the pass pipeline")
    i.add_argument("--print-after", default=None, help="print the IR after this pass (or 'all')")
    i.set_defaults(fn=cmd_inspect)
    c = sub.add_parser("compile", help="compile a workload and run its example inputs")
    c.add_argument("workload")
    c.add_argument("--target", default="host")
    c.add_argument("--backend", action="append", default=[], help="backend in priority order (repeatable)")
    c.set_defaults(fn=cmd_compile)
    tu = sub.add_parser("tune", help="search the knobs of a workload for a target (Optuna)")
    tu.add_argument("workload")
    tu.add_argument("--target", default="h100")
    tu.add_argument("--budget", type=int, default=50, help="number of finished trials to reach")
    tu.add_argument("--objective", action="append", help="latency|throughput|memory|quality|kl|accuracy "
                                                         "(repeat for a Pareto front)")
    tu.add_argument("--mode", default="predict", choices=["predict", "measure", "hybrid"])
    tu.add_argument("--storage", default=None, help="Optuna storage URL (default: SQLite in the cache)")
    tu.add_argument("--min-quality", type=float, default=None, help="constraint: top-1 agreement >= this")
    tu.add_argument("--fits", action="store_true", help="constraint: peak memory fits the target")
    tu.add_argument("--sampler", default=None, choices=["tpe", "nsga2", "gp", "random"])
    tu.add_argument("--seed", type=int, default=0)
    tu.add_argument("--warm-start-from", default=None, help="enqueue the best configs found for this target")
    tu.add_argument("--out", default=None, help="write the report (Pareto plot, table) here")
    tu.add_argument("--max-tp", type=int, default=1,
                    help="also search tensor parallelism over up to this many GPUs (knob shard.tp; default 1: off)")
    tu.set_defaults(fn=cmd_tune)
    r = sub.add_parser("report", help="write the Pareto plot and table of a tuning study")
    r.add_argument("--study", default=None, help="part of the study name (omit to list studies)")
    r.add_argument("--storage", default=None)
    r.add_argument("--out", default="lmforge-report")
    r.set_defaults(fn=cmd_report)
    e = sub.add_parser("export", help="compile a workload for a target and write an artifact directory")
    e.add_argument("workload")
    e.add_argument("--target", default="h100")
    e.add_argument("--out", required=True)
    e.add_argument("--config", default=None, choices=[None, "best"], help="'best': the tuned config for the target")
    e.add_argument("--kernels", action="store_true",
                   help="also build the target GPU's kernels: Triton PTX/cubin (launched by `run --device cuda` on "
                        "that GPU) and TVM CUDA source")
    e.set_defaults(fn=cmd_export)
    ru = sub.add_parser("run", help="load an artifact (checking every file) and run it on random inputs")
    ru.add_argument("artifact")
    ru.add_argument("--device", default="cpu")
    ru.add_argument("--kernels", default="auto", choices=["auto", "required", "none"],
                    help="on a GPU: launch the artifact's cubins when one matches the GPU (auto: else the torch "
                         "reference with a warning; required: else an error; none: always the reference)")
    ru.add_argument("--dim", action="append", help="value of a symbolic dim, e.g. --dim batch=4")
    ru.set_defaults(fn=cmd_run)
    ca = sub.add_parser("calibrate", help="fit the cost model's efficiency factors by timing ops here")
    ca.add_argument("--target", default="host", help="host, or the GPU preset of the GPU in this machine")
    ca.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a shared machine)")
    ca.set_defaults(fn=cmd_calibrate)
    t = sub.add_parser("targets", help="list hardware targets, or `targets show NAME`")
    t.add_argument("action", nargs="?", choices=["list", "show"], default="list")
    t.add_argument("name", nargs="?")
    t.set_defaults(fn=cmd_targets)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "print_after", None):
        import os

        os.environ["LMFORGE_PRINT_AFTER"] = args.print_after
    try:
        return args.fn(args)
    except LmforgeError as e:
        print(f"lmforge: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
