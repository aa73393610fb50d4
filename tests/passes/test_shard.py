"""Tensor parallelism (lmforge.passes.shard, lmforge.backends.collectives): the split graph, run by its ranks,
equals the unsplit graph on fresh random inputs; the layout is Megatron's; the cost model prices one rank plus the
collectives; the search, export and a real torch.distributed (gloo) job use it."""
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import lmforge
from examples.llama_workload import random_workload
from lmforge.backends.collectives import TensorParallelModel, ThreadGroup, current_group, use_group
from lmforge.compiler import CompiledModel
from lmforge.errors import LmforgeError
from lmforge.hwmodels import get_target
from lmforge.ir.ops import get_op
from lmforge.ir.types import TensorType
from lmforge.passes import PassManager, default_pipeline
from lmforge.passes.shard import (ShardError, plan_of, rank_weights, reshape_split_dim, tensor_parallel,
                                  tensor_parallel_pass)
from lmforge.search.cost_model import graph_cost

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def decode():
    """The 5m Llama's decode step (8 query / 4 KV heads, 5 layers), captured once; fresh random inputs per test."""
    w = random_workload("5m", seed=3)
    return w, lmforge.capture(w.model, w.example_inputs, dynamic=w.dynamic)


def _inputs(w, seed, batch=3, past=6):
    """(tokens [batch, 1], k_cache, v_cache [layers, batch, KV heads, past, head dim]), seeded."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 4096, (batch, 1), generator=gen)
    shape = list(w.example_inputs[1].shape)
    shape[1], shape[3] = batch, past
    return tokens, torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)


def _assert_same(got, want, tol=1e-5):
    for a, b in zip(got, want):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


PIPELINE_CONFIGS = {
    "default": {},
    "int4_g32": {"quant.weight_bits": 4, "quant.group_size": 32},
    "int8_lm_head": {"quant.weight_bits": 8, "quant.lm_head": True},
    "kv_int8": {"quant.kv": "int8"},
    "window_sinks": {"attn.decode_pattern": "window", "attn.decode_window": 4, "attn.sinks": 2},
    "block_topk": {"attn.decode_pattern": "block_topk", "attn.block_size": 2, "attn.topk_blocks": 1},
    "unmerged_unfused": {"fusion.merge_linears": False, "fusion.elementwise": False},
}


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("name", sorted(PIPELINE_CONFIGS))
def test_split_decode_step_equals_the_unsplit_graph(decode, name, tp):
    w, graph = decode
    g = PassManager(default_pipeline()).run(graph, PIPELINE_CONFIGS[name])
    tokens, k, v = _inputs(w, seed=len(name) + tp)
    split = tensor_parallel(g, tp)
    _assert_same(TensorParallelModel(split)(tokens, k, v), CompiledModel(g)(tokens, k, v))


def test_megatron_layout_two_all_reduces_per_layer_and_caches_split_on_heads(decode):
    _, graph = decode
    g = PassManager(default_pipeline()).run(graph, {})
    split = tensor_parallel(g, 2)
    ops = [n.op for n in split.nodes]
    plan = plan_of(split)
    assert ops.count("all_reduce") == 2 * 5 and ops.count("shard_slice") == 0
    assert ops.count("all_gather") == 1                     # the logits of the vocabulary-parallel lm_head
    assert plan["inputs"] == {"k_cache": 2, "v_cache": 2} and plan["outputs"] == {"1": 2, "2": 2}
    qkv = next(k for k in plan["params"] if "wq" in k)
    assert plan["params"][qkv] == [0, [256, 128, 128]]        # merged QKV: each block split on its own
    assert plan["params"]["model.layers.0.attention.wo.weight"] == [1, None]
    attn = next(n for n in split.nodes if n.op == "attention")
    assert [v.type.shape[1] for v in attn.inputs] == [4, 2, 2]   # 8 / 4 heads -> 4 / 2 per rank
    # the whole weights stay, each rank cuts its own: rank 1's QKV rows are the second half of each block
    whole = g.weights[qkv]
    r1 = rank_weights(split, 1)[qkv]
    torch.testing.assert_close(r1, torch.cat([whole[128:256], whole[320:384], whole[448:512]]))


def test_a_captured_graph_splits_without_the_other_passes(decode):
    """No pass before: the cache grows by a plain concat, K / V / Q are separate linears, nothing is fused."""
    w, graph = decode
    split = tensor_parallel(graph, 2)
    assert plan_of(split)["inputs"] == {"k_cache": 2, "v_cache": 2}
    assert [n.op for n in split.nodes].count("all_reduce") == 10
    tokens, k, v = _inputs(w, seed=21)
    _assert_same(TensorParallelModel(split)(tokens, k, v), CompiledModel(graph)(tokens, k, v))


def test_shared_prefix_decode_splits_too(decode):
    """Hydragen's shared_prefix_attention reads the prefix and suffix slices of the split caches, per head."""
    from lmforge.passes import shared_prefix_decode

    w, graph = decode
    g = shared_prefix_decode(PassManager(default_pipeline()).run(graph, {}), 4)
    tokens, k, v = _inputs(w, seed=31)
    k[:, 1:, :, :4], v[:, 1:, :, :4] = k[:, :1, :, :4], v[:, :1, :, :4]       # the sequences share 4 tokens
    split = tensor_parallel(g, 2)
    assert plan_of(split)["inputs"] == {"k_cache": 2, "v_cache": 2}
    assert "shard_slice" not in [n.op for n in split.nodes]
    _assert_same(TensorParallelModel(split)(tokens, k, v), CompiledModel(g)(tokens, k, v))


