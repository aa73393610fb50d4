"""CUDA source export: kernels built for sm_80 / sm_90 on a machine without a GPU."""
import json
import shutil
import subprocess

import pytest
import torch

from lmforge.backends.tvm import TVMBackend
from lmforge.errors import TargetError


@pytest.fixture(scope="module")
def decoder_graph():
    """A one-layer decoder block (norm, fused QKV linear, rope, attention, SwiGLU) built with the IR builder."""
    from lmforge.ir.graph import GraphBuilder
    from lmforge.ir.types import TensorType
    from lmforge.passes import fuse_elementwise

    b = GraphBuilder("block")
    x = b.input("x", TensorType(("batch", 1, 64)))
    cos, sin = b.input("cos", TensorType((1, 16))), b.input("sin", TensorType((1, 16)))
    k_cache = b.input("k_cache", TensorType(("batch", 2, "past", 16)))
    norm = b.op("rmsnorm", [x, b.param("norm.w", TensorType((64,)))], {"eps": 1e-5})
    q = b.op("linear", [norm, b.param("wq", TensorType((64, 64))), None])
    q = b.op("permute", [b.op("reshape", [q], {"shape": ("batch", 1, 4, 16)})], {"perm": (0, 2, 1, 3)})
    q = b.op("rope", [q, cos, sin])
    attn = b.op("attention", [q, k_cache, k_cache], {"causal": True})
    gate = b.op("linear", [norm, b.param("w1", TensorType((96, 64))), None])
    up = b.op("linear", [norm, b.param("w3", TensorType((96, 64))), None])
    swiglu = b.op("mul", [b.op("silu", [gate]), up])
    return fuse_elementwise(b.build([attn, swiglu]))


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_sources_cover_the_lowered_nodes(decoder_graph, arch):
    files = TVMBackend.cuda_sources(decoder_graph, arch)
    index = json.loads(files.pop("kernels.json"))
    assert index["arch"] == arch and not index["failed"]
    ops = {info["op"] for info in index["kernels"].values()}
    assert {"rmsnorm", "linear", "rope", "attention", "fused"} <= ops
    assert sorted(index["not_lowered"]) == ["permute (permute)", "reshape (reshape)"]
    lin = [info for info in index["kernels"].values() if info["op"] == "linear"]
    assert len(lin) == 2 and sorted(len(i["nodes"]) for i in lin) == [1, 2]  # w1 and w3 share a kernel
    for name, source in files.items():
        assert name.endswith(".cu") and "__global__" in source
        for entry in index["kernels"][name]["entry_points"]:
            assert "void __launch_bounds__" in source and entry in source


def test_cuda_sources_of_quantized_linears():
    quant_ref = pytest.importorskip("lmforge.ir.ops.quant_ref", reason="quant_ref (the int4/int8 layout) not present")
    from lmforge.ir.graph import GraphBuilder
    from lmforge.ir.types import TensorType, dtype_name

    b = GraphBuilder("wo")
    x = b.input("x", TensorType(("batch", 128)))
    outs = []
    for bits in (4, 8):
        qw = quant_ref.quantize_weight(torch.randn(32, 128), bits, 64)
        params = [b.param(f"w{bits}.{s}", TensorType(tuple(t.shape), dtype_name(t.dtype)), t)
                  for s, t in (("q", qw.qweight), ("s", qw.scales), ("z", qw.zeros))]
        outs.append(b.op("linear_wo", [x, *params], {"bits": bits, "group_size": 64}))
    files = TVMBackend.cuda_sources(b.build(outs), "sm_90")
    assert sorted(files) == ["00_linear_wo.cu", "01_linear_wo.cu", "kernels.json"]
    assert ">> " in files["00_linear_wo.cu"] or ">>" in files["00_linear_wo.cu"]  # nibble unpacking on the GPU


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_exported_sources_compile_with_nvcc(decoder_graph, tmp_path):
    files = TVMBackend.cuda_sources(decoder_graph, "sm_90")
    for name in [n for n in files if n.endswith(("attention.cu", "fused.cu"))]:
        path = tmp_path / name
        path.write_text(files[name])
        done = subprocess.run(["nvcc", "-arch=sm_90", "-ptx", str(path), "-o", str(path.with_suffix(".ptx"))],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        assert ".entry lmforge_" in path.with_suffix(".ptx").read_text()


def test_cuda_knobs_change_the_kernels(decoder_graph):
    small = TVMBackend.cuda_sources(decoder_graph, "sm_90", {"tvm.cuda.rules": "fallback", "tvm.cuda.threads": 64})
    large = TVMBackend.cuda_sources(decoder_graph, "sm_90", {"tvm.cuda.rules": "fallback", "tvm.cuda.threads": 512})
    name = next(n for n in small if n.endswith("fused.cu"))
    assert "__launch_bounds__(64)" in small[name] and "__launch_bounds__(512)" in large[name]


@pytest.mark.parametrize("arch", ["sm_9", "ampere", "90"])
def test_bad_arch_is_a_target_error(decoder_graph, arch):
    with pytest.raises(TargetError, match="sm_80"):
        TVMBackend.cuda_sources(decoder_graph, arch)


@pytest.fixture(scope="module")
def gpu_export(tmp_path_factory):
    """The GPU check cases exported for sm_90 (sources, launch table, reference tensors)."""
    pytest.importorskip("lmforge.ir.ops.quant_ref", reason="quant_ref (the int4/int8 layout) not present")
    from lmforge.backends.tvm.gpu_check import export

    out = tmp_path_factory.mktemp("gpu_export")
    return out, export(out, "sm_90", ptx=False)


def test_gpu_check_export_has_launch_table_and_references(gpu_export):
    out, manifest = gpu_export
    assert not manifest["errors"] and len(manifest["cases"]) >= 10
    fused = manifest["cases"]["swiglu_fused"]["kernels"]
    assert len(fused) == 1 and fused[0]["block"] == [256, 1, 1] and fused[0]["grid"] == [22, 1, 1]  # 8*704/256
    assert [p[0] for p in fused[0]["params"]] == ["ptr", "ptr", "ptr", "int"] and fused[0]["params"][3][2] == 8
    attention = manifest["cases"]["attention_decode"]
    assert len(attention["kernels"]) > 1 and any(b["role"] == "scratch" for b in attention["buffers"].values())
    tensors = torch.load(out / "tensors.pt")
    for name, case in manifest["cases"].items():
        assert (out / case["file"]).exists()
        assert set(tensors[name]["expected"]) == {b for b, s in case["buffers"].items() if s["role"] == "output"}


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_runner_source_rewrite_compiles(gpu_export):
    """The runner swaps TVM's NVRTC header block for typedefs; with <cstdint> instead, nvcc accepts the rest."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[3] / "lmforge" / "backends" / "tvm"))
    import cuda_runner

    out, manifest = gpu_export
    name = "attention_decode"
    source = cuda_runner.strip_rtc_prelude((out / manifest["cases"][name]["file"]).read_text(), "#include <cstdint>\n")
    assert "cuda/std" not in source and "math_constants" not in source
    path = out / "rewritten.cu"
    path.write_text(source)
    done = subprocess.run(["nvcc", "-arch=sm_90", "-ptx", str(path), "-o", str(path.with_suffix(".ptx"))],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.gpu
def test_exported_kernels_run_on_the_gpu(gpu_export):
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[3] / "lmforge" / "backends" / "tvm"))
    import cuda_runner

    out, _ = gpu_export
    assert cuda_runner.main([str(out), "--repeat", "3"]) == 0
