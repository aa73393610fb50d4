"""Compiling and calling a model: keyword arguments bind by name, inputs that do not fit the graph are a clear
LmforgeError before any kernel runs, and outputs come back as tuples / lists / dicts (named tuples and dict
subclasses too), also from an artifact loaded in a process that never imported the model's classes."""
import importlib
import os
import subprocess
import sys
import warnings
from collections import namedtuple

import pytest
import torch

import lmforge
from lmforge.errors import CaptureError, LmforgeError

Pair = namedtuple("Pair", "doubled info")


def scaled(input_ids, attention_mask):
    return input_ids.float() * 10 + attention_mask.float()


def test_keyword_arguments_bind_by_name():
    ids, mask = torch.tensor([[1, 2, 3]]), torch.tensor([[1, 1, 0]])
    c = lmforge.compile(scaled, (ids, mask))
    want = scaled(ids, mask)
    for got in (c(ids, mask), c(input_ids=ids, attention_mask=mask), c(attention_mask=mask, input_ids=ids),
                c(ids, attention_mask=mask)):
        assert torch.equal(got, want)
    for kwargs, match in (({"input_ids": ids, "mask": mask}, "no input named \\['mask'\\]"),
                          ({"input_ids": ids}, "needs input\\(s\\) \\['attention_mask'\\]")):
        with pytest.raises(LmforgeError, match=match):
            c(**kwargs)
    with pytest.raises(LmforgeError, match="both by position and by name"):
        c(ids, input_ids=ids, attention_mask=mask)


def test_inputs_that_do_not_fit_the_graph_are_refused():
    x, y = torch.randn(2, 5, 8), torch.randn(2, 8)
    c = lmforge.compile(lambda x, y: (x * y[:, None, :]).sum(-1), (x, y), dynamic={"x": {0: "batch"},
                                                                                  "y": {0: "batch"}},
                        backends=("tvm",))
    torch.testing.assert_close(c(x, y), (x * y[:, None, :]).sum(-1))
    cases = [((torch.randn(2, 5, 6), y), "must have size 8 in dim 2"),
             ((x.half(), y), "must be a tensor of type f32"),
             ((x[0], y), "must be a tensor of type"),
             ((torch.randn(3, 5, 8), y), "dim 'batch' is 3 in input 'x' but 2 in input 'y'")]
    for args, match in cases:
        with pytest.raises(LmforgeError, match=match):
            c(*args)


def test_named_tuples_and_dict_subclasses_come_back_as_builtin_containers(tmp_path):
    x = torch.randn(3, 5)
    top = lmforge.compile(lambda x: torch.topk(x, 2), (x,))(x)
    assert type(top) is tuple and torch.equal(top[0], torch.topk(x, 2).values)
    c = lmforge.compile(lambda x: Pair(x * 2, {"k": x + 1}), (x,))
    got = c(x)
    assert type(got) is tuple and torch.equal(got[0], x * 2) and torch.equal(got[1]["k"], x + 1)
    path = c.export(tmp_path / "pair")
    # a fresh process that never imported this module's Pair loads and runs it
    code = ("import torch, lmforge; m = lmforge.load(%r); out = m(torch.ones(3, 5)); "
            "print(type(out).__name__, sorted(out[1]), float(out[0].sum()))" % str(path))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["tuple", "['k']", "30.0"]


def test_compile_config_names_real_knobs_and_warns_when_quantization_does_nothing():
    lin = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU()).eval()
    x = torch.randn(2, 64)
    with pytest.raises(LmforgeError, match="did you mean 'quant.weight_bits'"):
        lmforge.compile(lin, (x,), config={"quant.weight_bit": 4})
    with pytest.warns(UserWarning, match="input sizes \\[64\\] unquantized .* 0 were quantized"):
        lmforge.compile(lin, (x,), config={"quant.weight_bits": 4})            # K = 64: no group of 128
    q = lmforge.compile(lin, (x,), config={"quant.weight_bits": 4, "quant.group_size": 32})
    assert any(n.op == "linear_wo" for n in q.graph.nodes)
    for bad in ({"attn.decode_window": 0}, {"attn.decode_pattern": "windw"}, {"attn.sinks": -1},
                {"fusion.elementwise": "no"}, {"attn.block_size": 0}, {"quant.kv": "int4"},
                {"quant.weight_bits": 3}, {"quant.weight_bits": 2}, {"quant.weight_bits": True}):
        with pytest.raises(LmforgeError, match="is not a value knob"):
            lmforge.compile(lin, (x,), config=bad)


