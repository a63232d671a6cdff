"""FlashMLA's dense decode and its sparse FP8 decode (deepseek-ai/FlashMLA) as decode-contract kernels.

The contract is FlashMLA's own layout, so the adapter passes the tensors through unchanged:

    q             [b, s_q, h_q, 576]           bf16/fp16, last dim contiguous
    kv_cache      [num_blocks, 64, 1, 576]     same dtype; any strides with a contiguous last dim
    block_table   int32 [b, max_blocks]
    cache_seqlens int32 [b]
    → out [b, s_q, h_q, 512] (q.dtype), lse float32 [b, h_q, s_q], natural log;
      a row that sees no key: out 0, lse +inf (FlashMLA's convention, declared below).

Scheduling metadata. FlashMLA 1.0.0 (flash_mla/flash_mla_interface.py at 9241ae3, April 2026):
`get_mla_metadata(*args)` returns `(FlashMLASchedMeta(), None)` and the metadata is computed on the
first `flash_mla_with_kvcache` call, with `num_splits=None`. Earlier releases computed it up front:
`get_mla_metadata(cache_seqlens, s_q·h_q // h_kv, h_kv)` → (tile_scheduler_metadata, num_splits)
tensors passed on. The adapter calls get_mla_metadata with the old arguments (the new one accepts
and ignores them) and passes on whatever comes back, so both work. A fresh metadata object per
call: FlashMLA allows reuse only for identical shapes and lengths.

Capabilities (from csrc/api/dense_decode.h and sm90/decode/dense/config.h): SM90a only; bf16 and
fp16 (fp16 unless built with FLASH_MLA_DISABLE_FP16); page_block_size 64; head_dim 576 with
head_dim_v 512 (HEAD_DIM_K/V are compile-time constants of the dense kernel); h_q any multiple of
h_kv = 1; causal with bottom-right alignment (ignored for s_q = 1); strided caches through
k_batch_stride/k_row_stride; the split schedule depends only on the lengths and shapes, so a call
is deterministic.

Sparse FP8 decode (`flashmla_sparse_decode`, DeepSeek-V3.2's attention). The contract's keywords are
FlashMLA's own: flash_mla_with_kvcache(q, k_cache, None, None, head_dim_v, sched_meta, None,
softmax_scale, causal=False, is_fp8_kvcache=True, indices, attn_sink); block_table and
cache_seqlens are not passed (FlashMLA reads only the indices), causal must be False (the lists carry
it). Capabilities (csrc/api/sparse_decode.h): SM90a (SM100 has its own kernels); q bfloat16;
d = 576 with head_dim_v = 512, the 656-byte fp8_ds_mla row; h_q 64 or 128 (the h_q check refuses any
other); h_kv = 1; the cache's token rows contiguous (k_cache.stride(1) == 656: no strided view); any
page size the indices address (64 declared, as V3.2 runs); attn_sink float32 [h_q]; the output of a
query with no valid entry is 0 and its lse +inf. Scheduling metadata: FlashMLA 1.0.0's
get_mla_metadata() takes no arguments (it accepts and ignores them); the September 2025 release
took (cache_seqlens, num_q_tokens_per_head_k, num_heads_k, num_heads_q, is_fp8_kvcache, topk):
`sparse_metadata_arguments` binds whichever the installed version names. How FlashMLA treats a
positive index past the pool is what the certificate finds out (its reference masks only -1).
"""

from __future__ import annotations

import functools
import math
from types import ModuleType

import torch

from mla_verify.adapters import DECODE_ADAPTERS, bind_by_name, load_module, parameter_names
from mla_verify.decode.contract import Capabilities, Declined, declare, validate_decode_inputs

__all__ = ["flashmla_decode", "flashmla_sparse_decode", "metadata_arguments", "sparse_metadata_arguments",
           "sparse_call_arguments", "SPARSE_CAPABILITIES"]

_ADAPTER = DECODE_ADAPTERS["flashmla"]


@functools.cache
def _flash_mla() -> ModuleType:
    return load_module("flash_mla", _ADAPTER.library, _ADAPTER.install)


def metadata_arguments(cache_seqlens: torch.Tensor, s_q: int, h_q: int, h_kv: int) -> tuple[torch.Tensor, int, int]:
    """get_mla_metadata's arguments: (cache_seqlens, s_q·h_q // h_kv query rows per KV head, h_kv)."""
    if h_q % h_kv:
        raise ValueError(f"h_q must be a multiple of h_kv={h_kv}; got {h_q}")
    return cache_seqlens, s_q * h_q // h_kv, h_kv


@declare(Capabilities(dtypes=(torch.bfloat16, torch.float16), devices=("cuda",), page_sizes=(64,),
                      max_heads=128, max_s_q=16, causal=True, head_dims=((576, 512),), lse_base="e",
                      empty_row_lse=math.inf, deterministic=True, strided_cache=True))
