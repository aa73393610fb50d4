"""The torch reference backend: runs every registered op with its `OpDef.reference`.

It is the ground truth of every numerics test and the fallback for whatever the other backends leave.
It runs on the CPU and, when the graph's inputs and weights live there, on CUDA.
"""
from __future__ import annotations

from lmforge.backends.codegen import Kernel
from lmforge.ir.graph import Node
from lmforge.ir.ops import REGISTRY, get_op


class TorchReference:
    name = "torch"

    def claim(self, node: Node, device: str) -> Kernel | None:
        if node.op not in REGISTRY:
            return None
        detail = node.attr.get("target", "") if node.op == "torch_fallback" else ""
        return Kernel(get_op(node.op).reference, "torch", detail)
