"""Pattern passes leave alone what only looks like their pattern (found by differential testing against eager):
each model here is compiled with the default pipeline and must give eager's result, dtype included."""
import pytest
import torch

import lmforge
from lmforge.errors import VerifyError
from lmforge.ir.ops import get_op
from lmforge.ir.types import TensorType

R = torch.randn


def _same(f, inputs, dynamic=None, tol=1e-6, ops_absent=()):
    compiled = lmforge.compile(f, inputs, dynamic=dynamic)
    got, want = compiled(*inputs), f(*inputs)
    got, want = (got, want) if isinstance(want, tuple) else ((got,), (want,))
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=tol, atol=tol)
    assert not {n.op for n in compiled.graph.nodes} & set(ops_absent)
    return compiled


def test_fused_chain_keeps_out_an_add_of_a_size_its_inputs_do_not_have():
    def positions(x, k_cache):   # positions after a KV cache of t tokens: the add's scalar is t
        return x * (torch.arange(x.shape[1]) + k_cache.shape[2]).float()[None, :, None]

    dyn = {"x": {1: "s"}, "k_cache": {2: "t"}}
    compiled = _same(positions, (R(1, 3, 8), R(1, 2, 5, 8)), dyn)
    x, kc = R(1, 4, 8), R(1, 2, 9, 8)     # other sizes
    torch.testing.assert_close(compiled(x, kc), positions(x, kc))


def test_rope_pattern_on_an_odd_head_dim_is_not_rope():
    def f(x, cos, sin):      # rotate_half split at d // 2 = 2; rope's own split would be at 3
        d = x.shape[-1]
        return x * cos + torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1) * sin

    _same(f, (R(2, 3, 5), R(3, 5), R(3, 5)), ops_absent=("rope",))


def test_rope_of_fp16_x_with_fp32_tables_keeps_torch_promotion():
    def f(x, cos, sin):
        return x * cos + torch.cat([-x[..., 2:], x[..., :2]], -1) * sin

    _same(f, (R(2, 3, 4).half(), R(3, 4), R(3, 4)), tol=1e-3, ops_absent=("rope",))


def test_rmsnorm_keeps_the_models_rounding_before_an_fp32_weight():
    def hf_mixed(x, w):     # fp16 activations normalized in fp32, rounded to fp16, then an fp32 weight
        x32 = x.float()
        return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).half()

    def to_bf16(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16()

    _same(hf_mixed, (R(4, 64).half(), R(64)))
    _same(to_bf16, (R(4, 64), R(64).half()))


def test_rmsnorm_with_a_broadcast_gain_is_not_rmsnorm():
    def f(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))

    _same(f, (R(2, 3, 8), R(1)), ops_absent=("rmsnorm",))


def test_norm_type_rule_checks_the_weight_shape():
    x = TensorType((2, 8), "float32")
    assert get_op("rmsnorm").infer([x, TensorType((8,), "float32")], {}) == (x,)
    for bad in ((1,), (4,), (2, 8)):
        with pytest.raises(VerifyError, match="normalized shape"):
            get_op("rmsnorm").infer([x, TensorType(bad, "float32")], {})
    with pytest.raises(VerifyError, match="normalized shape"):
        get_op("layernorm").infer([x, TensorType((8,), "float32"), TensorType((3,), "float32")], {})


@pytest.mark.parametrize("case", ["v over batch", "v over heads", "mask wider", "fp16 probs"])
def test_attention_pattern_with_torch_broadcasting_or_mixed_dtypes(case):
    def attn(q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1), -1) @ v

    def attn_mask(q, k, v, m):
        return torch.softmax(q @ k.transpose(-2, -1) + m, -1) @ v

    def attn_half(q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1), -1).half() @ v

    f, inputs, tol = {
        "v over batch": (attn, (R(3, 2, 5, 4), R(3, 2, 5, 4), R(1, 2, 5, 4)), 1e-5),
        "v over heads": (attn, (R(3, 2, 5, 4), R(3, 2, 5, 4), R(3, 1, 5, 4)), 1e-5),
        "mask wider": (attn_mask, (R(1, 2, 5, 4), R(1, 2, 5, 4), R(1, 2, 5, 4), R(3, 2, 5, 5)), 1e-5),
        "fp16 probs": (attn_half, (R(2, 2, 5, 4), R(2, 2, 5, 4), R(2, 2, 5, 4).half()), 1e-3),
    }[case]
    _same(f, inputs, tol=tol, ops_absent=("attention",))


def test_attention_pattern_is_still_recognized():
    def attn(q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) * 0.5, -1) @ v

    compiled = _same(attn, (R(2, 2, 5, 4), R(2, 2, 5, 4), R(2, 2, 5, 4)), tol=1e-5)
    assert "attention" in {n.op for n in compiled.graph.nodes}


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16])
def test_sum_with_a_narrower_integer_dtype_returns_that_dtype(dtype):
    def f(x, m):
        return torch.sum(x > 0, dtype=dtype), m.sum(-1, dtype=dtype)

    _same(f, (R(3, 4), torch.randint(0, 5, (3, 4))))


def test_rmsnorm_eps_added_with_alpha_or_a_size_is_not_taken_for_eps():
    def alpha(x, w):     # eps = 1e-2 * 100
        return w * (x * torch.rsqrt(torch.add(x.pow(2).mean(-1, keepdim=True), 1e-2, alpha=100.0)))

    def size_eps(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + x.shape[0]))

    _same(alpha, (R(3, 8), R(8)), tol=1e-5)
    compiled = _same(size_eps, (R(3, 8), R(8)), dynamic={"x": {0: "b"}}, tol=1e-5)
    x, w = R(5, 8), R(8)
    torch.testing.assert_close(compiled(x, w), size_eps(x, w))


