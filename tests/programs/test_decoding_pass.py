"""The decoding lowering (lmforge.passes.decoding) on the user's own programs: knobs per generate node and per
model, lowering equal to building the program directly, model knobs through the tunable pass pipeline, configs a
program cannot take, and the program search over such knobs (ProgramEvaluator(program=...))."""
import pytest
import torch

from examples.models.tiny_task import ANSWER_LEN, EOS
from lmforge.errors import LmforgeError
from lmforge.hwmodels import get_target
from lmforge.passes import PassManager, tunable_pipeline
from lmforge.passes.decoding import (DecodingError, decoding_knobs, decoding_pass, lower_decoding,
                                     model_pass_config)
from lmforge.programs import ProgramBuilder, ProgramRunner
from lmforge.programs.search import ProgramEvaluator, grid, grid_search, search

H100 = get_target("h100")


def _ensemble(models, a=None, b=None, rank_k=None):
    """generate(a) + generate(b) -> ensemble -> (rank top_k) -> vote, with per-node attrs."""
    builder = ProgramBuilder("mine", models)
    c1 = builder.generate("a", max_new_tokens=ANSWER_LEN, eos_id=EOS, **(a or {}))
    c2 = builder.generate("b", max_new_tokens=ANSWER_LEN, eos_id=EOS, **(b or {}))
    c = builder.ensemble(c1, c2)
    if rank_k:
        c = builder.rank(c, top_k=rank_k)
    return builder.build(builder.vote(c))


def test_knobs_of_a_users_program(tiny):
    program = _ensemble({"a": tiny[1], "b": tiny[1]}, b={"strategy": "beam", "width": 2})
    knobs = {k.name: k for k in decoding_knobs(program, strategies=("greedy", "best_of_n", "beam"),
                                               n_choices=(2, 4), width_choices=(2, 3), weight_bits=(16, 8))}
    assert sorted(knobs) == ["decoding.g0.n", "decoding.g0.strategy", "decoding.g0.width", "decoding.g1.n",
                             "decoding.g1.strategy", "decoding.g1.width", "model.a.weight_bits",
                             "model.b.weight_bits"]
    assert knobs["decoding.g0.strategy"].default == "greedy" and knobs["decoding.g1.strategy"].default == "beam"
    assert knobs["decoding.g1.width"].condition == ("decoding.g1.strategy", ("beam",))
    assert knobs["decoding.g0.n"].condition == ("decoding.g0.strategy", ("best_of_n",))
    only = decoding_knobs(program, strategies=("greedy", "sample"), nodes=[1], n_choices=(2, 4))
    assert [k.name for k in only] == ["decoding.g1.strategy", "decoding.g1.n"]
    with pytest.raises(DecodingError, match="cannot be searched"):
        decoding_knobs(program, strategies=("greedy", "momentum"))
    with pytest.raises(DecodingError, match="not generate nodes"):
        decoding_knobs(program, nodes=[2])


def test_lowering_equals_building_the_program_directly(tiny, task):
    models = {"a": tiny[1], "b": tiny[1]}
    program = _ensemble(models)
    config = {"decoding.g0.strategy": "best_of_n", "decoding.g0.n": 4, "decoding.g1.strategy": "sample",
              "decoding.g1.n": 3, "decoding.g1.max_new_tokens": ANSWER_LEN}
    lowered = decoding_pass(program, strategies=("greedy", "best_of_n", "sample"), n_choices=(3, 4))(program, config)
    direct = _ensemble(models, a={"strategy": "best_of_n", "n": 4}, b={"strategy": "sample", "n": 3})
    assert lowered.signature() == direct.signature()
    assert [str(v.type) for v in lowered.nodes[2].outputs] == ["i64[batch, 4, 4]", "f32[batch, 4]"]  # 1 + 3
    prompts = task[0][:6]
    got, want = ProgramRunner(lowered).run(prompts), ProgramRunner(direct).run(prompts)
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.scores, want.scores)
    assert lower_decoding(program, {}).signature() == program.signature()   # an empty config changes nothing


