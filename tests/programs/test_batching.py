"""Several prompts decode as one batch: every prompt's tokens, scores, trace and token accounting equal those of
running it alone, with one step call per token for the whole batch, and Hydragen's grouped prefixes in use."""
import pytest
import torch

from examples.models.tiny_task import ANSWER_LEN, EOS, make_problems
from lmforge.programs import ProgramBuilder, ProgramRunner
from lmforge.programs.decoding import StepModel

CATALOG = [(1, 2, EOS), (3, EOS), (4, 5, 6, EOS), (7, 7, EOS)]
STRATEGIES = {
    "greedy": {},
    "sample": {"strategy": "sample", "n": 4, "temperature": 1.0, "seed": 1},
    "best_of_n_vote": {"strategy": "best_of_n", "n": 4, "temperature": 1.2, "aggregator": "vote"},
    "first_finish": {"strategy": "first_finish", "n": 4, "temperature": 1.5, "max_new_tokens": 6},
    "top_p": {"strategy": "sample", "n": 3, "temperature": 1.0, "top_p": 0.8, "shared_prefix": False},
    "beam": {"strategy": "beam", "width": 3},
    "diverse_beam": {"strategy": "diverse_beam", "width": 4, "groups": 2, "diversity": 1.0},
    "trie_beam": {"strategy": "trie_beam", "width": 2, "catalog": CATALOG},
    "momentum": {"strategy": "momentum", "alpha": 2.0, "max_new_tokens": 6},
}


def _program(step, attrs):
    attrs = dict(attrs)
    b = ProgramBuilder("p", {"tiny": step})
    return b.build(b.generate("tiny", max_new_tokens=attrs.pop("max_new_tokens", ANSWER_LEN), eos_id=EOS, **attrs))


def _same_result(got, want):
    assert torch.equal(got.tokens, want.tokens)
    torch.testing.assert_close(got.scores, want.scores, rtol=1e-5, atol=1e-5)
    for a, b in zip(got.accounts, want.accounts):
        assert [vars(t) for t in a.traces] == [vars(t) for t in b.traces]
        assert (a.prompt_tokens, a.generated_tokens, a.checks) == (b.prompt_tokens, b.generated_tokens, b.checks)


class _CountSteps:
    def __init__(self, monkeypatch):
        self.calls, self.rows = 0, []
        run = StepModel.run

        def counted(model, tokens, k, v, shared=False):
            self.calls += 1
            self.rows.append(tokens.shape[0])
            return run(model, tokens, k, v, shared)

        monkeypatch.setattr(StepModel, "run", counted)


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_batched_prompts_equal_one_prompt_at_a_time(tiny, task, name, monkeypatch):
    prompts = task[0][:10]
    graph = _program(tiny[1], STRATEGIES[name])
    alone = ProgramRunner(graph, batch_prompts=False).run(prompts)
    count = _CountSteps(monkeypatch)
    together = ProgramRunner(graph).run(prompts)
    _same_result(together, alone)
    # one step call per prompt token and per decoded token, for all 10 prompts at once
    assert count.calls <= prompts.shape[1] + STRATEGIES[name].get("max_new_tokens", ANSWER_LEN)
    assert max(count.rows) >= 10


def test_grouped_hydragen_step_runs_and_equals_the_plain_step(tiny, task):
    prompts = task[0][:6]
    graph = _program(tiny[1], STRATEGIES["sample"])
    runner = ProgramRunner(graph)
    hydragen = runner.run(prompts)
    grouped = [r for r, _ in runner._compiled.values()
               if any(n.op == "shared_prefix_attention" and n.inputs[1].type.shape[0] != 1 for n in r.nodes)]
    assert grouped, "the decode steps of 6 prompts x 4 samples did not run the grouped Hydragen step"
    _same_result(ProgramRunner(graph, hydragen=False).run(prompts), hydragen)


