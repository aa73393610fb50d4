"""recognize_causal_mask: attention masks built from sizes that are provably causal become `causal` (or go, when
every key is visible); any other mask stays, whatever the sizes tried. Each case is a torch function captured with
symbolic sizes, compiled with the default pipeline and checked against eager torch at square and non-square sizes."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import lmforge
from lmforge.ir import GraphBuilder, TensorType
from lmforge.passes import recognize_causal_mask

D = 8


def sdpa(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def positions(q, k):
    """Query positions [Sq, 1] aligned to the end of the keys, key positions [1, Skv]."""
    sq, skv = q.shape[2], k.shape[2]
    return torch.arange(skv - sq, skv)[:, None], torch.arange(skv)[None, :]


def bool_le(q, k, v):
    i, j = positions(q, k)
    return sdpa(q, k, v, j <= i)


def tril_ones(q, k, v):
    n = q.shape[2]
    return sdpa(q, k, v, torch.ones(n, n, dtype=torch.bool).tril())


def additive_inf(q, k, v):
    i, j = positions(q, k)
    return sdpa(q, k, v, torch.where(j <= i, 0.0, float("-inf")))


def additive_finfo_triu(q, k, v):
    """The additive mask of Hugging Face transformers 4.x (`_prepare_4d_causal_attention_mask_with_cache_position`):
    finfo.min above the diagonal, times (key position > query position), for queries after a cache of keys."""
    sq, skv = q.shape[2], k.shape[2]
    cache_position = torch.arange(skv - sq, skv)
    mask = torch.full((sq, skv), torch.finfo(q.dtype).min).triu(1)
    mask = mask * (torch.arange(skv) > cache_position.reshape(-1, 1))
    return sdpa(q, k, v, mask[None, None].expand(q.shape[0], 1, -1, -1))


def decode_all_visible(q, k, v):
    j = torch.arange(k.shape[2])
    return sdpa(q, k, v, (j <= k.shape[2] - 1)[None, None, None, :])


def offset_from_start(q, k, v):
    """Query i at key position i (not at the end of the keys): causal with q_offset = 0."""
    i, j = torch.arange(q.shape[2])[:, None], torch.arange(k.shape[2])[None, :]
    return sdpa(q, k, v, j <= i)


def window(q, k, v):
    i, j = positions(q, k)
    return sdpa(q, k, v, (j <= i) & (j > i - 4))


def wide_window(q, k, v):
    """A 4096-token window: at every size tried here it equals the causal mask; it is a window, not causal."""
    i, j = positions(q, k)
    return sdpa(q, k, v, (j <= i) & (j > i - 4096))


def decode_window(q, k, v):
    """A decode step's window mask (the causal half holds for every key of a cache)."""
    i, j = positions(q, k)
    return sdpa(q, k, v, (j <= i) & (i - j < 3))


