"""A workload: what a user hands to lmforge's CLI (`lmforge inspect|compile|tune|export WORKLOAD`).

A workload is a Python file (or `package.module:function`) whose function returns a `Workload`.
By convention the function is named `workload` when only a file is given.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class Workload:
    """A model with example inputs and, optionally, evaluation data.

    model:          a torch.nn.Module or a function over tensors.
    example_inputs: a tuple of positional inputs used for capture (and the default measurement inputs).
    dynamic:        {input name: {dim index: symbol name}} for dimensions that vary (batch, seq, ...).
    eval_inputs:    a list of input tuples for quality measurement (next-token distributions etc.).
    checker:        optional `checker(compiled_or_model) -> accuracy in [0, 1]` for task accuracy.
    token_data:     optional LongTensor [n, seq] of held-out tokens for perplexity.
    name:           a short name used for studies and artifacts.
    """

    model: Any
    example_inputs: tuple
    dynamic: dict[str, dict[int, str]] | None = None
    eval_inputs: list[tuple] | None = None
    checker: Callable[[Any], float] | None = None
    token_data: Any = None
    name: str = "workload"
    extras: dict[str, Any] = field(default_factory=dict)


def load_workload(spec: str) -> Workload:
    """Load a workload from `path/to/file.py[:function]` or `package.module:function`.

    A file without `:function` uses its `workload` function. The function is called with no arguments
    and must return a `Workload` (or a dict with the same fields).
    """
    import importlib
    import importlib.util
    import os
    import sys

    from lmforge.errors import WorkloadError

    target, _, func = spec.partition(":")
    func = func or "workload"
    if target.endswith(".py") or os.path.sep in target:
        path = os.path.abspath(target)
        if not os.path.exists(path):
            raise WorkloadError(f"workload file {target!r} does not exist")
        # the file's folder and the current folder are importable, as when running `python file.py`
        for folder in (os.path.dirname(path), os.getcwd()):
            if folder not in sys.path:
                sys.path.insert(0, folder)
        name = "lmforge_workload_" + os.path.splitext(os.path.basename(path))[0]
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        module_spec.loader.exec_module(module)
    else:
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise WorkloadError(f"cannot import workload module {target!r}: {e}") from e
    fn = getattr(module, func, None)
    if fn is None or not callable(fn):
        raise WorkloadError(f"{target} has no function {func!r}; a workload file defines `def {func}() -> Workload`")
    result = fn()
    if isinstance(result, dict):
        result = Workload(**result)
    if not isinstance(result, Workload):
        raise WorkloadError(f"{spec} returned {type(result).__name__}, not a lmforge.Workload")
    return result
