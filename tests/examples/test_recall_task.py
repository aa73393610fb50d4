"""The associative-recall task: format, held-out split, trainer, and block top-k decode attention judged on it.

The first run trains the recall model (CPU, about a minute and a half on two threads) and caches it under
cache_dir("models"); later runs load it. The sparse checks run the decode step through lmforge's passes and
its compiled graph on 128 held-out prompts (dense prefill, sparse decode).
"""
import json

import pytest
import torch

from examples.models import recall_task
from examples.models.llama import Llama, LlamaDecodeStep, LlamaPrefill
from examples.models.recall_task import (
    ANSWER_LEN, BOS, EOS, N_KEYS, N_PAIRS, N_VALUES, PROMPT_LEN, SEP, accuracy, decode_graph, is_held_out,
    make_problems, prompt_len, sparse_accuracy, train, training_batch)
from lmforge.errors import LmforgeError
from lmforge.ir.ops.sparse_attention_ops import kept_keys

# Decode-attention knobs at 1/4 of the 99-token context (24 tokens attended, counted as the cost model does).
# Quest's min/max summary with blocks of 2 tokens; blocks of 4 or more lose 20+ points at this context length
# (docs/benchmarks.md, the recall table).
BLOCK_TOPK_QUARTER = {"attn.decode_pattern": "block_topk", "attn.block_size": 2, "attn.topk_blocks": 10,
                      "attn.decode_window": 2, "attn.sinks": 0, "attn.summary": "minmax"}
WINDOW_QUARTER = {"attn.decode_pattern": "window", "attn.decode_window": 20, "attn.sinks": 4}


def pairs_of(prompt: list[int]) -> list[tuple[int, int, int]]:
    return [tuple(prompt[i:i + 3]) for i in range(1, len(prompt) - 2, 3)]


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_prompt_format(split):
    """BOS, N (key, a, b) triples with distinct keys, SEP, a query key; the answer is its a, b, then EOS."""
    prompts, answers = make_problems(200, seed=3, split=split)
    assert prompts.shape == (200, PROMPT_LEN) and answers.shape == (200, ANSWER_LEN)
    assert PROMPT_LEN == prompt_len(N_PAIRS) == 3 * N_PAIRS + 3
    asked_at = set()
    for prompt, answer in zip(prompts.tolist(), answers.tolist()):
        assert prompt[0] == BOS and prompt[-2] == SEP
        pairs = pairs_of(prompt)
        keys = [k for k, _, _ in pairs]
        assert len(pairs) == N_PAIRS and len(set(keys)) == N_PAIRS and all(0 <= k < N_KEYS for k in keys)
        assert all(N_KEYS <= x < N_KEYS + N_VALUES for _, a, b in pairs for x in (a, b))
        query = prompt[-1]
        assert query in keys
        assert tuple(answer) == (*pairs[keys.index(query)][1:], EOS)
        asked_at.add(keys.index(query))
    assert len(asked_at) > N_PAIRS // 2  # the queried pair may sit anywhere in the context


def test_held_out_split():
    """Held-out prompts ask only for held-out (key, a, b) triples; training data contains none at all."""
    keys, a, b = torch.meshgrid(torch.arange(N_KEYS), torch.arange(N_KEYS, N_KEYS + N_VALUES),
                                torch.arange(N_KEYS, N_KEYS + N_VALUES), indexing="ij")
    assert 0.03 < is_held_out(keys, a, b).float().mean() < 0.1
    prompts, answers = make_problems(256, seed=1234, split="heldout")
    assert is_held_out(prompts[:, -1], answers[:, 0], answers[:, 1]).all()
    inputs, targets = training_batch(256, N_PAIRS, 8, torch.Generator().manual_seed(0))
    triples = inputs[:, 1:1 + 3 * N_PAIRS].reshape(256, N_PAIRS, 3)
    assert not is_held_out(triples[..., 0], triples[..., 1], triples[..., 2]).any()
    train_prompts, _ = make_problems(256, seed=1234, split="train")
    assert not torch.equal(train_prompts, prompts)


