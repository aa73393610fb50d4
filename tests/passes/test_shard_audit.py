"""Tensor parallelism on the shapes an audit found mishandled: one KV head (MQA), numpy broadcasting of a split
operand of lower rank, norms over several trailing dims, KV quantization on a split head_dim, values read whole by
several ops (one all_gather), prefill caches kept on their ranks, and rank-local caches for serving. Each split
graph, run by its ranks, equals the unsplit graph on fresh random inputs."""
import threading

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lmforge
from examples.llama_workload import DECODE_DYNAMIC, PREFILL_DYNAMIC
from examples.models.llama import Llama, LlamaConfig, LlamaDecodeStep, LlamaPrefill
from lmforge.backends.collectives import TensorParallelModel, ThreadGroup
from lmforge.compiler import CompiledModel
from lmforge.ir.graph import Graph, Node, Value
from lmforge.ir.types import TensorType
from lmforge.passes import PassManager, default_pipeline
from lmforge.passes.shard import cut, plan_of, rank_weights, tensor_parallel


def _assert_same(got, want, tol=1e-5):
    got, want = ([got], [want]) if isinstance(want, torch.Tensor) else (got, want)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def _check(graph, inputs, tp):
    split = tensor_parallel(graph, tp)
    _assert_same(TensorParallelModel(split)(*inputs), CompiledModel(graph)(*inputs))
    return split


def _ops(graph) -> list[str]:
    return [n.op for n in graph.nodes]


# ---- one KV head (MQA) ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mqa():
    """A 2-layer Llama with 4 query heads and one KV head (head_dim 16), its decode step captured once."""
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=1, ffn_dim=96,
                              max_seq_len=64)).eval()
    tokens = torch.randint(0, 64, (2, 1))
    cache = torch.randn(2, 2, 1, 5, 16)
    return model, lmforge.capture(LlamaDecodeStep(model), (tokens, cache, cache.clone()), dynamic=DECODE_DYNAMIC)


def _mqa_inputs(seed, batch=3, past=7):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 64, (batch, 1), generator=gen), torch.randn(2, batch, 1, past, 16, generator=gen),
            torch.randn(2, batch, 1, past, 16, generator=gen))


MQA_CONFIGS = {
    "captured": None,                                     # separate K / V linears, a plain concat, no fusion
    "default": {},                                        # merged QKV: its K and V blocks stay whole
    "kv_int8": {"quant.kv": "int8"},                      # per-token scales over the whole head_dim
    "kv_int8_head": {"quant.kv": "int8", "quant.kv_axis": "head"},
    "kv_fp8": {"quant.kv": "fp8"},
    "int4_g16": {"quant.weight_bits": 4, "quant.group_size": 16},
    "block_topk": {"attn.decode_pattern": "block_topk", "attn.block_size": 2, "attn.topk_blocks": 1},
}


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("name", sorted(MQA_CONFIGS))
def test_one_kv_head_splits_the_query_heads_and_keeps_k_and_v_whole(mqa, name, tp):
    _, graph = mqa
    config = MQA_CONFIGS[name]
    g = graph if config is None else PassManager(default_pipeline()).run(graph, config)
    split = _check(g, _mqa_inputs(seed=len(name) + tp), tp)
    assert plan_of(split)["inputs"] == {} and plan_of(split)["outputs"] == {}    # one KV head: every rank's cache
    attn = [n for n in split.nodes if n.op in ("attention", "block_topk_attention")]
    assert len(attn) == 2 and all(n.inputs[1].type.shape[1] == n.inputs[2].type.shape[1] == 1 for n in attn)
    if name != "block_topk":           # its query heads of a KV head choose blocks together: they run whole
        assert all(n.inputs[0].type.shape[1] == 4 // tp for n in attn)
    if name not in ("block_topk", "int4_g16"):     # int4: w2's 96 inputs do not make 4 x 16-wide groups
        assert _ops(split).count("all_reduce") == 2 * 2 and _ops(split).count("all_gather") == 1


def test_a_merged_qkv_with_one_kv_head_splits_only_its_query_block(mqa):
    _, graph = mqa
    g = PassManager(default_pipeline()).run(graph, {})
    split = tensor_parallel(g, 2)
    qkv = next(k for k in plan_of(split)["params"] if "wq" in k)
    assert plan_of(split)["params"][qkv] == [0, [64, 16, 16], [1, 2]]      # blocks 1 and 2 (K, V) kept whole
    whole = g.weights[qkv]
    torch.testing.assert_close(rank_weights(split, 1)[qkv], torch.cat([whole[32:64], whole[64:96]]))
    assert next(p for p in split.params if p.name == qkv).type.shape == (64, 64)


def test_an_mqa_split_exports_and_loads(mqa, tmp_path):
    """The artifact keeps the merged QKV whole (its whole type counts the kept K / V blocks once)."""
    model, _ = mqa
    tp = lmforge.compile(LlamaDecodeStep(model), _mqa_inputs(0), dynamic=DECODE_DYNAMIC, config={"shard.tp": 2})
    inputs = _mqa_inputs(seed=12)
    want = tp(*inputs)
    _assert_same(want, lmforge.compile(LlamaDecodeStep(model), _mqa_inputs(0), dynamic=DECODE_DYNAMIC)(*inputs))
    tp.export(tmp_path / "art")
    loaded = lmforge.load(tmp_path / "art")
    assert isinstance(loaded, TensorParallelModel)
    _assert_same(loaded(*inputs), want, tol=0)


def test_one_kv_head_prefill_splits_too(mqa):
    model, _ = mqa
    g = PassManager(default_pipeline()).run(
        lmforge.capture(LlamaPrefill(model), (torch.randint(0, 64, (2, 6)),), dynamic=PREFILL_DYNAMIC), {})
    tokens = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(1))
    for tp in (2, 4):
        _check(g, (tokens,), tp)


