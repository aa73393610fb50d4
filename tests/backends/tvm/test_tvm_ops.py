"""Every op the TVM backend lowers, against the torch reference, over tables of shapes (fp32; int8/int4 weights).

Each case builds a one-node graph, runs it through CompiledModel with [TVMBackend, TorchReference] (asserting
the node went to tvm) and compares with the same graph on the torch reference alone.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.backends.tvm.lower_elementwise import BINARY, ELEMENTWISE
from lmforge.ir.types import TensorType


def tol(k: int) -> dict:
    """fp32 tolerances for sums of k products of unit-scale values (reordered accumulation)."""
    return {"rtol": 1e-5, "atol": 2e-6 * max(k, 8)}


LINEAR_CASES = [  # x shape, out features, bias
    ((1, 1, 64), 48, False),     # one decode row: GEMV
    ((2, 1, 64), 14, True),      # odd out features, bias
    ((3, 40), 24, False),        # rank-2 input
    ((2, 13, 32), 24, True),     # 26 rows: GEMM over 24 rows + a 2-row GEMV tail
    ((17, 24), 100, False),      # GEMM; 100 columns in tiles of 50
]


@pytest.mark.parametrize("x_shape,n,bias", LINEAR_CASES)
def test_linear(tvm_backend, run_on_tvm, randn, x_shape, n, bias):
    k = x_shape[-1]
    x, w = randn(*x_shape, seed=1), randn(n, k, seed=2)
    b = randn(n, seed=3) if bias else None
    got, ref, _ = run_on_tvm(tvm_backend(), "linear", [x, w, b])
    torch.testing.assert_close(got, ref, **tol(k))


MATMUL_CASES = [
    ((1, 32), (32, 48)),                 # one row
    ((5, 3, 16), (16, 20)),              # 15 rows, batch dims flattened
    ((40, 24), (24, 32)),                # GEMM rows
    ((2, 3, 5, 16), (2, 3, 16, 7)),      # batched, equal batch dims
]


@pytest.mark.parametrize("a_shape,b_shape", MATMUL_CASES)
def test_matmul(tvm_backend, run_on_tvm, randn, a_shape, b_shape):
    a, b = randn(*a_shape, seed=4), randn(*b_shape, seed=5)
    got, ref, _ = run_on_tvm(tvm_backend(), "matmul", [a, b])
    torch.testing.assert_close(got, ref, **tol(a_shape[-1]))


QUANT_CASES = [  # bits, group size, x shape, symmetric
    (8, 32, (1, 1, 128), True),
    (8, 64, (3, 128), False),
    (8, 32, (2, 13, 128), True),     # GEMM path: dequantized panels
    (4, 32, (1, 1, 128), True),
    (4, 64, (2, 1, 128), False),
    (4, 128, (3, 128), True),
    (4, 32, (2, 13, 128), False),
]


@pytest.mark.parametrize("bits,group,x_shape,symmetric", QUANT_CASES)
def test_linear_weight_only(tvm_backend, run_on_tvm, randn, bits, group, x_shape, symmetric):
    quant_ref = pytest.importorskip("lmforge.ir.ops.quant_ref", reason="quant_ref (the int4/int8 layout) not present")
    qw = quant_ref.quantize_weight(randn(40, 128, seed=6), bits, group, symmetric=symmetric)
    x, b = randn(*x_shape, seed=7), randn(40, seed=8)
    got, ref, _ = run_on_tvm(tvm_backend(), "linear_wo", [x, qw.qweight, qw.scales, qw.zeros, b],
                             {"bits": bits, "group_size": group})
    torch.testing.assert_close(got, ref, **tol(128))
    torch.testing.assert_close(got, quant_ref.linear_weight_only_ref(x, qw, b), **tol(128))


def visible_mask(sq, skv, causal, window, sinks, q_offset):
    """The documented visibility rule of the attention op (see lmforge.ir.ops.nn_ops / attention_ref)."""
    pos = torch.arange(sq)[:, None] + (skv - sq if q_offset is None else q_offset)
    j = torch.arange(skv)[None, :]
    vis = torch.ones(sq, skv, dtype=torch.bool)
    if causal:
        vis &= j <= pos
    if window is not None:
        vis &= (pos - j < window) | (j < sinks)
    return vis


def attention_expected(q, k, v, causal=False, scale=None, window=None, sinks=0, q_offset=None, return_lse=False):
    """The registry reference when it can run these attrs here; else SDPA with the explicit visibility mask."""
    try:
        import lmforge.ir.ops.attention_ref  # noqa: F401
    except ImportError:
        pass
    else:
        from lmforge.ir.ops import get_op

        return get_op("attention").reference(q, k, v, causal=causal, scale=scale, window=window, sinks=sinks,
                                             q_offset=q_offset, return_lse=return_lse)
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = q @ k.transpose(-1, -2) * (scale or 1 / math.sqrt(q.shape[-1]))
    scores = scores.masked_fill(~visible_mask(q.shape[2], k.shape[2], causal, window, sinks, q_offset), -math.inf)
    out = torch.softmax(scores, -1).nan_to_num(0.0) @ v
    return (out, torch.logsumexp(scores, -1)) if return_lse else out


ATTENTION_CASES = [  # q shape, k shape (v like k), attrs
    ((2, 4, 1, 16), (2, 2, 9, 16), {}),                                     # dense decode, GQA
    ((1, 4, 5, 32), (1, 4, 5, 32), {"causal": True}),                       # causal prefill
    ((2, 4, 1, 16), (2, 2, 7, 16), {"causal": True}),                       # decode over a KV cache
    ((1, 4, 3, 16), (1, 1, 8, 16), {"causal": True, "scale": 0.3}),         # chunk at the cache end, MQA
    ((1, 2, 6, 8), (1, 2, 10, 8), {"causal": True, "window": 3, "sinks": 2}),   # StreamingLLM
    ((1, 2, 4, 16), (1, 1, 9, 16), {"causal": True, "q_offset": 2}),        # explicit query position
    ((1, 2, 3, 16), (1, 2, 5, 16), {"causal": True, "return_lse": True}),
    ((1, 2, 4, 16), (1, 2, 6, 16), {"causal": True, "q_offset": -2, "return_lse": True}),  # rows seeing no key
]


@pytest.mark.parametrize("q_shape,k_shape,attrs", ATTENTION_CASES)
def test_attention(tvm_backend, single_op_graph, randn, q_shape, k_shape, attrs):
    from lmforge.backends.torch import TorchReference
    from lmforge.compiler import CompiledModel

    q, k, v = randn(*q_shape, seed=9), randn(*k_shape, seed=10), randn(*k_shape, seed=11)
    compiled = CompiledModel(single_op_graph("attention", [q, k, v], attrs), backends=[tvm_backend(), TorchReference()])
    assert compiled.kernels[0].backend == "tvm"
    got = compiled(q, k, v)
    want = attention_expected(q, k, v, **attrs)
    for g, w in zip(*((got, want) if attrs.get("return_lse") else ((got,), (want,)))):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


TILED_CASES = [  # q shape, k shape, attrs, (rows, keys), the builds that run: prefill shapes that take the tiled path
    ((1, 4, 16, 32), (1, 4, 16, 32), {"causal": True}, (16, 4), {"tiled"}),         # whole tiles of rows and keys
    ((2, 4, 37, 16), (2, 2, 45, 16), {"causal": True}, (16, 4), {"tiled"}),         # ragged both ways, GQA, offset 8
    ((1, 4, 13, 16), (1, 1, 13, 16), {"causal": True, "window": 5, "sinks": 2}, (4, 2), {"tiled_window"}),  # MQA
    ((1, 2, 9, 16), (1, 2, 11, 16), {}, (8, 8), {"tiled"}),                          # dense (not causal), one key tile
    ((1, 2, 10, 16), (1, 2, 14, 16), {"causal": True, "q_offset": -3, "return_lse": True}, (4, 4), {"tiled"}),
    # causal in chunks of 8 query tiles (16 queries), each scanning the key tiles up to its last query
    ((2, 4, 43, 16), (2, 2, 50, 16), {"causal": True, "return_lse": True}, (2, 4), {"tiled"}),
    # window + sinks: sink tiles then the window's tiles (sinks and window not multiples of the key tile)
    ((1, 4, 40, 16), (1, 2, 47, 16), {"causal": True, "window": 7, "sinks": 3, "return_lse": True}, (4, 2),
     {"tiled_window"}),
    ((2, 2, 33, 8), (2, 2, 33, 8), {"causal": True, "window": 6}, (2, 4), {"tiled_window"}),   # no sinks
    ((1, 2, 21, 8), (1, 2, 30, 8), {"causal": True, "window": 4, "sinks": 1, "q_offset": 2}, (4, 4),
     {"tiled_window"}),                                                         # queries before the cache's end
    ((1, 2, 12, 8), (1, 2, 12, 8), {"causal": True, "window": 20, "sinks": 2}, (4, 4), {"tiled"}),  # window > Skv
]


@pytest.mark.parametrize("q_shape,k_shape,attrs,tiles,builds", TILED_CASES)
def test_tiled_prefill_attention(tvm_backend, single_op_graph, randn, monkeypatch, q_shape, k_shape, attrs, tiles,
                                  builds):
    """With at least `tvm.attention.rows` queries the tiled builds run (queries and keys padded to whole tiles, the
    real lengths as scalars; causal in chunks of query tiles, 16 queries here so that these shapes take several; a
    window scanned without the keys it cannot see) and equal the reference."""
    from lmforge.backends.torch import TorchReference
    from lmforge.backends.tvm import lower_attention
    from lmforge.compiler import CompiledModel

    monkeypatch.setattr(lower_attention, "CHUNK_QUERIES", 16)
    q, k, v = randn(*q_shape, seed=19), randn(*k_shape, seed=20), randn(*k_shape, seed=21)
    backend = tvm_backend({"tvm.attention.rows": tiles[0], "tvm.attention.keys": tiles[1]})
    compiled = CompiledModel(single_op_graph("attention", [q, k, v], attrs), backends=[backend, TorchReference()])
    got = compiled(q, k, v)
    kernel = compiled.kernels[0].fn
    assert set(kernel._fns) == builds and None not in kernel._fns.values() and not kernel.failures
    want = attention_expected(q, k, v, **attrs)
    for g, w in zip(*((got, want) if attrs.get("return_lse") else ((got,), (want,)))):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_causal_prefill_chunks_scan_only_visible_key_tiles(tvm_backend, single_op_graph, randn, monkeypatch):
    """A causal prefill runs in chunks of CHUNK_QUERIES queries, and each chunk's call scans the key tiles up to its
    last query only (the work skipped is the masked upper half); a block-sparse prefill's chunks scan as many slots
    as their densest query block keeps."""
    from lmforge.backends.torch import TorchReference
    from lmforge.backends.tvm import lower_attention
    from lmforge.compiler import CompiledModel
    from lmforge.ir.ops import get_op

    monkeypatch.setattr(lower_attention, "CHUNK_QUERIES", 16)
    q, k, v = randn(1, 2, 64, 8, seed=1), randn(1, 2, 64, 8, seed=2), randn(1, 2, 64, 8, seed=3)
    backend = tvm_backend({"tvm.attention.rows": 4, "tvm.attention.keys": 4})

    def recorded(kernel, variant):   # the arguments of every call of the kernel's build `variant`
        calls, fn = [], kernel.fn(variant)

        def record(*args):
            calls.append(args)
            return fn(*args)
        kernel._fns[variant] = record
        return calls

    compiled = CompiledModel(single_op_graph("attention", [q, k, v], {"causal": True}),
                             backends=[backend, TorchReference()])
    calls = recorded(compiled.kernels[0].fn, "tiled")
    torch.testing.assert_close(compiled(q, k, v), attention_expected(q, k, v, causal=True), rtol=1e-5, atol=1e-5)
    assert [(int(c[6]), int(c[7])) for c in calls] == [(0, 4), (4, 8), (8, 12), (12, 16)]  # (tile0, n_scan)

    nb = 64 // 8
    mask = torch.zeros(1, 2, nb, nb, dtype=torch.bool)
    mask[:, :, :, 0] = True                          # a sink block everywhere, the diagonal in the last query block
    mask[:, 1, 7, 7] = True
    compiled = CompiledModel(single_op_graph("block_sparse_attention", [q, k, v, mask], {"block_size": 8}),
                             backends=[backend, TorchReference()])
    calls = recorded(compiled.kernels[0].fn, "tiled")
    head_calls = recorded(compiled.kernels[0].fn, "tiled_head")
    want = get_op("block_sparse_attention").reference(q, k, v, mask, block_size=8)
    torch.testing.assert_close(compiled(q, k, v, mask), want, rtol=1e-5, atol=1e-5)
    assert [(int(c[7]), int(c[8])) for c in calls] == [(0, 2), (4, 2), (8, 2)]  # 2 key tiles per block
    # the last chunk's heads keep 1 and 2 blocks: one call per head, each scanning its own
    assert [(int(c[7]), int(c[8])) for c in head_calls] == [(12, 2), (12, 4)]


WINDOW_DECODE_CASES = [  # q shape, k shape, attrs: caches longer than sinks + window take the windowed row build
    ((2, 4, 1, 16), (2, 2, 40, 16), {"causal": True, "window": 8, "sinks": 4}),             # decode, GQA
    ((1, 2, 1, 16), (1, 2, 23, 16), {"causal": True, "window": 5, "return_lse": True}),     # no sinks
    ((1, 2, 3, 8), (1, 1, 30, 8), {"causal": True, "window": 4, "sinks": 2, "q_offset": 1}),  # sinks past the query
    ((1, 2, 2, 8), (1, 2, 12, 8), {"causal": True, "window": 3, "sinks": 2, "q_offset": -1, "return_lse": True}),
]


@pytest.mark.parametrize("q_shape,k_shape,attrs", WINDOW_DECODE_CASES)
def test_windowed_decode_attention(tvm_backend, single_op_graph, randn, q_shape, k_shape, attrs):
    """A decode step with a window over a long cache reads sinks + window keys per row (the "window" build) and
    equals the reference; a cache no longer than sinks + window takes the plain row build."""
    from lmforge.backends.torch import TorchReference
    from lmforge.compiler import CompiledModel

    q, k, v = randn(*q_shape, seed=29), randn(*k_shape, seed=30), randn(*k_shape, seed=31)
    kv_type = TensorType((k_shape[0], k_shape[1], "kv", k_shape[3]))
    graph = single_op_graph("attention", [q, k, v], attrs, types=[TensorType.of(q), kv_type, kv_type])
    compiled = CompiledModel(graph, backends=[tvm_backend(), TorchReference()])
    kernel = compiled.kernels[0].fn
    for keys in (k_shape[2], attrs["window"] + attrs.get("sinks", 0)):
        kk, vv = k[:, :, :keys].contiguous(), v[:, :, :keys].contiguous()
        got, want = compiled(q, kk, vv), attention_expected(q, kk, vv, **attrs)
        for g, w in zip(*((got, want) if attrs.get("return_lse") else ((got,), (want,)))):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    assert set(kernel._fns) == {0, "window"} and None not in kernel._fns.values() and not kernel.failures


@pytest.mark.parametrize("rows", [16, 4])   # 4 rows: the tiled build (q_offset as a scalar argument there too)
def test_attention_symbolic_cache_length_and_offset(tvm_backend, single_op_graph, randn, rows):
    """One build serves every cache length; a symbolic q_offset ("kv - 6") is evaluated per call."""
    q = randn(1, 2, 4, 16, seed=12)
    kv_type = TensorType((1, 2, "kv", 16))
    backend = tvm_backend({"tvm.attention.rows": rows})
    from lmforge.backends.torch import TorchReference
    from lmforge.compiler import CompiledModel

    graph = single_op_graph("attention", [q, q, q], {"causal": True, "q_offset": "kv - 6"},
                            types=[TensorType.of(q), kv_type, kv_type])
    compiled = CompiledModel(graph, backends=[backend, TorchReference()])
    kernel = compiled.kernels[0].fn
    for kv in (9, 12):
        k, v = randn(1, 2, kv, 16, seed=kv), randn(1, 2, kv, 16, seed=kv + 1)
        want = attention_expected(q, k, v, causal=True, q_offset=kv - 6)
        torch.testing.assert_close(compiled(q, k, v), want, rtol=1e-5, atol=1e-5)
    assert len(kernel._fns) == 1 and not kernel.failures


BLOCK_SPARSE_CASES = [  # q shape, k shape, mask heads, block size, keep probability
    ((1, 2, 8, 16), (1, 2, 8, 16), 2, 4, 0.5),        # prefill, mask per query head
    ((2, 4, 11, 16), (2, 2, 11, 16), 2, 4, 0.6),      # GQA, mask per KV head, ragged last block
    ((1, 4, 6, 8), (1, 1, 13, 8), 4, 3, 0.4),         # a chunk at the end of a longer cache (q_offset 7), MQA
    ((1, 2, 9, 16), (1, 2, 9, 16), 2, 2, 0.0),        # nothing kept: every row is empty -> zeros
]


@pytest.mark.parametrize("q_shape,k_shape,hm,bs,keep", BLOCK_SPARSE_CASES + [
    ((1, 2, 19, 16), (1, 2, 19, 16), 2, 8, 0.5),       # tiles of 4 rows x 2 keys inside blocks of 8, ragged
    ((2, 4, 16, 16), (2, 2, 23, 16), 2, 4, 0.6),       # tiles of 4 x 2 in blocks of 4, GQA, a chunk at the end
    ((1, 2, 8, 16), (1, 2, 8, 16), 2, 4, 0.0),         # tiled, nothing kept: zeros
])
def test_block_sparse_attention(tvm_backend, run_on_tvm, randn, monkeypatch, q_shape, k_shape, hm, bs, keep):
    """Visits only the listed key blocks and matches the reference (which masks the dense scores); with tiles that
    divide the block size (4 rows x 2 keys here) the tiled build runs, in chunks of 8 queries here (each chunk
    scans as many key tiles as its densest query block keeps)."""
    from lmforge.backends.tvm import lower_attention

    monkeypatch.setattr(lower_attention, "CHUNK_QUERIES", 8)
    q, k, v = randn(*q_shape, seed=21), randn(*k_shape, seed=22), randn(*k_shape, seed=23)
    nq, nk = -(-q_shape[2] // bs), -(-k_shape[2] // bs)
    g = torch.Generator().manual_seed(24)
    mask = torch.rand(q_shape[0], hm, nq, nk, generator=g) < keep
    backend = tvm_backend({"tvm.attention.rows": 4, "tvm.attention.keys": 2})
    got, want, compiled = run_on_tvm(backend, "block_sparse_attention", [q, k, v, mask], {"block_size": bs})
    tiled = bs % 4 == 0 and q_shape[2] >= 4
    assert ("tiled" in compiled.kernels[0].fn._fns) == tiled
    torch.testing.assert_close(got[0] if isinstance(got, tuple) else got, want[0] if isinstance(want, tuple)
                               else want, rtol=1e-5, atol=1e-5)
    assert not compiled.kernels[0].fn.failures                   # the TVM build ran, not the fallback
    blocks, counts = compiled.kernels[0].fn.block_lists(mask)
    assert blocks.shape[-1] == max(1, int(mask.sum(-1).max()))    # the kernel's key extent is the densest row's
    assert torch.equal(counts, mask.sum(-1).int())
    if keep == 0.0:
        assert torch.count_nonzero(got[0] if isinstance(got, tuple) else got) == 0


@pytest.mark.parametrize("b,hq,hkv,hm", [(2, 4, 2, 2), (1, 4, 2, 4), (2, 2, 2, 2)])
def test_block_sparse_heads_of_different_density_scan_their_own_blocks(tvm_backend, run_on_tvm, randn, monkeypatch,
                                                                       b, hq, hkv, hm):
    """When the mask heads keep very different numbers of blocks (FlexPrefill: vertical-slash vs query-aware
    heads), a chunk runs one call per (batch row, mask head), each scanning only its own kept blocks; outputs
    match the reference for GQA with the mask per KV head or per query head."""
    from lmforge.backends.tvm import lower_attention

    monkeypatch.setattr(lower_attention, "CHUNK_QUERIES", 8)
    s, bs = 37, 8
    q, k, v = randn(b, hq, s, 16, seed=31), randn(b, hkv, s, 16, seed=32), randn(b, hkv, s, 16, seed=33)
    n = -(-s // bs)
    mask = torch.zeros(b, hm, n, n, dtype=torch.bool)
    mask[:, 0] = torch.ones(n, n, dtype=torch.bool).tril()        # a dense head
    mask[:, 1:] |= torch.eye(n, dtype=torch.bool)                  # sparse heads: diagonal + sink
    mask[:, 1:, :, 0] = True
    backend = tvm_backend({"tvm.attention.rows": 4, "tvm.attention.keys": 2})
    calls = []
    real = lower_attention.BlockSparseAttentionKernel._per_head
    monkeypatch.setattr(lower_attention.BlockSparseAttentionKernel, "_per_head",
                        lambda self, *a: calls.append(a[7]) or real(self, *a))
    got, want, compiled = run_on_tvm(backend, "block_sparse_attention", [q, k, v, mask], {"block_size": bs})
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    kernel = compiled.kernels[0].fn
    assert "tiled_head" in kernel._fns and not kernel.failures
    assert calls, "no chunk took the per-head path"


ROWWISE_CASES = [  # op, input shapes, attrs
    ("rmsnorm", [(2, 1, 64), (64,)], {"eps": 1e-5}),
    ("rmsnorm", [(3, 5, 48)], {}),                      # no weight, eps = finfo.eps
    ("rmsnorm", [(4, 20), (20,)], {"eps": 1e-6}),       # 20 lanes split as 2 x 10
    ("softmax", [(2, 3, 17)], {"dim": -1}),
    ("softmax", [(4, 32)], {"dim": 1, "log": True}),
    ("rope", [(2, 4, 3, 16), (3, 16), (3, 16)], {}),
    ("rope", [(1, 2, 5, 8), (1, 1, 5, 8), (1, 1, 5, 8)], {}),
]


@pytest.mark.parametrize("op,shapes,attrs", ROWWISE_CASES)
def test_rowwise(tvm_backend, run_on_tvm, randn, op, shapes, attrs):
    inputs = [randn(*s, seed=20 + i) for i, s in enumerate(shapes)]
    got, ref, _ = run_on_tvm(tvm_backend(), op, inputs, attrs)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ids_shape", [(2, 3), (5,)])
def test_embedding(tvm_backend, run_on_tvm, randn, ids_shape):
    ids = torch.randint(0, 11, ids_shape, generator=torch.Generator().manual_seed(30))
    got, ref, _ = run_on_tvm(tvm_backend(), "embedding", [ids, randn(11, 24, seed=31)])
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


def _elementwise_inputs(op, randn):
    x = randn(2, 3, 40, seed=40)
    positive = x.abs() + 0.5
    if op in ("log", "sqrt", "rsqrt", "pow_scalar"):
        return [positive], ({"exponent": 2.5} if op == "pow_scalar" else {})
    if op == "cast":
        return [x], {"dtype": "float32"}
    if op == "gelu":
        return [x], {"approximate": "tanh"}
    if op in BINARY:
        y = randn(40, seed=41)  # broadcast along the leading axes
        return ([positive, y], {}) if op == "pow" else ([x, y], {})
    return [x], {}


@pytest.mark.parametrize("op", sorted(ELEMENTWISE))
def test_elementwise_op(tvm_backend, run_on_tvm, randn, op):
    inputs, attrs = _elementwise_inputs(op, randn)
    got, ref, _ = run_on_tvm(tvm_backend(), op, inputs, attrs)
    torch.testing.assert_close(got, ref, rtol=2e-6, atol=2e-6)


SCALAR_CASES = [("add", {"scalar": 0.5, "alpha": 2.0}), ("sub", {"scalar": 3, "swap": True}),
                ("div", {"scalar": 2.0, "swap": True}), ("pow", {"scalar": 2.0}), ("mul", {"scalar": -1.5})]


@pytest.mark.parametrize("op,attrs", SCALAR_CASES)
def test_elementwise_scalar_operand(tvm_backend, run_on_tvm, randn, op, attrs):
    got, ref, _ = run_on_tvm(tvm_backend(), op, [randn(3, 16, seed=42), None], attrs)
    torch.testing.assert_close(got, ref, rtol=2e-6, atol=2e-6)


def test_fused_region_is_one_kernel(tvm_backend, randn):
    """A SwiGLU + residual chain grouped by fuse_elementwise runs as one tvm node with the region inlined."""
    from lmforge.backends.torch import TorchReference
    from lmforge.compiler import CompiledModel
    from lmforge.ir.graph import GraphBuilder
    from lmforge.passes import fuse_elementwise

    b = GraphBuilder("swiglu")
    gate, up = b.input("gate", TensorType((2, 1, 48))), b.input("up", TensorType((2, 1, 48)))
    bias = b.input("bias", TensorType((48,)))
    h = b.op("mul", [b.op("silu", [gate]), up])
    y = b.op("mul", [b.op("add", [h, bias]), None], {"scalar": 0.5})
    graph = fuse_elementwise(b.build([y]))
    assert [n.op for n in graph.nodes] == ["fused"]
    inputs = [randn(2, 1, 48, seed=50), randn(2, 1, 48, seed=51), randn(48, seed=52)]
    compiled = CompiledModel(graph, backends=[tvm_backend(), TorchReference()])
    assert compiled.kernels[0].backend == "tvm" and "fused[silu,mul,add,mul]" in compiled.kernels[0].detail
    want = CompiledModel(graph, backends=[TorchReference()])(*inputs)
    torch.testing.assert_close(compiled(*inputs), want, rtol=2e-6, atol=2e-6)


def test_symbolic_rows_share_one_build(tvm_backend, single_op_graph, randn, build_cache):
    """rmsnorm over [batch, seq, H]: one build runs every (batch, seq)."""
    from lmforge.backends.torch import TorchReference
    from lmforge.compiler import CompiledModel

    w = randn(32, seed=60)
    graph = single_op_graph("rmsnorm", [randn(1, 1, 32), w], {"eps": 1e-5},
                            types=[TensorType(("batch", "seq", 32)), TensorType((32,))])
    compiled = CompiledModel(graph, backends=[tvm_backend(), TorchReference()])
    builds = None
    for shape in ((1, 1), (3, 7), (2, 5)):
        x = randn(*shape, 32, seed=sum(shape))
        torch.testing.assert_close(compiled(x, w), F.rms_norm(x, (32,), w, 1e-5), rtol=1e-5, atol=1e-5)
        builds = build_cache.stats.builds if builds is None else builds
    assert build_cache.stats.builds == builds


def test_non_contiguous_and_unaligned_inputs(tvm_backend, run_on_tvm, randn):
    """Views TVM cannot read in place (transposed, offset by one float) are copied, not misread."""
    base = randn(65 * 3, seed=70)
    x_unaligned = base[1:1 + 64 * 3].view(3, 64)
    x_transposed = randn(64, 3, seed=71).t()
    w = randn(16, 64, seed=72)
    for x in (x_unaligned, x_transposed):
        got, ref, compiled = run_on_tvm(tvm_backend(), "linear", [x.contiguous(), w, None])
        torch.testing.assert_close(compiled.kernels[0].fn(x, w, None), ref, **tol(64))


def test_claims_only_what_it_lowers(tvm_backend, single_op_graph, randn):
    backend = tvm_backend()
    fp64 = single_op_graph("linear", [randn(2, 8).double(), randn(4, 8).double(), None])
    assert backend.claim(fp64.nodes[0], "cpu") is None
    q = randn(1, 2, 3, 8)
    masked = single_op_graph("attention", [q, q, q, torch.zeros(3, 3)])
    assert backend.claim(masked.nodes[0], "cpu") is None
    plain = single_op_graph("linear", [randn(2, 8), randn(4, 8), None])
    assert backend.claim(plain.nodes[0], "cuda") is None
    assert tvm_backend(ops={"rmsnorm"}).claim(plain.nodes[0], "cpu") is None
    kernel = backend.claim(plain.nodes[0], "cpu")
    assert kernel.backend == "tvm" and "gemv" in kernel.detail


def test_build_failure_falls_back_to_reference(monkeypatch, randn, single_op_graph):
    """A schedule that fails to build costs a warning and the reference result, never a crash."""
    from lmforge.backends.tvm import TVMBackend, schedule_cpu

    def broken(*args, **kwargs):
        raise RuntimeError("no schedule")

    monkeypatch.setattr(schedule_cpu, "gemv", broken)
    x, w = randn(1, 8, seed=80), randn(4, 8, seed=81)
    kernel = TVMBackend().claim(single_op_graph("linear", [x, w, None]).nodes[0], "cpu").fn
    with pytest.warns(UserWarning, match="runs the torch reference"):
        got = kernel(x, w, None)
    torch.testing.assert_close(got, F.linear(x, w), rtol=0, atol=0)
    assert kernel.failures


def test_fast_exp_matches_torch_over_the_float_range(tvm_backend, run_on_tvm):
    """exp is polynomial arithmetic (vectorizable), within 2 ulp of torch.exp, with expf's edge cases."""
    x = torch.cat([torch.linspace(-90.0, 90.0, 4001), torch.tensor([88.7, -87.3, 0.0, -0.0, 1e-30])])
    got, ref, _ = run_on_tvm(tvm_backend(), "exp", [x])
    finite = torch.isfinite(ref) & (ref.abs() > 1e-37)
    assert ((got[finite] - ref[finite]).abs() / ref[finite]).max() < 2.5e-7
    assert torch.equal(got[~finite & (x > 0)], ref[~finite & (x > 0)])   # overflow: +inf
    assert (got[x < -88.0] == 0).all()                                   # underflow: 0 (expf gives denormals)
    edges = torch.tensor([float("inf"), -float("inf"), float("nan")])
    got, _, _ = run_on_tvm(tvm_backend(), "exp", [edges])
    assert got[0] == float("inf") and got[1] == 0 and torch.isnan(got[2])


PARALLEL_CASES = [  # op, input shapes, the knob set to "on"
    ("linear", [(2, 1, 64), (48, 64)], "tvm.gemv.parallel"),
    ("linear", [(20, 64), (48, 64)], "tvm.gemm.parallel"),
    ("attention", [(2, 4, 3, 16), (2, 2, 7, 16), (2, 2, 7, 16)], "tvm.attention.parallel"),
    ("rmsnorm", [(3, 5, 48), (48,)], "tvm.rowwise.parallel"),
]


@pytest.mark.parametrize("op,shapes,knob", PARALLEL_CASES)
def test_parallel_schedules(tvm_backend, run_on_tvm, randn, op, shapes, knob):
    inputs = [randn(*s, seed=90 + i) for i, s in enumerate(shapes)]
    if op == "linear":
        inputs.append(None)
    got, ref, _ = run_on_tvm(tvm_backend({knob: "on"}), op, inputs)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
