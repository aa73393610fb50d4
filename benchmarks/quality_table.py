"""Quality and predicted savings of each numerics-changing pass on the trained example model.

    python benchmarks/quality_table.py [--small] [--out table.json]

For each method: the knobs, the bytes one decode step moves according to the cost model (H100 preset) at
batch 1 with 8 cached tokens and at batch 32 with 2048 cached tokens, and the saving against fp32 (with the
default exact fusions), then quality against the fp32 model: top-1 agreement
and KL of next-token distributions on the answer positions of 256 held-out problems (teacher-forced
prefill), and exact-match task accuracy of greedy decoding with the transformed decode step (128 problems).
`--small` adds the 128-wide "small" model (trained on first use, ~3.5 min), whose layers admit int4 with
group size 128 (the tiny model's 64-wide layers do not).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import lmforge  # noqa: E402
from lmforge.compiler import CompiledModel  # noqa: E402
from lmforge.hwmodels import get_target  # noqa: E402
from lmforge.passes import PassManager, canonical_pipeline, dce, tunable_pipeline  # noqa: E402
from lmforge.quality import compare  # noqa: E402
from lmforge.search.cost_model import graph_cost  # noqa: E402

METHODS = [
    ("fp32 (reference)", {}),
    ("int8 weight-only g32", {"quant.weight_bits": 8, "quant.group_size": 32}),
    ("int8 weight-only g64", {"quant.weight_bits": 8, "quant.group_size": 64}),
    ("int4 weight-only g32", {"quant.weight_bits": 4, "quant.group_size": 32}),
    ("int4 weight-only g64", {"quant.weight_bits": 4, "quant.group_size": 64}),
    ("int4 weight-only g64 asym", {"quant.weight_bits": 4, "quant.group_size": 64, "quant.symmetric": False}),
    ("int4 weight-only g128", {"quant.weight_bits": 4, "quant.group_size": 128}),
    ("KV cache int8 (per token)", {"quant.kv": "int8"}),
    ("KV cache fp8 e4m3", {"quant.kv": "fp8"}),
    ("window 4 + 1 sink (decode)", {"attn.decode_pattern": "window", "attn.decode_window": 4, "attn.sinks": 1}),
    ("block top-k, 4 keys (bs 1: 2 top + 1 sink + 1 local; 1/4 of the task context)",
     {"attn.decode_pattern": "block_topk", "attn.block_size": 1, "attn.topk_blocks": 2, "attn.decode_window": 1,
      "attn.sinks": 1}),
]


def evaluate(preset: str) -> list[dict]:
    from examples.llama_workload import prefill_workload, workload
    from examples.models.tiny_task import ANSWER_LEN, PROMPT_LEN, eval_token_data, load_or_train
    from examples.models.llama import LlamaDecodeStep, LlamaPrefill
    from examples.models import tiny_task

    model = load_or_train(preset)
    dec, pre = workload(), prefill_workload()
    dec_model, pre_model = LlamaDecodeStep(model), LlamaPrefill(model)
    ex_dec = (dec.example_inputs[0], *model.prefill(torch.randint(0, 10, (2, 7)))[1:])
    g_dec = PassManager(canonical_pipeline()).run(lmforge.capture(dec_model, ex_dec, dynamic=dec.dynamic))
    g_pre = PassManager(canonical_pipeline()).run(lmforge.capture(pre_model, pre.example_inputs, dynamic=pre.dynamic))
    tokens = [(eval_token_data(256, seed=99),)]
    answer = slice(PROMPT_LEN - 1, PROMPT_LEN - 1 + ANSWER_LEN)
    checker = lambda fn: tiny_task.accuracy(fn, n=128, config=model.config)
    hw = get_target("h100")
    short, long = {"batch": 1, "past": 8}, {"batch": 32, "past": 2048}
    base = PassManager(tunable_pipeline()).run(g_dec, {})  # fp32 with the default (exact) fusions
    base_short, base_long = graph_cost(base, hw, short).bytes, graph_cost(base, hw, long).bytes
    ref_pre, ref_dec = CompiledModel(g_pre), CompiledModel(g_dec)
    acc_ref = checker(ref_dec)
    rows = []
    for name, cfg in METHODS:
        dims = {n.inputs[1].type.shape[1] for n in g_dec.nodes if n.op == "linear"}
        if cfg.get("quant.group_size") and any(d % cfg["quant.group_size"] for d in dims):
            rows.append({"model": preset, "method": name, "knobs": cfg, "skipped":
                         f"in-features {sorted(dims)} not divisible by the group size"})
            continue
        passes = tunable_pipeline()
        new_dec = PassManager(passes).run(g_dec, cfg)
        new_pre = PassManager(passes).run(g_pre, cfg)
        t0 = time.perf_counter()
        decode_only = any(k.startswith("attn.decode") for k in cfg)
        report = None if decode_only else compare(ref_pre, CompiledModel(new_pre), tokens, positions=answer)
        acc = checker(CompiledModel(new_dec))
        b_short, b_long = graph_cost(new_dec, hw, short).bytes, graph_cost(new_dec, hw, long).bytes
        rows.append({"model": preset, "method": name, "knobs": cfg, "bytes_short": b_short,
                     "saved_short": 1 - b_short / base_short, "bytes_long": b_long, "saved_long": 1 - b_long / base_long,
                     "top1": None if report is None else report.top1_agreement,
                     "kl": None if report is None else report.kl,
                     "task_acc": acc, "task_acc_ref": acc_ref, "seconds": time.perf_counter() - t0})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    rows = evaluate("tiny") + (evaluate("small") if args.small else [])
    print("| model | method | bytes/step, batch 1 past 8 (saved) | bytes/step, batch 32 past 2048 (saved) | "
          "top-1 | KL | task acc (fp32) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "skipped" in r:
            print(f"| {r['model']} | {r['method']} | - | - | - | - | not applicable: {r['skipped']} |")
            continue
        top1 = "n/a (decode only)" if r["top1"] is None else f"{r['top1'] * 100:.1f}%"
        kl = "n/a" if r["kl"] is None else f"{r['kl']:.4f}"
        print(f"| {r['model']} | {r['method']} | {r['bytes_short'] / 1e3:.1f} kB ({r['saved_short'] * 100:.0f}%) | "
              f"{r['bytes_long'] / 1e6:.1f} MB ({r['saved_long'] * 100:.0f}%) | {top1} | {kl} | "
              f"{r['task_acc'] * 100:.1f}% ({r['task_acc_ref'] * 100:.1f}%) |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
