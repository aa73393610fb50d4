"""A workload: what a user hands to lmforge's CLI (`lmforge inspect|compile|tune|export WORKLOAD`).

A workload is a Python file (or `package.module:function`) whose function returns a `Workload`.
By convention the function is named `workload` when only a file is given.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Callable

from lmforge.errors import LmforgeError, WorkloadError


@dataclass
class Workload:
    """A model with example inputs and, optionally, evaluation data.

    model:          a torch.nn.Module or a function over tensors.
    example_inputs: a tuple of positional inputs used for capture (and the default measurement inputs).
    dynamic:        {input name: {dim index: symbol name}} for dimensions that vary (batch, seq, ...).
    eval_inputs:    a list of input tuples for quality measurement: the `quality` and `kl` objectives compare the
                    next-token distributions of the transformed and the untransformed model on them (default: the
                    example inputs). Each must fit the captured model (a size that varies needs `dynamic`).
    logits_index:   which tensor output holds the logits (floating point, vocabulary last); default 0, the first.
    quality_positions: optional slice over the sequence dimension (dim -2) of the logits: the positions `quality`
                    and `kl` count, e.g. only the answer positions of a task whose prompt tokens are random and so
                    have no meaningful next token (default: every position). To leave out whole eval inputs (one
                    decode step per position), leave them out of eval_inputs.
    checker:        optional `checker(compiled_or_model) -> accuracy in [0, 1]`: the `accuracy` objective.
    token_data:     deprecated and ignored (no objective ever read it; perplexity is not an objective): a
                    DeprecationWarning says so.
    name:           a short name used for studies and artifacts.
    extras:         anything else, e.g. `serving_dims` (the sizes the tuner prices latency at).

    The weights, eval inputs, logits_index, quality_positions and checker are part of a tuning study's settings:
    another model of the same architecture, or other eval data, starts a new study instead of reusing the old
    numbers.
    """

    model: Any
    example_inputs: tuple
    dynamic: dict[str, dict[int, str]] | None = None
    eval_inputs: list[tuple] | None = None
    checker: Callable[[Any], float] | None = None
    token_data: Any = None   # deprecated, unused (kept so that positional and keyword callers keep working)
    name: str = "workload"
    extras: dict[str, Any] = field(default_factory=dict)
    logits_index: int = 0
    quality_positions: slice | None = None

    def __post_init__(self):
        """Check the fields' types, so a mistake is named here rather than deep inside capture or tuning."""
        if self.model is None:
            raise WorkloadError("Workload.model is None: give a torch.nn.Module or a function over tensors")
        if self.token_data is not None:
            import warnings

            warnings.warn("Workload.token_data is ignored (no objective reads it) and will be removed: drop it; "
                          "quality is measured on eval_inputs", DeprecationWarning, stacklevel=3)
        if isinstance(self.example_inputs, list):
            self.example_inputs = tuple(self.example_inputs)
        if not isinstance(self.example_inputs, tuple):
            raise WorkloadError(f"Workload.example_inputs must be a tuple of positional inputs, e.g. "
                                f"`example_inputs=(x,)` for one input, not a {type(self.example_inputs).__name__}")
        if self.dynamic is not None and not isinstance(self.dynamic, dict):
            raise WorkloadError(f"Workload.dynamic must be a dict {{input name: {{dim index: symbol}}}}, not a "
                                f"{type(self.dynamic).__name__}")
        if self.eval_inputs is not None:
            if not isinstance(self.eval_inputs, (list, tuple)):
                raise WorkloadError(f"Workload.eval_inputs must be a list of input tuples, not a "
                                    f"{type(self.eval_inputs).__name__}")
            bad = [i for i, x in enumerate(self.eval_inputs) if not isinstance(x, (tuple, list))]
            if bad:
                raise WorkloadError(f"Workload.eval_inputs must be a list of input tuples (one tuple of positional "
                                    f"inputs per evaluation call, e.g. [(x1,), (x2,)]); item {bad[0]} is a "
                                    f"{type(self.eval_inputs[bad[0]]).__name__}")
            self.eval_inputs = [tuple(x) for x in self.eval_inputs]
        if isinstance(self.logits_index, bool) or not isinstance(self.logits_index, int):
            raise WorkloadError(f"Workload.logits_index must be the position of the logits among the model's tensor "
                                f"outputs (an int, default 0), not {self.logits_index!r}")
        if self.quality_positions is not None and not isinstance(self.quality_positions, slice):
            raise WorkloadError(f"Workload.quality_positions must be a slice over the logits' sequence dimension, e.g. "
                                f"slice(5, 9), not a {type(self.quality_positions).__name__}")
        if self.checker is not None and not callable(self.checker):
            raise WorkloadError(f"Workload.checker must be a function `checker(model) -> accuracy`, not a "
                                f"{type(self.checker).__name__}")


