"""Triton PTX/cubin in artifacts (kernels/<target>/triton/) and the load path that launches them on a GPU.

Builds are ahead of time for sm_80 and sm_90 on this CPU machine (one module-scoped artifact of the tiny
fp32 decode step: 4 kernels per arch, plus one batch of the other attention variants). The launch itself
needs a GPU (benchmarks/gpu_cases/artifact.py); here the path up to it is checked: argument order and grid
from the artifact's metadata against what the JIT launchers pass for the same node (for attention, launch
by launch, each kernel also run so workspaces and results can be compared), and whole models run through
CubinBackend with each "cubin" replaced by the same @triton.jit function under Triton's interpreter, fed
exactly the arguments and grid computed from the metadata.
"""
import json
import shutil
import struct

import pytest
import torch

import lmforge
from examples.models.llama import LlamaDecodeStep
from lmforge.artifact import inspect_artifact
from lmforge.backends.torch import TorchReference
from lmforge.backends.triton import artifact_kernels as ak
from lmforge.backends.triton import attention_decode as ad
from lmforge.backends.triton import attention_prefill as ap
from lmforge.backends.triton import launch_specs as ls
from lmforge.backends.triton import norms
from lmforge.backends.triton import quant_matmul as qm
from lmforge.backends.triton.backend import TritonBackend
from lmforge.backends.triton.config import KernelConfig
from lmforge.backends.triton.cubin_runner import ordered_args
from lmforge.compiler import build_callable
from lmforge.errors import ArtifactError, LmforgeError
from lmforge.ir.graph import GraphBuilder
from lmforge.ir.types import TensorType

DECODE_DYNAMIC = {"tokens": {0: "batch"}, "k_cache": {1: "batch", 3: "past"}, "v_cache": {1: "batch", 3: "past"}}
INT4 = {"quant.weight_bits": 4, "quant.group_size": 16, "quant.lm_head": True}
TARGETS = {"a100": "sm_80", "h100": "sm_90"}
EM_CUDA = 190
interpreter_only = pytest.mark.skipif(torch.cuda.is_available(), reason="runs kernels under Triton's interpreter")


@pytest.fixture(scope="module")
def decode(llama, make_decode_inputs):
    return lmforge.compile(LlamaDecodeStep(llama), make_decode_inputs(2, 4, 0), dynamic=DECODE_DYNAMIC)


@pytest.fixture(scope="module")
def int4_decode(llama, make_decode_inputs):
    return lmforge.compile(LlamaDecodeStep(llama), make_decode_inputs(2, 4, 0), dynamic=DECODE_DYNAMIC, config=INT4)


@pytest.fixture(scope="module")
def artifact(decode, tmp_path_factory):
    """The fp32 decode step exported with Triton kernels for sm_80 and sm_90 (the only AOT builds here)."""
    decode.add_gpu_kernels(list(TARGETS), backends=("triton",))
    return decode.export(tmp_path_factory.mktemp("triton") / "art")


def _index(path, target):
    return json.loads((path / f"kernels/{target}/triton/index.json").read_text())


def _cubin_arch(data: bytes) -> int:
    """The SM number a CUDA ELF is for, from e_flags (low byte up to ELF ABI v7; bits 8-15 from v8)."""
    assert data[:4] == b"\x7fELF" and data[4] == 2, "not a 64-bit ELF"
    e_machine = struct.unpack_from("<H", data, 18)[0]
    assert e_machine == EM_CUDA, e_machine
    e_flags = struct.unpack_from("<I", data, 48)[0]
    abi_version = data[8]
    return (e_flags >> 8) & 0xFF if abi_version >= 8 else e_flags & 0xFF


def test_artifact_holds_ptx_cubin_and_metadata_per_kernel_and_target(artifact, decode):
    manifest = inspect_artifact(artifact)
    claimed = [i for i, n in enumerate(decode.graph.nodes) if TritonBackend().claim(n, "cuda") is not None]
    for target, arch in TARGETS.items():
        index = _index(artifact, target)
        assert index["arch"] == arch and index["failed"] == {}
        served = {e["node"] for e in index["nodes"]}
        unserved = {e["node"]: e["reason"] for e in index["not_served"]}
        assert sorted(served | set(unserved)) == claimed            # every claimed node is accounted for
        assert {decode.graph.nodes[i].op for i in served} == {"rmsnorm", "fused", "attention"}
        assert unserved == {}
        for e in index["nodes"]:
            assert decode.graph.nodes[e["node"]].outputs[0].name == e["output"]
            assert set(e["variants"].values()) <= set(index["kernels"])
        assert len(index["kernels"]) == 4           # 5 rmsnorms, 2 SwiGLUs, 2 attentions (split + merge): 4 kernels
        attention = [e for e in index["nodes"] if e["op"] == "attention"]
        assert len(attention) == 2 and all(sorted(e["variants"]) == ["decode.split", "merge"] for e in attention)
        for name, entry in index["kernels"].items():
            for f in entry["files"]:
                assert f"kernels/{target}/triton/{f}" in manifest["files"]   # hashed like every file
            base = artifact / f"kernels/{target}/triton"
            assert _cubin_arch((base / f"{name}.cubin").read_bytes()) == int(arch[3:])
            assert f".target {arch}" in (base / f"{name}.ptx").read_text()
            record = json.loads((base / f"{name}.json").read_text())
            meta = record["metadata"]
            assert record["arch"] == arch and meta["capability"] == int(arch[3:])
            assert meta["entry"] in (base / f"{name}.ptx").read_text()
            for key in ("signature", "constexprs", "num_warps", "num_stages", "shared", "grid", "registers",
                        "triton_version", "arg_names", "triton_metadata"):
                assert key in meta, key
            assert meta["num_warps"] == entry["config"]["num_warps"]
            assert meta["triton_metadata"]["target"]["arch"] == int(arch[3:])
            assert "/" not in json.dumps(meta["triton_metadata"].get("extern_libs"))  # no build-machine paths


def test_records_launch_what_the_launch_spec_plans(artifact, decode):
    """The built kernels' records carry exactly the variant the launch spec gives (what the tests below use)."""
    served, _, variants = ak.plan_for_graph(decode.graph, "sm_90")
    index = _index(artifact, "h100")
    assert sorted(variants) == sorted(index["kernels"])
    for name, (variant, _) in variants.items():
        meta = json.loads((artifact / f"kernels/h100/triton/{name}.json").read_text())["metadata"]
        for key, value in ak.variant_metadata(variant).items():
            assert meta[key] == value, key


def test_a_changed_or_missing_triton_file_is_refused_at_load(artifact, tmp_path):
    name = sorted(_index(artifact, "h100")["kernels"])[0]
    for suffix, damage in ((".cubin", "flip"), (".json", "remove"), (".ptx", "truncate")):
        copy = tmp_path / f"{suffix[1:]}-{damage}"
        shutil.copytree(artifact, copy)
        victim = copy / f"kernels/h100/triton/{name}{suffix}"
        if damage == "flip":
            data = bytearray(victim.read_bytes())
            data[100] ^= 0xFF
            victim.write_bytes(bytes(data))
        elif damage == "remove":
            victim.unlink()
        else:
            victim.write_bytes(victim.read_bytes()[:-10])
        expected = {"flip": "sha256", "remove": "missing", "truncate": "truncated"}[damage]
        with pytest.raises(ArtifactError, match=expected) as info:
            lmforge.load(copy)
        assert f"kernels/h100/triton/{name}{suffix}" in str(info.value)


