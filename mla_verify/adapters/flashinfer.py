"""FlashInfer's MLA paged attention (BatchMLAPagedAttentionWrapper) as a decode-contract kernel.

FlashInfer 0.6.x (flashinfer/mla/_core.py) takes the latent cache as two caches and the queries as
two halves, all of which the adapter makes as views of the contract's tensors (no copies):

    q_nope    = q[..., :512] as [b·s_q, h, 512]     q_pe      = q[..., 512:] as [b·s_q, h, 64]
    ckv_cache = kv_cache[:, :, 0, :512]  [pages, page, 512]
    kpe_cache = kv_cache[:, :, 0, 512:]  [pages, page, 64]

(the kernel reads stride(0)/stride(1) of each, so strided views are fine). `plan` takes ragged
indices built from block_table and cache_seqlens by `paged_kv_indices`:

    qo_indptr  [b+1] = 0, s_q, 2·s_q, …               query rows of each sequence
    kv_indptr  [b+1] = prefix sums of ceil(L_i / page) pages
    kv_indices [Σ pages] = block_table[i, :ceil(L_i / page)] concatenated (unused entries never read)
    kv_len     [b]   = cache_seqlens

`run(..., return_lse=True)` returns out [b·s_q, h, 512] and lse [b·s_q, h] in base 2 unless
`return_lse_base_on_e=True` (present in recent releases: the adapter passes it when the installed
`run` takes it, else converts with `lse_base2_to_natural`). The adapted function therefore returns
natural-log lse in the contract's [b, h, s_q] layout.

Capabilities: fp16/bf16 q and cache (the plan allow-list; fp8 caches are out of the contract);
head_dim_ckv 512 with head_dim_kpe 64 (the tested MLA shape; the JIT module is specialised on
them); any page size (the kernel divides by a runtime page size); any head count; causal masking
is bottom-right aligned (kernel: kv_idx + qo_len > kv_len + q_idx is masked). Empty rows: out 0,
lse −inf (write_empty_o). Known gap: FlashInfer's own tests skip causal cases with qo_len > kv_len
(rows that see no key inside a causal multi-token decode); Capabilities cannot express "causal
only when L ≥ s_q", so those cases are drawn and the certificate says what the kernel does there.
The split-KV plan depends only on the lengths, so a call is deterministic. Backend "auto"
(fa3 on SM90a, else fa2).
"""

from __future__ import annotations

import functools
import inspect
import math
from types import ModuleType

import torch

from mla_verify.adapters import DECODE_ADAPTERS, load_module
from mla_verify.decode.contract import Capabilities, declare, validate_decode_inputs

__all__ = ["flashinfer_decode", "paged_kv_indices", "split_queries", "split_latent_cache",
           "lse_base2_to_natural", "token_major_to_contract_lse", "WORKSPACE_BYTES"]

_ADAPTER = DECODE_ADAPTERS["flashinfer"]
# FlashInfer's recommended float workspace for split-KV partial results.
WORKSPACE_BYTES = 128 * 1024 * 1024


@functools.cache
def _flashinfer() -> ModuleType:
    return load_module("flashinfer", _ADAPTER.library, _ADAPTER.install)


@functools.cache
def _wrapper(device: torch.device):
    """One wrapper (and its 128 MiB workspace) per device; plan() is called for every decode."""
    flashinfer = _flashinfer()
    workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.int8, device=device)
    return flashinfer.mla.BatchMLAPagedAttentionWrapper(workspace, backend="auto")


@functools.cache
def _run_takes_base_e(run) -> bool:
    try:
        return "return_lse_base_on_e" in inspect.signature(run).parameters
    except (TypeError, ValueError):
        return False


