"""Decoding strategies over a decode-step callable; several prompts (of one length) decode as one batch.

Every strategy drives `StepModel.step(tokens [R, 1], k, v) -> (logits [R, 1, V], k, v)` (a compiled step
graph, or any callable with that signature) and returns a `Generation`: candidate token rows [k, T] padded
with EOS after they finish, their summed log-probabilities, their lengths (EOS included), and a
`DecodeTrace` (how many rows were decoded at each step), from which the token accounting and the cost on
a target follow (lmforge.programs.cost).

The prompt is prefilled once and its cache expanded to the rows that share it (`shared_prefix=True`), or
prefilled once per row (`False`); the outputs are the same either way.

Each strategy has a one-prompt form (`greedy(model, prompt [L], ...) -> Generation`) and a batched form
(`greedy_many(model, prompts [P, L], ...) -> list[Generation]`): the rows of all P prompts (prompt-major)
run through one step call per token, so a dev set of 64 prompts costs a few step calls per token instead of
64. Every prompt's result and trace are those of the one-prompt form (per-row arithmetic; tested equal).

Sampling draws sample i of a prompt from its own generator seeded by (seed, prompt, i), so a sample does
not depend on which other samples run beside it: generations can be cached per sample index.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

NEG_INF = float("-inf")


@dataclass
class DecodeTrace:
    """What one generation decoded: rows per step (the batch at each decode step) and the prefill."""

    prompt_len: int
    prefill_rows: int                    # rows prefilled (1 when the prompt prefix is shared)
    rows_per_step: list[int] = field(default_factory=list)
    shared_prefix: bool = True

    @property
    def steps(self) -> int:
        return len(self.rows_per_step)


@dataclass
class Generation:
    tokens: torch.Tensor     # [k, T] int64
    logprobs: torch.Tensor   # [k] float32 (sum of the model's log-probabilities of the chosen tokens)
    lengths: torch.Tensor    # [k] int64, EOS included
    trace: DecodeTrace


@dataclass
class StepModel:
    """A decode step and the cache layout it expects: kv_shape = (layers, kv_heads, head_dim).

    hydragen_step: the same step after `shared_prefix_decode` (all rows share one prefix); grouped(r): the step
    for rows in groups of r sharing a prefix each (several prompts' samples), or None where it does not apply.
    prefill_fn: the model's prefill, `tokens [B, L] -> (logits [B, L, V], k, v)`: the prompt in one call;
    without it the prompt is fed through the step token by token."""

    step: Callable
    kv_shape: tuple[int, int, int]
    dtype: torch.dtype = torch.float32
    hydragen_step: Callable | None = None
    grouped: Callable[[int], Callable | None] | None = None
    prefill_fn: Callable | None = None

    def empty(self, rows: int):
        layers, heads, dim = self.kv_shape
        z = torch.zeros((layers, rows, heads, 0, dim), dtype=self.dtype)
        return z, z.clone()

    def run(self, tokens, k, v, shared: bool | int = False):
        """One step. shared=True: all rows share one prefix; an int r: rows share prefixes in groups of r."""
        fn = self.step
        if shared is True or (shared and shared == tokens.shape[0]):
            fn = self.hydragen_step or fn
        elif shared and self.grouped is not None:
            fn = self.grouped(int(shared)) or fn
        logits, k, v = fn(tokens.reshape(-1, 1), k, v)[:3]
        return logits[:, -1, :].float(), k, v

    def prefill(self, prompt: torch.Tensor, rows: int, shared_prefix: bool):
        """Feed the prompt [L] (see prefill_many); return (last logits [rows, V], k, v) for `rows` rows."""
        return self.prefill_many(prompt[None], [rows], shared_prefix)

    def prefill_many(self, prompts: torch.Tensor, rows: Sequence[int], shared_prefix: bool):
        """Feed prompts [P, L] (through prefill_fn, else token by token); return (last logits, k, v) for rows[p]
        rows of prompt p, in prompt order. shared_prefix: each prompt is fed once and its cache expanded to its
        rows."""
        counts = torch.tensor(list(rows))
        feed = prompts if shared_prefix else prompts.repeat_interleave(counts, 0)
        if self.prefill_fn is not None:
            logits, k, v = self.prefill_fn(feed)[:3]
            logits = logits[:, -1, :].float()
        else:
            k, v = self.empty(feed.shape[0])
            for t in range(prompts.shape[1]):
                logits, k, v = self.run(feed[:, t], k, v)
        if shared_prefix and int(counts.sum()) != prompts.shape[0]:
            logits, k, v = (logits.repeat_interleave(counts, 0), k.repeat_interleave(counts, 1),
                            v.repeat_interleave(counts, 1))
        return logits, k, v


def sample_generator(seed: int, prompt: torch.Tensor, index: int) -> torch.Generator:
    """The generator of sample `index` of `prompt`: seeded by a hash of (seed, prompt tokens, index)."""
    key = f"{seed}:{','.join(map(str, prompt.tolist()))}:{index}".encode()
    return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:7], "little"))


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches top_p (nucleus); others get -inf."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(-1, descending=True)
    probs = sorted_logits.softmax(-1)
    drop = probs.cumsum(-1) - probs >= top_p   # tokens after the nucleus is already full
    sorted_logits = sorted_logits.masked_fill(drop, NEG_INF)
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def _sharing(shared_prefix: bool, rows: Sequence[int]) -> bool | int:
    """What StepModel.run is told: rows share prefixes in equal groups (True for one prompt), else False."""
    if not shared_prefix or len(set(rows)) != 1:
        return False
    return True if len(rows) == 1 else rows[0]


def _decode_rows(model: StepModel, prompts, rows: Sequence[int], max_new: int, eos: int, pick,
                 shared_prefix: bool, stop_at_first: bool = False) -> list[Generation]:
    """The common loop over rows[p] rows of each prompt p (prompt-major): pick(logits [R, V], step,
    generated [R, step], row ids [R]) -> tokens [R] for the R rows in the batch. Finished rows emit EOS.

    A row that finished leaves the batch (its cache rows dropped: the next steps decode only the others, as a
    serving engine does), or, where the step reads the rows' prefixes in equal groups (several prompts' samples
    under the shared-prefix step), a prompt's rows leave together once all of them finished. A prompt's trace
    counts its active rows and ends when they have all finished. With stop_at_first a prompt ends at its first EOS
    (first-finish): its other rows keep their tokens so far, EOS after.
    """
    logits, k, v = model.prefill_many(prompts, rows, shared_prefix)
    shared = _sharing(shared_prefix, rows)
    grouped = shared is not True and shared is not False       # the step needs every prompt's rows together
    owner = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor(list(rows)))
    n = int(owner.numel())
    traces = [DecodeTrace(prompts.shape[1], 1 if shared_prefix else r, shared_prefix=shared_prefix) for r in rows]
    out = torch.full((n, max_new), max(eos, 0), dtype=torch.long)
    logp_sum = torch.zeros(n)
    lengths = torch.full((n,), max_new, dtype=torch.long)
    finished = torch.zeros(n, dtype=torch.bool)
    done = torch.zeros(len(rows), dtype=torch.bool)        # prompts whose decoding has ended
    live = torch.arange(n)                                 # the row ids in the batch, in batch order
    for t in range(max_new):
        active = torch.bincount(owner[~finished], minlength=len(rows))
        for p in (~done).nonzero().flatten().tolist():
            traces[p].rows_per_step.append(int(active[p]))
        tok = pick(logits, t, out[live, :t], live)
        logp = logits.log_softmax(-1).gather(1, tok[:, None]).squeeze(1)
        was = finished[live]
        if eos >= 0:
            tok = torch.where(was, torch.full_like(tok, eos), tok)
        logp_sum[live] += torch.where(was, torch.zeros_like(logp), logp)
        out[live, t] = tok
        if eos >= 0:
            newly = (tok == eos) & ~was
            lengths[live[newly]] = t + 1
            finished[live[newly]] = True
        left = torch.bincount(owner[~finished], minlength=len(rows))
        done |= left == 0
        if stop_at_first:
            done |= left < torch.tensor(list(rows))
            finished |= done[owner]            # frozen: EOS from here on, lengths stay as they are
        if bool(done.all()) or t + 1 == max_new:
            break
        keep = ~done[owner[live]] if grouped else ~finished[live]
        if not bool(keep.all()):
            live, tok, k, v = live[keep], tok[keep], k[:, keep], v[:, keep]
        logits, k, v = model.run(tok, k, v, shared=shared)
    bounds = [0, *torch.tensor(list(rows)).cumsum(0).tolist()]
    return [Generation(out[a:b], logp_sum[a:b], lengths[a:b], tr) for a, b, tr in zip(bounds, bounds[1:], traces)]


def greedy(model: StepModel, prompt, max_new: int, eos: int = -1, shared_prefix: bool = True) -> Generation:
    return greedy_many(model, prompt[None], max_new, eos, shared_prefix)[0]


def greedy_many(model: StepModel, prompts, max_new: int, eos: int = -1, shared_prefix: bool = True
                ) -> list[Generation]:
    """Greedy decoding of prompts [P, L] as one batch (one row each)."""
    return _decode_rows(model, prompts, [1] * prompts.shape[0], max_new, eos, lambda lg, t, h, r: lg.argmax(-1),
                        shared_prefix)


def sample(model: StepModel, prompt, indices: Sequence[int], max_new: int, eos: int = -1, temperature: float = 1.0,
           top_p: float = 1.0, seed: int = 0, shared_prefix: bool = True, stop_at_first: bool = False) -> Generation:
    """Samples `indices` of `prompt` (temperature / top-p), run as one batch; see `sample_generator`."""
    return sample_many(model, prompt[None], [indices], max_new, eos, temperature, top_p, seed, shared_prefix,
                       stop_at_first)[0]


def sample_many(model: StepModel, prompts, indices: Sequence[Sequence[int]], max_new: int, eos: int = -1,
                temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, shared_prefix: bool = True,
                stop_at_first: bool = False) -> list[Generation]:
    """Samples indices[p] of each prompt p of prompts [P, L], all as one batch (prompt-major rows)."""
    gens = [sample_generator(seed, prompt, i) for prompt, idx in zip(prompts, indices) for i in idx]

    def pick(logits, t, hist, row_ids):
        if temperature <= 0:
            return logits.argmax(-1)
        probs = top_p_filter(logits / temperature, top_p).softmax(-1).cumsum(-1)
        u = torch.stack([torch.rand((), generator=gens[i]) for i in row_ids.tolist()]) * probs[:, -1]
        return torch.searchsorted(probs, u[:, None]).squeeze(1).clamp_max(logits.shape[-1] - 1)

    return _decode_rows(model, prompts, [len(i) for i in indices], max_new, eos, pick, shared_prefix,
                        stop_at_first)


def momentum(model: StepModel, prompt, max_new: int, eos: int = -1, alpha: float = 0.0, max_ngram: int = 2,
             resistance: Sequence[float] = (1.0,), shared_prefix: bool = True) -> Generation:
    """Momentum decoding (Lan et al., 2022): greedy, but a token that would close a loop, i.e. repeat an
    n-gram (2 <= n <= max_ngram) already in the context, is penalized by alpha x resistance[c - 1], where
    c >= 1 is how many times the longest such n-gram already occurs in the context (resistance[0]: its first
    repeat; the last entry of the table applies beyond its length)."""
    return momentum_many(model, prompt[None], max_new, eos, alpha, max_ngram, resistance, shared_prefix)[0]


def momentum_many(model: StepModel, prompts, max_new: int, eos: int = -1, alpha: float = 0.0, max_ngram: int = 2,
                  resistance: Sequence[float] = (1.0,), shared_prefix: bool = True) -> list[Generation]:
    """`momentum` for prompts [P, L] as one batch."""
    table = list(resistance) or [1.0]
    prompt_lists = prompts.tolist()

    def pick(logits, t, hist, row_ids):
        adjusted = logits.clone()
        if alpha:
            for r, row in enumerate(row_ids.tolist()):       # one row per prompt: row id = prompt index
                ctx = prompt_lists[row] + hist[r].tolist()
                for tok in range(logits.shape[1]):
                    visits = _ngram_visits(ctx, tok, max_ngram)
                    if visits:
                        adjusted[r, tok] -= alpha * table[min(visits - 1, len(table) - 1)]
        return adjusted.argmax(-1)

    return _decode_rows(model, prompts, [1] * prompts.shape[0], max_new, eos, pick, shared_prefix)


def _ngram_visits(ctx: list[int], tok: int, max_ngram: int) -> int:
    """How many times the longest n-gram (2 <= n <= max_ngram) ending in `tok` already occurs in ctx."""
    for n in range(max_ngram, 1, -1):
        if len(ctx) < n - 1:
            continue
        gram = ctx[len(ctx) - n + 1:] + [tok]
        visits = sum(ctx[i:i + n] == gram for i in range(len(ctx) - n + 1))
        if visits:
            return visits
    return 0


def catalog_trie(catalog: Sequence[Sequence[int]]) -> tuple[dict[tuple, set], set[tuple]]:
    """(prefix -> the tokens that continue it to some catalog entry, the set of complete entries).

    An entry may also be the prefix of a longer one: catalog [(5,), (5, 6, 7)] gives ({(): {5}, (5,): {6},
    (5, 6): {7}}, {(5,), (5, 6, 7)}), and a beam at (5,) may then end (EOS) or go on with 6."""
    trie: dict[tuple, set] = {}
    complete: set[tuple] = set()
    for entry in catalog:
        entry = tuple(int(t) for t in entry)
        complete.add(entry)
        for i in range(len(entry)):
            trie.setdefault(entry[:i], set()).add(entry[i])
    return trie, complete


def beam_search(model: StepModel, prompt, max_new: int, eos: int = -1, width: int = 1, groups: int = 1,
                diversity: float = 0.0, catalog: Sequence[Sequence[int]] | None = None,
                shared_prefix: bool = True) -> Generation:
    """Diverse beam search (Vijayakumar et al., 2018): `groups` groups of width/groups beams; at each step
    group g's scores are lowered by diversity x (times each token was chosen by groups < g at this step,
    the Hamming penalty). groups=1 is plain beam search. With a catalog, only continuations of catalog
    entries are allowed (trie-constrained beam search); a beam that spells a complete entry may emit EOS there
    (with eos >= 0), also where a longer entry continues it.
    Returns all beams group by group, each group best first (by summed log-probability)."""
    return beam_search_many(model, prompt[None], max_new, eos, width, groups, diversity, catalog, shared_prefix)[0]


def beam_search_many(model: StepModel, prompts, max_new: int, eos: int = -1, width: int = 1, groups: int = 1,
                     diversity: float = 0.0, catalog: Sequence[Sequence[int]] | None = None,
                     shared_prefix: bool = True) -> list[Generation]:
    """`beam_search` for prompts [P, L] as one batch of P x width rows; a prompt's trace ends when its beams
    have all finished (its rows still ride along, emitting EOS at no cost)."""
    n_prompts, per = prompts.shape[0], width // groups
    trie = catalog_trie(catalog) if catalog is not None else None
    logits, k, v = model.prefill_many(prompts, [width] * n_prompts, shared_prefix)
    shared = _sharing(shared_prefix, [width] * n_prompts)
    traces = [DecodeTrace(prompts.shape[1], 1 if shared_prefix else width, shared_prefix=shared_prefix)
              for _ in range(n_prompts)]
    scores = torch.full((n_prompts, width), NEG_INF)
    scores[:, ::per] = 0.0                 # one live beam per group at the start
    tokens = torch.zeros((n_prompts * width, 0), dtype=torch.long)
    finished = torch.zeros(n_prompts * width, dtype=torch.bool)
    done = torch.zeros(n_prompts, dtype=torch.bool)
    for t in range(max_new):
        active = (~finished).reshape(n_prompts, width).sum(1)
        for p in (~done).nonzero().flatten().tolist():
            traces[p].rows_per_step.append(int(active[p]))
        logp = logits.log_softmax(-1)
        if eos >= 0:  # a finished beam can only emit EOS, at no cost
            done_row = torch.full_like(logp[0], NEG_INF)
            done_row[eos] = 0.0
            logp = torch.where(finished[:, None], done_row, logp)
        if trie is not None:
            logp = logp + _trie_mask(*trie, tokens, finished, eos, logp.shape[-1])
        src, new_tok, scores = _select_beams(scores, logp.reshape(n_prompts, width, -1), per, groups, diversity)
        src = (src + torch.arange(n_prompts)[:, None] * width).reshape(-1)   # rows of the whole batch
        new_tok = new_tok.reshape(-1)
        tokens = torch.cat((tokens[src], new_tok[:, None]), 1)
        finished = finished[src] | ((new_tok == eos) if eos >= 0 else torch.zeros_like(finished))
        k, v = k[:, src], v[:, src]
        done |= finished.reshape(n_prompts, width).all(1)
        if bool(done.all()) or t + 1 == max_new:
            break
        logits, k, v = model.run(new_tok, k, v, shared=shared)
    return [_finish_beams(tokens[p * width:(p + 1) * width], scores[p], max_new, eos, traces[p], per)
            for p in range(n_prompts)]


def _trie_mask(trie, complete, tokens, finished, eos, vocab) -> torch.Tensor:
    """[R, vocab]: 0 for the tokens row r may emit next, -inf for the others (see `catalog_trie`): the tokens that
    continue its prefix to a catalog entry, and EOS (eos >= 0) where its prefix is a complete entry; a finished
    row emits only EOS."""
    mask = torch.full((tokens.shape[0], vocab), NEG_INF)
    for r in range(tokens.shape[0]):
        prefix = tuple(tokens[r].tolist())
        if finished[r]:
            mask[r, eos] = 0.0
            continue
        allowed = set(trie.get(prefix, ()))
        if eos >= 0 and prefix in complete:
            allowed.add(eos)   # a complete entry may end here, even where a longer entry continues it
        mask[r, list(allowed)] = 0.0
    return mask


def _select_beams(scores, logp, per: int, groups: int, diversity: float):
    """Per prompt and group: the top `per` (beam, token) continuations, after the Hamming diversity penalty.
    scores [P, W], logp [P, W, V] -> (source beam [P, W], token [P, W], new scores [P, W]) within each prompt."""
    n_prompts, _, vocab = logp.shape
    counts = torch.zeros(n_prompts, vocab)
    src, toks, new_scores = [], [], []
    for g in range(groups):
        rows = slice(g * per, (g + 1) * per)
        cand = (scores[:, rows, None] + logp[:, rows]) - diversity * counts[:, None, :]
        top = cand.reshape(n_prompts, -1).topk(per, dim=-1)
        # report the beam's true log-probability, not the penalized one
        beam, tok = top.indices // vocab, top.indices % vocab
        true = scores[:, rows].gather(1, beam) + logp[:, rows].reshape(n_prompts, -1).gather(1, top.indices)
        src.append(beam + g * per)
        toks.append(tok)
        new_scores.append(torch.where(torch.isfinite(top.values), true, torch.full_like(true, NEG_INF)))
        counts.scatter_add_(1, tok, torch.ones_like(tok, dtype=counts.dtype))
    return torch.cat(src, 1), torch.cat(toks, 1), torch.cat(new_scores, 1)


def _finish_beams(tokens, scores, max_new, eos, trace, per: int) -> Generation:
    width, steps = tokens.shape
    out = torch.full((width, max_new), max(eos, 0), dtype=torch.long)
    out[:, :steps] = tokens
    lengths = torch.full((width,), max_new, dtype=torch.long)
    if eos >= 0:
        is_eos = out == eos
        first = torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, torch.full_like(lengths, max_new))
        lengths = first
    order = torch.cat([g * per + torch.sort(scores[g * per:(g + 1) * per], descending=True, stable=True).indices
                       for g in range(width // per)])
    out, scores, lengths = out[order], scores[order], lengths[order]
    for g in range(0, width, per):  # fewer legal continuations than beams: repeat the group's best beam
        dead = ~torch.isfinite(scores[g:g + per])
        if dead.any():
            out[g:g + per][dead], lengths[g:g + per][dead] = out[g].clone(), lengths[g].clone()
    return Generation(out, scores, lengths, trace)
