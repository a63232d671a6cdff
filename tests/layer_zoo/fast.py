"""Bugs in the paged decode path of the project's fast layer (mla_verify.impls.fast_layer, with the
PyTorch decode kernel and 16-token pages): the kernel called before the new rows are written, and
the decode position shifted."""

from __future__ import annotations

import torch

from mla_verify.impls.fast_layer import FastMLALayer
from mla_verify.impls.torch_decode import torch_paged_decode


class _Fast(FastMLALayer):
    def __init__(self, config, weights, dtype, device="cpu", decode_kernel=torch_paged_decode):
        super().__init__(config, weights, dtype, device, decode_kernel=decode_kernel, page_size=16)


def _lengths_before_the_append(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=False):
    """The decode kernel as the buggy layer calls it: with the sequence lengths it read before the
    new tokens' rows were appended."""
    before = cache_seqlens - q.shape[1]  # BUG: the lengths before the append
    return torch_paged_decode(q, kv_cache, block_table, before, head_dim_v, softmax_scale, causal)


class FastAppendedAfterAttention(_Fast):
    """The paged decode kernel attends over the cache as it was before the new tokens' rows were
    appended (the cache lengths read before the append, the rows written after attention): each
    decoded token attends to every earlier token but not to itself, and, causally aligned to the
    old length, a multi-token step loses its own keys and the last earlier ones."""

    def __init__(self, config, weights, dtype, device="cpu"):
        super().__init__(config, weights, dtype, device, decode_kernel=_lengths_before_the_append)


class FastDecodePositionOffByOne(_Fast):
    """The fast layer's decode projects the new tokens at position length + 1: query and key rotated
    one step too far, the wrong key kept in the paged cache."""

    def _project(self, x, start):
        return super()._project(x, start + 1 if start > 0 else 0)  # BUG: one position too far


def fast_appended_after_attention(config, weights, dtype, device="cpu"):
    return FastAppendedAfterAttention(config, weights, dtype, device)


def fast_decode_position_off_by_one(config, weights, dtype, device="cpu"):
    return FastDecodePositionOffByOne(config, weights, dtype, device)


fast_appended_after_attention.__doc__ = FastAppendedAfterAttention.__doc__
fast_decode_position_off_by_one.__doc__ = FastDecodePositionOffByOne.__doc__
