"""SGLang's Triton decode attention (decode_attention_fwd) as a decode-contract kernel.

Current SGLang (python/sglang/srt/layers/attention/triton_ops/decode_attention.py):

    decode_attention_fwd(q, k_buffer, v_buffer, o, kv_indptr, kv_indices, attn_logits, attn_lse,
                         num_kv_splits, max_kv_splits, sm_scale, k_scale, v_scale, logit_cap=0.0,
                         sinks=None, xai_temperature_len=-1)

    q            [B, h, d]                 one query token per row
    k_buffer     [tokens, 1, d]            token-addressed cache (stride(0), stride(1) are read)
    v_buffer     k_buffer[..., :dv]        a view
    kv_indptr    int32 [B+1]               prefix sums of each row's key count
    kv_indices   int32 [Σ L]               token slot of each key (page size 1)
    attn_logits  float32 [B, h, max_kv_splits, dv]  partial outputs
    attn_lse     float32 [B, h, max_kv_splits]      partial lse (natural log)
    num_kv_splits int32 [B]                per-row split count (≤ max_kv_splits)
    o            [B, h, dv] (q.dtype)      there is no final lse output

The adapter views the contract's paged cache [blocks, page, 1, d] as [blocks·page, 1, d] (a view:
pages of one buffer are evenly spaced) and turns block_table into token slots
block·page + offset (`token_slots`), as SGLang's paged backends do before calling this kernel. A
multi-token decode is flattened into single-token rows (`expand_query_rows`). num_kv_splits is
max_kv_splits = 8 for every row (SGLang's default triton_attention_num_kv_splits; its own
heuristic may pick fewer per row). The lse is merged by the adapter from attn_lse over the splits
the kernel wrote (split length ceil(ceil(L / splits) / 32)·32, `_MIN_BLOCK_KV`), in float32
(`merge_split_lse`). Older signatures (no attn_lse: the lse sat in column dv of a dv + 1 wide
attn_logits; an int num_kv_splits without max_kv_splits; no k_scale/v_scale) are bound by name.

Capabilities: fp16/bf16 (fp32 inputs go through TF32 tl.dot); any page size (through the token
slots); any head count; widths as for vLLM's kernel (576 → 512 + 64, 288 → 256 + 32, else padded to
a power of two; head_dim_v ≥ 16 for tl.dot); deterministic (fixed splits, no atomics). An empty row
gives out NaN (0/0 in stage 2, unguarded) and lse −inf; the adapter does not repair it. With a single
query head the kernel takes its MHA path, whose scores are input-type products summed with tl.sum:
run through this adapter under the Triton interpreter (fp16, CPU), that case's lse was 17× over the
fp32-accumulation bound, while 16- and 17-head cases passed.

FP8 (`sglang_triton_fp8_decode`, the per-tensor fp8_e4m3 cache with k_scale, and attention sinks):
decode_attention_fwd folds k_scale into sm_scale (scores from the raw e4m3 keys converted exactly to
q's dtype) and multiplies the merged output by v_scale (the same k_scale: one latent cache); sinks go
to its `sinks` argument, which adds exp(sink − max) to the merged sum (the contract's sink). Its
grouped kernel computes P·V as tl.dot(p.to(v.dtype), v) with V the raw e4m3 values, so P is rounded to
e4m3 (3 mantissa bits, weights below 2^-9 of the row's maximum flushed): declared as
p_dtype=float8_e4m3fn, which is what it does, and no dequantisation rounding (dequant_dtype float32).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from types import ModuleType

import torch

from mla_verify.adapters import (DECODE_ADAPTERS, bind_by_name, expand_query_rows, load_module, merge_split_lse,
                                 parameter_names, split_is_nonempty)
from mla_verify.adapters.vllm import HEAD_DIMS, check_page_layout, rows_to_contract_lse
from mla_verify.decode.contract import Capabilities, Declined, declare, validate_decode_inputs

__all__ = ["sglang_triton_decode", "sglang_triton_fp8_decode", "MAX_KV_SPLITS", "token_slots", "token_rows", "Scratch",
           "scratch_for", "scale_arguments"]

_ADAPTER = DECODE_ADAPTERS["sglang-triton"]
MODULE = "sglang.srt.layers.attention.triton_ops.decode_attention"
# ServerArgs.triton_attention_num_kv_splits default.
MAX_KV_SPLITS = 8


@functools.cache
def _decode_module() -> ModuleType:
    return load_module(MODULE, _ADAPTER.library, _ADAPTER.install)


def token_slots(block_table: torch.Tensor, seqlens: torch.Tensor, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kv_indptr int32 [rows+1], kv_indices int32 [Σ L]): token t of row r lives in slot
    block_table[r, t // page]·page + t % page of the [blocks·page] token view. Only the first L_r
    tokens of each row are listed, so out-of-range ids in unused block-table entries are never
    read. When every row is empty, kv_indices holds a single 0 (never read: every row's range is
    empty)."""
    device = block_table.device
    lengths = seqlens.to(device=device, dtype=torch.int64)
    rows = lengths.shape[0]
    kv_indptr = torch.zeros(rows + 1, dtype=torch.int64, device=device)
    kv_indptr[1:] = torch.cumsum(lengths, 0)
    max_len = int(lengths.max()) if rows else 0
    positions = torch.arange(max_len, device=device)
    valid = positions[None, :] < lengths[:, None]  # [rows, max_len]
    pages = torch.where(valid, positions[None, :] // page_size, 0)
    blocks = torch.gather(block_table.to(torch.int64), 1, pages) if max_len else pages
    slots = blocks * page_size + positions[None, :] % page_size
    kv_indices = slots[valid].to(torch.int32)
    if kv_indices.numel() == 0:
        kv_indices = torch.zeros(1, dtype=torch.int32, device=device)
    return kv_indptr.to(torch.int32), kv_indices


def token_rows(kv_cache: torch.Tensor) -> torch.Tensor:
    """The paged cache [blocks, page, 1, d] as [blocks·page, 1, d]: a view sharing its storage."""
    check_page_layout(kv_cache)
    blocks, page, heads, d = kv_cache.shape
    return kv_cache.view(blocks * page, heads, d)


@dataclass(frozen=True)
class Scratch:
    """What the installed decode_attention_fwd wants as split-KV scratch."""

    logits_shape: tuple[int, ...]
    lse_shape: tuple[int, ...] | None  # None: the lse sits in column head_dim_v of attn_logits
    splits_tensor: bool  # num_kv_splits is a per-row int32 tensor (with max_kv_splits)


def scratch_for(parameters: tuple[str, ...], rows: int, heads: int, head_dim_v: int, splits: int) -> Scratch:
    if "attn_lse" in parameters:
        return Scratch((rows, heads, splits, head_dim_v), (rows, heads, splits), "max_kv_splits" in parameters)
    return Scratch((rows, heads, splits, head_dim_v + 1), None, "max_kv_splits" in parameters)


def scale_arguments(parameters: tuple[str, ...], k_scale: torch.Tensor | None,
                    attn_sink: torch.Tensor | None) -> dict[str, object]:
    """k_scale and v_scale (floats: 1 for a native cache, the per-tensor FP8 scale otherwise) and the
    sinks, for the installed decode_attention_fwd; a case it cannot take is declined."""
    scale = 1.0 if k_scale is None else float(k_scale.reshape(()).to(torch.float32))
    if k_scale is not None and "k_scale" not in parameters:
        raise Declined("the installed SGLang's decode_attention_fwd takes no k_scale (no FP8 cache support)")
    arguments: dict[str, object] = {"k_scale": scale, "v_scale": scale}
    if attn_sink is not None:
        if "sinks" not in parameters:
            raise Declined("the installed SGLang's decode_attention_fwd takes no sinks")
        arguments["sinks"] = attn_sink.to(torch.float32).contiguous()
    return arguments


CAPABILITIES = Capabilities(dtypes=(torch.bfloat16, torch.float16), devices=("cuda",), page_sizes=None, max_heads=128,
                            max_s_q=16, causal=True, head_dims=HEAD_DIMS, lse_base="e", empty_row_lse=-math.inf,
                            deterministic=True, strided_cache=True)


@declare(CAPABILITIES)
def sglang_triton_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                         cache_seqlens: torch.Tensor, head_dim_v: int, softmax_scale: float,
                         causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """SGLang's decode_attention_fwd on the contract's tensors (see the module docstring)."""
    return _decode(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal)


@declare(CAPABILITIES.replace(kv_formats=("fp8_e4m3",), attn_sink=True, p_dtype=torch.float8_e4m3fn,
                              dequant_dtype=torch.float32))
def sglang_triton_fp8_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                             cache_seqlens: torch.Tensor, head_dim_v: int, softmax_scale: float, causal: bool = False,
                             *, k_scale: torch.Tensor | None = None,
                             attn_sink: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SGLang's decode_attention_fwd on a per-tensor FP8 latent cache, with sinks (see the module docstring)."""
    return _decode(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal, k_scale=k_scale,
                   attn_sink=attn_sink)


def _decode(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, cache_seqlens: torch.Tensor,
            head_dim_v: int, softmax_scale: float, causal: bool, k_scale: torch.Tensor | None = None,
            attn_sink: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    validate_decode_inputs(q, kv_cache, block_table, cache_seqlens, head_dim_v, k_scale=k_scale, attn_sink=attn_sink)
    tokens = token_rows(kv_cache)
    module = _decode_module()
    decode_attention_fwd = module.decode_attention_fwd
    b, s_q, h, d = q.shape
    block_rows, seqlens_rows = expand_query_rows(block_table, cache_seqlens, s_q, causal)
    kv_indptr, kv_indices = token_slots(block_rows, seqlens_rows, kv_cache.shape[1])
    rows = b * s_q
    names = parameter_names(decode_attention_fwd)
    scratch = scratch_for(names, rows, h, head_dim_v, MAX_KV_SPLITS)
    attn_logits = torch.empty(scratch.logits_shape, dtype=torch.float32, device=q.device)
    attn_lse = (torch.empty(scratch.lse_shape, dtype=torch.float32, device=q.device)
                if scratch.lse_shape is not None else None)
    splits = (torch.full((rows,), MAX_KV_SPLITS, dtype=torch.int32, device=q.device) if scratch.splits_tensor
              else MAX_KV_SPLITS)
    o = torch.zeros(rows, h, head_dim_v, dtype=q.dtype, device=q.device)
    kwargs = bind_by_name(names, dict(
        q=q.flatten(0, 1), k_buffer=tokens, v_buffer=tokens[..., :head_dim_v], o=o, kv_indptr=kv_indptr,
        kv_indices=kv_indices, attn_logits=attn_logits, attn_lse=attn_lse, num_kv_splits=splits,
        max_kv_splits=MAX_KV_SPLITS, sm_scale=softmax_scale, **scale_arguments(names, k_scale, attn_sink)),
        required=("q", "k_buffer", "v_buffer", "o", "kv_indptr", "kv_indices", "attn_logits", "num_kv_splits",
                  "sm_scale"))
    decode_attention_fwd(**kwargs)
    partial = attn_lse if attn_lse is not None else attn_logits[..., head_dim_v]
    min_block = int(getattr(module, "_MIN_BLOCK_KV", 1))  # releases before it split evenly
    lse = merge_split_lse(partial, split_is_nonempty(seqlens_rows, MAX_KV_SPLITS, MAX_KV_SPLITS, min_block))
    return o.view(b, s_q, h, head_dim_v), rows_to_contract_lse(lse, b, s_q)
