"""Check the exported CUDA kernels on a real GPU without TVM there: export here, run there.

Here (TVM, no GPU needed):

    .venv/bin/python -m lmforge.backends.tvm.gpu_check export DIR [--arch sm_90]

builds a table of cases (linear, linear_wo int4/int8, rope, rmsnorm, softmax, attention, embedding, fused
SwiGLU) for the arch, and writes DIR/cases.json (per case: the .cu file, every kernel's entry point, grid,
block and parameter list, the buffers with shapes and roles), the CUDA sources, the PTX where nvcc is
installed, and DIR/tensors.pt (inputs and the torch reference outputs). Launch dimensions come from the
thread bindings of the scheduled TIR with the case's symbolic sizes substituted; scratch buffers that TVM's
host code would allocate between kernels are listed with their shapes.

There (a CUDA GPU with torch; no lmforge, no TVM):

    python lmforge/backends/tvm/cuda_runner.py DIR

compiles each source with NVRTC (from the torch install), launches the kernels through the CUDA driver API
on torch tensors and compares with the reference outputs (see cuda_runner.py).
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
from pathlib import Path

import torch

from lmforge.backends.tvm.backend import kernel_class
from lmforge.backends.tvm.build import BuildCache
from lmforge.backends.tvm.knobs import resolve
from lmforge.backends.tvm.schedule_gpu import schedule_gpu
from lmforge.backends.tvm.target import cuda_target
from lmforge.backends.tvm.tune import OpInstance

_PARAM = re.compile(r"(?:(?P<type>[\w ]+?)\s*\*\s*(?:__restrict__\s*)?(?P<ptr>\w+)_ptr|(?P<stype>int|long long)\s+(?P<var>\w+))")


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _swiglu_case():
    from lmforge.ir.graph import GraphBuilder
    from lmforge.ir.types import TensorType
    from lmforge.passes import fuse_elementwise

    b = GraphBuilder("swiglu")
    gate, up = b.input("gate", TensorType((8, 704))), b.input("up", TensorType((8, 704)))
    node = fuse_elementwise(b.build([b.op("mul", [b.op("silu", [gate]), up])])).nodes[0]
    return OpInstance(node, (_randn(8, 704, seed=1), _randn(8, 704, seed=2)))


def cases() -> dict[str, OpInstance]:
    """The GPU check cases: inputs already in the layout of each kernel's GPU lowering (2-D x for linears)."""
    from lmforge.ir.ops.quant_ref import quantize_weight

    out = {
        "linear_gemv": OpInstance.make("linear", [_randn(1, 256, seed=3), _randn(1024, 256, seed=4), None]),
        "linear_rows8_bias": OpInstance.make("linear", [_randn(8, 256, seed=5), _randn(512, 256, seed=6),
                                                        _randn(512, seed=7)]),
        "linear_gemm": OpInstance.make("linear", [_randn(96, 256, seed=8), _randn(384, 256, seed=9), None]),
        "swiglu_fused": _swiglu_case(),
        "rope": OpInstance.make("rope", [_randn(2, 8, 4, 32, seed=10), _randn(4, 32, seed=11), _randn(4, 32, seed=12)]),
        "rmsnorm": OpInstance.make("rmsnorm", [_randn(4, 3, 256, seed=13), _randn(256, seed=14)], {"eps": 1e-5}),
        "softmax": OpInstance.make("softmax", [_randn(6, 100, seed=15)], {"dim": -1}),
        "attention_decode": OpInstance.make("attention", [_randn(2, 8, 1, 32, seed=16), _randn(2, 4, 40, 32, seed=17),
                                                          _randn(2, 4, 40, 32, seed=18)]),
        "attention_causal": OpInstance.make("attention", [_randn(1, 4, 16, 32, seed=19), _randn(1, 4, 16, 32, seed=20),
                                                          _randn(1, 4, 16, 32, seed=21)], {"causal": True}),
        "embedding": OpInstance.make("embedding", [torch.randint(0, 100, (3, 5), generator=torch.Generator()
                                                                 .manual_seed(22)), _randn(100, 64, seed=23)]),
    }
    for bits, group, rows in ((8, 64, 1), (4, 32, 4)):
        qw = quantize_weight(_randn(512, 256, seed=24 + bits), bits, group)
        out[f"linear_wo_int{bits}"] = OpInstance.make(
            "linear_wo", [_randn(rows, 256, seed=30 + bits), qw.qweight, qw.scales, qw.zeros],
            {"bits": bits, "group_size": group})
    return out


def _bind_sizes(lowered, tensors: list[torch.Tensor]) -> dict:
    """Symbolic size var -> its value, read off the placeholders' shapes against the concrete tensors."""
    from tvm import tirx

    sizes = {}
    for placeholder, tensor in zip(lowered.inputs + lowered.outputs, tensors):
        for dim, value in zip(placeholder.shape, tensor.shape):
            if isinstance(dim, tirx.Var):
                sizes[dim] = int(value)
    return sizes


def _evaluate(expr, sizes: dict) -> int:
    from tvm.sym.analyzer import Analyzer

    analyzer = Analyzer()
    for var, value in sizes.items():
        analyzer.bind(var, value)
    return int(analyzer.simplify(expr))


