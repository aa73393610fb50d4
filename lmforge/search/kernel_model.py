"""Kernel knobs in predict mode: which Triton kernel templates a graph will run, their candidate tile configs as
knobs of the search space, and a small analytic model of how efficiently a tile config runs on a target GPU.

A node claimed by a Triton template is charged its roofline time (`lmforge.hwmodels.roofline.node_time`) with
each side divided by the efficiency of the chosen config:

    time = launch * (1 + extra_launches) + max(compute_s / e_compute, (memory_s + extra_bytes / BW') / e_memory)

where BW' is the op class's effective bandwidth. The efficiencies come from the launch geometry of the config
(grid size C, threads per CTA, useful bytes in flight per CTA f, padded work) and from the resources a CTA uses
(registers and shared memory, from the AOT ptxas report when the template has an AOT spec, else estimated):

    occupancy R  = min(regs_per_sm // (regs * threads), smem_per_sm // (smem + 1 KiB), 2048 // threads, 32)
                   (resident CTAs per SM; CUDA occupancy calculator, ignoring allocation granularity;
                    CUDA reserves 1 KiB of shared memory per block on sm_80+; R = 0 or a config over the
                    per-block limits of `aot.violations` is infeasible)
    slots        = SMs * R,   waves = ceil(C / slots)
    e_compute    = pad * C / (SMs * ceil(C / SMs))    wave quantization (NVIDIA, "Matrix Multiplication
                   Background User's Guide"): co-resident CTAs share an SM's throughput, so the busiest SM
                   runs ceil(C / SMs) CTAs' work where the ideal is C / SMs; times the useful fraction of
                   the padded tiles
    e_memory     = C / sum over waves w of max(C_w, need / f),   need = BW * DRAM latency
                   Little's law: a wave of C_w CTAs keeps C_w * f bytes in flight and so reaches a fraction
                   min(1, C_w * f / need) of the bandwidth; the last, partial wave is the tail.

The model is NOT calibrated on a GPU: the constants (DRAM latency 600 ns, the register estimate for templates
without an AOT spec) are textbook values, and it ignores what the measured H100 kernels show is often the real
limit (e.g. the int4 GEMV is bound by unpacking instructions at 20-29 % of bandwidth, see docs/benchmarks.md).
It ranks configs by parallelism, tails, padding and occupancy, which is what the tile choice changes.

The templates (which nodes each runs, candidate configs, launch geometry) are in `lmforge.search.kernel_templates`.

    space:  knobs = kernel_knobs(graph, pipeline, hw, bindings)   ->  [Knob("triton.wo_gemv", categorical 0..6), ...]
    cost:   graph_cost(graph, hw, bindings, kernels=chosen_kernels(config))  # {'wo_gemv': 3, ...}
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from lmforge.errors import LmforgeError
from lmforge.ir.graph import Graph, Node
from lmforge.passes.base import Knob
from lmforge.search.kernel_templates import KernelTemplate, Launch, claimed, templates  # noqa: F401

DRAM_LATENCY_S = 600e-9      # loaded DRAM latency of an HBM GPU (order of magnitude; not calibrated)
MAX_THREADS_PER_SM = 2048    # sm_80 / sm_90
MAX_CTAS_PER_SM = 32         # sm_80 / sm_90
SMEM_RESERVED_PER_CTA = 1024  # CUDA reserves 1 KiB of shared memory per block (sm_80+)
KNOB_PREFIX = "triton."


class KernelConfigInfeasible(LmforgeError):
    """A kernel config that cannot launch on the target (registers / shared memory / threads over the limits)."""


@dataclass(frozen=True)
class Resources:
    """Registers per thread and shared memory per CTA; `source` is "ptxas" (AOT build) or "estimate"."""

    registers: int
    shared_bytes: int
    source: str
    reason: str = ""             # why the config does not compile, when it does not


@dataclass(frozen=True)
class Efficiency:
    compute: float
    memory: float
    occupancy: int               # resident CTAs per SM
    waves: int


# ---- occupancy and efficiency ------------------------------------------------------------------------------------

def occupancy(res: Resources, threads: int, hw) -> int:
    """Resident CTAs per SM (0: the CTA does not fit one SM)."""
    by_regs = hw.regs_per_sm // max(1, res.registers * threads)
    by_smem = hw.smem_per_sm // (res.shared_bytes + SMEM_RESERVED_PER_CTA)
    return int(min(by_regs, by_smem, MAX_THREADS_PER_SM // threads, MAX_CTAS_PER_SM))


def check_fits(res: Resources, threads: int, hw) -> None:
    """Raise KernelConfigInfeasible with the reasons when the config cannot launch on `hw`."""
    from lmforge.backends.triton.aot import ResourceReport, arch_limits, violations

    if res.reason:
        raise KernelConfigInfeasible(res.reason)
    report = ResourceReport(res.registers, 0, 0, res.shared_bytes, threads // 32)
    reasons = violations(report, arch_limits(hw.arch))
    if not reasons and occupancy(res, threads, hw) == 0:
        reasons = [f"{res.registers} registers x {threads} threads and {res.shared_bytes} bytes of shared memory "
                   f"do not fit one SM of {hw.name}"]
    if reasons:
        raise KernelConfigInfeasible("; ".join(reasons) + f" (resources from {res.source})")


def efficiency(launch: Launch, res: Resources, hw) -> Efficiency:
    """Compute and memory efficiency of a launch (formulas in the module docstring)."""
    check_fits(res, launch.threads, hw)
    r = occupancy(res, launch.threads, hw)
    slots = hw.sm_count * r
    c = max(1, launch.ctas)
    waves = math.ceil(c / slots)
    e_compute = launch.pad * c / (hw.sm_count * math.ceil(c / hw.sm_count))
    need = hw.memory_bandwidth * DRAM_LATENCY_S
    per_cta = max(launch.bytes_in_flight, 1.0)
    full, last = divmod(c, slots)
    units = full * max(slots, need / per_cta) + (max(last, need / per_cta) if last else 0.0)
    e_memory = min(1.0, c / units)
    return Efficiency(e_compute, e_memory, r, waves)


# ---- resources: AOT ptxas reports cached on disk, else an estimate -----------------------------------------------

_MEMORY_CACHE: dict[str, Resources] = {}


def _cache_file(arch: str):
    from lmforge.cache import cache_dir

    return cache_dir("kernel_resources") / f"{arch}.json"


@functools.lru_cache(maxsize=None)
def _code_version(source_file: str | None) -> str:
    """A hash of a kernel module's source and the Triton version: part of the resource cache key, so that a
    report cached before the kernel (or Triton, and with it ptxas) changed is not reused."""
    import triton

    try:
        source = Path(source_file).read_bytes() if source_file else b""
    except OSError:
        source = b""
    return hashlib.sha256(source + triton.__version__.encode()).hexdigest()[:10]


def _aot_request(template: KernelTemplate, node: Node, env: Mapping[str, int], config, hw, aot: bool):
    """(cache key, BuildRequest) of the AOT build that reports `config`'s resources, or None (no AOT spec)."""
    spec = template.aot_spec(node, env, config) if (aot and template.aot_spec is not None) else None
    if spec is None:
        return None
    from lmforge.backends.triton.aot import spec_request

    request = spec_request(spec, hw.arch, config)
    raw = getattr(request.fn, "fn", request.fn)
    try:
        source_file = inspect.getsourcefile(raw)
    except TypeError:
        source_file = None
    return f"{hw.arch}:{request.name}:{_code_version(source_file)}", request


