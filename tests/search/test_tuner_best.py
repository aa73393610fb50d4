"""Which config is "the best": `TuneResult.best_config` and `compile(config="best")` (best_configs) take the same one
(all objectives in order; hybrid: the measured best that meets the latency constraints as measured); hybrid needs
latency first; reports read foreign and hybrid studies; measure mode on a GPU target times on the GPU."""
import optuna
import pytest
import torch

import lmforge
from lmforge.errors import LmforgeError
from lmforge.passes import dce, fuse_elementwise, merge_linears
from lmforge.passes.base import Knob, graph_pass
from lmforge.search import studies, tuner
from lmforge.search.report import write_report
from lmforge.search.tuner import best_configs, prepare, ranked_trials, tune


@pytest.fixture(autouse=True)
def _own_cache(monkeypatch, tmp_path):
    """Studies, host probes and calibrations of these tests stay in a fresh cache directory."""
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Linear(32, 64), torch.nn.Linear(32, 64)
        self.c = torch.nn.Linear(64, 32)

    def forward(self, x):
        return self.c(torch.nn.functional.silu(self.a(x)) * self.b(x))


@graph_pass("nofuse", knobs=[Knob("nofuse.skip", "bool", True, choices=(True, False))])
def nofuse(graph, skip):
    """Fusion with a default that is off: the default config is not the fastest."""
    return graph if skip else dce(fuse_elementwise(merge_linears(graph)))


X = torch.randn(4, 32)


def test_best_configs_takes_what_tune_returned_over_all_objectives(tmp_path):
    storage = f"sqlite:///{tmp_path}/db.sqlite"
    res = tune(MLP(), (X,), target="h100", objectives=("quality", "latency"), budget=4, storage=storage,
               pipeline=[nofuse], progress=False, sampler="random")
    assert {t.user_attrs["config"]["nofuse.skip"] for t in res.study.trials} == {True, False}
    assert {t.values[0] for t in res.study.trials} == {1.0}, "quality ties: latency must decide"
    assert res.best_config == {"nofuse.skip": False}, "the fused config: same quality, lower latency"
    _, graph, _, _ = prepare(MLP(), (X,))
    assert best_configs(graph, "h100", storage) == [res.best_config]
    tuner_storage = studies.default_storage
    try:
        studies.default_storage = lambda: storage
        compiled = lmforge.compile(MLP(), (X,), target="h100", config="best", passes=[nofuse])
    finally:
        studies.default_storage = tuner_storage
    assert compiled.config == res.best_config


def test_config_best_takes_the_most_recently_run_study_and_says_which(tmp_path):
    """Not the study whose first trial started last: a resumed older study, or a rerun that ran no trial (its budget
    was reached), is the latest tune, and config="best" takes what it reported; study= picks another; the compiled
    model, the artifact's manifest and the loaded model name the study and trial."""
    storage = f"sqlite:///{tmp_path}/db.sqlite"
    run = dict(target="h100", storage=storage, pipeline=[nofuse], progress=False, sampler="random")
    tune(MLP(), (X,), objectives=("latency",), budget=2, **run)
    memory = tune(MLP(), (X,), objectives=("memory",), budget=2, **run)
    latency = tune(MLP(), (X,), objectives=("latency",), budget=4, **run)   # resumes the first study

    def best(**kw):
        return lmforge.compile(MLP(), (X,), target="h100", config="best", passes=[nofuse], storage=storage, **kw)

    def source(res):
        return {"study": res.study_name, "trial": ranked_trials(res.study)[0].number}

    compiled = best()
    assert compiled.config == latency.best_config and compiled.config_source == source(latency)
    path = compiled.export(tmp_path / "artifact")
    assert lmforge.load(path).config_source == source(latency)
    assert f"tuning study `{latency.study_name}`" in (path / "README.md").read_text()
    again = tune(MLP(), (X,), objectives=("memory",), budget=2, **run)   # reached its budget: runs no trial
    assert again.n_complete == 2 and best().config_source == source(memory)
    assert best(study=":latency:").config_source == source(latency)
    assert best(study=latency.study_name).config == latency.best_config
    with pytest.raises(LmforgeError, match="2 studies of this model on 'h100' match study=':workload:'"):
        best(study=":workload:")
    with pytest.raises(LmforgeError, match="no study of this model .* matches study='no-such-study'"):
        best(study="no-such-study")
    with pytest.raises(LmforgeError, match="study= names the study"):
        lmforge.compile(MLP(), (X,), target="h100", study=":latency:")


