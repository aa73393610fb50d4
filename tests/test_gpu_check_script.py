"""benchmarks/gpu_check.py on a machine without a GPU: the carried wheels are made importable only for the
packages that are missing, without installing anything; case entries are built as the run reaches them, a failing
one costs only itself, the time budget skips the rest, and the results are written after every entry."""
import argparse
import json
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _wheel(directory: Path, distribution: str, package: str, body: str) -> Path:
    path = directory / f"{distribution}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{package}/__init__.py", body)
    return path


def test_carried_wheels_are_used_only_for_missing_packages(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "lmforge_carried_demo", "lmforge_carried_demo", "VALUE = 42\n")
    _wheel(wheels, "numpy", "numpy", "raise RuntimeError('the carried copy must not shadow numpy')\n")
    script = f"""
import sys
from pathlib import Path
sys.path.insert(0, {str(REPO)!r})
from benchmarks.gpu_check import use_carried_wheels
used = use_carried_wheels(Path({str(wheels)!r}))
import lmforge_carried_demo, numpy
print(used, lmforge_carried_demo.VALUE, numpy.__name__)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["['lmforge_carried_demo-1.0-py3-none-any.whl']", "42", "numpy"]


def test_no_wheel_directory_uses_nothing(tmp_path):
    sys.path.insert(0, str(REPO))
    try:
        from benchmarks.gpu_check import use_carried_wheels

        assert use_carried_wheels(tmp_path / "absent") == []
    finally:
        sys.path.remove(str(REPO))


def test_entries_are_built_in_turn_failures_are_rows_and_the_budget_skips_the_rest(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO))
    try:
        from benchmarks import gpu_check
        from benchmarks.gpu_cases import Pending, pending
    finally:
        sys.path.remove(str(REPO))
    built = []

    def two_cases(tag, quick=True):
        built.append(tag)
        return [{"name": f"fam/{tag}_a"}, {"name": f"fam/{tag}_b"}]

    def broken():
        built.append("broken")
        raise RuntimeError("no such kernel")

    def slow():
        built.append("slow")
        clock[0] += 100.0          # building this one uses up the budget
        return {"name": "fam/slow"}

    def checked(case, quick, peak):
        if case["name"].endswith("_b"):
            raise ValueError("mismatched shapes")
        return {"name": case["name"], "ok": True, "kernel_ms": 1.0, "baseline_ms": None, "rel_l2": 0.0}

    clock = [1000.0]
    monkeypatch.setattr(gpu_check.time, "time", lambda: clock[0])
    monkeypatch.setattr(gpu_check, "check_and_time", checked)
    monkeypatch.setattr(gpu_check, "markdown_table", lambda rows: f"{len(rows)} rows")
    monkeypatch.setenv("OUT", str(tmp_path))
    entries = [pending("fam", two_cases, "x", True), Pending("fam/broken", broken), Pending("fam/slow", slow),
               Pending("fam/late", lambda: two_cases("late"))]
    args = argparse.Namespace(budget=50.0, only=None, quick=True)
    rows = gpu_check.run_entries(entries, args, None, {"gpu": "none"}, started=1000.0)
    assert built == ["x", "broken", "slow"], "the entry past the budget is not built"
    assert [r["name"] for r in rows] == ["fam/x_a", "fam/x_b", "fam/broken", "fam/slow", "fam/late"]
    assert rows[0]["ok"] and "mismatched shapes" in rows[1]["error"]
    assert "building the case failed: RuntimeError: no such kernel" in rows[2]["error"]
    assert rows[3]["ok"] and "--budget 50" in rows[4]["skipped"]
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [r["name"] for r in saved["rows"]] == [r["name"] for r in rows]

    only = argparse.Namespace(budget=1e9, only="_a", quick=True)
    assert [r["name"] for r in gpu_check.run_entries(entries[:1], only, None, {}, started=clock[0])] == ["fam/x_a"]
    assert pending("fam", two_cases, "x", True).label == "fam/two_cases('x')"


def test_only_selects_entries_by_label_before_building_them(monkeypatch):
    """--only with part of an entry's label builds that entry alone (others would spend the budget and shift its
    place); with part of a case name, entries are built to learn their cases' names."""
    sys.path.insert(0, str(REPO))
    try:
        from benchmarks import gpu_check
        from benchmarks.gpu_cases import Pending
    finally:
        sys.path.remove(str(REPO))
    import types

    entries = {"attention": [Pending("attention/decode_dense(32)", dict), Pending("attention/prefill(8)", dict)],
               "quant": [Pending("quant/case('gemv', 4)", dict), {"name": "quant/ready_decode_dense_x"}]}
    monkeypatch.setattr(gpu_check, "CASE_MODULES", tuple(entries))
    monkeypatch.setattr(gpu_check.importlib, "import_module",
                        lambda name: types.SimpleNamespace(cases=lambda quick: entries[name.rsplit(".", 1)[1]]))
    labels = [getattr(e, "label", None) or e["name"] for e in gpu_check.load_cases(True, "decode_dense")]
    assert labels == ["attention/decode_dense(32)", "quant/ready_decode_dense_x"]
    by_name = gpu_check.load_cases(True, "int4_gemv")   # no label has it: every entry may hold such a case
    assert [e.label for e in by_name] == ["attention/decode_dense(32)", "attention/prefill(8)", "quant/case('gemv', 4)"]
    assert len(gpu_check.load_cases(True, "quant")) == 2