def test_split_prefill_equals_the_unsplit_graph():
    w = random_workload("5m", phase="prefill", seed=4)
    g = PassManager(default_pipeline()).run(lmforge.capture(w.model, w.example_inputs,
                                                            dynamic={"tokens": {0: "batch"}}), {})
    tokens = torch.randint(0, 4096, (3, w.example_inputs[0].shape[1]), generator=torch.Generator().manual_seed(5))
    _assert_same(TensorParallelModel(tensor_parallel(g, 2))(tokens), CompiledModel(g)(tokens))


def test_heads_that_do_not_divide_are_refused(decode):
    _, graph = decode
    with pytest.raises(ShardError, match=r"head counts \[8, 4, 4\].*divide by 8"):
        tensor_parallel(graph, 8)
    with pytest.raises(ShardError, match="int >= 1"):
        tensor_parallel(graph, 0)
    assert tensor_parallel(graph, 1) is graph
    with pytest.raises(ShardError, match="already split"):
        tensor_parallel(tensor_parallel(graph, 2), 2)


def test_a_split_graph_only_runs_through_its_ranks(decode):
    w, graph = decode
    split = tensor_parallel(PassManager(default_pipeline()).run(graph, {}), 2)
    with pytest.raises(LmforgeError, match="TensorParallelModel"):
        CompiledModel(split)
    with pytest.raises(LmforgeError, match="tensor-parallel ranks"):
        get_op("all_reduce").reference(torch.ones(2), group_size=2)   # no group: says how to run it
    tokens, k, v = _inputs(w, seed=9, batch=2)
    with pytest.raises(LmforgeError, match="must have size 4 in dim 2"):   # the whole cache has 4 KV heads
        TensorParallelModel(split)(tokens, k[:, :, :3], v[:, :, :3])


@pytest.mark.parametrize("in_shape,out_shape,dim,tp,expected", [
    (("b", 1, 256), ("b", 1, 8, 32), 2, 2, 2),      # features -> heads: the split goes to the head dim
    (("b", 1, 8, 32), ("b", 1, 256), 2, 2, 2),      # heads -> features
    (("b", 4, 1, 32), (1, "b", 4, 1, 32), 1, 2, 2),  # a leading 1 (stacked caches)
    (("b", 1, 256), ("b", 1, 8, 32), 2, 16, None),  # 8 heads do not split 16 ways
    (("b", 1, 8, 32), ("b", 1, 256), 3, 2, None),   # a split head_dim is not a block of the merged features
    (("b", 6), ("b", 2, 3), 1, 2, 1),
    (("b", 6), ("b", 3, 2), 1, 2, None),            # the major dim 3 does not divide by 2
])
def test_reshape_split_dim(in_shape, out_shape, dim, tp, expected):
    assert reshape_split_dim(in_shape, out_shape, dim, tp) == expected


