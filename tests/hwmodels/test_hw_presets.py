"""Hardware values and the target registry: presets validate, serialize, resolve by alias; bad ones fail."""
import dataclasses
import json

import pytest

from lmforge.errors import TargetError
from lmforge.hwmodels import PEAK_DTYPES, PRESETS, Hardware, get_target, targets
from lmforge.hwmodels import host as host_mod
from lmforge.hwmodels.presets import target_for_device_name


@pytest.mark.parametrize("hw", PRESETS, ids=lambda h: h.name)
def test_preset_validates_and_is_self_consistent(hw):
    assert hw.validate() is hw
    assert set(PEAK_DTYPES) <= set(hw.peak_flops)
    # Tensor cores never lose to the non-tensor FP32 pipe, and 8-bit is never slower than 16-bit.
    assert hw.peak("bfloat16") >= hw.peak("float32")
    assert hw.peak("float8_e4m3fn") >= hw.peak("float16")
    assert hw.peak("int8") >= hw.peak("float16")
    assert hw.host_link[1] <= hw.interconnect[1] <= hw.memory_bandwidth


@pytest.mark.parametrize("hw", PRESETS, ids=lambda h: h.name)
def test_preset_json_round_trip_keeps_fingerprint(hw):
    back = Hardware.from_dict(json.loads(json.dumps(hw.to_dict())))
    assert back == hw
    assert back.fingerprint() == hw.fingerprint()


@pytest.mark.parametrize("change", [
    {"memory_bandwidth": 3.36e12}, {"name": "other"}, {"launch_overhead_s": 5e-6}, {"sm_count": 131},
])
def test_fingerprint_changes_with_any_number(change):
    hw = get_target("h100")
    assert dataclasses.replace(hw, **change).fingerprint() != hw.fingerprint()


def test_fingerprints_are_distinct_across_presets():
    assert len({hw.fingerprint() for hw in PRESETS}) == len(PRESETS)


@pytest.mark.parametrize("change, message", [
    ({"memory_bandwidth": 3350.0}, "memory_bandwidth"),                      # GB/s typed as B/s
    ({"peak_flops": {**get_target("h100").peak_flops, "bfloat16": 989.5}}, "peak[bfloat16]"),  # TFLOP/s
    ({"peak_flops": {"float32": 6.7e13}}, "no peak for float16"),
    ({"memory_bytes": 80.0}, "memory_bytes"),                                # GiB typed as bytes
    ({"launch_overhead_s": 4.0}, "launch_overhead_s"),                       # us typed as s
    ({"sm_count": 0}, "sm_count"),
    ({"host_link": ("PCIe", 1e13)}, "host_link"),                            # faster than HBM: impossible
    ({"kind": "tpu"}, "kind"),
    ({"launch_by_class": {"matmul": 3.0}}, "launch_by_class"),
])
def test_validate_rejects_unit_mistakes(change, message):
    bad = dataclasses.replace(get_target("h100"), **change)
    with pytest.raises(TargetError, match=message.replace("[", r"\[").replace("]", r"\]")):
        bad.validate()


@pytest.mark.parametrize("alias, canonical", [
    ("h100", "H100-SXM"), ("H100", "H100-SXM"), ("h100 pcie", "H100-PCIe"), ("a100", "A100-80GB-SXM"),
    ("A100-40GB", "A100-40GB-SXM"), ("a100_80gb_sxm", "A100-80GB-SXM"), ("h200", "H200-SXM"), ("B200", "B200"),
    ("l40s", "L40S"), ("L4", "L4"), ("rtx 4090", "RTX-4090"), ("4090", "RTX-4090"),
])
def test_get_target_aliases(alias, canonical):
    assert get_target(alias).name == canonical


@pytest.mark.parametrize("device_name, preset", [
    ("NVIDIA H100 80GB HBM3", "H100-SXM"), ("NVIDIA H100 PCIe", "H100-PCIe"), ("NVIDIA H200", "H200-SXM"),
    ("NVIDIA A100-SXM4-40GB", "A100-40GB-SXM"), ("NVIDIA A100-SXM4-80GB", "A100-80GB-SXM"),
    ("NVIDIA L40S", "L40S"), ("NVIDIA L4", "L4"), ("NVIDIA GeForce RTX 4090", "RTX-4090"), ("NVIDIA B200", "B200"),
])
def test_target_for_cuda_device_name(device_name, preset):
    assert target_for_device_name(device_name).name == preset


