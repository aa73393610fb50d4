"""Triton weight-only quantized linear (GEMV and GEMM kernels) against the pure-torch reference.

On a machine without a GPU the kernels run under TRITON_INTERPRET=1 (set by tests/conftest.py), so the
shapes are tiny; the same tests run the compiled kernels where CUDA is present.
"""
import pytest
import torch

from lmforge.backends.triton.config import KernelConfig
from lmforge.backends.triton.quant_matmul import (CANDIDATE_CONFIGS, GEMV_MAX_ROWS, UNTIMED_CONFIGS, gemm_plan,
                                                  gemv_plan, kernel_for_rows, linear_weight_only, wo_gemm, wo_gemv)
from lmforge.errors import LmforgeError
from lmforge.ir.ops.quant_ref import QuantizedWeight, dequantize_weight, linear_weight_only_ref, quantize_weight

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def _problem(n, k, m, bits, group_size, symmetric, dtype, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    qw = quantize_weight(w, bits, group_size, symmetric, scale_dtype=dtype).to(DEVICE)
    x = torch.randn(m, k, generator=g).to(dtype).to(DEVICE)
    b = (torch.randn(n, generator=g) * 0.1).to(dtype).to(DEVICE) if bias else None
    return x, qw, b


def _assert_matches_reference(y, x, qw, b):
    expected = linear_weight_only_ref(x, qw, b)
    assert y.dtype == x.dtype and y.shape == expected.shape
    tol = TOLERANCE[x.dtype]
    torch.testing.assert_close(y.float(), expected.float(), rtol=tol, atol=tol)
    rel_l2 = ((y.float() - expected.float()).norm() / expected.float().norm()).item()
    assert rel_l2 < tol


CASES = [(bits, gs, sym, m, dtype) for bits in (4, 8) for gs in (32, 64, 128) for sym in (True, False)
         for m in (1, 3, 17) for dtype in (torch.float32, torch.float16)]


@pytest.mark.parametrize("bits,group_size,symmetric,m,dtype", CASES)
def test_linear_weight_only_matches_reference(bits, group_size, symmetric, m, dtype):
    x, qw, b = _problem(40, 256, m, bits, group_size, symmetric, dtype, seed=m + bits, bias=(m == 3))
    _assert_matches_reference(linear_weight_only(x, qw, b), x, qw, b)


@pytest.mark.parametrize("m", [1, 17])
def test_bf16_activations(m):
    """The GEMV (m = 1) and the GEMM's bf16 tl.dot (m = 17; under Triton's interpreter, which multiplies bf16 dot
    operands as raw integers, quant_common.dot_ieee feeds it fp32)."""
    x, qw, b = _problem(24, 128, m, 4, 64, False, torch.bfloat16, seed=7, bias=True)
    _assert_matches_reference(linear_weight_only(x, qw, b), x, qw, b)


@pytest.mark.parametrize("config", CANDIDATE_CONFIGS["wo_gemv"] + UNTIMED_CONFIGS["wo_gemv"])
@pytest.mark.parametrize("bits", [4, 8])
def test_every_gemv_candidate_config(config, bits):
    x, qw, b = _problem(40, 256, 2, bits, 32, False, torch.float16, seed=3, bias=True)
    _assert_matches_reference(wo_gemv(x, qw, b, config), x, qw, b)


@pytest.mark.parametrize("config", CANDIDATE_CONFIGS["wo_gemm"] + UNTIMED_CONFIGS["wo_gemm"])
@pytest.mark.parametrize("bits", [4, 8])
def test_every_gemm_candidate_config(config, bits):
    x, qw, b = _problem(72, 256, 20, bits, 128, True, torch.float16, seed=4, bias=True)
    _assert_matches_reference(wo_gemm(x, qw, b, config), x, qw, b)


def test_split_k_accumulates_all_groups():
    x, qw, _ = _problem(24, 512, 2, 4, 32, True, torch.float32, seed=5)
    for split_k in (3, 64):
        config = KernelConfig.make(BLOCK_N=16, GROUPS_PER_STEP=4, SPLIT_K=split_k)
        _assert_matches_reference(wo_gemv(x, qw, None, config), x, qw, None)


# Word tiles (WORD_TILES=1): (bits, group_size, rows M, activations, bias, symmetric, BLOCK_N, SPLIT_K).
# N = 36 is not a multiple of any BLOCK_N (the last program clamps its rows), K = 256.
WORD_TILE_CASES = [
    (4, 32, 1, torch.float16, False, False, 8, 1),
    (4, 64, 2, torch.float16, True, True, 4, 1),
    (4, 128, 3, torch.float16, True, False, 16, 1),
    (4, 128, 1, torch.bfloat16, True, False, 8, 1),
    (4, 64, 3, torch.bfloat16, False, True, 8, 2),
    (4, 32, 2, torch.float32, True, False, 4, 3),
    (4, 128, 1, torch.float32, False, True, 8, 2),
    (8, 32, 1, torch.float16, True, False, 8, 1),
    (8, 64, 2, torch.bfloat16, False, False, 4, 2),
    (8, 128, 3, torch.float32, True, True, 8, 1),
]


@pytest.mark.parametrize("bits,group_size,m,dtype,bias,symmetric,block_n,split_k", WORD_TILE_CASES)
def test_word_tile_gemv_matches_reference(bits, group_size, m, dtype, bias, symmetric, block_n, split_k):
    x, qw, b = _problem(36, 256, m, bits, group_size, symmetric, dtype, seed=11 * m + group_size + bits, bias=bias)
    config = KernelConfig.make(num_warps=4, BLOCK_N=block_n, GROUPS_PER_STEP=2, SPLIT_K=split_k, WORD_TILES=1)
    y = wo_gemv(x, qw, b, config)
    _assert_matches_reference(y, x, qw, b)
    # the same numbers as the byte-tile kernel up to fp32 rounding: both sum the same products
    y_bytes = wo_gemv(x, qw, b, config.with_(WORD_TILES=0))
    torch.testing.assert_close(y.float(), y_bytes.float(), rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


@pytest.mark.parametrize("word_tiles,dtype", [(1, torch.float32), (2, torch.float16)])
def test_word_tiles_cover_extreme_codes_and_zeros(word_tiles, dtype):
    """Codes 0 and 15 / 255 and zero points at both ends: the mantissa tricks must stay exact at the edges."""
    g = torch.Generator().manual_seed(12)
    for bits in (4, 8):
        x, qw, _ = _problem(16, 128, 1, bits, 32, False, dtype, seed=13)
        top = (1 << bits) - 1
        codes = torch.randint(0, 2, (16, 128), generator=g) * top                    # only 0 and the top code
        packed = codes[:, 0::2] | (codes[:, 1::2] << 4) if bits == 4 else codes
        zeros = torch.randint(0, 2, qw.zeros.shape, generator=g) * top
        qw = QuantizedWeight(packed.to(torch.uint8).to(DEVICE), qw.scales, zeros.to(torch.uint8).to(DEVICE), bits, 32,
                             qw.shape)
        config = KernelConfig.make(num_warps=4, BLOCK_N=4, GROUPS_PER_STEP=4, SPLIT_K=1, WORD_TILES=word_tiles)
        assert gemv_plan(config, 4, 4, dtype)[0].get("WORD_TILES") == word_tiles
        _assert_matches_reference(wo_gemv(x, qw, None, config), x, qw, None)


# fp16-pair word tiles (WORD_TILES=2; fp16 activations): (bits, group_size, K, rows M, bias, symmetric, BLOCK_N,
# SPLIT_K, num_warps, WORDS_PER_THREAD asked, as the plan runs it). A slot per thread needs K * bits / 32 >= 32 *
# num_warps * WORDS_PER_THREAD, so most cases take 1 warp to keep K small for the interpreter.
HALF_WORD_CASES = [
    (4, 32, 256, 1, False, False, 8, 1, 4, 1, 1),
    (4, 64, 512, 2, True, True, 4, 1, 1, 2, 2),
    (4, 128, 1024, 3, True, False, 16, 1, 1, 4, 4),
    (4, 32, 2048, 1, True, True, 8, 2, 1, 4, 4),     # split-K: two programs of one step each
    (4, 128, 4096, 2, False, False, 4, 1, 4, 4, 4),  # 4 warps
    (4, 32, 512, 2, False, True, 4, 1, 1, 8, 2),     # 8 asked, 4 words per group: 4, then 2 to fill the step
    (4, 64, 512, 4, True, False, 8, 1, 1, 2, 2),
    (4, 32, 256, 4, False, True, 4, 2, 4, 1, 1),
    (8, 32, 256, 1, False, False, 8, 1, 1, 1, 1),
    (8, 64, 512, 3, True, True, 4, 1, 1, 4, 4),
    (8, 128, 1024, 4, True, False, 8, 1, 1, 32, 8),
]


@pytest.mark.parametrize("bits,group_size,k,m,bias,symmetric,block_n,split_k,warps,asked,runs", HALF_WORD_CASES)
def test_fp16_pair_word_tiles_match_reference(bits, group_size, k, m, bias, symmetric, block_n, split_k, warps, asked,
                                              runs):
    x, qw, b = _problem(36, k, m, bits, group_size, symmetric, torch.float16, seed=5 * m + group_size, bias=bias)
    config = KernelConfig.make(num_warps=warps, BLOCK_N=block_n, GROUPS_PER_STEP=1, SPLIT_K=split_k, WORD_TILES=2,
                               WORDS_PER_THREAD=asked)
    assert gemv_plan(config, k // group_size, group_size * bits // 32, torch.float16)[0].get("WORDS_PER_THREAD") == runs
    y = wo_gemv(x, qw, b, config)
    _assert_matches_reference(y, x, qw, b)
    y_words = wo_gemv(x, qw, b, config.with_(WORD_TILES=1))  # fp32 products: the same sum up to fp16 rounding
    torch.testing.assert_close(y.float(), y_words.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("bits,per_thread,x_max", [(4, 1, 4000.0), (4, 4, 4000.0), (8, 1, 4000.0), (8, 4, 1000.0)])
def test_fp16_pair_word_tiles_keep_large_activations_finite(bits, per_thread, x_max):
    """Large |x| (far past normalised activations) with the top code against zero 0: a slot's fp16 sums of
    (32 / bits) / 2 * WORDS_PER_THREAD products of x / 16 (int4) or x / 64 (int8) stay below fp16's 65504 up to
    |x| ~ 17471 / WORDS_PER_THREAD (int4) or ~ 8220 / WORDS_PER_THREAD (int8)."""
    g = torch.Generator().manual_seed(21)
    k = 1024  # 1 warp: a slot of 4 words per thread needs K * bits / 32 >= 128 words per row
    x, qw, _ = _problem(16, k, 1, bits, 32, False, torch.float16, seed=22)
    packed = torch.full((16, k * bits // 8), 0xFF, dtype=torch.uint8)
    scales = torch.full_like(qw.scales, 1e-4)  # keeps the output itself inside fp16's range
    qw = QuantizedWeight(packed.to(DEVICE), scales, torch.zeros_like(qw.zeros), bits, 32, qw.shape)
    x = torch.full((1, k), x_max) * torch.where(torch.rand(1, k, generator=g) < 0.7, 1.0, -1.0)
    x = x.to(torch.float16).to(DEVICE)
    config = KernelConfig.make(num_warps=1, BLOCK_N=4, GROUPS_PER_STEP=1, SPLIT_K=1, WORD_TILES=2,
                               WORDS_PER_THREAD=per_thread)
    assert gemv_plan(config, k // 32, bits, torch.float16)[0].get("WORDS_PER_THREAD") == per_thread
    y = wo_gemv(x, qw, None, config)
    assert torch.isfinite(y).all()
    expected = linear_weight_only_ref(x.float(), qw).float()
    torch.testing.assert_close(y.float(), expected, rtol=1e-2, atol=1e-2 * expected.abs().max().item())


def test_gemv_plan_runs_fp16_pairs_only_for_fp16_activations():
    pairs = KernelConfig.make(num_warps=4, BLOCK_N=8, GROUPS_PER_STEP=2, SPLIT_K=1, WORD_TILES=2)
    assert gemv_plan(pairs, 64, 16, torch.float16)[0].get("WORD_TILES") == 2
    assert gemv_plan(pairs, 64, 16, "float16")[0].get("WORD_TILES") == 2     # the IR's dtype names too
    for activation in (torch.bfloat16, torch.float32, "bfloat16"):
        assert gemv_plan(pairs, 64, 16, activation)[0].get("WORD_TILES") == 1
    # the word-per-thread step applies to both word-tile loops
    assert gemv_plan(pairs, 64, 16, torch.float16)[0].get("GROUPS_PER_STEP") == 8
    # WORDS_PER_THREAD: a power of two dividing the group's words, the step raised to that many per thread;
    # 1 for the other designs and where the plan does not know the group's words
    for asked, words_per_group, expected, groups_per_step in ((4, 16, 4, 32), (3, 16, 2, 16), (8, 4, 2, 64)):
        plan = gemv_plan(pairs.with_(WORDS_PER_THREAD=asked), 64, words_per_group, torch.float16)[0]
        assert (plan.get("WORDS_PER_THREAD"), plan.get("GROUPS_PER_STEP")) == (expected, groups_per_step)
    # K = 14336 (112 groups of 128): 4 words per slot would need 32-group steps; 2 per slot (16 groups) divide it
    plan = gemv_plan(pairs.with_(WORDS_PER_THREAD=4), 112, 16, torch.float16)[0]
    assert (plan.get("WORDS_PER_THREAD"), plan.get("GROUPS_PER_STEP")) == (2, 16)
    assert gemv_plan(pairs.with_(WORDS_PER_THREAD=4), 64, 16, torch.float32)[0].get("WORDS_PER_THREAD") == 1
    assert gemv_plan(pairs.with_(WORDS_PER_THREAD=4), 64)[0].get("WORDS_PER_THREAD") == 1


def test_gemv_plan_gives_word_tiles_a_word_per_thread():
    words = KernelConfig.make(num_warps=4, BLOCK_N=8, GROUPS_PER_STEP=2, SPLIT_K=1, WORD_TILES=1)
    plan, per_split = gemv_plan(words, n_groups=64, words_per_group=16)          # int4, group 128
    assert plan.get("GROUPS_PER_STEP") == 8 and plan.get("WORD_TILES") == 1 and per_split == 64
    assert gemv_plan(words, n_groups=64, words_per_group=4)[0].get("GROUPS_PER_STEP") == 32  # int4, group 32
    assert gemv_plan(words, n_groups=12, words_per_group=4)[0].get("GROUPS_PER_STEP") == 4   # must divide 12
    assert gemv_plan(words, n_groups=64)[0].get("GROUPS_PER_STEP") == 2           # no word count: as configured
    byte_plan = gemv_plan(words.with_(WORD_TILES=0), n_groups=64, words_per_group=16)[0]
    assert byte_plan.get("GROUPS_PER_STEP") == 2 and byte_plan.get("WORD_TILES") == 0
    assert gemv_plan(None, 32)[0].get("WORD_TILES") == 0                          # the default: byte tiles


def test_gemv_plan_keeps_steps_whole_and_gemm_plan_clamps_block_k():
    plan, per_split = gemv_plan(KernelConfig.make(BLOCK_N=8, GROUPS_PER_STEP=8, SPLIT_K=4), n_groups=12)
    assert plan.get("GROUPS_PER_STEP") == 4 and per_split % 4 == 0
    assert plan.get("SPLIT_K") * per_split >= 12 > (plan.get("SPLIT_K") - 1) * per_split
    assert gemm_plan(KernelConfig.make(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, GROUP_M=4), 32).get("BLOCK_K") == 32


def test_leading_dims_and_strided_input():
    g = torch.Generator().manual_seed(6)
    qw = quantize_weight(torch.randn(24, 128, generator=g) * 0.05, 4, 32).to(DEVICE)
    x = torch.randn(2, 3, 256, generator=g).to(DEVICE)[..., ::2]  # last dim strided
    y = linear_weight_only(x, qw)
    assert y.shape == (2, 3, 24)
    _assert_matches_reference(y.reshape(6, 24), x.reshape(6, 128), qw, None)


def test_dispatch_by_rows_and_empty_input():
    assert [kernel_for_rows(m) for m in (1, GEMV_MAX_ROWS, GEMV_MAX_ROWS + 1)] == ["wo_gemv", "wo_gemv", "wo_gemm"]
    _, qw, _ = _problem(8, 64, 1, 4, 32, True, torch.float32)
    assert linear_weight_only(torch.zeros(0, 64, device=DEVICE), qw).shape == (0, 8)


def test_quantized_kernel_tracks_full_precision_linear():
    g = torch.Generator().manual_seed(8)
    w = torch.randn(64, 256, generator=g) * 0.05
    x = torch.randn(5, 256, generator=g).to(DEVICE)
    exact = x @ w.to(DEVICE).T
    for bits, bound in ((4, 0.15), (8, 0.01)):
        y = linear_weight_only(x, quantize_weight(w, bits, 64).to(DEVICE))
        assert ((y - exact).norm() / exact.norm()).item() < bound
    y4 = linear_weight_only(x, quantize_weight(w, 4, 64).to(DEVICE))
    torch.testing.assert_close(y4, x @ dequantize_weight(quantize_weight(w, 4, 64)).to(DEVICE).T,
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("make_args", [
    lambda x, qw: (x[:, :32], qw, None, None),                                  # wrong in_features
    lambda x, qw: (x.to(torch.int32), qw, None, None),                          # unsupported activations
    lambda x, qw: (x, qw, torch.zeros(3, device=x.device), None),              # wrong bias shape
    lambda x, qw: (x, qw, None, KernelConfig.make(BLOCK_N=16)),                 # config lacks knobs
])
def test_user_errors_raise_lmforge_error(make_args):
    x, qw, _ = _problem(8, 64, 1, 4, 32, True, torch.float32)
    with pytest.raises(LmforgeError):
        linear_weight_only(*make_args(x, qw))


def test_group_size_not_power_of_two_is_rejected():
    qw = quantize_weight(torch.randn(8, 96), 4, 48).to(DEVICE)
    with pytest.raises(LmforgeError, match="group_size"):
        linear_weight_only(torch.randn(1, 96, device=DEVICE), qw)
