"""Split-KV (flash-decoding) bugs: stage 1 attends over a chunk of the keys, stage 2 merges."""

from __future__ import annotations

import math

import torch

from mla_verify.decode.contract import validate_decode_inputs

from .common import finish, gather, pv, qk, visible_mask

NUM_SPLITS = 4  # vLLM's Triton MLA decode default


def _split_of_each_key(cache_seqlens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[b, t]: which split a key belongs to; vLLM splits each row into chunks of cdiv(L, splits)."""
    per_split = (-(-cache_seqlens.long() // NUM_SPLITS)).clamp(min=1)
    return positions[None, :] // per_split[:, None]


def _stage1(scores: torch.Tensor, visible: torch.Tensor, values: torch.Tensor, split: torch.Tensor):
    """Per split i: (m_i, l_i, acc_i) = running max, Σ exp(s - m_i), Σ exp(s - m_i)·v, with m_i = -inf
    and l_i = acc_i = 0 for a split that sees no key. Shapes [S, b, s_q, h(, c)]."""
    ms, ls, accs = [], [], []
    for i in range(NUM_SPLITS):
        in_split = visible & (split == i)[:, None, None, :]
        masked = scores.masked_fill(~in_split, -math.inf)
        m = masked.amax(-1) if masked.shape[-1] else torch.full(masked.shape[:-1], -math.inf)
        w = torch.exp(masked - torch.where(torch.isneginf(m), 0.0, m)[..., None])
        ms.append(m)
        ls.append(w.sum(-1))
        accs.append(pv(w, values))
    return torch.stack(ms), torch.stack(ls), torch.stack(accs)


def merge_without_rescale(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=False):
    """Split-KV stage 2 that adds the splits' unnormalised accumulators and denominators as they are,
    without rescaling each by exp(m_i - m) to the global max: correct only when every split happens
    to have the same max (e.g. one split). The merge must weight split i by exp(m_i - max_j m_j)."""
    validate_decode_inputs(q, kv_cache, block_table, cache_seqlens, head_dim_v)
    keys, valid, positions = gather(kv_cache, block_table, cache_seqlens)
    visible = visible_mask(valid, positions, cache_seqlens, q.shape[1], causal)
    m, l, acc = _stage1(qk(q, keys) * softmax_scale, visible, keys[..., :head_dim_v],
                        _split_of_each_key(cache_seqlens, positions))
    m_all = m.amax(0)
    empty = torch.isneginf(m_all)
    total = l.sum(0)  # BUG: should be Σ exp(m_i - m_all)·l_i
    out = acc.sum(0) / torch.where(empty, 1.0, total)[..., None]  # BUG: same for the accumulators
    lse = torch.where(empty, -math.inf, m_all + torch.log(torch.where(empty, 1.0, total)))
    return finish(out, lse, q)


def empty_split_counted(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=False):
    """Split-KV stage 2 that merges every split, including those past a short row's length whose
    stage 1 never ran: their partial (out, lse) slots still hold the zeros the buffer was allocated
    with, so each contributes weight exp(0 - lse_max) (and a fully empty row gets lse = log(#splits)
    instead of -inf). vLLM's stage 2 skips splits with split_kv_end <= split_kv_start for this."""
    validate_decode_inputs(q, kv_cache, block_table, cache_seqlens, head_dim_v)
    keys, valid, positions = gather(kv_cache, block_table, cache_seqlens)
    visible = visible_mask(valid, positions, cache_seqlens, q.shape[1], causal)
    split = _split_of_each_key(cache_seqlens, positions)
    m, l, acc = _stage1(qk(q, keys) * softmax_scale, visible, keys[..., :head_dim_v], split)
    ran = torch.isfinite(m)  # stage 1 wrote (out_i, lse_i) only for splits that saw a key
    partial_lse = torch.where(ran, m + torch.log(torch.where(ran, l, 1.0)), 0.0)  # BUG: unwritten slots read as 0
    partial_out = torch.where(ran[..., None], acc / torch.where(ran, l, 1.0)[..., None], 0.0)
    lse_max = partial_lse.amax(0)
    weights = torch.exp(partial_lse - lse_max)  # BUG: no skip of splits that never ran
    lse = lse_max + torch.log(weights.sum(0))
    out = (weights[..., None] * partial_out).sum(0) / weights.sum(0)[..., None]
    return finish(out, lse, q)
