"""Correct kernels that compute differently from one float64 pass, as production kernels legitimately
do: online softmax in base 2 over tiles, P rounded to the input type before P·V, split-KV partials
merged through their lse (in float32 or rounded to bf16), keys visited in reverse order. A sound
verifier must accept every one of them; none has a bug."""

from __future__ import annotations

import math

import torch

from mla_verify.decode.contract import Capabilities, declare, validate_decode_inputs

from .common import F32, finish, gather, pv, qk, visible_mask
from .fp8 import dequantized_to_input_type, flushes_subnormals_to_zero

LOG2E = 1 / math.log(2)
LN2 = math.log(2)
ALL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
EXP2_TILE = 64  # FlashMLA's key block
SPLITS = 16  # flash-decoding splits per row
SPLIT_TILE = 32  # key block inside one split
REVERSE_TILE = 128


def _online_softmax_exp2(logits2: torch.Tensor, visible: torch.Tensor, values: torch.Tensor,
                         p_dtype: torch.dtype, tile: int):
    """FlashAttention's online softmax in base 2 over key tiles in logical order.

    logits2 [B, s_q, h, t] are the scores times scale·log2(e), visible [B, s_q, 1, t], values
    [B, t, c]. Returns the running state (m, l, acc): m the running max of logits2, l = Σ 2^(x - m)
    from the unrounded weights, acc = Σ P·v with P the weights rounded to p_dtype; all float32,
    m = -inf and l = acc = 0 for a query that sees no key."""
    m = torch.full(logits2.shape[:-1], -math.inf, device=logits2.device)
    l = torch.zeros(logits2.shape[:-1], device=logits2.device)
    acc = torch.zeros(*logits2.shape[:-1], values.shape[-1], device=logits2.device)
    for start in range(0, logits2.shape[-1], tile):
        x, seen = logits2[..., start:start + tile], visible[..., start:start + tile]
        m_new = torch.maximum(m, x.masked_fill(~seen, -math.inf).amax(-1))
        m_safe = torch.where(torch.isneginf(m_new), 0.0, m_new)  # a query that has seen no key yet
        rescale = torch.exp2(m - m_safe)
        weights = torch.where(seen, torch.exp2(x - m_safe[..., None]), 0.0)
        l = l * rescale + weights.sum(-1)
        # the P·V product takes P in the input type (the MMA's operand type), accumulating in fp32
        acc = acc * rescale[..., None] + pv(weights.to(p_dtype).to(F32), values[:, start:start + tile])
        m = m_new
    return m, l, acc


def _normalise_exp2(m: torch.Tensor, l: torch.Tensor, acc: torch.Tensor):
    """(out, lse) = (acc / l, (m + log2 l)·ln 2), with out 0 and lse -inf where nothing was seen."""
    seen = l > 0
    l_safe = torch.where(seen, l, 1.0)
    out = acc / l_safe[..., None]
    lse = torch.where(seen, (m + torch.log2(l_safe)) * LN2, -math.inf)
    return out, lse


@declare(Capabilities(dtypes=ALL_DTYPES))
def online_exp2_tiles(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=False):
    """FlashAttention / FlashMLA: online softmax over 64-key tiles with exp2 and the scale folded
    into scale·log2(e), P rounded to the input type before the P·V MMA, l summed from the unrounded
    float32 weights, out = acc / l and lse = (m + log2 l)·ln 2."""
    validate_decode_inputs(q, kv_cache, block_table, cache_seqlens, head_dim_v)
    keys, valid, positions = gather(kv_cache, block_table, cache_seqlens)
    visible = visible_mask(valid, positions, cache_seqlens, q.shape[1], causal)
    logits2 = qk(q, keys) * (softmax_scale * LOG2E)
    out, lse = _normalise_exp2(*_online_softmax_exp2(logits2, visible, keys[..., :head_dim_v], q.dtype,
                                                     EXP2_TILE))
    return finish(out, lse, q)


