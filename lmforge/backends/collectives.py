"""Running tensor-parallel graphs: the communicators behind the collective ops, and the model that runs the ranks.

A split graph (`lmforge.passes.shard.tensor_parallel`) is one program every rank runs on its part of the
weights; its `all_reduce` / `all_gather` / `shard_slice` nodes ask `current_group()` for the rank's
communicator:

- `ThreadGroup(n)`: n ranks as threads of this process (torch ops release the GIL); what tests, the CPU and a
  single GPU use to run and check a split graph. Every rank adds the parts in rank order, so all ranks hold
  bit-identical sums.
- `TorchDistributedGroup()`: the default torch.distributed process group, one rank per process (NCCL on GPUs,
  gloo on CPUs), for a real multi-GPU job.

`TensorParallelModel(graph)` is the callable a split graph compiles to: it takes and returns whole tensors
like the unsplit model, cuts the split inputs (the KV caches) per rank, runs the ranks, and joins the split
outputs.

    tp = TensorParallelModel(lmforge.passes.shard.tensor_parallel(graph, 2))
    logits, k_cache, v_cache = tp(tokens, k_cache, v_cache)       # == CompiledModel(graph)(...)

Given `group=TorchDistributedGroup()` it runs just this process's rank, in one of two modes (`split_io`):

- "whole" (the default): each process passes the same whole inputs and gets the same whole outputs. Every call
  cuts the rank's part of each split input (the KV caches) from the whole tensor and all-gathers each split
  output: per call each rank sends (tp - 1) / tp of every returned cache over the interconnect, and holds the
  whole caches, in and out. Neither cost is in the split graph, so the cost model (one rank's share, caches
  kept on their ranks) does not charge them. Simple, and right for a check or a one-off call.
- "local" (for serving; `model.rank_local()` too): the split inputs and outputs, the plan's "inputs" and
  "outputs" (the KV caches, on their head dim), are this rank's parts: the caller passes the parts the previous
  step returned, and nothing is cut or gathered. This is what the cost model charges: one rank's cache, the
  graph's collectives only. `model.local_part(name, whole)` cuts a rank's part of a whole tensor once (a cache
  made elsewhere); `lmforge.passes.shard.whole_io_types` and the graph's own input types give both shapes.

    model = TensorParallelModel(split, group=TorchDistributedGroup(), split_io="local")
    logits, k, v = model(tokens, model.local_part("k_cache", k0), model.local_part("v_cache", v0))
    logits, k, v = model(next_tokens, k, v)                       # the caches stay on their ranks
"""
from __future__ import annotations

import contextlib
import contextvars
import copy
import threading
from typing import Sequence

import torch
import torch.utils._pytree as pytree

from lmforge.errors import LmforgeError

_CURRENT: contextvars.ContextVar = contextvars.ContextVar("lmforge_tensor_parallel_group", default=None)
BARRIER_TIMEOUT_S = 600.0


class ThreadGroup:
    """`size` ranks simulated by threads; `rank_view(r)` is what rank r's thread uses as its group.

    The ranks take turns: a rank runs while it holds the group's baton (`turn()`) and lets go only while it
    waits in a collective. So the simulation is deterministic and backends that are not thread-safe (Triton's
    interpreter patches module globals while it runs a kernel) work; it is a check of the split program, not
    a speed-up."""

    def __init__(self, size: int):
        if size < 1:
            raise LmforgeError(f"a tensor-parallel group needs >= 1 rank, got {size}")
        self.size = size
        self._barrier = threading.Barrier(size, timeout=BARRIER_TIMEOUT_S)
        self._baton = threading.Lock()
        self._slots: list = [None] * size

    def rank_view(self, rank: int) -> "_ThreadRank":
        return _ThreadRank(self, rank)

    @contextlib.contextmanager
    def turn(self):
        """Run the block as one of the ranks taking turns (see the class docstring)."""
        with self._baton:
            yield

    def abort(self) -> None:
        """Release the other ranks' waits with an error (a rank failed)."""
        self._barrier.abort()

    def _wait(self) -> None:
        self._baton.release()          # let the other ranks run up to this collective
        try:
            self._barrier.wait()
        finally:
            self._baton.acquire()

    def _exchange(self, rank: int, x: torch.Tensor) -> list[torch.Tensor]:
        self._slots[rank] = x
        self._wait()
        parts = list(self._slots)
        self._wait()                   # nobody overwrites a slot before every rank has read them all
        return parts