def load_workload(spec: str) -> Workload:
    """Load a workload from `path/to/file.py[:function]` or `package.module:function`.

    A file without `:function` uses its `workload` function. The function is called with no arguments
    and must return a `Workload` (or a dict with the same fields). Any error raised while importing the file or
    calling the function becomes a WorkloadError "while loading workload SPEC: ..." naming the line at fault.
    """
    import importlib
    import importlib.util
    import inspect
    import os
    import sys

    target, _, func = spec.partition(":")
    func = func or "workload"
    where = None  # the workload's own file, to name its line in an error
    if target.endswith(".py") or os.path.sep in target:
        path = os.path.abspath(target)
        if not os.path.exists(path):
            raise WorkloadError(f"workload file {target!r} does not exist")
        # the file's folder and the current folder are importable, as when running `python file.py`
        for folder in (os.path.dirname(path), os.getcwd()):
            if folder not in sys.path:
                sys.path.insert(0, folder)
        where = path
        name = "lmforge_workload_" + os.path.splitext(os.path.basename(path))[0]
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:
            sys.modules.pop(name, None)
            raise WorkloadError(f"while loading workload {spec}: importing {target} raised "
                                f"{_describe(e, where)}") from e
    else:
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as e:
            if e.name and target.split(".")[0] == e.name.split(".")[0] and target.startswith(e.name):
                raise WorkloadError(f"cannot import workload module {target!r}: {e}; give a file path "
                                    "(`path/to/file.py`) or an importable `package.module:function`") from e
            raise WorkloadError(f"while loading workload {spec}: importing {target} raised "
                                f"{_describe(e, where)}") from e
        except Exception as e:
            raise WorkloadError(f"while loading workload {spec}: importing {target} raised "
                                f"{_describe(e, where)}") from e
    where = where or getattr(module, "__file__", None)
    fn = getattr(module, func, None)
    if fn is not None and not callable(fn):
        raise WorkloadError(f"{target}: `{func}` is a {type(fn).__name__}, not a function; a workload file defines "
                            f"`def {func}() -> Workload`")
    if fn is None:
        raise WorkloadError(f"{target} has no function {func!r}; a workload file defines `def {func}() -> Workload`")
    try:
        required = [p.name for p in inspect.signature(fn).parameters.values()
                    if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    except (TypeError, ValueError):  # a builtin or C callable without a signature: just call it
        required = []
    if required:
        raise WorkloadError(f"while loading workload {spec}: {func}() needs the argument(s) {required}, but lmforge "
                            f"calls it with none; give them default values (or wrap it in a function without "
                            f"arguments)")
    try:
        result = fn()
    except LmforgeError as e:  # lmforge's own message (a bad Workload field, ...) says what is wrong
        raise WorkloadError(f"while loading workload {spec}: in {func}(): {_describe(e, where)}") from e
    except Exception as e:
        raise WorkloadError(f"while loading workload {spec}: {func}() raised {_describe(e, where)}") from e
    if isinstance(result, dict):
        known = [f.name for f in fields(Workload)]
        unknown = sorted(set(result) - set(known))
        if unknown:
            raise WorkloadError(f"while loading workload {spec}: {func}() returned a dict with unknown field(s) "
                                f"{unknown}; a Workload's fields are {known}")
        missing = [k for k in ("model", "example_inputs") if k not in result]
        if missing:
            raise WorkloadError(f"while loading workload {spec}: {func}() returned a dict without {missing}")
        try:
            result = Workload(**result)
        except WorkloadError as e:
            raise WorkloadError(f"while loading workload {spec}: {e}") from e
    if not isinstance(result, Workload):
        raise WorkloadError(f"{spec} returned {type(result).__name__}, not a lmforge.Workload")
    return result


def _describe(e: BaseException, prefer: str | None = None) -> str:
    """`Type: message (at file:line)` of an exception from user code: the innermost line of the file `prefer`
    on the stack (the workload file), else the innermost line of all."""
    where = ""
    if isinstance(e, SyntaxError) and e.filename:
        where = f" (at {e.filename}:{e.lineno})"
        return f"{type(e).__name__}: {e.msg}{where}"
    frames, tb = [], e.__traceback__
    while tb is not None:
        frames.append((tb.tb_frame.f_code.co_filename, tb.tb_lineno))
        tb = tb.tb_next
    own = [f for f in frames if prefer and f[0] == prefer]  # the workload file's own line, when it is on the stack
    if own or frames:
        file, line = (own or frames)[-1]
        where = f" (at {file}:{line})"
    kind = "" if isinstance(e, LmforgeError) else f"{type(e).__name__}: "  # lmforge's own messages speak for themselves
    return f"{kind}{e}{where}"
