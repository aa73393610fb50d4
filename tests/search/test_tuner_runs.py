"""How runs of a study add up: the budget counts every ended trial of every run and worker (not interrupted ones),
Ctrl-C before any result is a clear error and the default config still runs on resume, a resumed sampler does not
replay its draws, a repeated config reuses its numbers, warm start enqueues only what is new, a recalibrated target
starts a new study; and the arguments a study depends on are checked (bindings, layer groups, a Hardware target)."""
import dataclasses

import optuna
import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.passes import dce, fuse_elementwise, merge_linears, sparsity_pass
from lmforge.passes.base import Knob, graph_pass
from lmforge.search import tuner
from lmforge.search.tuner import best_configs, prepare, tune

COMPLETE, FAIL = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL


@pytest.fixture(autouse=True)
def _own_cache(monkeypatch, tmp_path):
    """Studies and calibrations of these tests stay in a fresh cache directory."""
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.SiLU(), torch.nn.Linear(32, 16))


X = torch.randn(4, 16)
FUSION = [merge_linears, fuse_elementwise, dce]


def storage_of(tmp_path) -> str:
    return f"sqlite:///{tmp_path}/db.sqlite"


class Interrupt:
    """A pass that raises KeyboardInterrupt (Ctrl-C) on its `at`-th call, and a knob with a wide range."""

    def __init__(self, at: int | None):
        self.at, self.calls = at, 0

        @graph_pass("wide", knobs=[Knob("wide.x", "int", 0, low=0, high=10**6)])
        def wide(graph, x):
            self.calls += 1
            if self.calls == self.at:
                raise KeyboardInterrupt
            return graph

        self.pipeline = [wide, *FUSION]


def test_ctrl_c_in_the_first_trial_is_a_clear_error_and_the_default_runs_on_resume(tmp_path):
    run = dict(target="h100", storage=storage_of(tmp_path), progress=False, study_name="s")
    with pytest.raises(LmforgeError, match="interrupted before any trial finished.*rerun the same command"):
        tune(mlp(), (X,), budget=3, pipeline=Interrupt(at=1).pipeline, **run)
    res = tune(mlp(), (X,), budget=3, pipeline=Interrupt(at=None).pipeline, **run)
    assert res.n_complete == 3, "the interrupted trial does not count toward the budget"
    assert res.n_failed == 0 and res.n_interrupted == 1 and "1 interrupted" in res.summary()
    defaults = res.study.user_attrs["knob_defaults"]
    assert any(t.state == COMPLETE and t.user_attrs["config"] == defaults for t in res.study.trials)


def test_ctrl_c_later_returns_the_finished_trials(tmp_path):
    res = tune(mlp(), (X,), target="h100", budget=10, storage=storage_of(tmp_path), progress=False,
               pipeline=Interrupt(at=3).pipeline)
    assert (res.n_complete, res.n_failed, res.n_interrupted) == (2, 0, 1)


def test_ctrl_c_leaves_no_optuna_traceback_but_failed_configs_are_still_logged(tmp_path):
    """Optuna logged the interrupted trial as failed, with the KeyboardInterrupt's traceback, before tune's own
    summary; a config that fails is still logged (with its error)."""
    import logging

    calls = []

    @graph_pass("flaky", knobs=[Knob("flaky.x", "int", 0, low=0, high=10**6)])
    def flaky(graph, x):
        calls.append(x)
        if len(calls) == 2:
            raise ValueError("a broken config")
        if len(calls) == 4:
            raise KeyboardInterrupt
        return graph

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("optuna").addHandler(handler)
    try:
        res = tune(mlp(), (X,), target="h100", budget=10, storage=storage_of(tmp_path), progress=False,
                   pipeline=[flaky, *FUSION])
    finally:
        logging.getLogger("optuna").removeHandler(handler)
    assert (res.n_complete, res.n_failed, res.n_interrupted) == (2, 1, 1)
    messages = [r.getMessage() for r in records]
    assert not any(r.exc_info and r.exc_info[0] is KeyboardInterrupt for r in records), messages
    assert not any(m.startswith("Trial 3 failed") for m in messages), messages
    assert any(m.startswith("Trial 1 failed") and "a broken config" in m for m in messages), messages
    assert not logging.getLogger("optuna.study._optimize").filters, "the filter is gone after the run"