def test_loading_on_the_cpu_ignores_the_gpu_kernels(artifact, decode, make_decode_inputs):
    model = lmforge.load(artifact)
    assert model.kernel_source is None and {k.backend for k in model.kernels} == {"torch"}
    inputs = make_decode_inputs(3, 6, 7)
    for got, want in zip(model(*inputs), decode(*inputs)):
        assert torch.equal(got, want)


def test_kernel_modes_are_checked(artifact):
    with pytest.raises(LmforgeError, match="kernels="):
        lmforge.load(artifact, kernels="fast")
    with pytest.raises(LmforgeError, match="CUDA device"):
        lmforge.load(artifact, device="cpu", kernels="required")
    if not torch.cuda.is_available():
        with pytest.raises(LmforgeError, match="no CUDA device"):
            lmforge.load(artifact, device="cuda", kernels="required")


def test_an_oversized_config_falls_back_to_the_default_with_a_note(decode):
    """2048 threads per block exceed every target's limit: the SwiGLU kernel is rebuilt with its default."""
    bad = KernelConfig.make(num_warps=64, num_stages=1, BLOCK=1024)
    files = ak.build_for_graph(decode.graph, "sm_90", {"swiglu": bad}, target="h100")
    index = json.loads(files["index.json"])
    [swiglu] = [e for e in index["kernels"].values() if e["kernel"] == "swiglu"]
    assert swiglu["config"] == norms.DEFAULT_CONFIGS["swiglu"].to_dict()
    assert "default config" in swiglu["note"] and "num_warps=64" in swiglu["note"]
    assert index["failed"] == {} and len(index["nodes"]) == 9


def _triton_files(path, target):
    base = path / f"kernels/{target}/triton"
    return {p.name: p.read_bytes() for p in base.iterdir()}


# What Triton's CUDA launcher (CudaLauncher) and CompiledKernel read from the metadata, on 3.6 as on 3.9: an
# artifact exported under one Triton version is loaded on the GPU machine under another (3.6 there).
LAUNCH_FIELDS = ("name", "target", "num_warps", "num_ctas", "shared", "global_scratch_size", "global_scratch_align",
                 "profile_scratch_size", "profile_scratch_align", "launch_cooperative_grid", "launch_pdl")


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_cubin_kernels_rebuild_tritons_compiled_kernel_up_to_the_driver(monkeypatch, artifact, target):
    """load_kernels rebuilds each kernel's triton CompiledKernel from the artifact's files (metadata, source,
    cubin) and loads it on the device at once; only that device load (_init_handles) is stubbed here."""
    from triton.compiler.compiler import CompiledKernel

    loaded = []
    monkeypatch.setattr(CompiledKernel, "_init_handles", lambda self: loaded.append(self.name))
    index = _index(artifact, target)
    files = _triton_files(artifact, target)
    backend = ak.load_kernels(index, files, f"kernels/{target}/triton")
    assert sorted(backend.kernels) == sorted(index["kernels"])
    for name, kernel in backend.kernels.items():
        meta = json.loads(files[f"{name}.json"])["metadata"]
        compiled = kernel.compiled
        assert compiled.name == meta["entry"] and compiled.kernel == files[f"{name}.cubin"]
        assert compiled.metadata.target.arch == int(TARGETS[target][3:])
        assert (compiled.metadata.num_warps, compiled.metadata.shared) == (meta["num_warps"], meta["shared"])
        assert [f for f in LAUNCH_FIELDS if not hasattr(compiled.metadata, f)] == []
        src = compiled.src                   # what the launcher derives the argument layout from
        assert list(src.fn.arg_names) == meta["arg_names"]
        assert {k: v for k, v in src.signature.items() if v != "constexpr"} == meta["signature"]
        assert all(src.signature[k] == "constexpr" for k in meta["constexprs"])
    assert sorted(loaded) == sorted(json.loads(files[f"{n}.json"])["metadata"]["entry"] for n in index["kernels"])


@pytest.mark.parametrize("required", [False, True])
def test_cubins_the_driver_refuses_fall_back_to_the_reference_or_raise(monkeypatch, artifact, required):
    """A cubin the GPU's driver or Triton runtime will not load (another Triton or CUDA version, arch, resources):
    kernels='auto' warns and runs the reference; kernels='required' raises with the Triton version it was built
    with."""
    from triton.compiler.compiler import CompiledKernel

    from lmforge.artifact import _load_cubins

    def refuse(self):
        raise RuntimeError("CUDA_ERROR_UNSUPPORTED_PTX_VERSION")

    monkeypatch.setattr(CompiledKernel, "_init_handles", refuse)
    data = {f"kernels/h100/triton/{n}": b for n, b in _triton_files(artifact, "h100").items()}
    built_with = f"built with Triton {_index(artifact, 'h100')['triton_version']}"
    if required:
        with pytest.raises(LmforgeError, match="UNSUPPORTED_PTX_VERSION") as info:
            _load_cubins("kernels/h100/triton", data, True)
        assert built_with in str(info.value) and "Export the artifact again" in str(info.value)
    else:
        with pytest.warns(UserWarning, match="torch reference runs instead") as caught:
            assert _load_cubins("kernels/h100/triton", data, False) is None
        assert built_with in str(caught[0].message)


def test_exported_cubins_are_portable_to_cuda_12_drivers(artifact):
    """Every kernel of the export: PTX ISA 8.7, assembled by a CUDA 12 ptxas (CUDA 12 ELF), recorded as such."""
    for target, arch in TARGETS.items():
        index = _index(artifact, target)
        base = artifact / f"kernels/{target}/triton"
        for name, entry in index["kernels"].items():
            meta = json.loads((base / f"{name}.json").read_text())["metadata"]
            assert ".version 8.7\n" in (base / f"{name}.ptx").read_text()
            assert meta["ptx_version"] == entry["ptx_version"] == "8.7" and meta["portable"] is True
            assert meta["ptxas_version"] == entry["ptxas_version"] and meta["ptxas_version"].startswith("12.")
            assert (base / f"{name}.cubin").read_bytes()[8] == 7    # ELF ABI of CUDA 12 cubins (13 writes 8)


def _h100_data(artifact, **record_changes):
    """The h100 Triton files as _load_cubins gets them, each record's metadata updated (None: key removed)."""
    data = {}
    for n, b in _triton_files(artifact, "h100").items():
        if n.endswith(".json") and n != "index.json":
            record = json.loads(b)
            for key, value in record_changes.items():
                record["metadata"].pop(key, None)
                if value is not None:
                    record["metadata"][key] = value
            b = json.dumps(record).encode()
        data[f"kernels/h100/triton/{n}"] = b
    return data


@pytest.fixture
def driver(monkeypatch):
    """Fakes the CUDA driver version (torch._C._cuda_getDriverVersion, absent from CPU builds of torch) and the
    device load; returns a function that sets the version, and the list of entries loaded."""
    from triton.compiler.compiler import CompiledKernel

    loaded = []
    monkeypatch.setattr(CompiledKernel, "_init_handles", lambda self: loaded.append(self.name))

    def set_version(version):
        monkeypatch.setattr(torch._C, "_cuda_getDriverVersion", lambda: version, raising=False)
        return loaded

    return set_version


@pytest.mark.parametrize("required", [False, True])
def test_a_driver_older_than_the_cubins_ptxas_falls_back_or_raises(artifact, driver, required):
    """Cubins of a CUDA 13 ptxas (what a non-portable sm_90 export under Triton 3.9 made) on a CUDA 12.8 driver:
    nothing is loaded; kernels='auto' warns and runs the reference, 'required' raises; both name the versions."""
    from lmforge.artifact import _load_cubins

    loaded = driver(12080)
    data = _h100_data(artifact, ptxas_version="13.4")
    if required:
        with pytest.raises(LmforgeError, match="CUDA 13.4") as info:
            _load_cubins("kernels/h100/triton", data, True)
        message = str(info.value)
    else:
        with pytest.warns(UserWarning, match="CUDA 13.4") as caught:
            assert _load_cubins("kernels/h100/triton", data, False) is None
        message = str(caught[0].message)
        assert "torch reference runs instead" in message
    assert "CUDA 12.8" in message and "Update the NVIDIA driver" in message and "export the artifact again" in message
    assert loaded == []                                     # checked before any cubin reaches the driver


