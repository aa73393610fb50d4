"""The Triton kernel templates the kernel model knows: which IR nodes each runs (mirroring the claims of
`lmforge.backends.triton`), its candidate configs (each kernel module's CANDIDATE_CONFIGS, the config that runs by
default first), the launch geometry of a config on a node (grid, threads, bytes in flight, padding, extra
traffic), the AOT spec that gives ptxas's report of registers and shared memory, and a resource estimate for
when Triton cannot build here or the node has no AOT spec.

The efficiency model that turns a `Launch` into time lives in `lmforge.search.kernel_model`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from lmforge.ir.graph import Graph, Node


@dataclass(frozen=True)
class Launch:
    """The launch geometry of one node under one config (what the efficiency model needs)."""

    ctas: int                    # grid size
    threads: int                 # threads per CTA
    bytes_in_flight: float       # useful bytes one CTA has requested at once (one loop step, all stages)
    pad: float = 1.0             # useful work / padded work of the tiles
    extra_bytes: float = 0.0     # DRAM traffic the op's registry cost does not count (split-K partials, re-reads)
    extra_launches: int = 0      # kernels besides the main one (a split-K merge)


@dataclass(frozen=True)
class KernelTemplate:
    """One Triton kernel template: which nodes it runs, its candidate configs, and its launch geometry."""

    name: str
    claims: Callable[[Node, Mapping[str, int]], bool]
    configs: Callable[[Node], tuple]                  # candidate KernelConfigs (index 0 = what runs by default)
    launch: Callable[[Node, Mapping[str, int], Any, Any], Launch]   # (node, env, config, hw)
    estimate: Callable[[Node, Any], tuple[int, int]]  # (registers, shared bytes) when there is no AOT report
    aot_spec: Callable[[Node, Mapping[str, int], Any], Any] | None = None  # (node, env, config) -> KernelSpec


def _shapes(node: Node, env: Mapping[str, int]):
    return [None if v is None else v.type.concrete(env) for v in node.inputs]


def _dtype_bytes(t) -> int:
    return max(1, t.nbytes() // max(1, t.numel()))


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def _linear_wo_dims(node: Node, env):
    x, qw = _shapes(node, env)[:2]
    bits, gs = node.attr["bits"], node.attr["group_size"]
    n, k = qw.shape[0], qw.shape[1] * 8 // bits
    m = x.numel() // k
    return m, n, k, bits, gs, _dtype_bytes(x)


def _claims_gemv(node, env):
    from lmforge.backends.triton import quant_matmul as qm

    return node.op == "linear_wo" and qm.kernel_for_rows(_linear_wo_dims(node, env)[0]) == "wo_gemv"


def _claims_gemm(node, env):
    from lmforge.backends.triton import quant_matmul as qm

    return node.op == "linear_wo" and qm.kernel_for_rows(_linear_wo_dims(node, env)[0]) == "wo_gemm"


def _gemv_launch(node, env, config, hw) -> Launch:
    from lmforge.backends.triton import quant_matmul as qm

    m, n, k, bits, gs, xb = _linear_wo_dims(node, env)
    plan, _ = qm.gemv_plan(config, k // gs, gs * bits // 32)
    block_n, split, steps = plan.get("BLOCK_N"), plan.get("SPLIT_K"), plan.get("GROUPS_PER_STEP")
    tiles = math.ceil(n / block_n)
    extra = 0.0 if split == 1 else m * n * 4 * (split + 2) + m * n * xb  # fp32 atomics, zero fill, final cast
    return Launch(ctas=tiles * split, threads=32 * plan.num_warps,
                  bytes_in_flight=block_n * gs * bits / 8 * steps * min(1.0, n / block_n),
                  pad=n / (tiles * block_n), extra_bytes=extra, extra_launches=0 if split == 1 else 2)


def _gemm_launch(node, env, config, hw) -> Launch:
    from lmforge.backends.triton import quant_matmul as qm

    m, n, k, bits, gs, xb = _linear_wo_dims(node, env)
    plan = qm.gemm_plan(config, gs)
    bm, bn, bk = plan.get("BLOCK_M"), plan.get("BLOCK_N"), plan.get("BLOCK_K")
    tm, tn = math.ceil(m / bm), math.ceil(n / bn)
    step = bk * min(bn, n) * bits / 8 + min(bm, m) * bk * xb
    split = plan.get("SPLIT_K", 1)  # the swapped kernel (SWAP_AB=1) may split K: fp32 atomics, zero fill, cast
    extra = 0.0 if split == 1 else m * n * 4 * (split + 2) + m * n * xb
    return Launch(ctas=tm * tn * split, threads=32 * plan.num_warps, bytes_in_flight=step * plan.num_stages,
                  pad=(m * n) / (tm * bm * tn * bn), extra_bytes=extra, extra_launches=0 if split == 1 else 2)


def _wo_spec(kernel: str):
    def spec(node, env, config=None):
        from lmforge.backends.triton import quant_matmul as qm

        m, n, k, bits, gs, _ = _linear_wo_dims(node, env)
        act = _torch_dtype(node.inputs[0].type.dtype)
        if act not in qm.TRITON_TYPES or gs < 16 or gs & (gs - 1):
            return None
        rows = m if kernel == "wo_gemv" else 1
        swap = kernel == "wo_gemm" and config is not None and config.get("SWAP_AB", 0)
        name = f"{kernel}{'_swapped' if swap else ''}_int{bits}_g{gs}_{qm.TRITON_TYPES[act]}"
        return next((s for s in qm.aot_specs(act, gs, k, rows=rows) if s.name == name), None)

    return spec


def _gemv_estimate(node, config):
    return 40, 0


def _gemm_estimate(node, config):
    p = dict(config.params)
    tile_bytes = (p["BLOCK_M"] + p["BLOCK_N"]) * p["BLOCK_K"] * 2
    acc = p["BLOCK_M"] * p["BLOCK_N"] / (32 * config.num_warps)
    return int(min(255, 32 + 2 * acc)), tile_bytes * config.num_stages


def _row_kernel(op: str):
    def claims(node, env):
        from lmforge.backends.triton.backend import TritonBackend

        return node.op == op and getattr(TritonBackend(), f"_claim_{op}")(node) is not None

    return claims


def _rows_dims(node, env):
    x = _shapes(node, env)[0]
    d = x.shape[-1]
    return x.numel() // max(1, d), d, _dtype_bytes(x)


def _row_launch(kernel: str):
    def launch(node, env, config, hw) -> Launch:
        from lmforge.backends.triton import norms

        rows, d, xb = _rows_dims(node, env)
        plan = norms.row_plan(config, d, kernel)
        br, bd = plan.get("BLOCK_R"), plan.get("BLOCK_D")
        ctas = math.ceil(rows / br)
        chunks = math.ceil(d / bd)
        two_pass = bd < d  # the chunked sweep reads x once for the statistics and once to normalize
        return Launch(ctas=ctas, threads=32 * plan.num_warps, bytes_in_flight=min(br, rows) * min(bd, d) * xb,
                      pad=(rows * d) / (ctas * br * chunks * bd), extra_bytes=rows * d * xb if two_pass else 0.0)

    return launch


def _row_spec(kernel: str):
    def spec(node, env, config=None):
        from lmforge.backends.triton import norms

        rows, d, _ = _rows_dims(node, env)
        dtype = _torch_dtype(node.inputs[0].type.dtype)
        if dtype not in norms.TRITON_TYPES:
            return None
        t = norms.TRITON_TYPES[dtype]
        # norms.aot_specs builds one-pass specs for rows of `d`; a row longer than the largest tile gets the
        # chunked ("long") spec
        long_d = d if norms.row_plan(None, d, kernel).get("BLOCK_D") < d else 1 << 20
        specs = norms.aot_specs(dtype, d=d, long_d=long_d)
        want = f"{kernel}_{'row' if long_d != d else 'long'}_{t}"
        return next((s for s in specs if s.name == want), None)

    return spec


def _row_estimate(node, config):
    return 32, 0


def _claims_fused(kernel: str):
    def claims(node, env):
        from lmforge.backends.triton.backend import TritonBackend, kernel_name

        return node.op == "fused" and kernel_name(node) == kernel and TritonBackend()._claim_fused(node) is not None

    return claims


def _swiglu_launch(node, env, config, hw) -> Launch:
    g = _shapes(node, env)[0]
    block = config.get("BLOCK")
    ctas = math.ceil(g.numel() / block)
    return Launch(ctas=ctas, threads=32 * config.num_warps,
                  bytes_in_flight=2 * min(block, g.numel()) * _dtype_bytes(g), pad=g.numel() / (ctas * block))


def _swiglu_spec(node, env, config=None):
    from lmforge.backends.triton import norms

    dtype = _torch_dtype(node.inputs[0].type.dtype)
    if dtype not in norms.TRITON_TYPES:
        return None
    return next((s for s in norms.aot_specs(dtype) if s.name.startswith("swiglu_")), None)


def _elementwise_launch(node, env, config, hw) -> Launch:
    """One program per BLOCK output elements; each reads its inputs' elements (a broadcast weight mostly hits
    the cache, so only inputs of the output's size count as bytes in flight)."""
    out = node.output.type.concrete(env)
    n = out.numel()
    block = config.get("BLOCK")
    ctas = math.ceil(n / block)
    full = [t for t in _shapes(node, env) if t is not None and t.numel() == n]
    per_element = sum(_dtype_bytes(t) for t in full) or _dtype_bytes(out)
    return Launch(ctas=ctas, threads=32 * config.num_warps, bytes_in_flight=min(block, n) * per_element,
                  pad=n / (ctas * block))


