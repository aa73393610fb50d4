"""Neural-network ops: linear/matmul, embedding, norms, RoPE, attention, KV-cache update, top-k, sampling."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lmforge.errors import VerifyError
from lmforge.ir.cost import Cost
from lmforge.ir.ops.registry import OpDef, attr, broadcast_shapes, dims_conflict, nbytes, numel, streaming_cost
from lmforge.ir.types import TensorType


# ---- linear algebra -------------------------------------------------------------------------------------

def _linear_infer(ins, attrs):
    x, w = ins[0], ins[1]
    if w.rank != 2:
        raise VerifyError(f"linear weight must be 2-D [out, in], got {w}")
    if dims_conflict(x.shape[-1], w.shape[1]):
        raise VerifyError(f"linear: input features {x.shape[-1]} != weight in-features {w.shape[1]}")
    if x.dtype != w.dtype:  # F.linear refuses mixed dtypes; a quantized weight goes through linear_wo
        raise VerifyError(f"linear: input {x} and weight {w} differ in dtype; cast one of them first")
    if len(ins) > 2 and ins[2] is not None:
        bias = ins[2]
        if bias.rank != 1 or dims_conflict(bias.shape[0], w.shape[0]) or bias.dtype != w.dtype:
            raise VerifyError(f"linear: bias {bias} must be 1-D with one {w.dtype} per output ({w.shape[0]})")
    return [x.with_(shape=(*x.shape[:-1], w.shape[0]))]


def _linear_ref(x, w, b=None):
    return F.linear(x, w, b)


def _linear_cost(ins, attrs, outs):
    x, w, b = (ins + [None])[:3]
    k, n = w.shape[1], w.shape[0]
    m = numel(x) // k
    return Cost.of(2.0 * m * n * k, nbytes(x, w, b, *outs), "matmul", x.dtype)


def _linear_wo_infer(ins, attrs):
    x, qweight, scales, zeros = ins[:4]
    k = qweight.shape[1] * 8 // attrs["bits"]
    if isinstance(x.shape[-1], int) and x.shape[-1] != k:
        raise VerifyError(f"linear_wo: input features {x.shape[-1]} != packed weight's {k}")
    if qweight.dtype != "uint8":
        raise VerifyError(f"linear_wo: qweight must be uint8, got {qweight.dtype}")
    return [x.with_(shape=(*x.shape[:-1], qweight.shape[0]))]


def _linear_wo_ref(x, qweight, scales, zeros, bias=None, *, bits, group_size):
    from lmforge.ir.ops.quant_ref import QuantizedWeight, linear_weight_only_ref

    n, k = qweight.shape[0], qweight.shape[1] * 8 // bits
    qw = QuantizedWeight(qweight=qweight, scales=scales, zeros=zeros, bits=bits, group_size=group_size, shape=(n, k))
    return linear_weight_only_ref(x, qw, bias)


def _linear_wo_cost(ins, attrs, outs):
    x, qweight = ins[0], ins[1]
    n, k = qweight.shape[0], qweight.shape[1] * 8 // attrs["bits"]
    m = numel(x) // k
    return Cost.of(2.0 * m * n * k, nbytes(*ins, *outs), "matmul", x.dtype)


def _merge_lse_infer(ins, attrs):
    if len(ins) % 2:
        raise VerifyError("merge_lse takes (out, lse) pairs")
    return [ins[0], ins[1]]


def _merge_lse_ref(*pairs):
    from lmforge.ir.ops.attention_ref import merge_lse_ref

    return merge_lse_ref(list(pairs[0::2]), list(pairs[1::2]))


def _matmul_infer(ins, attrs):
    a, b = ins
    if a.rank < 2 or b.rank < 2:
        raise VerifyError("matmul: both operands need rank >= 2 (1-D matmuls run as torch_fallback)")
    if dims_conflict(a.shape[-1], b.shape[-2]):
        raise VerifyError(f"matmul: {a} @ {b}: the inner dims {a.shape[-1]} and {b.shape[-2]} differ")
    if a.dtype != b.dtype:
        raise VerifyError(f"matmul: {a} @ {b}: the operands differ in dtype; cast one of them first")
    batch = broadcast_shapes(a.shape[:-2], b.shape[:-2])
    return [a.with_(shape=(*batch, a.shape[-2], b.shape[-1]))]


def _matmul_ref(a, b):
    return torch.matmul(a, b)


def _matmul_cost(ins, attrs, outs):
    a, b = ins
    out = outs[0]
    return Cost.of(2.0 * numel(out) * a.shape[-1], nbytes(a, b, out), "matmul", a.dtype)


def _embedding_infer(ins, attrs):
    ids, w = ins
    return [TensorType((*ids.shape, w.shape[1]), w.dtype)]


def _embedding_ref(ids, w):
    return F.embedding(ids, w)


def _embedding_cost(ins, attrs, outs):
    return Cost.of(0.0, nbytes(ins[0]) + 2 * nbytes(*outs), "gather", outs[0].dtype)


# ---- norms and RoPE --------------------------------------------------------------------------------------

def _norm_infer(ins, attrs):
    """x's type; the weight (and bias) must have the shape of x's last `ndim` dims, as torch's norms require."""
    x, ndim = ins[0], attrs["ndim"]
    if not 1 <= ndim <= x.rank:
        raise VerifyError(f"a norm over the last {ndim} dims of a rank-{x.rank} input")
    for p in ins[1:]:
        if p is not None and (p.rank != ndim or any(dims_conflict(a, b) for a, b in zip(p.shape, x.shape[-ndim:]))):
            raise VerifyError(f"a norm's weight / bias of shape {list(p.shape)} does not match the normalized "
                              f"shape {list(x.shape[-ndim:])}")
    return [x]


