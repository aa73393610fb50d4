"""Generated Triton kernels for fused elementwise regions (lmforge.backends.triton.elementwise) against the op
reference (the region run op by op in torch), under Triton's interpreter at tiny shapes: fp32 to ~1e-6, fp16 /
bf16 to about one ulp of the result."""
import os

import pytest
import torch

import lmforge
from lmforge.backends.torch import TorchReference
from lmforge.backends.triton import elementwise as ew
from lmforge.backends.triton.backend import TritonBackend
from lmforge.compiler import CompiledModel
from lmforge.ir.graph import GraphBuilder
from lmforge.ir.types import TensorType

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs a GPU or the Triton interpreter")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (rtol, atol): fp32 to a few ulps of fp32 math; fp16 / bf16 to about one ulp of the result
TOLERANCE = {"float32": (2e-6, 1e-6), "float16": (1e-3, 1e-3), "bfloat16": (8e-3, 8e-3)}


def _graph(shapes, dtypes, body, kind="elementwise"):
    """A graph of one fused node: `body(builder, inputs)` gives the region's output from its inputs."""
    dtypes = [dtypes] * len(shapes) if isinstance(dtypes, str) else dtypes
    region = GraphBuilder("region")
    inner = [region.input(f"a{i}", TensorType(s, d)) for i, (s, d) in enumerate(zip(shapes, dtypes))]
    region_graph = region.build([body(region, inner)])
    outer = GraphBuilder("g")
    xs = [outer.input(f"x{i}", TensorType(s, d)) for i, (s, d) in enumerate(zip(shapes, dtypes))]
    return outer.build([outer.op("fused", xs, {"kind": kind}, regions=[region_graph])])


def _run(graph, inputs):
    """(triton output, reference output, the fused node's backend)."""
    tri = CompiledModel(graph, backends=[TritonBackend(interpret=True), TorchReference()], device=DEVICE)
    ref = CompiledModel(graph, device=DEVICE)
    return tri(*inputs), ref(*inputs), tri.kernels[0].backend


def _check(graph, inputs, dtype, ulps=1):
    got, want, backend = _run(graph, inputs)
    assert backend == "triton"
    assert got.dtype == want.dtype and got.shape == want.shape and got.is_contiguous()
    rtol, atol = (ulps * t for t in TOLERANCE[dtype])
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, equal_nan=True)


def _randn(shape, dtype, seed, positive=False):
    gen = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=gen)
    t = t.abs() + 0.1 if positive else t
    return t.to(getattr(torch, dtype)).to(DEVICE)


def _gelu_add(b, i):
    return b.op("add", [b.op("gelu", [i[0]], {"approximate": "tanh"}), i[1]])


def _residual_scale(b, i):
    return b.op("mul", [b.op("add", [i[0], i[1]]), i[2]])


def _sub_alpha_swap(b, i):
    d = b.op("sub", [i[0], i[1]], {"alpha": 2.5})
    return b.op("sub", [d, None], {"scalar": 0.1, "swap": True, "alpha": 3.0})  # 0.1 - 3 * d


def _positive_math(b, i):
    x, y = i
    q = b.op("log", [b.op("div", [b.op("exp", [x]), y])])
    r = b.op("add", [b.op("rsqrt", [y]), b.op("reciprocal", [x])])
    return b.op("add", [b.op("add", [q, r]), b.op("sqrt", [x])])


def _misc(b, i):
    x, y = i
    t = b.op("mul", [b.op("tanh", [x]), b.op("sigmoid", [y])])
    s = b.op("add", [b.op("silu", [x]), b.op("gelu", [y])])
    u = b.op("sub", [b.op("sin", [x]), b.op("cos", [b.op("abs", [y])])])
    return b.op("neg", [b.op("add", [b.op("add", [t, s]), b.op("mul", [u, None], {"scalar": 2})])])


REGIONS = {  # name -> (shapes, body, positive inputs)
    "gelu_tanh_add": ([(3, 40), (3, 40)], _gelu_add, False),
    "residual_add_mul_weight": ([(2, 3, 16), (2, 3, 16), (16,)], _residual_scale, False),
    "sub_alpha_swap_scalar": ([(5, 7), (5, 7)], _sub_alpha_swap, False),
    "div_reciprocal_rsqrt_exp_log": ([(4, 9), (4, 9)], _positive_math, True),
    "tanh_sigmoid_silu_gelu_sin_cos": ([(6, 11), (6, 11)], _misc, False),
}


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("name", list(REGIONS))
def test_regions_match_the_reference(name, dtype):
    shapes, body, positive = REGIONS[name]
    inputs = [_randn(s, dtype, 7 * k + len(name), positive) for k, s in enumerate(shapes)]
    # torch's CPU kernels for bf16 with alpha differ from fp32 math (torch on CUDA, the kernel) by an ulp on
    # some elements, and the next op may double that
    ulps = 2 if name == "sub_alpha_swap_scalar" and dtype == "bfloat16" else 1
    _check(_graph(shapes, dtype, body), inputs, dtype, ulps)


