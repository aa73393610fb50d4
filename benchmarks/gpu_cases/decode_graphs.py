"""The example Llama's decode step compiled for the GPU, run as generated code and replayed as a CUDA graph.

On a GPU the compiled model launches the Triton kernels itself, and `CompiledModel.use_cuda_graphs()` replays the
generated code as one CUDA graph per input shape (lmforge/backends/cuda_graphs.py), which removes the per-launch
CPU cost of a decode step's many small kernels. This checks both ways of running one step, and what the graph saves.

The model: the example Llama (examples/models/llama.py), preset "5m" (5 layers, dim 256, 8 query / 4 KV heads),
random weights, fp16; one decode step at batch 1 over 128 cached positions, compiled with backends
("triton", "torch") and moved to `device()`, where the Triton backend claims the nodes it has kernels for (the
note says how many, by op). Two rows, both compared on the logits with the torch reference backend (lmforge's
reference ops on the same graph and device) within fp16 tolerance:

    <name>/generated_code   kernel: the generated code; baseline: torch eager (the nn.Module)
    <name>/cuda_graph       kernel: the same code replayed by use_cuda_graphs(); baseline: the generated code, so
                            the speedup is the graph's per step. Its note gives the largest difference between the
                            two ways' logits (the same kernels: expected 0). No graph-timing columns: the kernel is
                            a graph replay already (capturing it again would nest graphs)

Times are do_bench medians per step. Without CUDA (tests/test_gpu_cases_cpu.py, under Triton's interpreter) only
the first row is built: CUDA graphs need a GPU.
"""
from __future__ import annotations

from collections import Counter

import torch

from benchmarks.gpu_cases import Pending, device
from examples.models.llama import Llama, LlamaConfig, LlamaDecodeStep

PRESET = "5m"
BATCH, PAST = 1, 128
DECODE_DYNAMIC = {"tokens": {0: "batch"}, "k_cache": {1: "batch", 3: "past"}, "v_cache": {1: "batch", 3: "past"}}
TOL = {"rtol": 2e-2, "atol": 2e-2}


def _inputs(model: Llama, where, batch: int, past: int) -> tuple:
    """(tokens [batch, 1], k_cache, v_cache) with `past` random cached positions, seeded, on `where`."""
    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (batch, 1), generator=gen)
    shape = (cfg.n_layers, batch, cfg.n_kv_heads, past, cfg.head_dim)
    k, v = (torch.randn(shape, generator=gen).half() for _ in range(2))
    return tuple(t.to(where) for t in (tokens, k, v))


def _logits(fn, inputs):
    """A zero-argument call returning the logits of fn(*inputs), without autograd."""
    def run():
        with torch.no_grad():
            return fn(*inputs)[0]

    return run


def _decode_step(preset: str, batch: int, past: int) -> list[dict]:
    """The rows of one compiled decode step (see the module docstring); the graph row only on CUDA."""
    import lmforge
    from lmforge.backends import default_backends
    from lmforge.compiler import CompiledModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Llama(LlamaConfig.preset(preset)).eval().half()
    step = LlamaDecodeStep(model)
    example = _inputs(model, "cpu", batch=2, past=8)   # torch.export specialises dims of size 1
    compiled = lmforge.compile(step, example, dynamic=DECODE_DYNAMIC, backends=("triton", "torch"))
    code = compiled.to(device())
    reference = CompiledModel(compiled.graph, default_backends(("torch",)), device())
    inputs = _inputs(model, device(), batch, past)
    by_op = Counter(k.detail for k in code.kernels if k.backend == "triton")
    ran = (f"Triton runs {sum(by_op.values())} of {len(code.kernels)} nodes "
           f"({', '.join(f'{op} {n}' for op, n in sorted(by_op.items())) or 'none'}), the torch reference the rest")
    cfg = model.config
    kv_bytes = 2 * cfg.n_layers * batch * cfg.n_kv_heads * past * cfg.head_dim * 2
    common = {"reference": _logits(reference, inputs), **TOL,
              "bytes": sum(w.numel() * w.element_size() for w in code.weights.values()) + kv_bytes,
              "flops": 2 * batch * (cfg.n_params() - cfg.vocab_size * cfg.dim)}   # the matmuls; embedding is a gather
    name = f"decode_graphs/llama_{preset}_fp16_decode_b{batch}_past{past}"
    run_code = _logits(code, inputs)
    rows = [{**common, "name": f"{name}/generated_code", "kernel": run_code,
             "baseline": _logits(step.to(device()), inputs), "baseline_name": "torch eager (nn.Module)", "note": ran}]
    if not str(device()).startswith("cuda"):
        return rows   # CUDA graphs need a GPU: the CPU test builds the generated-code row alone
    run_graph = _logits(compiled.to(device()).use_cuda_graphs(), inputs)
    apart = (run_graph().float() - run_code().float()).abs().max().item()   # the first call captures the graph
    rows.append({**common, "name": f"{name}/cuda_graph", "kernel": run_graph, "baseline": run_code,
                 "baseline_name": "the generated code, no graph", "graph_timing": False,
                 "note": f"use_cuda_graphs(); graph vs generated code max abs diff {apart:.2e}; {ran}"})
    return rows


def cases(quick: bool) -> list[Pending]:
    """One entry, compiled when gpu_check reaches it (small: `quick` changes nothing)."""
    return [Pending(f"decode_graphs/llama_{PRESET}_b{BATCH}_past{PAST}", lambda: _decode_step(PRESET, BATCH, PAST))]
