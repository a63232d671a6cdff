"""Subtle bugs that only show at serving scale: each kernel is right on small, short cases and wrong
beyond (long rows, many tiles, one head, an empty row). Everything the bug does not touch is computed
exactly as in `common.correct_decode` (float32 scores, weights and accumulators)."""

from __future__ import annotations

import math

import torch

from mla_verify.decode.contract import Capabilities, declare, validate_decode_inputs

from .common import F32, finish, gather, masked_softmax, pv, qk, visible_mask

TILE = 64  # keys per tile of the online-softmax kernels below
LONG_ROW_TILES = 64  # past this many tiles (4096 keys) the long-row code paths below take over
LONG_ROW_TOKENS = LONG_ROW_TILES * TILE
HALF_DTYPES = (torch.bfloat16, torch.float16)


def token_dropped_from_4096(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=False):
    """A kernel with a separate path for long rows (64 tiles of 64 keys or more) whose last-tile
    bound is an inclusive index used as an exclusive one: off by one, the last key a query sees is
    skipped. Short rows take the other path and are right; only contexts from 4096 tokens on lose the
    newest token (the one decode has just appended), an error of order 1/L that fixed tolerances
    never see."""
    validate_decode_inputs(q, kv_cache, block_table, cache_seqlens, head_dim_v)
    keys, valid, positions = gather(kv_cache, block_table, cache_seqlens)
    visible = visible_mask(valid, positions, cache_seqlens, q.shape[1], causal)
    end = visible.sum(-1, keepdim=True)  # visible keys form a prefix: each query sees positions < end
    long_rows = (cache_seqlens.long() >= LONG_ROW_TOKENS)[:, None, None, None]
    end = torch.where(long_rows, end - 1, end)  # BUG: the long path's bound is the last index, not one past it
    visible = visible & (positions < end)
    p, lse = masked_softmax(qk(q, keys) * softmax_scale, visible)
    return finish(pv(p, keys[..., :head_dim_v]), lse, q)


def scale_off_by_1e3(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=False):
    """A softmax scale 0.1 % off: stored in a half type before use (bf16 keeps 8 significant bits,
    fp16 11, i.e. up to 0.2 % and 0.05 % off) or a YaRN mscale constant written with too few digits.
    The lse moves by about 1e-3 times the softmax-weighted mean score and the output barely moves,
    far inside bf16 tolerances on any one small case."""
    validate_decode_inputs(q, kv_cache, block_table, cache_seqlens, head_dim_v)
    keys, valid, positions = gather(kv_cache, block_table, cache_seqlens)
    scores = qk(q, keys) * (softmax_scale * (1 + 1e-3))  # BUG: 0.1 % too large
    p, lse = masked_softmax(scores, visible_mask(valid, positions, cache_seqlens, q.shape[1], causal))
    return finish(pv(p, keys[..., :head_dim_v]), lse, q)


def _tile_step(scores: torch.Tensor, visible: torch.Tensor, m: torch.Tensor):
    """One online-softmax step over a tile: (m_new, rescale = exp(m - m_new), w = exp(s - m_new)),
    with w = 0 on keys the query does not see and rescale = 0 while nothing has been seen yet."""
    m_new = torch.maximum(m, scores.masked_fill(~visible, -math.inf).amax(-1))
    m_safe = torch.where(torch.isneginf(m_new), 0.0, m_new)  # a query that has seen no key yet
    rescale = torch.exp(m - m_safe)
    weights = torch.where(visible, torch.exp(scores - m_safe[..., None]), 0.0)
    return m_new, rescale, weights


def _online_softmax_result(m: torch.Tensor, l: torch.Tensor, acc: torch.Tensor):
    """(out, lse) = (acc / l, m + log l), with out 0 and lse -inf for a query that saw no key."""
    seen = l > 0
    out = acc / torch.where(seen, l, 1.0)[..., None]
    lse = torch.where(seen, m + torch.log(torch.where(seen, l, 1.0)), -math.inf)
    return out, lse


def _round_to_bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).to(F32)


@declare(Capabilities(dtypes=HALF_DTYPES))
def pv_accumulated_in_bf16_tiles(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale,
                                 causal=False):
    """Online softmax over 64-key tiles whose loop-carried P·V accumulator is stored in bfloat16
    (declared in the half input type, `acc = tl.zeros(..., dtype=q.dtype)`): each tile's update is
    computed in float32, then rounded as it is carried to the next tile. A row of one tile never
    rounds; the error then grows with the number of tiles (8 significant bits, 512 roundings at 32k
    tokens). The normaliser and the lse stay in float32."""
    validate_decode_inputs(q, kv_cache, block_table, cache_seqlens, head_dim_v)
    keys, valid, positions = gather(kv_cache, block_table, cache_seqlens)
    visible = visible_mask(valid, positions, cache_seqlens, q.shape[1], causal)
    scores = qk(q, keys) * softmax_scale
    keys_seen = visible.sum(-1)  # [b, s_q, 1]: visible keys form a prefix of this length
    m = torch.full(scores.shape[:-1], -math.inf, device=scores.device)
    l = torch.zeros(scores.shape[:-1], device=scores.device)
    acc = torch.zeros(*scores.shape[:-1], head_dim_v, device=scores.device)
    for start in range(0, scores.shape[-1], TILE):
        tile = slice(start, start + TILE)
        m, rescale, weights = _tile_step(scores[..., tile], visible[..., tile], m)
        l = l * rescale + weights.sum(-1)
        acc = acc * rescale[..., None] + pv(weights, keys[:, tile, :head_dim_v])
        carried = (keys_seen > start + TILE)[..., None]  # the query has more tiles to go
        acc = torch.where(carried, _round_to_bf16(acc), acc)  # BUG: the accumulator is carried in bf16
    out, lse = _online_softmax_result(m, l, acc)
    return finish(out, lse, q)


