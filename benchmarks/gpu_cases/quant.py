"""Weight-only quantized linear on the GPU: int4 / int8 GEMV (decode, batch 1; int4 also batch 4), int4 / int8 GEMM.

Baseline: cuBLAS fp16 through torch.nn.functional.linear with the dequantized fp16 weight, i.e. what runs
if the weight is not kept quantized. Weights W [N, K] (out x in), group size 128, fp16 activations.
The config of each lmforge kernel is picked by a quick measurement over the candidates of one design
(CANDIDATE_CONFIGS or UNTIMED_CONFIGS; named in the note; one row per design), unless --quick, which keeps
the default config (or the design's first).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.gpu_cases import Pending, describe, device, pending, pick_fastest
from lmforge.backends.triton.quant_matmul import (CANDIDATE_CONFIGS, DEFAULT_CONFIGS, UNTIMED_CONFIGS,
                                                  kernel_for_rows, linear_weight_only)
from lmforge.ir.ops.quant_ref import dequantize_weight, linear_weight_only_ref, quantize_weight

GEMV_SHAPES = [(4096, 4096), (8192, 8192), (4096, 14336)]   # (N, K)
GEMM_SHAPES = [(4096, 4096), (14336, 4096)]
GEMM_ROWS = [16, 256]
GROUP_SIZE = 128


def _weight_bytes(n: int, k: int, bits: int) -> int:
    groups = k // GROUP_SIZE
    return n * k * bits // 8 + n * groups * (2 + 1)  # codes + fp16 scales + uint8 zeros


# Each kernel's candidates by design, so the table shows every design's best: the measured byte-tile GEMV and
# tiled GEMM (the defaults), and the word-tile GEMV (fp32 and fp16-pair arithmetic) / swapped GEMM, chosen from
# their compiled code, not timed yet.
DESIGNS = {"wo_gemv": {"byte tiles": lambda c: c.get("WORD_TILES", 0) == 0,
                         "word tiles": lambda c: c.get("WORD_TILES", 0) == 1,
                         "fp16 pairs": lambda c: c.get("WORD_TILES", 0) == 2},
           "wo_gemm": {"tiled": lambda c: not c.get("SWAP_AB", 0), "swapped": lambda c: c.get("SWAP_AB", 0)}}


def _case(gen: torch.Generator, kind: str, bits: int, n: int, k: int, m: int, quick: bool, design: str) -> dict:
    w = torch.randn(n, k, device=device(), generator=gen) * 0.02
    qw = quantize_weight(w.half(), bits, GROUP_SIZE, symmetric=True)
    del w
    x = torch.randn(m, k, device=device(), generator=gen).half()
    w_fp16 = dequantize_weight(qw, torch.float16)
    kernel_name = kernel_for_rows(m)
    configs = [c for c in CANDIDATE_CONFIGS[kernel_name] + UNTIMED_CONFIGS[kernel_name]
               if DESIGNS[kernel_name][design](c)]
    if quick:
        configs = [DEFAULT_CONFIGS[kernel_name]] if DEFAULT_CONFIGS[kernel_name] in configs else configs[:1]
    config, kernel = pick_fastest(lambda c: (lambda: linear_weight_only(x, qw, None, c)), configs)
    return {
        "name": f"quant/int{bits}_{kind}_M{m}_N{n}_K{k}/{design.replace(' ', '_')}",
        "kernel": kernel,
        "reference": lambda: linear_weight_only_ref(x, qw),
        "baseline": lambda: F.linear(x, w_fp16),
        "baseline_name": "cuBLAS fp16 (F.linear)",
        "rtol": 2e-2, "atol": 2e-2,
        "bytes": _weight_bytes(n, k, bits) + (m * k + m * n) * 2,
        "flops": 2 * m * n * k,
        "note": f"{kernel_name} {describe(config)}",
    }


def cases(quick: bool) -> list[Pending]:
    """The quantized-linear cases, each built (weights quantized, candidates swept) when gpu_check reaches it."""
    out = []
    for bits in (4, 8):
        for n, k in GEMV_SHAPES[:1] if quick else GEMV_SHAPES:
            for design in DESIGNS["wo_gemv"]:
                out.append(pending("quant", _case, "gemv", bits, n, k, 1, quick, design, seeded=True))
    # batch-4 decode (beams, samples): the fp16-pair design walks the weights once for all 4 rows
    for design in DESIGNS["wo_gemv"]:
        out.append(pending("quant", _case, "gemv", 4, *GEMV_SHAPES[0], 4, quick, design, seeded=True))
    for bits in (4, 8):   # prefill / batched rows (M >= 16): the GEMM kernel, both weight widths
        for n, k in GEMM_SHAPES[:1] if quick else GEMM_SHAPES:
            for m in GEMM_ROWS:
                for design in DESIGNS["wo_gemm"]:
                    out.append(pending("quant", _case, "gemm", bits, n, k, m, quick, design, seeded=True))
    return out