def test_rmsnorm_averaging_in_a_narrower_dtype_keeps_it():
    def f(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True, dtype=torch.bfloat16) + 1e-6))

    _same(f, (R(3, 64), R(64)), ops_absent=("rmsnorm",))


@pytest.mark.parametrize("case", ["bf16 scores", "softmax dtype fp16", "fp16 model, bf16 scores"])
def test_attention_pattern_rounding_to_a_narrower_dtype_keeps_it(case):
    def bf16_scores(q, k, v):
        return torch.softmax((q @ k.transpose(-2, -1) * 3).bfloat16(), -1).to(v.dtype) @ v

    def fp16_softmax(q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1), -1, dtype=torch.float16).float() @ v

    f, dtype, tol = {"bf16 scores": (bf16_scores, torch.float32, 1e-6),
                     "softmax dtype fp16": (fp16_softmax, torch.float32, 1e-6),
                     "fp16 model, bf16 scores": (bf16_scores, torch.float16, 1e-3)}[case]
    _same(f, tuple(R(2, 2, 6, 8, dtype=dtype) for _ in range(3)), tol=tol, ops_absent=("attention",))


def test_attention_pattern_as_hugging_face_writes_it_is_recognized():
    def hf_eager(q, k, v):   # softmax in fp32, probabilities back to the model's dtype
        s = q @ k.transpose(-2, -1) * 0.3
        return torch.softmax(s, -1, dtype=torch.float32).to(q.dtype) @ v

    compiled = _same(hf_eager, tuple(R(2, 2, 6, 8, dtype=torch.float16) for _ in range(3)), tol=2e-3)
    assert "attention" in {n.op for n in compiled.graph.nodes}


def test_scores_divided_by_zero_stay_as_written():
    def f(q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) / 0.0, -1) @ v

    inputs = (R(1, 2, 4, 8), R(1, 2, 4, 8), R(1, 2, 4, 8))
    got = lmforge.compile(f, inputs)(*inputs)
    assert torch.isnan(got).all() and torch.isnan(f(*inputs)).all()


def test_merged_linears_read_by_two_inputs_share_one_merged_weight():
    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k = torch.nn.Linear(8, 4), torch.nn.Linear(8, 6)

        def forward(self, x1, x2):
            return self.q(x1), self.k(x1), self.q(x2), self.k(x2)

    compiled = _same(Two().eval(), (R(3, 8), R(3, 8)), tol=1e-5)
    assert [n.op for n in compiled.graph.nodes].count("linear") == 2
    assert len(compiled.graph.params) == 2   # one merged weight, one merged bias


class Conv1D(torch.nn.Module):
    """GPT-2's projection: addmm(b, x, W) with W [in, out]."""

    def __init__(self, k, n):
        super().__init__()
        self.weight, self.bias = torch.nn.Parameter(torch.randn(k, n)), torch.nn.Parameter(torch.randn(n))

    def forward(self, x):
        return torch.addmm(self.bias, x.view(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)


class TransposedWeight(torch.nn.Module):
    """x @ W.T (+ b) with W [out, in], as Falcon-style models write a projection."""

    def __init__(self, k, n, bias=True):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(n, k))
        self.bias = torch.nn.Parameter(torch.randn(n)) if bias else None

    def forward(self, x):
        y = x @ self.weight.T
        return y + self.bias if self.bias is not None else y


@pytest.mark.parametrize("make", [lambda: Conv1D(64, 96), lambda: TransposedWeight(64, 96),
                                  lambda: TransposedWeight(64, 96, bias=False)],
                         ids=["conv1d", "x@W.T+b", "x@W.T"])
def test_a_matmul_by_a_weight_becomes_a_linear_and_quantizes(make):
    torch.manual_seed(0)
    model = make().eval()
    x = R(2, 5, 64)
    compiled = _same(model, (x,), dynamic={"x": {0: "b", 1: "s"}}, tol=1e-5, ops_absent=("matmul",))
    assert [n.op for n in compiled.graph.nodes].count("linear") == 1
    assert len(compiled.graph.params) == (1 if getattr(model, "bias", None) is None else 2)
    x2 = R(3, 7, 64)
    torch.testing.assert_close(compiled(x2), model(x2), rtol=1e-5, atol=1e-5)
    q = lmforge.compile(model, (x,), config={"quant.weight_bits": 8, "quant.group_size": 32, "quant.lm_head": True})
    assert [n.op for n in q.graph.nodes].count("linear_wo") == 1
    torch.testing.assert_close(q(x), model(x), rtol=0.05, atol=0.05 * model(x).abs().max().item())


def test_a_weight_read_by_other_ops_is_not_stored_twice():
    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(8, 8))

        def forward(self, x):
            return x @ self.w, self.w.sum()

    compiled = _same(Shared().eval(), (R(3, 8),), tol=1e-5)
    assert "matmul" in {n.op for n in compiled.graph.nodes} and len(compiled.graph.params) == 1


def test_weight_bits_that_quantize_nothing_warn():
    model = torch.nn.Sequential(torch.nn.Linear(64, 32)).eval()   # its only linear is the output (the LM head)
    with pytest.warns(UserWarning, match="quant.weight_bits=8 quantized no layer"):
        lmforge.compile(model, (R(2, 64),), config={"quant.weight_bits": 8, "quant.group_size": 32})
