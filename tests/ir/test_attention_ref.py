"""The attention references against first principles: a loop-built mask with plain softmax(QK^T)V, torch SDPA
where the two coincide, and the exact identities the kernels rely on (log-sum-exp merging, block top-k with a
full budget, Hydragen's prefix/suffix split)."""
import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.ir.ops.attention_ref import (attention_ref, block_scores, block_summary, decode_block_topk_ref,
                                          merge_lse_ref, shared_prefix_attention_ref)


def _qkv(b, hq, hkv, sq, skv, d, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, sq, d, generator=g), torch.randn(b, hkv, skv, d, generator=g),
            torch.randn(b, hkv, skv, d, generator=g))


def _loop_mask(sq, skv, causal, window, sinks, q_offset):
    """Bool [Sq, Skv] straight from the documented rule, one (query, key) pair at a time."""
    offset = skv - sq if q_offset is None else q_offset
    mask = torch.zeros(sq, skv, dtype=torch.bool)
    for i in range(sq):
        p = offset + i
        for j in range(skv):
            visible = j <= p if causal else True
            if window is not None:
                visible = visible and (p - j < window or j < sinks)
            mask[i, j] = visible
    return mask


def _plain_attention(q, k, v, mask, scale=None):
    """softmax(QK^T * scale) V per head with GQA by repetition; rows with no visible key give 0 / -inf."""
    hq, hkv = q.shape[1], k.shape[1]
    k, v = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    weights = torch.where(mask, torch.exp(scores - lse[..., None].nan_to_num(0, 0, 0)), torch.zeros(()))
    return (weights @ v.double()).float(), lse.float()


MASK_CASES = {  # name: (b, hq, hkv, sq, skv, attention_ref kwargs)
    "causal_square": (2, 4, 2, 6, 6, {"causal": True}),
    "causal_after_cache": (1, 2, 1, 3, 9, {"causal": True}),
    "decode_row": (2, 4, 1, 1, 7, {"causal": True}),
    "non_causal_gqa": (1, 4, 2, 5, 8, {"causal": False}),
    "explicit_offset": (1, 2, 2, 4, 8, {"causal": True, "q_offset": 2}),
    "more_queries_than_keys": (1, 2, 1, 7, 4, {"causal": True}),
    "window_and_sinks": (2, 2, 1, 9, 9, {"causal": True, "window": 3, "sinks": 2}),
    "window_no_sinks": (1, 2, 2, 4, 10, {"causal": True, "window": 4}),
    "window_non_causal": (1, 2, 1, 5, 8, {"causal": False, "window": 2, "sinks": 1}),
    "custom_scale": (1, 2, 1, 4, 6, {"causal": True, "scale": 0.3}),
}


@pytest.mark.parametrize("name", sorted(MASK_CASES))
def test_attention_ref_equals_loop_masked_softmax(name):
    b, hq, hkv, sq, skv, kwargs = MASK_CASES[name]
    q, k, v = _qkv(b, hq, hkv, sq, skv, 8, seed=len(name))
    mask = _loop_mask(sq, skv, kwargs.get("causal", True), kwargs.get("window"), kwargs.get("sinks", 0),
                      kwargs.get("q_offset"))
    expected, expected_lse = _plain_attention(q, k, v, mask, kwargs.get("scale"))
    out, lse = attention_ref(q, k, v, return_lse=True, **kwargs)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, expected_lse, rtol=1e-5, atol=1e-5)  # -inf rows compare equal


def test_rows_that_see_nothing_give_zero_and_minus_inf():
    q, k, v = _qkv(1, 2, 1, 6, 3, 8, seed=1)   # q_offset = -3: the first three rows precede every key
    out, lse = attention_ref(q, k, v, causal=True, return_lse=True)
    assert torch.all(out[:, :, :3] == 0) and torch.all(torch.isneginf(lse[:, :, :3]))
    assert torch.all(torch.isfinite(lse[:, :, 3:])) and not torch.isnan(out).any()