def test_small_arguments_of_tanh_keep_their_relative_precision():
    x = torch.tensor([1e-6, -3e-4, 0.01, -0.1, 0.2, 0.26, -0.7, 3.0, 20.0, -50.0, float("nan"), float("inf")])
    graph = _graph([(12,)], "float32", lambda b, i: b.op("tanh", [i[0]]))
    got, want, _ = _run(graph, [x.to(DEVICE)])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_maximum_minimum_and_relu_propagate_nan(dtype):
    def body(b, i):
        m = b.op("minimum", [b.op("maximum", [i[0], i[1]]), i[2]])
        return b.op("add", [b.op("relu", [m]), b.op("minimum", [i[1], i[0]])])

    inputs = [_randn((4, 8), dtype, k) for k in range(3)]
    for k, t in enumerate(inputs):
        t.view(-1)[k::5] = float("nan")
    got, want, backend = _run(_graph([(4, 8)] * 3, dtype, body), inputs)
    assert backend == "triton" and torch.isnan(want).any()
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    torch.testing.assert_close(got, want, rtol=TOLERANCE[dtype][0], atol=TOLERANCE[dtype][1], equal_nan=True)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("exponent", [2.0, 3.0, 0.5, -1.0, 2.5, -2.0, 5.0, -0.5, 0.0, 1.5, -2.5, 7.0, -5.0, 0.3,
                                      69.0, -3.5])
def test_pow_scalar_matches_torch_on_zeros_and_negatives(exponent, dtype):
    """Zeros of both signs (the sign shows in 1 / x ** e), negatives, NaN and both infinities: exactly torch's
    special values (odd powers keep -0.0's sign; (-inf) ** 1.5 is inf, ** -2.5 is 0)."""
    values = [0.0, -0.0, -1.5, -2.0, 0.5, 1.0, 1.7, 3.0, -0.25, float("nan"), float("inf"), -3.0, -float("inf"), 1.02]
    if abs(exponent) == 0.5 and dtype == "float16":   # torch's fp16 pow takes C's (-inf) ** 0.5 = inf and
        values = [v for v in values if v != -float("inf") and str(v) != "-0.0"]   # -0.0 ** -0.5 = inf, its fp32
        # one (and the kernel, computing in fp32) sqrt's NaN and -inf
    x = torch.tensor(values)
    graph = _graph([(len(values),)], dtype, lambda b, i: b.op("reciprocal", [b.op("pow_scalar", [i[0]],
                                                                                   {"exponent": exponent})]))
    _check(graph, [x.to(getattr(torch, dtype)).to(DEVICE)], dtype, ulps=2)


@pytest.mark.parametrize("exponent", [-4.0, 1.5, 2.5, -2.5, 5.0])
def test_fp32_powers_stay_within_a_few_ulps_and_do_not_overflow_early(exponent):
    """Integer and half-integer powers are multiplied out (a negative one as a power of the reciprocal: 1e10 ** -4
    is 1e-40, not 1 / inf), so fp32 stays within a few ulps of torch's pow, not the tens of exp2(e * log2 x)."""
    x = torch.logspace(-6, 6, 64) * torch.linspace(1.0, 1.37, 64)
    x = torch.cat([x, torch.tensor([1e10, 5e9])])
    graph = _graph([(66,)], "float32", lambda b, i: b.op("pow_scalar", [i[0]], {"exponent": exponent}))
    got, want, _ = _run(graph, [x.to(DEVICE)])
    assert (got[-2:] != 0).all() == (want[-2:] != 0).all()
    torch.testing.assert_close(got, want, rtol=4 * 2 ** -23, atol=0)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_wider_0d_operand_is_rounded_to_the_ops_dtype_first(dtype):
    """bf16 x - fp32 c (a 0-d tensor: a scalar parameter or buffer): torch computes in bf16 and rounds c to bf16
    first, so 1.0 - 0.999 is 0 there; computing with the fp32 c gave 0.002."""
    graph = _graph([(4,), ()], [dtype, "float32"], lambda b, i: b.op("sub", [i[0], i[1]]))
    assert graph.outputs[0].type.dtype == dtype
    x = torch.tensor([1.0, 0.5, -2.0, 3.0], dtype=getattr(torch, dtype)).to(DEVICE)
    got, want, backend = _run(graph, [x, torch.tensor(0.999).to(DEVICE)])
    unrounded = torch.tensor(1.0 - 0.999).to(x.dtype)      # c kept in fp32, the difference rounded once
    assert backend == "triton" and torch.equal(got, want) and got[0] == (x - torch.tensor(0.999))[0] != unrounded