def _report_entry(result) -> dict:
    from lmforge.backends.triton.aot import ResourceReport

    if isinstance(result, str):
        return {"error": result.splitlines()[0][:300]}
    rep = ResourceReport.of(result)
    return {"registers": rep.registers, "shared": rep.shared_bytes}


def _resources_of(entry: dict, arch: str) -> Resources:
    """A cache entry (ptxas's registers and shared memory, or why the build failed) as Resources."""
    if "error" in entry:
        return Resources(0, 0, "ptxas", f"does not compile for {arch}: {entry['error']}")
    return Resources(int(entry["registers"]), int(entry["shared"]), "ptxas")


def prefetch_resources(items, hw, aot: bool = True) -> None:
    """Build, in one batch, the AOT reports that `resources` would need for `items` ((template, node, env,
    config) tuples) and are in neither cache. A batch is one build process where the interpreter runs (tests),
    instead of one per config. Does nothing where Triton cannot build (resources then estimates)."""
    from lmforge.backends.triton.aot import build_many

    todo = {}
    for template, node, env, config in items:
        got = _aot_request(template, node, env, config, hw, aot)
        if got is not None and got[0] not in _MEMORY_CACHE:
            todo.setdefault(got[0], got[1])
    if not todo:  # the common case once warm (a tuning trial): no disk read
        return
    path = _cache_file(hw.arch)
    disk = json.loads(path.read_text()) if path.exists() else {}
    for key in [k for k in todo if k in disk]:
        _MEMORY_CACHE[key] = _resources_of(disk[key], hw.arch)
        del todo[key]
    if not todo:
        return
    try:
        results = build_many(list(todo.values()))
    except Exception:  # no Triton compiler / ptxas here: `resources` falls back to the estimate
        return
    built = {key: _report_entry(result) for key, result in zip(todo, results)}
    disk = json.loads(path.read_text()) if path.exists() else {}   # another process may have written meanwhile
    disk.update(built)
    path.write_text(json.dumps(disk, indent=0, sort_keys=True))
    _MEMORY_CACHE.update({key: _resources_of(entry, hw.arch) for key, entry in built.items()})


