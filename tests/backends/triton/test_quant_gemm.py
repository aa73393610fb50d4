"""The swapped-operand weight-only GEMM (lmforge.backends.triton.quant_gemm) against the pure-torch reference.

Without a GPU the kernel runs under TRITON_INTERPRET=1 (tests/conftest.py), so shapes are tiny: M = 5 and 17
(not multiples of BLOCK_M), N = 48 (not a multiple of BLOCK_N), K = 128 / 256. The AOT tests compile it for
sm_80 and sm_90 on any machine.
"""
import re

import pytest
import torch

from lmforge.backends.triton import aot, quant_gemm
from lmforge.backends.triton.config import KernelConfig
from lmforge.backends.triton.quant_gemm import CANDIDATE_CONFIGS, DEFAULT_CONFIG, plan, wo_gemm_swapped
from lmforge.errors import LmforgeError
from lmforge.ir.ops.quant_ref import quantize_weight
from test_quant_kernels import DEVICE, _assert_matches_reference, _problem  # the GEMV/GEMM tests' helpers

# Small tiles so that the tiny problems still span several tiles, a partial last tile and several K steps.
SMALL = KernelConfig.make(num_warps=4, num_stages=2, BLOCK_N=16, BLOCK_M=16, BLOCK_K=32, SPLIT_K=1)


CASES = [(bits, gs, sym, m, k) for bits in (4, 8) for gs in (32, 64, 128) for sym in (True, False)
         for m in (5, 17) for k in (128, 256)]


@pytest.mark.parametrize("bits,group_size,symmetric,m,k", CASES)
def test_matches_reference_fp16(bits, group_size, symmetric, m, k):
    x, qw, b = _problem(48, k, m, bits, group_size, symmetric, torch.float16, seed=m + k + bits + group_size,
                        bias=symmetric)
    _assert_matches_reference(wo_gemm_swapped(x, qw, b, SMALL), x, qw, b)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m", [5, 17])
def test_matches_reference_fp32(bits, m):
    x, qw, b = _problem(48, 256, m, bits, 64, False, torch.float32, seed=11 + m, bias=True)
    _assert_matches_reference(wo_gemm_swapped(x, qw, b, SMALL), x, qw, b)


def test_fp16_activations_with_fp32_scales():
    g = torch.Generator().manual_seed(37)
    qw = quantize_weight(torch.randn(48, 256, generator=g) * 0.05, 4, 64, False).to(DEVICE)  # fp32 scales
    x = torch.randn(17, 256, generator=g).to(torch.float16).to(DEVICE)
    _assert_matches_reference(wo_gemm_swapped(x, qw, None, SMALL), x, qw, None)


@pytest.mark.parametrize("bits", [4, 8])
def test_matches_reference_bf16(bits):
    """Under Triton's interpreter (which multiplies bf16 dot operands as raw integers) quant_common.dot_ieee
    feeds the dot fp32 operands; compiled, the same tl.dot on bf16."""
    x, qw, b = _problem(48, 256, 17, bits, 128, False, torch.bfloat16, seed=13, bias=True)
    _assert_matches_reference(wo_gemm_swapped(x, qw, b, SMALL), x, qw, b)


@pytest.mark.parametrize("config", CANDIDATE_CONFIGS + [DEFAULT_CONFIG.with_(SPLIT_K=3)])
@pytest.mark.parametrize("bits", [4, 8])
def test_every_candidate_config(config, bits):
    x, qw, b = _problem(48, 256, 17, bits, 128, bits == 4, torch.float16, seed=19 + bits, bias=True)
    _assert_matches_reference(wo_gemm_swapped(x, qw, b, config), x, qw, b)


def test_split_k_sums_every_group_once():
    x, qw, b = _problem(48, 512, 5, 4, 32, False, torch.float32, seed=23, bias=True)
    for split_k in (2, 3, 64):  # 64 > the 16 K steps: only the splits with work are launched
        _assert_matches_reference(wo_gemm_swapped(x, qw, b, SMALL.with_(SPLIT_K=split_k)), x, qw, b)


