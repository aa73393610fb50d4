"""Named program functions: the checkers and scorers that `verify`, `rank` and best-of-N call.

Why a registry: a program graph round-trips through JSON, and a Python callable cannot. So a program
names its checker (`verify(..., checker="addition_checker")`) and the function is looked up here when the
program runs. Register a function once, before running any program that names it:

    register_function("addition_checker", lambda prompt, candidates: ..., kind="checker")

Signature of every function: `fn(prompt: LongTensor [L], candidates: LongTensor [k, T]) -> Tensor [k]`
(float scores; a checker returns 1.0 for a correct candidate and 0.0 otherwise).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from lmforge.errors import LmforgeError

FUNCTION_KINDS = ("checker", "scorer")


@dataclass(frozen=True)
class ProgramFunction:
    name: str
    fn: Callable
    kind: str


_FUNCTIONS: dict[str, ProgramFunction] = {}


def register_function(name: str, fn: Callable, kind: str = "scorer", replace: bool = True) -> None:
    """Make `fn` callable from programs by `name`. kind: "checker" (returns 0/1) or "scorer" (any float)."""
    if kind not in FUNCTION_KINDS:
        raise LmforgeError(f"program function kind must be one of {FUNCTION_KINDS}, not {kind!r}")
    if not callable(fn):
        raise LmforgeError(f"program function {name!r} must be callable as fn(prompt [L], candidates [k, T]) -> [k], "
                           f"got a {type(fn).__name__}")
    if not replace and name in _FUNCTIONS:
        raise LmforgeError(f"program function {name!r} is already registered")
    _FUNCTIONS[name] = ProgramFunction(name, fn, kind)


def lookup(table: Mapping[str, Any], name: str, what: str, how: str) -> Any:
    """table[name], or an LmforgeError that says how to register it (programs name what they use)."""
    try:
        return table[name]
    except KeyError:
        raise LmforgeError(f"no {what} named {name!r}: register it with {how} before building or running the "
                           f"program (registered: {sorted(table) or 'none'})") from None


def get_function(name: str) -> ProgramFunction:
    return lookup(_FUNCTIONS, name, "program function", f"lmforge.programs.register_function({name!r}, fn)")


def has_function(name: str) -> bool:
    return name in _FUNCTIONS
