"""The TVM backend on this CPU: matmul GFLOP/s against torch and MetaSchedule, decode tokens/s of the example Llama.

    .venv/bin/python benchmarks/cpu_backend.py [--threads 1] [--trials 16] [--rounds 5] [--past 128]
                                               [--only matmul,decode,int8,sparse,mistral] [--skip-metaschedule]
                                               [--out FILE]

(a) matmul   1024^3 fp32 GFLOP/s: torch (MKL) vs lmforge (TVM kernel, default knobs and after `tune_op`: TPE
             over the gemm knobs, --trials real measurements) vs TVM MetaSchedule (`tvm.s_tir.meta_schedule`,
             same trial count, XGBoost cost model), with each search's wall time.
(b) decode   the example Llama "5m" (random weights), one decode step after --past cached tokens, batch 1 and
             8: lmforge (TVM backend + torch reference for views/concat) vs torch eager vs torch.compile.
(c) int8     the "100m" preset, batch 1: int8 weight-only (the quant pass's linear_wo, group 128, LM head
             included, run by the TVM kernels) vs fp32 eager; the TVM fp32 graph beside it.
(d) sparse   causal prefill attention (8 x 1024 x 64): block-sparse from block lists, a sliding window of 256 + 4
             sinks, dense causal, and FlexPrefill end to end (the sparsity pass's lowering: its block mask chosen
             on the torch side per call, then the TVM block-sparse kernel; on synthetic q / k with a local band
             and heavy key columns, `structured_prefill_qkv`; also at 4096 tokens), on TVM, against SDPA; and a
             decode step over a 16k cache (8 x 64, batch 1) with a window of 512 + 4 sinks vs the dense TVM
             decode kernel and SDPA.
(e) mistral  a Hugging Face Mistral (transformers, the test extra; random weights, 2 layers, hidden 512, 8 heads
             of 64, sliding window 256) prefilling 2048 tokens: the model's own forward (SDPA with its window
             mask) vs lmforge on TVM, where the mask is recognized as a window and the windowed kernel runs.

Every comparison runs in the same process at the same thread count (torch.set_num_threads and
TVM_NUM_THREADS, set before TVM loads). Timings are medians: each variant is timed in --rounds rounds,
interleaved with the others so that load from other jobs hits all of them alike, and the median of the
round medians is reported with the spread (min..max of the round medians). Tokens/s = batch / step time.
The load average is printed: on a shared machine, compare ratios rather than absolute numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1, help="threads for torch and TVM alike (default 1)")
    p.add_argument("--trials", type=int, default=16, help="measured trials of each matmul search")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds per variant")
    p.add_argument("--past", type=int, default=128, help="cached tokens before the timed decode step")
    p.add_argument("--only", default="matmul,decode,int8,sparse,mistral", help="comma-separated parts to run")
    p.add_argument("--skip-metaschedule", action="store_true", help="leave MetaSchedule out of (a)")
    p.add_argument("--out", help="write the results as JSON here")
    return p.parse_args(argv)


def interleaved(fns: dict, rounds: int, per_round: int) -> dict:
    """name -> (median of round medians, min, max) in seconds; variants alternate within every round."""
    import torch

    samples: dict[str, list[float]] = {name: [] for name in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn()
        for _ in range(rounds):
            for name, fn in fns.items():
                times = []
                for _ in range(per_round):
                    t0 = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - t0)
                samples[name].append(statistics.median(times))
    return {name: (statistics.median(s), min(s), max(s)) for name, s in samples.items()}


# ---- (a) matmul -------------------------------------------------------------------------------------------

def metaschedule_matmul(n: int, trials: int, threads: int):
    """Tune a plain TE matmul with MetaSchedule; returns (packed function, tuning wall seconds)."""
    import tvm
    from tvm import te
    from tvm.s_tir import meta_schedule as ms

    from lmforge.backends.tvm.target import host_target

    a = te.placeholder((n, n), "float32", name="a")
    b = te.placeholder((n, n), "float32", name="b")
    k = te.reduce_axis((0, n), "k")
    c = te.compute((n, n), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="c")
    mod = tvm.IRModule({"main": te.create_prim_func([a, b, c])})
    target = tvm.target.Target({**host_target(), "num-cores": threads})
    work_dir = tempfile.mkdtemp(prefix="lmforge_metaschedule_")
    t0 = time.perf_counter()
    # generous timeouts: on a loaded 2-core machine a build of an unrolled candidate can take tens of seconds
    db = ms.tune_tir(mod, target, work_dir, max_trials_global=trials, num_trials_per_iter=min(trials, 16),
                     seed=0, num_tuning_cores=threads, builder=ms.builder.LocalBuilder(timeout_sec=300),
                     runner=ms.runner.LocalRunner(timeout_sec=120))
    sch = ms.tir_integration.compile_tir(db, mod, target)
    wall = time.perf_counter() - t0
    if sch is None:
        raise RuntimeError(f"MetaSchedule found no valid schedule in {trials} trials; logs in {work_dir}")
    return tvm.compile(sch.mod, target=target)["main"], wall


def bench_matmul(args) -> dict:
    import torch

    from lmforge.backends.tvm import OpInstance, TVMBackend, tune_op
    from lmforge.search.measure import measure

    n = 1024
    flops = 2.0 * n ** 3
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    inst = OpInstance.make("matmul", [a, b])

    def timer(fn):
        return measure(fn, warmup=1, min_repeats=3, max_repeats=8, max_seconds=1.5).median_s

    t0 = time.perf_counter()
    tuned = tune_op(inst, trials=args.trials, measure=timer, seed=0)
    lmforge_wall = time.perf_counter() - t0
    default_kernel = TVMBackend().claim(inst.node, "cpu").fn
    tuned_kernel = TVMBackend(tuned.best_config).claim(inst.node, "cpu").fn
    fns = {"torch": lambda: a @ b, "lmforge default": lambda: default_kernel(a, b),
           "lmforge tuned": lambda: tuned_kernel(a, b)}
    walls = {"lmforge tuned": lmforge_wall}
    ms_error = None
    if not args.skip_metaschedule:
        try:
            ms_fn, walls["metaschedule"] = metaschedule_matmul(n, args.trials, args.threads)
        except Exception as e:  # report it in the table instead of losing the other numbers
            ms_error = f"{type(e).__name__}: {e}"
        else:
            c = torch.empty(n, n)
            ms_fn(a, b, c)
            torch.testing.assert_close(c, a @ b, rtol=1e-4, atol=1e-3)
            fns["metaschedule"] = lambda: ms_fn(a, b, c)
    torch.testing.assert_close(tuned_kernel(a, b), a @ b, rtol=1e-4, atol=1e-3)
    times = interleaved(fns, args.rounds, 5)
    rows = {name: {"gflops": flops / t / 1e9, "gflops_range": [flops / hi / 1e9, flops / lo / 1e9],
                   "vs_torch": times["torch"][0] / t, "tuning_wall_s": walls.get(name)}
            for name, (t, lo, hi) in times.items()}
    return {"shape": [n, n, n], "trials": args.trials, "best_config": tuned.best_config, "rows": rows,
            "tuning_table": tuned.table(), "metaschedule_error": ms_error}


# ---- (b), (c) decode ---------------------------------------------------------------------------------------

def decode_inputs(cfg, batch: int, past: int):
    import torch

    g = torch.Generator().manual_seed(batch)
    tokens = torch.randint(0, cfg.vocab_size, (batch, 1), generator=g)
    shape = (cfg.n_layers, batch, cfg.n_kv_heads, past, cfg.head_dim)
    return tokens, torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def relative_error(got, want) -> float:
    return float((got - want).norm() / want.norm())


def bench_decode(args) -> dict:
    import torch

    import lmforge
    from examples.models.llama import Llama, LlamaConfig, LlamaDecodeStep
    from lmforge.backends.torch import TorchReference
    from lmforge.backends.tvm import TVMBackend
    from lmforge.compiler import CompiledModel

    torch.manual_seed(0)
    cfg = LlamaConfig.preset("5m")
    step = LlamaDecodeStep(Llama(cfg).eval())
    backend = TVMBackend()
    out = {}
    for batch in (1, 8):
        inputs = decode_inputs(cfg, batch, args.past)
        with torch.no_grad():
            graph = lmforge.compile(step, inputs).graph
            ours = CompiledModel(graph, backends=[backend, TorchReference()])
            t0 = time.perf_counter()
            compiled = torch.compile(step)
            compiled(*inputs)
            compile_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            got = ours(*inputs)
            build_s = time.perf_counter() - t0
            err = relative_error(got[0], step(*inputs)[0])
        times = interleaved({"torch eager": lambda: step(*inputs), "torch.compile": lambda: compiled(*inputs),
                             "lmforge tvm": lambda: ours(*inputs)}, args.rounds, 20)
        eager = times["torch eager"][0]
        out[f"batch{batch}"] = {
            "tokens_per_s": {name: batch / t for name, (t, _, _) in times.items()},
            "step_ms": {name: [t * 1e3, lo * 1e3, hi * 1e3] for name, (t, lo, hi) in times.items()},
            "vs_eager": {name: eager / t for name, (t, _, _) in times.items()},
            "lmforge_first_call_s": build_s, "torch_compile_first_call_s": compile_s, "logits_rel_err": err}
    return {"preset": "5m", "past": args.past, **out}


def bench_int8(args) -> dict:
    import torch

    import lmforge
    from examples.models.llama import Llama, LlamaConfig, LlamaDecodeStep
    from lmforge.backends.torch import TorchReference
    from lmforge.backends.tvm import TVMBackend
    from lmforge.compiler import CompiledModel
    from lmforge.passes.quant import quantize_weights

    torch.manual_seed(0)
    cfg = LlamaConfig.preset("100m")
    step = LlamaDecodeStep(Llama(cfg).eval())
    inputs = decode_inputs(cfg, 1, args.past)
    backend = TVMBackend()
    with torch.no_grad():
        graph = lmforge.compile(step, inputs).graph
        int8_graph = quantize_weights(graph, weight_bits=8, group_size=128, lm_head=True)
        ops = [n.op for n in int8_graph.nodes]
        fp32_tvm = CompiledModel(graph, backends=[backend, TorchReference()])
        int8_tvm = CompiledModel(int8_graph, backends=[backend, TorchReference()])
        want = step(*inputs)[0]
        errs = {"int8 tvm": relative_error(int8_tvm(*inputs)[0], want),
                "fp32 tvm": relative_error(fp32_tvm(*inputs)[0], want)}
        int8_ref = CompiledModel(int8_graph, backends=[TorchReference()])(*inputs)[0]
        errs["int8 tvm vs int8 reference"] = relative_error(int8_tvm(*inputs)[0], int8_ref)
    times = interleaved({"fp32 eager": lambda: step(*inputs), "fp32 lmforge tvm": lambda: fp32_tvm(*inputs),
                         "int8 lmforge tvm": lambda: int8_tvm(*inputs)}, args.rounds, 5)
    eager = times["fp32 eager"][0]
    weight_bytes = {name: sum(t.numel() * t.element_size() for t in g.weights.values())
                    for name, g in (("fp32", graph), ("int8", int8_graph))}
    return {"preset": "100m", "batch": 1, "past": args.past, "linear_wo_nodes": ops.count("linear_wo"),
            "linear_nodes_left": ops.count("linear"), "weight_bytes": weight_bytes,
            "tokens_per_s": {name: 1 / t for name, (t, _, _) in times.items()},
            "step_ms": {name: [t * 1e3, lo * 1e3, hi * 1e3] for name, (t, lo, hi) in times.items()},
            "vs_fp32_eager": {name: eager / t for name, (t, _, _) in times.items()}, "rel_err": errs}


def structured_prefill_qkv(b: int, hq: int, hkv: int, s: int, d: int, seed: int, sharpness: float = 1.0):
    """Synthetic prefill q / k / v with structure a sparse prefill can exploit: q and k follow one slowly varying
    random walk per KV head (a local band: nearby tokens attend to each other), every 37th key is pulled towards
    the mean query (heavy vertical columns), plus noise; q is scaled by `sharpness` (peakier attention). Not a
    trained model's attention: a stand-in with known structure for kernels and benchmarks."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    walk = torch.randn(b, hkv, s, d, generator=gen).cumsum(2) / torch.arange(1, s + 1).sqrt()[:, None]
    q = walk.repeat_interleave(hq // hkv, 1) + 0.3 * torch.randn(b, hq, s, d, generator=gen)
    k = walk + 0.3 * torch.randn(b, hkv, s, d, generator=gen)
    k[:, :, ::37] += 2.0 * q.mean(2, keepdim=True)[:, ::hq // hkv]
    return q * sharpness, k, torch.randn(b, hkv, s, d, generator=gen)


def bench_sparse(args) -> dict:
    """(d) causal prefill attention, 8 heads x 1024 tokens x 64: block-sparse (blocks of 64, a FlexPrefill-like
    mask: the diagonal block, the first (sink) block and a random quarter of the rest) vs dense causal, both on
    the TVM backend, and torch SDPA (causal) beside them."""
    import torch
    import torch.nn.functional as F

    from lmforge.backends.torch import TorchReference
    from lmforge.backends.tvm import TVMBackend
    from lmforge.compiler import CompiledModel
    from lmforge.ir.graph import GraphBuilder
    from lmforge.ir.ops import get_op
    from lmforge.ir.types import TensorType

    h, s, d, bs = 8, 1024, 64, 64
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, s, d, generator=g) for _ in range(3))
    n = s // bs
    causal_blocks = torch.ones(n, n, dtype=torch.bool).tril()
    mask = (torch.rand(1, h, n, n, generator=g) < 0.25) & causal_blocks
    mask |= torch.eye(n, dtype=torch.bool)
    mask[..., 0] = True
    density = float(mask.sum() / (causal_blocks.sum() * h))

    def graph(op, extra, attrs, qkv=(q, k, v)):
        b = GraphBuilder(op)
        ins = [b.input(name, TensorType.of(t)) for name, t in zip("qkvm", (*qkv, *extra))]
        return b.build([b.op(op, ins, attrs)])

    backend = TVMBackend()
    sparse = CompiledModel(graph("block_sparse_attention", [mask], {"block_size": bs}), [backend, TorchReference()])
    dense = CompiledModel(graph("attention", [], {"causal": True}), [backend, TorchReference()])
    window = {"causal": True, "window": 256, "sinks": 4}
    windowed = CompiledModel(graph("attention", [], window), [backend, TorchReference()])
    reference = CompiledModel(graph("block_sparse_attention", [mask], {"block_size": bs}), [TorchReference()])
    # FlexPrefill as the sparsity pass lowers it (gamma 0.9, tau 0.1, blocks of 64), on structured inputs
    import lmforge

    fq, fk, fv = structured_prefill_qkv(1, h, h, s, d, seed=0)
    causal_fn = lambda q_, k_, v_: F.scaled_dot_product_attention(q_, k_, v_, is_causal=True)
    flex_cfg = {"attn.prefill_pattern": "flex", "attn.flex_gamma": 0.9, "attn.flex_tau": 0.1,
                "attn.flex_block": bs}
    flex = lmforge.compile(causal_fn, (fq, fk, fv), config=flex_cfg, backends=("tvm",), calibration=[(fq, fk, fv)])
    flex_density = next(n.attr["density"] for n in flex.graph.nodes if n.op == "block_sparse_attention")
    with torch.no_grad():
        err = relative_error(sparse(q, k, v, mask), reference(q, k, v, mask))
        flex_err = relative_error(flex(fq, fk, fv), get_op("flex_prefill_attention").reference(
            fq, fk, fv, gamma=0.9, tau=0.1, block_size=bs))
        flex_vs_dense = relative_error(flex(fq, fk, fv), causal_fn(fq, fk, fv))
        dense_err = relative_error(dense(q, k, v), F.scaled_dot_product_attention(q, k, v, is_causal=True))
        window_err = relative_error(windowed(q, k, v), get_op("attention").reference(q, k, v, **window))
    times = interleaved({"torch SDPA causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                         "lmforge tvm dense causal": lambda: dense(q, k, v),
                         "lmforge tvm block-sparse": lambda: sparse(q, k, v, mask),
                         "lmforge tvm window 256+4": lambda: windowed(q, k, v),
                         "lmforge tvm FlexPrefill": lambda: flex(fq, fk, fv),
                         "torch ref FlexPrefill": lambda: get_op("flex_prefill_attention").reference(
                             fq, fk, fv, gamma=0.9, tau=0.1, block_size=bs)}, args.rounds, 3)
    sdpa = times["torch SDPA causal"][0]

    # FlexPrefill over 4096 tokens, where the mask's estimate (the last block of queries against every key) is a
    # smaller share of the work, on peakier attention (sharpness 4): SDPA, dense causal TVM and FlexPrefill on TVM
    lq, lk, lv = structured_prefill_qkv(1, h, h, 4 * s, d, seed=1, sharpness=4.0)
    long_flex = lmforge.compile(causal_fn, (lq, lk, lv), config=flex_cfg, backends=("tvm",),
                                calibration=[(lq, lk, lv)])
    long_dense = lmforge.compile(causal_fn, (lq, lk, lv), backends=("tvm",))
    long_density = next(n.attr["density"] for n in long_flex.graph.nodes if n.op == "block_sparse_attention")
    with torch.no_grad():
        long_err = relative_error(long_flex(lq, lk, lv), get_op("flex_prefill_attention").reference(
            lq, lk, lv, gamma=0.9, tau=0.1, block_size=bs))
    ltimes = interleaved({"torch SDPA causal": lambda: causal_fn(lq, lk, lv),
                          "lmforge tvm dense causal": lambda: long_dense(lq, lk, lv),
                          "lmforge tvm FlexPrefill": lambda: long_flex(lq, lk, lv)}, args.rounds, 1)
    lsdpa = ltimes["torch SDPA causal"][0]

    # decode: one query per head over a 16k cache, batch 1
    past, window = 16384, {"causal": True, "window": 512, "sinks": 4}
    qd, kd, vd = torch.randn(1, h, 1, d, generator=g), torch.randn(1, h, past, d, generator=g), \
        torch.randn(1, h, past, d, generator=g)
    decode = {name: CompiledModel(graph("attention", [], attrs, (qd, kd, vd)), [backend, TorchReference()])
              for name, attrs in (("dense", {"causal": True}), ("window", window))}
    with torch.no_grad():
        decode_err = relative_error(decode["window"](qd, kd, vd), get_op("attention").reference(qd, kd, vd, **window))
    dtimes = interleaved({"torch SDPA (whole cache)": lambda: F.scaled_dot_product_attention(qd, kd, vd),
                          "lmforge tvm decode, whole cache": lambda: decode["dense"](qd, kd, vd),
                          "lmforge tvm decode, window 512+4": lambda: decode["window"](qd, kd, vd)}, args.rounds, 20)
    dsdpa = dtimes["torch SDPA (whole cache)"][0]
    return {"shape": [1, h, s, d], "block_size": bs, "density_of_causal_blocks": density,
            "ms": {name: [t * 1e3, lo * 1e3, hi * 1e3] for name, (t, lo, hi) in times.items()},
            "vs_sdpa": {name: sdpa / t for name, (t, _, _) in times.items()},
            "rel_err_vs_reference": err, "dense_rel_err_vs_sdpa": dense_err, "window_rel_err": window_err,
            "flex_density": flex_density, "flex_rel_err_vs_reference": flex_err,
            "flex_rel_err_vs_dense": flex_vs_dense,
            "flex_long_shape": [1, h, 4 * s, d], "flex_long_density": long_density,
            "flex_long_rel_err_vs_reference": long_err,
            "flex_long_ms": {name: [t * 1e3, lo * 1e3, hi * 1e3] for name, (t, lo, hi) in ltimes.items()},
            "flex_long_vs_sdpa": {name: lsdpa / t for name, (t, _, _) in ltimes.items()},
            "decode_shape": [1, h, 1, d], "decode_past": past, "decode_window_rel_err": decode_err,
            "decode_us": {name: [t * 1e6, lo * 1e6, hi * 1e6] for name, (t, lo, hi) in dtimes.items()},
            "decode_vs_sdpa": {name: dsdpa / t for name, (t, _, _) in dtimes.items()}}


