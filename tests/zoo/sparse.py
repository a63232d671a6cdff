"""Sparse (top-k) decode bugs: -1 read as slot 0, positive indices past the pool read, one index
list shared by every query of a multi-token decode. Each kernel departs from
`correct_sparse_decode` (the sparse control) on the line marked BUG; the index rules are
mla_verify.decode.sparse's."""

from __future__ import annotations

import torch

from mla_verify.decode.contract import Capabilities, declare, validate_decode_inputs
from mla_verify.decode.fp8 import KV_FORMATS, quantize

from .common import F32, finish, masked_softmax
from .fp8 import dense_fp8_float32, dequantize_rows

__all__ = ["correct_sparse_decode", "minus_one_reads_slot_zero", "reads_indices_past_the_pool",
           "one_index_list_for_every_query"]

SPARSE_ONLY = Capabilities(kv_formats=(), sparse_kv_formats=("native",))


def _attend_lists(q, rows, valid, head_dim_v, softmax_scale, k_scale=None):
    """Each query over its own gathered rows [b, s, t, width]; valid [b, s, t]."""
    values = dequantize_rows(rows, q.shape[-1], head_dim_v, k_scale)
    values = torch.where(valid[..., None], values, 0.0)
    scores = torch.einsum("bshd,bstd->bsht", q.to(F32), values) * softmax_scale
    p, lse = masked_softmax(scores, valid[:, :, None, :])
    return torch.einsum("bsht,bstc->bshc", p, values[..., :head_dim_v]), lse


def _with_sink(out, lse, attn_sink):
    if attn_sink is None:
        return out
    factor = torch.where(torch.isfinite(lse), torch.sigmoid(lse - attn_sink.to(F32)[None, None, :]), 0.0)
    return out * factor[..., None]


@declare(Capabilities(kv_formats=KV_FORMATS, sparse_kv_formats=KV_FORMATS, attn_sink=True), quantizer=quantize)
def correct_sparse_decode(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=False, *,
                          is_fp8_kvcache=False, k_scale=None, indices=None, attn_sink=None):
    """The sparse template (a correct kernel, certified as a control): each query gathers the slots
    of its valid entries (0 <= index < num_blocks·page; -1 and indices past the pool are masked
    before any read), dequantises and attends; a sink scales the output."""
    validate_decode_inputs(q, kv_cache, block_table, cache_seqlens, head_dim_v, is_fp8_kvcache=is_fp8_kvcache,
                           k_scale=k_scale, indices=indices, attn_sink=attn_sink)
    if indices is None:
        out, lse = dense_fp8_float32(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal,
                                     k_scale)
        return finish(_with_sink(out, lse, attn_sink), lse, q)
    num_blocks, page = kv_cache.shape[:2]
    index = indices.long()
    valid = (index >= 0) & (index < num_blocks * page)
    slot = torch.where(valid, index, 0)
    rows = kv_cache[:, :, 0][slot // page, slot % page]
    out, lse = _attend_lists(q, rows, valid, head_dim_v, softmax_scale, k_scale)
    return finish(_with_sink(out, lse, attn_sink), lse, q)


@declare(SPARSE_ONLY)
def minus_one_reads_slot_zero(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=False, *,
                              indices=None):
    """-1 entries clamped to 0 for the gather (so the load stays in bounds) but never masked: every
    list with a -1 attends to the pool's slot 0 as well, once per -1 (FlashMLA's own reference
    clamps first and masks after; dropping the mask is the bug)."""
    validate_decode_inputs(q, kv_cache, block_table, cache_seqlens, head_dim_v, indices=indices)
    num_blocks, page = kv_cache.shape[:2]
    index = indices.long()
    slot = index.clamp_min(0)
    valid = slot < num_blocks * page  # BUG: -1 became slot 0 and counts as a valid entry
    slot = torch.where(valid, slot, 0)
    rows = kv_cache[:, :, 0][slot // page, slot % page]
    out, lse = _attend_lists(q, rows, valid, head_dim_v, softmax_scale)
    return finish(out, lse, q)


@declare(SPARSE_ONLY)
def reads_indices_past_the_pool(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=False, *,
                                indices=None):
    """Only -1 is masked; a positive index past the pool is turned into an address and read (the
    top-k indexer's padding past the sequence, unmasked in the attention kernel). Reads go
    through the raw storage as a GPU kernel's pointer arithmetic would: just past the pool they
    meet whatever the allocation holds next, far past it they fault."""
    validate_decode_inputs(q, kv_cache, block_table, cache_seqlens, head_dim_v, indices=indices)
    page = kv_cache.shape[1]
    index = indices.long()
    valid = index != -1  # BUG: positive indices past the pool are not invalid here
    slot = torch.where(valid, index, 0)
    storage = kv_cache.as_strided((kv_cache.untyped_storage().nbytes() // kv_cache.element_size(),), (1,), 0)
    row_start = kv_cache.storage_offset() + (slot // page) * kv_cache.stride(0) + (slot % page) * kv_cache.stride(1)
    columns = torch.arange(kv_cache.shape[-1]) * kv_cache.stride(3)
    rows = storage[row_start[..., None] + columns]  # raises IndexError past the allocation
    out, lse = _attend_lists(q, rows, valid, head_dim_v, softmax_scale)
    return finish(out, lse, q)


@declare(SPARSE_ONLY)
def one_index_list_for_every_query(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale,
                                   causal=False, *, indices=None):
    """Every query of a multi-token (MTP) decode reads the last query's index list, a stride-0
    indices load: draft token j then attends to the keys after its own position that only the last
    token may see (its causal limit, carried by its own list, is ignored)."""
    validate_decode_inputs(q, kv_cache, block_table, cache_seqlens, head_dim_v, indices=indices)
    num_blocks, page = kv_cache.shape[:2]
    index = indices[:, -1:].expand_as(indices).long()  # BUG: one list for all s_q queries
    valid = (index >= 0) & (index < num_blocks * page)
    slot = torch.where(valid, index, 0)
    rows = kv_cache[:, :, 0][slot // page, slot % page]
    out, lse = _attend_lists(q, rows, valid, head_dim_v, softmax_scale)
    return finish(out, lse, q)