@pytest.mark.parametrize("device_name, near", [
    ("NVIDIA L40", None), ("NVIDIA GH200 480GB", None), ("NVIDIA GH200 144G HBM3e", None), ("NVIDIA H20", None),
    ("NVIDIA H800 PCIe", None), ("NVIDIA GB200", None), ("NVIDIA H100 NVL", "H100"), ("NVIDIA H200 NVL", "H200-SXM"),
    ("NVIDIA A100 80GB PCIe", "A100-80GB-SXM"), ("NVIDIA A100-PCIE-40GB", "A100"),
    ("NVIDIA GeForce RTX 4090 D", "4090"), ("NVIDIA H100 SXM5 94GB", "H100"), ("NVIDIA A100-SXM-64GB", None),
])
def test_other_cards_named_like_a_preset_get_none(device_name, near):
    # Substring matching filed these under L4, H200-SXM, H100-SXM, ...: another card's numbers and calibration.
    with pytest.raises(TargetError, match="no preset matches") as err:
        target_for_device_name(device_name)
    if near:
        assert "a variant of" in str(err.value) and near in str(err.value)


@pytest.mark.parametrize("device_name", ["NVIDIA H100 80GB HBM3 MIG 1g.10gb", "NVIDIA A100-SXM4-40GB MIG 3g.20gb"])
def test_a_mig_slice_gets_no_preset(device_name):
    with pytest.raises(TargetError, match="MIG slice"):
        target_for_device_name(device_name)


@pytest.mark.parametrize("preset, reported_mib", [
    ("H100-SXM", 81559), ("H100-PCIe", 81559), ("H200-SXM", 143771), ("B200", 183359), ("L40S", 46068),
    ("L4", 23034), ("RTX-4090", 24564), ("A100-80GB-SXM", 81920), ("A100-40GB-SXM", 40960),
])
def test_preset_memory_is_what_the_device_reports(preset, reported_mib):
    # The datasheet's "GB" read as GiB overstated H100..RTX 4090 by 12 MiB to 3 GiB, so `fits` accepted graphs the
    # real card cannot hold.
    assert get_target(preset).memory_bytes == reported_mib * 2**20


def test_unknown_gpu_name_is_a_target_error():
    with pytest.raises(TargetError, match="no preset matches"):
        target_for_device_name("NVIDIA T4")


def test_unknown_target_lists_known_names():
    with pytest.raises(TargetError) as err:
        get_target("h900")
    for name in ("H100-SXM", "A100-80GB-SXM", "L4", "host"):
        assert name in str(err.value)


def test_host_target_and_targets_list(tmp_cache, cpu_hw, monkeypatch):
    monkeypatch.setattr(host_mod, "_probe", lambda: cpu_hw)
    assert get_target("HOST") == cpu_hw
    names = [hw.name for hw in targets()]
    assert names[-1] == cpu_hw.name and len(names) == len(PRESETS) + 1
    assert [hw.name for hw in targets(include_host=False)] == [hw.name for hw in PRESETS]


@pytest.mark.parametrize("dtype, runs_at", [
    ("float64", "float32"), ("int4", "int8"), ("uint8", "int8"), ("float8_e5m2", "float8_e4m3fn"),
    ("int64", "float32"), ("bfloat16", "bfloat16"),
])
def test_peak_of_dtypes_without_their_own(dtype, runs_at):
    hw = get_target("h100")
    assert hw.peak(dtype) == hw.peak_flops[runs_at]


def test_with_efficiency_replaces_only_given_classes():
    hw = get_target("l4")
    new = hw.with_efficiency({"matmul": (0.5, 0.6)}, launch_overhead_s=7e-6)
    assert new.eff("matmul") == (0.5, 0.6) and new.launch_overhead_s == 7e-6
    assert new.eff("norm") == hw.eff("norm") and new.peak_flops == hw.peak_flops
    assert new.eff("no-such-class") == hw.eff("other")


def test_describe_and_summary_name_the_numbers():
    hw = get_target("h200")
    assert "H200-SXM" in hw.summary() and "4800 GB/s" in hw.summary()
    text = hw.describe()
    assert hw.fingerprint() in text and "NVLink 4" in text and "float8_e4m3fn" in text


def test_a_hardware_passed_as_target_is_validated():
    # Without a float16 peak, fp16 ran at the fp32 CUDA-core peak (67 instead of 989 TFLOP/s) without a word.
    hw = get_target("h100")
    no_fp16 = dataclasses.replace(hw, peak_flops={k: v for k, v in hw.peak_flops.items() if k != "float16"})
    with pytest.raises(TargetError, match="no peak for float16"):
        get_target(no_fp16)
    assert get_target(hw) is hw
    assert no_fp16.peak("float16") == hw.peak_flops["bfloat16"]   # the same tensor cores, not the fp32 pipe
