"""How well the roofline cost model predicts measured op times, before and after calibration.

    .venv/bin/python benchmarks/cost_model_accuracy.py [--target host] [--n-eval 36] [--seed 0] [--threads N]
                                                       [--statistic median|min] [--warm] [--out FILE]

Fits efficiency factors on the fit table of op instances (`op_instances(kind, "fit")`), then times
`--n-eval` held-out instances drawn at random from the same op families (different shapes), and reports
Kendall tau, Spearman rho and the median absolute percentage error of the predictions against the
measurements, with the default (datasheet/probe) factors and with the fitted ones. Like `calibrate`, each
instance cycles through copies of its inputs that overflow the last-level cache (`--warm` reuses one set).
The target must be the machine at hand ("host" on a CPU; a GPU preset on that GPU). Nothing is saved to
the calibration cache. On a CPU shared with other jobs use `--threads 1` (see --help).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from lmforge.hwmodels import calibrate, get_target, node_time  # noqa: E402
from lmforge.hwmodels.calibrate import (accuracy, default_measure, fit_efficiency,  # noqa: E402
                                        measure_instances, rotate_bytes)
from lmforge.hwmodels.instances import op_instances  # noqa: E402
from lmforge.hwmodels.presets import target_for_device_name  # noqa: E402


def run(target: str, n_eval: int, seed: int, statistic: str | None = None, rotate: bool = True) -> dict:
    if target == "auto":
        target = torch.cuda.get_device_name() if torch.cuda.is_available() else "host"
        hw = target_for_device_name(target) if target != "host" else get_target("host")
    else:
        hw = get_target(target)
    device = "cuda" if hw.kind == "gpu" else "cpu"
    measure = default_measure(device, statistic=statistic)
    t0 = time.time()
    fit_set = op_instances(hw.kind, "fit")
    cal = calibrate(hw, fit_set, measure, save=False, rotate_inputs=rotate, progress=True)
    fit_s = time.time() - t0
    after_hw = cal.apply(hw)
    # The same measurements fitted with one launch overhead for all classes, for comparison.
    shared = fit_efficiency([i.cost() for i in fit_set], [s.measured_s for s in cal.samples], hw,
                            per_class_launch=False)
    shared_hw = hw.with_efficiency(shared.efficiency, shared.launch_overhead_s, {})
    held_out = op_instances(hw.kind, "eval", n=n_eval, seed=seed)
    t0 = time.time()
    measured = measure_instances(held_out, measure, device, rotate_bytes(hw) if rotate else 0)
    eval_s = time.time() - t0
    rows = []
    for inst, t in zip(held_out, measured):
        c = inst.cost()
        before, after = node_time(c, hw), node_time(c, after_hw)
        rows.append({"name": inst.name, "op_class": c.op_class, "flops": c.flops, "bytes": c.bytes,
                     "measured_s": t, "before_s": before.time_s, "after_s": after.time_s,
                     "after_shared_launch_s": node_time(c, shared_hw).time_s, "bound_after": after.bound})
    return {
        "target": hw.name, "hw_fingerprint": hw.fingerprint(), "device": device,
        "machine": f"{platform.node()} {platform.machine()} ({os.cpu_count()} cpus)",
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "statistic": statistic or ("median" if device == "cuda" else "min"), "rotate_inputs": rotate,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "fit_instances": len(cal.samples), "eval_instances": len(rows),
        "fit_seconds": fit_s, "eval_seconds": eval_s,
        "efficiency_after": {k: list(v) for k, v in cal.efficiency.items()},
        "launch_overhead_s": {"before": hw.launch_overhead_s, "after": cal.launch_overhead_s,
                              "after_by_class": dict(cal.launch_by_class)},
        "fit_accuracy": cal.accuracy(),
        "eval_accuracy": {"before": accuracy(measured, [r["before_s"] for r in rows]),
                          "after": accuracy(measured, [r["after_s"] for r in rows]),
                          "after_shared_launch": accuracy(measured, [r["after_shared_launch_s"] for r in rows])},
        "rows": rows,
        "calibration": cal.to_dict(),
    }


def print_report(res: dict) -> None:
    print(f"\n{res['target']} ({res['device']}), torch {res['torch']}, {res['torch_threads']} threads, "
          f"{res['statistic']} of repeats, {'rotated (DRAM)' if res['rotate_inputs'] else 'warm-cache'} inputs, "
          f"{res['date']}")
    print(f"{'held-out instance':<46} {'class':<11} {'measured':>10} {'before':>10} {'after':>10} {'err after':>9}")
    for r in sorted(res["rows"], key=lambda r: r["measured_s"]):
        err = (r["after_s"] - r["measured_s"]) / r["measured_s"]
        print(f"{r['name']:<46} {r['op_class']:<11} {r['measured_s'] * 1e6:8.1f}us {r['before_s'] * 1e6:8.1f}us "
              f"{r['after_s'] * 1e6:8.1f}us {err:+9.1%}")
    print("\nfitted (eff_compute, eff_memory):",
          ", ".join(f"{k} ({v[0]:.2f}, {v[1]:.2f})" for k, v in res["efficiency_after"].items()),
          f"; launch {res['launch_overhead_s']['after'] * 1e6:.2f} us shared, per class: "
          + ", ".join(f"{k} {v * 1e6:.2f} us" for k, v in res["launch_overhead_s"]["after_by_class"].items()))
    print(f"\n{'':<22} {'Kendall tau':>12} {'Spearman rho':>13} {'median |err|':>13}")
    labels = {"before": "before calib.", "after": "after calib.", "after_shared_launch": "after, 1 launch"}
    for split in ("fit_accuracy", "eval_accuracy"):
        for when, a in res[split].items():
            label = f"{split.split('_')[0]} {labels[when]}"
            print(f"{label:<22} {a['kendall_tau']:12.3f} {a['spearman_rho']:13.3f} {a['median_ape']:13.1%}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="host",
                   help="the machine at hand: 'host', a GPU preset on that GPU, or 'auto' (the GPU if any)")
    p.add_argument("--n-eval", type=int, default=36, help="held-out instances (at least 30)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's). On a CPU shared with other jobs use 1: a "
                        "multi-threaded op waits for a descheduled worker thread and takes a scheduler tick")
    p.add_argument("--statistic", choices=["median", "min"], default=None,
                   help="of the repeated timings (default: median on a GPU, min on the CPU)")
    p.add_argument("--warm", action="store_true",
                   help="reuse one set of inputs (cache-warm) instead of rotating copies that overflow the LLC")
    p.add_argument("--out", default=None, help="write the full result as JSON here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)  # before the host probe: its cache key includes the thread count
    res = run(args.target, args.n_eval, args.seed, args.statistic, not args.warm)
    print_report(res)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
