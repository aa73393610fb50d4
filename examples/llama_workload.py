"""Workloads for lmforge's CLI built on the example Llama: `lmforge tune examples/llama_workload.py`.

- `workload()`: the decode step of the tiny Llama trained on 2-digit addition
  (examples/models/tiny_task.py). Quality (`quality`, `kl`) compares next-token distributions on held-out
  sequences at the steps that predict the answer tokens, the only ones the model was trained on (its prompt
  digits are random); `accuracy` is the exact-match accuracy of greedy decoding through the (compiled) decode
  step. Caveat: those sequences are 10 tokens long, so quality sees at most 8 cached tokens while latency is
  priced at 2048 (`serving_dims`): an attention window or KV format looks free to the quality constraint here.
  For sparsity knobs, judge quality on a long-context task (examples/models/recall_task.py, 99 tokens).
- `prefill_workload()`: the prefill of the same model (dynamic batch and sequence length); quality counts the
  answer positions (`quality_positions`).
- `random_workload(preset="5m")`: a Llama preset with random weights, for speed benchmarks only.

Importing this file is cheap: the model is trained (about 30 s, once, then cached under
cache_dir("models")) only when `workload()` or `prefill_workload()` is called.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

try:
    import examples.models.llama  # noqa: F401
except ImportError:  # loaded by file path from outside the repository root: make `examples` importable
    sys.modules.pop("examples", None)  # drop an unrelated top-level `examples`, if one was found instead
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples.models.llama import Llama, LlamaConfig, LlamaDecodeStep, LlamaPrefill  # noqa: E402
from examples.models.tiny_task import (  # noqa: E402
    ANSWER_LEN, PROMPT_LEN, accuracy, eval_token_data, load_or_train, make_problems, prefill_accuracy)
from lmforge.errors import LmforgeError  # noqa: E402
from lmforge.workload import Workload  # noqa: E402

# the positions whose next token is an answer token ("=" and the answer but its last): the ones training scores
ANSWER_POSITIONS = slice(PROMPT_LEN - 1, PROMPT_LEN + ANSWER_LEN - 1)
DECODE_DYNAMIC = {"tokens": {0: "batch"}, "k_cache": {1: "batch", 3: "past"}, "v_cache": {1: "batch", 3: "past"}}
PREFILL_DYNAMIC = {"tokens": {0: "batch", 1: "seq"}}


@torch.no_grad()
def decode_inputs(model: Llama, sequences: torch.Tensor, past_len: int) -> tuple:
    """(tokens [B, 1], k_cache, v_cache) for decoding token `past_len` of `sequences` after prefilling the rest."""
    if past_len == 0:
        k_cache, v_cache = model.empty_cache(sequences.shape[0])
    else:
        _, k_cache, v_cache = model.prefill(sequences[:, :past_len])
    return sequences[:, past_len:past_len + 1], k_cache, v_cache


def workload() -> Workload:
    """The trained tiny model's decode step: example inputs batch 2 with 7 cached positions."""
    model = load_or_train("tiny")
    sequences = eval_token_data(256)
    return Workload(
        model=LlamaDecodeStep(model),
        example_inputs=decode_inputs(model, sequences[:2], past_len=7),
        dynamic=DECODE_DYNAMIC,
        # next-token distributions of the held-out sequences from real caches, at the answer positions only:
        # the model is trained on those (tiny_task.answer_loss), its logits at the random prompt digits are noise
        eval_inputs=[decode_inputs(model, sequences[:16], past_len)
                     for past_len in range(ANSWER_POSITIONS.start, ANSWER_POSITIONS.stop)],
        checker=lambda step_fn: accuracy(step_fn, n=128, config=model.config),
        name="tiny-llama-decode",
        # the tuner predicts latency for serving 32 sequences with 2048 cached tokens each (quality is measured
        # on the real task inputs above): at that size the KV cache, not the tiny weights, sets the cost
        extras={"llama_config": model.config.to_dict(), "serving_dims": {"batch": 32, "past": 2048}},
    )


def prefill_workload() -> Workload:
    """The trained tiny model's prefill: example input 2 prompts of 6 tokens, batch and seq dynamic."""
    model = load_or_train("tiny")
    prompts, _ = make_problems(64, seed=99)
    sequences = eval_token_data(256)
    return Workload(
        model=LlamaPrefill(model),
        example_inputs=(prompts[:2],),
        dynamic=PREFILL_DYNAMIC,
        eval_inputs=[(prompts[i:i + 16],) for i in range(0, 64, 16)] + [(sequences[:16],)],
        checker=lambda prefill_fn: prefill_accuracy(prefill_fn, n=128),
        quality_positions=ANSWER_POSITIONS,  # the prompts' last position; the sequences' answer positions
        name="tiny-llama-prefill",
        extras={"llama_config": model.config.to_dict(), "prompt_len": PROMPT_LEN},
    )


def random_workload(preset: str = "5m", phase: str = "decode", seed: int = 0) -> Workload:
    """A preset with seeded random weights (speed benchmarks; no quality checker). phase: decode | prefill."""
    config = LlamaConfig.preset(preset)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Llama(config).eval()
        tokens = torch.randint(0, config.vocab_size, (4, 16))
    if phase == "decode":
        return Workload(
            model=LlamaDecodeStep(model),
            example_inputs=decode_inputs(model, tokens[:2], past_len=7),
            dynamic=DECODE_DYNAMIC,
            eval_inputs=[decode_inputs(model, tokens, past_len) for past_len in (1, 8, 15)],
            name=f"random-llama-{preset}-decode",
            extras={"llama_config": config.to_dict()},
        )
    if phase == "prefill":
        return Workload(
            model=LlamaPrefill(model),
            example_inputs=(tokens[:2, :8],),
            dynamic=PREFILL_DYNAMIC,
            eval_inputs=[(tokens,), (tokens[:1, :5],)],
            name=f"random-llama-{preset}-prefill",
            extras={"llama_config": config.to_dict()},
        )
    raise LmforgeError(f"random_workload phase must be 'decode' or 'prefill', got {phase!r}")
