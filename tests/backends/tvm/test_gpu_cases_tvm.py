"""benchmarks/gpu_cases/tvm.py and cuda_runner.prepare_case without a GPU: the missing-export error, and every
exported case prepared against a fake CUDA driver that checks each launch's arguments through their raw
addresses (inputs hold the inputs, outputs are the tensors the case returns, sizes are ints) and plays the
kernels by writing the reference outputs where the output pointers point."""
from __future__ import annotations

import ctypes

import pytest
import torch

from benchmarks.gpu_cases import tvm as tvm_cases
from lmforge.errors import LmforgeError


@pytest.fixture(scope="module")
def gpu_export(tmp_path_factory):
    """All GPU check cases exported for sm_90 (no nvcc needed), each with a stand-in .ptx beside its source
    (the runner's fallback where NVRTC is missing; the fake driver only records what it is given)."""
    pytest.importorskip("lmforge.ir.ops.quant_ref", reason="quant_ref (the int4/int8 layout) not present")
    from lmforge.backends.tvm.gpu_check import export

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("gpu_export")
    manifest = export(out, "sm_90", ptx=False)
    for case in manifest["cases"].values():
        (out / case["file"]).with_suffix(".ptx").write_text(f"// stand-in PTX of {case['file']}\n")
    return out, manifest, torch.load(out / "tensors.pt")


