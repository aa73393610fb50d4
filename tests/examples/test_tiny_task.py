"""The addition task, its deterministic trainer, the cached trained model, and the example workload.

The first run trains the tiny model (about 30 s on two CPU threads) and caches it under
cache_dir("models"); later runs load it.
"""
import json
import time

import pytest
import torch
from safetensors.torch import save_file
from torch.export import Dim, export

from examples.models import tiny_task
from examples.models.llama import Llama, LlamaConfig, LlamaDecodeStep, LlamaPrefill
from examples.models.tiny_task import (
    ANSWER_LEN, EOS, EQUALS, N_DIGITS, PLUS, PROMPT_LEN, TrainRecipe, accuracy, encode, eval_token_data,
    is_held_out, load_cached, load_or_train, make_problems, prefill_accuracy, recipe_hash, sample_operands, train)
from lmforge.cache import cache_dir
from lmforge.errors import LmforgeError
from lmforge.workload import Workload


def decode_number(tokens) -> int:
    return int("".join(str(int(t)) for t in tokens))


@pytest.mark.parametrize("a,b,prompt,answer", [
    (47, 8, "47+08=", "550"),
    (0, 0, "00+00=", "000"),
    (99, 99, "99+99=", "891"),
    (50, 50, "50+50=", "001"),
])
def test_encode_format(a, b, prompt, answer):
    """Prompt "aa+bb=" with zero-padded operands; answer = sum digits least significant first, then EOS."""
    symbols = {PLUS: "+", EQUALS: "="}
    prompts, answers = encode(torch.tensor([a]), torch.tensor([b]))
    assert "".join(symbols.get(int(t), str(int(t))) for t in prompts[0]) == prompt
    assert "".join(str(int(t)) for t in answers[0, :-1]) == answer
    assert int(answers[0, -1]) == EOS


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_problems_are_correct_sums(split):
    prompts, answers = make_problems(300, seed=7, split=split)
    assert prompts.shape == (300, PROMPT_LEN) and answers.shape == (300, ANSWER_LEN)
    for prompt, answer in zip(prompts.tolist(), answers.tolist()):
        a, b = decode_number(prompt[:N_DIGITS]), decode_number(prompt[N_DIGITS + 1:2 * N_DIGITS + 1])
        assert decode_number(reversed(answer[:-1])) == a + b


def test_held_out_pairs_never_appear_in_training_stream():
    all_a, all_b = torch.meshgrid(torch.arange(10 ** N_DIGITS), torch.arange(10 ** N_DIGITS), indexing="ij")
    held = is_held_out(all_a.flatten(), all_b.flatten())
    assert 0.03 < held.float().mean() < 0.1       # a real, non-trivial held-out set
    train_a, train_b = sample_operands(20_000, torch.Generator().manual_seed(0), "train")
    assert not is_held_out(train_a, train_b).any()
    assert len(set(zip(train_a.tolist(), train_b.tolist()))) > 5000  # the stream covers the training pairs
    prompts, _ = make_problems(512, seed=1234, split="heldout")
    heldout_pairs = {(decode_number(p[:N_DIGITS]), decode_number(p[N_DIGITS + 1:2 * N_DIGITS + 1]))
                     for p in prompts.tolist()}
    assert heldout_pairs.isdisjoint(zip(train_a.tolist(), train_b.tolist()))
    tokens = eval_token_data(64)
    assert is_held_out(torch.tensor([decode_number(t[:N_DIGITS]) for t in tokens.tolist()]),
                       torch.tensor([decode_number(t[N_DIGITS + 1:2 * N_DIGITS + 1]) for t in tokens.tolist()])).all()


def test_eval_token_data_is_prompt_plus_answer():
    tokens = eval_token_data(32, seed=5)
    prompts, answers = make_problems(32, seed=5, split="heldout")
    assert torch.equal(tokens, torch.cat((prompts, answers), dim=1))


def test_trainer_is_deterministic():
    cfg = LlamaConfig.preset("tiny")
    first, second = train(cfg, steps=20, seed=3, batch_size=32), train(cfg, steps=20, seed=3, batch_size=32)
    other_seed = train(cfg, steps=20, seed=4, batch_size=32)
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[name]), name
    assert not torch.equal(first.output.weight, other_seed.output.weight)


def test_trainer_rejects_a_config_that_does_not_fit_the_task():
    with pytest.raises(LmforgeError, match="vocab_size"):
        train(LlamaConfig.preset("5m"), steps=1)
    with pytest.raises(LmforgeError, match="no training recipe"):
        load_or_train("100m")
    with pytest.raises(LmforgeError, match="split"):
        make_problems(4, seed=0, split="test")


def test_recipe_hash_covers_config_recipe_and_version(monkeypatch):
    cfg, recipe = LlamaConfig.preset("tiny"), TrainRecipe(steps=1000, batch_size=128)
    base = recipe_hash(cfg, recipe)
    assert recipe_hash(LlamaConfig.preset("tiny", dim=32), recipe) != base
    assert recipe_hash(cfg, TrainRecipe(steps=999, batch_size=128)) != base
    monkeypatch.setattr(tiny_task, "RECIPE_VERSION", "something-else")
    assert recipe_hash(cfg, recipe) != base


