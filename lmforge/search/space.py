"""The search space: the knobs of the pass pipeline and of the kernels, as an Optuna define-by-run space.

A knob with a `condition` is suggested only when the knob it depends on took one of the allowed values,
so a trial's parameters are exactly the knobs that apply (a block-top-k budget exists only when the
block-top-k pattern is chosen). Knobs not suggested take their defaults in the config.

Per-layer-group tuning: `expand_per_group(knobs, groups)` copies each knob marked `per_layer` into
`name@g0 .. name@g{groups-1}`; passes read a layer's value with `knob_value(config, name, layer, n_layers)`.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping, Sequence

from lmforge.passes.base import Knob


def suggest(trial, knobs: Sequence[Knob]) -> dict[str, Any]:
    """Ask `trial` (an optuna.Trial) for every applicable knob; returns the full config (defaults filled)."""
    config: dict[str, Any] = {}
    for k in ordered(knobs):
        config[k.name] = _suggest_one(trial, k) if _applies(k, config, knobs) else k.default
    return config


def active_params(config: Mapping[str, Any], knobs: Sequence[Knob]) -> dict[str, Any]:
    """The part of a full `config` that a trial suggesting it would hold as params: the knobs whose conditions
    hold (missing knobs take their defaults). Enqueue these, not the whole config, so that an enqueued config
    and a sampled one with the same values have the same params (Optuna's skip_if_exists compares params).

        active_params({"x.pattern": "dense", "x.size": 4}, knobs)  ->  {"x.pattern": "dense"}
    """
    seen: dict[str, Any] = {}
    out: dict[str, Any] = {}
    for k in ordered(knobs):
        if _applies(k, seen, knobs):
            seen[k.name] = out[k.name] = config.get(k.name, k.default)
        else:
            seen[k.name] = k.default
    return out


def _applies(k: Knob, config: Mapping[str, Any], knobs: Sequence[Knob]) -> bool:
    """Whether `k`'s condition holds given the values chosen so far (`config`, filled in `ordered` order)."""
    if k.condition is None:
        return True
    dep, allowed = k.condition
    # with per-group copies of `dep` (name@g0, ...), the knob applies when any group allows it
    dep_values = [v for name, v in config.items() if name.startswith(dep + "@g")]
    return any(v in allowed for v in dep_values or [config.get(dep, _default(knobs, dep))])


def _default(knobs: Sequence[Knob], name: str):
    for k in knobs:
        if k.name == name:
            return k.default
    return None


def _suggest_one(trial, k: Knob):
    if k.kind == "bool":
        return trial.suggest_categorical(k.name, [True, False])
    if k.kind == "categorical" or (k.choices and k.kind in ("int", "float")):
        return trial.suggest_categorical(k.name, list(k.choices))
    if k.kind == "int":
        return trial.suggest_int(k.name, int(k.low), int(k.high), log=k.log)
    if k.kind == "float":
        return trial.suggest_float(k.name, float(k.low), float(k.high), log=k.log)
    raise ValueError(f"knob {k.name}: unknown kind {k.kind!r}")


def ordered(knobs: Sequence[Knob]) -> list[Knob]:
    """Knobs in an order where each comes after the knob its condition names."""
    by_name = {k.name: k for k in knobs}
    out: list[Knob] = []
    seen: set[str] = set()

    def visit(k: Knob, stack=()):
        if k.name in seen:
            return
        if k.name in stack:
            raise ValueError(f"knob conditions form a cycle: {stack + (k.name,)}")
        if k.condition and k.condition[0] in by_name:
            visit(by_name[k.condition[0]], stack + (k.name,))
        seen.add(k.name)
        out.append(k)

    for k in knobs:
        visit(k)
    return out


def defaults(knobs: Sequence[Knob]) -> dict[str, Any]:
    return {k.name: k.default for k in knobs}


def expand_per_group(knobs: Sequence[Knob], groups: int, per_layer: Sequence[str]) -> list[Knob]:
    """Replace each knob named in `per_layer` by one copy per layer group (`name@g0`, ...)."""
    if groups <= 1:
        return list(knobs)
    out: list[Knob] = []
    names = set(per_layer)
    for k in knobs:
        if k.name not in names:
            out.append(k)
            continue
        for g in range(groups):
            cond = k.condition
            if cond is not None and cond[0] in names:
                cond = (f"{cond[0]}@g{g}", cond[1])
            out.append(replace(k, name=f"{k.name}@g{g}", condition=cond))
    return out


def knob_value(config: Mapping[str, Any], name: str, default: Any, layer: int | None = None,
               n_layers: int | None = None) -> Any:
    """A knob's value for one layer: the layer group's copy when the config has per-group values."""
    if layer is not None and n_layers:
        groups = [int(k.rsplit("@g", 1)[1]) for k in config if k.startswith(name + "@g")]
        if groups:
            n_groups = max(groups) + 1
            g = min(n_groups - 1, layer * n_groups // n_layers)
            return config.get(f"{name}@g{g}", config.get(name, default))
    return config.get(name, default)
