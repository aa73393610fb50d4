"""Canonical passes and the pass manager."""
import pytest
import torch

from lmforge.errors import VerifyError
from lmforge.ir import GraphBuilder, Node, TensorType, Value
from lmforge.passes import PassManager, cse, dce, fold_shapes, graph_pass, recognize_attention
from lmforge.backends import default_backends, assign_kernels
from lmforge.backends.codegen import generate


def run(g, *xs):
    return generate(g, assign_kernels(g, default_backends()), dict(g.weights))(*xs)


def test_dce_drops_dead_nodes_and_unused_params():
    b = GraphBuilder("g")
    x = b.input("x", TensorType(("n", 4)))
    w = b.param("w", TensorType((4, 4)), torch.randn(4, 4))
    b.op("linear", [x, w])  # dead
    y = b.op("neg", [x])
    g = dce(b.build([y]))
    assert [n.op for n in g.nodes] == ["neg"] and g.params == () and g.weights == {}


def test_cse_merges_duplicates_and_keeps_results():
    b = GraphBuilder("g")
    x = b.input("x", TensorType(("n", 4)))
    a1 = b.op("rsqrt", [x])
    a2 = b.op("rsqrt", [x])
    y = b.op("add", [a1, a2])
    g = b.build([y])
    g2 = cse(g)
    assert [n.op for n in g2.nodes] == ["rsqrt", "add"]
    x_ = torch.rand(3, 4) + 0.5
    torch.testing.assert_close(run(g2, x_)[0], run(g, x_)[0])


def test_fold_shapes_removes_noop_views_and_simplifies_dims():
    b = GraphBuilder("g")
    x = b.input("x", TensorType(("b", "s", 4)))
    r = b.op("reshape", [x], {"shape": ("b", "(s + 1) - 1", 4)})
    p = b.op("permute", [r], {"perm": (0, 2, 1)})
    p2 = b.op("permute", [p], {"perm": (0, 2, 1)})
    r2 = b.op("reshape", [p2], {"shape": ("b", "s", 2, 2)})
    r3 = b.op("reshape", [r2], {"shape": ("b", "s * 4")})
    c = b.op("cast", [r3], {"dtype": "float32"})
    g = b.build([c])
    g2 = fold_shapes(g)
    assert [n.op for n in g2.nodes] == ["reshape"], "permute pair cancels; reshape chain collapses to one"
    x_ = torch.randn(2, 3, 4)
    torch.testing.assert_close(run(g2, x_)[0], run(g, x_)[0])
    assert g2.outputs[0].type.shape == ("b", "4*s")


def test_recognize_attention_matches_reference():
    b = GraphBuilder("g")
    q = b.input("q", TensorType((2, 2, 5, 8)))
    k = b.input("k", TensorType((2, 2, 5, 8)))
    v = b.input("v", TensorType((2, 2, 5, 8)))
    kt = b.op("permute", [k], {"perm": (0, 1, 3, 2)})
    s = b.op("matmul", [q, kt])
    s = b.op("mul", [s, None], {"scalar": 0.3})
    p = b.op("softmax", [s], {"dim": -1})
    o = b.op("matmul", [p, v])
    g = b.build([o])
    g2 = recognize_attention(g)
    assert [n.op for n in g2.nodes] == ["attention"] and g2.nodes[0].attr["scale"] == pytest.approx(0.3)
    xs = [torch.randn(2, 2, 5, 8) for _ in range(3)]
    torch.testing.assert_close(run(g2, *xs)[0], run(g, *xs)[0], rtol=1e-5, atol=1e-6)


def test_pass_manager_verifies_times_and_names_earlier_passes(capsys):
    b = GraphBuilder("g")
    x = b.input("x", TensorType((2, 4)))
    g = b.build([b.op("neg", [x])])

    @graph_pass("breaker")
    def breaker(graph):
        ghost = Value("ghost", TensorType((2, 4)))
        return graph.with_nodes((*graph.nodes, Node("neg", (ghost,), (Value("o", ghost.type),))))

    pm = PassManager([dce, breaker])
    with pytest.raises(VerifyError, match=r"after pass 'breaker' \(passes run before it: \['dce'\]\)"):
        pm.run(g)
    pm = PassManager([dce, cse], print_after="cse")
    pm.run(g)
    assert "// IR after cse" in capsys.readouterr().err
    assert [r.name for r in pm.records] == ["dce", "cse"]


