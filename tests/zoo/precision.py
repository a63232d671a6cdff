"""Accumulation-precision bugs on float32 inputs."""

from __future__ import annotations

import torch

from mla_verify.decode.contract import Capabilities, declare, validate_decode_inputs

from .common import F32, finish, gather, masked_softmax, qk, visible_mask

TILE = 16


@declare(Capabilities(dtypes=(torch.float32,)))
def pv_accumulated_in_fp16(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=False):
    """A Triton decode kernel whose P·V accumulator is allocated in the input-agnostic "half" type
    (acc = tl.zeros(..., tl.float16) and p.to(tl.float16)), fine-looking for fp16 models but run
    on float32 inputs it keeps ~3 digits; the kernel still claims float32 inputs and float32
    accumulation. Each key tile's product is exact in fp32, the running sum is rounded to fp16."""
    validate_decode_inputs(q, kv_cache, block_table, cache_seqlens, head_dim_v)
    keys, valid, positions = gather(kv_cache, block_table, cache_seqlens)
    visible = visible_mask(valid, positions, cache_seqlens, q.shape[1], causal)
    p, lse = masked_softmax(qk(q, keys) * softmax_scale, visible)
    values = keys[..., :head_dim_v].to(torch.float16)
    acc = torch.zeros(*p.shape[:-1], head_dim_v, dtype=torch.float16)  # BUG: fp16 accumulator
    for start in range(0, p.shape[-1], TILE):
        tile = torch.einsum("bsht,btc->bshc", p[..., start:start + TILE].to(torch.float16).to(F32),
                            values[:, start:start + TILE].to(F32))
        acc = (acc.to(F32) + tile).to(torch.float16)
    return finish(acc.to(F32), lse, q)


def _round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """Round float32 to TF32 (10 explicit mantissa bits, round to nearest even), as tensor cores do."""
    bits = x.contiguous().view(torch.int32)
    bias = 0x0FFF + ((bits >> 13) & 1)
    return ((bits + bias) & ~0x1FFF).view(torch.float32)


def tf32_scores(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=False):
    """Scores computed with TF32 tensor-core matmuls on float32 inputs (torch.backends.cuda.matmul.
    allow_tf32 = True, or tl.dot's default input_precision="tf32" in Triton): q and k keep 10
    mantissa bits, so the scores carry ~1e-3 relative error while the kernel claims float32."""
    validate_decode_inputs(q, kv_cache, block_table, cache_seqlens, head_dim_v)
    keys, valid, positions = gather(kv_cache, block_table, cache_seqlens)
    visible = visible_mask(valid, positions, cache_seqlens, q.shape[1], causal)
    q32 = q.to(F32)
    if q.dtype == torch.float32:  # BUG: TF32 inputs to the QK^T product
        q32, keys_tf32 = _round_to_tf32(q32), _round_to_tf32(keys)
    else:
        keys_tf32 = keys
    p, lse = masked_softmax(qk(q32, keys_tf32) * softmax_scale, visible)
    return finish(torch.einsum("bsht,btc->bshc", p, keys[..., :head_dim_v]), lse, q)
