"""benchmarks/gpu_cases' attention, quant and norms builders on the CPU, at tiny shapes, under Triton's interpreter.

gpu_check runs these builders once, on a lent GPU, at full size; a wrong argument or a mis-wired lambda there would
cost that case's row. Here `DEVICE` is set to "cpu" and every builder is called directly with shapes small enough
for the interpreter; each case's kernel, reference, baseline and stages run, the kernel matches the reference within
the case's own tolerances, and its name, bytes and flops are what gpu_check's table needs. The entries `cases()`
lists are checked against the builders' signatures without being built (their shapes are GPU-sized).

The kernels run interpreted: tests/conftest.py sets TRITON_INTERPRET=1 (no CUDA here) before lmforge is imported.
"""
import functools
import inspect
import os

import pytest
import torch

from benchmarks import gpu_cases
from benchmarks.gpu_cases import attention, norms, quant

pytestmark = pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
                                reason="checks the builders on the CPU under Triton's interpreter")

BF16 = torch.bfloat16
# (id, builder, args after (gen, quick), kwargs): every attention builder at tiny shapes. Prefill tiles are the
# default config's (BLOCK_M 128, BLOCK_N 64), so one tile covers each sequence; block top-k keeps 8 of 32 blocks
# of 64 (sinks 4, window 128: 3 forced, so topk 5).
ATTENTION = [
    ("prefill_dense", attention._prefill_dense, (2, 2, 64), {}),
    ("prefill_gqa", attention._prefill_dense, (4, 2, 64), {}),
    ("prefill_dense_bf16", attention._prefill_dense, (4, 2, 64), {"dtype": BF16}),
    ("prefill_window", attention._prefill_window, (4, 2, 96), {"window": 32, "sinks": 4}),
    ("prefill_sparse", attention._prefill_sparse, (4, 2, 64), {"block_size": 16, "keep": 0.5}),
    ("prefill_flex", attention._prefill_flex, (4, 2, 256), {"block_size": 16}),
    ("decode_dense", attention._decode_dense, (4, 2, 100), {}),
    ("decode_dense_bf16", attention._decode_dense, (4, 2, 100), {"dtype": BF16}),
    ("decode_block_topk_mean", attention._decode_block_topk, (4, 2, 2048),
     {"block_size": 64, "budget": 4, "summary": "mean"}),
    ("decode_block_topk_minmax", attention._decode_block_topk, (4, 2, 2048),
     {"block_size": 64, "budget": 4, "summary": "minmax"}),
    ("shared_prefix", attention._shared_prefix, (2, 4, 2, 40, 9), {}),
    ("shared_prefix_groups", attention._shared_prefix, (4, 4, 2, 40, 9), {"groups": 2}),
]
# (id, kind, bits, n, k, m, design): each design of each kernel; K a multiple of the group size (128).
QUANT = [(f"{kind}_int{bits}_M{m}_{design.replace(' ', '_')}", kind, bits, n, k, m, design)
         for kind, bits, n, k, m in [("gemv", 4, 32, 256, 1), ("gemv", 8, 32, 256, 1), ("gemv", 4, 32, 256, 4),
                                     ("gemm", 4, 64, 256, 16), ("gemm", 8, 64, 256, 16)]
         for design in quant.DESIGNS[quant.kernel_for_rows(m)]]


@pytest.fixture(autouse=True)
def on_cpu(monkeypatch):
    """The builders' device is the CPU, and the Triton backend (which `lmforge.compile(backends=("triton",))`
    makes by name) claims nodes on it, as it does on a GPU."""
    from lmforge import backends
    from lmforge.backends.triton.backend import TritonBackend

    monkeypatch.setitem(gpu_cases.DEVICE, "name", "cpu")
    monkeypatch.setitem(backends.BACKENDS, "triton", lambda: functools.partial(TritonBackend, interpret=True))


def _gen() -> torch.Generator:
    return torch.Generator(device=gpu_cases.device()).manual_seed(0)


def _check(case: dict) -> None:
    """Everything gpu_check's check_and_time and table take from a case, run and checked."""
    assert isinstance(case["name"], str) and case["name"]
    assert isinstance(case.get("note", ""), str)
    out, ref = case["kernel"](), case["reference"]()
    torch.testing.assert_close(out.float(), ref.float(), rtol=case["rtol"], atol=case["atol"])
    if case.get("baseline") is not None:
        assert isinstance(case["baseline_name"], str) and case["baseline_name"]
        case["baseline"]()
    for stage in case.get("stages", {}).values():
        stage()
    for key in ("bytes", "flops"):
        assert isinstance(case[key], (int, float)) and not isinstance(case[key], bool), key
    assert case["bytes"] > 0
    assert case["flops"] > 0 or case["name"].startswith("attention/select_largest")  # a selection does no math