def _rmsnorm_ref(x, w=None, *, eps=None, ndim=1):
    return F.rms_norm(x, x.shape[-ndim:], w, eps)


def _layernorm_ref(x, w=None, b=None, *, eps=1e-5, ndim=1):
    return F.layer_norm(x, x.shape[-ndim:], w, b, eps)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope_infer(ins, attrs):
    x, cos, sin = ins
    return [x.with_(shape=broadcast_shapes(x.shape, cos.shape, sin.shape))]


def _rope_ref(x, cos, sin):
    return x * cos + rotate_half(x) * sin


# ---- attention -------------------------------------------------------------------------------------------

def _attention_infer(ins, attrs):
    q, k, v = ins[:3]
    if q.rank != 4 or k.rank != 4 or v.rank != 4:
        raise VerifyError(f"attention takes q, k, v as [batch, heads, seq, head_dim]; got {q}, {k}, {v}")
    hq, hk = q.shape[1], k.shape[1]
    if isinstance(hq, int) and isinstance(hk, int) and hq % hk:
        raise VerifyError(f"attention: {hq} query heads is not a multiple of {hk} KV heads (GQA)")
    # Static dims that contradict each other: the reference would fail or broadcast, the cost would use one of them.
    for what, i, j, x, y in (("batch", 0, 0, q, k), ("batch", 0, 0, k, v), ("head_dim", 3, 3, q, k),
                             ("heads", 1, 1, k, v), ("sequence length", 2, 2, k, v)):
        if dims_conflict(x.shape[i], y.shape[j]):
            names = {id(q): "q", id(k): "k", id(v): "v"}
            raise VerifyError(f"attention: {names[id(x)]} {x} and {names[id(y)]} {y} differ in {what} "
                              f"({x.shape[i]} vs {y.shape[j]})")
    out = q.with_(shape=(*q.shape[:3], v.shape[3]))
    if attrs["return_lse"]:
        return [out, TensorType(q.shape[:3], "float32")]
    return [out]