def _elementwise_spec(node, env, config=None):
    """The artifact's build of the node's generated kernel (launch_specs.ElementwiseSpec), None when it has none."""
    from lmforge.backends.triton.aot import KernelSpec
    from lmforge.backends.triton.launch_specs import ELEMENTWISE, Unservable

    try:
        [v] = ELEMENTWISE.variants(node, {})
    except Unservable:
        return None
    return KernelSpec(f"elementwise_{v.signature['out_ptr'][1:]}", v.fn, v.signature, v.constexprs, v.config,
                      v.divisible_by_16)


def _is_triton_decode(node: Node, env) -> bool:
    """The attention node runs the split-K decode kernel (mirrors attention_glue.claim_attention's run)."""
    from lmforge.backends.triton import attention_glue

    if node.op == "block_topk_attention":
        return attention_glue.claim_block_topk(node, {}) is not None
    if node.op != "attention" or attention_glue.claim_attention(node, {}) is None:
        return False
    q = _shapes(node, env)[0]
    a = node.attr
    return q.shape[2] == 1 and a["window"] is None and not a["sinks"] and (a["q_offset"] is None or not a["causal"])


def _is_triton_prefill(node: Node, env) -> bool:
    """The node runs the flash prefill kernel: attention that is not a decode step, or block_sparse_attention
    (FlexPrefill's lowering; the kernel's SPARSE mode)."""
    from lmforge.backends.triton import attention_glue

    if node.op == "block_sparse_attention":
        return attention_glue.claim_block_sparse(node, {}) is not None
    return (node.op == "attention" and attention_glue.claim_attention(node, {}) is not None
            and not _is_triton_decode(node, env))


