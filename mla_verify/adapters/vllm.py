"""vLLM's Triton MLA decode (decode_attention_fwd) as a decode-contract kernel.

Current vLLM (vllm/v1/attention/ops/triton_decode_attention.py, as TritonMLAImpl.forward_mqa calls
it):

    decode_attention_fwd(q, k_buffer, v_buffer, o, lse, req_to_token, b_seq_len, attn_logits,
                         num_kv_splits, sm_scale, page_size=1, logit_cap=0.0, k_scale=None)

    q            [B, h, d]                one query token per row
    k_buffer     [blocks, page, 1, d]     the latent cache (strides (-3), (-2) are read; a page is
                                          assumed to start page_size rows after the previous one)
    v_buffer     k_buffer[..., :dv]       a view: V is the first dv columns
    o            [B, h, dv] (q.dtype)     lse [B, h] (natural log; the adapter allocates it float32,
                                          vLLM's own backend allocates it in q.dtype)
    req_to_token = block_table, b_seq_len = cache_seqlens
    attn_logits  float32 [B, h, num_kv_splits, dv + 1]: stage 1 writes each split's partial output
                 and, in the last column, its lse; stage 2 merges the non-empty splits.

The kernel serves one query token per row, so a multi-token decode (s_q > 1) is flattened into
b·s_q rows, each seeing its own number of keys (`expand_query_rows`; causal rows see
L − s_q + j + 1): vLLM does the same for speculative-decode tokens. num_kv_splits is 4, vLLM's
default (1 only in its batch-invariant mode). Older vLLM (vllm/attention/ops/…) lacks the `lse`
argument: the adapter then merges the splits' lse from attn_logits[..., dv] itself
(`merge_split_lse`), in float32.

Capabilities: fp16/bf16 (TritonMLABackend.supported_dtypes; fp32 inputs would go through TF32
tl.dot); any page size (a constexpr); any head count (16-head groups); widths with d = 576 (512 +
64 rope), 288 (256 + 32), else a power-of-two padded block, and head_dim_v ≥ 16 (tl.dot needs
N ≥ 16): the adapter declares the real model widths and the suite's small ones that qualify.
Fixed splits, no atomics: deterministic. With a single query head (h_q = h_kv = 1) the kernel takes
its MHA path (_fwd_kernel_stage1), whose scores are elementwise products q·k in the input type
summed with tl.sum, not an fp32-accumulating tl.dot: expect its lse to exceed the fp32-accumulation
bound there (seen with SGLang's identical kernel). An empty row (L = 0) is not guarded by the kernel:
stage 2 divides 0 by 0, so out is NaN while lse is −inf; vLLM never sends an empty sequence, the
contract does, and the adapter does not repair it — the certificate reports it.

FP8 (`vllm_triton_fp8_decode`, the contract's per-tensor fp8_e4m3 cache with k_scale): the same
function with `k_scale` (a float32 tensor of one element; vLLM passes layer._k_scale, and the latent
cache's one scale serves K and V). Its grouped kernel dequantises K as (e4m3 → float32)·k_scale and
converts it to q's dtype for the tensor-core dot, and V as (e4m3 → float32)·k_scale kept in float32
(its P·V dot then runs in TF32, P and V rounded to 10 bits): declared as dequantisation to the input
type (bf16 ≥ TF32 rounding) and P in the input type. A vLLM whose decode_attention_fwd has no k_scale
declines the case.
"""

from __future__ import annotations

import functools
import math
from types import ModuleType

import torch

from mla_verify.adapters import (DECODE_ADAPTERS, bind_by_name, expand_query_rows, load_module, merge_split_lse,
                                 parameter_names, split_is_nonempty)
from mla_verify.decode.contract import Capabilities, Declined, declare, validate_decode_inputs

__all__ = ["vllm_triton_decode", "vllm_triton_fp8_decode", "NUM_KV_SPLITS", "scratch_shape", "rows_to_contract_lse",
           "check_page_layout", "fp8_arguments"]

_ADAPTER = DECODE_ADAPTERS["vllm-triton"]
MODULES = ("vllm.v1.attention.ops.triton_decode_attention", "vllm.attention.ops.triton_decode_attention")
# TritonMLAImpl.forward_mqa: `num_kv_splits = 1 if vllm_is_batch_invariant() else 4`.
NUM_KV_SPLITS = 4
# The widths the kernel handles (see the module docstring) among the real and the suite's ones.
HEAD_DIMS = ((576, 512), (288, 256), (80, 64), (40, 32))


@functools.cache
def _decode_attention_fwd():
    module: ModuleType | None = None
    for name in MODULES:
        try:
            module = load_module(name, _ADAPTER.library, _ADAPTER.install)
            break
        except ModuleNotFoundError:
            continue
    if module is None:
        raise ImportError(f"vllm is installed but has none of {', '.join(MODULES)}: an unknown vLLM version")
    return module.decode_attention_fwd


