"""Masking bugs: empty rows and causal alignment."""

from __future__ import annotations

import math

import torch

from mla_verify.decode.contract import validate_decode_inputs

from .common import finish, gather, masked_softmax, pv, qk, visible_mask


def empty_row_gives_nan(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=False):
    """Online softmax with no guard for a row that sees no key (cache_seqlens 0, or a causal query
    before the first key): m = -inf, exp(s - m) = exp(-inf + inf) = NaN, out = 0/0. FlashAttention
    and FlashMLA special-case it (out 0, lse ±inf); kernels ported without the guard return NaN."""
    validate_decode_inputs(q, kv_cache, block_table, cache_seqlens, head_dim_v)
    keys, valid, positions = gather(kv_cache, block_table, cache_seqlens)
    visible = visible_mask(valid, positions, cache_seqlens, q.shape[1], causal)
    scores = (qk(q, keys) * softmax_scale).masked_fill(~visible, -math.inf)
    m = scores.amax(-1, keepdim=True) if scores.shape[-1] else torch.full(scores.shape[:-1] + (1,), -math.inf)
    weights = torch.exp(scores - m)  # BUG: NaN when m = -inf
    total = weights.sum(-1, keepdim=True)
    out = pv(weights, keys[..., :head_dim_v]) / total  # BUG: 0/0
    return finish(out, (m + torch.log(total)).squeeze(-1), q)


def empty_row_lse_plus_inf(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=False):
    """FlashMLA returns lse = +inf for a row that sees no key, FlashInfer and vLLM -inf. A kernel
    (or a FlashMLA adapter) that returns +inf while declaring the default -inf convention breaks
    every caller that merges partial results with the other convention."""
    validate_decode_inputs(q, kv_cache, block_table, cache_seqlens, head_dim_v)
    keys, valid, positions = gather(kv_cache, block_table, cache_seqlens)
    visible = visible_mask(valid, positions, cache_seqlens, q.shape[1], causal)
    p, lse = masked_softmax(qk(q, keys) * softmax_scale, visible)
    lse = torch.where(torch.isneginf(lse), math.inf, lse)  # BUG: FlashMLA's convention, not declared
    return finish(pv(p, keys[..., :head_dim_v]), lse, q)


FINITE_NEG_INF = -5.0e4  # a half-precision-safe "-infinity": fp16 holds it, as it does not -1e30


def finite_minus_infinity_sentinel(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale,
                                   causal=False):
    """The running max starts at a finite "-infinity" (-5e4, chosen to fit float16) instead of -inf,
    and a row whose sum of weights is 0 is taken for one that saw no key. Right on every usual
    input; on a row whose logits all lie below the sentinel every weight exp(s - m) underflows, so
    the row returns zeros and lse = -inf as if it were empty (mla-facts §10: a finite infinity
    sentinel). The below_sentinel regime (logits near -6e4) is what reaches it."""
    validate_decode_inputs(q, kv_cache, block_table, cache_seqlens, head_dim_v)
    keys, valid, positions = gather(kv_cache, block_table, cache_seqlens)
    visible = visible_mask(valid, positions, cache_seqlens, q.shape[1], causal)
    scores = (qk(q, keys) * softmax_scale).masked_fill(~visible, -math.inf)
    start = torch.full(scores.shape[:-1] + (1,), FINITE_NEG_INF, dtype=scores.dtype)
    m = torch.maximum(scores.amax(-1, keepdim=True), start) if scores.shape[-1] else start  # BUG: finite start
    weights = torch.exp(scores - m)
    total = weights.sum(-1, keepdim=True)
    seen = total > 0  # BUG: an underflowed row is taken for an empty one
    out = pv(weights, keys[..., :head_dim_v]) / torch.where(seen, total, 1.0)
    lse = torch.where(seen, m + torch.log(torch.where(seen, total, 1.0)), -math.inf)
    return finish(out, lse.squeeze(-1), q)


def causal_top_left(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=False):
    """Causal mask aligned top-left (query i sees keys 0..i, as in a prefill from position 0) instead
    of bottom-right (query i sees keys < L - s_q + i + 1): FlashAttention changed this convention in
    v2.1, and decode with s_q > 1 (speculative/MTP tokens) needs bottom-right."""
    validate_decode_inputs(q, kv_cache, block_table, cache_seqlens, head_dim_v)
    keys, valid, positions = gather(kv_cache, block_table, cache_seqlens)
    visible = valid[:, None, None, :].expand(-1, q.shape[1], -1, -1)
    if causal:
        limit = torch.arange(q.shape[1]) + 1  # BUG: top-left alignment
        visible = visible & (positions[None, :] < limit[:, None])[None, :, None, :]
    p, lse = masked_softmax(qk(q, keys) * softmax_scale, visible)
    return finish(pv(p, keys[..., :head_dim_v]), lse, q)


def causal_excludes_own_position(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale,
                                 causal=False):
    """Causal off-by-one: query i sees keys < L - s_q + i (its own position excluded), the `<` vs
    `<=` slip of an offset computed as seqlen_k - seqlen_q + i."""
    validate_decode_inputs(q, kv_cache, block_table, cache_seqlens, head_dim_v)
    keys, valid, positions = gather(kv_cache, block_table, cache_seqlens)
    visible = valid[:, None, None, :].expand(-1, q.shape[1], -1, -1)
    if causal:
        limit = cache_seqlens.long()[:, None] - q.shape[1] + torch.arange(q.shape[1])[None, :]  # BUG: no + 1
        visible = visible & (positions[None, None, :] < limit[..., None])[:, :, None, :]
    p, lse = masked_softmax(qk(q, keys) * softmax_scale, visible)
    return finish(pv(p, keys[..., :head_dim_v]), lse, q)