def test_config_best_of_a_study_without_a_feasible_trial_says_so(tmp_path):
    storage = f"sqlite:///{tmp_path}/db.sqlite"
    with pytest.raises(LmforgeError, match="no feasible configuration"):
        tune(MLP(), (X,), target="h100", budget=2, storage=storage, constraints={"latency": 1e-12},
             pipeline=[nofuse], progress=False)
    with pytest.raises(LmforgeError, match=r"its study has no feasible trial \(study .*: none of its 2 finished "
                                           r"trials meets its constraints \(latency<=1e-12\)\): relax the "
                                           "constraints or raise the budget"):
        lmforge.compile(MLP(), (X,), target="h100", config="best", passes=[nofuse], storage=storage)


def test_config_best_passes_over_a_newer_study_without_a_best_and_warns(tmp_path):
    storage = f"sqlite:///{tmp_path}/db.sqlite"
    run = dict(target="h100", storage=storage, pipeline=[nofuse], progress=False)
    good = tune(MLP(), (X,), objectives=("latency",), budget=2, **run)
    with pytest.raises(LmforgeError, match="no feasible configuration"):
        tune(MLP(), (X,), objectives=("latency",), budget=2, constraints={"latency": 1e-12}, **run)
    with pytest.warns(UserWarning, match=r"the more recently run study .*latency<=1e-12.* has no best config "
                                         r"\(none of its 2 finished trials meets its constraints"):
        compiled = lmforge.compile(MLP(), (X,), target="h100", config="best", passes=[nofuse], storage=storage)
    assert compiled.config == good.best_config and compiled.config_source["study"] == good.study_name


def test_ranking_ties_go_to_the_next_objective_then_the_earlier_trial():
    study = optuna.create_study(directions=["maximize", "minimize"])
    rows = [(1.0, 3.0), (1.0, 2.0), (0.5, 1.0), (1.0, 2.0)]
    for i, values in enumerate(rows):
        study.add_trial(optuna.trial.create_trial(values=list(values), user_attrs={"config": {"i": i}}))
    assert [t.number for t in ranked_trials(study)] == [1, 3, 0, 2]


def _fake_measurements(monkeypatch):
    """Hybrid's measurements, made up so the measured order is the reverse of what fusion predicts: unfused 1 s,
    elementwise fusion only 2 s, merged linears only 3 s, both 4 s."""
    real = tuner.evaluate_config

    def evaluate(ctx, config, objectives, measure_latency=False):
        values = real(ctx, config, objectives, measure_latency=False)
        if measure_latency:
            values["latency"] = values["measured_latency"] = (
                1.0 + 2 * config["fusion.merge_linears"] + config["fusion.elementwise"])
        return values

    monkeypatch.setattr(tuner, "evaluate_config", evaluate)


def test_hybrid_best_is_the_measured_best_for_compile_too_and_constraints_hold_as_measured(tmp_path, monkeypatch):
    _fake_measurements(monkeypatch)
    storage = f"sqlite:///{tmp_path}/db.sqlite"
    res = tune(MLP(), (X,), target="host", objectives=("latency",), mode="hybrid", hybrid_top=4, budget=8,
               constraints={"latency": 2.5}, storage=storage, pipeline=[merge_linears, fuse_elementwise, dce],
               progress=False, sampler="random")
    assert len(res.measured) == 4, "the 4 distinct configs are measured (repeated configs are not)"
    assert res.best_config == {"fusion.merge_linears": False, "fusion.elementwise": False}
    assert res.best_values["latency"] == res.best_values["measured_latency"] == 1.0
    broken = {n for n, v in res.measured_violations.items() if v == ["latency<=2.5"]}
    assert broken == {n for n, s in res.measured.items() if s > 2.5} and len(broken) == 2
    assert "BREAKS latency<=2.5 as measured" in res.table() and "break a constraint as measured" in res.summary()
    _, graph, _, _ = prepare(MLP(), (X,))
    assert best_configs(graph, "host", storage) == [res.best_config]
    table = write_report(res.study, tmp_path / "report")["table"].read_text()
    assert "| trial | measured latency | predicted latency | config | note |" in table
    best = min(res.measured, key=res.measured.get)
    best_row = next(line for line in table.splitlines() if line.startswith(f"| {best} | 1 |"))
    assert best_row.endswith("| best |")
    assert sum("breaks latency<=2.5 as measured" in line for line in table.splitlines()) == 2


