"""Ahead-of-time builds for sm_80 / sm_90 (attention kernels: sm_89 too) on a machine without a GPU, resource
reports and pruning.

Under the interpreter (CPU-only machines) every build batch runs in one child process (a few seconds to
start: it imports torch), so the templates are built together once, by a module-scoped fixture. Triton
caches compiled kernels (~/.triton/cache), so later runs are faster still.
"""
import json
import re

import pytest
import torch
import triton
import triton.language as tl

from lmforge.backends.triton import aot, norms, quant_matmul
from lmforge.backends.triton.config import KernelConfig
from lmforge.errors import ArtifactError, LmforgeError, TargetError

def _elementwise_spec():
    """The generated kernel of gelu_tanh(x) * w + r (x, r [batch, 4096], w [4096], fp16), as the kernel model
    builds it: rank 2 (rows x D, the weight repeats along the rows), a symbolic row count."""
    from lmforge.ir.graph import GraphBuilder
    from lmforge.ir.types import TensorType
    from lmforge.search.kernel_templates import _elementwise_spec as spec_of

    shapes = [("batch", 4096), (4096,), ("batch", 4096)]
    region = GraphBuilder("region")
    x, w, r = (region.input(f"a{i}", TensorType(s, "float16")) for i, s in enumerate(shapes))
    y = region.op("add", [region.op("mul", [region.op("gelu", [x], {"approximate": "tanh"}), w]), r])
    outer = GraphBuilder("g")
    inputs = [outer.input(f"x{i}", TensorType(s, "float16")) for i, s in enumerate(shapes)]
    graph = outer.build([outer.op("fused", inputs, {"kind": "elementwise"}, regions=[region.build([y])])])
    return spec_of(graph.nodes[0], {})


SPECS = {spec.name: spec for spec in quant_matmul.aot_specs() + norms.aot_specs() + [_elementwise_spec()]}
PTX_TARGET = {"sm_80": ".target sm_80", "sm_90": ".target sm_90a"}


ARCHS = ["sm_80", "sm_90"]


@pytest.fixture(scope="module")
def built():
    """Every template built for every arch with its default config, in one batch: {(name, arch): result}."""
    keys = [(name, arch) for name in sorted(SPECS) for arch in ARCHS]
    results = aot.build_many(aot.spec_request(SPECS[name], arch) for name, arch in keys)
    return dict(zip(keys, results))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_template_builds_with_its_default_config(built, name, arch):
    spec = SPECS[name]
    binary = built[name, arch]
    assert isinstance(binary, aot.KernelBinary), binary  # else: the compiler's message
    meta = binary.metadata
    assert binary.arch == arch and binary.name.startswith(f"{name}_{arch}_")
    assert PTX_TARGET[arch] in binary.ptx and f".entry {meta['entry']}" in binary.ptx
    assert binary.cubin[:4] == b"\x7fELF"
    config = spec.adapt(spec.config) if spec.adapt else spec.config
    assert (meta["num_warps"], meta["num_stages"]) == (config.num_warps, config.num_stages)
    assert 1 <= meta["registers"] <= 255 and meta["shared"] >= 0
    assert meta["signature"] == dict(spec.signature)
    for knob, value in config.params:
        assert meta["constexprs"][knob] == value
    assert aot.fits(aot.ResourceReport.of(binary), aot.ARCH_LIMITS[arch])
    json.dumps(meta)  # the launch metadata is plain JSON


def test_adapt_builds_the_config_the_launcher_runs(built):
    row = built["rmsnorm_row_fp16", "sm_90"].metadata["constexprs"]  # default BLOCK_D 8192 > rows of 4096
    assert row["BLOCK_D"] == 4096 and row["ONE_PASS"] is True
    assert built["softmax_long_fp16", "sm_90"].metadata["constexprs"]["ONE_PASS"] is False


