"""Instruction mix of a Triton kernel's main loop, read from its SASS: no GPU needed.

    python benchmarks/sass_stats.py wo_gemv_int4_g128_fp16                       # default config, sm_90
    python benchmarks/sass_stats.py wo_gemv_int4_g128_fp16 --candidates          # every candidate (timed and untimed)
    python benchmarks/sass_stats.py wo_gemv_int4_g128_fp16 \
        --config '{"num_warps": 8, "num_stages": 2, "params": {"BLOCK_N": 16, "GROUPS_PER_STEP": 8, "SPLIT_K": 1}}'
    python benchmarks/sass_stats.py rmsnorm_row_fp16 --bytes-per-trip 64 --opcodes

Builds the kernel ahead of time (lmforge.backends.triton.aot.build_spec: Triton's compiler and ptxas for the
target, as the JIT would), disassembles the cubin with the nvdisasm Triton ships, takes the largest loop
(the longest body that ends in a backward branch) as the main loop and counts its instructions by class.
Counts are per thread and loop trip, and per byte of weight that one thread streams per trip (for the
weight-only GEMV that is BLOCK_N * GROUP_SIZE * BITS / 8 * GROUPS_PER_STEP / threads; for other kernels
pass --bytes-per-trip). "in flight before first use" is the global load bytes a thread issues in the loop
before the first instruction that reads a loaded register: what one warp can have outstanding at once;
times threads and the CTAs that fit on an SM (by registers, shared memory and warps) it is the per-SM
figure to compare with Little's law (~600 ns x 3.35 TB/s / 132 SMs ~ 16 KB on an H100).

This is static: it says what the kernel asks the SM to issue, not how fast it runs. Spec names are those of
quant_matmul.aot_specs(--act, --group-size, --in-features, --rows) and norms.aot_specs().
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Opcode (first dotted part, or a longer prefix) -> class; the first matching rule wins.
CLASSES = [
    ("HADD2.F32", "convert"), ("F2F", "convert"), ("I2F", "convert"), ("F2I", "convert"), ("F2FP", "convert"),
    ("I2FP", "convert"), ("F2IP", "convert"),
    ("LDG", "global load"), ("STG", "global store/atomic"), ("RED", "global store/atomic"),
    ("ATOM", "global store/atomic"), ("ATOMG", "global store/atomic"),
    ("LDS", "shared memory"), ("STS", "shared memory"), ("LDSM", "shared memory"), ("LDGSTS", "shared memory"),
    ("BAR", "barrier"), ("SHFL", "shuffle"),
    ("FFMA", "fp32 alu"), ("FADD", "fp32 alu"), ("FMUL", "fp32 alu"), ("FMNMX", "fp32 alu"),
    ("FSEL", "fp32 alu"), ("FSETP", "fp32 alu"), ("FSWZADD", "fp32 alu"), ("MUFU", "fp32 alu"),
    ("HFMA2.MMA", "move"), ("HADD2", "fp16 alu"), ("HMUL2", "fp16 alu"), ("HFMA2", "fp16 alu"),
    ("HMNMX2", "fp16 alu"),
    ("MOV", "move"), ("IMAD.MOV", "move"), ("SEL", "move"), ("CS2R", "move"), ("S2R", "move"),
    ("LDC", "const load"), ("ULDC", "const load"),
    ("BRA", "control"), ("EXIT", "control"), ("BSSY", "control"), ("BSYNC", "control"), ("NOP", "control"),
    ("WARPSYNC", "control"), ("CALL", "control"), ("RET", "control"),
]
INT_OPCODES = ("IADD", "IMAD", "LOP", "SHF", "PRMT", "SGXT", "LEA", "ISETP", "IABS", "VIADD", "IMNMX",
               "BMSK", "BFE", "BFI", "FLO", "POPC", "PLOP3", "P2R", "R2P", "VIMNMX", "IDP", "IMUL")
CLASS_ORDER = ["global load", "global store/atomic", "shared memory", "barrier", "shuffle", "int/logic",
               "fp32 alu", "fp16 alu", "convert", "move", "uniform", "const load", "control", "other"]
STORE_LIKE = ("STG", "STS", "RED", "ATOM", "ST.", "BAR", "BRA")
LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
LABEL = re.compile(r"^(\.L_x_\d+):")
REGISTER = re.compile(r"\bR(\d+)\b")


@dataclass(frozen=True)
class Instruction:
    address: int
    predicate: str
    opcode: str
    operands: tuple[str, ...]


def parse_sass(text: str) -> tuple[list[Instruction], dict[str, int]]:
    """Instructions of nvdisasm's output (`nvdisasm -c`) and label -> address of the next instruction."""
    instructions, labels, pending = [], {}, []
    for line in text.splitlines():
        label = LABEL.match(line.strip())
        if label:
            pending.append(label.group(1))
            continue
        match = LINE.search(line)
        if not match:
            continue
        address, body = int(match.group(1), 16), match.group(2).strip()
        predicate = ""
        if body.startswith("@"):
            predicate, body = body.split(None, 1)
        opcode, _, rest = body.partition(" ")
        operands = tuple(o.strip() for o in rest.split(",")) if rest.strip() else ()
        for name in pending:
            labels[name] = address
        pending = []
        instructions.append(Instruction(address, predicate, opcode, operands))
    return instructions, labels


