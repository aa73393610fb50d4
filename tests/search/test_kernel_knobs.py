"""Kernel knobs in predict mode: Triton templates become knobs only where the graph will run them (with the pass
choice that creates them as condition), the kernel efficiency model has the properties it claims, an oversized
config is a pruned trial, and tuning the kernel knobs never predicts worse than the defaults."""
import math

import optuna
import pytest
import torch

import lmforge
from lmforge.hwmodels import get_target
from lmforge.passes import PassManager, canonical_pipeline, tunable_pipeline
from lmforge.passes.quant import weight_quant_pass
from lmforge.search import kernel_model as km
from lmforge.search.cost_model import bindings_for, graph_cost, node_costs
from lmforge.search.kernel_model import KernelConfigInfeasible, Launch, Resources
from lmforge.search.tuner import tune

H100 = get_target("h100")


@pytest.fixture(autouse=True)
def _own_cache(monkeypatch, tmp_path):
    """Studies, calibrations and resource reports of these tests stay in a fresh cache directory."""
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))


class Stack(torch.nn.Module):
    """Four 256x256 linears with SiLU between them (weights named layers.<i>.weight)."""

    def __init__(self, n=4, d=256):
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(d, d, bias=False) for _ in range(n))

    def forward(self, x):
        for layer in self.layers:
            x = torch.nn.functional.silu(layer(x))
        return x


def _graph(rows=2):
    return PassManager(canonical_pipeline()).run(lmforge.capture(Stack(), (torch.randn(rows, 256),)))


def _estimated(template, node, env, config, hw, aot=True):
    """Resources without AOT builds (keeps the tests fast and independent of the Triton compiler)."""
    return Resources(*template.estimate(node, config), "estimate")


def test_kernel_knobs_only_for_templates_the_graph_uses():
    g = _graph(rows=2)
    knobs = km.kernel_knobs(g, [weight_quant_pass()], H100)
    assert [k.name for k in knobs] == ["triton.wo_gemv"]      # rows <= 4: the GEMV, and only under quantization
    assert knobs[0].condition == ("quant.weight_bits", (8, 4))
    assert knobs[0].choices == tuple(range(len(km.templates()[0].configs(None))))
    # the untimed designs (word-tile GEMV, swapped GEMM) are not offered until a GPU run has timed them
    offered = [c for t in km.templates()[:2] for c in t.configs(None)]
    assert offered and not any(c.get("WORD_TILES", 0) or c.get("SWAP_AB", 0) for c in offered)
    assert [k.name for k in km.kernel_knobs(_graph(rows=16), [weight_quant_pass()], H100)] == ["triton.wo_gemm"]
    assert km.kernel_knobs(g, [], H100) == []                  # no pass makes a Triton-claimed op
    assert km.kernel_knobs(g, [weight_quant_pass()], get_target("host")) == []  # not a GPU


def test_more_waves_and_too_few_ctas_lower_efficiency():
    res = Resources(32, 0, "estimate")
    sms = H100.sm_count
    threads = 1024  # 2 resident CTAs per SM by threads
    full = km.efficiency(Launch(sms, threads, 64 * 1024), res, H100)
    tail = km.efficiency(Launch(sms + 1, threads, 64 * 1024), res, H100)
    assert tail.compute < full.compute and full.compute == pytest.approx(1.0)
    many = km.efficiency(Launch(10 * 2 * sms + 1, threads, 64 * 1024), res, H100)
    assert tail.compute < many.compute < 1.0                  # a partial wave matters less among many full ones
    few = km.efficiency(Launch(4, threads, 16 * 1024), res, H100)
    enough = km.efficiency(Launch(2 * sms, threads, 16 * 1024), res, H100)
    assert few.memory < 0.1 and enough.memory == pytest.approx(1.0)  # Little's law: too few bytes in flight
    assert km.efficiency(Launch(sms, threads, 1.0, pad=0.5), res, H100).compute == pytest.approx(0.5)


def _quantized(rows):
    g = PassManager([weight_quant_pass()]).run(_graph(rows), {"quant.weight_bits": 4, "quant.group_size": 64})
    env = dict(g.get_meta("example_dims") or ())
    i, t = next(iter(km.claimed(g, env).items()))
    return g, env, g.nodes[i], t


