"""FP8 latent-cache bugs: scales read wrong, the rope part quantised, V left undequantised, a
quantiser that rounds its scales. Each kernel departs from `correct_fp8_decode` (the FP8/sparse
control) on the line marked BUG; the format is mla_verify.decode.fp8's."""

from __future__ import annotations

import torch

from mla_verify.decode.contract import Capabilities, declare, validate_decode_inputs
from mla_verify.decode.fp8 import SCALE_GROUP, quantize, round_to_e4m3, split_packed

from .common import F32, finish, masked_softmax, visible_mask

__all__ = ["gather_rows", "dequantize_rows", "dense_fp8_float32", "correct_fp8_decode", "scales_per_64_values",
           "scales_rounded_to_power_of_two", "rope_part_quantized", "v_not_dequantized",
           "quantizer_writes_power_of_two_scales", "dequantized_to_input_type",
           "many_rows_out_of_shared_memory", "flushes_subnormals_to_zero"]

FP8_DENSE = Capabilities(kv_formats=("native", "fp8_ds_mla", "fp8_e4m3"))


def gather_rows(kv_cache, block_table, cache_seqlens):
    """(rows [b, t, width] as stored, valid [b, t], positions [t]): the pages covering the longest
    row; unused block-table entries are never dereferenced."""
    b, page = block_table.shape[0], kv_cache.shape[1]
    lengths = cache_seqlens.long()
    blocks = -(-int(lengths.max()) // page) if b else 0
    positions = torch.arange(blocks * page, device=kv_cache.device)
    valid = positions[None, :] < lengths[:, None]
    ids = torch.where(valid[:, ::page], block_table[:, :blocks].long(), 0)
    return kv_cache[:, :, 0][ids].reshape(b, blocks * page, kv_cache.shape[-1]), valid, positions


def dequantize_rows(rows, d, head_dim_v, k_scale=None):
    """Cache rows as stored → float32 values [..., d] (fp8_ds_mla when k_scale is None and the rows
    are 1-byte, per-tensor e4m3 with k_scale, native otherwise)."""
    if rows.element_size() != 1:
        return rows.to(F32)
    if k_scale is not None:
        return rows.to(F32) * k_scale.reshape(()).to(F32)
    latent, scales, rope = split_packed(rows, d, head_dim_v)
    group = torch.arange(head_dim_v, device=rows.device) // SCALE_GROUP
    return torch.cat((latent.to(F32) * scales.to(F32)[..., group], rope.to(F32)), dim=-1)


def _attend(q, keys, values, valid, positions, cache_seqlens, head_dim_v, softmax_scale, causal):
    keys = torch.where(valid[..., None], keys, 0.0)
    values = torch.where(valid[..., None], values, 0.0)
    scores = torch.einsum("bshd,btd->bsht", q.to(F32), keys) * softmax_scale
    p, lse = masked_softmax(scores, visible_mask(valid, positions, cache_seqlens, q.shape[1], causal))
    return torch.einsum("bsht,btc->bshc", p, values[..., :head_dim_v]), lse


@declare(FP8_DENSE, quantizer=quantize)
def correct_fp8_decode(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=False, *,
                       is_fp8_kvcache=False, k_scale=None):
    """The FP8 template the FP8 mutants depart from (a correct kernel, certified as a control):
    gather the stored rows, dequantise them in float32, attend as the zoo's template does."""
    validate_decode_inputs(q, kv_cache, block_table, cache_seqlens, head_dim_v, is_fp8_kvcache=is_fp8_kvcache,
                           k_scale=k_scale)
    return finish(*dense_fp8_float32(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal,
                                     k_scale), q)


def dense_fp8_float32(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal, k_scale=None):
    """The template's dense decode before the output rounding: (out [b, s, h, c] float32, lse [b, s, h])."""
    rows, valid, positions = gather_rows(kv_cache, block_table, cache_seqlens)
    values = dequantize_rows(rows, q.shape[-1], head_dim_v, k_scale)
    return _attend(q, values, values, valid, positions, cache_seqlens, head_dim_v, softmax_scale, causal)


@declare(Capabilities(kv_formats=("fp8_ds_mla",), head_dims=((144, 128), (288, 256))))
def scales_per_64_values(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=False, *,
                         is_fp8_kvcache=False, k_scale=None):
    """The scale of latent value j read as scale[j // 64] instead of scale[j // 128] (a layout change
    from a 64-wide tile format, like FlashMLA's MODEL1 layout, applied to the V3.2 one): groups past
    the first read the wrong scale, and past the last scale the first rope bytes as a float32."""
    validate_decode_inputs(q, kv_cache, block_table, cache_seqlens, head_dim_v, is_fp8_kvcache=is_fp8_kvcache,
                           k_scale=k_scale)
    d = q.shape[-1]
    rows, valid, positions = gather_rows(kv_cache, block_table, cache_seqlens)
    raw = rows.view(torch.uint8)
    latent, _, rope = split_packed(rows, d, head_dim_v)
    group = torch.arange(head_dim_v, device=rows.device) // 64  # BUG: the contract's groups are 128 values
    offsets = head_dim_v + 4 * group[:, None] + torch.arange(4, device=rows.device)[None, :]  # [c, 4] bytes
    scale = raw[..., offsets].contiguous().view(torch.float32)[..., 0]  # [b, t, c]
    values = torch.cat((latent.to(F32) * scale, rope.to(F32)), dim=-1)
    out, lse = _attend(q, values, values, valid, positions, cache_seqlens, head_dim_v, softmax_scale, causal)
    return finish(out, lse, q)


@declare(Capabilities(kv_formats=("native", "fp8_ds_mla")))
def scales_rounded_to_power_of_two(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=False,
                                   *, is_fp8_kvcache=False, k_scale=None):
    """The float32 scales converted through e8m0 (a power of two, rounded up) before use, as one GPU
    generation's fast path did for per-token FP8 scales: exact when the quantiser wrote powers of
    two, wrong by up to 2× otherwise."""
    validate_decode_inputs(q, kv_cache, block_table, cache_seqlens, head_dim_v, is_fp8_kvcache=is_fp8_kvcache,
                           k_scale=k_scale)
    d = q.shape[-1]
    rows, valid, positions = gather_rows(kv_cache, block_table, cache_seqlens)
    if not is_fp8_kvcache:
        values = rows.to(F32)
    else:
        latent, scales, rope = split_packed(rows, d, head_dim_v)
        e8m0 = torch.exp2(torch.ceil(torch.log2(scales.to(F32))))  # BUG: float32 scales rounded to powers of two
        group = torch.arange(head_dim_v, device=rows.device) // SCALE_GROUP
        values = torch.cat((latent.to(F32) * e8m0[..., group], rope.to(F32)), dim=-1)
    out, lse = _attend(q, values, values, valid, positions, cache_seqlens, head_dim_v, softmax_scale, causal)
    return finish(out, lse, q)


# float32 only: there the lse always shows the moved scores first; in bf16 at serving scale the
# sharp out tier can meet it first in a case that cannot shrink (two signatures of one bug)
@declare(Capabilities(dtypes=(torch.float32,), kv_formats=("native", "fp8_ds_mla")))
def rope_part_quantized(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=False, *,
                        is_fp8_kvcache=False, k_scale=None):
    """The bf16 rope part of the fp8_ds_mla row passed through e4m3 like the latent part (a packed
    layout written for an all-e4m3 row): the rope key loses all but 4 significant bits, so every
    score moves."""
    validate_decode_inputs(q, kv_cache, block_table, cache_seqlens, head_dim_v, is_fp8_kvcache=is_fp8_kvcache,
                           k_scale=k_scale)
    d = q.shape[-1]
    rows, valid, positions = gather_rows(kv_cache, block_table, cache_seqlens)
    if not is_fp8_kvcache:
        values = rows.to(F32)
    else:
        latent, scales, rope = split_packed(rows, d, head_dim_v)
        group = torch.arange(head_dim_v, device=rows.device) // SCALE_GROUP
        rope = round_to_e4m3(rope.double()).to(F32)  # BUG: the rope part is bf16, not quantised
        values = torch.cat((latent.to(F32) * scales.to(F32)[..., group], rope), dim=-1)
    out, lse = _attend(q, values, values, valid, positions, cache_seqlens, head_dim_v, softmax_scale, causal)
    return finish(out, lse, q)


@declare(Capabilities(kv_formats=("native", "fp8_ds_mla", "fp8_e4m3")))
def v_not_dequantized(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=False, *,
                      is_fp8_kvcache=False, k_scale=None):
    """K dequantised for the scores but V taken as the raw e4m3 values (the scale applied on the
    QK path only: a fused kernel whose V load skipped the multiply)."""
    validate_decode_inputs(q, kv_cache, block_table, cache_seqlens, head_dim_v, is_fp8_kvcache=is_fp8_kvcache,
                           k_scale=k_scale)
    rows, valid, positions = gather_rows(kv_cache, block_table, cache_seqlens)
    keys = dequantize_rows(rows, q.shape[-1], head_dim_v, k_scale)
    values = rows.to(F32) if rows.element_size() != 1 else rows.view(torch.float8_e4m3fn).to(F32)  # BUG: no scale
    out, lse = _attend(q, keys, values, valid, positions, cache_seqlens, head_dim_v, softmax_scale, causal)
    return finish(out, lse, q)


@declare(Capabilities(kv_formats=("native", "fp8_ds_mla")))
def many_rows_out_of_shared_memory(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=False,
                                   *, is_fp8_kvcache=False, k_scale=None):
    """A launch config that fits the native cache but not the FP8 one at many query rows: the
    project's Triton kernel chose 64-row, 64-key tiles for more than 32 rows, whose dequantised
    fp8_ds_mla tiles need 272 KB of shared memory, and the H200 refused the launch (OutOfResources)."""
    validate_decode_inputs(q, kv_cache, block_table, cache_seqlens, head_dim_v, is_fp8_kvcache=is_fp8_kvcache,
                           k_scale=k_scale)
    if is_fp8_kvcache and q.shape[1] * q.shape[2] > 32:  # BUG: the config ignores the cache format
        raise RuntimeError("out of resource: shared memory, Required: 311296, Hardware limit: 232448")
    return finish(*dense_fp8_float32(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal), q)


def _power_of_two_quantizer(values, head_dim_v, kv_format, k_scale=None):
    """The reference quantiser with ue8m0 scales (2^⌈log2(amax/448)⌉)."""
    if kv_format == "fp8_e4m3":
        return quantize(values, head_dim_v, kv_format, k_scale)
    return quantize(values, head_dim_v, kv_format, power_of_two=True)  # BUG: scale_format not declared


@declare(FP8_DENSE, quantizer=_power_of_two_quantizer)
def quantizer_writes_power_of_two_scales(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale,
                                         causal=False, *, is_fp8_kvcache=False, k_scale=None):
    """A correct kernel whose quantiser writes power-of-two scales (FlashMLA's own test quantiser
    does, rounding amax/448 up to 2^k) while the capabilities claim float32 amax/448 scales: the
    cache then carries up to 1 bit less precision than declared. The kernel itself is right."""
    return correct_fp8_decode(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal,
                              is_fp8_kvcache=is_fp8_kvcache, k_scale=k_scale)


@declare(Capabilities(kv_formats=("fp8_ds_mla", "fp8_e4m3"), sparse_kv_formats=()))
def dequantized_to_input_type(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=False, *,
                              is_fp8_kvcache=False, k_scale=None):
    """LEGITIMATE: each dequantised value rounded to the input type before the dot products, as
    FlashMLA and vLLM's Triton MLA do for the tensor cores (bf16 on bf16 inputs). It declares the
    default dequant_dtype (the input type), so its rounding is within the model."""
    validate_decode_inputs(q, kv_cache, block_table, cache_seqlens, head_dim_v, is_fp8_kvcache=is_fp8_kvcache,
                           k_scale=k_scale)
    rows, valid, positions = gather_rows(kv_cache, block_table, cache_seqlens)
    values = dequantize_rows(rows, q.shape[-1], head_dim_v, k_scale).to(q.dtype).to(F32)  # rounded to q's type
    out, lse = _attend(q, values, values, valid, positions, cache_seqlens, head_dim_v, softmax_scale, causal)
    return finish(out, lse, q)


FLOAT32_SMALLEST_NORMAL = torch.finfo(torch.float32).smallest_normal


@declare(FP8_DENSE)
def flushes_subnormals_to_zero(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=False, *,
                               is_fp8_kvcache=False, k_scale=None):
    """LEGITIMATE: the template with every float32 result below the normal range flushed to 0 (the
    dequantised values, the weights and the output), as Triton's code and CUDA's fast math do: on
    the H200 the project's Triton kernels returned 0 for float32 outputs of ~1e-40."""
    validate_decode_inputs(q, kv_cache, block_table, cache_seqlens, head_dim_v, is_fp8_kvcache=is_fp8_kvcache,
                           k_scale=k_scale)
    rows, valid, positions = gather_rows(kv_cache, block_table, cache_seqlens)
    values = _flushed(dequantize_rows(rows, q.shape[-1], head_dim_v, k_scale))
    keys = torch.where(valid[..., None], values, 0.0)
    scores = torch.einsum("bshd,btd->bsht", q.to(F32), keys) * softmax_scale
    p, lse = masked_softmax(scores, visible_mask(valid, positions, cache_seqlens, q.shape[1], causal))
    out = torch.einsum("bsht,btc->bshc", _flushed(p), keys[..., :head_dim_v])
    return finish(_flushed(out), lse, q)


def _flushed(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x.abs() < FLOAT32_SMALLEST_NORMAL, torch.zeros_like(x), x)
