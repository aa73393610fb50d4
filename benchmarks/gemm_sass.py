"""Static comparison of the weight-only GEMM kernels from their compiled SASS (no GPU needed).

For each kernel and config: compile ahead of time for sm_90 / sm_80 (lmforge.backends.triton.aot), disassemble
the cubin with Triton's bundled nvdisasm (benchmarks/sass_stats.py), find the K loop (the loop whose body holds
the most MMA instructions) and count, per trip (= one K step), the MMA instructions by kind and shape, async
copies (cp.async = LDGSTS, TMA = UTMALDG), plain global loads, shared-memory loads / stores, barriers,
conversions and all instructions; plus ptxas registers / spills and the shared memory Triton allocates.

    python benchmarks/gemm_sass.py                     # int4 g128 fp16, N = K = 4096, sm_90 and sm_80
    python benchmarks/gemm_sass.py --arch sm_90 --bits 8 --sass-dir /tmp/sass   # also keep the SASS text
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.sass_stats import disassemble, main_loop, parse_sass  # noqa: E402
from lmforge.backends.triton import aot, quant_gemm, quant_matmul  # noqa: E402
from lmforge.backends.triton.config import KernelConfig  # noqa: E402

CATEGORIES = [  # (column, opcode prefixes); the first match wins
    ("MMA", ("HGMMA", "HMMA")),
    ("cp.async", ("LDGSTS",)),
    ("TMA", ("UTMALDG", "UBLKCP")),
    ("LDG", ("LDG",)),
    ("LDS", ("LDS", "LDSM")),
    ("STS", ("STS", "STSM")),
    ("bar.sync", ("BAR.SYNC", "BAR.ARV", "BAR.RED")),
    ("mbarrier", ("SYNCS",)),
    ("wgmma wait", ("WARPGROUP.DEPBAR",)),
    ("cp.async wait", ("DEPBAR", "LDGDEPBAR")),
    ("cvt", ("I2F", "I2FP", "F2F", "F2FP", "F2I", "I2I")),
    ("fp math", ("FADD", "FMUL", "FFMA", "HADD2", "HMUL2", "HFMA2", "FSET", "FMNMX")),
]


def k_loop(instructions, labels):
    """The K loop: the loop whose body holds the most MMA instructions (then the longest)."""
    return main_loop(instructions, labels,
                     key=lambda body: (sum(i.opcode.startswith(("HGMMA", "HMMA")) for i in body), len(body)))


def count(body) -> dict[str, object]:
    counts = collections.Counter()
    shapes = collections.Counter()
    for ins in body:
        op = ins.opcode
        if op == "NOP":
            continue
        counts["instructions"] += 1
        for column, prefixes in CATEGORIES:
            if op.startswith(prefixes):
                counts[column] += 1
                if column == "MMA":
                    shapes[op.split(".")[0] + "." + op.split(".")[1]] += 1
                break
    counts["MMA kind"] = " + ".join(f"{n}x {s}" for s, n in sorted(shapes.items())) or "none"
    return dict(counts)


COLUMNS = ["MMA kind", "MMA", "cp.async", "TMA", "LDG", "LDS", "STS", "bar.sync", "mbarrier", "wgmma wait",
           "cp.async wait", "cvt", "fp math", "instructions"]


def analyse(spec, config: KernelConfig, arch: str, sass_dir: Path | None = None) -> dict[str, object]:
    binary = aot.build_spec(spec, arch, config)
    report = aot.ResourceReport.of(binary)
    text = disassemble(binary.cubin)
    if sass_dir is not None:
        sass_dir.mkdir(parents=True, exist_ok=True)
        (sass_dir / f"{binary.name}.sass").write_text(text)
    row = count(k_loop(*parse_sass(text)))
    row.update(registers=report.registers, spills=report.spill_stores + report.spill_loads,
               smem=report.shared_bytes, name=binary.name)
    return row


def kernels(bits: int, group_size: int, k: int):
    """(label, KernelSpec, candidate configs) of the old and the new GEMM for fp16 activations."""
    old = next(s for s in quant_matmul.aot_specs(torch.float16, group_size, k)
               if s.name.startswith(f"wo_gemm_int{bits}"))
    new = next(s for s in quant_gemm.aot_specs(torch.float16, group_size, k) if f"_int{bits}_" in s.name)
    return [("old wo_gemm", old, quant_matmul.CANDIDATE_CONFIGS["wo_gemm"]),
            ("new wo_gemm_swapped", new, quant_gemm.CANDIDATE_CONFIGS)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", action="append", help="sm_90 and/or sm_80 (default both)")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--sass-dir", type=Path)
    args = parser.parse_args()
    print("| arch | kernel | config | " + " | ".join(COLUMNS + ["registers", "spills", "smem"]) + " |")
    print("|" + "---|" * (len(COLUMNS) + 6))
    for arch in args.arch or ["sm_90", "sm_80"]:
        for label, spec, configs in kernels(args.bits, args.group_size, args.k):
            for config in configs:
                try:
                    row = analyse(spec, config, arch, args.sass_dir)
                except Exception as exc:  # a config that does not compile is a row, not the end of the table
                    print(f"| {arch} | {label} | {config} | does not compile: {str(exc)[:200]} |")
                    continue
                knobs = ", ".join(f"{k}={v}" for k, v in config.params) + f", w{config.num_warps} s{config.num_stages}"
                cells = [str(row.get(c, 0)) for c in COLUMNS + ["registers", "spills", "smem"]]
                print(f"| {arch} | {label} | {knobs} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
