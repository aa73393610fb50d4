"""The K loop of the decode-attention split kernel, read from its SASS: no GPU needed.

    python benchmarks/attention_sass.py                 # sm_90, every CANDIDATE_CONFIGS entry
    python benchmarks/attention_sass.py --arch sm_80 --context 32768
    python benchmarks/attention_sass.py --prefill                    # the flash prefill kernel, causal, 4096 tokens

Builds `attention_decode._decode_split_kernel` ahead of time as an artifact would for the gpu_check decode shapes
(batch 1, 32 query heads, 8 KV heads, head dim 128, fp16; dense over the whole cache, and block top-k with
64-token blocks keeping 1/16 of them), through the launch specs (lmforge.backends.triton.launch_specs), then
counts the main loop's instructions with benchmarks/sass_stats.py's parser. Per config and kernel: registers,
shared memory, CTAs per SM by resources, loop instructions per KV byte a thread streams per trip (K and V tiles:
BLOCK_N x D x 2 bytes x 2 / threads), the bytes its cp.async copies (LDGSTS) move per thread and trip, and
what num_stages - 1 trips of them in flight come to per SM (compare with ~16 KB by Little's law on an H100),
the MMA instructions and the bar.sync count per trip. --prefill: the same for `attention_prefill`'s flash kernel
on the gpu_check dense causal prefill (32 heads, 4096 tokens; per trip one BLOCK_N tile of K and V), plus the
wgmma waits (WARPGROUP.DEPBAR) per trip. The prefill's "loop" is its steady loop (whole tiles, no mask: all but
the diagonal tiles of a causal row block); the masked diagonal loop is reported beside it, with the cycles the
SM needs per trip of all its CTAs to issue the steady loop (4 schedulers, one instruction each per cycle) and to
run its MMAs at the H100's dense fp16 peak (2048 MACs per SM and cycle). Static: what the kernel asks the SM to
issue, not a timing.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import sass_stats as ss  # noqa: E402

HQ, HKV, D = 32, 8, 128


def decode_graph(context: int):
    from lmforge.ir.graph import GraphBuilder
    from lmforge.ir.types import TensorType

    builder = GraphBuilder("decode")
    q = builder.input("q", TensorType((1, HQ, 1, D), "float16"))
    k = builder.input("k", TensorType((1, HKV, context, D), "float16"))
    v = builder.input("v", TensorType((1, HKV, context, D), "float16"))
    kept = context // 64 // 16
    outs = [builder.op("attention", [q, k, v], {}),
            builder.op("block_topk_attention", [q, k, v],
                       {"block_size": 64, "topk_blocks": kept - 2, "sinks": 64, "window": 64})]
    return builder.build(outs)


def prefill_graph(tokens: int):
    from lmforge.ir.graph import GraphBuilder
    from lmforge.ir.types import TensorType

    builder = GraphBuilder("prefill")
    q, k, v = (builder.input(n, TensorType((1, HQ, tokens, D), "float16")) for n in "qkv")
    return builder.build([builder.op("attention", [q, k, v], {"causal": True})])


def rows(arch: str, context: int, prefill: bool = False) -> list[dict]:
    from lmforge.backends.triton import aot
    from lmforge.backends.triton import attention_decode as ad
    from lmforge.backends.triton import attention_prefill as ap
    from lmforge.backends.triton import launch_specs as ls

    graph = prefill_graph(4096) if prefill else decode_graph(context)
    template, kernel = ("attention_prefill", "flash_prefill") if prefill else ("attention_decode", "decode_split")
    variants = []
    for config in (ap if prefill else ad).CANDIDATE_CONFIGS:
        for node in graph.nodes:
            for variant in ls.spec_for(node).variants(node, {template: config}):
                if variant.kernel == kernel:
                    variants.append((node.op, config, variant))
    requests = [aot.BuildRequest(v.fn, dict(v.signature), dict(v.constexprs), v.config, arch, v.divisible_by_16)
                for _, _, v in variants]
    out = []
    for (op, config, variant), binary in zip(variants, aot.build_many(requests)):
        if isinstance(binary, str):
            out.append({"op": op, "config": str(config), "error": binary[:200]})
            continue
        report = aot.ResourceReport.of(binary)
        bodies = [b for b in ss.loops(*ss.parse_sass(ss.disassemble(binary.cubin)))
                  if any("MMA" in i.opcode and i.opcode != "HFMA2.MMA" for i in b)]
        # Prefill (causal): the unmasked loop comes first and runs all but the diagonal tiles; the masked one
        # after it runs the diagonal. Decode: one loop.
        loop = bodies[0] if prefill else max(bodies, key=len)
        _, opcodes = ss.instruction_mix(loop)
        threads = 32 * report.num_warps
        kv_bytes = variant.config.get("BLOCK_N") * D * 2 * 2 / threads
        copied = sum(n * ss.load_bits(o) // 8 for o, n in opcodes.items() if o.startswith("LDGSTS"))
        ctas = ss.ctas_per_sm(report.registers, report.shared_bytes, report.num_warps)
        out.append({
            "op": op, "config": str(variant.config), "registers": report.registers, "shared": report.shared_bytes,
            "ctas": ctas, "loop": len(loop), "per_kv_byte": len(loop) / kv_bytes, "copied": copied,
            "in_flight_sm": copied * (variant.config.num_stages - 1) * threads * ctas,
            "mma": sum(n for o, n in opcodes.items() if "MMA" in o and o != "HFMA2.MMA"),
            "mma_kind": sorted({o for o in opcodes if "MMA" in o and o != "HFMA2.MMA"}),
            "bar_sync": sum(n for o, n in opcodes.items() if o.startswith("BAR")),
            "wgmma_waits": sum(n for o, n in opcodes.items() if o.startswith("WARPGROUP.DEPBAR")),
            "diagonal": len(bodies[1]) if prefill and len(bodies) > 1 else None,
            # one instruction per scheduler and cycle, 4 schedulers per SM, every CTA on the SM issuing
            "issue_cycles": len(loop) * report.num_warps * ctas / 4,
            # QK^T and PV of every CTA on the SM: BLOCK_M x BLOCK_N x D MACs each, 2048 fp16 MACs per SM and cycle
            "mma_cycles": 2 * variant.config.get("BLOCK_M") * variant.config.get("BLOCK_N") * D * ctas / 2048,
        })
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="sm_90", choices=["sm_80", "sm_89", "sm_90"])
    parser.add_argument("--context", type=int, default=131072, help="cached tokens (a multiple of 1024)")
    parser.add_argument("--prefill", action="store_true", help="the flash prefill kernel instead (causal, 4096 tokens)")
    args = parser.parse_args(argv)
    what = ("flash prefill kernel, causal, 4096 tokens" if args.prefill else
            f"decode split kernel, Hkv {HKV}, {args.context} cached tokens")
    print(f"{what}, {args.arch}, B 1, Hq {HQ}, D {D}, fp16\n")
    extra = " diagonal loop instr | issue cycles / trip | MMA cycles / trip |" if args.prefill else ""
    print("| op | config | regs | smem | CTAs/SM | loop instr | per KV byte | cp.async B / thread / trip "
          "| in flight / SM | MMA / trip | bar.sync / trip | wgmma waits / trip |" + extra)
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|" + "---:|" * (3 if args.prefill else 0))
    for r in rows(args.arch, args.context, args.prefill):
        if "error" in r:
            print(f"| {r['op']} | {r['config']} | build failed: {r['error']} |")
            continue
        line = (f"| {r['op']} | {r['config']} | {r['registers']} | {r['shared'] // 1024} KB | {r['ctas']} | {r['loop']} "
                f"| {r['per_kv_byte']:.2f} | {r['copied']} | {r['in_flight_sm'] // 1024} KB "
                f"| {r['mma']} x {', '.join(r['mma_kind'])} | {r['bar_sync']} | {r['wgmma_waits']} |")
        if args.prefill:
            line += f" {r['diagonal']} | {r['issue_cycles']:.0f} | {r['mma_cycles']:.0f} |"
        print(line)


if __name__ == "__main__":
    main()