@declare(Capabilities(dtypes=HALF_DTYPES))
def normaliser_in_bf16(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=False):
    """Online softmax over 64-key tiles whose running row sum l (the softmax normaliser) is carried
    from tile to tile in bfloat16, as a kernel that keeps `l` next to its half-typed scratch does.
    Both out = acc / l and lse = m + log l use it. With 8 significant bits the sum stalls once one
    tile's contribution falls below half an ulp of l (about 1/256 of it), so long rows lose most
    of their later tiles' weight in l; a row of one tile never rounds."""
    validate_decode_inputs(q, kv_cache, block_table, cache_seqlens, head_dim_v)
    keys, valid, positions = gather(kv_cache, block_table, cache_seqlens)
    visible = visible_mask(valid, positions, cache_seqlens, q.shape[1], causal)
    scores = qk(q, keys) * softmax_scale
    keys_seen = visible.sum(-1)  # [b, s_q, 1]: visible keys form a prefix of this length
    m = torch.full(scores.shape[:-1], -math.inf, device=scores.device)
    l = torch.zeros(scores.shape[:-1], device=scores.device)
    acc = torch.zeros(*scores.shape[:-1], head_dim_v, device=scores.device)
    for start in range(0, scores.shape[-1], TILE):
        tile = slice(start, start + TILE)
        m, rescale, weights = _tile_step(scores[..., tile], visible[..., tile], m)
        l = l * rescale + weights.sum(-1)
        acc = acc * rescale[..., None] + pv(weights, keys[:, tile, :head_dim_v])
        carried = keys_seen > start + TILE  # the query has more tiles to go
        l = torch.where(carried, _round_to_bf16(l), l)  # BUG: the row sum is carried in bf16
    out, lse = _online_softmax_result(m, l, acc)
    return finish(out, lse, q)


def late_rescale(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=False):
    """Online softmax over 64-key tiles with a second copy of the loop for tiles past the first 64
    (past 4096 tokens; e.g. the tail a pipelined kernel runs after its unrolled main loop) that
    lacks the rescale `acc *= exp(m_old - m_new); l *= exp(m_old - m_new)`: whenever the running
    max grows in a late tile, everything accumulated before keeps its old, now too large, weight.
    Rows of at most 4096 keys never reach the tail loop and are right; longer ones are wrong only
    when a late tile raises the max, so the error is sparse and data-dependent."""
    validate_decode_inputs(q, kv_cache, block_table, cache_seqlens, head_dim_v)
    keys, valid, positions = gather(kv_cache, block_table, cache_seqlens)
    visible = visible_mask(valid, positions, cache_seqlens, q.shape[1], causal)
    scores = qk(q, keys) * softmax_scale
    m = torch.full(scores.shape[:-1], -math.inf, device=scores.device)
    l = torch.zeros(scores.shape[:-1], device=scores.device)
    acc = torch.zeros(*scores.shape[:-1], head_dim_v, device=scores.device)
    for index, start in enumerate(range(0, scores.shape[-1], TILE)):
        tile = slice(start, start + TILE)
        m, rescale, weights = _tile_step(scores[..., tile], visible[..., tile], m)
        if index < LONG_ROW_TILES:  # BUG: the tail loop (tiles 64 and on) never rescales acc and l
            l, acc = l * rescale, acc * rescale[..., None]
        l = l + weights.sum(-1)
        acc = acc + pv(weights, keys[:, tile, :head_dim_v])
    out, lse = _online_softmax_result(m, l, acc)
    return finish(out, lse, q)


def two_bugs_empty_nan_and_one_head_bf16_scores(q, kv_cache, block_table, cache_seqlens, head_dim_v,
                                                softmax_scale, causal=False):
    """Two independent bugs, modelled on vLLM's Triton MLA decode:
    (a) a query that sees no key (cache_seqlens 0, or a causal query before the first key) runs
        zero loop iterations and stores acc / e_sum = 0 / 0 = NaN, while its lse, e_max + log(e_sum)
        = -inf + log 0, comes out a correct -inf;
    (b) with a single query head (tl.dot needs 16 rows, so h == 1 takes an elementwise
        multiply-and-sum path written for the half type) the scores q·k are rounded to bfloat16
        before the softmax, on every input type: the lse is off by up to 2^-9 of the largest score.
    Every other case (a key to see, more than one head) is computed as correct_decode does."""
    validate_decode_inputs(q, kv_cache, block_table, cache_seqlens, head_dim_v)
    keys, valid, positions = gather(kv_cache, block_table, cache_seqlens)
    visible = visible_mask(valid, positions, cache_seqlens, q.shape[1], causal)
    scores = qk(q, keys)
    if q.shape[2] == 1:
        scores = _round_to_bf16(scores)  # BUG (b): the single-head path's scores in bf16
    scores = (scores * softmax_scale).masked_fill(~visible, -math.inf)
    if scores.shape[-1]:
        e_max = scores.amax(-1, keepdim=True)  # -inf for a query that sees no key
    else:  # every sequence is empty
        e_max = torch.full(scores.shape[:-1] + (1,), -math.inf, device=scores.device)
    weights = torch.where(visible, torch.exp(scores - e_max), 0.0)  # keys never visited add nothing
    e_sum = weights.sum(-1, keepdim=True)
    out = pv(weights, keys[..., :head_dim_v]) / e_sum  # BUG (a): 0 / 0 = NaN for a query that sees no key
    lse = (e_max + torch.log(e_sum)).squeeze(-1)
    return finish(out, lse, q)
