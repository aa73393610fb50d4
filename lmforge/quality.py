"""Quality of a transformed model against the original, measured on given inputs.

    report = lmforge.quality.compare(original, transformed, inputs)
    report.top1_agreement, report.kl, report.max_rel_err

`original` and `transformed` are callables with the model's signature (a torch module, a CompiledModel).
The logits are the first tensor output (or the one `logits_index` picks), floating point with the vocabulary as
their last dimension (anything else is an LmforgeError, not a silent score), and the next-token distribution is
their softmax over the last dimension. Logits masked with -inf (a banned token) count: KL takes 0 * log 0 as 0,
and the relative error compares the finite entries once the infinite ones agree. Perplexity needs a callable that
maps tokens [n, L] to logits [n, L, V] (a prefill model) and held-out token data; task accuracy needs a checker.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch
import torch.utils._pytree as pytree

from lmforge.errors import LmforgeError


@dataclass(frozen=True)
class QualityReport:
    max_rel_err: float          # max over outputs of ||new - ref|| / ||ref|| (per output tensor)
    mean_rel_err: float         # mean over outputs and inputs of the same
    kl: float                   # mean KL(p_ref || p_new) of next-token distributions
    top1_agreement: float       # fraction of positions whose argmax token agrees
    ppl_ref: float | None = None
    ppl_new: float | None = None
    task_acc_ref: float | None = None
    task_acc_new: float | None = None
    n_positions: int = 0

    @property
    def ppl_delta(self) -> float | None:
        return None if self.ppl_ref is None else self.ppl_new - self.ppl_ref

    @property
    def task_acc_delta(self) -> float | None:
        return None if self.task_acc_ref is None else self.task_acc_new - self.task_acc_ref

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(ppl_delta=self.ppl_delta, task_acc_delta=self.task_acc_delta)
        return d


def logits_of(out, index: int) -> torch.Tensor:
    """The tensor output `index` of a model's outputs, checked to be logits: floating point, vocabulary last."""
    leaves = [x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]
    outputs = ", ".join(f"{i}: {str(x.dtype).replace('torch.', '')} {tuple(x.shape)}" for i, x in enumerate(leaves))
    if not -len(leaves) <= index < len(leaves):
        raise LmforgeError(f"logits_index={index}, but the model has {len(leaves)} tensor output(s) ({outputs}): "
                           "set logits_index (Workload.logits_index) to the position of the logits among them")
    logits = leaves[index]
    if not logits.is_floating_point() or logits.dim() == 0 or logits.shape[-1] < 2:
        raise LmforgeError(f"tensor output {index} of the model is {str(logits.dtype).replace('torch.', '')} "
                           f"{tuple(logits.shape)}, not logits (floating point, [..., vocab] with vocab >= 2), so "
                           f"next-token agreement and KL would mean nothing (the model's tensor outputs: {outputs}): "
                           "set logits_index (Workload.logits_index) to the position of the logits")
    return logits


def rel_err(new: torch.Tensor, ref: torch.Tensor) -> float:
    """||new - ref|| / ||ref|| over the finite entries (||new - ref|| when ref is 0 there). Entries where either is
    inf or NaN must hold the same value in both (a logit masked with -inf in both agrees); else the error is inf."""
    ref, new = ref.double(), new.double()
    finite = torch.isfinite(ref) & torch.isfinite(new)
    if not finite.all():
        same = (ref == new) | (ref.isnan() & new.isnan())
        if not same[~finite].all():
            return math.inf
        ref, new = ref[finite], new[finite]
    denom = ref.norm().item()
    return (new - ref).norm().item() / denom if denom > 0 else (new - ref).norm().item()


