"""Interface bugs: inputs modified, wrong output type, wrong columns of the latent row."""

from __future__ import annotations

import torch

from mla_verify.decode.contract import validate_decode_inputs

from .common import finish, gather, masked_softmax, pv, qk, visible_mask


def q_scaled_in_place(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=False):
    """The softmax scale folded into q in place (q.mul_(scale)) to save a multiply per score: the
    caller's q is modified, and a second call (CUDA-graph replay, a retry, the next layer reading
    q) sees a rescaled query."""
    validate_decode_inputs(q, kv_cache, block_table, cache_seqlens, head_dim_v)
    q.mul_(softmax_scale)  # BUG: modifies the caller's tensor
    keys, valid, positions = gather(kv_cache, block_table, cache_seqlens)
    visible = visible_mask(valid, positions, cache_seqlens, q.shape[1], causal)
    p, lse = masked_softmax(qk(q, keys), visible)
    return finish(pv(p, keys[..., :head_dim_v]), lse, q)


def out_in_float32(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=False):
    """The float32 accumulator returned as is: out must have q's dtype (FlashMLA allocates out with
    q.dtype); a float32 out for bf16/fp16 q doubles the memory traffic of the output projection or
    fails the next op's dtype check."""
    validate_decode_inputs(q, kv_cache, block_table, cache_seqlens, head_dim_v)
    keys, valid, positions = gather(kv_cache, block_table, cache_seqlens)
    visible = visible_mask(valid, positions, cache_seqlens, q.shape[1], causal)
    p, lse = masked_softmax(qk(q, keys) * softmax_scale, visible)
    out = pv(p, keys[..., :head_dim_v])
    return out, lse.permute(0, 2, 1).contiguous()  # BUG: out stays float32


def v_from_wrong_columns(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=False):
    """V taken as the last head_dim_v columns of the cache row instead of the first: the latent c
    is [0, head_dim_v), the rope key [head_dim_v, d). An easy slip when porting between layouts
    that store [k_pe | c] (or ckv and kpe as separate caches, as FlashInfer does)."""
    validate_decode_inputs(q, kv_cache, block_table, cache_seqlens, head_dim_v)
    keys, valid, positions = gather(kv_cache, block_table, cache_seqlens)
    visible = visible_mask(valid, positions, cache_seqlens, q.shape[1], causal)
    p, lse = masked_softmax(qk(q, keys) * softmax_scale, visible)
    return finish(pv(p, keys[..., -head_dim_v:]), lse, q)  # BUG: last columns, not first


def scores_without_rope(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=False):
    """Scores from the latent part only, q_nope·c, forgetting q_pe·k_pe: the absorbed form needs both
    (s = (q̃·c + q_pe·k_pe)·scale). Typical when a GQA/MQA decode kernel with head_dim = head_dim_v
    is reused for MLA."""
    validate_decode_inputs(q, kv_cache, block_table, cache_seqlens, head_dim_v)
    keys, valid, positions = gather(kv_cache, block_table, cache_seqlens)
    visible = visible_mask(valid, positions, cache_seqlens, q.shape[1], causal)
    scores = qk(q[..., :head_dim_v], keys[..., :head_dim_v]) * softmax_scale  # BUG: rope part dropped
    p, lse = masked_softmax(scores, visible)
    return finish(pv(p, keys[..., :head_dim_v]), lse, q)


def out_rows_left_unwritten(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=False):
    """out allocated with torch.empty and written only by the programs of full 16-head groups: the
    tail heads keep whatever the allocator returned (zeros, stale values or NaN). The certifier
    poisons the allocator before each call so such memory is unlikely to look right."""
    validate_decode_inputs(q, kv_cache, block_table, cache_seqlens, head_dim_v)
    keys, valid, positions = gather(kv_cache, block_table, cache_seqlens)
    visible = visible_mask(valid, positions, cache_seqlens, q.shape[1], causal)
    p, lse = masked_softmax(qk(q, keys) * softmax_scale, visible)
    computed, lse = finish(pv(p, keys[..., :head_dim_v]), lse, q)
    out = torch.empty_like(computed)
    full_groups = q.shape[2] // 16 * 16
    out[:, :, :full_groups] = computed[:, :, :full_groups]  # BUG: heads past the last full group never written
    return out, lse