class FakeDriver:
    """Driver's interface on the CPU: load() hands out entry names as functions, current_stream() a new
    number at every call, launch() checks the arguments against cases.json and writes the expected outputs."""

    def __init__(self, case: dict, tensors: dict):
        self.case, self.tensors = case, tensors
        self.kernels = {k["entry"]: k for k in case["kernels"]}
        self.loaded, self.launches, self.streams = [], [], 0

    def load(self, image: bytes, entries: list[str]) -> dict:
        self.loaded.append((image, entries))
        return {entry: f"fn:{entry}" for entry in entries}

    def current_stream(self) -> int:
        self.streams += 1
        return 1000 + self.streams

    def launch(self, fn, grid, block, args, stream) -> None:
        runner = tvm_cases.load_cuda_runner()
        kernel = self.kernels[fn.removeprefix("fn:")]
        assert (list(grid), list(block)) == (kernel["grid"], kernel["block"])
        assert len(args) == len(kernel["params"])
        scratch = max([_numel(b["shape"]) for b in self.case["buffers"].values() if b["role"] == "scratch"] or [0])
        for param, arg in zip(kernel["params"], args):
            if param[0] == "int":
                assert type(arg) is int and arg == param[2]
                continue
            assert isinstance(arg, runner.PtrArg) and arg != 0
            spec = self.case["buffers"][param[1]]
            if spec["role"] == "input":
                want = self.tensors["inputs"][param[1]]
                assert ctypes.string_at(int(arg), want.numel() * want.element_size()) == want.numpy().tobytes()
            elif spec["role"] == "output":
                want = self.tensors["expected"][param[1]].contiguous()
                ctypes.memmove(int(arg), want.data_ptr(), want.numel() * want.element_size())
            else:
                assert ctypes.string_at(int(arg), scratch * 4) == bytes(scratch * 4)  # fp32 scratch, zeroed
        self.launches.append((fn, stream))


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def test_missing_export_says_what_to_run(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_TVM_EXPORT", str(tmp_path / "nowhere"))
    with pytest.raises(LmforgeError, match=r"make gpu-export.*carry `\.gpu_export`"):
        tvm_cases.cases(True)  # no CUDA here: the error must come before any CUDA call
    from benchmarks.gpu_check import load_cases

    rows = load_cases(True, "tvm")  # gpu_check turns it into one error row
    assert [r["name"] for r in rows] == ["tvm/*"] and "make gpu-export" in rows[0]["error"]


def test_runner_is_loaded_without_the_tvm_package():
    runner = tvm_cases.load_cuda_runner()
    assert runner.__file__ == str(tvm_cases.RUNNER_PATH) and runner.RTOL == runner.ATOL == 1e-4
    assert runner.__name__ != "lmforge.backends.tvm.cuda_runner"


def test_prepare_case_launches_every_kernel_with_its_buffers(gpu_export):
    out, manifest, tensors = gpu_export
    runner = tvm_cases.load_cuda_runner()
    assert not manifest["errors"] and len(manifest["cases"]) >= 10
    for name, case in manifest["cases"].items():
        drv = FakeDriver(case, tensors[name])
        prepared = runner.prepare_case(case, tensors[name], out, drv, None, "sm_90", device="cpu")
        entries = [k["entry"] for k in case["kernels"]]
        assert drv.loaded == [((out / case["file"]).with_suffix(".ptx").read_bytes() + b"\0", entries)]
        assert prepared.compiled_with == "ptx" and prepared.kernels == len(entries)
        for buf, t in prepared.outputs.items():
            spec = case["buffers"][buf]
            assert spec["role"] == "output" and list(t.shape) == spec["shape"] and str(t.dtype) == spec["dtype"]
            assert t.isnan().all()  # an element no kernel writes shows up as NaN
        prepared.launch_all()
        prepared.launch_all()
        assert [fn for fn, _ in drv.launches] == [f"fn:{e}" for e in entries] * 2, name
        # the stream is read at each launch_all (a CUDA graph capture changes it), once per call
        assert [s for _, s in drv.launches] == [1001] * len(entries) + [1002] * len(entries), name
        for buf, want in prepared.expected.items():
            torch.testing.assert_close(prepared.outputs[buf], want, rtol=0, atol=0)


BASELINES = {"linear": "F.linear", "rmsnorm": "F.rms_norm", "softmax": "torch.softmax", "embedding": "F.embedding"}


def test_gpu_check_cases_from_the_export(gpu_export):
    out, manifest, tensors = gpu_export
    for name, case in manifest["cases"].items():
        drv = FakeDriver(case, tensors[name])
        built = tvm_cases.build_case(name, case, tensors[name], out, drv, None, "sm_90", device="cpu")
        assert built["name"] == f"tvm/{name}" and (built["rtol"], built["atol"]) == (1e-4, 1e-4)
        n = len(case["kernels"])
        assert built["note"] == f"{case['op']}, {n} kernel{'s' if n != 1 else ''}, ptx"
        expected = list(tensors[name]["expected"].values())
        got = built["kernel"]()
        assert len(drv.launches) == n
        torch.testing.assert_close(got, built["reference"](), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(built["reference"](), expected[0] if len(expected) == 1 else
                                   torch.cat([e.reshape(-1) for e in expected]), rtol=0, atol=0)
        io = list(tensors[name]["inputs"].values()) + expected
        assert built["bytes"] == sum(t.numel() * t.element_size() for t in io)
        if case["op"] in ("linear", "linear_wo"):
            x = tensors[name]["inputs"]["x"]
            assert built["flops"] == 2 * expected[0].numel() * x.shape[-1]
        else:
            assert built["flops"] == 0
        if case["op"] in BASELINES:
            assert BASELINES[case["op"]] in built["baseline_name"], name
            # torch's op on the same inputs computes what the exported reference holds
            torch.testing.assert_close(built["baseline"](), built["reference"](), rtol=1e-4, atol=1e-4)
        else:
            assert "baseline" not in built and "baseline_name" not in built, name
    assert {"linear", "rmsnorm", "softmax", "embedding"} <= {c["op"] for c in manifest["cases"].values()}


def test_baseline_is_none_where_the_buffers_do_not_say():
    x = torch.randn(2, 8)
    assert tvm_cases.torch_baseline("attention", {"q": x, "k": x, "v": x}) is None
    assert tvm_cases.torch_baseline("linear", {"x": x, "weight": x}) is None
    fn, _ = tvm_cases.torch_baseline("softmax", {"x": x})
    torch.testing.assert_close(fn(), torch.softmax(x, -1))


def test_markdown_table_without_baseline():
    from benchmarks.gpu_check import markdown_table

    row = {"name": "tvm/rope", "ok": True, "max_abs_err": 1e-7, "rel_l2": 2e-8, "kernel_ms": 0.01,
           "baseline_ms": None, "speedup": None, "kernel_graph_ms": 0.004, "baseline_graph_ms": None,
           "graph_speedup": None, "gb_s": 12.0, "bw_util": None, "tflop_s": 0.0, "note": "rope, 1 kernel, nvrtc"}
    line = markdown_table([row]).splitlines()[-1]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert len(cells) == 15
    assert cells[5:11] == ["-", "-", "-", "0.0040", "-", "-"] and cells[-1] == "rope, 1 kernel, nvrtc"


def test_cases_module_loads_where_tvm_is_missing():
    """On the GPU machine there is no TVM: the case module and the runner must load without it."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys; sys.modules['tvm'] = None\n"  # `import tvm` now raises ImportError
            "from benchmarks.gpu_check import import_lmforge_from_checkout; import_lmforge_from_checkout()\n"
            "from benchmarks.gpu_cases import tvm\n"
            "runner = tvm.load_cuda_runner()\n"
            "assert 'lmforge.backends.tvm' not in sys.modules and runner.prepare_case\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[3], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
