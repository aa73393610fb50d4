"""The generative fuser (examples/models/fuser_task.py) and fuse(by="model") in programs; weight bits in the
program search's pass knobs."""
import pytest
import torch

from examples.models.tiny_task import ANSWER_LEN, EOS, PROMPT_LEN, is_held_out, make_problems
from lmforge.errors import LmforgeError, VerifyError
from lmforge.hwmodels import get_target
from lmforge.programs import ProgramBuilder, ProgramRunner, program_cost
from lmforge.programs.cost import _StepCosts, trace_cost
from lmforge.programs.decoding import DecodeTrace

H100 = get_target("h100")


def test_fuser_format_matches_the_runtime_and_training_never_sees_heldout_pairs():
    from examples.models import fuser_task as ft
    from lmforge.programs.compound import fuser_input

    prompts, answers = make_problems(3, seed=5)
    cands = torch.stack([answers, answers.flip(0)], 1)                    # [3, k=2, T=4]
    seq = ft.fuser_input(prompts, cands)
    assert seq.shape == (3, PROMPT_LEN + 2 * (ANSWER_LEN + 1) + 1)
    assert seq[0, PROMPT_LEN] == ft.SEP == ft.FUSER_VOCAB - 1 and seq[0, -1] == ft.SEP
    assert torch.equal(seq[0, PROMPT_LEN + 1:PROMPT_LEN + 1 + ANSWER_LEN], answers[0])
    for i in range(3):  # the program runtime builds the same input (all candidates accepted)
        assert torch.equal(fuser_input(prompts[i], cands[i], torch.zeros(2), ft.SEP), seq[i])
    # a rejected candidate is left out
    assert len(fuser_input(prompts[0], cands[0], torch.tensor([0.0, float("-inf")]), ft.SEP)) == seq.shape[1] - 5
    # the training pool is drawn from training pairs; evaluation problems are held out
    a, b = ft.sample_operands(512, torch.Generator().manual_seed(ft.RECIPE.seed), "train")
    assert not is_held_out(a, b).any()
    hp, _ = make_problems(64, seed=99, split="heldout")
    assert is_held_out(hp[:, 0] * 10 + hp[:, 1], hp[:, 3] * 10 + hp[:, 4]).all()


def test_fuser_returns_a_unanimous_correct_answer(fuser):
    from examples.models.fuser_task import fuse_greedy

    prompts, answers = make_problems(128, seed=31, split="heldout")
    for k in (1, 4, 8):
        got = fuse_greedy(fuser[0], prompts, answers[:, None].expand(-1, k, -1))
        acc = float((got == answers).all(1).float().mean())
        assert acc >= 0.95, f"k={k}: the fuser returned the unanimous right answer on only {acc:.1%}"


def _fuse_program(tiny_step, fuser_step, n):
    b = ProgramBuilder("bo_fuse", {"tiny": tiny_step, "fuser": fuser_step})
    c = b.generate("tiny", strategy="sample", n=n, max_new_tokens=ANSWER_LEN, eos_id=EOS, seed=3)
    return b.build(b.fuse(c, by="model", model="fuser"))


def test_fuse_by_model_runs_in_a_program_and_is_charged_for_reading_the_candidates(tiny, fuser):
    prompts, answers = make_problems(4, seed=8, split="heldout")
    costs = {}
    for n in (2, 4):
        graph = _fuse_program(tiny[1], fuser[1], n)
        result = ProgramRunner(graph).run(prompts)
        assert result.tokens.shape == (4, 1, ANSWER_LEN)
        acc = result.accounts[1]
        fuser_len = PROMPT_LEN + n * (ANSWER_LEN + 1) + 1
        assert acc.op == "fuse" and acc.prompt_tokens == 4 * fuser_len and acc.generated_tokens == 4 * ANSWER_LEN
        cost = program_cost(graph, result, H100)
        node = cost.nodes[1]
        want = trace_cost(graph.nodes[1].regions[0], DecodeTrace(fuser_len, 1, [1] * ANSWER_LEN, False),
                          _StepCosts(H100))
        assert node.eflops == pytest.approx(4 * want[1], rel=1e-9) and node.time_s == pytest.approx(4 * want[0])
        assert node.kinetics_eflops > 0 and cost.eflops == pytest.approx(cost.nodes[0].eflops + node.eflops)
        costs[n] = node.eflops
        # the fused answer is what the fuser writes for these candidates (eager reference)
        from examples.models.fuser_task import fuse_greedy
        gen = ProgramRunner(b_generate_only(tiny[1], n)).run(prompts)
        assert torch.equal(result.tokens[:, 0], fuse_greedy(fuser[0], prompts, gen.tokens))
    assert costs[4] > costs[2]  # more candidates to prefill


def b_generate_only(step, n):
    b = ProgramBuilder("gen", {"tiny": step})
    return b.build(b.generate("tiny", strategy="sample", n=n, max_new_tokens=ANSWER_LEN, eos_id=EOS, seed=3))


def test_fuse_by_model_needs_candidates_and_a_model(tiny, fuser):
    b = ProgramBuilder("p", {"tiny": tiny[1], "fuser": fuser[1]})
    none = b.rank(b.generate("tiny", strategy="sample", n=2, max_new_tokens=4, eos_id=EOS), top_k=0)
    with pytest.raises(LmforgeError, match="needs candidates"):
        b.fuse(none, by="model", model="fuser")
    with pytest.raises(LmforgeError, match="needs model"):
        b.fuse(none, by="model")
    # built around the builder's check, the IR's type rule for fuse rejects it too
    with pytest.raises(VerifyError, match="only 0 candidates come in"):
        b.build(b._scored("fuse", none, {"by": "model"}, "fuser"))


