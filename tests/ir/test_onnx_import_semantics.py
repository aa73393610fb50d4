"""ONNX import keeps each op's exact ONNX semantics, or refuses it: models built by hand with onnx.helper are
imported with `lmforge.capture`, compiled, run, and compared with onnxruntime (exact for ints and bools).

Covered: opset <= 12 Softmax/LogSoftmax/Hardmax (2-D coercion at `axis`), Split sizes (attribute, input,
num_outputs), integer Div (truncation) and Pow (stays integer), ArgMax/ArgMin `select_last_index`, negative
Gather indices, negative / out-of-range Slice bounds, Erf (and the exact GELU built on it), Clip; and the
findings of the import audit (section 8): Flatten axes, scalar shortcuts of Compare/Where, folding in the
constants' dtype, float Range, Dropout masks, broadcasting norm scales, and clear errors for what is refused;
and the second audit (section 9): Squeeze/Unsqueeze axes, dtypes of Where and ReduceSum, integer Div over
sizes, opset 9 Slice, Gemm's broadcast C, and `capture` of an ONNX model without example inputs.
"""
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh

import lmforge
from lmforge.errors import CaptureError, UnsupportedOpError

ort = pytest.importorskip("onnxruntime")

F32, I64, I32 = TP.FLOAT, TP.INT64, TP.INT32
RNG = np.random.default_rng(0)


def vi(name, dtype, shape):
    return h.make_tensor_value_info(name, dtype, shape)


def model(nodes, inputs, outputs, inits=(), opset=17):
    m = h.make_model(h.make_graph(nodes, "g", inputs, outputs, initializer=list(inits)),
                     opset_imports=[h.make_opsetid("", opset)])
    m.ir_version = 8
    if all(o.type.tensor_type.HasField("shape") for o in outputs):  # the checker wants declared output shapes
        onnx.checker.check_model(m)
    return m


def const(name, values, dtype=np.int64):
    return nh.from_array(np.array(values, dtype), name)


def run_both(m, feeds):
    """(lmforge outputs, onnxruntime outputs) for `feeds` (name -> numpy array, in input order)."""
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = lmforge.compile(lmforge.capture(m, None))(*[torch.from_numpy(v) for v in feeds.values()])
    return (list(got) if isinstance(got, (tuple, list)) else [got]), want


def check(m, feeds, atol=1e-6, rtol=1e-5):
    got, want = run_both(m, feeds)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        w = torch.from_numpy(np.asarray(w))
        assert g.dtype == w.dtype and tuple(g.shape) == tuple(w.shape), (g.dtype, w.dtype, g.shape, w.shape)
        if w.dtype.is_floating_point:
            torch.testing.assert_close(g, w, atol=atol, rtol=rtol)
        else:
            assert torch.equal(g, w), (g, w)


