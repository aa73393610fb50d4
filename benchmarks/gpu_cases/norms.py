"""RMSNorm, LayerNorm, softmax and SwiGLU on the GPU at [8192, 4096] fp16 against torch's own kernels.

The reference computes in fp32 and rounds to fp16; the baseline is what a torch model calls. The config
of each lmforge kernel is picked by a quick measurement over its CANDIDATE_CONFIGS unless --quick.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.gpu_cases import Pending, describe, pick_fastest
from lmforge.backends.triton import norms

ROWS, COLS = 8192, 4096
EPS = 1e-6


def _tuned(kernel: str, quick: bool, run):
    configs = [norms.DEFAULT_CONFIGS[kernel]] if quick else norms.CANDIDATE_CONFIGS[kernel]
    config, fn = pick_fastest(lambda c: (lambda: run(c)), configs)
    return fn, describe(config)


def cases(quick: bool) -> list[Pending]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(ROWS, COLS, device="cuda", generator=gen).half()
    up = torch.randn(ROWS, COLS, device="cuda", generator=gen).half()
    w = (torch.randn(COLS, device="cuda", generator=gen) * 0.1 + 1).half()
    b = (torch.randn(COLS, device="cuda", generator=gen) * 0.1).half()
    io_bytes = 2 * ROWS * COLS * 2            # read x, write y (fp16)
    specs = [
        ("rmsnorm", lambda c: norms.rmsnorm(x, w, EPS, c),
         lambda: F.rms_norm(x.float(), (COLS,), w.float(), EPS).half(),
         lambda: F.rms_norm(x, (COLS,), w, EPS), "torch F.rms_norm", io_bytes, 4 * ROWS * COLS),
        ("layernorm", lambda c: norms.layernorm(x, w, b, EPS, c),
         lambda: F.layer_norm(x.float(), (COLS,), w.float(), b.float(), EPS).half(),
         lambda: F.layer_norm(x, (COLS,), w, b, EPS), "torch F.layer_norm", io_bytes, 8 * ROWS * COLS),
        ("softmax", lambda c: norms.softmax(x, -1, c),
         lambda: torch.softmax(x.float(), -1).half(),
         lambda: torch.softmax(x, -1), "torch.softmax", io_bytes, 5 * ROWS * COLS),
        ("swiglu", lambda c: norms.swiglu(x, up, c),
         lambda: (F.silu(x.float()) * up.float()).half(),
         lambda: F.silu(x) * up, "torch F.silu(g) * u", 3 * ROWS * COLS * 2, 6 * ROWS * COLS),
    ]

    def build(name, run, reference, baseline, baseline_name, nbytes, flops) -> dict:
        kernel, note = _tuned(name, quick, run)
        return {"name": f"norms/{name}_{ROWS}x{COLS}_fp16", "kernel": kernel, "reference": reference,
                "baseline": baseline, "baseline_name": baseline_name, "rtol": 1e-2, "atol": 1e-2,
                "bytes": nbytes, "flops": flops, "note": note}

    return [Pending(f"norms/{spec[0]}", lambda spec=spec: build(*spec)) for spec in specs]