def test_hybrid_with_every_measured_config_over_a_latency_bound_is_an_error(tmp_path, monkeypatch):
    _fake_measurements(monkeypatch)
    with pytest.raises(LmforgeError, match=r"none of the 4 configs measured on this machine meets latency<=0.5"):
        tune(MLP(), (X,), target="host", objectives=("latency",), mode="hybrid", hybrid_top=4, budget=8,
             constraints={"latency": 0.5}, storage=f"sqlite:///{tmp_path}/db.sqlite",
             pipeline=[merge_linears, fuse_elementwise, dce], progress=False, sampler="random")


def test_ctrl_c_while_measuring_says_to_rerun_and_leaves_no_best_until_the_measurement_finishes(tmp_path,
                                                                                                 monkeypatch):
    """Ctrl-C in hybrid's measurement phase is an LmforgeError saying to rerun (not a bare KeyboardInterrupt), and
    the measurements taken so far (or those of an earlier run, of other top configs) are no best: compile's
    config="best" and the report have none until the rerun has measured every top config."""
    _fake_measurements(monkeypatch)
    fake, measured, stop_at = tuner.evaluate_config, [], [None]

    def evaluate(ctx, config, objectives, measure_latency=False):
        if measure_latency:
            measured.append(config)
            if len(measured) == stop_at[0]:
                raise KeyboardInterrupt
        return fake(ctx, config, objectives, measure_latency)

    monkeypatch.setattr(tuner, "evaluate_config", evaluate)
    storage = f"sqlite:///{tmp_path}/db.sqlite"
    run = dict(target="host", objectives=("latency",), mode="hybrid", hybrid_top=4, storage=storage,
               pipeline=[merge_linears, fuse_elementwise, dce], progress=False, sampler="random")
    first = tune(MLP(), (X,), budget=6, **run)
    stop_at[0] = len(measured) + 2  # the second run's second measurement
    with pytest.raises(LmforgeError, match=r"interrupted while measuring the \d best predicted configs on this "
                                           r"machine \(1 measured\).*rerun the same command"):
        tune(MLP(), (X,), budget=8, **run)
    _, graph, _, _ = prepare(MLP(), (X,))
    assert ranked_trials(first.study) == [] and best_configs(graph, "host", storage) == []
    assert "best: none yet" in write_report(first.study, tmp_path / "report")["table"].read_text()
    with pytest.raises(LmforgeError, match="its study has no best config .* rerun the same tune command to finish"):
        lmforge.compile(MLP(), (X,), target="host", config="best", storage=storage, passes=run["pipeline"])
    again = tune(MLP(), (X,), budget=8, **run)
    assert again.measured and best_configs(graph, "host", storage) == [again.best_config]


@pytest.mark.parametrize("objectives", [("memory",), ("quality", "latency")])
def test_hybrid_needs_latency_or_throughput_first(tmp_path, objectives):
    with pytest.raises(LmforgeError, match="first objective must be 'latency' or 'throughput'"):
        tune(MLP(), (X,), target="host", objectives=objectives, mode="hybrid", budget=2,
             storage=f"sqlite:///{tmp_path}/db.sqlite", progress=False)


def test_report_of_a_study_tune_did_not_write(tmp_path):
    study = optuna.create_study(direction="maximize", storage=f"sqlite:///{tmp_path}/db.sqlite",
                                study_name="program-search")
    for strategy, value in (("greedy", 0.5), ("best_of_n", 0.7)):
        study.enqueue_trial({"program.strategy": strategy})
    study.optimize(lambda t: {"greedy": 0.5, "best_of_n": 0.7}[t.suggest_categorical(
        "program.strategy", ["greedy", "best_of_n"])], n_trials=2)
    table = write_report(study, tmp_path / "report")["table"].read_text()
    assert "| trial | objective0 | config |" in table
    assert "| 1 (best) | 0.7 | `{'program.strategy': 'best_of_n'}` |" in table, "maximized, by its direction"


