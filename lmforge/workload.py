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