def test_tile_padding_waste():
    g, env, node, gemm = _quantized(rows=8)
    assert gemm.name == "wo_gemm"
    configs = gemm.configs(node)
    by_bm = {c.get("BLOCK_M"): gemm.launch(node, env, c, H100).pad for c in configs}
    assert by_bm[16] == pytest.approx(8 / 16) and by_bm[64] == pytest.approx(8 / 64)
    assert by_bm[128] < by_bm[64] < by_bm[16]


def test_gemv_with_too_few_ctas_is_predicted_slower(monkeypatch):
    monkeypatch.setattr(km, "resources", _estimated)
    g, env, node, gemv = _quantized(rows=1)
    assert gemv.name == "wo_gemv"
    cost = graph_cost(g, H100, kernels={}).nodes[next(iter(km.claimed(g, env)))].cost
    configs = gemv.configs(node)
    narrow = next(i for i, c in enumerate(configs) if c.get("BLOCK_N") == 16 and c.get("SPLIT_K") == 1)
    wide = next(i for i, c in enumerate(configs) if c.get("BLOCK_N") == 64)
    assert gemv.launch(node, env, configs[wide], H100).ctas < gemv.launch(node, env, configs[narrow], H100).ctas
    assert km.kernel_time(node, cost, env, gemv, wide, H100) > km.kernel_time(node, cost, env, gemv, narrow, H100)


def test_backend_config_maps_knob_indices_to_kernel_configs():
    from lmforge.backends.triton import quant_matmul as qm

    g, env, node, gemv = _quantized(rows=2)
    assert km.chosen_kernels({"triton.wo_gemv": 3, "quant.weight_bits": 4, "tvm.tile": 8}) == {"wo_gemv": 3}
    assert km.backend_config(g, {"triton.wo_gemv": 3}) == {"wo_gemv": qm.CANDIDATE_CONFIGS["wo_gemv"][3]}


def _oversized(template, node, env, config, hw, aot=True):
    if config == template.configs(node)[1]:
        return Resources(64, 300 * 1024, "ptxas")  # more shared memory than any block may have
    return _estimated(template, node, env, config, hw, aot)


