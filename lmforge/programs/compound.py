"""Archon-style compound operations on the candidates of one prompt (Saad-Falcon et al., "Archon", 2024).

Candidates are (tokens [k, T], scores [k]); a score of -inf marks a candidate a verifier rejected (or did
not reach, with early exit). Every function here is pure: it takes the prompt [L] and candidates and
returns new candidates, plus the number of candidates it scored with a model or a function (for the token
accounting). A model scorer is `score_fn(prompt [L], tokens [k, T]) -> log-probabilities [k]`.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from lmforge.errors import LmforgeError
from lmforge.programs.functions import get_function

NEG_INF = float("-inf")


def ensemble(parts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """All candidates of several generators, one after another."""
    return torch.cat([t for t, _ in parts]), torch.cat([s for _, s in parts])


def function_scores(name: str, prompt: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The registered function `name` on one prompt's candidates: one float per candidate."""
    returned = get_function(name).fn(prompt, tokens)
    try:
        got = torch.as_tensor(returned, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as e:
        raise LmforgeError(f"program function {name!r} returned {type(returned).__name__} {returned!r:.80}, which "
                           f"is not numbers ({e}): it must return one float score per candidate, shape [k]") from None
    if got.numel() != tokens.shape[0]:
        raise LmforgeError(f"program function {name!r} returned {tuple(got.shape)} for {tokens.shape[0]} candidates: "
                           "it must return one score per candidate, shape [k]")
    return got.reshape(tokens.shape[0])


def rank(prompt, tokens, scores, by: str, top_k: int, score_fn: Callable | None = None):
    """The top_k candidates by their log-probability (by="logprob"), a model's log-probability of them
    (by="model", score_fn given), or a registered scorer function (by=<name>). Ties keep the earlier one."""
    if by == "logprob":
        key = scores
    elif by == "model":
        key = score_fn(prompt, tokens)
    else:
        key = function_scores(by, prompt, tokens)
    key = torch.where(torch.isfinite(scores), key, torch.full_like(key, NEG_INF))  # rejected stay rejected
    order = torch.sort(key, descending=True, stable=True).indices[:top_k]
    return tokens[order], key[order].float()


def verify(prompt, tokens, scores, checker: str = "", first_k: int = 0, threshold: float = 0.5,
           score_fn: Callable | None = None):
    """Mark candidates that fail the check with score -inf. checker: a registered function name; else the
    model's mean per-token log-probability (score_fn) must reach log(threshold). first_k > 0: stop after
    the first first_k passing candidates (early exit); the unchecked rest are rejected too. score_fn(prompt,
    tokens, mean=True) gives the mean log-probability per token of each candidate (up to its EOS).
    Returns (tokens, scores, number of candidates checked)."""
    out = scores.clone()
    passed = checked = 0
    for i in range(tokens.shape[0]):
        if first_k and passed >= first_k or not torch.isfinite(scores[i]):
            out[i] = NEG_INF
            continue
        checked += 1
        if checker:
            ok = bool(function_scores(checker, prompt, tokens[i:i + 1])[0] > 0.5)
        else:
            ok = bool(score_fn(prompt, tokens[i:i + 1], mean=True)[0] >= torch.log(torch.tensor(threshold)))
        passed += ok
        if not ok:
            out[i] = NEG_INF
    return tokens, out, checked


def vote(tokens, scores):
    """Majority vote over the accepted candidates (whole sequences); ties go to the higher summed score,
    then to the earlier candidate. With no accepted candidate, the first candidate stands (score -inf)."""
    alive = torch.isfinite(scores)
    if not alive.any():
        return tokens[:1], scores[:1]
    best, best_key = 0, None
    rows = [tuple(r) for r in tokens.tolist()]
    for i in range(tokens.shape[0]):
        if not alive[i]:
            continue
        same = [j for j in range(tokens.shape[0]) if alive[j] and rows[j] == rows[i]]
        key = (len(same), float(max(scores[j] for j in same)), -i)
        if best_key is None or key > best_key:
            best, best_key = i, key
    return tokens[best:best + 1], scores[best:best + 1]


def fuse(prompt, tokens, scores):
    """fuse(by="vote"): one candidate fused from the accepted ones, position by position: each position takes
    the token with the largest total weight, weights = softmax of the candidates' scores (their summed
    log-probabilities): a weighted token-level vote. Its score is the log of the weight that agrees with the
    fused token, summed over positions."""
    alive = torch.isfinite(scores)
    if not alive.any():
        return tokens[:1], scores[:1]
    weights = torch.where(alive, scores, torch.full_like(scores, NEG_INF)).softmax(0)
    vocab = int(tokens.max()) + 1
    onehot = torch.nn.functional.one_hot(tokens, vocab).float()          # [k, T, V]
    fused = (weights[:, None, None] * onehot).sum(0).argmax(-1)          # [T]
    return fused[None], torch.log((weights[:, None] * (tokens == fused).float()).sum(0).clamp_min(1e-30)).sum()[None]


def fuser_input(prompt: torch.Tensor, tokens: torch.Tensor, scores: torch.Tensor, sep: int) -> torch.Tensor:
    """What a generative fuser reads: the prompt, then SEP + each accepted candidate, then SEP.

        prompt [6] "47+08=", candidates ["550" EOS, "540" EOS]  ->  47+08= SEP 550 EOS SEP 540 EOS SEP
    """
    parts = [prompt]
    for row, ok in zip(tokens, torch.isfinite(scores)):
        if ok:
            parts += [torch.tensor([sep]), row]
    return torch.cat(parts + [torch.tensor([sep])])


def fuse_by_model(prompt, tokens, scores, sep: int, run: Callable):
    """fuse(by="model"), Archon's generative fuser: a model reads the prompt and the accepted candidates
    (`fuser_input`, separator id `sep`) and greedily writes a new answer of the candidates' length T.
    `run(input [L'], T) -> Generation` runs the fuser model (the runtime charges its prefill of the L' tokens
    and its T decode steps). With no accepted candidate, the first candidate stands (score -inf) and the model
    does not run. Returns (tokens [1, T], score [1] = the fuser's log-probability of its answer, Generation|None)."""
    alive = torch.isfinite(scores)
    if not alive.any():
        return tokens[:1], scores[:1], None
    gen = run(fuser_input(prompt, tokens, scores, sep), tokens.shape[1])
    return gen.tokens[:1], gen.logprobs[:1].float(), gen


def aggregate(prompt, tokens, scores, aggregator: str, scorer: str = ""):
    """Best-of-N's choice of one sample: "vote" (majority), "logprob" (highest), or "scorer" (the registered
    function `scorer`, ties to the higher log-probability)."""
    if aggregator == "vote":
        return vote(tokens, scores)
    if aggregator == "logprob":
        return rank(prompt, tokens, scores, "logprob", 1)
    key = function_scores(scorer, prompt, tokens)
    # lexicographic: function score, then log-probability, then the earlier sample
    order = sorted(range(tokens.shape[0]), key=lambda i: (-float(key[i]), -float(scores[i]), i))
    return tokens[order[:1]], scores[order[:1]]
