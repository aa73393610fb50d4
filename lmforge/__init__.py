"""lmforge: compile LLM inference pipelines into one graph IR, tune them per target GPU, emit kernels, export.

    import lmforge
    graph = lmforge.capture(model, (tokens,), dynamic={"tokens": {0: "batch", 1: "seq"}})
    compiled = lmforge.compile(model, (tokens,), target="h100")
    print(compiled.inspect())
"""
from lmforge.compiler import CompiledModel, compile
from lmforge.errors import LmforgeError
from lmforge.ir.frontends.torch_export import capture
from lmforge.workload import Workload

__version__ = "0.1.0"


def targets():
    """The hardware presets lmforge knows (and the host)."""
    from lmforge.hwmodels import targets as _targets

    return _targets()


__all__ = ["CompiledModel", "LmforgeError", "Workload", "capture", "compile", "targets", "__version__"]
