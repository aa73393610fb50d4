"""The `lmforge` command line (also `python -m lmforge`).

    lmforge inspect WORKLOAD [--target h100] [--knobs] [--print-after PASS|all] [--threads N]
    lmforge compile WORKLOAD [--target h100] [--backend torch] [--threads N]
    lmforge tune WORKLOAD --target h100 --budget 100 [--objective latency --objective quality] [--out DIR]
                 [--mode predict|measure|hybrid] [--threads N]
    lmforge report [--study NAME] [--out DIR]
    lmforge export WORKLOAD --target h100 --out DIR [--config best|JSON|FILE] [--study NAME] [--kernels]
                   [--kernel-targets a100,l40s]
    lmforge run ARTIFACT [--device cpu] [--dim batch=4]
    lmforge calibrate [--target host] [--threads N]
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


def _set_threads(args) -> None:
    """`--threads N`: torch's CPU thread count for this command. The host target's fingerprint includes it, so a
    calibration made with `calibrate --threads N` applies to commands run with the same `--threads N`."""
    threads = getattr(args, "threads", None)
    if threads is None:
        return
    if threads < 1:
        raise LmforgeError(f"--threads must be >= 1, not {threads}")
    import torch

    torch.set_num_threads(threads)


def _check_target(name: str):
    """The target's Hardware, or a TargetError naming the known targets (before any slow work)."""
    from lmforge.hwmodels import get_target

    return get_target(name)


def _check_out(path) -> None:
    """An --out path must be a folder or not exist yet (checked before a long tuning run, not after)."""
    import os

    if path and os.path.exists(path) and not os.path.isdir(path):
        raise LmforgeError(f"--out {path!r} exists and is not a folder; the report is a folder of files "
                           "(pareto.png, history.png, report.md): give a new or existing folder")


def _pass_names() -> list[str]:
    from lmforge.passes import default_pipeline

    return list(dict.fromkeys(p.name for p in default_pipeline()))


def cmd_inspect(args) -> int:
    import os

    import lmforge

    _set_threads(args)
    _check_target(args.target)
    if args.print_after:
        names = _pass_names()
        unknown = [n for n in args.print_after.split(",") if n not in names and n != "all"]
        if unknown:
            raise LmforgeError(f"--print-after: no pass named {', '.join(map(repr, unknown))}; the passes are "
                               f"{', '.join(names)} (or 'all', or several separated by commas)")
    wl = _load(args.workload)
    before = os.environ.get("LMFORGE_PRINT_AFTER")
    if args.print_after:
        os.environ["LMFORGE_PRINT_AFTER"] = args.print_after
    try:
        compiled = lmforge.compile(wl.model, wl.example_inputs, dynamic=wl.dynamic, target=args.target)
    finally:  # only this compile prints: not the capture that --knobs runs below
        if before is None:
            os.environ.pop("LMFORGE_PRINT_AFTER", None)
        else:
            os.environ["LMFORGE_PRINT_AFTER"] = before
    print(compiled.inspect(target=args.target))
    if args.knobs:
        from lmforge.passes import PassManager
        from lmforge.search.tuner import prepare

        _, graph, pipeline, _ = prepare(wl)  # the graph and pipeline `lmforge tune` searches
        everything = PassManager(pipeline).knobs()
        knobs = PassManager(pipeline).knobs(graph)
        print("\nknobs (those that can change this graph; `lmforge tune` searches them):" if knobs
              else "\nknobs: none of the pipeline's knobs can change this graph")
        for k in knobs:
            print("  " + k.describe())
        other = [k.name for k in everything if k.name not in {k.name for k in knobs}]
        if other:
            print(f"  ({len(other)} more knobs of the pipeline have no effect on this graph: {', '.join(other)})")
    return 0


def cmd_compile(args) -> int:
    import os

    import torch

    import lmforge

    _set_threads(args)
    _check_target(args.target)
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
    for name in dict.fromkeys(args.backend):
        if name == "torch" or counts.get(name):
            continue
        if name == "triton" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            why = ("Triton kernels run on a CUDA GPU and this machine has none, so the torch reference ran every "
                   "node (TRITON_INTERPRET=1 runs them, slowly, under Triton's interpreter)")
        else:
            why = "it claimed none of this graph's nodes, so the torch reference ran them"
        print(f"lmforge: note: --backend {name} was skipped: {why}", file=sys.stderr)
    return 0


