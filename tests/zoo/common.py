"""The correct building blocks the zoo's kernels share: gather pages, mask, softmax, P·V.

Each zoo kernel is these steps written out in its own function with exactly one step broken, so
the bug is the one line that differs from `correct_decode` below. Everything computes in float32
(the accumulation type the contract assumes for fp32/fp16/bf16 inputs).
"""

from __future__ import annotations

import math

import torch

from mla_verify.decode.contract import validate_decode_inputs

__all__ = ["F32", "gather", "qk", "pv", "visible_mask", "masked_softmax", "finish", "correct_decode"]

F32 = torch.float32


def gather(kv_cache: torch.Tensor, block_table: torch.Tensor,
           cache_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(keys [b, t, d] float32, valid [b, t], positions [t]): the pages covering the longest row,
    in logical order; slots past a row's length are zeroed (they may hold NaN) and unused
    block-table entries are never dereferenced (they may be out of range)."""
    b, page, d = block_table.shape[0], kv_cache.shape[1], kv_cache.shape[-1]
    lengths = cache_seqlens.long()
    blocks = -(-int(lengths.max()) // page) if b else 0
    positions = torch.arange(blocks * page, device=kv_cache.device)
    valid = positions[None, :] < lengths[:, None]
    ids = torch.where(valid[:, ::page], block_table[:, :blocks].long(), 0)
    keys = kv_cache[:, :, 0][ids].reshape(b, blocks * page, d).to(F32)
    keys = torch.where(valid[..., None], keys, 0.0)
    return keys, valid, positions


def qk(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Unscaled scores [b, s_q, h, t] = q·k over the full width d (latent and rope parts), float32."""
    return torch.einsum("bshd,btd->bsht", q.to(F32), keys.to(F32))


def pv(p: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """out [b, s_q, h, c] = P·V, float32."""
    return torch.einsum("bsht,btc->bshc", p, values.to(F32))


def visible_mask(valid: torch.Tensor, positions: torch.Tensor, cache_seqlens: torch.Tensor, s_q: int,
                 causal: bool) -> torch.Tensor:
    """[b, s_q, 1, t]: which keys each query row sees (causal: bottom-right aligned)."""
    visible = valid[:, None, None, :].expand(-1, s_q, -1, -1)
    if causal:
        limit = cache_seqlens.long()[:, None] - s_q + torch.arange(s_q, device=valid.device)[None, :] + 1  # [b, s_q]
        visible = visible & (positions[None, None, :] < limit[..., None])[:, :, None, :]
    return visible


def masked_softmax(scores: torch.Tensor, visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(p, lse) over the last axis; a row that sees nothing gets p = 0 and lse = -inf."""
    if scores.shape[-1] == 0:  # every sequence is empty
        return torch.zeros_like(scores), torch.full(scores.shape[:-1], -math.inf, dtype=scores.dtype, device=scores.device)
    masked = scores.masked_fill(~visible, -math.inf)
    row_max = masked.amax(-1, keepdim=True)
    empty = torch.isneginf(row_max)
    weights = torch.exp(masked - torch.where(empty, 0.0, row_max))  # exp(-inf) = 0 where masked
    total = weights.sum(-1, keepdim=True)
    p = weights / torch.where(empty, 1.0, total)
    lse = torch.where(empty, -math.inf, row_max + torch.log(torch.where(empty, 1.0, total)))
    return p, lse.squeeze(-1)


def finish(out: torch.Tensor, lse: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The contract's outputs: out [b, s_q, h, c] in q.dtype, lse [b, h, s_q] float32."""
    return out.to(q.dtype), lse.permute(0, 2, 1).to(F32).contiguous()


def correct_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                   cache_seqlens: torch.Tensor, head_dim_v: int, softmax_scale: float,
                   causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The template every mutant departs from (a correct kernel: the zoo's own control)."""
    validate_decode_inputs(q, kv_cache, block_table, cache_seqlens, head_dim_v)
    keys, valid, positions = gather(kv_cache, block_table, cache_seqlens)
    scores = qk(q, keys) * softmax_scale
    visible = visible_mask(valid, positions, cache_seqlens, q.shape[1], causal)
    p, lse = masked_softmax(scores, visible)
    out = pv(p, keys[..., :head_dim_v])
    return finish(out, lse, q)