def loops(instructions: list[Instruction], labels: dict[str, int]) -> list[list[Instruction]]:
    """The body of every loop, in program order of their backward branches: from a branch target to the
    backward branch that jumps to it (the one-instruction `BRA` to itself that ends every kernel is not a
    loop)."""
    bodies = []
    for i, ins in enumerate(instructions):
        if not ins.opcode.startswith("BRA") or not ins.operands:
            continue
        target = re.search(r"\.L_x_\d+", ins.operands[-1])
        if target and labels.get(target.group(0), ins.address + 1) <= ins.address:
            body = [x for x in instructions[: i + 1] if x.address >= labels[target.group(0)]]
            if len(body) > 1:
                bodies.append(body)
    return bodies


def main_loop(instructions: list[Instruction], labels: dict[str, int], key=len) -> list[Instruction]:
    """The loop that maximises `key` (default: the largest loop; the first of equals); [] if there is none."""
    return max(loops(instructions, labels), key=key, default=[])


def classify(opcode: str) -> str:
    for prefix, name in CLASSES:
        if opcode == prefix or opcode.startswith(prefix + "."):
            return name
    if opcode.startswith(INT_OPCODES):
        return "int/logic"
    if opcode.startswith("U"):
        return "uniform"
    return "other"


def load_bits(opcode: str) -> int:
    """Width in bits of one thread's LDG (LDG.E = 32; .U8/.S8/.U16/.S16/.64/.128 as named)."""
    for part in opcode.split(".")[1:]:
        if part in ("U8", "S8"):
            return 8
        if part in ("U16", "S16"):
            return 16
        if part in ("64", "128"):
            return int(part)
    return 32


