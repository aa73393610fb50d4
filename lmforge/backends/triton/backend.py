"""The Triton backend: claims the IR nodes it has kernels for and runs them on a CUDA GPU.

Claims (everything else stays with the torch reference, and `inspect()` shows who runs what); every claimed
node has float16 / bfloat16 / float32 activations (the kernels' dtypes):
    linear_wo                 weight-only int4/int8 GEMV (<= 4 rows) or GEMM, dequantizing in the kernel
                              (group sizes: powers of two >= 16)
    rmsnorm / layernorm       one program per row (last dim)
    softmax                   last dim, not log
    fused(kind='swiglu')      silu(gate) * up in one pass, for gate and up of one type (shape and dtype: no
                              broadcasting, e.g. not silu(x) * w for a weight w [D])
    fused (any other)         one kernel generated from the region's elementwise ops (elementwise.py): float
                              dtypes, broadcasting and strided inputs, numeric scalars; not pow(tensor, tensor)
    attention                 dense causal prefill / sliding window + sinks (flash attention), and decode over a
                              KV cache (split-K flash-decoding); q, k, v of one dtype and one head dim, sinks
                              only with a window (see attention_glue for every condition)
    block_topk_attention      block top-k decode (selected blocks only, merged by log-sum-exp)
    block_sparse_attention    block-sparse causal prefill (flash prefill over each query block's kept KV blocks;
                              block sizes: powers of two >= 16)
    shared_prefix_attention   Hydragen decode: the prefix read once for every sequence
On the CPU the backend claims nothing unless `interpret=True` and TRITON_INTERPRET=1 (tests run the same
kernels under Triton's interpreter at tiny shapes). Kernel configs (tile sizes, warps, stages) come from the
`config` dict, keyed by kernel name, else each kernel's default.
"""
from __future__ import annotations

import importlib
import os
from typing import Any, Callable, Mapping

import torch

from lmforge.backends.codegen import Kernel
from lmforge.ir.graph import Node

FLOAT_DTYPES = ("float16", "bfloat16", "float32")   # what every Triton kernel here takes (IR dtype names)


def _module(name: str):
    try:
        return importlib.import_module(f"lmforge.backends.triton.{name}")
    except ImportError:
        return None


