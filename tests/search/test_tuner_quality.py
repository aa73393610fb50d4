"""What tune's quality numbers are of: a study belongs to one model's weights and quality data (a retrained model
of the same architecture starts its own, and compile(config="best") reads only its own); the logits are the
workload's `logits_index` output at its `quality_positions`; eval inputs that do not fit the captured model, and
an output that is not logits, are errors before any trial; -inf-masked logits give a finite KL."""
import warnings

import optuna
import pytest
import torch

import lmforge
from lmforge.errors import LmforgeError
from lmforge.passes import dce, fuse_elementwise, merge_linears
from lmforge.search import studies
from lmforge.search.tuner import best_configs, prepare, tune
from lmforge.workload import Workload

PIPE = [merge_linears, fuse_elementwise, dce]


@pytest.fixture(autouse=True)
def _own_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))


def mlp(seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.SiLU(), torch.nn.Linear(32, 8)).eval()
    for p in m.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.3
    return m


def inputs(seed: int, batch: int = 4) -> tuple:
    return (torch.randn(batch, 16, generator=torch.Generator().manual_seed(seed)),)


def workload(model, eval_seed=0, **fields) -> Workload:
    return Workload(model=model, example_inputs=inputs(99), dynamic={"input": {0: "batch"}},
                    eval_inputs=[inputs(eval_seed, 8), inputs(eval_seed + 1, 8)], name="same-name", **fields)


def run(wl, storage, budget=2, **kw):
    return tune(wl, target="h100", objectives=("latency", "quality"), budget=budget, storage=storage, pipeline=PIPE,
                progress=False, **kw)


def test_another_model_or_other_eval_data_starts_its_own_study_and_best_reads_its_own(tmp_path):
    storage = f"sqlite:///{tmp_path}/db.sqlite"
    a = run(workload(mlp(0)), storage)
    assert run(workload(mlp(0)), storage, budget=3).n_earlier == 2, "the same model and data resume"
    b = run(workload(mlp(7)), storage)
    assert b.study_name != a.study_name and b.n_earlier == 0, "a retrained model is not the old one"
    other_data = run(workload(mlp(0), eval_seed=50), storage)
    assert other_data.study_name not in (a.study_name, b.study_name) and other_data.n_earlier == 0
    assert run(workload(mlp(0), checker=lambda m: 1.0), storage).n_earlier == 0, "another checker, another study"
    _, graph_b, _, _ = prepare(mlp(7), inputs(99), dynamic={"input": {0: "batch"}})
    assert best_configs(graph_b, "h100", storage) == [b.best_config]
    assert b.study.user_attrs["settings"]["weights"] == studies.weights_fingerprint(graph_b)
    _, untuned, _, _ = prepare(mlp(3), inputs(99), dynamic={"input": {0: "batch"}})
    assert best_configs(untuned, "h100", storage) == [], "no study of these weights"
    with pytest.raises(LmforgeError, match="no tuned configuration .* of other weights"):
        lmforge.compile(mlp(3), inputs(99), dynamic={"input": {0: "batch"}}, target="h100", config="best",
                        storage=storage)
    with warnings.catch_warnings(record=True) as caught:   # another checkpoint's knob values seed a warm start
        warnings.simplefilter("always")
        warm = run(workload(mlp(3)), storage, warm_start_from="h100")
    assert not [w for w in caught if "warm_start_from" in str(w.message)]
    assert warm.n_earlier == 0 and len(warm.study.trials) == 2


