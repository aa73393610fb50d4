"""The TVM backend: IR ops lowered to TVM tensor expressions, scheduled by lmforge knobs, built for the
host CPU (and run here) or for CUDA GPUs (CUDA source exported; no GPU needed to build).

    from lmforge.backends.tvm import TVMBackend
    compiled = CompiledModel(graph, backends=[TVMBackend(), TorchReference()])
    print(compiled.inspect())                     # which node runs on tvm, with which schedule
    TVMBackend.cuda_sources(graph, "sm_90")       # {"attention_0.cu": "...", ...}
    tune_op(OpInstance.make("matmul", [a, b]), trials=32)   # real timings on this machine

Modules: `target` (host / CUDA targets), `knobs` (the schedule knobs), `lower_*` (op -> TE), `schedule_cpu` /
`schedule_gpu` (knobs -> TIR schedules), `build` (compile, cache, call with zero-copy torch tensors),
`backend` (TVMBackend.claim), `tune` (tune_op).
"""
from lmforge.backends.tvm.backend import TVMBackend
from lmforge.backends.tvm.knobs import KNOBS
from lmforge.backends.tvm.target import cuda_target, host_target
from lmforge.backends.tvm.tune import OpInstance, TuneOpResult, tune_op

__all__ = ["TVMBackend", "KNOBS", "OpInstance", "TuneOpResult", "tune_op", "cuda_target", "host_target"]