def half_window(q, k, v):
    """A window whose width depends on the size: not one window attr."""
    i, j = positions(q, k)
    return sdpa(q, k, v, (j <= i) & (j > i - q.shape[2] // 2))


def window_only(q, k, v):
    """A band around the diagonal that lets later keys through: not causal."""
    i, j = positions(q, k)
    return sdpa(q, k, v, j > i - 4)


def strict(q, k, v):
    i, j = positions(q, k)
    return sdpa(q, k, v, j < i)


def anti_causal(q, k, v):
    i, j = positions(q, k)
    return sdpa(q, k, v, j >= i)


def padded(q, k, v, keep):
    """Causal and a padding mask read from an input: depends on data."""
    i, j = positions(q, k)
    return sdpa(q, k, v, (j <= i) & keep.bool()[:, None, None, :])


class Buffered(torch.nn.Module):
    """GPT-2's old registered causal buffer: a weight, not a size, so never proven."""

    def __init__(self):
        super().__init__()
        self.register_buffer("bias", torch.ones(64, 64, dtype=torch.bool).tril())

    def forward(self, q, k, v):
        n = q.shape[2]
        return sdpa(q, k, v, self.bias[:n, :n])


def uint8_difference(q, k, v):
    """uint8 subtraction wraps: i - j >= 0 holds for every pair (every key visible), not only the causal ones."""
    p = torch.arange(q.shape[2], dtype=torch.uint8)
    return sdpa(q, k, v, (p[:, None] - p[None, :]) >= 0)


def int64_overflow(q, k, v):
    """Positions near int64's end wrap past it: not provably causal."""
    p = torch.arange(q.shape[2]) + (2**63 - 2)
    return sdpa(q, k, v, p[None, :] <= p[:, None])


def signed_zero(q, k, v):
    """1 / -0.0 is -inf: this is the causal mask (0.0 and -0.0 must not be merged as one value)."""
    i, j = positions(q, k)
    z = torch.where(j <= i, 0.0, -0.0)
    return sdpa(q, k, v, torch.ones_like(z) / z > 0)


def all_visible(q, k, v):
    n = q.shape[2]
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    return sdpa(q, k, v, (j <= i) | (j < n))


def reversed_positions(q, k, v):
    """arange with a negative step over a symbolic size (its length rule was wrong for step < 0)."""
    r = torch.arange(q.shape[2] - 1, -1, -1)
    return sdpa(q, k, v, r[None, :] >= r[:, None])


def after_cache(fn):
    """fn on keys / values that extend a cache of `past` entries by the queries' own (Skv = past + Sq)."""
    def step(q, past_k, past_v):
        return fn(q, torch.cat([past_k, q], 2), torch.cat([past_v, q], 2))

    step.__name__ = fn.__name__
    return step


SQUARE = {"q": {0: "b", 2: "s"}, "k": {0: "b", 2: "s"}, "v": {0: "b", 2: "s"}}
UNRELATED = {"q": {0: "b", 2: "s"}, "k": {0: "b", 2: "kv"}, "v": {0: "b", 2: "kv"}}
CACHED = {"q": {0: "b", 2: "s"}, "past_k": {0: "b", 2: "past"}, "past_v": {0: "b", 2: "past"}}
DECODE = {"q": {0: "b"}, "past_k": {0: "b", 2: "past"}, "past_v": {0: "b", 2: "past"}}
# name: (function, dynamic dims, sizes (Sq, Skv; Sq, past after a cache) to compare at, expected attention
# (causal, q_offset, window, number of inputs: 4 = the mask stays))
CASES = {
    "bool_le": (bool_le, SQUARE, [(5, 5), (9, 9)], (True, None, None, 3)),
    "bool_le_after_cache": (after_cache(bool_le), CACHED, [(3, 4), (6, 0)], (True, None, None, 3)),
    "tril_ones": (tril_ones, SQUARE, [(5, 5), (9, 9)], (True, None, None, 3)),
    "additive_inf": (after_cache(additive_inf), CACHED, [(3, 4), (5, 0)], (True, None, None, 3)),
    "additive_finfo_triu": (after_cache(additive_finfo_triu), CACHED, [(3, 4), (5, 0)], (True, None, None, 3)),
    "decode_all_visible": (after_cache(decode_all_visible), DECODE, [(1, 5), (1, 9)], (False, None, None, 3)),
    "offset_from_start": (after_cache(offset_from_start), CACHED, [(3, 4), (5, 0)], (True, 0, None, 3)),
    # Skv < Sq is possible here: the first queries would see no key (NaN rows), which causal attention gives as 0
    "bool_le_unrelated_lengths": (bool_le, UNRELATED, [(3, 7), (5, 5)], (False, None, None, 4)),
    "window": (window, SQUARE, [(9, 9), (3, 3)], (True, None, 4, 3)),
    "window_after_cache": (after_cache(window), CACHED, [(3, 4), (6, 0), (2, 9)], (True, None, 4, 3)),
    "decode_window": (after_cache(decode_window), DECODE, [(1, 5), (1, 9)], (True, None, 3, 3)),
    "size_dependent_window": (half_window, SQUARE, [(9, 9)], (False, None, None, 4)),
    "window_without_causal": (window_only, SQUARE, [(9, 9)], (False, None, None, 4)),
    "wide_window": (wide_window, SQUARE, [(9, 9)], (True, None, 4096, 3)),
    "strict": (strict, SQUARE, [(5, 5)], (False, None, None, 4)),
    "anti_causal": (anti_causal, SQUARE, [(5, 5)], (False, None, None, 4)),
    "registered_buffer": (Buffered(), {}, [(4, 4)], (False, None, None, 4)),
    "uint8_difference": (uint8_difference, SQUARE, [(4, 4), (7, 7)], (False, None, None, 4)),
    "int64_overflow": (int64_overflow, SQUARE, [(3, 3), (6, 6)], (False, None, None, 4)),
    "signed_zero": (signed_zero, SQUARE, [(4, 4), (7, 7)], (True, None, None, 3)),
    "reversed_positions": (reversed_positions, SQUARE, [(4, 4), (7, 7)], (True, None, None, 3)),
    # a size named like the interpreter's index symbols (_i3) is still a size: j < n always holds
    "all_visible_dim_named_like_an_index": (all_visible, {n: {0: "b", 2: "_i3"} for n in "qkv"}, [(4, 4), (6, 6)],
                                            (False, None, None, 3)),
}


def inputs(sq, skv, b=2, h=2):
    return torch.randn(b, h, sq, D), torch.randn(b, h, skv, D), torch.randn(b, h, skv, D)


@pytest.mark.parametrize("name", list(CASES))
def test_mask_is_recognized_only_when_provably_causal_and_numerics_stay(name):
    fn, dynamic, sizes, expected = CASES[name]
    torch.manual_seed(0)
    example = inputs(*((1, 6) if dynamic is DECODE else (3, 4) if dynamic is CACHED else (4, 4)))
    compiled = lmforge.compile(fn, example, dynamic=dynamic)
    (att,) = [n for n in compiled.graph.nodes if n.op == "attention"]
    assert (att.attr["causal"], att.attr["q_offset"], att.attr["window"], len(att.inputs)) == expected
    if len(att.inputs) == 3:   # the mask's nodes are gone
        assert {n.op for n in compiled.graph.nodes} <= {"attention", "concat", "kv_cache_append"}
    for sq, skv in sizes:
        xs = inputs(sq, skv)
        torch.testing.assert_close(compiled(*xs), fn(*xs), rtol=1e-5, atol=1e-6)


def test_mask_reading_an_input_stays():
    torch.manual_seed(0)
    keep = torch.ones(2, 6, dtype=torch.long)
    keep[0, :2] = 0
    dynamic = {**SQUARE, "keep": {0: "b", 1: "s"}}
    compiled = lmforge.compile(padded, (*inputs(6, 6), keep), dynamic=dynamic)
    (att,) = [n for n in compiled.graph.nodes if n.op == "attention"]
    assert len(att.inputs) == 4 and not att.attr["causal"]
    xs, keep = inputs(9, 9), torch.ones(2, 9, dtype=torch.long)
    keep[1, :3] = 0
    torch.testing.assert_close(compiled(*xs, keep), padded(*xs, keep), rtol=1e-5, atol=1e-6)


def test_recognized_mask_lets_the_window_pattern_apply():
    """With the mask recognized, a prefill window config rewrites the attention (no 'changed no attention' warning)
    and the result is windowed attention."""
    from lmforge.ir.ops.attention_ref import attention_ref

    torch.manual_seed(0)
    config = {"attn.prefill_pattern": "window", "attn.prefill_window": 16, "attn.sinks": 4}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compiled = lmforge.compile(bool_le, inputs(4, 4), dynamic=SQUARE, config=config)
    (att,) = compiled.graph.nodes
    assert (att.attr["causal"], att.attr["window"], att.attr["sinks"]) == (True, 16, 4)
    xs = inputs(40, 40)
    torch.testing.assert_close(compiled(*xs), attention_ref(*xs, causal=True, window=16, sinks=4), rtol=1e-5,
                               atol=1e-6)


def test_hand_built_graph_with_symbolic_scalar_offset():
    """A decode step's mask as Hugging Face writes it: query position `arange(1) + past` against arange(past + 1);
    every key is visible, so the mask goes."""
    b = GraphBuilder("step")
    q = b.input("q", TensorType(("b", 2, 1, D)))
    k = b.input("k", TensorType(("b", 2, "past + 1", D)))
    v = b.input("v", TensorType(("b", 2, "past + 1", D)))
    qpos = b.op("add", [b.op("arange", [], {"end": 1}), None], {"scalar": "past"})
    kpos = b.op("arange", [], {"end": "past + 1"})
    mask = b.op("le", [b.op("reshape", [kpos], {"shape": (1, 1, 1, "past + 1")}),
                       b.op("reshape", [qpos], {"shape": (1, 1, 1, 1)})])
    g = recognize_causal_mask(b.build([b.op("attention", [q, k, v, mask])]))
    assert [n.op for n in g.nodes] == ["attention"] and len(g.nodes[0].inputs) == 3


def test_a_tril_diagonal_from_symbolic_sizes_is_a_clear_capture_error():
    from lmforge.errors import CaptureError

    def fn(q, k, v):
        sq, skv = q.shape[2], k.shape[2]
        return sdpa(q, k, v, torch.ones(sq, skv, dtype=torch.bool).tril(skv - sq))

    with pytest.raises(CaptureError, match="symbolic size"):
        lmforge.compile(fn, inputs(3, 5), dynamic=UNRELATED)


def test_a_size_read_from_tensor_data_is_a_clear_capture_error():
    """.item() makes an unbacked size (possibly negative): it was folded in as a dim and failed when run."""
    from lmforge.errors import CaptureError

    def fn(q, k, v, off):
        n = q.shape[2]
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        return sdpa(q, k, v, j <= i + off.item())

    with pytest.raises(CaptureError, match="from tensor data"):
        lmforge.compile(fn, (*inputs(4, 4), torch.tensor(0)), dynamic=SQUARE)


@pytest.mark.parametrize("backends", [("torch",), ("tvm",)])
def test_prefill_window_applies_to_a_chunk_after_a_cache(backends):
    """A chunked prefill (Sq queries after `past` cached keys, its causal mask recognized) takes the prefill window
    at its own alignment; with FlexPrefill chosen it stays dense (FlexPrefill needs queries = keys)."""
    from lmforge.ir.ops.attention_ref import attention_ref

    torch.manual_seed(0)
    step = after_cache(bool_le)
    config = {"attn.prefill_pattern": "window", "attn.prefill_window": 4, "attn.sinks": 2}
    compiled = lmforge.compile(step, inputs(3, 4), dynamic=CACHED, config=config, backends=backends)
    (att,) = [n for n in compiled.graph.nodes if n.op == "attention"]
    assert (att.attr["causal"], att.attr["q_offset"], att.attr["window"], att.attr["sinks"]) == (True, None, 4, 2)
    for sq, past in ((5, 7), (6, 0), (2, 11)):
        q, k, v = inputs(sq, past)
        kk, vv = torch.cat([k, q], 2), torch.cat([v, q], 2)
        torch.testing.assert_close(compiled(q, k, v), attention_ref(q, kk, vv, causal=True, window=4, sinks=2),
                                   rtol=1e-5, atol=1e-6)
    with pytest.warns(UserWarning):
        flex = lmforge.compile(step, inputs(3, 4), dynamic=CACHED, config={"attn.prefill_pattern": "flex"})
    assert [n.op for n in flex.graph.nodes if "attention" in n.op] == ["attention"]


def test_decode_patterns_leave_a_step_that_sees_only_a_prefix_of_its_cache():
    """A decode mask that lets the query see keys 0..3 of a longer cache is causal with q_offset=3; the decode
    window (which keeps the cache's last keys) must not move the query to the end of the cache."""
    def first_four(q, k, v):
        j = torch.arange(k.shape[2])
        return sdpa(q, k, v, (j <= 3)[None, None, None, :])

    step = after_cache(first_four)
    config = {"attn.decode_pattern": "window", "attn.decode_window": 4, "attn.sinks": 1}
    with pytest.warns(UserWarning):      # the pattern changes no attention
        c = lmforge.compile(step, inputs(1, 6), dynamic=DECODE, config=config)
    (att,) = [n for n in c.graph.nodes if n.op == "attention"]
    assert (att.attr["causal"], att.attr["q_offset"], att.attr["window"]) == (True, 3, None)
    xs = inputs(1, 19)
    torch.testing.assert_close(c(*xs), step(*xs), rtol=1e-5, atol=1e-6)
