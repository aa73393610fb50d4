"""Decoding lowering: the decoding choices of a program graph as knobs, and the pass that sets them.

A program graph (`lmforge.programs`) says how each of its generate nodes decodes (a strategy and its parameters,
as attributes) and what each model computes (the regions: the model's decode step and prefill graph). The
program search's built-in template (`ProgramEvaluator(steps=...)`) builds one fixed shape of program from a
config; this module makes the knobs of *any* program, written by the user with `ProgramBuilder`:

- `decoding_knobs(program, strategies=..., n_choices=..., ...)`: per generate node i (graph order), knobs
  `decoding.g<i>.strategy`, `.n` (when the strategy samples), `.width` (beam search), `.max_new_tokens`;
  per model m, `model.<m>.decode_window` (0 = dense; else a sliding decode window with 4 sinks),
  `model.<m>.kv` (KV-cache format) and `model.<m>.weight_bits` (16 = unquantized; 8 / 4 weight-only). A knob
  is offered only where the caller gives more than one value; a node keeps what the config does not set.
- `lower_decoding(program, config)` applies a config: it lowers each generate node to the chosen strategy,
  re-types the nodes after it (a strategy changes how many candidates flow on), runs every region of a model
  through lmforge's tunable pass pipeline with that model's knobs (the same passes, tests and cost rules as a
  single model's), and re-checks the program (Archon's rules). A config the program cannot take (a `rank`
  that keeps more candidates than the new strategy makes) raises `DecodingError`, which the program search
  counts as a pruned trial.
- `decoding_pass(program, ...)`: both as a `Pass` (name "decoding", the knobs above).

    before   %c, %s = generate(%prompts; model="m", strategy="greedy", max_new_tokens=4)   {m: decode step}
             %t, %v = vote(%c, %s)                          # %c: int64[batch, 1, 4]
    config   {"decoding.g0.strategy": "sample", "decoding.g0.n": 8, "model.m.weight_bits": 4}
    after    %c, %s = generate(%prompts; model="m", strategy="sample", n=8, max_new_tokens=4)  {m: int4 step}
             %t, %v = vote(%c, %s)                          # %c: int64[batch, 8, 4]

Outputs are those of building the lowered program directly with `ProgramBuilder` (tested), and the program's
weights hold exactly what its regions read.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

from lmforge.errors import LmforgeError, VerifyError
from lmforge.ir.graph import Graph, all_regions
from lmforge.passes.base import Knob, Pass

SEARCHABLE = ("greedy", "sample", "best_of_n", "first_finish", "beam")   # strategies the knob offers
SAMPLED = ("sample", "best_of_n", "first_finish")
BEAMS = ("beam",)
SINKS = 4          # the sink tokens kept beside a sliding decode window


class DecodingError(LmforgeError):
    """The program cannot take this decoding config (the message says which node and why)."""


def generate_nodes(program: Graph) -> list[int]:
    """Indices of the program's generate nodes, in graph order (the i of `decoding.g<i>.*`)."""
    return [i for i, n in enumerate(program.nodes) if n.op == "generate"]


def region_model(region: Graph) -> str:
    """The model a region computes: the `<model>::` prefix ProgramBuilder gives its parameters."""
    names = {p.name.split("::", 1)[0] for p in region.params if "::" in p.name}
    if len(names) != 1:
        raise DecodingError(f"region {region.name!r} is not one model's graph (parameter prefixes {sorted(names)}): "
                            "build programs with lmforge.programs.ProgramBuilder")
    return names.pop()


def program_models(program: Graph, generating_only: bool = False) -> list[str]:
    """The models the program's regions compute (only those of generate nodes with generating_only), in order."""
    out: list[str] = []
    for n in program.nodes:
        if n.regions and (n.op == "generate" or not generating_only):
            m = region_model(n.regions[0])
            if m not in out:
                out.append(m)
    return out


def model_pass_config(window: int = 0, kv: str = "none", weight_bits: int = 16, group_size: int = 32) -> dict:
    """The tunable pipeline's config for one model's knobs: decode window (SINKS sinks), KV format, weight-only
    bits (group-wise); merging and fusion stay off, so that only these knobs change the model's graphs."""
    return {"attn.decode_pattern": "window" if window else "dense", "attn.decode_window": window,
            "attn.sinks": SINKS, "quant.kv": kv, "quant.weight_bits": weight_bits, "quant.group_size": group_size,
            "fusion.merge_linears": False, "fusion.elementwise": False}


