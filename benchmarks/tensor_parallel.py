"""What the cost model predicts for tensor parallelism: one decode step of the example Llama split over tp GPUs.

    python benchmarks/tensor_parallel.py                          # 100m preset, H100 and L40S, batch 64, 32k tokens
    python benchmarks/tensor_parallel.py --preset 5m --batch 8 --past 1024 --targets h100

For tp in 1, 2, 4 (the divisors of the KV heads up to 4), the graph after the default passes is split by
`lmforge.passes.shard.tensor_parallel` and priced by `lmforge.search.cost_model.graph_cost` on each target:
predicted step latency (one rank's work plus the collectives: interconnect bytes at the preset's link speed and
a fixed, uncalibrated cost per collective), the part of it spent in collectives, weights and peak memory per
GPU, and whether that fits the GPU. Predictions only (no multi-GPU machine here); the split itself is checked
against the unsplit graph by tests/passes/test_shard.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rows(preset: str, batch: int, past: int, targets: list[str]) -> list[dict]:
    import lmforge
    from examples.llama_workload import random_workload
    from lmforge.hwmodels import get_target
    from lmforge.passes import PassManager, default_pipeline
    from lmforge.passes.shard import tensor_parallel
    from lmforge.search.cost_model import graph_cost

    w = random_workload(preset)
    graph = PassManager(default_pipeline()).run(lmforge.capture(w.model, w.example_inputs, dynamic=w.dynamic), {})
    kv_heads = w.example_inputs[1].shape[2]
    out = []
    for tp in [t for t in (1, 2, 4) if kv_heads % t == 0]:
        split = tensor_parallel(graph, tp)
        for name in targets:
            hw = get_target(name)
            cost = graph_cost(split, hw, {"batch": batch, "past": past})
            comm = sum(n.time_s for n in cost.nodes if n.op in ("all_reduce", "all_gather"))
            out.append({"tp": tp, "target": name, "latency_us": cost.time_s * 1e6, "collectives_us": comm * 1e6,
                        "weights_gb": cost.weight_bytes / 1e9, "peak_gb": cost.peak_memory_bytes / 1e9,
                        "fits": cost.fits})
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="100m")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--past", type=int, default=32768)
    parser.add_argument("--targets", default="h100,l40s")
    args = parser.parse_args(argv)
    print(f"Llama {args.preset} decode step, batch {args.batch}, {args.past} cached tokens, fp32, default passes\n")
    print("| target | tp | predicted step us | of which collectives us | weights / GPU GB | peak memory / GPU GB "
          "| fits |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in sorted(rows(args.preset, args.batch, args.past, args.targets.split(",")),
                    key=lambda r: (r["target"], r["tp"])):
        print(f"| {r['target']} | {r['tp']} | {r['latency_us']:.0f} | {r['collectives_us']:.0f} | "
              f"{r['weights_gb']:.2f} | {r['peak_gb']:.1f} | {'yes' if r['fits'] else 'no'} |")


if __name__ == "__main__":
    main()
