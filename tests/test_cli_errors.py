"""The command line (and the tuner behind it) on bad or changed input: every mistake a user can make is an
`lmforge: error: ...` message with exit code 2, never a traceback; changed tuning settings never reuse a study run
under other ones; hybrid mode prints measured and predicted numbers for the same shapes; nothing is silently
ignored. Small models, small budgets, predict mode on a preset target wherever possible."""
import textwrap

import optuna
import pytest
import torch

from lmforge.cli import main
from lmforge.errors import LmforgeError, WorkloadError
from lmforge.passes import Knob, dce, fuse_elementwise, graph_pass, merge_linears
from lmforge.search.tuner import tune
from lmforge.workload import Workload, load_workload

MLP_SOURCE = textwrap.dedent("""
    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(16, 32), torch.nn.Linear(16, 32)
            self.c = torch.nn.Linear(32, 16)

        def forward(self, x):
            return self.c(torch.nn.functional.silu(self.a(x)) * self.b(x))
""")
_namespace = {"torch": torch}
exec(MLP_SOURCE, _namespace)   # the same class here as in the workload file below
MLP = _namespace["MLP"]

MLP_WORKLOAD = "import torch\nfrom lmforge import Workload\n" + MLP_SOURCE + textwrap.dedent("""

    def workload():
        torch.manual_seed(0)
        return Workload(model=MLP().eval(), example_inputs=(torch.randn(4, 16),), dynamic={"x": {0: "batch"}},
                        eval_inputs=[(torch.randn(8, 16),)], name="mlp", extras={"serving_dims": {"batch": 64}})
""")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # --threads sets it for the process


@pytest.fixture
def wl_file(tmp_path):
    path = tmp_path / "mlp_workload.py"
    path.write_text(MLP_WORKLOAD)
    return str(path)


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def cli_error(capsys, *argv) -> str:
    code, out, err = run_cli(capsys, *argv)
    assert code == 2, (out, err)
    assert err.startswith("lmforge: error: ") and "Traceback" not in err, err
    return err


# ---- 1. a changed constraint (or any setting that changes what a trial means) is a new study --------------------

def test_changed_constraints_start_a_new_study_and_same_ones_resume(capsys, tmp_path, wl_file):
    db = f"sqlite:///{tmp_path}/t.db"
    _, first, _ = run_cli(capsys, "tune", wl_file, "--budget", 3, "--min-quality", 0.5, "--storage", db)
    _, other, _ = run_cli(capsys, "tune", wl_file, "--budget", 3, "--min-quality", 0.9, "--storage", db)
    name1, name2 = first.split()[1], other.split()[1]
    assert name1 != name2 and "quality>=0.5" in name1 and "quality>=0.9" in name2
    assert "3 trials finished" in other and "resumed" not in other, "a new constraint runs its own trials"
    _, again, _ = run_cli(capsys, "tune", wl_file, "--budget", 4, "--min-quality", 0.5, "--storage", db)
    assert again.split()[1] == name1 and "4 trials finished" in again and "ran 1 new" in again
    studies = optuna.get_all_study_summaries(db)
    assert len(studies) == 2
    for s in studies:
        assert s.user_attrs["settings"]["constraints"]["quality"] in (0.5, 0.9)


def test_max_tp_keeps_the_calibrated_pipeline(capsys, tmp_path, wl_file):
    """--max-tp adds the tensor-parallel pass to the same calibrated pipeline tune uses by default: AWQ (which needs
    calibration inputs) stays a knob, as without --max-tp (it was dropped)."""
    db = f"sqlite:///{tmp_path}/t.db"
    assert run_cli(capsys, "tune", wl_file, "--budget", 1, "--storage", db)[0] == 0
    assert run_cli(capsys, "tune", wl_file, "--budget", 1, "--storage", db, "--max-tp", 2)[0] == 0
    knobs = [set(s.user_attrs["knob_defaults"]) for s in optuna.get_all_study_summaries(db)]
    assert len(knobs) == 2 and all("quant.awq" in k for k in knobs)
    assert [("shard.tp" in k) for k in knobs].count(True) == 1


