"""The int4-quantized example model through export: identical outputs after load in a fresh process, and its
ONNX (MatMulNBits) runs in onnxruntime and matches the quantized model."""

import pytest
import torch

import lmforge
from examples.models.llama import LlamaDecodeStep, LlamaPrefill
from lmforge.backends.onnx_export import to_onnx

from test_artifact import round_trip_in_child  # noqa: E402  (tests/export is on sys.path under pytest)

PREFILL_DYNAMIC = {"tokens": {0: "batch", 1: "seq"}}
DECODE_DYNAMIC = {"tokens": {0: "batch"}, "k_cache": {1: "batch", 3: "past"}, "v_cache": {1: "batch", 3: "past"}}

INT4 = {"quant.weight_bits": 4, "quant.group_size": 16, "quant.lm_head": True}


@pytest.fixture(scope="module")
def int4_models(llama, make_tokens, make_decode_inputs):
    pre = lmforge.compile(LlamaPrefill(llama), (make_tokens(2, 5, 0),), dynamic=PREFILL_DYNAMIC, config=INT4)
    dec = lmforge.compile(LlamaDecodeStep(llama), make_decode_inputs(2, 4, 0), dynamic=DECODE_DYNAMIC, config=INT4)
    assert sum(n.op == "linear_wo" for n in dec.graph.nodes) >= 5
    return pre, dec


def test_int4_round_trip_in_a_fresh_process(tmp_path, int4_models, make_tokens, make_decode_inputs):
    pre, dec = int4_models
    cases = {"prefill": (pre, (make_tokens(3, 7, seed=5),)), "decode": (dec, make_decode_inputs(2, 6, seed=9))}
    outputs = round_trip_in_child(tmp_path, cases)
    for name, (compiled, inputs) in cases.items():
        for i, before in enumerate(compiled(*inputs)):
            assert torch.equal(outputs[f"{name}.{i}"], before)


@pytest.mark.parametrize("step", ["prefill", "decode"])
def test_int4_onnx_runs_in_onnxruntime_and_matches_the_quantized_model(step, int4_models, make_tokens,
                                                                       make_decode_inputs):
    """The int4 model's tolerance: the same 1e-4 as fp32, since MatMulNBits dequantizes the same int4 weights and
    scales the model runs (only the float summation order differs)."""
    ort = pytest.importorskip("onnxruntime")
    compiled = dict(zip(["prefill", "decode"], int4_models))[step]
    model = to_onnx(compiled.graph)
    assert sum(n.op_type == "MatMulNBits" and n.domain == "com.microsoft" for n in model.graph.node) >= 5
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in model.graph.input]
    for batch, size in [(2, 4), (3, 9)]:
        inputs = (make_tokens(batch, size, seed=size),) if step == "prefill" else \
            make_decode_inputs(batch, size, seed=size)
        want = compiled(*inputs)
        got = session.run(None, dict(zip(names, (x.numpy() for x in inputs))))
        assert len(got) == len(want)
        for g, w in zip(got, want):
            err = (torch.from_numpy(g) - w).norm() / w.norm()
            assert err <= 1e-4, err