def test_partly_cached_samples_and_repeated_prompts(tiny, task):
    """A best-of-8 after a best-of-4 on some of the prompts decodes 4 samples for those and 8 for the others (uneven
    groups: the plain step runs); a prompt that appears twice decodes once."""
    prompts = task[0][:6]
    four = dict(STRATEGIES["sample"], n=4)
    eight = dict(STRATEGIES["sample"], n=8)
    warm = ProgramRunner(_program(tiny[1], four))
    warm.run(prompts[:3])
    again = torch.cat([prompts, prompts[:1]])
    got = ProgramRunner(_program(tiny[1], eight), cache=warm.cache).run(again)
    want = ProgramRunner(_program(tiny[1], eight), batch_prompts=False).run(again)
    _same_result(got, want)
    assert torch.equal(got.tokens[-1], got.tokens[0])
    assert warm.cache.hits >= 3 * 4


def test_fuser_batches_prompts_with_equal_inputs(tiny, fuser, monkeypatch):
    fuser_step = fuser[1]
    prompts = make_problems(8, seed=8, split="heldout")[0]
    b = ProgramBuilder("p", {"tiny": tiny[1], "fuser": fuser_step})
    c = b.verify(b.generate("tiny", strategy="sample", n=3, max_new_tokens=ANSWER_LEN, eos_id=EOS, seed=3),
                 checker="addition_checker", threshold=0.5)
    graph = b.build(b.fuse(c, by="model", model="fuser"))     # verified candidates: inputs of several lengths
    alone = ProgramRunner(graph, batch_prompts=False).run(prompts)
    count = _CountSteps(monkeypatch)
    together = ProgramRunner(graph).run(prompts)
    _same_result(together, alone)
    lengths = [t.prompt_len for t in together.accounts[-1].traces]
    assert len(set(lengths)) < len(lengths), lengths   # some fuser inputs share a length
    assert count.calls <= prompts.shape[1] + ANSWER_LEN + sum(n + ANSWER_LEN for n in set(lengths))


def _teacher_forced_logprob(model, prompt, cand):
    """Sum of log p(cand[t] | prompt, cand[:t]) under the eager model, up to and including the first EOS (the
    padding after it is not the candidate's): the reference for scoring models."""
    cand = cand[:(cand.tolist() + [EOS]).index(EOS) + 1]
    seq = torch.cat([prompt, cand[:-1]])[None]
    logits = model.prefill(seq)[0][0].float().log_softmax(-1)
    steps = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(cand))
    return logits[steps, cand].sum()


def test_rank_and_verify_with_a_scoring_model(tiny, task):
    """rank / verify by a model score every candidate of every prompt as one batch; the scores are the model's
    teacher-forced log-probabilities, and the accounting is that of one scoring call per check (early exit)."""
    model, step = tiny
    prompts = task[0][:6]
    b = ProgramBuilder("p", {"tiny": step})
    cands = b.generate("tiny", strategy="sample", n=4, temperature=1.5, max_new_tokens=ANSWER_LEN, eos_id=EOS,
                       seed=2)
    ranked = b.build(b.rank(cands, top_k=2, model="tiny"))
    b = ProgramBuilder("p", {"tiny": step})
    cands = b.generate("tiny", strategy="sample", n=4, temperature=1.5, max_new_tokens=ANSWER_LEN, eos_id=EOS,
                       seed=2)
    verified = b.build(b.verify(cands, threshold=0.995, first_k=1, model="tiny"))
    for graph in (ranked, verified):
        together = ProgramRunner(graph).run(prompts)
        _same_result(together, ProgramRunner(graph, batch_prompts=False).run(prompts))
    got = ProgramRunner(ranked).run(prompts)
    with torch.no_grad():
        for i in range(6):
            want = torch.stack([_teacher_forced_logprob(model, prompts[i], c) for c in got.tokens[i]])
            torch.testing.assert_close(got.scores[i], want, rtol=1e-4, atol=1e-4)
    result = ProgramRunner(verified).run(prompts)
    checks, accepted = result.accounts[1], torch.isfinite(result.scores).sum(1)
    assert all(t.prefill_rows == 1 and t.rows_per_step == [1] * t.steps and 1 <= t.steps <= ANSWER_LEN
               for t in checks.traces)
    assert accepted.max() == 1 and accepted.min() == 0     # early exit after one pass; some prompts pass none
    # one scoring call per candidate checked: a prompt with an accepted candidate stops at it, the others check all
    assert 6 < len(checks.traces) < 6 * 4 and (accepted == 0).sum() * 4 < len(checks.traces)