def test_fingerprints_do_not_depend_on_threads_or_key_order():
    """The weights digest is exact (an integer sum of the bit patterns: a float sum over >32k values changes with
    the thread count, so `--threads` lost a study); eval data is hashed with its structure, dicts by key."""
    w = torch.randn(300, 300, generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    digests = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            lin = torch.nn.Linear(300, 300, bias=False).requires_grad_(False)
            lin.weight.copy_(w)
            _, graph, _, _ = prepare(lin, (torch.randn(2, 300),))
            digests.append(studies.weights_fingerprint(graph))
    finally:
        torch.set_num_threads(threads)
    assert digests[0] == digests[1]
    x, y = torch.zeros(3), torch.ones(3)
    fp = studies.data_fingerprint
    assert fp({"a": x, "b": y}) == fp({"b": y, "a": x})
    assert fp({"a": x, "b": y}) != fp({"a": y, "b": x}) != fp([x, y])


class IdsThenLogits(torch.nn.Module):
    """(next token ids, logits): the integer output comes first."""

    def __init__(self):
        super().__init__()
        self.net = mlp(0)

    def forward(self, input):
        logits = self.net(input)
        return logits.argmax(-1), logits


def test_an_integer_first_output_is_an_error_before_any_trial_and_logits_index_picks_the_logits(tmp_path):
    storage = f"sqlite:///{tmp_path}/db.sqlite"
    with pytest.raises(LmforgeError, match=r"tensor output 0 of the model is int64.*Workload.logits_index"):
        run(workload(IdsThenLogits()), storage, budget=20)
    assert optuna.get_all_study_summaries(storage) == [], "refused before a study was created"
    res = run(workload(IdsThenLogits(), logits_index=1), storage)
    assert res.best_values["quality"] == 1.0 and res.study.user_attrs["settings"]["quality_data"]["logits_index"] == 1


def test_quality_positions_reach_the_comparison(tmp_path):
    seq = lambda x: torch.nn.functional.pad(x, (0, 0, 0, 2))   # [4, 16] -> [4 + 2, 16]: one sequence of 6
    model = lambda x: mlp(0)(seq(x))
    wl = Workload(model=model, example_inputs=inputs(0), eval_inputs=[inputs(1)], quality_positions=slice(7, 9))
    with pytest.raises(LmforgeError, match=r"positions=slice\(7, 9, None\) select no logits"):
        run(wl, f"sqlite:///{tmp_path}/db.sqlite")
    with pytest.raises(LmforgeError, match="quality_positions must be a slice"):
        Workload(model=model, example_inputs=inputs(0), quality_positions=[1, 2])


def test_eval_inputs_that_do_not_fit_the_captured_model_are_one_clear_error(tmp_path):
    storage = f"sqlite:///{tmp_path}/db.sqlite"
    wl = Workload(model=mlp(0), example_inputs=inputs(0), eval_inputs=[inputs(1), inputs(2, batch=32)])
    with pytest.raises(LmforgeError, match=r"eval input 1 does not fit the captured model: input 'input' must have "
                                           r"size 4 in dim 0.*\{'input': \{0: 'batch'\}\}"):
        run(wl, storage, budget=20)
    assert optuna.get_all_study_summaries(storage) == [], "refused before any trial"


class Banned(torch.nn.Module):
    """Logits with one vocabulary entry masked to -inf."""

    def __init__(self):
        super().__init__()
        self.net = mlp(0)
        self.register_buffer("banned", torch.arange(8) == 0)

    def forward(self, x):
        return self.net(x).masked_fill(self.banned, float("-inf"))


def test_kl_of_masked_logits_is_finite_in_tune(tmp_path):
    wl = Workload(model=Banned(), example_inputs=inputs(0), eval_inputs=[inputs(1)])
    res = tune(wl, target="h100", objectives=("latency", "kl"), budget=2, storage=f"sqlite:///{tmp_path}/db.sqlite",
               pipeline=PIPE, progress=False, constraints={"kl": 0.01})
    assert [t.user_attrs["values"]["kl"] for t in res.study.trials] == [0.0, 0.0]


def _raises(model):
    raise ValueError("no labels")


@pytest.mark.parametrize("checker, message", [
    (lambda m: 42.0, r"Workload.checker returned 42.0: .*return a fraction, not a percent"),
    (lambda m: float("nan"), r"Workload.checker returned nan: it must return the accuracy as a finite fraction"),
    (lambda m: "high", r"Workload.checker returned 'high', not a number"),
    (_raises, r"Workload.checker failed on the untransformed model, before any trial: ValueError: no labels"),
])
def test_a_checker_that_returns_no_fraction_is_an_error_before_any_trial(tmp_path, checker, message):
    with pytest.raises(LmforgeError, match=message):
        tune(workload(mlp(0), checker=checker), target="h100", objectives=("latency",), budget=2,
             constraints={"accuracy": 0.9}, storage=f"sqlite:///{tmp_path}/db.sqlite", pipeline=PIPE, progress=False)
    assert not optuna.get_all_study_summaries(f"sqlite:///{tmp_path}/db.sqlite"), "no study, no trial"


def test_a_checker_value_out_of_range_fails_the_trial_and_says_why(tmp_path):
    calls = []

    def checker(model):   # right on the untransformed model, a percent on the compiled ones
        calls.append(model)
        return 0.95 if len(calls) == 1 else 95.0

    with pytest.raises(LmforgeError, match="no feasible configuration"):
        tune(workload(mlp(0), checker=checker), target="h100", objectives=("accuracy",), budget=2,
             storage=f"sqlite:///{tmp_path}/db.sqlite", pipeline=PIPE, progress=False)
    study = optuna.load_study(study_name=optuna.get_all_study_names(f"sqlite:///{tmp_path}/db.sqlite")[0],
                              storage=f"sqlite:///{tmp_path}/db.sqlite")
    assert all("Workload.checker returned 95.0" in t.user_attrs["error"] for t in study.trials)