@pytest.mark.parametrize("op", ["maximum", "minimum"])
def test_maximum_and_minimum_of_a_tie_give_the_first_operand(op):
    """maximum(-0.0, 0.0) is -0.0 in torch (its first operand on a tie): the sign shows in 1 / m."""
    graph = _graph([(2,), (2,)], "float32", lambda b, i: b.op("reciprocal", [b.op(op, [i[0], i[1]])]))
    x, y = torch.tensor([-0.0, 0.0]), torch.tensor([0.0, -0.0])
    got, want, _ = _run(graph, [x.to(DEVICE), y.to(DEVICE)])
    assert torch.equal(got, want) and want.tolist() == [-float("inf"), float("inf")]


def test_a_cast_mid_chain_rounds_to_its_dtype():
    def body(b, i):
        half = b.op("cast", [b.op("mul", [i[0], i[1]])], {"dtype": "float16"})
        return b.op("add", [b.op("cast", [b.op("exp", [half])], {"dtype": "float32"}), i[1]])

    x = _randn((5, 13), "float32", 1) * 3
    y = _randn((5, 13), "float32", 2)
    graph = _graph([(5, 13)] * 2, "float32", body)
    assert graph.nodes[0].regions[0].nodes[1].output.type.dtype == "float16"
    _check(graph, [x, y], "float32")


def test_mixed_input_dtypes_promote_as_torch():
    graph = _graph([(3, 16), (16,)], ["float16", "float32"], lambda b, i: b.op("mul", [b.op("silu", [i[0]]), i[1]]))
    assert graph.outputs[0].type.dtype == "float32"
    _check(graph, [_randn((3, 16), "float16", 3), _randn((16,), "float32", 4)], "float32")


def test_broadcasting_on_several_axes_and_a_transposed_input():
    shapes = [(2, 3, 4, 5), (3, 1, 5), (2, 1, 4, 1), (4, 5)]

    def body(b, i):
        return b.op("add", [b.op("mul", [b.op("add", [i[0], i[1]]), i[2]]), i[3]])

    graph = _graph(shapes, "float32", body)
    inputs = [_randn(s, "float32", k) for k, s in enumerate(shapes)]
    inputs[3] = _randn((5, 4), "float32", 9).t()            # strides (1, 4): read through its strides
    assert not inputs[3].is_contiguous()
    _check(graph, inputs, "float32")


def test_layout_plans_collapse_contiguous_axes():
    graph = _graph([(2, 3, 16), (2, 3, 16), (16,)], "float16", _residual_scale)
    groups, _ = ew.static_layout(graph.nodes[0])
    assert groups == [(0, 1), (2,)]                           # rows x D: the weight repeats along the rows
    same = _graph([(2, 3, 16), (2, 3, 16)], "float16", _gelu_add)
    assert ew.static_layout(same.nodes[0])[0] == [(0, 1, 2)]  # all contiguous: one axis, no index math
    x = torch.randn(2, 3, 16)
    plan = ew.plan_for(same.nodes[0], [(0, 1, 2)], [x, x])
    assert plan.rank == 1 and plan.strides == ((1,), (1,))
    plan = ew.plan_for(same.nodes[0], [(0, 1, 2)], [x, x.transpose(0, 1).contiguous().transpose(0, 1)])
    assert plan.rank == 3                                     # its own plan for a permuted layout


def test_a_symbolic_batch_dim_serves_every_size_with_one_compiled_model():
    graph = _graph([("batch", 24), (24,)], "float32", lambda b, i: b.op("mul", [b.op("gelu", [i[0]]), i[1]]))
    tri = CompiledModel(graph, backends=[TritonBackend(interpret=True), TorchReference()], device=DEVICE)
    ref = CompiledModel(graph, device=DEVICE)
    assert tri.kernels[0].backend == "triton"
    for batch in (1, 3):
        x, w = _randn((batch, 24), "float32", batch), _randn((24,), "float32", 5)
        torch.testing.assert_close(tri(x, w), ref(x, w), rtol=2e-6, atol=1e-6)


