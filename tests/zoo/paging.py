"""Paged-cache bugs: page boundaries, NaN padding, unused block-table entries, strides."""

from __future__ import annotations

import torch

from mla_verify.decode.contract import validate_decode_inputs

from .common import F32, finish, gather, masked_softmax, pv, qk, visible_mask


def last_full_page_dropped(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=False):
    """The tokens in a sequence's last page computed as `seq_len % page_size`, which is 0 (not
    page_size) when the length is a multiple of the page: the whole last page is skipped. The
    classic paged-attention boundary bug; FlashInfer and FlashMLA test lengths 64/96/1024 for it."""
    validate_decode_inputs(q, kv_cache, block_table, cache_seqlens, head_dim_v)
    page = kv_cache.shape[1]
    keys, _, positions = gather(kv_cache, block_table, cache_seqlens)
    lengths = cache_seqlens.long()
    full_pages = -(-lengths // page) - 1
    in_last_page = lengths % page  # BUG: 0 instead of page when the last page is full
    valid = positions[None, :] < (full_pages * page + in_last_page)[:, None]
    visible = visible_mask(valid, positions, cache_seqlens, q.shape[1], causal)
    p, lse = masked_softmax(qk(q, keys) * softmax_scale, visible)
    return finish(pv(p, keys[..., :head_dim_v]), lse, q)


def reads_one_slot_past_length(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale,
                               causal=False):
    """Off-by-one in the key mask (`<=` for `<`): every row attends to one slot past its length,
    the slot FlashMLA's and FlashInfer's tests poison with NaN."""
    validate_decode_inputs(q, kv_cache, block_table, cache_seqlens, head_dim_v)
    b, page, d = block_table.shape[0], kv_cache.shape[1], kv_cache.shape[-1]
    lengths = cache_seqlens.long()
    blocks = -(-int(lengths.max()) // page) if b else 0
    positions = torch.arange(blocks * page)
    valid = positions[None, :] <= lengths[:, None]  # BUG: one slot too many
    ids = torch.where(valid[:, ::page], block_table[:, :blocks].long(), 0)
    keys = kv_cache[:, :, 0][ids].reshape(b, blocks * page, d).to(F32)
    keys = torch.where(valid[..., None], keys, 0.0)
    visible = visible_mask(valid, positions, cache_seqlens, q.shape[1], causal)
    p, lse = masked_softmax(qk(q, keys) * softmax_scale, visible)
    return finish(pv(p, keys[..., :head_dim_v]), lse, q)


def prefetches_unused_block(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=False):
    """Software pipelining that loads the next page's block id and data unconditionally, past the
    last page a sequence uses. FlashMLA's tests fill unused block-table entries with a huge id for
    exactly this: on a GPU it is an illegal address; here an IndexError."""
    validate_decode_inputs(q, kv_cache, block_table, cache_seqlens, head_dim_v)
    b, page, d = block_table.shape[0], kv_cache.shape[1], kv_cache.shape[-1]
    lengths = cache_seqlens.long()
    blocks = -(-int(lengths.max()) // page) if b else 0
    prefetched = block_table[:, :blocks + 1].long()  # BUG: reads the entry after the last used page
    pages = kv_cache[:, :, 0][prefetched]  # [b, blocks + 1, page, d]
    keys = pages[:, :blocks].reshape(b, blocks * page, d).to(F32)
    positions = torch.arange(blocks * page)
    valid = positions[None, :] < lengths[:, None]
    keys = torch.where(valid[..., None], keys, 0.0)
    visible = visible_mask(valid, positions, cache_seqlens, q.shape[1], causal)
    p, lse = masked_softmax(qk(q, keys) * softmax_scale, visible)
    return finish(pv(p, keys[..., :head_dim_v]), lse, q)


def nan_padding_leaks(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=False):
    """Whole pages loaded and the padding masked only in the scores (-inf, so P = 0 there), never in
    V: 0 · NaN = NaN in the P·V product. Real kernels that load full tiles must zero (or select)
    the out-of-range V rows; FlashMLA/FlashInfer tests poison the padding with NaN to catch it."""
    validate_decode_inputs(q, kv_cache, block_table, cache_seqlens, head_dim_v)
    b, page, d = block_table.shape[0], kv_cache.shape[1], kv_cache.shape[-1]
    lengths = cache_seqlens.long()
    blocks = -(-int(lengths.max()) // page) if b else 0
    positions = torch.arange(blocks * page)
    valid = positions[None, :] < lengths[:, None]
    ids = torch.where(valid[:, ::page], block_table[:, :blocks].long(), 0)
    keys = kv_cache[:, :, 0][ids].reshape(b, blocks * page, d).to(F32)  # BUG: padding slots kept as loaded
    visible = visible_mask(valid, positions, cache_seqlens, q.shape[1], causal)
    p, lse = masked_softmax(qk(q, keys) * softmax_scale, visible)  # NaN scores are masked to -inf
    return finish(pv(p, keys[..., :head_dim_v]), lse, q)


def assumes_contiguous_cache(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=False):
    """A kernel that takes the cache's data pointer and computes addresses from the shape alone, as
    if it were contiguous (no stride arguments, no .contiguous() check): a cache that is a strided
    view of a wider buffer, e.g. the latent part of a [c | k_pe | scales] row, is read misaligned."""
    validate_decode_inputs(q, kv_cache, block_table, cache_seqlens, head_dim_v)
    dense_strides = torch.empty(kv_cache.shape).stride()
    as_if_contiguous = kv_cache.as_strided(kv_cache.shape, dense_strides)  # BUG: ignores kv_cache.stride()
    keys, valid, positions = gather(as_if_contiguous, block_table, cache_seqlens)
    visible = visible_mask(valid, positions, cache_seqlens, q.shape[1], causal)
    p, lse = masked_softmax(qk(q, keys) * softmax_scale, visible)
    return finish(pv(p, keys[..., :head_dim_v]), lse, q)


def masks_with_batch_max_length(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale,
                                causal=False):
    """Padded-batch thinking in a paged kernel: every row masked with max(cache_seqlens) (the
    `max_seqlen` argument many wrappers pass) instead of its own length, with block ids clamped into
    the cache "for safety". Shorter rows attend to their NaN padding and to other rows' pages."""
    validate_decode_inputs(q, kv_cache, block_table, cache_seqlens, head_dim_v)
    b, page, d = block_table.shape[0], kv_cache.shape[1], kv_cache.shape[-1]
    max_len = int(cache_seqlens.max()) if b else 0
    blocks = -(-max_len // page)
    positions = torch.arange(blocks * page)
    valid = (positions < max_len)[None, :].expand(b, -1)  # BUG: the batch's longest length for every row
    ids = block_table[:, :blocks].long().clamp(0, kv_cache.shape[0] - 1)
    keys = kv_cache[:, :, 0][ids].reshape(b, blocks * page, d).to(F32)
    keys = torch.where(valid[..., None], keys, 0.0)
    lengths = torch.full_like(cache_seqlens, max_len)
    visible = visible_mask(valid, positions, lengths, q.shape[1], causal)
    p, lse = masked_softmax(qk(q, keys) * softmax_scale, visible)
    return finish(pv(p, keys[..., :head_dim_v]), lse, q)