def test_hugging_face_llama_with_one_kv_head_repeated_by_expand():
    """repeat_kv expands the one K / V head to every query head: the K / V projections still stay whole (no
    all_gather in the layers), the repeated heads are cut locally."""
    transformers = pytest.importorskip("transformers")

    class Logits(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids):
            return self.model(input_ids=input_ids, use_cache=False).logits

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64)
    compiled = lmforge.compile(Logits(transformers.LlamaForCausalLM(cfg).eval()), (torch.randint(0, 128, (2, 9)),),
                               dynamic={"input_ids": {0: "batch", 1: "seq"}})
    for tp in (2, 4):
        split = _check(compiled.graph, (torch.randint(0, 128, (3, 13), generator=torch.Generator().manual_seed(tp)),),
                       tp)
        assert _ops(split).count("all_reduce") == 4 and _ops(split).count("all_gather") == 1    # the logits


# ---- elementwise broadcasting ---------------------------------------------------------------------------------------

class _LinearPlus(nn.Module):
    def __init__(self, n_in, n_out):
        super().__init__()
        self.l = nn.Linear(n_in, n_out)

    def forward(self, x, z):
        return self.l(x) + z


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("x_shape,z_shape,n_out", [
    ((2, 8), (3, 2, 1), 4),      # [2, 4] + [3, 2, 1] -> [3, 2, 4]: the split operand has fewer dims than the output
    ((3, 16), (4, 3, 32), 32),   # [3, 32] + [4, 3, 32] -> [4, 3, 32]: z is cut (split) on the output's dim 2
    ((3, 16), (32,), 32),        # the split operand has more dims
])
def test_a_split_operand_of_lower_rank_broadcasts_on_the_right_dim(x_shape, z_shape, n_out, tp):
    torch.manual_seed(tp)
    m = _LinearPlus(x_shape[-1], n_out).eval()
    g = lmforge.capture(m, (torch.randn(x_shape), torch.randn(z_shape)))
    gen = torch.Generator().manual_seed(7)
    _check(g, (torch.randn(x_shape, generator=gen), torch.randn(z_shape, generator=gen)), tp)


# ---- norms over several trailing dims -------------------------------------------------------------------------------

