"""Fixtures shared by the export tests: a small random-weight Llama, compiled for prefill and decode step.

Compiling captures with torch.export (a second or two each), so the compiled models are built once per session.
"""
import pytest
import torch

from examples.models.llama import Llama, LlamaConfig, LlamaDecodeStep, LlamaPrefill

PREFILL_DYNAMIC = {"tokens": {0: "batch", 1: "seq"}}
DECODE_DYNAMIC = {"tokens": {0: "batch"}, "k_cache": {1: "batch", 3: "past"}, "v_cache": {1: "batch", 3: "past"}}


@pytest.fixture(scope="session")
def llama():
    """A 2-layer GQA Llama (4 query heads, 2 KV heads) with seeded random weights."""
    cfg = LlamaConfig(vocab_size=37, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Llama(cfg).eval()


def tokens(cfg, batch, seq, seed):
    return torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


def decode_inputs(model, batch, past, seed):
    """(tokens [B, 1], k_cache, v_cache) after a real prefill of `past` random tokens."""
    cfg = model.config
    if past == 0:
        k, v = model.empty_cache(batch)
    else:
        with torch.no_grad():
            _, k, v = model.prefill(tokens(cfg, batch, past, seed + 100))
    return tokens(cfg, batch, 1, seed), k, v


@pytest.fixture(scope="session")
def prefill_compiled(llama):
    import lmforge

    return lmforge.compile(LlamaPrefill(llama), (tokens(llama.config, 2, 5, 0),), dynamic=PREFILL_DYNAMIC)


@pytest.fixture(scope="session")
def decode_compiled(llama):
    import lmforge

    return lmforge.compile(LlamaDecodeStep(llama), decode_inputs(llama, 2, 4, 0), dynamic=DECODE_DYNAMIC)


@pytest.fixture(scope="session")
def make_tokens(llama):
    """make_tokens(batch, seq, seed) -> random token ids [batch, seq] for the fixture Llama."""
    return lambda batch, seq, seed: tokens(llama.config, batch, seq, seed)


@pytest.fixture(scope="session")
def make_decode_inputs(llama):
    """make_decode_inputs(batch, past, seed) -> (tokens, k_cache, v_cache) with a real `past`-token cache."""
    return lambda batch, past, seed: decode_inputs(llama, batch, past, seed)