class _ThreadRank:
    def __init__(self, group: ThreadGroup, rank: int):
        self.group, self.rank, self.size = group, rank, group.size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        parts = self.group._exchange(self.rank, x)
        total = parts[0].clone()
        for p in parts[1:]:
            total += p
        return total

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return torch.cat(self.group._exchange(self.rank, x), dim)


class TorchDistributedGroup:
    """This process's rank of the default torch.distributed process group (initialised by the caller)."""

    def __init__(self):
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise LmforgeError("TorchDistributedGroup needs torch.distributed initialised: call "
                               "torch.distributed.init_process_group(...) in every process first")
        self._dist = dist
        self.rank, self.size = dist.get_rank(), dist.get_world_size()

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        self._dist.all_reduce(out)
        return out

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(self.size)]
        self._dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim)


@contextlib.contextmanager
def use_group(group):
    """Run the block (this thread) as `group`'s rank: the collective ops talk through it."""
    token = _CURRENT.set(group)
    try:
        yield group
    finally:
        _CURRENT.reset(token)


def current_group(size: int):
    """The communicator of the tensor-parallel run this thread is in, checked to have `size` ranks."""
    group = _CURRENT.get()
    if group is None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() == size:
            group = TorchDistributedGroup()
        else:
            raise LmforgeError(f"this graph is split over {size} tensor-parallel ranks: run it with "
                               "lmforge.backends.collectives.TensorParallelModel (or lmforge.compile with the "
                               f"tensor_parallel pass), or in a torch.distributed job of {size} processes")
    if group.size != size:
        raise LmforgeError(f"a collective for {size} ranks ran in a group of {group.size}")
    return group