def test_a_misspelled_print_after_pass_in_the_environment_warns(monkeypatch, capsys):
    x = torch.randn(2, 8)
    monkeypatch.setenv("LMFORGE_PRINT_AFTER", "fuse_elementwse")
    with pytest.warns(UserWarning, match="names \\['fuse_elementwse'\\], which are not lmforge passes"):
        lmforge.compile(lambda t: torch.relu(t) * 2, (x,))
    monkeypatch.setenv("LMFORGE_PRINT_AFTER", "fuse_elementwise")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lmforge.compile(lambda t: torch.relu(t) * 3, (x,))
    assert "// IR after fuse_elementwise" in capsys.readouterr().err


def test_an_attention_pattern_that_finds_no_attention_it_applies_to_warns():
    def masked(q, k, v, mask):   # attention with an explicit mask (as Hugging Face models write it)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    q, mask = torch.randn(1, 2, 6, 8), torch.ones(6, 6, dtype=torch.bool).tril()
    with pytest.warns(UserWarning, match="changed no attention node"):
        lmforge.compile(masked, (q, q, q, mask), config={"attn.prefill_pattern": "window", "attn.prefill_window": 4})


def test_capture_and_compile_refuse_what_would_be_wrong_or_late():
    from lmforge.errors import CaptureError, TargetError

    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.1))
    with pytest.raises(CaptureError, match="dropout \\(p=0.1\\) in training mode: call model.eval"):
        lmforge.compile(m, (torch.randn(2, 4),))
    x = torch.randn(2, 4)
    torch.testing.assert_close(lmforge.compile(m.eval(), (x,))(x), m(x))
    with pytest.raises(CaptureError, match="builtin without a Python signature"):
        lmforge.compile(torch.exp, (x,))
    with pytest.raises(TargetError, match="unknown target 'h1000'"):
        lmforge.compile(lambda x: x + 1, (x,), target="h1000")


def test_tvm_relu_keeps_nan_like_torch():
    y = torch.tensor([[float("nan"), -1.0, 2.0, 0.0]])
    c = lmforge.compile(lambda x: torch.relu(x), (y,), backends=("tvm",))
    assert c.kernels[0].backend == "tvm"
    torch.testing.assert_close(c(y), torch.relu(y), equal_nan=True)


@pytest.mark.parametrize("fn", [torch.maximum, torch.minimum], ids=["maximum", "minimum"])
def test_tvm_maximum_minimum_propagate_nan_like_torch(fn):
    """NaN on either side gives NaN (tirx.max / min returned the other operand)."""
    nan, inf = float("nan"), float("inf")
    a = torch.tensor([[1.0, -2.0, nan, inf, 0.5, nan]])
    b = torch.tensor([[0.0, 0.0, 0.0, 0.0, nan, nan]])
    c = lmforge.compile(lambda x, y: fn(x, y), (a, b), backends=("tvm",))
    assert c.kernels[0].backend == "tvm"
    torch.testing.assert_close(c(a, b), fn(a, b), equal_nan=True)


def test_awq_acts_with_calibration_inputs_and_warns_without():
    from lmforge.passes import PassManager
    from lmforge.search.tuner import prepare

    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32)).eval()
    x = torch.randn(8, 64) * torch.linspace(0.1, 8, 64)
    cfg = {"quant.weight_bits": 4, "quant.group_size": 32, "quant.awq": True, "quant.lm_head": True}
    with pytest.warns(UserWarning, match="need calibration inputs"):
        plain = lmforge.compile(mlp, (x,), config=cfg)
    awq = lmforge.compile(mlp, (x,), config=cfg, calibration=[(x,)])
    assert not any(n.op == "mul" for n in plain.graph.nodes) and any(n.op == "mul" for n in awq.graph.nodes)
    # tune calibrates with the workload's first eval inputs
    _, graph, pipeline, evals = prepare(mlp, (x,), eval_inputs=[(x,)])
    assert any(n.op == "mul" for n in PassManager(pipeline).run(graph, cfg).nodes)


