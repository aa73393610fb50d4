"""Quality and predicted savings of each numerics-changing pass on the trained example model.

    python benchmarks/quality_table.py [--small] [--out table.json]
    python benchmarks/quality_table.py --task recall [--n 256] [--out table.json]

For each method: the knobs, the bytes one decode step moves according to the cost model (H100 preset) at
batch 1 with 8 cached tokens and at batch 32 with 2048 cached tokens, and the saving against fp32 (with the
default exact fusions), then quality against the fp32 model: top-1 agreement
and KL of next-token distributions on the answer positions of 256 held-out problems (teacher-forced
prefill), and exact-match task accuracy of greedy decoding with the transformed decode step (128 problems).
`--small` adds the 128-wide "small" model (trained on first use, ~3.5 min), whose layers admit int4 with
group size 128 (the tiny model's 64-wide layers do not).

`--task recall` judges sparse decode attention on a long-context task instead: the associative-recall model of
examples/models/recall_task.py (99-token prompts of 32 key -> value pairs, then a query key). Each prompt is
prefilled densely (all but its last token); the transformed decode step then runs the last prompt token and the
answer tokens. Per method: the knobs, the tokens one decode step attends to at the recall context (99 cached
tokens, counted like the cost model), the bytes one decode step moves at batch 1 with 99 cached tokens and at
batch 32 with 2048, and exact-match accuracy on `--n` held-out prompts.
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
from lmforge.passes import PassManager, canonical_pipeline, tunable_pipeline  # noqa: E402
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

# Decode-attention methods judged on the recall task. Budgets count the tokens one decode step attends to
# at the 99-token context, as the cost model does (lmforge.ir.ops.sparse_attention_ops.kept_keys): the sink
# and window blocks (one extra window block for misalignment) plus the top-k blocks.
_TOPK = {"attn.decode_pattern": "block_topk", "attn.sinks": 0}
RECALL_METHODS = [
    ("dense (reference)", {}),
    ("window 20 + 4 sinks (1/4)", {"attn.decode_pattern": "window", "attn.decode_window": 20, "attn.sinks": 4}),
    ("block top-k mean, bs 1, top 21 + window 2 (1/4)",
     {**_TOPK, "attn.block_size": 1, "attn.topk_blocks": 21, "attn.decode_window": 2, "attn.summary": "mean"}),
    ("block top-k mean, bs 2, top 10 + window 2 (1/4)",
     {**_TOPK, "attn.block_size": 2, "attn.topk_blocks": 10, "attn.decode_window": 2, "attn.summary": "mean"}),
    ("block top-k min/max, bs 2, top 10 + window 2 (1/4)",
     {**_TOPK, "attn.block_size": 2, "attn.topk_blocks": 10, "attn.decode_window": 2, "attn.summary": "minmax"}),
    ("block top-k mean, bs 4, top 4 + window 4 (1/4)",
     {**_TOPK, "attn.block_size": 4, "attn.topk_blocks": 4, "attn.decode_window": 4, "attn.summary": "mean"}),
    ("block top-k min/max, bs 4, top 4 + window 4 (1/4)",
     {**_TOPK, "attn.block_size": 4, "attn.topk_blocks": 4, "attn.decode_window": 4, "attn.summary": "minmax"}),
    ("block top-k min/max, bs 4, top 4 + window 4, layer 0 dense",
     {**_TOPK, "attn.block_size": 4, "attn.topk_blocks": 4, "attn.decode_window": 4, "attn.summary": "minmax",
      "attn.dense_layers": 1}),
    ("block top-k mean, bs 8, top 1 + window 8 (1/4)",
     {**_TOPK, "attn.block_size": 8, "attn.topk_blocks": 1, "attn.decode_window": 8, "attn.summary": "mean"}),
    ("block top-k min/max, bs 8, top 1 + window 8 (1/4)",
     {**_TOPK, "attn.block_size": 8, "attn.topk_blocks": 1, "attn.decode_window": 8, "attn.summary": "minmax"}),
    ("window 8 + 4 sinks (1/8)", {"attn.decode_pattern": "window", "attn.decode_window": 8, "attn.sinks": 4}),
    ("block top-k mean, bs 1, top 9 + window 2 (1/8)",
     {**_TOPK, "attn.block_size": 1, "attn.topk_blocks": 9, "attn.decode_window": 2, "attn.summary": "mean"}),
    ("block top-k mean, bs 2, top 4 + window 2 (1/8)",
     {**_TOPK, "attn.block_size": 2, "attn.topk_blocks": 4, "attn.decode_window": 2, "attn.summary": "mean"}),
    ("block top-k min/max, bs 2, top 4 + window 2 (1/8)",
     {**_TOPK, "attn.block_size": 2, "attn.topk_blocks": 4, "attn.decode_window": 2, "attn.summary": "minmax"}),
    ("block top-k min/max, bs 4, top 1 + window 4 (1/8)",
     {**_TOPK, "attn.block_size": 4, "attn.topk_blocks": 1, "attn.decode_window": 4, "attn.summary": "minmax"}),
]


def attended_tokens(cfg: dict, context: int) -> int:
    """Tokens one decode step attends to over `context` cached tokens under the decode knobs `cfg`."""
    from lmforge.ir.ops.sparse_attention_ops import kept_keys

    pattern = cfg.get("attn.decode_pattern", "dense")
    if pattern == "window":
        return min(context, cfg["attn.decode_window"] + cfg["attn.sinks"])
    if pattern == "block_topk":
        return kept_keys(context, cfg["attn.block_size"], cfg["attn.topk_blocks"], cfg["attn.sinks"],
                         cfg["attn.decode_window"])
    return context


def evaluate_recall(n: int = 256, methods=RECALL_METHODS) -> list[dict]:
    """Rows (method, knobs, attended tokens, bytes per decode step, task accuracy) for the recall model."""
    from examples.models import recall_task

    model = recall_task.load_or_train()
    g_dec = recall_task.decode_graph(model)
    hw = get_target("h100")
    context = recall_task.PROMPT_LEN
    short, long = {"batch": 1, "past": context}, {"batch": 32, "past": 2048}
    base = PassManager(tunable_pipeline()).run(g_dec, {})
    base_short, base_long = graph_cost(base, hw, short).bytes, graph_cost(base, hw, long).bytes
    rows = []
    for name, cfg in methods:
        t0 = time.perf_counter()
        new_dec = PassManager(tunable_pipeline()).run(g_dec, cfg)
        acc = recall_task.accuracy(CompiledModel(new_dec), n=n, model=model)
        b_short, b_long = graph_cost(new_dec, hw, short).bytes, graph_cost(new_dec, hw, long).bytes
        rows.append({"model": "recall", "method": name, "knobs": cfg, "attended": attended_tokens(cfg, context),
                     "context": context, "bytes_short": b_short, "saved_short": 1 - b_short / base_short,
                     "bytes_long": b_long, "saved_long": 1 - b_long / base_long, "task_acc": acc, "n": n,
                     "seconds": time.perf_counter() - t0})
    return rows


def print_recall(rows: list[dict]) -> None:
    context = rows[0]["context"]
    dense = next((r["task_acc"] for r in rows if not r["knobs"]), None)
    print(f"| method | tokens attended of {context} | bytes/step, b1 past {context} (saved) | "
          f"bytes/step, b32 past 2048 (saved) | task acc ({rows[0]['n']} held-out) | vs dense |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        delta = "" if dense is None else f"{(r['task_acc'] - dense) * 100:+.1f}"
        print(f"| {r['method']} | {r['attended']} | {r['bytes_short'] / 1e3:.1f} kB ({r['saved_short'] * 100:.0f}%) | "
              f"{r['bytes_long'] / 1e6:.1f} MB ({r['saved_long'] * 100:.0f}%) | {r['task_acc'] * 100:.1f}% | {delta} |")


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
    p.add_argument("--task", choices=("addition", "recall"), default="addition",
                   help="addition: the tiny/small models (default); recall: sparse decode on the long-context task")
    p.add_argument("--n", type=int, default=256, help="held-out prompts per method (--task recall)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    if args.task == "recall":
        rows = evaluate_recall(args.n)
        print_recall(rows)
        if args.out:
            Path(args.out).write_text(json.dumps(rows, indent=1))
        return 0
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
