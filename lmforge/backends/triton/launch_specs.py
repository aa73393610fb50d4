"""What an IR node launches when it runs from an artifact's cubins: the kernel variants to build, and per call
the launches (variant, runtime argument values, grid), in order, with any torch steps between them.

The Triton backend's JIT launchers (norms.rmsnorm, quant_matmul.linear_weight_only, attention_glue's
choices, ...) decide grids and arguments from the tensors at hand and let Triton specialise the kernel per
call. An ahead-of-time kernel is specialised once, at export, from the graph's static types; this module
states that specialisation for each op the artifact path serves, mirroring the JIT launchers
(tests/export/test_triton_kernels.py checks kernels, grids, constexprs and arguments, launch by launch,
against the JIT launcher for the same inputs):

    op                        variants (key)                                  launches per call, grid rule
    rmsnorm                   one (row kernel, BLOCK_D from row_plan)         (cdiv(n_rows, BLOCK_R),)
    layernorm                 one                                             (cdiv(n_rows, BLOCK_R),)
    softmax                   one                                             (cdiv(n_rows, BLOCK_R),)
    fused                     swiglu: one (gate and up of one shape, dtype)   (cdiv(numel, BLOCK),)
                              elementwise: one (the generated kernel over     (cdiv(numel, BLOCK),)
                              the static plan's collapsed axes)
    linear_wo                 GEMV for M = 1..4 rows (BLOCK_M = M),           (cdiv(N, BLOCK_N), SPLIT_K)
                              GEMM for M > 4                                  (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),)
    attention                 one query row (attention_glue's decode rule):   split (B*Hkv, splits, cdiv(ROWS, BLOCK_M))
                              decode.split + merge                            merge (B*Hq*Sq,)
                              otherwise: prefill (dense / causal / window     prefill (cdiv(Sq, BLOCK_M), B*Hq)
                              + sinks, q_offset); a symbolic Sq builds both
    block_topk_attention      topk.score, topk.split (sparse), merge          score (B*Hkv, cdiv(nblocks, BLOCK_NB)),
                                                                              torch top-k, split, merge
    shared_prefix_attention   prefix.split, suffix.split (causal), merge      prefix split (Hkv, ...), suffix split
                                                                              (B*Hkv, ...), merge
    block_sparse_attention    sparse (flash prefill, SPARSE mode, tiles       torch: the mask's block lists, then
                              clamped to the block size)                      sparse (cdiv(Sq, BLOCK_M), B*Hq)

The attention specs live in attention_specs.py (loaded by `spec_for` on first use). A split variant whose
query-row count is only known at run time (the shared prefix's B x group x Sq rows) has one variant per
BLOCK_M the launcher can pick (`<key>.m16`, `.m32`, ...); the number of splits is a
run-time integer (plan_splits: the device's SM count at load time). Workspaces (partial outputs and
log-sum-exps, block scores, kept-block indices) are allocated by the spec's `call` before any step runs.

Specialisation follows the JIT (see `Hint`): an integer argument statically known to be 1 becomes a
constexpr, one known to be a multiple of 16 gets the divisibility hint, and every pointer is assumed
16-byte aligned. Values only known at run time (batch, sequence, splits) stay plain i32 arguments. Each
variant lists these assumptions, and `check_values` verifies them for every launch of a call before the
first one runs: a call that breaks one (an unaligned view, a stride that is not a multiple of 16) runs the
torch reference, as a whole, instead of kernels built for other values.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import triton

from lmforge.backends.triton.config import KernelConfig
from lmforge.ir.graph import Node

TRITON_TYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "uint8": "u8", "int8": "i8",
                "int32": "i32", "int64": "i64"}
I32_MAX = 2 ** 31 - 1


@dataclass(frozen=True)
class Hint:
    """What is known at export about an integer argument: its exact value, or a number it is a multiple of."""

    exact: int | None = None
    multiple: int = 1

    @staticmethod
    def of(dims) -> "Hint":
        """The product of `dims` (ints and symbolic names): exact when all are ints, else its static factor."""
        static = [d for d in dims if isinstance(d, int)]
        product = math.prod(static)
        return Hint(product) if len(static) == len(dims) else Hint(None, max(product, 1))

    @property
    def divisible_by_16(self) -> bool:
        return (self.exact is not None and self.exact % 16 == 0) or self.multiple % 16 == 0


@dataclass(frozen=True)
class Variant:
    """One ahead-of-time kernel a node may launch: a @triton.jit function fully specialised.

    signature: runtime arguments -> Triton type; constexprs: the non-knob constexprs (plus integer
    arguments fixed to 1); config: the plan the launcher would run (knobs, warps, stages); grid: the grid
    rule, terms of int | argument or constexpr name | ["cdiv", a, b] | ["mul", a, b].
    """

    key: str
    kernel: str
    fn: Any
    signature: Mapping[str, str]
    constexprs: Mapping[str, Any]
    config: KernelConfig
    divisible_by_16: tuple[str, ...]
    grid: tuple
    static: Mapping[str, int] = field(default_factory=dict)

    def check(self, values: Mapping[str, Any]) -> str | None:
        return check_values(self.signature, self.divisible_by_16, self.constexprs, values)


def check_values(signature: Mapping[str, str], divisible_by_16, constexprs: Mapping[str, Any],
                 values: Mapping[str, Any]) -> str | None:
    """None when `values` satisfy a kernel's specialisation, else the first reason they do not: tensors of the
    built dtype and 16-byte aligned, i32 arguments in range, the divisible ones multiples of 16, integers fixed as
    constexprs equal to their value."""
    for name, kind in signature.items():
        value = values[name]
        if kind.startswith("*"):
            if TRITON_TYPES.get(str(value.dtype).removeprefix("torch.")) != kind[1:]:
                return f"{name} is {value.dtype}, the kernel was built for {kind[1:]}"
            if value.data_ptr() % 16:
                return f"{name} is not 16-byte aligned"
        elif kind == "i32" and not -I32_MAX - 1 <= value <= I32_MAX:
            return f"{name}={value} does not fit in i32"
    for name in divisible_by_16:
        if values[name] % 16:
            return f"{name}={values[name]} is not a multiple of 16"
    for name, value in constexprs.items():
        if name in values and values[name] != value:
            return f"{name}={values[name]} but the kernel was built for {value}"
    return None


@dataclass(frozen=True)
class Built:
    """What the artifact holds for one variant of a node: the config it was built with (after any fallback to
    the default) and the integer values fixed at export that the call needs (e.g. groups_per_split)."""

    config: KernelConfig
    static: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Launch:
    """One kernel launch: the variant and its argument values by name. `values` may also hold integers that
    only the variant's grid rule reads (e.g. "grid_bh"); the launcher passes the kernel's arguments only."""

    variant: str
    values: Mapping[str, Any]


@dataclass
class Call:
    """One call of a node: the steps to run in order, and how to get the node's result once they ran.

    A step is a `Launch` or a zero-argument torch callable run between launches (e.g. the top-k selection that
    block top-k reads). The spec's `call` allocates every workspace and fixes every launch's values before
    the first step runs, so the backend checks all launches first and, if any breaks its kernel's
    specialisation, runs the torch reference for the whole call without having launched anything.
    """

    steps: list
    result: Callable[[], Any]

    @classmethod
    def single(cls, variant: str, values: dict[str, Any], result: Callable[[], Any]) -> "Call":
        return cls([Launch(variant, values)], result)

    @property
    def launches(self) -> list[Launch]:
        return [s for s in self.steps if isinstance(s, Launch)]


class Unservable(Exception):
    """A node the artifact path cannot serve (the message says why); it runs with the torch reference."""


def _ints(hints: Mapping[str, Hint]) -> tuple[dict[str, str], dict[str, int], tuple[str, ...]]:
    """(signature, constexprs, divisible) for integer arguments, specialised as the JIT would."""
    signature, constexprs, divisible = {}, {}, []
    for name, hint in hints.items():
        if hint.exact == 1:
            constexprs[name] = 1
        else:
            signature[name] = "i32"
            if hint.divisible_by_16:
                divisible.append(name)
    return signature, constexprs, tuple(divisible)


def _ttype(value) -> str:
    dtype = value.type.dtype
    if dtype not in TRITON_TYPES:
        raise Unservable(f"dtype {dtype} has no Triton kernel here")
    return TRITON_TYPES[dtype]


def _static_last_dim(node: Node) -> int:
    d = node.inputs[0].type.shape[-1]
    if not isinstance(d, int):
        raise Unservable(f"last dimension {d!r} is symbolic (the row kernels are built for a fixed row length)")
    return d


# ---- row kernels (rmsnorm, layernorm, softmax) --------------------------------------------------------------

def _row_variant(node: Node, kernel: str, config: KernelConfig | None, pointers: dict[str, str],
                 fixed: dict[str, Any]) -> Variant:
    from lmforge.backends.triton import norms

    d = _static_last_dim(node)
    plan = norms.row_plan(config, d, kernel)
    rows = Hint.of(node.inputs[0].type.shape[:-1])
    ints, ones, divisible = _ints({"n_rows": rows, "D": Hint(d), "stride_x": Hint(d), "stride_o": Hint(d)})
    fn = {"rmsnorm": norms._rmsnorm_kernel, "layernorm": norms._layernorm_kernel,
          "softmax": norms._softmax_kernel}[kernel]
    signature = {**pointers, **ints, **({"eps": "fp32"} if kernel != "softmax" else {})}
    constexprs = {**fixed, **ones, "ONE_PASS": plan.get("BLOCK_D") >= d}
    return Variant(kernel, kernel, fn, signature, constexprs, plan, divisible, (["cdiv", "n_rows", "BLOCK_R"],))


def _row_values(x, out, extra: dict) -> dict[str, Any]:
    return {"n_rows": x.shape[0], "D": x.shape[1], "stride_x": x.stride(0), "stride_o": out.stride(0), **extra}


def _rows(x):
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _eps(x, eps):
    """rmsnorm's eps: None means torch's default, the fp32 epsilon whatever x's dtype (F.rms_norm computes in fp32)."""
    import torch

    return float(torch.finfo(torch.float32).eps if eps is None else eps)