def _attn_dims(node, env):
    q, k = _shapes(node, env)[:2]
    b, hq, sq, d = q.shape
    return b, hq, sq, d, k.shape[1], k.shape[2], _dtype_bytes(q)


def _split_count(n_tiles: int, programs_per_split: int, hw) -> int:
    """The splits attention_decode.plan_splits makes on `hw` (its SM count instead of the device's)."""
    from lmforge.backends.triton import attention_decode as ad

    if n_tiles <= 0:
        return 0
    want = math.ceil(ad.PROGRAMS_PER_SM * hw.sm_count / max(1, programs_per_split))
    splits = max(1, min(want, n_tiles, ad.MAX_SPLITS))
    return math.ceil(n_tiles / math.ceil(n_tiles / splits))


def _decode_launch(node, env, config, hw) -> Launch:
    from lmforge.backends.triton import attention_decode as ad

    b, hq, sq, d, hkv, s, xb = _attn_dims(node, env)
    params, cfg = ad._config(config)
    rows = (hq // hkv) * sq
    block_m = ad._row_block(rows, params["MAX_BLOCK_M"])
    block_n = params["BLOCK_N"]
    if node.op == "block_topk_attention":
        a = node.attr
        block_n = min(block_n, a["block_size"])
        kept = min(s, (a["topk_blocks"] + math.ceil(a["sinks"] / a["block_size"]) + 1) * a["block_size"]
                   + a["window"])  # selected blocks + sink blocks + the local window
    else:
        kept = s
    n_tiles = math.ceil(kept / block_n)
    splits = _split_count(n_tiles, b * hkv, hw)
    row_blocks = math.ceil(rows / block_m)
    partials = b * hq * sq * splits * (d + 1) * 4 * 2  # written by the split kernel, read by the merge
    return Launch(ctas=b * hkv * splits * row_blocks, threads=32 * cfg.num_warps,
                  bytes_in_flight=cfg.num_stages * block_n * d * 2 * xb,
                  pad=rows / (row_blocks * block_m) * kept / (n_tiles * block_n),
                  extra_bytes=partials, extra_launches=1)


def _decode_estimate(node, config):
    p = dict(config.params)
    d = node.inputs[0].type.shape[3]
    d = d if isinstance(d, int) else 128
    bm, bn = p.get("MAX_BLOCK_M", 64), p.get("BLOCK_N", 64)
    threads = 32 * config.num_warps
    regs = 32 + (bm * d + bm * bn) // threads
    return int(min(255, regs)), config.num_stages * bn * d * 2 * 2


def _is_triton_shared_prefix(node: Node, env) -> bool:
    """shared_prefix_attention that attention_glue.claim_shared_prefix runs on the split kernel (Hydragen)."""
    from lmforge.backends.triton import attention_glue

    return node.op == "shared_prefix_attention" and attention_glue.claim_shared_prefix(node, {}) is not None


def _prefix_dims(node, env):
    """(b, hq, sq, d, groups, hkv, prefix len, suffix len, q's bytes per element) of a shared-prefix node."""
    q, kp, _, ks = _shapes(node, env)[:4]
    b, hq, sq, d = q.shape
    g, hkv, p = kp.shape[:3]
    return b, hq, sq, d, g, hkv, p, ks.shape[2], _dtype_bytes(q)


def _prefix_rows(node, env) -> int:
    """Query rows of the prefix pass's M dimension: the B / G sequences x group x Sq that share one prefix."""
    b, hq, sq, d, g, hkv, *_ = _prefix_dims(node, env)
    return (b // g) * (hq // hkv) * sq


def _split_warps(cfg, block_m: int) -> int:
    """The warps attention_decode._launch_split runs: at least 8 for a tile of >= 64 query rows."""
    return max(cfg.num_warps, 8) if block_m >= 64 else cfg.num_warps


def _shared_prefix_launch(node, env, config, hw) -> Launch:
    """attention_decode.shared_prefix_decode: the prefix pass is the main kernel (grid G * Hkv x splits x row
    blocks, its M tile holds the query rows of every sequence that shares the prefix), then the per-sequence
    causal suffix pass and the merge (two extra launches; the suffix pass's geometry is not modelled, its
    bytes are in the op's registry cost). The registry cost reads each prefix once; a prefix pass of several
    row blocks (more rows than MAX_BLOCK_M) reads it once per row block, and the splits' partials are written
    and read back: both are extra traffic, which is what MAX_BLOCK_M and BLOCK_N trade against parallelism."""
    from lmforge.backends.triton import attention_decode as ad

    b, hq, sq, d, g, hkv, p, s, xb = _prefix_dims(node, env)
    params, cfg = ad._config(config)
    block_n = params["BLOCK_N"]
    rows = _prefix_rows(node, env)
    block_m = ad._row_block(rows, params["MAX_BLOCK_M"])
    row_blocks = math.ceil(rows / block_m)
    p_tiles = math.ceil(p / block_n)
    p_splits = _split_count(p_tiles, g * hkv * row_blocks, hw)
    s_splits = _split_count(math.ceil(s / block_n), b * hkv, hw)
    prefix_bytes = g * hkv * p * d * 2 * xb
    partials = b * hq * sq * (p_splits + s_splits) * (d + 1) * 4 * 2   # written by the splits, read by the merge
    return Launch(ctas=g * hkv * max(1, p_splits) * row_blocks, threads=32 * _split_warps(cfg, block_m),
                  bytes_in_flight=cfg.num_stages * block_n * d * 2 * xb,
                  pad=rows / (row_blocks * block_m) * (p / (p_tiles * block_n) if p_tiles else 1.0),
                  extra_bytes=(row_blocks - 1) * prefix_bytes + partials, extra_launches=2)


def _shared_prefix_estimate(node, config):
    """_decode_estimate for the prefix pass's tile: BLOCK_M from the rows when the batch is static (else the
    largest, MAX_BLOCK_M), with the launcher's warps for it."""
    from lmforge.backends.triton import attention_decode as ad

    params, cfg = ad._config(config)
    (b, hq, sq, d), (g, hkv) = node.inputs[0].type.shape, node.inputs[1].type.shape[:2]
    d = d if isinstance(d, int) else 128
    dims = (b, hq, sq, g, hkv)
    rows = (b // g) * (hq // hkv) * sq if all(isinstance(x, int) for x in dims) else params["MAX_BLOCK_M"]
    bm, bn = ad._row_block(rows, params["MAX_BLOCK_M"]), params["BLOCK_N"]
    regs = 32 + (bm * d + bm * bn) // (32 * _split_warps(cfg, bm))
    return int(min(255, regs)), cfg.num_stages * bn * d * 2 * 2


def _decode_rows(node, env) -> int:
    """Query rows per KV head of a decode step (the split kernel's M dimension)."""
    b, hq, sq, d, hkv, s, xb = _attn_dims(node, env)
    return (hq // hkv) * sq


def _attention_spec(kernel: str, knob: str, rows_of: Callable | None = None, key: str | None = None):
    """The AOT spec of an attention template's main kernel (decode: the split-K kernel, "decode_split";
    prefill: the flash kernel, "flash_prefill"; shared prefix: the split kernel's prefix pass, variant key
    "prefix.split"), taken from the artifact launch specs (`lmforge.backends.triton.attention_specs`), so the
    search prices the very build an artifact ships. rows_of(node, env): the split kernel's query rows, which
    fix the BLOCK_M the launcher picks; key: the launch spec's variant (or its `<key>.m<BLOCK_M>` family).

    The launcher turns a candidate config into what runs (block top-k clamps BLOCK_N to the block size, a
    query tile of >= 64 rows takes >= 8 warps, the decode's BLOCK_M follows MAX_BLOCK_M and the query rows per KV
    head); the spec's `adapt` replays that through the launch spec's own variants. None (so an estimate) when
    the launch spec cannot serve the node (an explicit mask, a quantized KV cache, a symbolic head dim, ...).
    """
    def spec(node, env, config=None):
        from lmforge.backends.triton import attention_decode as ad
        from lmforge.backends.triton.aot import KernelSpec
        from lmforge.backends.triton.launch_specs import Unservable, spec_for

        try:
            launch_spec = spec_for(node)
        except Unservable:
            return None
        kernel_name = "block_sparse_prefill" if node.op == "block_sparse_attention" else kernel
        rows = None if rows_of is None else rows_of(node, env)

        def variant(config):
            try:
                found = [v for v in launch_spec.variants(node, {knob: config}) if v.kernel == kernel_name
                         and (key is None or v.key == key or v.key.startswith(f"{key}.m"))]
            except Unservable:
                return None
            if rows is not None:  # the BLOCK_M the launcher picks for this node's query rows
                block_m = ad._row_block(rows, ad._config(config)[0]["MAX_BLOCK_M"])
                found = [v for v in found if v.constexprs["BLOCK_M"] == block_m]
            return found[0] if found else None

        default = variant(None)
        if default is None:
            return None

        def adapt(config):
            v = variant(config)
            if v is None:
                from lmforge.errors import LmforgeError

                raise LmforgeError(f"{knob} config {config} has no {kernel_name} launch for this {node.op} node; "
                                   "use one of the template's candidate configs")
            # BLOCK_M goes into the config (config params win over the spec's constexprs at build time)
            return v.config.with_(BLOCK_M=v.constexprs["BLOCK_M"]) if rows is not None else v.config

        name = kernel_name if key is None else key.replace(".", "_")
        return KernelSpec(f"{node.op}_{name}", default.fn, default.signature, default.constexprs,
                          default.config, default.divisible_by_16, adapt=adapt)

    return spec


def _prefill_configs(node):
    from lmforge.backends.triton import attention_prefill as ap

    d = node.inputs[0].type.shape[3]
    default = ap.default_config(_torch_dtype(node.inputs[0].type.dtype), d if isinstance(d, int) else 128)
    return (default,) + tuple(c for c in ap.CANDIDATE_CONFIGS if c != default)


def _prefill_launch(node, env, config, hw) -> Launch:
    b, hq, sq, d, hkv, s, xb = _attn_dims(node, env)
    bm, bn = config.get("BLOCK_M"), config.get("BLOCK_N")
    a = node.attr
    if node.op == "block_sparse_attention":   # tiles clamped to the block size; the kept blocks are whole tiles
        bm, bn = min(bm, a["block_size"]), min(bn, a["block_size"])
        keys = s
    else:
        keys = min(s, (a["window"] or s) + (a["sinks"] or 0))
    tm = math.ceil(sq / bm)
    return Launch(ctas=b * hq * tm, threads=32 * config.num_warps,
                  bytes_in_flight=config.num_stages * bn * d * 2 * xb,
                  pad=sq / (tm * bm) * keys / (math.ceil(keys / bn) * bn))


def _prefill_estimate(node, config):
    p = dict(config.params)
    d = node.inputs[0].type.shape[3]
    d = d if isinstance(d, int) else 128
    threads = 32 * config.num_warps
    regs = 32 + (p["BLOCK_M"] * d + p["BLOCK_M"] * p["BLOCK_N"]) // threads
    return int(min(255, regs)), (p["BLOCK_M"] * d + config.num_stages * 2 * p["BLOCK_N"] * d) * 2


def _candidates(module: str, key: str | None = None):
    def configs(node):
        import importlib

        mod = importlib.import_module(f"lmforge.backends.triton.{module}")
        got = mod.CANDIDATE_CONFIGS if key is None else mod.CANDIDATE_CONFIGS[key]
        return tuple(got)

    return configs


def templates() -> list[KernelTemplate]:
    """Every Triton kernel template the model knows, in claim order (the first that claims a node runs it)."""
    rows = [KernelTemplate(op, _row_kernel(op), _candidates("norms", op), _row_launch(op), _row_estimate,
                           _row_spec(op)) for op in ("rmsnorm", "layernorm", "softmax")]
    return [
        KernelTemplate("wo_gemv", _claims_gemv, _candidates("quant_matmul", "wo_gemv"), _gemv_launch,
                       _gemv_estimate, _wo_spec("wo_gemv")),
        KernelTemplate("wo_gemm", _claims_gemm, _candidates("quant_matmul", "wo_gemm"), _gemm_launch,
                       _gemm_estimate, _wo_spec("wo_gemm")),
        *rows,
        KernelTemplate("swiglu", _claims_fused("swiglu"), _candidates("norms", "swiglu"), _swiglu_launch,
                       lambda node, config: (32, 0), _swiglu_spec),
        KernelTemplate("elementwise", _claims_fused("elementwise"), _candidates("elementwise", "elementwise"),
                       _elementwise_launch, lambda node, config: (32, 0), _elementwise_spec),
        KernelTemplate("attention_decode", _is_triton_decode, _candidates("attention_decode"), _decode_launch,
                       _decode_estimate, _attention_spec("decode_split", "attention_decode", _decode_rows)),
        KernelTemplate("attention_shared_prefix", _is_triton_shared_prefix, _candidates("attention_decode"),
                       _shared_prefix_launch, _shared_prefix_estimate,
                       _attention_spec("decode_split", "attention_shared_prefix", _prefix_rows, "prefix.split")),
        KernelTemplate("attention_prefill", _is_triton_prefill, _prefill_configs, _prefill_launch,
                       _prefill_estimate, _attention_spec("flash_prefill", "attention_prefill")),
    ]


def claimed(graph: Graph, env: Mapping[str, int], temps: Sequence[KernelTemplate] | None = None
            ) -> dict[int, KernelTemplate]:
    """Node index -> the template that runs it (nodes no template claims are left out)."""
    out = {}
    for i, n in enumerate(graph.nodes):
        for t in temps or templates():
            try:
                ok = t.claims(n, env)
            except (KeyError, TypeError, ValueError):  # an attribute or shape the template does not handle
                ok = False
            if ok:
                out[i] = t
                break
    return out


