"""The layer-level fast path: an MLA attention layer (layer contract) that prefills in the naive
form with SDPA and decodes in the absorbed form through a paged decode kernel.

- prefill(x): K and V expanded per head from the latent, one causal SDPA call; the latent rows
  [c | k_pe] are written into a paged cache [num_blocks, page_size, 1, d_c + d_r].
- decode(x): the new tokens' latent rows are appended to their pages; the query is absorbed
  (q̃ = q_nope·W_UK, width d_c, with q_pe appended), the decode kernel attends over the pages
  (causal, bottom-right, so n > 1 new tokens see each other correctly), and W_UV and W_O are
  applied to its latent output.

The decode kernel is any function of the decode contract: the project's Triton kernel on CUDA,
the PyTorch kernel elsewhere.

Declared precision (`fast_layer_precision`): RMSNorm (with its weights held in the layer's dtype)
and RoPE are computed by the float64 reference functions and rounded once to the layer's dtype; the
linear maps and einsums run in the dtype, which torch sums in float32 for bf16/fp16 (products
exact) and rounds once; SDPA's math path (d_qk ≠ d_v) upcasts to float32 and its flash kernel
(d_qk = d_v) rounds exp(s − max) to the dtype before P·V, so P is declared stored in the dtype; the
PyTorch decode kernel computes in float32 (float64 for float64), the Triton kernel rounds P to the
input type; scores stay in float32. The layer exposes every intermediate of the layer contract
(q, latent, k_pe_raw, q_pe, k_pe, o), so each stage is judged on its own.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from mla_verify.config import MLAConfig
from mla_verify.layer.contract import InternalPrecision, LayerCapabilities
from mla_verify.reference import MLAWeights, apply_rope, rms_norm, rope_cos_sin

__all__ = ["FastMLALayer", "fast_layer", "fast_layer_torch_decode", "fast_layer_precision"]

F32, F64 = torch.float32, torch.float64
NOTE = "naive SDPA prefill, absorbed paged decode; RMSNorm and RoPE in float64, rounded once"


def fast_layer_precision(dtype: torch.dtype) -> InternalPrecision:
    """What the fast layer computes in a module of `dtype` (see the module docstring)."""
    if dtype == F64:
        return InternalPrecision.for_module(F64, note=NOTE)
    return InternalPrecision.for_module(dtype, note=NOTE, rms_norm=F64, rope=F64, rope_rotation=F64,
                                        scores_stored=F32, softmax=F32)


def _default_kernel(device: torch.device) -> Callable:
    if device.type == "cuda":
        from mla_verify.kernels.triton_decode import triton_paged_decode

        return triton_paged_decode
    from mla_verify.impls.torch_decode import torch_paged_decode

    return torch_paged_decode


class FastMLALayer:
    def __init__(self, config: MLAConfig, weights: MLAWeights, dtype: torch.dtype, device: str = "cpu",
                 decode_kernel: Callable | None = None, page_size: int = 64) -> None:
        self.config, self.dtype, self.device = config, dtype, torch.device(device)
        self.page_size = page_size
        self.kernel = decode_kernel or _default_kernel(self.device)
        self.precision = fast_layer_precision(dtype)
        h, dn, dv, dc = config.num_heads, config.qk_nope_head_dim, config.v_head_dim, config.kv_lora_rank

        def cast(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(self.device, dtype)

        self.w = {name: cast(getattr(weights, name)) for name in ("wq", "wq_a", "wq_b", "wkv_a", "wo")}
        self.q_norm = cast(weights.q_norm)
        self.kv_norm = cast(weights.kv_norm)
        wkv_b = weights.wkv_b.to(self.device, dtype).view(h, dn + dv, dc)
        self.w_uk, self.w_uv = wkv_b[:, :dn], wkv_b[:, dn:]  # [h, d_n, d_c], [h, d_v, d_c]
        self.cache: torch.Tensor | None = None
        self.block_table: torch.Tensor | None = None
        self.length = 0
        self._intermediates: dict[str, torch.Tensor] = {}

    def intermediates(self) -> dict[str, torch.Tensor]:
        """The checkpoints of the last prefill/decode call (layer contract), in the layer's dtype."""
        return dict(self._intermediates)

    def _rounded(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, self.dtype)

    def _project(self, x: torch.Tensor, start: int):
        """q_nope [b, s, h, d_n], q_pe [b, s, h, d_r], latent rows [b, s, d_c + d_r] at positions start…"""
        c = self.config
        h, dn, dr, dc = c.num_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.kv_lora_rank
        b, s, _ = x.shape
        if self.w["wq"] is not None:
            q = x @ self.w["wq"].T
        else:
            q = self._rounded(rms_norm(x @ self.w["wq_a"].T, self.q_norm, c.rms_norm_eps)) @ self.w["wq_b"].T
        q = q.view(b, s, h, dn + dr)
        cos, sin = rope_cos_sin(c, torch.arange(start, start + s))
        cos, sin = cos.to(self.device), sin.to(self.device)
        q_pe = self._rounded(apply_rope(q[..., dn:], cos[:, None, :], sin[:, None, :], c.rope_layout))
        kv = x @ self.w["wkv_a"].T
        latent = self._rounded(rms_norm(kv[..., :dc], self.kv_norm, c.rms_norm_eps))
        k_pe = self._rounded(apply_rope(kv[..., dc:], cos, sin, c.rope_layout))
        self._intermediates = {"q": q, "latent": latent, "k_pe_raw": kv[..., dc:], "q_pe": q_pe, "k_pe": k_pe}
        return q[..., :dn], q_pe, torch.cat((latent, k_pe), dim=-1)

    def _append(self, rows: torch.Tensor) -> None:
        """Write rows [b, s, d_c + d_r] at positions length … length+s−1, adding pages as needed."""
        b, s, width = rows.shape
        end = self.length + s
        blocks_per_row = math.ceil(end / self.page_size)
        if self.cache is None or self.block_table.shape[1] < blocks_per_row:
            grown = torch.zeros(b * blocks_per_row, self.page_size, 1, width, dtype=self.dtype, device=self.device)
            table = torch.arange(b * blocks_per_row, dtype=torch.int32, device=self.device).view(b, blocks_per_row)
            if self.cache is not None:  # copy the pages written so far to their new blocks
                old = self.block_table.shape[1]
                grown[table[:, :old].flatten().long()] = self.cache[self.block_table.flatten().long()]
            self.cache, self.block_table = grown, table
        positions = torch.arange(self.length, end, device=self.device)
        blocks = self.block_table[:, positions // self.page_size].long()  # [b, s]
        self.cache[blocks, (positions % self.page_size)[None, :].expand(b, s), 0] = rows
        self.length = end

    @torch.no_grad()
    def prefill(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        x = self._rounded(x)
        self.cache, self.block_table, self.length = None, None, 0
        q_nope, q_pe, rows = self._project(x, 0)
        self._append(rows)
        latent, k_pe = rows[..., :c.kv_lora_rank], rows[..., c.kv_lora_rank:]
        b, s, h = q_nope.shape[0], q_nope.shape[1], c.num_heads
        k = torch.cat((torch.einsum("bsc,hdc->bshd", latent, self.w_uk),
                       k_pe[:, :, None, :].expand(b, s, h, c.qk_rope_head_dim)), dim=-1)
        v = torch.einsum("bsc,hdc->bshd", latent, self.w_uv)
        q = torch.cat((q_nope, q_pe), dim=-1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True, scale=c.softmax_scale).transpose(1, 2)  # [b, s, h, d_v]
        self._intermediates["o"] = out
        return out.flatten(2) @ self.w["wo"].T

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        if self.cache is None:
            raise RuntimeError("decode() needs a prefill() first: the cache is empty")
        c = self.config
        x = self._rounded(x)
        b, n, _ = x.shape
        q_nope, q_pe, rows = self._project(x, self.length)
        self._append(rows)
        q_absorbed = torch.cat((torch.einsum("bshd,hdc->bshc", q_nope, self.w_uk), q_pe), dim=-1)
        lengths = torch.full((b,), self.length, dtype=torch.int32, device=self.device)
        out_latent, _ = self.kernel(q_absorbed.contiguous(), self.cache, self.block_table, lengths, c.kv_lora_rank,
                                    c.softmax_scale, causal=True)
        out_heads = torch.einsum("bshc,hdc->bshd", out_latent, self.w_uv)
        self._intermediates["o"] = out_heads
        return out_heads.flatten(2) @ self.w["wo"].T


def fast_layer(config: MLAConfig, weights: MLAWeights, dtype: torch.dtype, device: str = "cpu") -> FastMLALayer:
    """Layer-contract factory: the Triton decode kernel on CUDA, the PyTorch one elsewhere."""
    return FastMLALayer(config, weights, dtype, device)


fast_layer.capabilities = LayerCapabilities(devices=("cpu", "cuda"), both_paths=True,
                                            note="the Triton decode kernel on CUDA, the PyTorch one elsewhere")


def fast_layer_torch_decode(config: MLAConfig, weights: MLAWeights, dtype: torch.dtype,
                            device: str = "cpu") -> FastMLALayer:
    """Layer-contract factory with the PyTorch decode kernel and 16-token pages (several pages in
    short tests)."""
    from mla_verify.impls.torch_decode import torch_paged_decode

    return FastMLALayer(config, weights, dtype, device, decode_kernel=torch_paged_decode, page_size=16)


fast_layer_torch_decode.capabilities = LayerCapabilities(devices=("cpu", "cuda"), both_paths=True,
                                                         note="the PyTorch decode kernel, 16-token pages")