def resources(template: KernelTemplate, node: Node, env: Mapping[str, int], config, hw, aot: bool = True) -> Resources:
    """Registers and shared memory of `template` with `config` for `node` on `hw`.

    With an AOT spec (and `aot`), the kernel is built for hw.arch and ptxas's report is used; reports are cached
    per (kernel, constexprs, config, arch, kernel source, Triton version) in memory and in
    `cache_dir("kernel_resources")/<arch>.json`, so each config is built once per machine (`prefetch_resources`
    builds many in one batch). Otherwise (or when Triton cannot build here) an estimate."""
    got = _aot_request(template, node, env, config, hw, aot)
    if got is None:
        regs, smem = template.estimate(node, config)
        return Resources(regs, smem, "estimate")
    from lmforge.backends.triton.aot import build_many

    key, request = got
    if key in _MEMORY_CACHE:
        return _MEMORY_CACHE[key]
    path = _cache_file(hw.arch)
    disk = json.loads(path.read_text()) if path.exists() else {}
    if key not in disk:
        try:
            result = build_many([request])[0]
        except Exception as exc:  # no Triton compiler / ptxas here: fall back to the estimate
            regs, smem = template.estimate(node, config)
            return Resources(regs, smem, f"estimate (AOT build unavailable: {type(exc).__name__})")
        disk[key] = _report_entry(result)
        path.write_text(json.dumps(disk, indent=0, sort_keys=True))
    res = _MEMORY_CACHE[key] = _resources_of(disk[key], hw.arch)
    return res


# ---- knobs ---------------------------------------------------------------------------------------------------------

def knob_name(template: str) -> str:
    return f"{KNOB_PREFIX}{template}"


def _template_knob(t: KernelTemplate, node: Node, condition) -> Knob:
    configs = t.configs(node)
    doc = f"{t.name} tile config: " + "; ".join(f"{i}={c}" for i, c in enumerate(configs))
    return Knob(knob_name(t.name), "categorical", 0, choices=tuple(range(len(configs))), condition=condition, doc=doc)


def kernel_knobs(graph: Graph, pipeline: Sequence, hw, bindings: Mapping[str, int] | None = None,
                 pass_knobs: Sequence[Knob] | None = None) -> list[Knob]:
    """One knob per Triton template that the graph will run after the tunable passes.

    Templates used under the default config are unconditional. The others are found by running the pipeline
    with one pass knob changed at a time (categorical / bool knobs without a condition), and each value of a
    conditional knob with its condition met (quant.group_size=32 with quant.weight_bits=4: a model whose
    linears the default group size does not divide quantizes only then); a template that appears only when one
    knob takes some values gets that condition (the int4/int8 GEMV exists only when quant.weight_bits is 8 or
    4). Returns [] for a target that is not a GPU.
    """
    from lmforge.passes.base import PassManager
    from lmforge.search.cost_model import bindings_for

    if getattr(hw, "kind", "") != "gpu":
        return []
    pm = PassManager(list(pipeline), verify_each=False)
    pass_knobs = list(pass_knobs if pass_knobs is not None else pm.knobs(graph))
    temps = templates()

    def used(config) -> dict[str, Node]:
        g = pm.run(graph, config)
        env = bindings_for(g, bindings)
        return {t.name: g.nodes[i] for i, t in claimed(g, env, temps).items()}

    base = used({})
    found: dict[str, dict[str, set]] = {}
    example: dict[str, Node] = dict(base)
    by_name = {k.name: k for k in pass_knobs}
    for k in pass_knobs:
        if not k.choices or "@g" in k.name:
            continue
        if k.condition is None:
            trials = [(k.name, value, {k.name: value}) for value in k.choices if value != k.default]
        else:   # a conditional knob's values, each with its condition met: they count for the knob it depends on
            dep, allowed = k.condition
            if dep not in by_name or by_name[dep].condition is not None:
                continue
            trials = [(dep, a, {dep: a, k.name: value}) for a in allowed for value in k.choices]
        for owner, value, config in trials:
            try:
                got = used(config)
            except LmforgeError:
                continue
            for name, node in got.items():
                if name not in base:
                    found.setdefault(name, {}).setdefault(owner, set()).add(value)
                    example.setdefault(name, node)
    knobs = []
    for t in temps:
        if t.name in base:
            knobs.append(_template_knob(t, base[t.name], None))
        elif t.name in found:
            by_knob = found[t.name]
            cond = None
            if len(by_knob) == 1:  # one pass knob makes it appear: condition on that knob's values
                (dep, values), = by_knob.items()
                order = next(k.choices for k in pass_knobs if k.name == dep)
                cond = (dep, tuple(v for v in order if v in values))
            knobs.append(_template_knob(t, example[t.name], cond))
    return knobs


