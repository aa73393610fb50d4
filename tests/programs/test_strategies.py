"""Decoding strategies on the trained tiny task model, against torch references and each other."""
import pytest
import torch

from examples.models.llama import LlamaDecodeStep, greedy_generate
from examples.models.tiny_task import EOS, exact_match
from lmforge.programs import ProgramBuilder, ProgramRunner

T = 4


def run(step, prompts, **attrs):
    b = ProgramBuilder("p", {"tiny": step})
    graph = b.build(b.generate("tiny", max_new_tokens=attrs.pop("max_new_tokens", T), **{"eos_id": EOS, **attrs}))
    return ProgramRunner(graph).run(prompts)


def test_greedy_matches_eager_reference(tiny, task):
    model, step = tiny
    prompts, _ = task
    got = run(step, prompts[:12]).tokens[:, 0]
    assert torch.equal(got, greedy_generate(LlamaDecodeStep(model), prompts[:12], T, EOS))


def test_beam_width_one_is_greedy(tiny, task):
    _, step = tiny
    prompts, _ = task
    greedy = run(step, prompts[:12])
    beam = run(step, prompts[:12], strategy="beam", width=1)
    assert torch.equal(beam.tokens, greedy.tokens)
    torch.testing.assert_close(beam.scores, greedy.scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("width,groups", [(4, 2), (6, 3)])
def test_diverse_beam_lambda_zero_is_beam_per_group(tiny, task, width, groups):
    _, step = tiny
    prompts, _ = task
    diverse = run(step, prompts[:6], strategy="diverse_beam", width=width, groups=groups, diversity=0.0)
    beam = run(step, prompts[:6], strategy="beam", width=width // groups)
    per = width // groups
    for g in range(groups):
        assert torch.equal(diverse.tokens[:, g * per:(g + 1) * per], beam.tokens)
        torch.testing.assert_close(diverse.scores[:, g * per:(g + 1) * per], beam.scores, rtol=1e-5, atol=1e-5)


def test_diverse_beam_penalty_diversifies(tiny, task):
    _, step = tiny
    prompts, _ = task
    plain = run(step, prompts[:6], strategy="diverse_beam", width=4, groups=2, diversity=0.0)
    spread = run(step, prompts[:6], strategy="diverse_beam", width=4, groups=2, diversity=50.0)
    distinct = lambda r: sum(len({tuple(x) for x in r.tokens[b].tolist()}) for b in range(6))  # noqa: E731
    assert distinct(spread) > distinct(plain)


@pytest.mark.parametrize("n,temperature", [(4, 1.0), (8, 1.5)])
def test_first_finish_is_the_shortest_sample(tiny, task, n, temperature):
    _, step = tiny
    prompts, _ = task
    samples = run(step, prompts[:8], strategy="sample", n=n, temperature=temperature, max_new_tokens=6, seed=3)
    first = run(step, prompts[:8], strategy="first_finish", n=n, temperature=temperature, max_new_tokens=6, seed=3)
    for b in range(8):
        rows = samples.tokens[b]
        lengths = [(r.tolist() + [EOS]).index(EOS) + 1 for r in rows]
        shortest = min(lengths)
        winners = [i for i in range(n) if lengths[i] == shortest]
        assert any(torch.equal(first.tokens[b, 0], rows[i]) for i in winners)
        assert first.accounts[0].traces[b].steps == min(shortest, 6)


def test_trie_beam_output_is_in_the_catalog(tiny, task):
    _, step = tiny
    prompts, _ = task
    gen = torch.Generator().manual_seed(11)
    catalog = [tuple(torch.randint(0, 10, (int(torch.randint(1, 4, (1,), generator=gen)),), generator=gen).tolist())
               + (EOS,) for _ in range(5)]
    got = run(step, prompts[:8], strategy="trie_beam", width=3, catalog=catalog)
    for row in got.tokens.reshape(-1, T).tolist():
        cut = row[:row.index(EOS) + 1]
        assert tuple(cut) in catalog


@pytest.mark.parametrize("catalog,width", [([(8, 3, 1, EOS)], 2), ([(8, 3, 1, EOS), (5, 5, 5, EOS)], 4)])
def test_trie_beam_with_fewer_entries_than_beams_repeats_the_best(tiny, task, catalog, width):
    """Fewer legal continuations than beams: the dead beams repeat the group's best beam, scored -inf (rejected)."""
    _, step = tiny
    got = run(step, task[0][:3], strategy="trie_beam", width=width, catalog=catalog)
    live = torch.isfinite(got.scores)
    assert live.sum(1).tolist() == [len(catalog)] * 3
    for b in range(3):
        assert {tuple(r) for r in got.tokens[b].tolist()} == set(catalog)
        assert torch.equal(got.tokens[b, ~live[b]], got.tokens[b, :1].expand(int((~live[b]).sum()), -1))


@pytest.mark.parametrize("catalog", [[(8,), (8, 3, 1)], [(8, 3, 1), (8,)], [(8, EOS), (8, 3, 1, EOS)]])
def test_trie_beam_can_end_an_entry_that_a_longer_entry_continues(tiny, task, catalog):
    """(8,) is a complete entry and the prefix of (8, 3, 1): a beam at (8,) may end there (EOS) or go on."""
    _, step = tiny
    got = run(step, task[0][:3], strategy="trie_beam", width=2, catalog=catalog)
    assert bool(torch.isfinite(got.scores).all())
    for b in range(3):
        assert {tuple(r) for r in got.tokens[b].tolist()} == {(8, EOS, EOS, EOS), (8, 3, 1, EOS)}


def test_trie_beam_without_eos_takes_entries_of_max_new_tokens(tiny, task):
    """With no EOS a beam ends only at max_new_tokens: entries of that length work (a shorter one is refused at
    build time, tests/programs/test_program_errors.py)."""
    _, step = tiny
    catalog = [(8, 3, 1, 2), (1, 2, 3, 4), (1, 2, 5, 5)]
    got = run(step, task[0][:2], strategy="trie_beam", width=2, catalog=catalog, eos_id=-1)
    assert bool(torch.isfinite(got.scores).all())
    assert {tuple(r) for r in got.tokens.reshape(-1, T).tolist()} <= set(catalog)


def test_best_of_n_with_perfect_verifier_beats_greedy(tiny, task):
    _, step = tiny
    prompts, answers = task
    greedy = exact_match(run(step, prompts).tokens[:, 0], answers)
    best = run(step, prompts, strategy="best_of_n", n=8, temperature=1.0, aggregator="scorer",
               scorer="addition_checker").tokens[:, 0]
    assert exact_match(best, answers) >= greedy


def test_best_of_n_reports_the_length_of_the_sample_it_chose(tiny, task):
    """A scorer that prefers long answers picks samples other than sample 0: the Generation has their lengths."""
    from lmforge.programs import register_function
    from lmforge.programs.runtime import run_generate

    register_function("t-longest", lambda prompt, cands: [(r + [EOS]).index(EOS) for r in cands.tolist()])
    _, step = tiny
    b = ProgramBuilder("p", {"tiny": step})
    graph = b.build(b.generate("tiny", strategy="best_of_n", n=6, temperature=3.0, aggregator="scorer",
                               scorer="t-longest", max_new_tokens=6, eos_id=EOS, seed=0))
    gens = run_generate(ProgramRunner(graph).ctx, 0, graph.nodes[0].attr, task[0][:12])
    lengths = [int(g.lengths[0]) for g in gens]
    assert lengths == [(g.tokens[0].tolist() + [EOS]).index(EOS) + 1 if EOS in g.tokens[0] else 6 for g in gens]
    assert max(lengths) > T      # some prompt had a sample longer than the usual answer, and it was chosen


def test_momentum_alpha_zero_is_greedy_and_penalty_changes_repeats(tiny, task):
    _, step = tiny
    prompts, _ = task
    greedy = run(step, prompts[:8], max_new_tokens=6)
    mom0 = run(step, prompts[:8], strategy="momentum", alpha=0.0, max_new_tokens=6)
    assert torch.equal(mom0.tokens, greedy.tokens)
    mom = run(step, prompts[:8], strategy="momentum", alpha=100.0, max_ngram=2, max_new_tokens=6)
    for b in range(8):  # with a huge penalty no bigram of prompt + output repeats before EOS
        seq = prompts[b].tolist() + mom.tokens[b, 0].tolist()
        seq = seq[:len(prompts[b]) + (mom.tokens[b, 0].tolist() + [EOS]).index(EOS)]
        bigrams = list(zip(seq, seq[1:]))
        assert len(bigrams) == len(set(bigrams))


def test_samples_are_cached_by_index(tiny, task):
    _, step = tiny
    prompts, _ = task
    b = ProgramBuilder("p", {"tiny": step})
    g4 = b.build(b.generate("tiny", strategy="sample", n=4, max_new_tokens=T, eos_id=EOS, seed=5))
    b = ProgramBuilder("p", {"tiny": step})
    g8 = b.build(b.generate("tiny", strategy="sample", n=8, max_new_tokens=T, eos_id=EOS, seed=5))
    runner4 = ProgramRunner(g4)
    r4 = runner4.run(prompts[:4])
    runner8 = ProgramRunner(g8, cache=runner4.cache)
    r8 = runner8.run(prompts[:4])
    assert torch.equal(r8.tokens[:, :4], r4.tokens)
    fresh = ProgramRunner(g8).run(prompts[:4])
    assert torch.equal(fresh.tokens, r8.tokens)
    assert runner4.cache.hits >= 16