def test_scoring_models_stop_at_each_candidates_eos(tiny, task):
    """With max_new_tokens past the answers' length the candidates carry EOS padding: a scoring model scores each
    up to its first EOS, so scoring greedy answers with the model that wrote them gives the generate node's own
    scores, and verify by that model accepts them (the padding used to sink the scores)."""
    _, step = tiny
    prompts = task[0][:6]
    b = ProgramBuilder("p", {"tiny": step})
    cands = b.generate("tiny", max_new_tokens=ANSWER_LEN + 2, eos_id=EOS)
    ranked = b.build(b.rank(cands, top_k=1, model="tiny"))
    assert ranked.nodes[1].attr["eos_id"] == EOS                   # taken from the generate node
    b = ProgramBuilder("p", {"tiny": step})
    plain = b.build(b.generate("tiny", max_new_tokens=ANSWER_LEN + 2, eos_id=EOS))
    want = ProgramRunner(plain).run(prompts).scores
    got = ProgramRunner(ranked).run(prompts)
    torch.testing.assert_close(got.scores, want, rtol=1e-5, atol=1e-5)
    b = ProgramBuilder("p", {"tiny": step})
    verified = b.build(b.verify(b.generate("tiny", max_new_tokens=ANSWER_LEN + 2, eos_id=EOS), threshold=0.9,
                                model="tiny"))
    result = ProgramRunner(verified).run(prompts)
    assert bool(torch.isfinite(result.scores).all())
    assert all(t.steps == ANSWER_LEN for t in result.accounts[1].traces)   # charged up to the EOS, not T


def _counting_step(vocab: int, eos: int, seen: list):
    """A toy decode step: each row's next token is its last token + 1 (EOS once it gets there); records the rows of
    every call, and grows a [1, R, 1, S, 1] cache so that dropped rows must be dropped from the cache too."""
    def step(tokens, k, v):
        seen.append(tokens.shape[0])
        assert k.shape[1] == tokens.shape[0], "the cache rows follow the batch"
        nxt = (tokens[:, -1] + 1).clamp_max(eos)
        logits = torch.full((tokens.shape[0], 1, vocab), -10.0).scatter(2, nxt[:, None, None], 10.0)
        grow = tokens[:, -1].float().view(1, -1, 1, 1, 1)
        return logits, torch.cat([k, grow], 3), torch.cat([v, grow], 3)

    return StepModel(step, (1, 1, 1))


def test_finished_rows_leave_the_batch():
    """Continuous batching: a row that emitted EOS is no longer decoded (nor its prompt's rows, for the grouped
    shared-prefix step, once all of them finished); tokens, lengths and traces are as before."""
    from lmforge.programs.decoding import greedy_many, sample_many

    seen = []
    gens = greedy_many(_counting_step(8, 7, seen), torch.tensor([[1], [3], [5]]), max_new=8, eos=7)
    assert [g.tokens[0].tolist() for g in gens] == [[2, 3, 4, 5, 6, 7, 7, 7], [4, 5, 6, 7, 7, 7, 7, 7],
                                                    [6, 7, 7, 7, 7, 7, 7, 7]]
    assert [int(g.lengths[0]) for g in gens] == [6, 4, 2]
    assert seen == [3, 3, 2, 2, 1, 1], "prefill, then the batch shrinks as rows finish"
    assert [g.trace.rows_per_step for g in gens] == [[1] * 6, [1] * 4, [1] * 2]
    seen.clear()   # 2 samples of 2 prompts (prefilled once each, then groups of 2): a prompt leaves when both finished
    gens = sample_many(_counting_step(8, 7, seen), torch.tensor([[4], [1]]), [[0, 1], [0, 1]], max_new=8, eos=7,
                       temperature=0.0)
    assert seen == [2, 4, 4, 2, 2, 2] and [int(g.lengths[0]) for g in gens] == [3, 6]