class RMSNormSpec:
    def variants(self, node: Node, configs: Mapping[str, Any]) -> list[Variant]:
        t = _ttype(node.inputs[0])
        has_weight = len(node.inputs) > 1 and node.inputs[1] is not None
        return [_row_variant(node, "rmsnorm", configs.get("rmsnorm"),
                             {"x_ptr": f"*{t}", "w_ptr": f"*{t}", "out_ptr": f"*{t}"}, {"HAS_WEIGHT": has_weight})]

    def call(self, node: Node, built: Mapping[str, "Built"], x, w=None, *, eps=None, **_) -> Call | None:
        import torch

        x2 = _rows(x)
        if x2.numel() == 0:
            return None
        out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
        values = _row_values(x2, out, {"x_ptr": x2, "w_ptr": w if w is not None else x2, "out_ptr": out,
                                       "eps": _eps(x, eps)})
        return Call.single("rmsnorm", values, lambda: out.reshape(x.shape))


class LayerNormSpec:
    def variants(self, node: Node, configs: Mapping[str, Any]) -> list[Variant]:
        t = _ttype(node.inputs[0])
        present = [len(node.inputs) > i and node.inputs[i] is not None for i in (1, 2)]
        return [_row_variant(node, "layernorm", configs.get("layernorm"),
                             {"x_ptr": f"*{t}", "w_ptr": f"*{t}", "b_ptr": f"*{t}", "out_ptr": f"*{t}"},
                             {"HAS_WEIGHT": present[0], "HAS_BIAS": present[1]})]

    def call(self, node: Node, built: Mapping[str, "Built"], x, w=None, b=None, *, eps=1e-5, **_) -> Call | None:
        import torch

        x2 = _rows(x)
        if x2.numel() == 0:
            return None
        out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
        values = _row_values(x2, out, {"x_ptr": x2, "w_ptr": w if w is not None else x2,
                                       "b_ptr": b if b is not None else x2, "out_ptr": out, "eps": float(eps)})
        return Call.single("layernorm", values, lambda: out.reshape(x.shape))