def test_swiglu_keeps_its_kernel_and_a_broadcast_up_gets_the_generated_one():
    def swiglu(b, i):
        return b.op("mul", [b.op("silu", [i[0]]), i[1]])

    exact = _graph([(4, 32), (4, 32)], "float16", swiglu, kind="swiglu")
    broadcast = _graph([(4, 32), (32,)], "float16", swiglu, kind="swiglu")
    assert TritonBackend(interpret=True).claim(exact.nodes[0], "cuda").detail == "swiglu"
    assert TritonBackend(interpret=True).claim(broadcast.nodes[0], "cuda").detail == "elementwise"
    _check(broadcast, [_randn((4, 32), "float16", 1), _randn((32,), "float16", 2)], "float16")


def test_unsupported_regions_are_not_claimed():
    backend = TritonBackend(interpret=True)
    ints = _graph([(4, 8), (4, 8)], "int32", lambda b, i: b.op("add", [b.op("mul", [i[0], i[1]]), i[1]]))
    symbolic = _graph([("n", 8)], "float32", lambda b, i: b.op("mul", [b.op("exp", [i[0]]), None], {"scalar": "n"}))
    scalar_max = _graph([(4, 8)], "float32", lambda b, i: b.op("maximum", [b.op("exp", [i[0]]), None], {"scalar": 1}))
    tensor_pow = _graph([(4, 8), (4, 8)], "float32", lambda b, i: b.op("pow", [b.op("exp", [i[0]]), i[1]]))
    for graph, why in ((ints, "non-float"), (symbolic, "non-numeric scalar"), (tensor_pow, "'pow'"),
                       (scalar_max, "tensors only")):
        assert backend.claim(graph.nodes[0], "cuda") is None
        assert why in ew.unsupported(graph.nodes[0])


def test_the_kernel_source_is_cached_by_its_hash(tmp_path, monkeypatch):
    graph = _graph([(4, 8), (4, 8)], "float32", _gelu_add)
    region = graph.nodes[0].regions[0]
    fn = ew.kernel_for(region, 1)
    assert ew.kernel_for(region, 1) is fn and ew.kernel_for(region, 2) is not fn
    source = ew.source_of(fn)
    name = getattr(fn, "fn", fn).__module__
    assert name.startswith(ew.MODULE_PREFIX) and source == ew.kernel_source(region, 1)
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))        # a fresh machine: rebuilt from the source alone
    monkeypatch.delitem(__import__("sys").modules, name)
    module = ew.generated_module(name, source)
    assert (tmp_path / "triton_elementwise" / f"{name}.py").read_text() == source
    assert module.elementwise_kernel.arg_names == fn.arg_names
    with pytest.raises(lmforge.errors.LmforgeError, match="does not hash"):
        ew.generated_module(ew.MODULE_PREFIX + "0" * 20, source)


class GatedResidual(torch.nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.g = torch.nn.Parameter(torch.randn(d))

    def forward(self, x, residual):
        return torch.nn.functional.gelu(x, approximate="tanh") * self.g + residual


def test_a_compiled_model_runs_its_fused_region_on_triton():
    torch.manual_seed(0)
    model = GatedResidual().eval()
    x, r = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    compiled = lmforge.compile(model, (x, r), dynamic={"x": {0: "batch"}, "residual": {0: "batch"}})
    tri = CompiledModel(compiled.graph, backends=[TritonBackend(interpret=True), TorchReference()], device=DEVICE)
    fused = [k for n, k in zip(compiled.graph.nodes, tri.kernels) if n.op == "fused"]
    assert fused and all(k.backend == "triton" for k in fused)
    for batch in (2, 3):
        x, r = torch.randn(batch, 5, 32), torch.randn(batch, 5, 32)
        with torch.no_grad():
            want = model(x, r)
        torch.testing.assert_close(tri(x.to(DEVICE), r.to(DEVICE)).cpu(), want, rtol=2e-6, atol=2e-6)


def test_neg_flips_the_sign_of_zero():
    """neg(0.0) is -0.0 (1 / neg(x) = -inf): the kernel multiplies by -1, since Triton 3.6 writes unary minus as
    0 - x, which gives +0.0."""
    graph = _graph([(2,)], "float32", lambda b, i: b.op("reciprocal", [b.op("neg", [i[0]])]))
    got, want, _ = _run(graph, [torch.tensor([0.0, -0.0]).to(DEVICE)])
    assert torch.equal(got, want) and want.tolist() == [-float("inf"), float("inf")]
