"""Type promotion follows torch: integer and bool tensors with float scalars, true division, mixed floating
tensors, bool/int sums and explicit `dtype=`. Each expression is captured, compiled (torch reference) and
compared with eager: same dtype, same values. A second table checks the type rules against the references
op by op, on the dtypes where promotion happens."""
import pytest
import torch

import lmforge
from lmforge.ir import TensorType
from lmforge.ir.ops import get_op
from lmforge.ir.types import dtype_name

IDS = torch.tensor([[5, 7, 0, 0], [3, 0, 0, 0]])
MASK = (IDS != 0).long()
X = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
H = torch.randn(2, 4, generator=torch.Generator().manual_seed(1)).half()
COND = torch.tensor([[True, False, True, False], [False, False, True, True]])

# name -> (function, example inputs)
EXPRESSIONS = {
    "bool_sum_is_int64": (lambda ids: (ids != 0).sum(-1), (IDS,)),
    "int32_sum_is_int64": (lambda m: m.int().sum(-1), (MASK,)),
    "int32_sum_all_is_int64": (lambda m: m.int().sum(), (MASK,)),
    "extended_mask": (lambda m: (1.0 - m[:, None, None, :]) * -1e4, (MASK,)),
    "int_times_float_scalar": (lambda m: m * 0.5, (MASK,)),
    "int32_plus_float_scalar": (lambda m: m.int() + 1.5, (MASK,)),
    "int_plus_int_scalar_stays_int": (lambda m: m + 1, (MASK,)),
    "int32_times_int64": (lambda m: m.int() * m, (MASK,)),
    "int_true_division": (lambda m: m / 2, (MASK,)),
    "int_true_division_by_tensor": (lambda m: m / (m + 1), (MASK,)),
    "where_int_float_scalar": (lambda m: torch.where(m > 0, m, 0.5), (MASK,)),
    "where_float_scalar_int": (lambda c, m: torch.where(c, 0.5, m), (COND, MASK)),
    "where_f16_f32": (lambda c, a, b: torch.where(c, a, b), (COND, H, X)),
    "where_f16_neg_inf": (lambda c, h: torch.where(c, h, float("-inf")), (COND, H)),
    "where_two_scalars": (lambda c: torch.where(c, 1, 0.5), (COND,)),
    "int_pow_int_stays_int": (lambda m: m ** 2, (IDS,)),
    "int_pow_float_is_float": (lambda m: m ** 0.5, (IDS,)),
    "int_pow_float_integral_is_float": (lambda m: m ** 2.0, (IDS,)),
    "float_pow": (lambda x: x ** 2, (X,)),
    "sum_dtype_float64": (lambda x: x.sum(-1, dtype=torch.float64), (X,)),
    "sum_all_dtype_float64": (lambda x: x.sum(dtype=torch.float64), (X,)),
    "mean_dtype_float64": (lambda x: x.mean(-1, dtype=torch.float64), (X,)),
    "f16_sum_dtype_float32": (lambda h: h.sum(-1, dtype=torch.float32), (H,)),
    "f16_sum_stays_f16": (lambda h: h.sum(-1), (H,)),
    "f16_plus_f32": (lambda h, x: h + x, (H, X)),
    "f16_times_f32_0dim": (lambda h, s: h * s, (H, torch.tensor(3.0))),
    "f16_rsub_float_scalar": (lambda h: 1.0 - h, (H,)),
    "exp_of_int": (lambda m: torch.exp(m), (IDS,)),
    "rsqrt_of_int": (lambda m: torch.rsqrt(m + 1), (IDS,)),
    "sqrt_of_bool": (lambda m: torch.sqrt(m > 0), (IDS,)),
    "neg_of_int_stays_int": (lambda m: -m, (IDS,)),
    "logical_not_of_float": (lambda x: torch.logical_not(x), (X,)),
    "maximum_int_float": (lambda m, x: torch.maximum(m, x), (IDS, X)),
}


