"""The project's PyTorch decode kernel: the contract computed in float32 with plain tensor ops.

Pages are gathered into a padded [b, t, d] tensor, scored with one batched matmul, softmaxed in
float32 and multiplied by V; vectorised over batch, heads and tokens. It runs on any device torch
supports and is the baseline the Triton kernel is measured against.

FP8 caches (both layouts of mla_verify.decode.fp8) are dequantised after the gather, in the compute
type (e4m3 × float32 scale rounded to float32, so `dequant_dtype=float32`). Sparse indices gather
each query's listed token slots instead of the block table's pages (invalid entries, -1 or past
the pool, are masked before any read); an attention sink scales the output by
1 / (1 + exp(sink − lse)). Its quantiser is the reference one (float32 amax/448 scales).
"""

from __future__ import annotations

import math

import torch

from mla_verify.decode.contract import Capabilities, declare, validate_decode_inputs
from mla_verify.decode.fp8 import KV_FORMATS, SCALE_GROUP, dequantize, quantize, split_packed

__all__ = ["torch_paged_decode"]


@declare(Capabilities(dtypes=(torch.float64, torch.float32, torch.float16, torch.bfloat16),
                      devices=("cpu", "cuda"), max_s_q=8, kv_formats=KV_FORMATS, sparse_kv_formats=KV_FORMATS,
                      attn_sink=True, dequant_dtype=torch.float32), quantizer=quantize)
def torch_paged_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                       cache_seqlens: torch.Tensor, head_dim_v: int, softmax_scale: float,
                       causal: bool = False, *, is_fp8_kvcache: bool = False, k_scale: torch.Tensor | None = None,
                       indices: torch.Tensor | None = None,
                       attn_sink: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """out [b, s_q, h_q, head_dim_v] in q.dtype, lse [b, h_q, s_q] float32 (natural log); empty rows
    give out 0 and lse -inf."""
    kv_format = validate_decode_inputs(q, kv_cache, block_table, cache_seqlens, head_dim_v,
                                       is_fp8_kvcache=is_fp8_kvcache, k_scale=k_scale, indices=indices,
                                       attn_sink=attn_sink)
    b, s_q, h_q, d = q.shape
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    if indices is not None:
        out, row_lse = _sparse(q, kv_cache, indices, head_dim_v, softmax_scale, kv_format, k_scale, compute)
    else:
        out, row_lse = _dense(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal,
                              kv_format, k_scale, compute)
    if attn_sink is not None:  # out · exp(lse) / (exp(lse) + exp(sink)); lse unchanged
        shift = attn_sink.to(q.device, compute)[None, None, :] - torch.where(torch.isfinite(row_lse), row_lse, 0.0)
        out = out * torch.where(torch.isfinite(row_lse), torch.sigmoid(-shift), 0.0)[..., None]
    return out.to(q.dtype), row_lse.permute(0, 2, 1).to(torch.float32)


def _values(rows: torch.Tensor, kv_format: str, d: int, head_dim_v: int, k_scale: torch.Tensor | None,
            compute: torch.dtype) -> torch.Tensor:
    """Gathered cache rows [..., width] as values [..., d] in the compute type."""
    if kv_format == "native":
        return rows.to(compute)
    if kv_format == "fp8_e4m3":
        return rows.to(compute) * k_scale.reshape(()).to(compute)
    return dequantize(rows, kv_format, d, head_dim_v, dtype=compute) if compute == torch.float64 else \
        _dequantize_float32(rows, d, head_dim_v)


def _dequantize_float32(rows: torch.Tensor, d: int, head_dim_v: int) -> torch.Tensor:
    """fp8_ds_mla rows dequantised in float32: each e4m3 · scale product rounded once to float32."""
    latent, scales, rope = split_packed(rows, d, head_dim_v)
    group = torch.arange(head_dim_v, device=rows.device) // SCALE_GROUP
    return torch.cat((latent.float() * scales.float()[..., group], rope.float()), dim=-1)


def _softmax_pv(q: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor, head_dim_v: int, softmax_scale: float,
                equation: str, compute: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [b, s, h, c], lse [b, s, h]) of one masked softmax; keys [b, t, d] or [b, s, t, d]."""
    qk, pv = equation.split("|")
    scores = torch.einsum(qk, q.to(compute), keys) * softmax_scale
    scores = scores.masked_fill(~visible, -math.inf)
    row_lse = torch.logsumexp(scores, dim=-1)  # -inf where nothing is visible
    has_key = torch.isfinite(row_lse)
    p = torch.exp(scores - torch.where(has_key, row_lse, 0.0)[..., None])
    return torch.einsum(pv, p, keys[..., :head_dim_v]), row_lse


def _dense(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, cache_seqlens: torch.Tensor,
           head_dim_v: int, softmax_scale: float, causal: bool, kv_format: str, k_scale: torch.Tensor | None,
           compute: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    b, s_q, h_q, d = q.shape
    page_size = kv_cache.shape[1]
    lengths = cache_seqlens.to(q.device, torch.int64)
    blocks = -(-int(lengths.max()) // page_size) if b else 0
    if blocks == 0:
        return (torch.zeros(b, s_q, h_q, head_dim_v, dtype=compute, device=q.device),
                torch.full((b, s_q, h_q), -math.inf, dtype=compute, device=q.device))
    positions = torch.arange(blocks * page_size, device=q.device)
    valid = positions[None, :] < lengths[:, None]  # [b, t]
    block_ids = block_table[:, :blocks].to(q.device, torch.int64)
    block_ids = torch.where(valid[:, ::page_size], block_ids, 0)  # unused entries may be out of range
    rows = kv_cache[:, :, 0][block_ids].reshape(b, blocks * page_size, -1)
    keys = _values(rows, kv_format, d, head_dim_v, k_scale, compute)
    keys = torch.where(valid[..., None], keys, 0)  # unused slots may hold NaN
    visible = valid[:, None, None, :]
    if causal:
        limit = lengths[:, None] - s_q + torch.arange(s_q, device=q.device)[None, :] + 1  # [b, s_q]
        visible = visible & (positions[None, None, :] < limit[..., None])[:, :, None, :]
    return _softmax_pv(q, keys, visible, head_dim_v, softmax_scale, "bshd,btd->bsht|bsht,btc->bshc", compute)


def _sparse(q: torch.Tensor, kv_cache: torch.Tensor, indices: torch.Tensor, head_dim_v: int, softmax_scale: float,
            kv_format: str, k_scale: torch.Tensor | None, compute: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query attends to the valid entries of its own list (0 <= index < num_blocks·page_size)."""
    d = q.shape[-1]
    num_blocks, page_size = kv_cache.shape[:2]
    index = indices.to(q.device, torch.int64)
    valid = (index >= 0) & (index < num_blocks * page_size)  # [b, s, t]
    slot = torch.where(valid, index, 0)  # invalid entries are never read
    rows = kv_cache[:, :, 0][slot // page_size, slot % page_size]  # [b, s, t, width]
    keys = _values(rows, kv_format, d, head_dim_v, k_scale, compute)
    keys = torch.where(valid[..., None], keys, 0)
    return _softmax_pv(q, keys, valid[:, :, None, :], head_dim_v, softmax_scale,
                       "bshd,bstd->bsht|bsht,bstc->bshc", compute)
