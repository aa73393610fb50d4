"""`slice` on a symbolic dim: negative bounds count from the end (as in torch and ONNX), an end past 2**62 means
the end; the inferred length, evaluated at several sizes, equals the reference's."""
import pytest
import torch

import lmforge
from lmforge.errors import VerifyError
from lmforge.ir import TensorType
from lmforge.ir.ops import get_op
from lmforge.ir.types import eval_dim

INT64_MAX = 2**63 - 1

# (start, end, step) -> the length inferred on a dim of size "s"
CASES = [
    ((-2, None, 1), 2),
    ((-2, INT64_MAX, 1), 2),
    ((0, -1, 1), "s - 1"),
    ((1, -1, 1), "s - 2"),
    ((-3, -1, 1), 2),
    ((0, None, 1), "s"),
    ((2, None, 1), "s - 2"),
    ((2, INT64_MAX, 1), "s - 2"),
    ((0, -1, 2), "floor(s/2)"),
    ((-5, None, 2), 3),
    (("p", None, 1), "-p + s"),
    (("p", -1, 1), "-p + s - 1"),
]


@pytest.mark.parametrize("bounds,length", CASES, ids=[str(c[0]) for c in CASES])
def test_slice_on_symbolic_dim_counts_negative_bounds_from_the_end(bounds, length):
    start, end, step = bounds
    op = get_op("slice")
    attrs = op.normalize_attrs({"dim": 1, "start": start, "end": end, "step": step})
    (ty,) = op.infer([TensorType(("b", "s"), "float32")], attrs)
    assert ty.shape[0] == "b"
    assert ty.shape[1] == length, ty
    for size in (5, 8, 13):
        env = {"b": 2, "s": size, "p": 1}
        x = torch.randn(2, size)
        run = dict(attrs, start=eval_dim(start, env) if isinstance(start, str) else start)
        out = op.reference(x, **run)
        assert out.shape[1] == eval_dim(ty.shape[1], env), (bounds, size)
        torch.testing.assert_close(out, x[:, slice(run["start"], end, step)])


def test_slice_static_dim_is_unchanged():
    op = get_op("slice")
    attrs = op.normalize_attrs({"dim": -1, "start": -2, "end": None, "step": 1})
    (ty,) = op.infer([TensorType((3, 7), "float32")], attrs)
    assert ty.shape == (3, 2)


def test_slice_symbolic_negative_step_is_an_error():
    op = get_op("slice")
    attrs = op.normalize_attrs({"dim": 1, "start": -1, "end": None, "step": -1})
    with pytest.raises(VerifyError, match="step -1"):
        op.infer([TensorType(("b", "s"), "float32")], attrs)


def test_onnx_slice_with_negative_bounds_on_symbolic_dim():
    pytest.importorskip("onnx")
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.array([v], np.int64), n) for n, v in
             (("st", -2), ("en", INT64_MAX), ("ax", 1), ("st0", 0), ("en0", -1))]
    g = helper.make_graph([helper.make_node("Slice", ["x", "st", "en", "ax"], ["y"]),
                           helper.make_node("Slice", ["x", "st0", "en0", "ax"], ["z"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 2]),
                           helper.make_tensor_value_info("z", TensorProto.FLOAT, ["b", None])], initializer=inits)
    graph = lmforge.capture(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), None)
    assert [tuple(v.type.shape) for v in graph.outputs] == [("b", 2), ("b", "s - 1")]
    compiled = lmforge.compile(graph)
    for n in (4, 7):
        x = torch.randn(3, n)
        y, z = compiled(x)
        torch.testing.assert_close(y, x[:, -2:])
        torch.testing.assert_close(z, x[:, :-1])