def kl_divergence(ref_logits: torch.Tensor, new_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_ref || p_new) per position, over the last dimension. A token with p_ref = 0 (logit -inf) adds 0, as
    0 * log 0 = 0; one that the new model gives probability 0 but the reference does not makes KL inf."""
    lp = torch.log_softmax(ref_logits.double(), -1)
    lq = torch.log_softmax(new_logits.double(), -1)
    p = lp.exp()
    return torch.where(p > 0, p * (lp - lq), torch.zeros_like(p)).sum(-1)


def perplexity(model: Callable, token_data: torch.Tensor, logits_index: int = 0, batch: int = 64) -> float:
    """exp(mean next-token cross-entropy) of `model(tokens) -> logits [n, L, V]` on token_data [n, L]."""
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, token_data.shape[0], batch):
            toks = token_data[i:i + batch]
            logits = logits_of(model(toks), logits_index)[:, :-1]
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(),
                                                    toks[:, 1:].reshape(-1), reduction="sum")
            total += nll.item()
            count += toks[:, 1:].numel()
    return math.exp(total / max(count, 1))


def compare(original: Callable, transformed: Callable, inputs: Sequence[tuple], *, logits_index: int = 0,
            token_data: torch.Tensor | None = None, ppl_model: tuple[Callable, Callable] | None = None,
            checker: Callable[[Callable], float] | None = None,
            positions: slice | torch.Tensor | None = None) -> QualityReport:
    """Run both on every input tuple and compare outputs and next-token distributions.

    ppl_model: optional (original_prefill, transformed_prefill) callables for perplexity on token_data
    (default: the models themselves, when they map tokens to logits).
    positions: which sequence positions count for KL and top-1 (a slice over dim -2 of the logits, or a
    bool mask of the logits' leading shape), e.g. only the answer positions of a task whose prompt tokens
    are random and so have no meaningful "next token".
    inputs must not be empty: there is nothing to compare on (an LmforgeError, not agreement 0 with KL 0).
    """
    if len(inputs) == 0:
        raise LmforgeError("quality.compare got no inputs, so there is nothing to compare: give at least one input "
                           "tuple (a workload's eval_inputs, or its example_inputs)")
    errs, kls, agree, n_pos = [], [], 0, 0
    with torch.no_grad():
        for args in inputs:
            ref_out, new_out = original(*args), transformed(*args)
            ref_leaves = [x for x in pytree.tree_leaves(ref_out) if isinstance(x, torch.Tensor)]
            new_leaves = [x for x in pytree.tree_leaves(new_out) if isinstance(x, torch.Tensor)]
            errs += [rel_err(n, r) for n, r in zip(new_leaves, ref_leaves) if r.is_floating_point()]
            ref_l, new_l = logits_of(ref_out, logits_index), logits_of(new_out, logits_index)
            if isinstance(positions, slice):
                ref_l, new_l = ref_l[..., positions, :], new_l[..., positions, :]
            elif positions is not None:
                ref_l, new_l = ref_l[positions], new_l[positions]
            kls.append(kl_divergence(ref_l, new_l).reshape(-1))
            agree += (ref_l.argmax(-1) == new_l.argmax(-1)).sum().item()
            n_pos += ref_l[..., 0].numel()
    if n_pos == 0:
        raise LmforgeError(f"positions={positions!r} select no logits of the inputs' outputs: choose sequence "
                           "positions that exist (a slice over dim -2 of the logits, or a bool mask of their "
                           "leading shape)")
    kl = torch.cat(kls).mean().item()
    ppl_ref = ppl_new = acc_ref = acc_new = None
    if token_data is not None:
        ref_m, new_m = ppl_model or (original, transformed)
        ppl_ref, ppl_new = perplexity(ref_m, token_data, logits_index), perplexity(new_m, token_data, logits_index)
    if checker is not None:
        acc_ref, acc_new = float(checker(original)), float(checker(transformed))
    return QualityReport(max(errs, default=0.0), sum(errs) / max(len(errs), 1), kl, agree / max(n_pos, 1),
                         ppl_ref, ppl_new, acc_ref, acc_new, n_pos)
