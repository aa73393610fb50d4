"""CUDA graphs for a compiled model's calls: capture the generated code once per input shape and replay it.

A decode step launches dozens of small kernels; replaying them as one graph removes the per-launch CPU cost.
Inputs are copied into static buffers before each replay, and outputs are the graph's static outputs (cloned,
so a caller can keep them across calls). A new shape (the KV cache grew) captures a new graph, up to
`max_graphs` shapes (least recently used dropped), so this helps most when shapes repeat, e.g. a fixed-size
KV cache or a bucketed sequence length.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch

from lmforge.errors import LmforgeError


class CUDAGraphRunner:
    def __init__(self, fn: Callable, max_graphs: int = 8, warmup: int = 2):
        if not torch.cuda.is_available():
            raise LmforgeError("CUDA graphs need a CUDA GPU; call the compiled model directly on the CPU")
        self.fn = fn
        self.max_graphs = max_graphs
        self.warmup = warmup
        self.graphs: OrderedDict = OrderedDict()

    def _key(self, inputs) -> tuple:
        return tuple((tuple(x.shape), x.dtype, x.device) for x in inputs)

    def _capture(self, inputs):
        static_in = [x.clone() for x in inputs]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(self.warmup):
                self.fn(*static_in)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self.fn(*static_in)
        return graph, static_in, static_out

    def __call__(self, *inputs):
        key = self._key(inputs)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self._capture(inputs)
            self.graphs[key] = entry
            if len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        else:
            self.graphs.move_to_end(key)
        graph, static_in, static_out = entry
        for dst, src in zip(static_in, inputs):
            dst.copy_(src)
        graph.replay()
        return tuple(o.clone() for o in static_out)
