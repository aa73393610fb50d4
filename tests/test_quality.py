"""lmforge.quality: the metrics behave as their definitions say on controlled perturbations."""
import math

import pytest
import torch

from lmforge import quality


class Logits(torch.nn.Module):
    def __init__(self, vocab=11, dim=8, noise=0.0, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.randn(vocab, dim, generator=g)
        self.head = torch.randn(dim, vocab, generator=g)
        self.noise = noise * torch.randn(dim, vocab, generator=torch.Generator().manual_seed(seed + 1))

    def forward(self, tokens):
        return self.emb[tokens] @ (self.head + self.noise)


def test_identical_models_have_zero_error_full_agreement():
    m = Logits()
    toks = [(torch.randint(0, 11, (2, 5)),) for _ in range(3)]
    r = quality.compare(m, m, toks, token_data=torch.randint(0, 11, (4, 6)), checker=lambda f: 0.5)
    assert r.max_rel_err == 0 and r.kl == pytest.approx(0, abs=1e-12) and r.top1_agreement == 1.0
    assert r.ppl_delta == 0 and r.task_acc_delta == 0 and r.n_positions == 30


def test_metrics_worsen_monotonically_with_noise():
    ref = Logits()
    toks = [(torch.randint(0, 11, (4, 16), generator=torch.Generator().manual_seed(i)),) for i in range(3)]
    reports = [quality.compare(ref, Logits(noise=s), toks) for s in (0.01, 0.1, 1.0)]
    kls = [r.kl for r in reports]
    errs = [r.max_rel_err for r in reports]
    assert kls == sorted(kls) and errs == sorted(errs)
    assert reports[0].top1_agreement >= reports[-1].top1_agreement
    assert reports[-1].top1_agreement < 1.0


def test_perplexity_of_uniform_model_is_vocab_size():
    uniform = lambda toks: torch.zeros(*toks.shape, 7)
    assert quality.perplexity(uniform, torch.randint(0, 7, (3, 9))) == pytest.approx(7.0)


def test_kl_matches_closed_form():
    p = torch.tensor([[0.0, math.log(3.0)]])  # probs 1/4, 3/4
    q = torch.tensor([[0.0, 0.0]])            # probs 1/2, 1/2
    want = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert quality.kl_divergence(p, q).item() == pytest.approx(want)


def test_positions_restrict_where_agreement_is_counted():
    ref = lambda t: torch.nn.functional.one_hot(t, 5).float()
    new = lambda t: torch.nn.functional.one_hot(torch.where(torch.arange(t.shape[1]) < 2, (t + 1) % 5, t), 5).float()
    toks = [(torch.randint(0, 5, (3, 6)),)]
    assert quality.compare(ref, new, toks).top1_agreement == pytest.approx(4 / 6)
    r = quality.compare(ref, new, toks, positions=slice(2, 6))
    assert r.top1_agreement == 1.0 and r.n_positions == 12
