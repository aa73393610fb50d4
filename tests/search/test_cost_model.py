"""Graph-level cost: decode loops charged per token with the KV cache growing, critical path, peak memory."""
import subprocess
import sys

import pytest
import torch

import lmforge
from lmforge.hwmodels import get_target
from lmforge.passes import PassManager, canonical_pipeline
from lmforge.search.cost_model import decode_cost, graph_cost, node_costs


@pytest.fixture(scope="module")
def step_graph():
    from examples.models.llama import Llama, LlamaConfig, LlamaDecodeStep

    torch.manual_seed(0)
    model = Llama(LlamaConfig.preset("tiny")).eval()
    _, k, v = model.prefill(torch.randint(0, 14, (2, 5)))
    g = lmforge.capture(LlamaDecodeStep(model), (torch.randint(0, 14, (2, 1)), k, v),
                        dynamic={"tokens": {0: "batch"}, "k_cache": {1: "batch", 3: "past"},
                                 "v_cache": {1: "batch", 3: "past"}})
    return PassManager(canonical_pipeline()).run(g)


def test_decode_cost_grows_with_generated_length_as_the_closed_form(step_graph):
    hw = get_target("h100")
    prompt = 100
    costs = [decode_cost(step_graph, hw, prompt_len=prompt, new_tokens=n, bindings={"batch": 4}) for n in (1, 2, 3, 8)]
    per_step = [graph_cost(step_graph, hw, {"batch": 4, "past": prompt + t}) for t in range(8)]
    # bytes and FLOPs of one step are affine in the cache length: b(t) = a + c * (prompt + t)
    c_bytes = per_step[1].bytes - per_step[0].bytes
    c_flops = per_step[1].flops - per_step[0].flops
    assert c_bytes > 0 and c_flops > 0
    for t in range(8):
        assert per_step[t].bytes == pytest.approx(per_step[0].bytes + c_bytes * t)
        assert per_step[t].flops == pytest.approx(per_step[0].flops + c_flops * t)
    for cost, n in zip(costs, (1, 2, 3, 8)):
        # sum_{t<n} (a + c (L + t)) = n a + c (n L + n (n - 1) / 2): quadratic in the generated length
        want = n * per_step[0].bytes + c_bytes * n * (n - 1) / 2
        assert cost.bytes == pytest.approx(want)
        assert cost.tokens == n and len(cost.per_token_time_s) == n
    assert costs[-1].per_token_time_s[-1] > costs[-1].per_token_time_s[0]


def test_critical_path_overlaps_parallel_branches_and_memory_fits():
    def two_branches(x, y):
        return torch.relu(x @ x) + torch.tanh(y @ y)

    x = torch.randn(256, 256)
    g = lmforge.capture(two_branches, (x, x))
    gc = graph_cost(g, get_target("h100"))
    assert 0 < gc.critical_path_s < gc.time_s
    assert gc.fits and gc.peak_memory_bytes >= 2 * x.numel() * 4
    from dataclasses import replace

    small = replace(get_target("h100"), memory_bytes=float(x.numel() * 4))
    assert not graph_cost(g, small).fits, "two 256x256 fp32 inputs do not fit in the memory of one"