def test_weight_bits_knob_lowers_cost_and_keeps_outputs_at_8_bits(tiny, task):
    from lmforge.programs.search import ProgramEvaluator, program_space

    prompts, answers = task
    ev = ProgramEvaluator({"tiny": tiny[1]}, prompts[:16], answers[:16], H100, eos_id=EOS)
    space = program_space(["tiny"], weight_bits=(16, 8, 4))
    assert [k.choices for k in space if k.name == "quant.weight_bits"] == [(16, 8, 4)]
    base = {"program.model": "tiny", "program.strategy": "greedy", "program.n": 2, "program.aggregator": "vote",
            "program.width": 2, "program.max_new_tokens": 4, "attn.decode_window": 0, "quant.kv": "none"}
    evals = {bits: ev({**base, "quant.weight_bits": bits}) for bits in (16, 8, 4)}
    assert evals[16].eflops > evals[8].eflops > evals[4].eflops
    assert any(n.op == "linear_wo" for n in ev.step_variant("tiny", weight_bits=8).nodes)
    assert evals[8].accuracy >= evals[16].accuracy - 1 / 16
    # logits of one decode step stay close at 8 bits
    from lmforge.backends import default_backends
    from lmforge.compiler import build_callable

    run = {}
    for bits in (16, 8):
        g = ev.step_variant("tiny", weight_bits=bits)
        run[bits] = build_callable(g, default_backends(("torch",)), "cpu", g.weights)[0]
    k = v = torch.zeros(2, 4, 2, 0, 16)
    tok = prompts[:4, :1]
    l16, l8 = (run[b](tok, k, v)[0] for b in (16, 8))
    assert torch.allclose(l16, l8, atol=0.05 * float(l16.abs().max()))


def test_fuse_attribute_and_region_must_agree(tiny, fuser):
    """The IR says what a fuse does: by='model' needs the fuser region, by='vote' takes none."""
    from lmforge.programs.builder import ProgramBuilder

    b = ProgramBuilder("p", {"tiny": tiny[1], "fuser": fuser[1]})
    cands = b.generate("tiny", strategy="sample", n=2, max_new_tokens=4, eos_id=EOS)
    with pytest.raises(VerifyError, match="takes no model region"):
        b.build(b._scored("fuse", cands, {"by": "vote"}, "fuser"))
    b = ProgramBuilder("p", {"tiny": tiny[1], "fuser": fuser[1]})
    cands = b.generate("tiny", strategy="sample", n=2, max_new_tokens=4, eos_id=EOS)
    with pytest.raises(VerifyError, match="needs a fuser model region"):
        b.build(b._scored("fuse", cands, {"by": "model"}, None))
    b = ProgramBuilder("p", {"tiny": tiny[1], "fuser": fuser[1]})
    graph = b.build(b.fuse(b.generate("tiny", strategy="sample", n=2, max_new_tokens=4, eos_id=EOS), by="model",
                           model="fuser"))
    assert [n.attr["by"] for n in graph.nodes if n.op == "fuse"] == ["model"]


def test_tile_tuned_latency_and_a_latency_budget(tiny, task):
    """With tune_tiles the step graphs are charged with their fastest Triton tile configs: latency is never above
    the default tiles', eFLOPs and outputs do not change, and a latency budget bounds the search's answer."""
    from lmforge.programs.search import ProgramEvaluator, grid_search, program_space, search

    prompts, answers = task
    from dataclasses import replace

    space = [replace(k, choices=("greedy",)) if k.name == "program.strategy" else k   # 2 configs: 16 / 4 bits
             for k in program_space(["tiny"], max_new_choices=(4,), windows=(0,), kv=("none",), weight_bits=(16, 4))]
    plain = ProgramEvaluator({"tiny": tiny[1]}, prompts[:8], answers[:8], H100, eos_id=EOS)
    tuned = ProgramEvaluator({"tiny": tiny[1]}, prompts[:8], answers[:8], H100, eos_id=EOS, tune_tiles=True)
    config = {"program.model": "tiny", "program.strategy": "greedy", "program.n": 2, "program.aggregator": "vote",
              "program.width": 2, "program.max_new_tokens": 4, "attn.decode_window": 0, "quant.kv": "none",
              "quant.weight_bits": 4}
    a, b = plain(config), tuned(config)
    assert b.eflops == a.eflops and b.accuracy == a.accuracy and b.latency_s != a.latency_s
    # per step graph and shape: the chosen tiles are at least as fast as every template's default config
    from lmforge.search.cost_model import graph_cost

    (costs,) = tuned._costs.values()
    assert costs.tiles and all(costs.tiles.values())  # the int4 step runs Triton templates; a choice was made
    for (gid, bound), tiles in costs.tiles.items():
        graph, bindings = costs.graphs[gid], dict(bound)
        default = graph_cost(graph, H100, bindings, kernels={}).time_s
        assert costs.run(graph, bindings)[0] <= default
    grid = grid_search(tuned, space, budget_latency_s=b.latency_s * 1.01)
    assert grid.best is not None and grid.best.latency_s <= b.latency_s * 1.01
    found = search(tuned, space, n_trials=4, budget_latency_s=b.latency_s * 1.01, fidelities=(8,))
    assert found.best is None or found.best.latency_s <= b.latency_s * 1.01
    with pytest.raises(LmforgeError, match="exactly one budget"):
        grid_search(tuned, space)
