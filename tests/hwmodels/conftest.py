"""Fixtures of the hardware-model tests: an isolated lmforge cache and a CPU Hardware that needs no probe."""
import pytest

from lmforge.hwmodels.hardware import Hardware


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    """Point the lmforge cache at a fresh folder, so tests never read or write the user's cache."""
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    return tmp_path


@pytest.fixture
def cpu_hw() -> Hardware:
    """A plausible 2-core CPU (numbers of the order the host probe measures), fixed so tests are exact."""
    return Hardware(
        name="test-cpu", arch="host", kind="cpu",
        peak_flops={"float32": 1.5e11, "tfloat32": 1.5e11, "float16": 3e11, "bfloat16": 3e11,
                    "float8_e4m3fn": 3e11, "int8": 1.5e11},
        memory_bytes=16 * 2**30, memory_bandwidth=2e10, l2_bytes=2**20, sm_count=2, smem_per_sm=32768,
        regs_per_sm=0, max_smem_per_block=32768, interconnect=("host memory", 2e10),
        host_link=("host memory", 2e10), launch_overhead_s=2e-6).validate()