def test_export_config_best_reads_the_storage_tune_wrote(capsys, tmp_path, wl_file):
    """`lmforge export --config best --storage URL` finds a study `lmforge tune --storage URL` wrote (it looked in
    the default database only); --storage without --config best, or a database that is not there, is an error."""
    db = f"sqlite:///{tmp_path}/t.db"
    assert run_cli(capsys, "tune", wl_file, "--budget", 2, "--storage", db)[0] == 0
    assert "no tuned configuration" in cli_error(capsys, "export", wl_file, "--out", tmp_path / "a1",
                                                 "--config", "best")
    code, out, _ = run_cli(capsys, "export", wl_file, "--out", tmp_path / "a2", "--config", "best", "--storage", db)
    assert code == 0 and (tmp_path / "a2" / "manifest.json").is_file(), out
    assert "pass --config best with it" in cli_error(capsys, "export", wl_file, "--out", tmp_path / "a3",
                                                     "--storage", db)
    assert "there is no tuning database" in cli_error(capsys, "export", wl_file, "--out", tmp_path / "a4",
                                                      "--config", "best", "--storage", f"sqlite:///{tmp_path}/no.db")


def test_export_config_best_takes_the_latest_tune_and_says_which_study(capsys, tmp_path, wl_file):
    """tune latency, tune memory, resume latency: `export --config best` takes the latency study's best (the last
    tune), prints the study and records it in the manifest; --study takes another; --study needs --config best."""
    import json

    db = f"sqlite:///{tmp_path}/t.db"
    for objective, budget in (("latency", 2), ("memory", 2), ("latency", 3)):
        code, out, _ = run_cli(capsys, "tune", wl_file, "--budget", budget, "--storage", db, "--objective", objective)
        assert code == 0, out
    latency = out.splitlines()[0].split()[1]   # "study NAME in URL: ..."
    assert ":latency:" in latency
    code, out, _ = run_cli(capsys, "export", wl_file, "--out", tmp_path / "a", "--config", "best", "--storage", db)
    assert code == 0 and f"config: the best of tuning study {latency} (trial " in out, out
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["config_source"]["study"] == latency
    objectives = manifest["objectives"]   # the trial's numbers, not {}: predicted on the target, nothing timed
    assert objectives["mode"] == "predict" and objectives["predicted"]["latency"] > 0
    assert "latency" not in objectives["measured"]
    code, out, _ = run_cli(capsys, "export", wl_file, "--out", tmp_path / "b", "--config", "best", "--storage", db,
                           "--study", ":memory:")
    assert code == 0 and ":memory:" in out.splitlines()[0], out
    assert "--study names the study" in cli_error(capsys, "export", wl_file, "--out", tmp_path / "c", "--study", "x")


def test_export_config_best_after_a_tensor_parallel_tune(capsys, tmp_path, wl_file):
    """`tune --max-tp N` then `export --config best` takes that tune's best (it said: no tuned configuration)."""
    import ast
    import json

    db = f"sqlite:///{tmp_path}/t.db"
    code, out, _ = run_cli(capsys, "tune", wl_file, "--budget", 3, "--storage", db, "--max-tp", 2)
    assert code == 0, out
    best = json.loads(json.dumps(ast.literal_eval(out.split("best config: ")[1].splitlines()[0])))
    code, out, _ = run_cli(capsys, "export", wl_file, "--out", tmp_path / "a", "--config", "best", "--storage", db)
    assert code == 0 and ":tp<=2:" in out.splitlines()[0], out
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["config"] == best and "shard.tp" in best


def test_a_named_study_refuses_other_settings(tmp_path):
    db = f"sqlite:///{tmp_path}/t.db"
    pipe = [merge_linears, fuse_elementwise, dce]
    x = torch.randn(4, 16)
    model = MLP()
    tune(model, (x,), target="h100", budget=2, storage=db, study_name="mine", pipeline=pipe, progress=False,
         constraints={"quality": 0.5})
    with pytest.raises(LmforgeError, match="other settings.*constraints"):
        tune(model, (x,), target="h100", budget=3, storage=db, study_name="mine", pipeline=pipe, progress=False,
             constraints={"quality": 0.9})
    with pytest.raises(LmforgeError, match="other settings.*weights: study has"):
        tune(MLP(), (x,), target="h100", budget=3, storage=db, study_name="mine", pipeline=pipe, progress=False,
             constraints={"quality": 0.5})
    again = tune(model, (x,), target="h100", budget=3, storage=db, study_name="mine", pipeline=pipe,
                 progress=False, constraints={"quality": 0.5})
    assert again.n_complete == 3 and again.n_earlier == 2


# ---- 2. hybrid: the printed rows, the best row and best config agree; both numbers at the same sizes -----------