def test_inspect_with_a_target_shows_time_bound_and_eflops():
    out = subprocess.run([sys.executable, "-m", "lmforge", "inspect", "examples/llama_workload.py", "--target", "h100"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    line = next(l for l in out.stdout.splitlines() if "= attention(" in l)
    assert "us " in line and "-bound" in line and "eFLOPs=" in line


@pytest.mark.parametrize("kv", ["int8", "fp8"])
def test_a_kv_cache_stored_in_8_bits_takes_a_quarter_of_the_memory(step_graph, kv):
    """Attention reads the cache through kv_qdq (fused into the read, no copy): the cache (input, appended,
    returned) is held in 1 byte per element plus an fp32 scale per token and head, (1 + 4 / D) / 4 of fp32."""
    from lmforge.passes import kv_quant_pass
    from lmforge.search.cost_model import bindings_for, peak_memory

    quantized = PassManager([kv_quant_pass]).run(step_graph, {"quant.kv": kv})
    dims = {"batch": 64, "past": 65536}        # the cache dominates: the tiny model's weights are ~100 KB
    head_dim = step_graph.inputs[1].type.shape[-1]
    ratio = peak_memory(quantized, bindings_for(quantized, dims)) / peak_memory(step_graph,
                                                                               bindings_for(step_graph, dims))
    assert ratio == pytest.approx((1 + 4 / head_dim) / 4, abs=0.01)


def test_peak_memory_keeps_a_value_live_while_a_view_of_it_is_read():
    """a (16 MiB) is read only through a reshape whose reader comes after c (16 MiB) is made: both are live then
    (a view shares its source's memory; the source was freed at the view)."""
    import lmforge
    from lmforge.search.cost_model import peak_memory

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w1, self.w2 = torch.nn.Parameter(torch.randn(4096, 16)), torch.nn.Parameter(torch.randn(4096, 16))

        def forward(self, x):
            b = torch.nn.functional.linear(x, self.w1).reshape(1024, 64, 64)
            c = torch.nn.functional.linear(x, self.w2)
            return b.sum(-1).sum(-1) + c.sum(-1)

    g = lmforge.capture(M(), (torch.randn(1024, 16),))
    base = sum(v.type.nbytes() for v in (*g.inputs, *g.params))
    assert peak_memory(g, {}) - base >= 2 * 16 * 2**20


def test_a_decode_step_holds_its_kv_cache_once(step_graph):
    """The appends write into the cache in place and the returned stack is the layers' caches: peak memory is
    weights + one cache + the step's activations (it counted the cache ~2.5x: input, each append, the stack)."""
    from lmforge.search.cost_model import bindings_for, peak_memory

    assert {n.op for n in step_graph.nodes} >= {"kv_cache_append"}
    assert any(n.op == "concat" and n.attr["inplace"] for n in step_graph.nodes)
    env = bindings_for(step_graph, {"batch": 64, "past": 65536})
    cache = sum(v.type.concrete(env).nbytes() for v in step_graph.inputs[1:])
    weights = sum(v.type.concrete(env).nbytes() for v in step_graph.params)
    grown = sum(v.type.concrete(env).nbytes() for v in step_graph.outputs[1:])   # past + 1 entries
    peak = peak_memory(step_graph, env)
    assert cache + weights + (grown - cache) <= peak <= cache + weights + (grown - cache) + 0.01 * cache
    hw = get_target("h100")
    past = int(0.6 * hw.memory_bytes / (cache / 65536))     # one cache is 60 % of the card: it fits
    assert graph_cost(step_graph, hw, {"batch": 64, "past": past}).fits


def test_an_offloaded_kv_cache_is_not_device_memory():
    from lmforge.ir import GraphBuilder, TensorType
    from lmforge.search.cost_model import peak_memory

    def step(tier):
        b = GraphBuilder("step")
        q = b.input("q", TensorType((1, 8, 1, 128), "bfloat16"))
        ann = {"memory_tier": tier} if tier else {}
        caches = [b.input(n, TensorType((1, 8, 65536, 128), "bfloat16").with_(**ann)) for n in ("k", "v")]
        k2, v2 = (b.op("kv_cache_append", [c, q], {"dim": 2}) for c in caches)
        return b.build([b.op("attention", [q, k2, v2], {"causal": True}), k2, v2])

    cache = 2 * 8 * 65536 * 128 * 2
    on_device, offloaded = peak_memory(step(None), {}), peak_memory(step("host"), {})
    assert cache < on_device < cache * 1.01
    assert offloaded < cache / 100


def _attention_with_symbolic_offset():
    from lmforge.ir import GraphBuilder, TensorType

    b = GraphBuilder("a")
    q = b.input("q", TensorType(("batch", 8, "n", 64), "bfloat16"))
    k = b.input("k", TensorType(("batch", 8, "past + n", 64), "bfloat16"))
    return b.build([b.op("attention", [q, k, k], {"causal": True, "q_offset": "past"})])


def test_a_misspelled_binding_is_an_error_not_a_default_size():
    from lmforge.errors import LmforgeError

    g, hw = _attention_with_symbolic_offset(), get_target("h100")
    with pytest.raises(LmforgeError, match=r"bindings \['pst'\] name no symbolic size .* batch, n, past"):
        graph_cost(g, hw, {"batch": 1, "n": 4, "pst": 100000})
    # "past" appears only inside "past + n" and the q_offset attribute: still a size one may bind
    assert graph_cost(g, hw, {"batch": 1, "n": 4, "past": 100}).flops > graph_cost(g, hw, {"batch": 1, "n": 4}).flops


def test_decode_cost_refuses_a_past_symbol_the_step_does_not_have():
    from lmforge.errors import LmforgeError

    g, hw = _attention_with_symbolic_offset(), get_target("h100")
    with pytest.raises(LmforgeError, match="past_symbol 'kv_len' is not a symbolic size"):
        decode_cost(g, hw, prompt_len=1000, new_tokens=2, past_symbol="kv_len", bindings={"n": 1})
    with pytest.raises(LmforgeError, match=r"bindings \['btach'\]"):
        decode_cost(g, hw, prompt_len=1000, new_tokens=2, bindings={"btach": 4})


def test_a_symbol_only_inside_a_region_defaults_like_the_others():
    # It raised a raw KeyError: bindings_for collected the symbols of the outer graph only.
    from lmforge.ir import GraphBuilder, TensorType

    body = GraphBuilder("body")
    body_graph = body.build([body.op("neg", [body.input("a", TensorType(("m",)))])])
    b = GraphBuilder("f")
    y = b.op("fused", [b.input("x", TensorType((5,)))], regions=[body_graph], out_types=[TensorType((5,))])
    g, hw = b.build([y]), get_target("h100")
    assert graph_cost(g, hw).flops == graph_cost(g, hw, {"m": 1}).flops
    assert graph_cost(g, hw, {"m": 5}).flops > graph_cost(g, hw).flops


def test_non_causal_window_over_several_queries_reads_every_later_key():
    """Without the causal rule a window hides only keys at or before p - window: 4 queries over 1000 keys with a
    window of 16 compute all 4000 pairs and read all of K / V (the causal window's fraction charged 19 keys)."""
    from lmforge.ir import GraphBuilder, TensorType
    from lmforge.ir.ops.attention_ref import visibility_mask

    b = GraphBuilder("a")
    q = b.input("q", TensorType((1, 8, 4, 64), "float16"))
    k, v = (b.input(n, TensorType((1, 8, 1000, 64), "float16")) for n in "kv")
    g = b.build([b.op("attention", [q, k, v], {"causal": False, "window": 16, "q_offset": 0})])
    cost = node_costs(g, {})[0]
    pairs = int(visibility_mask(4, 1000, causal=False, window=16, q_offset=0).sum())
    assert pairs == 4000 and cost.flops == 8 * pairs * (2 * 128 + 5)
    assert sum(b for _, b in cost.bytes_by_tier) == 2 * 8 * 1000 * 64 * 2 + 2 * 8 * 4 * 64 * 2


def test_a_value_computed_from_an_offloaded_cache_is_device_memory():
    """A host-tier (offloaded) input costs no device memory, but its fp32 copy does (type rules pass the
    annotation on; peak memory counted the copy as 0)."""
    from lmforge.ir import GraphBuilder, TensorType
    from lmforge.search.cost_model import peak_memory

    b = GraphBuilder("offload")
    host = TensorType((64, 1024, 1024), "float16").with_(memory_tier="host")
    k = b.input("k", host)
    g = b.build([b.op("cast", [k], {"dtype": "float32"})])
    assert peak_memory(g, {}) == 64 * 1024 * 1024 * 4


def test_a_cache_grown_in_place_twice_is_two_buffers():
    """Two appends to one cache make two grown caches: the first may take the input's buffer, the second cannot
    (both were counted in the input's buffer)."""
    from lmforge.ir import GraphBuilder, TensorType
    from lmforge.search.cost_model import peak_memory

    b = GraphBuilder("twice")
    cache = b.input("c", TensorType((1, 8, 4096, 128), "float32"))
    new = b.input("n", TensorType((1, 8, 1, 128), "float32"))
    outs = [b.op("kv_cache_append", [cache, new], {"dim": 2}) for _ in range(2)]
    g = b.build(outs)
    one = 8 * 4096 * 128 * 4
    assert 2 * one < peak_memory(g, {}) < 2.01 * one


@pytest.mark.parametrize("summary", ["mean", "minmax"])
def test_block_topk_charges_and_holds_its_fp32_block_summaries(summary):
    """The summaries are fp32 (the reference's and the Triton kernel's): read once per step and held in device
    memory beside the cache. They were charged at 2 bytes per element and left out of peak memory."""
    from lmforge.ir.graph import GraphBuilder
    from lmforge.ir.ops import get_op
    from lmforge.ir.ops.attention_ref import block_summary
    from lmforge.ir.ops.nn_ops import kv_bytes
    from lmforge.ir.ops.sparse_attention_ops import kept_keys
    from lmforge.ir.types import TensorType
    from lmforge.search.cost_model import peak_memory

    b, hq, hkv, skv, d, bs = 2, 4, 2, 1000, 64, 8
    q, k = TensorType((b, hq, 1, d), "float16"), TensorType((b, hkv, skv, d), "float16")
    attrs = dict(block_size=bs, topk_blocks=4, summary=summary)
    cost = get_op("block_topk_attention").cost([q, k, k], attrs)
    made = block_summary(torch.zeros(b, hkv, skv, d, dtype=torch.float16), bs, summary)
    real = sum(t.numel() * t.element_size() for t in (made if isinstance(made, tuple) else (made,)))
    kept = kv_bytes(k, k, None) * kept_keys(skv, bs, 4, 4, 64) / skv
    assert cost.bytes == pytest.approx(2 * q.nbytes() + kept + real)

    gb = GraphBuilder("topk")
    ins = [gb.input(n, t) for n, t in (("q", q), ("k", k), ("v", k))]
    out = gb.op("block_topk_attention", ins, attrs)
    g = gb.build([out])
    assert peak_memory(g, {}) == pytest.approx(q.nbytes() + 2 * k.nbytes() + real + q.nbytes())
