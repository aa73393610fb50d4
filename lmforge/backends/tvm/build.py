"""Build TVM kernels once, call them with torch tensors at little cost.

An `OpKernel` is what the TVM backend hands the generated code for one IR node. It is callable exactly like
the op's torch reference (`fn(*inputs, **attrs)`), and underneath:

    OpKernel.__call__(torch tensors)          per call: shape arithmetic, torch.empty for outputs, one packed call
      -> the variant for these shapes         0 for most ops; a linear's leading shape (few rows) or "gemm"
      -> self._fns[variant]                   the packed function, resolved once per variant
           -> BuildCache.get(key, ...)        shared across nodes and layers with the same computation
                -> lower(variant) -> Lowered  TE placeholders/compute with symbolic free dims (batch, seq, past)
                -> schedule_cpu / schedule_gpu  knob values -> TIR schedule
                -> tvm.compile(target)

Free dims (rows, batch, sequence, KV length) are symbolic in the TE, so one build serves every value; the
fixed dims (features, heads, head_dim) are constants so that tiles and vectors divide them. Tensors go to
TVM zero-copy through DLPack: a tensor that is not contiguous or not 64-byte aligned (TVM's kernels assume
both) is copied first (`ready`). A variant whose build fails falls back to the op's torch reference with a
warning, so a claimed node always runs.
"""
from __future__ import annotations

import threading

import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from lmforge.backends.tvm.knobs import family_values
from lmforge.backends.tvm.target import target_key
from lmforge.ir.graph import Node
from lmforge.ir.ops import get_op

ALIGN = 64
F32 = torch.float32


@dataclass
class Lowered:
    """A node lowered to TE: the PrimFunc's arguments in call order and what the schedule needs to know.

    kind: which schedule applies ("gemv", "gemm", "attention", "rowwise", "elementwise", "gather", ...).
    info: schedule hints: block names, static extents (e.g. {"k": 256, "n": 704}).
    """

    kind: str
    inputs: list
    outputs: list
    scalars: list = field(default_factory=list)
    info: dict = field(default_factory=dict)

    def prim_func(self):
        from tvm import te

        return te.create_prim_func([*self.inputs, *self.scalars, *self.outputs])


def ready(t: torch.Tensor) -> torch.Tensor:
    """`t` itself when TVM can read it in place (contiguous, 64-byte aligned), else an aligned copy."""
    if t.is_contiguous():
        return t if t.data_ptr() % ALIGN == 0 else t.clone()
    return t.contiguous()


@dataclass
class BuildStats:
    builds: int = 0
    seconds: float = 0.0
    hits: int = 0
    from_library: int = 0   # builds taken from an artifact's host library instead (see host_library)


def cache_key(key: tuple, knobs: Mapping[str, Any], target: dict, family: str) -> tuple:
    """The full key of one build: (computation and variant, the knob values its family reads, target)."""
    return key, family_values(knobs, family), target_key(target)


class BuildCache:
    """Compiled kernels keyed by (computation, variant, the knob values its schedule reads, target).

    Nodes with the same computation (every layer's q-projection, say) share one build. Owned by a backend
    (or shared between backends explicitly); nothing is cached on disk.
    """

    def __init__(self):
        self._built: dict[tuple, Any] = {}
        self.stats = BuildStats()

    def get(self, key: tuple, lower: Callable[[], Lowered], knobs: Mapping[str, Any], target: dict,
            family: str):
        full = cache_key(key, knobs, target, family)
        if full in self._built:
            self.stats.hits += 1
            return self._built[full]
        t0 = time.perf_counter()
        built = compile_lowered(lower(), knobs, target)
        self.stats.builds += 1
        self.stats.seconds += time.perf_counter() - t0
        self._built[full] = built
        return built

    def __len__(self) -> int:
        return len(self._built)

    def module(self, full: tuple):
        """The runtime module built under the full key `full` (see `cache_key`); KeyError if none was."""
        return self._built[full]


def compile_lowered(lowered: Lowered, knobs: Mapping[str, Any], target: dict, name: str = "main"):
    """Schedule and build one lowered computation. Returns the runtime module (call its function `name`;
    on CUDA the kernels are named `<name>_kernel`, `<name>_kernel_1`, ...)."""
    import tvm

    mod = tvm.IRModule({name: lowered.prim_func().with_attr("global_symbol", name)})
    if target["kind"] == "llvm":
        from lmforge.backends.tvm.schedule_cpu import schedule_cpu

        mod = schedule_cpu(mod, lowered, knobs)
    else:
        from lmforge.backends.tvm.schedule_gpu import schedule_gpu

        mod = schedule_gpu(mod, lowered, knobs, target)
    return tvm.compile(mod, target=tvm.target.Target(target))


