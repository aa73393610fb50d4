"""The example Llama ("tiny") decode step end to end on the TVM backend, against the reference."""
import pytest
import torch

import lmforge
from examples.models.llama import Llama, LlamaConfig, LlamaDecodeStep, greedy_generate
from lmforge.backends.torch import TorchReference
from lmforge.compiler import CompiledModel

LOWERED_OPS = {"embedding", "rmsnorm", "linear", "rope", "attention", "fused", "add"}


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


@pytest.fixture(scope="module")
def tiny_step():
    torch.manual_seed(0)
    cfg = LlamaConfig.preset("tiny")
    return cfg, LlamaDecodeStep(Llama(cfg).eval())


@pytest.mark.parametrize("batch,past", [(1, 0), (2, 5)])
def test_tiny_decode_step_matches_reference(tiny_step, tvm_backend, batch, past):
    cfg, step = tiny_step
    g = torch.Generator().manual_seed(batch + past)
    tokens = torch.randint(0, cfg.vocab_size, (batch, 1), generator=g)
    shape = (cfg.n_layers, batch, cfg.n_kv_heads, past, cfg.head_dim)
    k_cache, v_cache = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    reference = lmforge.compile(step, (tokens, k_cache, v_cache))
    compiled = CompiledModel(reference.graph, backends=[tvm_backend(), TorchReference()])
    on_tvm = {n.op for n, k in zip(compiled.graph.nodes, compiled.kernels) if k.backend == "tvm"}
    assert LOWERED_OPS <= on_tvm, f"expected these ops on tvm, missing {LOWERED_OPS - on_tvm}"
    assert "tvm:" in compiled.inspect(show_costs=False)
    with torch.no_grad():
        want = step(tokens, k_cache, v_cache)
        got = compiled(tokens, k_cache, v_cache)
        again = compiled(tokens, k_cache, v_cache)  # second call: resolved kernels, same result
    for g_, w_, a_ in zip(got, want, again):
        assert g_.shape == w_.shape
        assert relative_error(g_, w_) <= 1e-5
        torch.testing.assert_close(a_, g_, rtol=0, atol=0)
    assert not any(getattr(k.fn, "failures", None) for k in compiled.kernels)


def test_tiny_greedy_decoding_matches_eager(tiny_step, tvm_backend):
    """Four decode steps with a growing cache (one capture per cache length) give the eager model's tokens."""
    cfg, step = tiny_step
    prompt = torch.tensor([[3, 7, 1]])
    backend = tvm_backend()
    compiled_by_len: dict[int, CompiledModel] = {}

    def tvm_step(tokens, k_cache, v_cache):
        past = k_cache.shape[3]
        if past not in compiled_by_len:
            graph = lmforge.compile(step, (tokens, k_cache, v_cache)).graph
            compiled_by_len[past] = CompiledModel(graph, backends=[backend, TorchReference()])
        return compiled_by_len[past](tokens, k_cache, v_cache)

    with torch.no_grad():
        want = greedy_generate(step, prompt, 3, empty_cache=cfg.empty_cache)
        got = greedy_generate(tvm_step, prompt, 3, empty_cache=cfg.empty_cache)
    assert torch.equal(got, want)


def test_symbolic_batch_graph_runs_every_batch(tiny_step, tvm_backend):
    """A decode step captured with a symbolic batch runs at several batch sizes on the same kernels."""
    cfg, step = tiny_step

    def inputs(batch):
        g = torch.Generator().manual_seed(batch)
        shape = (cfg.n_layers, batch, cfg.n_kv_heads, 3, cfg.head_dim)
        return (torch.randint(0, cfg.vocab_size, (batch, 1), generator=g), torch.randn(shape, generator=g),
                torch.randn(shape, generator=g))

    dynamic = {"tokens": {0: "batch"}, "k_cache": {1: "batch"}, "v_cache": {1: "batch"}}
    graph = lmforge.compile(step, inputs(2), dynamic=dynamic).graph
    assert graph.inputs[0].type.shape[0] == "batch"
    compiled = CompiledModel(graph, backends=[tvm_backend(), TorchReference()])
    for batch in (1, 3):
        with torch.no_grad():
            got, want = compiled(*inputs(batch)), step(*inputs(batch))
        assert all(relative_error(g_, w_) <= 1e-5 for g_, w_ in zip(got, want))


def test_decode_step_executor_plans(tiny_step, tvm_backend):
    """The generated code writes each layer's appended cache into its row of the returned stack, keeps views
    inline, reuses the buffers of values that stay inside the step, and still returns fresh outputs: results
    of an earlier call are not overwritten by a later one with other inputs."""
    from lmforge.backends.codegen import escaping_values, plan_stacked_appends

    cfg, step = tiny_step
    g = torch.Generator().manual_seed(7)

    def inputs(past):
        shape = (cfg.n_layers, 2, cfg.n_kv_heads, past, cfg.head_dim)
        return (torch.randint(0, cfg.vocab_size, (2, 1), generator=g), torch.randn(shape, generator=g),
                torch.randn(shape, generator=g))

    first = inputs(4)
    graph = lmforge.compile(step, first, dynamic={"tokens": {0: "batch"}, "k_cache": {1: "batch", 3: "past"},
                                                   "v_cache": {1: "batch", 3: "past"}}).graph
    compiled = CompiledModel(graph, backends=[tvm_backend(), TorchReference()])
    plan = plan_stacked_appends(graph, compiled.kernels)
    appends = [i for i, n in enumerate(graph.nodes) if n.op == "kv_cache_append"]
    assert sorted(plan.appends) == appends and len(plan.concats) == 2   # K and V stacks, every layer
    escaping = escaping_values(graph)
    assert {v.name for v in graph.outputs} <= escaping
    assert not any(v.name in escaping for n in graph.nodes if n.op == "rmsnorm" for v in n.outputs)
    source = compiled._fn.__lmforge_source__
    assert ".reshape(" in source and "out=_stack" in source
    with torch.no_grad():
        got1 = compiled(*first)
        kept = [t.clone() for t in got1]
        second = inputs(9)                                # another batch of inputs and another cache length
        got2 = compiled(*second)
        want2 = step(*second)
    for a, b in zip(got1, kept):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the first call's outputs were not reused
    for g_, w_ in zip(got2, want2):
        assert relative_error(g_, w_) <= 1e-5
    with torch.no_grad():
        want1 = step(*first)
    for g_, w_ in zip(got1, want1):
        assert relative_error(g_, w_) <= 1e-5