def test_oversized_and_uncompilable_configs_are_pruned_with_reasons():
    spec = SPECS["wo_gemm_int8_g128_fp16"]
    huge = KernelConfig.make(num_warps=8, num_stages=7, BLOCK_M=256, BLOCK_N=256, BLOCK_K=128, GROUP_M=8)
    not_a_power_of_two = KernelConfig.make(num_warps=4, num_stages=2, BLOCK_M=48, BLOCK_N=64, BLOCK_K=64, GROUP_M=8)
    kept, dropped = aot.prune_configs(spec, [quant_matmul.GEMM_DEFAULT_CONFIG, huge, not_a_power_of_two], "sm_90")
    assert kept == [quant_matmul.GEMM_DEFAULT_CONFIG]
    reasons = dict(dropped)
    assert list(reasons) == [huge, not_a_power_of_two]
    assert "shared memory" in reasons[huge] and "sm_90" in reasons[huge]
    assert reasons[not_a_power_of_two].startswith("does not compile")


# The word-tile GEMV (quant_matmul, WORD_TILES=1) relies on its K loop having no layout conversion through
# shared memory (a bar.sync per trip); GROUPS_PER_STEP=2 is raised by the plan to one word per thread. The
# checks hold under the Triton installed; Triton 3.6 and 3.9 both pass them (3.6 breaks ties in the load
# layout's thread order the other way, which the kernel's 1-D weight loads are written to be immune to).
WORD_TILES = KernelConfig.make(num_warps=4, num_stages=2, BLOCK_N=8, GROUPS_PER_STEP=2, SPLIT_K=1, WORD_TILES=1)
WORD_TILE_SPECS = {spec.name: spec for act in (torch.float16, torch.bfloat16, torch.float32)
                   for spec in quant_matmul.aot_specs(act) if spec.name.startswith("wo_gemv")}


def _loop_bodies(ptx: str) -> list[str]:
    """The PTX of every loop: the lines from a label to a later branch back to it."""
    lines, labels, bodies = ptx.splitlines(), {}, []
    for i, line in enumerate(lines):
        label = re.match(r"(\$L__BB\d+_\d+):", line)
        if label:
            labels[label.group(1)] = i
        branch = re.search(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+);", line)
        if branch and branch.group(1) in labels:
            bodies.append("\n".join(lines[labels[branch.group(1)]:i + 1]))
    return bodies


@pytest.fixture(scope="module")
def word_tiles():
    keys = [(name, arch) for name in ("wo_gemv_int4_g128_fp16", "wo_gemv_int8_g128_fp16", "wo_gemv_int4_g128_bf16")
            for arch in ARCHS] + [("wo_gemv_int4_g128_fp32", "sm_90")]
    results = aot.build_many(aot.spec_request(WORD_TILE_SPECS[name], arch, WORD_TILES) for name, arch in keys)
    return dict(zip(keys, results))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name,groups_per_step,x_load", [
    ("wo_gemv_int4_g128_fp16", 8, "ld.global.v4.b32"),      # the x values of one word: 8 halves, 16 bytes
    ("wo_gemv_int8_g128_fp16", 4, "ld.global.v2.b32"),      # 4 halves
    ("wo_gemv_int4_g128_bf16", 8, "ld.global.v4.b32"),
])
def test_word_tile_gemv_builds_with_a_barrier_free_k_loop(word_tiles, name, groups_per_step, x_load, arch):
    binary = word_tiles[name, arch]
    assert isinstance(binary, aot.KernelBinary), binary
    constexprs = binary.metadata["constexprs"]
    assert constexprs["WORD_TILES"] == 1 and constexprs["GROUPS_PER_STEP"] == groups_per_step  # 128 threads
    assert aot.fits(aot.ResourceReport.of(binary), aot.ARCH_LIMITS[arch])
    assert binary.metadata["spill_stores"] == binary.metadata["spill_loads"] == 0
    [loop] = _loop_bodies(binary.ptx)                       # the K loop (rows M = 1)
    assert "bar.sync" not in loop and "st.shared" not in loop
    assert loop.count(x_load) == 1                           # one vector load of x per thread and trip
    assert len(re.findall(r"\bld\.global\.b32\b", loop)) == 8  # one word per row (BLOCK_N=8), not vectorised
    assert "bar.sync" in binary.ptx                          # the final cross-warp sum, after the loop


