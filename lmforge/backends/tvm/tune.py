"""`tune_op`: search the schedule knobs of one TVM kernel with Optuna, timing real kernels on this machine.

    inst = OpInstance.make("matmul", [a, b])                  # the op and example inputs
    result = tune_op(inst, trials=32)                         # TPE over the knobs of the op's kernel family
    result.best_config, result.best_seconds, result.table()
    TVMBackend(result.best_config)                            # run the graph with the tuned schedule

The default config is always the first trial, so tuning never returns something slower than the default.
A config whose build fails or whose output disagrees with the torch reference is a failed trial (recorded,
never scored with a made-up number) and the search goes on. Builds are cached, so configs that round to the
same schedule (tile sizes are rounded down to divisors) cost one build.

For the project's tuner (lmforge.search.tuner, mode "measure"), the same knobs (`TVMBackend.knobs()`) can be
added to the search space and the config passed to `TVMBackend(config)`: the measured latency is then that of
the real kernels. `tune_op` is the per-op form of it, with `measure(fn) -> seconds` as the timing hook.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from lmforge.backends.tvm.backend import kernel_class
from lmforge.backends.tvm.build import BuildCache
from lmforge.backends.tvm.knobs import knob_defaults, knobs_for, resolve
from lmforge.backends.tvm.target import host_target
from lmforge.errors import LmforgeError, UnsupportedOpError
from lmforge.ir.graph import GraphBuilder, Node
from lmforge.ir.ops import get_op
from lmforge.ir.types import TensorType
from lmforge.passes.base import Knob


@dataclass
class OpInstance:
    """One application of an op: the IR node and example inputs (torch tensors, None for absent ones).

    `call_attrs` are the attributes passed at call time (symbolic ones such as attention's q_offset).
    """

    node: Node
    inputs: tuple
    call_attrs: dict = field(default_factory=dict)

    @staticmethod
    def make(op: str, inputs: Sequence[torch.Tensor | None], attrs: Mapping[str, Any] | None = None,
             regions=()) -> "OpInstance":
        """Build the node of `op` over inputs typed like the tensors given."""
        b = GraphBuilder(f"tune_{op}")
        values = [None if t is None else b.input(f"in{i}", TensorType.of(t)) for i, t in enumerate(inputs)]
        b.op(op, values, dict(attrs or {}), regions=regions)
        return OpInstance(b.build([]).nodes[0], tuple(inputs))

    def run_reference(self):
        """The op's torch reference on the inputs (a region op gets its body run by the reference too)."""
        attrs = {**self.node.attr, **self.call_attrs}
        if self.node.regions:
            from lmforge.backends.torch import TorchReference
            from lmforge.compiler import build_callable

            attrs["regions"] = tuple(build_callable(r, [TorchReference()], "cpu", {})[0] for r in self.node.regions)
        return get_op(self.node.op).reference(*self.inputs, **attrs)


@dataclass
class TuneOpResult:
    op: str
    best_config: dict
    best_seconds: float
    default_seconds: float
    trials: list[dict]
    wall_seconds: float
    build_seconds: float

    @property
    def speedup(self) -> float:
        """Default time over best time."""
        return self.default_seconds / self.best_seconds

    def table(self) -> str:
        rows = [f"{'trial':>5} {'time (us)':>11}  config (changed knobs)"]
        defaults = knob_defaults()
        for t in self.trials:
            changed = {k: v for k, v in t["config"].items() if defaults.get(k) != v}
            shown = f"{t['seconds'] * 1e6:11.1f}" if t["seconds"] is not None else f"{'failed':>11}"
            rows.append(f"{t['number']:>5} {shown}  {changed or 'defaults'}{'  ' + t['error'] if t['error'] else ''}")
        return "\n".join(rows)


def default_measure(fn: Callable[[], Any]) -> float:
    from lmforge.search.measure import measure

    return measure(fn, warmup=2, min_repeats=5, max_repeats=30, max_seconds=1.0).median_s


def tune_op(op_instance: OpInstance, knobs_space: Sequence[Knob] | None = None, trials: int = 20,
            measure: Callable[[Callable[[], Any]], float] | None = None, *, seed: int = 0, check: bool = True,
            rtol: float = 1e-4, atol: float = 1e-4, cache: BuildCache | None = None,
            base_config: Mapping[str, Any] | None = None) -> TuneOpResult:
    """Tune the schedule knobs of the TVM kernel that runs `op_instance`, `trials` real measurements.

    knobs_space: the knobs to search (default: those of the kernel's family, see knobs.knobs_for).
    measure:     `measure(fn) -> seconds` for a zero-argument callable (default: lmforge.search.measure).
    check:       compare every trial's output with the op's torch reference (rtol/atol).
    """
    import optuna

    from lmforge.search.space import suggest

    cls = kernel_class(op_instance.node)
    if cls is None:
        raise UnsupportedOpError(f"the TVM backend has no lowering for this {op_instance.node.op!r} node "
                                 f"(dtypes/attributes outside what it covers): nothing to tune")
    knobs = list(knobs_space) if knobs_space is not None else _default_space(cls, op_instance)
    measure = measure or default_measure
    cache = cache if cache is not None else BuildCache()
    target = host_target()
    expected = op_instance.run_reference() if check else None
    records: list[dict] = []
    t_start = time.perf_counter()

    def objective(trial: optuna.Trial) -> float:
        config = {**(base_config or {}), **suggest(trial, knobs)}
        record = {"number": trial.number, "config": config, "seconds": None, "error": ""}
        records.append(record)
        kernel = cls(op_instance.node, resolve(config), cache, target)

        def run():
            return kernel(*op_instance.inputs, **{**op_instance.node.attr, **op_instance.call_attrs})

        out = run()
        if kernel.failures:
            record["error"] = "build failed: " + "; ".join(kernel.failures.values())
            raise LmforgeError(record["error"])
        if check and not _close(out, expected, rtol, atol):
            record["error"] = "output differs from the torch reference"
            raise LmforgeError(record["error"])
        record["seconds"] = measure(run)
        return record["seconds"]

    sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=min(8, max(1, trials // 3)))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize", sampler=sampler)
    study.enqueue_trial({k.name: (base_config or {}).get(k.name, k.default) for k in knobs})
    study.optimize(objective, n_trials=trials, catch=(LmforgeError,))
    done = [r for r in records if r["seconds"] is not None]
    if not done:
        raise LmforgeError(f"every one of the {trials} configs failed for {op_instance.node.op}: "
                           f"{records[0]['error'] if records else 'no trial ran'}")
    best = min(done, key=lambda r: r["seconds"])
    default = records[0]["seconds"] if records[0]["seconds"] is not None else float("nan")
    return TuneOpResult(op_instance.node.op, best["config"], best["seconds"], default, records,
                        time.perf_counter() - t_start, cache.stats.seconds)


def _default_space(cls, inst: OpInstance) -> list[Knob]:
    """The knobs of the family the instance's shapes will use (small-row linears: gemv; else gemm)."""
    from lmforge.backends.tvm.lower_linalg import RowsKernel

    if issubclass(cls, RowsKernel):
        x = inst.inputs[0]
        k = x.shape[-1]
        rows = x.numel() // k
        small = rows <= knob_defaults()["tvm.linear.gemv_max_rows"] and cls.small_rows_kind == "gemv"
        return [k_ for k_ in knobs_for("gemv" if small else "gemm") if k_.name != "tvm.linear.gemv_max_rows"]
    return knobs_for(cls.family)


def _close(out, expected, rtol: float, atol: float) -> bool:
    outs = out if isinstance(out, tuple) else (out,)
    exps = expected if isinstance(expected, tuple) else (expected,)
    return len(outs) == len(exps) and all(
        a.shape == b.shape and torch.allclose(a, b, rtol=rtol, atol=atol, equal_nan=True) for a, b in zip(outs, exps))
