"""Backends claim IR nodes and provide the callables that run them.

A backend is any object with a `name` and `claim(node, device) -> Kernel | None`. `assign_kernels`
asks the backends in priority order; the torch reference (`lmforge.backends.torch`) claims every
registered op and so runs whatever the others leave. A node nobody claims is a clear error.
"""
from __future__ import annotations

from typing import Protocol, Sequence

from lmforge.backends.codegen import Kernel
from lmforge.errors import UnsupportedOpError
from lmforge.ir.graph import Graph, Node


class Backend(Protocol):
    name: str

    def claim(self, node: Node, device: str) -> Kernel | None: ...


def assign_kernels(graph: Graph, backends: Sequence[Backend], device: str = "cpu") -> list[Kernel]:
    kernels = []
    for node in graph.nodes:
        for backend in backends:
            kernel = backend.claim(node, device)
            if kernel is not None:
                kernels.append(kernel)
                break
        else:
            where = f" (from {node.source})" if node.source else ""
            raise UnsupportedOpError(f"no backend can run op {node.op!r}{where}; backends tried: "
                                     f"{[b.name for b in backends]}. Add the torch reference backend or a lowering.")
    return kernels


def _torch():
    from lmforge.backends.torch import TorchReference

    return TorchReference


def _triton():
    from lmforge.backends.triton.backend import TritonBackend

    return TritonBackend


def _tvm():
    from lmforge.backends.tvm import TVMBackend  # imported only when asked for: TVM takes seconds to import

    return TVMBackend


BACKENDS = {"torch": _torch, "triton": _triton, "tvm": _tvm}


def default_backends(names: Sequence[str] = ("torch",)) -> list[Backend]:
    """Backend instances by name, in priority order ("triton", "tvm", "torch")."""
    out = []
    for n in names:
        if n not in BACKENDS:
            raise UnsupportedOpError(f"unknown backend {n!r}; available: {sorted(BACKENDS)}")
        out.append(BACKENDS[n]()())
    return out