class _HeadsNorm(nn.Module):
    """q projected into [batch, 4 heads, 8] (split on the heads), normalised over `norm_dims` trailing dims."""

    def __init__(self, kind, norm_dims, affine):
        super().__init__()
        self.q, self.o = nn.Linear(16, 32, bias=False), nn.Linear(32, 16, bias=False)
        self.kind, self.shape = kind, (4, 8)[-norm_dims:]
        self.norm = (nn.LayerNorm(self.shape) if kind == "layer" else nn.RMSNorm(self.shape, eps=1e-6)) \
            if affine else None

    def forward(self, x):
        h = self.q(x).view(x.shape[0], 4, 8)
        if self.norm is not None:
            h = self.norm(h)
        elif self.kind == "layer":
            h = F.layer_norm(h, self.shape)
        else:
            h = F.rms_norm(h, self.shape, eps=1e-6)
        return self.o(h.reshape(x.shape[0], 32))


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("norm_dims,affine", [(2, False), (2, True), (1, True)])
def test_a_norm_over_the_split_dim_runs_whole(kind, norm_dims, affine, tp):
    torch.manual_seed(0)
    m = _HeadsNorm(kind, norm_dims, affine).eval()
    for p in m.parameters():                # affine weights that are not all ones
        nn.init.normal_(p)
    g = lmforge.capture(m, (torch.randn(3, 16),))
    assert any(n.op in ("layernorm", "rmsnorm") and n.attr["ndim"] == norm_dims for n in g.nodes)
    split = _check(g, (torch.randn(3, 16, generator=torch.Generator().manual_seed(2)),), tp)
    norm = next(n for n in split.nodes if n.op in ("layernorm", "rmsnorm"))
    assert norm.inputs[0].type.shape[1] == (4 if norm_dims == 2 else 4 // tp)    # over the heads: whole


# ---- KV quantization on a split head_dim ----------------------------------------------------------------------------

def test_kv_qdq_scales_over_a_split_dim_run_whole():
    """kv_qdq's per-token scale is over the last dim: a column-parallel output split there is gathered first."""
    x, w = Value("x", TensorType((3, 16), "float32")), Value("w", TensorType((32, 16), "float32"))
    y, q = Value("y", TensorType((3, 32), "float32")), Value("q", TensorType((3, 32), "float32"))
    g = Graph("kvq", (x,), (w,), (Node("linear", (x, w, None), (y,)), Node("kv_qdq", (y,), (q,), {"dtype": "int8"})),
              (q,), weights={"w": torch.randn(32, 16)})
    _check(g, (torch.randn(3, 16, generator=torch.Generator().manual_seed(3)),), 2)


# ---- one all_gather per value ---------------------------------------------------------------------------------------

class _GreedyStep(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, tokens, k_cache, v_cache):
        logits, k, v = self.m.decode_step(tokens, k_cache, v_cache)
        return logits, logits.argmax(-1), logits.amax(-1), k, v


@pytest.mark.parametrize("tp", [2, 4])
def test_a_split_value_read_whole_by_several_ops_is_gathered_once(tp):
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=128,
                              max_seq_len=64)).eval()
    cache = torch.randn(2, 2, 4, 5, 16)
    g = PassManager(default_pipeline()).run(lmforge.capture(_GreedyStep(model), (torch.randint(0, 256, (2, 1)), cache,
                                                                                  cache.clone()),
                                                            dynamic=DECODE_DYNAMIC), {})
    gen = torch.Generator().manual_seed(4)
    inputs = (torch.randint(0, 256, (3, 1), generator=gen), torch.randn(2, 3, 4, 6, 16, generator=gen),
              torch.randn(2, 3, 4, 6, 16, generator=gen))
    split = _check(g, inputs, tp)
    assert _ops(split).count("all_gather") == 1       # the vocabulary-parallel logits, read by three ops


# ---- prefill caches stay on their ranks; rank-local caches -----------------------------------------------------------