def scratch_shape(rows: int, heads: int, num_kv_splits: int, head_dim_v: int) -> tuple[int, int, int, int]:
    """attn_logits: [rows, heads, splits, head_dim_v + 1]; the last column holds each split's lse."""
    return rows, heads, num_kv_splits, head_dim_v + 1


def rows_to_contract_lse(lse: torch.Tensor, b: int, s_q: int) -> torch.Tensor:
    """[b·s_q, h] (row = i·s_q + j) → the contract's [b, h, s_q]."""
    return lse.reshape(b, s_q, -1).permute(0, 2, 1)


def check_page_layout(kv_cache: torch.Tensor) -> None:
    """The kernel addresses row (page·page_size + slot)·stride(-3): pages must be evenly spaced."""
    if kv_cache.shape[0] > 1 and kv_cache.stride(0) != kv_cache.shape[1] * kv_cache.stride(1):
        raise ValueError(f"kv_cache must place each page page_size rows after the previous one "
                         f"(stride(0) == page_size·stride(1)); got strides {kv_cache.stride()}")


def fp8_arguments(parameters: tuple[str, ...], k_scale: torch.Tensor | None) -> dict[str, object]:
    """The FP8 keyword of decode_attention_fwd: {"k_scale": tensor} for an fp8_e4m3 cache; the case is
    declined when the installed function takes no k_scale."""
    if k_scale is None:
        return {}
    if "k_scale" not in parameters:
        raise Declined("the installed vLLM's decode_attention_fwd takes no k_scale (no FP8 cache support)")
    return {"k_scale": k_scale.reshape(1).to(torch.float32)}


CAPABILITIES = Capabilities(dtypes=(torch.bfloat16, torch.float16), devices=("cuda",), page_sizes=None, max_heads=128,
                            max_s_q=16, causal=True, head_dims=HEAD_DIMS, lse_base="e", empty_row_lse=-math.inf,
                            deterministic=True, strided_cache=True)


@declare(CAPABILITIES)
def vllm_triton_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                       cache_seqlens: torch.Tensor, head_dim_v: int, softmax_scale: float,
                       causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's decode_attention_fwd on the contract's tensors (see the module docstring)."""
    return _decode(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal)


@declare(CAPABILITIES.replace(kv_formats=("fp8_e4m3",)))
def vllm_triton_fp8_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                           cache_seqlens: torch.Tensor, head_dim_v: int, softmax_scale: float, causal: bool = False, *,
                           k_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's decode_attention_fwd on a per-tensor FP8 latent cache (see the module docstring)."""
    return _decode(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal, k_scale=k_scale)


def _decode(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, cache_seqlens: torch.Tensor,
            head_dim_v: int, softmax_scale: float, causal: bool,
            k_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    validate_decode_inputs(q, kv_cache, block_table, cache_seqlens, head_dim_v, k_scale=k_scale)
    check_page_layout(kv_cache)
    decode_attention_fwd = _decode_attention_fwd()
    b, s_q, h, d = q.shape
    block_rows, seqlens_rows = expand_query_rows(block_table, cache_seqlens, s_q, causal)
    rows = b * s_q
    o = torch.zeros(rows, h, head_dim_v, dtype=q.dtype, device=q.device)
    lse = torch.zeros(rows, h, dtype=torch.float32, device=q.device)
    attn_logits = torch.empty(scratch_shape(rows, h, NUM_KV_SPLITS, head_dim_v), dtype=torch.float32,
                              device=q.device)
    names = parameter_names(decode_attention_fwd)
    kwargs = bind_by_name(names, dict(
        q=q.flatten(0, 1), k_buffer=kv_cache, v_buffer=kv_cache[..., :head_dim_v], o=o, lse=lse,
        req_to_token=block_rows, b_seq_len=seqlens_rows, attn_logits=attn_logits, num_kv_splits=NUM_KV_SPLITS,
        sm_scale=softmax_scale, page_size=kv_cache.shape[1], **fp8_arguments(names, k_scale)),
        required=("q", "k_buffer", "v_buffer", "o", "req_to_token", "b_seq_len", "attn_logits", "num_kv_splits",
                  "sm_scale", "page_size"))
    decode_attention_fwd(**kwargs)
    if "lse" not in names:
        lse = merge_split_lse(attn_logits[..., head_dim_v],
                              split_is_nonempty(seqlens_rows, NUM_KV_SPLITS, NUM_KV_SPLITS))
    return o.view(b, s_q, h, head_dim_v), rows_to_contract_lse(lse, b, s_q)
