"""One generated Triton kernel per `fused` elementwise region: the region's ops become one expression per element.

    fused(%x, %g, %r) { %a = gelu(%x, approximate=tanh); %m = mul(%a, %g); %y = add(%m, %r) }
    ->  y[i] = round(round(gelu_tanh(x[i])) * g[i % D]) + r[i]        (one read of x, g, r; one write of y)

Semantics are the op reference's (the torch eager run of the region): every op computes in fp32 and its
result is rounded to the IR dtype of that op's output (fp16 / bf16 round, fp32 stays), as torch rounds per
op; an operand of a wider dtype than a 16-bit op's result (an fp32 0-d tensor in a bf16 op) is rounded to it
first, as torch does; `cast` is that rounding alone. relu keeps NaN and maximum / minimum propagate it (a tie
gives the first operand), as torch does; neg is a multiply by -1 (so -0.0 keeps its sign under Triton 3.6,
whose unary minus is 0 - x). pow_scalar: integral exponents up to 64 by repeated squaring (a negative one as
a power of the reciprocal), +-0.5 by sqrt / rsqrt, other half-integers of a positive x by squarings and one
sqrt, the rest as exp2(e * log2 x) (about 1e-5 relative in fp32), with torch's special values (NaN for x < 0
and a fractional e, 0 or inf at x = 0, (-inf) ** e, the sign of -0.0 in odd powers). tanh is written
with exp (the interpreter and Triton 3.6 have no portable tanh), with a short series near 0 where
1 - 2 / (exp(2x) + 1) would cancel.

Broadcasting and layout: every input is viewed at the output's shape with its own strides (0 on broadcast
axes); adjacent axes that are contiguous for every operand are collapsed (`collapse`), so the common
all-contiguous case is rank 1 with no index math, and a residual + weight [D] case is rank 2. The kernel
unravels the flat output index over the collapsed sizes (i32 arguments) and reads each input through its
strides, so a transposed input needs no copy. The output is contiguous, in the node's output dtype.

The launcher collapses with the node's static plan (its IR shapes, symbolic dims as unknown sizes) first,
so the JIT runs the very kernel an artifact builds ahead of time (launch_specs.ElementwiseSpec); inputs whose
runtime layout breaks that plan (a transposed view) get a plan of their own.

Triton's jit reads its functions' source, so each kernel's source is written to a file under
`lmforge.cache.cache_dir("triton_elementwise")` named by the hash of the source, and imported from there
(`generated_module` also rebuilds the file from the source an artifact's record carries).
"""
from __future__ import annotations

import hashlib
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import triton

from lmforge.backends.triton.config import KernelConfig
from lmforge.errors import LmforgeError
from lmforge.ir.graph import Graph, Node

FLOAT_DTYPES = ("float16", "bfloat16", "float32")
UNARY = ("neg", "exp", "log", "sqrt", "rsqrt", "abs", "sin", "cos", "tanh", "sigmoid", "relu", "silu", "reciprocal")
BINARY = ("add", "sub", "mul", "div", "maximum", "minimum")   # pow with a tensor exponent: not claimed
OTHER = ("gelu", "pow_scalar", "cast")
SUPPORTED = frozenset(UNARY + BINARY + OTHER)
MODULE_PREFIX = "lmforge_triton_elementwise_"
KERNEL = "elementwise_kernel"
I32_MAX = 2 ** 31 - 1

DEFAULT_CONFIG = KernelConfig.make(num_warps=4, num_stages=1, BLOCK=1024)
DEFAULT_CONFIGS = {"elementwise": DEFAULT_CONFIG}
CANDIDATE_CONFIGS = {"elementwise": [DEFAULT_CONFIG] + [KernelConfig.make(num_warps=w, num_stages=1, BLOCK=b)
                                                        for w, b in ((4, 512), (8, 2048), (8, 4096), (16, 8192))]}
_TL = {"float16": "tl.float16", "bfloat16": "tl.bfloat16", "float32": "tl.float32"}


# ---- what is claimed ----------------------------------------------------------------------------------------

