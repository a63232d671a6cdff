"""Bugs in the paged decode path of the project's fast layer (mla_verify.impls.fast_layer): the
kernel called before the new rows are written, and the decode position shifted."""

from __future__ import annotations

import torch

from mla_verify.impls.fast_layer import FastMLALayer
from mla_verify.impls.torch_decode import torch_paged_decode


class _Fast(FastMLALayer):
    def __init__(self, config, weights, dtype, device="cpu"):
        super().__init__(config, weights, dtype, device, decode_kernel=torch_paged_decode, page_size=16)


class FastAppendedAfterAttention(_Fast):
    """The paged decode kernel is called with the cache lengths before the new tokens' rows are
    appended, and the rows are appended after attention: each decoded token attends to every
    earlier token but not to itself (and, causally aligned to the old length, a multi-token step
    loses its last keys)."""

    @torch.no_grad()
    def decode(self, x):
        c = self.config
        x = self._rounded(x)
        b, n, _ = x.shape
        q_nope, q_pe, rows = self._project(x, self.length)
        q_absorbed = torch.cat((torch.einsum("bshd,hdc->bshc", q_nope, self.w_uk), q_pe), dim=-1)
        lengths = torch.full((b,), self.length, dtype=torch.int32, device=self.device)  # BUG: before the append
        out_latent, _ = self.kernel(q_absorbed.contiguous(), self.cache, self.block_table, lengths, c.kv_lora_rank,
                                    c.softmax_scale, causal=True)
        self._append(rows)
        out_heads = torch.einsum("bshc,hdc->bshd", out_latent, self.w_uv)
        return out_heads.flatten(2) @ self.w["wo"].T


class FastDecodePositionOffByOne(_Fast):
    """The fast layer's decode projects the new tokens at position length + 1: query and key rotated
    one step too far, the wrong key kept in the paged cache."""

    def _project(self, x, start):
        return super()._project(x, start + 1 if start > 0 else 0)  # BUG: one position too far


def fast_appended_after_attention(config, weights, dtype, device="cpu"):
    return FastAppendedAfterAttention(config, weights, dtype, device)


def fast_decode_position_off_by_one(config, weights, dtype, device="cpu"):
    return FastDecodePositionOffByOne(config, weights, dtype, device)


fast_appended_after_attention.__doc__ = FastAppendedAfterAttention.__doc__
fast_decode_position_off_by_one.__doc__ = FastDecodePositionOffByOne.__doc__
