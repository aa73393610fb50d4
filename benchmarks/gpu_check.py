"""Check and time lmforge's Triton and TVM kernels on the CUDA GPU at hand, against exact references and baselines.

    python benchmarks/gpu_check.py [--quick] [--only SUBSTRING] [--budget SECONDS] [--limit SECONDS]
                                   [--sweep-budget SECONDS]

Runs from a plain checkout (the repo root goes on sys.path; nothing is installed). For every case of
benchmarks/gpu_cases/{attention,quant,artifact,decode_graphs,norms,tvm}.py: run the kernel and the reference,
check allclose and the relative L2 error, then time kernel and baseline (where the case has one; else "-" cells)
with triton.testing.do_bench (median) and report speedup = baseline / kernel; then time both again as pure GPU
time (CUDA graphs, cold L2: see gpu_cases.graph_time_ms) and report that speedup too, with achieved GB/s and
TFLOP/s from the GPU time (and the share of the GPU's memory bandwidth when the GPU is known). The modules:
attention (prefill and decode kernels against torch SDPA pinned to FlashAttention where it runs the case, the
backend named in the baseline column), quant (int4 / int8 weight-only GEMV and GEMM against cuBLAS fp16),
artifact (an exported model's cubins), decode_graphs (the example Llama's compiled decode step as generated code
and replayed by use_cuda_graphs()), norms, tvm (TVM's exported CUDA kernels). Cases are built (inputs,
compiles, config sweeps) as the run reaches them: a module that fails to import, a case that fails to build or
raises becomes an error row and the run goes on; past --budget seconds the remaining cases become "skipped" rows.
--limit is the hard stop (default 280 s): the case running then is abandoned as a "timed out" row (between two
Python steps; a kernel stuck in C gets 10 s more, then the process ends), the rest are skipped, and the results
are written and the table printed as usual, exit status 0.
Prints a versions header and one line per case as it finishes, then a Markdown table last; with $OUT set, also
writes gpu_check.md and gpu_check.json there, rewritten after every case (a run killed midway keeps what it
measured). Without a CUDA GPU it says so and exits 0.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# most wanted first: --budget cuts the tail
CASE_MODULES = ("attention", "quant", "artifact", "decode_graphs", "norms", "tvm")
# Peak HBM bandwidth (bytes/s) by device-name fragment, from NVIDIA's datasheets.
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100 PCIe": 2.0e12, "H100 NVL": 3.9e12, "H100": 3.35e12,
                  "A100-SXM4-80GB": 2.04e12, "A100": 1.555e12, "L40S": 0.864e12, "L4": 0.3e12}
TIMING = {True: (10, 30), False: (25, 100)}  # quick -> (warmup ms, rep ms)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer shapes, default configs, shorter timing")
    parser.add_argument("--only", metavar="SUBSTRING", default=None,
                        help="run only the case modules, entries (their labels) or cases whose name contains "
                             "SUBSTRING")
    parser.add_argument("--sweep-budget", metavar="SECONDS", type=float, default=120.0,
                        help="after this many seconds, stop sweeping candidate configs (each case then runs its "
                             "first candidate, usually the default); default 120")
    parser.add_argument("--budget", metavar="SECONDS", type=float, default=270.0,
                        help="start no case after this many seconds (the rest are listed as skipped), so that the "
                             "run ends in about 5 minutes; default 270")
    parser.add_argument("--limit", metavar="SECONDS", type=float, default=280.0,
                        help="hard limit: after this many seconds abandon the case that is running (a 'timed out' "
                             "row), skip the rest, write the results and print the table; default 280 (with "
                             "Python's and torch's start, under 5 minutes)")
    return parser.parse_args(argv)


def versions() -> dict:
    import torch
    import triton

    return {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def peak_bandwidth(gpu_name: str) -> float | None:
    for fragment, bandwidth in PEAK_BANDWIDTH.items():
        if fragment in gpu_name:
            return bandwidth
    return None


def load_cases(quick: bool, only: str | None) -> list:
    """The entries of all modules: cases (dicts) and Pending ones (built when run() reaches them); an import or
    cases() failure becomes one error entry for that module. --only selects a module by name, Pending entries by
    their label (as the progress lines print them, e.g. "decode_dense(32, 8, 131072"), else cases by name: then
    every Pending entry is built to learn its cases' names."""
    from benchmarks.gpu_cases import Pending

    found = []
    whole_modules = [m for m in CASE_MODULES if only and only in m]
    for module_name in CASE_MODULES:
        if whole_modules and module_name not in whole_modules:
            continue  # --only names a module: skip building the others' inputs
        try:
            module = importlib.import_module(f"benchmarks.gpu_cases.{module_name}")
            module_cases = module.cases(quick)
        except Exception as exc:  # noqa: BLE001 - reported in the table, the run goes on
            found.append({"name": f"{module_name}/*", "error": f"{type(exc).__name__}: {exc}",
                          "trace": traceback.format_exc()})
            continue
        found += [c for c in module_cases if not only or isinstance(c, Pending) or only in c["name"]]
    if only and any(isinstance(c, Pending) and only in c.label for c in found):
        # entries named by their labels: only those are built (the others' cases are not what was asked for)
        found = [c for c in found if not isinstance(c, Pending) or only in c.label]
    return found


