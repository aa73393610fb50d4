"""What tune's quality numbers are of: the logits are the workload's `logits_index` output at its
`quality_positions`; eval inputs that do not fit the captured model, and an output that is not logits, are errors
before any trial; -inf-masked logits give a finite KL."""
import optuna
import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.passes import dce, fuse_elementwise, merge_linears
from lmforge.search.tuner import tune
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
