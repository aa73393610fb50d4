"""lmforge: compile LLM inference pipelines into one graph IR, tune them per target GPU, emit kernels, export.

    import lmforge
    graph = lmforge.capture(model, (tokens,), dynamic={"tokens": {0: "batch", 1: "seq"}})
    compiled = lmforge.compile(model, (tokens,), target="h100")
    print(compiled.inspect())
"""
from lmforge.artifact import load
from lmforge.compiler import CompiledModel, compile
from lmforge.errors import LmforgeError
from lmforge.ir.frontends.torch_export import capture
from lmforge.workload import Workload

__version__ = "0.1.0"


def targets():
    """The hardware presets lmforge knows (and the host)."""
    from lmforge.hwmodels import targets as _targets

    return _targets()


def tune(*args, **kwargs):
    """Search the knobs of a workload for a target: `lmforge.search.tuner.tune(model_or_workload,
    example_inputs=None, *, target="h100", objectives=("latency",), constraints=None, budget=50, mode="predict",
    storage=None, ...)`, documented there. (Imported on first call, so that `import lmforge` needs no optuna.)"""
    from lmforge.search.tuner import tune as _tune

    return _tune(*args, **kwargs)


def export(compiled, path, **kwargs):
    """Write an artifact directory for a compiled model: `lmforge.exporting.export(compiled, path, *,
    objectives=None, targets=None)`, documented there (the same as `compiled.export(path)`)."""
    from lmforge.exporting import export as _export

    return _export(compiled, path, **kwargs)


__all__ = ["CompiledModel", "LmforgeError", "Workload", "capture", "compile", "export", "load", "targets", "tune",
           "__version__"]
