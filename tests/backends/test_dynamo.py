"""torch.compile(backend="lmforge") with the symbolic sizes Dynamo passes once a shape changes or under
dynamic=True: one lmforge graph with dynamic dims serves every size, equal to eager."""
import warnings

import pytest
import torch

import lmforge.compiler
from tests.ir.test_capture import Block


@pytest.fixture
def compiles(monkeypatch):
    """Records (dynamic spec, CompiledModel) for every lmforge.compile the backend makes."""
    torch._dynamo.reset()
    seen = []
    original = lmforge.compiler.compile

    def recording(*args, **kwargs):
        compiled = original(*args, **kwargs)
        seen.append((kwargs.get("dynamic"), compiled))
        return compiled

    monkeypatch.setattr(lmforge.compiler, "compile", recording)
    yield seen
    torch._dynamo.reset()


def test_a_changing_sequence_length_compiles_one_dynamic_graph(compiles):
    torch.manual_seed(0)
    m = Block().eval()
    fast = torch.compile(m, backend="lmforge")
    with warnings.catch_warnings():
        warnings.simplefilter("error")                # no "running it unchanged" fallback
        for seq in (5, 7, 9, 12):
            x = torch.randn(2, seq, 16)
            torch.testing.assert_close(fast(x), m(x), rtol=1e-5, atol=1e-5)
    assert len(compiles) == 2, "the static first graph, then one graph for every later length"
    dynamic, compiled = compiles[1]
    (dims,) = dynamic.values()
    assert set(dims) == {1}, "the sequence dim is symbolic, batch and features stay static"
    assert [n.op for n in compiled.graph.nodes].count("attention") == 2 and not compiled.fallback_nodes()
    assert any(dims[1] in v.type.shape for v in compiled.graph.inputs)


def test_dynamic_true_with_size_arithmetic_and_several_inputs(compiles):
    """Sizes Dynamo passes as SymInt inputs (x.shape[1] used as a number, a flattened size) are recomputed
    from the tensors; a symbol shared by two inputs is one lmforge dim."""
    def f(x, y):
        z = x.reshape(x.shape[0] * x.shape[1], -1)
        return torch.cat([z, y], 0).softmax(-1) * x.shape[1], x.new_ones(x.shape[1] * 2)

    fast = torch.compile(f, backend="lmforge", dynamic=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for n in (3, 5, 8):
            x, y = torch.randn(2, n, 8), torch.randn(n, 8)
            for got, want in zip(fast(x, y), f(x, y)):
                torch.testing.assert_close(got, want)
    assert len(compiles) == 1
    dynamic, _ = compiles[0]
    assert dynamic["arg0"][1] == dynamic["arg1"][0], "x's dim 1 and y's dim 0 are one symbol"


def test_an_int_argument_that_is_no_tensor_size_runs_unchanged_with_a_warning(compiles):
    def f(x, n):
        return x * n

    fast = torch.compile(f, backend="lmforge", dynamic=True)
    x = torch.randn(4)
    with pytest.warns(UserWarning, match="no tensor input's size"):
        out = fast(x, 3)
    torch.testing.assert_close(out, x * 3)
    torch.testing.assert_close(fast(x, 5), x * 5)
    assert not compiles
