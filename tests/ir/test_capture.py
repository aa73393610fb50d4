"""torch.export capture: ATen ops map to IR ops, dynamic dims, attention recognition, fallbacks, errors."""
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lmforge
from lmforge.errors import CaptureError
from lmforge.ir import Graph


class Block(nn.Module):
    """A small attention block: norm, projections, SDPA, and a hand-written attention."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.norm = nn.RMSNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(self.norm(x)).split(d, dim=-1)
        q, k, v = (t.view(b, s, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        m = torch.softmax((q @ k.transpose(-2, -1)) * 0.25, dim=-1) @ v
        return self.out((a + m).transpose(1, 2).reshape(b, s, d)) + x


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_block_captures_to_ir_ops_and_matches_eager_on_new_shapes():
    torch.manual_seed(0)
    m = Block().eval()
    g = lmforge.capture(m, (torch.randn(2, 5, 16),), dynamic={"x": {0: "batch", 1: "seq"}})
    ops = [n.op for n in g.nodes]
    assert ops.count("attention") == 2, "SDPA and the matmul-softmax-matmul chain are both attention"
    assert "torch_fallback" not in ops and "softmax" not in ops
    assert g.inputs[0].type.shape == ("batch", "seq", 16)
    assert {p.name for p in g.params} == {"norm.weight", "qkv.weight", "qkv.bias", "out.weight"}
    compiled = lmforge.compile(m, (torch.randn(2, 5, 16),), dynamic={"x": {0: "batch", 1: "seq"}})
    for shape in [(2, 5, 16), (3, 9, 16), (1, 1, 16)]:
        x = torch.randn(shape)
        assert rel_err(compiled(x), m(x)) <= 1e-5
    assert Graph.from_json(g.to_json()) == g


def test_function_capture_and_output_structure():
    def fn(a, b):
        return {"sum": a + b, "pair": (a * 2, torch.tanh(b))}

    a, b = torch.randn(3, 4), torch.randn(3, 4)
    compiled = lmforge.compile(fn, (a, b))
    out, ref = compiled(a, b), fn(a, b)
    assert set(out) == {"sum", "pair"} and isinstance(out["pair"], tuple)
    torch.testing.assert_close(out["pair"][1], ref["pair"][1])


def test_unmapped_aten_op_becomes_explicit_fallback_with_source_line():
    def fn(x):
        return torch.cumsum(x, dim=1) * 2

    x = torch.randn(2, 6)
    compiled = lmforge.compile(fn, (x,))
    (node,) = compiled.fallback_nodes()
    assert node.attr["target"] == "aten.cumsum.default"
    assert "test_capture.py" in node.source
    torch.testing.assert_close(compiled(x), fn(x))
    text = compiled.inspect()
    assert "torch_fallback nodes" in text and "aten.cumsum.default" in text and "test_capture.py" in text


def test_non_tensor_input_is_a_clear_error():
    with pytest.raises(CaptureError, match="not a tensor"):
        lmforge.capture(lambda x, n: x * n, (torch.randn(2), "three"))


def test_data_dependent_control_flow_is_a_clear_error():
    def fn(x):
        if x.sum() > 0:
            return x * 2
        return x - 1

    with pytest.raises(CaptureError, match="control flow|could not capture"):
        lmforge.capture(fn, (torch.randn(4),))


def test_bad_dynamic_spec_is_a_clear_error():
    with pytest.raises(CaptureError, match="model's inputs are"):
        lmforge.capture(lambda x: x + 1, (torch.randn(3, 4),), dynamic={"nope": {0: "b"}})
    with pytest.raises(CaptureError, match="size >= 2"):
        lmforge.capture(lambda x: x + 1, (torch.randn(1, 4),), dynamic={"x": {0: "b"}})


@pytest.mark.parametrize("dynamic,says", [
    ({"x": [0, 1]}, "is a list; dynamic must be a dict"),
    ({"x": {"0": "b"}}, "has the key '0': dims are given by their index"),
    ({"x": {0.0: "b"}}, "has the key 0.0"),
    ({"x": {-3: "b"}}, "names dim -3, but that input has shape"),
    ({"x": {2: "b"}}, "names dim 2, but that input has shape"),
    ({"x": {0: "b", -2: "c"}}, "names dim 0 twice"),
    ([("x", {0: "b"})], "dynamic must be a dict"),
])
def test_malformed_dynamic_spec_is_a_capture_error(dynamic, says):
    with pytest.raises(CaptureError, match=re.escape(says)):
        lmforge.capture(lambda x: x + 1, (torch.randn(3, 4),), dynamic=dynamic)


def test_negative_dynamic_dim_keeps_the_users_name():
    graph = lmforge.capture(lambda x: x * 2, (torch.randn(3, 4),), dynamic={"x": {-1: "seq", -2: "batch"}})
    assert graph.inputs[0].type.shape == ("batch", "seq")


def test_torch_compile_backend_matches_eager():
    torch.manual_seed(1)
    m = Block().eval()
    x = torch.randn(2, 7, 16)
    compiled = torch.compile(m, backend="lmforge")
    torch.testing.assert_close(compiled(x), m(x), rtol=1e-5, atol=1e-5)


def test_last_token_indexing_on_a_dynamic_dim_is_captured_not_a_fallback():
    """x[:, -1] and x[:, -1:] on a dynamic dim (the last token's logits) become select / slice at "seq - 1", so
    they run on every backend and export to ONNX; equal to eager at other lengths."""
    def last(x):
        return x[:, -1] * 2, x[:, -1:] + 1

    c = lmforge.compile(last, (torch.randn(2, 7, 4),), dynamic={"x": {1: "seq"}})
    assert not c.fallback_nodes() and [n.op for n in c.graph.nodes] == ["select", "mul", "slice", "add"]
    for seq in (3, 9):
        y = torch.randn(2, seq, 4)
        assert all(torch.equal(a, b) for a, b in zip(c(y), last(y)))


def test_sdpa_on_3d_inputs_runs_as_torch():
    """SDPA without a heads dim (3-D q/k/v) is valid torch; lmforge's attention op is 4-D, so it runs as a torch
    fallback (it failed the attention type rule)."""
    def attend(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    q = torch.randn(2, 5, 8)
    c = lmforge.compile(attend, (q, q, q))
    assert [n.op for n in c.graph.nodes] == ["torch_fallback"]
    torch.testing.assert_close(c(q, q, q), attend(q, q, q))


# ---- in-place writes -------------------------------------------------------------------------------------

def _slice_assign(x):
    y = x.clone()
    y[:, -2:] = 0
    return y


def _copy_into_slice(x, u):
    z = x.clone()
    z[:, 2:4] = u
    return z


def _mul_on_view(x):
    y = x.clone()
    y[0].mul_(3)
    return y


def _add_on_clone(x):
    y = x.clone()
    y.add_(1)
    return y


def _relu_on_clone(x):
    y = x.clone()
    y.relu_()
    return y * 1


def _zeros_setitem(x):
    y = torch.zeros(3, 6)
    y[1] = x[0]
    return y


def _several_writes(x):
    y = x.clone()
    y[:, 1:3] += 1
    y[0] = 5
    y[:, ::2] *= 2
    return y


def _index_put(x, i):
    y = x.clone()
    y[i] = 0
    return y


@pytest.mark.parametrize("fn,extra", [
    (_slice_assign, ()), (_copy_into_slice, ((3, 2),)), (_mul_on_view, ()), (_add_on_clone, ()),
    (_relu_on_clone, ()), (_zeros_setitem, ()), (_several_writes, ()), (_index_put, ("index",)),
], ids=lambda p: getattr(p, "__name__", "")[1:] if callable(p) else "")
def test_in_place_writes_are_kept_and_never_touch_the_callers_tensors(fn, extra):
    """torch.export's graph writes in place (a fill_ on a slice view of a clone, that nothing reads): lmforge
    functionalizes such graphs, so the write is in the result and a compiled call leaves its inputs as they were."""
    def inputs():
        return (torch.randn(3, 6),) + tuple(torch.tensor([0, 2]) if e == "index" else torch.randn(*e) for e in extra)

    compiled = lmforge.compile(fn, inputs())
    for _ in range(2):
        xs = inputs()
        before = tuple(x.clone() for x in xs)
        got, want = compiled(*xs), fn(*(x.clone() for x in xs))
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert all(torch.equal(a, b) for a, b in zip(xs, before)), "the compiled call changed its input"


def test_graphs_without_writes_are_not_functionalized():
    """Only a graph with an in-place write goes through functionalization: an ordinary model keeps the graph (and
    the signature its tuning studies are keyed by) it had."""
    from lmforge.ir.frontends import torch_export

    ep, _ = torch_export.export_program(Block().eval(), (torch.randn(2, 5, 16),))
    assert torch_export.functional_program(ep) is ep


class _StaticCache(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("cache", torch.zeros(2, 8, 4))

    def forward(self, k):
        self.cache[:, :3] = k
        return self.cache.sum(1)


def test_writes_to_model_state_or_inputs_are_a_clear_error():
    with pytest.raises(CaptureError, match=r"buffer 'cache'.*keeps no state.*return its new value"):
        lmforge.capture(_StaticCache(), (torch.randn(2, 3, 4),))

    def add_to_input(x):
        x.add_(1)
        return x * 2

    with pytest.raises(CaptureError, match=r"input 'x' in place \(aten.add_.Tensor at test_capture.py:\d+.*clone"):
        lmforge.capture(add_to_input, (torch.randn(3),))
    with pytest.raises(CaptureError, match=r"parameter 'weight'.*max_norm"):
        lmforge.capture(nn.Embedding(10, 4, max_norm=1.0), (torch.tensor([[1, 3, 9]]),))


# ---- type rules that torch's types overrule -------------------------------------------------------------

@pytest.mark.parametrize("fn,make", [
    (lambda x: torch.sum(x, dim=[]), lambda: (torch.randn(4, 6),)),
    (lambda x: x.argmax(keepdim=True), lambda: (torch.randn(4, 6),)),
    (lambda a, b: torch.cat([a, b]), lambda: (torch.arange(3), torch.randn(2))),
    (lambda a, b: torch.cat([a, b], 1), lambda: (torch.randn(2, 3).half(), torch.randn(2, 2))),
    (lambda x: x.t() + 1, lambda: (torch.randn(()),)),
    (lambda x, w: F.linear(x, w), lambda: (torch.randn(4, 6), torch.randn(6))),
    (lambda x, i: torch.index_select(x, 0, i) * 2, lambda: (torch.randn(4, 6), torch.tensor(2))),
    (lambda a, b: torch.add(a, b, alpha=2) - torch.sub(a, b, alpha=3), lambda: (
        torch.randint(-5, 5, (3, 4)), torch.randint(-5, 5, (3, 4)))),
    (lambda a: torch.rsub(a, 7, alpha=2), lambda: (torch.randint(-5, 5, (3, 4)),)),
], ids=["sum_dim_empty", "argmax_keepdim_no_dim", "cat_int_float", "cat_half_float", "t_of_0d",
        "linear_1d_weight", "index_select_0d_index", "int_add_sub_alpha", "int_rsub_alpha"])
def test_valid_torch_code_captures_and_matches_eager(fn, make):
    compiled = lmforge.compile(fn, make())
    xs = make()
    got, want = compiled(*xs), fn(*xs)
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want)


def test_a_rule_whose_type_disagrees_with_torch_becomes_a_fallback(monkeypatch):
    """The safety net: a rule that emits an IR node whose type rule disagrees with the type torch recorded (here a
    concat rule that forgets to promote) gives a torch_fallback for that node, not a graph that fails to verify."""
    from lmforge.ir.frontends import torch_export

    def naive_cat(t, node):
        return t.emit(node, "concat", [t.value(a) for a in node.args[0]], {"dim": 0})

    monkeypatch.setitem(torch_export.ATEN_TO_IR, torch.ops.aten.cat.default, naive_cat)

    def fn(a, b):
        return torch.cat([a, b]) * 2

    compiled = lmforge.compile(fn, (torch.arange(3), torch.randn(2)))
    assert [n.attr["target"] for n in compiled.fallback_nodes()] == ["aten.cat.default"]
    a, b = torch.randint(-9, 9, (3,)), torch.randn(2)
    torch.testing.assert_close(compiled(a, b), fn(a, b))


def test_float64_softmax_is_computed_in_float64():
    x = torch.randn(4, 6, dtype=torch.float64) * 30
    for fn in (lambda x: torch.softmax(x, -1), lambda x: torch.log_softmax(x, 0)):
        got = lmforge.compile(fn, (x,))(x)
        torch.testing.assert_close(got, fn(x), rtol=1e-12, atol=1e-12)


# ---- dynamic dims --------------------------------------------------------------------------------------

@pytest.mark.parametrize("fn,example,dynamic,says", [
    (lambda x: x[:, -2:] * 1, (torch.randn(2, 6, 3),), {"x": {1: "s"}},
     [r"Not all values of s = x.shape\[1\]", r"guard \(3\*x.shape\[1\]\) != 6", "only works for some sizes"]),
    (lambda x, y: x + y, (torch.randn(2, 6, 3), torch.randn(2, 6, 3)), {"x": {1: "a"}, "y": {1: "b"}},
     [r"b = y.shape\[1\] and a = x.shape\[1\] must always be equal", "give them the same name"]),
    (lambda x: x.reshape(2, 18), (torch.randn(2, 6, 3),), {"x": {1: "s"}},
     ["specialized it to be a constant", "remove it from `dynamic`"]),
    (lambda k, v: k + v, (torch.randn(2, 6, 3), torch.randn(2, 6, 3)), {"k": {1: "s"}},   # v's dim left unmarked
     ["specialized it to be a constant", "mark the same dim of every input that has it"]),
    (lambda x: x.reshape(2, -1, 2), (torch.randn(2, 6, 3),), {"x": {1: "s"}},   # only for even s
     [r"Not all values of s = x.shape\[1\]", "only works for some sizes"]),
    (lambda x: x + torch.arange(64.0)[:x.shape[1]].view(1, -1, 1), (torch.randn(2, 6, 3),), {"x": {1: "s"}},
     [r"x.shape\[1\] <= 64", "works only up to s = 64", "dynamic dims have no upper bound", "Make s static"]),
], ids=["negative_slice", "dims_forced_equal", "dim_is_constant", "a_sibling_input_unmarked", "divisible_only",
        "upper_bound"])
def test_dynamic_dim_errors_carry_torchs_reason_in_the_users_names(fn, example, dynamic, says):
    with pytest.raises(CaptureError) as info:
        lmforge.capture(fn, example, dynamic=dynamic)
    text = str(info.value)
    for pattern in says:
        assert re.search(pattern, text), (pattern, text)
    assert "L['" not in text and "draft_export" not in text and "TORCH_LOGS" not in text
    if "constant" not in says[0]:
        assert "is constant in the model" not in text, "the dim is not constant: that hint would mislead"


@pytest.mark.parametrize("name", ["seq-len", "batch size", "1", "for"])
def test_a_dim_name_that_is_not_an_identifier_is_a_clear_error(name):
    with pytest.raises(CaptureError, match="not a Python identifier"):
        lmforge.capture(lambda x: x * 2, (torch.randn(2, 6),), dynamic={"x": {1: name}})


def test_a_dim_named_like_a_torch_symbol_stays_its_own_dim():
    """torch names its symbols s17, s77, ...; a user's dim called "s17" is renamed once, so it never merges with
    another dim that torch happened to call s17."""
    def fn(x, y):
        return torch.cat([x, y]) * 1

    dynamic = {"x": {0: "s17"}, "y": {0: "b"}}
    g = lmforge.capture(fn, (torch.randn(3, 4), torch.randn(5, 4)), dynamic=dynamic)
    assert [v.type.shape for v in g.inputs] == [("s17", 4), ("b", 4)]
    compiled = lmforge.compile(fn, (torch.randn(3, 4), torch.randn(5, 4)), dynamic=dynamic)
    x, y = torch.randn(2, 4), torch.randn(6, 4)
    torch.testing.assert_close(compiled(x, y), fn(x, y))


def test_dot_T_and_mT_are_permutes_not_fallbacks():
    def f(x, w):
        return x.mT @ w.T, w.T * 2

    x, w = torch.randn(2, 3, 4), torch.randn(5, 3)
    graph = lmforge.capture(f, (x, w))
    assert "torch_fallback" not in {n.op for n in graph.nodes}
    compiled = lmforge.compile(f, (x, w))
    for got, want in zip(compiled(x, w), f(x, w)):
        torch.testing.assert_close(got, want)


def repeat_kv(x, n):
    """Transformers' repeat_kv: each of x's KV heads n times, with expand + reshape."""
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n, s, d).reshape(b, h * n, s, d)


def gqa_decode(q, past_k, past_v):
    """One decode step of grouped-query attention: 4 query heads over 2 KV heads, each grown by one token."""
    k = repeat_kv(torch.cat([past_k, q[:, :2] * 0.5], 2), 2)
    v = repeat_kv(torch.cat([past_v, q[:, 2:] * 2.0], 2), 2)
    return torch.softmax(q @ k.transpose(-1, -2) * 0.25, -1) @ v


def test_a_guard_torch_cannot_prove_for_a_named_dim_but_that_always_holds_captures():
    """repeat_kv on a cache of dynamic length makes torch guard min(16 + 16*past, 32 + 32*past) == 16 + 16*past,
    which holds for every past >= 0 but which torch.export cannot prove for a named Dim. Capture retries with
    unnamed dims, proves each guard for every size >= 2, and keeps the user's names: past_k's and past_v's lengths
    (two symbols for torch) are both `past`, so a call where they differ is refused."""
    example = (torch.randn(2, 4, 1, 16), torch.randn(2, 2, 5, 16), torch.randn(2, 2, 5, 16))
    dynamic = {"q": {0: "batch"}, "past_k": {0: "batch", 2: "past"}, "past_v": {0: "batch", 2: "past"}}
    compiled = lmforge.compile(gqa_decode, example, dynamic=dynamic)
    assert [v.type.shape for v in compiled.graph.inputs] == [("batch", 4, 1, 16)] + [("batch", 2, "past", 16)] * 2
    for batch, past in [(1, 2), (2, 5), (3, 30)]:
        xs = (torch.randn(batch, 4, 1, 16), torch.randn(batch, 2, past, 16), torch.randn(batch, 2, past, 16))
        torch.testing.assert_close(compiled(*xs), gqa_decode(*xs))
    with pytest.raises(lmforge.LmforgeError, match="dim 'past' is 5 in input 'past_k' but 6 in input 'past_v'"):
        compiled(torch.randn(2, 4, 1, 16), torch.randn(2, 2, 5, 16), torch.randn(2, 2, 6, 16))