def chosen_kernels(config: Mapping[str, Any]) -> dict[str, int]:
    """Template name -> chosen candidate index, from the `triton.<template>` entries of a config."""
    names = {t.name for t in templates()}
    return {k[len(KNOB_PREFIX):]: int(v) for k, v in config.items()
            if k.startswith(KNOB_PREFIX) and k[len(KNOB_PREFIX):] in names}


def backend_config(graph: Graph, config: Mapping[str, Any]) -> dict[str, Any]:
    """What `TritonBackend(config)` expects: template name -> KernelConfig, for the chosen indices."""
    from lmforge.search.cost_model import bindings_for

    choice = chosen_kernels(config)
    out = {}
    for i, t in claimed(graph, bindings_for(graph)).items():
        if t.name in choice and t.name not in out:
            out[t.name] = t.configs(graph.nodes[i])[choice[t.name]]
    return out


# ---- node times ------------------------------------------------------------------------------------------------

def kernel_time(node: Node, cost, env: Mapping[str, int], template: KernelTemplate, index: int, hw,
                aot: bool = True) -> float:
    """Predicted seconds of `node` run by `template` with its candidate config `index` (see module docstring).

    Raises KernelConfigInfeasible when that config cannot launch on `hw`."""
    from lmforge.hwmodels.roofline import node_time

    configs = template.configs(node)
    if not 0 <= index < len(configs):
        raise LmforgeError(f"{knob_name(template.name)}={index} is not a candidate index (0..{len(configs) - 1})")
    config = configs[index]
    est = node_time(cost, hw)
    launch = template.launch(node, env, config, hw)
    eff = efficiency(launch, resources(template, node, env, config, hw, aot), hw)
    _, eff_m = hw.eff(cost.op_class)
    memory_s = est.memory_s + launch.extra_bytes / (hw.memory_bandwidth * eff_m)
    return est.launch_s * (1 + launch.extra_launches) + max(est.compute_s / eff.compute, memory_s / eff.memory)


@dataclass
class KernelTable:
    """A graph's predicted time split into the part no kernel knob changes and, per template, the time of its
    nodes under each candidate config (inf where the config cannot launch, with the reason in `infeasible`).

        total(choice) = fixed_s + sum over templates t of per_config[t][choice[t]]
    """

    fixed_s: float
    per_config: dict[str, list[float]]
    infeasible: dict[tuple[str, int], str]

    def total(self, choice: Mapping[str, int]) -> float:
        t = self.fixed_s
        for name, times in self.per_config.items():
            t += times[choice.get(name, 0)]
        return t


def kernel_table(graph: Graph, hw, bindings: Mapping[str, int] | None = None, aot: bool = True) -> KernelTable:
    """Evaluate every candidate config of every template of `graph` once (cheap enumeration of kernel knobs)."""
    from lmforge.hwmodels.roofline import node_time
    from lmforge.search.cost_model import bindings_for, node_costs

    env = bindings_for(graph, bindings)
    costs = node_costs(graph, env)
    owner = claimed(graph, env)
    fixed = sum(node_time(c, hw).time_s for i, c in enumerate(costs) if i not in owner)
    per: dict[str, list[float]] = {}
    bad: dict[tuple[str, int], str] = {}
    prefetch_resources([(t, graph.nodes[i], env, c) for i, t in owner.items() for c in t.configs(graph.nodes[i])],
                       hw, aot)
    for i, t in owner.items():
        n = len(t.configs(graph.nodes[i]))
        times = per.setdefault(t.name, [0.0] * n)
        for j in range(n):
            try:
                times[j] += kernel_time(graph.nodes[i], costs[i], env, t, j, hw, aot)
            except KernelConfigInfeasible as e:
                times[j] = math.inf
                bad[(t.name, j)] = str(e)
    return KernelTable(fixed, per, bad)