def test_hybrid_predicts_at_the_measured_sizes_and_prints_measured_latency(capsys, tmp_path, wl_file):
    wl = load_workload(wl_file)
    db = f"sqlite:///{tmp_path}/t.db"
    pipe = [merge_linears, fuse_elementwise, dce]
    predicted = tune(wl, target="h100", budget=2, storage=db, pipeline=pipe, progress=False)
    assert predicted.bindings["batch"] == 64, "predict mode prices the serving sizes"
    res = tune(wl, target="host", mode="hybrid", budget=3, hybrid_top=2, storage=db, pipeline=pipe, progress=False)
    assert res.bindings["batch"] == 8, "hybrid measures the first eval input and predicts at its sizes"
    assert all(t.user_attrs["values"]["eflops"] >= 0 for t in res.study.trials)
    best = min(res.measured, key=res.measured.get)
    rows = res.table().splitlines()
    assert "measured latency" in rows[0] and "predicted latency" in rows[0]
    assert int(rows[1].split()[0]) == best and len(rows) == 1 + len(res.measured)
    assert res.best_values["latency"] == res.measured[best]
    code, out, _ = run_cli(capsys, "tune", wl_file, "--target", "host", "--mode", "hybrid", "--budget", 3,
                           "--storage", db, "--threads", 1)
    assert code == 0 and "measured on this machine" in out and "batch=8" in out and "predicted latency" in out


# ---- 3. --threads: calibrate says what it applies to; the other commands take --threads ----------------------

def test_threads_flag_and_calibrate_message(capsys, monkeypatch, wl_file):
    import sys

    from lmforge.hwmodels import get_target

    cal_module = sys.modules["lmforge.hwmodels.calibrate"]  # the package re-exports the function under this name

    class FakeCalibration:
        samples, efficiency, launch_overhead_s = (), {"matmul": (0.5, 0.5)}, 1e-6

        def __init__(self, hw):
            self.hw_fingerprint = hw.fingerprint()

    monkeypatch.setattr(cal_module, "calibrate", lambda hw, progress=False: FakeCalibration(hw))
    code, out, _ = run_cli(capsys, "calibrate", "--target", "host", "--threads", 1)
    assert code == 0 and "measured with 1 torch thread" in out and "--threads 1" in out
    assert torch.get_num_threads() == 1
    one = get_target("host").fingerprint()
    torch.set_num_threads(2)
    code, _, _ = run_cli(capsys, "compile", wl_file, "--threads", 1)
    assert code == 0 and torch.get_num_threads() == 1 and get_target("host").fingerprint() == one
    assert "--threads must be >= 1" in cli_error(capsys, "calibrate", "--threads", 0)
    assert "--threads must be >= 1" in cli_error(capsys, "calibrate", "--threads", -2)
    assert "--threads must be >= 1" in cli_error(capsys, "tune", wl_file, "--threads", 0)


# ---- 4. report --study: an exact name wins over substring matches; the listing names the target --------------

def test_report_prefers_an_exact_study_name(capsys, tmp_path):
    db = f"sqlite:///{tmp_path}/t.db"
    for name in ("abc", "abc-long"):
        tune(MLP(), (torch.randn(4, 16),), target="h100", budget=2, storage=db, study_name=name,
             pipeline=[merge_linears, dce], progress=False)
    code, out, _ = run_cli(capsys, "report", "--storage", db)
    assert code == 0 and "abc-long  (target h100" in out
    code, out, _ = run_cli(capsys, "report", "--storage", db, "--study", "abc", "--out", tmp_path / "r")
    assert code == 0 and "Tuning report: abc\n" in (tmp_path / "r" / "report.md").read_text()
    assert "2 studies match 'ab'" in cli_error(capsys, "report", "--storage", db, "--study", "ab")
    tune(MLP(), (torch.randn(4, 16),), target="h100", budget=1, storage=db, study_name="other",
         pipeline=[merge_linears, dce], progress=False)
    listed = cli_error(capsys, "report", "--storage", db, "--study", "zzz")   # no match: every study is listed
    assert "'other'" in listed and "'other'" not in cli_error(capsys, "report", "--storage", db, "--study", "ab")


# ---- 5. errors, not tracebacks -------------------------------------------------------------------------------

@pytest.fixture
def artifact(capsys, tmp_path, wl_file):
    out = tmp_path / "art"
    assert main(["export", wl_file, "--target", "h100", "--out", str(out)]) == 0
    capsys.readouterr()
    return out