def test_measure_mode_times_a_gpu_target_on_the_gpu(tmp_path, monkeypatch):
    """No GPU needed: CUDA is faked, and the model is built on the CPU where the tuner asks for cuda."""
    from lmforge.search import measure as timing

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    built, timed_on = [], []
    real_compiled = tuner.TuneContext.compiled

    def compiled(self, graph, config, device="cpu"):
        built.append(device)
        return real_compiled(self, graph, config)

    def measure(fn, device="cpu", **kw):
        timed_on.append(device)
        fn()
        return timing.Measurement(1e-3, 1e-3, 1e-3, 1, True)

    monkeypatch.setattr(tuner.TuneContext, "compiled", compiled)
    monkeypatch.setattr(tuner.TuneContext, "timing_inputs", lambda self: self.eval_inputs[0])
    monkeypatch.setattr(timing, "measure", measure)
    res = tune(MLP(), (X,), target="h100", objectives=("latency", "quality"), mode="measure", budget=2,
               storage=f"sqlite:///{tmp_path}/db.sqlite", pipeline=[merge_linears, fuse_elementwise, dce],
               progress=False)
    assert res.n_complete == 2 and set(timed_on) == {"cuda"}
    assert sorted(set(built)) == ["cpu", "cuda"], "timed on the GPU, quality compared on the CPU"


def test_timing_inputs_move_to_the_timing_device():
    ctx = tuner.TuneContext(None, [], None, [(torch.ones(2), 3)], None, {}, "measure", device="meta")
    moved = ctx.timing_inputs()
    assert moved[0].device.type == "meta" and moved[1] == 3


@pytest.mark.gpu
def test_measure_mode_on_this_gpu_runs_the_model_on_cuda(tmp_path):
    from lmforge.hwmodels.presets import target_for_device_name

    target = target_for_device_name(torch.cuda.get_device_name(0)).name
    res = tune(MLP(), (X,), target=target, objectives=("latency",), mode="measure", budget=2,
               storage=f"sqlite:///{tmp_path}/db.sqlite", pipeline=[merge_linears, fuse_elementwise, dce],
               progress=False)
    assert res.best_values["measured_latency"] > 0


def test_config_best_carries_its_trials_numbers_into_the_artifact(tmp_path):
    """compile(config="best") takes the trial's predicted and measured numbers along (`objectives`); export writes
    them into the manifest and README (saying latency was predicted, not measured, in predict mode); load keeps
    them, so a re-export does too. TuneResult.best_objectives gives the same numbers."""
    import json

    storage = f"sqlite:///{tmp_path}/db.sqlite"
    res = tune(MLP(), (X,), target="h100", objectives=("latency", "quality"), budget=4, storage=storage,
               pipeline=[nofuse], progress=False, sampler="random")
    compiled = lmforge.compile(MLP(), (X,), target="h100", config="best", passes=[nofuse], storage=storage)
    got = compiled.objectives
    assert got == res.best_objectives
    assert got["mode"] == "predict" and got["target"] == "h100" and got["bindings"] == {}
    assert got["predicted"]["latency"] == res.best_values["latency"] and got["predicted"]["fits"] is True
    assert set(got["predicted"]) == {"latency", "throughput", "memory", "fits", "eflops"}
    assert got["measured"] == {"quality": 1.0, "kl": res.best_values["kl"]}, "quality was run; latency was not"
    path = compiled.export(tmp_path / "art")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["objectives"] == json.loads(json.dumps(got))
    readme = (path / "README.md").read_text()
    assert "tuning mode `predict`): predicted on h100" in readme and "(latency was predicted, not measured)" in readme
    loaded = lmforge.load(path)
    assert loaded.objectives == manifest["objectives"]
    again = json.loads((loaded.export(tmp_path / "again") / "manifest.json").read_text())
    assert again["objectives"] == manifest["objectives"]
    plain = lmforge.compile(MLP(), (X,), target="h100", passes=[nofuse])
    assert plain.objectives is None
    readme = (plain.export(tmp_path / "plain") / "README.md").read_text()
    assert "Objectives: none recorded" in readme


def test_hybrid_objectives_list_the_measured_latency_beside_the_prediction(tmp_path, monkeypatch):
    _fake_measurements(monkeypatch)
    storage = f"sqlite:///{tmp_path}/db.sqlite"
    res = tune(MLP(), (X,), target="host", objectives=("latency",), mode="hybrid", hybrid_top=4, budget=8,
               storage=storage, pipeline=[merge_linears, fuse_elementwise, dce], progress=False, sampler="random")
    got = res.best_objectives
    assert got["mode"] == "hybrid" and got["measured"] == {"latency": 1.0}
    assert got["predicted"]["latency"] == res.best_values["predicted_latency"] != 1.0
    assert "throughput" not in got["predicted"], "the study's throughput follows the measured latency"
    compiled = lmforge.compile(MLP(), (X,), target="host", config="best", storage=storage,
                               passes=[merge_linears, fuse_elementwise, dce])
    assert compiled.objectives == got
