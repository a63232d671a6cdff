"""Absorbed MLA decode over the paged latent cache, scheduled on the device: the split kernel of
mla_verify.kernels.triton_decode (same inner loop, same tiles) driven by a work plan made from the
lengths on the GPU, and on Hopper the Gluon kernel of mla_verify.kernels.hopper_decode.

    scheduled_paged_decode(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale,
                           causal=False) -> (out, lse)

The contract, the capabilities and the inner loop (`_attend_range`, `_attend_list`, the FP8 and
sparse paths, masking) are triton_decode's; what differs is how the work is cut and launched:

1. `_schedule_kernel`: the work plan, made on the device from the lengths (no host sync). Every
   sequence costs its key tiles plus a fixed overhead; all sequences' costs laid end to end are cut
   into equal parts, so a batch of mixed lengths is balanced as well as one of equal lengths
   (FlashMLA's tile-scheduler metadata works the same way). A piece is one sequence's share of one
   part: a contiguous key range. When the plan allows it (the Hopper path) and whole sequences
   would keep the wave about as busy as cut ones (CUT_COST_TOKENS), every sequence is a part of
   its own instead (no merge); this too is decided here, from the lengths;
2. `_split_kernel`: one program per (row group, piece), the grid sized for the most pieces there
   can be (sequences + parts). Its program writes the normalised partial output and lse (float32,
   base 2) to the piece's slot. (The Hopper kernels instead run one program per part, which walks
   the part's pieces one after the other: a balanced wave whatever the lengths);
3. `_merge_kernel`: per query row of a sequence and block of output columns, combines its pieces,
   up to MERGE_SPLITS at once, in a fixed order (bit-reproducible): weights 2^(lse_s - max), empty pieces contribute nothing, an
   all-empty row gives out 0 and lse -inf; a sequence of one piece is copied (the same bits). The
   attention sink is applied here;
4. the plan, from shapes alone: parts = WAVES · R · SMs / row groups (R the config's programs
   resident per SM), each at least MIN_SPLIT_TOKENS keys' worth of work. On the Hopper path one
   wave of parts (a program per SM), or one part per sequence (no merge) when the schedule kernel
   finds whole sequences no slower. `launch_decode` with a
   plan made ahead reads no tensor on the host: a serving loop can capture schedule, split and
   merge in one CUDA graph.

On Hopper (sm_90) with bf16/fp16, d = 576/512, page 64, a native cache, no indices and no sink, the
split kernel is one of hopper_decode's Gluon kernels (TMA, wgmma; a transposed one for at most 32
query rows) on the same schedule, merged by the same merge (it stores a sequence's only piece as the
final result itself).

Status: certified on the CPU through Triton's interpreter and on an H200 (thorough and default
profiles; results/triton-scheduled/). Speed beside the fixed-split kernel and the peers:
benchmarks/decode_bench_h200.md and benchmarks/triton_decode_results.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from mla_verify.decode.contract import declare, validate_decode_inputs
from mla_verify.decode.fp8 import split_packed
from mla_verify.kernels.triton_decode import (FORMAT_CODES, LN2, LOG2E, LOG2E_C, DecodeConfig, _attend_list,
                                              _attend_range, _check_supported, _declared, _pow2_at_least, _sm_count,
                                              decode_config, interpreting, launch_fitting)

__all__ = ["scheduled_paged_decode", "paged_decode", "DecodePlan", "plan_decode", "schedule_decode",
           "launch_decode", "HOPPER_CONFIG"]

# A part covers at least this many keys' worth of work (except the last): below it the partial
# results written and merged cost more than the parallelism gains.
MIN_SPLIT_TOKENS = 128
# The fixed cost of a sequence (query load, epilogue, partial write and merge) in keys' worth of
# work, counted in the plan beside its key tiles.
OVERHEAD_TOKENS = 64
# Parts per resident program slot: pieces of about a third of a wave keep the last wave short.
WAVES = 3
# The Hopper path's choice between whole sequences and one wave of parts (`_schedule_kernel`), a cost
# model fitted to H200 runs (`bench_decode.py --sweep whole-or-cut`, 20 shapes and b = 1:
# benchmarks/triton_decode_results.md). Cutting costs, beyond the work itself, this many keys' worth
# of a program's time per sequence per program of the wave (partial results written and merged, a
# pipeline fill per piece; Nsight Compute puts most of it in the merge): measured 18-23 tiles of 64
# keys at h = 16 and b/wave 0.97, 36-41 at h = 128 and b/wave 1.94.
CUT_COST_TOKENS = 1280
# Whole sequences on the few-rows kernel are memory-bound: while some programs idle, the busy ones
# draw more of the bandwidth, so only this share of the idle tail costs time (0.54-0.58 measured at
# h = 16), and a program alone runs at most LONE_SPEEDUP times its fair share (48 GB/s against
# 32 at b = 1). The 64-row kernel is compute-bound: the whole tail costs, no speed-up.
MEMORY_BOUND_TAIL_SHARE = 0.55
LONE_SPEEDUP = 1.5
# The merge's tile: this many splits × output columns at once.
MERGE_SPLITS = 32
MERGE_COLUMNS = 128
# The merge gives a program a whole row when there are this many rows per SM (else MERGE_COLUMNS).
MERGE_ROWS_PER_SM = 4


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------

@triton.jit
def _schedule_kernel(SeqLens, SeqStart, SeqSplits, SeqSlot, SeqFirstPart, Totals,
                     num_seqs, num_parts, min_part_units, topk, wave_sequences, cut_cost_units, tail_share,
                     lone_speedup,
                     BLOCK_N: tl.constexpr, OVERHEAD_UNITS: tl.constexpr, BLOCK_B: tl.constexpr,
                     SPARSE: tl.constexpr):
    """The launch's work plan, made on the device from the lengths (one program; no host sync, so a
    serving loop can capture the whole decode in a CUDA graph).

    A sequence costs OVERHEAD_UNITS + cdiv(length, BLOCK_N) units: its fixed cost (query load,
    epilogue, partial write, merge), then its key tiles. The sequences' units laid end to end are
    cut into equal parts of per_part = max(cdiv(total, num_parts), min_part_units) units; part p is
    one program per row group. A sequence's splits are the parts that hold its tiles (a part that
    holds only its overhead does not work on it; a sequence with no key is done by the part
    holding its first unit). A (sequence, part) pair is a piece; pieces are numbered sequence by
    sequence in part order, and piece k writes its partial result to slot k. (The tl split kernel
    runs a program per piece; the Hopper kernels a program per part, walking its pieces.)
    Per sequence this writes the unit its cost starts at, its first part, its split count and its
    first piece; Totals = (per_part, total units, total pieces).

    Whole sequences: cutting has a price (partial results written and merged, a pipeline fill per
    piece), so when whole sequences keep the SMs about as busy it is cheaper not to cut.
    `wave_sequences` is the number of sequences whose programs make one wave (0: never whole); in
    units of one program's work, cut takes spread = total / wave_sequences plus `cut_cost_units` per
    sequence per program; whole sequences go to SMs as SMs free up and take greedy = max(longest,
    spread + tail · longest), tail the last wave's idle share for equal lengths and about half of
    the longest for mixed ones, of which only `tail_share` costs time and no less than longest /
    `lone_speedup` (memory-bound programs share the bandwidth of idle ones). Whole when that is no
    longer: every sequence gets a part of its own, per_part = the longest cost and sequence i's units
    start at i·per_part."""
    offs = tl.arange(0, BLOCK_B)
    total = tl.full([], 0, tl.int32)
    longest = tl.full([], 0, tl.int32)
    shortest = tl.full([], 2**30, tl.int32)
    for first in range(0, num_seqs, BLOCK_B):
        seq = first + offs
        ok = seq < num_seqs
        if SPARSE:
            length = tl.full([BLOCK_B], topk, tl.int32)
        else:
            length = tl.load(SeqLens + seq, mask=ok, other=0)
        units = tl.where(ok, OVERHEAD_UNITS + tl.cdiv(length, BLOCK_N), 0)
        tl.store(SeqStart + seq, total + tl.cumsum(units, 0) - units, mask=ok)
        total += tl.sum(units, 0)
        longest = tl.maximum(longest, tl.max(units, 0))
        shortest = tl.minimum(shortest, tl.min(tl.where(ok, units, 2**30), 0))
    capacity = tl.maximum(wave_sequences, 1e-6)
    per_program = num_seqs / capacity  # sequences per program of the wave
    spread = total.to(tl.float32) / capacity  # the batch's units spread evenly over the wave
    # whole sequences as SMs free up: equal ones leave the last wave's idle tail (waves - per_program),
    # mixed ones about half the longest
    alike = shortest.to(tl.float32) / tl.maximum(longest, 1).to(tl.float32)
    tail = (tl.ceil(per_program) - per_program) * alike + 0.5 * (1.0 - alike)
    greedy = tl.maximum(longest.to(tl.float32), spread + tail * longest)
    whole_time = tl.maximum(spread + tail_share * (greedy - spread), longest / lone_speedup)
    whole = (wave_sequences > 0.0) & (whole_time <= spread + cut_cost_units * per_program)
    per_part = tl.where(whole, longest, tl.maximum(tl.cdiv(total, num_parts), min_part_units))
    tl.store(Totals, per_part)
    tl.store(Totals + 1, tl.where(whole, num_seqs * longest, total))
    tl.debug_barrier()  # the starts written above are read back by other threads
    slots = tl.full([], 0, tl.int32)
    for first in range(0, num_seqs, BLOCK_B):
        seq = first + offs
        ok = seq < num_seqs
        start = tl.where(whole, seq * longest, tl.load(SeqStart + seq, mask=ok, other=0))
        tl.store(SeqStart + seq, start, mask=ok)  # unchanged unless whole
        if SPARSE:
            length = tl.full([BLOCK_B], topk, tl.int32)
        else:
            length = tl.load(SeqLens + seq, mask=ok, other=0)
        tiles = tl.cdiv(length, BLOCK_N)
        first_tile = start + OVERHEAD_UNITS
        first_part = tl.where(tiles > 0, first_tile // per_part, start // per_part)
        last_part = tl.where(tiles > 0, (first_tile + tiles - 1) // per_part, first_part)
        splits = tl.where(ok, last_part - first_part + 1, 0)
        tl.store(SeqFirstPart + seq, first_part, mask=ok)
        tl.store(SeqSplits + seq, splits, mask=ok)
        tl.store(SeqSlot + seq, slots + tl.cumsum(splits, 0) - splits, mask=ok)
        slots += tl.sum(splits, 0)
    tl.store(Totals + 2, slots)


@triton.jit
def _find_piece(piece, SeqLens, SeqStart, SeqSlot, SeqFirstPart, Totals, num_seqs, topk,
                BLOCK_N: tl.constexpr, OVERHEAD_UNITS: tl.constexpr, BLOCK_B: tl.constexpr, SPARSE: tl.constexpr):
    """Piece `piece` of the schedule: (sequence, its length, key range [start, end)). The sequence is
    the last whose first piece is <= piece (first pieces strictly increase:
    every sequence has one); the part is the sequence's first part + the piece's rank in it."""
    offs = tl.arange(0, BLOCK_B)
    seq = tl.full([], -1, tl.int32)
    for first in range(0, num_seqs, BLOCK_B):
        firsts = tl.load(SeqSlot + first + offs, mask=first + offs < num_seqs, other=piece + 1)
        seq += tl.sum((firsts <= piece).to(tl.int32), 0)
    part = tl.load(SeqFirstPart + seq) + piece - tl.load(SeqSlot + seq)
    per_part = tl.load(Totals)
    unit_lo = part * per_part
    unit_hi = tl.minimum(unit_lo + per_part, tl.load(Totals + 1))
    if SPARSE:
        seq_len = topk
    else:
        seq_len = tl.load(SeqLens + seq)
    first_tile = tl.load(SeqStart + seq) + OVERHEAD_UNITS
    start = tl.maximum(unit_lo - first_tile, 0) * BLOCK_N
    end = tl.minimum(tl.minimum(unit_hi - first_tile, tl.cdiv(seq_len, BLOCK_N)) * BLOCK_N, seq_len)
    return seq, seq_len, start, end


@triton.jit
def _split_kernel(Q, Cache, Scales, Rope, KScale, BlockTable, SeqLens, Indices, OutPart, LsePart,
                  SeqStart, SeqSplits, SeqSlot, SeqFirstPart, Totals,
                  qk_scale, page_size, num_rows, h_q, s_q, num_seqs, num_slots, topk,
                  stride_qb, stride_qs, stride_qh, stride_qd,
                  stride_cache_block, stride_cache_slot, stride_cache_col,
                  stride_scale_block, stride_scale_slot, stride_rope_block, stride_rope_slot,
                  stride_tb, stride_ib, stride_is, stride_ik,
                  HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_B: tl.constexpr, OVERHEAD_UNITS: tl.constexpr, CAUSAL: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, KV_FORMAT: tl.constexpr, SPARSE: tl.constexpr):
    pid_m = tl.program_id(0)  # row group (fastest: groups sharing cache tiles run side by side)
    piece = tl.program_id(1)  # piece of the schedule (the grid has room for the most there can be)
    if piece < tl.load(Totals + 2):
        seq, seq_len, start, end = _find_piece(piece, SeqLens, SeqStart, SeqSlot, SeqFirstPart, Totals,
                                               num_seqs, topk, BLOCK_N, OVERHEAD_UNITS, BLOCK_B, SPARSE)
        pid_b = seq.to(tl.int64)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < num_rows
        if SPARSE:  # sequence = (batch row, query), rows = its heads, keys = its index list
            batch = pid_b // s_q
            query = (pid_b % s_q) + rows * 0
            head = rows
        else:  # rows fold s_q·h_q: row r = query r // h_q, head r % h_q
            batch = pid_b
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
        q_row = Q + batch * stride_qb + query * stride_qs + head * stride_qh
        q_lat = tl.load(q_row[:, None] + offs_v[None, :] * stride_qd, mask=row_ok[:, None] & col_v[None, :],
                        other=0.0)
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
        # the partial result in the piece's own slot, also for a sequence's only piece: the merge writes
        # every final result (one store path here keeps the 16-row config within its registers)
        part_rows = piece.to(tl.int64) * num_rows + rows
        tl.store(OutPart + part_rows[:, None] * HEAD_DIM_V + offs_v[None, :], o,
                 mask=row_ok[:, None] & col_v[None, :])
        tl.store(LsePart + part_rows, lse2, mask=row_ok)


@triton.jit
def _merge_kernel(OutPart, LsePart, SeqSplits, SeqSlot, Sink, Out, Lse, num_rows, h_q, s_q,
                  stride_ob, stride_os, stride_oh, stride_od,
                  stride_lb, stride_lh, stride_ls,
                  HEAD_DIM_V: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, COLUMNS: tl.constexpr,
                  SPARSE: tl.constexpr, ATTN_SINK: tl.constexpr, FINAL_IN_SPLIT: tl.constexpr):
    """One query row of one sequence, COLUMNS output columns (BLOCK_C at a time): the splits' partial
    outputs weighted by 2^(lse_split - max). BLOCK_S splits are loaded at once (one vector of lse,
    one [BLOCK_S, BLOCK_C] tile of partials), so a long sequence cut into a wave of parts costs a few
    loads, not one dependent load per split; the sums run in a fixed order (bit-reproducible).
    Empty splits (lse -inf) get weight 0 and their partials are never read; an all-empty row gives
    out 0 and lse -inf. A sequence of one split is copied (weight 2^0 = 1: the same bits as storing
    it directly), unless the split kernel stored it itself (FINAL_IN_SPLIT)."""
    row = tl.program_id(0)
    seq = tl.program_id(1)
    splits = tl.load(SeqSplits + seq)
    if (splits > 1) or (not FINAL_IN_SPLIT):
        pid_b = seq.to(tl.int64)
        if SPARSE:  # sequence = (batch row, query), rows = heads
            batch = pid_b // s_q
            query = pid_b % s_q
            head = row
        else:
            batch = pid_b
            query = row // h_q
            head = row % h_q
        first_row = tl.load(SeqSlot + seq).to(tl.int64) * num_rows + row
        offs_s = tl.arange(0, BLOCK_S)
        m = tl.full([], float("-inf"), tl.float32)
        for chunk in range(0, splits, BLOCK_S):
            lse = tl.load(LsePart + first_row + (chunk + offs_s) * num_rows, mask=chunk + offs_s < splits,
                          other=float("-inf"))
            m = tl.maximum(m, tl.max(lse, 0))
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        total = tl.full([], 0.0, tl.float32)
        for chunk in range(0, splits, BLOCK_S):
            lse = tl.load(LsePart + first_row + (chunk + offs_s) * num_rows, mask=chunk + offs_s < splits,
                          other=float("-inf"))
            total += tl.sum(tl.math.exp2(lse - m_safe), 0)
        has_key = total > 0.0
        lse2 = tl.where(has_key, m_safe + tl.math.log2(tl.where(has_key, total, 1.0)), float("-inf"))
        denominator = tl.where(has_key, total, 1.0)
        sink_factor = 1.0
        if ATTN_SINK:  # out · 1 / (1 + 2^(sink·log2 e − lse₂)); lse unchanged
            sink = tl.load(Sink + head)
            sink_factor = tl.where(has_key, 1.0 / (1.0 + tl.math.exp2(sink * LOG2E_C - lse2)), 0.0)
        out_row = Out + batch * stride_ob + query * stride_os + head * stride_oh
        for c in tl.static_range(0, COLUMNS, BLOCK_C):
            cols = tl.program_id(2) * COLUMNS + c + tl.arange(0, BLOCK_C)
            acc = tl.zeros([BLOCK_C], dtype=tl.float32)
            for chunk in range(0, splits, BLOCK_S):
                split = chunk + offs_s
                weight = tl.math.exp2(tl.load(LsePart + first_row + split * num_rows, mask=split < splits,
                                              other=float("-inf")) - m_safe)
                part_rows = first_row + split * num_rows
                o = tl.load(OutPart + part_rows[:, None] * HEAD_DIM_V + cols[None, :],
                            mask=(weight > 0.0)[:, None] & (cols < HEAD_DIM_V)[None, :], other=0.0)
                acc += tl.sum(weight[:, None] * o, 0)
            out = acc / denominator
            if ATTN_SINK:
                out = out * sink_factor
            tl.store(out_row + cols * stride_od, out.to(Out.dtype.element_ty), mask=cols < HEAD_DIM_V)
        if tl.program_id(2) == 0:
            tl.store(Lse + batch * stride_lb + head * stride_lh + query * stride_ls, lse2 * LN2)


# ----------------------------------------------------------------------------------------------
# Plan
# ----------------------------------------------------------------------------------------------

# The Gluon Hopper kernel's tile (hopper_decode: 64 rows, one 64-key page tile, 8 warps, 2 stages; one
# program an SM), in the terms the plan needs.
HOPPER_CONFIG = DecodeConfig(block_m=64, block_n=64, num_warps=8, num_stages=2, resident_per_sm=1)


@dataclass(frozen=True)
class DecodePlan:
    """What a launch needs besides the tensors. Made from shapes alone (no lengths, no host sync);
    the schedule itself is made on the device by `_schedule_kernel` at each launch."""

    config: DecodeConfig
    num_parts: int  # parts (programs per row group) the units of all sequences are cut into
    min_part_units: int  # a part covers at least this many units, so pieces are not too short
    hopper: bool = False  # the split kernel is hopper_decode's (Gluon, sm_90a) rather than the tl one
    wave_sequences: float = 0.0  # sequences whose programs make one wave, for the whole rule (0: always cut)
    cut_cost_tokens: float = CUT_COST_TOKENS  # the whole rule's price of cutting (±inf: always whole / cut)
    tail_share: float = 1.0  # the share of whole sequences' idle tail that costs time (memory-bound: less)
    lone_speedup: float = 1.0  # how much faster than its fair share a program alone runs


def plan_decode(q: torch.Tensor, kv_cache: torch.Tensor, cache_seqlens: torch.Tensor, head_dim_v: int,
                num_parts: int | None = None, config: DecodeConfig | None = None,
                indices: torch.Tensor | None = None, kv_format: str = "native") -> DecodePlan:
    """The config and the number of parts for these shapes: WAVES waves of the programs an SM holds,
    shared among the row groups (the Hopper path: see the module docstring). Reads no tensor (no
    host sync). A given num_parts (tests,
    sweeps) also lifts the minimum part size to one unit, so that small cases split."""
    b, s_q, h_q, d = q.shape
    num_rows = h_q if indices is not None else s_q * h_q
    hopper = config is None and indices is None and kv_format == "native" and _hopper_supports(q, kv_cache, head_dim_v)
    config = config or (HOPPER_CONFIG if hopper else decode_config(q.dtype, num_rows, d, head_dim_v, kv_format))
    if num_parts is not None:
        if not isinstance(num_parts, int) or num_parts < 1:
            raise ValueError(f"num_parts must be an int >= 1; got {num_parts!r}")
        return DecodePlan(config=config, num_parts=num_parts, min_part_units=1, hopper=hopper)
    groups = triton.cdiv(num_rows, config.block_m)
    wave = config.resident_per_sm * _sm_count(q.device)
    min_part_units = _overhead_units(config) + triton.cdiv(MIN_SPLIT_TOKENS, config.block_n)
    if hopper:
        # one program per part, walking the part's pieces: one wave of equal parts; whole sequences
        # (no partial results, no merge) when they would take no longer (decided on the device from
        # the lengths: `_schedule_kernel`)
        from mla_verify.kernels import hopper_decode

        memory_bound = num_rows <= hopper_decode.FEW_ROWS
        return DecodePlan(config=config, num_parts=max(1, wave // groups), min_part_units=min_part_units,
                          hopper=True, wave_sequences=wave / groups,
                          tail_share=MEMORY_BOUND_TAIL_SHARE if memory_bound else 1.0,
                          lone_speedup=LONE_SPEEDUP if memory_bound else 1.0)
    return DecodePlan(config=config, num_parts=max(1, WAVES * wave // groups), min_part_units=min_part_units)


def _hopper_supports(q: torch.Tensor, kv_cache: torch.Tensor, head_dim_v: int) -> bool:
    """Whether the Gluon Hopper split kernel takes these shapes (imported only on a CUDA device: the
    CPU interpreter does not run Gluon)."""
    if q.device.type != "cuda" or interpreting():
        return False
    from mla_verify.kernels import hopper_decode

    return hopper_decode.supports(q, kv_cache, head_dim_v)


def _overhead_units(config: DecodeConfig) -> int:
    return max(1, OVERHEAD_TOKENS // config.block_n)


def _schedule_block(num_seqs: int) -> int:
    return min(1024, _pow2_at_least(num_seqs))


def schedule_decode(cache_seqlens: torch.Tensor, num_seqs: int, plan: DecodePlan,
                    topk: int | None = None) -> tuple[torch.Tensor, ...]:
    """The device-side schedule of one launch (see `_schedule_kernel`): int32 tensors seq_start,
    seq_splits, seq_slot, seq_first_part (one entry per sequence) and totals = (per_part, total
    units, total pieces).
    Sparse launches pass topk: every list is one sequence of topk entries."""
    schedule = torch.empty(4 * num_seqs + 3, dtype=torch.int32, device=cache_seqlens.device)
    parts = schedule[:4 * num_seqs].view(4, num_seqs)
    totals = schedule[4 * num_seqs:]
    block_n = plan.config.block_n
    _schedule_kernel[(1,)](cache_seqlens, parts[0], parts[1], parts[2], parts[3], totals,
                           num_seqs, plan.num_parts, plan.min_part_units, topk or 0, float(plan.wave_sequences),
                           float(plan.cut_cost_tokens) / block_n, float(plan.tail_share), float(plan.lone_speedup),
                           BLOCK_N=block_n, OVERHEAD_UNITS=_overhead_units(plan.config),
                           BLOCK_B=_schedule_block(num_seqs), SPARSE=topk is not None,
                           num_warps=4)
    return parts[0], parts[1], parts[2], parts[3], totals


# ----------------------------------------------------------------------------------------------
# Host wrappers
# ----------------------------------------------------------------------------------------------

def _launch_split(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal, plan, kv_format,
                  k_scale, indices, out_part, lse_part, schedule) -> None:
    """The portable (tl) split kernel over grid (row groups, num_seqs + num_parts): one program per piece."""
    b, s_q, h_q, d = q.shape
    page_size = kv_cache.shape[1]
    sparse = indices is not None
    num_seqs, num_rows = (b * s_q, h_q) if sparse else (b, s_q * h_q)
    config, num_parts = plan.config, plan.num_parts
    block_v = _pow2_at_least(head_dim_v)
    # the cache as the kernel reads it: for fp8_ds_mla three views of the same bytes
    cache = scales = rope = kv_cache
    if kv_format == "fp8_ds_mla":
        cache, scales, rope = split_packed(kv_cache, d, head_dim_v)
    index_strides = indices.stride() if sparse else (0, 0, 0)
    block_r = _pow2_at_least(d - head_dim_v)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit inputs
    args = (
        q, cache, scales, rope, k_scale if k_scale is not None else q, block_table, cache_seqlens,
        indices if sparse else block_table, out_part, lse_part, *schedule,
        softmax_scale * LOG2E, page_size, num_rows, h_q, s_q, num_seqs, kv_cache.shape[0] * page_size,
        indices.shape[-1] if sparse else 0,
        *q.stride(),
        cache.stride(0), cache.stride(1), cache.stride(3),
        scales.stride(0), scales.stride(1), rope.stride(0), rope.stride(1),
        block_table.stride(0), *index_strides,
    )
    # the schedule counts keys in tiles of the plan's size: a smaller GPU gets fewer stages, not shorter tiles
    launch_fitting(_split_kernel, (triton.cdiv(num_rows, config.block_m), num_seqs + num_parts), args,
                   dict(HEAD_DIM=d, HEAD_DIM_V=head_dim_v, BLOCK_V=block_v, BLOCK_R=block_r,
                        OVERHEAD_UNITS=_overhead_units(config), CAUSAL=bool(causal) and not sparse,
                        DOT_PRECISION=precision, KV_FORMAT=FORMAT_CODES[kv_format], SPARSE=sparse,
                        BLOCK_B=_schedule_block(num_seqs)),
                   config, retile=False)


def launch_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, cache_seqlens: torch.Tensor,
                  head_dim_v: int, softmax_scale: float, causal: bool, plan: DecodePlan, *, kv_format: str = "native",
                  k_scale: torch.Tensor | None = None, indices: torch.Tensor | None = None,
                  attn_sink: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Allocate the outputs and launch the three kernels (schedule, split, merge); no validation
    and no host sync (graph-capturable). The split kernel is hopper_decode's when the plan chose it
    and the call has a native cache, no indices and no sink; the tl kernel otherwise."""
    b, s_q, h_q, d = q.shape
    sparse = indices is not None
    num_seqs, num_rows = (b * s_q, h_q) if sparse else (b, s_q * h_q)
    num_parts = plan.num_parts
    out = torch.empty(b, s_q, h_q, head_dim_v, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, h_q, s_q, dtype=torch.float32, device=q.device)
    if out.numel() == 0 and lse.numel() == 0:
        return out, lse
    schedule = schedule_decode(cache_seqlens, num_seqs, plan, topk=indices.shape[-1] if sparse else None)
    seq_splits, seq_slot = schedule[1], schedule[2]
    hopper = plan.hopper and kv_format == "native" and not sparse and attn_sink is None
    # a part boundary inside a sequence adds one piece: at most num_seqs + num_parts - 1 pieces
    slots = num_seqs + num_parts
    out_part = torch.empty(slots, num_rows, head_dim_v, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(slots, num_rows, dtype=torch.float32, device=q.device)
    if hopper:  # writes a sequence's only piece as the final result itself
        from mla_verify.kernels import hopper_decode

        hopper_decode.hopper_split_launch(q, kv_cache, block_table, cache_seqlens, softmax_scale, causal, out, lse,
                                          out_part, lse_part, schedule, num_parts, _overhead_units(plan.config))
    else:  # writes every piece as a partial result
        _launch_split(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal, plan, kv_format,
                      k_scale, indices, out_part, lse_part, schedule)
    # a program a row and MERGE_COLUMNS columns when rows are few (b = 1), a whole row when they fill the GPU
    block_v = _pow2_at_least(head_dim_v)
    block_c = min(block_v, MERGE_COLUMNS)
    columns = block_v if num_rows * num_seqs >= MERGE_ROWS_PER_SM * _sm_count(q.device) else block_c
    _merge_kernel[(num_rows, num_seqs, triton.cdiv(head_dim_v, columns))](
        out_part, lse_part, seq_splits, seq_slot, attn_sink if attn_sink is not None else q, out, lse,
        num_rows, h_q, s_q,
        *out.stride(),
        *lse.stride(),
        HEAD_DIM_V=head_dim_v, BLOCK_S=min(MERGE_SPLITS, _pow2_at_least(num_parts, 2)), BLOCK_C=block_c,
        COLUMNS=columns, SPARSE=sparse, ATTN_SINK=attn_sink is not None, FINAL_IN_SPLIT=hopper, num_warps=4,
    )
    return out, lse


def paged_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, cache_seqlens: torch.Tensor,
                 head_dim_v: int, softmax_scale: float, causal: bool = False, *, is_fp8_kvcache: bool = False,
                 k_scale: torch.Tensor | None = None, indices: torch.Tensor | None = None,
                 attn_sink: torch.Tensor | None = None, num_parts: int | None = None,
                 config: DecodeConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """scheduled_paged_decode with the number of parts and the config open to override (tests, sweeps)."""
    kv_format = validate_decode_inputs(q, kv_cache, block_table, cache_seqlens, head_dim_v,
                                       is_fp8_kvcache=is_fp8_kvcache, k_scale=k_scale, indices=indices,
                                       attn_sink=attn_sink)
    _check_supported(q, kv_cache, block_table, cache_seqlens, head_dim_v)
    for name, tensor in (("k_scale", k_scale), ("indices", indices), ("attn_sink", attn_sink)):
        if tensor is not None and tensor.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}; got {tensor.device}")
    plan = plan_decode(q, kv_cache, cache_seqlens, head_dim_v, num_parts=num_parts, config=config, indices=indices,
                       kv_format=kv_format)
    return launch_decode(q, kv_cache, block_table, cache_seqlens, head_dim_v, float(softmax_scale), causal, plan,
                         kv_format=kv_format, k_scale=k_scale, indices=indices, attn_sink=attn_sink)


@declare(_declared())
def scheduled_paged_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                           cache_seqlens: torch.Tensor, head_dim_v: int, softmax_scale: float,
                           causal: bool = False, *, is_fp8_kvcache: bool = False,
                           k_scale: torch.Tensor | None = None, indices: torch.Tensor | None = None,
                           attn_sink: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorbed MLA decode (see the module docstring for shapes). Returns out [b, s_q, h_q,
    head_dim_v] in q.dtype and lse [b, h_q, s_q] float32 (natural log); a row that sees no key
    gets out 0 and lse -inf. Inputs are not modified. FP8 caches (is_fp8_kvcache, k_scale),
    sparse indices and attention sinks follow mla_verify.decode.contract."""
    return paged_decode(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal,
                        is_fp8_kvcache=is_fp8_kvcache, k_scale=k_scale, indices=indices, attn_sink=attn_sink)
