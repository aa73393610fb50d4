"""Run the CUDA kernels exported by `gpu_check export` on the GPU at hand: torch + the CUDA driver, no TVM.

    python lmforge/backends/tvm/cuda_runner.py DIR [--repeat 50]

Standalone on purpose (only torch, ctypes and the standard library): the GPU machine need not have TVM or
lmforge installed. For each case of DIR/cases.json: compile the source with NVRTC for the GPU's compute
capability (TVM's NVRTC prelude is swapped for plain typedefs, so no CUDA headers are needed; the .ptx
beside it is the fallback where NVRTC is missing), allocate the inputs (DIR/tensors.pt), outputs and
scratch buffers on the GPU, launch every kernel in order with cuLaunchKernel, and compare the outputs with
the torch reference (allclose, max abs error). Then time the whole case with CUDA events. Prints a table and
writes runner.json to $OUT when it is set. Exits 0 without a GPU.

`prepare_case` is the reusable part (compile, load and allocate once; `launch_all()` on torch's current
stream): benchmarks/gpu_cases/tvm.py builds benchmarks/gpu_check.py's cases from it.
"""
from __future__ import annotations

import argparse
import ctypes
import glob
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple

PRELUDE = """typedef signed char int8_t; typedef unsigned char uint8_t; typedef short int16_t;
typedef unsigned short uint16_t; typedef int int32_t; typedef unsigned int uint32_t;
typedef long long int64_t; typedef unsigned long long uint64_t;
"""


def _check(lib, code: int, what: str) -> None:
    if code != 0:
        msg = ctypes.c_char_p()
        if hasattr(lib, "cuGetErrorString"):
            lib.cuGetErrorString(code, ctypes.byref(msg))
        raise RuntimeError(f"{what} failed: CUDA error {code} {msg.value.decode() if msg.value else ''}")


def find_nvrtc():
    """libnvrtc from the system or from the nvidia-* wheels torch depends on; None if absent."""
    names = ["libnvrtc.so", "libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so.11.2"]
    for path in sys.path:
        names += sorted(glob.glob(os.path.join(path, "nvidia", "**", "libnvrtc.so*"), recursive=True))
    for name in names:
        if "builtins" in name or "alt" in os.path.basename(name):
            continue
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


MATH_CONSTANTS = """#define CUDART_INF_F __int_as_float(0x7f800000)
#define CUDART_NAN_F __int_as_float(0x7fffffff)
"""


def strip_rtc_prelude(source: str, prelude: str = PRELUDE) -> str:
    """Make a TVM source header-free for NVRTC: its `#ifdef __CUDACC_RTC__ ... #endif` block (cuda/std
    includes) becomes `prelude`, and <math_constants.h> the two constants TVM uses from it."""
    start = source.find("#ifdef __CUDACC_RTC__")
    if start >= 0:
        end = source.find("#endif", source.find("#include <cuda.h>", start))
        source = source[:start] + prelude + source[end + len("#endif"):]
    return source.replace("#include <math_constants.h>", MATH_CONSTANTS)


def nvrtc_compile(nvrtc, source: str, arch: str) -> bytes:
    prog = ctypes.c_void_p()
    _nvrtc_ok(nvrtc, nvrtc.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"kernel.cu", 0, None, None),
              "nvrtcCreateProgram")
    opts = [f"--gpu-architecture={arch}".encode(), b"-default-device", b"--std=c++17"]
    arr = (ctypes.c_char_p * len(opts))(*opts)
    code = nvrtc.nvrtcCompileProgram(prog, len(opts), arr)
    if code != 0:
        size = ctypes.c_size_t()
        nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        nvrtc.nvrtcGetProgramLog(prog, log)
        raise RuntimeError(f"NVRTC failed ({code}): {log.value.decode()[-2000:]}")
    size = ctypes.c_size_t()
    _nvrtc_ok(nvrtc, nvrtc.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "nvrtcGetCUBINSize")
    cubin = ctypes.create_string_buffer(size.value)
    _nvrtc_ok(nvrtc, nvrtc.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
    nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))
    return cubin.raw


def _nvrtc_ok(nvrtc, code: int, what: str) -> None:
    if code != 0:
        nvrtc.nvrtcGetErrorString.restype = ctypes.c_char_p
        raise RuntimeError(f"{what}: {nvrtc.nvrtcGetErrorString(code).decode()}")


