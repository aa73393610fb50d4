"""Which attention nodes the Triton kernels take, and the calls that give each op's reference behaviour.

Every claim needs its q / k / v (and prefix / suffix K / V) of one dtype, float16 / bfloat16 / float32, and of
one head dim (the kernels read V with K's layout; a V head dim other than q's and k's runs the reference), the
conditions under which the artifact path's launch specs (attention_specs.py) serve a node too:

    attention (no mask, K/V not quantized,   decode (one query row): split-K flash-decoding
    scale >= 0, sinks only with a window     otherwise: flash prefill (causal, window + sinks, q_offset)
    >= 1)
    block_topk_attention                     block top-k decode (block sizes: powers of two >= 16; summary
                                             'mean' or 'minmax'; K/V not quantized)
    block_sparse_attention                   block-sparse causal prefill over the mask's kept blocks (block sizes:
                                             powers of two >= 16; scale >= 0; any Sq and Skv, queries at
                                             Skv - Sq + i as in the reference; a mask of batch B or 1 (broadcast,
                                             as the reference does) with Hkv or Hq heads; any other mask runs
                                             the reference, call by call)
    shared_prefix_attention                  Hydragen decode (prefix read once for all sequences)
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

from lmforge.backends.triton.backend import FLOAT_DTYPES
from lmforge.ir.graph import Node


def _pow2_at_least_16(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0


def _kernel_types(values) -> bool:
    """q, k, v (, ...) have one float dtype the kernels take and one head dim (the last, equal in every type)."""
    dtypes = {v.type.dtype for v in values}
    heads = {v.type.shape[-1] for v in values}
    return len(dtypes) == 1 and dtypes <= set(FLOAT_DTYPES) and len(heads) == 1


def claim_attention(node: Node, config: Mapping[str, Any]) -> Callable | None:
    from lmforge.backends.triton import attention_decode, attention_prefill

    scale, window = node.attr["scale"], node.attr["window"]
    if len(node.inputs) != 3 or node.attr["kv_dtype"] is not None or (scale is not None and scale < 0) \
            or not _kernel_types(node.inputs):
        return None                         # a negative scale: flash_prefill refuses it, the reference runs it
    if (window is not None and window < 1) or (node.attr["sinks"] and window is None):
        return None                         # flash_prefill refuses these; the reference runs them
    prefill_cfg, decode_cfg = config.get("attention_prefill"), config.get("attention_decode")

    def run(q, k, v, mask=None, *, causal=False, scale=None, window=None, sinks=0, q_offset=None, return_lse=False,
            kv_dtype=None):
        decode = q.shape[2] == 1 and window is None and not sinks and (q_offset is None or not causal)
        if decode:
            return attention_decode.decode_attention(q, k, v, scale=scale, config=decode_cfg, return_lse=return_lse)
        return attention_prefill.flash_prefill(q, k, v, causal=causal, scale=scale, window=window, sinks=sinks,
                                               q_offset=q_offset, config=prefill_cfg, return_lse=return_lse)

    return run


def claim_block_topk(node: Node, config: Mapping[str, Any]) -> Callable | None:
    from lmforge.backends.triton import attention_decode

    if not _pow2_at_least_16(node.attr["block_size"]) or node.attr["kv_dtype"] is not None \
            or node.attr["summary"] not in ("mean", "minmax") or not _kernel_types(node.inputs[:3]):
        return None
    cfg = config.get("attention_decode")

    def run(q, k, v, *, block_size, topk_blocks, sinks=4, window=64, summary="mean", scale=None, kv_dtype=None):
        return attention_decode.block_topk_decode(q, k, v, block_size=block_size, topk_blocks=topk_blocks,
                                                  sinks=sinks, window=window, summary=summary, scale=scale,
                                                  config=cfg)

    return run


def sparse_block_lists(block_mask, q, k, block_size: int):
    """(block_idx, block_cnt) on q's device for `block_sparse_prefill` from block_sparse_attention's mask, or None
    when the kernel cannot give the reference's result for it (the reference then runs, or raises its own error).

    The mask is bool [B or 1, Hkv or Hq, >= nQ, >= nK] for nQ = ceil(Sq / block_size), nK = ceil(Skv / block_size):
    blocks past those are cut off, as the reference cuts them off; a batch-1 mask serves every sequence (the
    reference broadcasts it), its lists expanded over the batch without a copy (stride 0).
    """
    import torch

    from lmforge.backends.triton.attention_prefill import block_mask_to_index

    b, hq, sq = q.shape[:3]
    n_q, n_k = -(-sq // block_size), -(-k.shape[2] // block_size)
    if block_mask.dim() != 4 or block_mask.dtype != torch.bool or block_mask.shape[0] not in (1, b) \
            or block_mask.shape[1] not in (k.shape[1], hq) or block_mask.shape[2] < n_q or block_mask.shape[3] < n_k:
        return None
    block_idx, block_cnt = block_mask_to_index(block_mask[:, :, :n_q, :n_k].to(q.device))
    if block_mask.shape[0] != b:
        block_idx, block_cnt = block_idx.expand(b, -1, -1, -1), block_cnt.expand(b, -1, -1)
    return block_idx, block_cnt


def claim_block_sparse(node: Node, config: Mapping[str, Any]) -> Callable | None:
    """block_sparse_attention on `block_sparse_prefill` (the flash prefill kernel's SPARSE mode, with the prefill
    config); None for a block size that is not a power of two >= 16, q / k / v the kernel does not take (see
    `_kernel_types`) or a negative scale."""
    from lmforge.backends.triton import attention_prefill
    from lmforge.ir.ops import get_op

    scale = node.attr["scale"]
    if not _pow2_at_least_16(node.attr["block_size"]) or (scale is not None and scale < 0) \
            or not _kernel_types(node.inputs[:3]):
        return None
    cfg = config.get("attention_prefill")
    reference = get_op("block_sparse_attention").reference

    def run(q, k, v, block_mask, *, block_size, scale=None, density=1.0):
        lists = sparse_block_lists(block_mask, q, k, block_size)
        if lists is None:
            return reference(q, k, v, block_mask, block_size=block_size, scale=scale, density=density)
        return attention_prefill.block_sparse_prefill(q, k, v, *lists, block_size=block_size, scale=scale,
                                                      config=cfg, return_lse=False)

    return run


def claim_shared_prefix(node: Node, config: Mapping[str, Any]) -> Callable | None:
    """shared_prefix_attention on `shared_prefix_decode`, with the config of its own template,
    "attention_shared_prefix" (the decode split kernel's knobs; tuned apart from "attention_decode" because its
    prefix pass tiles the rows of every sequence that shares the prefix, where a decode step tiles one group)."""
    from lmforge.backends.triton import attention_decode

    if not _kernel_types(node.inputs[:5]):
        return None
    cfg = config.get("attention_shared_prefix")

    def run(q, kp, vp, ks, vs, *, scale=None, rows_per_prefix=0):
        from lmforge.ir.ops.attention_ref import check_prefix_groups

        check_prefix_groups(q.shape[0], kp.shape[0], rows_per_prefix)
        return attention_decode.shared_prefix_decode(q, kp, vp, ks, vs, scale=scale, config=cfg)

    return run