class SoftmaxSpec:
    def variants(self, node: Node, configs: Mapping[str, Any]) -> list[Variant]:
        t = _ttype(node.inputs[0])
        return [_row_variant(node, "softmax", configs.get("softmax"), {"x_ptr": f"*{t}", "out_ptr": f"*{t}"}, {})]

    def call(self, node: Node, built: Mapping[str, "Built"], x, **_) -> Call | None:
        import torch

        x2 = _rows(x)
        if x2.numel() == 0:
            return None
        out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
        values = _row_values(x2, out, {"x_ptr": x2, "out_ptr": out})
        return Call.single("softmax", values, lambda: out.reshape(x.shape))


class SwiGLUSpec:
    def variants(self, node: Node, configs: Mapping[str, Any]) -> list[Variant]:
        from lmforge.backends.triton import norms

        gate, up = node.inputs[:2]
        if gate.type.shape != up.type.shape or gate.type.dtype != up.type.dtype:
            raise Unservable(f"gate {gate.type} and up {up.type} differ (the kernel reads them element by element)")
        t = _ttype(gate)
        ints, ones, divisible = _ints({"numel": Hint.of(gate.type.shape)})
        config = configs.get("swiglu") or norms.DEFAULT_CONFIGS["swiglu"]
        return [Variant("swiglu", "swiglu", norms._swiglu_kernel,
                        {"gate_ptr": f"*{t}", "up_ptr": f"*{t}", "out_ptr": f"*{t}", **ints}, ones, config,
                        divisible, (["cdiv", "numel", "BLOCK"],))]

    def call(self, node: Node, built: Mapping[str, "Built"], gate, up, **_) -> Call | None:
        import torch

        if gate.shape != up.shape or gate.dtype != up.dtype or gate.device != up.device:
            return None                       # the reference broadcasts; the kernel would read past `up`
        g, u = gate.contiguous(), up.contiguous()
        if g.numel() == 0:
            return None
        out = torch.empty_like(g)
        return Call.single("swiglu", {"gate_ptr": g, "up_ptr": u, "out_ptr": out, "numel": g.numel()}, lambda: out)


