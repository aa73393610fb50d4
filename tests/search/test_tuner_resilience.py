"""The tuning database keeps every finished trial when a tuning process is killed mid-study; a re-run resumes;
warm start enqueues the best configs found for another target; the CLI tunes the example workload."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import optuna
import torch

from lmforge.passes import dce, fuse_elementwise, merge_linears
from lmforge.search.studies import open_storage
from lmforge.search.tuner import tune

SCRIPT = textwrap.dedent("""
    import sys, time, torch
    from lmforge.passes import Knob, graph_pass, dce, fuse_elementwise, merge_linears
    from lmforge.search.tuner import tune

    @graph_pass("slow", knobs=[Knob("slow.x", "int", 0, low=0, high=100)])
    def slow(graph, x):
        time.sleep(0.2)  # a slow trial, so the kill lands mid-study
        return graph

    torch.manual_seed(0)  # the re-run below builds the same weights and inputs: it resumes this model's study
    m = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.SiLU(), torch.nn.Linear(32, 16))
    print("started", flush=True)
    tune(m, (torch.randn(4, 16),), target="h100", budget=1000, storage=sys.argv[1], study_name="killed",
         pipeline=[slow, merge_linears, fuse_elementwise, dce], progress=False)
""")


def test_killed_tuning_keeps_finished_trials_and_resumes(tmp_path):
    storage = f"sqlite:///{tmp_path}/db.sqlite"
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), storage], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "started"
    deadline = time.time() + 120
    done = 0
    while time.time() < deadline and done < 5:
        time.sleep(1.0)
        try:   # open_storage: the child may be creating the new database's tables at this moment
            study = optuna.load_study(study_name="killed", storage=open_storage(storage))
            done = sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
        except KeyError:
            pass
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    study = optuna.load_study(study_name="killed", storage=storage)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) >= 5, "every trial finished before the kill is in the database"
    assert all("config" in t.user_attrs and t.values for t in complete)
    from lmforge.passes import Knob, graph_pass

    @graph_pass("slow", knobs=[Knob("slow.x", "int", 0, low=0, high=100)])
    def fast(graph, x):
        return graph

    torch.manual_seed(0)
    again = tune(torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.SiLU(), torch.nn.Linear(32, 16)),
                 (torch.randn(4, 16),), target="h100", budget=len(complete) + 3, storage=storage,
                 study_name="killed", pipeline=[fast, merge_linears, fuse_elementwise, dce], progress=False)
    assert again.n_complete == len(complete) + 3


def test_warm_start_enqueues_the_other_targets_best(tmp_path):
    storage = f"sqlite:///{tmp_path}/db.sqlite"
    m = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.SiLU(), torch.nn.Linear(64, 32))
    x = torch.randn(8, 32)
    pipe = [merge_linears, fuse_elementwise, dce]
    first = tune(m, (x,), target="h100", budget=5, storage=storage, pipeline=pipe, progress=False)
    second = tune(m, (x,), target="a100", budget=3, storage=storage, pipeline=pipe, progress=False,
                  warm_start_from="h100")
    trials = sorted(second.study.trials, key=lambda t: t.number)
    assert any(t.params == {k: v for k, v in first.best_config.items()} for t in trials[:3])


def test_cli_tunes_the_example_workload_in_predict_mode(tmp_path):
    env = dict(os.environ, LMFORGE_CACHE=os.environ.get("LMFORGE_CACHE", ""))
    env.pop("LMFORGE_CACHE") if not env["LMFORGE_CACHE"] else None
    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", "lmforge", "tune", "examples/llama_workload.py", "--target", "h100",
                          "--budget", "50", "--objective", "latency", "--min-quality", "0.99", "--fits",
                          "--storage", f"sqlite:///{tmp_path}/db.sqlite", "--out", str(tmp_path / "report")],
                         capture_output=True, text=True, timeout=600, env=env)
    elapsed = time.time() - t0
    assert out.returncode == 0, out.stderr[-2000:]
    assert elapsed < 240, f"tuning took {elapsed:.0f} s"
    url = f"sqlite:///{tmp_path}/db.sqlite"
    study = optuna.load_study(study_name=optuna.get_all_study_summaries(url)[0].study_name, storage=url)
    default = min(study.trials, key=lambda t: t.number)
    best = study.best_trial
    assert best.values[0] < default.values[0], "the tuned config beats the default config's predicted latency"
    assert best.user_attrs["values"]["quality"] >= 0.99
    assert (tmp_path / "report" / "pareto.png").exists() and "best config" in out.stdout


def _open_storage(url):
    from lmforge.search.tuner import open_storage

    open_storage(url)
    return True


def test_workers_opening_a_new_database_at_once_all_succeed(tmp_path):
    """Several workers (processes) creating one new tuning database at the same moment: the one that loses the race
    to create its tables retries instead of failing (this raced in the kill-and-resume test)."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(3) as pool:
        for i in range(2):
            assert pool.map(_open_storage, [f"sqlite:///{tmp_path}/db{i}.sqlite"] * 3) == [True] * 3
