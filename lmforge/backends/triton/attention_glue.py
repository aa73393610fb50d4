"""Which attention nodes the Triton kernels take, and the calls that give each op's reference behaviour.

    attention (no mask, K/V not quantized)   decode (one query row): split-K flash-decoding
                                             otherwise: flash prefill (causal, window + sinks, q_offset)
    block_topk_attention                     block top-k decode (block sizes: powers of two >= 16)
    shared_prefix_attention                  Hydragen decode (prefix read once for all sequences)
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

from lmforge.ir.graph import Node


def _pow2_at_least_16(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0


def claim_attention(node: Node, config: Mapping[str, Any]) -> Callable | None:
    from lmforge.backends.triton import attention_decode, attention_prefill

    scale = node.attr["scale"]
    if len(node.inputs) != 3 or node.attr["kv_dtype"] is not None or (scale is not None and scale < 0):
        return None                         # a negative scale: flash_prefill refuses it, the reference runs it
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

    if not _pow2_at_least_16(node.attr["block_size"]) or node.attr["kv_dtype"] is not None:
        return None
    cfg = config.get("attention_decode")

    def run(q, k, v, *, block_size, topk_blocks, sinks=4, window=64, summary="mean", scale=None, kv_dtype=None):
        return attention_decode.block_topk_decode(q, k, v, block_size=block_size, topk_blocks=topk_blocks,
                                                  sinks=sinks, window=window, summary=summary, scale=scale,
                                                  config=cfg)

    return run


def claim_shared_prefix(node: Node, config: Mapping[str, Any]) -> Callable | None:
    from lmforge.backends.triton import attention_decode

    cfg = config.get("attention_decode")

    def run(q, kp, vp, ks, vs, *, scale=None, rows_per_prefix=0):
        from lmforge.ir.ops.attention_ref import check_prefix_groups

        check_prefix_groups(q.shape[0], kp.shape[0], rows_per_prefix)
        return attention_decode.shared_prefix_decode(q, kp, vp, ks, vs, scale=scale, config=cfg)

    return run