class Driver:
    """The few CUDA driver calls needed, in torch's current context."""

    def __init__(self):
        self.lib = ctypes.CDLL("libcuda.so.1")
        self.lib.cuLaunchKernel.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [ctypes.c_void_p] * 3

    def load(self, image: bytes, entries: list[str]) -> dict:
        module = ctypes.c_void_p()
        _check(self.lib, self.lib.cuModuleLoadData(ctypes.byref(module), ctypes.c_char_p(image)), "cuModuleLoadData")
        funcs = {}
        for name in entries:
            fn = ctypes.c_void_p()
            _check(self.lib, self.lib.cuModuleGetFunction(ctypes.byref(fn), module, name.encode()),
                   f"cuModuleGetFunction({name})")
            funcs[name] = fn
        return funcs

    def current_stream(self) -> int:
        """torch's current CUDA stream, read at each call: inside `torch.cuda.graph(...)` it is the capture
        stream, so launches made there are captured into the graph."""
        import torch

        return torch.cuda.current_stream().cuda_stream

    def launch(self, fn, grid, block, args: list, stream: int) -> None:
        holders = [ctypes.c_void_p(a) if isinstance(a, PtrArg) else ctypes.c_int(a) for a in args]
        params = (ctypes.c_void_p * len(holders))(*[ctypes.cast(ctypes.byref(h), ctypes.c_void_p) for h in holders])
        _check(self.lib, self.lib.cuLaunchKernel(fn, *grid, *block, 0, ctypes.c_void_p(stream), params, None),
               "cuLaunchKernel")


class PtrArg(int):
    """A device pointer argument (an int subclass, to tell it from int size arguments)."""


RTOL = ATOL = 1e-4  # the exported kernels compute in fp32, as the torch reference does


class PreparedCase(NamedTuple):
    """One exported case compiled, loaded and allocated on the GPU, ready to launch any number of times."""

    launch_all: Callable[[], None]  # launches every kernel of the case in order on torch's current stream
    outputs: dict                   # output buffer name -> device tensor the kernels write
    expected: dict                  # output buffer name -> the torch reference, on the same device
    compiled_with: str              # "nvrtc" (source compiled here) or "ptx" (nvcc's PTX from the export)
    kernels: int
    buffers: dict                   # every buffer (inputs, outputs, scratch) by name: alive as long as this is


def compile_case(case: dict, source_dir: Path, nvrtc, arch: str) -> tuple[bytes, str]:
    """(module image, "nvrtc" | "ptx"): the case's source through NVRTC, else the .ptx exported beside it."""
    source_file = Path(source_dir) / case["file"]
    if nvrtc is not None:
        return nvrtc_compile(nvrtc, strip_rtc_prelude(source_file.read_text()), arch), "nvrtc"
    return source_file.with_suffix(".ptx").read_bytes() + b"\0", "ptx"


def allocate_buffers(case: dict, tensors: dict, device: str = "cuda") -> dict:
    """Buffer name -> tensor on `device`: inputs copied from `tensors`, outputs filled with NaN (so an element
    no kernel writes shows up), scratch zeroed."""
    import torch

    dev = {}
    scratch_numel = max([_numel(b["shape"]) for b in case["buffers"].values() if b["role"] == "scratch"] or [0])
    for buf, spec in case["buffers"].items():
        if spec["role"] == "input":
            dev[buf] = tensors["inputs"][buf].to(device).contiguous()  # kernels index it densely
        elif spec["role"] == "output":
            dev[buf] = torch.full(spec["shape"], float("nan"), device=device).to(_dtype(spec["dtype"]))
        else:  # TVM may pack several scratch buffers into one: give each the largest size
            dev[buf] = torch.zeros(scratch_numel, dtype=_dtype(spec["dtype"]), device=device)
    return dev


def kernel_args(kernel: dict, dev: dict) -> list:
    """The launch arguments of one kernel of cases.json: PtrArg(data_ptr) per buffer, int per size."""
    return [PtrArg(dev[p[1]].data_ptr()) if p[0] == "ptr" else int(p[2]) for p in kernel["params"]]