def test_seeded_entries_make_the_same_inputs_whatever_ran_before():
    import torch

    sys.path.insert(0, str(REPO))
    try:
        from benchmarks import gpu_cases
        from benchmarks.gpu_cases import pending
    finally:
        sys.path.remove(str(REPO))

    def draw(gen, n):
        return torch.randn(n, generator=gen, device=gpu_cases.device())

    old = gpu_cases.DEVICE["name"]
    gpu_cases.DEVICE["name"] = "cpu"
    try:
        a, b = pending("t", draw, 4, seeded=True), pending("t", draw, 5, seeded=True)
        first = a.build()
        b.build()
        assert torch.equal(a.build(), first) and not torch.equal(b.build()[:4], first)
        assert a.label == "t/draw(4)"
    finally:
        gpu_cases.DEVICE["name"] = old


def _gpu_check():
    sys.path.insert(0, str(REPO))
    try:
        from benchmarks import gpu_check
        from benchmarks.gpu_cases import Pending
    finally:
        sys.path.remove(str(REPO))
    return gpu_check, Pending


def test_hard_limit_abandons_the_running_case_and_keeps_the_rest(tmp_path, monkeypatch):
    """--limit stops a case that overruns (a fake one that would sleep 60 s): it becomes a "timed out" row, the
    entries after it skipped rows, the results are written and run_entries returns; the alarm is undone after."""
    import signal
    import time

    gpu_check, Pending = _gpu_check()

    def checked(case, quick, peak):
        if case["name"] == "fam/slow":
            try:
                time.sleep(60)
            except Exception:   # noqa: BLE001 - a case's own handlers must not swallow the timeout
                pass
        return {"name": case["name"], "ok": True, "kernel_ms": 1.0, "baseline_ms": None, "rel_l2": 0.0,
                "max_abs_err": 0.0, "kernel_graph_ms": None, "gb_s": None, "tflop_s": None, "note": ""}

    monkeypatch.setattr(gpu_check, "check_and_time", checked)
    monkeypatch.setenv("OUT", str(tmp_path))
    entries = [Pending("fam/fast", lambda: {"name": "fam/fast"}),
               Pending("fam/two", lambda: [{"name": "fam/quick"}, {"name": "fam/slow"}]),
               Pending("fam/late", lambda: {"name": "fam/late"})]
    before = signal.getsignal(signal.SIGALRM)
    args = argparse.Namespace(budget=1e9, only=None, quick=True, limit=0.5, sweep_budget=1.0)
    start = time.time()
    rows = gpu_check.run_entries(entries, args, None, {"gpu": "none"}, started=start)
    assert time.time() - start < 10
    assert [r["name"] for r in rows] == ["fam/fast", "fam/quick", "fam/slow", "fam/late"]
    assert rows[0]["ok"] and rows[1]["ok"]
    assert "--limit 0" in rows[2]["timed_out"] and "past --limit" in rows[3]["skipped"]
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [r["name"] for r in saved["rows"]] == [r["name"] for r in rows]
    assert "| fam/slow | timed out |" in (tmp_path / "gpu_check.md").read_text()
    assert signal.getsignal(signal.SIGALRM) is before and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


HUNG_RUN = """
import argparse, json, signal, sys, time
sys.path.insert(0, {repo!r})
from benchmarks import gpu_check
from benchmarks.gpu_cases import Pending

def checked(case, quick, peak):
    if case["name"] == "fam/hung":   # as a kernel stuck in C: the alarm's Python handler never gets to run
        signal.pthread_sigmask(signal.SIG_BLOCK, {{signal.SIGALRM}})
        time.sleep(60)
    return {{"name": case["name"], "ok": True, "kernel_ms": 1.0, "baseline_ms": None, "rel_l2": 0.0,
             "max_abs_err": 0.0, "kernel_graph_ms": None, "gb_s": None, "tflop_s": None, "note": ""}}

gpu_check.check_and_time = checked
gpu_check.HardLimit.HANG_GRACE = 0.5
entries = [Pending("fam/fast", lambda: {{"name": "fam/fast"}}), Pending("fam/hung", lambda: {{"name": "fam/hung"}}),
           Pending("fam/late", lambda: {{"name": "fam/late"}})]
args = argparse.Namespace(budget=1e9, only=None, quick=True, limit=0.5, sweep_budget=1.0)
gpu_check.run_entries(entries, args, None, {{"gpu": "none"}}, started=time.time())
print("not reached")
sys.exit(3)
"""


def test_a_case_stuck_in_c_past_the_limit_still_gets_its_table(tmp_path):
    """A case the alarm cannot interrupt (SIGALRM blocked, as in a hung kernel): HANG_GRACE after --limit the
    watchdog thread writes the results, prints the table and ends the process with status 0."""
    import os
    import time

    start = time.time()
    out = subprocess.run([sys.executable, "-c", HUNG_RUN.format(repo=str(REPO))], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "OUT": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert time.time() - start < 30
    assert "not reached" not in out.stdout
    assert "[timed out] fam/hung" in out.stdout and "| fam/hung | timed out |" in out.stdout
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [r["name"] for r in saved["rows"]] == ["fam/fast", "fam/hung", "fam/late"]
    assert "skipped" in saved["rows"][2]