def test_training_batch_asks_several_pairs_of_one_prompt():
    inputs, targets = training_batch(16, 5, 3, torch.Generator().manual_seed(1))
    length = prompt_len(5)
    assert inputs.shape == targets.shape == (16, length + 4 * 3 - 1 - 1)
    for seq, tgt in zip(inputs.tolist(), targets.tolist()):
        pairs = {k: (a, b) for k, a, b in pairs_of(seq[:length])}
        full = seq + [tgt[-1]]
        asked = [seq[length - 1]] + full[length + 3::4]
        assert len(set(asked)) == 3
        for j, key in enumerate(asked):
            start = length - 1 + 4 * j     # position of the query key; it predicts a, then b, then EOS
            assert tgt[start:start + 3] == [*pairs[key], EOS]
        assert sum(t != -100 for t in tgt) == 3 * 3


def test_trainer_is_deterministic_and_checks_its_config():
    cfg = recall_task.CONFIGS["recall"]
    kwargs = dict(steps=3, seed=2, batch_size=8, min_pairs=4, max_pairs=6)
    first, second = train(cfg, **kwargs), train(cfg, **kwargs)
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[name]), name
    with pytest.raises(LmforgeError, match="vocab_size"):
        train(recall_task.LlamaConfig.preset("tiny"), steps=1)
    with pytest.raises(LmforgeError, match="split"):
        make_problems(4, seed=0, split="test")
    with pytest.raises(LmforgeError, match="no training recipe"):
        recall_task.load_or_train("nope")


@pytest.fixture(scope="module")
def trained():
    return recall_task.load_or_train()


def test_trained_model_retrieves_on_held_out_prompts(trained):
    """>= 95% exact match with dense attention; the cached info records what training reached."""
    assert accuracy(LlamaDecodeStep(trained), n=256) >= 0.95
    info = json.loads(recall_task.cache_stem().with_suffix(".json").read_text())
    assert info["heldout_accuracy_512"] >= 0.95 and info["config"] == trained.config.to_dict()
    torch.manual_seed(0)
    assert accuracy(LlamaDecodeStep(Llama(trained.config).eval()), n=64) < 0.1  # untrained: chance


def test_accuracy_prefill_paths_agree(trained):
    """Dense prefill by any callable (or none: the prompt fed token by token) gives the same answers."""
    step = LlamaDecodeStep(trained)
    default = accuracy(step, n=64, seed=5)
    assert accuracy(step, n=64, seed=5, prefill_fn=LlamaPrefill(trained)) == default
    assert accuracy(lambda *a: step(*a), n=64, seed=5, config=trained.config) == default
    with pytest.raises(LmforgeError, match="prefill_fn"):
        accuracy(lambda *a: step(*a), n=4)


def test_budgets_are_a_quarter_of_the_context():
    assert kept_keys(PROMPT_LEN, 2, 10, 0, 2) <= PROMPT_LEN / 4
    assert WINDOW_QUARTER["attn.decode_window"] + WINDOW_QUARTER["attn.sinks"] <= PROMPT_LEN / 4


@pytest.fixture(scope="module")
def sparse_results(trained):
    graph = decode_graph(trained)
    return {name: sparse_accuracy(trained, knobs, n=128, graph=graph)
            for name, knobs in [("dense", {}), ("block_topk", BLOCK_TOPK_QUARTER), ("window", WINDOW_QUARTER)]}


def test_compiled_dense_decode_matches_eager(trained, sparse_results):
    assert sparse_results["dense"] == accuracy(LlamaDecodeStep(trained), n=128)


def test_block_topk_at_a_quarter_budget_keeps_accuracy(sparse_results):
    """Issue #4: block top-k at 1/4 of the context stays within 2 points of dense decode attention."""
    assert sparse_results["block_topk"] >= sparse_results["dense"] - 0.02


def test_window_at_the_same_budget_fails(sparse_results):
    """A local window + sinks of the same size cannot see most pairs: the task needs retrieval."""
    assert sparse_results["window"] < sparse_results["dense"] - 0.5
