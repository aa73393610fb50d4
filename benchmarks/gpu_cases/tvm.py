"""TVM's CUDA kernels (exported here, where TVM is) checked and timed on the GPU, where TVM is not.

Where TVM is installed, `make gpu-export` (that is, `python -m lmforge.backends.tvm.gpu_check export
.gpu_export/tvm --arch sm_90`) writes the kernels' CUDA sources, their launch table (cases.json) and the
inputs and torch reference outputs (tensors.pt). The GPU run carries `.gpu_export`; this module reads it
(or the directory named by $LMFORGE_TVM_EXPORT) and turns every exported case into a gpu_check case through
lmforge/backends/tvm/cuda_runner.py, loaded by its path (it needs only torch and ctypes: importing it as
`lmforge.backends.tvm.cuda_runner` would run the package __init__, which imports TVM).

The kernels compute in fp32 (tolerances as cuda_runner's, 1e-4). The baseline is torch's own op on the same
input tensors where cases.json's op says plainly what it is (linear, rmsnorm, softmax, embedding); other
cases have none. The cases are small, so `quick` changes nothing.
"""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
RUNNER_PATH = REPO_ROOT / "lmforge" / "backends" / "tvm" / "cuda_runner.py"
DEFAULT_EXPORT = REPO_ROOT / ".gpu_export" / "tvm"
EXPORT_ENV = "LMFORGE_TVM_EXPORT"


def export_dir() -> Path:
    """The export to run: $LMFORGE_TVM_EXPORT, else <repo>/.gpu_export/tvm; an error saying how to make it."""
    from lmforge.errors import LmforgeError

    root = Path(os.environ.get(EXPORT_ENV) or DEFAULT_EXPORT)
    if not (root / "cases.json").is_file() or not (root / "tensors.pt").is_file():
        raise LmforgeError(
            f"no TVM CUDA export at {root} (cases.json and tensors.pt): on a machine with TVM run "
            f"`make gpu-export` (it writes .gpu_export/tvm), then carry `.gpu_export` to the GPU machine with the "
            f"checkout; or point {EXPORT_ENV} at a directory written by "
            f"`python -m lmforge.backends.tvm.gpu_check export DIR --arch sm_90`")
    return root


def load_cuda_runner():
    """lmforge/backends/tvm/cuda_runner.py as a module of its own, without lmforge.backends.tvm's __init__."""
    from lmforge.cache import import_file

    return import_file("lmforge_tvm_cuda_runner", RUNNER_PATH)


def torch_baseline(op: str, inputs: dict):
    """(callable, name) running torch's implementation of `op` on the case's input buffers, or None where
    the op (or its buffer names) does not say plainly what it is."""
    import torch
    import torch.nn.functional as F

    names = set(inputs)
    if op == "linear" and {"x", "w"} <= names <= {"x", "w", "b"}:
        x, w, b = inputs["x"], inputs["w"], inputs.get("b")
        return (lambda: F.linear(x, w, b)), "torch F.linear (fp32)"
    if op == "rmsnorm" and names == {"x", "w"}:
        x, w = inputs["x"], inputs["w"]
        return (lambda: F.rms_norm(x, (x.shape[-1],), w, 1e-5)), "torch F.rms_norm (fp32)"
    if op == "softmax" and names == {"x"}:
        x = inputs["x"]
        return (lambda: torch.softmax(x, -1)), "torch.softmax (fp32)"
    if op == "embedding" and names == {"ids", "w"}:
        ids, w = inputs["ids"], inputs["w"]
        return (lambda: F.embedding(ids, w)), "torch F.embedding"
    return None


def _flops(op: str, inputs: dict, outputs: dict) -> int:
    """2 x (output elements) x K for the linears; 0 for the rest (not trivially known)."""
    if op in ("linear", "linear_wo") and "x" in inputs and len(outputs) == 1:
        return 2 * next(iter(outputs.values())).numel() * int(inputs["x"].shape[-1])
    return 0


def _one_tensor(tensors: list):
    """The case's single output as it is, or several flattened and concatenated."""
    import torch

    return tensors[0] if len(tensors) == 1 else torch.cat([t.reshape(-1) for t in tensors])


def _failing(name: str, message: str) -> dict:
    """A case whose kernel raises `message`, so gpu_check reports it as this case's error row."""

    def kernel():
        raise RuntimeError(message)

    return {"name": name, "kernel": kernel, "reference": kernel, "rtol": 0.0, "atol": 0.0, "bytes": 0, "flops": 0}


def build_case(name: str, case: dict, tensors: dict, root: Path, drv, nvrtc, arch: str, device: str = "cuda") -> dict:
    """The gpu_check case of one exported case: compiled and allocated once, `kernel` launches them all."""
    runner = load_cuda_runner()
    prepared = runner.prepare_case(case, tensors, root, drv, nvrtc, arch, device)
    outputs = list(prepared.outputs.values())
    expected = _one_tensor([prepared.expected[buf] for buf in prepared.outputs])
    inputs = dict(tensors["inputs"])
    nbytes = sum(t.numel() * t.element_size() for t in inputs.values())
    nbytes += sum(t.numel() * t.element_size() for t in outputs)

    def kernel():
        prepared.launch_all()
        return _one_tensor(outputs)

    out = {"name": f"tvm/{name}", "kernel": kernel, "reference": lambda: expected,
           "rtol": runner.RTOL, "atol": runner.ATOL, "bytes": nbytes,
           "flops": _flops(case["op"], inputs, prepared.outputs),
           "note": f"{case['op']}, {prepared.kernels} kernel{'s' if prepared.kernels != 1 else ''}, "
                   f"{prepared.compiled_with}"}
    baseline = torch_baseline(case["op"], {buf: t.to(device) for buf, t in inputs.items()})
    if baseline is not None:
        out["baseline"], out["baseline_name"] = baseline
    return out


def cases(quick: bool) -> list[dict]:
    root = export_dir()  # first: a missing export is reported without touching CUDA
    manifest, tensors, drv, nvrtc, arch = load_cuda_runner().open_export(root)
    out = []
    for name, case in manifest["cases"].items():
        try:
            out.append(build_case(name, case, tensors[name], root, drv, nvrtc, arch))
        except Exception as exc:  # noqa: BLE001 - this case becomes an error row, the others still run
            out.append(_failing(f"tvm/{name}", f"preparing the exported case failed: {type(exc).__name__}: {exc}"))
    for name, error in manifest.get("errors", {}).items():
        out.append(_failing(f"tvm/{name}", f"export failed (exported for {manifest['arch']}): {error}"))
    return out
