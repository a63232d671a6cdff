"""Head-grid bugs."""

from __future__ import annotations

import torch

from mla_verify.decode.contract import validate_decode_inputs

from .common import F32, finish, gather, masked_softmax, pv, qk, visible_mask

BLOCK_H = 16  # heads per program in vLLM/SGLang's Triton MLA decode


def head_tail_dropped(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=False):
    """Launch grid over head groups computed as h // BLOCK_H instead of cdiv(h, BLOCK_H), with
    BLOCK_H = min(16, h): h = 16, 32, 128 and every h < 16 work, but the heads past the last full
    group (h = 17, 20 (GLM-4.7-Flash), 40 (MiniCPM3), 65...) are never computed and keep the zeros
    of their freshly allocated output buffers."""
    validate_decode_inputs(q, kv_cache, block_table, cache_seqlens, head_dim_v)
    b, s_q, h, _ = q.shape
    keys, valid, positions = gather(kv_cache, block_table, cache_seqlens)
    visible = visible_mask(valid, positions, cache_seqlens, s_q, causal)
    out = torch.zeros(b, s_q, h, head_dim_v, dtype=F32)
    lse = torch.zeros(b, s_q, h, dtype=F32)
    block_h = min(BLOCK_H, h)
    for group in range(h // block_h):  # BUG: floor, not ceil; the tail group is never launched
        heads = slice(group * block_h, (group + 1) * block_h)
        p, group_lse = masked_softmax(qk(q[:, :, heads], keys) * softmax_scale, visible)
        out[:, :, heads] = pv(p, keys[..., :head_dim_v])
        lse[:, :, heads] = group_lse
    return finish(out, lse, q)