SDPA_CASES = [  # (b, hq, hkv, sq, skv, causal): where attention_ref and SDPA mean the same thing
    (2, 4, 4, 7, 7, True), (1, 4, 2, 5, 5, True), (2, 4, 2, 3, 9, False), (1, 8, 2, 1, 11, False),
]


@pytest.mark.parametrize("b,hq,hkv,sq,skv,causal", SDPA_CASES)
def test_attention_ref_matches_torch_sdpa(b, hq, hkv, sq, skv, causal):
    q, k, v = _qkv(b, hq, hkv, sq, skv, 16, seed=b * 100 + sq)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=hq != hkv)
    torch.testing.assert_close(attention_ref(q, k, v, causal=causal), expected, rtol=1e-5, atol=1e-5)


def test_decode_row_sees_the_whole_cache_like_sdpa_without_mask():
    q, k, v = _qkv(2, 4, 2, 1, 13, 16, seed=5)
    expected = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    torch.testing.assert_close(attention_ref(q, k, v, causal=True), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mask_heads", ["kv", "q"])
def test_block_mask_equals_loop_mask(mask_heads):
    b, hq, hkv, s, bs = 2, 4, 2, 10, 3
    q, k, v = _qkv(b, hq, hkv, s, s, 8, seed=9)
    nb = -(-s // bs)
    g = torch.Generator().manual_seed(10)
    block_mask = torch.rand(b, hkv if mask_heads == "kv" else hq, nb, nb, generator=g) < 0.6
    full = block_mask.repeat_interleave(hq // block_mask.shape[1], 1)
    token_mask = full.repeat_interleave(bs, 2).repeat_interleave(bs, 3)[:, :, :s, :s] & _loop_mask(
        s, s, True, None, 0, None)
    expected, expected_lse = _plain_attention(q, k, v, token_mask)
    out, lse = attention_ref(q, k, v, causal=True, block_mask=block_mask, block_size=bs, return_lse=True)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, expected_lse, rtol=1e-5, atol=1e-5)


def test_merge_lse_of_disjoint_key_sets_is_exact():
    q, k, v = _qkv(2, 4, 2, 3, 20, 8, seed=11)
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(12))
    parts = [perm[:7], perm[7:8], perm[8:], perm[:0]]          # uneven, one key alone, one empty set
    outs, lses = zip(*[attention_ref(q, k[:, :, idx], v[:, :, idx], causal=False, return_lse=True) for idx in parts])
    full, full_lse = attention_ref(q, k, v, causal=False, return_lse=True)
    for order in ([0, 1, 2, 3], [3, 2, 0, 1]):
        out, lse = merge_lse_ref([outs[i] for i in order], [lses[i] for i in order])
        torch.testing.assert_close(out, full, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lse, full_lse, rtol=1e-5, atol=1e-6)


def test_merge_lse_of_nothing_visible_stays_zero():
    out = torch.zeros(1, 2, 3, 4)
    lse = torch.full((1, 2, 3), float("-inf"))
    merged, merged_lse = merge_lse_ref([out, out], [lse, lse])
    assert torch.all(merged == 0) and torch.all(torch.isneginf(merged_lse))


def _loop_forced_blocks(skv, bs, sinks, window):
    """Blocks holding one of the first `sinks` tokens or one of the last `window` tokens, token by token."""
    tokens = set(range(min(sinks, skv))) | set(range(max(0, skv - window), skv))
    return {t // bs for t in tokens}


TOPK_CASES = [  # (skv, block_size, topk_blocks, sinks, window, summary)
    (40, 8, 2, 3, 8, "mean"), (37, 8, 1, 0, 5, "minmax"), (40, 8, 0, 8, 0, "mean"), (37, 8, 2, 0, 0, "minmax"),
    (29, 4, 3, 5, 9, "mean"), (16, 8, 5, 1, 1, "minmax"),
]


@pytest.mark.parametrize("skv,bs,topk,sinks,window,summary", TOPK_CASES)
def test_block_topk_keeps_forced_blocks_and_the_best_others(skv, bs, topk, sinks, window, summary):
    q, k, v = _qkv(2, 4, 2, 1, skv, 8, seed=skv + topk)
    out, keep = decode_block_topk_ref(q, k, v, block_size=bs, topk_blocks=topk, sinks=sinks, window=window,
                                      summary=summary, return_indices=True)
    nb = -(-skv // bs)
    forced = _loop_forced_blocks(skv, bs, sinks, window)
    scores = block_scores(q, block_summary(k, bs, summary), summary)
    for b in range(2):
        for h in range(2):
            kept = {int(i) for i in keep[b, h].nonzero()}
            others = sorted(set(range(nb)) - forced, key=lambda j: -float(scores[b, h, j]))
            assert kept == forced | set(others[:topk])
    token_mask = keep.repeat_interleave(bs, -1)[..., :skv].repeat_interleave(2, 1)[:, :, None, :]
    expected, _ = _plain_attention(q, k, v, token_mask)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_block_topk_summaries_by_definition():
    k = _qkv(1, 2, 2, 1, 11, 4, seed=3)[1]
    mean = block_summary(k, 4, "mean")
    lo, hi = block_summary(k, 4, "minmax")
    for n, (a, z) in enumerate([(0, 4), (4, 8), (8, 11)]):   # the last block is short
        torch.testing.assert_close(mean[:, :, n], k[:, :, a:z].mean(2))
        torch.testing.assert_close(lo[:, :, n], k[:, :, a:z].amin(2))
        torch.testing.assert_close(hi[:, :, n], k[:, :, a:z].amax(2))


def test_quest_score_bounds_every_key_in_the_block():
    q, k, _ = _qkv(2, 2, 2, 1, 24, 8, seed=4)        # one query head per KV head: no group sum
    bound = block_scores(q, block_summary(k, 6, "minmax"), "minmax")
    actual = (q @ k.transpose(-1, -2))[:, :, 0].reshape(2, 2, 4, 6).amax(-1)
    assert torch.all(bound >= actual - 1e-5)


@pytest.mark.parametrize("summary", ["mean", "minmax"])
@pytest.mark.parametrize("hq,hkv", [(4, 2), (2, 2), (4, 1)])
def test_block_topk_with_full_budget_is_dense(summary, hq, hkv):
    q, k, v = _qkv(2, hq, hkv, 1, 45, 8, seed=hq * 10 + hkv)
    dense = attention_ref(q, k, v, causal=True)
    full = decode_block_topk_ref(q, k, v, block_size=8, topk_blocks=6, sinks=0, window=0, summary=summary)
    torch.testing.assert_close(full, dense, rtol=1e-5, atol=1e-5)
    short = decode_block_topk_ref(q, k, v, block_size=8, topk_blocks=1, sinks=0, window=0, summary=summary,
                                  dense_len=45)
    torch.testing.assert_close(short, dense, rtol=1e-5, atol=1e-5)  # dense_len: short caches run dense


def test_block_topk_kept_mass_grows_and_bounds_the_error():
    """Selections are nested as topk_blocks grows, so the dense attention mass they keep never falls, and
    |out_topk - out_dense| <= 2 (1 - kept mass) max|v| (the dense output mixes out_topk with the rest)."""
    q, k, v = _qkv(1, 4, 2, 1, 96, 8, seed=21)
    probs = torch.softmax((q @ k.repeat_interleave(2, 1).transpose(-1, -2)) / math.sqrt(8), -1)[:, :, 0]
    dense = attention_ref(q, k, v)
    previous_mass = torch.zeros(1, 4)
    for topk in range(0, 12):
        out, keep = decode_block_topk_ref(q, k, v, block_size=8, topk_blocks=topk, sinks=2, window=8,
                                          return_indices=True)
        mass = (probs * keep.repeat_interleave(8, -1).repeat_interleave(2, 1)).sum(-1)
        assert torch.all(mass >= previous_mass - 1e-6)
        error = (out - dense).abs().amax(-1)[:, :, 0]
        assert torch.all(error <= 2 * (1 - mass) * v.abs().max() + 1e-5)
        previous_mass = mass
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("b,hq,hkv,sq,prefix,suffix", [(3, 4, 2, 1, 10, 5), (2, 2, 1, 3, 7, 4), (2, 4, 4, 1, 6, 0)])
def test_shared_prefix_equals_attention_on_the_concatenation(b, hq, hkv, sq, prefix, suffix):
    q, ks, vs = _qkv(b, hq, hkv, sq, suffix, 8, seed=prefix + suffix)
    _, kp, vp = _qkv(1, hq, hkv, 1, prefix, 8, seed=prefix)
    out = shared_prefix_attention_ref(q, kp, vp, ks, vs)
    k_full = torch.cat([kp.expand(b, -1, -1, -1), ks], 2)
    v_full = torch.cat([vp.expand(b, -1, -1, -1), vs], 2)
    torch.testing.assert_close(out, attention_ref(q, k_full, v_full, causal=True), rtol=1e-5, atol=1e-5)


def test_grouped_shared_prefixes_equal_attention_on_each_rows_concatenation():
    """G prefixes, each shared by B / G consecutive rows."""
    q, ks, vs = _qkv(6, 4, 2, 1, 3, 8, seed=1)
    _, kp, vp = _qkv(3, 4, 2, 1, 5, 8, seed=2)
    out = shared_prefix_attention_ref(q, kp, vp, ks, vs)
    k_full = torch.cat([kp.repeat_interleave(2, 0), ks], 2)
    v_full = torch.cat([vp.repeat_interleave(2, 0), vs], 2)
    torch.testing.assert_close(out, attention_ref(q, k_full, v_full, causal=True), rtol=1e-5, atol=1e-5)


def test_shared_prefixes_must_divide_the_rows():
    q, k, v = _qkv(3, 2, 1, 1, 4, 8, seed=0)
    with pytest.raises(ValueError, match="equal size"):
        shared_prefix_attention_ref(q, k[:2], v[:2], k, v)


def test_block_selection_ties_go_to_the_lowest_block_index():
    """Equal scores (zero-filled cache blocks score alike) keep the lowest-indexed blocks; torch.topk leaves the
    order of ties unspecified (on the CPU it picked others), so the reference sorts stably. The Triton
    backend's selections follow the same rule (tests/backends/triton/test_attention_kernels.py)."""
    from lmforge.ir.ops.attention_ref import select_blocks, top_indices

    scores = torch.tensor([[[9.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 9.0]]])       # block 0: sink, block 7: window
    keep = select_blocks(scores, 128, 16, 3, 1, 16)
    assert keep[0, 0].nonzero().flatten().tolist() == [0, 1, 2, 3, 7]
    ties = torch.zeros(2, 3, 200)
    assert torch.equal(top_indices(ties, 5), torch.arange(5).expand(2, 3, 5))
    assert top_indices(torch.tensor([2.0, 5.0, 2.0, 5.0, 1.0]), 3).tolist() == [1, 3, 0]   # largest first


@pytest.mark.parametrize("scale", [0.0, -0.5])
def test_attention_op_reference_with_a_scale_of_zero_or_below(scale):
    """torch's CPU SDPA gives NaN for causal attention with a scale <= 0: the attention op's reference runs
    attention_ref for those (scale 0: the plain mean of each row's visible values); an explicit mask still
    runs SDPA, which is right for any scale."""
    from lmforge.ir.ops import get_op

    reference = get_op("attention").reference
    q, k, v = _qkv(1, 2, 2, 6, 6, 16, seed=5)
    got = reference(q, k, v, causal=True, scale=scale)
    assert not got.isnan().any()
    torch.testing.assert_close(got, attention_ref(q, k, v, causal=True, scale=scale))
    if scale == 0.0:
        torch.testing.assert_close(got, v.cumsum(2) / torch.arange(1, 7.0)[:, None])
    mask = torch.ones(6, 6, dtype=torch.bool).tril()
    torch.testing.assert_close(reference(q, k, v, mask, scale=scale), attention_ref(q, k, v, causal=True, scale=scale))