def _registers(operand: str, bits: int = 32) -> set[int]:
    """Registers an operand names; a destination of a wide load covers bits / 32 consecutive ones."""
    out = set()
    for match in REGISTER.finditer(operand):
        first = int(match.group(1))
        out.update(range(first, first + max(1, bits // 32)))
    return out


def load_bytes_before_first_use(loop: list[Instruction]) -> int:
    """Global load bytes one thread issues in the loop before any instruction reads a loaded register."""
    pending, issued = set(), 0
    for ins in loop:
        sources = ins.operands if ins.opcode.startswith(STORE_LIKE) else ins.operands[1:]
        read = set().union(*(_registers(o) for o in sources)) if sources else set()
        if ins.opcode.startswith("LDG"):
            read = set().union(*(_registers(o) for o in ins.operands[1:])) if len(ins.operands) > 1 else set()
        if read & pending:
            break
        if ins.opcode.startswith("LDG") and ins.operands:
            bits = load_bits(ins.opcode)
            pending |= _registers(ins.operands[0], bits)
            issued += bits // 8
    return issued


def ctas_per_sm(registers: int, shared: int, warps: int, max_shared: int = 227 * 1024) -> int:
    """Resident CTAs per SM (H100 / A100 limits: 64K registers, 64 warps, 32 CTAs), registers allocated
    per warp in units of 256 (8 per thread)."""
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_regs = 65536 // (regs_per_warp * warps)
    by_smem = max_shared // shared if shared else 32
    return max(0, min(by_regs, by_smem, 64 // warps, 32))


def instruction_mix(loop: list[Instruction]) -> tuple[Counter, Counter]:
    classes, opcodes = Counter(), Counter()
    for ins in loop:
        cls = classify(ins.opcode)
        if ins.opcode == "HFMA2.MMA" and ins.operands[1:3] != ("-RZ", "RZ"):
            cls = "fp16 alu"  # a real f16x2 FMA on the MMA pipe (ptxas's second HFMA2 pipe), not a constant move
        if cls == "global load":
            cls = f"global load {load_bits(ins.opcode)}-bit"
        classes[cls] += 1
        opcodes[ins.opcode] += 1
    return classes, opcodes


def disassemble(cubin: bytes) -> str:
    import tempfile

    import triton

    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        proc = subprocess.run([str(nvdisasm), "-c", f.name], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"nvdisasm failed: {proc.stderr[-2000:]}")
    return proc.stdout


def gemv_weight_bytes_per_trip(spec, config) -> float:
    """Weight bytes one thread streams per trip of the GEMV's K loop (its config as the launcher runs it)."""
    bits, gs = spec.constexprs["BITS"], spec.constexprs["GROUP_SIZE"]
    block_n, steps = config.get("BLOCK_N"), config.get("GROUPS_PER_STEP")
    return block_n * gs * bits / 8 * steps / (32 * config.num_warps)


def analyse(spec, arch: str, config, bytes_per_trip: float | None) -> dict:
    from lmforge.backends.triton import aot

    request = aot.spec_request(spec, arch, config)
    binary = aot.build_spec(spec, arch, config)
    report = aot.ResourceReport.of(binary)
    instructions, labels = parse_sass(disassemble(binary.cubin))
    loop = main_loop(instructions, labels)
    classes, opcodes = instruction_mix(loop)
    if bytes_per_trip is None and spec.name.startswith("wo_gemv"):
        bytes_per_trip = gemv_weight_bytes_per_trip(spec, request.config)
    in_flight = load_bytes_before_first_use(loop)
    ctas = ctas_per_sm(report.registers, report.shared_bytes, report.num_warps)
    return {"spec": spec.name, "arch": arch, "config": str(request.config), "registers": report.registers,
            "spills": report.spill_stores + report.spill_loads, "shared": report.shared_bytes,
            "loop_instructions": len(loop), "bytes_per_trip": bytes_per_trip, "classes": classes,
            "opcodes": opcodes, "in_flight_thread": in_flight, "ctas_per_sm": ctas,
            "in_flight_sm": in_flight * 32 * report.num_warps * ctas,
            "bar_sync_in_loop": any(i.opcode.startswith("BAR") for i in loop)}


def format_report(r: dict, show_opcodes: bool) -> str:
    per = r["bytes_per_trip"]
    lines = [f"## {r['spec']} on {r['arch']}: {r['config']}",
             f"registers {r['registers']}, spill bytes {r['spills']}, shared {r['shared']} B, "
             f"{r['ctas_per_sm']} CTAs/SM by resources; "
             + (f"main loop {r['loop_instructions']} instructions" if r["loop_instructions"] else "no loop found")
             + (f", {per:g} weight bytes per thread and trip" if per else ""),
             f"global loads in flight before first use: {r['in_flight_thread']} B/thread, "
             f"{r['in_flight_sm'] / 1024:.1f} KiB/SM at full occupancy; bar.sync in loop: {r['bar_sync_in_loop']}",
             "", "| class | per trip | per weight byte |", "|---|---:|---:|"]
    keys = sorted(r["classes"], key=lambda c: (CLASS_ORDER.index("global load" if c.startswith("global load")
                                                                 else c), c))
    for cls in keys:
        n = r["classes"][cls]
        lines.append(f"| {cls} | {n} | {n / per:.2f} |" if per else f"| {cls} | {n} | |")
    total = r["loop_instructions"]
    lines.append(f"| **total** | {total} | {total / per:.2f} |" if per else f"| **total** | {total} | |")
    if show_opcodes:
        lines += ["", "| opcode | per trip |", "|---|---:|"]
        lines += [f"| {op} | {n} |" for op, n in r["opcodes"].most_common()]
    return "\n".join(lines)


def find_spec(name: str, args):
    import torch

    from lmforge.backends.triton import norms, quant_matmul

    act = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.act]
    specs = quant_matmul.aot_specs(act, args.group_size, args.in_features, args.rows) + norms.aot_specs()
    for spec in specs:
        if spec.name == name:
            return spec
    raise SystemExit(f"no spec {name!r}; known: {sorted(s.name for s in specs)}")


def main(argv=None) -> None:
    from lmforge.backends.triton import quant_matmul
    from lmforge.backends.triton.config import KernelConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", help="an AOT spec name, e.g. wo_gemv_int4_g128_fp16")
    parser.add_argument("--arch", default="sm_90", choices=["sm_80", "sm_89", "sm_90"])
    parser.add_argument("--config", help="a KernelConfig as JSON (KernelConfig.to_dict form)")
    parser.add_argument("--candidates", action="store_true",
                        help="every CANDIDATE_CONFIGS and UNTIMED_CONFIGS entry of the kernel")
    parser.add_argument("--bytes-per-trip", type=float, default=None,
                        help="bytes of the streamed operand per thread and loop trip (automatic for wo_gemv)")
    parser.add_argument("--act", default="fp16", choices=["fp16", "bf16", "fp32"])
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--in-features", type=int, default=4096)
    parser.add_argument("--rows", type=int, default=1, help="GEMV rows M (BLOCK_M)")
    parser.add_argument("--opcodes", action="store_true", help="also list every opcode of the loop")
    parser.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    args = parser.parse_args(argv)
    spec = find_spec(args.spec, args)
    if args.candidates:
        kernel = spec.name.split("_int")[0]
        configs = quant_matmul.CANDIDATE_CONFIGS.get(kernel, []) + quant_matmul.UNTIMED_CONFIGS.get(kernel, [])
        if not configs:
            raise SystemExit(f"no CANDIDATE_CONFIGS for {kernel!r}")
    else:
        configs = [KernelConfig.from_dict(json.loads(args.config)) if args.config else None]
    for config in configs:
        r = analyse(spec, args.arch, config, args.bytes_per_trip)
        if args.json:
            print(json.dumps({**r, "classes": dict(r["classes"]), "opcodes": dict(r["opcodes"])}))
        else:
            print(format_report(r, args.opcodes), end="\n\n")


if __name__ == "__main__":
    main()