def launch_table(func, sizes: dict) -> list[dict]:
    """Per kernel (the root block's thread-bound loop nests, in order): grid and block dimensions."""
    import tvm_ffi
    from tvm import tirx

    body = func.body.block.body
    nests = list(body.seq) if isinstance(body, tirx.stmt.SeqStmt) else [body]
    kernels = []
    for nest in nests:
        dims: dict[str, int] = {}

        def visit(loop):
            binding = loop.thread_binding
            if binding is not None and not binding.thread_tag.startswith("vthread"):
                dims.setdefault(binding.thread_tag, _evaluate(loop.extent, sizes))

        tvm_ffi.structural_walk(nest, [(tirx.stmt.For, visit)], order="pre")
        if dims:
            kernels.append({"grid": [dims.get(f"blockIdx.{a}", 1) for a in "xyz"],
                            "block": [dims.get(f"threadIdx.{a}", 1) for a in "xyz"]})
    return kernels


def kernel_params(source: str) -> dict[str, list]:
    """Entry point -> parameters: ["ptr", buffer name, C type] or ["int", size var name], in order."""
    out = {}
    for m in re.finditer(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(([^)]*)\)\s*\{', source):
        params = []
        for p in m.group(2).split(","):
            pm = _PARAM.search(p.strip())
            if pm.group("ptr"):
                params.append(["ptr", pm.group("ptr"), pm.group("type").strip()])
            else:
                params.append(["int", pm.group("var")])
        out[m.group(1)] = params
    return out


def export_case(name: str, inst: OpInstance, arch: str, out_dir: Path, values: dict,
                ptx: bool = True) -> tuple[dict, dict]:
    import tvm

    target = cuda_target(arch, int(values["tvm.cuda.threads"]))
    kernel = kernel_class(inst.node)(inst.node, values, BuildCache(), target)
    lowered = kernel.lower_gpu()
    symbol = f"lmforge_{name}"
    mod = tvm.IRModule({symbol: lowered.prim_func().with_attr("global_symbol", symbol)})
    scheduled = schedule_gpu(mod, lowered, values, target)
    # without CSE, kernel parameters are the size vars themselves (not host-computed temporaries)
    with tvm.transform.PassContext(config={"tirx.disable_cse_tir": True}):
        source = tvm.compile(scheduled, target=tvm.target.Target(target)).mod.imports[0].inspect_source()
    expected = inst.run_reference()
    expected = list(expected) if isinstance(expected, tuple) else [expected]
    inputs = [t for t in inst.inputs if t is not None]
    sizes = _bind_sizes(lowered, inputs + expected)
    func = scheduled[symbol]
    params = kernel_params(source)
    launches = launch_table(func, sizes)
    if len(launches) != len(params):
        raise RuntimeError(f"{name}: {len(launches)} thread-bound nests but {len(params)} kernels in the source")
    buffers = {str(p.name): {"role": "input", "shape": [int(s) for s in t.shape], "dtype": str(t.dtype)}
               for p, t in zip(lowered.inputs, inputs)}
    buffers.update({str(p.name): {"role": "output", "shape": [int(s) for s in t.shape], "dtype": str(t.dtype)}
                    for p, t in zip(lowered.outputs, expected)})
    for buf in func.body.block.alloc_buffers:
        if buf.scope() != "global":
            continue  # registers / shared memory live inside the kernels
        buffers[str(buf.name)] = {"role": "scratch", "shape": [_evaluate(s, sizes) for s in buf.shape],
                             "dtype": f"torch.{buf.dtype}"}
    size_values = {str(var.name): value for var, value in sizes.items()}
    kernels = []
    for (entry, plist), launch in zip(params.items(), launches):
        kernels.append({"entry": entry, **launch, "params": [
            [str(x) for x in p] if p[0] == "ptr" else ["int", p[1], size_values[p[1]]] for p in plist]})
    (out_dir / f"{name}.cu").write_text(source)
    if ptx:
        _write_ptx(out_dir / f"{name}.cu", arch)
    case = {"op": inst.node.op, "file": f"{name}.cu", "kernels": kernels, "buffers": buffers}
    tensors = {"inputs": {str(p.name): t for p, t in zip(lowered.inputs, inputs)},  # plain str: weights_only load
               "expected": {str(p.name): t for p, t in zip(lowered.outputs, expected)}}
    return case, tensors


def _write_ptx(cu: Path, arch: str) -> None:
    """PTX beside the source when nvcc is here (the runner's fallback where NVRTC is missing)."""
    if shutil.which("nvcc") is None:
        return
    subprocess.run(["nvcc", f"-arch={arch}", "-ptx", str(cu), "-o", str(cu.with_suffix(".ptx"))],
                   capture_output=True, timeout=300, check=False)


def export(out_dir: str | Path, arch: str = "sm_90", config: dict | None = None, only: str | None = None,
           ptx: bool = True) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    values = resolve(config)
    manifest: dict = {"arch": arch, "cases": {}, "errors": {}}
    tensors = {}
    for name, inst in cases().items():
        if only and only not in name:
            continue
        try:
            manifest["cases"][name], tensors[name] = export_case(name, inst, arch, out_dir, values, ptx)
        except Exception as e:  # keep the other cases
            manifest["errors"][name] = f"{type(e).__name__}: {e}"
    (out_dir / "cases.json").write_text(json.dumps(manifest, indent=1))
    torch.save(tensors, out_dir / "tensors.pt")
    return manifest


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="export TVM CUDA kernels and their test tensors for cuda_runner.py")
    p.add_argument("command", choices=["export"])
    p.add_argument("dir")
    p.add_argument("--arch", default="sm_90")
    p.add_argument("--only")
    args = p.parse_args(argv)
    manifest = export(args.dir, args.arch, only=args.only)
    print(f"exported {len(manifest['cases'])} cases to {args.dir}; errors: {manifest['errors'] or 'none'}")


if __name__ == "__main__":
    main()