def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def unsupported(node: Node) -> str | None:
    """Why the generated kernel cannot run `node` (a `fused` node), or None when it can."""
    if node.op != "fused" or len(node.regions) != 1 or len(node.outputs) != 1:
        return "not a fused region with one output"
    body = node.regions[0]
    if len(body.outputs) != 1 or len(body.inputs) != len(node.inputs):
        return "the region has several outputs"
    values = [*node.inputs, *node.outputs, *body.inputs]
    if any(v is None or v.type.dtype not in FLOAT_DTYPES for v in values):
        return f"a non-float input or output (the kernel takes {FLOAT_DTYPES})"
    known = {v.name for v in body.inputs}
    for n in body.nodes:
        if n.op not in SUPPORTED:
            return f"op {n.op!r} has no generated form"
        if any(v is not None and v.name not in known for v in n.inputs):
            return f"{n.op} reads a value that is not a region input (a parameter of the region)"
        known.update(v.name for v in n.outputs)
        if len(n.outputs) != 1 or n.output.type.dtype not in FLOAT_DTYPES:
            return f"{n.op} gives a non-float result"
        if any(v is not None and v.type.dtype not in FLOAT_DTYPES for v in n.inputs):
            return f"{n.op} takes a non-float operand"
        a = n.attr
        scalar = n.op in BINARY and (len(n.inputs) < 2 or n.inputs[1] is None)
        if scalar and n.op in ("maximum", "minimum"):
            return f"{n.op} with a scalar (the reference, torch.{n.op}, takes tensors only)"
        if scalar and not _number(a.get("scalar")):
            return f"{n.op} has a non-numeric scalar {a.get('scalar')!r}"
        if n.op in BINARY and not _number(a.get("alpha", 1.0)):
            return f"{n.op} has a non-numeric alpha"
        if n.op == "pow_scalar" and not _number(a.get("exponent")):
            return "pow_scalar has a non-numeric exponent"
    if body.outputs[0].name not in known:
        return "the region's output is not computed in the region"
    return None


# ---- source generation --------------------------------------------------------------------------------------

def _literal(value: float) -> str:
    value = float(value)
    if math.isnan(value):
        return 'float("nan")'
    if math.isinf(value):
        return 'float("inf")' if value > 0 else '-float("inf")'
    return repr(value)


def _full(value: float) -> str:
    return f"tl.full((BLOCK,), {_literal(value)}, tl.float32)"


MAX_SQUARINGS = 64    # integer exponents up to this size are multiplied out (exact signs, zeros and infinities)