def test_oversized_config_is_infeasible_and_a_pruned_trial(monkeypatch, tmp_path):
    monkeypatch.setattr(km, "resources", _oversized)
    g, env, node, gemv = _quantized(rows=2)
    with pytest.raises(KernelConfigInfeasible, match="shared memory"):
        graph_cost(g, H100, kernels={"wo_gemv": 1})
    assert math.isinf(km.kernel_table(g, H100).per_config["wo_gemv"][1])
    storage = f"sqlite:///{tmp_path}/db.sqlite"
    study = "oversized"
    optuna.create_study(storage=storage, study_name=study).enqueue_trial(
        {"quant.weight_bits": 4, "quant.group_size": 64, "triton.wo_gemv": 1})
    res = tune(Stack(), (torch.randn(2, 256),), target="h100", budget=4, storage=storage, study_name=study,
               pipeline=[weight_quant_pass()], backends=("triton",), sampler="random", progress=False)
    pruned = [t for t in res.study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned and "shared memory" in pruned[0].user_attrs["pruned_reason"]
    assert all(t.params.get("triton.wo_gemv") == 1 for t in pruned)
    assert res.best_config.get("triton.wo_gemv") != 1


def test_predict_tune_over_kernel_knobs_beats_or_matches_default(monkeypatch, tmp_path):
    monkeypatch.setattr(km, "resources", _estimated)
    res = tune(Stack(), (torch.randn(2, 256),), target="h100", budget=12, storage=f"sqlite:///{tmp_path}/db",
               pipeline=[weight_quant_pass()], backends=("triton",), progress=False, seed=0)
    names = {k for t in res.study.trials for k in t.params}
    assert "triton.wo_gemv" in names
    default = res.study.trials[0]  # the enqueued default configuration
    assert default.params == {"quant.weight_bits": 16}
    assert res.best_values["latency"] <= default.values[0]
    g = PassManager([weight_quant_pass()]).run(_graph(), res.best_config)
    again = graph_cost(g, H100, kernels=km.chosen_kernels(res.best_config)).time_s
    assert again == pytest.approx(res.best_values["latency"])


def test_resource_reports_are_built_once_and_cached_on_disk(monkeypatch):
    from lmforge.backends.triton import aot

    calls = []

    def fake_build_many(requests):
        requests = list(requests)
        calls.append(requests)
        if requests[0].config.get("BLOCK_N") == 64:
            return ["Triton could not compile: out of resources"]
        meta = {"registers": 40, "spill_stores": 0, "spill_loads": 0, "shared": 32, "num_warps": 8}
        return [aot.KernelBinary("fake", "sm_90", "", b"", meta)]

    monkeypatch.setattr(aot, "build_many", fake_build_many)
    monkeypatch.setattr(km, "_MEMORY_CACHE", {})
    g, env, node, gemv = _quantized(rows=1)
    configs = gemv.configs(node)
    first = km.resources(gemv, node, env, configs[0], H100)
    assert (first.registers, first.shared_bytes, first.source) == (40, 32, "ptxas") and len(calls) == 1
    km._MEMORY_CACHE.clear()  # a new process: the report comes from the disk cache, nothing is rebuilt
    assert km.resources(gemv, node, env, configs[0], H100) == first and len(calls) == 1
    wide = next(c for c in configs if c.get("BLOCK_N") == 64)
    broken = km.resources(gemv, node, env, wide, H100)
    assert "does not compile" in broken.reason
    with pytest.raises(KernelConfigInfeasible, match="does not compile"):
        km.efficiency(gemv.launch(node, env, wide, H100), broken, H100)


def _attention_graph():
    from lmforge.ir.graph import GraphBuilder, TensorType

    b = GraphBuilder("attn")
    q = b.input("q", TensorType(("batch", 8, 1, 64), "float16"))
    k = b.input("k", TensorType(("batch", 2, "past", 64), "float16"))
    v = b.input("v", TensorType(("batch", 2, "past", 64), "float16"))
    qp = b.input("qp", TensorType((1, 8, "seq", 64), "float32"))
    kp = b.input("kp", TensorType((1, 8, "seq", 64), "float32"))
    vp = b.input("vp", TensorType((1, 8, "seq", 64), "float32"))
    outs = [b.op("attention", [q, k, v], {}),
            b.op("block_topk_attention", [q, k, v], {"block_size": 16, "topk_blocks": 8}),
            b.op("attention", [qp, kp, vp], {"causal": True})]
    return b.build(outs), {"batch": 1, "past": 4096, "seq": 1024}


def test_attention_templates_price_configs_with_ptxas_reports(monkeypatch):
    """The attention templates' configs are priced with ptxas's report of the kernel an artifact would ship
    (built from attention_specs, with the launcher's adaptations), and a prefill tile that needs more shared
    memory than an L40S has is infeasible there but not on an H100."""
    from lmforge.backends.triton import aot

    monkeypatch.setattr(km, "_MEMORY_CACHE", {})
    g, env = _attention_graph()
    owner = km.claimed(g, env)
    assert [t.name for t in owner.values()] == ["attention_decode", "attention_decode", "attention_prefill"]
    decode, topk, prefill = (g.nodes[i] for i in owner)
    dec_t, pre_t = owner[0], owner[2]
    dec_configs = dec_t.configs(decode)[:1]
    km.prefetch_resources([(dec_t, n, env, c) for n in (decode, topk) for c in dec_configs], H100)
    for node in (decode, topk):
        spec = dec_t.aot_spec(node, env)
        assert spec is not None and spec.fn.__name__ == "_decode_split_kernel"
        for c in dec_configs:
            res = km.resources(dec_t, node, env, c, H100)
            assert res.source == "ptxas" and res.registers > 0 and not res.reason, res
            built = aot.spec_request(spec, "sm_90", c).config
            # as the launcher: 4 query rows per KV head -> BLOCK_M 16; block top-k tiles one block at a time
            assert built.get("BLOCK_M") == 16
            assert built.get("BLOCK_N") == (16 if node is topk else c.get("BLOCK_N"))
    first = dec_configs[0]
    assert km.resources(dec_t, topk, env, first, H100) != km.resources(dec_t, decode, env, first, H100)

    l40s = get_target("l40s")
    tiles = {(c.get("BLOCK_M"), c.get("BLOCK_N"), c.num_stages): c for c in pre_t.configs(prefill)}
    small, large, huge = tiles[64, 32, 2], tiles[64, 64, 4], tiles[128, 128, 3]   # fp32 tiles, 64-wide heads
    for hw in (H100, l40s):
        km.prefetch_resources([(pre_t, prefill, env, c) for c in (small, large, huge)], hw)

    def fits(c, hw):
        res = km.resources(pre_t, prefill, env, c, hw)
        assert res.source == "ptxas", res
        try:
            km.efficiency(pre_t.launch(prefill, env, c, hw), res, hw)
            return True
        except KernelConfigInfeasible as exc:
            assert "shared memory" in str(exc)
            return False

    assert [fits(c, H100) for c in (small, large, huge)] == [True, True, False]
    assert [fits(c, l40s) for c in (small, large, huge)] == [True, False, False]


def test_flexprefill_lowering_is_priced_as_the_sparse_flash_prefill(monkeypatch):
    """FlexPrefill's block_sparse_attention runs the flash prefill kernel's SPARSE mode: the prefill template
    claims it, prices its configs with ptxas's report of block_sparse_prefill (tiles clamped to the block size),
    and its time follows the measured density."""
    from lmforge.ir.graph import GraphBuilder, TensorType
    from lmforge.ir.ops import get_op

    monkeypatch.setattr(km, "_MEMORY_CACHE", {})

    def lowered(density):
        b = GraphBuilder("flex")
        q, k, v = (b.input(n, TensorType((1, 8, "seq", 64), "float16")) for n in "qkv")
        mask = b.op("flex_prefill_mask", [q, k], {"block_size": 32})
        return b.build([b.op("block_sparse_attention", [q, k, v, mask], {"block_size": 32, "density": density})])

    graphs = {d: lowered(d) for d in (1.0, 0.25)}
    env = {"seq": 4096}
    times = {}
    for density, g in graphs.items():
        owner = km.claimed(g, env)
        (i, template), = owner.items()
        node = g.nodes[i]
        assert template.name == "attention_prefill" and node.op == "block_sparse_attention"
        spec = template.aot_spec(node, env)
        assert spec is not None and spec.fn.__name__ == "_flash_prefill_kernel" and "block_sparse" in spec.name
        config = template.configs(node)[0]
        km.prefetch_resources([(template, node, env, config)], H100)
        res = km.resources(template, node, env, config, H100)
        assert res.source == "ptxas" and res.registers > 0, res
        launch = template.launch(node, env, config, H100)
        assert launch.ctas == 8 * math.ceil(4096 / min(config.get("BLOCK_M"), 32))
        cost = get_op("block_sparse_attention").cost([t.type.with_(shape=(1, 8, 4096, 64)) for t in node.inputs[:3]]
                                                     + [node.inputs[3].type.with_(shape=(1, 8, 128, 128))],
                                                     node.attr, [node.output.type.with_(shape=(1, 8, 4096, 64))])
        times[density] = km.kernel_time(node, cost, env, template, 0, H100)
    assert times[0.25] < 0.5 * times[1.0]


def test_a_template_that_only_a_conditional_knob_creates_gets_a_knob():
    """Linears of 96 inputs: quant.weight_bits=4 quantizes nothing at the default group size (128), only with
    quant.group_size=32 (a knob conditional on the bits) does the GEMV run; it still gets its knob, conditional
    on the bits (it had none, so the search priced it at config 0 only)."""
    g = PassManager(canonical_pipeline()).run(lmforge.capture(Stack(d=96), (torch.randn(2, 96),)))
    knobs = km.kernel_knobs(g, [weight_quant_pass()], H100)
    assert [k.name for k in knobs] == ["triton.wo_gemv"]
    assert knobs[0].condition == ("quant.weight_bits", (8, 4))


# ---- every template: a knob whose indices map back to its candidate configs ----------------------------------------

def _one_op(op, shapes, attrs=None, dtype="float16"):
    """A graph of one `op` node on inputs of static `shapes` (static: the template's claim does not hinge on
    what a symbolic dim is bound to)."""
    from lmforge.ir.graph import GraphBuilder, TensorType

    b = GraphBuilder(op)
    inputs = [b.input(f"x{i}", TensorType(shape, dtype)) for i, shape in enumerate(shapes)]
    return b.build([b.op(op, inputs, attrs or {})])


def _swiglu_graph():
    def fn(gate, up):
        return torch.nn.functional.silu(gate) * up

    return PassManager(canonical_pipeline() + tunable_pipeline()).run(
        lmforge.capture(fn, (torch.randn(4, 64), torch.randn(4, 64))), {})


QKV_DECODE = [(2, 8, 1, 64), (2, 2, 256, 64), (2, 2, 256, 64)]
SHARED_PREFIX = [(4, 8, 1, 64), (1, 2, 512, 64), (1, 2, 512, 64), (4, 2, 16, 64), (4, 2, 16, 64)]
# template name -> a minimal graph that runs it; a new template in kernel_templates.templates() needs one row here
TEMPLATE_GRAPHS = {
    "wo_gemv": lambda: _quantized(rows=2)[0],
    "wo_gemm": lambda: _quantized(rows=8)[0],
    "rmsnorm": lambda: _one_op("rmsnorm", [(4, 256), (256,)], {"eps": 1e-6}),
    "layernorm": lambda: _one_op("layernorm", [(4, 256), (256,), (256,)]),
    "softmax": lambda: _one_op("softmax", [(4, 256)]),
    "swiglu": _swiglu_graph,
    "attention_decode": lambda: _one_op("attention", QKV_DECODE),
    "attention_shared_prefix": lambda: _one_op("shared_prefix_attention", SHARED_PREFIX),
    "attention_prefill": lambda: _one_op("attention", [(1, 8, 128, 64), (1, 2, 128, 64), (1, 2, 128, 64)],
                                         {"causal": True}),
    "elementwise": lambda: _elementwise_graph(),
}


@pytest.mark.parametrize("name", [t.name for t in km.templates()])
def test_every_template_gets_a_knob_whose_indices_map_to_its_configs(name):
    """A graph that runs the template gets knob `triton.<name>`, one choice per candidate config, and
    backend_config turns each choice into that candidate (what TritonBackend then hands the kernel)."""
    if name not in TEMPLATE_GRAPHS:
        pytest.fail(f"template {name!r} has no row in TEMPLATE_GRAPHS: add a minimal graph that runs it")
    g = TEMPLATE_GRAPHS[name]()
    template = next(t for t in km.templates() if t.name == name)
    nodes = [g.nodes[i] for i, t in km.claimed(g, bindings_for(g)).items() if t.name == name]
    assert nodes, f"the minimal graph for {name} has no node the template claims"
    candidates = template.configs(nodes[0])
    knobs = {k.name: k for k in km.kernel_knobs(g, [], H100)}
    knob = knobs[f"triton.{name}"]
    assert knob.choices == tuple(range(len(candidates))) and knob.default == 0 and knob.condition is None
    for i, config in enumerate(candidates):
        assert km.backend_config(g, {knob.name: i}) == {name: config}


def _shared_prefix_graph(batch="batch"):
    from lmforge.ir.graph import GraphBuilder, TensorType

    b = GraphBuilder("hydragen")
    q = b.input("q", TensorType((batch, 8, 1, 64), "float16"))
    kp, vp = (b.input(n, TensorType((1, 2, 4096, 64), "float16")) for n in ("kp", "vp"))
    ks, vs = (b.input(n, TensorType((batch, 2, "past", 64), "float16")) for n in ("ks", "vs"))
    return b.build([b.op("shared_prefix_attention", [q, kp, vp, ks, vs], {})])


def test_shared_prefix_attention_is_its_own_template_priced_by_its_prefix_pass(monkeypatch):
    """A graph whose only attention is Hydragen's gets `triton.attention_shared_prefix` (the decode split kernel's
    candidates, tuned apart from decode's). Its price follows the prefix pass: the prefix is read once when the
    rows of all sequences fit one M tile, once per row block otherwise; the AOT spec is that pass's build."""
    from lmforge.backends.triton import attention_decode as ad

    monkeypatch.setattr(km, "resources", _estimated)
    g = _shared_prefix_graph()
    assert [k.name for k in km.kernel_knobs(g, [], H100)] == ["triton.attention_shared_prefix"]
    env = {"batch": 32, "past": 64}                       # 32 sequences x 4 query heads per KV head = 128 rows
    (i, template), = km.claimed(g, env).items()
    node = g.nodes[i]
    assert template.configs(node) == tuple(ad.CANDIDATE_CONFIGS)
    by_tile = {c.get("MAX_BLOCK_M"): (j, c) for j, c in enumerate(template.configs(node)) if c.get("BLOCK_N") == 64
               and c.num_stages == 3}
    (one_tile, wide), (two_tiles, narrow) = by_tile[128], by_tile[64]
    prefix_bytes = 2 * 2 * 4096 * 64 * 2                    # K and V of the one prefix, fp16
    reread = template.launch(node, env, narrow, H100).extra_bytes - template.launch(node, env, wide, H100).extra_bytes
    assert reread == prefix_bytes                            # 2 row blocks: the prefix is read a second time
    assert template.launch(node, env, wide, H100).threads == 256   # 128-row tiles run with 8 warps
    cost = node_costs(g, env)[i]
    assert km.kernel_time(node, cost, env, template, one_tile, H100) < \
        km.kernel_time(node, cost, env, template, two_tiles, H100)
    spec = template.aot_spec(node, env)
    assert spec is not None and spec.fn is ad._decode_split_kernel and "prefix_split" in spec.name
    from lmforge.backends.triton.aot import spec_request

    built = {c.get("MAX_BLOCK_M"): spec_request(spec, "sm_90", c).config for c in (wide, narrow)}
    assert [(c.get("BLOCK_M"), c.num_warps) for c in built.values()] == [(128, 8), (64, 8)]


def test_the_shared_prefix_knob_reaches_the_kernel_and_matches_the_reference(monkeypatch):
    """The knob's index becomes a KernelConfig (backend_config), TritonBackend hands it to shared_prefix_decode,
    and the kernel's output with that non-default config equals the reference."""
    from lmforge.backends.torch import TorchReference
    from lmforge.backends.triton import attention_decode as ad
    from lmforge.backends.triton.backend import TritonBackend

    g = _one_op("shared_prefix_attention", [(4, 4, 1, 16), (1, 2, 40, 16), (1, 2, 40, 16), (4, 2, 9, 16),
                                            (4, 2, 9, 16)], dtype="float32")
    index = next(i for i, c in enumerate(ad.CANDIDATE_CONFIGS) if c.get("BLOCK_N") == 32)
    chosen = km.backend_config(g, {"triton.attention_shared_prefix": index})
    assert chosen == {"attention_shared_prefix": ad.CANDIDATE_CONFIGS[index]} != {"attention_shared_prefix":
                                                                                 ad.DEFAULT_CONFIG}
    seen, run = [], ad.shared_prefix_decode

    def spy(*args, config=None, **kwargs):
        seen.append(config)
        return run(*args, config=config, **kwargs)

    monkeypatch.setattr(ad, "shared_prefix_decode", spy)
    node = g.nodes[0]
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(v.type.shape, generator=gen) for v in node.inputs]
    out = TritonBackend(chosen, interpret=True).claim(node, "cpu").fn(*inputs, **node.attr)
    assert seen == [ad.CANDIDATE_CONFIGS[index]]
    want = TorchReference().claim(node, "cpu").fn(*inputs, **node.attr)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)


