"""Run a graph on calibration inputs and collect intermediate values (for AWQ scales, FlexPrefill density)."""
from __future__ import annotations

from typing import Sequence

import torch

from lmforge.ir.graph import Graph, Value


def probe_values(graph: Graph, values: Sequence[Value], inputs: Sequence[tuple]) -> list[list[torch.Tensor]]:
    """For each input tuple, the tensors `values` take when the graph runs on it: result[value][input]."""
    from lmforge.compiler import CompiledModel

    run = CompiledModel(graph.with_nodes(graph.nodes, list(values), meta={}))
    out: list[list[torch.Tensor]] = [[] for _ in values]
    with torch.no_grad():
        for args in inputs:
            got = run(*args)
            got = got if isinstance(got, tuple) else (got,)
            for slot, t in zip(out, got):
                slot.append(t)
    return out
