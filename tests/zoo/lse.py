"""Log-sum-exp bugs."""

from __future__ import annotations

import math

import torch

from mla_verify.decode.contract import validate_decode_inputs

from .common import finish, gather, masked_softmax, pv, qk, visible_mask


def lse_base2(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=False):
    """Kernels work in base 2 (scores pre-multiplied by log2 e, exp2 in the loop) and must convert
    the lse back; FlashInfer's MLA wrapper returns base-2 lse by default. Returning it undeclared
    (Capabilities.lse_base defaults to 'e') corrupts every split/cascade merge downstream."""
    validate_decode_inputs(q, kv_cache, block_table, cache_seqlens, head_dim_v)
    keys, valid, positions = gather(kv_cache, block_table, cache_seqlens)
    visible = visible_mask(valid, positions, cache_seqlens, q.shape[1], causal)
    p, lse = masked_softmax(qk(q, keys) * softmax_scale, visible)
    return finish(pv(p, keys[..., :head_dim_v]), lse / math.log(2), q)  # BUG: log2, not ln


def lse_through_bf16(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=False):
    """lse stored in a buffer of the activation type (bf16) before being returned as float32, as
    when the softmax_lse scratch is allocated with q.dtype: ~3 significant digits, so merged
    partial results are weighted wrongly by up to |lse|·2^-9."""
    validate_decode_inputs(q, kv_cache, block_table, cache_seqlens, head_dim_v)
    keys, valid, positions = gather(kv_cache, block_table, cache_seqlens)
    visible = visible_mask(valid, positions, cache_seqlens, q.shape[1], causal)
    p, lse = masked_softmax(qk(q, keys) * softmax_scale, visible)
    return finish(pv(p, keys[..., :head_dim_v]), lse.to(torch.bfloat16), q)  # BUG: rounded to bf16