def test_a_resumed_study_does_not_replay_its_draws(tmp_path):
    run = dict(target="h100", storage=storage_of(tmp_path), progress=False, sampler="random",
               pipeline=Interrupt(at=None).pipeline)
    tune(mlp(), (X,), budget=4, **run)
    res = tune(mlp(), (X,), budget=8, **run)
    xs = [t.user_attrs["config"]["wide.x"] for t in res.study.trials]
    assert len(set(xs)) == 8, xs
    assert not any("duplicate_of" in t.user_attrs for t in res.study.trials)


def test_a_repeated_config_takes_the_earlier_trials_numbers(tmp_path, monkeypatch):
    real, evaluated = tuner.evaluate_config, []

    def evaluate(ctx, config, objectives, measure_latency=False):
        evaluated.append(dict(config))
        return real(ctx, config, objectives, measure_latency)

    monkeypatch.setattr(tuner, "evaluate_config", evaluate)
    res = tune(mlp(), (X,), target="h100", budget=10, storage=storage_of(tmp_path), progress=False,
               pipeline=FUSION, sampler="random")  # 4 configs in the space
    assert res.n_complete == 10, "repeats count toward the budget (a small space cannot loop)"
    assert len(evaluated) == len({tuple(sorted(c.items())) for c in evaluated}), "no config evaluated twice"
    trials = {t.number: t for t in res.study.trials}
    repeats = [t for t in trials.values() if "duplicate_of" in t.user_attrs]
    assert len(repeats) == 10 - len(evaluated) == res.n_duplicates > 0
    for t in repeats:
        first = trials[t.user_attrs["duplicate_of"]]
        assert first.user_attrs["config"] == t.user_attrs["config"] and first.values == t.values
        assert "duplicate_of" not in first.user_attrs
    assert all(p["trial"] not in {t.number for t in repeats} for p in res.pareto)


def test_active_params_are_what_a_trial_sampling_the_config_holds():
    from lmforge.search.space import active_params

    knobs = [Knob("x.size", "int", 4, low=1, high=8, condition=("x.pattern", ("topk",))),
             Knob("x.pattern", "categorical", "dense", choices=("dense", "topk"))]
    assert active_params({"x.pattern": "dense", "x.size": 4}, knobs) == {"x.pattern": "dense"}
    assert active_params({"x.pattern": "topk"}, knobs) == {"x.pattern": "topk", "x.size": 4}


def test_warm_start_enqueues_only_new_configs_and_warns_without_a_source(tmp_path):
    storage = storage_of(tmp_path)
    with pytest.warns(UserWarning, match="warm_start_from='a100': the storage has no tuning study"):
        tune(mlp(), (X,), target="h100", budget=2, storage=storage, pipeline=FUSION, progress=False,
             warm_start_from="a100")
    first = tune(mlp(), (X,), target="a100", budget=4, storage=storage, pipeline=FUSION, progress=False)
    defaults = first.study.user_attrs["knob_defaults"]
    assert first.best_config == defaults, "(on this model the default config is the best)"
    second = tune(mlp(), (X,), target="l4", budget=3, storage=storage, pipeline=FUSION, progress=False,
                  warm_start_from="a100")
    enqueued = [t.user_attrs["config"] for t in second.study.trials if "fixed_params" in t.system_attrs]
    _, graph, _, _ = prepare(mlp(), (X,))
    warm = best_configs(graph, "a100", storage, limit=3)
    assert warm[0] == defaults and len(enqueued) == len(warm), "the default (a100's best) is enqueued once"
    assert sorted(map(str, enqueued)) == sorted(map(str, warm))


