"""The example Llama: cache-consistent prefill/decode, GQA shapes, presets, greedy decoding, torch.export."""
import pytest
import torch
from torch.export import Dim, export

from examples.models.llama import (
    PRESETS, Llama, LlamaConfig, LlamaDecodeStep, LlamaPrefill, apply_rope, greedy_generate)
from lmforge.errors import LmforgeError

ATOL = 1e-5

# (n_heads, n_kv_heads): multi-head, grouped-query and multi-query attention
HEAD_LAYOUTS = [(4, 4), (4, 2), (4, 1)]


def small_config(n_heads=4, n_kv_heads=2, **overrides) -> LlamaConfig:
    fields = dict(vocab_size=37, dim=32, n_layers=2, n_heads=n_heads, n_kv_heads=n_kv_heads, ffn_dim=48,
                  max_seq_len=64)
    return LlamaConfig(**{**fields, **overrides})


def seeded_model(cfg: LlamaConfig, seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    return Llama(cfg).eval()


def random_tokens(cfg: LlamaConfig, batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n_heads,n_kv_heads", HEAD_LAYOUTS)
def test_prefill_logits_equal_forward(n_heads, n_kv_heads):
    cfg = small_config(n_heads, n_kv_heads)
    model = seeded_model(cfg)
    tokens = random_tokens(cfg, batch=3, seq=11)
    with torch.no_grad():
        logits, k_cache, v_cache = model.prefill(tokens)
        torch.testing.assert_close(logits, model(tokens), atol=ATOL, rtol=0)
    assert logits.shape == (3, 11, cfg.vocab_size)
    expected = (cfg.n_layers, 3, n_kv_heads, 11, cfg.dim // n_heads)
    assert k_cache.shape == expected and v_cache.shape == expected


@pytest.mark.parametrize("prefill_len", [0, 4])
def test_decode_step_refuses_several_new_tokens(prefill_len):
    """A decode step has no causal mask among its new tokens: two at once would let the first see the second."""
    cfg = small_config()
    model = seeded_model(cfg)
    tokens = random_tokens(cfg, batch=1, seq=6)
    with torch.no_grad():
        k_cache, v_cache = model.prefill(tokens[:, :prefill_len])[1:] if prefill_len else model.empty_cache(1)
        with pytest.raises(LmforgeError, match=r"one new token per sequence .*shape \(1, 2\).*prefill"):
            model.decode_step(tokens[:, prefill_len:prefill_len + 2], k_cache, v_cache)


@pytest.mark.parametrize("n_heads,n_kv_heads", HEAD_LAYOUTS)
@pytest.mark.parametrize("prefill_len", [0, 1, 6])
def test_prefill_then_decode_matches_forward(n_heads, n_kv_heads, prefill_len):
    """Decoding token by token through the KV cache gives the logits of one full causal forward."""
    cfg = small_config(n_heads, n_kv_heads)
    model = seeded_model(cfg)
    tokens = random_tokens(cfg, batch=2, seq=10)
    with torch.no_grad():
        reference = model(tokens)
        if prefill_len:
            first, k_cache, v_cache = model.prefill(tokens[:, :prefill_len])
            steps = [first]
        else:
            k_cache, v_cache = model.empty_cache(2)
            steps = []
        for pos in range(prefill_len, tokens.shape[1]):
            logits, k_cache, v_cache = model.decode_step(tokens[:, pos:pos + 1], k_cache, v_cache)
            assert logits.shape == (2, 1, cfg.vocab_size)
            assert k_cache.shape == (cfg.n_layers, 2, n_kv_heads, pos + 1, cfg.head_dim)
            steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), reference, atol=ATOL, rtol=0)


def test_rope_matches_complex_rotation():
    """apply_rope rotates each (i, i + D/2) pair by position * inv_freq[i], as a complex multiply would."""
    cfg = small_config()
    model = seeded_model(cfg)
    x = torch.randn(2, 3, 5, cfg.head_dim, generator=torch.Generator().manual_seed(3))
    cos, sin = model.rope_tables(4, 5, torch.float32)
    half = cfg.head_dim // 2
    angles = (torch.arange(5, dtype=torch.float32) + 4)[:, None] * model.inv_freq[None, :]
    rotated = torch.complex(x[..., :half], x[..., half:]) * torch.polar(torch.ones_like(angles), angles)
    torch.testing.assert_close(apply_rope(x, cos, sin), torch.cat((rotated.real, rotated.imag), dim=-1))


def test_attention_is_causal():
    """Changing a later token leaves the logits of earlier positions unchanged."""
    cfg = small_config()
    model = seeded_model(cfg)
    tokens = random_tokens(cfg, batch=1, seq=8)
    changed = tokens.clone()
    changed[0, 5] = (changed[0, 5] + 1) % cfg.vocab_size
    with torch.no_grad():
        torch.testing.assert_close(model(tokens)[:, :5], model(changed)[:, :5], atol=ATOL, rtol=0)
        assert not torch.allclose(model(tokens)[:, 5:], model(changed)[:, 5:], atol=1e-4)


@pytest.mark.parametrize("n_heads,n_kv_heads", HEAD_LAYOUTS)
def test_n_params_counts_the_built_model(n_heads, n_kv_heads):
    cfg = small_config(n_heads, n_kv_heads)
    assert cfg.n_params() == sum(p.numel() for p in Llama(cfg).parameters())


@pytest.mark.parametrize("preset,low,high", [("tiny", 10_000, 3_000_000), ("5m", 4_000_000, 7_000_000),
                                             ("100m", 100_000_000, 200_000_000)])
def test_preset_sizes(preset, low, high):
    cfg = LlamaConfig.preset(preset)
    assert low <= cfg.n_params() <= high
    assert cfg.n_kv_heads < cfg.n_heads  # every preset exercises GQA


def test_config_errors():
    with pytest.raises(LmforgeError, match="unknown Llama preset"):
        LlamaConfig.preset("7b")
    with pytest.raises(LmforgeError, match="divisible"):
        small_config(n_heads=4, n_kv_heads=3)
    assert set(PRESETS) >= {"tiny", "5m", "100m"}


def test_greedy_generate_matches_uncached_argmax():
    """greedy_generate through the decode step == re-running the full forward and taking the argmax."""
    cfg = small_config()
    model = seeded_model(cfg)
    prompt = random_tokens(cfg, batch=3, seq=5)
    generated = greedy_generate(LlamaDecodeStep(model), prompt, max_new_tokens=6)
    sequence = prompt
    with torch.no_grad():
        for _ in range(6):
            sequence = torch.cat((sequence, model(sequence)[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(generated, sequence[:, 5:])


def counting_step(tokens, k_cache, v_cache, vocab=10):
    """A scripted decode step whose greedy next token is (token + 1) % vocab; the cache counts steps."""
    logits = torch.nn.functional.one_hot((tokens + 1) % vocab, vocab).float()
    step = torch.zeros(k_cache.shape[:3] + (1,) + k_cache.shape[4:])
    return logits, torch.cat((k_cache, step), dim=3), torch.cat((v_cache, step), dim=3)


def counting_cache(batch):
    return torch.zeros(1, batch, 1, 0, 1), torch.zeros(1, batch, 1, 0, 1)


@pytest.mark.parametrize("eos_id,expected", [
    (None, [[3, 4, 5, 6, 7], [8, 9, 0, 1, 2]]),
    (5, [[3, 4, 5, 5, 5], [8, 9, 0, 1, 2]]),   # row 0 stops at 5; row 1 never meets it
    (9, [[3, 4, 5, 6, 7], [8, 9, 9, 9, 9]]),
])
def test_greedy_generate_feeds_prompt_then_argmax_and_holds_eos(eos_id, expected):
    prompt = torch.tensor([[0, 1, 2], [5, 6, 7]])
    generated = greedy_generate(counting_step, prompt, 5, eos_id=eos_id, empty_cache=counting_cache)
    assert generated.tolist() == expected


def test_greedy_generate_needs_a_cache_maker():
    cfg = small_config()
    model = seeded_model(cfg)
    with pytest.raises(TypeError, match="empty_cache"):
        greedy_generate(model.decode_step, random_tokens(cfg, 1, 2), 2)
    out = greedy_generate(model.decode_step, random_tokens(cfg, 1, 2), 2, empty_cache=cfg.empty_cache)
    assert out.shape == (1, 2)


@pytest.fixture(scope="module")
def export_model():
    cfg = small_config(n_heads=4, n_kv_heads=2)
    return seeded_model(cfg, seed=5)


def test_export_decode_step_with_dynamic_batch_and_past(export_model):
    cfg = export_model.config
    batch, past = Dim("batch", min=1, max=64), Dim("past", min=0, max=cfg.max_seq_len - 1)
    with torch.no_grad():
        _, k_cache, v_cache = export_model.prefill(random_tokens(cfg, 2, 7))
    example = (random_tokens(cfg, 2, 1), k_cache, v_cache)
    program = export(LlamaDecodeStep(export_model), example,
                     dynamic_shapes={"tokens": {0: batch}, "k_cache": {1: batch, 3: past},
                                     "v_cache": {1: batch, 3: past}})
    exported = program.module()
    for new_batch, new_past in [(1, 0), (3, 1), (5, 12)]:
        generator = torch.Generator().manual_seed(new_batch * 100 + new_past)
        cache_shape = (cfg.n_layers, new_batch, cfg.n_kv_heads, new_past, cfg.head_dim)
        inputs = (torch.randint(0, cfg.vocab_size, (new_batch, 1), generator=generator),
                  torch.randn(cache_shape, generator=generator), torch.randn(cache_shape, generator=generator))
        with torch.no_grad():
            expected = export_model.decode_step(*inputs)
            got = exported(*inputs)
        for e, g in zip(expected, got):
            assert g.shape == e.shape
            torch.testing.assert_close(g, e, atol=ATOL, rtol=1e-5)
    # the exported step also drives generation end to end from an empty cache
    prompt = random_tokens(cfg, 3, 4)
    eager_ids = greedy_generate(LlamaDecodeStep(export_model), prompt, 5)
    assert torch.equal(greedy_generate(exported, prompt, 5, empty_cache=cfg.empty_cache), eager_ids)


def test_export_prefill_with_dynamic_batch_and_seq(export_model):
    cfg = export_model.config
    batch, seq = Dim("batch", min=1, max=64), Dim("seq", min=1, max=cfg.max_seq_len)
    program = export(LlamaPrefill(export_model), (random_tokens(cfg, 2, 6),),
                     dynamic_shapes={"tokens": {0: batch, 1: seq}})
    exported = program.module()
    for new_batch, new_seq in [(1, 1), (4, 9), (3, 17)]:
        tokens = random_tokens(cfg, new_batch, new_seq, seed=new_seq)
        with torch.no_grad():
            expected = export_model.prefill(tokens)
            got = exported(tokens)
        for e, g in zip(expected, got):
            assert g.shape == e.shape
            torch.testing.assert_close(g, e, atol=ATOL, rtol=1e-5)