def test_tvm_kernel_knobs_in_a_compile_config_reach_the_cpu_kernels():
    def attend(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    q = torch.randn(1, 2, 40, 16)
    c = lmforge.compile(attend, (q, q, q), backends=("tvm",), config={"tvm.attention.rows": 8,
                                                                        "tvm.attention.keys": 2})
    assert "8x2 tiles" in c.kernels[0].fn.describe()
    torch.testing.assert_close(c(q, q, q), attend(q, q, q), rtol=1e-5, atol=1e-5)
    with pytest.raises(LmforgeError, match="did you mean 'tvm.attention.rows'"):
        lmforge.compile(attend, (q, q, q), backends=("tvm",), config={"tvm.attention.row": 8})


def test_tvm_window_of_one_key_builds():
    """A window of 1 with no sinks (one key slot) takes the plain row build instead of failing to schedule."""
    import warnings

    def decode(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    q, k = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 6, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c = lmforge.compile(decode, (q, k, k), backends=("tvm",),
                            config={"attn.decode_pattern": "window", "attn.decode_window": 1, "attn.sinks": 0})
        got = c(q, k, k)
    torch.testing.assert_close(got, decode(q, k[:, :, -1:], k[:, :, -1:]), rtol=1e-5, atol=1e-5)


def test_tvm_model_called_from_several_threads_at_once():
    """TVM kernels reuse their output buffers between calls; the buffers are per thread, so concurrent calls of
    one compiled model do not write into each other's intermediates (3 of 4 threads got wrong results)."""
    import threading

    torch.manual_seed(0)
    lin, norm = torch.nn.Linear(64, 64), torch.nn.RMSNorm(64)

    def f(x):
        h = torch.relu(lin(x))
        for _ in range(3):
            h = norm(torch.sigmoid(lin(h)) + h)
        return lin(h)

    c = lmforge.compile(f, (torch.randn(4, 64),), backends=("tvm",))
    assert sum(k.backend == "tvm" for k in c.kernels) >= 5
    xs = [torch.randn(4, 64) for _ in range(4)]
    with torch.no_grad():
        refs = [f(x) for x in xs]
    wrong = []

    def work(i):
        with torch.no_grad():
            for _ in range(60):
                if not torch.allclose(c(xs[i]), refs[i], atol=1e-5):
                    wrong.append(i)
                    return

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong


def test_an_output_that_is_an_input_or_its_view_is_a_copy():
    """x.clone() is captured as x itself: the compiled model returns a copy, so writing into its output leaves the
    caller's input alone (it zeroed it); a returned view of an input is a copy too, a computed output is not."""
    def f(x):
        return x.clone(), x.transpose(0, 1), x * 2

    x = torch.randn(3, 4)
    c = lmforge.compile(f, (x,))
    a, t, y = c(x)
    for out in (a, t):
        assert out.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
    keep = x.clone()
    a.zero_()
    t.zero_()
    assert torch.equal(x, keep)
    assert torch.equal(y, keep * 2) and c.source.count(".clone(") == 2


def test_outputs_are_contiguous_where_the_model_made_them_so():
    """Capture keeps no layout (`.contiguous()` is the identity), so every output is returned contiguous: a
    transposed-then-contiguous output supports `.view` as eager's does, and nothing else changes."""
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)

        def forward(self, x):                    # [B, S, H*D] -> heads -> back, the attention output's shape dance
            h = self.lin(x).view(2, 3, 2, 4).transpose(1, 2)
            return h.contiguous(), h[:, :, -1]

    m = M()
    x = torch.randn(2, 3, 8)
    c = lmforge.compile(m, (x,))
    heads, last = c(x)
    want_heads, want_last = m(x)
    assert want_heads.is_contiguous() and heads.is_contiguous()
    torch.testing.assert_close(heads.view(2, -1), want_heads.view(2, -1))
    assert last.is_contiguous()
    torch.testing.assert_close(last, want_last)


def test_dict_inputs_are_bound_by_key_and_a_wrong_structure_is_an_error():
    """A dict input is matched to the captured keys (a call with another key order swapped the tensors); a
    missing key or another nesting is an LmforgeError showing the captured structure."""
    class M(torch.nn.Module):
        def forward(self, inputs, scale):
            return inputs["a"] - 2 * inputs["b"] * scale

    a, b, s = torch.randn(3), torch.randn(3), torch.randn(3)
    c = lmforge.compile(M(), ({"a": a, "b": b}, s))
    want = M()({"a": a, "b": b}, s)
    torch.testing.assert_close(c({"b": b, "a": a}, s), want)
    torch.testing.assert_close(c(scale=s, inputs={"b": b, "a": a}), want)
    with pytest.raises(LmforgeError, match=r"\{'a': 'T', 'b': 'T'\}.*missing key"):
        c({"a": a, "c": b}, s)
    with pytest.raises(LmforgeError, match="structure it was captured with"):
        c([a, b], s)
    flat = lmforge.compile(lambda x, y: x - 2 * y, (a, b))
    assert flat.graph.get_meta("in_spec") is None          # flat tensor inputs: the graph is as before
    with pytest.raises(LmforgeError):
        flat([a], [b])


def test_an_output_that_is_a_weight_or_a_fallback_view_of_an_input_is_a_copy():
    """self.w.clone() is captured as the weight: writing into that output corrupted the compiled model and the
    module; views made by torch fallbacks (narrow, .T, unbind) of an input leaked the caller's input."""
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(3, 4))

        def forward(self, x):
            return x + self.w, self.w.clone(), torch.narrow(x.clone(), 1, 0, 2), x.clone().T, x.clone().unbind(0)[1]

    m = M()
    x = torch.randn(3, 4)
    c = lmforge.compile(m, (x,))
    keep_x, keep_w = x.clone(), m.w.detach().clone()
    with torch.no_grad():
        outs = c(x)
        for out in outs[1:]:
            out.zero_()
        torch.testing.assert_close(c(x)[0], keep_x + keep_w)
    assert torch.equal(x, keep_x) and torch.equal(m.w.detach(), keep_w)