def prepare_case(case: dict, tensors: dict, source_dir: Path, drv: Driver, nvrtc, arch: str,
                 device: str = "cuda") -> PreparedCase:
    """Compile and load the case's kernels once and allocate its buffers once; `launch_all()` then runs
    every kernel in order on the stream current at that call (so it can be captured in a CUDA graph)."""
    image, how = compile_case(case, source_dir, nvrtc, arch)
    funcs = drv.load(image, [k["entry"] for k in case["kernels"]])
    dev = allocate_buffers(case, tensors, device)
    launches = [(funcs[k["entry"]], k["grid"], k["block"], kernel_args(k, dev)) for k in case["kernels"]]

    def launch_all(buffers=dev) -> None:  # holds `dev`: the launches point into its tensors
        stream = drv.current_stream()
        for fn, grid, block, args in launches:
            drv.launch(fn, grid, block, args, stream)

    outputs = {buf: dev[buf] for buf, spec in case["buffers"].items() if spec["role"] == "output"}
    expected = {buf: want.to(device) for buf, want in tensors["expected"].items()}
    return PreparedCase(launch_all, outputs, expected, how, len(launches), dev)


def run_case(name: str, case: dict, tensors: dict, source_dir: Path, drv: Driver, nvrtc, arch: str,
             repeat: int) -> dict:
    import torch

    prepared = prepare_case(case, tensors, source_dir, drv, nvrtc, arch)
    prepared.launch_all()
    torch.cuda.synchronize()
    result = {"compiled_with": prepared.compiled_with, "kernels": prepared.kernels, "ok": True, "max_abs_err": 0.0}
    for buf, want in prepared.expected.items():
        got, want = prepared.outputs[buf].cpu(), want.cpu()
        err = float((got.double() - want.double()).abs().nan_to_num(float("inf")).max()) if want.numel() else 0.0
        result["max_abs_err"] = max(result["max_abs_err"], err)
        result["ok"] &= bool(torch.allclose(got, want, rtol=RTOL, atol=ATOL, equal_nan=True))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        prepared.launch_all()
    end.record()
    torch.cuda.synchronize()
    result["us_per_call"] = start.elapsed_time(end) * 1e3 / repeat
    return result


def _dtype(name: str):
    """torch dtype of a cases.json dtype string ("torch.float32")."""
    import torch

    return getattr(torch, name.removeprefix("torch."))


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def open_export(root: Path):
    """(manifest, tensors, driver, nvrtc or None, this GPU's arch) for an export directory, with torch's primary
    CUDA context made current for the driver calls."""
    import torch

    manifest = json.loads((root / "cases.json").read_text())
    tensors = torch.load(root / "tensors.pt")
    torch.zeros(1, device="cuda")  # makes torch's primary context current on this thread
    major, minor = torch.cuda.get_device_capability()
    return manifest, tensors, Driver(), find_nvrtc(), f"sm_{major}{minor}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="run exported TVM CUDA kernels on this GPU and check them")
    p.add_argument("dir")
    p.add_argument("--repeat", type=int, default=50)
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("no CUDA GPU here: nothing to run")
        return 0
    root = Path(args.dir)
    manifest, tensors, drv, nvrtc, arch = open_export(root)
    print(f"# {torch.cuda.get_device_name()} ({arch}), torch {torch.__version__}, kernels exported for "
          f"{manifest['arch']}, compiled with {'NVRTC' if nvrtc else 'PTX from nvcc'}")
    results = {}
    for name, case in manifest["cases"].items():
        t0 = time.perf_counter()
        try:
            results[name] = run_case(name, case, tensors[name], root, drv, nvrtc, arch, args.repeat)
        except Exception as e:  # report and go on
            results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        results[name]["wall_s"] = time.perf_counter() - t0
    print("| case | op | kernels | ok | max abs err | us/call |\n|---|---|---|---|---|---|")
    for name, r in results.items():
        op = manifest["cases"][name]["op"]
        if "error" in r:
            print(f"| {name} | {op} | - | ERROR | {r['error'][:150]} | - |")
        else:
            print(f"| {name} | {op} | {r['kernels']} | {r['ok']} | {r['max_abs_err']:.2e} | {r['us_per_call']:.1f} |")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "runner.json").write_text(json.dumps(results, indent=1))
    return 0 if all(r.get("ok") for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