def bench_mistral(args) -> dict:
    """(e) a Hugging Face Mistral prefill with a sliding window: eager (SDPA with the model's window mask) vs
    lmforge on TVM (the mask recognized as window attention)."""
    import torch
    import transformers

    import lmforge

    seq, window = 2048, 256
    cfg = transformers.MistralConfig(vocab_size=256, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                                     num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=seq,
                                     sliding_window=window, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.MistralForCausalLM(cfg).eval()

    def logits(ids):
        return model(input_ids=ids, use_cache=False).logits

    ids = torch.randint(0, 256, (1, seq))
    compiled = lmforge.compile(logits, (ids[:, :16],), dynamic={"ids": {1: "seq"}}, backends=("tvm",))
    windows = [n.attr["window"] for n in compiled.graph.nodes if n.op == "attention"]
    with torch.no_grad():
        err = relative_error(compiled(ids), logits(ids))
    times = interleaved({"HF eager (SDPA + window mask)": lambda: logits(ids),
                         "lmforge tvm (window attention)": lambda: compiled(ids)}, args.rounds, 1)
    base = times["HF eager (SDPA + window mask)"][0]
    return {"shape": {"seq": seq, "window": window, "layers": 2, "hidden": 512, "heads": 8},
            "transformers": transformers.__version__, "attention_windows": windows, "rel_err": err,
            "ms": {name: [t * 1e3, lo * 1e3, hi * 1e3] for name, (t, lo, hi) in times.items()},
            "vs_eager": {name: base / t for name, (t, _, _) in times.items()}}


# ---- report ------------------------------------------------------------------------------------------------

def environment(args) -> dict:
    import torch
    import tvm

    from lmforge.backends.tvm.target import host_cpu

    return {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.processor() or platform.machine(),
            "llvm_cpu": host_cpu(), "cores": os.cpu_count(), "threads": args.threads,
            "load_avg_start": os.getloadavg(), "torch": torch.__version__, "tvm": tvm.__version__,
            "python": platform.python_version()}


def print_timings(rows: dict, ratios: dict, unit: str, baseline: str, width: int = 26, digits: int = 2) -> None:
    """One table: each variant's time (median and min..max of the round medians) and its ratio to the baseline."""
    print(f"{'variant':<{width}} {unit + ' (min..max)':>24} {'vs ' + baseline:>9}")
    for name, (t, lo, hi) in rows.items():
        print(f"{name:<{width}} {t:10.{digits}f} ({lo:.{digits}f}..{hi:.{digits}f}) {ratios[name]:8.2f}x")


def print_tables(results: dict) -> None:
    env = results["env"]
    print(f"\n# cpu_backend  {env['date']}  {env['llvm_cpu']}  {env['cores']} cores  threads={env['threads']}  "
          f"torch {env['torch']}  tvm {env['tvm']}  load avg {env['load_avg_start'][0]:.2f} -> "
          f"{env.get('load_avg_end', (float('nan'),))[0]:.2f}")
    if "matmul" in results:
        m = results["matmul"]
        print(f"\n(a) matmul 1024^3 fp32, {m['trials']} trials per search")
        print(f"{'variant':<18} {'GFLOP/s':>9} {'range':>15} {'vs torch':>9} {'tuning s':>9}")
        for name, r in m["rows"].items():
            lo, hi = r["gflops_range"]
            wall = f"{r['tuning_wall_s']:9.1f}" if r["tuning_wall_s"] is not None else f"{'-':>9}"
            print(f"{name:<18} {r['gflops']:9.1f} {lo:7.1f}..{hi:<7.1f} {r['vs_torch']:8.2f}x {wall}")
        print(f"best config: {m['best_config']}")
        if m["metaschedule_error"]:
            print(f"MetaSchedule failed: {m['metaschedule_error']}")
    if "decode" in results:
        d = results["decode"]
        print(f"\n(b) decode step, Llama {d['preset']}, {d['past']} cached tokens")
        print(f"{'batch':<6} {'variant':<15} {'tokens/s':>10} {'step ms (min..max)':>24} {'vs eager':>9}")
        for key in ("batch1", "batch8"):
            r = d[key]
            for name, tps in r["tokens_per_s"].items():
                ms, lo, hi = r["step_ms"][name]
                print(f"{key[5:]:<6} {name:<15} {tps:10.1f} {ms:10.3f} ({lo:.3f}..{hi:.3f}) {r['vs_eager'][name]:8.2f}x")
            print(f"       logits rel err {r['logits_rel_err']:.2e}; first call: lmforge "
                  f"{r['lmforge_first_call_s']:.1f}s, torch.compile {r['torch_compile_first_call_s']:.1f}s")
    if "int8" in results:
        q = results["int8"]
        print(f"\n(c) decode step, Llama {q['preset']}, batch 1, {q['past']} cached tokens; "
              f"{q['linear_wo_nodes']} linear_wo nodes, weights {q['weight_bytes']['fp32'] / 1e6:.0f} MB fp32 -> "
              f"{q['weight_bytes']['int8'] / 1e6:.0f} MB int8")
        print(f"{'variant':<18} {'tokens/s':>10} {'step ms (min..max)':>26} {'vs fp32 eager':>14}")
        for name, tps in q["tokens_per_s"].items():
            ms, lo, hi = q["step_ms"][name]
            print(f"{name:<18} {tps:10.1f} {ms:10.2f} ({lo:.2f}..{hi:.2f}) {q['vs_fp32_eager'][name]:13.2f}x")
        print(f"rel err of logits: {q['rel_err']}")
    if "sparse" in results:
        r = results["sparse"]
        print(f"\n(d) causal prefill attention {r['shape']}, blocks of {r['block_size']}, block-sparse keeps "
              f"{r['density_of_causal_blocks']:.0%} of the causal blocks")
        print_timings(r["ms"], r["vs_sdpa"], "ms", "SDPA")
        print(f"rel err: block-sparse vs reference {r['rel_err_vs_reference']:.1e}, dense vs SDPA "
              f"{r['dense_rel_err_vs_sdpa']:.1e}, window vs reference {r['window_rel_err']:.1e}")
        if "flex_density" in r:
            print(f"FlexPrefill (gamma 0.9, tau 0.1) kept {r['flex_density']:.0%} of the causal blocks; rel err vs "
                  f"its torch reference {r['flex_rel_err_vs_reference']:.1e}, vs dense attention "
                  f"{r['flex_rel_err_vs_dense']:.1e} (what FlexPrefill drops)")
        if "flex_long_ms" in r:
            print(f"\n    FlexPrefill at {r['flex_long_shape']} (sharpness 4): kept {r['flex_long_density']:.0%} "
                  f"of the causal blocks, rel err vs its reference {r['flex_long_rel_err_vs_reference']:.1e}")
            print_timings(r["flex_long_ms"], r["flex_long_vs_sdpa"], "ms", "SDPA")
        print(f"\n    decode attention {r['decode_shape']} over {r['decode_past']} cached tokens")
        print_timings(r["decode_us"], r["decode_vs_sdpa"], "us", "SDPA", width=34, digits=1)
        print(f"rel err: window decode vs reference {r['decode_window_rel_err']:.1e}")
    if "mistral" in results:
        r = results["mistral"]
        print(f"\n(e) Hugging Face Mistral prefill {r['shape']} (transformers {r['transformers']}); attention windows "
              f"{r['attention_windows']}; logits rel err {r['rel_err']:.1e}")
        print_timings(r["ms"], r["vs_eager"], "ms", "eager", width=32, digits=1)


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # read when TVM's thread pool starts
    import torch

    torch.set_num_threads(args.threads)
    parts = set(args.only.split(","))
    results: dict = {"env": environment(args)}
    for name, fn in (("matmul", bench_matmul), ("decode", bench_decode), ("int8", bench_int8),
                     ("sparse", bench_sparse), ("mistral", bench_mistral)):
        if name in parts:
            print(f"running ({name}) ...", flush=True)
            results[name] = fn(args)
    results["env"]["load_avg_end"] = os.getloadavg()
    print_tables(results)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    return results


if __name__ == "__main__":
    main()