@pytest.fixture(scope="module")
def gqa():
    """A 2-layer Llama with 4 query / 2 KV heads: its prefill and decode step, split over 2 ranks."""
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96,
                              max_seq_len=64)).eval()
    cache = torch.randn(2, 2, 2, 5, 16)
    pm = PassManager(default_pipeline())
    step = pm.run(lmforge.capture(LlamaDecodeStep(model), (torch.randint(0, 64, (2, 1)), cache, cache.clone()),
                                  dynamic=DECODE_DYNAMIC), {})
    prefill = pm.run(lmforge.capture(LlamaPrefill(model), (torch.randint(0, 64, (2, 6)),), dynamic=PREFILL_DYNAMIC),
                     {})
    return prefill, step


def test_a_split_prefill_keeps_its_caches_on_their_ranks(gqa):
    prefill, step = gqa
    split = tensor_parallel(prefill, 2)
    assert plan_of(split)["outputs"] == {"1": 2, "2": 2}                  # as the decode step takes them
    assert plan_of(split)["outputs"] == plan_of(tensor_parallel(step, 2))["outputs"]
    assert _ops(split).count("all_gather") == 1                          # the logits only
    tokens = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(5))
    _assert_same(TensorParallelModel(split)(tokens), CompiledModel(prefill)(tokens))    # whole caches returned


def _run_local(models, per_rank_inputs, group):
    """Each rank's model (split_io="local") on its own inputs, as the threads of `group`."""
    results = [None] * len(models)

    def work(r):
        with group.turn():
            results[r] = models[r](*per_rank_inputs[r])

    threads = [threading.Thread(target=work, args=(r,)) for r in range(len(models))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_rank_local_caches_go_from_prefill_through_decode_steps_without_a_gather(gqa, monkeypatch):
    """Serving: each rank keeps its part of the caches from the prefill through two decode steps; only the logits
    are gathered (what the cost model charges). The default whole mode gathers the caches on every call."""
    from lmforge.backends import collectives

    prefill, step = gqa
    gathered = []
    real = collectives._ThreadRank.all_gather
    monkeypatch.setattr(collectives._ThreadRank, "all_gather",
                        lambda self, x, dim: gathered.append(x.dim()) or real(self, x, dim))
    split_pre, split_step = tensor_parallel(prefill, 2), tensor_parallel(step, 2)
    group = ThreadGroup(2)
    pre = [TensorParallelModel(split_pre, group=group.rank_view(r), split_io="local") for r in range(2)]
    dec = [TensorParallelModel(split_step, group=group.rank_view(r)).rank_local() for r in range(2)]
    gen = torch.Generator().manual_seed(6)
    prompt, nxt = torch.randint(0, 64, (3, 7), generator=gen), torch.randint(0, 64, (2, 3, 1), generator=gen)

    want = CompiledModel(prefill)(prompt)
    got = _run_local(pre, [(prompt,)] * 2, group)
    for i in range(2):
        _assert_same(got[i][0], want[0])
        for j in (1, 2):
            _assert_same(got[i][j], cut(want[j], 2, i, 2))
    for t in range(2):
        want = CompiledModel(step)(nxt[t], want[1], want[2])
        got = _run_local(dec, [(nxt[t], got[r][1], got[r][2]) for r in range(2)], group)
        for r in range(2):
            _assert_same(got[r][0], want[0])
            _assert_same(got[r][1], cut(want[1], 2, r, 2))
    assert gathered and all(d == 3 for d in gathered)                     # logits [batch, seq, vocab] only
    assert dec[0].local_part("k_cache", want[1]).shape == got[0][1].shape

    gathered.clear()
    whole = [TensorParallelModel(split_step, group=group.rank_view(r)) for r in range(2)]
    outs = _run_local(whole, [(nxt[0], want[1], want[2])] * 2, group)
    assert sorted(gathered) == [3, 3, 5, 5, 5, 5]                         # and both caches, on each rank
    _assert_same(outs[1], CompiledModel(step)(nxt[0], want[1], want[2]))
    with pytest.raises(lmforge.errors.LmforgeError, match="split_io"):
        TensorParallelModel(split_step, split_io="local")
