"""Programs whose models run split over GPUs (lmforge.passes.shard.tensor_parallel_regions): the ranks run as
threads here; outputs equal the unsplit program, costs charge one rank's time and every rank's work."""
import pytest
import torch

from examples.models.tiny_task import ANSWER_LEN, EOS, make_problems
from lmforge.hwmodels import get_target
from lmforge.passes.shard import ShardError, plan_of, tensor_parallel_regions
from lmforge.programs import ProgramBuilder, ProgramRunner, program_cost

H100 = get_target("h100")


@pytest.fixture(scope="module")
def fused_program(tiny, fuser):
    from tests.programs.test_prefill_region import _prefill_graph

    b = ProgramBuilder("p", {"tiny": tiny[1], "fuser": fuser[1]},
                       prefills={"tiny": _prefill_graph(tiny[0]), "fuser": _prefill_graph(fuser[0])})
    c = b.generate("tiny", strategy="sample", n=4, temperature=1.0, max_new_tokens=ANSWER_LEN, eos_id=EOS, seed=1)
    return b.build(b.fuse(c, by="model", model="fuser"))


def test_split_program_equals_the_unsplit_one(fused_program):
    prompts = make_problems(6, seed=8, split="heldout")[0]
    split = tensor_parallel_regions(fused_program, 2)
    assert all(plan_of(r)["size"] == 2 for n in split.nodes for r in n.regions)
    whole, parts = ProgramRunner(fused_program).run(prompts), ProgramRunner(split).run(prompts)
    assert torch.equal(parts.tokens, whole.tokens)
    torch.testing.assert_close(parts.scores, whole.scores, rtol=1e-4, atol=1e-4)
    a, b = program_cost(fused_program, whole, H100), program_cost(split, parts, H100)
    for one, two in zip(a.nodes, b.nodes):
        assert two.kv_bytes_read == pytest.approx(one.kv_bytes_read)          # every rank's share, summed
        assert two.kinetics_eflops == pytest.approx(one.kinetics_eflops, rel=0.02)
        # all ranks' work plus the collectives: at least the unsplit work, not double it
        assert one.eflops <= two.eflops < 1.5 * one.eflops
        assert two.time_s != one.time_s


def test_split_program_compiles_exports_and_loads(tiny, task, tmp_path):
    import lmforge

    b = ProgramBuilder("p", {"tiny": tiny[1]})
    graph = tensor_parallel_regions(b.build(b.generate("tiny", strategy="best_of_n", n=4, max_new_tokens=ANSWER_LEN,
                                                       eos_id=EOS)), 2)
    want = ProgramRunner(graph).run(task[0][:6]).tokens
    compiled = lmforge.compile(graph)
    assert torch.equal(compiled(task[0][:6])[0], want)
    compiled.export(tmp_path / "tp")
    assert torch.equal(lmforge.load(tmp_path / "tp")(task[0][:6])[0], want)


def test_tp_knob_in_the_program_search(tiny, task):
    from lmforge.programs.search import ProgramEvaluator, grid, program_space

    space = program_space(["tiny"], max_new_choices=(ANSWER_LEN,), windows=(0,), kv=("none",),
                          strategies=("greedy",), tp=(1, 2))
    assert {c["shard.tp"] for c in grid(space)} == {1, 2}
    prompts, answers = task
    ev = ProgramEvaluator({"tiny": tiny[1]}, prompts[:8], answers[:8], H100, eos_id=EOS)
    one, two = (ev({**grid(space)[0], "shard.tp": tp}) for tp in (1, 2))
    assert one.accuracy == two.accuracy and two.eflops >= one.eflops
    with pytest.raises(ShardError, match="divide"):
        ev({**grid(space)[0], "shard.tp": 3})
    # in a search, such a tp is a pruned trial; the grid leaves it out
    from lmforge.programs.search import grid_search, search

    odd = program_space(["tiny"], max_new_choices=(ANSWER_LEN,), windows=(0,), kv=("none",),
                        strategies=("greedy",), tp=(1, 3))
    assert len(grid_search(ev, odd, 1e12).evaluations) == 1
    found = search(ev, odd, 1e12, n_trials=4, fidelities=(8,), seed=0)
    assert found.best.config["shard.tp"] == 1
    assert any("divide" in t.user_attrs.get("pruned_reason", "") for t in found.study.trials)