@pytest.mark.parametrize("dim, message", [
    ("batch", "give NAME=VALUE"), ("batch=abc", "must be a whole number"), ("batch=-1", "cannot be negative"),
    ("nosuch=3", "no dimension nosuch; its symbolic dims are batch"),
])
def test_run_dim_errors(capsys, artifact, dim, message):
    assert message in cli_error(capsys, "run", artifact, "--dim", dim)


def test_run_with_a_good_dim_and_a_symlinked_artifact(capsys, tmp_path, artifact):
    code, out, _ = run_cli(capsys, "run", artifact, "--dim", "batch=3")
    assert code == 0 and "(3, 16)" in out
    (tmp_path / "link").symlink_to(artifact)
    err = cli_error(capsys, "run", tmp_path / "link")
    assert "symbolic link" in err and "symlinks are refused" in err


@pytest.mark.parametrize("storage, message", [
    ("/tmp/x.db", "is not a URL"), ("sqlite:////nonexist/dir/x.db", "does not exist"),
    ("bogus://x", "cannot open the tuning storage"),
])
@pytest.mark.parametrize("command", ["tune", "report"])
def test_bad_storage_urls(capsys, wl_file, storage, message, command):
    argv = ["tune", wl_file, "--budget", 1] if command == "tune" else ["report"]
    assert message in cli_error(capsys, *argv, "--storage", storage)


def test_out_that_is_a_file_is_refused_before_tuning(capsys, tmp_path, wl_file):
    db = f"sqlite:///{tmp_path}/t.db"
    (tmp_path / "file").write_text("x")
    assert "is not a folder" in cli_error(capsys, "tune", wl_file, "--storage", db, "--out", tmp_path / "file")
    assert not optuna.get_all_study_summaries(db), "refused before any trial ran"
    assert run_cli(capsys, "tune", wl_file, "--budget", 1, "--storage", db)[0] == 0
    assert "is not a folder" in cli_error(capsys, "report", "--storage", db, "--study", "mlp",
                                          "--out", tmp_path / "file")
    from lmforge.search.report import write_report

    with pytest.raises(LmforgeError, match="is not a folder"):
        write_report(optuna.load_study(study_name=optuna.get_all_study_summaries(db)[0].study_name, storage=db),
                     tmp_path / "file")


BAD_WORKLOADS = {
    "needsargs": ("def workload(n):\n    return None\n", r"needs the argument\(s\) \['n'\]"),
    "baddict": ("def workload():\n    return {'model': None, 'example_inputs': (), 'bogus_field': 1}\n",
                r"unknown field\(s\) \['bogus_field'\]"),
    "syntaxerr": ("def workload(:\n    pass\n", r"SyntaxError: .*syntaxerr.py:1"),
    "importerr": ("import not_a_real_package_xyz\n", r"ModuleNotFoundError: .*not_a_real_package_xyz.*importerr.py:1"),
    "raises": ("def workload():\n    raise ValueError('boom in user code')\n", r"ValueError: boom in user code"),
    "notuple": ("import torch\nfrom lmforge import Workload\ndef workload():\n    return Workload(model=lambda x: x,"
                " example_inputs=torch.randn(4, 4))\n", r"example_inputs must be a tuple.*not a Tensor"),
    "notcallable": ("workload = 5\n", r"`workload` is a int, not a function"),
}


@pytest.mark.parametrize("name", sorted(BAD_WORKLOADS))
def test_bad_workload_files(capsys, tmp_path, name):
    text, pattern = BAD_WORKLOADS[name]
    path = tmp_path / f"{name}.py"
    path.write_text(text)
    err = cli_error(capsys, "inspect", path)
    assert "while loading workload" in err or name == "notcallable"
    assert __import__("re").search(pattern, err), err


# ---- 6. accuracy without a checker is refused up front ---------------------------------------------------------

def test_accuracy_needs_a_checker(capsys, tmp_path, wl_file):
    with pytest.raises(LmforgeError, match="needs a workload with a checker"):
        tune(load_workload(wl_file), target="h100", objectives=("accuracy",), budget=2,
             storage=f"sqlite:///{tmp_path}/t.db", progress=False)
    assert "checker" in cli_error(capsys, "tune", wl_file, "--objective", "accuracy",
                                  "--storage", f"sqlite:///{tmp_path}/t.db")