def _squarings(x: str, n: int) -> str:
    """x ** n (n >= 1) by repeated squaring, as one expression (the compiler shares the repeated subterms)."""
    if n == 1:
        return x
    half = _squarings(f"({x} * {x})", n // 2)
    return f"({half} * {x})" if n % 2 else half


def _power(x: str, exponent: float) -> str:
    if exponent == 0:
        return _full(1.0)                                   # torch: x ** 0 == 1, NaN included
    if exponent == 0.5:
        return f"tl.sqrt_rn({x})"
    if exponent == -0.5:
        return f"tl.rsqrt({x})"
    if exponent.is_integer() and abs(exponent) <= MAX_SQUARINGS:
        # a negative power as a power of the reciprocal: 1 / x**4 would overflow to 0 at x = 1e10 (torch: 1e-40),
        # and -0.0 keeps its sign through the products ((-0.0) ** -5 = -inf, as torch)
        base = x if exponent > 0 else f"tl.div_rn(1.0, {x})"
        return f"({_squarings(base, int(abs(exponent)))})"
    if exponent.is_integer():                               # |x| ** n with x's sign (its sign bit: -0.0 too)
        odd = int(exponent) % 2 == 1
        magnitude = f"tl.exp2({_literal(exponent)} * tl.log2(tl.abs({x})))"
        negative = f"(({x}).to(tl.uint32, bitcast=True) >> 31) != 0"
        return f"tl.where({negative}, -1.0 * {magnitude}, {magnitude})" if odd else magnitude
    # NaN for x < 0, 0 / inf at x = 0; (-inf) ** e is inf for e > 0 and 0 for e < 0 (log2(-inf) would be NaN).
    # exp2(e * log2 x) is good to ~1e-5 relative in fp32 (tens of ulps); a half-integer power of a positive x
    # is multiplied out with one sqrt instead (a few ulps), the general form keeping x <= 0, NaN and -inf.
    at_minus_inf = _literal(math.inf if exponent > 0 else 0.0)
    general = (f"tl.where({x} == -float(\"inf\"), {at_minus_inf}, "
               f"tl.exp2({_literal(exponent)} * tl.log2({x})))")
    if (2 * exponent).is_integer() and abs(exponent) <= MAX_SQUARINGS:
        base = x if exponent > 0 else f"tl.div_rn(1.0, {x})"
        whole = int(abs(exponent))
        fast = f"tl.sqrt_rn({base})" if whole == 0 else f"({_squarings(base, whole)} * tl.sqrt_rn({base}))"
        return f"tl.where({x} > 0.0, {fast}, {general})"
    return general


def _unary(op: str, x: str, attrs: dict) -> str:
    table = {
        "neg": f"-1.0 * {x}", "exp": f"tl.exp({x})", "log": f"tl.log({x})", "sqrt": f"tl.sqrt_rn({x})",
        "rsqrt": f"tl.rsqrt({x})", "abs": f"tl.abs({x})", "sin": f"tl.sin({x})", "cos": f"tl.cos({x})",
        "tanh": f"_tanh({x})", "sigmoid": f"1.0 / (1.0 + tl.exp(-{x}))", "silu": f"{x} / (1.0 + tl.exp(-{x}))",
        "relu": f"tl.where({x} < 0.0, 0.0, {x})",           # NaN stays NaN, as torch.relu
        "reciprocal": f"tl.div_rn(1.0, {x})", "cast": x,
    }
    if op in table:
        return table[op]
    if op == "gelu":
        if attrs.get("approximate", "none") == "tanh":
            inner = f"{_literal(math.sqrt(2.0 / math.pi))} * ({x} + 0.044715 * {x} * {x} * {x})"
            return f"0.5 * {x} * (1.0 + _tanh({inner}))"
        return f"0.5 * {x} * (1.0 + tl.erf({x} * {_literal(1.0 / math.sqrt(2.0))}))"
    if op == "pow_scalar":
        return _power(x, float(attrs["exponent"]))
    raise LmforgeError(f"no generated form for {op!r}")


def _binary(op: str, a: str, b: str | None, attrs: dict, out_dtype: str) -> str:
    if b is None:
        scalar = float(attrs["scalar"])
        if attrs.get("swap"):   # the reference makes the scalar a tensor of the result dtype: it rounds first
            scalar = torch.tensor(scalar, dtype=getattr(torch, out_dtype)).item()
        b = _full(scalar)
    x, y = (b, a) if attrs.get("swap") else (a, b)
    alpha = float(attrs.get("alpha", 1.0))
    if op in ("add", "sub") and alpha != 1.0:
        y = f"({y} * {_literal(alpha)})"
    if op == "maximum":     # NaN in either operand gives NaN, as torch.maximum; a tie (-0.0, 0.0) gives x
        return f"tl.where({x} != {x}, {x}, tl.where({y} != {y}, {y}, tl.where({x} < {y}, {y}, {x})))"
    if op == "minimum":
        return f"tl.where({x} != {x}, {x}, tl.where({y} != {y}, {y}, tl.where({x} > {y}, {y}, {x})))"
    if op == "div":
        return f"tl.div_rn({x}, {y})"
    return f"{x} {dict(add='+', sub='-', mul='*')[op]} {y}"


def _body_lines(region: Graph) -> list[str]:
    """One line per region node: `vK = <fp32 expression>`, then the rounding to the node's 16-bit dtype."""
    names = {v.name: f"x{i}" for i, v in enumerate(region.inputs)}
    lines = []
    for k, n in enumerate(region.nodes):
        dtype = n.output.type.dtype
        # torch computes an op in its result dtype: an operand of another (wider) dtype is rounded to it first
        # (bf16 x - fp32 0-d c rounds c to bf16); a narrower one widens exactly
        args = [None if v is None else names[v.name] if v.type.dtype == dtype or dtype == "float32"
                else f"{_ROUND[dtype]}({names[v.name]})" for v in n.inputs]
        if n.op in BINARY:
            expr = _binary(n.op, args[0], args[1] if len(args) > 1 else None, n.attr, dtype)
        else:
            expr = _unary(n.op, args[0], n.attr)
        lines.append(f"v{k} = {expr}")
        if dtype != "float32":
            lines.append(f"v{k} = {_ROUND[dtype]}(v{k})")
        names[n.output.name] = f"v{k}"
    lines.append(f"y = {names[region.outputs[0].name]}")
    return lines


_ROUND = {"float16": "_round_fp16", "bfloat16": "_round_bf16"}
_ROUNDING = '''
@triton.jit
def _round_fp16(x):
    return x.to(tl.float16).to(tl.float32)


@triton.jit
def _round_bf16(x):
    # to nearest, ties to even, in integer ops: what torch and the GPU do (Triton's interpreter would truncate)
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
'''

_TANH = '''
@triton.jit
def _tanh(x):
    # (1 - e) / (1 + e) with e = exp(-2|x|) never overflows, but it cancels near 0: an odd series there
    x2 = x * x
    series = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(tl.abs(x) < 0.25, series, tl.where(x < 0.0, -t, t))
'''


def kernel_source(region: Graph, rank: int) -> str:
    """The Python source of the module holding the kernel of `region` over `rank` collapsed axes.

    Arguments: out_ptr, in0_ptr..., numel, size1..size{rank-1} (axis 0's size is implied), stride{i}_{d}
    for every input i and axis d, and the BLOCK constexpr."""
    n_in = len(region.inputs)
    args = ["out_ptr", *[f"in{i}_ptr" for i in range(n_in)], "numel", *[f"size{d}" for d in range(1, rank)],
            *[f"stride{i}_{d}" for i in range(n_in) for d in range(rank)], "BLOCK: tl.constexpr"]
    body = ["offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)", "mask = offs < numel"]
    rest = "offs"
    index = {}
    for d in range(rank - 1, 0, -1):      # unravel the flat output index, innermost axis first
        body += [f"i{d} = {rest} % size{d}", f"r{d} = {rest} // size{d}"]
        index[d], rest = f"i{d}", f"r{d}"
    index[0] = rest
    for i in range(n_in):
        offset = " + ".join(f"{index[d]} * stride{i}_{d}" for d in range(rank))
        body.append(f"x{i} = tl.load(in{i}_ptr + {offset}, mask=mask, other=0).to(tl.float32)")
    body += _body_lines(region)
    body.append("tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)")
    ops = ", ".join(n.op for n in region.nodes)
    signature = ",\n        ".join(", ".join(args[i:i + 6]) for i in range(0, len(args), 6))
    lines = ['"""Generated by lmforge.backends.triton.elementwise: do not edit (it is rebuilt from the IR)."""',
             "import triton", "import triton.language as tl", "", _ROUNDING, _TANH, "",
             "@triton.jit", f"def {KERNEL}(\n        {signature}):", f'    """{ops} over {rank} collapsed axes."""']
    return "\n".join(lines + [f"    {line}" for line in body]) + "\n"


def generated_module(name: str, source: str | None = None):
    """The generated kernel module `name` (MODULE_PREFIX + the source's hash): already imported, else imported
    from its cache file, written from `source` first when given (an artifact's record carries it)."""
    if name in sys.modules:
        return sys.modules[name]
    from lmforge.cache import cache_dir, import_file

    path = cache_dir("triton_elementwise") / f"{name}.py"
    if source is not None:
        if module_name(source) != name:
            raise LmforgeError(f"the kernel source given for {name} does not hash to its name; export it again")
        if not path.exists():
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(source)
            os.replace(tmp, path)          # atomic: a concurrent reader sees the whole file or none
    if not path.exists():
        raise LmforgeError(f"the generated Triton kernel {name} is not in {path.parent} and no source was given; "
                           "export the artifact again")
    return import_file(name, path)


def _digest(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()[:20]


def module_name(source: str) -> str:
    """The name of the generated module holding `source` (and of its cache file)."""
    return MODULE_PREFIX + _digest(source)


_KERNELS: dict[str, Any] = {}   # source -> its @triton.jit function


def kernel_for(region: Graph, rank: int):
    """The @triton.jit kernel of `region` over `rank` collapsed axes (generated and imported once per source)."""
    source = kernel_source(region, rank)
    if source not in _KERNELS:
        _KERNELS[source] = getattr(generated_module(module_name(source), source), KERNEL)
    return _KERNELS[source]


def source_of(fn) -> str | None:
    """The generated source of a kernel from here (what an artifact record carries), else None."""
    raw = getattr(fn, "fn", fn)
    if not getattr(raw, "__module__", "").startswith(MODULE_PREFIX):
        return None
    known = next((s for s, k in _KERNELS.items() if getattr(k, "fn", k) is raw), None)
    return known if known is not None else Path(sys.modules[raw.__module__].__file__).read_text()


# ---- layouts: broadcasting as strides, collapsed axes ----------------------------------------------------------

@dataclass(frozen=True)
class Size:
    """A product of an int and symbolic dims (what a static size or stride is): Size(64, ("seq",))."""

    factor: int
    symbols: tuple[str, ...] = ()

    @staticmethod
    def of(dims) -> "Size":
        ints = [d for d in dims if isinstance(d, int)]
        return Size(math.prod(ints), tuple(sorted(d for d in dims if not isinstance(d, int))))

    def __mul__(self, other: "Size") -> "Size":
        if self.factor == 0 or other.factor == 0:
            return Size(0)
        return Size(self.factor * other.factor, tuple(sorted(self.symbols + other.symbols)))

    @property
    def is_one(self) -> bool:
        return self.factor == 1 and not self.symbols


def _contiguous(shape: Sequence[Size]) -> list[Size]:
    strides, step = [], Size(1)
    for s in reversed(shape):
        strides.append(step)
        step = step * s
    return strides[::-1]


def _group_stride(sizes: Sequence[Size], strides: Sequence[Size], axes: Sequence[int]) -> Size | None:
    """The stride of `axes` (adjacent, outer first) read as one axis, or None when they are not one
    contiguous run for this operand. Axes of size 1 never move, so their strides do not matter."""
    inner, span = None, None
    for a in reversed(axes):
        if sizes[a].is_one:
            continue
        if inner is None:
            inner, span = strides[a], strides[a] * sizes[a]
        elif strides[a] != span:
            return None
        else:
            span = span * sizes[a]
    return inner if inner is not None else Size(0)


def collapse(sizes: Sequence[Size], strides: Sequence[Sequence[Size]]) -> list[tuple[int, ...]]:
    """Groups of adjacent output axes (outer first) that are one contiguous run for every operand (`strides`:
    per operand, its stride on each output axis; the output, contiguous, is an operand too). Axes of static
    size 1 are left out; at least one group remains (rank 0 reads as one axis of size 1)."""
    groups: list[list[int]] = []
    for a, s in enumerate(sizes):
        if s.is_one:
            continue
        if groups and all(_group_stride(sizes, st, groups[-1] + [a]) is not None for st in strides):
            groups[-1].append(a)
        else:
            groups.append([a])
    return [tuple(g) for g in groups] or [()]


def static_layout(node: Node) -> tuple[list[tuple[int, ...]], list[list[Size]]]:
    """The node's plan from its IR types, inputs assumed contiguous: (axis groups, per input its static stride
    per output axis: 0 on broadcast axes)."""
    out = [Size.of([d]) for d in node.output.type.shape]
    strides = []
    for v in node.inputs:
        shape = [Size.of([d]) for d in v.type.shape]
        own = _contiguous(shape)
        off = len(out) - len(shape)
        strides.append([Size(0) if a < off or (shape[a - off].is_one and not out[a].is_one) else own[a - off]
                        for a in range(len(out))])
    return collapse(out, strides + [_contiguous(out)]), strides


@dataclass(frozen=True)
class Plan:
    """One launch's integer arguments: numel, the sizes of groups 1.. and each input's stride per group."""

    rank: int
    numel: int
    sizes: tuple[int, ...]
    strides: tuple[tuple[int, ...], ...]

    def values(self) -> dict[str, int]:
        values = {"numel": self.numel, **{f"size{d}": s for d, s in enumerate(self.sizes) if d}}
        for i, st in enumerate(self.strides):
            values.update({f"stride{i}_{d}": s for d, s in enumerate(st)})
        return values


def runtime_plan(groups, shape: Sequence[int], tensors: Sequence[torch.Tensor]) -> Plan | None:
    """The plan of `groups` for these tensors at the output `shape`, or None when some input's layout is not
    one run within a group (or an offset would not fit in i32)."""
    sizes = [Size(int(s)) for s in shape]
    operands = [[Size(int(s)) for s in t.expand(tuple(shape)).stride()] for t in tensors]
    group_sizes, group_strides = [], []
    for g in groups:
        group_sizes.append(math.prod(int(shape[a]) for a in g))
    for st in operands:
        found = [_group_stride(sizes, st, g) for g in groups]
        if any(s is None for s in found):
            return None
        group_strides.append(tuple(s.factor for s in found))
    numel = math.prod(int(s) for s in shape)
    reach = [sum((n - 1) * s for n, s in zip(group_sizes, st)) for st in group_strides]
    if numel > I32_MAX or any(r > I32_MAX for r in reach) or any(s < 0 for st in group_strides for s in st):
        return None
    return Plan(len(groups), numel, tuple(group_sizes), tuple(group_strides))


def plan_for(node: Node, groups, tensors: Sequence[torch.Tensor]) -> Plan | None:
    """The static plan's launch for these tensors; else one collapsed from their own layout (JIT only)."""
    shape = torch.broadcast_shapes(*(t.shape for t in tensors))
    if len(shape) == len(node.output.type.shape):
        plan = runtime_plan(groups, shape, tensors)
        if plan is not None:
            return plan
    sizes = [Size(int(s)) for s in shape]
    strides = [[Size(int(s)) for s in t.expand(shape).stride()] for t in tensors]
    return runtime_plan(collapse(sizes, strides + [_contiguous(sizes)]), shape, tensors)


# ---- the JIT launcher -------------------------------------------------------------------------------------------

def launcher(node: Node, config: KernelConfig | None = None) -> Callable:
    """fn(*inputs, **attrs) running `node` (a claimable fused region) with its generated kernel; a call the
    kernel cannot serve (an offset past i32, an empty output) runs the op reference."""
    from lmforge.ir.ops import get_op

    reason = unsupported(node)
    if reason is not None:
        raise LmforgeError(f"the generated elementwise kernel cannot run this fused node: {reason}")
    config = config or DEFAULT_CONFIG
    block = config.require("BLOCK", "elementwise")
    groups, _ = static_layout(node)
    region = node.regions[0]
    out_dtype = getattr(torch, node.output.type.dtype)
    reference = get_op("fused").reference
    kernels = {}    # collapsed rank -> kernel: the source is generated once per launcher, not per call

    def run(*inputs, **attrs):
        tensors = list(inputs[:len(node.inputs)])
        plan = plan_for(node, groups, tensors)
        if plan is None or plan.numel == 0:
            return reference(*inputs, **attrs)
        shape = torch.broadcast_shapes(*(t.shape for t in tensors))
        out = torch.empty(shape, dtype=out_dtype, device=tensors[0].device)
        fn = kernels.get(plan.rank) or kernels.setdefault(plan.rank, kernel_for(region, plan.rank))
        fn[(triton.cdiv(plan.numel, block),)](out, *tensors, *plan.values().values(), BLOCK=block,
                                             num_warps=config.num_warps, num_stages=config.num_stages)
        return out

    return run
