"""FlashMLA's dense decode (deepseek-ai/FlashMLA) as a decode-contract kernel.

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
"""

from __future__ import annotations

import functools
import math
from types import ModuleType

import torch

from mla_verify.adapters import DECODE_ADAPTERS, load_module
from mla_verify.decode.contract import Capabilities, declare, validate_decode_inputs

__all__ = ["flashmla_decode", "metadata_arguments"]

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
