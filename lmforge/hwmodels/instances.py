"""Op instances that calibration and the accuracy benchmark time: one op of the registry at fixed shapes.

An `OpInstance` knows its `Cost` (from the op registry, the same numbers the cost model uses for graph
nodes) and can build a `Runnable` on a device: a zero-argument callable that runs the op's torch reference
on random inputs made on first call, so that a fake `measure` (tests) never allocates anything.

`op_instances(kind, "fit")` is a fixed table per device kind (GPU shapes are LLM-sized, CPU shapes small
enough to time in milliseconds); `op_instances(kind, "eval", n, seed)` draws shapes at random from the
same families (linear incl. GEMV-like, batched matmul, attention prefill/decode with GQA, rmsnorm, softmax,
add/mul/silu), never equal to a fit instance, for held-out accuracy.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from lmforge.ir.cost import Cost
from lmforge.ir.types import TensorType, torch_dtype


@dataclass(frozen=True)
class OpInstance:
    """One registry op at concrete input types and attributes."""

    name: str
    op: str
    in_types: tuple[TensorType, ...]
    attrs: tuple[tuple[str, Any], ...] = ()

    def cost(self) -> Cost:
        from lmforge.ir.ops import get_op

        return get_op(self.op).cost(list(self.in_types), dict(self.attrs))

    def runner(self, device: str = "cpu", rotate_bytes: int = 0) -> "Runnable":
        return Runnable(self, device, rotate_bytes)


@dataclass
class Runnable:
    """Runs `instance`'s torch reference on `device`; inputs are made (seeded) on the first call.

    With `rotate_bytes` > 0 the runnable keeps enough copies of its inputs to fill that many bytes and
    each call reads the next copy, so that (with rotate_bytes above the last-level cache) every call reads
    its inputs from DRAM, as an op reading weights in a real model does, while the code stays warm.
    """

    instance: OpInstance
    device: str = "cpu"
    rotate_bytes: int = 0
    _call: Callable[[], Any] | None = field(default=None, repr=False)

    @property
    def cost(self) -> Cost:
        return self.instance.cost()

    def __call__(self):
        if self._call is None:
            self._call = self._build()
        return self._call()

    def _build(self) -> Callable[[], Any]:
        from lmforge.ir.ops import get_op

        opdef = get_op(self.instance.op)
        attrs = opdef.normalize_attrs(dict(self.instance.attrs))
        gen = torch.Generator(device=self.device).manual_seed(0)  # made on the device: GPU shapes are large
        tensors = [_random(t, gen) for t in self.instance.in_types]
        ref = opdef.reference
        input_bytes = sum(t.numel() * t.element_size() for t in tensors)
        copies = min(_MAX_COPIES, -(-self.rotate_bytes // max(input_bytes, 1)))
        if copies <= 1:
            return lambda: ref(*tensors, **attrs)
        sets = [tensors] + [[t.clone() for t in tensors] for _ in range(copies - 1)]
        state = {"i": 0}

        def call():
            state["i"] = (state["i"] + 1) % copies
            return ref(*sets[state["i"]], **attrs)

        return call


_MAX_COPIES = 4096


def _random(t: TensorType, gen: torch.Generator) -> torch.Tensor:
    shape, dtype, device = tuple(int(d) for d in t.shape), torch_dtype(t.dtype), gen.device
    if t.dtype.startswith(("float", "bfloat")):
        return torch.randn(shape, generator=gen, device=device, dtype=dtype)
    return torch.randint(0, 8, shape, generator=gen, device=device, dtype=dtype)


# ---- families: shape tuple -> OpInstance ---------------------------------------------------------------

def linear(m, n, k, dt):
    return OpInstance(f"linear m{m} n{n} k{k}", "linear", (TensorType((m, k), dt), TensorType((n, k), dt)))


def bmm(b, m, n, k, dt):
    return OpInstance(f"matmul b{b} m{m} n{n} k{k}", "matmul", (TensorType((b, m, k), dt), TensorType((b, k, n), dt)))


def attention(b, hq, hkv, sq, skv, d, dt):
    causal = sq > 1
    name = f"attention b{b} h{hq}/{hkv} q{sq} kv{skv} d{d}{' causal' if causal else ''}"
    types = (TensorType((b, hq, sq, d), dt), TensorType((b, hkv, skv, d), dt), TensorType((b, hkv, skv, d), dt))
    return OpInstance(name, "attention", types, (("causal", causal),))


def rmsnorm(rows, hidden, dt):
    types = (TensorType((rows, hidden), dt), TensorType((hidden,), dt))
    return OpInstance(f"rmsnorm {rows}x{hidden}", "rmsnorm", types, (("eps", 1e-6),))


def softmax(rows, cols, dt):
    return OpInstance(f"softmax {rows}x{cols}", "softmax", (TensorType((rows, cols), dt),))


def elementwise(op, numel, dt):
    arity = 1 if op == "silu" else 2
    return OpInstance(f"{op} {numel}", op, tuple(TensorType((numel,), dt) for _ in range(arity)))


# Fit tables: (family, args without dtype). Each class has both memory- and compute-heavy members where
# the device allows, so both efficiency factors are identifiable.
_FIT = {
    "gpu": [
        (linear, (1, 4096, 4096)), (linear, (8, 4096, 11008)), (linear, (64, 4096, 4096)),
        (linear, (512, 4096, 4096)), (linear, (2048, 8192, 8192)), (linear, (4096, 4096, 14336)),
        (bmm, (32, 512, 512, 128)), (bmm, (64, 128, 2048, 128)),
        (attention, (1, 32, 32, 2048, 2048, 128)), (attention, (8, 32, 8, 512, 512, 128)),
        (attention, (16, 32, 8, 1, 4096, 128)), (attention, (64, 32, 32, 1, 1024, 128)),
        (rmsnorm, (1, 4096)), (rmsnorm, (2048, 4096)), (rmsnorm, (16384, 8192)),
        (softmax, (64, 4096)), (softmax, (32 * 1024, 1024)), (softmax, (16384, 32000)),
        (elementwise, ("add", 4096)), (elementwise, ("add", 1 << 22)), (elementwise, ("mul", 1 << 26)),
        (elementwise, ("silu", 1 << 16)), (elementwise, ("silu", 1 << 24)),
        (linear, (4, 8192, 8192)), (linear, (256, 14336, 4096)), (bmm, (8, 1024, 1024, 64)),
        (attention, (4, 32, 8, 1, 16384, 128)), (attention, (2, 16, 16, 4096, 4096, 64)),
        (rmsnorm, (256, 8192)), (rmsnorm, (4096, 2048)), (softmax, (4096, 4096)), (softmax, (512, 128)),
        (elementwise, ("mul", 1 << 20)), (elementwise, ("add", 1 << 25)),
    ],
    "cpu": [
        (linear, (1, 1024, 1024)), (linear, (4, 2048, 1024)), (linear, (32, 1024, 1024)),
        (linear, (128, 512, 512)), (linear, (384, 1024, 1024)), (linear, (256, 256, 2048)),
        (bmm, (8, 128, 128, 64)), (bmm, (16, 256, 64, 256)),
        (attention, (1, 8, 8, 256, 256, 64)), (attention, (2, 8, 2, 128, 128, 64)),
        (attention, (4, 8, 2, 1, 1024, 64)), (attention, (1, 16, 16, 1, 512, 64)),
        (rmsnorm, (1, 1024)), (rmsnorm, (256, 1024)), (rmsnorm, (2048, 2048)),
        (softmax, (64, 256)), (softmax, (512, 1024)), (softmax, (256, 8192)),
        (elementwise, ("add", 1024)), (elementwise, ("add", 1 << 20)), (elementwise, ("mul", 1 << 22)),
        (elementwise, ("silu", 1 << 12)), (elementwise, ("silu", 1 << 21)),
        (linear, (2, 1536, 768)), (linear, (16, 768, 768)), (bmm, (4, 64, 256, 128)),
        (attention, (2, 8, 2, 1, 512, 128)), (attention, (1, 4, 4, 512, 512, 128)),
        (rmsnorm, (64, 512)), (rmsnorm, (512, 768)), (softmax, (128, 1024)), (softmax, (16, 4096)),
        (elementwise, ("mul", 1 << 16)), (elementwise, ("add", 1 << 18)),
    ],
}


def _pow2ish(rng, lo: int, hi: int, multiple: int = 1) -> int:
    """A log-uniform integer in [lo, hi], rounded to a multiple of `multiple` (kept >= lo)."""
    v = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    return max(lo, int(round(v / multiple)) * multiple)


# Ranges of the random held-out shapes per device kind: GPU shapes span the same times as the GPU fit table
# (microseconds to milliseconds), not just the launch-bound corner.
_EVAL_RANGES = {
    "gpu": {"gemv_m": (1, 16), "m": (32, 4096), "nk": (1024, 16384), "bmm_b": (4, 64), "bmm": (128, 2048),
            "attn_b": (1, 32), "kv": (256, 8192), "rows": (64, 32768), "hidden": (1024, 8192),
            "sm_rows": (64, 65536), "sm_cols": (512, 32768), "numel": (1 << 12, 1 << 27)},
    "cpu": {"gemv_m": (1, 8), "m": (16, 128), "nk": (256, 2048), "bmm_b": (2, 32), "bmm": (32, 128),
            "attn_b": (1, 4), "kv": (64, 1024), "rows": (1, 1024), "hidden": (256, 2048),
            "sm_rows": (8, 512), "sm_cols": (64, 4096), "numel": (256, 1 << 21)},
}


def _draw(rng, kind: str):
    """One random (family, args) for held-out evaluation, from the kind's `_EVAL_RANGES`."""
    r = _EVAL_RANGES[kind]
    family = rng.choice(["linear", "linear", "gemv", "bmm", "attention", "decode", "rmsnorm", "softmax", "ew"])
    if family in ("linear", "gemv"):
        m = _pow2ish(rng, *r["gemv_m"]) if family == "gemv" else _pow2ish(rng, *r["m"], 16)
        return linear, (m, _pow2ish(rng, *r["nk"], 64), _pow2ish(rng, *r["nk"], 64))
    if family == "bmm":
        return bmm, (_pow2ish(rng, *r["bmm_b"]), *(_pow2ish(rng, *r["bmm"], 16) for _ in range(3)))
    if family in ("attention", "decode"):
        hkv = int(rng.choice([2, 4, 8]))
        hq = hkv * int(rng.choice([1, 2, 4]))
        d = int(rng.choice([64, 128]))
        skv = _pow2ish(rng, *r["kv"], 64)
        sq = 1 if family == "decode" else skv
        return attention, (_pow2ish(rng, *r["attn_b"]), hq, hkv, sq, skv, d)
    if family == "rmsnorm":
        return rmsnorm, (_pow2ish(rng, *r["rows"]), _pow2ish(rng, *r["hidden"], 64))
    if family == "softmax":
        return softmax, (_pow2ish(rng, *r["sm_rows"]), _pow2ish(rng, *r["sm_cols"], 64))
    return elementwise, (str(rng.choice(["add", "mul", "silu"])), _pow2ish(rng, *r["numel"]))


def op_instances(kind: str, split: str = "fit", n: int = 36, seed: int = 0) -> list[OpInstance]:
    """The fit table (split="fit") or `n` seeded random held-out instances (split="eval") for a device kind
    ("gpu": float16, LLM-sized; "cpu": float32, small)."""
    if kind not in _FIT:
        raise ValueError(f"device kind must be 'gpu' or 'cpu', got {kind!r}")
    dt = "float16" if kind == "gpu" else "float32"
    fit = [family(*args, dt) for family, args in _FIT[kind]]
    if split == "fit":
        return fit
    if split != "eval":
        raise ValueError(f"split must be 'fit' or 'eval', got {split!r}")
    rng = np.random.default_rng(seed)
    seen = {i.name for i in fit}
    out: list[OpInstance] = []
    while len(out) < n:
        family, args = _draw(rng, kind)
        inst = family(*args, dt)
        if inst.name not in seen:
            seen.add(inst.name)
            out.append(inst)
    return out