def _attention_ref(q, k, v, mask=None, *, causal=False, scale=None, window=None, sinks=0, q_offset=None,
                   return_lse=False, kv_dtype=None):
    plain = window is None and sinks == 0 and not return_lse and (
        not causal or q_offset == 0 or (q_offset is None and q.shape[2] == k.shape[2]))
    if mask is not None:
        if not plain:
            raise VerifyError("attention with an explicit mask takes no window/sinks/lse/q_offset")
        if causal:   # SDPA(is_causal=True, attn_mask=m) applies both (torch's default CPU kernel): so does this
            from lmforge.ir.ops.attention_ref import visibility_mask

            seen = visibility_mask(q.shape[2], k.shape[2], causal=True, q_offset=q_offset, device=q.device)
            mask = mask & seen if mask.dtype == torch.bool else mask.masked_fill(~seen, float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                              enable_gqa=q.shape[1] != k.shape[1])
    # torch's CPU SDPA returns NaN for causal attention with a scale <= 0 (torch 2.13): those go to attention_ref
    if plain and (scale is None or scale > 0):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                              enable_gqa=q.shape[1] != k.shape[1])
    from lmforge.ir.ops.attention_ref import attention_ref

    return attention_ref(q, k, v, causal=causal, scale=scale, window=window, sinks=sinks, q_offset=q_offset,
                         return_lse=return_lse)


def visible_keys(sq: int, skv: int, causal: bool, window, sinks: int, q_offset) -> float:
    """Number of (query, key) pairs attention computes, for the FLOP and eFLOP counts."""
    off = skv - sq if q_offset is None else q_offset
    if not causal:
        if window is None:
            return float(sq * skv)
        # without the causal rule a window only hides keys at or before p - window: later keys stay visible
        cuts = [max(0, min(skv, off + i - window + 1)) for i in range(sq)]
        return float(sum(skv - cut + min(sinks, cut) for cut in cuts))
    total = 0.0
    for i in range(sq):
        n = max(0, min(skv, off + i + 1))
        if window is not None:
            n = min(n, window + min(sinks, max(0, n - window)))
        total += n
    return total


def _attention_cost(ins, attrs, outs):
    q, k, v = ins[:3]
    b, hq, sq, d = q.shape
    skv = k.shape[2]
    pairs = visible_keys(sq, skv, attrs["causal"], attrs["window"], attrs["sinks"], attrs["q_offset"])
    flops = 2.0 * b * hq * pairs * (d + v.shape[3]) + 5.0 * b * hq * pairs
    # K/V are read once per KV head (GQA shares them). A window reads only the keys some query sees: sq consecutive
    # queries with `window` keys each see window + sq - 1 positions, plus the sinks.
    window = attrs["window"]
    if window is None:
        frac = 1.0
    elif attrs["causal"]:
        frac = min(1.0, (window + attrs["sinks"] + sq - 1) / max(skv, 1))
    else:   # the first query's window start bounds what any query reads; every later key is read
        off = skv - sq if attrs["q_offset"] is None else attrs["q_offset"]
        cut = max(0, min(skv, off - window + 1))
        frac = (skv - cut + min(attrs["sinks"], cut)) / max(skv, 1)
    return attention_cost(flops, q.dtype, nbytes(q, *outs, *(ins[3:])), k, frac * kv_bytes(k, v, attrs["kv_dtype"]))


def attention_cost(flops: float, dtype: str, other_bytes: float, k: TensorType, kv_read: float) -> Cost:
    """The Cost of an attention op: q, the outputs and masks move in device memory, K/V in the tier where the
    cache lives (its `memory_tier` annotation: "host" for a cache offloaded to host memory, read over the host
    link, as kv_cache_append charges the writes into it)."""
    tier = k.annotation("memory_tier", "dram")
    return Cost.of(flops, other_bytes, "attention", dtype) + Cost.of(0.0, kv_read, "attention", dtype, tier=tier)


