"""The schedule knobs of the TVM backend: tile sizes, loop order, vector width, parallel, unroll.

Every knob is an `lmforge.passes.base.Knob`, so the project's search (Optuna) suggests them like any pass
knob. A config is a plain dict {knob name: value}; what it leaves out takes the default, and the defaults
are a good schedule without tuning (chosen by measurement on an AVX-512 host: see docs/notes-tvm.md).

Families (the kernel kinds the lowerings produce):
  gemv      linear / linear_wo / 2-D matmul with few rows (decode): the reduction axis K is split into
            vectors of `vec` lanes reduced across (rfactor); `n_tile` output columns share each x load.
  gemm      linear / matmul with many rows (prefill, 1024^3): the weight is packed into [N/nr, K, nr]
            panels inside the kernel; an `mr` x `nr` register tile accumulates over K.
  attention softmax(q k^T) v: decode: one (batch, head, query) row per iteration, `vec`-lane dot products;
            prefill (at least `rows` queries): tiles of `rows` queries x `keys` keys in registers.
  rowwise   rmsnorm, softmax, rope, embedding, fused/elementwise: the last axis in vectors of `vec` lanes.
  cuda      GPU schedules: threads per block for the default (dlight) rules and the fallback mapping.
"""
from __future__ import annotations

from typing import Any, Mapping

from lmforge.passes.base import Knob

PREFIX = "tvm"
PARALLEL = ("auto", "on", "off")  # parallel knobs: "auto" = on only when TVM's runtime has more than one thread


def _k(name: str, kind: str, default: Any, choices: tuple = (), doc: str = "", **kw) -> Knob:
    return Knob(f"{PREFIX}.{name}", kind, default, choices=choices, doc=doc, **kw)


KNOBS: tuple[Knob, ...] = (
    # linear rows at or below `linear.gemv_max_rows` take the GEMV schedule (one build per leading shape)
    _k("linear.gemv_max_rows", "int", 16, (0, 4, 8, 16, 32), "rows up to which linear/matmul use the GEMV schedule"),
    _k("gemv.vec", "int", 16, (4, 8, 16, 32), "K lanes per vector accumulator (rfactor width)"),
    _k("gemv.n_tile", "int", 1, (1, 2, 4, 8), "output columns computed together (reuse of each x vector)"),
    _k("gemv.k_unroll", "int", 1, (1, 2, 4), "unroll factor of the K-vector loop"),
    _k("gemv.parallel", "categorical", "auto", PARALLEL, "parallel loop over column tiles"),
    _k("gemm.mr", "int", 4, (1, 2, 4, 6, 8, 12), "rows of the register tile"),
    _k("gemm.nr", "int", 64, (16, 32, 48, 64), "columns of the register tile (multiple of the vector width)"),
    _k("gemm.pack", "bool", True, (True, False), "matmul: copy the right operand into [N/nr, K, nr] panels"),
    _k("gemm.order", "categorical", "nm", ("nm", "mn"), "outer loop order: column panels outside (nm) or rows"),
    _k("gemm.unroll_k", "int", 4, (1, 2, 4), "unroll factor of the K loop"),
    _k("gemm.parallel", "categorical", "auto", PARALLEL, "parallel outer loop"),
    _k("attention.vec", "int", 4, (4, 8, 16, 32), "lanes of the partial sums of each q.k dot product"),
    _k("attention.parallel", "categorical", "auto", PARALLEL, "parallel loop over (batch, head, query) rows"),
    _k("attention.rows", "int", 16, (1, 4, 8, 16, 32),
       "query rows per tile when there are at least that many (prefill); 1: one row at a time"),
    _k("attention.keys", "int", 4, (2, 4, 8), "keys per register tile of the tiled schedule's scores"),
    _k("rowwise.vec", "int", 16, (4, 8, 16, 32, 64), "lanes along the last axis of norms/rope/elementwise"),
    _k("rowwise.parallel", "categorical", "auto", PARALLEL, "parallel loop over rows"),
    _k("cuda.threads", "int", 256, (64, 128, 256, 512, 1024), "threads per block of GPU kernels"),
    _k("cuda.rules", "categorical", "dlight", ("dlight", "fallback"),
       "GPU schedule: TVM's dlight rules (matmul/GEMV/reduction) or the plain thread mapping"),
)

FAMILY_PREFIXES: dict[str, tuple[str, ...]] = {
    "gemv": ("gemv.", "linear."),
    "gemm": ("gemm.", "linear."),
    "attention": ("attention.",),
    "rowwise": ("rowwise.",),
    "cuda": ("cuda.",),
}


def knob_defaults() -> dict[str, Any]:
    return {k.name: k.default for k in KNOBS}


def resolve(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """Knob values: the defaults overridden by `config` (keys with the "tvm." prefix; others ignored)."""
    values = knob_defaults()
    for key, value in (config or {}).items():
        if key in values:
            values[key] = value
    return values


def knobs_for(family: str) -> list[Knob]:
    """The knobs that change kernels of one family (what `tune_op` searches by default)."""
    prefixes = tuple(f"{PREFIX}.{p}" for p in FAMILY_PREFIXES[family])
    return [k for k in KNOBS if k.name.startswith(prefixes)]


def family_values(values: Mapping[str, Any], family: str) -> tuple:
    """The knob values one family depends on, as a hashable key (part of a build's cache key)."""
    prefixes = tuple(f"{PREFIX}.{p}" for p in FAMILY_PREFIXES[family])
    return tuple(sorted((k, v) for k, v in values.items() if k.startswith(prefixes)))


def parallel_on(value: str) -> bool:
    """Whether a parallel knob's value turns the parallel loop on. A parallel loop costs a thread-pool launch
    (about 10 us here) even on one thread, so "auto" enables it only when TVM runs several threads
    (TVM_NUM_THREADS)."""
    if value == "auto":
        import tvm_ffi

        return int(tvm_ffi.get_global_func("runtime.NumThreads")()) > 1
    return value in ("on", True)


def largest_divisor(n: int, limit: int) -> int:
    """The largest divisor of n that is <= limit (tile sizes must divide static extents: no tail predicates)."""
    for d in range(max(1, min(n, limit)), 0, -1):
        if n % d == 0:
            return d
    return 1
