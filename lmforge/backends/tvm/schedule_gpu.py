"""GPU schedules for CUDA targets: TVM's dlight rules, or a plain thread mapping, sized by lmforge knobs.

`tvm.cuda.rules` = "dlight" applies dlight's rules in priority order (Matmul, GEMV, LowBatchGEMV, Reduction,
GeneralReduction), then Fallback for the blocks none of them matched; "fallback" maps every block's spatial
loops to (blockIdx.x, threadIdx.x) and runs its reductions serially per thread. `tvm.cuda.threads` is the
target's max_num_threads, which both use as the threads per block. Multi-stage lowerings (attention,
softmax) become several kernels with global scratch between them, launched by the host function.
"""
from __future__ import annotations

from typing import Any, Mapping


def schedule_gpu(mod, lowered, knobs: Mapping[str, Any], target: dict):
    import tvm
    from tvm.s_tir import dlight as dl

    gpu = dl.gpu
    if knobs["tvm.cuda.rules"] == "dlight":
        rules = [gpu.Matmul(), gpu.GEMV(), gpu.LowBatchGEMV(), gpu.Reduction(), gpu.GeneralReduction(),
                 gpu.Fallback()]
    else:
        rules = [gpu.Fallback()]
    with tvm.target.Target(target):
        try:
            return dl.ApplyDefaultSchedule(*rules)(mod)
        except Exception:
            if len(rules) == 1:
                raise
            return dl.ApplyDefaultSchedule(gpu.Fallback())(mod)  # a dlight rule tripped: plain mapping
