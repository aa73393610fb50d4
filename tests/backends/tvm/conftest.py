"""Shared fixtures of the TVM backend tests: one build cache for the whole session (builds are the slow
part: nodes with the same computation share one) and a helper that runs one IR node through CompiledModel."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("tvm", reason="apache-tvm is not installed")

from lmforge.backends.torch import TorchReference  # noqa: E402
from lmforge.backends.tvm import TVMBackend  # noqa: E402
from lmforge.backends.tvm.build import BuildCache  # noqa: E402
from lmforge.compiler import CompiledModel  # noqa: E402
from lmforge.ir.graph import GraphBuilder  # noqa: E402
from lmforge.ir.types import TensorType  # noqa: E402


@pytest.fixture(scope="session")
def build_cache() -> BuildCache:
    return BuildCache()


@pytest.fixture
def tvm_backend(build_cache):
    """TVMBackend(config) sharing the session's build cache."""

    def make(config=None, **kwargs) -> TVMBackend:
        return TVMBackend(config, cache=build_cache, **kwargs)

    return make


def _single_op_graph(op: str, inputs, attrs=None, regions=(), types=None):
    """A graph applying `op` once to graph inputs typed like `inputs` (None stays an absent input)."""
    b = GraphBuilder(f"one_{op}")
    values = []
    for i, t in enumerate(inputs):
        if t is None:
            values.append(None)
        else:
            values.append(b.input(f"in{i}", types[i] if types else TensorType.of(t)))
    out = b.op(op, values, dict(attrs or {}), regions=regions)
    return b.build(list(out) if isinstance(out, tuple) else [out])


def _run_on_tvm(backend, op: str, inputs, attrs=None, regions=(), types=None):
    """(tvm outputs, reference outputs, compiled) for one node; asserts the TVM backend claimed it."""
    graph = _single_op_graph(op, inputs, attrs, regions, types)
    tensors = [t for t in inputs if t is not None]
    compiled = CompiledModel(graph, backends=[backend, TorchReference()])
    assert compiled.kernels[0].backend == "tvm", f"{op} was not claimed by tvm: {compiled.kernels[0]}"
    reference = CompiledModel(graph, backends=[TorchReference()])
    return compiled(*tensors), reference(*tensors), compiled


def _seeded(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


@pytest.fixture
def single_op_graph():
    """single_op_graph(op, inputs, attrs=None, regions=(), types=None) -> Graph."""
    return _single_op_graph


@pytest.fixture
def run_on_tvm():
    """run_on_tvm(backend, op, inputs, attrs=None, regions=(), types=None) -> (outputs, reference, compiled)."""
    return _run_on_tvm


@pytest.fixture
def randn():
    """randn(*shape, seed=0, scale=1.0): fresh seeded fp32 normal tensor."""
    return _seeded