def randn(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


# ---- 1. Softmax / LogSoftmax / Hardmax: opset <= 12 coerces to 2-D at `axis` ------------------------------

@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax", "Hardmax"])
@pytest.mark.parametrize("opset", [11, 12, 13])
@pytest.mark.parametrize("axis", [None, 0, 1, -1, -2])
def test_softmax_family_follows_the_opset_semantics(op, opset, axis):
    attrs = {} if axis is None else {"axis": axis}
    m = model([h.make_node(op, ["x"], ["y"], **attrs)], [vi("x", F32, [2, 3, 4])], [vi("y", F32, [2, 3, 4])],
              opset=opset)
    x = randn(2, 3, 4)
    x[0, 1, :2] = 5.0  # a tie: Hardmax keeps the first maximum
    check(m, {"x": x})


@pytest.mark.parametrize("op", ["Softmax", "Hardmax"])
def test_opset11_softmax_coerces_symbolic_dims(op):
    m = model([h.make_node(op, ["x"], ["y"], axis=1)], [vi("x", F32, ["b", 3, "s"])], [vi("y", F32, ["b", 3, "s"])],
              opset=11)
    for b, s in ((2, 4), (1, 5)):
        check(m, {"x": randn(b, 3, s)})


# ---- 2. Split: sizes from the attribute (opset <= 12), input #2, num_outputs (18) ------------------------

def test_split_opset11_reads_the_split_attribute():
    m = model([h.make_node("Split", ["x"], ["a", "b"], axis=-1, split=[1, 3])], [vi("x", F32, [2, 3, 4])],
              [vi("a", F32, [2, 3, 1]), vi("b", F32, [2, 3, 3])], opset=11)
    check(m, {"x": randn(2, 3, 4)})


def test_split_opset13_input_and_equal_parts():
    m = model([h.make_node("Split", ["x", "s"], ["a", "b"], axis=1), h.make_node("Split", ["x"], ["c", "d"], axis=0)],
              [vi("x", F32, [4, 5])], [vi(n, F32, None) for n in "abcd"], [const("s", [4, 1])], opset=13)
    check(m, {"x": randn(4, 5)})


def test_split_opset18_num_outputs_makes_the_last_chunk_smaller():
    m = model([h.make_node("Split", ["x"], ["a", "b", "c"], axis=1, num_outputs=3)], [vi("x", F32, [2, 5])],
              [vi(n, F32, None) for n in "abc"], opset=18)
    check(m, {"x": randn(2, 5)})


def test_split_of_a_symbolic_dim_into_equal_parts():
    m = model([h.make_node("Split", ["x"], ["a", "b"], axis=0)], [vi("x", F32, ["n", 3])],
              [vi("a", F32, None), vi("b", F32, None)], opset=13)
    for n in (2, 6):
        check(m, {"x": randn(n, 3)})


def test_split_sizes_that_do_not_fit_are_refused():
    m = model([h.make_node("Split", ["x"], ["a", "b"], axis=1, split=[1, 2])], [vi("x", F32, [2, 4])],
              [vi("a", F32, None), vi("b", F32, None)], opset=11)
    with pytest.raises(CaptureError, match="do not partition"):
        lmforge.capture(m, None)


# ---- 3. integer Div truncates, integer Pow stays integer ------------------------------------------------

@pytest.mark.parametrize("dtype", [np.int64, np.int32])
def test_integer_div_truncates_toward_zero(dtype):
    t = TP.INT64 if dtype == np.int64 else TP.INT32
    m = model([h.make_node("Div", ["a", "b"], ["y"]), h.make_node("Div", ["a", "two"], ["z"]),
               h.make_node("Div", ["seven", "b"], ["w"])],
              [vi("a", t, [6]), vi("b", t, [6])], [vi("y", t, [6]), vi("z", t, [6]), vi("w", t, [6])],
              [const("two", -2, dtype), const("seven", -7, dtype)])
    check(m, {"a": np.array([7, -7, 9, 1, -1, 0], dtype), "b": np.array([2, 2, -4, 3, 3, -5], dtype)})


def test_integer_div_of_constants_folds_with_truncation():
    m = model([h.make_node("Div", ["p", "q"], ["y"])], [], [vi("y", I64, [4])],
              [const("p", [7, -7, 7, -7]), const("q", [2, 2, -2, -2])])
    check(m, {})


def test_integer_pow_keeps_the_integer_dtype():
    """The result has the base's dtype, whatever the exponent's (a float 2.0, an int64 tensor on an int32 base)."""
    n = h.make_node
    m = model([n("Pow", ["x", "two"], ["y"]), n("Pow", ["x", "e"], ["z"]), n("Pow", ["f", "two"], ["w"]),
               n("Pow", ["x", "ftwo"], ["v"]), n("Pow", ["i", "e"], ["u"])],
              [vi("x", I64, [4]), vi("e", I64, [4]), vi("f", F32, [4]), vi("i", I32, [4])],
              [vi("y", I64, [4]), vi("z", I64, [4]), vi("w", F32, [4]), vi("v", I64, [4]), vi("u", I32, [4])],
              [const("two", 2), const("ftwo", 2.0, np.float32)])
    check(m, {"x": np.array([1, 2, 3, -4]), "e": np.array([0, 3, 2, 3]), "f": randn(4),
              "i": np.array([5, -2, 3, 7], np.int32)})


def test_integer_pow_that_cannot_stay_integer_is_refused():
    neg = model([h.make_node("Pow", ["x", "e"], ["y"])], [vi("x", I64, [4])], [vi("y", I64, [4])], [const("e", -1)])
    with pytest.raises(UnsupportedOpError, match="integer"):
        lmforge.capture(neg, None)
    flt = model([h.make_node("Pow", ["x", "e"], ["y"])], [vi("x", I64, [4]), vi("e", F32, [4])], [vi("y", I64, [4])])
    with pytest.raises(UnsupportedOpError, match="integer"):
        lmforge.capture(flt, None)


# ---- 4. ArgMax / ArgMin select_last_index -----------------------------------------------------------------

@pytest.mark.parametrize("op", ["ArgMax", "ArgMin"])
@pytest.mark.parametrize("last", [0, 1])
@pytest.mark.parametrize("axis,keepdims", [(1, 0), (0, 1), (-1, 1)])
def test_arg_extremes_honour_select_last_index(op, last, axis, keepdims):
    m = model([h.make_node(op, ["x"], ["y"], axis=axis, keepdims=keepdims, select_last_index=last),
               h.make_node(op, ["i"], ["j"], axis=axis, keepdims=keepdims, select_last_index=last)],
              [vi("x", F32, [3, 4]), vi("i", I64, [3, 4])], [vi("y", I64, None), vi("j", I64, None)])
    x = np.array([[1, 3, 3, 0], [2, 2, 1, 0], [0, 0, 5, 5]], np.float32)
    i = np.array([[-2**63, 3, 2**63 - 1, -2**63], [2, 2, 1, 1], [0, 0, 0, 0]], np.int64)
    check(m, {"x": x, "i": i})


def test_argmax_last_index_over_a_symbolic_dim():
    m = model([h.make_node("ArgMax", ["x"], ["y"], axis=1, keepdims=0, select_last_index=1)],
              [vi("x", F32, [2, "n"])], [vi("y", I64, [2])])
    for n in (3, 5):
        check(m, {"x": np.floor(randn(2, n))})


# ---- 5. Gather with negative indices ----------------------------------------------------------------------

def test_gather_normalizes_negative_constant_indices():
    m = model([h.make_node("Gather", ["x", "i"], ["y"], axis=1), h.make_node("Gather", ["x", "i2"], ["z"], axis=-1),
               h.make_node("Gather", ["x", "i0"], ["w"], axis=1)],
              [vi("x", F32, [2, 3, 4])], [vi(n, F32, None) for n in "yzw"],
              [const("i", [-1, 0]), const("i2", [[-4, 3], [-1, -2]]), const("i0", -3)])
    check(m, {"x": randn(2, 3, 4)})


def test_gather_negative_constant_index_on_a_symbolic_dim():
    m = model([h.make_node("Gather", ["x", "i"], ["y"], axis=1), h.make_node("Gather", ["x", "i0"], ["z"], axis=1)],
              [vi("x", F32, [2, "n"])], [vi("y", F32, None), vi("z", F32, None)],
              [const("i", [-1, 0, -2]), const("i0", -1)])
    for n in (3, 5):
        check(m, {"x": randn(2, n)})


def test_gather_negative_run_time_indices():
    m = model([h.make_node("Gather", ["x", "i"], ["y"], axis=1)], [vi("x", F32, [2, "n", 4]), vi("i", I64, [2, 2])],
              [vi("y", F32, None)])
    check(m, {"x": randn(2, 3, 4), "i": np.array([[-1, 0], [2, -3]])})
    check(m, {"x": randn(2, 5, 4), "i": np.array([[-5, 4], [-1, 1]])})


def test_gather_constant_index_out_of_range_is_refused():
    m = model([h.make_node("Gather", ["x", "i"], ["y"], axis=1)], [vi("x", F32, [2, 3])], [vi("y", F32, None)],
              [const("i", [0, -4])])
    with pytest.raises(CaptureError, match="out of range"):
        lmforge.capture(m, None)


# ---- 6. Slice with negative / out-of-range bounds -------------------------------------------------------

@pytest.mark.parametrize("start,end", [(-2, 2**63 - 1), (0, -1), (-10, 2), (1, 2**31 - 1), (-3, -1), (5, 9),
                                       (-1, -3), (2, 100)])
def test_slice_of_a_static_dim_normalizes_negative_bounds(start, end):
    m = model([h.make_node("Slice", ["x", "st", "en", "ax"], ["y"])], [vi("x", F32, [2, 7])], [vi("y", F32, None)],
              [const("st", [start]), const("en", [end]), const("ax", [1])])
    graph = lmforge.capture(m, None)
    want = len(range(*slice(start, end).indices(7)))
    assert graph.outputs[0].type.shape == (2, want)  # a correct static shape, not one built from raw bounds
    check(m, {"x": randn(2, 7)})


@pytest.mark.parametrize("start,end", [(-2, 2**63 - 1), (0, -1), (-3, -1), (1, 2**31 - 1)])
def test_slice_of_a_symbolic_dim_with_negative_bounds_runs_right(start, end):
    m = model([h.make_node("Slice", ["x", "st", "en", "ax"], ["y"])], [vi("x", F32, ["b", "s"])],
              [vi("y", F32, None)], [const("st", [start]), const("en", [end]), const("ax", [1])])
    for s in (4, 7):
        check(m, {"x": randn(3, s)})


# ---- 7. Erf, the exact GELU built on it, Clip -------------------------------------------------------------

def test_erf_runs_as_a_torch_fallback():
    m = model([h.make_node("Erf", ["x"], ["y"])], [vi("x", F32, [2, 3])], [vi("y", F32, [2, 3])])
    assert [n.op for n in lmforge.capture(m, None).nodes] == ["torch_fallback"]
    check(m, {"x": randn(2, 3)})


def _gelu_nodes(grouping):
    n = h.make_node
    first = [n("Div", ["x", "r2"], ["d"]), n("Erf", ["d"], ["e"]), n("Add", ["e", "one"], ["a"])]
    if grouping == "x*a*half":  # what torch.onnx.export writes for nn.GELU()
        return first + [n("Mul", ["x", "a"], ["m"]), n("Mul", ["m", "half"], ["y"])]
    return first + [n("Mul", ["half", "x"], ["m"]), n("Mul", ["a", "m"], ["y"])]


@pytest.mark.parametrize("grouping", ["x*a*half", "half*x*a"])
def test_exact_gelu_written_with_erf_becomes_gelu(grouping):
    inits = [nh.from_array(np.array(np.sqrt(2.0), np.float32), "r2"), nh.from_array(np.array(1.0, np.float32), "one"),
             nh.from_array(np.array(0.5, np.float32), "half")]
    m = model(_gelu_nodes(grouping), [vi("x", F32, ["b", 4])], [vi("y", F32, ["b", 4])], inits)
    compiled = lmforge.compile(lmforge.capture(m, None))
    ops = {n.op for n in compiled.graph.nodes}
    assert "gelu" in ops and "torch_fallback" not in ops, ops
    check(m, {"x": randn(3, 4) * 3})


def test_erf_that_is_not_a_gelu_stays_erf():
    inits = [nh.from_array(np.array(1.5, np.float32), "r2"), nh.from_array(np.array(1.0, np.float32), "one"),
             nh.from_array(np.array(0.5, np.float32), "half")]  # x / 1.5: not the GELU constant
    m = model(_gelu_nodes("x*a*half"), [vi("x", F32, [2, 4])], [vi("y", F32, [2, 4])], inits)
    assert "gelu" not in {n.op for n in lmforge.capture(m, None).nodes}
    check(m, {"x": randn(2, 4)})


def test_clip_with_input_bounds_opset13():
    inits = [nh.from_array(np.array(-0.5, np.float32), "lo"), nh.from_array(np.array(0.5, np.float32), "hi"),
             const("ilo", 0), const("ihi", 3)]
    n = h.make_node
    m = model([n("Clip", ["x", "lo", "hi"], ["y"]), n("Clip", ["x", "", "hi"], ["z"]), n("Clip", ["x"], ["w"]),
               n("Clip", ["x", "hi", "lo"], ["v"]), n("Clip", ["i", "ilo", "ihi"], ["j"]),
               n("Max", ["x", "lo"], ["u"])],
              [vi("x", F32, [2, 3, 4]), vi("i", I64, [5])], [vi(k, F32, None) for k in "yzwvu"][:4] +
              [vi("j", I64, None), vi("u", F32, None)], inits, opset=13)
    check(m, {"x": randn(2, 3, 4), "i": np.array([-2, 0, 2, 3, 9])})


def test_clip_with_attribute_bounds_opset6():
    m = model([h.make_node("Clip", ["x"], ["y"], min=-0.25, max=0.75), h.make_node("Clip", ["x"], ["z"], max=0.0)],
              [vi("x", F32, [3, 4])], [vi("y", F32, [3, 4]), vi("z", F32, [3, 4])], opset=6)
    check(m, {"x": randn(3, 4)})


def test_slice_of_a_symbolic_dim_keeps_a_right_shape_for_shape_arithmetic():
    """x[:, -2:] of a symbolic dim is 2 wide: Shape(y) read at import (Expand to it) must say so."""
    n = h.make_node
    m = model([n("Slice", ["x", "st", "en", "ax"], ["y"]), n("Shape", ["y"], ["sh"]), n("Expand", ["one", "sh"], ["e"]),
               n("Add", ["y", "e"], ["z"]), n("Slice", ["x", "zero", "m1", "ax"], ["w"])],
              [vi("x", F32, ["b", "s"])], [vi("z", F32, ["b", 2]), vi("w", F32, ["b", None])],
              [const("st", [-2]), const("en", [2**63 - 1]), const("ax", [1]), const("zero", [0]), const("m1", [-1]),
               nh.from_array(np.array(1.0, np.float32), "one")])
    graph = lmforge.capture(m, None)
    assert [o.type.shape for o in graph.outputs] == [("b", 2), ("b", "s - 1")]
    for s in (3, 7):
        check(m, {"x": randn(2, s)})


# ---- 8. Findings of the ONNX import audit ----------------------------------------------------------------

@pytest.mark.parametrize("axis", [-3, -2, -1, 0, 1, 3])
def test_flatten_counts_a_negative_axis_from_the_back(axis):
    m = model([h.make_node("Flatten", ["x"], ["y"], axis=axis)], [vi("x", F32, [2, 3, 4])], [vi("y", F32, None)],
              opset=13)
    check(m, {"x": randn(2, 3, 4)})


@pytest.mark.parametrize("op", ["Less", "Equal", "GreaterOrEqual"])
@pytest.mark.parametrize("c_shape", [[], [1], [1, 1], [1, 1, 1]])
def test_compare_with_a_constant_of_higher_rank_broadcasts_up(op, c_shape):
    c = nh.from_array(np.zeros(c_shape, np.float32), "c")
    m = model([h.make_node(op, ["x", "c"], ["y"])], [vi("x", F32, [3])], [vi("y", TP.BOOL, None)], [c], opset=13)
    check(m, {"x": np.array([-1, 0, 1], np.float32)})


@pytest.mark.parametrize("a_shape,b_shape", [([1, 1], None), (None, [1, 1]), ([1, 1], [1, 1, 1]), ([1], [])])
def test_where_with_a_constant_of_higher_rank_broadcasts_up(a_shape, b_shape):
    """A branch with a shape is a size-1 constant, None a [3] input; the output takes the largest rank."""
    inits, inputs, feeds = [], [vi("k", TP.BOOL, [3])], {"k": np.array([True, False, True])}
    for name, shape in (("a", a_shape), ("b", b_shape)):
        if shape is None:
            inputs.append(vi(name, F32, [3]))
            feeds[name] = randn(3)
        else:
            inits.append(nh.from_array(np.full(shape, 2.0 if name == "a" else -2.0, np.float32), name))
    m = model([h.make_node("Where", ["k", "a", "b"], ["y"])], inputs, [vi("y", F32, None)], inits, opset=13)
    check(m, feeds)


@pytest.mark.parametrize("noop,keepdims", [(1, 1), (0, 1), (0, 0)])
def test_reduce_logsumexp_without_axes_honours_noop_with_empty_axes(noop, keepdims):
    m = model([h.make_node("ReduceLogSumExp", ["x"], ["y"], noop_with_empty_axes=noop, keepdims=keepdims)],
              [vi("x", F32, [2, 3])], [vi("y", F32, None)], opset=18)
    check(m, {"x": randn(2, 3)})


def test_integer_reduce_mean_is_refused_at_import():
    m = model([h.make_node("ReduceMean", ["x", "ax"], ["y"])], [vi("x", I64, [2, 3])], [vi("y", I64, None)],
              [const("ax", [1])], opset=18)
    with pytest.raises(UnsupportedOpError, match="ReduceMean of int64 values"):
        lmforge.capture(m, None)


def _float_range_to_n(start, step):
    """Range(start, float(N), step) with N a symbolic dim of x: not folded at import."""
    n = h.make_node
    nodes = [n("Shape", ["x"], ["sh"]), n("Gather", ["sh", "i0"], ["d"]), n("Cast", ["d"], ["df"], to=F32),
             n("Range", ["s", "df", "st"], ["y"])]
    inits = [const("i0", 0), nh.from_array(np.array(start, np.float32), "s"),
             nh.from_array(np.array(step, np.float32), "st")]
    return model(nodes, [vi("x", F32, ["N"])], [vi("y", F32, None)], inits)


@pytest.mark.parametrize("start,step", [(0.0, 1.0), (1.0, 2.0), (-3.0, 1.0)])
def test_float_range_over_a_symbolic_bound(start, step):
    m = _float_range_to_n(start, step)
    for n in (5, 8):
        check(m, {"x": np.zeros(n, np.float32)})


@pytest.mark.parametrize("start,step", [(0.5, 1.0), (0.0, 0.5)])
def test_float_range_over_a_symbolic_bound_with_a_fractional_start_or_step_is_refused(start, step):
    with pytest.raises(UnsupportedOpError, match="whole-number start and step"):
        lmforge.capture(_float_range_to_n(start, step), None)


@pytest.mark.parametrize("limit,step", [(5000.5, 1.0), (-5000.5, -1.0), (5000.0, 1.0)])
def test_float_range_too_long_to_fold_with_a_fractional_limit(limit, step):
    """Past FOLD_LIMIT elements Range is an arange node; a limit of 5000.5 still includes 5000."""
    m = model([h.make_node("Range", ["s", "l", "d"], ["r"]), h.make_node("Add", ["x", "r"], ["y"])],
              [vi("x", F32, [1])], [vi("y", F32, None)],
              [nh.from_array(np.array(v, np.float32), k) for k, v in (("s", 0.0), ("l", limit), ("d", step))])
    check(m, {"x": np.zeros(1, np.float32)})


def test_constant_float32_arithmetic_is_folded_in_float32():
    """Folded at import, Mul/Add/Sub/Div of float32 constants round to float32 at each step, as onnxruntime's:
    Cast(0.7f * 10f) is 7 (float64 says 6.99..., cast to 6) and (1e8f + 1f) - 1e8f is 0 (float64 says 1)."""
    n = h.make_node
    nodes = [n("Mul", ["a", "ten"], ["p"]), n("Cast", ["p"], ["pi"], to=I64), n("Add", ["i", "pi"], ["y"]),
             n("Add", ["big", "one"], ["q"]), n("Sub", ["q", "big"], ["r"]), n("Div", ["one", "three"], ["t"]),
             n("Mul", ["t", "three"], ["u"]), n("Sub", ["u", "one"], ["w"]), n("Concat", ["r", "w"], ["c"], axis=0),
             n("Mul", ["x", "c"], ["z"])]
    f32 = {"a": 0.7, "ten": 10.0, "big": 1e8, "one": 1.0, "three": 3.0}
    inits = [nh.from_array(np.array([v], np.float32), k) for k, v in f32.items()]
    m = model(nodes, [vi("i", I64, [1]), vi("x", F32, [2])], [vi("y", I64, None), vi("z", F32, None)], inits)
    check(m, {"i": np.zeros(1, np.int64), "x": np.full(2, 1e8, np.float32)}, atol=0, rtol=0)


def test_constant_integer_arithmetic_wraps_in_its_own_dtype():
    inits = [nh.from_array(np.array([2**31 - 1, -7], np.int32), "a"), nh.from_array(np.array([1, 2], np.int32), "b")]
    m = model([h.make_node("Add", ["a", "b"], ["s"]), h.make_node("Div", ["s", "b"], ["d"]),
               h.make_node("Add", ["x", "d"], ["y"])],
              [vi("x", I32, [2])], [vi("y", I32, None)], inits)
    check(m, {"x": np.zeros(2, np.int32)})


@pytest.mark.parametrize("op,outputs", [("Trilu", ["y"]), ("TopK", ["y", "i"])])
def test_a_run_time_k_is_refused_naming_the_op(op, outputs):
    k = vi("k", I64, [] if op == "Trilu" else [1])
    m = model([h.make_node(op, ["x", "k"], outputs)], [vi("x", F32, [2, 3, 4]), k],
              [vi(o, F32 if o == "y" else I64, None) for o in outputs], opset=14)
    with pytest.raises(UnsupportedOpError, match=f"{op}.* 'k' computed at run time"):
        lmforge.capture(m, None)


@pytest.mark.parametrize("inputs", [["x"], ["x", "ratio"], ["x", "ratio", "off"]])
def test_dropout_mask_output_is_all_true_at_inference(inputs):
    inits = [nh.from_array(np.array(0.3, np.float32), "ratio"), nh.from_array(np.array(False), "off")]
    m = model([h.make_node("Dropout", inputs, ["y", "mask"])], [vi("x", F32, ["b", 3])],
              [vi("y", F32, None), vi("mask", TP.BOOL, None)], inits, opset=13)
    for b in (1, 4):
        check(m, {"x": randn(b, 3)})


def test_dropout_in_training_mode_is_refused():
    m = model([h.make_node("Dropout", ["x", "", "on"], ["y"])], [vi("x", F32, [3])], [vi("y", F32, None)],
              [nh.from_array(np.array(True), "on")], opset=13)
    with pytest.raises(UnsupportedOpError, match="training_mode"):
        lmforge.capture(m, None)


@pytest.mark.parametrize("op,opset", [("LayerNormalization", 17), ("RMSNormalization", 23)])
@pytest.mark.parametrize("scale_shape,bias_shape", [([4], [4]), ([1, 4], None), ([3, 1], [1]), ([3, 4], [4])])
def test_normalization_scale_and_bias_that_broadcast_to_the_normalized_dims(op, opset, scale_shape, bias_shape):
    """scale [4] with axis=1 on [2, 3, 4] broadcasts to the normalized dims [3, 4] (onnxruntime accepts it)."""
    if op == "RMSNormalization" and "RMSNormalization" not in {s.name for s in onnx.defs.get_all_schemas()}:
        pytest.skip("this onnx has no RMSNormalization")
    inits = [nh.from_array(randn(*scale_shape), "s")]
    if bias_shape is not None and op == "LayerNormalization":
        inits.append(nh.from_array(randn(*bias_shape), "b"))
    m = model([h.make_node(op, ["x"] + [t.name for t in inits], ["y"], axis=1)], [vi("x", F32, [2, 3, 4])],
              [vi("y", F32, None)], inits, opset=opset)
    try:
        ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as e:  # an onnxruntime without this op or opset: nothing to compare with
        pytest.skip(f"onnxruntime cannot run it: {e}")
    check(m, {"x": randn(2, 3, 4)}, atol=1e-5)


def test_normalization_scale_that_does_not_broadcast_is_refused():
    m = model([h.make_node("LayerNormalization", ["x", "s"], ["y"], axis=1)], [vi("x", F32, [2, 3, 4])],
              [vi("y", F32, None)], [nh.from_array(np.ones(3, np.float32), "s")], opset=17)
    with pytest.raises(CaptureError, match="does not broadcast to the normalized dims"):
        lmforge.capture(m, None)


def test_layernorm_scale_given_at_run_time_is_expanded():
    m = model([h.make_node("LayerNormalization", ["x", "s"], ["y"], axis=-2)], [vi("x", F32, [2, 3, 4]),
                                                                               vi("s", F32, [4])],
              [vi("y", F32, None)], opset=17)
    check(m, {"x": randn(2, 3, 4), "s": randn(4)}, atol=1e-5)


def test_gather_of_an_embedding_table_takes_negative_run_time_ids():
    table = nh.from_array(np.arange(15, dtype=np.float32).reshape(5, 3), "t")
    m = model([h.make_node("Gather", ["t", "i"], ["y"])], [vi("i", I64, ["b", "s"])], [vi("y", F32, None)], [table])
    assert "embedding" in {n.op for n in lmforge.capture(m, None).nodes}
    check(m, {"i": np.array([[0, -1, 4], [-5, 2, -2]])})


def test_external_data_that_was_not_loaded_is_refused_and_never_read_from_the_cwd(tmp_path, monkeypatch):
    m = model([h.make_node("Add", ["x", "c"], ["y"])], [vi("x", F32, [4])], [vi("y", F32, [4])],
              [nh.from_array(np.ones(4, np.float32), "c")])
    (tmp_path / "model").mkdir()
    onnx.save_model(m, str(tmp_path / "model" / "m.onnx"), save_as_external_data=True, location="m.data",
                    size_threshold=0)
    unloaded = onnx.load(str(tmp_path / "model" / "m.onnx"), load_external_data=False)
    (tmp_path / "m.data").write_bytes(np.full(4, 7, np.float32).tobytes())  # a same-named decoy in the cwd
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CaptureError, match="external file 'm.data', which was not loaded"):
        lmforge.capture(unloaded, None)
    check(onnx.load(str(tmp_path / "model" / "m.onnx")), {"x": randn(4)})  # loaded with its data: fine


