"""The float64 reference MLA: the ground truth every implementation is judged against.

Everything here runs in float64, RoPE angles and RMSNorm included. Two forms of the same layer sit
side by side:

- naive (MHA mode): K and V are expanded per head from the latent c and cached expanded;
- absorbed (MQA mode): W_UK is absorbed into the query, attention runs over the latent cache
  [c | k_pe] shared by all heads, and W_UV is applied after attention.

Einsum letters: b batch, s query positions, t key positions, h heads, d per-head width (d_n, d_r or
d_v, as the operand says), c latent (d_c), r rope (d_r), D hidden, n blocks, p slots in a page.

Weights follow DeepSeek-V3's inference/model.py and nn.Linear's [out, in] convention:
wq [h·(d_n+d_r), D] or wq_a [d_q', D] + q_norm [d_q'] + wq_b [h·(d_n+d_r), d_q'];
wkv_a [d_c+d_r, D]; kv_norm [d_c]; wkv_b [h·(d_n+d_v), d_c]; wo [D, h·d_v].
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from mla_verify.config import GQAConfig, MLAConfig, yarn_mscale
from mla_verify.decode.contract import validate_decode_inputs
from mla_verify.decode.fp8 import dequantize
from mla_verify.decode.sparse import compact_valid, sink_factor

__all__ = [
    "MLAWeights",
    "LatentCache",
    "ExpandedCache",
    "GQACache",
    "allocate_paged_latent_cache",
    "random_weights",
    "rms_norm",
    "rope_inv_freq",
    "rope_cos_sin",
    "apply_rope",
    "attention_scores_softmax",
    "mla_forward",
    "PagedDecodeTerms",
    "paged_decode_terms",
    "paged_decode_reference",
    "sparse_decode_terms",
    "decode_terms",
    "attn_sink_factor",
    "decode_reference",
]

F64 = torch.float64
Mode = Literal["naive", "absorbed"]


@dataclass
class MLAWeights:
    """One MLA layer's parameters in float64 (q-LoRA: wq is None; otherwise wq_a/q_norm/wq_b are)."""

    wkv_a: torch.Tensor
    kv_norm: torch.Tensor
    wkv_b: torch.Tensor
    wo: torch.Tensor
    wq: torch.Tensor | None = None
    wq_a: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None
    wq_b: torch.Tensor | None = None


def random_weights(config: MLAConfig, generator: torch.Generator, dtype: torch.dtype = F64) -> MLAWeights:
    """Weights scaled like a trained layer's (unit-variance activations), drawn from `generator`."""
    h, dn, dr, dv = config.num_heads, config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
    dc, D = config.kv_lora_rank, config.hidden_size

    def linear(out_features: int, in_features: int) -> torch.Tensor:
        return torch.randn(out_features, in_features, generator=generator, dtype=dtype) / math.sqrt(in_features)

    def norm_weight(width: int) -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(width, generator=generator, dtype=dtype)

    weights = MLAWeights(wkv_a=linear(dc + dr, D), kv_norm=norm_weight(dc), wkv_b=linear(h * (dn + dv), dc),
                         wo=linear(D, h * dv))
    if config.q_lora_rank is None:
        weights.wq = linear(h * (dn + dr), D)
    else:
        weights.wq_a = linear(config.q_lora_rank, D)
        weights.q_norm = norm_weight(config.q_lora_rank)
        weights.wq_b = linear(h * (dn + dr), config.q_lora_rank)
    return weights


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.to(F64)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.to(F64)


def rope_inv_freq(config: MLAConfig) -> torch.Tensor:
    """[d_r/2] inverse frequencies in float64, with YaRN's ramp between interpolated and original
    frequencies when YaRN is configured (DeepSeek's precompute_freqs_cis)."""
    dim, base = config.qk_rope_head_dim, config.rope_theta
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=F64) / dim)
    yarn = config.yarn
    if yarn is None or yarn.factor <= 1.0:
        return inv_freq

    def correction_dim(num_rotations: float) -> float:
        return dim * math.log(yarn.original_max_position_embeddings / (num_rotations * 2 * math.pi)) / (
            2 * math.log(base))

    low = max(math.floor(correction_dim(yarn.beta_fast)), 0)
    high = min(math.ceil(correction_dim(yarn.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=F64) - low) / (high - low)).clamp(0, 1)
    keep_original = 1 - ramp
    return inv_freq / yarn.factor * (1 - keep_original) + inv_freq * keep_original


