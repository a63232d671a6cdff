"""The project's PyTorch decode kernel: the contract computed in float32 with plain tensor ops.

Pages are gathered into a padded [b, t, d] tensor, scored with one batched matmul, softmaxed in
float32 and multiplied by V; vectorised over batch, heads and tokens. It runs on any device torch
supports and is the baseline the Triton kernel is measured against.
"""

from __future__ import annotations

import math

import torch

from mla_verify.decode.contract import Capabilities, declare, validate_decode_inputs

__all__ = ["torch_paged_decode"]


@declare(Capabilities(dtypes=(torch.float64, torch.float32, torch.float16, torch.bfloat16),
                      devices=("cpu", "cuda"), max_s_q=8))
def torch_paged_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                       cache_seqlens: torch.Tensor, head_dim_v: int, softmax_scale: float,
                       causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """out [b, s_q, h_q, head_dim_v] in q.dtype, lse [b, h_q, s_q] float32 (natural log); empty rows
    give out 0 and lse -inf."""
    validate_decode_inputs(q, kv_cache, block_table, cache_seqlens, head_dim_v)
    b, s_q, h_q, d = q.shape
    page_size = kv_cache.shape[1]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    lengths = cache_seqlens.to(q.device, torch.int64)
    blocks = -(-int(lengths.max()) // page_size) if b else 0
    out = torch.zeros(b, s_q, h_q, head_dim_v, dtype=compute, device=q.device)
    lse = torch.full((b, h_q, s_q), -math.inf, dtype=compute, device=q.device)
    if blocks == 0:
        return out.to(q.dtype), lse.to(torch.float32)

    positions = torch.arange(blocks * page_size, device=q.device)
    valid = positions[None, :] < lengths[:, None]  # [b, t]
    block_ids = block_table[:, :blocks].to(q.device, torch.int64)
    block_ids = torch.where(valid[:, ::page_size], block_ids, 0)  # unused entries may be out of range
    keys = kv_cache[:, :, 0][block_ids].reshape(b, blocks * page_size, d)
    keys = torch.where(valid[..., None], keys, 0).to(compute)  # unused slots may hold NaN

    scores = torch.einsum("bshd,btd->bsht", q.to(compute), keys) * softmax_scale
    visible = valid[:, None, None, :]
    if causal:
        limit = lengths[:, None] - s_q + torch.arange(s_q, device=q.device)[None, :] + 1  # [b, s_q]
        visible = visible & (positions[None, None, :] < limit[..., None])[:, :, None, :]
    scores = scores.masked_fill(~visible, -math.inf)
    row_lse = torch.logsumexp(scores, dim=-1)  # -inf where nothing is visible
    has_key = torch.isfinite(row_lse)
    p = torch.exp(scores - torch.where(has_key, row_lse, 0.0)[..., None])
    out = torch.einsum("bsht,btc->bshc", p, keys[..., :head_dim_v])
    return out.to(q.dtype), row_lse.permute(0, 2, 1).to(torch.float32)
