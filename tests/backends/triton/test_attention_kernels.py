"""Triton attention kernels (prefill, decode, block top-k, shared prefix) against the torch references: outputs,
and the log-sum-exp over the keys each attends to.

On the CPU they run under TRITON_INTERPRET=1 (tests/conftest.py) at tiny shapes; small tiles (16 x 16) make
the loops run several trips, and a few cases use the default (H100) configs. The references compute in fp32
from the same inputs; kernels promise fp32 accumulation, so the tolerance only covers the output rounding
(and the 16-bit P in P @ V).
"""
import pytest
import torch

from lmforge.backends.triton import attention_decode as decode
from lmforge.backends.triton import attention_prefill as prefill
from lmforge.backends.triton.config import KernelConfig
from lmforge.errors import LmforgeError
from lmforge.ir.ops.attention_ref import (attention_ref, decode_block_topk_ref, shared_prefix_attention_ref)
from lmforge.ir.ops.flexprefill_ref import flex_prefill_attention_ref, flex_prefill_block_mask

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 3e-2}
SMALL_PREFILL = KernelConfig.make(num_warps=4, num_stages=1, BLOCK_M=16, BLOCK_N=16)
SMALL_DECODE = KernelConfig.make(num_warps=4, num_stages=1, BLOCK_N=16, MAX_BLOCK_M=16)


def _randn(*shape, seed, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEVICE)


def _qkv(b, hq, hkv, sq, skv, d, seed, dtype=torch.float32):
    return (_randn(b, hq, sq, d, seed=seed, dtype=dtype), _randn(b, hkv, skv, d, seed=seed + 1, dtype=dtype),
            _randn(b, hkv, skv, d, seed=seed + 2, dtype=dtype))


def _reference(fn, q, k, v, **kwargs):
    """The reference on fp32 copies of the inputs (so 16-bit inputs are compared to exact math)."""
    return fn(q.float(), k.float(), v.float(), **kwargs)


def _close(actual, expected, dtype):
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=tol)


def _lse_close(actual, expected):
    assert torch.equal(torch.isneginf(actual), torch.isneginf(expected)), "rows that see no key differ"
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)  # -inf == -inf


# ---- prefill ---------------------------------------------------------------------------------------------------------

PREFILL_CASES = {  # name: (b, hq, hkv, sq, skv, d, flash_prefill kwargs)
    "causal_gqa": (2, 4, 2, 33, 33, 16, {}),
    "causal_after_cache": (1, 2, 1, 5, 64, 16, {}),
    "causal_tile_boundary": (1, 2, 1, 18, 48, 16, {}),      # q_offset 30: the last unmasked tile ends at 16
    "causal_explicit_offset": (1, 2, 2, 20, 40, 16, {"q_offset": 3}),
    "more_queries_than_keys": (1, 2, 1, 40, 33, 16, {}),
    "non_causal": (2, 2, 2, 33, 64, 16, {"causal": False}),
    "window_sinks_gqa": (2, 4, 1, 64, 64, 16, {"window": 7, "sinks": 3}),
    "window_no_sinks": (1, 2, 2, 33, 33, 16, {"window": 16}),
    "window_non_causal": (1, 2, 1, 33, 64, 16, {"window": 20, "sinks": 5, "causal": False}),
    "head_dim_24": (1, 2, 1, 33, 33, 24, {"scale": 0.2}),
    "zero_scale_whole_tiles": (1, 2, 1, 32, 48, 16, {"scale": 0.0, "causal": False}),  # uniform weights
    "scaled_causal_whole_tiles": (1, 2, 1, 32, 64, 16, {"scale": 3.0}),  # large scores in the unmasked tiles
    "single_query": (1, 4, 2, 1, 33, 16, {}),
    "one_key": (2, 2, 1, 5, 1, 16, {}),
}