def built_cases(entry, only: str | None) -> list[dict]:
    """The cases of one entry of load_cases: itself, or a Pending entry's cases (built now) that --only selects
    (all of them when it names the entry's label or module)."""
    from benchmarks.gpu_cases import Pending

    if not isinstance(entry, Pending):
        return [entry]
    built = entry.build()
    built = built if isinstance(built, list) else [built]
    if not only or only in entry.label:
        return built
    return [c for c in built if only in c["name"]]


def check_and_time(case: dict, quick: bool, peak: float | None) -> dict:
    """Run one case: correctness against the reference, then median times of kernel and baseline (a case
    without a `baseline` gets None for the baseline times and speedups)."""
    import torch
    import triton.testing

    row = {"name": case["name"], "baseline_name": case.get("baseline_name", ""), "note": case.get("note", "")}
    out = case["kernel"]()
    ref = case["reference"]()
    torch.cuda.synchronize()
    diff = (out.float() - ref.float())
    row["max_abs_err"] = diff.abs().max().item()
    row["rel_l2"] = (diff.norm() / ref.float().norm().clamp_min(1e-30)).item()
    row["ok"] = bool(torch.allclose(out.float(), ref.float(), rtol=case["rtol"], atol=case["atol"]))
    warmup, rep = TIMING[quick]
    row["kernel_ms"] = triton.testing.do_bench(case["kernel"], warmup=warmup, rep=rep, return_mode="median")
    baseline = case.get("baseline")
    row["baseline_ms"] = row["speedup"] = row["baseline_graph_ms"] = row["graph_speedup"] = None
    if baseline is not None:
        row["baseline_ms"] = triton.testing.do_bench(baseline, warmup=warmup, rep=rep, return_mode="median")
        row["speedup"] = row["baseline_ms"] / row["kernel_ms"]
    # GPU-only times (CUDA graphs, cold L2): do_bench above includes Python launch time where it exceeds
    # do_bench's cache flush, which hides fast kernels (a batch-1 GEMV) behind their launcher.
    try:
        from benchmarks.gpu_cases import graph_time_ms

        if not case.get("graph_timing", True):
            raise GraphTimingOff()
        row["kernel_graph_ms"] = graph_time_ms(case["kernel"])
        if baseline is not None:
            row["baseline_graph_ms"] = graph_time_ms(baseline)
            row["graph_speedup"] = row["baseline_graph_ms"] / row["kernel_graph_ms"]
    except Exception as exc:  # noqa: BLE001 - e.g. a kernel that cannot be captured; do_bench still stands
        row["kernel_graph_ms"] = row["baseline_graph_ms"] = row["graph_speedup"] = None
        if not isinstance(exc, GraphTimingOff):
            row["note"] = f"{row['note']} (no graph timing: {type(exc).__name__})".strip()
    row["stages_ms"] = stage_times(case.get("stages") or {})
    if row["stages_ms"]:
        parts = [f"{name} {_fmt(ms, '.4f')}" for name, ms in row["stages_ms"].items()]
        row["note"] = f"{row['note']}; stages alone (graph ms): {', '.join(parts)}".lstrip("; ")
    seconds = (row["kernel_graph_ms"] or row["kernel_ms"]) * 1e-3
    row["gb_s"] = case["bytes"] / seconds / 1e9
    row["tflop_s"] = case["flops"] / seconds / 1e12
    row["bw_util"] = case["bytes"] / seconds / peak if peak else None
    return row