def test_plan_clamps_block_k_to_the_group():
    assert plan(KernelConfig.make(BLOCK_N=64, BLOCK_M=16, BLOCK_K=128, SPLIT_K=0), 32).get("BLOCK_K") == 32
    assert plan(None, 128) == DEFAULT_CONFIG.with_(BLOCK_K=min(DEFAULT_CONFIG.get("BLOCK_K"), 128))
    assert plan(KernelConfig.make(BLOCK_N=64, BLOCK_M=16, BLOCK_K=128, SPLIT_K=0), 128).get("SPLIT_K") == 1


def test_strided_rows_and_empty_input():
    x, qw, _ = _problem(48, 128, 6, 4, 64, True, torch.float32, seed=29)
    wide = torch.zeros(6, 256, device=DEVICE)
    wide[:, :128] = x
    _assert_matches_reference(wo_gemm_swapped(wide[:, :128], qw, None, SMALL), x, qw, None)  # row stride 256
    assert wo_gemm_swapped(x[:0], qw).shape == (0, 48)


@pytest.mark.parametrize("make_args", [
    lambda x, qw: (x[:, :64], qw, None, None),                                  # wrong in_features
    lambda x, qw: (x.to(torch.int32), qw, None, None),                          # unsupported activations
    lambda x, qw: (x, qw, torch.zeros(3, device=x.device), None),              # wrong bias shape
    lambda x, qw: (x, qw, None, KernelConfig.make(BLOCK_N=16)),                 # config lacks knobs
])
def test_user_errors_raise_lmforge_error(make_args):
    x, qw, _ = _problem(8, 128, 5, 4, 32, True, torch.float32, seed=31)
    with pytest.raises(LmforgeError):
        wo_gemm_swapped(*make_args(x, qw))


ARCHS = ["sm_80", "sm_90"]
SPECS = {spec.name: spec for spec in quant_gemm.aot_specs(torch.float16, 128, 4096)}
# bf16's compile for both archs (the interpreter runs its dot on fp32 operands: test_matches_reference_bf16)
SPECS.update({spec.name: spec for spec in quant_gemm.aot_specs(torch.bfloat16, 64, 4096) if "int4" in spec.name})


@pytest.fixture(scope="module")
def built():
    """Both specs (int4, int8) for both archs with the default config, one build batch."""
    keys = [(name, arch) for name in sorted(SPECS) for arch in ARCHS]
    return dict(zip(keys, aot.build_many(aot.spec_request(SPECS[name], arch) for name, arch in keys)))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", sorted(SPECS))
def test_aot_builds_within_arch_limits(built, name, arch):
    binary = built[name, arch]
    assert isinstance(binary, aot.KernelBinary), binary  # else: the compiler's message
    assert binary.cubin[:4] == b"\x7fELF"
    report = aot.ResourceReport.of(binary)
    assert aot.violations(report, aot.ARCH_LIMITS[arch]) == []
    assert report.spill_stores == report.spill_loads == 0
    group_size = binary.metadata["constexprs"]["GROUP_SIZE"]
    assert binary.metadata["constexprs"]["BLOCK_K"] == min(128, group_size)  # plan() clamps BLOCK_K


def test_aot_sm90_uses_wgmma_with_the_weight_from_registers(built):
    """The point of the design: on Hopper the dot is a wgmma whose A operand (the weight) is in registers."""
    ptx = built["wo_gemm_swapped_int4_g128_fp16", "sm_90"].ptx
    wgmma = [line.strip() for line in ptx.splitlines() if "wgmma.mma_async" in line]
    assert wgmma, "expected wgmma on sm_90"
    # register-A form: accumulators {...}, then A as a second {...} register list, then B's smem descriptor
    # (the shared-memory-A form has a 64-bit descriptor %rd... in A's place)
    assert all(re.search(r"\}, \{%r[^}]*\}, %rd\d+", line) for line in wgmma), wgmma[:2]
    assert "cp.async" in ptx  # x and the packed weight are pipelined global -> shared copies
