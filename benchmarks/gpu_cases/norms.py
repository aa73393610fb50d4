"""RMSNorm, LayerNorm, softmax, SwiGLU and a fused elementwise region on the GPU at [8192, 4096] fp16 against
torch's own kernels.

The reference computes in fp32 and rounds to fp16; the baseline is what a torch model calls. The config
of each lmforge kernel is picked by a quick measurement over its CANDIDATE_CONFIGS unless --quick. The fused
region is gelu_tanh(x) * w + up (w [4096] broadcast over the rows, up a residual), run by the kernel the Triton
backend generates from the region (lmforge.backends.triton.elementwise), against the three eager torch ops.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.gpu_cases import Pending, describe, device, pick_fastest
from lmforge.backends.triton import elementwise, norms

ROWS, COLS = 8192, 4096
EPS = 1e-6
KERNELS = ("rmsnorm", "layernorm", "softmax", "swiglu", "fused_elementwise")


def _tuned(kernel: str, quick: bool, run):
    module, key = (elementwise, "elementwise") if kernel == "fused_elementwise" else (norms, kernel)
    configs = [module.DEFAULT_CONFIGS[key]] if quick else module.CANDIDATE_CONFIGS[key]
    config, fn = pick_fastest(lambda c: (lambda: run(c)), configs)
    return fn, describe(config)


def _gelu_scale_residual(rows: int, cols: int):
    """fn(config) -> fn(x, w, up) running the fused node of gelu_tanh(x) * w + up ([rows, cols], w [cols], fp16)
    with the generated kernel, as the Triton backend claims it (one launcher per config)."""
    from lmforge.ir.graph import GraphBuilder
    from lmforge.ir.types import TensorType

    shapes = [(rows, cols), (cols,), (rows, cols)]
    region = GraphBuilder("region")
    x, w, r = (region.input(f"a{i}", TensorType(s, "float16")) for i, s in enumerate(shapes))
    y = region.op("add", [region.op("mul", [region.op("gelu", [x], {"approximate": "tanh"}), w]), r])
    outer = GraphBuilder("fused_elementwise")
    inputs = [outer.input(f"x{i}", TensorType(s, "float16")) for i, s in enumerate(shapes)]
    node = outer.build([outer.op("fused", inputs, {"kind": "elementwise"}, regions=[region.build([y])])]).nodes[0]
    launchers = {}
    return lambda config: launchers.setdefault(config, elementwise.launcher(node, config))


def _inputs(rows: int, cols: int) -> dict:
    """The kernels' inputs on `device()`, from one generator seeded 0: x and up [rows, cols] fp16, the norms'
    weight w and bias b [cols] fp16."""
    gen = torch.Generator(device=device()).manual_seed(0)
    x = torch.randn(rows, cols, device=device(), generator=gen).half()
    up = torch.randn(rows, cols, device=device(), generator=gen).half()
    w = (torch.randn(cols, device=device(), generator=gen) * 0.1 + 1).half()
    b = (torch.randn(cols, device=device(), generator=gen) * 0.1).half()
    return {"x": x, "up": up, "w": w, "b": b}


def _case(name: str, quick: bool, x, up, w, b) -> dict:
    """The case of kernel `name` (one of KERNELS) on inputs from `_inputs`; its config tuned unless quick."""
    rows, cols = x.shape
    fused = _gelu_scale_residual(rows, cols) if name == "fused_elementwise" else None
    io_bytes = 2 * rows * cols * 2            # read x, write y (fp16)
    specs = {   # name: (run(config), reference, baseline, baseline_name, bytes, flops)
        "rmsnorm": (lambda c: norms.rmsnorm(x, w, EPS, c),
                    lambda: F.rms_norm(x.float(), (cols,), w.float(), EPS).half(),
                    lambda: F.rms_norm(x, (cols,), w, EPS), "torch F.rms_norm", io_bytes, 4 * rows * cols),
        "layernorm": (lambda c: norms.layernorm(x, w, b, EPS, c),
                      lambda: F.layer_norm(x.float(), (cols,), w.float(), b.float(), EPS).half(),
                      lambda: F.layer_norm(x, (cols,), w, b, EPS), "torch F.layer_norm", io_bytes, 8 * rows * cols),
        "softmax": (lambda c: norms.softmax(x, -1, c),
                    lambda: torch.softmax(x.float(), -1).half(),
                    lambda: torch.softmax(x, -1), "torch.softmax", io_bytes, 5 * rows * cols),
        "swiglu": (lambda c: norms.swiglu(x, up, c),
                   lambda: (F.silu(x.float()) * up.float()).half(),
                   lambda: F.silu(x) * up, "torch F.silu(g) * u", 3 * rows * cols * 2, 6 * rows * cols),
        "fused_elementwise": (lambda c: fused(c)(x, w, up),
                              lambda: (F.gelu(x.float(), approximate="tanh") * w.float() + up.float()).half(),
                              lambda: F.gelu(x, approximate="tanh") * w + up, "torch gelu(x, tanh) * w + r (3 ops)",
                              3 * rows * cols * 2 + cols * 2, 12 * rows * cols),
    }
    run, reference, baseline, baseline_name, nbytes, flops = specs[name]
    kernel, note = _tuned(name, quick, run)
    return {"name": f"norms/{name}_{rows}x{cols}_fp16", "kernel": kernel, "reference": reference,
            "baseline": baseline, "baseline_name": baseline_name, "rtol": 1e-2, "atol": 1e-2,
            "bytes": nbytes, "flops": flops, "note": note}


def cases(quick: bool) -> list[Pending]:
    """One entry per kernel at [ROWS, COLS]; the inputs are made now (shared), each kernel tuned when built."""
    inputs = _inputs(ROWS, COLS)
    return [Pending(f"norms/{name}", lambda name=name: _case(name, quick, **inputs)) for name in KERNELS]