class TensorParallelModel:
    """A split graph's ranks, callable with whole inputs like the unsplit model; with `group`, this process's rank
    only, taking and returning whole tensors (split_io="whole": the caches cut and all-gathered every call) or its
    parts of the KV caches (split_io="local": nothing cut or gathered, what the cost model charges). See the module
    docstring."""

    config_source: dict | None = None  # config="best": {"study", "trial"} the config came from (CompiledModel's)
    objectives: dict | None = None  # config="best": that trial's predicted / measured numbers (CompiledModel's)

    def __init__(self, graph, backends: Sequence = (), device="cpu", target: str = "host", config=None,
                 pass_report: str = "", group=None, split_io: str = "whole"):
        from lmforge.compiler import CompiledModel, output_structure
        from lmforge.passes.shard import plan_of, rank_graph

        plan = plan_of(graph)
        if plan is None:
            raise LmforgeError(f"graph {graph.name!r} is not split over ranks: run it with CompiledModel")
        self.graph, self.plan, self.size = graph, plan, plan["size"]
        self.target, self.config, self.pass_report = target, dict(config or {}), pass_report
        if group is not None and group.size != self.size:
            raise LmforgeError(f"the graph is split over {self.size} ranks but the group has {group.size}")
        if split_io not in ("whole", "local") or (split_io == "local" and group is None):
            raise LmforgeError(f"split_io must be 'whole' or 'local' (with a group: one rank's parts), got "
                               f"{split_io!r}{'' if group is not None else ' without a group'}")
        self.group, self.split_io = group, split_io
        ranks = range(self.size) if group is None else [group.rank]
        self.ranks = {r: CompiledModel(rank_graph(graph, r), backends, device, target, config, pass_report)
                      for r in ranks}
        self._split_inputs = [plan["inputs"].get(v.name) for v in graph.inputs]
        self._split_outputs = {int(k): d for k, d in plan["outputs"].items()}
        self._out_spec = output_structure(graph)

    def rank_local(self) -> "TensorParallelModel":
        """This model (one rank of a group) taking and returning its rank's parts of the split inputs and outputs,
        the KV caches: split_io="local", see the module docstring. Shares the compiled rank."""
        if self.group is None:
            raise LmforgeError("rank_local() is for one rank of a group: build the model with group=...")
        local = copy.copy(self)
        local.split_io = "local"
        return local

    def local_part(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's part of the whole tensor for the split input `name` (a KV cache), for split_io="local"."""
        from lmforge.passes.shard import cut

        if name not in self.plan["inputs"]:
            raise LmforgeError(f"input {name!r} is not split (split inputs: {sorted(self.plan['inputs'])})")
        rank = self.group.rank if self.group is not None else 0
        return cut(tensor, self.size, rank, self.plan["inputs"][name])

    @property
    def weights(self) -> dict:
        """The whole weights (each rank cuts its own part)."""
        return dict(self.graph.weights)

    def export(self, path, **kwargs):
        """An artifact of the split graph with the whole weights; `lmforge.load` gives a TensorParallelModel."""
        from lmforge.exporting import export

        return export(self, path, **kwargs)

    def add_gpu_kernels(self, targets=("h100",), backends=("tvm", "triton")) -> dict[str, list[str]]:
        """`CompiledModel.add_gpu_kernels` for the rank program: every rank runs the same graph (local shapes,
        its own weights), so one set of kernels per target serves them all; export keeps them."""
        rank = next(iter(self.ranks.values()))
        added = rank.add_gpu_kernels(targets, backends)
        self.kernel_files = rank.kernel_files
        return added

    @property
    def kernels(self):
        """Who runs each node (the same on every rank)."""
        return next(iter(self.ranks.values())).kernels

    def inspect(self, target: str | None = None, show_costs: bool = True) -> str:
        """One rank's graph (every rank runs the same), under a line on how it is split."""
        collectives = sum(n.op in ("all_reduce", "all_gather") for n in self.graph.nodes)
        head = (f"tensor parallel over {self.size} ranks: {len(self.plan['params'])} weights split, split inputs "
                f"{sorted(self.plan['inputs']) or 'none'}, {collectives} collectives per call; costs are one rank's")
        return head + "\n" + next(iter(self.ranks.values())).inspect(target, show_costs)

    def _rank_inputs(self, leaves: list, rank: int) -> list:
        from lmforge.passes.shard import cut

        if self.split_io == "local":
            return leaves
        return [x if d is None else cut(x, self.size, rank, d) for x, d in zip(leaves, self._split_inputs)]

    def _run_rank(self, rank: int, group, leaves: list) -> list:
        model = self.ranks[rank]
        gather = self.group is not None and self.split_io == "whole"   # threads: joined by _run_threads
        with use_group(group):
            outs = model._fn(*self._rank_inputs(leaves, rank))
            return [group.all_gather(o, self._split_outputs[i]) if i in self._split_outputs and gather else o
                    for i, o in enumerate(outs)]

    def __call__(self, *args, **kwargs):
        from lmforge.compiler import input_leaves
        from lmforge.passes.shard import whole_io_types

        if self.split_io == "local":      # the graph's own (local) input types
            leaves = input_leaves(self.graph, args, kwargs)
            outs = self._run_rank(self.group.rank, self.group, leaves)
            return self._structured(outs)
        if getattr(self, "_whole_inputs", None) is None:
            self._whole_inputs = whole_io_types(self.graph)[0]
        leaves = input_leaves(self.graph, args, kwargs, self._whole_inputs)
        for x, d, v in zip(leaves, self._split_inputs, self.graph.inputs):
            if d is not None and x.shape[d] % self.size:
                raise LmforgeError(f"input {v.name!r}: dim {d} ({x.shape[d]}) does not split over {self.size} ranks")
        if self.group is not None:
            outs = self._run_rank(self.group.rank, self.group, leaves)
        else:
            outs = self._run_threads(leaves)
        return self._structured(outs)

    def _structured(self, outs: list):
        if self._out_spec is None:
            return outs[0] if len(outs) == 1 else outs
        return pytree.tree_unflatten(list(outs), self._out_spec)

    def _run_threads(self, leaves: list) -> list:
        group = ThreadGroup(self.size)
        results: list = [None] * self.size
        errors: list = []

        def work(rank: int):
            try:
                with group.turn():
                    results[rank] = self._run_rank(rank, group.rank_view(rank), leaves)
            except BaseException as exc:  # noqa: BLE001 - re-raised below, after the other ranks stop
                errors.append((rank, exc))
                group.abort()

        threads = [threading.Thread(target=work, args=(r,), name=f"lmforge-tp-rank{r}") for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            real = [e for e in errors if not isinstance(e[1], threading.BrokenBarrierError)] or errors
            rank, exc = real[0]
            raise exc
        return [torch.cat([results[r][i] for r in range(self.size)], d) if (d := self._split_outputs.get(i)) is not None
                else results[0][i] for i in range(len(results[0]))]
