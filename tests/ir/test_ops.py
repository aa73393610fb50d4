"""The op registry, table-driven: every op's reference agrees with its type rule, its cost is sane, and
references agree with plain torch expressions. The table must cover every registered op."""
import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.errors import VerifyError
from lmforge.ir import GraphBuilder, TensorType
from lmforge.ir.ops import all_ops, get_op
from lmforge.ir.types import dtype_name

f32 = "float32"


def t(*shape, dtype=f32):
    return (tuple(shape), dtype)


# op -> (input specs (shape, dtype) or None, attrs, expected(torch inputs) or None)
CASES = {
    "linear": ([t(3, 5, 8), t(6, 8), t(6)], {}, lambda x, w, b: x @ w.T + b),
    "matmul": ([t(2, 3, 4), t(2, 4, 5)], {}, lambda a, b: torch.bmm(a, b)),
    "embedding": ([t(2, 3, dtype="int64"), t(10, 4)], {}, lambda i, w: w[i]),
    "rmsnorm": ([t(2, 3, 8), t(8)], {"eps": 1e-6},
                lambda x, w: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w),
    "layernorm": ([t(2, 8), t(8), t(8)], {}, lambda x, w, b: F.layer_norm(x, (8,), w, b)),
    "rope": ([t(1, 2, 3, 4), t(3, 4), t(3, 4)], {},
             lambda x, c, s: x * c + torch.cat([-x[..., 2:], x[..., :2]], -1) * s),
    "attention": ([t(2, 4, 5, 8), t(2, 2, 5, 8), t(2, 2, 5, 8)], {"causal": True},
                  lambda q, k, v: F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1),
                                                                 v.repeat_interleave(2, 1), is_causal=True)),
    "kv_cache_append": ([t(1, 2, 6, 4), t(1, 2, 1, 4)], {"dim": 2}, lambda c, n: torch.cat([c, n], 2)),
    "kv_cache_update": ([t(1, 2, 6, 4), t(1, 2, 2, 4)], {"dim": 2, "pos": 3},
                        lambda c, n: torch.cat([c[:, :, :3], n, c[:, :, 5:]], 2)),
    "topk": ([t(3, 10)], {"k": 4}, lambda x: torch.topk(x, 4)),
    "sample": ([t(3, 10)], {"temperature": 0.0}, lambda x: x.argmax(-1)),
    "softmax": ([t(3, 10)], {"dim": -1}, lambda x: torch.softmax(x, -1)),
    "sum": ([t(3, 4)], {"dims": (1,)}, lambda x: x.sum(1)),
    "mean": ([t(3, 4)], {"dims": (0,), "keepdim": True}, lambda x: x.mean(0, keepdim=True)),
    "amax": ([t(3, 4)], {"dims": (1,)}, lambda x: x.amax(1)),
    "amin": ([t(3, 4)], {"dims": (1,)}, lambda x: x.amin(1)),
    "argmax": ([t(3, 4)], {"dim": 1}, lambda x: x.argmax(1)),
    "reshape": ([t(2, 6)], {"shape": (3, 4)}, lambda x: x.reshape(3, 4)),
    "permute": ([t(2, 3, 4)], {"perm": (2, 0, 1)}, lambda x: x.permute(2, 0, 1)),
    "expand": ([t(1, 3)], {"shape": (4, 3)}, lambda x: x.expand(4, 3)),
    "concat": ([t(2, 3), t(2, 5)], {"dim": 1}, lambda a, b: torch.cat([a, b], 1)),
    "slice": ([t(4, 9)], {"dim": 1, "start": 2, "end": 8, "step": 2}, lambda x: x[:, 2:8:2]),
    "select": ([t(4, 9)], {"dim": 0, "index": 2}, lambda x: x[2]),
    "index_select": ([t(5, 3), t(2, dtype="int64")], {"dim": 0}, lambda x, i: x[i]),
    "arange": ([], {"start": 2, "end": 9, "step": 3}, lambda: torch.arange(2, 9, 3)),
    "full": ([], {"shape": (2, 3), "value": 1.5}, lambda: torch.full((2, 3), 1.5)),
    "cast": ([t(3)], {"dtype": "float16"}, lambda x: x.half()),
    "where": ([t(3, 4, dtype="bool"), t(3, 4), None], {"b_scalar": -1.0}, lambda c, a, b: torch.where(c, a, -1.0)),
    "tri": ([t(4, 4)], {"diagonal": 1, "upper": True}, lambda x: torch.triu(x, 1)),
    "gelu": ([t(7)], {"approximate": "tanh"}, lambda x: F.gelu(x, approximate="tanh")),
    "pow_scalar": ([t(7)], {"exponent": 2.0}, lambda x: x * x),
    "torch_fallback": ([t(3, 4)], {"target": "aten.cumsum.default", "args": (("$input", 0), 1)},
                       lambda x: torch.cumsum(x, 1)),
}
for _name, _fn in {"neg": torch.neg, "exp": torch.exp, "log": lambda x: torch.log(x.abs() + 1), "sqrt": None,
                   "rsqrt": None, "abs": torch.abs, "sin": torch.sin, "cos": torch.cos, "tanh": torch.tanh,
                   "sigmoid": torch.sigmoid, "relu": torch.relu, "silu": lambda x: x * torch.sigmoid(x),
                   "reciprocal": None, "logical_not": None}.items():
    CASES.setdefault(_name, ([t(3, 4, dtype="bool" if _name == "logical_not" else f32)], {},
                             _fn if _name != "log" else None))