def paged_kv_indices(block_table: torch.Tensor, cache_seqlens: torch.Tensor, page_size: int,
                     s_q: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(qo_indptr, kv_indptr, kv_indices, kv_len), int32, on block_table's device.

    kv_indices lists, sequence after sequence, the physical pages block_table[i, :ceil(L_i/page)]
    in logical order; block-table entries past a sequence's last page are never included (they may
    hold out-of-range ids). When no sequence has a page it holds a single 0 (FlashInfer accepts a
    kv_indices longer than kv_indptr[-1], and an empty tensor has no data pointer)."""
    if page_size < 1 or s_q < 1:
        raise ValueError(f"page_size and s_q must be >= 1; got {page_size}, {s_q}")
    b = cache_seqlens.shape[0]
    device = block_table.device
    lengths = cache_seqlens.to(device=device, dtype=torch.int64)
    pages = -(-lengths // page_size)  # [b]
    kv_indptr = torch.zeros(b + 1, dtype=torch.int64, device=device)
    kv_indptr[1:] = torch.cumsum(pages, 0)
    used = torch.arange(block_table.shape[1], device=device)[None, :] < pages[:, None]
    kv_indices = block_table[used].to(torch.int32)  # row-major: sequence by sequence, page by page
    if kv_indices.numel() == 0:
        kv_indices = torch.zeros(1, dtype=torch.int32, device=device)
    qo_indptr = torch.arange(b + 1, dtype=torch.int32, device=device) * s_q
    return qo_indptr, kv_indptr.to(torch.int32), kv_indices, lengths.to(torch.int32)


def split_queries(q: torch.Tensor, head_dim_v: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_nope [b·s_q, h, head_dim_v], q_pe [b·s_q, h, d − head_dim_v]): views of q (no copy)
    whenever its batch and query axes merge, as they do for any contiguous q."""
    rows = q.flatten(0, 1)
    return rows[..., :head_dim_v], rows[..., head_dim_v:]


def split_latent_cache(kv_cache: torch.Tensor, head_dim_v: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ckv [pages, page, head_dim_v], kpe [pages, page, d − head_dim_v]): views of the contract's
    [pages, page, 1, d] cache, sharing its storage."""
    latent = kv_cache[:, :, 0, :]
    return latent[..., :head_dim_v], latent[..., head_dim_v:]


def lse_base2_to_natural(lse2: torch.Tensor) -> torch.Tensor:
    """log Σ exp(s) from log2 Σ 2^(s·log2 e): multiply by ln 2 (±inf stay ±inf), kept in float32."""
    return (lse2.to(torch.float32) * math.log(2.0)).to(torch.float32)


def token_major_to_contract_lse(lse: torch.Tensor, b: int, s_q: int) -> torch.Tensor:
    """[b·s_q, h] (one row per query token) → the contract's [b, h, s_q]."""
    return lse.reshape(b, s_q, -1).permute(0, 2, 1)


@declare(Capabilities(dtypes=(torch.bfloat16, torch.float16), devices=("cuda",), page_sizes=None,
                      max_heads=128, max_s_q=16, causal=True, head_dims=((576, 512),), lse_base="e",
                      empty_row_lse=-math.inf, deterministic=True, strided_cache=True))
def flashinfer_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                      cache_seqlens: torch.Tensor, head_dim_v: int, softmax_scale: float,
                      causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchMLAPagedAttentionWrapper.plan + run on the contract's tensors (see the module docstring)."""
    validate_decode_inputs(q, kv_cache, block_table, cache_seqlens, head_dim_v)
    wrapper = _wrapper(q.device)
    b, s_q, h, d = q.shape
    page_size = kv_cache.shape[1]
    qo_indptr, kv_indptr, kv_indices, kv_len = paged_kv_indices(block_table, cache_seqlens, page_size, s_q)
    wrapper.plan(qo_indptr, kv_indptr, kv_indices, kv_len, h, head_dim_v, d - head_dim_v, page_size, causal,
                 softmax_scale, q.dtype, kv_cache.dtype)
    q_nope, q_pe = split_queries(q, head_dim_v)
    ckv, kpe = split_latent_cache(kv_cache, head_dim_v)
    if _run_takes_base_e(type(wrapper).run):
        out, lse = wrapper.run(q_nope, q_pe, ckv, kpe, return_lse=True, return_lse_base_on_e=True)
    else:
        out, lse = wrapper.run(q_nope, q_pe, ckv, kpe, return_lse=True)
        lse = lse_base2_to_natural(lse)
    return out.view(b, s_q, h, head_dim_v), token_major_to_contract_lse(lse, b, s_q)
