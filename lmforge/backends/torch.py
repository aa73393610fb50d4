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
        return Kernel(get_op(node.op).reference, "torch", detail, inline=INLINE.get(node.op))


# ---- views written into the generated code as tensor methods (see Kernel.inline) ----------------------------
# Each returns the expression, or None to keep the call to the reference. Attributes arrive as Python source.

def _inline_reshape(node: Node, args: list, attrs: dict) -> str:
    return f"{args[0]}.reshape({attrs['shape']})"


def _inline_permute(node: Node, args: list, attrs: dict) -> str:
    return f"{args[0]}.permute({attrs['perm']})"


def _inline_select(node: Node, args: list, attrs: dict) -> str:
    return f"{args[0]}.select({attrs['dim']}, {attrs['index']})"


def _inline_slice(node: Node, args: list, attrs: dict) -> str | None:
    """x[:, :, start:end:step] (or x[..., start:end:step, :] for a negative dim), like the reference's index."""
    dim, rank = node.attr["dim"], node.inputs[0].type.rank
    if not isinstance(dim, int) or not -rank <= dim < rank:
        return None
    end = attrs.get("end", "None")
    item = f"{attrs.get('start', '0')}:{end}:{attrs.get('step', '1')}"
    index = ":, " * dim + item if dim >= 0 else "..., " + item + ", :" * (-dim - 1)
    return f"{args[0]}[{index}]"


INLINE = {"reshape": _inline_reshape, "permute": _inline_permute, "select": _inline_select,
          "slice": _inline_slice}
