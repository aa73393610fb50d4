"""lmforge.quality: the metrics behave as their definitions say on controlled perturbations."""
import math

import pytest
import torch

from lmforge import quality
from lmforge.errors import LmforgeError


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


def _argmax_and_logits(w):
    """A model returning (next token ids, logits): the integer output comes first."""
    def model(x):
        logits = x @ w
        return logits.argmax(-1, keepdim=True), logits
    return model


def test_an_integer_output_is_not_taken_as_logits():
    w = torch.randn(16, 50, generator=torch.Generator().manual_seed(0))
    ref, flipped = _argmax_and_logits(w), _argmax_and_logits(-w)
    inputs = [(torch.randn(8, 16, generator=torch.Generator().manual_seed(1)),)]
    with pytest.raises(LmforgeError, match=r"tensor output 0 of the model is int64 \(8, 1\), not logits.*logits_index"):
        quality.compare(ref, flipped, inputs)
    assert quality.compare(ref, flipped, inputs, logits_index=1).top1_agreement == 0.0, "negated logits never agree"
    with pytest.raises(LmforgeError, match="logits_index=2, but the model has 2 tensor output"):
        quality.compare(ref, ref, inputs, logits_index=2)


def test_a_last_dimension_of_one_is_not_logits():
    model = lambda x: x.sum(-1, keepdim=True)   # a float [n, 1]: argmax always 0, KL always 0
    with pytest.raises(LmforgeError, match=r"float32 \(4, 1\), not logits"):
        quality.compare(model, model, [(torch.randn(4, 3),)])


def test_logits_masked_with_minus_inf_compare_finitely():
    def masked(x):
        logits = x.clone()
        logits[..., 0] = float("-inf")
        return logits
    inputs = [(torch.randn(4, 10, generator=torch.Generator().manual_seed(0)),)]
    r = quality.compare(masked, masked, inputs)
    assert r.kl == 0.0 and r.max_rel_err == 0.0 and r.top1_agreement == 1.0
    r = quality.compare(masked, lambda x: masked(x) * 1.01, inputs)
    assert 0 < r.kl < 1e-2 and r.max_rel_err == pytest.approx(0.01)
    assert quality.rel_err(torch.tensor([1.0, 2.0]), torch.tensor([1.0, float("-inf")])) == math.inf, \
        "an infinite entry the other model does not have is an infinite error"


def test_kl_is_infinite_where_the_new_model_rules_out_a_likely_token():
    ref, new = torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, float("-inf")]])
    assert quality.kl_divergence(ref, new).item() == math.inf
    assert quality.kl_divergence(new, ref).item() == pytest.approx(math.log(2.0))


def test_no_inputs_or_no_positions_is_an_error():
    m = Logits()
    with pytest.raises(LmforgeError, match="no inputs"):
        quality.compare(m, m, [])
    with pytest.raises(LmforgeError, match="select no logits"):
        quality.compare(m, m, [(torch.randint(0, 11, (2, 5)),)], positions=slice(7, 9))