class OpKernel:
    """The callable for one IR node (see the module docstring). Subclasses define `supports(node)` (a
    staticmethod), `family`, `key()`, `lower(variant)`, `describe()` and `__call__`.

    `self.fn(variant)` gives the packed function of a variant, building it on first use. Builds happen at
    the first call with those shapes, not at claim time, so region bodies and unused variants cost nothing.
    """

    family = "rowwise"
    main_variant: Any = 0   # the build most calls use (exported with the host library even if never called)

    def __init__(self, node: Node, knobs: Mapping[str, Any], cache: BuildCache, target: dict):
        self.node = node
        self.op = node.op
        self.attrs = node.attr
        self.knobs = knobs
        self.cache = cache
        self.target = target
        self.reference = get_op(node.op).reference
        self._fns: dict[Any, Any] = {}
        self._main = None  # the packed function of variant 0 once resolved (False: its build failed)
        self.failures: dict[Any, str] = {}
        self._reuse = False
        self._local = threading.local()   # .buffers: output slot -> this thread's last buffer (reuse on)

    # ---- to define in subclasses ------------------------------------------------------------------
    def key(self) -> tuple:
        raise NotImplementedError

    def lower(self, variant) -> Lowered:
        raise NotImplementedError

    def family_of(self, variant) -> str:
        return self.family

    def lower_gpu(self) -> Lowered:
        """The computation for GPU targets (symbolic in every free dim; the GPU schedule maps it to threads)."""
        return self.lower(0)

    def describe(self) -> str:
        """A short description of the schedule for `inspect()`."""
        return self.family

    # ---- shared machinery ----------------------------------------------------------------------------
    def fn(self, variant):
        """The packed function serving `variant` (None if its build failed: the caller uses the reference)."""
        try:
            return self._fns[variant]
        except KeyError:
            pass
        try:
            module = self.cache.get((self.key(), variant), lambda: self.lower(variant), self.knobs, self.target,
                                    self.family_of(variant))
            fn = module["main"]
        except Exception as e:  # a schedule/build failure must not stop the model: run the reference instead
            self.failures[variant] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            warnings.warn(f"TVM could not build {self.op} ({self.describe()}, variant {variant!r}): "
                          f"{self.failures[variant]}; this node runs the torch reference for these shapes")
            fn = None
        self._fns[variant] = fn
        return fn

    def main(self):
        """The packed function of variant 0 (kernels with a single build), or False if it failed to build."""
        fn = self._main
        if fn is None:
            fn = self._main = self.fn(0) or False
        return fn

    def enable_output_reuse(self) -> None:
        """Let every call write into the previous call's output buffer when the shape is the same.

        The generated code turns this on for nodes whose outputs do not leave the graph (nor alias a value
        that does), so the buffer is dead by the next call. It saves a `torch.empty` (~1 us) per kernel call,
        a tenth of the cost of a small decode-step kernel. One buffer per output, replaced when the shape
        changes, so memory stays bounded when the shapes vary (prefill lengths). The buffers are per thread:
        two threads calling one compiled model at once must not write into each other's intermediates.
        """
        self._reuse = True

    def empty(self, shape, slot: int = 0) -> torch.Tensor:
        """An fp32 output buffer of `shape`: fresh, or this thread's last call's when output reuse is on."""
        if self._reuse:
            buffers = getattr(self._local, "buffers", None)
            if buffers is None:
                buffers = self._local.buffers = {}
            buf = buffers.get(slot)
            if buf is not None and buf.shape == shape:
                return buf
            buf = buffers[slot] = torch.empty(shape, dtype=F32)
            return buf
        return torch.empty(shape, dtype=F32)

    def run_reference(self, *inputs, **attrs):
        """The op's torch reference on the same arguments (attrs the caller left out come from the node)."""
        merged = {**self.attrs, **attrs}
        return self.reference(*inputs, **merged)

    def build_now(self, variant) -> bool:
        """Build `variant` ahead of the first call (tuning, benchmarks); True if it built."""
        return self.fn(variant) is not None
