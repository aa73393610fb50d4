"""Prompts of different lengths in one run (a list of 1-D prompts): each length runs as one batch, the results
come back in the list's order and equal running each prompt alone, and the cost is the sum of the prompts' costs."""
import pytest
import torch

from examples.models.tiny_task import ANSWER_LEN, EOS
from lmforge.errors import LmforgeError
from lmforge.hwmodels import get_target
from lmforge.programs import ProgramBuilder, ProgramRunner, program_cost, register_corpus

H100 = get_target("h100")
PROGRAMS = {
    "greedy": {},
    "best_of_n_vote": {"strategy": "best_of_n", "n": 4, "temperature": 1.2, "aggregator": "vote"},
    "beam": {"strategy": "beam", "width": 3},
}


def _ragged(task, n=9):
    """n task prompts with 0, 1 or 2 leading tokens dropped, lengths interleaved."""
    return [p[i % 3:] for i, p in enumerate(task[0][:n])]


def _program(step, attrs, retrieve_k=0):
    b = ProgramBuilder("p", {"tiny": step})
    extra = {"prompts": b.retrieve("t-lengths", k=retrieve_k, insert_at=1)} if retrieve_k else {}
    return b.build(b.generate("tiny", max_new_tokens=ANSWER_LEN, eos_id=EOS, **attrs, **extra))


@pytest.mark.parametrize("name", list(PROGRAMS))
def test_prompts_of_different_lengths_equal_each_prompt_alone(tiny, task, name):
    graph = _program(tiny[1], PROGRAMS[name])
    prompts = _ragged(task)
    runner = ProgramRunner(graph)
    got = runner.run(prompts)
    alone = [ProgramRunner(graph).run(p[None]) for p in prompts]
    assert got.n_prompts == len(prompts) and got.tokens.shape[0] == len(prompts)
    for i, one in enumerate(alone):
        assert torch.equal(got.tokens[i], one.tokens[0]), f"prompt {i}"
        torch.testing.assert_close(got.scores[i], one.scores[0], rtol=1e-5, atol=1e-5)
    acc, parts = got.accounts[0], [one.accounts[0] for one in alone]
    assert acc.prompt_tokens == sum(a.prompt_tokens for a in parts) == sum(p.numel() for p in prompts)  # prefilled once
    assert acc.generated_tokens == sum(a.generated_tokens for a in parts)
    assert sorted(t.prompt_len for t in acc.traces) == sorted(p.numel() for p in prompts)
    cost, costs = program_cost(graph, got, H100), [program_cost(graph, one, H100) for one in alone]
    assert cost.eflops == pytest.approx(sum(c.eflops for c in costs), rel=1e-9)
    assert cost.kinetics_eflops == pytest.approx(sum(c.kinetics_eflops for c in costs), rel=1e-9)


def test_retrieval_with_prompts_of_different_lengths(tiny, task):
    """The retrieve node scans the corpus once per prompt, each charged at its own length."""
    register_corpus("t-lengths", torch.tensor([[1, 2, 3], [4, 5, 6], [3, 4, 9], [1, 3, 4]]))
    graph = _program(tiny[1], {}, retrieve_k=2)
    prompts = _ragged(task, 6)
    got = ProgramRunner(graph).run(prompts)
    alone = [ProgramRunner(graph).run(p[None]) for p in prompts]
    assert sorted(got.accounts[0].query_lens) == sorted(p.numel() for p in prompts)
    assert torch.equal(got.tokens, torch.cat([one.tokens for one in alone]))
    cost = program_cost(graph, got, H100)
    assert cost.nodes[0].eflops == pytest.approx(sum(program_cost(graph, one, H100).nodes[0].eflops
                                                     for one in alone), rel=1e-9)
    assert cost.nodes[0].time_s > 0


@pytest.mark.parametrize("prompts,match", [
    ([], "no prompts"),
    ([torch.tensor([1, 2])[None]], "prompt 0 of the list"),
    ([torch.tensor([1, 2]), torch.tensor([1.0, 2.0])], "prompt 1 of the list"),
    ([torch.tensor([], dtype=torch.long)], "non-empty"),
    ([[1, 2, 3]], "1-D LongTensor"),
    (torch.zeros(2, 3), "LongTensor"),
    ("1 2 3", "list of 1-D LongTensors"),
])
def test_bad_prompts_are_a_clear_error(tiny, prompts, match):
    with pytest.raises(LmforgeError, match=match):
        ProgramRunner(_program(tiny[1], {})).run(prompts)


def test_a_declared_prompt_len_is_enforced_by_the_runner_as_by_compile(tiny, task):
    """A program built with prompt_len=6 takes prompts of 6 tokens only, in ProgramRunner as in lmforge.compile."""
    import lmforge

    b = ProgramBuilder("p", {"tiny": tiny[1]}, prompt_len=6)
    graph = b.build(b.generate("tiny", max_new_tokens=ANSWER_LEN, eos_id=EOS))
    assert ProgramRunner(graph).run(task[0][:2, :6]).tokens.shape == (2, 1, ANSWER_LEN)
    short = task[0][:2, :3]
    with pytest.raises(LmforgeError, match=r"built for prompts of 6 tokens \(prompt_len=6\), got \(2, 3\)"):
        ProgramRunner(graph).run(short)
    with pytest.raises(LmforgeError, match="built for prompts of 6 tokens"):
        ProgramRunner(graph).run([task[0][0], task[0][1, :3]])
    with pytest.raises(LmforgeError, match="must have size 6 in dim 1"):
        lmforge.compile(graph)(short)


def test_evaluator_takes_a_list_of_prompts(tiny, task):
    """A dev set of prompts of different lengths (half of them cut by a token): the evaluator's accuracy and eFLOPs
    per prompt are those of the prompts run one by one."""
    from lmforge.programs.search import ProgramEvaluator, grid, program_space

    prompts = [p[i % 2:] for i, p in enumerate(task[0][:8])]
    answers = task[1][:8]
    config = next(c for c in grid(program_space(["tiny"], windows=(0,), kv=("none",), strategies=("greedy",)))
                  if c["program.max_new_tokens"] == ANSWER_LEN)
    ev = ProgramEvaluator({"tiny": tiny[1]}, prompts, answers, H100, eos_id=EOS)
    got = ev(config)
    graph = ev.build(config)
    alone = [ProgramRunner(graph).run(p[None]) for p in prompts]
    right = [bool((one.tokens[0, 0, :answers.shape[1]] == a).all()) for one, a in zip(alone, answers)]
    assert got.accuracy == pytest.approx(sum(right) / len(right)) and 0 < sum(right) < len(right)
    assert got.eflops == pytest.approx(sum(program_cost(graph, one, H100).eflops for one in alone) / 8, rel=1e-9)