def _elementwise_graph():
    x = torch.randn(8, 256)
    captured = PassManager(canonical_pipeline()).run(lmforge.capture(_GatedResidual(), (x, x)))
    return PassManager(tunable_pipeline()).run(captured, {})


class _GatedResidual(torch.nn.Module):
    def __init__(self, d=256):
        super().__init__()
        self.g = torch.nn.Parameter(torch.randn(d))

    def forward(self, x, residual):
        return torch.nn.functional.gelu(x, approximate="tanh") * self.g + residual


def test_fused_elementwise_regions_get_a_knob_priced_with_ptxas(monkeypatch):
    """A fused region the generated kernel runs is the "elementwise" template: a knob over its candidate configs,
    each priced with ptxas's report of the kernel an artifact would ship, mapped back to the backend's config."""
    from lmforge.backends.triton import elementwise as ew

    monkeypatch.setattr(km, "_MEMORY_CACHE", {})
    x = torch.randn(64, 256)
    captured = PassManager(canonical_pipeline()).run(lmforge.capture(_GatedResidual(), (x, x)))
    knobs = km.kernel_knobs(captured, tunable_pipeline(), H100)      # the fusion pass makes the region
    g = PassManager(tunable_pipeline()).run(captured, {})
    [(index, template)] = km.claimed(g, {}).items()
    node = g.nodes[index]
    assert template.name == "elementwise" and node.op == "fused"
    assert [(k.name, k.choices) for k in knobs] == [("triton.elementwise", tuple(range(5)))]
    configs = template.configs(node)
    assert configs == tuple(ew.CANDIDATE_CONFIGS["elementwise"]) and configs[0] == ew.DEFAULT_CONFIG
    res = km.resources(template, node, {}, configs[0], H100)
    assert res.source == "ptxas" and res.registers > 0 and not res.reason, res
    launch = template.launch(node, {}, configs[0], H100)
    assert launch.ctas == 64 * 256 // 1024 and launch.pad == 1.0
    assert km.backend_config(g, {"triton.elementwise": 2}) == {"elementwise": configs[2]}