def test_budget_counts_pruned_and_failed_trials_of_every_run_and_worker(tmp_path):
    from lmforge.passes.shard import ShardError

    calls = []

    @graph_pass("odd", knobs=[Knob("odd.x", "int", 0, low=0, high=10**6)])
    def odd(graph, x):  # trials end finished, pruned, failed, finished, pruned, failed, ...
        calls.append(x)
        if len(calls) % 3 == 2:
            raise ShardError("pruned: a tp the heads do not divide by")
        if len(calls) % 3 == 0:
            raise LmforgeError("failed: this config cannot be compiled")
        return graph

    run = dict(target="h100", storage=storage_of(tmp_path), progress=False, sampler="random", study_name="s",
               pipeline=[odd, *FUSION])
    first = tune(mlp(), (X,), budget=6, **run)
    assert (first.n_complete, first.n_pruned, first.n_failed) == (2, 2, 2)
    second = tune(mlp(), (X,), budget=9, **run)
    assert (second.n_complete, second.n_pruned, second.n_failed) == (3, 3, 3), "earlier runs' trials count"

    @graph_pass("odd", knobs=[Knob("odd.x", "int", 0, low=0, high=10**6)])
    def other_worker(graph, x):  # while this run evaluates, other workers end 3 trials in the same study
        study = optuna.load_study(study_name="s", storage=run["storage"])
        if len(study.trials) < 15:
            for _ in range(3):
                study.add_trial(optuna.trial.create_trial(state=FAIL))
        return graph

    third = tune(mlp(), (X,), budget=13, seed=1, **{**run, "pipeline": [other_worker, *FUSION]})
    assert third.n_complete + third.n_pruned + third.n_failed == 13, "stopped at the budget, all workers' trials"


def test_a_recalibrated_target_starts_a_new_study(tmp_path, monkeypatch):
    import lmforge.hwmodels as hwmodels

    storage = storage_of(tmp_path)
    plain = tune(mlp(), (X,), target="h100", budget=2, storage=storage, pipeline=FUSION, progress=False)
    assert "calibration" not in plain.study.user_attrs["settings"]
    faster = dataclasses.replace(hwmodels.get_target("h100"), launch_overhead_s=1e-7)
    monkeypatch.setattr(hwmodels, "calibrated", lambda hw: faster if hw.name == faster.name else hw)
    cal = tune(mlp(), (X,), target="h100", budget=2, storage=storage, pipeline=FUSION, progress=False)
    assert cal.study_name != plain.study_name and cal.n_earlier == 0
    assert cal.study.user_attrs["settings"]["calibration"] == faster.fingerprint()
    assert cal.study_name.split(":")[:2] == plain.study_name.split(":")[:2], "best_configs' prefix is kept"
    _, graph, _, _ = prepare(mlp(), (X,))
    assert best_configs(graph, "h100", storage) == [cal.best_config]
    with pytest.raises(LmforgeError, match="calibration: study has None"):
        tune(mlp(), (X,), target="h100", budget=3, storage=storage, pipeline=FUSION, progress=False,
             study_name=plain.study_name)


def test_a_hardware_object_as_target(tmp_path, capsys):
    from lmforge.cli import main
    from lmforge.hwmodels import get_target
    from lmforge.search.report import write_report

    hw = dataclasses.replace(get_target("h100"), name="my-h100", memory_bytes=40 * 2**30)
    storage = storage_of(tmp_path)
    res = tune(mlp(), (X,), target=hw, budget=2, storage=storage, pipeline=FUSION, progress=False)
    attrs = res.study.user_attrs
    assert attrs["target"] == "my-h100" and attrs["target_fingerprint"] == hw.fingerprint()
    _, graph, _, _ = prepare(mlp(), (X,))
    assert best_configs(graph, hw, storage) == [res.best_config]
    assert "target: my-h100" in write_report(res.study, tmp_path / "report")["table"].read_text()
    assert main(["report", "--storage", storage]) == 0 and "target my-h100" in capsys.readouterr().out


def test_misspelled_bindings_are_an_error_listing_the_sizes(tmp_path):
    with pytest.raises(LmforgeError, match=r"bindings \['btach'\] name no symbolic size.*sizes are: batch"):
        tune(mlp(), (X,), target="h100", budget=2, storage=storage_of(tmp_path), pipeline=FUSION, progress=False,
             dynamic={"input": {0: "batch"}}, bindings={"btach": 64})


def two_layers(q, k, v):
    a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return torch.nn.functional.scaled_dot_product_attention(a, k, v)


@pytest.mark.parametrize("groups, message", [(3, "this graph has 2 layers.*from 1 to 2"), (0, "must be a number")])
def test_layer_groups_out_of_range_are_an_error(tmp_path, groups, message):
    q, k, v = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 64, 8), torch.randn(1, 2, 64, 8)
    with pytest.raises(LmforgeError, match=message):
        tune(two_layers, (q, k, v), target="h100", budget=2, storage=storage_of(tmp_path),
             pipeline=[sparsity_pass()], progress=False, layer_groups=groups)
