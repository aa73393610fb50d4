"""Matrix ops lowered to TE: linear, linear_wo (int8 / int4 weight-only, dequantized inside the kernel), matmul.

All three compute y[m, n] = sum_k x[m, k] * W(n, k) (+ b[n]) over the rows m of x flattened to [M, K]; they
differ in W(n, k), the weight as an expression of the weight tensors:

    linear     W(n, k) = w[n, k]                                    w [N, K]
    matmul     W(n, k) = b[k, n]                                    b [K, N] (2-D right operand)
    linear_wo  W(n, k) = (q(n, k) - zeros[n, g]) * scales[n, g]     g = k // group_size
               int8: q = qweight[n, k]; int4: q = qweight[n, k // 2] >> 4 * (k % 2) & 15 (low nibble first)

Rows are split into variants so that no loop carries a tail predicate (which would stop vectorization):
  - M <= `tvm.linear.gemv_max_rows`: one build per row count with M static ("gemv" schedule for the [N, K]
    layouts: the K axis in vectors reduced across lanes; matmul uses the "gemm" schedule with mr = M);
  - larger M: the first M - M % mr rows run a "gemm" build over x viewed as [M // mr, mr, K] (symbolic
    M // mr, static mr), the last M % mr rows a static-row build. So one "gemm" build serves every M.
Batched matmuls (both operands with the same batch dims) take a simple "bmm" schedule.
"""
from __future__ import annotations

import math

import torch

from lmforge.backends.tvm.build import Lowered, OpKernel, ready
from lmforge.backends.tvm.knobs import largest_divisor
from lmforge.ir.graph import Node


# ---- weights as expressions ---------------------------------------------------------------------------

class DenseWeight:
    """W(n, k) read from a dense fp32 tensor, [N, K] (`transposed=False`, linear) or [K, N] (matmul)."""

    def __init__(self, n: int, k: int, transposed: bool):
        self.n, self.k, self.transposed = n, k, transposed

    def placeholders(self):
        from tvm import te

        shape = (self.k, self.n) if self.transposed else (self.n, self.k)
        self.w = te.placeholder(shape, "float32", name="w")
        return [self.w]

    def at(self, n, k):
        return self.w[k, n] if self.transposed else self.w[n, k]