def test_model_knobs_run_the_tunable_pipeline_on_every_region_of_the_model(tiny, task):
    models = {"a": tiny[1], "b": tiny[1]}
    program = _ensemble(models)
    lowered = lower_decoding(program, {"model.a.weight_bits": 8, "model.a.decode_window": 4})
    step_a = lowered.nodes[0].regions[0]
    assert sum(n.op == "linear_wo" for n in step_a.nodes) > 0
    assert any(n.op == "attention" and n.attr["window"] == 4 for n in step_a.nodes)
    assert not any(n.op == "linear_wo" for n in lowered.nodes[1].regions[0].nodes)   # model b unchanged
    used = {p.name for n in lowered.nodes for r in n.regions for p in r.params}
    assert set(lowered.weights) == used                                              # no stale fp32 weights
    # the same program built from the step the pass pipeline makes
    step8 = PassManager(tunable_pipeline()).run(tiny[1], model_pass_config(4, "none", 8))
    direct = _ensemble({"a": step8, "b": tiny[1]})
    prompts = task[0][:5]
    got, want = ProgramRunner(lowered).run(prompts), ProgramRunner(direct).run(prompts)
    assert torch.equal(got.tokens, want.tokens)
    torch.testing.assert_close(got.scores, want.scores, rtol=1e-5, atol=1e-5)


def test_a_config_the_program_cannot_take_is_a_clear_error_and_a_pruned_trial(tiny, task):
    program = _ensemble({"a": tiny[1], "b": tiny[1]}, a={"strategy": "sample", "n": 2}, rank_k=3)
    with pytest.raises(DecodingError, match="top_k=3 but only 2 candidates"):
        lower_decoding(program, {"decoding.g0.strategy": "greedy"})     # 1 + 1 candidates reach rank(top_k=3)
    knobs = decoding_knobs(program, strategies=("greedy", "sample"), n_choices=(2, 4), nodes=[0])
    ev = ProgramEvaluator(None, task[0][:4], task[1][:4], H100, program=program)
    g = grid_search(ev, knobs, budget_eflops=1e30)
    assert len(g.evaluations) == 2 == len(grid(knobs)) - 1      # the greedy config is not a program
    s = search(ev, knobs, budget_eflops=1e30, n_trials=6, seed=0, fidelities=(4,), startup_trials=6)
    assert s.pruned >= 1 and all(e.config["decoding.g0.strategy"] == "sample" for e in s.evaluations)


def test_search_over_a_users_program(tiny, task):
    """The program search takes the user's program: decoding and model knobs, accuracy on the dev set, eFLOPs
    budget; the grid's best config under the budget is found."""
    program = _ensemble({"a": tiny[1], "b": tiny[1]})
    knobs = decoding_knobs(program, strategies=("greedy", "best_of_n"), n_choices=(2, 4), nodes=[0],
                           weight_bits=(16, 4), models=["a"])
    prompts, answers = task[0][:8], task[1][:8]
    ev = ProgramEvaluator(None, prompts, answers, H100, program=program)
    base = ev({})
    assert base.accuracy > 0.5
    g = grid_search(ev, knobs, budget_eflops=1.5 * base.eflops)
    assert len(g.evaluations) == len(grid(knobs)) == 6
    costs = {(e.config["decoding.g0.strategy"], e.config["decoding.g0.n"], e.config["model.a.weight_bits"]): e.eflops
             for e in g.evaluations}
    assert costs[("best_of_n", 4, 16)] > costs[("best_of_n", 2, 16)] > costs[("greedy", 2, 16)]
    assert costs[("greedy", 2, 4)] < costs[("greedy", 2, 16)]                         # int4 weights read less
    assert g.best is not None and g.best.eflops <= 1.5 * base.eflops
    with pytest.raises(LmforgeError, match="either steps= .* or program="):
        ProgramEvaluator({"a": tiny[1]}, prompts, answers, H100, program=program)