@pytest.mark.parametrize("name", sorted(PREFILL_CASES))
def test_flash_prefill_matches_reference(name):
    b, hq, hkv, sq, skv, d, kwargs = PREFILL_CASES[name]
    q, k, v = _qkv(b, hq, hkv, sq, skv, d, seed=len(name))
    out, lse = prefill.flash_prefill(q, k, v, config=SMALL_PREFILL, **kwargs)
    expected, expected_lse = attention_ref(q, k, v, causal=kwargs.pop("causal", True), return_lse=True, **kwargs)
    _close(out, expected, torch.float32)
    _lse_close(lse, expected_lse)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kwargs", [{}, {"window": 9, "sinks": 2}], ids=["causal", "window"])
@pytest.mark.parametrize("config", [None, SMALL_PREFILL], ids=["default", "small"])
def test_flash_prefill_16bit_inputs(dtype, kwargs, config):
    q, k, v = _qkv(2, 4, 2, 33, 33, 16, seed=7, dtype=dtype)
    out, lse = prefill.flash_prefill(q, k, v, config=config, **kwargs)
    expected, expected_lse = _reference(attention_ref, q, k, v, return_lse=True, **kwargs)
    assert out.dtype == dtype and out.shape == q.shape and lse.dtype == torch.float32
    _close(out, expected, dtype)
    torch.testing.assert_close(lse, expected_lse, rtol=1e-2, atol=1e-2)


def test_window_prefill_default_config_at_head_dim_128():
    """The window + sinks default at head dim > 64 (128 x 32 tiles: 128 x 64 spills on sm_80 / sm_89) is right."""
    assert prefill.default_config(torch.float16, 128, prefill.MODE_WINDOW).get("BLOCK_N") == 32
    q, k, v = _qkv(1, 2, 1, 40, 40, 128, seed=11, dtype=torch.float16)
    out, lse = prefill.flash_prefill(q, k, v, window=9, sinks=2)
    expected, expected_lse = _reference(attention_ref, q, k, v, return_lse=True, window=9, sinks=2)
    _close(out, expected, torch.float16)
    torch.testing.assert_close(lse, expected_lse, rtol=1e-2, atol=1e-2)


def test_flash_prefill_without_lse_and_non_contiguous_inputs():
    q, k, v = _qkv(1, 2, 2, 33, 33, 16, seed=8)
    q_t = q.transpose(1, 2).contiguous().transpose(1, 2)     # [B, H, S, D] view of a [B, S, H, D] buffer
    out = prefill.flash_prefill(q_t, k, v, config=SMALL_PREFILL, return_lse=False)
    _close(out, attention_ref(q, k, v), torch.float32)