@pytest.mark.parametrize("name", sorted(EXPRESSIONS))
def test_captured_expression_has_eager_dtype_and_values(name):
    fn, inputs = EXPRESSIONS[name]
    graph = lmforge.capture(fn, inputs)
    assert not [n for n in graph.nodes if n.op == "torch_fallback"], "the expression maps to IR ops"
    compiled = lmforge.compile(graph)
    want, got = fn(*inputs), compiled(*inputs)
    assert got.dtype == want.dtype, (name, got.dtype, want.dtype)
    assert graph.outputs[0].type.dtype == dtype_name(want.dtype)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def _spec(dtype, shape=(2, 3)):
    return TensorType(shape, dtype)


# (op, input types (None = absent), attrs, torch dtype of the result)
OP_CASES = [
    ("add", [_spec("int64"), None], {"scalar": 0.5}, torch.float32),
    ("add", [_spec("bool"), None], {"scalar": 2}, torch.int64),
    ("sub", [_spec("int64"), None], {"scalar": 1.0, "swap": True}, torch.float32),
    ("sub", [_spec("float16"), None], {"scalar": 1.0, "swap": True}, torch.float16),
    ("mul", [_spec("int32"), None], {"scalar": 3}, torch.int32),
    ("mul", [_spec("float16"), _spec("float32")], {}, torch.float32),
    ("mul", [_spec("float16"), _spec("float32", ())], {}, torch.float16),
    ("mul", [_spec("bfloat16"), _spec("float16")], {}, torch.float32),
    ("div", [_spec("int64"), None], {"scalar": 2}, torch.float32),
    ("div", [_spec("int32"), _spec("int32")], {}, torch.float32),
    ("div", [_spec("float16"), None], {"scalar": 2}, torch.float16),
    ("pow", [_spec("int64"), None], {"scalar": 2}, torch.int64),
    ("pow", [_spec("int64"), None], {"scalar": 0.5}, torch.float32),
    ("pow_scalar", [_spec("int64")], {"exponent": 2.0}, torch.int64),
    ("pow_scalar", [_spec("int64")], {"exponent": 0.5}, torch.float32),
    ("pow_scalar", [_spec("float16")], {"exponent": 2.0}, torch.float16),
    ("logical_and", [_spec("int64"), _spec("int64")], {}, torch.bool),
    ("exp", [_spec("int64")], {}, torch.float32),
    ("abs", [_spec("int32")], {}, torch.int32),
    ("logical_not", [_spec("float32")], {}, torch.bool),
    ("where", [_spec("bool"), _spec("int64"), None], {"b_scalar": 0.5}, torch.float32),
    ("where", [_spec("bool"), _spec("float16"), _spec("float32")], {}, torch.float32),
    ("where", [_spec("bool"), None, None], {"a_scalar": 1, "b_scalar": 0}, torch.int64),
    ("sum", [_spec("bool")], {"dims": (1,)}, torch.int64),
    ("sum", [_spec("int32")], {"dims": None}, torch.int64),
    ("sum", [_spec("float32")], {"dims": (1,), "dtype": "float64"}, torch.float64),
    ("sum", [_spec("float16")], {"dims": (1,)}, torch.float16),
    ("amax", [_spec("int32")], {"dims": (1,)}, torch.int32),
]


def _make(ty: TensorType | None, gen):
    if ty is None:
        return None
    if ty.dtype == "bool":
        return torch.rand(ty.shape, generator=gen) > 0.5
    if ty.dtype.startswith("int"):
        return torch.randint(1, 5, ty.shape, generator=gen).to(getattr(torch, ty.dtype))
    return (torch.rand(ty.shape, generator=gen) + 0.5).to(getattr(torch, ty.dtype))


@pytest.mark.parametrize("op,types,attrs,want", OP_CASES,
                         ids=[f"{c[0]}-{'-'.join(t.dtype if t else '_' for t in c[1])}-{i}"
                              for i, c in enumerate(OP_CASES)])
def test_type_rule_agrees_with_reference_and_torch(op, types, attrs, want):
    d = get_op(op)
    full = d.normalize_attrs(attrs)
    (ty,) = d.infer(types, full)
    assert ty.dtype == dtype_name(want)
    out = d.reference(*[_make(t, torch.Generator().manual_seed(i)) for i, t in enumerate(types)], **full)
    assert out.dtype == want and tuple(out.shape) == tuple(ty.shape)
