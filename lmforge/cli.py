"""The `lmforge` command line (also `python -m lmforge`).

    lmforge inspect WORKLOAD [--target h100] [--knobs] [--print-after PASS|all]
    lmforge compile WORKLOAD [--target h100] [--backend torch]
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
