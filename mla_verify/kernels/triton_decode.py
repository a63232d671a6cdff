"""Absorbed MLA decode over the paged latent cache, in Triton (split-KV, then a merge).

    triton_paged_decode(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale,
                        causal=False) -> (out, lse)

The contract is mla_verify.decode.contract's (FlashMLA's layout):

    q:             [b, s_q, h_q, d]                 latent part (head_dim_v) first, rope part last
    kv_cache:      [num_blocks, page_size, 1, d]    row = [c (head_dim_v) | k_pe]; c is also V.
                                                    Any strides (a view [..., :d] of a wider buffer).
    block_table:   [b, max_blocks] int32            only the entries a length needs are read
    cache_seqlens: [b] int32
    out:           [b, s_q, h_q, head_dim_v] q.dtype
    lse:           [b, h_q, s_q] float32, natural log; a row that sees no key: out 0, lse -inf

How it runs (read top to bottom):

1. capability declaration and constants;
2. `_attend_range`, the inner loop: for each tile of BLOCK_N cache rows, gather the rows through
   the block table, S = Q·Kᵀ (latent and rope parts as two tensor-core dots sharing one
   accumulator), online softmax in base 2 (softmax_scale·log2(e) folded into one multiply),
   P rounded to the input type, O += P·V with V the latent tile already loaded for S;
3. `_split_kernel`: one program per (row group, split, sequence). The s_q·h_q query rows of a
   sequence are one M dimension (row r = query r // h_q, head r % h_q), cut into groups of
   BLOCK_M, so a group's dots are [BLOCK_M, d] @ [d, BLOCK_N] and [BLOCK_M, BLOCK_N] @
   [BLOCK_N, head_dim_v]. Each split covers a contiguous key range of its sequence and writes
   its normalised partial output and its lse (float32, base 2) — or, when the launch has a
   single split, the final out and lse directly;
4. `_merge_kernel`: per query row, combines the splits in a fixed order (so results are
   bit-reproducible): weights 2^(lse_s - max), empty splits (lse -inf) contribute nothing, an
   all-empty row gives out 0 and lse -inf;
5. the configs (a shape heuristic, no autotuning: the same shapes always run the same code), the
   plan (split count) and the host wrappers. The configs fit an H200's shared memory; a GPU with
   less gets the largest smaller tile it accepts (`launch_fitting`: same rows and warps).

FP8 caches and sparse decode (the contract's keywords is_fp8_kvcache, k_scale, indices, attn_sink):

- KV_FORMAT (constexpr) picks how `_load_tile` reads a tile of keys: the cache in q's dtype; the
  fp8_ds_mla layout, read through three views of the same bytes (e4m3 latent, float32 scales, bf16
  rope), latent value j dequantised as e4m3·scale[j // 128] in float32 and rounded to q's dtype for
  the tensor-core dots, as FlashMLA does on Hopper; or the per-tensor e4m3 layout, every value times
  k_scale, rounded likewise. The rounding to the input type is what the capabilities declare
  (dequant_dtype: the input type).
- SPARSE (constexpr): one program sequence per (batch row, query); its M rows are the heads, and the
  key loop runs over the query's index list instead of a length: entry k names pool slot
  idx = block·page_size + offset; entries with idx < 0 or idx >= num_blocks·page_size are masked
  before any load (never read), their scores -inf. Splits cut the list into chunks like a length.
- ATTN_SINK (constexpr): the final output (single split, or the merge) is multiplied by
  1 / (1 + 2^(sink·log2 e − lse₂)); partial outputs and the lse are not.

Masking: key slots at or past a sequence's length (or a causal row's limit) are never gathered:
their block-table entries are not read (so unused entries may hold any id) and their cache rows
are loaded as 0 (so NaN poison in them cannot reach the output through 0·NaN), and their scores
are -inf. Widths that are not powers of two are padded to the next one (at least 16, the
smallest tensor-core dot) with masked loads.

The number of splits fills the GPU for any batch: splits ≈ clamp(ceil(W·R·SMs / (b·row_groups)),
1, ceil(max_len / MIN_SPLIT_TOKENS)), R the config's programs resident per SM and W the waves
aimed for (2; 3 for the memory-bound config), nudged down by up to a third to fill the last wave
(see _split_count); each sequence's length is cut into that many chunks of whole tiles, so long
and short sequences alike are spread over the GPU. Choosing
the split count reads max(cache_seqlens) on the host (the contract's validation syncs anyway);
`launch_decode` with a `DecodePlan` made ahead runs without any host sync (CUDA-graph capturable).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from mla_verify.decode.contract import Capabilities, declare, validate_decode_inputs
from mla_verify.decode.fp8 import KV_FORMATS, SCALE_GROUP, split_packed

__all__ = ["triton_paged_decode", "paged_decode", "DecodeConfig", "DecodePlan", "decode_config", "plan_decode",
           "launch_decode", "launch_fitting", "smaller_configs", "interpreting"]

LOG2E = 1.4426950408889634
LN2 = tl.constexpr(0.6931471805599453)  # a constexpr global: usable inside kernels
LOG2E_C = tl.constexpr(1.4426950408889634)
FP8_GROUP = tl.constexpr(SCALE_GROUP)  # latent values sharing one float32 scale (fp8_ds_mla)
# KV_FORMAT codes: the cache in q's dtype, the packed fp8_ds_mla layout, per-tensor e4m3
NATIVE, FP8_DS_MLA, FP8_E4M3 = 0, 1, 2
FORMAT_CODES = {"native": NATIVE, "fp8_ds_mla": FP8_DS_MLA, "fp8_e4m3": FP8_E4M3}
# A split never covers fewer keys than this (except the last piece of a sequence): below it the
# partial results written and merged cost more than the parallelism gains.
MIN_SPLIT_TOKENS = 128
# Waves of programs the split count aims for (a config says how many of its programs fit an SM).
WAVES = 2
# Multiprocessor count assumed when running on the CPU interpreter.
INTERPRETER_SM_COUNT = 4
MIN_DOT = 16  # smallest dot extent Triton accepts
# Widest latent and rope parts whose tiles fit registers and shared memory (compiled for sm_90a).
MAX_HEAD_DIM_V = 1024
MAX_ROPE_DIM = 128

CAPABILITIES = Capabilities(
    dtypes=(torch.bfloat16, torch.float16, torch.float32),
    devices=("cuda",),
    page_sizes=None,  # any page size: slots are found by position // page_size
    max_heads=128,
    max_s_q=8,
    causal=True,
    # any d > head_dim_v >= 1 up to MAX_HEAD_DIM_V / MAX_ROPE_DIM (wider raises ValueError): widths
    # padded to powers of two (>= 16) with masks. GPU-checked: 576/512, 288/256, 80/64, 40/32,
    # 37/21, 24/8; the CPU interpreter adds 48/32 and 32/32.
    head_dims=None,
    lse_base="e",
    empty_row_lse=-math.inf,
    deterministic=True,  # split count fixed by shapes and lengths; fixed-order merge; no atomics
    strided_cache=True,  # strides are passed to the kernel
    accumulation_dtype=torch.float32,  # fp32 dots are IEEE fp32 (no TF32)
    kv_formats=KV_FORMATS,
    sparse_kv_formats=KV_FORMATS,
    attn_sink=True,
    max_topk=2048,
    invalid_indices="ignore",
    dequant_dtype=None,  # dequantised values rounded to q's dtype for the dots
)
# Under Triton's interpreter (TRITON_INTERPRET=1, read by Triton when the kernels are defined) the
# same kernels run on the CPU through numpy, where a bf16 tl.dot is wrong (a known Triton bug).
INTERPRETER_CAPABILITIES = dataclasses.replace(CAPABILITIES, dtypes=(torch.float16, torch.float32),
                                               devices=("cpu",))


def interpreting() -> bool:
    """Whether the kernels were defined under TRITON_INTERPRET=1 (run on the CPU by numpy)."""
    return type(_split_kernel).__name__ == "InterpretedFunction"


# ----------------------------------------------------------------------------------------------
# Inner loop
# ----------------------------------------------------------------------------------------------

@triton.jit
def _load_tile(cache_ptr, scale_ptr, rope_ptr, k_scale, block, slot, in_range,
               stride_cache_block, stride_cache_slot, stride_cache_col,
               stride_scale_block, stride_scale_slot, stride_rope_block, stride_rope_slot, out_ty: tl.constexpr,
               HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_R: tl.constexpr,
               KV_FORMAT: tl.constexpr):
    """BLOCK_N cache rows (block, slot int64 [BLOCK_N]; rows out of range are not read and load as 0)
    as (latent [BLOCK_N, BLOCK_V], rope [BLOCK_N, BLOCK_R]) in out_ty, dequantised if FP8."""
    offs_v = tl.arange(0, BLOCK_V)
    offs_r = tl.arange(0, BLOCK_R)
    col_v = offs_v < HEAD_DIM_V
    col_r = offs_r < HEAD_DIM - HEAD_DIM_V
    mask_v = in_range[:, None] & col_v[None, :]
    mask_r = in_range[:, None] & col_r[None, :]
    row = block * stride_cache_block + slot * stride_cache_slot
    kv = tl.load(cache_ptr + row[:, None] + offs_v[None, :] * stride_cache_col, mask=mask_v, other=0.0)
    if KV_FORMAT == 1:  # fp8_ds_mla: e4m3 latent · float32 scale of its group of 128; bf16 rope
        row_scale = block * stride_scale_block + slot * stride_scale_slot
        scale = tl.load(scale_ptr + row_scale[:, None] + (offs_v // FP8_GROUP)[None, :], mask=mask_v, other=0.0)
        kv = (kv.to(tl.float32) * scale).to(out_ty)
        row_rope = block * stride_rope_block + slot * stride_rope_slot
        k_rope = tl.load(rope_ptr + row_rope[:, None] + offs_r[None, :], mask=mask_r, other=0.0).to(out_ty)
    else:
        k_rope = tl.load(cache_ptr + row[:, None] + (HEAD_DIM_V + offs_r)[None, :] * stride_cache_col, mask=mask_r,
                         other=0.0)
        if KV_FORMAT == 2:  # fp8_e4m3: every value · k_scale
            kv = (kv.to(tl.float32) * k_scale).to(out_ty)
            k_rope = (k_rope.to(tl.float32) * k_scale).to(out_ty)
    return kv, k_rope


@triton.jit
def _online_step(acc, m_i, l_i, q_lat, q_rope, kv, k_rope, visible, qk_scale,
                 HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One tile of the online softmax: scores, running max and sum, O += P·V."""
    # -- scores: latent part and rope part, one fp32 accumulator --
    s = tl.dot(q_lat, tl.trans(kv), input_precision=DOT_PRECISION)
    if HEAD_DIM > HEAD_DIM_V:
        s = tl.dot(q_rope, tl.trans(k_rope), s, input_precision=DOT_PRECISION)
    s = s * qk_scale
    s = tl.where(visible, s, float("-inf"))
    # -- online softmax; a row with nothing visible so far keeps m = -inf and p = 0 --
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_safe)
    p = tl.math.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    # -- O += P·V, P rounded to the input type (as FlashMLA does), V = the latent tile --
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(kv.dtype), kv, acc, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _attend_range(acc, m_i, l_i, q_lat, q_rope, cache_ptr, scale_ptr, rope_ptr, k_scale, table_ptr, start, end,
                  row_limit, qk_scale, page_size,
                  stride_cache_block, stride_cache_slot, stride_cache_col,
                  stride_scale_block, stride_scale_slot, stride_rope_block, stride_rope_slot,
                  HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_R: tl.constexpr,
                  CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, KV_FORMAT: tl.constexpr):
    """Online softmax over key positions [start, end) of one sequence for BLOCK_M query rows.
    acc [BLOCK_M, BLOCK_V] fp32 unnormalised output; m_i running max and l_i running sum of
    2^(s - m_i), both [BLOCK_M] fp32, scores s in base-2 units."""
    offs_n = tl.arange(0, BLOCK_N)
    # block ids of the first tile; each iteration fetches the next tile's, so the cache loads of an
    # iteration depend on no load of the same iteration and Triton's software pipeliner multi-
    # buffers them (with the ids loaded in the same iteration it kept a single buffer: every
    # tile's HBM latency exposed, half the bandwidth)
    block = tl.load(table_ptr + (start + offs_n) // page_size, mask=start + offs_n < end, other=0)
    for start_n in range(start, end, BLOCK_N):
        # -- gather BLOCK_N cache rows through the block table; slots past `end` are not read --
        pos = start_n + offs_n
        in_range = pos < end
        this_block = block.to(tl.int64)
        block = tl.load(table_ptr + (pos + BLOCK_N) // page_size, mask=pos + BLOCK_N < end, other=0)
        kv, k_rope = _load_tile(cache_ptr, scale_ptr, rope_ptr, k_scale, this_block, (pos % page_size).to(tl.int64),
                                in_range, stride_cache_block, stride_cache_slot, stride_cache_col,
                                stride_scale_block, stride_scale_slot, stride_rope_block, stride_rope_slot,
                                q_lat.dtype, HEAD_DIM, HEAD_DIM_V, BLOCK_V, BLOCK_R, KV_FORMAT)
        if CAUSAL:
            visible = in_range[None, :] & (pos[None, :] < row_limit[:, None])
        else:
            visible = in_range[None, :]
        acc, m_i, l_i = _online_step(acc, m_i, l_i, q_lat, q_rope, kv, k_rope, visible, qk_scale, HEAD_DIM,
                                     HEAD_DIM_V, DOT_PRECISION)
    return acc, m_i, l_i


@triton.jit
def _attend_list(acc, m_i, l_i, q_lat, q_rope, cache_ptr, scale_ptr, rope_ptr, k_scale, index_ptr, stride_index,
                 start, end, num_slots, qk_scale, page_size,
                 stride_cache_block, stride_cache_slot, stride_cache_col,
                 stride_scale_block, stride_scale_slot, stride_rope_block, stride_rope_slot,
                 HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_R: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, KV_FORMAT: tl.constexpr):
    """Online softmax over entries [start, end) of one query's index list: entry idx is pool slot
    idx // page_size, idx % page_size; -1 and entries past the pool are masked before any load."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(start, end, BLOCK_N):
        pos = start_n + offs_n
        idx = tl.load(index_ptr + pos * stride_index, mask=pos < end, other=-1)
        valid = (idx >= 0) & (idx < num_slots)
        safe = tl.where(valid, idx, 0).to(tl.int64)
        kv, k_rope = _load_tile(cache_ptr, scale_ptr, rope_ptr, k_scale, safe // page_size, safe % page_size, valid,
                                stride_cache_block, stride_cache_slot, stride_cache_col,
                                stride_scale_block, stride_scale_slot, stride_rope_block, stride_rope_slot,
                                q_lat.dtype, HEAD_DIM, HEAD_DIM_V, BLOCK_V, BLOCK_R, KV_FORMAT)
        acc, m_i, l_i = _online_step(acc, m_i, l_i, q_lat, q_rope, kv, k_rope, valid[None, :], qk_scale, HEAD_DIM,
                                     HEAD_DIM_V, DOT_PRECISION)
    return acc, m_i, l_i


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------

@triton.jit
def _split_kernel(Q, Cache, Scales, Rope, KScale, BlockTable, SeqLens, Indices, Sink, Out, Lse, OutPart, LsePart,
                  qk_scale, page_size, num_rows, h_q, s_q, num_splits, num_slots, topk,
                  stride_qb, stride_qs, stride_qh, stride_qd,
                  stride_cache_block, stride_cache_slot, stride_cache_col,
                  stride_scale_block, stride_scale_slot, stride_rope_block, stride_rope_slot,
                  stride_tb, stride_ib, stride_is, stride_ik,
                  stride_ob, stride_os, stride_oh, stride_od,
                  stride_lb, stride_lh, stride_ls,
                  stride_pb, stride_ps, stride_pr, stride_lpb, stride_lps,
                  HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_R: tl.constexpr,
                  CAUSAL: tl.constexpr, SINGLE_SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  KV_FORMAT: tl.constexpr, SPARSE: tl.constexpr, ATTN_SINK: tl.constexpr):
    pid_m = tl.program_id(0)  # row group (fastest: groups sharing cache tiles run side by side)
    pid_s = tl.program_id(1)  # split
    pid_b = tl.program_id(2).to(tl.int64)  # sequence (sparse: one per batch row and query)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < num_rows
    if SPARSE:  # rows are the heads of one query; its keys are the entries of its list
        batch = pid_b // s_q
        query = (pid_b % s_q) + rows * 0
        head = rows
        seq_len = topk
    else:  # rows fold s_q·h_q: row r = query r // h_q, head r % h_q
        batch = pid_b
        query = rows // h_q
        head = rows % h_q
        seq_len = tl.load(SeqLens + pid_b)
    # this split's keys: chunks of whole tiles, the same count for every sequence
    chunk = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = pid_s * chunk
    end = tl.minimum(start + chunk, seq_len)
    row_limit = seq_len - s_q + query + 1  # causal: query i sees positions < L - s_q + i + 1
    if CAUSAL:  # no key past the group's last visible position
        last_query = tl.minimum(s_q - 1, (pid_m * BLOCK_M + BLOCK_M - 1) // h_q)
        end = tl.minimum(end, seq_len - s_q + last_query + 1)

    offs_v = tl.arange(0, BLOCK_V)
    offs_r = tl.arange(0, BLOCK_R)
    col_v = offs_v < HEAD_DIM_V
    col_r = offs_r < HEAD_DIM - HEAD_DIM_V
    q_row = Q + batch * stride_qb + query * stride_qs + head * stride_qh
    q_lat = tl.load(q_row[:, None] + offs_v[None, :] * stride_qd, mask=row_ok[:, None] & col_v[None, :], other=0.0)
    q_rope = tl.load(q_row[:, None] + (HEAD_DIM_V + offs_r)[None, :] * stride_qd,
                     mask=row_ok[:, None] & col_r[None, :], other=0.0)
    k_scale = 1.0
    if KV_FORMAT == 2:
        k_scale = tl.load(KScale)

    acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if SPARSE:
        index_ptr = Indices + batch * stride_ib + (pid_b % s_q) * stride_is
        acc, m_i, l_i = _attend_list(acc, m_i, l_i, q_lat, q_rope, Cache, Scales, Rope, k_scale, index_ptr,
                                     stride_ik, start, end, num_slots, qk_scale, page_size,
                                     stride_cache_block, stride_cache_slot, stride_cache_col,
                                     stride_scale_block, stride_scale_slot, stride_rope_block, stride_rope_slot,
                                     HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_V, BLOCK_R, DOT_PRECISION, KV_FORMAT)
    else:
        acc, m_i, l_i = _attend_range(acc, m_i, l_i, q_lat, q_rope, Cache, Scales, Rope, k_scale,
                                      BlockTable + pid_b * stride_tb, start, end, row_limit, qk_scale, page_size,
                                      stride_cache_block, stride_cache_slot, stride_cache_col,
                                      stride_scale_block, stride_scale_slot, stride_rope_block, stride_rope_slot,
                                      HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_V, BLOCK_R, CAUSAL, DOT_PRECISION,
                                      KV_FORMAT)

    # normalise; an empty row (l = 0) has acc = 0 and gets lse -inf
    has_key = l_i > 0.0
    o = acc / tl.where(has_key, l_i, 1.0)[:, None]
    lse2 = tl.where(has_key, m_i + tl.math.log2(tl.where(has_key, l_i, 1.0)), float("-inf"))
    if SINGLE_SPLIT:
        if ATTN_SINK:  # out · 1 / (1 + 2^(sink·log2 e − lse₂)); lse unchanged
            sink = tl.load(Sink + head, mask=row_ok, other=0.0)
            o = o * tl.where(has_key, 1.0 / (1.0 + tl.math.exp2(sink * LOG2E_C - lse2)), 0.0)[:, None]
        out_ptr = Out + batch * stride_ob + query * stride_os + head * stride_oh
        tl.store(out_ptr[:, None] + offs_v[None, :] * stride_od, o.to(Out.dtype.element_ty),
                 mask=row_ok[:, None] & col_v[None, :])
        tl.store(Lse + batch * stride_lb + head * stride_lh + query * stride_ls, lse2 * LN2, mask=row_ok)
    else:
        part = pid_b * stride_pb + pid_s * stride_ps + rows * stride_pr
        tl.store(OutPart + part[:, None] + offs_v[None, :], o, mask=row_ok[:, None] & col_v[None, :])
        tl.store(LsePart + pid_b * stride_lpb + pid_s * stride_lps + rows, lse2, mask=row_ok)


@triton.jit
def _merge_kernel(OutPart, LsePart, Sink, Out, Lse, num_splits, h_q, s_q,
                  stride_pb, stride_ps, stride_pr, stride_lpb, stride_lps,
                  stride_ob, stride_os, stride_oh, stride_od,
                  stride_lb, stride_lh, stride_ls,
                  HEAD_DIM_V: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_S: tl.constexpr,
                  SPARSE: tl.constexpr, ATTN_SINK: tl.constexpr):
    row = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    if SPARSE:  # sequence = (batch row, query), rows = heads
        batch = pid_b // s_q
        query = pid_b % s_q
        head = row
    else:
        batch = pid_b
        query = row // h_q
        head = row % h_q
    offs_v = tl.arange(0, BLOCK_V)
    col_v = offs_v < HEAD_DIM_V
    offs_s = tl.arange(0, BLOCK_S)
    # lse of the splits: base 2, -inf for an empty split, at [b, split, row] (row stride 1)
    lse_row = LsePart + pid_b * stride_lpb + row
    lse_s = tl.load(lse_row + offs_s * stride_lps, mask=offs_s < num_splits, other=float("-inf"))
    m = tl.max(lse_s, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    total = tl.sum(tl.math.exp2(lse_s - m_safe), 0)
    acc = tl.zeros([BLOCK_V], dtype=tl.float32)
    part_row = OutPart + pid_b * stride_pb + row * stride_pr
    for split in range(0, num_splits):  # fixed order: bit-reproducible
        lse_split = tl.load(lse_row + split * stride_lps)
        weight = tl.math.exp2(lse_split - m_safe)
        o = tl.load(part_row + split * stride_ps + offs_v, mask=col_v, other=0.0)
        acc += tl.where(weight > 0.0, weight * o, 0.0)
    has_key = total > 0.0
    out = acc / tl.where(has_key, total, 1.0)
    lse2 = tl.where(has_key, m_safe + tl.math.log2(tl.where(has_key, total, 1.0)), float("-inf"))
    if ATTN_SINK:  # out · 1 / (1 + 2^(sink·log2 e − lse₂)); lse unchanged
        sink = tl.load(Sink + head)
        out = out * tl.where(has_key, 1.0 / (1.0 + tl.math.exp2(sink * LOG2E_C - lse2)), 0.0)
    tl.store(Out + batch * stride_ob + query * stride_os + head * stride_oh + offs_v * stride_od,
             out.to(Out.dtype.element_ty), mask=col_v)
    tl.store(Lse + batch * stride_lb + head * stride_lh + query * stride_ls, lse2 * LN2)


# ----------------------------------------------------------------------------------------------
# Configs and plan
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DecodeConfig:
    """Tile shape and launch parameters of the split kernel."""

    block_m: int  # query rows (s_q·h_q folded) per program
    block_n: int  # keys per inner-loop tile
    num_warps: int
    num_stages: int
    resident_per_sm: int = 1  # programs of this config that fit one SM at a time (registers, smem)
    waves: int = WAVES  # the split count aims for this many waves of resident programs


def _pow2_at_least(n: int, floor: int = MIN_DOT) -> int:
    return max(floor, triton.next_power_of_2(max(n, 1)))


def decode_config(dtype: torch.dtype, num_rows: int, head_dim: int, head_dim_v: int,
                  kv_format: str = "native") -> DecodeConfig:
    """The heuristic config, chosen by the sweep in benchmarks/bench_decode.py (bf16, d=576,
    head_dim_v=512, H200; see benchmarks/triton_decode_results.md) among configs whose compiler
    register report shows no spills, where one exists. Deterministic in its arguments: the same
    shapes always run the same code."""
    block_v = _pow2_at_least(head_dim_v)
    wide = block_v >= 512
    if block_v > 512:
        # wider than DeepSeek's 512: small tiles keep the accumulator and shared memory in bounds
        return DecodeConfig(block_m=16, block_n=16, num_warps=8, num_stages=2)
    if dtype == torch.float32:
        # IEEE fp32 dots run on the FMA units; [32, 512] fp32 tiles would spill, keep 16 rows
        if block_v > 128:
            return DecodeConfig(block_m=16, block_n=16, num_warps=8, num_stages=2)
        return DecodeConfig(block_m=min(_pow2_at_least(num_rows), 32), block_n=32, num_warps=4, num_stages=2)
    if num_rows > 32:
        # compute-bound: 64 rows, so each warpgroup issues 64-row wgmma; 8 warps (two warpgroups)
        # split the [64, head_dim_v] fp32 accumulator (128 registers a thread at head_dim_v = 512)
        if wide and kv_format == "fp8_ds_mla":
            # the dequantised tile and its scales double-buffered: 64-key tiles need 272 KB of shared
            # memory (Triton 3.6, sm_90a; the H200 refused the launch), 32-key tiles 172 KB
            return DecodeConfig(block_m=64, block_n=32, num_warps=8, num_stages=2)
        return DecodeConfig(block_m=64, block_n=64, num_warps=8, num_stages=2)
    if num_rows > 16:
        # 17..32 rows (e.g. h=16 with s_q=2): mma.sync, 32-row tiles
        return DecodeConfig(block_m=32, block_n=64, num_warps=8, num_stages=3)
    # memory-bound, <= 16 rows: 3-stage pipeline of 32-key tiles; 2 programs fit an SM (registers,
    # shared memory); about 3 waves of them keep the tail short
    if wide:
        return DecodeConfig(block_m=16, block_n=32, num_warps=4, num_stages=3, resident_per_sm=2, waves=3)
    return DecodeConfig(block_m=16, block_n=64, num_warps=4, num_stages=2, resident_per_sm=2, waves=3)


@dataclass(frozen=True)
class DecodePlan:
    """What a launch needs besides the tensors: the config and the split count."""

    config: DecodeConfig
    num_splits: int


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRETER_SM_COUNT


def _split_count(units: int, max_len: int, config: DecodeConfig, sm_count: int) -> int:
    """Splits per (sequence, row group) `unit`: about config.waves waves of resident programs, at
    most one per MIN_SPLIT_TOKENS keys; among the counts from 2/3 of that up to it, the one whose
    last wave is fullest (ties: more splits)."""
    slots = config.resident_per_sm * sm_count
    wanted = triton.cdiv(config.waves * slots, max(units, 1))
    high = max(1, min(wanted, triton.cdiv(max_len, MIN_SPLIT_TOKENS)))

    def idle(splits: int) -> float:  # idle fraction of the slots over all waves
        programs = units * splits
        return 1 - programs / (triton.cdiv(programs, slots) * slots)

    return min(range(high, max(1, high - high // 3) - 1, -1), key=idle)


def plan_decode(q: torch.Tensor, kv_cache: torch.Tensor, cache_seqlens: torch.Tensor, head_dim_v: int,
                num_splits: int | None = None, config: DecodeConfig | None = None,
                indices: torch.Tensor | None = None, kv_format: str = "native") -> DecodePlan:
    """The config and split count for these inputs (reads max(cache_seqlens): a host sync; with
    sparse indices the longest list is their topk and nothing is read)."""
    b, s_q, h_q, d = q.shape
    sequences, num_rows = (b * s_q, h_q) if indices is not None else (b, s_q * h_q)
    config = config or decode_config(q.dtype, num_rows, d, head_dim_v, kv_format)
    if num_splits is None:
        if indices is not None:
            max_len = indices.shape[-1]
        else:
            max_len = int(cache_seqlens.max()) if b else 0
        num_splits = _split_count(sequences * triton.cdiv(num_rows, config.block_m), max_len, config,
                                  _sm_count(q.device))
    if not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"num_splits must be an int >= 1; got {num_splits!r}")
    return DecodePlan(config=config, num_splits=num_splits)


# ----------------------------------------------------------------------------------------------
# Host wrappers
# ----------------------------------------------------------------------------------------------

def launch_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, cache_seqlens: torch.Tensor,
                  head_dim_v: int, softmax_scale: float, causal: bool, plan: DecodePlan, *, kv_format: str = "native",
                  k_scale: torch.Tensor | None = None, indices: torch.Tensor | None = None,
                  attn_sink: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Allocate the outputs and launch; no validation and no host sync (graph-capturable)."""
    b, s_q, h_q, d = q.shape
    page_size = kv_cache.shape[1]
    sparse = indices is not None
    sequences, num_rows = (b * s_q, h_q) if sparse else (b, s_q * h_q)
    config, num_splits = plan.config, plan.num_splits
    out = torch.empty(b, s_q, h_q, head_dim_v, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, h_q, s_q, dtype=torch.float32, device=q.device)
    if out.numel() == 0 and lse.numel() == 0:
        return out, lse
    single = num_splits == 1
    if single:
        out_part = lse_part = out  # unused
    else:
        out_part = torch.empty(sequences, num_splits, num_rows, head_dim_v, dtype=torch.float32, device=q.device)
        lse_part = torch.empty(sequences, num_splits, num_rows, dtype=torch.float32, device=q.device)
    # the cache as the kernel reads it: for fp8_ds_mla three views of the same bytes
    cache = scales = rope = kv_cache
    if kv_format == "fp8_ds_mla":
        cache, scales, rope = split_packed(kv_cache, d, head_dim_v)
    index_strides = indices.stride() if sparse else (0, 0, 0)
    block_v = _pow2_at_least(head_dim_v)
    block_r = _pow2_at_least(d - head_dim_v)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit inputs
    grid = (triton.cdiv(num_rows, config.block_m), num_splits, sequences)
    args = (
        q, cache, scales, rope, k_scale if k_scale is not None else q, block_table, cache_seqlens,
        indices if sparse else block_table, attn_sink if attn_sink is not None else q, out, lse, out_part, lse_part,
        softmax_scale * LOG2E, page_size, num_rows, h_q, s_q, num_splits, kv_cache.shape[0] * page_size,
        indices.shape[-1] if sparse else 0,
        *q.stride(),
        cache.stride(0), cache.stride(1), cache.stride(3),
        scales.stride(0), scales.stride(1), rope.stride(0), rope.stride(1),
        block_table.stride(0), *index_strides,
        *out.stride(),
        *lse.stride(),
        num_splits * num_rows * head_dim_v, num_rows * head_dim_v, head_dim_v, num_splits * num_rows, num_rows,
    )
    # a split's key range is cut in whole tiles of its own size: a shorter tile keeps the plan valid
    launch_fitting(_split_kernel, grid, args,
                   dict(HEAD_DIM=d, HEAD_DIM_V=head_dim_v, BLOCK_V=block_v, BLOCK_R=block_r,
                        CAUSAL=bool(causal) and not sparse, SINGLE_SPLIT=single, DOT_PRECISION=precision,
                        KV_FORMAT=FORMAT_CODES[kv_format], SPARSE=sparse, ATTN_SINK=attn_sink is not None),
                   config)
    if not single:
        _merge_kernel[(num_rows, sequences)](
            out_part, lse_part, attn_sink if attn_sink is not None else q, out, lse, num_splits, h_q, s_q,
            num_splits * num_rows * head_dim_v, num_rows * head_dim_v, head_dim_v, num_splits * num_rows, num_rows,
            *out.stride(),
            *lse.stride(),
            HEAD_DIM_V=head_dim_v, BLOCK_V=block_v, BLOCK_S=triton.next_power_of_2(num_splits),
            SPARSE=sparse, ATTN_SINK=attn_sink is not None,
            num_warps=max(1, min(4, block_v // 128)),
        )
    return out, lse


def smaller_configs(config: DecodeConfig, retile: bool = True) -> list[DecodeConfig]:
    """What to launch instead of `config` on a GPU whose shared memory it exceeds: the same rows and
    warps (so the grid and the plan stay valid), fewer pipeline stages and (retile) shorter key
    tiles down to MIN_DOT, largest first (shared memory goes as key tile × stages; at equal size the
    deeper pipeline first). The configs were sized for an H200's 227 KB a block; an A100 has 164 KB,
    an L40S 99 KB."""
    tiles = [config.block_n >> k for k in range(8) if config.block_n >> k >= MIN_DOT] if retile else [config.block_n]
    candidates = [dataclasses.replace(config, block_n=n, num_stages=stages)
                  for n in tiles for stages in range(config.num_stages, 0, -1)]
    candidates = [c for c in candidates if c != config]
    return sorted(candidates, key=lambda c: (-c.block_n * c.num_stages, -c.num_stages))


def launch_fitting(kernel, grid: tuple, args: tuple, constexprs: dict, config: DecodeConfig,
                   retile: bool = True) -> DecodeConfig:
    """Launch `kernel` over `grid` with `config`'s tile, or, where this GPU refuses it for lack of
    shared memory (Triton raises before launching), with the first of `smaller_configs` it accepts.
    Returns the config launched. On the H200 every config of decode_config fits (the first try)."""
    refused = []
    for candidate in (config, *smaller_configs(config, retile)):
        try:
            kernel[grid](*args, **constexprs, BLOCK_M=candidate.block_m, BLOCK_N=candidate.block_n,
                         num_warps=candidate.num_warps, num_stages=candidate.num_stages)
            return candidate
        except OutOfResources as error:
            refused.append(f"{candidate.block_n} keys × {candidate.num_stages} stages: {error}")
    raise RuntimeError(f"no tile of {config.block_m} rows fits this GPU's shared memory; tried "
                       + "; ".join(refused))


def _check_supported(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                     cache_seqlens: torch.Tensor, head_dim_v: int) -> None:
    """What validate_decode_inputs leaves to the implementation: dtype, widths, devices."""
    if q.dtype not in CAPABILITIES.dtypes:
        raise TypeError(f"q must be bfloat16, float16 or float32; got {q.dtype}")
    if interpreting() and q.dtype not in INTERPRETER_CAPABILITIES.dtypes:
        raise TypeError(f"under TRITON_INTERPRET=1, q must be float16 or float32 (a bf16 tl.dot is wrong in "
                        f"Triton's interpreter); got {q.dtype}")
    if head_dim_v > MAX_HEAD_DIM_V or q.shape[-1] - head_dim_v > MAX_ROPE_DIM:
        raise ValueError(f"head_dim_v must be <= {MAX_HEAD_DIM_V} and d - head_dim_v <= {MAX_ROPE_DIM}; got "
                         f"d={q.shape[-1]}, head_dim_v={head_dim_v}")
    for name, tensor in (("kv_cache", kv_cache), ("block_table", block_table), ("cache_seqlens", cache_seqlens)):
        if tensor.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}; got {tensor.device}")
    if q.device.type != "cuda" and not interpreting():
        raise ValueError(f"triton_paged_decode needs CUDA tensors; got q on {q.device} (to run it on the CPU, "
                         "set TRITON_INTERPRET=1 before triton is first imported)")


def paged_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, cache_seqlens: torch.Tensor,
                 head_dim_v: int, softmax_scale: float, causal: bool = False, *, is_fp8_kvcache: bool = False,
                 k_scale: torch.Tensor | None = None, indices: torch.Tensor | None = None,
                 attn_sink: torch.Tensor | None = None, num_splits: int | None = None,
                 config: DecodeConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """triton_paged_decode with the split count and the config open to override (tests, sweeps)."""
    kv_format = validate_decode_inputs(q, kv_cache, block_table, cache_seqlens, head_dim_v,
                                       is_fp8_kvcache=is_fp8_kvcache, k_scale=k_scale, indices=indices,
                                       attn_sink=attn_sink)
    _check_supported(q, kv_cache, block_table, cache_seqlens, head_dim_v)
    for name, tensor in (("k_scale", k_scale), ("indices", indices), ("attn_sink", attn_sink)):
        if tensor is not None and tensor.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}; got {tensor.device}")
    plan = plan_decode(q, kv_cache, cache_seqlens, head_dim_v, num_splits=num_splits, config=config, indices=indices,
                       kv_format=kv_format)
    return launch_decode(q, kv_cache, block_table, cache_seqlens, head_dim_v, float(softmax_scale), causal, plan,
                         kv_format=kv_format, k_scale=k_scale, indices=indices, attn_sink=attn_sink)


def _declared() -> Capabilities:
    return INTERPRETER_CAPABILITIES if interpreting() else CAPABILITIES


@declare(_declared())
def triton_paged_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                        cache_seqlens: torch.Tensor, head_dim_v: int, softmax_scale: float,
                        causal: bool = False, *, is_fp8_kvcache: bool = False, k_scale: torch.Tensor | None = None,
                        indices: torch.Tensor | None = None,
                        attn_sink: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorbed MLA decode (see the module docstring for shapes). Returns out [b, s_q, h_q,
    head_dim_v] in q.dtype and lse [b, h_q, s_q] float32 (natural log); a row that sees no key
    gets out 0 and lse -inf. Inputs are not modified. FP8 caches (is_fp8_kvcache, k_scale),
    sparse indices and attention sinks follow mla_verify.decode.contract."""
    return paged_decode(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal,
                        is_fp8_kvcache=is_fp8_kvcache, k_scale=k_scale, indices=indices, attn_sink=attn_sink)
