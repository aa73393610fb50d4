"""`TVMBackend`: claims the IR nodes the TVM lowerings cover and runs them as TVM kernels on the host CPU.

    backend = TVMBackend({"tvm.gemv.vec": 16})          # knob values; the rest take their defaults
    compiled = CompiledModel(graph, backends=[backend, TorchReference()])
    print(compiled.inspect())                            # "tvm  gemv rows<=16, else gemm ..." per node
    TVMBackend.cuda_sources(graph, "sm_90")              # CUDA C of every kernel, built without a GPU

claim(node, device) returns a `Kernel` whose callable behaves like the op's torch reference, or None when the
node is outside what the lowerings cover (another op, another dtype, a mask input, a non-CPU device); the
torch reference then runs it. Builds happen on the first call with each set of shapes and are shared by
every node with the same computation (see lmforge.backends.tvm.build).

What is lowered (fp32 unless noted):
  linear, matmul (2-D right operand; batched with equal batch dims), linear_wo (int8 / int4 weights),
  attention (dense, causal, window + sinks, decode with a KV cache, GQA, lse; no mask input),
  block_sparse_attention (causal, over per-query-block lists of kept key blocks made from the block mask),
  rmsnorm (ndim=1), softmax (last axis), rope, embedding (int64 ids), fused elementwise regions and single
  elementwise ops (add, sub, mul, div, pow, maximum, minimum, neg, exp, log, sqrt, rsqrt, abs, sin, cos,
  tanh, sigmoid, relu, silu, reciprocal, gelu, pow_scalar, cast to fp32).
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

from lmforge.backends.codegen import Kernel
from lmforge.backends.tvm.build import BuildCache, OpKernel
from lmforge.backends.tvm.knobs import KNOBS, resolve
from lmforge.backends.tvm.lower_attention import AttentionKernel, BlockSparseAttentionKernel
from lmforge.backends.tvm.lower_elementwise import ELEMENTWISE, ElementwiseKernel
from lmforge.backends.tvm.lower_linalg import BatchedMatmulKernel, LinearKernel, LinearWOKernel, MatmulKernel
from lmforge.backends.tvm.lower_rowwise import EmbeddingKernel, RMSNormKernel, RopeKernel, SoftmaxKernel
from lmforge.backends.tvm.target import cuda_target, host_target
from lmforge.errors import LmforgeError
from lmforge.ir.graph import Graph, Node
from lmforge.passes.base import Knob

# op name -> kernel classes to try, in order (the first whose `supports(node)` holds runs the node)
LOWERINGS: dict[str, tuple[type[OpKernel], ...]] = {
    "linear": (LinearKernel,),
    "linear_wo": (LinearWOKernel,),
    "matmul": (MatmulKernel, BatchedMatmulKernel),
    "attention": (AttentionKernel,),
    "block_sparse_attention": (BlockSparseAttentionKernel,),
    "rmsnorm": (RMSNormKernel,),
    "softmax": (SoftmaxKernel,),
    "rope": (RopeKernel,),
    "embedding": (EmbeddingKernel,),
    "fused": (ElementwiseKernel,),
    **{op: (ElementwiseKernel,) for op in ELEMENTWISE},
}


def kernel_class(node: Node) -> type[OpKernel] | None:
    """The kernel class that lowers `node`, or None when no lowering covers it."""
    for cls in LOWERINGS.get(node.op, ()):
        try:
            if cls.supports(node):
                return cls
        except (AttributeError, IndexError, KeyError, TypeError, ValueError):
            continue  # an attribute or type the lowering does not expect: not ours
    return None


class TVMBackend:
    """Runs the nodes the TVM lowerings cover, built for the host CPU with the given knob values."""

    name = "tvm"

    def __init__(self, config: Mapping[str, Any] | None = None, *, cache: BuildCache | None = None,
                 ops: set[str] | None = None):
        self.config = dict(config or {})
        self.values = resolve(self.config)
        self.target = host_target()
        self.cache = cache if cache is not None else BuildCache()
        self.ops = set(ops) if ops is not None else None  # restrict the claimed ops (A/B comparisons)

    @staticmethod
    def knobs() -> list[Knob]:
        """Every schedule knob of the backend (names start with "tvm.")."""
        return list(KNOBS)

    def claim(self, node: Node, device: str) -> Kernel | None:
        if device != "cpu" or (self.ops is not None and node.op not in self.ops):
            return None
        cls = kernel_class(node)
        if cls is None:
            return None
        kernel = cls(node, self.values, self.cache, self.target)
        return Kernel(kernel, self.name, kernel.describe(), reuse_output=kernel.enable_output_reuse)

    @staticmethod
    def cuda_sources(graph: Graph, arch: str, config: Mapping[str, Any] | None = None) -> dict[str, str]:
        """CUDA C of every kernel the graph's nodes lower to, built for `arch` without a GPU.

        Returns {"<nn>_<op>.cu": source, ..., "kernels.json": index}; the index maps each file to the nodes
        it serves, its kernel entry points and its schedule, and lists the nodes left to the reference.
        Nodes with the same computation share one file.
        """
        from lmforge.backends.tvm.build import compile_lowered

        values = resolve(config)
        target = cuda_target(arch, int(values["tvm.cuda.threads"]))
        schedule = f"{values['tvm.cuda.rules']}, {values['tvm.cuda.threads']} threads/block"
        files: dict[str, str] = {}
        index: dict[str, Any] = {"arch": arch, "kernels": {}, "not_lowered": [], "failed": {}}
        seen: dict[tuple, str] = {}
        for node in graph.nodes:
            cls = kernel_class(node)
            label = node.outputs[0].name if node.outputs else node.op
            if cls is None:
                index["not_lowered"].append(f"{label} ({node.op})")
                continue
            kernel = cls(node, values, BuildCache(), target)
            key = kernel.key()
            if key in seen:
                index["kernels"][seen[key]]["nodes"].append(label)
                continue
            stem = f"{len(seen):02d}_{node.op}"
            try:
                module = compile_lowered(kernel.lower_gpu(), values, target, name=f"lmforge_{stem}")
                source = module.mod.imports[0].inspect_source()
            except Exception as e:  # record and go on: one unsupported schedule must not lose the others
                index["failed"][label] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                continue
            seen[key] = f"{stem}.cu"
            files[seen[key]] = source
            index["kernels"][seen[key]] = {
                "nodes": [label], "op": node.op, "computation": kernel.describe(), "gpu_schedule": schedule,
                "entry_points": _entry_points(source), "sha256": hashlib.sha256(source.encode()).hexdigest()}
        if not files and index["failed"]:
            raise LmforgeError(f"no kernel of graph {graph.name!r} could be built for {arch}: {index['failed']}")
        files["kernels.json"] = json.dumps(index, indent=1, sort_keys=True)
        return files


def _entry_points(source: str) -> list[str]:
    import re

    names = re.findall(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(', source)
    return list(dict.fromkeys(names))  # each kernel is declared, then defined