def _split_layout(cache_seqlens: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flash-decoding's split of each row into SPLITS chunks of cdiv(L, SPLITS) keys (the last
    ones empty when L < SPLITS): (position [b, SPLITS, chunk] of each slot in its row, clamped into
    range, and in_split [b, SPLITS, chunk], whether the slot holds one of the split's keys), where
    chunk is the longest row's chunk size."""
    per_split = -(-cache_seqlens.long() // SPLITS)  # [b]
    chunk = int(per_split.max()) if per_split.numel() else 0
    slot = torch.arange(chunk, device=cache_seqlens.device)
    position = torch.arange(SPLITS, device=cache_seqlens.device)[None, :, None] * per_split[:, None, None] + slot  # [b, SPLITS, chunk]
    in_split = (slot < per_split[:, None, None]) & (position < t)
    return torch.where(in_split, position, 0), in_split


def _split_partials(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal):
    """Flash-decoding stage 1: each (row, split) is an independent online_exp2_tiles problem over
    its chunk (tiles of 32), all splits at once as one batch axis. Returns the partial outputs
    [b, SPLITS, s_q, h, c] and partial lse [b, SPLITS, s_q, h] (natural log), float32, with out 0
    and lse -inf for a split that holds no key the query sees."""
    keys, valid, positions = gather(kv_cache, block_table, cache_seqlens)
    visible = visible_mask(valid, positions, cache_seqlens, q.shape[1], causal)
    logits2 = qk(q, keys) * (softmax_scale * LOG2E)  # [b, s_q, h, t]
    b, s_q, h, t = logits2.shape
    position, in_split = _split_layout(cache_seqlens, t)
    chunk = position.shape[-1]
    slots = position.reshape(b, 1, 1, SPLITS * chunk)  # every (split, slot) as one gather index

    def by_split(x: torch.Tensor) -> torch.Tensor:
        """[b, s_q, n, t] -> [b·SPLITS, s_q, n, chunk]: each (row, split) a batch entry of its own."""
        n = x.shape[2]
        gathered = torch.gather(x, -1, slots.expand(b, s_q, n, -1)).reshape(b, s_q, n, SPLITS, chunk)
        return gathered.movedim(3, 1).reshape(b * SPLITS, s_q, n, chunk)

    split_visible = by_split(visible) & in_split.reshape(b * SPLITS, 1, 1, chunk)
    split_values = keys[torch.arange(b, device=keys.device)[:, None, None], position, :head_dim_v]  # [b, SPLITS, chunk, c]
    split_values = split_values.reshape(b * SPLITS, chunk, head_dim_v)
    state = _online_softmax_exp2(by_split(logits2), split_visible, split_values, q.dtype, SPLIT_TILE)
    out, lse = _normalise_exp2(*state)
    return out.reshape(b, SPLITS, s_q, h, head_dim_v), lse.reshape(b, SPLITS, s_q, h)


def _merge_partials(partial_out: torch.Tensor, partial_lse: torch.Tensor):
    """Flash-decoding stage 2: weight each split by exp(lse_i - max lse), skipping splits that saw
    nothing; lse = max + log Σ weights. A query no split saw gets out 0 and lse -inf."""
    lse_max = partial_lse.amax(1)
    seen = torch.isfinite(lse_max)
    weights = torch.where(torch.isfinite(partial_lse),
                          torch.exp(partial_lse - torch.where(seen, lse_max, 0.0)[:, None]), 0.0)
    total = weights.sum(1)
    total_safe = torch.where(seen, total, 1.0)
    out = (weights[..., None] * partial_out).sum(1) / total_safe[..., None]
    lse = torch.where(seen, lse_max + torch.log(total_safe), -math.inf)
    return out, lse


@declare(Capabilities(dtypes=ALL_DTYPES))
def split_kv_lse_merge(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=False):
    """Flash-decoding (vLLM / SGLang Triton MLA, FlashInfer): each row's keys split into 16 chunks
    of cdiv(L, 16), each attended on its own (online exp2 softmax, tiles of 32) into a float32
    partial (out_i, lse_i), then merged with weights exp(lse_i - max lse), empty splits skipped."""
    validate_decode_inputs(q, kv_cache, block_table, cache_seqlens, head_dim_v)
    partial_out, partial_lse = _split_partials(q, kv_cache, block_table, cache_seqlens, head_dim_v,
                                               softmax_scale, causal)
    out, lse = _merge_partials(partial_out, partial_lse)
    return finish(out, lse, q)


@declare(Capabilities(dtypes=(torch.bfloat16, torch.float16), partials_dtype=torch.bfloat16,
                      merged_partials=16))
def split_kv_bf16_partials(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=False):
    """split_kv_lse_merge with each split's partial output stored in bfloat16 before the merge, as
    cascade attention and decode context parallelism do when partials cross kernels or ranks in the
    model's type (the partial lse stays float32). Legitimate, and declared: the output carries up to
    one bf16 rounding per merged partial on top of the final one."""
    validate_decode_inputs(q, kv_cache, block_table, cache_seqlens, head_dim_v)
    partial_out, partial_lse = _split_partials(q, kv_cache, block_table, cache_seqlens, head_dim_v,
                                               softmax_scale, causal)
    partial_out = partial_out.to(torch.bfloat16).to(F32)  # the partials as stored between the stages
    out, lse = _merge_partials(partial_out, partial_lse)
    return finish(out, lse, q)


@declare(Capabilities(dtypes=ALL_DTYPES))
def reverse_order_sum(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=False):
    """Online softmax (natural exp) over 128-key tiles visited last tile first, as FlashAttention-2
    iterates n_block from the end so the masked tiles come first: the row sum and P·V accumulate
    in the reverse of logical order, P rounded to the input type for the P·V product, float32
    accumulation."""
    validate_decode_inputs(q, kv_cache, block_table, cache_seqlens, head_dim_v)
    keys, valid, positions = gather(kv_cache, block_table, cache_seqlens)
    visible = visible_mask(valid, positions, cache_seqlens, q.shape[1], causal)
    scores = qk(q, keys) * softmax_scale
    m = torch.full(scores.shape[:-1], -math.inf, device=scores.device)
    l = torch.zeros(scores.shape[:-1], device=scores.device)
    acc = torch.zeros(*scores.shape[:-1], head_dim_v, device=scores.device)
    for start in reversed(range(0, scores.shape[-1], REVERSE_TILE)):
        s, seen = scores[..., start:start + REVERSE_TILE], visible[..., start:start + REVERSE_TILE]
        m_new = torch.maximum(m, s.masked_fill(~seen, -math.inf).amax(-1))
        m_safe = torch.where(torch.isneginf(m_new), 0.0, m_new)  # no key seen yet (a short row's tail)
        rescale = torch.exp(m - m_safe)
        weights = torch.where(seen, torch.exp(s - m_safe[..., None]), 0.0)
        l = l * rescale + weights.sum(-1)
        acc = acc * rescale[..., None] + pv(weights.to(q.dtype).to(F32), keys[:, start:start + REVERSE_TILE,
                                                                             :head_dim_v])
        m = m_new
    seen_any = l > 0
    l_safe = torch.where(seen_any, l, 1.0)
    out = acc / l_safe[..., None]
    lse = torch.where(seen_any, m + torch.log(l_safe), -math.inf)
    return finish(out, lse, q)


# every legitimate variant, for the soundness run and the zoo's controls
LEGITIMATE = (online_exp2_tiles, split_kv_lse_merge, split_kv_bf16_partials, reverse_order_sum,
              dequantized_to_input_type, flushes_subnormals_to_zero)