def test_cache_append_is_recognized_exact_and_charged_in_place():
    from lmforge.passes import recognize_cache_append
    from lmforge.search.cost_model import bindings_for, node_costs
    import lmforge

    def step(k_cache, k_new):
        layers = [torch.cat([k_cache[i], k_new[i]], dim=2) for i in range(2)]
        return torch.stack(layers)

    kc, kn = torch.randn(2, 3, 2, 50, 8), torch.randn(2, 3, 2, 1, 8)
    g = lmforge.capture(step, (kc, kn), dynamic={"k_cache": {3: "past"}})
    g2 = recognize_cache_append(g)
    assert [n.op for n in g2.nodes].count("kv_cache_append") == 2
    assert any(n.op == "concat" and n.attr["inplace"] for n in g2.nodes)
    torch.testing.assert_close(run(g2, kc, kn)[0], step(kc, kn))
    env = bindings_for(g)
    before = sum(c.bytes for c in node_costs(g, env))
    after = sum(c.bytes for c in node_costs(g2, env))
    assert after == 2 * kn.numel() * 4, "only the new entries are read and written"
    assert before > 10 * after


@pytest.mark.parametrize("addend", ["bool", "long", "alpha"])
def test_only_an_additive_float_mask_folds_into_attention(addend):
    """softmax(s + m) @ v folds into attention(q, k, v, m) only for a float m added with alpha 1: torch adds a bool
    or int m as numbers (attention would read a bool m as which keys to keep), and alpha scales it."""
    import lmforge

    def fn(q, k, v):
        n = q.shape[2]
        keep = torch.arange(n)[None, :] <= torch.arange(n)[:, None]
        s = q @ k.transpose(-1, -2) * 0.3
        if addend == "alpha":
            s = torch.add(s, torch.where(keep, 0.0, torch.finfo(torch.float32).min), alpha=-1)
        else:
            s = s + (keep if addend == "bool" else keep.long())
        return torch.softmax(s, -1) @ v

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 8, generator=gen) for _ in range(3))
    model = lmforge.compile(fn, (q, k, v), dynamic={n: {2: "s"} for n in "qkv"})
    assert not any(n.op == "attention" for n in model.graph.nodes)
    q, k, v = (torch.randn(1, 2, 9, 8, generator=gen) for _ in range(3))
    torch.testing.assert_close(model(q, k, v), fn(q, k, v), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("draw", [lambda x: torch.rand_like(x), lambda x: torch.randn(3, 4),
                                  lambda x: torch.bernoulli(torch.full_like(x, 0.5))],
                         ids=["rand_like", "randn", "bernoulli"])
def test_cse_never_merges_random_draws(draw):
    """rand_like(x) - rand_like(x) takes two draws: cse keeps both (merged, the difference would be exactly 0)."""
    import lmforge

    def fn(x):
        return x + (draw(x) - draw(x))

    model = lmforge.compile(fn, (torch.zeros(3, 4),))
    assert sum(n.op == "torch_fallback" for n in model.graph.nodes) >= 2
    x = torch.randn(3, 4)
    torch.manual_seed(7)
    got = model(x)
    torch.manual_seed(7)
    want = fn(x)
    assert not torch.equal(want, x), "eager's two draws differ (with this seed)"
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("q_dtype,mask_dtype,folds", [
    ("float32", "float16", True), ("float32", "bfloat16", True), ("float16", "float32", True),
    ("float16", "bfloat16", False), ("float64", "float16", True),
])
def test_attention_mask_takes_the_dtype_torchs_add_gives_it(q_dtype, mask_dtype, folds):
    """softmax(q @ k^T * s + m) @ v with m of another float dtype: torch's add promotes m; the recognized attention
    gets m cast to q's dtype (SDPA refuses an fp16 mask on fp32 q), or float32 as is. bf16 on fp16 scores, which
    torch adds in fp32, stays unrecognized."""
    import lmforge

    qd, md = getattr(torch, q_dtype), getattr(torch, mask_dtype)

    def fn(q, k, v, m):
        s = q @ k.transpose(-1, -2) * 0.3 + m
        return (torch.softmax(s, -1).to(q.dtype)) @ v

    def inputs():
        q, k, v = (torch.randn(2, 3, 5, 8, dtype=qd) for _ in range(3))
        return q, k, v, torch.randn(5, 5).to(md)

    model = lmforge.compile(fn, inputs())
    assert any(n.op == "attention" for n in model.graph.nodes) == folds
    xs = inputs()
    tol = 1e-5 if qd != torch.float16 else 2e-3
    torch.testing.assert_close(model(*xs), fn(*xs), rtol=tol, atol=tol)


def _repeat_kv(x, n):
    """Hugging Face's repeat_kv: [b, hkv, s, d] -> [b, hkv * n, s, d], head h a copy of KV head h // n."""
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n, s, d).reshape(b, h * n, s, d)