class ElementwiseSpec:
    """A fused elementwise region run by the kernel generated from it (elementwise.py): one variant, over the
    node's static plan (the axes its IR shapes let collapse, inputs contiguous); a numel, size or stride with a
    symbolic factor stays an i32 argument, one statically 1 becomes a constexpr (the contiguous common case:
    rank 1, unit strides). A call whose tensors do not fit that plan (a transposed view) runs the reference."""

    def variants(self, node: Node, configs: Mapping[str, Any]) -> list[Variant]:
        from lmforge.backends.triton import elementwise as ew

        reason = ew.unsupported(node)
        if reason is not None:
            raise Unservable(reason)
        groups, strides = ew.static_layout(node)
        shape = node.output.type.shape
        sizes = [ew.Size.of([d]) for d in shape]
        hints = {"numel": Hint.of(shape), **{f"size{d}": Hint.of([shape[a] for a in g])
                                             for d, g in enumerate(groups) if d}}
        for i, per_axis in enumerate(strides):
            for d, g in enumerate(groups):
                stride = ew._group_stride(sizes, per_axis, g)
                hints[f"stride{i}_{d}"] = Hint(stride.factor) if not stride.symbols else Hint(None, stride.factor)
        ints, ones, divisible = _ints(hints)
        pointers = {"out_ptr": f"*{_ttype(node.output)}",
                    **{f"in{i}_ptr": f"*{_ttype(v)}" for i, v in enumerate(node.inputs)}}
        config = configs.get("elementwise") or ew.DEFAULT_CONFIG
        return [Variant("elementwise", "elementwise", ew.kernel_for(node.regions[0], len(groups)),
                        {**pointers, **ints}, ones, config, divisible, (["cdiv", "numel", "BLOCK"],))]

    def call(self, node: Node, built: Mapping[str, "Built"], *inputs, **_) -> Call | None:
        import torch

        from lmforge.backends.triton import elementwise as ew

        tensors = list(inputs[:len(node.inputs)])
        shape = torch.broadcast_shapes(*(t.shape for t in tensors))
        if len(shape) != node.output.type.rank:
            return None
        plan = ew.runtime_plan(ew.static_layout(node)[0], shape, tensors)
        if plan is None or plan.numel == 0:
            return None                       # a layout the built kernel does not read (the JIT plans anew)
        out = torch.empty(shape, dtype=getattr(torch, node.output.type.dtype), device=tensors[0].device)
        values = {"out_ptr": out, **{f"in{i}_ptr": t for i, t in enumerate(tensors)}, **plan.values()}
        return Call.single("elementwise", values, lambda: out)


