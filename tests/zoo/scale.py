"""Softmax-scale bugs."""

from __future__ import annotations

from mla_verify.decode.contract import validate_decode_inputs

from .common import finish, gather, masked_softmax, pv, qk, visible_mask


def scale_flashmla_default(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=False):
    """FlashMLA's `flash_mla_with_kvcache` defaults softmax_scale to q.shape[-1] ** -0.5 = 1/sqrt(576),
    which is wrong for DeepSeek models (192^-0.5 · mscale²): a wrapper that forgets to pass the
    scale silently attends with the default. Here the passed scale is ignored for 1/sqrt(d)."""
    validate_decode_inputs(q, kv_cache, block_table, cache_seqlens, head_dim_v)
    keys, valid, positions = gather(kv_cache, block_table, cache_seqlens)
    scores = qk(q, keys) * q.shape[-1] ** -0.5  # BUG: the caller's softmax_scale is never used
    p, lse = masked_softmax(scores, visible_mask(valid, positions, cache_seqlens, q.shape[1], causal))
    return finish(pv(p, keys[..., :head_dim_v]), lse, q)


def scale_off_by_half_percent(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=False):
    """A softmax scale slightly off: the YaRN mscale hard-coded with too few digits or computed from
    a rounded factor (DeepSeek-V3's 0.135234 = 192^-0.5·(0.1·ln 40 + 1)²). Here it is 0.5 % too
    large, an error fixed tolerances such as bf16's rtol 1.6e-2 never see."""
    validate_decode_inputs(q, kv_cache, block_table, cache_seqlens, head_dim_v)
    keys, valid, positions = gather(kv_cache, block_table, cache_seqlens)
    scores = qk(q, keys) * (softmax_scale * 1.005)  # BUG: 0.5 % too large
    p, lse = masked_softmax(scores, visible_mask(valid, positions, cache_seqlens, q.shape[1], causal))
    return finish(pv(p, keys[..., :head_dim_v]), lse, q)
