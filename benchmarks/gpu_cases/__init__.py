"""Benchmark cases for benchmarks/gpu_check.py, one module per kernel family.

Each module defines `cases(quick: bool) -> list[dict | Pending]`; a case is a dict with
    name           short unique name ("quant/int4_gemv_N4096_K4096")
    kernel         zero-arg callable running the lmforge kernel, returning its output
    reference      zero-arg callable returning the exact answer (torch, fp32 math)
    baseline       zero-arg callable running what the kernel replaces (cuBLAS, torch)
    baseline_name  e.g. "cuBLAS fp16 (F.linear)"
    rtol, atol     tolerances of torch.testing.assert_close(kernel(), reference())
    bytes, flops   the kernel's minimal memory traffic and arithmetic, for GB/s and TFLOP/s
and optionally `note` (e.g. the config the quick tuning picked) and `stages`, {name: zero-arg callable}: parts
of the kernel's pipeline that gpu_check times alone (GPU time, `graph_time_ms`) and lists in the note, to show
where a multi-launch kernel spends its time, and `graph_timing`: False for a kernel that replays a CUDA graph
itself (gpu_check then leaves the graph columns empty instead of capturing it again). Inputs are built on
`device()` (CUDA) inside cases(), or, for a `Pending` entry, inside its build() when gpu_check gets to it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


# Where the attention, quant and norms builders make their inputs: "cuda" for gpu_check; the CPU test
# (tests/test_gpu_cases_cpu.py) sets "cpu" and calls the builders at tiny shapes under Triton's interpreter, so
# a builder's wiring is checked before the one GPU run.
DEVICE = {"name": "cuda"}


def device() -> str:
    """The device the case builders put their tensors (and generators) on: DEVICE["name"]."""
    return DEVICE["name"]


@dataclass
class Pending:
    """A case (or several) built only when gpu_check reaches it: its inputs made, its kernels compiled and its
    candidate configs swept then, so that a failure costs this entry alone and the run's time budget
    (`gpu_check --budget`) can skip what is left. `build()` returns a case dict or a list of them; `label` names
    the entry in an error or skipped row."""

    label: str
    build: Callable[[], "dict | list[dict]"]


def pending(family: str, builder: Callable, *args, seeded: bool = False, **kwargs) -> Pending:
    """`builder(*args, **kwargs)` as a Pending entry, labelled by the family, the builder and the arguments that
    tell the entries apart (shapes, knobs, dtypes; not flags, generators or tensors). seeded: the builder takes a
    torch.Generator first, made when it is built and seeded from the label, so an entry's inputs are the same
    whichever entries are built before it (--only, --budget, a failed build)."""
    def shown(a) -> bool:
        return not isinstance(a, bool) and not hasattr(a, "device")

    plain = [repr(a) for a in args if shown(a)] + [f"{k}={v!r}" for k, v in kwargs.items() if shown(v)]
    label = f"{family}/{builder.__name__.lstrip('_')}({', '.join(plain)})"
    if seeded:
        return Pending(label, lambda: builder(label_generator(label), *args, **kwargs))
    return Pending(label, lambda: builder(*args, **kwargs))


def label_generator(label: str):
    """A torch.Generator on `device()` seeded from a sha256 of `label`."""
    import hashlib

    import torch

    seed = int.from_bytes(hashlib.sha256(label.encode()).digest()[:7], "little")
    return torch.Generator(device=device()).manual_seed(seed)


def graph_time_ms(fn, reps: int = 20, trials: int = 5, flush_mb: int = 128) -> float:
    """Median GPU time of one fn() call with a cold L2 cache, without CPU launch overhead.

    triton.testing.do_bench times each call between CUDA events, so a call whose Python launch path takes
    longer than the cache flush before it is timed partly on the CPU (a fast GEMV then looks as slow as
    its launcher). Here `reps` x (flush, fn) is captured in one CUDA graph and so is `reps` x flush alone;
    the per-call time is the difference of their replay times / reps (median over `trials`). This is how
    a decode step runs in deployment: captured in a graph, each layer's weights cold in L2.
    """
    import statistics

    import torch

    flush = torch.empty(flush_mb * 2 ** 20 // 4, dtype=torch.int32, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (compile, allocate) outside the capture
        for _ in range(2):
            flush.zero_()
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()

    def capture(with_fn: bool):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(reps):
                flush.zero_()
                if with_fn:
                    fn()
        return graph

    both, flush_only = capture(True), capture(False)

    def replay_ms(graph) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)

    replay_ms(both), replay_ms(flush_only)
    diffs = [(replay_ms(both) - replay_ms(flush_only)) / reps for _ in range(trials)]
    return max(statistics.median(diffs), 1e-6)


# Wall-clock time (time.time()) after which pick_fastest stops sweeping and takes each list's first config, so
# that a whole gpu_check run fits a short GPU lease; gpu_check sets it (--sweep-budget) and reports the cuts.
SWEEP = {"deadline": None, "cut": 0}


def pick_fastest(make_kernel, configs, reps: int = 10, trials: int = 3):
    """The (config, kernel) of `configs` whose kernel `make_kernel(config)` runs fastest (`graph_time_ms`).

    A config that raises (does not compile, runs out of resources) is skipped, as Triton's autotuner
    does; if every config fails, the first config's kernel is returned so the case reports the error.
    Past SWEEP["deadline"] only the first config is tried (counted in SWEEP["cut"]). A single candidate is
    returned untimed: there is nothing to choose (and gpu_check runs and times it anyway).
    """
    import time

    if SWEEP["deadline"] is not None and time.time() > SWEEP["deadline"] and len(configs) > 1:
        SWEEP["cut"] += 1
        configs = configs[:1]
    if len(configs) == 1:
        return configs[0], make_kernel(configs[0])
    best = None
    for config in configs:
        kernel = make_kernel(config)
        try:
            kernel()
            ms = graph_time_ms(kernel, reps=reps, trials=trials)
        except Exception:  # noqa: BLE001 - a failing candidate is simply not chosen
            continue
        if best is None or ms < best[0]:
            best = (ms, config, kernel)
    if best is None:
        return configs[0], make_kernel(configs[0])
    return best[1], best[2]


def describe(config) -> str:
    """A short text for a KernelConfig: its params, warps and stages."""
    params = ",".join(f"{k}={v}" for k, v in config.params)
    return f"{params},w{config.num_warps},s{config.num_stages}"
