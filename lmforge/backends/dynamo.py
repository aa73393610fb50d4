"""`torch.compile(model, backend="lmforge")`: each graph TorchDynamo hands over runs through lmforge.

Registered through the `torch_dynamo_backends` entry point. Dynamo gives an FX GraphModule and example
inputs; we capture the GraphModule with torch.export, compile it, and return the compiled callable.
If a graph cannot be captured (a dynamo graph with symbolic-int inputs, say), the GraphModule runs as is
and a warning says why, so torch.compile never fails because of lmforge.
"""
from __future__ import annotations

import warnings

import torch

from lmforge.errors import LmforgeError


def lmforge_backend(gm: torch.fx.GraphModule, example_inputs):
    from lmforge.compiler import compile as lmforge_compile

    if not all(isinstance(x, torch.Tensor) for x in example_inputs):
        warnings.warn("lmforge: dynamo graph has non-tensor inputs (symbolic sizes); running it unchanged")
        return gm.forward
    try:
        compiled = lmforge_compile(gm, tuple(example_inputs))
    except LmforgeError as e:
        warnings.warn(f"lmforge: could not compile a dynamo graph, running it unchanged: {e}")
        return gm.forward

    def run(*args):
        out = compiled(*args)
        return out if isinstance(out, (tuple, list)) else (out,)

    run.lmforge_compiled = compiled
    return run
