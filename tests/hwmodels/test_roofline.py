"""Roofline time and Kinetics eFLOPs of op costs on preset targets."""
import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lmforge.hwmodels import PRESETS, eflops, get_target, node_time
from lmforge.hwmodels.instances import bmm, linear
from lmforge.ir.cost import Cost


def _flops_counted_by_torch(inst) -> int:
    """FLOPs torch's own counter sees when the instance's reference runs on fresh random inputs."""
    run = inst.runner("cpu")
    with FlopCounterMode(display=False) as counter:
        out = run()
    assert tuple(out.shape) == tuple(_out_shape(inst))
    return counter.get_total_flops()


def _out_shape(inst):
    from lmforge.ir.ops import get_op

    return get_op(inst.op).infer(list(inst.in_types), dict(inst.attrs))[0].shape


@pytest.mark.parametrize("inst", [linear(1, 64, 48, "float32"), linear(7, 40, 24, "float32"),
                                  bmm(3, 8, 16, 12, "float32")], ids=lambda i: i.name)
def test_instance_flops_agree_with_torch_flop_counter(inst):
    assert inst.cost().flops == _flops_counted_by_torch(inst)


@pytest.mark.parametrize("target", ["h100", "h100-pcie", "a100", "h200", "l4"])
def test_batch1_decode_gemv_is_memory_bound(target):
    est = node_time(linear(1, 4096, 4096, "float16").cost(), get_target(target))
    assert est.bound == "memory"
    assert est.intensity < est.ridge
    assert est.memory_s > 10 * est.compute_s


@pytest.mark.parametrize("target", ["h100", "a100", "b200", "rtx4090"])
def test_large_square_matmul_is_compute_bound(target):
    est = node_time(linear(8192, 8192, 8192, "float16").cost(), get_target(target))
    assert est.bound == "compute"
    assert est.intensity > est.ridge
    assert est.compute_s > 5 * est.memory_s


def _random_costs(seed, n=12):
    rng = np.random.default_rng(seed)
    classes = ["matmul", "attention", "norm", "elementwise", "reduction"]
    dtypes = ["float32", "float16", "bfloat16", "float8_e4m3fn", "int8"]
    return [Cost.of(10 ** rng.uniform(3, 13), 10 ** rng.uniform(3, 11), str(rng.choice(classes)),
                    str(rng.choice(dtypes))) for _ in range(n)]


@pytest.mark.parametrize("hw", PRESETS, ids=lambda h: h.name)
def test_time_is_max_of_compute_and_memory_plus_launch(hw):
    for c in _random_costs(seed=PRESETS.index(hw)):
        ec, em = hw.efficiency[c.op_class]
        compute = c.flops / (hw.peak_flops[c.dtype] * ec)
        memory = c.bytes / (hw.memory_bandwidth * em)
        est = node_time(c, hw)
        assert est.time_s == pytest.approx(max(compute, memory) + hw.launch_overhead_s, rel=1e-12)
        assert est.bound == ("compute" if compute >= memory else "memory")
        assert est.ridge == pytest.approx(hw.peak_flops[c.dtype] / hw.memory_bandwidth)


@pytest.mark.parametrize("hw", PRESETS, ids=lambda h: h.name)
def test_eflops_is_flops_plus_intensity_times_bytes(hw):
    for c in _random_costs(seed=7):
        i = hw.peak_flops[c.dtype] / hw.memory_bandwidth
        assert eflops(c, hw) == pytest.approx(c.flops + i * c.bytes, rel=1e-12)
        # eFLOPs / peak is the time with no overlap and no inefficiency.
        ideal = node_time(c, hw, eff=(1.0, 1.0))
        assert eflops(c, hw) / hw.peak_flops[c.dtype] == pytest.approx(ideal.compute_s + ideal.memory_s, rel=1e-12)


def test_given_efficiency_overrides_the_hardwares():
    hw, c = get_target("h100"), linear(4096, 4096, 4096, "bfloat16").cost()
    slow = node_time(c, hw, eff=(0.25, 0.25))
    assert slow.compute_s == pytest.approx(c.flops / (hw.peak("bfloat16") * 0.25))
    assert slow.time_s > node_time(c, hw).time_s


@pytest.mark.parametrize("tier, bandwidth_of", [
    ("host", lambda hw: hw.host_link[1]), ("peer", lambda hw: hw.interconnect[1]),
    ("dram", lambda hw: hw.memory_bandwidth), ("l2", lambda hw: hw.memory_bandwidth),
])
def test_bytes_in_a_tier_move_at_that_tiers_bandwidth(tier, bandwidth_of):
    hw = get_target("h100")
    n = float(torch.randint(1 << 20, 1 << 30, (1,), generator=torch.Generator().manual_seed(3)))
    c = Cost.of(0.0, n, "data_movement", "float16", tier=tier)
    em = hw.efficiency["data_movement"][1]
    assert node_time(c, hw).memory_s == pytest.approx(n / (bandwidth_of(hw) * em))
    assert eflops(c, hw) == pytest.approx(hw.peak("float16") / bandwidth_of(hw) * n)


def test_mixed_tiers_add_up():
    hw = get_target("a100")
    c = Cost(0.0, (("dram", 1e9), ("host", 1e8)), "data_movement", "float16")
    em = hw.efficiency["data_movement"][1]
    assert node_time(c, hw).memory_s == pytest.approx(1e9 / (hw.memory_bandwidth * em) + 1e8 / (hw.host_link[1] * em))


def test_launch_overhead_of_the_op_class():
    hw = get_target("h100").with_efficiency({}, launch_overhead_s=5e-6, launch_by_class={"attention": 2e-5})
    assert node_time(Cost.of(1e6, 1e6, "attention", "float16"), hw).launch_s == 2e-5
    assert node_time(Cost.of(1e6, 1e6, "matmul", "float16"), hw).launch_s == 5e-6


def test_an_op_that_does_nothing_costs_nothing():
    est = node_time(Cost.of(0.0, 0.0, "data_movement"), get_target("h100"))
    assert est.time_s == 0.0 and est.launch_s == 0.0 and est.eflops == 0.0