def test_a_raw_index_or_type_error_in_a_handler_names_the_node(monkeypatch):
    from lmforge.ir.frontends import onnx_import

    def broken(im, node):
        return [][0]

    monkeypatch.setitem(onnx_import._HANDLERS, "Relu", broken)
    m = model([h.make_node("Relu", ["x"], ["y"], name="the_relu")], [vi("x", F32, [4])], [vi("y", F32, [4])])
    with pytest.raises(CaptureError, match=r"ONNX node the_relu \(Relu\) could not be imported: list index"):
        lmforge.capture(m, None)


@pytest.mark.parametrize("largest", [1, 0])
def test_topk_ties_come_back_lowest_index_first(largest):
    m = model([h.make_node("TopK", ["x", "k"], ["v", "i"], axis=-1, largest=largest)], [vi("x", F32, [2, 6])],
              [vi("v", F32, None), vi("i", I64, None)], [const("k", [3])], opset=11)
    check(m, {"x": np.array([[3, 1, 3, 2, 1, 3], [1, 1, 1, 1, 1, 1]], np.float32)})


# ---- 9. the second import audit: run-time axes, dtypes kept, truncation over sizes, old opsets ------------

@pytest.mark.parametrize("op,shape", [("Unsqueeze", ["n", 6]), ("Squeeze", ["n", 1, 1, 6])])
def test_squeeze_and_unsqueeze_with_run_time_axes_are_refused(op, shape):
    m = model([h.make_node(op, ["x", "axes"], ["y"])], [vi("x", F32, shape), vi("axes", I64, [1])],
              [vi("y", F32, None)], opset=13)
    with pytest.raises(UnsupportedOpError, match="'axes' .*computed from run-time values"):
        lmforge.capture(m, None)


