"""Cost of a whole graph on a target: time along one stream and along the critical path, FLOPs, bytes,
Kinetics eFLOPs, peak memory from liveness, and whether it fits; decode loops charged per token.

Node costs come from the op registry (`OpDef.cost`) and become time on the target through the roofline
in `lmforge.hwmodels.roofline`. Symbolic dimensions are bound by `bindings` (else the sizes the graph was
captured with).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import networkx as nx

from lmforge.ir.cost import Cost
from lmforge.ir.graph import Graph
from lmforge.ir.types import dim_symbols


@dataclass(frozen=True)
class NodeEstimate:
    index: int
    op: str
    cost: Cost
    time_s: float
    bound: str
    eflops: float


@dataclass(frozen=True)
class GraphCost:
    nodes: tuple[NodeEstimate, ...]
    time_s: float            # all nodes one after another on one stream
    critical_path_s: float   # longest dependency chain (parallel branches overlap)
    flops: float
    bytes: float
    eflops: float
    weight_bytes: float
    peak_memory_bytes: float  # weights + inputs + the largest set of live intermediates
    memory_capacity: float

    @property
    def fits(self) -> bool:
        return self.peak_memory_bytes <= self.memory_capacity


def size_symbols(graph: Graph) -> set[str]:
    """Every symbol the graph's sizes use: in its values' shapes and its symbolic attributes (a `q_offset` of
    "past"), regions included."""
    from lmforge.ir.ops import get_op

    out = {s for v in graph.values().values() for d in v.type.shape for s in dim_symbols(d)}
    for n in graph.nodes:
        out |= get_op(n.op).size_symbols(n.attr)
        for r in n.regions:
            out |= size_symbols(r)
    return out


def check_bindings(graph: Graph, bindings: Mapping[str, int] | None, what: str = "bindings") -> None:
    """An LmforgeError for `bindings` keys that are not symbolic sizes of `graph` (a misspelled size would price
    the graph at its default sizes without a word), listing the sizes it has. what: how the caller's user names
    the bindings (e.g. 'Workload.extras["serving_dims"]')."""
    from lmforge.errors import LmforgeError

    valid = size_symbols(graph) | set(dict(graph.get_meta("example_dims") or ()))
    unknown = sorted(set(bindings or ()) - valid)
    if unknown:
        have = ", ".join(sorted(valid)) if valid else "none (capture it with dynamic sizes to price other sizes)"
        raise LmforgeError(f"{what} {unknown} name no symbolic size of this graph; its symbolic sizes are: {have}")


def bindings_for(graph: Graph, bindings: Mapping[str, int] | None = None) -> dict[str, int]:
    """The value of every symbolic size: `bindings`, else the size the graph was captured with (meta
    `example_dims`), else 1. The default of 1 is deliberate: callers price graphs built without example sizes
    (tests, passes' own checks) and pass only the sizes that matter to them; `graph_cost` and `decode_cost`
    reject binding names that are not sizes of the graph, so a misspelled size never falls back silently."""
    env = {s: 1 for s in size_symbols(graph)}
    env.update(dict(graph.get_meta("example_dims") or ()))
    env.update(bindings or {})
    return env


def _concrete_attr(v, env):
    """A dim attribute with its symbols bound (other attributes unchanged)."""
    from lmforge.ir.types import eval_dim

    if isinstance(v, str):
        return eval_dim(v, env)
    if isinstance(v, tuple):
        return tuple(_concrete_attr(x, env) for x in v)
    return v


def node_costs(graph: Graph, env: Mapping[str, int]) -> list[Cost]:
    """The registry cost of every node with the symbolic dims bound by `env`."""
    from lmforge.ir.ops import get_op
    from lmforge.ir.ops.registry import SYMBOLIC_KINDS

    out = []
    for n in graph.nodes:
        ins = [None if v is None else v.type.concrete(env) for v in n.inputs]
        outs = [v.type.concrete(env) for v in n.outputs]
        opdef = get_op(n.op)
        attrs = {k: _concrete_attr(v, env) if opdef.attrs[k].kind in SYMBOLIC_KINDS else v for k, v in n.attrs}
        cost = opdef.cost(ins, attrs, outs)
        # a fused region: its FLOPs, but only the node's own inputs/outputs move through memory (a program op's
        # regions are models it runs many times: lmforge.programs.cost charges them from what the program decoded)
        if n.regions and opdef.kind != "program":
            inner = [c for r in n.regions for c in node_costs(r, env)]
            cost = Cost(cost.flops + sum(c.flops for c in inner), cost.bytes_by_tier, cost.op_class, cost.dtype)
        out.append(cost)
    return out


def graph_cost(graph: Graph, hw, bindings: Mapping[str, int] | None = None,
               kernels: Mapping[str, int] | None = None) -> GraphCost:
    """Predict the cost of one run of `graph` on hardware `hw` (a `lmforge.hwmodels.Hardware`).

    `bindings` gives symbolic sizes (a name that is not a size of the graph is an LmforgeError); sizes not given
    take the graph's example sizes, else 1 (see `bindings_for`).

    `kernels` (Triton template name -> candidate config index, see `lmforge.search.kernel_model`) charges the
    nodes a Triton template claims by the kernel model of that config (index 0 for templates not named);
    None keeps the plain roofline for every node. A config that cannot launch raises KernelConfigInfeasible.
    """
    from lmforge.hwmodels.roofline import node_time

    check_bindings(graph, bindings)
    env = bindings_for(graph, bindings)
    costs = node_costs(graph, env)
    owner = {}
    if kernels is not None:
        from lmforge.search.kernel_model import claimed, prefetch_resources

        owner = claimed(graph, env)
        prefetch_resources([(t, graph.nodes[i], env, t.configs(graph.nodes[i])[kernels.get(t.name, 0)])
                            for i, t in owner.items() if 0 <= kernels.get(t.name, 0) < len(t.configs(graph.nodes[i]))],
                           hw)
    ests = []
    for i, (n, c) in enumerate(zip(graph.nodes, costs)):
        e = node_time(c, hw)
        time_s = e.time_s
        if i in owner:
            from lmforge.search.kernel_model import kernel_time

            time_s = kernel_time(n, c, env, owner[i], kernels.get(owner[i].name, 0), hw)
        ests.append(NodeEstimate(i, n.op, c, time_s, e.bound, e.eflops))
    return GraphCost(
        nodes=tuple(ests),
        time_s=sum(e.time_s for e in ests),
        critical_path_s=critical_path_time(graph, [e.time_s for e in ests]),
        flops=sum(c.flops for c in costs),
        bytes=sum(c.bytes for c in costs),
        eflops=sum(e.eflops for e in ests),
        weight_bytes=sum(v.type.concrete(env).nbytes() for v in graph.params),
        peak_memory_bytes=peak_memory(graph, env),
        memory_capacity=float(getattr(hw, "memory_bytes", float("inf"))),
    )


_DAGS: dict[int, tuple[Graph, nx.DiGraph]] = {}   # id(graph) -> (graph, its DAG with the virtual end): ids rechecked


def _dag(graph: Graph) -> nx.DiGraph:
    """graph.to_networkx() plus an edge from every sink node to a virtual "end" (so a sink's own time counts),
    built once per graph: a cost sweep prices one graph at many bindings."""
    got = _DAGS.get(id(graph))
    if got is None or got[0] is not graph:
        if len(_DAGS) > 64:
            _DAGS.clear()
        g = graph.to_networkx()
        g.add_edges_from([(v, "end") for v in list(g.nodes) if isinstance(v, int) and g.out_degree(v) == 0])
        got = _DAGS[id(graph)] = (graph, g)
    return got[1]


def critical_path_time(graph: Graph, times: list[float]) -> float:
    """Longest path through the dependency DAG, each node weighted by its time (networkx)."""
    g = _dag(graph)
    for u, v, data in g.edges(data=True):
        data["w"] = times[u] if isinstance(u, int) else 0.0
    return float(nx.dag_longest_path_length(g, weight="w")) if g.number_of_edges() else 0.0


# ops whose output aliases their input (no new memory)
_VIEWS = {"reshape", "permute", "expand", "slice", "select", "kv_qdq"}
# ops whose output is their first input grown or updated in place (a serving runtime's preallocated KV cache, which
# is what their cost rules charge): only the new entries are new memory
_IN_PLACE = {"kv_cache_append", "kv_cache_update"}


_CACHE_PATH = ("kv_cache_append", "select", "reshape", "concat", "permute", "slice")


def _quantized_cache_values(graph: Graph) -> dict[str, str]:
    """{value name: storage dtype} for the KV-cache values that attention reads through `kv_qdq`: the cache
    is stored in that dtype, so its inputs, appends and returned stacks are (a cache path: kv_cache_append's
    cache operand and output, and the views / concats between them and the graph's inputs and outputs)."""
    producers, users = graph.producers(), graph.users()
    out: dict[str, str] = {}
    todo = [(n.inputs[0], n.attr["dtype"]) for n in graph.nodes if n.op == "kv_qdq" and n.inputs[0] is not None]
    while todo:
        v, dtype = todo.pop()
        if v.name in out:
            continue
        out[v.name] = dtype
        node = producers.get(v.name)
        if node is not None and node.op in _CACHE_PATH:   # back to the stored cache (not the new token's K/V)
            src = node.inputs[0] if node.op == "kv_cache_append" else None
            todo += [(i, dtype) for i in ((src,) if node.op == "kv_cache_append" else node.inputs) if i is not None]
        for u in users.get(v.name, []):                      # on to the returned cache
            if u.op in ("reshape", "concat") or (u.op == "kv_cache_append" and u.inputs[0] is v):
                todo.append((u.output, dtype))
    return out


def peak_memory(graph: Graph, env: Mapping[str, int]) -> float:
    """Weights + graph inputs + the largest total size of live intermediate values at any node, in device memory.

    A value is live from the node that makes it to its last reader (graph outputs stay live to the end). Some
    values share memory with others, whose buffers then stay live as long as any value sharing them is read:
    - views share their input's memory, and so does `kv_qdq` (fused into the attention read);
    - `kv_cache_append` / `kv_cache_update` write into their cache operand in place (a serving runtime's
      preallocated cache, as their cost rules charge): only the appended entries are new memory;
    - a `concat` marked `inplace` is the layers' caches stacked in one buffer they were written into: no new memory.
    So a decode step holds its KV cache once, not once as input, once per append and once more as the stack.
    A KV cache that attention reads through `kv_qdq` is held in its storage dtype (1 byte per element for int8 /
    fp8, plus one fp32 scale per token and head) from the graph input to the returned cache; block top-k attention
    keeps its block summaries (fp32) beside the cache for the whole step. Graph inputs and
    weights annotated with a memory tier other than "dram" (memory_tier="host": an offloaded cache), and the
    values that live in their buffers, are not in device memory; values computed from them are.
    """
    from lmforge.ir.ops.sparse_attention_ops import block_summary_bytes
    from lmforge.ir.types import itemsize

    values = graph.values()
    size = {v.name: v.type.concrete(env).nbytes() for v in values.values()}
    for name, dtype in _quantized_cache_values(graph).items():
        t = values[name].type.concrete(env)
        per_row = t.shape[-1] if t.rank else 1
        size[name] = t.numel() * (itemsize(dtype) + 4 / max(1, per_row))
    # an offloaded input or weight (memory_tier="host") and what lives in its buffer (views, in-place appends) are
    # not device memory; a value computed from it is (type rules pass annotations on, so only these are zeroed)
    offloaded = {v.name for v in (*graph.inputs, *graph.params) if v.type.annotation("memory_tier", "dram") != "dram"}
    for name in offloaded:
        size[name] = 0.0
    own, buffers = _buffers(graph, size)
    for name, shared in buffers.items():
        if offloaded.intersection(shared):
            own[name] = 0.0
    last_use: dict[str, int] = {}
    end = len(graph.nodes)
    for i, n in enumerate(graph.nodes):
        for v in n.inputs:
            if v is not None:
                last_use.update((b, i) for b in buffers.get(v.name, (v.name,)))
    for v in graph.outputs:
        last_use.update((b, end) for b in buffers.get(v.name, (v.name,)))
    base = sum(size[v.name] for v in (*graph.inputs, *graph.params))
    base += sum(block_summary_bytes(values[n.inputs[1].name].type.concrete(env).shape, n.attr["block_size"],
                                    n.attr["summary"]) for n in graph.nodes if n.op == "block_topk_attention")
    live: dict[str, float] = {}
    peak = 0.0
    for i, n in enumerate(graph.nodes):
        for v in n.outputs:
            live[v.name] = own[v.name]
        peak = max(peak, sum(live.values()))
        for name in [k for k in live if last_use.get(k, -1) <= i]:
            del live[name]
    return float(base + peak)


def _buffers(graph: Graph, size: Mapping[str, float]) -> tuple[dict[str, float], dict[str, tuple[str, ...]]]:
    """For each node output: the new memory it takes, and the values whose memory it lives in (itself included).
    A buffer is grown in place once: a second append to the same cache is a new buffer."""
    own: dict[str, float] = {}
    buffers: dict[str, tuple[str, ...]] = {}
    grown: set[str] = set()       # values whose buffer an in-place op already took over

    def of(v) -> tuple[str, ...]:
        return buffers.get(v.name, (v.name,))

    for n in graph.nodes:
        ins = [v for v in n.inputs if v is not None]
        # the operands whose buffer the op grows: an append's cache (not the new entries), a stack's pieces
        targets = {ins[0].name} if n.op in _IN_PLACE and ins else {x.name for x in ins} if (
            n.op == "concat" and n.attr.get("inplace")) else set()
        in_place = bool(targets) and not grown & targets
        grown |= targets if in_place else set()
        for v in n.outputs:
            if n.op in _VIEWS and ins:
                own[v.name], buffers[v.name] = 0.0, of(ins[0])
            elif n.op in _IN_PLACE and in_place:
                own[v.name], buffers[v.name] = max(0.0, size[v.name] - size[ins[0].name]), (*of(ins[0]), v.name)
            elif n.op == "concat" and in_place:
                shared = tuple(dict.fromkeys(b for x in ins for b in of(x)))
                own[v.name] = max(0.0, size[v.name] - sum(size[x.name] for x in ins))
                buffers[v.name] = (*shared, v.name)
            else:
                own[v.name] = size[v.name]
    return own, buffers


@dataclass(frozen=True)
class DecodeCost:
    tokens: int
    time_s: float
    flops: float
    bytes: float
    eflops: float
    per_token_time_s: tuple[float, ...] = field(repr=False)


def decode_cost(step_graph: Graph, hw, *, prompt_len: int, new_tokens: int, past_symbol: str = "past",
                bindings: Mapping[str, int] | None = None) -> DecodeCost:
    """Charge a decode loop per generated token: step t runs with the KV cache holding prompt_len + t
    entries, so bytes and FLOPs of attention grow with t and the total grows quadratically.

    `past_symbol` must be a symbolic size of the step graph (else every step would be priced at the same past).
    """
    from lmforge.errors import LmforgeError

    sizes = size_symbols(step_graph)
    if past_symbol not in sizes:
        raise LmforgeError(f"past_symbol {past_symbol!r} is not a symbolic size of the step graph "
                           f"{step_graph.name!r} (its sizes: {', '.join(sorted(sizes)) or 'none'}); pass the name of "
                           "its KV cache length, or capture the step with a dynamic cache length")
    check_bindings(step_graph, bindings)
    times, flops, byts, efl = [], 0.0, 0.0, 0.0
    for t in range(new_tokens):
        env = dict(bindings or {})
        env[past_symbol] = prompt_len + t
        gc = graph_cost(step_graph, hw, env)
        times.append(gc.time_s)
        flops += gc.flops
        byts += gc.bytes
        efl += gc.eflops
    return DecodeCost(new_tokens, sum(times), flops, byts, efl, tuple(times))
