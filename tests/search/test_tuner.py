"""The tuner: knobs become an Optuna space (conditions respected), trials use the cost model, constraints
mark infeasible trials, failures are recorded, studies resume, the best config is found again by compile."""
import optuna
import pytest
import torch

import lmforge
from lmforge.errors import LmforgeError
from lmforge.ir.graph import Graph
from lmforge.passes.base import Knob, graph_pass
from lmforge.passes import dce, fuse_elementwise, merge_linears
from lmforge.search.space import expand_per_group, knob_value, ordered, suggest
from lmforge.search.tuner import tune


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(32, 64), torch.nn.Linear(32, 64)
        self.c = torch.nn.Linear(64, 32)

    def forward(self, x):
        return self.c(torch.nn.functional.silu(self.a(x)) * self.b(x))


def test_space_respects_conditions_and_order():
    knobs = [Knob("x.size", "int", 4, low=1, high=8, condition=("x.pattern", ("topk",))),
             Knob("x.pattern", "categorical", "dense", choices=("dense", "topk"))]
    assert [k.name for k in ordered(knobs)] == ["x.pattern", "x.size"]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(20):
        trial = study.ask()
        cfg = suggest(trial, knobs)
        seen.add(cfg["x.pattern"])
        assert ("x.size" in trial.params) == (cfg["x.pattern"] == "topk")
        study.tell(trial, 0.0)
    assert seen == {"dense", "topk"}


def test_per_group_knobs():
    knobs = expand_per_group([Knob("a", "int", 1, low=1, high=4), Knob("b", "bool", True, choices=(True, False))],
                             groups=2, per_layer=["a"])
    assert [k.name for k in knobs] == ["a@g0", "a@g1", "b"]
    cfg = {"a@g0": 3, "a@g1": 4}
    assert [knob_value(cfg, "a", 1, layer, 4) for layer in range(4)] == [3, 3, 4, 4]
    assert knob_value({"a": 2}, "a", 1, 0, 4) == 2


def test_tune_predict_finds_fusion_on_h100_and_resumes(tmp_path):
    storage = f"sqlite:///{tmp_path}/db.sqlite"
    x = torch.randn(4, 32)
    model = MLP()  # the same weights each time: another model of this architecture would start a new study
    pipe = [merge_linears, fuse_elementwise, dce]
    res = tune(model, (x,), target="h100", objectives=("latency",), budget=6, storage=storage, progress=False,
               pipeline=pipe)
    assert res.best_config == {"fusion.merge_linears": True, "fusion.elementwise": True}
    assert res.n_complete == 6 and res.n_failed == 0
    assert res.best_values["latency"] == min(t.values[0] for t in res.study.trials)
    again = tune(model, (x,), target="h100", objectives=("latency",), budget=8, storage=storage, progress=False,
                 pipeline=pipe)
    assert again.study_name == res.study_name and again.n_complete == 8, "the study resumed, adding 2 trials"
    import os
    os.environ["LMFORGE_CACHE"] = str(tmp_path)
    try:
        from lmforge.search import studies
        orig = studies.default_storage
        studies.default_storage = lambda: storage
        compiled = lmforge.compile(model, (x,), target="h100", config="best")
        assert compiled.config == res.best_config
        assert any(n.op == "fused" for n in compiled.graph.nodes)
    finally:
        studies.default_storage = orig


def test_constraints_mark_infeasible_and_failures_are_recorded(tmp_path):
    @graph_pass("flaky", knobs=[Knob("flaky.break", "bool", False, choices=(True, False))])
    def flaky(graph: Graph, **kw):
        if kw["break"]:
            raise LmforgeError("this config cannot be compiled")
        return graph

    storage = f"sqlite:///{tmp_path}/db.sqlite"
    res = tune(MLP(), (torch.randn(4, 32),), target="h100", objectives=("latency", "quality"), budget=8,
               storage=storage, constraints={"quality": 0.999}, pipeline=[flaky, merge_linears, fuse_elementwise, dce],
               progress=False, sampler="random", seed=3)
    assert res.n_failed >= 1, "configs whose passes fail are failed trials, not made-up scores"
    states = {t.state for t in res.study.trials}
    assert optuna.trial.TrialState.FAIL in states
    for p in res.pareto:
        assert p["values"]["quality"] >= 0.999