def test_squeeze_without_axes_on_symbolic_dims_is_refused():
    """A symbolic dim may be 1 at run time, so which dims go is unknown at import."""
    m = model([h.make_node("Squeeze", ["x"], ["y"])], [vi("x", F32, ["n", 1, 6])], [vi("y", F32, None)], opset=13)
    with pytest.raises(UnsupportedOpError, match="Squeeze without axes .*symbolic dims"):
        lmforge.capture(m, None)


def test_squeeze_without_axes_on_static_dims_drops_the_ones():
    m = model([h.make_node("Squeeze", ["x"], ["y"])], [vi("x", F32, [1, 3, 1, 2])], [vi("y", F32, None)], opset=13)
    check(m, {"x": randn(1, 3, 1, 2)})


@pytest.mark.parametrize("dtype", [np.float16, np.int32, np.int64, np.float32, np.float64])
def test_where_of_two_constants_keeps_their_dtype(dtype):
    m = model([h.make_node("Greater", ["x", "zero"], ["c"]), h.make_node("Where", ["c", "a", "b"], ["y"])],
              [vi("x", F32, ["n", 6])], [vi("y", onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), None)],
              [nh.from_array(np.float32(0), "zero"), const("a", 1.1, dtype), const("b", -2.7, dtype)])
    check(m, {"x": randn(3, 6)})