def kv_bytes(k: TensorType, v: TensorType, kv_dtype: str | None) -> float:
    """Bytes of K and V as stored: in `kv_dtype` (1 byte for int8/fp8, plus one fp32 scale per token and head of
    each, as `kv_quantize_int8` / `kv_quantize_fp8` store them; int8 with kv_axis="head" stores one scale per head,
    and is charged the per-token scales all the same: ~1/head_dim more) when the KV cache is quantized, else in
    their own dtype."""
    if kv_dtype is None:
        return nbytes(k, v)
    from lmforge.ir.types import itemsize

    scales = 4 * (numel(k) // k.shape[-1] + numel(v) // v.shape[-1])
    return (numel(k) + numel(v)) * itemsize(kv_dtype) + scales


def _kv_update_infer(ins, attrs):
    return [ins[0]]


def _kv_update_ref(cache, new, *, dim, pos):
    out = cache.clone()
    out.narrow(dim, pos, new.shape[dim]).copy_(new)
    return out


def _kv_update_cost(ins, attrs, outs):
    # In a serving runtime the cache is updated in place: only the new entries are read and written.
    tier = ins[0].annotation("memory_tier", "dram")
    return Cost.of(0.0, 2 * nbytes(ins[1]), "data_movement", ins[1].dtype, tier=tier)


def _append_infer(ins, attrs):
    past, new = ins
    from lmforge.ir.types import simplify_dim

    d = attrs["dim"] % past.rank
    shape = list(past.shape)
    a, b = past.shape[d], new.shape[d]
    shape[d] = a + b if isinstance(a, int) and isinstance(b, int) else simplify_dim(f"({a}) + ({b})")
    return [past.with_(shape=tuple(shape))]


def _append_ref(past, new, *, dim):
    return torch.cat([past, new], dim)


def _append_cost(ins, attrs, outs):
    # A serving runtime appends into a preallocated cache: only the new entries are read and written.
    tier = ins[0].annotation("memory_tier", "dram")
    return Cost.of(0.0, 2 * nbytes(ins[1]), "data_movement", ins[1].dtype, tier=tier)


# ---- decoding helpers ------------------------------------------------------------------------------------

def _topk_infer(ins, attrs):
    x = ins[0]
    dim = attrs["dim"] % x.rank
    shape = tuple(attrs["k"] if i == dim else s for i, s in enumerate(x.shape))
    return [x.with_(shape=shape), TensorType(shape, "int64")]


def _topk_ref(x, *, k, dim=-1, largest=True):
    """Among equal values the lower index comes first (ONNX's TopK rule; torch.topk leaves ties in any order,
    and may even pick other tied elements at the k-th place), so a stable sort decides."""
    v, i = torch.sort(x, dim=dim, descending=largest, stable=True)
    return v.narrow(dim, 0, k), i.narrow(dim, 0, k)


def _sample_infer(ins, attrs):
    logits = ins[0]
    return [TensorType(logits.shape[:-1], "int64")]


def _sample_ref(logits, *, temperature=1.0, top_p=1.0, seed=0):
    """Temperature / nucleus sampling over the last dim; deterministic for a given seed."""
    if temperature == 0.0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, -1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p * keep)
    gen = torch.Generator(device=logits.device).manual_seed(int(seed))
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=gen).reshape(logits.shape[:-1])