for _name, _fn in {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div, "pow": None,
                   "maximum": torch.maximum, "minimum": torch.minimum, "eq": torch.eq, "ne": torch.ne,
                   "lt": torch.lt, "le": torch.le, "gt": torch.gt, "ge": torch.ge,
                   "logical_and": None, "logical_or": None}.items():
    dt = "bool" if _name.startswith("logical") else f32
    CASES.setdefault(_name, ([t(3, 4, dtype=dt), t(1, 4, dtype=dt)], {}, _fn))


def _fused_region():
    from lmforge.ir import GraphBuilder

    b = GraphBuilder("body")
    a, c = b.input("a", TensorType((3, 4))), b.input("c", TensorType((3, 4)))
    return b.build([b.op("mul", [b.op("silu", [a]), c])])


CASES["fused"] = ([t(3, 4), t(3, 4)], {"kind": "swiglu"}, lambda a, c: F.silu(a) * c)
REGIONS = {"fused": _fused_region}


def _quant_case():
    from lmforge.ir.ops.quant_ref import quantize_weight

    gen = torch.Generator().manual_seed(7)
    w = torch.randn(6, 64, generator=gen)
    qw = quantize_weight(w, 4, 32)
    return qw


def _needs(module):
    import importlib.util

    return importlib.util.find_spec(module) is None


# built in the tests below (packed weights, attention references)
for _name in ("linear_wo", "merge_lse", "block_topk_attention", "block_sparse_attention", "flex_prefill_attention",
              "shared_prefix_attention"):
    CASES[_name] = None
CASES["kv_qdq"] = ([t(2, 2, 5, 8)], {"dtype": "int8"}, None)
# gamma = 1 keeps every causal block (lower gammas: tests/passes/test_quant_sparsity.py, against FlexPrefill's ref)
CASES["flex_prefill_mask"] = ([t(2, 4, 20, 8), t(2, 2, 20, 8)], {"gamma": 1.0, "block_size": 8},
                              lambda q, k: torch.ones(2, 4, 3, 3, dtype=torch.bool).tril())
# collectives of a tensor-parallel graph: a group of 1 is the identity here; groups of ranks in tests/passes/test_shard.py
CASES["all_reduce"] = ([t(3, 4)], {"group_size": 1}, lambda x: x)
CASES["all_gather"] = ([t(3, 4)], {"group_size": 1, "dim": 1}, lambda x: x)
CASES["shard_slice"] = ([t(3, 4)], {"group_size": 1, "dim": 0}, lambda x: x)
# program ops hold decode loops and compound systems: their references are tested in tests/programs/
for _name in ("generate", "ensemble", "rank", "fuse", "verify", "vote"):
    CASES[_name] = None
# retrieve needs no model: a registered corpus of 5 documents of 3 tokens (ids < 10, as make() draws them)
_DOCS = torch.arange(15).reshape(5, 3) % 10
CASES["retrieve"] = ([t(2, 4, dtype="int64")], {"corpus": "ops-table", "k": 2, "insert_at": 1, "n_docs": 5,
                                                 "doc_len": 3},
                     lambda p: _retrieved(p, 2, 1))


def _retrieved(prompts, k, at):
    """Plain torch: documents ranked by the number of distinct prompt tokens they contain, ties to the lower id."""
    rows, ids = [], []
    for p in prompts.tolist():
        score = [len(set(p) & set(d)) for d in _DOCS.tolist()]
        best = sorted(range(len(score)), key=lambda i: (-score[i], i))[:k]
        rows.append(p[:at] + [x for i in best for x in _DOCS[i].tolist()] + p[at:])
        ids.append(best)
    return torch.tensor(rows), torch.tensor(ids)