class TritonBackend:
    name = "triton"

    def __init__(self, config: Mapping[str, Any] | None = None, interpret: bool = False):
        self.config = dict(config or {})
        self.interpret = interpret

    def _active(self, device: str) -> bool:
        if device.startswith("cuda"):
            return True
        return self.interpret and os.environ.get("TRITON_INTERPRET") == "1"

    def claim(self, node: Node, device: str) -> Kernel | None:
        if not self._active(device):
            return None
        rule = getattr(self, f"_claim_{node.op}", None)
        fn = rule(node) if rule is not None else None
        return None if fn is None else Kernel(fn, "triton", kernel_name(node))

    # ---- claims: each returns fn(*inputs, **attrs) with the op reference's behaviour, or None ----------------------
    def _claim_linear_wo(self, node: Node) -> Callable | None:
        qm = _module("quant_matmul")
        group_size = node.attr["group_size"]
        # quant_common._check_inputs's rules: power-of-two groups >= 16, float activations
        if qm is None or group_size < 16 or group_size & (group_size - 1) or not _floats(node.inputs[0]):
            return None
        from lmforge.ir.ops.quant_ref import QuantizedWeight

        cfg = self.config

        def run(x, qweight, scales, zeros, bias=None, *, bits, group_size):
            n, k = qweight.shape[0], qweight.shape[1] * 8 // bits
            qw = QuantizedWeight(qweight, scales, zeros, bits, group_size, (n, k))
            m = x.numel() // k
            return qm.linear_weight_only(x, qw, bias, cfg.get(qm.kernel_for_rows(m)))

        return run

    def _claim_rmsnorm(self, node: Node) -> Callable | None:
        norms = _module("norms")
        if norms is None or node.attr["ndim"] != 1 or not _floats(node.inputs[0]):
            return None
        cfg = self.config.get("rmsnorm")

        def run(x, w=None, *, eps=None, ndim=1):
            # eps None: the fp32 epsilon, as F.rms_norm (it computes in fp32 for half inputs too)
            return norms.rmsnorm(x, w, torch.finfo(torch.float32).eps if eps is None else eps, cfg)

        return run

    def _claim_layernorm(self, node: Node) -> Callable | None:
        norms = _module("norms")
        if norms is None or node.attr["ndim"] != 1 or not _floats(node.inputs[0]):
            return None
        cfg = self.config.get("layernorm")
        return lambda x, w=None, b=None, *, eps=1e-5, ndim=1: norms.layernorm(x, w, b, eps, cfg)

    def _claim_softmax(self, node: Node) -> Callable | None:
        norms = _module("norms")
        x = node.inputs[0].type
        if norms is None or node.attr["log"] or node.attr["dim"] not in (-1, x.rank - 1) \
                or not _floats(node.inputs[0]):
            return None
        cfg = self.config.get("softmax")
        return lambda x, *, dim=-1, log=False: norms.softmax(x, -1, cfg)

    def _claim_fused(self, node: Node) -> Callable | None:
        """Exact SwiGLU: its dedicated kernel; any other elementwise region (a broadcast `up` included): the
        kernel generated from the region (elementwise.py), when every op and dtype has a generated form."""
        norms = _module("norms")
        if norms is not None and node.attr["kind"] == "swiglu" and _is_swiglu(node):
            cfg = self.config.get("swiglu")
            return lambda gate, up, *, regions=None, kind="swiglu": norms.swiglu(gate, up, cfg)
        elementwise = _module("elementwise")
        if elementwise is None or node.attr["kind"] not in ("swiglu", "elementwise") \
                or elementwise.unsupported(node) is not None:
            return None
        return elementwise.launcher(node, self.config.get("elementwise"))

    def _claim_attention(self, node: Node) -> Callable | None:
        glue = _module("attention_glue")
        return None if glue is None else glue.claim_attention(node, self.config)

    def _claim_block_topk_attention(self, node: Node) -> Callable | None:
        glue = _module("attention_glue")
        return None if glue is None else glue.claim_block_topk(node, self.config)

    def _claim_block_sparse_attention(self, node: Node) -> Callable | None:
        glue = _module("attention_glue")
        return None if glue is None else glue.claim_block_sparse(node, self.config)

    def _claim_shared_prefix_attention(self, node: Node) -> Callable | None:
        glue = _module("attention_glue")
        return None if glue is None else glue.claim_shared_prefix(node, self.config)


def kernel_name(node: Node) -> str:
    """The kernel (and config key) that runs a claimed node: the op's name, or for a fused region "swiglu" or
    "elementwise"."""
    if node.op != "fused":
        return node.op
    return "swiglu" if node.attr["kind"] == "swiglu" and _is_swiglu(node) else "elementwise"


def _floats(*values) -> bool:
    """Every value is a tensor of a dtype the kernels take."""
    return all(v is not None and v.type.dtype in FLOAT_DTYPES for v in values)


def _is_swiglu(node: Node) -> bool:
    """The region is exactly `mul(silu(in0), in1)` (or `mul(in1, silu(in0))`) on two inputs of one type (the
    kernel reads gate and up element by element: a broadcast `up`, e.g. a weight [D], or another dtype is not
    SwiGLU here)."""
    body = node.regions[0]
    if [n.op for n in body.nodes] != ["silu", "mul"] or len(body.inputs) != 2 or len(node.inputs) != 2:
        return False
    gate, up = node.inputs
    if not _floats(gate, up) or gate.type.shape != up.type.shape or gate.type.dtype != up.type.dtype:
        return False
    silu, mul = body.nodes
    a, b = body.inputs
    return silu.inputs[0].name == a.name and {v.name for v in mul.inputs} == {silu.output.name, b.name}