def test_thread_group_collectives_agree_on_every_rank():
    group = ThreadGroup(3)
    parts = [torch.randn(4, 5, generator=torch.Generator().manual_seed(r)) for r in range(3)]
    out = [None] * 3

    def run(r):
        with group.turn(), use_group(group.rank_view(r)):
            g = current_group(3)
            out[r] = (g.all_reduce(parts[r]), g.all_gather(parts[r], 1),
                      get_op("shard_slice").reference(torch.arange(6.0), group_size=3, dim=0))

    import threading
    threads = [threading.Thread(target=run, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in range(3):
        assert torch.equal(out[r][0], out[0][0])                     # bit-identical sums on every rank
        torch.testing.assert_close(out[r][0], parts[0] + parts[1] + parts[2])
        torch.testing.assert_close(out[r][1], torch.cat(parts, 1))
        torch.testing.assert_close(out[r][2], torch.arange(6.0)[2 * r:2 * r + 2])


def test_a_failing_rank_stops_the_others_and_its_error_is_raised(decode, monkeypatch):
    """Rank 1 fails before its first all_reduce: rank 0, waiting there, is released and the caller gets rank 1's
    error (not a hang, not a BrokenBarrierError)."""
    w, graph = decode
    model = TensorParallelModel(tensor_parallel(PassManager(default_pipeline()).run(graph, {}), 2))
    real = model.ranks[1]._fn

    def broken(*args):
        raise ValueError("rank 1 broke")

    monkeypatch.setattr(model.ranks[1], "_fn", broken)
    with pytest.raises(ValueError, match="rank 1 broke"):
        model(*_inputs(w, seed=41))
    monkeypatch.setattr(model.ranks[1], "_fn", real)
    tokens, k, v = _inputs(w, seed=42)
    assert model(tokens, k, v)[0].shape == (3, 1, 4096)            # the next call runs normally


def test_collective_costs_go_over_the_interconnect():
    x = TensorType((8, 1024), "float16")
    reduce = get_op("all_reduce").cost([x], {"group_size": 4})
    gather = get_op("all_gather").cost([x], {"group_size": 4, "dim": 1})
    assert reduce.bytes_by_tier == (("peer", 2 * 3 / 4 * 8 * 1024 * 2),) and reduce.op_class == "collective"
    assert gather.bytes_by_tier == (("peer", 3 / 4 * 8 * 4096 * 2),)
    assert get_op("all_reduce").cost([x], {"group_size": 1}).bytes == 0.0


def test_cost_model_prices_one_rank_plus_the_collectives():
    w = random_workload("100m")
    g = PassManager(default_pipeline()).run(lmforge.capture(w.model, w.example_inputs, dynamic=w.dynamic), {})
    hw = get_target("h100")
    dims = {"batch": 8, "past": 1024}
    one, two = graph_cost(g, hw, dims), graph_cost(tensor_parallel(g, 2), hw, dims)
    comm = [n for n in two.nodes if n.op in ("all_reduce", "all_gather")]
    layers = sum(n.op == "attention" for n in g.nodes)
    assert len(comm) == 2 * layers + 1
    # each all_reduce: the fixed cost of a collective plus 2 (g - 1) / g of the hidden state over NVLink
    ar = next(n for n in comm if n.op == "all_reduce")
    assert ar.time_s == pytest.approx(hw.launch("collective") + ar.cost.bytes / (hw.interconnect[1] * 0.8))
    assert two.weight_bytes < 0.65 * one.weight_bytes            # embeddings and norms stay whole
    assert two.peak_memory_bytes < 0.6 * one.peak_memory_bytes   # and so do the activations


def test_tune_splits_a_model_whose_kv_cache_does_not_fit_one_gpu(decode, tmp_path):
    """5m Llama at batch 256 and 192k cached tokens: 258 GB of fp32 KV cache per step (held once: the appends
    write into it in place). With the split as the only knob (KV int8 would fit one GPU too), only tp = 4 fits an
    H100 (tp = 2 leaves 129 GB per GPU; tp = 8 does not divide the 4 KV heads: pruned)."""
    w, _ = decode
    result = lmforge.tune(w, target="h100", budget=8, pipeline=[tensor_parallel_pass(8)],
                          storage=f"sqlite:///{tmp_path}/tp.db", constraints={"fits": True},
                          bindings={"batch": 256, "past": 3 * 65536}, progress=False, seed=0)
    assert result.best_config["shard.tp"] == 4 and result.best_values["fits"] == 1.0
    tried = {t.user_attrs["config"]["shard.tp"]: t.user_attrs["values"]["fits"]
             for t in result.study.trials if "values" in t.user_attrs}
    assert tried.get(1, 0.0) == 0.0 and tried.get(2, 0.0) == 0.0
    pruned = [t for t in result.study.trials if "pruned_reason" in t.user_attrs]
    assert pruned and all("divide by 8" in t.user_attrs["pruned_reason"] for t in pruned)
    # best_configs (warm starts) looks at single-GPU studies unless asked for multi-GPU ones
    from lmforge.search.tuner import best_configs, prepare

    graph = prepare(w)[1]
    storage = f"sqlite:///{tmp_path}/tp.db"
    assert best_configs(graph, "h100", storage) == []
    assert best_configs(graph, "h100", storage, tensor_parallel=True)[0]["shard.tp"] == 4
    # compile(config="best") takes the tune's best, split over its 4 ranks as config={"shard.tp": 4} would be
    model = lmforge.compile(w.model, w.example_inputs, dynamic=w.dynamic, target="h100", config="best",
                            storage=storage)
    assert model.config == result.best_config and model.config_source["study"] == result.study_name
    assert isinstance(model, TensorParallelModel) and plan_of(model.graph)["size"] == 4


def test_compile_export_load_round_trip(decode, tmp_path):
    w, _ = decode
    config = {"shard.tp": 2, "quant.weight_bits": 4, "quant.group_size": 32}
    # a tuned config with shard.tp > 1 brings the tensor-parallel pass along (compile(config="best") too)
    model = lmforge.compile(w.model, w.example_inputs, dynamic=w.dynamic, config=config, target="h100")
    assert isinstance(model, TensorParallelModel) and plan_of(model.graph)["size"] == 2
    report = model.inspect()
    assert report.startswith("tensor parallel over 2 ranks") and "all_reduce" in report
    tokens, k, v = _inputs(w, seed=11)
    want = model(tokens, k, v)
    model.export(tmp_path / "art")
    manifest = (tmp_path / "art" / "manifest.json").read_text()
    assert "model.onnx" not in manifest and "tensor-parallel graph" in manifest
    loaded = lmforge.load(tmp_path / "art")
    assert isinstance(loaded, TensorParallelModel)
    _assert_same(loaded(tokens, k, v), want, tol=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_torch_distributed_job_runs_one_rank_per_process(tmp_path):
    """Two processes (gloo), each its own rank, each given the whole inputs, return the unsplit graph's outputs; with
    rank-local caches (split_io="local", for serving) each takes and returns only its part of the caches."""
    script = textwrap.dedent(f"""
        import sys, torch, torch.distributed as dist
        sys.path.insert(0, {str(REPO)!r})
        import lmforge
        from examples.llama_workload import random_workload
        from lmforge.backends.collectives import TensorParallelModel, TorchDistributedGroup
        from lmforge.compiler import CompiledModel
        from lmforge.passes import PassManager, default_pipeline
        from lmforge.passes.shard import cut, tensor_parallel
        rank = int(sys.argv[1])
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{_free_port()}", rank=rank, world_size=2)
        w = random_workload("5m", seed=6)
        g = PassManager(default_pipeline()).run(lmforge.capture(w.model, w.example_inputs, dynamic=w.dynamic), {{}})
        model = TensorParallelModel(tensor_parallel(g, 2), group=TorchDistributedGroup())
        assert list(model.ranks) == [rank]
        got, want = model(*w.example_inputs), CompiledModel(g)(*w.example_inputs)
        err = max((a - b).abs().max().item() for a, b in zip(got, want))
        assert err < 1e-5, err
        local = model.rank_local()
        tokens, k, v = w.example_inputs
        logits, k1, v1 = local(tokens, local.local_part("k_cache", k), local.local_part("v_cache", v))
        assert k1.shape[2] == k.shape[2] // 2 and (logits - want[0]).abs().max().item() < 1e-5
        assert (k1 - cut(want[1], 2, rank, 2)).abs().max().item() < 1e-5
        assert (v1 - cut(want[2], 2, rank, 2)).abs().max().item() < 1e-5
        art = lmforge.load({str(tmp_path / "art")!r}, group=TorchDistributedGroup(), split_io="local")
        logits2, _, _ = art(tokens, art.local_part("k_cache", k), art.local_part("v_cache", v))
        assert (logits2 - want[0]).abs().max().item() < 1e-5
        dist.destroy_process_group()
        print("rank", rank, "ok")
    """)
    from examples.llama_workload import random_workload

    w = random_workload("5m", seed=6)   # the artifact the ranks load with split_io="local"
    lmforge.compile(w.model, w.example_inputs, dynamic=w.dynamic, config={"shard.tp": 2}).export(tmp_path / "art")
    with pytest.raises(LmforgeError, match="without a group"):
        lmforge.load(tmp_path / "art", split_io="local")
    path = tmp_path / "job.py"
    path.write_text(script)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, str(path), str(r)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for r, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, err[-2000:]
        assert f"rank {r} ok" in out


def test_cli_tune_searches_tensor_parallelism(tmp_path, capsys):
    from lmforge.cli import main

    spec = f"{REPO}/examples/llama_workload.py:random_workload"
    code = main(["tune", spec, "--target", "h100", "--budget", "6", "--max-tp", "4",
                 "--storage", f"sqlite:///{tmp_path}/cli.db"])
    out = capsys.readouterr().out
    assert code == 0 and ":tp<=4" in out and "'shard.tp':" in out