@pytest.mark.parametrize("op", ["ReduceSum", "ReduceMax"])
@pytest.mark.parametrize("dtype,keepdims", [("int32", 0), ("int32", 1), ("int64", 0)])
def test_integer_reductions_keep_the_input_dtype(op, dtype, keepdims):
    """ONNX reduces in the input's type; torch.sum of int32 alone would give int64."""
    dtype = {"int32": I32, "int64": I64}[dtype]
    m = model([h.make_node("Cast", ["x"], ["i"], to=dtype), h.make_node(op, ["i", "axes"], ["y"], keepdims=keepdims)],
              [vi("x", F32, ["n", 6])], [vi("y", dtype, None)], [const("axes", [1])], opset=18)
    check(m, {"x": randn(3, 6) * 10})


@pytest.mark.parametrize("num,den", [("one", "n"), ("n", "minus_two"), ("one_minus_n", "two")])
def test_integer_div_over_sizes_truncates_toward_zero(num, den):
    """(1 - n) / 2 is -1 for n = 4 in ONNX (truncation), not -2 (floor): only sizes >= 0 fold as `//`."""
    nodes = [h.make_node("Shape", ["x"], ["s"]), h.make_node("Gather", ["s", "zero"], ["n"]),
             h.make_node("Sub", ["one", "n"], ["one_minus_n"]), h.make_node("Div", [num, den], ["q"]),
             h.make_node("Cast", ["q"], ["y"], to=F32)]
    inits = [const("zero", 0), const("one", 1), const("two", 2), const("minus_two", -2)]
    m = model(nodes, [vi("x", F32, ["n", 6])], [vi("y", F32, None)], [c for c in inits if c.name != "minus_two" or
                                                                       den == "minus_two"])
    for n in (1, 4, 5):
        check(m, {"x": randn(n, 6)})