@pytest.mark.parametrize("version,ptxas", [(12080, None), (12020, None), (13000, "13.4"), (11080, "delete")])
def test_a_driver_new_enough_or_an_old_record_loads_without_complaint(artifact, driver, recwarn, version, ptxas):
    """As exported (12.x ptxas) on 12.8 and 12.2 drivers (minor versions do not matter to cubins), CUDA 13 cubins
    on a 13.0 driver, and records exported before lmforge noted the ptxas version (nothing to check) all load."""
    from lmforge.artifact import _load_cubins

    loaded = driver(version)
    changes = {} if ptxas is None else {"ptxas_version": ptxas} if ptxas != "delete" else \
        {"ptxas_version": None, "ptx_version": None, "portable": None}
    backend = _load_cubins("kernels/h100/triton", _h100_data(artifact, **changes), True)
    assert sorted(backend.kernels) == sorted(_index(artifact, "h100")["kernels"])
    assert len(loaded) == len(backend.kernels)
    assert not [w for w in recwarn if "driver" in str(w.message)]


def test_the_driver_check_compares_cuda_major_versions():
    records = {"a": {"ptxas_version": "12.9"}, "b": {"ptxas_version": "13.0"}, "c": {}}
    ak.check_driver(records, "here", 13000)
    ak.check_driver(records, "here", None)                  # unknown driver: the load itself will say
    ak.check_driver({"c": {}}, "here", 11000)
    with pytest.raises(ak.DriverTooOld, match=r"CUDA 13\.0 \(e\.g\. b\).*CUDA 12\.9 only"):
        ak.check_driver(records, "here", 12090)


# ---- the launch path, up to the launch ---------------------------------------------------------------------

class _Recorder:
    """Stands in for a @triton.jit function: records what `kernel[grid](*args, **kwargs)` was given."""

    def __init__(self, fn):
        self.arg_names = fn.arg_names
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((grid, args, kwargs))


def _jit_call(monkeypatch, module, kernel_name, run):
    recorder = _Recorder(getattr(module, kernel_name))
    monkeypatch.setattr(module, kernel_name, recorder)
    run()
    monkeypatch.undo()
    [call] = recorder.calls
    return call


def _same(a, b, name):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and (a.shape, a.stride(), a.dtype) == (b.shape, b.stride(), b.dtype), name
        if name not in ("out_ptr", "bias_ptr"):           # outputs are allocated by each launcher
            assert a.data_ptr() == b.data_ptr(), name
    else:
        assert a == b, (name, a, b)


def _check_against_jit(jit_call, variant, call):
    grid, jit_args, jit_kwargs = jit_call
    meta = ak.variant_metadata(variant)
    [call] = call.steps                                     # one launch, no torch step
    assert call.variant == variant.key
    assert ls.grid_of(meta["grid"], call.values, meta["constexprs"]) == tuple(grid) + (1,) * (3 - len(grid))
    assert {k: v for k, v in jit_kwargs.items() if k not in ("num_warps", "num_stages")} == \
        {k: v for k, v in meta["constexprs"].items() if k in jit_kwargs}
    assert (jit_kwargs["num_warps"], jit_kwargs["num_stages"]) == (variant.config.num_warps, variant.config.num_stages)
    ours = ordered_args(meta, call.values)
    positional = [n for n in meta["arg_names"] if n not in jit_kwargs]
    assert len(positional) == len(jit_args)
    for name, theirs in zip(positional, jit_args):
        _same(theirs, ours[meta["arg_names"].index(name)], name)
    assert ls.check_values(meta["signature"], meta["divisible_by_16"], meta["constexprs"], call.values) is None


def _node(graph, op):
    return next(n for n in graph.nodes if n.op == op)


def test_row_kernels_launch_like_the_jit_launcher(monkeypatch, decode):
    graph = decode.graph
    rms, swiglu = _node(graph, "rmsnorm"), _node(graph, "fused")
    x, w = torch.randn(3, 1, 32), torch.randn(32)
    eps = rms.attr["eps"]
    jit = _jit_call(monkeypatch, norms, "_rmsnorm_kernel", lambda: norms.rmsnorm(x, w, eps))
    [variant] = ls.spec_for(rms).variants(rms, {})
    _check_against_jit(jit, variant, ls.spec_for(rms).call(rms, {}, x, w, eps=eps, ndim=1))
    g, u = torch.randn(3, 1, 48), torch.randn(3, 1, 48)
    jit = _jit_call(monkeypatch, norms, "_swiglu_kernel", lambda: norms.swiglu(g, u))
    [variant] = ls.spec_for(swiglu).variants(swiglu, {})
    _check_against_jit(jit, variant, ls.spec_for(swiglu).call(swiglu, {}, g, u, kind="swiglu"))


QUANT_CONFIGS = {
    "default": {},
    "byte_tiles_split": {"wo_gemv": KernelConfig.make(num_warps=8, num_stages=2, BLOCK_N=32, GROUPS_PER_STEP=1,
                                                      SPLIT_K=2)},
    "word_tiles_split": {"wo_gemv": KernelConfig.make(num_warps=4, num_stages=2, BLOCK_N=8, GROUPS_PER_STEP=8,
                                                      SPLIT_K=2, WORD_TILES=1)},
    # fp16 pairs on this fp32 model: the launch spec must downgrade to word tiles as the JIT launcher does
    "pair_tiles_fp32": {"wo_gemv": KernelConfig.make(num_warps=4, num_stages=2, BLOCK_N=8, GROUPS_PER_STEP=8,
                                                     SPLIT_K=1, WORD_TILES=2)},
    "swapped_gemm_split": {"wo_gemm": KernelConfig.make(num_warps=4, num_stages=2, BLOCK_N=16, BLOCK_M=16,
                                                        BLOCK_K=32, SPLIT_K=2, SWAP_AB=1)},
}


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("configs", sorted(QUANT_CONFIGS))
def test_quantized_linear_launches_like_the_jit_launcher(monkeypatch, int4_decode, rows, configs):
    """GEMV for 1-4 rows (BLOCK_M = rows; byte or word tiles; split-K into an fp32 workspace), GEMM beyond (the
    tiled or the swapped kernel, which may split K too), on the lm head (N = 37)."""
    from lmforge.backends.triton import quant_gemm

    configs = QUANT_CONFIGS[configs]
    node = [n for n in int4_decode.graph.nodes if n.op == "linear_wo"][-1]
    weights = int4_decode.weights
    qweight, scales, zeros = (weights[v.name] for v in node.inputs[1:4])
    x = torch.randn(rows, 1, node.inputs[0].type.shape[-1])
    variants = {v.key: v for v in ls.spec_for(node).variants(node, configs)}
    assert sorted(variants) == ["wo_gemm", "wo_gemv.m1", "wo_gemv.m2", "wo_gemv.m3", "wo_gemv.m4"]
    run = TritonBackend(configs).claim(node, "cuda").fn
    module, kernel = (qm, "_wo_gemv_kernel") if rows <= qm.GEMV_MAX_ROWS else \
        (quant_gemm, "_wo_gemm_swapped_kernel") if "wo_gemm" in configs else (qm, "_wo_gemm_kernel")
    jit = _jit_call(monkeypatch, module, kernel, lambda: run(x, qweight, scales, zeros, **node.attr))
    built = {k: ls.Built(v.config, v.static) for k, v in variants.items()}
    call = ls.spec_for(node).call(node, built, x, qweight, scales, zeros, **node.attr)
    _check_against_jit(jit, variants[call.launches[0].variant], call)


