"""`torch.compile(model, backend="lmforge")`: each graph TorchDynamo hands over runs through lmforge.

Registered through the `torch_dynamo_backends` entry point. Dynamo gives an FX GraphModule and example
inputs; we capture the GraphModule with torch.export, compile it, and return the compiled callable.

Dynamic shapes: once Dynamo sees a second size for a dim (or under `dynamic=True`) it hands over a graph
whose placeholders carry symbolic sizes (`s27`), and usually the sizes themselves as extra SymInt inputs.
We read which tensor dim each symbol is, capture the graph with those dims dynamic (named after the
symbol) behind a wrapper that takes only the tensors and recomputes the size inputs from their shapes, and
at run time drop the size arguments Dynamo passes. A graph we cannot express that way (a size input that
is not a tensor's dim, a dim such as `2*s0`) or cannot capture runs as is, with a warning that says why, so
torch.compile never fails because of lmforge.
"""
from __future__ import annotations

import inspect
import warnings

import torch

from lmforge.errors import LmforgeError


class _SizesFromTensors(torch.nn.Module):
    """Calls a Dynamo graph with only its tensor inputs: each SymInt input is read from a tensor's shape.
    `layout[i]` is ("tensor", j) for the j-th tensor argument or ("size", j, d) for dim d of that tensor."""

    def __init__(self, gm: torch.fx.GraphModule, layout: list[tuple], n_tensors: int):
        super().__init__()
        self.gm = gm

        def forward(*tensors):
            args = [tensors[e[1]] if e[0] == "tensor" else tensors[e[1]].shape[e[2]] for e in layout]
            return gm(*args)

        # torch.export matches `dynamic` to named parameters: arg0, arg1, ... (what lmforge names them too).
        forward.__signature__ = inspect.Signature(
            [inspect.Parameter(f"arg{j}", inspect.Parameter.POSITIONAL_OR_KEYWORD) for j in range(n_tensors)])
        self.forward = forward


def _symbol(size) -> str | None:
    """The symbol's name when `size` is a plain symbolic size (s27), else None (ints, 2*s0, ...)."""
    if not isinstance(size, torch.SymInt):
        return None
    expr = size.node.expr
    return str(expr) if getattr(expr, "is_Symbol", False) else None


def _dynamic_layout(gm: torch.fx.GraphModule, example_inputs):
    """(layout for _SizesFromTensors, `dynamic` spec for lmforge.compile, tensor examples), or a reason
    (str) why the symbolic sizes of this graph cannot be expressed as dynamic dims of its tensor inputs."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        return "its placeholders do not match its example inputs"
    where: dict[str, tuple[int, int]] = {}           # symbol -> (tensor position, dim)
    dynamic: dict[str, dict[int, str]] = {}
    tensors = []
    for node, x in zip(placeholders, example_inputs):
        if not isinstance(x, torch.Tensor):
            continue
        fake = node.meta.get("example_value")
        j = len(tensors)
        tensors.append(x)
        for d, size in enumerate(getattr(fake, "shape", ())):
            if not isinstance(size, torch.SymInt):
                continue
            name = _symbol(size)
            if name is None:
                return f"input {node.name} has a computed symbolic size {size} (only plain sizes such as s0)"
            where.setdefault(name, (j, d))
            dynamic.setdefault(f"arg{j}", {})[d] = name
    layout, j = [], 0
    for node, x in zip(placeholders, example_inputs):
        if isinstance(x, torch.Tensor):
            layout.append(("tensor", j))
            j += 1
            continue
        name = _symbol(x) if isinstance(x, torch.SymInt) else None
        if name is None or name not in where:
            return f"input {node.name} is a {type(x).__name__} ({x}) that is no tensor input's size"
        layout.append(("size",) + where[name])
    return layout, dynamic, tuple(tensors)


def lmforge_backend(gm: torch.fx.GraphModule, example_inputs):
    layout = _dynamic_layout(gm, example_inputs)
    if isinstance(layout, str):
        warnings.warn(f"lmforge: dynamo graph with symbolic sizes not captured ({layout}); running it unchanged")
        return gm.forward
    layout, dynamic, tensors = layout
    if not dynamic:
        return _compiled_or_gm(gm, layout, None, tensors)

    # With symbolic sizes, capture at the first call: torch.export inside Dynamo's compile would add its
    # shape guards (on its own input names) to the frame Dynamo is building, which then fails its guards.
    state = {}

    def run_dynamic(*args):
        if "run" not in state:
            # Fresh tensor objects: torch.export marks its examples' dynamic dims on them, which the caller's
            # tensors must not carry into Dynamo's next guards.
            examples = tuple(args[i].detach() for i in _tensor_positions(layout))
            state["run"] = _compiled_or_gm(gm, layout, dynamic, examples)
        return state["run"](*args)

    return run_dynamic


def _tensor_positions(layout) -> list[int]:
    return [i for i, e in enumerate(layout) if e[0] == "tensor"]


def _compiled_or_gm(gm, layout, dynamic, tensors):
    """The lmforge-compiled graph as a callable on Dynamo's arguments, or gm.forward with a warning."""
    from lmforge.compiler import compile as lmforge_compile

    model = _SizesFromTensors(gm, layout, len(tensors)) if dynamic or len(tensors) != len(layout) else gm
    try:
        compiled = lmforge_compile(model, tensors, dynamic=dynamic)
    except LmforgeError as e:
        warnings.warn(f"lmforge: could not compile a dynamo graph, running it unchanged: {e}")
        return gm.forward
    positions = _tensor_positions(layout)

    def run(*args):
        out = compiled(*(args[i] for i in positions))
        return out if isinstance(out, (tuple, list)) else (out,)

    run.lmforge_compiled = compiled
    return run