def test_integer_div_of_sizes_still_folds_into_a_shape():
    nodes = [h.make_node("Shape", ["x"], ["s"]), h.make_node("Gather", ["s", "zero"], ["n"]),
             h.make_node("Div", ["n", "two"], ["half"]),
             h.make_node("Concat", ["half", "minus_one"], ["shape"], axis=0),
             h.make_node("Reshape", ["x", "shape"], ["y"])]
    m = model(nodes, [vi("x", F32, ["n", 6])], [vi("y", F32, None)],
              [const("zero", [0]), const("two", [2]), const("minus_one", [-1])])
    check(m, {"x": randn(4, 6)})


@pytest.mark.parametrize("shape,attrs", [([3, 6], {"starts": [1], "ends": [5], "axes": [1]}),
                                         (["n", 6], {"starts": [0, -4], "ends": [2**31 - 1, -1]}),
                                         (["n", 6], {"starts": [-2], "ends": [100], "axes": [0]})])
def test_slice_opset9_reads_its_bounds_from_the_attributes(shape, attrs):
    m = model([h.make_node("Slice", ["x"], ["y"], **attrs)], [vi("x", F32, shape)], [vi("y", F32, None)], opset=9)
    check(m, {"x": randn(3, 6)})


def test_slice_opset9_of_a_constant_folds():
    m = model([h.make_node("Slice", ["c"], ["s"], starts=[1], ends=[3]), h.make_node("Add", ["x", "s"], ["y"])],
              [vi("x", F32, [2])], [vi("y", F32, None)], [nh.from_array(randn(4), "c")], opset=9)
    check(m, {"x": randn(2)})


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_shape", [[], [1], [5], [1, 5], [3, 1], [1, 1]])
def test_gemm_bias_c_broadcasts_like_onnx(c_shape, trans_b):
    """C broadcasts to [M, N]: only a C of N elements is a linear bias, the others are added."""
    w = randn(5, 6) if trans_b else randn(6, 5)
    m = model([h.make_node("Gemm", ["x", "W", "C"], ["y"], transB=trans_b)], [vi("x", F32, [3, 6])],
              [vi("y", F32, None)], [nh.from_array(w, "W"), nh.from_array(np.asarray(randn(*c_shape)), "C")])
    check(m, {"x": randn(3, 6)}, atol=1e-5)


def test_capture_of_an_onnx_model_needs_no_example_inputs(tmp_path):
    m = model([h.make_node("Relu", ["x"], ["y"])], [vi("x", F32, ["n", 4])], [vi("y", F32, ["n", 4])])
    onnx.save_model(m, str(tmp_path / "m.onnx"))
    for source in (m, str(tmp_path / "m.onnx"), tmp_path / "m.onnx"):
        assert [n.op for n in lmforge.capture(source).nodes] == ["relu"]


def test_capture_of_a_torch_model_without_example_inputs_says_to_pass_them():
    with pytest.raises(CaptureError, match=r"example_inputs.*lmforge.capture\(model, \(x,\)\)"):
        lmforge.capture(torch.nn.ReLU())