class GraphTimingOff(Exception):
    """A case with graph_timing=False: its kernel is not captured in a CUDA graph (it replays one itself)."""


def stage_times(stages: dict) -> dict:
    """GPU time (ms, `graph_time_ms`) of each stage callable alone; None for one that fails or cannot be captured."""
    from benchmarks.gpu_cases import graph_time_ms

    times = {}
    for name, fn in stages.items():
        try:
            times[name] = graph_time_ms(fn)
        except Exception:  # noqa: BLE001 - a stage is extra information, the row stands without it
            times[name] = None
    return times


def _fmt(value, spec: str, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec) + unit


def markdown_table(rows: list[dict]) -> str:
    header = ("| case | ok | max abs err | rel L2 | kernel ms | baseline | baseline ms | speedup | "
              "graph kernel ms | graph baseline ms | graph speedup | GB/s | % peak BW | TFLOP/s | note |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        if "error" in r or "skipped" in r or "timed_out" in r:
            status, text = (("ERROR", r["error"]) if "error" in r else ("skipped", r["skipped"]) if "skipped" in r
                            else ("timed out", r["timed_out"]))
            lines.append(f"| {r['name']} | {status} |" + " |" * 13 + f" {text[:160].replace('|', '/')} |")
            continue
        util = None if r.get("bw_util") is None else 100 * r["bw_util"]
        lines.append(
            f"| {r['name']} | {'yes' if r['ok'] else 'NO'} | {_fmt(r['max_abs_err'], '.2e')} | "
            f"{_fmt(r['rel_l2'], '.2e')} | {_fmt(r['kernel_ms'], '.4f')} | {r.get('baseline_name') or '-'} | "
            f"{_fmt(r.get('baseline_ms'), '.4f')} | {_fmt(r.get('speedup'), '.2f', 'x')} | "
            f"{_fmt(r['kernel_graph_ms'], '.4f')} | {_fmt(r.get('baseline_graph_ms'), '.4f')} | "
            f"{_fmt(r.get('graph_speedup'), '.2f', 'x')} | {_fmt(r['gb_s'], '.0f')} | "
            f"{_fmt(util, '.0f')} | {_fmt(r['tflop_s'], '.2f')} | {r['note']} |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU is visible (torch.cuda.is_available() is False); nothing to check. "
              "Run this on a machine with an NVIDIA GPU.")
        return 0
    info = versions()
    peak = peak_bandwidth(info["gpu"])
    print("# lmforge gpu_check")
    for key, value in info.items():
        print(f"- {key}: {value}")
    print(f"- peak memory bandwidth: {peak / 1e12:.2f} TB/s" if peak else "- peak memory bandwidth: unknown GPU")
    started = time.time()
    from benchmarks.gpu_cases import SWEEP

    SWEEP["deadline"] = started + args.sweep_budget
    rows = run_entries(load_cases(args.quick, args.only), args, peak, info, started)
    report(rows, args, started)
    return 0


def report(rows: list[dict], args: argparse.Namespace, started: float) -> None:
    """The run's summary line and its Markdown table, printed last."""
    from benchmarks.gpu_cases import SWEEP

    print(f"- total {time.time() - started:.0f} s; candidate sweeps cut short by --sweep-budget "
          f"({args.sweep_budget:.0f} s): {SWEEP['cut']}; cases skipped by --budget ({args.budget:.0f} s) or "
          f"--limit ({getattr(args, 'limit', None) or 0:.0f} s): {sum('skipped' in r for r in rows)}; timed out: "
          f"{sum('timed_out' in r for r in rows)}")
    print()
    print(markdown_table(rows), flush=True)


def run_entries(entries: list, args: argparse.Namespace, peak: float | None, info: dict, started: float) -> list:
    """The table's rows: each entry built (if Pending) and its cases checked and timed in turn, one progress line
    each, $OUT's files rewritten after each entry; an entry reached after `args.budget` seconds is skipped. At
    `args.limit` seconds (if set) the case running is abandoned (see `HardLimit`): it becomes a "timed out" row,
    the entries left become skipped rows, and the rows are returned as usual."""
    rows: list[dict] = []
    running = {"name": None, "entry": 0}   # the case (or entry being built) that a timeout abandons, its entry
    limit = getattr(args, "limit", None)
    guard = HardLimit(started + limit if limit else None,
                      on_hang=lambda: finish_hung(rows, running, entries, args, info, started))
    try:
        with guard:
            for running["entry"], entry in enumerate(entries):
                for row in entry_rows(entry, args, peak, started, running):
                    rows.append(row)
                write_results(rows, info)
    except RunTimeout:
        rows += timeout_rows(running, entries[running["entry"]:], limit)
        print(f"[timed out] {running['name'] or '-'}: the run reached --limit {limit:.0f} s", flush=True)
        write_results(rows, info)
    return rows


def timeout_rows(running: dict, left: list, limit: float) -> list[dict]:
    """The rows a timeout adds: the abandoned case, then the entries not reached (`left` starts with the entry
    that was running; its label is not repeated when it is the abandoned case)."""
    from benchmarks.gpu_cases import Pending

    out = []
    if running["name"]:
        out.append({"name": running["name"], "timed_out": f"abandoned: the run reached --limit {limit:.0f} s"})
    for entry in left[1:]:
        label = entry.label if isinstance(entry, Pending) else entry["name"]
        out.append({"name": label, "skipped": f"not run: past --limit {limit:.0f} s"})
    return out


def entry_rows(entry, args: argparse.Namespace, peak: float | None, started: float, running: dict | None = None):
    """The rows of one entry of load_cases, yielded as each is known: skipped (past the budget), its error, or
    its cases' results. running["name"] is the case (or the entry, while it is built) being worked on, None
    between cases."""
    from benchmarks.gpu_cases import Pending

    running = {} if running is None else running
    label = entry.label if isinstance(entry, Pending) else entry["name"]
    if time.time() - started > args.budget:
        print(f"[skipped] {label}", flush=True)
        yield {"name": label, "skipped": f"not run: past --budget {args.budget:.0f} s"}
        return
    if not isinstance(entry, Pending) and "error" in entry:
        print(f"[error] {label}: {entry['error']}", flush=True)
        yield entry
        return
    running["name"] = label
    try:
        cases = built_cases(entry, args.only)
    except Exception as exc:  # noqa: BLE001 - this entry becomes one error row, the run goes on
        row = {"name": label, "error": f"building the case failed: {type(exc).__name__}: {exc}",
               "trace": traceback.format_exc()}
        print(f"[error] {label}: {row['error']}", flush=True)
        running["name"] = None
        yield row
        return
    for case in cases:
        running["name"] = case["name"]
        try:
            row = check_and_time(case, args.quick, peak)
        except Exception as exc:  # noqa: BLE001 - reported in the table, the run goes on
            row = {"name": case["name"], "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
        running["name"] = None
        print(f"{progress_line(row)} ({time.time() - started:.0f}s)", flush=True)
        yield row


class RunTimeout(BaseException):
    """Raised in the main thread at the hard limit. A BaseException, so that the `except Exception` that turns a
    failing case into an error row does not swallow it."""


class HardLimit:
    """`with HardLimit(deadline, on_hang):` raises RunTimeout in the main thread at time.time() `deadline` (None:
    never), and again every second until the block is left, in case cleanup code (a CUDA graph capture's exit)
    replaces the first with an error that is caught. Python runs the signal handler between bytecodes, so a
    kernel or compile in C finishes first; if the main thread is still inside C `HANG_GRACE` seconds later (a
    hung kernel), `on_hang()` runs on a timer thread (it writes and prints what there is, then ends the process).
    """

    HANG_GRACE = 10.0

    def __init__(self, deadline: float | None, on_hang=None):
        self.deadline, self.on_hang = deadline, on_hang
        self.previous = self.hang_timer = None
        self.active = False

    def __enter__(self) -> "HardLimit":
        import signal
        import threading

        if self.deadline is None:
            return self
        wait = max(self.deadline - time.time(), 1e-3)
        self.active = True
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGALRM, self._expired)
            signal.setitimer(signal.ITIMER_REAL, wait, 1.0)
        if self.on_hang is not None:
            self.hang_timer = threading.Timer(wait + self.HANG_GRACE, self.on_hang)
            self.hang_timer.daemon = True
            self.hang_timer.start()
        return self

    def _expired(self, signum, frame):
        if self.active:
            raise RunTimeout()

    def __exit__(self, *exc) -> None:
        import signal

        self.active = False   # first: a signal arriving while the timer is stopped raises nothing
        if self.previous is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.previous)
        if self.hang_timer is not None:
            self.hang_timer.cancel()