@pytest.fixture(scope="module")
def trained():
    return load_or_train("tiny")


def test_trained_model_solves_held_out_problems(trained):
    assert accuracy(LlamaDecodeStep(trained), n=512) >= 0.95
    assert prefill_accuracy(LlamaPrefill(trained), n=128) >= 0.95


def test_untrained_model_fails_the_checker():
    torch.manual_seed(0)
    assert accuracy(LlamaDecodeStep(Llama(LlamaConfig.preset("tiny")).eval()), n=128) < 0.2


def test_cached_model_loads_fast_and_identically(trained):
    start = time.perf_counter()
    again = load_or_train("tiny")
    assert time.perf_counter() - start < 1.0
    for name, tensor in trained.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name
    cfg = LlamaConfig.preset("tiny")
    stem = cache_dir("models") / f"tiny_task-{recipe_hash(cfg, tiny_task.RECIPES['tiny'])}"
    info = json.loads(stem.with_suffix(".json").read_text())
    assert info["config"] == cfg.to_dict() and info["heldout_accuracy_512"] >= 0.95
    weights = stem.with_suffix(".safetensors").read_bytes()
    header_len = int.from_bytes(weights[:8], "little")  # safetensors: u64 header length, then a JSON header
    assert set(json.loads(weights[8:8 + header_len])) >= {"output.weight", "tok_embeddings.weight"}


def test_unreadable_cache_is_ignored(trained, tmp_path):
    """A missing or corrupt cache entry reads as absent (load_or_train then retrains), a good one loads."""
    cfg, stem = LlamaConfig.preset("tiny"), tmp_path / "tiny_task-test"
    assert load_cached(cfg, stem) is None
    stem.with_suffix(".json").write_text("{}")
    stem.with_suffix(".safetensors").write_bytes(b"not a safetensors file")
    assert load_cached(cfg, stem) is None
    save_file(trained.state_dict(), str(stem.with_suffix(".safetensors")))
    assert torch.equal(load_cached(cfg, stem).output.weight, trained.output.weight)


def test_workload_convention(trained):
    import examples.llama_workload as llama_workload

    work = llama_workload.workload()
    assert isinstance(work, Workload) and work.name == "tiny-llama-decode"
    tokens, k_cache, v_cache = work.example_inputs
    assert tokens.shape == (2, 1) and k_cache.shape[1] == 2 and k_cache.shape[3] == 7
    assert work.dynamic == {"tokens": {0: "batch"}, "k_cache": {1: "batch", 3: "past"},
                            "v_cache": {1: "batch", 3: "past"}}
    assert work.checker(work.model) >= 0.95
    # the dynamic spec, turned into torch.export Dims, captures the step; the export passes the checker
    dims = {}
    dynamic_shapes = {name: {axis: dims.setdefault(sym, Dim(sym, min=0 if sym == "past" else 1, max=1024))
                             for axis, sym in spec.items()} for name, spec in work.dynamic.items()}
    exported = export(work.model, work.example_inputs, dynamic_shapes=dynamic_shapes).module()
    assert work.checker(exported) >= 0.95
    for inputs in work.eval_inputs:
        with torch.no_grad():
            torch.testing.assert_close(exported(*inputs)[0], work.model(*inputs)[0], atol=1e-5, rtol=1e-5)
    # quality looks only at the steps that predict answer tokens: the model is trained on those alone
    answer_steps = list(range(PROMPT_LEN - 1, PROMPT_LEN + ANSWER_LEN - 1))
    assert [k_cache.shape[3] for _, k_cache, _ in work.eval_inputs] == answer_steps
    assert work.token_data is None, "a deprecated field that nothing reads"


def test_prefill_and_random_workloads(trained):
    import examples.llama_workload as llama_workload

    prefill = llama_workload.prefill_workload()
    assert prefill.checker(prefill.model) >= 0.95
    assert prefill.quality_positions == slice(PROMPT_LEN - 1, PROMPT_LEN + ANSWER_LEN - 1)
    assert prefill.dynamic == {"tokens": {0: "batch", 1: "seq"}}
    random = llama_workload.random_workload("5m")
    logits, k_cache, _ = random.model(*random.example_inputs)
    assert logits.shape == (2, 1, LlamaConfig.preset("5m").vocab_size) and k_cache.shape[3] == 8
    assert torch.equal(logits, llama_workload.random_workload("5m").model(*random.example_inputs)[0])
    prefill_random = llama_workload.random_workload("5m", phase="prefill")
    assert prefill_random.model(*prefill_random.example_inputs)[0].shape == (2, 8, 4096)
    with pytest.raises(LmforgeError, match="phase"):
        llama_workload.random_workload("5m", phase="train")