@pytest.fixture(scope="module")
def pair_tiles():
    keys = [(bits, per_thread, arch) for bits, per_thread in ((4, 1), (4, 4), (8, 4)) for arch in ARCHS]
    requests = (aot.spec_request(WORD_TILE_SPECS[f"wo_gemv_int{bits}_g128_fp16"], arch,
                                 WORD_TILES.with_(WORD_TILES=2, WORDS_PER_THREAD=per_thread))
                for bits, per_thread, arch in keys)
    return dict(zip(keys, aot.build_many(requests)))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("bits,per_thread,x_load", [(4, 1, "ld.global.v4.b32"), (4, 4, "ld.global.v4.b32"),
                                                    (8, 4, "ld.global.v2.b32")])
def test_fp16_pair_gemv_compiles_to_f16x2_fmas_in_a_barrier_free_loop(pair_tiles, bits, per_thread, x_load, arch):
    """WORD_TILES=2 runs its pair math as inline fma.rn.f16x2 when compiled (the interpreter tests run its
    emulation): per word of the slot and code pair (4 for int4, 2 for int8), one to dequantize and one product
    for each of the BLOCK_N=8 weight rows, plus one to scale x."""
    binary = pair_tiles[bits, per_thread, arch]
    assert isinstance(binary, aot.KernelBinary), binary
    constexprs = binary.metadata["constexprs"]
    assert constexprs["WORD_TILES"] == 2 and constexprs["WORDS_PER_THREAD"] == per_thread
    assert binary.metadata["spill_stores"] == binary.metadata["spill_loads"] == 0
    [loop] = _loop_bodies(binary.ptx)
    assert "bar.sync" not in loop and "st.shared" not in loop
    pairs = 16 // bits
    assert loop.count("fma.rn.f16x2") == per_thread * pairs * (8 * 2 + 1)
    assert loop.count(x_load) == per_thread                    # x: one vector load per word of the slot
    assert len(re.findall(r"\bld\.global\.b16\b", loop)) == 8  # one scale per row and slot
    assert "fma.rn.f16x2" not in binary.ptx.replace(loop, "")  # nothing of it outside the K loop


def test_fp16_pair_gemv_dequantizes_once_for_all_rows():
    """With 4 rows of x the codes are dequantized once per word (4 HFMA2 per weight row), then each x row adds
    its products (4 + 4 for x / 16): one K loop for all rows, where the other designs walk the weights per row."""
    [spec] = [s for s in quant_matmul.aot_specs(torch.float16, rows=4) if s.name == "wo_gemv_int4_g128_fp16"]
    binary = aot.build_many([aot.spec_request(spec, "sm_90", WORD_TILES.with_(WORD_TILES=2))])[0]
    assert isinstance(binary, aot.KernelBinary), binary
    [loop] = _loop_bodies(binary.ptx)
    assert loop.count("fma.rn.f16x2") == 8 * 4 + 4 * (8 * 4 + 4)
    assert loop.count("ld.global.v4.b32") == 4                # one x load per row


def test_loop_check_sees_a_barrier_in_the_loop(word_tiles):
    """fp32 activations give the x tile (32 bytes per thread) a layout of its own, converted in the loop."""
    binary = word_tiles["wo_gemv_int4_g128_fp32", "sm_90"]
    assert isinstance(binary, aot.KernelBinary), binary
    assert any("bar.sync" in loop for loop in _loop_bodies(binary.ptx))