@pytest.mark.parametrize("b,hq,hkv,s,bs,mask_heads,config", [
    (2, 4, 2, 64, 16, "kv", SMALL_PREFILL),     # 4 x 4 blocks, one list per KV head
    (1, 4, 2, 33, 16, "q", SMALL_PREFILL),      # short last block, one list per query head
    (1, 2, 1, 64, 32, "kv", SMALL_PREFILL),     # a KV block is two 16-key tiles
    (1, 2, 2, 64, 32, "kv", None),              # default config clamped to the block
])
def test_block_sparse_prefill_matches_reference(b, hq, hkv, s, bs, mask_heads, config):
    q, k, v = _qkv(b, hq, hkv, s, s, 16, seed=s + bs)
    n = -(-s // bs)
    g = torch.Generator().manual_seed(s)
    mask = (torch.rand(b, hkv if mask_heads == "kv" else hq, n, n, generator=g) < 0.5).to(DEVICE)
    mask[..., 1, :] = False                                   # a query block that keeps nothing
    block_idx, block_cnt = prefill.block_mask_to_index(mask)
    out, lse = prefill.block_sparse_prefill(q, k, v, block_idx, block_cnt, block_size=bs, config=config)
    expected, expected_lse = attention_ref(q, k, v, causal=True, block_mask=mask, block_size=bs, return_lse=True)
    _close(out, expected, torch.float32)
    _lse_close(lse, expected_lse)


def test_block_sparse_prefill_with_no_keys_gives_zeros_and_minus_inf_lse():
    """Skv = 0: the mask has no key blocks and the block lists are empty (no memory behind them); the launcher
    launches nothing, and every row sees no key, as in the reference."""
    q = _randn(1, 2, 20, 16, seed=70)
    k = v = torch.zeros(1, 2, 0, 16, device=DEVICE)
    mask = torch.ones(1, 2, 2, 0, dtype=torch.bool, device=DEVICE)
    block_idx, block_cnt = prefill.block_mask_to_index(mask)
    out, lse = prefill.block_sparse_prefill(q, k, v, block_idx, block_cnt, block_size=16, config=SMALL_PREFILL)
    expected, expected_lse = attention_ref(q, k, v, causal=True, block_mask=mask, block_size=16, return_lse=True)
    assert torch.equal(out, torch.zeros_like(q)) and torch.equal(out, expected)
    _lse_close(lse, expected_lse)
    out, lse = prefill.flash_prefill(q, k, v, config=SMALL_PREFILL)
    assert torch.equal(out, expected) and torch.isneginf(lse).all()


def test_block_mask_to_index_lists_the_kept_blocks_in_order():
    mask = torch.tensor([[[[True, False, True, False], [False, False, False, False], [False, True, True, True]]]])
    block_idx, block_cnt = prefill.block_mask_to_index(mask)
    assert block_cnt.tolist() == [[[2, 0, 3]]]
    assert block_idx[0, 0, 0, :2].tolist() == [0, 2] and block_idx[0, 0, 2, :3].tolist() == [1, 2, 3]


def test_block_sparse_prefill_runs_flexprefill_masks():
    q, k, v = _qkv(1, 2, 2, 64, 64, 16, seed=30)
    mask, _ = flex_prefill_block_mask(q.float().cpu(), k.float().cpu(), gamma=0.6, block_size=16)
    block_idx, block_cnt = prefill.block_mask_to_index(mask.to(DEVICE))
    out, _ = prefill.block_sparse_prefill(q, k, v, block_idx, block_cnt, block_size=16, config=SMALL_PREFILL)
    _close(out, flex_prefill_attention_ref(q, k, v, gamma=0.6, block_size=16), torch.float32)


# ---- decode ----------------------------------------------------------------------------------------------------------

DECODE_CASES = {  # name: (b, hq, hkv, sq, s, d, decode_attention kwargs)
    "gqa_default_splits": (2, 4, 2, 1, 33, 16, {}),
    "one_kv_head_3_splits": (1, 4, 1, 1, 64, 16, {"num_splits": 3}),
    "one_split": (2, 2, 2, 1, 40, 16, {"num_splits": 1}),
    "speculative_rows": (2, 4, 2, 3, 33, 16, {}),
    "kv_len_int": (1, 4, 2, 1, 64, 16, {"kv_len": 21}),
    "head_dim_24": (1, 4, 2, 1, 5, 24, {"scale": 0.3}),
    "cache_of_one": (1, 2, 1, 1, 1, 16, {}),
}


@pytest.mark.parametrize("name", sorted(DECODE_CASES))
def test_decode_attention_matches_reference(name):
    b, hq, hkv, sq, s, d, kwargs = DECODE_CASES[name]
    q, k, v = _qkv(b, hq, hkv, sq, s, d, seed=len(name) + 40)
    out, lse = decode.decode_attention(q, k, v, config=SMALL_DECODE, return_lse=True, **kwargs)
    valid = kwargs.get("kv_len", s)
    expected, expected_lse = attention_ref(q, k[:, :, :valid], v[:, :, :valid], scale=kwargs.get("scale"),
                                           return_lse=True)
    _close(out, expected, torch.float32)
    _lse_close(lse, expected_lse)


def test_decode_attention_per_sequence_lengths():
    q, k, v = _qkv(3, 4, 2, 1, 40, 16, seed=50)
    lengths = torch.tensor([40, 17, 1], dtype=torch.int32, device=DEVICE)
    out = decode.decode_attention(q, k, v, kv_len=lengths, config=SMALL_DECODE)
    for i, n in enumerate(lengths.tolist()):
        _close(out[i:i + 1], attention_ref(q[i:i + 1], k[i:i + 1, :, :n], v[i:i + 1, :, :n]), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config", [None, SMALL_DECODE], ids=["default", "small"])
def test_decode_attention_16bit_inputs(dtype, config):
    q, k, v = _qkv(2, 4, 2, 1, 70, 16, seed=51, dtype=dtype)
    out = decode.decode_attention(q, k, v, config=config)
    assert out.dtype == dtype and out.shape == q.shape
    _close(out, _reference(attention_ref, q, k, v), dtype)


# ---- block top-k decode ----------------------------------------------------------------------------------------------

TOPK_CASES = [  # (s, block_size, topk_blocks, sinks, window, summary, config)
    (128, 16, 0, 3, 20, "mean", SMALL_DECODE),
    (128, 16, 2, 3, 20, "mean", SMALL_DECODE),
    (120, 16, 3, 0, 16, "minmax", SMALL_DECODE),     # short last block
    (128, 16, 2, 0, 32, "mean", SMALL_DECODE),       # the window starts exactly at a block boundary
    (128, 32, 1, 40, 1, "minmax", SMALL_DECODE),     # two tiles per block; sinks span two blocks
    (128, 16, 4, 1, 1, "mean", None),                # default config clamped to the block
]


@pytest.mark.parametrize("s,bs,topk,sinks,window,summary,config", TOPK_CASES)
def test_block_topk_decode_matches_reference_and_its_selection(s, bs, topk, sinks, window, summary, config):
    q, k, v = _qkv(2, 4, 2, 1, s, 16, seed=s + topk)
    kwargs = dict(block_size=bs, topk_blocks=topk, sinks=sinks, window=window, summary=summary)
    out, lse, selected = decode.block_topk_decode(q, k, v, config=config, return_lse=True, return_indices=True,
                                                  **kwargs)
    expected, keep = decode_block_topk_ref(q, k, v, return_indices=True, **kwargs)
    chosen = torch.zeros_like(keep).scatter_(-1, selected, True)
    assert torch.equal(chosen, keep) and selected.shape[-1] == int(keep[0, 0].sum())
    _close(out, expected, torch.float32)
    # the lse is over the kept blocks' keys: dense attention masked to them (one query block of the one row)
    kept_out, kept_lse = attention_ref(q, k, v, causal=False, block_mask=keep[:, :, None, :], block_size=bs,
                                       return_lse=True)
    _close(kept_out, expected, torch.float32)
    _lse_close(lse, kept_lse)


@pytest.mark.parametrize("n,keep", [(1, 1), (37, 5), (37, 37), (37, 0), (300, 40), (5000, 130)])
def test_select_largest_picks_what_torch_topk_picks(n, keep):
    """Distinct random scores (5000: three chunks of 2048), +inf for forced blocks: the same set as torch.topk,
    listed in increasing order."""
    scores = _randn(2, 3, n, seed=n + keep)
    scores[..., : min(3, n)] = float("inf")
    got = decode.select_largest(scores, keep)
    want = scores.topk(keep, dim=-1).indices.sort(dim=-1).values
    assert got.dtype == torch.int64 and torch.equal(got, want)


def test_select_largest_breaks_ties_by_lowest_index():
    scores = torch.tensor([[[1.0, 3.0, 3.0, 2.0, 3.0, 3.0, -1.0, 3.0]]], device=DEVICE)
    assert decode.select_largest(scores, 3).tolist() == [[[1, 2, 4]]]        # three of the five 3.0s
    assert decode.select_largest(scores, 6).tolist() == [[[1, 2, 3, 4, 5, 7]]]
    neg = -torch.arange(1.0, 6.0, device=DEVICE).reshape(1, 1, 5)           # negative floats order too
    assert decode.select_largest(neg, 2).tolist() == [[[0, 1]]]


@pytest.mark.parametrize("summary", ["mean", "minmax"])
def test_block_topk_with_the_triton_selection_matches_torch_topk(summary):
    q, k, v = _qkv(2, 4, 2, 1, 96, 16, seed=63)
    kwargs = dict(block_size=16, topk_blocks=2, sinks=4, window=8, summary=summary, config=SMALL_DECODE,
                  return_indices=True)
    out, picked = decode.block_topk_decode(q, k, v, select="triton", **kwargs)
    ref, chosen = decode.block_topk_decode(q, k, v, **kwargs)
    assert torch.equal(picked, chosen.sort(dim=-1).values)
    _close(out, ref, torch.float32)
    with pytest.raises(LmforgeError, match="select must be one of"):
        decode.block_topk_decode(q, k, v, select="heap", **kwargs)


@pytest.mark.parametrize("summary", ["mean", "minmax"])
@pytest.mark.parametrize("topk", [1, 2, 3])
def test_block_topk_ties_go_to_the_lowest_block_index(summary, topk):
    """Zero-filled cache blocks (1..9) score alike (0), above blocks 0 and 10 (negative scores): the reference,
    the torch selection and the Triton selection all keep the lowest-indexed tied blocks, so the three attend to
    the same keys (each tied block holds other values, so another choice would change the output)."""
    q, k, v = _qkv(1, 2, 1, 1, 16 * 12, 16, seed=71)
    k[:, :, 16:160] = 0.0
    below = -(q[0, 0, 0] + q[0, 1, 0]) * 0.5                  # a key whose score, summed over both heads, is < 0
    k[:, :, :16], k[:, :, 160:176] = below, below
    v[:, :, 16:160] = torch.arange(144.0, device=DEVICE)[:, None] / 100
    kwargs = dict(block_size=16, topk_blocks=topk, sinks=0, window=16, summary=summary)
    expected, keep = decode_block_topk_ref(q, k, v, return_indices=True, **kwargs)
    wanted = [*range(1, topk + 1), 11]                        # the tied blocks from 1, and the window's block 11
    assert keep[0, 0].nonzero().flatten().tolist() == wanted
    for select in decode.SELECT_METHODS:
        out, selected = decode.block_topk_decode(q, k, v, config=SMALL_DECODE, return_indices=True, select=select,
                                                 **kwargs)
        assert sorted(selected[0, 0].tolist()) == wanted, select
        _close(out, expected, torch.float32)


def test_decode_selected_blocks_attends_to_exactly_the_listed_blocks():
    """Any selection (unsorted, a different one per KV head) equals dense attention over those blocks' keys."""
    q, k, v = _qkv(2, 4, 2, 1, 96, 16, seed=62)
    selected = torch.tensor([[[5, 0, 3], [1, 2, 4]], [[2, 4, 0], [3, 5, 1]]], device=DEVICE)
    out = decode.decode_selected_blocks(q, k, v, selected, block_size=16, config=SMALL_DECODE)
    for b in range(2):
        for h in range(4):
            tokens = (selected[b, h // 2, :, None] * 16 + torch.arange(16, device=DEVICE)).flatten()
            expected = attention_ref(q[b:b + 1, h:h + 1], k[b:b + 1, h // 2:h // 2 + 1, tokens],
                                     v[b:b + 1, h // 2:h // 2 + 1, tokens])
            _close(out[b:b + 1, h:h + 1], expected, torch.float32)


@pytest.mark.parametrize("summary", ["mean", "minmax"])
def test_block_topk_with_full_budget_equals_dense(summary):
    q, k, v = _qkv(2, 4, 1, 1, 96, 16, seed=60)
    out = decode.block_topk_decode(q, k, v, block_size=16, topk_blocks=6, sinks=0, window=0, summary=summary,
                                   config=SMALL_DECODE)
    _close(out, attention_ref(q, k, v), torch.float32)


def test_block_topk_uses_a_kept_summary_and_dense_len():
    q, k, v = _qkv(1, 4, 2, 1, 64, 16, seed=61, dtype=torch.float16)
    summary = decode.build_block_summary(k, 16, "minmax")
    kwargs = dict(block_size=16, topk_blocks=1, sinks=1, window=1, summary="minmax")
    out = decode.block_topk_decode(q, k, v, block_summary=summary, config=SMALL_DECODE, **kwargs)
    _close(out, _reference(decode_block_topk_ref, q, k, v, **kwargs), torch.float16)
    dense = decode.block_topk_decode(q, k, v, dense_len=64, config=SMALL_DECODE, **kwargs)
    _close(dense, _reference(attention_ref, q, k, v), torch.float16)


def test_block_topk_error_shrinks_as_the_budget_grows():
    """A planted input: each cache block holds keys pushed along its head's query by a strength of its own
    (logits one unit apart), so the mean-key scores rank the blocks as their attention mass does and every
    block added removes error, down to none at the full budget."""
    b, h, s, bs, d = 1, 2, 128, 16, 16
    q, k, v = _qkv(b, h, h, 1, s, d, seed=70)
    strength = torch.tensor([0.0, 3.5, 1.0, 3.0, 1.5, 2.5, 2.0, 0.5], device=DEVICE).repeat_interleave(bs)
    along_q = q[0, :, 0] / q[0, :, 0].norm(dim=-1, keepdim=True) * 2.0        # logit ~ 2 |q| strength / 4
    k = k * 0.3 + strength[None, None, :, None] * along_q[None, :, None, :]
    dense = attention_ref(q, k, v)
    errors = []
    for topk in range(0, 9):
        out = decode.block_topk_decode(q, k, v, block_size=bs, topk_blocks=topk, sinks=0, window=0,
                                       config=SMALL_DECODE)
        errors.append((out - dense).abs().max().item())
    assert all(later <= earlier for earlier, later in zip(errors, errors[1:])), errors
    assert errors[0] > 0.05 and errors[-1] < 1e-5, errors


# ---- shared prefix ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("b,hq,hkv,sq,prefix,suffix,dtype,config", [
    (3, 4, 2, 1, 40, 9, torch.float32, SMALL_DECODE),
    (2, 4, 1, 2, 33, 5, torch.float32, SMALL_DECODE),      # two query rows per sequence: causal suffix
    (4, 4, 1, 1, 50, 20, torch.float32, None),             # 16 prefix rows in one tile, default config
    (2, 2, 2, 1, 16, 0, torch.float32, SMALL_DECODE),      # no suffix yet
    (2, 4, 2, 1, 40, 9, torch.float16, SMALL_DECODE),
])
def test_shared_prefix_decode_equals_dense_on_the_concatenation(b, hq, hkv, sq, prefix, suffix, dtype, config):
    q, k_suffix, v_suffix = _qkv(b, hq, hkv, sq, suffix, 16, seed=prefix + suffix, dtype=dtype)
    _, k_prefix, v_prefix = _qkv(1, hq, hkv, 1, prefix, 16, seed=prefix, dtype=dtype)
    out, lse = decode.shared_prefix_decode(q, k_prefix, v_prefix, k_suffix, v_suffix, config=config,
                                           return_lse=True)
    _close(out, _reference(shared_prefix_attention_ref, q, k_prefix, v_prefix, k_suffix=k_suffix.float(),
                           v_suffix=v_suffix.float()), dtype)
    k_full = torch.cat([k_prefix.expand(b, -1, -1, -1), k_suffix], 2)
    v_full = torch.cat([v_prefix.expand(b, -1, -1, -1), v_suffix], 2)
    expected, expected_lse = _reference(attention_ref, q, k_full, v_full, return_lse=True)
    _close(out, expected, dtype)
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    torch.testing.assert_close(lse, expected_lse, rtol=1e-4 if dtype == torch.float32 else 1e-2,
                               atol=1e-4 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("groups,per,sq,config", [(3, 2, 1, SMALL_DECODE), (2, 4, 1, None), (4, 1, 2, SMALL_DECODE)])
def test_grouped_shared_prefixes(groups, per, sq, config):
    """G prefixes, each read once for its `per` consecutive sequences (several prompts' samples in one batch)."""
    b = groups * per
    q, k_suffix, v_suffix = _qkv(b, 4, 2, sq, 7, 16, seed=groups + per)
    _, k_prefix, v_prefix = _qkv(groups, 4, 2, 1, 37, 16, seed=groups)
    out, lse = decode.shared_prefix_decode(q, k_prefix, v_prefix, k_suffix, v_suffix, config=config,
                                           return_lse=True)
    k_full = torch.cat([k_prefix.repeat_interleave(per, 0), k_suffix], 2)
    v_full = torch.cat([v_prefix.repeat_interleave(per, 0), v_suffix], 2)
    expected, expected_lse = attention_ref(q, k_full, v_full, return_lse=True)
    _close(out, expected, torch.float32)
    _lse_close(lse, expected_lse)


# ---- planning and errors ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_tiles,programs,requested", [(2048, 8, None), (4, 8, None), (100, 1, 7), (1, 64, None)])
def test_split_plan_covers_every_tile_without_empty_splits(n_tiles, programs, requested):
    splits, per_split = decode.plan_splits(n_tiles, programs, torch.device("cpu"), requested)
    assert 1 <= splits <= n_tiles and (splits - 1) * per_split < n_tiles <= splits * per_split
    if requested is None and n_tiles >= 512:
        assert programs * splits >= 2 * decode.DEFAULT_SM_COUNT   # enough programs to fill an H100


def _bad_calls():
    q, k, v = _qkv(1, 4, 2, 1, 32, 16, seed=0)
    return {
        "q_rank": lambda: prefill.flash_prefill(q[0], k, v),
        "gqa": lambda: prefill.flash_prefill(q[:, :3], k, v),
        "int_dtype": lambda: prefill.flash_prefill(q.long(), k.long(), v.long()),
        "mixed_dtype": lambda: decode.decode_attention(q.half(), k, v),
        "sinks_without_window": lambda: prefill.flash_prefill(q, k, v, sinks=2),
        "negative_scale": lambda: prefill.flash_prefill(q, k, v, scale=-0.5),
        "sparse_block_size": lambda: prefill.block_sparse_prefill(
            q, k, v, *prefill.block_mask_to_index(torch.ones(1, 2, 1, 4, dtype=torch.bool)), block_size=8),
        "sparse_lists_shape": lambda: prefill.block_sparse_prefill(
            q, k, v, *prefill.block_mask_to_index(torch.ones(1, 2, 3, 4, dtype=torch.bool)), block_size=16),
        "kv_len": lambda: decode.decode_attention(q, k, v, kv_len=33),
        "topk_rows": lambda: decode.block_topk_decode(q.expand(-1, -1, 2, -1), k, v, block_size=16, topk_blocks=1),
        "topk_summary": lambda: decode.block_topk_decode(q, k, v, block_size=16, topk_blocks=1, summary="max"),
        "stale_summary": lambda: decode.block_topk_decode(q, k, v, block_size=16, topk_blocks=1,
                                                          block_summary=decode.build_block_summary(k[:, :, :16], 16)),
        "prefix_batch": lambda: decode.shared_prefix_decode(q.expand(3, -1, -1, -1), k.expand(2, -1, -1, -1),
                                                            v.expand(2, -1, -1, -1), k.expand(3, -1, -1, -1),
                                                            v.expand(3, -1, -1, -1)),
    }


@pytest.mark.parametrize("name", sorted(_bad_calls()))
def test_bad_inputs_raise_lmforge_error(name):
    with pytest.raises(LmforgeError):
        _bad_calls()[name]()