@pytest.mark.parametrize("dims, message", [
    ('{"btch": 64}', """Workload.extras["serving_dims"] ['btch'] name no symbolic size of this graph; its symbolic """
                     """sizes are: batch"""),
    ('{"batch": "64"}', """Workload.extras["serving_dims"] {'batch': '64'}: each size must be a whole number"""),
    ('[64]', """Workload.extras["serving_dims"] must be a dict of symbolic sizes"""),
])
def test_bad_serving_dims_are_an_error_before_any_trial(capsys, tmp_path, dims, message):
    """A typo in serving_dims failed every trial with a traceback, and the final error did not name it."""
    path = tmp_path / "typo_workload.py"
    path.write_text(MLP_WORKLOAD.replace('{"batch": 64}', dims))
    err = cli_error(capsys, "tune", path, "--budget", 2, "--storage", f"sqlite:///{tmp_path}/t.db")
    assert message in err, err
    assert not optuna.get_all_study_summaries(f"sqlite:///{tmp_path}/t.db"), "refused before any trial"


# ---- 7. nothing silently ignored -------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["inspect", "{wl}", "--print-after", "nosuchpass"], "no pass named 'nosuchpass'; the passes are"),
    (["compile", "{wl}", "--target", "nosuch"], "unknown target 'nosuch'"),
    (["inspect", "{wl}", "--target", "nosuch"], "unknown target 'nosuch'"),
    (["targets", "list", "h100"], "targets show h100"),
    (["tune", "{wl}", "--max-tp", "3"], "power of two"),
    (["tune", "{wl}", "--max-tp", "-1"], "power of two"),
    (["tune", "{wl}", "--budget", "0"], "--budget must be"),
    (["tune", "{wl}", "--budget", "-3"], "--budget must be"),
    (["tune", "{wl}", "--min-quality", "1.5"], "out of range"),
])
def test_bad_options_are_errors(capsys, wl_file, argv, message):
    assert message in cli_error(capsys, *[a.replace("{wl}", wl_file) for a in argv])


def test_tune_api_checks_budget_and_constraint_ranges(tmp_path):
    db = f"sqlite:///{tmp_path}/t.db"
    with pytest.raises(LmforgeError, match="budget must be"):
        tune(MLP(), (torch.randn(4, 16),), budget=0, storage=db, progress=False)
    with pytest.raises(LmforgeError, match="out of range"):
        tune(MLP(), (torch.randn(4, 16),), budget=2, storage=db, progress=False, constraints={"quality": 1.5})
    with pytest.raises(LmforgeError, match="unknown constraint"):
        tune(MLP(), (torch.randn(4, 16),), budget=2, storage=db, progress=False, constraints={"qualty": 0.9})


def test_compile_says_triton_was_skipped_without_a_gpu(capsys, monkeypatch, wl_file):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    code, out, err = run_cli(capsys, "compile", wl_file, "--backend", "triton")
    assert code == 0 and "--backend triton was skipped" in err and "no" in err and "GPU" in err


def test_inspect_print_after_prints_the_named_passes(capfd, wl_file):
    assert main(["inspect", wl_file, "--print-after", "dce,cse"]) == 0
    err = capfd.readouterr().err
    assert "// IR after cse" in err and "// IR after dce" in err and "IR after fold_shapes" not in err


# ---- 8. inspect --knobs lists only the knobs that can change the workload's graph --------------------------------

def test_inspect_knobs_are_those_of_the_graph(capsys, wl_file):
    code, out, _ = run_cli(capsys, "inspect", wl_file, "--knobs")
    knobs = out.split("\nknobs")[1]
    assert code == 0 and "  fusion.merge_linears:" in knobs
    assert "  attn.decode_pattern:" not in knobs, "an MLP has no attention, so no attention knobs"
    assert "no effect on this graph: attn.decode_pattern" in knobs


# ---- 9. example_inputs must be a tuple ----------------------------------------------------------------------

def test_workload_validates_its_fields():
    with pytest.raises(WorkloadError, match=r"tuple of positional inputs, e.g. `example_inputs=\(x,\)`"):
        Workload(model=lambda x: x, example_inputs=torch.randn(4, 4))
    with pytest.raises(WorkloadError, match="model is None"):
        Workload(model=None, example_inputs=())
    with pytest.raises(WorkloadError, match="item 0 is a Tensor"):
        Workload(model=lambda x: x, example_inputs=(torch.randn(2),), eval_inputs=[torch.randn(2)])
    assert Workload(model=lambda x: x, example_inputs=[torch.randn(2)]).example_inputs[0].shape == (2,)
    with pytest.warns(DeprecationWarning, match="token_data is ignored"):   # removed as unused: still accepted
        work = Workload(lambda x: x, (torch.randn(2),), None, None, None, torch.zeros(2, 3), "named")
    assert work.name == "named"