@pytest.mark.parametrize("report,arch,expected", [
    (aot.ResourceReport(64, 0, 0, 100 * 1024, 4), "sm_89", ["shared memory"]),   # 100 KB > 99 KB
    (aot.ResourceReport(64, 0, 0, 100 * 1024, 4), "sm_90", []),
    (aot.ResourceReport(64, 0, 0, 200 * 1024, 4), "sm_80", ["shared memory"]),   # 200 KB > 163 KB
    (aot.ResourceReport(300, 0, 0, 0, 4), "sm_90", ["registers per thread"]),
    (aot.ResourceReport(255, 0, 0, 0, 16), "sm_90", ["registers per block"]),    # 255 x 512 > 64K
    (aot.ResourceReport(32, 0, 0, 0, 64), "sm_80", ["threads per block"]),
])
def test_fits_reports_each_exceeded_limit(report, arch, expected):
    found = aot.violations(report, aot.ARCH_LIMITS[arch])
    assert len(found) == len(expected) and all(e in f for e, f in zip(expected, found))
    assert aot.fits(report, aot.ARCH_LIMITS[arch]) == (not expected)


def test_save_and_load_round_trip_without_pickle(built, tmp_path):
    binary = built["swiglu_fp16", "sm_90"]
    aot.save(binary, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{binary.name}.{e}" for e in ("cubin", "json", "ptx"))
    loaded = aot.load(tmp_path, binary.name)
    assert loaded == binary
    cubin = tmp_path / f"{binary.name}.cubin"
    data = cubin.read_bytes()
    cubin.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))  # tamper with one byte
    with pytest.raises(ArtifactError, match="sha256"):
        aot.load(tmp_path, binary.name)
    with pytest.raises(ArtifactError):
        aot.load(tmp_path, "missing_kernel")
    with pytest.raises(ArtifactError):
        aot.load(tmp_path, "../escape")


@triton.jit
def _scaled(v, factor):
    return v * factor


@triton.jit
def _strided_scale_kernel(x_ptr, out_ptr, n, stride, factor, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, _scaled(tl.load(x_ptr + offs * stride, mask=mask), factor), mask=mask)


def test_build_is_generic_over_any_jit_function_with_helpers_and_unit_stride():
    signature = {"x_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32", "factor": "fp32"}
    binary = aot.build(_strided_scale_kernel, signature, {"stride": 1}, KernelConfig.make(num_warps=2, BLOCK=256),
                       "sm_89", divisible_by_16=["n"])
    assert ".target sm_89" in binary.ptx and binary.metadata["constexprs"] == {"stride": 1, "BLOCK": 256}
    assert binary.metadata["divisible_by_16"] == ["n"] and binary.metadata["num_warps"] == 2
    assert "ld.global.v4" in binary.ptx  # unit stride + 16-divisibility hints: vectorised loads


@pytest.mark.parametrize("call,error", [
    (lambda: aot.build(_strided_scale_kernel, {"x_ptr": "*fp32"}, {}, KernelConfig.make(BLOCK=64), "sm_90"),
     LmforgeError),                                                              # arguments without a type
    (lambda: aot.build(_strided_scale_kernel, {"nope": "i32"}, {}, KernelConfig.make(BLOCK=64), "sm_90"),
     LmforgeError),                                                              # unknown argument
    (lambda: aot.build_spec(SPECS["swiglu_fp16"], "sm_75"), TargetError),        # unknown architecture
])
def test_build_errors(call, error):
    with pytest.raises(error):
        call()


# ---- portable builds: cubins a CUDA 12 driver loads ------------------------------------------------------------

SCALE_SIGNATURE = {"x_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32", "factor": "fp32"}
SCALE_CONFIG = KernelConfig.make(num_warps=4, BLOCK=256)
CUDA12_ELF_ABI = 7          # e_ident[EI_ABIVERSION] of CUDA 12 cubins; CUDA 13's ptxas writes 8