@pytest.mark.parametrize("rows", [1, 3])
def test_fp16_pair_gemv_launches_like_the_jit_launcher(monkeypatch, rows):
    """The fp16-pair GEMV (WORD_TILES=2, WORDS_PER_THREAD) on an fp16 node: same kernel, constexprs (the plan's
    WORDS_PER_THREAD included), grid and arguments as the JIT launcher, for all rows in one launch."""
    from lmforge.ir.ops.quant_ref import quantize_weight

    n, k = 24, 1024  # 1 warp below: a slot of 4 words per thread needs K * 4 / 32 >= 128 words per row
    qw = quantize_weight(torch.randn(n, k, dtype=torch.float16), 4, 64, symmetric=False)
    builder = GraphBuilder("g")
    inputs = [builder.input("x", TensorType((B, 1, k), "float16")),
              builder.input("qweight", TensorType(tuple(qw.qweight.shape), "uint8")),
              builder.input("scales", TensorType(tuple(qw.scales.shape), "float16")),
              builder.input("zeros", TensorType(tuple(qw.zeros.shape), "uint8")),
              builder.input("bias", TensorType((n,), "float16"))]
    node = builder.build([builder.op("linear_wo", inputs, {"bits": 4, "group_size": 64})]).nodes[0]
    configs = {"wo_gemv": KernelConfig.make(num_warps=1, num_stages=2, BLOCK_N=8, GROUPS_PER_STEP=2, SPLIT_K=1,
                                            WORD_TILES=2, WORDS_PER_THREAD=4)}
    variants = {v.key: v for v in ls.spec_for(node).variants(node, configs)}
    gemv = variants[f"wo_gemv.m{rows}"]
    assert gemv.config.get("WORD_TILES") == 2 and gemv.config.get("WORDS_PER_THREAD") == 4
    x, bias = torch.randn(rows, 1, k, dtype=torch.float16), torch.randn(n, dtype=torch.float16)
    run = TritonBackend(configs).claim(node, "cuda").fn
    jit = _jit_call(monkeypatch, qm, "_wo_gemv_kernel", lambda: run(x, qw.qweight, qw.scales, qw.zeros, bias,
                                                                     **node.attr))
    built = {key: ls.Built(v.config, v.static) for key, v in variants.items()}
    call = ls.spec_for(node).call(node, built, x, qw.qweight, qw.scales, qw.zeros, bias, **node.attr)
    _check_against_jit(jit, gemv, call)


class _InterpretedCubin:
    """A loaded cubin's stand-in: the same @triton.jit function, run by Triton's interpreter with exactly the
    positional arguments and grid that CubinBackend computed from the kernel's metadata."""

    def __init__(self, meta):
        import importlib

        self.fn = getattr(importlib.import_module(meta["module"]), meta["qualname"])
        self.meta = meta
        self.launches = 0

    def launch(self, grid, values):
        self.fn[grid](*ordered_args(self.meta, values))
        self.launches += 1


def _interpreted_backend(graph, configs=None):
    served, _, variants = ak.plan_for_graph(graph, "sm_90", configs)
    records = {name: ak.variant_metadata(v) for name, (v, _) in variants.items()}
    return ak.CubinBackend({"nodes": served}, records, {n: _InterpretedCubin(m) for n, m in records.items()})