def finish_hung(rows: list, running: dict, entries: list, args: argparse.Namespace, info: dict,
                started: float) -> None:
    """The main thread is stuck past the hard limit (inside C: a hung kernel): write and print what the run has,
    the stuck case as timed out, and end the process with status 0 (its threads cannot be stopped otherwise)."""
    final = list(rows) + timeout_rows(running, entries[running["entry"]:], args.limit)
    print(f"[timed out] {running['name'] or '-'}: stuck {HardLimit.HANG_GRACE:.0f} s past --limit "
          f"{args.limit:.0f} s; ending the run", flush=True)
    write_results(final, info)
    report(final, args, started)
    sys.stdout.flush()
    os._exit(0)


def progress_line(row: dict) -> str:
    """One line for a finished case: its status and, when it ran, its times."""
    if "error" in row:
        return f"[error] {row['name']}: {row['error'][:200]}"
    times = f"kernel {_fmt(row['kernel_ms'], '.4f')} ms"
    if row.get("baseline_ms") is not None:
        times += (f", baseline {_fmt(row['baseline_ms'], '.4f')} ms, {_fmt(row['speedup'], '.2f', 'x')} "
                  f"(graph {_fmt(row.get('graph_speedup'), '.2f', 'x')})")
    return f"[{'ok' if row['ok'] else 'MISMATCH'}] {row['name']}: {times}, rel L2 {_fmt(row['rel_l2'], '.1e')}"