@pytest.fixture(scope="module")
def portable_or_not():
    """The strided-scale kernel for sm_80 and sm_90, portable and with Triton's defaults, interleaved in one build
    process (so a portable build that left Triton's ptxas switched would show in the default build after it)."""
    keys = [(arch, portable) for arch in ARCHS for portable in (True, False)]
    requests = [aot.BuildRequest(_strided_scale_kernel, SCALE_SIGNATURE, {"stride": 1}, SCALE_CONFIG, arch, ("n",),
                                 None, portable) for arch, portable in keys]
    return dict(zip(keys, aot.build_many(requests)))


def _ptx_isa(ptx: str) -> str:
    return re.search(r"^\s*\.version\s+(\d+\.\d+)", ptx, flags=re.MULTILINE).group(1)


@pytest.mark.parametrize("arch", ARCHS)
def test_portable_builds_emit_ptx_8_7_assembled_by_a_cuda_12_ptxas(portable_or_not, arch):
    binary, default = portable_or_not[arch, True], portable_or_not[arch, False]
    assert isinstance(binary, aot.KernelBinary) and isinstance(default, aot.KernelBinary), (binary, default)
    meta = binary.metadata
    assert _ptx_isa(binary.ptx) == meta["ptx_version"] == "8.7" and PTX_TARGET[arch] in binary.ptx
    assert meta["ptxas_version"].startswith("12.") and meta["portable"] is True
    assert binary.cubin[:4] == b"\x7fELF" and binary.cubin[8] == CUDA12_ELF_ABI
    assert 1 <= meta["registers"] <= 255 and meta["constexprs"] == default.metadata["constexprs"]
    assert binary.name != default.name                           # both fit in one directory
    # the default build after it uses Triton's own choice again, and records what that was
    capability = aot.ARCH_LIMITS[arch].capability
    assert default.metadata["portable"] is False
    assert default.metadata["ptxas_version"] == aot.ptxas_version(aot._ptxas_path(capability))
    assert _ptx_isa(default.ptx) == default.metadata["ptx_version"]