@interpreter_only
@pytest.mark.parametrize("model", ["decode", "int4_decode"])
def test_the_cubin_backend_runs_the_model_as_the_reference(request, model, make_decode_inputs):
    compiled = request.getfixturevalue(model)
    backend = _interpreted_backend(compiled.graph)
    fn, kernels = build_callable(compiled.graph, [backend, TorchReference()], "cuda", compiled.weights)
    served = sum(k.backend == "triton-cubin" for k in kernels)
    assert served == sum(n.op in ("rmsnorm", "fused", "linear_wo", "attention") for n in compiled.graph.nodes) >= 9
    for batch, past in [(1, 3), (3, 6), (6, 2)]:                # GEMV (1 and 3 rows) and GEMM (6 rows)
        inputs = make_decode_inputs(batch, past, batch)
        for got, want in zip(fn(*inputs), compiled(*inputs)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert backend.fallbacks == {}
    assert all(k.launches for k in backend.kernels.values()) or model == "int4_decode"


@interpreter_only
def test_a_call_outside_the_specialisation_runs_the_reference(decode):
    backend = _interpreted_backend(decode.graph)
    node = _node(decode.graph, "rmsnorm")
    run = backend.claim(node, "cuda").fn
    buffer = torch.randn(1 + 2 * 32)
    x = buffer[1:].view(2, 1, 32)                              # 4 bytes past an aligned address
    w = torch.randn(32)
    got = run(x, w, **node.attr)
    torch.testing.assert_close(got, TorchReference().claim(node, "cpu").fn(x, w, **node.attr))
    assert backend.fallbacks == {"x_ptr is not 16-byte aligned": 1}
    assert not any(k.launches for k in backend.kernels.values())


# ---- attention: several launches per call --------------------------------------------------------------------

class _Through:
    """Stands in for a @triton.jit function: logs each launch (function, grid, args, kwargs), then runs it."""

    def __init__(self, fn, log):
        self.fn, self.log, self.arg_names = fn, log, fn.arg_names

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append((self.fn, tuple(grid), args, kwargs))
            self.fn[grid](*args, **kwargs)

        return launch


def _jit_launches(monkeypatch, run):
    """(launches, result) of `run()` with every attention kernel logged and run under the interpreter."""
    log = []
    with monkeypatch.context() as patch:
        for module, name in ((ad, "_decode_split_kernel"), (ad, "_merge_splits_kernel"), (ad, "_block_score_kernel"),
                             (ap, "_flash_prefill_kernel")):
            patch.setattr(module, name, _Through(getattr(module, name), log))
        result = run()
    return log, result


def _spec_launches(call, variants):
    """(launches, result) of a spec's call run as CubinBackend runs it, each kernel interpreted from exactly the
    positional arguments and grid its metadata gives; each launch's values pass its specialisation check."""
    log = []
    for step in call.steps:
        if not isinstance(step, ls.Launch):
            step()
            continue
        variant = variants[step.variant]
        meta = ak.variant_metadata(variant)
        assert ls.check_values(meta["signature"], meta["divisible_by_16"], meta["constexprs"], step.values) is None
        grid = ls.grid_of(meta["grid"], step.values, meta["constexprs"])
        args = ordered_args(meta, step.values)
        variant.fn[grid](*args)
        log.append((variant, grid, dict(zip(meta["arg_names"], args))))
    return log, call.result()


def _same_launches(jit_log, spec_log):
    """Same kernels in the same order, same grids, warps, stages and constexprs, and every argument equal: ints
    and floats by value, tensors by layout and by content once both ran (workspaces are each side's own)."""
    assert [fn for fn, *_ in jit_log] == [v.fn for v, *_ in spec_log]
    for (fn, grid, args, kwargs), (variant, our_grid, ours) in zip(jit_log, spec_log):
        assert our_grid == grid + (1,) * (3 - len(grid)), fn
        assert (kwargs.pop("num_warps"), kwargs.pop("num_stages", 3)) == \
            (variant.config.num_warps, variant.config.num_stages)
        assert {k: ours[k] for k in kwargs} == kwargs
        positional = [n for n in fn.arg_names if n not in kwargs]
        assert len(positional) == len(args)
        unwritten = None if kwargs.get("WRITE_LSE", True) else args[positional.index("LSE")].data_ptr()
        for name, theirs in zip(positional, args):
            mine = ours[name]
            if isinstance(theirs, torch.Tensor):
                assert (mine.shape, mine.stride(), mine.dtype) == (theirs.shape, theirs.stride(), theirs.dtype), name
                assert theirs.data_ptr() == unwritten or torch.equal(mine, theirs), name
            else:
                assert type(mine) is type(theirs) and mine == theirs, (name, mine, theirs)


def _one_node(op, shapes, attrs, dtype="float32"):
    builder = GraphBuilder("g")
    inputs = [builder.input(f"x{i}", TensorType(shape, dtype)) for i, shape in enumerate(shapes)]
    return builder.build([builder.op(op, inputs, attrs)]).nodes[0]


B, S, P = "batch", "past", "prefix"
SMALL_DECODE = KernelConfig.make(num_warps=4, num_stages=2, BLOCK_N=16, MAX_BLOCK_M=32)
SMALL_PREFILL = KernelConfig.make(num_warps=4, num_stages=2, BLOCK_M=16, BLOCK_N=16)
# (op, static shapes, attrs, runtime shapes, configs, variant keys the node builds, dtype)
ATTENTION_CASES = {
    "decode": ("attention", [(B, 4, 1, 16), (B, 2, S, 16), (B, 2, S, 16)], {}, [(2, 4, 1, 16), (2, 2, 40, 16)],
               {"attention_decode": SMALL_DECODE}, ["decode.split", "merge"], "float32"),
    "decode_fp16_lse": ("attention", [(B, 4, "seq", 32), (B, 1, S, 32), (B, 1, S, 32)], {"return_lse": True},
                        [(3, 4, 1, 32), (3, 1, 37, 32)], {}, ["decode.split", "merge", "prefill"], "float16"),
    "prefill_dense_lse": ("attention", [(1, 4, "seq", 16), (1, 2, S, 16), (1, 2, S, 16)], {"return_lse": True},
                          [(1, 4, 5, 16), (1, 2, 21, 16)], {"attention_prefill": SMALL_PREFILL},
                          ["decode.split", "merge", "prefill"], "float32"),
    "prefill_causal_offset": ("attention", [(1, 4, "seq", 16), (1, 2, S, 16), (1, 2, S, 16)],
                              {"causal": True, "q_offset": 3}, [(1, 4, 18, 16), (1, 2, 24, 16)],
                              {"attention_prefill": SMALL_PREFILL}, ["prefill"], "float32"),
    "prefill_window_sinks": ("attention", [(1, 4, 20, 16), (1, 2, 20, 16), (1, 2, 20, 16)],
                             {"causal": True, "window": 6, "sinks": 2}, [(1, 4, 20, 16), (1, 2, 20, 16)],
                             {"attention_prefill": SMALL_PREFILL}, ["prefill"], "float32"),
    "block_topk_mean": ("block_topk_attention", [(B, 4, 1, 16), (B, 2, S, 16), (B, 2, S, 16)],
                        {"block_size": 16, "topk_blocks": 1, "sinks": 4, "window": 16},
                        [(2, 4, 1, 16), (2, 2, 70, 16)], {}, ["merge", "topk.score", "topk.split"], "float32"),
    "block_topk_minmax": ("block_topk_attention", [(B, 4, 1, 16), (B, 2, S, 16), (B, 2, S, 16)],
                          {"block_size": 32, "topk_blocks": 2, "sinks": 0, "window": 8, "summary": "minmax"},
                          [(1, 4, 1, 16), (1, 2, 150, 16)], {"attention_decode": SMALL_DECODE},
                          ["merge", "topk.score", "topk.split"], "float32"),
    "shared_prefix": ("shared_prefix_attention",
                      [(B, 4, 1, 16), (1, 2, P, 16), (1, 2, P, 16), (B, 2, S, 16), (B, 2, S, 16)], {},
                      [(3, 4, 1, 16), (1, 2, 40, 16), (3, 2, 9, 16)], {"attention_shared_prefix": SMALL_DECODE},
                      ["merge", "prefix.split.m16", "prefix.split.m32", "suffix.split"], "float32"),
    "shared_prefix_groups": ("shared_prefix_attention",
                             [(6, 4, 1, 16), (3, 2, P, 16), (3, 2, P, 16), (6, 2, S, 16), (6, 2, S, 16)], {},
                             [(6, 4, 1, 16), (3, 2, 40, 16), (6, 2, 9, 16)], {"attention_shared_prefix": SMALL_DECODE},
                             ["merge", "prefix.split", "suffix.split"], "float32"),
}


def _attention_inputs(op, shapes, dtype):
    gen = torch.Generator().manual_seed(len(op) + sum(map(sum, shapes)))
    q_shape, kv_shape, *rest = shapes
    tensors = [torch.randn(q_shape, generator=gen), torch.randn(kv_shape, generator=gen),
               torch.randn(kv_shape, generator=gen)]
    if op == "shared_prefix_attention":
        tensors += [torch.randn(rest[0], generator=gen), torch.randn(rest[0], generator=gen)]
    return [t.to(getattr(torch, dtype)) for t in tensors]


@interpreter_only
@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_attention_launches_like_the_jit_launcher(monkeypatch, case):
    """Every launch of the spec's call (split / merge / score / prefill, in order) has the kernel, grid, warps,
    constexprs and arguments the JIT launcher (attention_glue) gives for the same inputs; both results equal,
    and equal the reference."""
    torch.set_num_threads(1)
    op, shapes, attrs, runtime, configs, keys, dtype = ATTENTION_CASES[case]
    node = _one_node(op, shapes, attrs, dtype)
    spec = ls.spec_for(node)
    variants = {v.key: v for v in spec.variants(node, configs)}
    assert sorted(variants) == keys
    inputs = _attention_inputs(op, runtime, dtype)
    jit_log, jit_result = _jit_launches(monkeypatch, lambda: TritonBackend(configs).claim(node, "cuda").fn(
        *inputs, **node.attr))
    built = {k: ls.Built(v.config, v.static) for k, v in variants.items()}
    call = spec.call(node, built, *inputs, **node.attr)
    spec_log, result = _spec_launches(call, variants)
    assert len(spec_log) >= (1 if "prefill" in case else 2)
    _same_launches(jit_log, spec_log)
    for got, jit in zip(*(r if isinstance(r, tuple) else (r,) for r in (result, jit_result))):
        assert torch.equal(got, jit)
    want = TorchReference().claim(node, "cpu").fn(*inputs, **node.attr)
    tol = {"rtol": 2e-3, "atol": 2e-3} if dtype == "float16" else {"rtol": 1e-4, "atol": 1e-5}
    for got, ref in zip(*(r if isinstance(r, tuple) else (r,) for r in (result, want))):
        torch.testing.assert_close(got, ref, **tol)


@interpreter_only
@pytest.mark.parametrize("pattern", ["block_topk", "window"])
def test_the_cubin_backend_runs_sparse_decode_as_the_reference(decode, make_decode_inputs, pattern):
    """The decode step with block top-k attention (score, top-k, sparse split, merge) or a sliding window with
    sinks (flash prefill on one query row) through the cubin backend gives the reference's outputs."""
    from lmforge.passes.sparsity import sparsify_attention

    torch.set_num_threads(1)
    graph = sparsify_attention(decode.graph, decode_pattern=pattern, block_size=16, topk_blocks=1, sinks=4,
                               decode_window=8)
    op = "block_topk_attention" if pattern == "block_topk" else "attention"
    assert sum(n.op == op for n in graph.nodes) == 2
    backend = _interpreted_backend(graph)
    fn, kernels = build_callable(graph, [backend, TorchReference()], "cuda", decode.weights)
    reference, _ = build_callable(graph, [TorchReference()], "cpu", decode.weights)
    assert sum(k.backend == "triton-cubin" and n.op == op for n, k in zip(graph.nodes, kernels)) == 2
    for batch, past in [(2, 59), (1, 20)]:              # 4 blocks of 16, one left out by the top-k; 2 blocks
        inputs = make_decode_inputs(batch, past, batch)
        for got, want in zip(fn(*inputs), reference(*inputs)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert backend.fallbacks == {}
    assert all(k.launches for k in backend.kernels.values())


@interpreter_only
def test_an_attention_call_with_one_unfit_launch_runs_the_reference(decode):
    """A cache view that is not 16-byte aligned breaks the split launch's check, a merge variant that was not
    built (e.g. it failed to build) breaks the last launch: either way the whole call runs the reference and
    nothing is launched."""
    node = _node(decode.graph, "attention")
    q, v = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 5, 8)
    k = torch.randn(1 + 2 * 2 * 5 * 8)[1:].view(2, 2, 5, 8)            # 4 bytes past an aligned address
    want = TorchReference().claim(node, "cpu").fn(q, k, v, **node.attr)
    backend = _interpreted_backend(decode.graph)
    torch.testing.assert_close(backend.claim(node, "cuda").fn(q, k, v, **node.attr), want)
    assert backend.fallbacks == {"K is not 16-byte aligned": 1}
    assert not any(kernel.launches for kernel in backend.kernels.values())

    for entry in backend.index["nodes"]:
        entry["variants"].pop("merge", None)
    backend = ak.CubinBackend(backend.index, backend.records, backend.kernels)
    k = k.clone()                                                       # aligned
    torch.testing.assert_close(backend.claim(node, "cuda").fn(q, k, v, **node.attr),
                               TorchReference().claim(node, "cpu").fn(q, k, v, **node.attr))
    assert backend.fallbacks == {"variant merge was not built": 1}
    assert not any(kernel.launches for kernel in backend.kernels.values())


def test_attention_variants_build_for_sm80_and_sm90():
    """Prefill (window + sinks), block top-k (score, sparse split, merge), shared prefix (prefix, suffix) and
    block-sparse prefill variants build ahead of time for both architectures, in one batch; the decode ones
    build in `artifact`."""
    builder = GraphBuilder("g")
    f16 = [builder.input(n, TensorType(s, "float16")) for n, s in
           (("q", (B, 8, 1, 64)), ("k", (B, 2, S, 64)), ("v", (B, 2, S, 64)), ("kp", (1, 2, 512, 64)),
            ("vp", (1, 2, 512, 64)), ("qp", (1, 8, "seq", 64)), ("ks", (1, 2, "seq", 64)), ("vs", (1, 2, "seq", 64)))]
    q, k, v, kp, vp, qp, ks, vs = f16
    mask = builder.input("mask", TensorType((1, 8, "nb", "nb"), "bool"))
    outs = [builder.op("attention", [qp, k, v], {"causal": True, "window": 128, "sinks": 4}),
            builder.op("block_topk_attention", [q, k, v], {"block_size": 64, "topk_blocks": 8}),
            builder.op("shared_prefix_attention", [q, kp, vp, k, v], {}),
            builder.op("block_sparse_attention", [qp, ks, vs, mask], {"block_size": 64})]
    graph = builder.build(outs)
    files = ak.build_for_targets(graph, TARGETS)
    for target, arch in TARGETS.items():
        index = json.loads(files[target]["index.json"])
        assert index["failed"] == {} and index["not_served"] == []
        assert [e["op"] for e in index["nodes"]] == ["attention", "block_topk_attention", "shared_prefix_attention",
                                                     "block_sparse_attention"]
        kernels = {entry["kernel"] for entry in index["kernels"].values()}
        assert kernels == {"flash_prefill", "block_score", "decode_split", "merge_splits", "block_sparse_prefill"}
        for name in index["kernels"]:
            assert _cubin_arch(files[target][f"{name}.cubin"]) == int(arch[3:])


class _AsIfOnCuda:
    """A backend that claims on the CPU what it would claim on a CUDA device (the interpreted cubins run anywhere)."""

    def __init__(self, backend):
        self.backend = backend

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def claim(self, node, device):
        return self.backend.claim(node, "cuda")


@interpreter_only
def test_a_tensor_parallel_model_ships_one_set_of_kernels_that_every_rank_runs(llama, make_decode_inputs, tmp_path):
    """shard.tp = 2 on the int4 decode step: one set of AOT kernels for the rank program (local shapes) in the
    artifact; both ranks run through the cubin backend (interpreted) and match the ranks on the reference."""
    from lmforge.backends.collectives import TensorParallelModel
    from lmforge.passes.shard import rank_graph

    model = lmforge.compile(LlamaDecodeStep(llama), make_decode_inputs(2, 4, 0), dynamic=DECODE_DYNAMIC,
                            config={"shard.tp": 2, **INT4})
    assert isinstance(model, TensorParallelModel)
    model.add_gpu_kernels(["h100"], backends=("triton",))
    path = model.export(tmp_path / "tp")
    served = {entry["op"] for entry in _index(path, "h100")["nodes"]}
    assert {"rmsnorm", "linear_wo", "attention"} <= served
    backend = _interpreted_backend(rank_graph(model.graph, 0))
    on_cubins = TensorParallelModel(model.graph, [_AsIfOnCuda(backend), TorchReference()])
    assert sum(k.backend == "triton-cubin" for k in on_cubins.kernels) >= 9
    for batch, past in [(1, 3), (3, 6)]:
        inputs = make_decode_inputs(batch, past, batch)
        for got, want in zip(on_cubins(*inputs), model(*inputs)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert backend.fallbacks == {} and any(k.launches for k in backend.kernels.values())
    loaded = lmforge.load(path)                                        # on the CPU: the ranks on the reference
    assert isinstance(loaded, TensorParallelModel) and loaded.kernel_source is None


# ---- block_sparse_attention: the mask's block lists (torch), then flash prefill in SPARSE mode ---------------------

def _block_sparse_node(q_shape, kv_shape, mask_shape, block_size, dtype):
    builder = GraphBuilder("g")
    inputs = [builder.input("q", TensorType(q_shape, dtype)), builder.input("k", TensorType(kv_shape, dtype)),
              builder.input("v", TensorType(kv_shape, dtype)), builder.input("mask", TensorType(mask_shape, "bool"))]
    return builder.build([builder.op("block_sparse_attention", inputs, {"block_size": block_size})])


def _block_sparse_inputs(b, hq, hkv, sq, skv, mask_shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, s, 16, generator=gen).to(getattr(torch, dtype))
               for h, s in ((hq, sq), (hkv, skv), (hkv, skv)))
    mask = torch.rand(*mask_shape, generator=gen) < 0.5
    n = min(mask_shape[2], mask_shape[3])
    mask[..., torch.arange(n), torch.arange(n)] = True                # the diagonal blocks
    return q, k, v, mask


# name: (static q, k / v, mask shapes, block size, runtime (b, hq, hkv, sq, skv), runtime mask shape, configs, dtype)
BLOCK_SPARSE_CASES = {
    "static_per_kv_head_two_tiles": ((2, 4, 40, 16), (2, 2, 40, 16), (2, 2, 2, 2), 32, (2, 4, 2, 40, 40),
                                     (2, 2, 2, 2), {"attention_prefill": SMALL_PREFILL}, "float32"),
    "symbolic_per_q_head_fp16": (((B, 4, "seq", 16), (B, 2, "seq", 16), (B, 4, "nb", "nb"), 16, (2, 4, 2, 33, 33),
                                  (2, 4, 3, 3), {}, "float16")),
    "batch_one_mask_broadcast": ((3, 2, "seq", 16), (3, 1, "seq", 16), (1, 1, "nb", "nb"), 16, (3, 2, 1, 48, 48),
                                 (1, 1, 3, 3), {"attention_prefill": SMALL_PREFILL}, "float32"),
    "symbolic_batch_one_mask_chunk": ((B, 2, "seq", 16), (B, 2, S, 16), (1, 2, "nq", "nk"), 16, (2, 2, 2, 20, 45),
                                      (1, 2, 2, 3), {"attention_prefill": SMALL_PREFILL}, "float32"),
}


@interpreter_only
@pytest.mark.parametrize("case", list(BLOCK_SPARSE_CASES))
def test_block_sparse_attention_launches_like_the_jit_launcher(monkeypatch, case):
    """The spec's one launch (flash prefill in SPARSE mode) has the kernel, grid, warps, constexprs and arguments
    (the block lists included: per KV or query head, a batch-1 mask's expanded with stride 0) that the JIT backend
    gives for the same inputs; both results equal each other and the reference."""
    torch.set_num_threads(1)
    q_shape, kv_shape, mask_shape, block_size, runtime, runtime_mask, configs, dtype = BLOCK_SPARSE_CASES[case]
    [node] = _block_sparse_node(q_shape, kv_shape, mask_shape, block_size, dtype).nodes
    spec = ls.spec_for(node)
    variants = {v.key: v for v in spec.variants(node, configs)}
    assert sorted(variants) == ["sparse"]
    inputs = _block_sparse_inputs(*runtime, runtime_mask, dtype)
    jit_log, jit_result = _jit_launches(monkeypatch, lambda: TritonBackend(configs).claim(node, "cuda").fn(
        *inputs, **node.attr))
    built = {k: ls.Built(v.config, v.static) for k, v in variants.items()}
    spec_log, result = _spec_launches(spec.call(node, built, *inputs, **node.attr), variants)
    assert len(spec_log) == 1
    _same_launches(jit_log, spec_log)
    assert torch.equal(result, jit_result)
    want = TorchReference().claim(node, "cpu").fn(*inputs, **node.attr)
    tol = {"rtol": 2e-3, "atol": 2e-3} if dtype == "float16" else {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(result, want, **tol)


@interpreter_only
def test_the_cubin_backend_runs_block_sparse_attention_as_the_reference():
    """A block_sparse_attention graph through the cubin backend (interpreted) equals the reference; a call whose
    mask the kernel cannot take (one head for 2 KV heads and 4 query heads) runs the reference instead."""
    graph = _block_sparse_node((B, 4, "seq", 16), (B, 2, "seq", 16), (B, "hm", "nb", "nb"), 16, "float32")
    backend = _interpreted_backend(graph, {"attention_prefill": SMALL_PREFILL})
    fn, kernels = build_callable(graph, [backend, TorchReference()], "cuda", {})
    reference, _ = build_callable(graph, [TorchReference()], "cpu", {})
    assert [k.backend for k in kernels] == ["triton-cubin"]
    for seed, (b, s, hm) in enumerate([(1, 40, 2), (2, 64, 4), (2, 33, 1)]):
        inputs = _block_sparse_inputs(b, 4, 2, s, s, (b, hm, -(-s // 16), -(-s // 16)), "float32", seed)
        torch.testing.assert_close(fn(*inputs), reference(*inputs), rtol=1e-4, atol=1e-5)
    assert backend.fallbacks == {"no kernel for this call": 1}
    assert all(k.launches == 2 for k in backend.kernels.values())


# ---- what the specs refuse: a broadcast SwiGLU `up`, and no keys for the sparse prefill ----------------------------

def _swiglu_node(up):
    """The fused SwiGLU node the pipeline makes from silu(gate) * up, for a gate [4, 8] float32."""
    from lmforge.passes import PassManager, canonical_pipeline, tunable_pipeline

    def fn(gate, up):
        return torch.nn.functional.silu(gate) * up

    graph = PassManager(canonical_pipeline() + tunable_pipeline()).run(
        lmforge.capture(fn, (torch.randn(4, 8), up)), {})
    return _node(graph, "fused")


def test_swiglu_spec_serves_only_gate_and_up_of_one_shape_and_dtype():
    """The kernel reads gate and up element by element: a node whose types differ is Unservable, and a call whose
    tensors differ (a broadcast `up`: the kernel would read past its end) runs the reference. The fused spec
    gives such nodes the generated elementwise kernel instead."""
    spec = ls.SWIGLU
    for up in (torch.randn(1, 8), torch.randn(4, 8, dtype=torch.float16)):
        with pytest.raises(ls.Unservable, match="gate .* and up .* differ"):
            spec.variants(_swiglu_node(up), {})
        assert [v.key for v in ls.SPECS["fused"].variants(_swiglu_node(up), {})] == ["elementwise"]
    node = _swiglu_node(torch.randn(4, 8))
    [variant] = spec.variants(node, {})
    built = {"swiglu": ls.Built(variant.config, variant.static)}
    gate = torch.randn(4, 8)
    for up in (torch.randn(64)[:8].view(1, 8), torch.randn(8), torch.randn(4, 8, dtype=torch.float16)):
        assert spec.call(node, built, gate, up, **node.attr) is None
    assert spec.call(node, built, gate, torch.randn(4, 8), **node.attr) is not None


@interpreter_only
def test_a_broadcast_swiglu_runs_the_generated_kernel_from_an_artifact():
    """silu(a) * b with b [1, 8] (a view whose memory goes on): not the SwiGLU kernel (it would read b past its
    end) but the generated elementwise one, which reads b through a stride of 0: the reference's result."""
    from lmforge.compiler import CompiledModel
    from lmforge.passes import PassManager, canonical_pipeline, tunable_pipeline

    a, b = torch.randn(4, 8), torch.randn(64)[:8].view(1, 8)
    graph = PassManager(canonical_pipeline() + tunable_pipeline()).run(
        lmforge.capture(lambda a, b: torch.nn.functional.silu(a) * b, (a, b)), {})
    backend = _interpreted_backend(graph)
    fn, kernels = build_callable(graph, [backend, TorchReference()], "cuda", {})
    assert [(k.backend, k.detail.split("_")[0]) for k in kernels] == [("triton-cubin", "elementwise")]
    torch.testing.assert_close(fn(a, b)[0], CompiledModel(graph)(a, b), rtol=1e-6, atol=1e-6)
    assert backend.fallbacks == {}


@interpreter_only
def test_block_sparse_spec_with_no_keys_launches_nothing(monkeypatch):
    """Skv = 0: the block lists are empty (no memory behind them), so the call launches nothing, like the JIT
    launcher, and gives zeros, as the reference does."""
    [node] = _block_sparse_node((1, 2, "seq", 16), (1, 2, S, 16), (1, 2, "nq", "nk"), 16, "float32").nodes
    spec = ls.spec_for(node)
    variants = {v.key: v for v in spec.variants(node, {})}
    built = {k: ls.Built(v.config, v.static) for k, v in variants.items()}
    q = torch.randn(1, 2, 20, 16)
    k = v = torch.zeros(1, 2, 0, 16)
    mask = torch.ones(1, 2, 2, 0, dtype=torch.bool)
    call = spec.call(node, built, q, k, v, mask, **node.attr)
    assert call.launches == []
    jit_log, jit_result = _jit_launches(monkeypatch, lambda: TritonBackend().claim(node, "cuda").fn(
        q, k, v, mask, **node.attr))
    assert jit_log == []
    _, result = _spec_launches(call, variants)
    want = TorchReference().claim(node, "cpu").fn(q, k, v, mask, **node.attr)
    assert torch.equal(result, torch.zeros_like(q)) and torch.equal(result, want) and torch.equal(jit_result, want)


# ---- fused elementwise regions: the kernel generated from the region --------------------------------------------

def _elementwise_node(shapes, dtype="float32"):
    """fused(x, w, r) { gelu_tanh(x) * w + r } on inputs of `shapes` (w may broadcast)."""
    region = GraphBuilder("region")
    x, w, r = (region.input(f"a{i}", TensorType(s, dtype)) for i, s in enumerate(shapes))
    y = region.op("add", [region.op("mul", [region.op("gelu", [x], {"approximate": "tanh"}), w]), r])
    outer = GraphBuilder("g")
    inputs = [outer.input(f"x{i}", TensorType(s, dtype)) for i, s in enumerate(shapes)]
    return outer.build([outer.op("fused", inputs, {"kind": "elementwise"}, regions=[region.build([y])])])


# name: (static shapes, runtime shapes, dtype, collapsed rank)
ELEMENTWISE_CASES = {
    "weight_over_rows": ([(B, 48), (48,), (B, 48)], [(3, 48), (48,), (3, 48)], "float32", 2),
    "weight_over_rows_one_row": ([(B, 48), (48,), (B, 48)], [(1, 48), (48,), (1, 48)], "float32", 2),
    "contiguous_fp16": ([(B, "seq", 32)] * 3, [(2, 5, 32)] * 3, "float16", 1),
    "static_broadcasts": ([(2, 3, 16), (3, 1), (16,)], [(2, 3, 16), (3, 1), (16,)], "float32", 3),
}


@pytest.mark.parametrize("case", sorted(ELEMENTWISE_CASES))
def test_fused_elementwise_launches_like_the_jit_launcher(monkeypatch, case):
    """The generated kernel's variant (built from the static types) takes the same grid, constexprs and
    arguments as the JIT launcher, with a symbolic row count (one row included) and broadcast inputs."""
    from lmforge.backends.triton import elementwise as ew

    static, runtime, dtype, rank = ELEMENTWISE_CASES[case]
    node = _elementwise_node(static, dtype).nodes[0]
    [variant] = ls.spec_for(node).variants(node, {})
    assert variant.key == "elementwise" and variant.fn is ew.kernel_for(node.regions[0], rank)
    inputs = [torch.randn(s).to(getattr(torch, dtype)) for s in runtime]
    recorder = _Recorder(variant.fn)
    with monkeypatch.context() as patch:
        patch.setattr(ew, "kernel_for", lambda region, r: recorder if r == rank else pytest.fail(f"rank {r}"))
        TritonBackend().claim(node, "cuda").fn(*inputs, **node.attr, regions=None)
    [jit] = recorder.calls
    _check_against_jit(jit, variant, ls.spec_for(node).call(node, {}, *inputs, **node.attr))


@interpreter_only
def test_the_cubin_backend_runs_fused_elementwise_regions_as_the_reference():
    """Interpreted "cubins" of the generated kernel serve every batch; a transposed input (outside the built plan)
    runs the reference."""
    graph = _elementwise_node([(B, 48), (48,), (B, 48)])
    node = graph.nodes[0]
    backend = _interpreted_backend(graph)
    run = backend.claim(node, "cuda").fn
    reference = TorchReference().claim(node, "cpu").fn
    regions = _regions(graph)
    for rows in (1, 4):
        inputs = [torch.randn(rows, 48), torch.randn(48), torch.randn(rows, 48)]
        torch.testing.assert_close(run(*inputs, **node.attr, regions=regions),
                                   reference(*inputs, **node.attr, regions=regions), rtol=2e-6, atol=1e-6)
    assert backend.fallbacks == {} and all(k.launches == 2 for k in backend.kernels.values())
    x = torch.randn(48, 4).t()
    got = run(x, torch.randn(48), torch.randn(4, 48), **node.attr, regions=regions)
    assert got.shape == (4, 48) and sum(backend.fallbacks.values()) == 1   # its strides break the hints


def _regions(graph):
    """The region callables the generated code passes a fused node (what the reference runs)."""
    from lmforge.compiler import region_callable

    return tuple(region_callable(r, [TorchReference()], "cpu", {}) for r in graph.nodes[0].regions)


class _GatedResidual(torch.nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.g = torch.nn.Parameter(torch.randn(d))

    def forward(self, x, residual):
        return torch.nn.functional.gelu(x, approximate="tanh") * self.g + residual


def test_an_artifact_ships_the_generated_kernel_with_its_source(monkeypatch, tmp_path):
    """The fused region's generated kernel is built for sm_80 and sm_90; its record carries the kernel's source, so
    a machine that never generated it (no module, an empty cache) rebuilds the launcher's ASTSource at load."""
    import sys

    from lmforge.backends.triton import cubin_runner
    from lmforge.backends.triton import elementwise as ew

    torch.manual_seed(0)
    model = lmforge.compile(_GatedResidual().eval(), (torch.randn(2, 32), torch.randn(2, 32)),
                            dynamic={"x": {0: "batch"}, "residual": {0: "batch"}})
    model.add_gpu_kernels(list(TARGETS), backends=("triton",))
    path = model.export(tmp_path / "art")
    for target in TARGETS:
        index = _index(path, target)
        assert index["failed"] == {} and index["not_served"] == []
        [entry] = index["nodes"]
        assert entry["op"] == "fused" and list(entry["variants"]) == ["elementwise"]
    meta = json.loads((path / f"kernels/h100/triton/{entry['variants']['elementwise']}.json").read_text())["metadata"]
    assert meta["module"].startswith(ew.MODULE_PREFIX) and "def elementwise_kernel(" in meta["source"]
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "fresh"))
    monkeypatch.delitem(sys.modules, meta["module"])
    assert cubin_runner._source(meta).fn.arg_names == meta["arg_names"]
    assert (tmp_path / "fresh/triton_elementwise" / f"{meta['module']}.py").read_text() == meta["source"]
    # at load, the record's source is accepted only as what lmforge generates from the graph's own region
    from triton.compiler.compiler import CompiledKernel

    from lmforge.artifact import _parse_graph

    monkeypatch.setattr(CompiledKernel, "_init_handles", lambda self: None)
    manifest = json.loads((path / "manifest.json").read_text())
    graph = _parse_graph((path / "graph.json").read_bytes(), manifest)
    files, name = _triton_files(path, "h100"), entry["variants"]["elementwise"]
    assert list(ak.load_kernels(_index(path, "h100"), files, "k", graph).kernels) == [name]
    imported = []
    monkeypatch.setattr(ew, "generated_module", lambda *a: imported.append(a))
    evil = meta["source"].replace('"""', '"""\nimport os; os.system("echo owned")\n', 1)
    record = json.loads(files[f"{name}.json"])
    record["metadata"].update(source=evil, module=ew.module_name(evil))
    tampered = {**files, f"{name}.json": json.dumps(record).encode()}
    record["metadata"].update(source=meta["source"], module="os")    # the right source, another module's name
    renamed = {**files, f"{name}.json": json.dumps(record).encode()}
    for bad, g in ((tampered, graph), (renamed, graph), (files, None)):
        with pytest.raises(ArtifactError, match="lmforge never runs code an artifact brings"):
            ak.load_kernels(_index(path, "h100"), bad, "k", g)
    assert imported == [], "nothing was imported"
