"""Our Llama-style example model through lmforge: capture + compile reproduce eager (fp32 rel. err <= 1e-5) for
prefill and for the decode step with a KV cache, on shapes other than the capture's; the compiled decode step
solves the trained task as well as eager; the CLI inspects the example workload."""
import subprocess
import sys

import pytest
import torch

import lmforge
from examples.models.llama import Llama, LlamaConfig, LlamaDecodeStep, LlamaPrefill, greedy_generate
from lmforge.ir import Graph, verify


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Llama(LlamaConfig.preset("tiny", vocab_size=50, n_layers=2)).eval()


def test_prefill_matches_eager(model):
    m = LlamaPrefill(model)
    c = lmforge.compile(m, (torch.randint(0, 50, (2, 6)),), dynamic={"tokens": {0: "batch", 1: "seq"}})
    verify(c.graph)
    assert Graph.from_json(c.graph.to_json()) == c.graph
    for shape in [(2, 6), (1, 11), (4, 3)]:
        x = torch.randint(0, 50, shape)
        for got, want in zip(c(x), m(x)):
            assert rel(got, want) <= 1e-5


def test_decode_step_with_kv_cache_matches_eager(model):
    m = LlamaDecodeStep(model)
    k, v = model.empty_cache(2)
    _, k, v = model.prefill(torch.randint(0, 50, (2, 5)))
    c = lmforge.compile(m, (torch.randint(0, 50, (2, 1)), k, v),
                        dynamic={"tokens": {0: "batch"}, "k_cache": {1: "batch", 3: "past"},
                                 "v_cache": {1: "batch", 3: "past"}})
    assert c.graph.inputs[1].type.shape[3] == "past"
    for batch, past in [(2, 5), (3, 9), (1, 2)]:
        _, k, v = model.prefill(torch.randint(0, 50, (batch, past)))
        tok = torch.randint(0, 50, (batch, 1))
        for got, want in zip(c(tok, k, v), m(tok, k, v)):
            assert rel(got, want) <= 1e-5
    prompt = torch.randint(0, 50, (2, 4))
    assert torch.equal(greedy_generate(c, prompt, 5, empty_cache=model.config.empty_cache),
                       greedy_generate(m, prompt, 5, empty_cache=model.config.empty_cache))


def test_compiled_trained_decode_step_solves_the_task():
    from examples.llama_workload import workload

    wl = workload()
    c = lmforge.compile(wl.model, wl.example_inputs, dynamic=wl.dynamic)
    assert wl.checker(c) == pytest.approx(wl.checker(wl.model)) and wl.checker(c) >= 0.95


def test_cli_inspects_the_example_workload():
    out = subprocess.run([sys.executable, "-m", "lmforge", "inspect", "examples/llama_workload.py", "--knobs"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "graph LlamaDecodeStep(%tokens: i64[batch, 1]" in out.stdout
    assert "attention(" in out.stdout and "FLOP" in out.stdout and "torch" in out.stdout
    assert "fusion.merge_linears" in out.stdout