def test_a_list_input_may_be_called_with_a_tuple_and_nested_inputs_cannot_be_dynamic():
    def f(pair, x):
        return pair[0] * x - pair[1]

    a, b, x = torch.randn(3), torch.randn(3), torch.randn(3)
    c = lmforge.compile(f, ([a, b], x))
    torch.testing.assert_close(c((a, b), x), f((a, b), x))
    with pytest.raises(CaptureError, match="dynamic dims can be given for tensor arguments only"):
        lmforge.compile(f, ([a, b], x), dynamic={"pair": {0: "n"}})


def test_a_complex_tensor_is_a_capture_error():
    freqs = torch.polar(torch.ones(4, 4), torch.randn(4, 4))

    def rope(x):
        xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * freqs).flatten(-2)

    with pytest.raises(CaptureError, match="complex64.*cos / sin"):
        lmforge.compile(rope, (torch.randn(2, 4, 8),))


def test_an_artifact_calling_another_librarys_op_names_the_import_it_needs(tmp_path):
    """A fallback of a library's custom op (as Hugging Face's MoE layers call): an artifact loaded in a process that
    did not import the library is an LmforgeError at load naming the module to import, not an AttributeError at
    the first call."""
    (tmp_path / "lmforge_test_ops.py").write_text(
        "import torch\n"
        "@torch.library.custom_op('lmforge_test::twice', mutates_args=())\n"
        "def twice(x: torch.Tensor) -> torch.Tensor:\n"
        "    return x * 2\n"
        "@twice.register_fake\n"
        "def _(x):\n"
        "    return torch.empty_like(x)\n")
    sys.path.insert(0, str(tmp_path))
    try:
        importlib.import_module("lmforge_test_ops")   # registers the op in this process

        def f(x):
            return torch.ops.lmforge_test.twice(x) + 1

        path = lmforge.compile(f, (torch.ones(3),)).export(tmp_path / "art")
    finally:
        sys.path.remove(str(tmp_path))
    code = "import torch, lmforge; m = lmforge.load(%r); print(float(m(torch.ones(3)).sum()))" % str(path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    bare = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert bare.returncode != 0
    assert "LmforgeError: the graph calls torch op lmforge_test.twice.default, which this process does not have: " \
           "`import lmforge_test_ops`" in bare.stderr
    ok = subprocess.run([sys.executable, "-c", "import lmforge_test_ops; " + code], capture_output=True, text=True,
                        timeout=300, env=env)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert ok.stdout.split() == ["9.0"]