def rope_cos_sin(config: MLAConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [len(positions), d_r/2] in float64. YaRN's cos/sin factor mscale/mscale_all_dim (HF)
    is 1 for every published preset but kept for configs that set them apart."""
    angles = torch.outer(positions.to(F64), rope_inv_freq(config))
    magnitude = 1.0
    if config.yarn is not None:
        magnitude = yarn_mscale(config.yarn.factor, config.yarn.mscale) / yarn_mscale(
            config.yarn.factor, config.yarn.mscale_all_dim)
    return torch.cos(angles) * magnitude, torch.sin(angles) * magnitude


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str) -> torch.Tensor:
    """Rotate x [..., d_r]: pairs (x_2j, x_2j+1) for 'interleaved', (x_j, x_j+d_r/2) for 'halves'.
    cos/sin [..., d_r/2] must broadcast against x[..., :d_r/2]; the caller aligns the position
    axis (a shape-guessing broadcast once rotated heads instead of positions when h == s)."""
    x = x.to(F64)
    if layout == "interleaved":
        even, odd = x[..., 0::2], x[..., 1::2]
        return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)
    half = x.shape[-1] // 2
    first, second = x[..., :half], x[..., half:]
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)


def attention_scores_softmax(scores: torch.Tensor, visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked softmax over the last axis. Returns (p, lse); a row with nothing visible gets p = 0 and
    lse = -inf rather than NaN."""
    if scores.shape[-1] == 0:
        return torch.zeros_like(scores), torch.full(scores.shape[:-1], -math.inf, dtype=scores.dtype,
                                                    device=scores.device)
    masked = scores.masked_fill(~visible, -math.inf)
    row_max = masked.amax(dim=-1, keepdim=True)
    empty = torch.isneginf(row_max)
    shifted = torch.where(empty, torch.zeros_like(masked), masked - torch.where(empty, 0.0, row_max))
    weights = torch.where(visible, torch.exp(shifted), torch.zeros_like(shifted))
    total = weights.sum(dim=-1, keepdim=True)
    p = torch.where(empty, torch.zeros_like(weights), weights / torch.where(empty, 1.0, total))
    lse = torch.where(empty, -math.inf, row_max + torch.log(torch.where(empty, 1.0, total)))
    return p, lse.squeeze(-1)


@dataclass
class LatentCache:
    """Absorbed-mode cache: kv [b, T, d_c] (normalised latent) and pe [b, T, d_r] (rotated rope key)."""

    kv: torch.Tensor
    pe: torch.Tensor

    @classmethod
    def allocate(cls, config: MLAConfig, batch: int, max_len: int, dtype: torch.dtype = F64) -> LatentCache:
        return cls(kv=torch.zeros(batch, max_len, config.kv_lora_rank, dtype=dtype),
                   pe=torch.zeros(batch, max_len, config.qk_rope_head_dim, dtype=dtype))

    @property
    def nbytes(self) -> int:
        return self.kv.nbytes + self.pe.nbytes


@dataclass
class ExpandedCache:
    """Naive-mode cache: k [b, T, h, d_n+d_r] and v [b, T, h, d_v], expanded per head."""

    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def allocate(cls, config: MLAConfig, batch: int, max_len: int, dtype: torch.dtype = F64) -> ExpandedCache:
        h = config.num_heads
        return cls(k=torch.zeros(batch, max_len, h, config.qk_head_dim, dtype=dtype),
                   v=torch.zeros(batch, max_len, h, config.v_head_dim, dtype=dtype))

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


@dataclass
class GQACache:
    """A grouped-query attention model's cache, for size comparisons: k and v [b, T, g, d_h]
    (MHA: g = h; MQA: g = 1)."""

    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def allocate(cls, config: GQAConfig, batch: int, max_len: int, dtype: torch.dtype = F64) -> GQACache:
        shape = (batch, max_len, config.num_kv_heads, config.head_dim)
        return cls(k=torch.zeros(shape, dtype=dtype), v=torch.zeros(shape, dtype=dtype))

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


def allocate_paged_latent_cache(config: MLAConfig, num_blocks: int, page_size: int,
                                dtype: torch.dtype = F64) -> torch.Tensor:
    """The decode contract's paged latent cache [num_blocks, page_size, 1, d_c + d_r]."""
    return torch.zeros(num_blocks, page_size, 1, config.latent_width, dtype=dtype)


@dataclass
class _Projections:
    q_nope: torch.Tensor  # [b, s, h, d_n]
    q_pe: torch.Tensor  # [b, s, h, d_r], rotated
    latent: torch.Tensor  # [b, s, d_c], normalised
    k_pe: torch.Tensor  # [b, s, d_r], rotated
    w_uk: torch.Tensor  # [h, d_n, d_c]
    w_uv: torch.Tensor  # [h, d_v, d_c]


def _project(config: MLAConfig, weights: MLAWeights, x: torch.Tensor, start_pos: int) -> _Projections:
    h, dn, dr, dv = config.num_heads, config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
    dc = config.kv_lora_rank
    b, s, _ = x.shape
    x = x.to(F64)
    if weights.wq is not None:
        q = x @ weights.wq.to(F64).T
    else:
        q = rms_norm(x @ weights.wq_a.to(F64).T, weights.q_norm, config.rms_norm_eps) @ weights.wq_b.to(F64).T
    q = q.view(b, s, h, dn + dr)
    cos, sin = rope_cos_sin(config, torch.arange(start_pos, start_pos + s))
    kv = x @ weights.wkv_a.to(F64).T
    wkv_b = weights.wkv_b.to(F64).view(h, dn + dv, dc)
    return _Projections(
        q_nope=q[..., :dn],
        q_pe=apply_rope(q[..., dn:], cos[:, None, :], sin[:, None, :], config.rope_layout),  # [b, s, h, r]
        latent=rms_norm(kv[..., :dc], weights.kv_norm, config.rms_norm_eps),
        k_pe=apply_rope(kv[..., dc:], cos, sin, config.rope_layout),  # [b, s, r]
        w_uk=wkv_b[:, :dn],
        w_uv=wkv_b[:, dn:],
    )


def _causal_visibility(s: int, start_pos: int, device: torch.device) -> torch.Tensor:
    """[s, start_pos + s]: query i (absolute position start_pos + i) sees keys at positions ≤ its own."""
    query_pos = torch.arange(start_pos, start_pos + s, device=device)[:, None]
    key_pos = torch.arange(start_pos + s, device=device)[None, :]
    return key_pos <= query_pos


def mla_forward(config: MLAConfig, weights: MLAWeights, x: torch.Tensor, start_pos: int = 0,
                cache: LatentCache | ExpandedCache | None = None, mode: Mode = "absorbed") -> torch.Tensor:
    """One MLA attention layer on x [b, s, D] at positions start_pos .. start_pos+s-1 → [b, s, D].

    With a cache, the new tokens are written at [start_pos, start_pos+s) and attention runs over
    [0, start_pos+s) (prefill when start_pos = 0, incremental decode after). Without one, start_pos
    must be 0. The cache type must match the mode: LatentCache for 'absorbed', ExpandedCache for
    'naive'."""
    if x.dim() != 3 or x.shape[-1] != config.hidden_size:
        raise ValueError(f"x must be [b, s, {config.hidden_size}]; got shape {tuple(x.shape)}")
    if mode not in ("naive", "absorbed"):
        raise ValueError(f"mode must be 'naive' or 'absorbed'; got {mode!r}")
    b, s, _ = x.shape
    if cache is None:
        if start_pos != 0:
            raise ValueError(f"start_pos must be 0 without a cache; got {start_pos}")
        cache = (LatentCache if mode == "absorbed" else ExpandedCache).allocate(config, b, s)
    expected = LatentCache if mode == "absorbed" else ExpandedCache
    if not isinstance(cache, expected):
        raise TypeError(f"cache must be a {expected.__name__} in {mode} mode; got {type(cache).__name__}")
    end = start_pos + s
    capacity = (cache.kv if mode == "absorbed" else cache.k).shape[1]
    if not 0 <= start_pos or end > capacity:
        raise ValueError(f"start_pos + s = {end} must fit the cache's {capacity} positions")

    pr = _project(config, weights, x, start_pos)
    visible = _causal_visibility(s, start_pos, x.device)[None, :, None, :]  # [1, s, 1, t]
    if mode == "absorbed":
        q_latent = torch.einsum("bshd,hdc->bshc", pr.q_nope, pr.w_uk)
        cache.kv[:, start_pos:end] = pr.latent.to(cache.kv.dtype)
        cache.pe[:, start_pos:end] = pr.k_pe.to(cache.pe.dtype)
        latent, k_pe = cache.kv[:, :end].to(F64), cache.pe[:, :end].to(F64)
        scores = (torch.einsum("bshc,btc->bsht", q_latent, latent)
                  + torch.einsum("bshr,btr->bsht", pr.q_pe, k_pe)) * config.softmax_scale
        p, _ = attention_scores_softmax(scores, visible)
        out_latent = torch.einsum("bsht,btc->bshc", p, latent)
        out_heads = torch.einsum("bshc,hdc->bshd", out_latent, pr.w_uv)
    else:
        h = config.num_heads
        k_nope = torch.einsum("bsc,hdc->bshd", pr.latent, pr.w_uk)
        k = torch.cat((k_nope, pr.k_pe[:, :, None, :].expand(b, s, h, config.qk_rope_head_dim)), dim=-1)
        cache.k[:, start_pos:end] = k.to(cache.k.dtype)
        cache.v[:, start_pos:end] = torch.einsum("bsc,hdc->bshd", pr.latent, pr.w_uv).to(cache.v.dtype)
        q = torch.cat((pr.q_nope, pr.q_pe), dim=-1)
        scores = torch.einsum("bshd,bthd->bsht", q, cache.k[:, :end].to(F64)) * config.softmax_scale
        p, _ = attention_scores_softmax(scores, visible)
        out_heads = torch.einsum("bsht,bthd->bshd", p, cache.v[:, :end].to(F64))
    return out_heads.flatten(2) @ weights.wo.to(F64).T


@dataclass
class PagedDecodeTerms:
    """The float64 quantities of one paged decode, kept for the error model.

    rows [b, t, d] the gathered cache rows (zero past each length); valid [b, t] slot within the
    length; visible [b, s_q, 1|h, t] slot seen by the query row; scores [b, s_q, h, t] scaled;
    p [b, s_q, h, t] softmax; out [b, s_q, h, head_dim_v]; lse [b, h, s_q] natural log."""

    rows: torch.Tensor
    valid: torch.Tensor
    visible: torch.Tensor
    scores: torch.Tensor
    p: torch.Tensor
    out: torch.Tensor
    lse: torch.Tensor


def paged_decode_terms(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                       cache_seqlens: torch.Tensor, head_dim_v: int, softmax_scale: float,
                       causal: bool = False) -> PagedDecodeTerms:
    """paged_decode_reference with its intermediate quantities (see PagedDecodeTerms)."""
    validate_decode_inputs(q, kv_cache, block_table, cache_seqlens, head_dim_v)
    b, s_q, h_q, d = q.shape
    page_size = kv_cache.shape[1]
    device = q.device
    lengths = cache_seqlens.to(device=device, dtype=torch.int64)
    max_len = int(lengths.max()) if b else 0
    blocks_needed = -(-max_len // page_size)

    # Gather [b, t, d] over the longest sequence; slots past a length are zeroed (they may hold NaN)
    # and masked out of the softmax. Only the blocks a sequence uses are read, so out-of-range ids
    # in unused block-table entries never matter.
    positions = torch.arange(blocks_needed * page_size, device=device)
    valid = positions[None, :] < lengths[:, None]  # [b, t]
    block_ids = block_table[:, :blocks_needed].to(device=device, dtype=torch.int64)
    block_ids = torch.where(valid[:, ::page_size], block_ids, torch.zeros_like(block_ids))
    rows = kv_cache[:, :, 0, :][block_ids].reshape(b, blocks_needed * page_size, d).to(F64)
    rows = torch.where(valid[..., None], rows, torch.zeros((), dtype=F64, device=device))

    scores = torch.einsum("bshd,btd->bsht", q.to(F64), rows) * softmax_scale
    visible = valid[:, None, None, :]  # [b, 1, 1, t]
    if causal:
        query_index = torch.arange(s_q, device=device)
        limit = lengths[:, None] - s_q + query_index[None, :] + 1  # [b, s_q]: sees positions < limit
        visible = visible & (positions[None, None, :] < limit[..., None])[:, :, None, :]
    p, lse = attention_scores_softmax(scores, visible)
    out = torch.einsum("bsht,btc->bshc", p, rows[..., :head_dim_v])
    return PagedDecodeTerms(rows=rows, valid=valid, visible=visible, scores=scores, p=p, out=out,
                            lse=lse.permute(0, 2, 1).contiguous())


def paged_decode_reference(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                           cache_seqlens: torch.Tensor, head_dim_v: int, softmax_scale: float,
                           causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The decode core in the contract's layout (see mla_verify.decode.contract), computed in float64 from
    the inputs exactly as given (already rounded to the kernel's input type).

    Returns out [b, s_q, h_q, head_dim_v] float64 and lse [b, h_q, s_q] float64 (natural log); a row
    that sees no key has out 0 and lse -inf."""
    terms = paged_decode_terms(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal)
    return terms.out, terms.lse


def sparse_decode_terms(q: torch.Tensor, token_rows: torch.Tensor, indices: torch.Tensor, head_dim_v: int,
                        softmax_scale: float) -> PagedDecodeTerms:
    """Sparse decode in float64 over the pool's token rows [num_slots, d] (FP8 dequantised exactly
    by the caller): query (i, j) attends to the valid entries of indices[i, j] (0 <= index <
    num_slots; -1 and positive indices past the pool are ignored; a duplicate is one more term).

    The terms are flattened to one query per sequence: batch b·s_q (row i·s_q + j), s_q 1, keys
    the topk entries with each list's valid ones moved to the front (rows zero past them)."""
    b, s_q, h_q, d = q.shape
    num_slots = token_rows.shape[0]
    slots, valid = compact_valid(indices.to(q.device).reshape(b * s_q, -1), num_slots)  # [b·s_q, topk]
    rows = token_rows.to(F64)[slots]  # [b·s_q, topk, d]
    rows = torch.where(valid[..., None], rows, torch.zeros((), dtype=F64, device=rows.device))
    flat_q = q.to(F64).reshape(b * s_q, 1, h_q, d)
    scores = torch.einsum("bshd,btd->bsht", flat_q, rows) * softmax_scale
    visible = valid[:, None, None, :]
    p, lse = attention_scores_softmax(scores, visible)
    out = torch.einsum("bsht,btc->bshc", p, rows[..., :head_dim_v])
    return PagedDecodeTerms(rows=rows, valid=valid, visible=visible, scores=scores, p=p, out=out,
                            lse=lse.permute(0, 2, 1).contiguous())


def decode_terms(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, cache_seqlens: torch.Tensor,
                 head_dim_v: int, softmax_scale: float, causal: bool = False, *, is_fp8_kvcache: bool = False,
                 k_scale: torch.Tensor | None = None, indices: torch.Tensor | None = None) -> PagedDecodeTerms:
    """The terms of any decode call of the contract: an FP8 cache is dequantised exactly (float64,
    the scales as stored) and the dense or the sparse reference runs on it. Sparse terms are
    flattened to b·s_q single-query sequences (see sparse_decode_terms)."""
    kv_format = validate_decode_inputs(q, kv_cache, block_table, cache_seqlens, head_dim_v,
                                       is_fp8_kvcache=is_fp8_kvcache, k_scale=k_scale, indices=indices)
    d = q.shape[-1]
    values = dequantize(kv_cache, kv_format, d, head_dim_v, k_scale)  # [n, page, 1, d] float64
    if indices is not None:
        return sparse_decode_terms(q, values.reshape(-1, d), indices, head_dim_v, softmax_scale)
    return paged_decode_terms(q.to(F64), values, block_table, cache_seqlens, head_dim_v, softmax_scale,
                              causal and indices is None)


def attn_sink_factor(lse: torch.Tensor, attn_sink: torch.Tensor) -> torch.Tensor:
    """[b, s_q, h]: exp(lse) / (exp(lse) + exp(sink_h)) for lse [b, h, s_q] (FlashMLA's attention
    sink; 0 for a +inf sink, 1 for -inf)."""
    return sink_factor(lse.permute(0, 2, 1), attn_sink)


def decode_reference(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                     cache_seqlens: torch.Tensor, head_dim_v: int, softmax_scale: float, causal: bool = False, *,
                     is_fp8_kvcache: bool = False, k_scale: torch.Tensor | None = None,
                     indices: torch.Tensor | None = None,
                     attn_sink: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole contract in float64 (FP8 caches, sparse indices, sinks): out [b, s_q, h_q,
    head_dim_v] and lse [b, h_q, s_q] (natural log, not affected by a sink); a row that sees no key
    has out 0 and lse -inf."""
    b, s_q, h_q, _ = q.shape
    terms = decode_terms(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal,
                         is_fp8_kvcache=is_fp8_kvcache, k_scale=k_scale, indices=indices)
    out = terms.out.reshape(b, s_q, h_q, head_dim_v)
    lse = terms.lse.reshape(b, s_q, h_q).permute(0, 2, 1) if indices is not None else terms.lse
    if attn_sink is not None:
        out = out * attn_sink_factor(lse, attn_sink)[..., None]
    return out, lse