class QuantWeight:
    """W(n, k) dequantized from linear_wo's packed layout (see lmforge.ir.ops.quant_ref)."""

    def __init__(self, n: int, k: int, bits: int, group_size: int):
        self.n, self.k, self.bits, self.group = n, k, bits, group_size

    def placeholders(self):
        from tvm import te

        groups = self.k // self.group
        self.q = te.placeholder((self.n, self.k * self.bits // 8), "uint8", name="qweight")
        self.s = te.placeholder((self.n, groups), "float32", name="scales")
        self.z = te.placeholder((self.n, groups), "uint8", name="zeros")
        return [self.q, self.s, self.z]

    def code(self, n, k):
        """The stored integer of element (n, k), as float32."""
        from tvm import tirx

        if self.bits == 8:
            byte = self.q[n, k]
        else:
            shift = tirx.Cast("uint8", (k % 2) * 4)
            byte = (self.q[n, k // 2] >> shift) & tirx.const(15, "uint8")
        return tirx.Cast("float32", byte)

    def at(self, n, k):
        from tvm import tirx

        g = k // self.group
        return (self.code(n, k) - tirx.Cast("float32", self.z[n, g])) * self.s[n, g]

    def at_pair(self, n, kb, p):
        """int4 element k = 2 * kb + p with p a separate (unrolled) axis: the nibble select is static."""
        from tvm import tirx

        byte = (self.q[n, kb] >> tirx.Cast("uint8", p * 4)) & tirx.const(15, "uint8")
        g = kb // (self.group // 2)
        return (tirx.Cast("float32", byte) - tirx.Cast("float32", self.z[n, g])) * self.s[n, g]


# ---- TE computations ----------------------------------------------------------------------------------

def gemv_lowered(lead: tuple[int, ...], weight, bias: bool) -> Lowered:
    """y [*lead, N] = x [*lead, K] . W(n, k) (+ b) with the leading shape static (decode rows): the "gemv"
    schedule fuses the leading axes into one unrolled row loop and splits K into vectors."""
    from tvm import te

    n_out, k_in = weight.n, weight.k
    x = te.placeholder((*lead, k_in), "float32", name="x")
    wargs = weight.placeholders()
    pairs = isinstance(weight, QuantWeight) and weight.bits == 4
    if pairs:  # int4: reduce over (byte kb, nibble p) so that each vector lane reads one byte
        xe = te.compute((*lead, 2, k_in // 2), lambda *i: x[(*i[:-2], 2 * i[-1] + i[-2])], name="x_split")
        kb = te.reduce_axis((0, k_in // 2), "kb")
        p = te.reduce_axis((0, 2), "p")
        acc = te.compute((*lead, n_out), lambda *i: te.sum(
            xe[(*i[:-1], p, kb)] * weight.at_pair(i[-1], kb, p), axis=[kb, p]), name="acc")
    else:
        k = te.reduce_axis((0, k_in), "k")
        acc = te.compute((*lead, n_out), lambda *i: te.sum(x[(*i[:-1], k)] * weight.at(i[-1], k), axis=k),
                         name="acc")
    ins = [x, *wargs]
    out = acc
    if bias:
        b = te.placeholder((n_out,), "float32", name="b")
        ins.append(b)
        out = te.compute((*lead, n_out), lambda *i: acc[i] + b[i[-1]], name="out")
    red = k_in // 2 if pairs else k_in
    return Lowered("gemv", ins, [out], info={"lead": len(lead), "n": n_out, "k": red, "pairs": pairs,
                                             "bias": bias})


def gemm_lowered(mr: int, weight, bias: bool, pack: bool, nr: int) -> Lowered:
    """y [mo, mr, N] = x [mo, mr, K] . W(n, k) (+ b); mo symbolic, mr static. With `pack`, W is first
    copied into panels [N / nr, K, nr] so that the inner loop reads nr contiguous columns."""
    from tvm import te

    n_out, k_in = weight.n, weight.k
    mo = te.var("mo")
    x = te.placeholder((mo, mr, k_in), "float32", name="x")
    wargs = weight.placeholders()
    k = te.reduce_axis((0, k_in), "k")
    if pack:
        panel = te.compute((n_out // nr, k_in, nr), lambda no, kk, ni: weight.at(no * nr + ni, kk), name="pack")
        acc = te.compute((mo, mr, n_out), lambda o, r, n: te.sum(x[o, r, k] * panel[n // nr, k, n % nr], axis=k),
                         name="acc")
    else:
        acc = te.compute((mo, mr, n_out), lambda o, r, n: te.sum(x[o, r, k] * weight.at(n, k), axis=k), name="acc")
    ins = [x, *wargs]
    out = acc
    if bias:
        b = te.placeholder((n_out,), "float32", name="b")
        ins.append(b)
        out = te.compute((mo, mr, n_out), lambda o, r, n: acc[o, r, n] + b[n], name="out")
    return Lowered("gemm", ins, [out], info={"mr": mr, "nr": nr, "n": n_out, "k": k_in, "pack": pack, "bias": bias})


def rows_lowered(weight, bias: bool) -> Lowered:
    """y [M, N] = x [M, K] . W(n, k) (+ b) with M symbolic: the plain form GPU rules (dlight) recognize."""
    from tvm import te

    rows = te.var("rows")
    x = te.placeholder((rows, weight.k), "float32", name="x")
    wargs = weight.placeholders()
    k = te.reduce_axis((0, weight.k), "k")
    acc = te.compute((rows, weight.n), lambda m, n: te.sum(x[m, k] * weight.at(n, k), axis=k), name="acc")
    ins, out = [x, *wargs], acc
    if bias:
        b = te.placeholder((weight.n,), "float32", name="b")
        ins.append(b)
        out = te.compute((rows, weight.n), lambda m, n: acc[m, n] + b[n], name="out")
    return Lowered("rows", ins, [out], info={"n": weight.n, "k": weight.k, "bias": bias})


def bmm_lowered(m_static: int | None, k_in: int, n_out: int | None) -> Lowered:
    """c [B, M, N] = a [B, M, K] @ b [B, K, N] with B (and M, N when None) symbolic."""
    from tvm import te

    batch = te.var("batch")
    m = te.var("m") if m_static is None else m_static
    n = te.var("n") if n_out is None else n_out
    a = te.placeholder((batch, m, k_in), "float32", name="a")
    b = te.placeholder((batch, k_in, n), "float32", name="b")
    k = te.reduce_axis((0, k_in), "k")
    c = te.compute((batch, m, n), lambda z, i, j: te.sum(a[z, i, k] * b[z, k, j], axis=k), name="acc")
    return Lowered("bmm", [a, b], [c], info={"n": n_out, "k": k_in})


# ---- kernels ------------------------------------------------------------------------------------------

def _is(t, dtype="float32", rank=None) -> bool:
    return t is not None and t.type.dtype == dtype and (rank is None or t.type.rank == rank)


class RowsKernel(OpKernel):
    """Shared by linear, linear_wo and 2-D matmul: flatten x to rows, pick variants, run main + tail."""

    family = "gemv"
    main_variant = "gemm"      # serves every row count above gemv_max_rows (with a static-row tail)
    small_rows_kind = "gemv"   # schedule of the static-row variants ("gemm" for matmul's [K, N] layout)

    def __init__(self, node, knobs, cache, target):
        super().__init__(node, knobs, cache, target)
        self.max_rows = int(knobs["tvm.linear.gemv_max_rows"])
        self.mr = int(knobs["tvm.gemm.mr"])
        self.n, self.k = self.weight_shape()
        self.nr = largest_divisor(self.n, int(knobs["tvm.gemm.nr"]))
        self.has_bias = len(node.inputs) > self.n_weight_args + 1 and node.inputs[-1] is not None

    n_weight_args = 1

    def weight_shape(self) -> tuple[int, int]:
        raise NotImplementedError

    def make_weight(self):
        raise NotImplementedError

    def family_of(self, variant) -> str:
        return "gemm" if variant == "gemm" or self.small_rows_kind == "gemm" else "gemv"

    def lower(self, variant) -> Lowered:
        """variant: "gemm" (rows in tiles of mr) or the static leading shape of x (a tuple)."""
        if variant == "gemm":
            return gemm_lowered(self.mr, self.make_weight(), self.has_bias, self.pack_main(), self.nr)
        if self.small_rows_kind == "gemm":
            return gemm_lowered(math.prod(variant), self.make_weight(), self.has_bias, False, self.nr)
        return gemv_lowered(variant, self.make_weight(), self.has_bias)

    def pack_main(self) -> bool:
        return True

    def lower_gpu(self) -> Lowered:
        return rows_lowered(self.make_weight(), self.has_bias)

    def describe(self) -> str:
        return (f"{self.small_rows_kind} rows<={self.max_rows}, else gemm mr={self.mr} nr={self.nr} "
                f"[N={self.n}, K={self.k}]")

    def __call__(self, x, *weights, **attrs):
        weights = tuple(ready(w) for w in weights if w is not None)
        lead = x.shape[:-1]
        rows = x.numel() // self.k
        if rows <= self.max_rows and len(lead) and self.small_rows_kind == "gemv":
            # decode rows: one build per leading shape, x and the output passed as they are (no views)
            fn = self._fns[lead] if lead in self._fns else self.fn(tuple(lead))
            if fn is None:
                return self.run_reference(x, *weights, **attrs)
            out = self.empty((*lead, self.n))
            fn(ready(x), *weights, out)
            return out
        out = self.empty((*lead, self.n))
        x2 = ready(x).view(rows, self.k)
        o2 = out.view(rows, self.n)
        if rows <= self.max_rows:
            if not self._run_small(x2, weights, o2, rows):
                return self.run_reference(x, *weights, **attrs)
            return out
        main = rows - rows % self.mr
        if main:
            fn = self._fns["gemm"] if "gemm" in self._fns else self.fn("gemm")
            if fn is None:
                return self.run_reference(x, *weights, **attrs)
            fn(x2[:main].view(main // self.mr, self.mr, self.k), *weights, o2[:main].view(-1, self.mr, self.n))
        if rows > main:
            tail_out = o2[main:]
            aligned = tail_out.data_ptr() % 64 == 0
            target = tail_out if aligned else torch.empty_like(tail_out)
            if not self._run_small(ready(x2[main:]), weights, target, rows - main):
                return self.run_reference(x, *weights, **attrs)
            if not aligned:
                tail_out.copy_(target)
        return out

    def _run_small(self, x2, weights, o2, rows) -> bool:
        variant = (rows,)
        fn = self._fns[variant] if variant in self._fns else self.fn(variant)
        if fn is None:
            return False
        if self.small_rows_kind == "gemm":
            fn(x2.view(1, rows, self.k), *weights, o2.view(1, rows, self.n))
        else:
            fn(x2, *weights, o2)
        return True


class LinearKernel(RowsKernel):
    """linear(x [..., K], w [N, K], b [N]?) on fp32."""

    @staticmethod
    def supports(node: Node) -> bool:
        x, w = node.inputs[:2]
        b = node.inputs[2] if len(node.inputs) > 2 else None
        return (_is(x) and _is(w, rank=2) and w.type.is_static and (b is None or _is(b, rank=1))
                and x.type.shape[-1] == w.type.shape[1])

    def weight_shape(self):
        n, k = self.node.inputs[1].type.shape
        return n, k

    def make_weight(self):
        return DenseWeight(self.n, self.k, transposed=False)

    def key(self):
        return ("linear", self.n, self.k, self.has_bias)


class LinearWOKernel(RowsKernel):
    """linear_wo(x [..., K], qweight uint8, scales fp32, zeros uint8, bias?; bits 4|8, group_size)."""

    n_weight_args = 3

    @staticmethod
    def supports(node: Node) -> bool:
        x, q, s, z = node.inputs[:4]
        b = node.inputs[4] if len(node.inputs) > 4 else None
        attrs = node.attr
        bits, group = attrs["bits"], attrs["group_size"]
        if bits not in (4, 8) or not (_is(x) and _is(q, "uint8", 2) and _is(s, rank=2) and _is(z, "uint8", 2)):
            return False
        if not (q.type.is_static and s.type.is_static and (b is None or _is(b, rank=1))):
            return False
        k = q.type.shape[1] * 8 // bits
        return (k % group == 0 and group % 2 == 0 and x.type.shape[-1] == k
                and tuple(s.type.shape) == (q.type.shape[0], k // group) == tuple(z.type.shape))

    def weight_shape(self):
        q = self.node.inputs[1].type.shape
        return q[0], q[1] * 8 // self.attrs["bits"]

    def make_weight(self):
        return QuantWeight(self.n, self.k, self.attrs["bits"], self.attrs["group_size"])

    def key(self):
        return ("linear_wo", self.n, self.k, self.attrs["bits"], self.attrs["group_size"], self.has_bias)

    def describe(self) -> str:
        return f"int{self.attrs['bits']} g{self.attrs['group_size']} " + super().describe()


class MatmulKernel(RowsKernel):
    """matmul(a [..., M, K], b [K, N]) on fp32: the right operand is 2-D, so a's rows flatten."""

    family = "gemm"
    small_rows_kind = "gemm"

    def __init__(self, node, knobs, cache, target):
        super().__init__(node, knobs, cache, target)
        self.pack = bool(knobs["tvm.gemm.pack"])

    @staticmethod
    def supports(node: Node) -> bool:
        a, b = node.inputs
        return (_is(a) and _is(b, rank=2) and a.type.rank >= 2 and b.type.is_static
                and a.type.shape[-1] == b.type.shape[0])

    def weight_shape(self):
        k, n = self.node.inputs[1].type.shape
        return n, k

    def make_weight(self):
        return DenseWeight(self.n, self.k, transposed=True)

    def pack_main(self) -> bool:
        return self.pack

    def key(self):
        return ("matmul", self.n, self.k)


class BatchedMatmulKernel(OpKernel):
    """matmul(a [*batch, M, K], b [*batch, K, N]) with equal batch dims: one loop nest over the flat batch."""

    family = "gemm"

    @staticmethod
    def supports(node: Node) -> bool:
        a, b = node.inputs
        if not (_is(a) and _is(b)) or a.type.rank < 3 or a.type.rank != b.type.rank:
            return False
        return tuple(a.type.shape[:-2]) == tuple(b.type.shape[:-2]) and isinstance(a.type.shape[-1], int) \
            and a.type.shape[-1] == b.type.shape[-2]

    def __init__(self, node, knobs, cache, target):
        super().__init__(node, knobs, cache, target)
        a, b = node.inputs
        self.k = a.type.shape[-1]
        self.n = b.type.shape[-1] if isinstance(b.type.shape[-1], int) else None

    def key(self):
        return ("bmm", self.k, self.n)

    def lower(self, variant) -> Lowered:
        return bmm_lowered(None, self.k, self.n)

    def describe(self) -> str:
        return f"bmm [K={self.k}, N={self.n or 'sym'}]"

    def __call__(self, a, b, **attrs):
        fn = self._main or self.main()
        if fn is False:
            return self.run_reference(a, b, **attrs)
        m, n = a.shape[-2], b.shape[-1]
        out = self.empty((*a.shape[:-1], n))
        fn(ready(a).view(-1, m, self.k), ready(b).view(-1, self.k, n), out.view(-1, m, n))
        return out