class FusedSpec:
    """A fused node: exact SwiGLU runs its own kernel, any other claimed region its generated one (as the
    Triton backend's `_claim_fused` decides)."""

    def _spec(self, node: Node):
        from lmforge.backends.triton.backend import kernel_name

        return SWIGLU if kernel_name(node) == "swiglu" else ELEMENTWISE

    def variants(self, node: Node, configs: Mapping[str, Any]) -> list[Variant]:
        return self._spec(node).variants(node, configs)

    def call(self, node: Node, built: Mapping[str, "Built"], *inputs, **attrs) -> Call | None:
        return self._spec(node).call(node, built, *inputs, **attrs)


SWIGLU, ELEMENTWISE = SwiGLUSpec(), ElementwiseSpec()


# ---- weight-only quantized linear --------------------------------------------------------------------------

class LinearWOSpec:
    """GEMV variants for 1..4 rows (BLOCK_M is the row count, a constexpr) and one GEMM for more rows (the
    tiled kernel, or quant_gemm's swapped one for a config with SWAP_AB=1)."""

    def _shapes(self, node: Node):
        x, qweight, scales, zeros = node.inputs[:4]
        bits, group_size = node.attr["bits"], node.attr["group_size"]
        n, k = qweight.type.shape[0], x.type.shape[-1]
        if not isinstance(n, int) or not isinstance(k, int):
            raise Unservable("weight shape is symbolic")
        if group_size < 16 or group_size & (group_size - 1):
            raise Unservable(f"group_size {group_size} is not a power of two >= 16")
        return x, qweight, scales, zeros, bits, group_size, n, k

    def variants(self, node: Node, configs: Mapping[str, Any]) -> list[Variant]:
        from lmforge.backends.triton import quant_matmul as qm

        x, qweight, scales, zeros, bits, group_size, n, k = self._shapes(node)
        if zeros is None:
            raise Unservable("no zero points (the kernels read them)")
        has_bias = len(node.inputs) > 4 and node.inputs[4] is not None
        act = _ttype(x)
        pointers = {"x_ptr": f"*{act}", "qw_ptr": f"*{_ttype(qweight)}", "scales_ptr": f"*{_ttype(scales)}",
                    "zeros_ptr": f"*{_ttype(zeros)}",
                    "bias_ptr": f"*{_ttype(node.inputs[4]) if has_bias else act}", "out_ptr": f"*{act}"}
        fixed = {"BITS": bits, "GROUP_SIZE": group_size, "HAS_BIAS": has_bias}
        n_groups = k // group_size
        strides = {"N": Hint(n), "K": Hint(k), "stride_xm": Hint(k), "stride_qn": Hint(k * bits // 8),
                   "stride_sn": Hint(n_groups), "stride_om": Hint(n)}
        rows = Hint.of(x.type.shape[:-1])
        out = []
        gemv_rows = [rows.exact] if rows.exact is not None else list(range(1, qm.GEMV_MAX_ROWS + 1))
        gemv_config = configs.get("wo_gemv")
        for m in [r for r in gemv_rows if 1 <= r <= qm.GEMV_MAX_ROWS]:
            plan, groups_per_split = qm.gemv_plan(gemv_config, n_groups, group_size * bits // 32, x.type.dtype)
            ints, ones, divisible = _ints({**strides, "groups_per_split": Hint(groups_per_split)})
            split = plan.get("SPLIT_K") > 1
            sig = {**pointers, **({"out_ptr": "*fp32", "bias_ptr": pointers["bias_ptr"] if has_bias else "*fp32"}
                                  if split else {}), **ints}
            out.append(Variant(f"wo_gemv.m{m}", "wo_gemv", qm._wo_gemv_kernel, sig, {**fixed, **ones, "BLOCK_M": m},
                               plan, divisible, (["cdiv", "N", "BLOCK_N"], "SPLIT_K"),
                               {"groups_per_split": groups_per_split}))
        if rows.exact is None or rows.exact > qm.GEMV_MAX_ROWS:
            plan = qm.gemm_plan(configs.get("wo_gemm"), group_size)
            tiles = ["mul", ["cdiv", "M", "BLOCK_M"], ["cdiv", "N", "BLOCK_N"]]
            if plan.get("SWAP_AB", 0):  # quant_gemm's kernel: K split into k_per_split columns per program
                from lmforge.backends.triton import quant_gemm

                k_per_split, split_k = quant_gemm._k_per_split(k, plan.get("BLOCK_K"), plan.get("SPLIT_K"))
                plan = plan.with_(SPLIT_K=split_k)
                ints, ones, divisible = _ints({**strides, "M": rows, "k_per_split": Hint(k_per_split)})
                sig = {**pointers, **({"out_ptr": "*fp32", "bias_ptr": pointers["bias_ptr"] if has_bias else "*fp32"}
                                      if split_k > 1 else {}), **ints}
                out.append(Variant("wo_gemm", "wo_gemm_swapped", quant_gemm._wo_gemm_swapped_kernel, sig,
                                   {**fixed, **ones}, plan, divisible, (tiles, "SPLIT_K"),
                                   {"k_per_split": k_per_split}))
            else:
                ints, ones, divisible = _ints({**strides, "M": rows})
                out.append(Variant("wo_gemm", "wo_gemm", qm._wo_gemm_kernel, {**pointers, **ints}, {**fixed, **ones},
                                   plan, divisible, (tiles,)))
        return out

    def call(self, node: Node, built: Mapping[str, Built], x, qweight, scales, zeros, bias=None, **_) -> Call | None:
        import torch

        from lmforge.backends.triton import quant_matmul as qm

        n, k = qweight.shape[0], x.shape[-1]
        lead = x.shape[:-1]
        x2 = x.reshape(-1, k)
        m = x2.shape[0]
        key = f"wo_gemv.m{m}" if m <= qm.GEMV_MAX_ROWS else "wo_gemm"
        if m == 0 or key not in built:
            return None
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        qweight, scales, zeros = (t if t.is_contiguous() else t.contiguous() for t in (qweight, scales, zeros))
        values = {"x_ptr": x2, "qw_ptr": qweight, "scales_ptr": scales, "zeros_ptr": zeros, "N": n, "K": k,
                  "stride_xm": x2.stride(0), "stride_qn": qweight.stride(0), "stride_sn": scales.stride(0)}
        if key == "wo_gemm":
            values["M"] = m
            split = built[key].config.get("SPLIT_K", 1) > 1   # only the swapped kernel splits K
            if "k_per_split" in built[key].static:
                values["k_per_split"] = built[key].static["k_per_split"]
        else:  # the built plan decides the split-K workspace (fp32, zeroed) and the groups per split
            split = built[key].config.get("SPLIT_K") > 1
            values["groups_per_split"] = built[key].static["groups_per_split"]
        out = torch.zeros((m, n), device=x.device, dtype=torch.float32) if split else \
            torch.empty((m, n), device=x.device, dtype=x.dtype)
        values.update(bias_ptr=bias if bias is not None else out, out_ptr=out, stride_om=out.stride(0))
        return Call.single(key, values, lambda: (out.to(x.dtype) if split else out).reshape(*lead, n))


ATTENTION_OPS = ("attention", "block_topk_attention", "shared_prefix_attention",  # in attention_specs.py
                 "block_sparse_attention")
SPECS: dict[str, Any] = {"rmsnorm": RMSNormSpec(), "layernorm": LayerNormSpec(), "softmax": SoftmaxSpec(),
                         "fused": FusedSpec(), "linear_wo": LinearWOSpec()}


def spec_for(node: Node):
    """The launch spec of a node's op, or Unservable saying why the artifact path has none."""
    if node.op in ATTENTION_OPS:
        from lmforge.backends.triton import attention_specs   # imports this module: loaded on first use

        return attention_specs.SPECS[node.op]
    if node.op not in SPECS:
        raise Unservable(f"no ahead-of-time launch spec for {node.op!r} yet (its launcher runs several kernels "
                         "or workspaces); the torch reference runs it from an artifact")
    return SPECS[node.op]


def grid_of(rule, values: Mapping[str, Any], constexprs: Mapping[str, Any]) -> tuple[int, int, int]:
    """Evaluate a grid rule (see Variant) to a 3-d grid."""
    def term(t):
        if isinstance(t, bool):
            raise ValueError(f"bad grid term {t!r}")
        if isinstance(t, int):
            return t
        if isinstance(t, str):
            return int(values[t] if t in values else constexprs[t])
        op, a, b = t
        if op == "cdiv":
            return triton.cdiv(term(a), term(b))
        if op == "mul":
            return term(a) * term(b)
        raise ValueError(f"unknown grid operation {op!r}")

    dims = [term(t) for t in rule]
    return tuple(dims + [1] * (3 - len(dims)))[:3]