@pytest.mark.parametrize("written", ["matmul_softmax", "sdpa"])
def test_attention_on_repeat_kv_reads_the_kv_heads_once(written):
    """Attention over repeat_kv'd K/V reads the un-repeated KV heads (GQA): same outputs as eager, the expand and
    reshape gone, and the cost model's bytes no longer count the repeated copies."""
    import lmforge
    from lmforge.passes import canonical_pipeline, recognize_repeat_kv
    from lmforge.search.cost_model import bindings_for, node_costs

    def fn(q, k, v):
        k, v = _repeat_kv(k, 4), _repeat_kv(v, 4)
        if written == "sdpa":
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return torch.softmax(q @ k.transpose(-1, -2) * 0.25, -1) @ v

    def inputs(s):
        return torch.randn(2, 8, s, 16), torch.randn(2, 2, s, 16), torch.randn(2, 2, s, 16)

    dynamic = {n: {2: "seq"} for n in "qkv"}
    g = lmforge.capture(fn, inputs(6), dynamic=dynamic)
    (att,) = [n for n in g.nodes if n.op == "attention"]
    assert att.inputs[1].type.shape[1] == 8, "capture alone still reads the repeated heads"
    assert recognize_repeat_kv in canonical_pipeline()
    model = lmforge.compile(fn, inputs(6), dynamic=dynamic)
    (att,) = [n for n in model.graph.nodes if n.op == "attention"]
    assert [x.type.shape[1] for x in att.inputs[:3]] == [8, 2, 2]
    assert not any(n.op == "expand" for n in model.graph.nodes)
    for s in (3, 11):
        xs = inputs(s)
        torch.testing.assert_close(model(*xs), fn(*xs), rtol=1e-5, atol=1e-5)
    env = bindings_for(g, {"seq": 4096})
    repeated = PassManager([fold_shapes, cse]).run(g)
    kv_bytes = 2 * 2 * 2 * 4096 * 16 * 4   # K and V, [2, 2, seq, 16] fp32
    saved = sum(c.bytes for c in node_costs(repeated, env)) - sum(
        c.bytes for c in node_costs(recognize_repeat_kv(repeated), env))
    assert saved >= 3 * kv_bytes, "the three repeated copies of K and V are no longer read"


def test_repeat_kv_needs_both_k_and_v_repeated_alike():
    """Only K repeated (V already at the query heads), or K and V repeated a different number of times, stays as
    it is: attention reads K and V with one number of heads."""
    import lmforge

    def fn(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, _repeat_kv(k, 4), v)

    xs = torch.randn(1, 8, 5, 16), torch.randn(1, 2, 5, 16), torch.randn(1, 8, 5, 16)
    model = lmforge.compile(fn, xs)
    (att,) = [n for n in model.graph.nodes if n.op == "attention"]
    assert att.inputs[1].type.shape[1] == 8
    torch.testing.assert_close(model(*xs), fn(*xs), rtol=1e-5, atol=1e-5)