@pytest.fixture(autouse=True, scope="module")
def _corpus():
    from lmforge.programs import register_corpus

    register_corpus("ops-table", _DOCS)


def make(spec, gen):
    if spec is None:
        return None
    shape, dtype = spec
    if dtype == "int64":
        return torch.randint(0, 5, shape, generator=gen)
    if dtype == "bool":
        return torch.rand(shape, generator=gen) > 0.5
    return torch.rand(shape, generator=gen) + 0.1 if dtype == f32 else torch.randn(shape, generator=gen)


def test_table_covers_every_registered_op():
    assert sorted(CASES) == all_ops(), "add a row for each new op"


@pytest.mark.parametrize("name", sorted(k for k, v in CASES.items() if v is not None))
def test_reference_matches_type_rule_and_torch(name):
    specs, attrs, expected = CASES[name]
    op = get_op(name)
    gen = torch.Generator().manual_seed(hash(name) % 2**31)
    inputs = [make(s, gen) for s in specs]
    in_types = [None if x is None else TensorType.of(x) for x in inputs]
    full = op.normalize_attrs(attrs)
    regions = ()
    if name in REGIONS:
        from lmforge.compiler import build_callable
        from lmforge.backends import default_backends

        regions = (REGIONS[name](),)
        out = op.reference(*inputs, regions=(build_callable(regions[0], default_backends(), "cpu", {})[0],), **full)
    else:
        out = op.reference(*inputs, **full)
    outs = out if isinstance(out, tuple) else (out,)
    if name == "torch_fallback":
        types = [TensorType.of(o) for o in outs]
    else:
        types = op.infer(in_types, full, regions)
    assert len(types) == len(outs)
    for ty, o in zip(types, outs):
        assert tuple(ty.shape) == tuple(o.shape), (name, ty, o.shape)
        assert ty.dtype == dtype_name(o.dtype)
    if expected is not None:
        want = expected(*inputs)
        want = want if isinstance(want, tuple) else (want,)
        for o, w in zip(outs, want):
            torch.testing.assert_close(o, w, rtol=1e-5, atol=1e-6)
    cost = op.cost(in_types, full, types)
    assert cost.flops >= 0 and cost.bytes >= 0
    assert math.isfinite(cost.flops) and math.isfinite(cost.bytes)


def test_costs_scale_as_expected():
    lin = get_op("linear")
    c = lin.cost([TensorType((1, 4096), "float16"), TensorType((4096, 4096), "float16")], {})
    assert c.flops == 2 * 4096 * 4096
    assert c.bytes == pytest.approx(2 * (4096 * 4096 + 2 * 4096))
    att = get_op("attention")
    q = TensorType((1, 8, 128, 64))
    full = att.cost([q, q, q], {"causal": False})
    causal = att.cost([q, q, q], {"causal": True})
    assert causal.flops == pytest.approx(full.flops * (128 * 129 / 2) / (128 * 128))
    dec = TensorType((1, 8, 1, 64))
    kv = TensorType((1, 8, 4096, 64))
    windowed = att.cost([dec, kv, kv], {"causal": True, "window": 256, "sinks": 4})
    dense = att.cost([dec, kv, kv], {"causal": True})
    assert windowed.bytes < dense.bytes / 10 and windowed.flops < dense.flops / 10


@pytest.mark.skipif(_needs("lmforge.ir.ops.quant_ref") or _needs("lmforge.ir.ops.attention_ref"),
                    reason="quantization / attention references not built yet")