def decoding_knobs(program: Graph, *, strategies: Sequence[str] = ("greedy", "best_of_n", "beam"),
                   n_choices: Sequence[int] = (2, 4, 8), width_choices: Sequence[int] = (2, 4),
                   max_new_choices: Sequence[int] = (), nodes: Sequence[int] | None = None,
                   windows: Sequence[int] = (0,), kv: Sequence[str] = ("none",), weight_bits: Sequence[int] = (16,),
                   models: Sequence[str] | None = None) -> list[Knob]:
    """The knobs of the module docstring for `program`: generate nodes `nodes` (indices; default all) and models
    `models` (default: those its generate nodes run; a scoring or fuser model keeps full precision unless named).
    A node's current value is its knob's default when it is among the choices."""
    bad = sorted(set(strategies) - set(SEARCHABLE))
    if bad:
        raise DecodingError(f"strategies {bad} cannot be searched: choose among {SEARCHABLE} (other strategies "
                            "need parameters a knob does not set; give them in the program)")
    gens = generate_nodes(program)
    unknown = sorted(set(nodes or ()) - set(gens))
    if unknown:
        raise DecodingError(f"nodes {unknown} are not generate nodes of {program.name!r} (those are {gens})")
    knobs: list[Knob] = []

    def default(current, choices):
        return current if current in choices else choices[0]

    for i in (gens if nodes is None else sorted(nodes)):
        a, key = program.nodes[i].attr, f"decoding.g{i}"
        if len(strategies) > 1:
            knobs.append(Knob(f"{key}.strategy", "categorical", default(a["strategy"], tuple(strategies)),
                              tuple(strategies), doc=f"decoding strategy of generate node {i} ({a['model']})"))
        strategy = knobs[-1].name if len(strategies) > 1 else None
        sampled, beams = [s for s in strategies if s in SAMPLED], [s for s in strategies if s in BEAMS]
        if sampled and len(n_choices) > 1:
            knobs.append(Knob(f"{key}.n", "categorical", default(a["n"], tuple(n_choices)), tuple(n_choices),
                              condition=(strategy, tuple(sampled)) if strategy else None, doc="samples"))
        if beams and len(width_choices) > 1:
            knobs.append(Knob(f"{key}.width", "categorical", default(a["width"], tuple(width_choices)),
                              tuple(width_choices), condition=(strategy, tuple(beams)) if strategy else None,
                              doc="beams"))
        if len(max_new_choices) > 1:
            knobs.append(Knob(f"{key}.max_new_tokens", "categorical", default(a["max_new_tokens"],
                                                                              tuple(max_new_choices)),
                              tuple(max_new_choices), doc="tokens to generate"))
    for m in (program_models(program, generating_only=True) if models is None else models):
        for name, choices, base in (("decode_window", windows, 0), ("kv", kv, "none"),
                                    ("weight_bits", weight_bits, 16)):
            if len(choices) > 1:
                knobs.append(Knob(f"model.{m}.{name}", "categorical", default(base, tuple(choices)), tuple(choices),
                                  doc=f"{name} of model {m} (lmforge.passes.decoding.model_pass_config)"))
    return knobs


def _node_attrs(node, i: int, config: Mapping[str, Any]) -> dict:
    """The generate node's attributes after the config's decoding.g<i>.* values."""
    a, key = node.attr, f"decoding.g{i}"
    strategy = config.get(f"{key}.strategy", a["strategy"])
    changes = {"strategy": strategy}
    if strategy in SAMPLED:
        changes["n"] = config.get(f"{key}.n", a["n"])
    if strategy in BEAMS:
        changes["width"] = config.get(f"{key}.width", a["width"])
    if f"{key}.max_new_tokens" in config:
        changes["max_new_tokens"] = config[f"{key}.max_new_tokens"]
    return changes


def _model_settings(config: Mapping[str, Any], model: str) -> tuple:
    return (config.get(f"model.{model}.decode_window", 0), config.get(f"model.{model}.kv", "none"),
            config.get(f"model.{model}.weight_bits", 16))


def lower_decoding(program: Graph, config: Mapping[str, Any], *, group_size: int = 32,
                   cache: dict | None = None) -> Graph:
    """`program` with `config` applied (see the module docstring). `cache` (a dict the caller keeps) reuses the
    lowered regions of earlier calls: a search lowers the same model with the same knobs many times."""
    from lmforge.passes import PassManager, tunable_pipeline
    from lmforge.passes.rewrite import retype
    from lmforge.programs.builder import verify_program

    cache = {} if cache is None else cache

    def lowered(region: Graph) -> Graph:
        settings = _model_settings(config, region_model(region))
        if settings == (0, "none", 16):
            return region
        key = (id(region), settings, group_size)
        if key not in cache or cache[key][0] is not region:
            own = {p.name: program.weights[p.name] for p in region.params if p.name in program.weights}
            cfg = model_pass_config(*settings, group_size=group_size)
            try:
                out = PassManager(tunable_pipeline()).run(replace(region, weights=own or region.weights), cfg)
            except LmforgeError as e:
                named = dict(zip(("decode_window", "kv", "weight_bits"), settings))
                raise DecodingError(f"model {region_model(region)!r} cannot take {named}: {e}") from e
            cache[key] = (region, out)
        return cache[key][1]

    gens = set(generate_nodes(program))
    nodes = []
    for i, node in enumerate(program.nodes):
        if i in gens:
            node = node.with_attrs(**_node_attrs(node, i, config))
        if node.regions:
            node = replace(node, regions=tuple(lowered(r) for r in node.regions))
        nodes.append(node)
    merged = dict(program.weights)
    for node in nodes:
        for r in node.regions:
            merged.update(r.weights)
    try:
        out = retype(program.with_nodes(nodes))
        used = {p.name for r in all_regions(out) for p in r.params} | {p.name for p in out.params}
        return verify_program(replace(out, weights={k: w for k, w in merged.items() if k in used}))
    except VerifyError as e:
        chosen = {k: v for k, v in config.items() if k.startswith(("decoding.", "model."))}
        raise DecodingError(f"program {program.name!r} cannot take {chosen}: {e}") from e


@dataclass(frozen=True)
class ProgramPass(Pass):
    """A pass over a program graph whose knobs are that program's: `fn(graph, config)` reads the whole config
    (knob names repeat their last part across nodes, e.g. decoding.g0.n and decoding.g2.n)."""

    def __call__(self, graph: Graph, config: Mapping[str, Any] | None = None) -> Graph:
        return self.fn(graph, config or {})


def decoding_pass(program: Graph, *, group_size: int = 32, **choices) -> ProgramPass:
    """The decoding lowering of `program` as a Pass: knobs `decoding_knobs(program, **choices)`."""
    cache: dict = {}
    return ProgramPass("decoding", lambda g, config: lower_decoding(g, config, group_size=group_size, cache=cache),
                       tuple(decoding_knobs(program, **choices)), (lower_decoding.__doc__ or "").strip())
