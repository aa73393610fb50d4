"""TVM targets: the host CPU (with the features LLVM detects here) and CUDA GPUs by architecture.

TVM 0.27 takes targets as dicts. The host target names the CPU LLVM reports (`znver4`, `sapphirerapids`,
...) so that the generated code uses every vector extension the machine has (AVX-512 where present).
CUDA targets need no GPU to build: TVM emits CUDA C and compiles it to PTX with nvcc.

    host_target()            -> {"kind": "llvm", "mcpu": "znver4"}
    cuda_target("sm_90", 256) -> {"kind": "cuda", "arch": "sm_90", "max_num_threads": 256, ...}
"""
from __future__ import annotations

import functools
import re

from lmforge.errors import TargetError

_ARCH = re.compile(r"^sm_(\d{2,3})[a-z]?$")


@functools.lru_cache(maxsize=1)
def host_cpu() -> str:
    """The CPU name LLVM detects on this machine (e.g. "znver4"); "generic" if LLVM cannot tell."""
    from tvm.target import codegen

    try:
        return str(codegen.llvm_get_system_cpu()) or "generic"
    except Exception:  # an LLVM built without host detection
        return "generic"


def host_target() -> dict:
    """The LLVM target for the host CPU, with its features (vector width) implied by the CPU name."""
    return {"kind": "llvm", "mcpu": host_cpu()}


def cuda_target(arch: str, max_threads: int = 1024) -> dict:
    """A CUDA target for `arch` ("sm_80", "sm_90", ...). `max_threads` bounds the threads per block."""
    if not _ARCH.match(arch):
        raise TargetError(f"CUDA arch {arch!r} is not of the form 'sm_80' / 'sm_90' / 'sm_90a'; "
                          f"name the compute capability of the GPU you build for")
    # 48 KiB: the shared memory a block gets without opting in (TVM warns per build when the target lacks it)
    return {"kind": "cuda", "arch": arch, "max_num_threads": int(max_threads),
            "max_shared_memory_per_block": 48 * 1024}


def target_key(target: dict) -> tuple:
    """A hashable form of a target dict (for build caches)."""
    return tuple(sorted((k, str(v)) for k, v in target.items()))