def flashmla_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                    cache_seqlens: torch.Tensor, head_dim_v: int, softmax_scale: float,
                    causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """flash_mla_with_kvcache on the contract's tensors (see the module docstring)."""
    validate_decode_inputs(q, kv_cache, block_table, cache_seqlens, head_dim_v)
    flash_mla = _flash_mla()
    _, s_q, h_q, _ = q.shape
    metadata, num_splits = flash_mla.get_mla_metadata(*metadata_arguments(cache_seqlens, s_q, h_q, kv_cache.shape[2]))
    out, lse = flash_mla.flash_mla_with_kvcache(q, kv_cache, block_table, cache_seqlens, head_dim_v, metadata,
                                                num_splits, softmax_scale=softmax_scale, causal=causal)
    return out, lse


SPARSE_CAPABILITIES = Capabilities(
    dtypes=(torch.bfloat16,), devices=("cuda",), page_sizes=(64,), head_counts=(64, 128), max_s_q=4, causal=True,
    head_dims=((576, 512),), lse_base="e", empty_row_lse=math.inf, deterministic=True, strided_cache=False,
    kv_formats=(), sparse_kv_formats=("fp8_ds_mla",), attn_sink=True, max_topk=2048, invalid_indices="ignore",
    dequant_dtype=torch.bfloat16)


def sparse_metadata_arguments(parameters: tuple[str, ...], cache_seqlens: torch.Tensor, s_q: int, h_q: int,
                              h_kv: int, topk: int) -> dict[str, object]:
    """get_mla_metadata's keyword arguments for the sparse FP8 path in the installed FlashMLA: none
    for 1.0.0 (`*args, **kwargs`), the named ones for the older release."""
    if h_q % h_kv:
        raise ValueError(f"h_q must be a multiple of h_kv={h_kv}; got {h_q}")
    return bind_by_name(parameters, dict(cache_seqlens=cache_seqlens, num_q_tokens_per_head_k=s_q * h_q // h_kv,
                                         num_heads_k=h_kv, num_heads_q=h_q, is_fp8_kvcache=True, topk=topk))


def sparse_call_arguments(parameters: tuple[str, ...], q: torch.Tensor, kv_cache: torch.Tensor, head_dim_v: int,
                          metadata: object, num_splits: object, softmax_scale: float, indices: torch.Tensor,
                          attn_sink: torch.Tensor | None) -> dict[str, object]:
    """flash_mla_with_kvcache's keyword arguments for a sparse FP8 call: no block table or lengths,
    causal False, is_fp8_kvcache True, the indices and (if given) the sink."""
    values = dict(q=q, k_cache=kv_cache, block_table=None, cache_seqlens=None, head_dim_v=head_dim_v,
                  tile_scheduler_metadata=metadata, num_splits=num_splits, softmax_scale=softmax_scale, causal=False,
                  is_fp8_kvcache=True, indices=indices)
    if attn_sink is not None:
        if "attn_sink" not in parameters:
            raise Declined("the installed FlashMLA's flash_mla_with_kvcache takes no attn_sink")
        values["attn_sink"] = attn_sink
    return bind_by_name(parameters, values, required=("q", "k_cache", "indices", "is_fp8_kvcache", "head_dim_v",
                                                      "softmax_scale"))


@declare(SPARSE_CAPABILITIES)
def flashmla_sparse_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                           cache_seqlens: torch.Tensor, head_dim_v: int, softmax_scale: float, causal: bool = False,
                           *, is_fp8_kvcache: bool = False, indices: torch.Tensor | None = None,
                           attn_sink: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashMLA's sparse FP8 decode on the contract's tensors (see the module docstring)."""
    validate_decode_inputs(q, kv_cache, block_table, cache_seqlens, head_dim_v, is_fp8_kvcache=is_fp8_kvcache,
                           indices=indices, attn_sink=attn_sink)
    flash_mla = _flash_mla()
    if indices is None or not is_fp8_kvcache:
        raise ValueError("flashmla_sparse_decode needs indices and an fp8_ds_mla cache (is_fp8_kvcache=True)")
    _, s_q, h_q, _ = q.shape
    metadata, num_splits = flash_mla.get_mla_metadata(**sparse_metadata_arguments(
        parameter_names(flash_mla.get_mla_metadata), cache_seqlens, s_q, h_q, kv_cache.shape[2], indices.shape[-1]))
    kwargs = sparse_call_arguments(parameter_names(flash_mla.flash_mla_with_kvcache), q, kv_cache, head_dim_v,
                                   metadata, num_splits, softmax_scale, indices, attn_sink)
    out, lse = flash_mla.flash_mla_with_kvcache(**kwargs)
    return out, lse