@pytest.mark.parametrize("builder,args,kwargs", [row[1:] for row in ATTENTION], ids=[row[0] for row in ATTENTION])
def test_attention_builder(builder, args, kwargs):
    case = builder(_gen(), True, *args, **kwargs)
    _check(case)
    assert case["baseline_name"].startswith("torch SDPA") and case["baseline_name"].endswith("]"), case
    assert any(f"[{name}" in case["baseline_name"] for name, _ in attention.SDPA_BACKENDS), case["baseline_name"]
    if builder is attention._prefill_flex:   # the compiled model ran its sparse attention on the Triton kernel
        assert "attention on ['triton:block_sparse_attention']" in case["note"], case["note"]


def test_select_largest_builder():
    _check(attention._select_largest(_gen(), 2, 64, 8))


@pytest.mark.parametrize("kind,bits,n,k,m,design", [row[1:] for row in QUANT], ids=[row[0] for row in QUANT])
def test_quant_builder(kind, bits, n, k, m, design):
    case = quant._case(_gen(), kind, bits, n, k, m, True, design)
    _check(case)
    assert case["name"].startswith(f"quant/int{bits}_{kind}_M{m}_N{n}_K{k}/")


@pytest.mark.parametrize("name", norms.KERNELS)
def test_norms_builder(name):
    case = norms._case(name, True, **norms._inputs(5, 96))
    _check(case)
    assert case["name"] == f"norms/{name}_5x96_fp16"


@pytest.mark.parametrize("quick", [True, False])
@pytest.mark.parametrize("module", [attention, quant])
def test_listed_entries_fit_their_builders(module, quick, monkeypatch):
    """Each entry cases() lists binds to its builder's signature (a misspelt or missing argument fails here, not
    when gpu_check builds it on the GPU); the labels are unique."""
    calls = []

    def recording(family, builder, *args, seeded=False, **kwargs):
        calls.append((builder, ("generator",) * seeded + args, kwargs))
        return gpu_cases.pending(family, builder, *args, seeded=seeded, **kwargs)

    monkeypatch.setattr(module, "pending", recording)
    entries = module.cases(quick)
    assert len(calls) == len(entries) > 0
    for builder, args, kwargs in calls:
        inspect.signature(builder).bind(*args, **kwargs)
    labels = [e.label for e in entries]
    assert len(set(labels)) == len(labels), labels


def test_norms_entries_cover_every_kernel(monkeypatch):
    monkeypatch.setattr(norms, "ROWS", 2)
    monkeypatch.setattr(norms, "COLS", 8)
    entries = norms.cases(True)
    assert [e.label for e in entries] == [f"norms/{name}" for name in norms.KERNELS]


@pytest.mark.parametrize("quick", [True, False])
def test_quant_entries_time_both_widths_on_every_kernel(quick):
    """int4 and int8 each get GEMV and GEMM rows (the GEMM for M >= 16 rows), on the same GEMM shapes."""
    labels = [e.label for e in quant.cases(quick)]
    for kind in ("gemv", "gemm"):
        for bits in (4, 8):
            assert any(label.startswith(f"quant/case('{kind}', {bits},") for label in labels), (kind, bits)
    gemm = {bits: sorted(label.split(", ", 2)[2] for label in labels if f"('gemm', {bits}," in label)
            for bits in (4, 8)}
    assert gemm[4] == gemm[8]


def test_sdpa_baseline_is_pinned_and_says_which_backend_ran(monkeypatch):
    """The SDPA baseline runs on the first backend that can run the case, pinned, and its label names it; one that
    cannot (the memory-efficient kernel on the CPU) is passed over, and the label says flash did not run it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    monkeypatch.setattr(attention, "SDPA_BACKENDS", (("flash", "EFFICIENT_ATTENTION"), ("math", "MATH")))
    baseline, name = attention._sdpa("torch SDPA fp32", q, k, v, is_causal=True)
    assert name == "torch SDPA fp32 [math: flash cannot run it]"
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):   # pinned inside: the caller's choice does not matter
        torch.testing.assert_close(baseline(), expected)
    monkeypatch.setattr(attention, "SDPA_BACKENDS", (("flash", "EFFICIENT_ATTENTION"),))
    baseline, name = attention._sdpa("torch SDPA fp32", q, k, v, is_causal=True)
    assert name.endswith("[torch default: no pinned backend ran]")
    torch.testing.assert_close(baseline(), expected)


def test_decode_graphs_builder_runs_the_generated_code_with_triton():
    """The compiled example decode step (tiny preset, fp16) runs its generated code with the Triton kernels, as
    on the GPU, and matches the torch reference; the CUDA-graph row needs a GPU and is not built here."""
    from benchmarks.gpu_cases import decode_graphs

    rows = decode_graphs._decode_step("tiny", 1, 8)
    assert [r["name"] for r in rows] == ["decode_graphs/llama_tiny_fp16_decode_b1_past8/generated_code"]
    _check(rows[0])
    assert rows[0]["note"].startswith("Triton runs ") and "attention" in rows[0]["note"], rows[0]["note"]
    assert not rows[0]["note"].startswith("Triton runs 0 ")
    assert [e.label for e in decode_graphs.cases(True)] == ["decode_graphs/llama_5m_b1_past128"]
