"""Cost of a program run on a target, per program node, from its token accounting.

Two views, side by side:
- tensor cost model: every decode step a node ran (its `DecodeTrace`: rows per step, prompt length) is
  charged as one run of its step graph with `batch` = rows and `past` = cached entries
  (`lmforge.search.cost_model.graph_cost`; the Hydragen-rewritten step when the prefix is shared); the
  prompt is charged as one run of the node's prefill graph when it has one (`ProgramBuilder(prefills=...)`),
  else token by token through the step graph, the way the runtime then feeds it. This gives
  latency (roofline) and eFLOPs. A node's latency is its number of steps, so best-of-N latency is set by
  its longest sample and first-finish by its first; the program's latency is the critical path.
- Kinetics (Sadhukhan et al., 2025): per generated token t of a trace, `decode_step_cost` with N = rows
  decoding at that step, at 16-bit KV (scaled by the KV format's bits). Without a shared prefix every row
  also re-reads the prompt KV. For N samples of fixed length this sums exactly to `kinetics_best_of_n`.

KV convention for `kv_bytes_read`: at generated token t (1-based) a row reads the prompt's L entries
(once for all rows when shared) and t - 1/2 generated entries (Kinetics' convention), D elements each.
A region split over tp GPUs (`lmforge.passes.shard.tensor_parallel_regions`) is charged one rank's time plus the
collectives as latency and tp ranks' work as eFLOPs (both views).
A retrieve node is charged its corpus scan per prompt (`lmforge.programs.retrieval.retrieval_cost`, roofline;
its eFLOPs count in both views); the documents it adds are charged by the generate node that prefills them.
All totals are per run; `ProgramCost.per_prompt(...)` divides by the number of prompts.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from lmforge.errors import LmforgeError
from lmforge.hwmodels.kinetics import decode_step_cost
from lmforge.ir.graph import Graph
from lmforge.ir.types import itemsize


@dataclass(frozen=True)
class NodeCost:
    index: int
    op: str
    model: str
    prompt_tokens: int
    generated_tokens: int
    kv_bytes_read: float
    time_s: float            # summed over prompts (each prompt's step count sets its latency)
    eflops: float            # tensor cost model
    kinetics_eflops: float
    steps: int


@dataclass(frozen=True)
class ProgramCost:
    nodes: tuple[NodeCost, ...]
    time_s: float            # critical path over nodes
    eflops: float
    kinetics_eflops: float
    n_prompts: int

    def per_prompt(self, field: str) -> float:
        return getattr(self, field) / max(self.n_prompts, 1)

    def table(self) -> str:
        rows = [f"{'node':>4} {'op':<9} {'model':<10} {'prompt tok':>10} {'gen tok':>8} {'KV MB read':>10} "
                f"{'time ms':>9} {'eFLOPs':>10} {'Kinetics':>10}"]
        for c in self.nodes:
            rows.append(f"{c.index:>4} {c.op:<9} {c.model:<10} {c.prompt_tokens:>10} {c.generated_tokens:>8} "
                        f"{c.kv_bytes_read / 1e6:>10.4f} {c.time_s * 1e3:>9.4f} {c.eflops:>10.3e} "
                        f"{c.kinetics_eflops:>10.3e}")
        return "\n".join(rows)


@dataclass(frozen=True)
class ModelDims:
    """What the Kinetics formula needs of a step graph: P (non-embedding params), r, D, KV bytes/element."""

    P: float
    r: float
    D: float
    kv_bytes: float
    kv_bits: int


def model_dims(step: Graph) -> ModelDims:
    layers, kv_heads, head_dim = (int(step.inputs[1].type.shape[i]) for i in (0, 2, 4))
    embed = {n.inputs[1].name for n in step.nodes if n.op == "embedding" and len(n.inputs) > 1}
    # a weight-only quantized linear counts its logical N x K parameters, not its packed tensors
    packed = [n for n in step.nodes if n.op == "linear_wo"]
    skip = embed | {v.name for n in packed for v in n.inputs[1:4] if v is not None}
    P = float(sum(p.type.numel() for p in step.params if p.name not in skip and p.type.rank >= 2))
    P += float(sum(int(n.inputs[0].type.shape[-1]) * int(n.outputs[0].type.shape[-1]) for n in packed))
    attn = [n for n in step.nodes if "attention" in n.op]
    q_heads = int(attn[0].inputs[0].type.shape[1]) if attn else kv_heads
    kv_dtype = next((n.attr.get("kv_dtype") for n in attn if n.attr.get("kv_dtype")), None)
    kv_bytes = itemsize(kv_dtype or step.inputs[1].type.dtype)
    return ModelDims(P, q_heads / kv_heads, 2.0 * layers * kv_heads * head_dim, kv_bytes,
                     8 if kv_dtype else 16)


def kinetics_trace_eflops(trace, dims: ModelDims, I: float) -> float:
    """Kinetics eFLOPs of one trace (module docstring), summed per generated token."""
    total = 0.0
    for t, rows in enumerate(trace.rows_per_step, start=1):
        c = decode_step_cost(dims.P, rows, trace.prompt_len, t, dims.r, dims.D, I)
        memory = c["memory"] + (0.0 if trace.shared_prefix else 2.0 * (rows - 1) * trace.prompt_len * dims.D)
        total += c["compute"] + I * memory * dims.kv_bits / 16
    return total


def kv_bytes_read(trace, dims: ModelDims) -> float:
    total = 0.0
    for t, rows in enumerate(trace.rows_per_step, start=1):
        groups = 1 if trace.shared_prefix else rows
        total += dims.D * dims.kv_bytes * (groups * trace.prompt_len + rows * (t - 0.5))
    return total


class _StepCosts:
    """graph_cost of a step graph at (batch, past), memoized per graph.

    tune_tiles: on a GPU target, charge each step with the best tile config of every Triton template it runs
    (the kernel knobs of lmforge.search.kernel_model, chosen exactly: they change no output, so for a given
    program the fastest candidate of each template is the right one); `tiles` records the choices. Otherwise
    (and on CPU targets) the roofline time without kernel configs. aot: read registers / shared memory from
    ahead-of-time builds (cached on disk) rather than estimate them.
    """

    def __init__(self, hw, tune_tiles: bool = False, aot: bool = True):
        self.hw = hw
        self.tune_tiles = tune_tiles and getattr(hw, "kind", "") == "gpu"
        self.aot = aot
        self.memo: dict[tuple, tuple[float, float]] = {}
        self.graphs: dict[int, Graph] = {}
        self.tiles: dict[tuple, dict[str, int]] = {}   # (id(graph), bindings) -> template -> config index

    def __call__(self, graph: Graph, batch: int, past: int) -> tuple[float, float]:
        """(time, eFLOPs) of one run of a decode step with `batch` rows over `past` cached entries."""
        return self.run(graph, {"batch": batch, "past": past})

    def prefill(self, graph: Graph, rows: int, length: int) -> tuple[float, float]:
        """(time, eFLOPs) of one run of a prefill graph (tokens [rows, length])."""
        dims = graph.inputs[0].type.shape
        bindings = {d: v for d, v in zip(dims, (rows, length)) if isinstance(d, str)}
        if any(isinstance(d, int) and d != v for d, v in zip(dims, (rows, length))):
            raise LmforgeError(f"prefill graph {graph.name!r} takes tokens {list(dims)}, not [{rows}, {length}]: "
                               "capture it with dynamic batch and sequence dims")
        return self.run(graph, bindings)

    def run(self, graph: Graph, bindings: dict) -> tuple[float, float]:
        from lmforge.search.cost_model import graph_cost

        key = (id(graph), tuple(sorted(bindings.items())))
        if key not in self.memo or self.graphs.get(id(graph)) is not graph:
            self.graphs[id(graph)] = graph
            kernels = None
            if self.tune_tiles:
                from lmforge.search.kernel_model import kernel_table

                table = kernel_table(graph, self.hw, bindings, aot=self.aot)
                kernels = {name: min(range(len(times)), key=times.__getitem__)
                           for name, times in table.per_config.items()}
                self.tiles[key] = kernels
            gc = graph_cost(graph, self.hw, bindings, kernels=kernels)
            self.memo[key] = (gc.time_s, gc.eflops * ranks(graph))   # latency: one rank's; work: every rank's
        return self.memo[key]


def ranks(graph: Graph) -> int:
    """GPUs a (tensor-parallel) region runs on: 1 unless lmforge.passes.shard split it."""
    from lmforge.passes.shard import plan_of

    plan = plan_of(graph)
    return plan["size"] if plan else 1


def trace_cost(step: Graph, trace, costs: _StepCosts, prefill: Graph | None = None) -> tuple[float, float]:
    """(time, eFLOPs) of one trace on the tensor cost model: the prompt (one run of the prefill graph when the node
    has one, else token by token through the step), then the decode steps."""
    from lmforge.programs.runtime import hydragen_region

    time = efl = 0.0
    if prefill is not None:
        time, efl = costs.prefill(prefill, trace.prefill_rows, trace.prompt_len)
    for pos in range(trace.prompt_len if prefill is None else 0):
        dt, de = costs(step, trace.prefill_rows, pos)
        time, efl = time + dt, efl + de
    decode_graph = (hydragen_region(step, trace.prompt_len) if trace.shared_prefix else None) or step
    for t, rows in enumerate(trace.rows_per_step[1:], start=1):  # token 1 comes from the prefill's logits
        dt, de = costs(decode_graph, max(rows, 1), trace.prompt_len + t - 1)
        time, efl = time + dt, efl + de
    return time, efl


def program_cost(graph: Graph, result, hw, *, step_costs: _StepCosts | None = None) -> ProgramCost:
    """Cost of `result` (a ProgramResult of running `graph`) on hardware `hw`; see the module docstring."""
    from lmforge.hwmodels.roofline import node_time
    from lmforge.programs.retrieval import retrieval_cost
    from lmforge.search.cost_model import critical_path_time

    costs = step_costs or _StepCosts(hw)
    I = hw.peak("bfloat16") / hw.memory_bandwidth
    out = []
    for node, acc in zip(graph.nodes, result.accounts):
        time = efl = kin = kvb = 0.0
        if node.regions:
            step = node.regions[0]
            dims = model_dims(step)
            prefill = node.regions[1] if len(node.regions) > 1 else None
            gpus = ranks(step)   # dims are one rank's share
            for tr in acc.traces:
                dt, de = trace_cost(step, tr, costs, prefill)
                time, efl = time + dt, efl + de
                kin += kinetics_trace_eflops(tr, dims, I) * gpus
                kvb += kv_bytes_read(tr, dims) * gpus
        elif node.op == "retrieve" and acc.queries:
            for length, n in Counter(acc.query_lens).items():
                est = node_time(retrieval_cost(node.attr, length), hw)
                time, efl = time + est.time_s * n, efl + est.eflops * n
            kin = efl
        model = node.attr.get("model", "") or _model_of(node)
        out.append(NodeCost(node_index(acc), node.op, model, acc.prompt_tokens,
                            acc.generated_tokens, kvb, time, efl, kin, sum(t.steps for t in acc.traces)))
    crit = critical_path_time(graph, [c.time_s for c in out])
    return ProgramCost(tuple(out), crit, sum(c.eflops for c in out), sum(c.kinetics_eflops for c in out),
                       result.n_prompts)


def _model_of(node) -> str:
    """The model a scoring / fuser node runs (its region's parameter prefix), "" if it runs none."""
    from lmforge.passes.decoding import DecodingError, region_model

    try:
        return region_model(node.regions[0]) if node.regions else ""
    except DecodingError:
        return ""


def node_index(acc) -> int:
    return acc.index
