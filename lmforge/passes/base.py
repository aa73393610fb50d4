"""Passes, their knobs, and the pass manager.

A pass is a function `Graph -> Graph` (given the pass's knob values) with a name, a docstring showing
the IR before and after, and the knobs it exposes to the search. The `PassManager` runs a pipeline,
verifies after each pass, times each one, and prints the IR after a pass when asked
(`LMFORGE_PRINT_AFTER=<pass name>|all`, or `print_after=`).
"""
from __future__ import annotations

import functools
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from lmforge.errors import LmforgeError, VerifyError
from lmforge.ir.graph import Graph
from lmforge.ir.verify import verify


@dataclass(frozen=True)
class Knob:
    """One tunable choice a pass or kernel exposes.

    kind: "int" | "float" | "categorical" | "bool". `choices` for categorical (and optionally int);
    `low`/`high`/`log` for ranges. `condition` = (other knob, allowed values): the knob exists only when
    that knob takes one of those values (a block-top-k knob exists only when that pattern is chosen).
    """

    name: str
    kind: str
    default: Any
    choices: tuple = ()
    low: float | None = None
    high: float | None = None
    log: bool = False
    condition: tuple[str, tuple] | None = None
    doc: str = ""
    per_layer: bool = False  # the pass can take a different value per layer group (see search.space)
    closed: bool = False     # only `choices` are valid (weight bits), not just the values the search tries

    def describe(self) -> str:
        rng = (f"{{{', '.join(map(str, self.choices))}}}" if self.choices else f"[{self.low}, {self.high}]"
               + (" log" if self.log else ""))
        cond = f" if {self.condition[0]} in {list(self.condition[1])}" if self.condition else ""
        return f"{self.name}: {self.kind} {rng} default={self.default}{cond}"


_PASS_NAMES: set[str] = set()   # every pass defined so far: what LMFORGE_PRINT_AFTER may name


@functools.lru_cache(maxsize=8)
def _check_print_after(show: str) -> None:
    """A warning (once per value) when LMFORGE_PRINT_AFTER names no pass lmforge has: a misspelled name would
    print nothing without a word."""
    unknown = sorted(set(show.split(",")) - _PASS_NAMES - {"all"})
    if unknown:
        warnings.warn(f"LMFORGE_PRINT_AFTER names {unknown}, which are not lmforge passes; they are "
                      f"{sorted(_PASS_NAMES)} (or 'all')", stacklevel=3)


@dataclass(frozen=True)
class Pass:
    """A named graph transformation. `fn(graph, **knob_values) -> graph`.

    `relevant(graph, knob) -> bool`, when given, says whether a knob can change this graph (a prefill-pattern
    knob cannot change a decode-step graph), so the search does not spend trials on knobs without effect.
    """

    name: str
    fn: Callable[..., Graph]
    knobs: tuple[Knob, ...] = ()
    doc: str = ""
    relevant: Callable[[Graph, Knob], bool] | None = None

    def __post_init__(self):
        _PASS_NAMES.add(self.name)

    def knobs_for(self, graph: Graph | None) -> list[Knob]:
        if graph is None or self.relevant is None:
            return list(self.knobs)
        return [k for k in self.knobs if self.relevant(graph, k)]

    def __call__(self, graph: Graph, config: Mapping[str, Any] | None = None) -> Graph:
        config = config or {}
        values = {k.name.split(".")[-1]: config.get(k.name, k.default) for k in self.knobs}
        if any(k.per_layer for k in self.knobs):
            values["layer_config"] = config  # per-layer-group copies (`name@g0`, ...) are read per layer
        return self.fn(graph, **values)


def graph_pass(name: str, knobs: Sequence[Knob] = ()) -> Callable[[Callable], Pass]:
    """Decorator: turn `fn(graph, **knobs) -> graph` into a `Pass` whose doc is fn's docstring."""

    def wrap(fn: Callable) -> Pass:
        return Pass(name, fn, tuple(knobs), (fn.__doc__ or "").strip())

    return wrap


@dataclass
class PassRecord:
    name: str
    seconds: float
    nodes_before: int
    nodes_after: int


@dataclass
class PassManager:
    passes: Sequence[Pass]
    verify_each: bool = True
    print_after: str | None = None
    records: list[PassRecord] = field(default_factory=list)

    def knobs(self, graph: Graph | None = None) -> list[Knob]:
        """The knobs of the pipeline (only those that can change `graph`, when one is given)."""
        return [k for p in self.passes for k in p.knobs_for(graph)]

    def run(self, graph: Graph, config: Mapping[str, Any] | None = None) -> Graph:
        show = self.print_after or os.environ.get("LMFORGE_PRINT_AFTER")
        if show and not self.print_after:
            _check_print_after(show)
        done: list[str] = []
        for p in self.passes:
            t0 = time.perf_counter()
            before = len(graph.nodes)
            try:
                graph = p(graph, config)
                if self.verify_each:
                    verify(graph)
            except VerifyError as e:
                raise VerifyError(f"after pass {p.name!r} (passes run before it: {done or 'none'}): {e}") from e
            except LmforgeError:
                raise
            except Exception as e:
                raise LmforgeError(f"pass {p.name!r} failed (passes run before it: {done or 'none'}): "
                                   f"{type(e).__name__}: {e}") from e
            self.records.append(PassRecord(p.name, time.perf_counter() - t0, before, len(graph.nodes)))
            done.append(p.name)
            if show and (show == "all" or p.name in show.split(",")):
                print(f"// IR after {p.name}\n{graph}", file=sys.stderr)
        return graph

    def report(self) -> str:
        rows = [f"{r.name:<24} {r.seconds * 1e3:8.2f} ms  nodes {r.nodes_before} -> {r.nodes_after}" for r in self.records]
        return "\n".join(rows)