def test_infeasible_everywhere_is_a_clear_error(tmp_path):
    with pytest.raises(LmforgeError, match="no feasible configuration"):
        tune(MLP(), (torch.randn(4, 32),), target="h100", objectives=("latency",), budget=3,
             storage=f"sqlite:///{tmp_path}/db.sqlite", constraints={"latency": 1e-12}, progress=False)


@pytest.mark.parametrize("mode", ["measure", "hybrid"])
def test_measure_and_hybrid_modes_time_real_runs_on_the_host(tmp_path, mode):
    pipe = [merge_linears, fuse_elementwise, dce]
    res = tune(MLP(), (torch.randn(64, 32),), target="host", objectives=("latency",), budget=4, mode=mode,
               storage=f"sqlite:///{tmp_path}/db.sqlite", pipeline=pipe, progress=False, hybrid_top=2)
    if mode == "measure":
        assert all("measured_latency" in t.user_attrs["values"] for t in res.study.trials)
        assert res.best_values["latency"] == res.best_values["measured_latency"]
    else:
        assert len(res.measured) == 2, "hybrid measures only the top predicted configs"
        assert res.best_config == next(t.user_attrs["config"] for t in res.study.trials
                                       if t.number == min(res.measured, key=res.measured.get))


def test_measure_mode_refuses_a_target_that_is_not_here(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(LmforgeError, match="not this machine"):
        tune(MLP(), (torch.randn(4, 32),), target="h100", mode="measure", budget=2,
             storage=f"sqlite:///{tmp_path}/db.sqlite", progress=False)


def test_report_writes_plots_and_table(tmp_path):
    from lmforge.search.report import write_report

    res = tune(MLP(), (torch.randn(4, 32),), target="h100", objectives=("latency", "memory"), budget=5,
               storage=f"sqlite:///{tmp_path}/db.sqlite", pipeline=[merge_linears, fuse_elementwise, dce],
               progress=False, sampler="random")
    paths = write_report(res.study, tmp_path / "report")
    assert paths["pareto"].read_bytes()[:4] == b"\x89PNG" and paths["history"].stat().st_size > 1000
    table = paths["table"].read_text()
    assert "| trial | latency | memory |" in table and len(res.pareto) >= 1


def test_measure_mode_tunes_tvm_schedules_with_real_timings(tmp_path):
    pytest.importorskip("tvm")
    res = tune(MLP(), (torch.randn(16, 32),), target="host", objectives=("latency",), budget=3, mode="measure",
               storage=f"sqlite:///{tmp_path}/db.sqlite", pipeline=[merge_linears, fuse_elementwise, dce],
               progress=False, backends=("tvm",), sampler="random")
    assert any(k.startswith("tvm.") for k in res.best_config), "the TVM schedule knobs are in the space"
    assert all("measured_latency" in t.user_attrs["values"] for t in res.study.trials
               if t.state == optuna.trial.TrialState.COMPLETE)


def test_per_layer_groups_give_layers_their_own_attention_pattern(tmp_path):
    from lmforge.passes import PassManager, sparsity_pass

    def two_layers(q, k, v):
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return torch.nn.functional.scaled_dot_product_attention(a, k, v)

    q, k, v = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 64, 8), torch.randn(1, 2, 64, 8)
    g = lmforge.capture(two_layers, (q, k, v))
    cfg = {"attn.decode_pattern@g0": "dense", "attn.decode_pattern@g1": "window", "attn.decode_window@g1": 16}
    out = PassManager([sparsity_pass()]).run(g, cfg)
    attn = [n for n in out.nodes if n.op == "attention"]
    assert attn[0].attr["window"] is None and attn[1].attr["window"] == 16
    res = tune(two_layers, (q, k, v), target="h100", budget=4, storage=f"sqlite:///{tmp_path}/db.sqlite",
               pipeline=[sparsity_pass()], progress=False, layer_groups=2, sampler="random")
    names = {n for t in res.study.trials for n in t.params}
    assert {"attn.decode_pattern@g0", "attn.decode_pattern@g1"} <= names and "attn.decode_pattern" not in names
