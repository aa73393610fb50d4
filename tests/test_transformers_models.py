"""Hugging Face models built from small configs with random weights (transformers is a test-only extra):
captured and compiled graphs reproduce eager outputs within fp32 rel. error 1e-5, on new shapes too."""
import pytest
import torch

import lmforge
from lmforge.ir import Graph, verify

transformers = pytest.importorskip("transformers")


class Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, use_cache=False).logits


def llama():
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)


def gpt2():
    cfg = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


@pytest.mark.parametrize("build", [llama, gpt2], ids=["LlamaForCausalLM", "GPT2LMHeadModel"])
def test_hf_model_matches_eager(build):
    torch.manual_seed(0)
    model = Logits(build().eval())
    ids = torch.randint(0, 128, (2, 9))
    compiled = lmforge.compile(model, (ids,), dynamic={"input_ids": {0: "batch", 1: "seq"}})
    graph = compiled.graph
    verify(graph)
    assert Graph.from_json(graph.to_json()) == graph
    assert sum(n.op == "attention" for n in graph.nodes) == 2
    for shape in [(2, 9), (3, 13)]:
        x = torch.randint(0, 128, shape)
        ref = model(x)
        err = ((compiled(x) - ref).norm() / ref.norm()).item()
        assert err <= 1e-5, err


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-2), (torch.bfloat16, 2e-2)], ids=["fp16", "bf16"])
def test_hf_llama_in_half_precision_matches_eager(dtype, tol):
    """Hugging Face's RMSNorm computes in fp32 and casts back: recognized as rmsnorm on the half-precision input
    (two per layer and the final norm), the compiled model matches eager within the dtype's tolerance."""
    torch.manual_seed(0)
    model = Logits(llama().to(dtype).eval())
    compiled = lmforge.compile(model, (torch.randint(0, 128, (2, 9)),), dynamic={"input_ids": {0: "batch", 1: "seq"}})
    assert sum(n.op == "rmsnorm" for n in compiled.graph.nodes) == 5
    for shape in [(2, 9), (3, 13)]:
        x = torch.randint(0, 128, shape)
        with torch.no_grad():
            want, got = model(x), compiled(x)
        assert got.dtype == dtype
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("build,split_weights", [(llama, 9), (gpt2, 12)], ids=["LlamaForCausalLM", "GPT2LMHeadModel"])
def test_hf_model_splits_over_two_ranks_as_megatron_does(build, split_weights):
    """Tensor parallelism on two other codebases' models: Llama (GQA's repeat_kv expand, untied lm_head) and GPT-2
    (Conv1D: x @ W + b on [batch*seq, features] views, fused QKV split by slices, tied embeddings): the split
    graph equals the unsplit one, with two all-reduces per layer and nothing cut or gathered in the layers."""
    from lmforge.backends.collectives import TensorParallelModel
    from lmforge.passes.shard import plan_of, tensor_parallel

    torch.manual_seed(0)
    model = Logits(build().eval())
    compiled = lmforge.compile(model, (torch.randint(0, 128, (2, 9)),), dynamic={"input_ids": {0: "batch", 1: "seq"}})
    split = tensor_parallel(compiled.graph, 2)
    ops = [n.op for n in split.nodes]
    assert len(plan_of(split)["params"]) == split_weights
    assert ops.count("all_reduce") == 4 and ops.count("shard_slice") == 0
    assert ops.count("all_gather") == (1 if build is llama else 0)        # Llama's own lm_head is split too
    x = torch.randint(0, 128, (3, 13))
    torch.testing.assert_close(TensorParallelModel(split)(x), compiled(x), rtol=1e-5, atol=1e-5)