def cmd_tune(args) -> int:
    from lmforge.search.report import write_report
    from lmforge.search.studies import open_storage
    from lmforge.search.tuner import check_budget, check_constraints, tune

    _set_threads(args)
    _check_target(args.target)
    constraints = {}
    if args.min_quality is not None:
        constraints["quality"] = args.min_quality
    if args.fits:
        constraints["fits"] = True
    check_budget(args.budget, "--budget")   # tune's own checks, before the workload loads
    check_constraints(constraints, ())
    tps = (1, 2, 4, 8, 16, 32, 64)
    if args.max_tp not in tps:
        raise LmforgeError(f"--max-tp must be a power of two from 1 to 64 (the tensor-parallel sizes searched are "
                           f"1, 2, 4, ... up to it), not {args.max_tp}")
    _check_out(args.out)
    open_storage(args.storage)  # a bad --storage URL fails now, not after loading the workload
    wl = _load(args.workload)
    pipeline = None
    if args.max_tp > 1:  # the tensor-parallel pass joins the tunable ones: knob shard.tp in 1, 2, 4, ..., max_tp
        from lmforge.passes import tunable_pipeline
        from lmforge.passes.shard import tensor_parallel_pass

        evals = list(wl.eval_inputs or [wl.example_inputs])   # calibration, as tune's default pipeline takes it
        pipeline = tunable_pipeline(calibration=evals[:2]) + [tensor_parallel_pass(args.max_tp)]
    result = tune(wl, target=args.target, objectives=tuple(args.objective or ["latency"]), budget=args.budget,
                  mode=args.mode, storage=args.storage, constraints=constraints or None, seed=args.seed,
                  warm_start_from=args.warm_start_from, sampler=args.sampler, pipeline=pipeline)
    print(result.summary())
    sizes = ", ".join(f"{k}={v}" for k, v in sorted(result.bindings.items())) or "the example inputs' sizes"
    if result.measured:
        print(f"measured on this machine: the {len(result.measured)} best feasible configs by predicted latency, "
              f"at sizes {sizes} (predicted at the same sizes); best = lowest measured latency:")
    elif result.mode == "measure":
        print(f"{'Pareto front' if len(result.objectives) > 1 else 'best'} (latency measured on this machine at "
              f"sizes {sizes}):")
    else:
        print(f"{'Pareto front' if len(result.objectives) > 1 else 'best'} (latency and memory predicted by the "
              f"cost model for {args.target} at sizes {sizes}):")
    print(result.table())
    print(f"best config: {result.best_config}")
    if args.out:
        paths = write_report(result.study, args.out)
        print("report: " + ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_report(args) -> int:
    import optuna

    from lmforge.search.report import write_report
    from lmforge.search.studies import constraint_tag, default_storage, open_storage

    url = args.storage or default_storage()
    _check_out(args.out if args.study is not None else None)
    storage = open_storage(url, must_exist=args.storage is not None)
    summaries = optuna.get_all_study_summaries(storage=storage)
    names = [s.study_name for s in summaries]
    if args.study is None:
        if not summaries:
            print(f"no studies in {url}")
            return 0
        print("studies:")
        for summary in summaries:
            attrs = summary.user_attrs
            about = [f"target {attrs['target']}"] if attrs.get("target") else []
            about += [f"{'+'.join(attrs['objectives'])}"] if attrs.get("objectives") else []
            about += [attrs["mode"]] if attrs.get("mode") else []
            cons = (attrs.get("settings") or {}).get("constraints")
            about += [",".join(constraint_tag(k, v) for k, v in sorted(cons.items()))] if cons else []
            about += [f"{summary.n_trials} trials"]
            print(f"  {summary.study_name}  ({', '.join(about)})")
        return 0
    matches = [n for n in names if n == args.study] or [n for n in names if args.study in n]
    if len(matches) != 1:
        raise LmforgeError(f"{len(matches)} studies match {args.study!r} in {url}: give the full name or a unique "
                           f"part of one of {matches or names}")
    paths = write_report(optuna.load_study(study_name=matches[0], storage=storage), args.out)
    print("report: " + ", ".join(str(p) for p in paths.values()))
    return 0


def _config_arg(value: str | None):
    """--config: None (defaults), "best" (the tuning database's), a JSON object of knob values, or a JSON file."""
    import json
    from pathlib import Path

    if value in (None, "best"):
        return value
    text = Path(value).read_text() if Path(value).is_file() else value
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise LmforgeError(f"--config {value!r}: give 'best', a JSON object of knob values such as "
                           f"'{{\"quant.weight_bits\": 4}}', or a JSON file holding one ({e})") from None
    if not isinstance(config, dict):
        raise LmforgeError(f"--config {value!r}: a config is a JSON object of knob values, not a "
                           f"{type(config).__name__}")
    return config


def cmd_export(args) -> int:
    from lmforge.artifact import artifact_dir, read_manifest
    from lmforge.exporting import export_workload

    config = _config_arg(args.config)
    if args.storage is not None and config != "best":
        raise LmforgeError("--storage is where --config best is looked up: pass --config best with it")
    if args.study is not None and config != "best":
        raise LmforgeError("--study names the study whose best config --config best takes: pass --config best "
                           "with it")
    more = [t.strip() for t in args.kernel_targets.split(",") if t.strip()]
    path = export_workload(args.workload, args.target, args.out, config=config, gpu_kernels=args.kernels,
                           storage=args.storage, study=args.study, kernel_targets=more)
    source = read_manifest(artifact_dir(path)).get("config_source")
    if source:
        print(f"config: the best of tuning study {source['study']} (trial {source['trial']}; --study NAME takes "
              "another study's)")
    print(f"artifact written to {path}")
    return 0


def cmd_run(args) -> int:
    """Load an artifact (validating every file) and run it once on random inputs of its input types."""
    import torch

    import lmforge
    from lmforge.artifact import inspect_artifact
    from lmforge.ir.types import eval_dim, torch_dtype

    from lmforge.ir.types import _symbol_names

    given = {}
    for item in args.dim or []:
        name, eq, value = item.partition("=")
        name, value = name.strip(), value.strip()
        if not eq or not name:
            raise LmforgeError(f"--dim {item!r}: give NAME=VALUE, e.g. --dim batch=4")
        try:
            given[name] = int(value)
        except ValueError:
            raise LmforgeError(f"--dim {item!r}: the value of {name} must be a whole number, e.g. "
                               f"--dim {name}=4") from None
        if given[name] < 0:
            raise LmforgeError(f"--dim {item!r}: a dimension cannot be negative")
    manifest = inspect_artifact(args.artifact)
    model = lmforge.load(args.artifact, device=args.device, kernels=args.kernels)
    symbols = sorted({n for v in model.graph.inputs for d in v.type.shape if isinstance(d, str)
                      for n in _symbol_names(d)})
    unknown = sorted(set(given) - set(symbols))
    if unknown:
        raise LmforgeError(f"--dim: the artifact has no dimension {', '.join(unknown)}; its symbolic dims are "
                           f"{', '.join(symbols) if symbols else 'none (every input shape is fixed)'}")
    dims = dict(model.graph.get_meta("example_dims") or ())
    dims.update(given)
    inputs = []
    for v in model.graph.inputs:
        shape = [eval_dim(d, dims) for d in v.type.shape]
        dtype = torch_dtype(v.type.dtype)
        inputs.append(torch.randint(0, 2, shape, dtype=dtype, device=args.device) if not dtype.is_floating_point
                      else torch.randn(shape, device=args.device))
    out = model(*inputs)
    leaves = [x for x in torch.utils._pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]
    runs = {b: sum(k.backend == b for k in model.kernels) for b in dict.fromkeys(k.backend for k in model.kernels)}
    print(f"{manifest.get('name')}: ran on {args.device} with inputs "
          f"{[tuple(x.shape) for x in inputs]} -> outputs {[tuple(x.shape) for x in leaves]}; nodes run by "
          f"{', '.join(f'{b}: {n}' for b, n in runs.items())}")
    return 0


def cmd_calibrate(args) -> int:
    """Time op instances on the machine at hand, fit the target's efficiency factors, save them."""
    import torch

    from lmforge.hwmodels import get_target
    from lmforge.hwmodels.calibrate import calibrate

    _set_threads(args)
    hw = get_target(args.target)
    cal = calibrate(hw, progress=True)
    print(f"calibrated {hw.name} ({len(cal.samples)} op instances); saved for fingerprint {cal.hw_fingerprint}")
    if getattr(hw, "kind", "") == "cpu":
        threads = torch.get_num_threads()
        flag = f" --threads {threads}" if args.threads is not None else ""
        default = "" if flag else " (this machine's default)"
        n = f"{threads} torch thread{'s' if threads != 1 else ''}"
        print(f"  measured with {n}{default}: it applies to later commands for target {args.target} that run with "
              f"{n}, e.g. `lmforge tune WORKLOAD --target {args.target} --mode hybrid{flag}` or "
              f"`lmforge inspect WORKLOAD --target {args.target}{flag}`; in Python, call "
              f"torch.set_num_threads({threads}) first")
    for cls, (ec, em) in sorted(cal.efficiency.items()):
        print(f"  {cls:<12} compute efficiency {ec:5.2f}  memory efficiency {em:5.2f}")
    print(f"  launch overhead {cal.launch_overhead_s * 1e6:.2f} us")
    return 0


def cmd_targets(args) -> int:
    from lmforge.hwmodels import get_target, targets

    if args.action == "list" and args.name:
        raise LmforgeError(f"`lmforge targets list` takes no name; to see one target: `lmforge targets show "
                           f"{args.name}`")
    if args.action == "show":
        if not args.name:
            raise LmforgeError("`lmforge targets show` needs a target name, e.g. `lmforge targets show h100`")
        hw = get_target(args.name)
        print(hw.describe() if hasattr(hw, "describe") else hw)
        return 0
    for hw in targets():
        print(hw.summary() if hasattr(hw, "summary") else hw.name)
    return 0


THREADS_HELP = ("torch CPU threads for this command; the host target's calibration (`lmforge calibrate --threads "
                "N`) applies only with the same N")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmforge", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser("inspect", help="print the graph, who runs each node and its cost")
    i.add_argument("workload")
    i.add_argument("--target", default="host")
    i.add_argument("--knobs", action="store_true", help="list the knobs of the pass pipeline")
    i.add_argument("--print-after", default=None, help="print the IR after this pass (or 'all', or PASS,PASS)")
    i.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    i.set_defaults(fn=cmd_inspect)
    c = sub.add_parser("compile", help="compile a workload and run its example inputs")
    c.add_argument("workload")
    c.add_argument("--target", default="host")
    c.add_argument("--backend", action="append", default=[], help="backend in priority order (repeatable)")
    c.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    c.set_defaults(fn=cmd_compile)
    tu = sub.add_parser("tune", help="search the knobs of a workload for a target (Optuna)")
    tu.add_argument("workload")
    tu.add_argument("--target", default="h100")
    tu.add_argument("--budget", type=int, default=50,
                    help="number of trials the study holds when tuning stops: finished, pruned and failed ones, "
                         "of earlier runs and other workers too (trials cut off by Ctrl-C do not count)")
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
                    help="also search tensor parallelism over 1, 2, 4, ... up to this many GPUs (a power of two; "
                         "knob shard.tp; default 1: off)")
    tu.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    tu.set_defaults(fn=cmd_tune)
    r = sub.add_parser("report", help="write the Pareto plot and table of a tuning study")
    r.add_argument("--study", default=None, help="the study name, or a unique part of it (omit to list studies)")
    r.add_argument("--storage", default=None)
    r.add_argument("--out", default="lmforge-report")
    r.set_defaults(fn=cmd_report)
    e = sub.add_parser("export", help="compile a workload for a target and write an artifact directory")
    e.add_argument("workload")
    e.add_argument("--target", default="h100")
    e.add_argument("--out", required=True)
    e.add_argument("--config", default=None,
                   help="'best' (the config the most recently run `lmforge tune` of the workload and target "
                        "reported as best; see --study), a JSON object of knob values, or a JSON file")
    e.add_argument("--storage", default=None,
                   help="with --config best: the Optuna storage URL `lmforge tune --storage` wrote to")
    e.add_argument("--study", default=None,
                   help="with --config best: the study to take the best config of (its name or a unique part, as "
                        "`lmforge report` lists them; default: the most recently run study of the workload and "
                        "target)")
    e.add_argument("--kernels", action="store_true",
                   help="also build the target's kernels: for a GPU, Triton PTX/cubin (launched by `run --device "
                        "cuda` on that GPU) and TVM CUDA source; for --target host, the TVM backend's host shared "
                        "library (run by `run` on a CPU of the same kind)")
    e.add_argument("--kernel-targets", default="", metavar="T1,T2",
                   help="more GPU targets to build kernels for (comma-separated, e.g. a100,l40s; implies "
                        "--kernels): one artifact holds them all, and `run --device cuda` picks the one for its GPU")
    e.set_defaults(fn=cmd_export)
    ru = sub.add_parser("run", help="load an artifact (checking every file) and run it on random inputs")
    ru.add_argument("artifact")
    ru.add_argument("--device", default="cpu")
    ru.add_argument("--kernels", default="auto", choices=["auto", "required", "none"],
                    help="on a GPU: launch the artifact's cubins when one matches the GPU; on the CPU: run its TVM "
                         "host library when it fits this machine (auto: else the torch reference with a warning; "
                         "required: else an error; none: always the reference)")
    ru.add_argument("--dim", action="append", help="value of a symbolic dim, e.g. --dim batch=4")
    ru.set_defaults(fn=cmd_run)
    ca = sub.add_parser("calibrate", help="fit the cost model's efficiency factors by timing ops here")
    ca.add_argument("--target", default="host", help="host, or the GPU preset of the GPU in this machine")
    ca.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a shared machine); later "
                                                              "commands use the calibration with the same --threads")
    ca.set_defaults(fn=cmd_calibrate)
    t = sub.add_parser("targets", help="list hardware targets, or `targets show NAME`")
    t.add_argument("action", nargs="?", choices=["list", "show"], default="list")
    t.add_argument("name", nargs="?")
    t.set_defaults(fn=cmd_targets)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except LmforgeError as e:
        print(f"lmforge: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