def _ptxas_of_cuda_12_8():
    """A ptxas of CUDA 12.8 (the one Triton 3.6 bundles: what the GPU machines' JIT uses), or None."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    candidates = sorted(root.glob(".venv-triton36/lib/python3*/site-packages/triton/backends/nvidia/bin/ptxas"))
    candidates.append(Path(aot._ptxas_path(80)))
    return next((str(p) for p in candidates if p.is_file() and aot.ptxas_version(str(p)) == "12.8"), None)


@pytest.mark.parametrize("arch", ARCHS)
def test_portable_ptx_is_accepted_by_the_cuda_12_8_ptxas(portable_or_not, arch, tmp_path):
    import subprocess

    ptxas = _ptxas_of_cuda_12_8()
    if ptxas is None:
        pytest.skip("no CUDA 12.8 ptxas here (.venv-triton36 holds one)")
    binary = portable_or_not[arch, True]
    src = tmp_path / "k.ptx"
    src.write_text(binary.ptx)
    gpu = f"{arch}a" if arch == "sm_90" else arch
    proc = subprocess.run([ptxas, f"-arch={gpu}", str(src), "-o", str(tmp_path / "k.cubin")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "k.cubin").read_bytes()[8] == CUDA12_ELF_ABI


def test_the_portable_ptxas_switch_is_undone():
    import os

    before = aot._ptxas_path(90), os.environ.get("TRITON_PTXAS_BLACKWELL_PATH")
    with aot._cuda12_ptxas(90) as ptxas:
        assert aot._ptxas_path(90) == ptxas and aot.ptxas_version(ptxas).startswith("12.")
    assert (aot._ptxas_path(90), os.environ.get("TRITON_PTXAS_BLACKWELL_PATH")) == before


def test_a_portable_build_refuses_a_ptxas_that_is_not_cuda_12(monkeypatch):
    newest = aot._ptxas_path(100)                         # Triton's Blackwell ptxas: CUDA 13 in Triton 3.9
    if aot.ptxas_version(newest).startswith("12."):
        pytest.skip(f"this Triton's newest ptxas is CUDA {aot.ptxas_version(newest)}")
    monkeypatch.setenv("TRITON_PTXAS_PATH", newest)
    with pytest.raises(LmforgeError, match=r"is CUDA 13\.\d+, not CUDA 12\.8 - 12\.x.*TRITON_PTXAS_PATH"):
        with aot._cuda12_ptxas(90):
            pass


def test_a_record_without_the_toolchain_versions_still_loads(portable_or_not, tmp_path):
    binary = portable_or_not["sm_90", True]
    old = aot.KernelBinary(binary.name, binary.arch, binary.ptx, binary.cubin,
                           {k: v for k, v in binary.metadata.items()
                            if k not in ("ptx_version", "ptxas_version", "portable")})
    aot.save(old, tmp_path)
    assert aot.load(tmp_path, binary.name) == old


def test_the_block_selection_kernel_builds_without_spills():
    """attention_decode._select_blocks_kernel (the Triton alternative to torch.topk for block top-k) compiles
    for both archs: a uint32 bit-by-bit threshold search and a prefix-sum compaction, no local memory."""
    from lmforge.backends.triton import attention_decode

    signature = {"SCORES": "*fp32", "OUT": "*i64", "n_blocks": "i32", "keep": "i32", "stride_sb": "i32",
                 "stride_sh": "i32", "stride_ob": "i32", "stride_oh": "i32", "HKV": "i32"}
    requests = [aot.BuildRequest(attention_decode._select_blocks_kernel, signature,
                                 {"CHUNK": attention_decode.SELECT_CHUNK}, KernelConfig.make(num_warps=4), arch,
                                 ("SCORES", "OUT")) for arch in ARCHS]
    for arch, binary in zip(ARCHS, aot.build_many(requests)):
        assert isinstance(binary, aot.KernelBinary), binary
        report = aot.ResourceReport.of(binary)
        assert report.spill_stores == report.spill_loads == report.stack_bytes == 0 and PTX_TARGET[arch] in binary.ptx


# ---- attention: every kernel variant an artifact ships, built with its default config for each arch ---------------

ATTENTION_ARCHS = ["sm_80", "sm_89", "sm_90"]
# bfloat16 is left out: it has float16's tiles and MMA shapes, and built for these archs it passed and failed
# exactly where float16 does, while doubling the batch (60 builds: ~2 min from a cold cache;
# float16 alone: 30 builds, ~45 s cold, ~10 s with Triton's cache warm).
ATTENTION_DTYPES = ["float16"]


def _attention_graph(dtype: str):
    """One node per attention launch mode, at the usual head dim (128: the largest tiles) with GQA (32 query heads
    over 8 KV heads) and symbolic batch / lengths as in a served model:
        causal prefill over a symbolic Sq   prefill (causal), decode.split + merge (one query row)
        window + sinks prefill              prefill (window mode)
        block_sparse_attention              sparse (flash prefill, SPARSE mode, tiles clamped to 64)
        block_topk_attention                topk.score, topk.split (sparse), merge
        shared_prefix_attention             prefix.split.m16 / .m32 / .m64 (batch-many rows), suffix.split, merge
    """
    from lmforge.ir.graph import GraphBuilder, TensorType

    b = GraphBuilder("attention_variants")

    def t(name, shape, kind=dtype):
        return b.input(name, TensorType(shape, kind))

    qp, kp, vp = t("qp", (1, 32, "seq", 128)), t("kp", (1, 8, "seq", 128)), t("vp", (1, 8, "seq", 128))
    q, k, v = t("q", ("batch", 32, 1, 128)), t("k", ("batch", 8, "past", 128)), t("v", ("batch", 8, "past", 128))
    kpre, vpre = t("kpre", (1, 8, "prefix", 128)), t("vpre", (1, 8, "prefix", 128))
    mask = t("mask", (1, 8, "nb", "nb"), "bool")
    outs = [b.op("attention", [qp, kp, vp], {"causal": True}),
            b.op("attention", [qp, kp, vp], {"causal": True, "window": 128, "sinks": 4}),
            b.op("block_sparse_attention", [qp, kp, vp, mask], {"block_size": 64}),
            b.op("block_topk_attention", [q, k, v], {"block_size": 64, "topk_blocks": 8}),
            b.op("shared_prefix_attention", [q, kpre, vpre, k, v], {})]
    return b.build(outs)


def _attention_variants(dtype: str) -> dict[str, object]:
    """{"<op>[<mode>].<variant key>": Variant} with the default configs (launch_specs.spec_for(node).variants)."""
    from lmforge.backends.triton import launch_specs

    out = {}
    for node in _attention_graph(dtype).nodes:
        mode = "window" if node.attr.get("window") else ""
        for variant in launch_specs.spec_for(node).variants(node, {}):
            out[f"{node.op}{f'[{mode}]' if mode else ''}.{variant.key}"] = variant
    return out


ATTENTION_VARIANTS = sorted(_attention_variants("float16"))


@pytest.fixture(scope="module")
def attention_builds():
    """Every attention variant for every arch and dtype, built as an artifact builds it (portable), in one batch;
    variants that are the same kernel (the merge of decode, top-k and shared prefix) are built once."""
    import time

    jobs, requests = {}, {}
    for dtype in ATTENTION_DTYPES:
        for key, v in _attention_variants(dtype).items():
            for arch in ATTENTION_ARCHS:
                same = (arch, v.kernel, json.dumps([sorted(v.signature.items()), sorted(map(str, v.constexprs.items())),
                                                    v.config.to_dict(), sorted(v.divisible_by_16)]))
                requests.setdefault(same, aot.BuildRequest(v.fn, dict(v.signature), dict(v.constexprs), v.config,
                                                           arch, tuple(v.divisible_by_16), portable=True))
                jobs[dtype, key, arch] = (same, v)
    start = time.perf_counter()
    results = dict(zip(requests, aot.build_many(requests.values())))
    print(f"\n{len(requests)} attention builds in {time.perf_counter() - start:.1f} s")
    return {job: (v, results[same]) for job, (same, v) in jobs.items()}


def test_the_attention_graph_has_every_variant():
    keys = {k.split(".", 1)[1] for k in ATTENTION_VARIANTS}
    assert keys == {"prefill", "decode.split", "merge", "sparse", "topk.score", "topk.split", "prefix.split.m16",
                    "prefix.split.m32", "prefix.split.m64", "suffix.split"}
    assert "attention[window].prefill" in ATTENTION_VARIANTS and "attention.prefill" in ATTENTION_VARIANTS


@pytest.mark.parametrize("dtype", ATTENTION_DTYPES)
@pytest.mark.parametrize("key,arch", [(key, arch) for key in ATTENTION_VARIANTS for arch in ATTENTION_ARCHS])
def test_every_attention_variant_builds_with_its_default_config_without_spills(attention_builds, key, dtype, arch):
    """Built as an artifact builds it: it compiles, fits the arch's per-block limits (aot.violations) and does
    not spill registers, with the warps and stages of the config the launcher runs."""
    variant, binary = attention_builds[dtype, key, arch]
    assert isinstance(binary, aot.KernelBinary), binary      # else: the compiler's message
    report = aot.ResourceReport.of(binary)
    assert aot.violations(report, aot.ARCH_LIMITS[arch]) == []
    assert report.spill_stores == report.spill_loads == 0, report
    assert report.num_warps == variant.config.num_warps and binary.metadata["num_stages"] == variant.config.num_stages