# ---- 10. pruned trials are shown, with why ----------------------------------------------------------------------

def test_pruned_trials_are_counted_with_their_reason(tmp_path):
    from lmforge.passes.shard import ShardError

    @graph_pass("picky", knobs=[Knob("picky.n", "categorical", 1, choices=(1, 3))])
    def picky(graph, n):
        if n == 3:
            raise ShardError("3 does not divide the heads")
        return graph

    res = tune(MLP(), (torch.randn(4, 16),), target="h100", budget=8, storage=f"sqlite:///{tmp_path}/t.db",
               pipeline=[picky, dce], progress=False, sampler="random", seed=1)
    assert res.n_pruned >= 1 and res.pruned_reasons == {"3 does not divide the heads": res.n_pruned}
    assert f"{res.n_pruned} pruned" in res.summary() and "3 does not divide the heads" in res.summary()


# ---- 12. no per-trial warnings about conditional knobs sampled independently -------------------------------------

def test_gp_sampler_does_not_warn_about_conditional_knobs(capfd, tmp_path):
    @graph_pass("cond", knobs=[Knob("cond.kind", "categorical", "a", choices=("a", "b")),
                               Knob("cond.size", "int", 2, low=1, high=8, condition=("cond.kind", ("b",)))])
    def cond(graph, kind, size):
        return graph

    tune(MLP(), (torch.randn(4, 16),), target="h100", budget=6, storage=f"sqlite:///{tmp_path}/t.db",
         pipeline=[cond, dce], progress=False, sampler="gp")
    assert "sampled independently" not in capfd.readouterr().err


def test_export_takes_a_config_as_json_or_file(capsys, tmp_path, wl_file):
    import json

    out = tmp_path / "art"
    code, said, _ = run_cli(capsys, "export", wl_file, "--target", "h100", "--out", out, "--config",
                            '{"quant.weight_bits": 8, "quant.group_size": 16}')
    assert code == 0 and "artifact written" in said
    assert json.loads((out / "manifest.json").read_text())["config"]["quant.weight_bits"] == 8
    cfg = tmp_path / "cfg.json"
    cfg.write_text('{"quant.weight_bit": 8}')
    assert "did you mean 'quant.weight_bits'" in cli_error(capsys, "export", wl_file, "--out", tmp_path / "b",
                                                           "--config", cfg)
    assert "a JSON object of knob values" in cli_error(capsys, "export", wl_file, "--out", tmp_path / "c",
                                                       "--config", "{not json")


def test_export_kernel_targets_builds_several_gpus_into_one_artifact(capsys, tmp_path, wl_file):
    """`--kernel-targets a100` adds a100's kernels beside the --target's (one artifact for both GPUs); a name that
    is not a GPU target is an error that says so."""
    import json

    code, out, _ = run_cli(capsys, "export", wl_file, "--target", "h100", "--out", tmp_path / "a",
                           "--kernel-targets", "a100")
    assert code == 0, out
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert {"h100", "a100"} <= {t["name"] for t in manifest["targets"]}
    for gpu in ("h100", "a100"):
        assert any(f.startswith(f"kernels/{gpu}/") and f.endswith(".cubin") for f in manifest["files"]), gpu
        cubins = sum(f.startswith(f"kernels/{gpu}/triton/") and f.endswith(".cubin") for f in manifest["files"])
        assert f"{gpu}: {cubins} Triton cubins, " in (tmp_path / "a" / "README.md").read_text()
    assert "is not a CUDA GPU" in cli_error(capsys, "export", wl_file, "--out", tmp_path / "b",
                                            "--kernel-targets", "host")


def test_export_host_kernels_writes_the_tvm_host_library_and_run_uses_it(capsys, tmp_path, wl_file):
    code, out, _ = run_cli(capsys, "export", wl_file, "--target", "host", "--kernels", "--out", tmp_path / "a")
    assert code == 0 and any((tmp_path / "a" / "kernels" / "host" / "tvm").glob("*.so"))
    code, out, _ = run_cli(capsys, "run", tmp_path / "a", "--kernels", "required")
    assert code == 0 and "nodes run by tvm:" in out
