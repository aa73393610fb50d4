"""Kinetics best-of-N: the per-token form sums to the closed form, and cost grows with L_out as it says."""
import math

import pytest

from lmforge.hwmodels import decode_step_cost, eflops, get_target, kinetics_best_of_n
from lmforge.hwmodels.kinetics import model_dims
from lmforge.ir.cost import Cost

# (P, N, L_in, L_out, r, D, I): small numbers, and real models (Llama-3-8B: 32 layers, 8 KV heads of 128,
# 32 query heads; Qwen2.5-0.5B-like: 24 layers, 2 KV heads of 64, 14 query heads) on H100-like I.
_LLAMA_R, _LLAMA_D = model_dims(layers=32, kv_heads=8, head_dim=128, q_heads=32)
_QWEN_R, _QWEN_D = model_dims(layers=24, kv_heads=2, head_dim=64, q_heads=14)
CASES = [
    (10.0, 1, 3, 1, 1.0, 4.0, 2.0),
    (1e3, 4, 17, 9, 2.0, 16.0, 300.0),
    (8e9, 16, 1024, 4096, _LLAMA_R, _LLAMA_D, 295.4),
    (4.9e8, 64, 300, 2000, _QWEN_R, _QWEN_D, 295.4),
    (7e10, 3, 8192, 777, 8.0, 2 * 80 * 8 * 128, 412.2),
]


@pytest.mark.parametrize("P, N, L_in, L_out, r, D, I", CASES)
def test_per_step_costs_sum_to_the_closed_form(P, N, L_in, L_out, r, D, I):
    closed = kinetics_best_of_n(P, N, L_in, L_out, r, D, I)
    steps = [decode_step_cost(P, N, L_in, t, r, D, I) for t in range(1, L_out + 1)]
    for key in ("compute", "memory", "eflops"):
        total = math.fsum(s[key] for s in steps)
        assert total == pytest.approx(closed[key], rel=1e-9)


@pytest.mark.parametrize("P, N, L_in, L_out, r, D, I", CASES)
def test_closed_form_terms(P, N, L_in, L_out, r, D, I):
    got = kinetics_best_of_n(P, N, L_in, L_out, r, D, I)
    compute = 2 * N * P * L_out + 2 * r * N * L_in * D * L_out + r * N * D * L_out ** 2
    memory = 2 * L_in * D * L_out + N * D * L_out ** 2
    assert got["compute"] == pytest.approx(compute, rel=1e-12)
    assert got["memory"] == pytest.approx(memory, rel=1e-12)
    assert got["eflops"] == pytest.approx(compute + I * memory, rel=1e-12)


@pytest.mark.parametrize("P, N, L_in, L_out, r, D, I", CASES)
def test_cost_grows_with_l_out_as_the_formula_says(P, N, L_in, L_out, r, D, I):
    f = [kinetics_best_of_n(P, N, L_in, L, r, D, I) for L in (L_out, L_out + 1, L_out + 2)]
    # One more token costs exactly that token's step cost...
    nxt = decode_step_cost(P, N, L_in, L_out + 1, r, D, I)
    for key in ("compute", "memory"):
        assert f[1][key] - f[0][key] == pytest.approx(nxt[key], rel=1e-9)
        assert f[1][key] > f[0][key]
    # ...and the growth itself grows linearly: the second difference is the L_out^2 coefficient times 2.
    assert f[2]["compute"] - 2 * f[1]["compute"] + f[0]["compute"] == pytest.approx(2 * r * N * D, rel=1e-6)
    assert f[2]["memory"] - 2 * f[1]["memory"] + f[0]["memory"] == pytest.approx(2 * N * D, rel=1e-6)


def test_prompt_kv_is_shared_across_samples():
    """Doubling N doubles the per-sample terms but not the prompt's KV reads."""
    one, two = (kinetics_best_of_n(1e9, n, 2048, 256, 4.0, 65536.0, 300.0) for n in (1, 2))
    prompt_reads = 2 * 2048 * 65536.0 * 256
    assert two["memory"] - prompt_reads == pytest.approx(2 * (one["memory"] - prompt_reads))
    assert two["compute"] == pytest.approx(2 * one["compute"])


def test_step_eflops_matches_roofline_eflops_of_the_same_cost():
    hw = get_target("h100")
    i = hw.peak("bfloat16") / hw.memory_bandwidth
    step = decode_step_cost(8e9, 8, 1024, 10, _LLAMA_R, _LLAMA_D, i)
    cost = Cost.of(step["compute"], step["memory"], "attention", "bfloat16")
    assert eflops(cost, hw) == pytest.approx(step["eflops"], rel=1e-12)


def test_step_index_starts_at_one():
    with pytest.raises(ValueError, match="counts from 1"):
        decode_step_cost(1.0, 1, 1, 0, 1.0, 1.0, 1.0)