def write_results(rows: list[dict], info: dict) -> None:
    """gpu_check.md and gpu_check.json under $OUT (if set), as far as the run has got."""
    out_dir = os.environ.get("OUT")
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "gpu_check.md").write_text(markdown_table(rows) + "\n")
        (Path(out_dir) / "gpu_check.json").write_text(json.dumps({"versions": info, "rows": rows}, indent=2))


# Import names of the carried distributions whose name differs from their import name.
IMPORT_NAMES = {"protobuf": "google.protobuf"}


def use_carried_wheels(wheel_dir: Path = REPO_ROOT / ".gpu_export" / "wheels") -> list[str]:
    """Make importable the wheels `make gpu-export` put in .gpu_export/wheels (onnx, safetensors, ...: what the
    artifact cases need and a bare GPU machine with torch lacks), for the packages not importable here: each is
    extracted to a temporary directory put first on sys.path. Nothing is installed. Returns the wheels used."""
    import importlib.util
    import tempfile
    import zipfile

    if not wheel_dir.is_dir():
        return []
    site, used = None, []
    for wheel in sorted(wheel_dir.glob("*.whl")):
        distribution = wheel.name.split("-")[0]
        try:
            present = importlib.util.find_spec(IMPORT_NAMES.get(distribution, distribution)) is not None
        except (ImportError, ValueError):
            present = False
        if not present:
            site = site or Path(tempfile.mkdtemp(prefix="lmforge-gpu-site-"))   # only when a wheel is used
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(site)
            used.append(wheel.name)
    if used:
        sys.path.insert(0, str(site))
        importlib.invalidate_caches()
    return used


def import_lmforge_from_checkout() -> None:
    """Make `lmforge` importable from the checkout; if its package __init__ needs a dependency this machine
    lacks, register the package without running __init__, since the kernels themselves need only torch
    and triton."""
    import types

    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    try:
        import lmforge  # noqa: F401
    except ImportError as exc:
        print(f"- note: `import lmforge` failed ({exc}); loading its kernel modules without the package __init__")
        for name in [m for m in sys.modules if m == "lmforge" or m.startswith("lmforge.")]:
            del sys.modules[name]
        package = types.ModuleType("lmforge")
        package.__path__ = [str(REPO_ROOT / "lmforge")]
        sys.modules["lmforge"] = package


def main(argv=None) -> int:
    args = parse_args(argv)
    carried = use_carried_wheels()
    if carried:
        print(f"- using carried wheels (not installed): {', '.join(carried)}")
    import_lmforge_from_checkout()
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
