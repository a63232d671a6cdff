"""Dependence of one batch row's result on the other rows."""

from __future__ import annotations

import math

import torch

from mla_verify.decode.contract import validate_decode_inputs

from .common import finish, gather, pv, qk, visible_mask


def softmax_max_over_batch(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=False):
    """The softmax's stabilising max taken over the whole batch (a reduction over the wrong axes,
    e.g. scores.max() instead of scores.amax(-1)): mathematically harmless, but each row's rounding
    (and, with a large spread between rows, underflow to 0) now depends on the other sequences, so
    a request's output changes with whatever it is batched with."""
    validate_decode_inputs(q, kv_cache, block_table, cache_seqlens, head_dim_v)
    keys, valid, positions = gather(kv_cache, block_table, cache_seqlens)
    visible = visible_mask(valid, positions, cache_seqlens, q.shape[1], causal)
    scores = (qk(q, keys) * softmax_scale).masked_fill(~visible, -math.inf)
    row_has_key = visible.any(-1)
    m = scores.max() if scores.numel() and row_has_key.any() else torch.tensor(0.0)  # BUG: batch-wide max
    weights = torch.exp(scores - m)
    total = weights.sum(-1)
    out = pv(weights, keys[..., :head_dim_v]) / torch.where(row_has_key, total, 1.0)[..., None]
    lse = torch.where(row_has_key, m + torch.log(total), -math.inf)
    return finish(out, lse, q)
