"""Graph passes. `default_pipeline()` lists the passes lmforge runs, one line each."""
from lmforge.passes.base import Knob, Pass, PassManager, graph_pass
from lmforge.passes.canonical import cse, dce, fold_shapes, recognize_attention


def default_pipeline() -> list[Pass]:
    return [
        recognize_attention,  # matmul-softmax-matmul -> attention (capture runs it too)
        fold_shapes,          # simplify symbolic dims, drop no-op reshapes/permutes/casts/slices
        cse,                  # merge duplicate computations (RoPE tables shared by layers, ...)
        dce,                  # drop what nothing reads
    ]


__all__ = ["Knob", "Pass", "PassManager", "graph_pass", "default_pipeline", "cse", "dce", "fold_shapes",
           "recognize_attention"]