def test_linear_wo_and_merge_lse():
    from lmforge.ir.ops.attention_ref import attention_ref
    from lmforge.ir.ops.quant_ref import dequantize_weight

    qw = _quant_case()
    x = torch.randn(3, 64)
    op = get_op("linear_wo")
    attrs = {"bits": 4, "group_size": 32}
    ins = (x, qw.qweight, qw.scales, qw.zeros)
    y = op.reference(*ins, **attrs)
    torch.testing.assert_close(y, x @ dequantize_weight(qw).T, rtol=1e-5, atol=1e-5)
    (ty,) = op.infer([TensorType.of(i) for i in ins], attrs)
    assert tuple(ty.shape) == tuple(y.shape)
    cost = op.cost([TensorType.of(i) for i in ins], attrs)
    dense = get_op("linear").cost([TensorType.of(x), TensorType((6, 64))], {})
    assert cost.flops == dense.flops and cost.bytes < dense.bytes

    q, k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    o1, l1 = attention_ref(q, k[:, :, :4], v[:, :, :4], causal=False, return_lse=True)
    o2, l2 = attention_ref(q, k[:, :, 4:], v[:, :, 4:], causal=False, return_lse=True)
    out, lse = get_op("merge_lse").reference(o1, l1, o2, l2)
    full, full_lse = attention_ref(q, k, v, causal=False, return_lse=True)
    torch.testing.assert_close(out, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, full_lse, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(_needs("lmforge.ir.ops.attention_ref"), reason="attention references not built yet")
def test_sparse_attention_ops_with_full_budget_equal_dense():
    from lmforge.ir.ops.attention_ref import attention_ref

    gen = torch.Generator().manual_seed(3)
    q1 = torch.randn(2, 4, 1, 8, generator=gen)
    k, v = torch.randn(2, 2, 40, 8, generator=gen), torch.randn(2, 2, 40, 8, generator=gen)
    dense = attention_ref(q1, k, v, causal=True)
    full = get_op("block_topk_attention").reference(q1, k, v, block_size=8, topk_blocks=5, sinks=0, window=8)
    torch.testing.assert_close(full, dense, rtol=1e-5, atol=1e-5)
    q = torch.randn(2, 4, 40, 8, generator=gen)
    dense_prefill = attention_ref(q, k, v, causal=True)
    flex = get_op("flex_prefill_attention").reference(q, k, v, gamma=1.0, block_size=8)
    torch.testing.assert_close(flex, dense_prefill, rtol=1e-5, atol=1e-5)
    mask = torch.ones(2, 4, 5, 5, dtype=torch.bool)
    bs = get_op("block_sparse_attention").reference(q, k, v, mask, block_size=8)
    torch.testing.assert_close(bs, dense_prefill, rtol=1e-5, atol=1e-5)
    kp, vp = k[:1, :, :30], v[:1, :, :30]
    ks, vs = k[:, :, 30:], v[:, :, 30:]
    shared = get_op("shared_prefix_attention").reference(q1, kp, vp, ks, vs)
    kf, vf = torch.cat([kp.expand(2, -1, -1, -1), ks], 2), torch.cat([vp.expand(2, -1, -1, -1), vs], 2)
    torch.testing.assert_close(shared, attention_ref(q1, kf, vf, causal=True), rtol=1e-5, atol=1e-5)
    for name, ins in [("block_topk_attention", (q1, k, v)), ("flex_prefill_attention", (q, k, v)),
                      ("shared_prefix_attention", (q1, kp, vp, ks, vs))]:
        op = get_op(name)
        attrs = op.normalize_attrs({"block_size": 8, "topk_blocks": 2} if name.startswith("block") else {})
        types = [TensorType.of(x) for x in ins]
        (out_t,) = op.infer(types, attrs)
        assert out_t.shape == tuple(ins[0].shape[:3]) + (8,)
        assert op.cost(types, attrs).flops > 0


def test_quantized_kv_bytes_are_what_the_quantizers_store():
    """The attention cost's bytes of an int8 / fp8 KV cache equal what kv_quantize_int8 (per-token axis) and
    kv_quantize_fp8 store: 1-byte values plus one fp32 scale per token and head of K and of V."""
    from lmforge.ir.ops.nn_ops import kv_bytes
    from lmforge.ir.ops.quant_ref import kv_quantize_fp8, kv_quantize_int8

    k = torch.randn(2, 4, 33, 16, dtype=torch.float16)
    for fmt, quantize in (("int8", kv_quantize_int8), ("float8_e4m3fn", kv_quantize_fp8)):
        q, s = quantize(k)
        stored = 2 * (q.numel() * q.element_size() + s.numel() * s.element_size())
        assert kv_bytes(TensorType.of(k), TensorType.of(k), fmt) == stored


@pytest.mark.parametrize("sq", [1, 2, 8, 64])
def test_windowed_attention_reads_only_the_keys_its_queries_see(sq):
    # With sq > 1 the whole 32k cache was charged: ~126x the bytes of a 2-token verify step.
    skv, window, sinks, hq, hk, d = 32768, 256, 4, 32, 8, 128
    q, kv = TensorType((1, hq, sq, d), "bfloat16"), TensorType((1, hk, skv, d), "bfloat16")
    cost = get_op("attention").cost([q, kv, kv], {"causal": True, "window": window, "sinks": sinks})
    keys = window + sinks + sq - 1
    assert cost.bytes == 2 * (2 * hq * sq * d) + 2 * 2 * hk * keys * d
    # FLOPs: each query sees window + sinks keys (its position is past them all)
    assert cost.flops == pytest.approx((2 * (d + d) + 5) * hq * sq * (window + sinks))


def test_a_window_wider_than_the_cache_reads_the_cache_once():
    q, kv = TensorType((1, 4, 8, 16)), TensorType((1, 4, 100, 16))
    cost = get_op("attention").cost([q, kv, kv], {"causal": True, "window": 256})
    assert cost.bytes == 4 * (2 * q.numel() + 2 * kv.numel())


@pytest.mark.parametrize("op, ins, attrs, kv_fraction", [
    ("attention", [(1, 8, 1, 64), (1, 2, 4096, 64), (1, 2, 4096, 64)], {"causal": True}, 1.0),
    ("block_topk_attention", [(1, 8, 1, 64), (1, 2, 4096, 64), (1, 2, 4096, 64)],
     {"block_size": 64, "topk_blocks": 4, "sinks": 4, "window": 64}, (4 + 1 + 1 + 1) * 64 / 4096),
    ("flex_prefill_attention", [(1, 8, 256, 64), (1, 8, 256, 64), (1, 8, 256, 64)], {}, 1.0),
])
def test_attention_reads_an_offloaded_cache_over_the_host_link(op, ins, attrs, kv_fraction):
    # memory_tier="host" was honoured by kv_cache_append but attention read the same cache at HBM speed.
    plain = [TensorType(s, "float16") for s in ins]
    host = [plain[0], *(x.with_(memory_tier="host") for x in plain[1:])]
    on_device, offloaded = get_op(op).cost(plain, attrs), get_op(op).cost(host, attrs)
    assert offloaded.bytes == pytest.approx(on_device.bytes) and offloaded.flops == on_device.flops
    kv_read = kv_fraction * (plain[1].nbytes() + plain[2].nbytes())
    assert offloaded.tier_bytes("host") == pytest.approx(kv_read)
    assert offloaded.tier_bytes("dram") == pytest.approx(on_device.bytes - kv_read)


@pytest.mark.parametrize("op, types, attrs", [
    ("concat", [TensorType((4, 6)), TensorType((3, 7))], {"dim": 0}),
    ("concat", [TensorType((4, 6)), TensorType((3, 6), "float16")], {"dim": 0}),
    ("concat", [TensorType((4, 6)), TensorType((3, 6, 1))], {"dim": 0}),
    ("reshape", [TensorType((4, 6))], {"shape": (5, 5)}),
    ("reshape", [TensorType((4, 6))], {"shape": (5, -1)}),
    ("gelu", [TensorType((4, 6))], {"approximate": "tan"}),
], ids=["concat-other-dim", "concat-dtype", "concat-rank", "reshape-numel", "reshape-minus-one", "gelu-enum"])
def test_type_rules_refuse_operands_that_contradict(op, types, attrs):
    b = GraphBuilder("g")
    ins = [b.input(f"x{i}", t) for i, t in enumerate(types)]
    with pytest.raises(VerifyError):
        b.build([b.op(op, ins, attrs)])


def test_type_rules_keep_symbolic_sizes_open():
    b = GraphBuilder("g")
    x, y = b.input("x", TensorType(("b", 6))), b.input("y", TensorType((3, 6)))
    g = b.build([b.op("concat", [x, y], {"dim": 0}), b.op("reshape", [x], {"shape": ("b", 2, 3)})])
    assert [v.type.shape for v in g.outputs] == [("b + 3", 6), ("b", 2, 3)]


def test_topk_ties_take_the_lower_index_first():
    x = torch.tensor([[3.0, 1.0, 3.0, 2.0, 1.0, 3.0]])
    v, i = get_op("topk").reference(x, k=3)
    assert i.tolist() == [[0, 2, 5]] and v.tolist() == [[3.0, 3.0, 3.0]]
    v, i = get_op("topk").reference(x, k=3, largest=False)
    assert i.tolist() == [[1, 4, 3]] and v.tolist() == [[1.0, 1.0, 2.0]]
    y = torch.randn(4, 50)
    for got, want in zip(get_op("topk").reference(y, k=7, dim=1), torch.topk(y, 7, dim=1)):
        assert torch.equal(got, want)      # no ties: the same as torch.topk


def test_block_topk_attention_that_keeps_no_key_is_refused():
    q, k = TensorType((1, 2, 1, 16), "float32"), TensorType((1, 2, 40, 16), "float32")
    op = get_op("block_topk_attention")
    assert op.infer([q, k, k], {"block_size": 8, "topk_blocks": 0, "sinks": 0, "window": 8})[0].shape == (1, 2, 1, 16)
    for bad in ({"topk_blocks": 0, "sinks": 0, "window": 0}, {"topk_blocks": -1, "sinks": 4, "window": 8}):
        with pytest.raises(VerifyError, match="no key|>= 0"):
            op.infer([q, k, k], {"block_size": 8, **bad})