def ops() -> list[OpDef]:
    norm_cost = streaming_cost(5, "norm")
    return [
        OpDef("linear", "y = x @ w.T + b, with w [out, in] a parameter and b optional.", {}, _linear_infer,
              _linear_ref, _linear_cost, arity=(2, 3), op_class="matmul"),
        OpDef("linear_wo", "Weight-only quantized linear: y = x @ dequant(W).T + b. W [N, K] is stored packed "
                           "(uint8 qweight [N, K*bits/8], scales/zeros [N, K/group_size]) in the layout of "
                           "onnxruntime's MatMulNBits; see lmforge.ir.ops.quant_ref.",
              {"bits": attr("int"), "group_size": attr("int")}, _linear_wo_infer, _linear_wo_ref, _linear_wo_cost,
              arity=(4, 5), op_class="matmul"),
        OpDef("merge_lse", "Exact merge of partial attentions (out_i, lse_i) over disjoint key sets by "
                           "log-sum-exp: the primitive of split-K decode, shared prefix and sparse + window.",
              {}, _merge_lse_infer, _merge_lse_ref, streaming_cost(6, "elementwise"), arity=(4, None),
              num_outputs=lambda a: 2),
        OpDef("matmul", "Batched matrix product a @ b (rank >= 2, batch dims broadcast).", {}, _matmul_infer,
              _matmul_ref, _matmul_cost, arity=(2, 2), op_class="matmul"),
        OpDef("embedding", "Rows of the table `weight` at the token ids.", {}, _embedding_infer, _embedding_ref,
              _embedding_cost, arity=(2, 2), op_class="gather"),
        OpDef("rmsnorm", "x / sqrt(mean(x^2 over the last `ndim` dims) + eps) * weight.",
              {"eps": attr("float", None), "ndim": attr("int", 1)}, _norm_infer, _rmsnorm_ref,
              norm_cost, arity=(1, 2), op_class="norm"),
        OpDef("layernorm", "(x - mean) / sqrt(var + eps) * weight + bias over the last `ndim` dims.",
              {"eps": attr("float", 1e-5), "ndim": attr("int", 1)}, _norm_infer, _layernorm_ref,
              norm_cost, arity=(1, 3), op_class="norm"),
        OpDef("rope", "Rotary embedding, rotate-half form: x * cos + rotate_half(x) * sin.", {}, _rope_infer,
              _rope_ref, streaming_cost(3, "elementwise"), arity=(3, 3)),
        OpDef("attention",
              "softmax(q k^T * scale + mask) v over [batch, heads, seq, head_dim]; GQA when q has a multiple of "
              "k's heads. `causal` aligns query i at key position q_offset + i (default Skv - Sq, so a decode "
              "step sees its whole KV cache); `window`/`sinks` restrict keys (StreamingLLM); `return_lse` adds "
              "the fp32 log-sum-exp [batch, heads, seq] as a second output.",
              {"causal": attr("bool", False), "scale": attr("float", None), "window": attr("int", None),
               "sinks": attr("int", 0), "q_offset": attr("dim", None), "return_lse": attr("bool", False),
               "kv_dtype": attr("dtype", None, "storage format of a quantized KV cache (cost only)")},
              _attention_infer, _attention_ref, _attention_cost, arity=(3, 4), op_class="attention",
              num_outputs=lambda a: 2 if a.get("return_lse") else 1),
        OpDef("kv_cache_update", "The cache with `new` written at positions pos.. along `dim` (functional).",
              {"dim": attr("int"), "pos": attr("dim")}, _kv_update_infer, _kv_update_ref, _kv_update_cost,
              arity=(2, 2), op_class="data_movement"),
        OpDef("kv_cache_append", "The KV cache grown by `new` along `dim` (functional; the torch reference "
                                 "concatenates, a serving runtime appends in place, which is what the cost charges).",
              {"dim": attr("int")}, _append_infer, _append_ref, _append_cost, arity=(2, 2), op_class="data_movement"),
        OpDef("topk", "The k largest (or smallest) values along `dim` and their indices.",
              {"k": attr("int"), "dim": attr("int", -1), "largest": attr("bool", True)}, _topk_infer, _topk_ref,
              lambda i, a, o: Cost.of(numel(i[0]), nbytes(i[0], *o), "reduction", i[0].dtype),
              op_class="reduction", num_outputs=lambda a: 2),
        OpDef("sample", "Draw token ids from logits: temperature (0 = greedy) and nucleus top_p, seeded.",
              {"temperature": attr("float", 1.0), "top_p": attr("float", 1.0), "seed": attr("int", 0)},
              _sample_infer, _sample_ref,
              lambda i, a, o: Cost.of(6 * numel(i[0]), nbytes(i[0], *o), "reduction", i[0].dtype),
              op_class="reduction"),
    ]
