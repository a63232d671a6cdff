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
   plan (split count) and the host wrappers.

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

from mla_verify.decode.contract import Capabilities, declare, validate_decode_inputs

__all__ = ["triton_paged_decode", "paged_decode", "DecodeConfig", "DecodePlan", "decode_config", "plan_decode",
           "launch_decode", "interpreting"]

LOG2E = 1.4426950408889634
LN2 = tl.constexpr(0.6931471805599453)  # a constexpr global: usable inside kernels
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
def _attend_range(acc, m_i, l_i, q_lat, q_rope, cache_ptr, table_ptr, start, end, row_limit, qk_scale, page_size,
                  stride_cache_block, stride_cache_slot, stride_cache_col,
                  HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_R: tl.constexpr,
                  CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online softmax over key positions [start, end) of one sequence for BLOCK_M query rows.
    acc [BLOCK_M, BLOCK_V] fp32 unnormalised output; m_i running max and l_i running sum of
    2^(s - m_i), both [BLOCK_M] fp32, scores s in base-2 units."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_v = tl.arange(0, BLOCK_V)
    offs_r = tl.arange(0, BLOCK_R)
    col_v = offs_v < HEAD_DIM_V
    col_r = offs_r < HEAD_DIM - HEAD_DIM_V
    # block ids of the first tile; each iteration fetches the next tile's, so the cache loads of an
    # iteration depend on no load of the same iteration and Triton's software pipeliner multi-
    # buffers them (with the ids loaded in the same iteration it kept a single buffer: every
    # tile's HBM latency exposed, half the bandwidth)
    block = tl.load(table_ptr + (start + offs_n) // page_size, mask=start + offs_n < end, other=0)
    for start_n in range(start, end, BLOCK_N):
        # -- gather BLOCK_N cache rows through the block table; slots past `end` are not read --
        pos = start_n + offs_n
        in_range = pos < end
        row = block.to(tl.int64) * stride_cache_block + (pos % page_size) * stride_cache_slot
        block = tl.load(table_ptr + (pos + BLOCK_N) // page_size, mask=pos + BLOCK_N < end, other=0)
        kv = tl.load(cache_ptr + row[:, None] + offs_v[None, :] * stride_cache_col,
                     mask=in_range[:, None] & col_v[None, :], other=0.0)
        # -- scores: latent part and rope part, one fp32 accumulator --
        s = tl.dot(q_lat, tl.trans(kv), input_precision=DOT_PRECISION)
        if HEAD_DIM > HEAD_DIM_V:
            k_rope = tl.load(cache_ptr + row[:, None] + (HEAD_DIM_V + offs_r)[None, :] * stride_cache_col,
                             mask=in_range[:, None] & col_r[None, :], other=0.0)
            s = tl.dot(q_rope, tl.trans(k_rope), s, input_precision=DOT_PRECISION)
        s = s * qk_scale
        if CAUSAL:
            visible = in_range[None, :] & (pos[None, :] < row_limit[:, None])
        else:
            visible = in_range[None, :]
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
        m_i = m_new
    return acc, m_i, l_i


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------

@triton.jit
def _split_kernel(Q, Cache, BlockTable, SeqLens, Out, Lse, OutPart, LsePart,
                  qk_scale, page_size, num_rows, h_q, s_q, num_splits,
                  stride_qb, stride_qs, stride_qh, stride_qd,
                  stride_cache_block, stride_cache_slot, stride_cache_col,
                  stride_tb,
                  stride_ob, stride_os, stride_oh, stride_od,
                  stride_lb, stride_lh, stride_ls,
                  stride_pb, stride_ps, stride_pr, stride_lpb, stride_lps,
                  HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_R: tl.constexpr,
                  CAUSAL: tl.constexpr, SINGLE_SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)  # row group (fastest: groups sharing cache tiles run side by side)
    pid_s = tl.program_id(1)  # split
    pid_b = tl.program_id(2).to(tl.int64)  # sequence

    seq_len = tl.load(SeqLens + pid_b)
    # this split's keys: chunks of whole tiles, the same count for every sequence
    chunk = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = pid_s * chunk
    end = tl.minimum(start + chunk, seq_len)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < num_rows
    query = rows // h_q
    head = rows % h_q
    row_limit = seq_len - s_q + query + 1  # causal: query i sees positions < L - s_q + i + 1
    if CAUSAL:  # no key past the group's last visible position
        last_query = tl.minimum(s_q - 1, (pid_m * BLOCK_M + BLOCK_M - 1) // h_q)
        end = tl.minimum(end, seq_len - s_q + last_query + 1)

    offs_v = tl.arange(0, BLOCK_V)
    offs_r = tl.arange(0, BLOCK_R)
    col_v = offs_v < HEAD_DIM_V
    col_r = offs_r < HEAD_DIM - HEAD_DIM_V
    q_row = Q + pid_b * stride_qb + query * stride_qs + head * stride_qh
    q_lat = tl.load(q_row[:, None] + offs_v[None, :] * stride_qd, mask=row_ok[:, None] & col_v[None, :], other=0.0)
    q_rope = tl.load(q_row[:, None] + (HEAD_DIM_V + offs_r)[None, :] * stride_qd,
                     mask=row_ok[:, None] & col_r[None, :], other=0.0)

    acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i = _attend_range(acc, m_i, l_i, q_lat, q_rope, Cache, BlockTable + pid_b * stride_tb, start, end,
                                  row_limit, qk_scale, page_size, stride_cache_block, stride_cache_slot,
                                  stride_cache_col, HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_V, BLOCK_R, CAUSAL,
                                  DOT_PRECISION)

    # normalise; an empty row (l = 0) has acc = 0 and gets lse -inf
    has_key = l_i > 0.0
    o = acc / tl.where(has_key, l_i, 1.0)[:, None]
    lse2 = tl.where(has_key, m_i + tl.math.log2(tl.where(has_key, l_i, 1.0)), float("-inf"))
    if SINGLE_SPLIT:
        out_ptr = Out + pid_b * stride_ob + query * stride_os + head * stride_oh
        tl.store(out_ptr[:, None] + offs_v[None, :] * stride_od, o.to(Out.dtype.element_ty),
                 mask=row_ok[:, None] & col_v[None, :])
        tl.store(Lse + pid_b * stride_lb + head * stride_lh + query * stride_ls, lse2 * LN2, mask=row_ok)
    else:
        part = pid_b * stride_pb + pid_s * stride_ps + rows * stride_pr
        tl.store(OutPart + part[:, None] + offs_v[None, :], o, mask=row_ok[:, None] & col_v[None, :])
        tl.store(LsePart + pid_b * stride_lpb + pid_s * stride_lps + rows, lse2, mask=row_ok)


@triton.jit
def _merge_kernel(OutPart, LsePart, Out, Lse, num_splits, h_q,
                  stride_pb, stride_ps, stride_pr, stride_lpb, stride_lps,
                  stride_ob, stride_os, stride_oh, stride_od,
                  stride_lb, stride_lh, stride_ls,
                  HEAD_DIM_V: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_S: tl.constexpr):
    row = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
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
    lse = tl.where(has_key, (m_safe + tl.math.log2(tl.where(has_key, total, 1.0))) * LN2, float("-inf"))
    tl.store(Out + pid_b * stride_ob + query * stride_os + head * stride_oh + offs_v * stride_od,
             out.to(Out.dtype.element_ty), mask=col_v)
    tl.store(Lse + pid_b * stride_lb + head * stride_lh + query * stride_ls, lse)


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


def decode_config(dtype: torch.dtype, num_rows: int, head_dim: int, head_dim_v: int) -> DecodeConfig:
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
                num_splits: int | None = None, config: DecodeConfig | None = None) -> DecodePlan:
    """The config and split count for these inputs (reads max(cache_seqlens): a host sync)."""
    b, s_q, h_q, d = q.shape
    num_rows = s_q * h_q
    config = config or decode_config(q.dtype, num_rows, d, head_dim_v)
    if num_splits is None:
        max_len = int(cache_seqlens.max()) if b else 0
        num_splits = _split_count(b * triton.cdiv(num_rows, config.block_m), max_len, config, _sm_count(q.device))
    if not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"num_splits must be an int >= 1; got {num_splits!r}")
    return DecodePlan(config=config, num_splits=num_splits)


# ----------------------------------------------------------------------------------------------
# Host wrappers
# ----------------------------------------------------------------------------------------------

def launch_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, cache_seqlens: torch.Tensor,
                  head_dim_v: int, softmax_scale: float, causal: bool, plan: DecodePlan
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Allocate the outputs and launch; no validation and no host sync (graph-capturable)."""
    b, s_q, h_q, d = q.shape
    page_size = kv_cache.shape[1]
    num_rows = s_q * h_q
    config, num_splits = plan.config, plan.num_splits
    out = torch.empty(b, s_q, h_q, head_dim_v, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, h_q, s_q, dtype=torch.float32, device=q.device)
    if out.numel() == 0 and lse.numel() == 0:
        return out, lse
    single = num_splits == 1
    if single:
        out_part = lse_part = out  # unused
    else:
        out_part = torch.empty(b, num_splits, num_rows, head_dim_v, dtype=torch.float32, device=q.device)
        lse_part = torch.empty(b, num_splits, num_rows, dtype=torch.float32, device=q.device)
    block_v = _pow2_at_least(head_dim_v)
    block_r = _pow2_at_least(d - head_dim_v)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit inputs
    grid = (triton.cdiv(num_rows, config.block_m), num_splits, b)
    _split_kernel[grid](
        q, kv_cache, block_table, cache_seqlens, out, lse, out_part, lse_part,
        softmax_scale * LOG2E, page_size, num_rows, h_q, s_q, num_splits,
        *q.stride(),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(3),
        block_table.stride(0),
        *out.stride(),
        *lse.stride(),
        num_splits * num_rows * head_dim_v, num_rows * head_dim_v, head_dim_v, num_splits * num_rows, num_rows,
        HEAD_DIM=d, HEAD_DIM_V=head_dim_v,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_V=block_v, BLOCK_R=block_r,
        CAUSAL=bool(causal), SINGLE_SPLIT=single, DOT_PRECISION=precision,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if not single:
        _merge_kernel[(num_rows, b)](
            out_part, lse_part, out, lse, num_splits, h_q,
            num_splits * num_rows * head_dim_v, num_rows * head_dim_v, head_dim_v, num_splits * num_rows, num_rows,
            *out.stride(),
            *lse.stride(),
            HEAD_DIM_V=head_dim_v, BLOCK_V=block_v, BLOCK_S=triton.next_power_of_2(num_splits),
            num_warps=max(1, min(4, block_v // 128)),
        )
    return out, lse


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
                 head_dim_v: int, softmax_scale: float, causal: bool = False, *, num_splits: int | None = None,
                 config: DecodeConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """triton_paged_decode with the split count and the config open to override (tests, sweeps)."""
    validate_decode_inputs(q, kv_cache, block_table, cache_seqlens, head_dim_v)
    _check_supported(q, kv_cache, block_table, cache_seqlens, head_dim_v)
    plan = plan_decode(q, kv_cache, cache_seqlens, head_dim_v, num_splits=num_splits, config=config)
    return launch_decode(q, kv_cache, block_table, cache_seqlens, head_dim_v, float(softmax_scale), causal, plan)


def _declared() -> Capabilities:
    return INTERPRETER_CAPABILITIES if interpreting() else CAPABILITIES


@declare(_declared())
def triton_paged_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                        cache_seqlens: torch.Tensor, head_dim_v: int, softmax_scale: float,
                        causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorbed MLA decode (see the module docstring for shapes). Returns out [b, s_q, h_q,
    head_dim_v] in q.dtype and lse [b, h_q, s_q] float32 (natural log); a row that sees no key
    gets out 0 and lse -inf. Inputs are not modified."""
    return paged_decode(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal)
