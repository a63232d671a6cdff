"""Absorbed MLA decode for Hopper (sm_90a), written in Triton's Gluon dialect.

The portable kernel (mla_verify.kernels.triton_decode) is plain `tl` code; on an H200 it reaches about a
third of the bf16 matmul rate when many query rows share each cache tile (h·s_q ≥ 64), because its
[64, 512] fp32 accumulator spills at one program per SM and the three stages of a tile (Q·Kᵀ, softmax,
P·V) run strictly one after the other; with few rows it gathers the paged cache through registers
(no cp.async) and stays near two thirds of the copy bandwidth. This module replaces that kernel's
split kernel on Hopper; scheduled_decode's `launch_decode` picks it when `supports` says so, with the
same device schedule and the same merge. Where the tl kernel runs a program per piece (one key range
of one sequence), these run a program per part of the schedule (up to 64 query rows × one part),
walking the part's pieces one after the other, so that a wave of parts is balanced whatever the
lengths (as FlashMLA's persistent scheduler):

    supports(q, kv_cache, head_dim_v, ...) -> bool        may this path run these inputs?
    hopper_split_launch(q, kv_cache, block_table, cache_seqlens, softmax_scale, causal, out, lse,
                        out_part, lse_part, schedule, num_parts, overhead_units)
    compile_for_sm90(dtype, causal, rows=64)              ahead-of-time compile, no GPU needed

What one program does (read `_hopper_split_kernel` top to bottom):

  0. Find its part's sequences in the schedule (`_part_sequences`: one vector count), then for each,
     its piece (`_piece_range`: the slot and the key range [start, end)). Rows fold s_q·h_q as in
     scheduled_decode: row r = query r // h_q, head r % h_q. Steps 1-7 run once per piece, in shared
     memory allocated once; the ring's stage and barrier phase carry on from piece to piece.
  1. Stage Q: the program's 64 rows of the piece's q (latent 512 + rope 64 columns) are loaded once
     and kept in shared memory for the whole key range (72 KB), in the swizzled layout the tensor
     cores read.
  2. Stage K: each 64-key tile is one page slice of the paged cache. The cache is viewed as a 2-D
     [num_blocks·page_size, 576] tensor (row = block·page_size + slot) and a tile is fetched by TMA
     (bulk tensor copies: latent [64, 512] and rope [64, 64]) into a 2-stage ring of shared-memory
     buffers, completion signalled on one mbarrier per stage. The load of tile j+2 is issued as soon
     as tile j's buffers are free (end of iteration j), so tile j+1's softmax and P·V hide it.
  3. S = Q·Kᵀ by asynchronous warpgroup MMA (wgmma) straight from shared memory: latent part then rope
     part, one fp32 accumulator.
  4. Online softmax in base 2 (softmax_scale·log2(e) folded into one multiply), keys at or past `end`
     and causally hidden keys set to −inf. The row sum is kept unreduced (per thread, in S's layout)
     and reduced once at the end; only the row max crosses warps each tile.
  5. P rounded to the input type and written to shared memory, so that both warpgroups can use all
     64 keys of it; O += P·V by wgmma with V = the first 512 columns of the same K tile (no second
     load). The 8 warps are two warpgroups: each owns one half (64 × 256) of the [64, 512] fp32
     output accumulator (128 registers a thread) and of S (64 × 32).
  6. The next tile's Q·Kᵀ is issued right behind this tile's P·V, so the tensor cores go from one to
     the other without a gap; both are then awaited before the softmax of the next tile.
     Not done (see benchmarks/hopper_notes.md): the softmax does not overlap tensor-core work. With
     Q resident, shared memory holds only two 72 KB K stages, and issuing tile j+1's Q·Kᵀ before
     tile j's softmax would leave its load no time to land; FlashMLA gets around this by having each
     warpgroup run Q·Kᵀ/softmax for a different tile, freeing the halves of V separately, and
     waiting per 64-column chunk of K. No producer warp (gl.warp_specialize) either.
  7. Epilogue: O / l and lse; the final out (q's dtype) and lse (natural log, [b, h, s_q]) when the
     piece is its sequence's only one, else the float32 normalised partial output and base-2 lse
     (−inf for no key) in the piece's slot, for scheduled_decode's merge.
     Not done: the next piece's first tiles are not fetched during this piece's last ones (its
     block-table row and Q are only known then), so each piece after the first starts with an empty
     ring; the schedule counts a piece's fixed cost in its plan (benchmarks/hopper_notes.md).

Masking and poison: TMA always copies whole 64-row tiles, so a range whose end is not a multiple of 64
reads slots past the sequence's length (data of no one, possibly NaN or Inf). Their scores become −inf
(so P = 0), and before that tile's P·V the rows past `end` of its V buffer are overwritten with zeros in
shared memory, so 0·NaN never reaches the accumulator. Block-table entries past a range are never read.
A row that sees no key ends with l = 0: out 0, lse −inf (base 2 −inf in the partials, as the merge
expects). Query rows past h_q·s_q (the last row group) are loaded as zeros and never stored.

Scope (`supports`): CUDA sm_90, bf16/fp16 q and a native cache of the same dtype, d = 576 and
head_dim_v = 512, page_size 64, a cache whose rows are contiguous and page blocks adjacent (block
stride = page_size · row stride, 16-byte aligned), q with unit stride along d, at most MAX_BATCH
sequences, no FP8, sparse indices or attention sinks. Anything else: the
caller falls back to the tl kernel. (Pages of 128, 192, ... take the same code path, a tile never
crossing a page, but have not been run on a GPU yet; SUPPORTED_PAGE_SIZES widens when they have.)

Few query rows (h_q·s_q ≤ FEW_ROWS = 32: h = 16 at TP8, MTP with s_q = 2): `_hopper_few_rows_kernel`,
the same program transposed. Padding 16 rows to 64, as FlashMLA does, makes the tensor cores do 4×
the useful work, and on an H200 that work (with the softmax between the two products) took longer
than streaming the cache: 674 µs at h = 16, b = 128, L = 16384 against 567 µs transposed, which is
the copy bandwidth (benchmarks/triton_decode_results.md). Transposed, the 64 keys of a tile are the
wgmma's M and the rows its N (16 or 32): Sᵀ = K·Qᵀ [64, rows] with K straight from the TMA ring and
Qᵀ a view of Q in shared memory, the softmax runs down the columns, and Oᵀ [512, rows] += Vᵀ·Pᵀ reads
V from the same ring stage through a transposed view. One warpgroup for 16 rows; two for 32 (each
takes half of the rows of Sᵀ and alternate 64-column blocks of Oᵀ; one warpgroup's [512, 32]
accumulator would spill). Q takes 18 or 36 KB, so the ring still has two 72 KB stages.

Compiles with Triton 3.6 (the GPU machine: the 8-warp kernel 255 registers, no spills, 229,904 bytes of
shared memory; the few-rows kernel 177 / 235 registers at 32 / 16 rows, no spills, 221,200 / 200,720
bytes: its buffers now live across the piece loop, so the epilogue's layout conversion no longer
reuses the ring) and 3.9 (CI; its build of the 8-warp kernel spills 168-184 bytes of scalars, not
measured on a GPU); the few API differences are resolved once, in the compatibility block below.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

__all__ = ["supports", "hopper_split_launch", "compile_for_sm90", "few_rows_tile", "BLOCK_M", "BLOCK_N", "NUM_WARPS",
           "FEW_ROWS"]

# ----------------------------------------------------------------------------------------------
# Compatibility between Triton 3.6 and 3.9 (the only place that knows the difference)
# ----------------------------------------------------------------------------------------------
# TMA global -> shared copy: `async_copy_global_to_shared` in 3.6, renamed `async_load` (the old name
# raises) in 3.9. CTA-wide barrier: `thread_barrier` in 3.6, `barrier` in 3.9.
_tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared
_cta_barrier = gl.barrier if hasattr(gl, "barrier") else gl.thread_barrier

# ----------------------------------------------------------------------------------------------
# Constants
# ----------------------------------------------------------------------------------------------
BLOCK_M = 64  # query rows per program: one wgmma M extent per warpgroup
BLOCK_N = 64  # keys per tile (one page slice)
HEAD_DIM = 576
HEAD_DIM_V = 512
ROPE_DIM = HEAD_DIM - HEAD_DIM_V
NUM_WARPS = 8  # two consumer warpgroups
FEW_ROWS = 32  # at most this many query rows: the transposed one-warpgroup kernel, rows as the MMA's N
FEW_ROWS_WARPGROUPS = {16: 1, 32: 2}  # one warpgroup's [512, 32] accumulator would spill
NUM_STAGES = 2  # K ring depth: Q 72 KB + 2 × 72 KB + P 8 KB = 224 KB of the 227 KB an SM offers
SUPPORTED_PAGE_SIZES = (64,)  # any multiple of BLOCK_N works by construction; only 64 is GPU-checked
SMEM_LIMIT = 232448  # bytes of shared memory one block may use on sm_90
MAX_BATCH = 4096  # a program finds its sequence in one vector load of this many first-piece indices
LOG2E = 1.4426950408889634
LN2 = gl.constexpr(0.6931471805599453)
_GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}


# ----------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------

@gluon.jit
def _issue_tile_load(lat_desc, rope_desc, k_lat, k_rope, ready, table_row, start, done, tile, n_tiles,
                     PAGE_SIZE: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM_V: gl.constexpr,
                     NUM_STAGES: gl.constexpr):
    """TMA-copy tile `tile` of the piece's range (keys start + tile·BLOCK_N ..., in the cache block the
    sequence's block-table row names) into ring stage (done + tile) % NUM_STAGES, `done` being the tiles
    the program consumed before this piece; nothing (no block-table read, no copy, no expected bytes)
    when tile >= n_tiles."""
    stage = (done + tile) % NUM_STAGES
    live = tile < n_tiles
    pos = start + tile * BLOCK_N
    block = gl.load(table_row + pos // PAGE_SIZE, mask=live, other=0)
    row = block * PAGE_SIZE + pos % PAGE_SIZE  # a row of the [num_blocks·page_size, 576] cache view
    bar = ready.index(stage)
    mbarrier.expect(bar, lat_desc.block_type.nbytes + rope_desc.block_type.nbytes, pred=live)
    _tma_load(lat_desc, [row, 0], bar, k_lat.index(stage), pred=live)
    _tma_load(rope_desc, [row, HEAD_DIM_V], bar, k_rope.index(stage), pred=live)


@gluon.jit
def _start_piece(Q, pid_b, q_rows, q_ok, q_cols, h_q, stride_qb, stride_qs, stride_qh, q_lat, q_rope,
                 lat_desc, rope_desc, k_lat, k_rope, ready, table_row, start, done, n_tiles,
                 PAGE_SIZE: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM_V: gl.constexpr, NUM_STAGES: gl.constexpr):
    """A piece's start: its first NUM_STAGES tiles start loading into the ring (empty: every earlier
    tile was consumed and its readers awaited), then the piece's query rows (sequence pid_b) go global ->
    registers -> swizzled shared memory behind them (rows past the last as zeros; the previous
    piece's last wgmma reading Q was awaited before a CTA barrier), fenced for wgmma."""
    for i in gl.static_range(NUM_STAGES):
        _issue_tile_load(lat_desc, rope_desc, k_lat, k_rope, ready, table_row, start, done, i, n_tiles,
                         PAGE_SIZE, BLOCK_N, HEAD_DIM_V, NUM_STAGES)
    q_ptr = gl.expand_dims(Q + pid_b * stride_qb + (q_rows // h_q) * stride_qs + (q_rows % h_q) * stride_qh, 1)
    for c in gl.static_range(HEAD_DIM_V // 64):
        q_lat.slice(c * 64, 64, dim=1).store(gl.load(q_ptr + c * 64 + q_cols, mask=q_ok, other=0.0))
    q_rope.store(gl.load(q_ptr + HEAD_DIM_V + q_cols, mask=q_ok, other=0.0))
    fence_async_shared()  # generic-proxy stores of Q, read next by wgmma (async proxy)
    _cta_barrier()


@gluon.jit
def _qk(q_lat, q_rope, k_lat, k_rope, s_zero):
    """Issue S = Q·Kᵀ (latent part, then rope part into the same fp32 accumulator) without waiting."""
    s = warpgroup_mma(q_lat, k_lat.permute((1, 0)), s_zero, use_acc=False, is_async=True)
    s = warpgroup_mma(q_rope, k_rope.permute((1, 0)), s, is_async=True)
    return s


@gluon.jit
def _zero_tail_rows(v_smem, valid, BLOCK_N: gl.constexpr, HEAD_DIM_V: gl.constexpr, CHUNK: gl.constexpr,
                    layout: gl.constexpr):
    """Rows >= valid of a [BLOCK_N, HEAD_DIM_V] V buffer := 0 (slots past the range may hold NaN/Inf,
    and 0·NaN = NaN in P·V). Chunks of CHUNK columns keep the registers this needs small."""
    rows = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, layout))
    keep = gl.expand_dims(rows < valid, 1)
    for c in gl.static_range(HEAD_DIM_V // CHUNK):
        chunk = v_smem.slice(c * CHUNK, CHUNK, dim=1)
        x = chunk.load(layout)
        chunk.store(gl.where(keep, x, gl.zeros_like(x)))


@gluon.jit
def _part_sequences(part, SeqSplits, SeqFirstPart, num_seqs, BLOCK_B: gl.constexpr, WARPS: gl.constexpr):
    """The sequences part `part` of scheduled_decode's device schedule works on: [first, first + count),
    those whose parts (first_part .. first_part + splits - 1) include it. Both ends are non-decreasing
    along the sequences, so they are a contiguous run, found by counting in one vector load; a part past
    the schedule's last (the grid has room for the most parts there can be) gets none."""
    seq_layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[1], threads_per_warp=[32], warps_per_cta=[WARPS],
                                                order=[0])
    seqs = gl.arange(0, BLOCK_B, layout=seq_layout)
    ok = seqs < num_seqs
    first_part = gl.load(SeqFirstPart + seqs, mask=ok, other=part + 1)
    last_part = first_part + gl.load(SeqSplits + seqs, mask=ok, other=0) - 1
    first = gl.sum((last_part < part).to(gl.int32), axis=0)
    count = gl.sum((first_part <= part).to(gl.int32), axis=0) - first
    return first, gl.maximum(count, 0)


@gluon.jit
def _piece_range(seq, part, SeqLens, SeqStart, SeqSplits, SeqSlot, SeqFirstPart, Totals,
                 OVERHEAD_UNITS: gl.constexpr, BLOCK_N: gl.constexpr):
    """The piece (sequence `seq`, part `part`) of the schedule: its slot (pieces are numbered sequence by
    sequence in part order), the sequence's split count and length, and the key range [start, end)."""
    piece = gl.load(SeqSlot + seq) + part - gl.load(SeqFirstPart + seq)
    splits = gl.load(SeqSplits + seq)
    per_part = gl.load(Totals)
    unit_lo = part * per_part
    unit_hi = gl.minimum(unit_lo + per_part, gl.load(Totals + 1))
    seq_len = gl.load(SeqLens + seq.to(gl.int64))
    first_tile = gl.load(SeqStart + seq) + OVERHEAD_UNITS
    start = gl.maximum(unit_lo - first_tile, 0) * BLOCK_N
    end = gl.minimum(gl.minimum(unit_hi - first_tile, gl.cdiv(seq_len, BLOCK_N)) * BLOCK_N, seq_len)
    return piece, splits, seq_len, start, end


@gluon.jit
def _row_totals(l_acc, m_i, KEY_AXIS: gl.constexpr):
    """Each row's softmax denominator (per-thread partial sums reduced over the keys; 1 for a row that
    saw no key, whose output is then 0) and base-2 lse (-inf for no key)."""
    l_i = gl.sum(l_acc, axis=KEY_AXIS)
    has_key = l_i > 0.0
    l_safe = gl.where(has_key, l_i, 1.0)
    return l_safe, gl.where(has_key, m_i + gl.log2(l_safe), float("-inf"))


@gluon.jit
def _store_piece(o, lse2, rows_o, cols_o, ok_o, rows_s, ok_s, splits, piece, pid_b, Out, Lse, OutPart, LsePart,
                 num_rows, h_q, stride_ob, stride_os, stride_oh, stride_lb, stride_lh, stride_ls,
                 HEAD_DIM_V: gl.constexpr):
    """The piece's normalised result o (rows_o × cols_o, broadcast 2-D) and base-2 lse (rows_s): the
    final out (q's dtype) and lse (natural log) when the piece is its sequence's only one, else the
    float32 partial output and lse in the piece's own slot, for scheduled_decode's merge."""
    if splits == 1:
        out_ptr = Out + pid_b * stride_ob + (rows_o // h_q) * stride_os + (rows_o % h_q) * stride_oh + cols_o
        gl.store(out_ptr, o.to(Out.dtype.element_ty), mask=ok_o)
        lse_ptr = Lse + pid_b * stride_lb + (rows_s % h_q) * stride_lh + (rows_s // h_q) * stride_ls
        gl.store(lse_ptr, lse2 * LN2, mask=ok_s)
    else:
        part_ptr = OutPart + (piece.to(gl.int64) * num_rows + rows_o) * HEAD_DIM_V + cols_o
        gl.store(part_ptr, o, mask=ok_o)
        gl.store(LsePart + piece.to(gl.int64) * num_rows + rows_s, lse2, mask=ok_s)


@gluon.jit
def _hopper_split_kernel(
        Q, lat_desc, rope_desc, BlockTable, SeqLens, Out, Lse, OutPart, LsePart,
        SeqStart, SeqSplits, SeqSlot, SeqFirstPart, Totals,
        qk_scale, num_rows, h_q, s_q, num_seqs,
        stride_qb, stride_qs, stride_qh,
        stride_tb,
        stride_ob, stride_os, stride_oh,
        stride_lb, stride_lh, stride_ls,
        PAGE_SIZE: gl.constexpr, CAUSAL: gl.constexpr, OVERHEAD_UNITS: gl.constexpr, BLOCK_B: gl.constexpr,
        BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM_V: gl.constexpr, ROPE_DIM: gl.constexpr,
        NUM_STAGES: gl.constexpr):
    dtype: gl.constexpr = lat_desc.dtype

    # -- layouts ---------------------------------------------------------------------------------
    # Both accumulators are wgmma (MMA v3) layouts over the two warpgroups side by side along N:
    # warpgroup 0 owns columns [0, N/2), warpgroup 1 columns [N/2, N), each all 64 rows.
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                        instr_shape=[16, BLOCK_N // 2, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                        instr_shape=[16, HEAD_DIM_V // 2, 16])
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    col_o: gl.constexpr = gl.SliceLayout(0, o_layout)
    # 16-byte vectors, a warp covering 4 rows × 64 columns: for global loads and shared-memory fix-ups
    io_layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[4, 8],
                                               warps_per_cta=[8, 1], order=[1, 0])
    qk_smem_layout: gl.constexpr = lat_desc.layout  # 128-byte swizzle, what TMA writes and wgmma reads
    p_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_N], dtype)

    # -- which rows, which sequences: part `part` of scheduled_decode's device schedule ------------------
    pid_m = gl.program_id(0)  # row group (fastest: groups sharing cache tiles run side by side)
    part = gl.program_id(1)
    first_seq, n_pieces = _part_sequences(part, SeqSplits, SeqFirstPart, num_seqs, BLOCK_B, 8)

    # -- shared memory (once: the program's pieces reuse it) -----------------------------------------
    q_lat = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM_V], qk_smem_layout)
    q_rope = gl.allocate_shared_memory(dtype, [BLOCK_M, ROPE_DIM], rope_desc.layout)
    k_lat = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, HEAD_DIM_V], qk_smem_layout)
    k_rope = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, ROPE_DIM], rope_desc.layout)
    p_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, BLOCK_N], p_smem_layout)
    ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(ready.index(i), count=1)
    fence_async_shared()  # barrier initialisation visible to the TMA unit before the first copy

    q_rows = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, io_layout))
    q_ok = gl.expand_dims(q_rows < num_rows, 1)
    q_cols = gl.expand_dims(gl.arange(0, 64, layout=gl.SliceLayout(0, io_layout)), 0)
    offs_n = gl.arange(0, BLOCK_N, layout=col_s)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    rows_o = gl.expand_dims(pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=row_o), 1)
    cols_o = gl.expand_dims(gl.arange(0, HEAD_DIM_V, layout=col_o), 0)
    rows_s = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=row_s)

    done = 0  # tiles consumed by the earlier pieces: the ring stage and barrier phase go on from there
    for k in range(n_pieces):
        # -- the piece: sequence first_seq + k's share of this part ---------------------------------------
        seq = first_seq + k
        piece, splits, seq_len, start, end = _piece_range(seq, part, SeqLens, SeqStart, SeqSplits, SeqSlot,
                                                          SeqFirstPart, Totals, OVERHEAD_UNITS, BLOCK_N)
        pid_b = seq.to(gl.int64)
        if CAUSAL:  # no key past the group's last visible position
            last_query = gl.minimum(s_q - 1, (pid_m * BLOCK_M + BLOCK_M - 1) // h_q)
            end = gl.minimum(end, seq_len - s_q + last_query + 1)
        n_tiles = gl.maximum(gl.cdiv(end - start, BLOCK_N), 0)
        table_row = BlockTable + pid_b * stride_tb

        # -- stage K (the first NUM_STAGES tiles start loading) and Q ---------------------------------------
        _start_piece(Q, pid_b, q_rows, q_ok, q_cols, h_q, stride_qb, stride_qs, stride_qh, q_lat, q_rope,
                     lat_desc, rope_desc, k_lat, k_rope, ready, table_row, start, done, n_tiles,
                     PAGE_SIZE, BLOCK_N, HEAD_DIM_V, NUM_STAGES)

        # -- running state ---------------------------------------------------------------------------
        acc = gl.zeros([BLOCK_M, HEAD_DIM_V], gl.float32, o_layout)  # unnormalised O
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, row_s)  # running max (base-2 units)
        l_acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)  # per-thread partial row sums of P
        if CAUSAL:
            row_limit = seq_len - s_q + rows_s // h_q + 1  # query i sees positions < L - s_q + i + 1

        # -- first tile's S ------------------------------------------------------------------------------
        s = s_zero
        if n_tiles > 0:
            mbarrier.wait(ready.index(done % NUM_STAGES), (done // NUM_STAGES) & 1)
            s = _qk(q_lat, q_rope, k_lat.index(done % NUM_STAGES), k_rope.index(done % NUM_STAGES), s_zero)
            s = warpgroup_mma_wait(0, deps=(s, ))

        for j in range(n_tiles):
            stage = (done + j) % NUM_STAGES
            tile_start = start + j * BLOCK_N
            # -- softmax of tile j (base 2); masked keys -> -inf, so their P is exactly 0 ----------------
            pos = gl.expand_dims(tile_start + offs_n, 0)
            visible = pos < end
            if CAUSAL:
                visible = visible & (pos < gl.expand_dims(row_limit, 1))
            s = gl.where(visible, s * qk_scale, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(s, axis=1))
            m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: p = 0, alpha = 1
            alpha = gl.exp2(m_i - m_safe)
            p = gl.exp2(s - gl.expand_dims(m_safe, 1))
            l_acc = l_acc * gl.expand_dims(alpha, 1) + p
            m_i = m_new
            # -- O rescale; P (input dtype) to shared memory for both warpgroups --------------------------
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
            if tile_start + BLOCK_N > end:  # the range's last, partial tile: zero V rows past `end`
                _zero_tail_rows(k_lat.index(stage), end - tile_start, BLOCK_N, HEAD_DIM_V, 64, io_layout)
            p_smem.store(p.to(dtype))
            fence_async_shared()  # P (and zeroed V rows) written by threads, read by wgmma
            _cta_barrier()
            # -- O += P·V, then the next tile's S right behind it on the tensor cores ----------------------
            acc = warpgroup_mma(p_smem, k_lat.index(stage), acc, is_async=True)
            if j + 1 < n_tiles:
                nxt = (done + j + 1) % NUM_STAGES
                mbarrier.wait(ready.index(nxt), ((done + j + 1) // NUM_STAGES) & 1)
                s = _qk(q_lat, q_rope, k_lat.index(nxt), k_rope.index(nxt), s_zero)
                s = warpgroup_mma_wait(0, deps=(s, ))
            acc = warpgroup_mma_wait(0, deps=(acc, ))
            # -- both warpgroups are done with this stage and with P: refill the stage with tile j + 2 -----
            _cta_barrier()
            _issue_tile_load(lat_desc, rope_desc, k_lat, k_rope, ready, table_row, start, done, j + NUM_STAGES,
                             n_tiles, PAGE_SIZE, BLOCK_N, HEAD_DIM_V, NUM_STAGES)
        done += n_tiles

        # -- epilogue: normalise; a row that saw no key (l = 0) gets out 0 and lse -inf --------------------
        l_safe, lse2 = _row_totals(l_acc, m_i, 1)
        o = acc * gl.expand_dims(gl.convert_layout(1.0 / l_safe, row_o), 1)
        _store_piece(o, lse2, rows_o, cols_o, rows_o < num_rows, rows_s, rows_s < num_rows, splits, piece, pid_b,
                     Out, Lse, OutPart, LsePart, num_rows, h_q, stride_ob, stride_os, stride_oh,
                     stride_lb, stride_lh, stride_ls, HEAD_DIM_V)

    for i in gl.static_range(NUM_STAGES):
        mbarrier.invalidate(ready.index(i))


@gluon.jit
def _hopper_few_rows_kernel(
        Q, lat_desc, rope_desc, BlockTable, SeqLens, Out, Lse, OutPart, LsePart,
        SeqStart, SeqSplits, SeqSlot, SeqFirstPart, Totals,
        qk_scale, num_rows, h_q, s_q, num_seqs,
        stride_qb, stride_qs, stride_qh,
        stride_tb,
        stride_ob, stride_os, stride_oh,
        stride_lb, stride_lh, stride_ls,
        PAGE_SIZE: gl.constexpr, CAUSAL: gl.constexpr, OVERHEAD_UNITS: gl.constexpr, BLOCK_B: gl.constexpr,
        ROWS: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM_V: gl.constexpr, ROPE_DIM: gl.constexpr,
        NUM_STAGES: gl.constexpr, WARPGROUPS: gl.constexpr):
    """The split kernel for at most ROWS (16 or 32) query rows, transposed: Sᵀ = K·Qᵀ ([64 keys, ROWS])
    and Oᵀ += Vᵀ·Pᵀ ([512, ROWS]), so the keys fill the tensor cores' 64-row M extent and the few
    query rows are N. Padding the rows to 64 instead (the 8-warp kernel) makes the tensor cores do
    64/ROWS times the useful work, which at h = 16 costs more time than the cache takes to stream.
    With two warpgroups, each computes Sᵀ for half of the rows and Oᵀ for alternate 64-column
    blocks of the output (all rows); the schedule, TMA ring, masking and epilogue are the 8-warp
    kernel's."""
    dtype: gl.constexpr = lat_desc.dtype
    WARPS: gl.constexpr = 4 * WARPGROUPS

    # -- layouts: warpgroups side by side over the rows (S) or stacked over the output columns (O) ----
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, WARPGROUPS],
                                                        instr_shape=[16, ROWS // WARPGROUPS, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                        instr_shape=[16, ROWS, 16])
    key_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_s: gl.constexpr = gl.SliceLayout(0, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(0, o_layout)
    io_layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[4, 8],
                                               warps_per_cta=[WARPS, 1], order=[1, 0])
    # Oᵀ to global: 8 consecutive output columns a thread, a warp's lanes along the columns
    out_layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[8, 1], threads_per_warp=[32, 1],
                                                warps_per_cta=[1, WARPS], order=[0, 1])
    q_lat_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([ROWS, HEAD_DIM_V], dtype)
    q_rope_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([ROWS, ROPE_DIM], dtype)
    p_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([ROWS, BLOCK_N], dtype)

    # -- which sequences: part `part` of scheduled_decode's device schedule ---------------------------
    part = gl.program_id(1)
    first_seq, n_pieces = _part_sequences(part, SeqSplits, SeqFirstPart, num_seqs, BLOCK_B, WARPS)

    # -- shared memory: Q (ROWS × 576), the K ring, Pᵀ stored as P [ROWS, 64]; once for all pieces -----
    q_lat = gl.allocate_shared_memory(dtype, [ROWS, HEAD_DIM_V], q_lat_layout)
    q_rope = gl.allocate_shared_memory(dtype, [ROWS, ROPE_DIM], q_rope_layout)
    k_lat = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, HEAD_DIM_V], lat_desc.layout)
    k_rope = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, ROPE_DIM], rope_desc.layout)
    p_smem = gl.allocate_shared_memory(dtype, [ROWS, BLOCK_N], p_smem_layout)
    ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(ready.index(i), count=1)
    fence_async_shared()

    q_rows = gl.arange(0, ROWS, layout=gl.SliceLayout(1, io_layout))
    q_ok = gl.expand_dims(q_rows < num_rows, 1)
    q_cols = gl.expand_dims(gl.arange(0, 64, layout=gl.SliceLayout(0, io_layout)), 0)
    s_zero = gl.zeros([BLOCK_N, ROWS], gl.float32, s_layout)
    offs_n = gl.arange(0, BLOCK_N, layout=key_s)
    s_rows = gl.arange(0, ROWS, layout=row_s)
    rows_o = gl.expand_dims(gl.arange(0, ROWS, layout=gl.SliceLayout(0, out_layout)), 0)
    cols_o = gl.expand_dims(gl.arange(0, HEAD_DIM_V, layout=gl.SliceLayout(1, out_layout)), 1)

    done = 0  # tiles consumed by the earlier pieces (ring stage and barrier phase)
    for k in range(n_pieces):
        seq = first_seq + k
        piece, splits, seq_len, start, end = _piece_range(seq, part, SeqLens, SeqStart, SeqSplits, SeqSlot,
                                                          SeqFirstPart, Totals, OVERHEAD_UNITS, BLOCK_N)
        pid_b = seq.to(gl.int64)
        n_tiles = gl.maximum(gl.cdiv(end - start, BLOCK_N), 0)
        table_row = BlockTable + pid_b * stride_tb

        _start_piece(Q, pid_b, q_rows, q_ok, q_cols, h_q, stride_qb, stride_qs, stride_qh, q_lat, q_rope,
                     lat_desc, rope_desc, k_lat, k_rope, ready, table_row, start, done, n_tiles,
                     PAGE_SIZE, BLOCK_N, HEAD_DIM_V, NUM_STAGES)

        # -- running state (per query row: axis 1 of Sᵀ and Oᵀ) --------------------------------------
        acc = gl.zeros([HEAD_DIM_V, ROWS], gl.float32, o_layout)  # unnormalised Oᵀ
        m_i = gl.full([ROWS], float("-inf"), gl.float32, row_s)
        l_acc = gl.zeros([BLOCK_N, ROWS], gl.float32, s_layout)
        if CAUSAL:
            row_limit = gl.expand_dims(seq_len - s_q + s_rows // h_q + 1, 0)  # query i sees positions < this

        for j in range(n_tiles):
            stage = (done + j) % NUM_STAGES
            tile_start = start + j * BLOCK_N
            mbarrier.wait(ready.index(stage), ((done + j) // NUM_STAGES) & 1)
            # -- Sᵀ = K·Qᵀ: latent then rope ---------------------------------------------------------
            s = warpgroup_mma(k_lat.index(stage), q_lat.permute((1, 0)), s_zero, use_acc=False, is_async=True)
            s = warpgroup_mma(k_rope.index(stage), q_rope.permute((1, 0)), s, is_async=True)
            s = warpgroup_mma_wait(0, deps=(s, ))
            # -- online softmax over the keys (axis 0), base 2 ----------------------------------------
            pos = gl.expand_dims(tile_start + offs_n, 1)
            visible = pos < end
            if CAUSAL:
                visible = visible & (pos < row_limit)
            s = gl.where(visible, s * qk_scale, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(s, axis=0))
            m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = gl.exp2(m_i - m_safe)
            p = gl.exp2(s - gl.expand_dims(m_safe, 0))
            l_acc = l_acc * gl.expand_dims(alpha, 0) + p
            m_i = m_new
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 0)
            if tile_start + BLOCK_N > end:  # the range's last, partial tile: zero V rows past `end`
                _zero_tail_rows(k_lat.index(stage), end - tile_start, BLOCK_N, HEAD_DIM_V, 64, io_layout)
            p_smem.store(gl.permute(p.to(dtype), (1, 0)))
            fence_async_shared()
            _cta_barrier()
            # -- Oᵀ += Vᵀ·Pᵀ, V = the first 512 columns of the same K tile ------------------------------
            acc = warpgroup_mma(k_lat.index(stage).permute((1, 0)), p_smem.permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(0, deps=(acc, ))
            _cta_barrier()
            _issue_tile_load(lat_desc, rope_desc, k_lat, k_rope, ready, table_row, start, done, j + NUM_STAGES,
                             n_tiles, PAGE_SIZE, BLOCK_N, HEAD_DIM_V, NUM_STAGES)
        done += n_tiles

        # -- epilogue: as the 8-warp kernel's, Oᵀ stored back as rows of out ----------------------------
        l_safe, lse2 = _row_totals(l_acc, m_i, 0)
        o = acc * gl.expand_dims(gl.convert_layout(1.0 / l_safe, row_o), 0)
        o = gl.convert_layout(o, out_layout)
        _store_piece(o, lse2, rows_o, cols_o, rows_o < num_rows, s_rows, s_rows < num_rows, splits, piece, pid_b,
                     Out, Lse, OutPart, LsePart, num_rows, h_q, stride_ob, stride_os, stride_oh,
                     stride_lb, stride_lh, stride_ls, HEAD_DIM_V)

    for i in gl.static_range(NUM_STAGES):
        mbarrier.invalidate(ready.index(i))


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------

def smem_layouts(torch_dtype: torch.dtype):
    """The shared-memory layouts of the latent [64, 512] and rope [64, 64] tiles (TMA destinations)."""
    gdt = _GL_DTYPES[torch_dtype]
    return (gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM_V], gdt),
            gl.NVMMASharedLayout.get_default_for([BLOCK_N, ROPE_DIM], gdt))


def _cache_rows(kv_cache: torch.Tensor) -> torch.Tensor:
    """The paged cache [num_blocks, page_size, 1, 576] as the 2-D [num_blocks·page_size, 576] tensor
    the TMA descriptors index (row = block·page_size + slot); a view, never a copy."""
    num_blocks, page_size, _, d = kv_cache.shape
    return kv_cache.as_strided((num_blocks * page_size, d), (kv_cache.stride(1), kv_cache.stride(3)))


def supports(q: torch.Tensor, kv_cache: torch.Tensor, head_dim_v: int, *, is_fp8_kvcache: bool = False,
             indices=None, attn_sink=None, k_scale=None, **_ignored) -> bool:
    """Whether this kernel may run these inputs (else the caller uses the tl kernel)."""
    if is_fp8_kvcache or indices is not None or attn_sink is not None or k_scale is not None:
        return False
    if q.dim() != 4 or kv_cache.dim() != 4 or q.device.type != "cuda" or kv_cache.device != q.device:
        return False
    if q.dtype not in _GL_DTYPES or kv_cache.dtype != q.dtype:
        return False
    b, s_q, h_q, d = q.shape
    num_blocks, page_size, h_kv, d_k = kv_cache.shape
    if d != HEAD_DIM or d_k != HEAD_DIM or head_dim_v != HEAD_DIM_V or h_kv != 1:
        return False
    if page_size not in SUPPORTED_PAGE_SIZES or q.stride(3) != 1 or b > MAX_BATCH:
        return False
    # TMA: unit column stride, 16-byte aligned row stride and base, blocks adjacent (so the cache is
    # one 2-D tensor of rows), row indices within int32
    elem = kv_cache.element_size()
    if kv_cache.stride(3) != 1 or (kv_cache.stride(1) * elem) % 16 or kv_cache.data_ptr() % 16:
        return False
    if num_blocks > 1 and kv_cache.stride(0) != page_size * kv_cache.stride(1):
        return False
    if num_blocks * page_size >= 2**31:
        return False
    if torch.cuda.get_device_capability(q.device)[0] != 9:
        return False
    return True


def hopper_split_launch(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                        cache_seqlens: torch.Tensor, softmax_scale: float, causal: bool, out: torch.Tensor,
                        lse: torch.Tensor, out_part: torch.Tensor, lse_part: torch.Tensor,
                        schedule: tuple[torch.Tensor, ...], num_parts: int, overhead_units: int) -> None:
    """Launch the split kernel (the few-rows kernel for s_q·h_q <= FEW_ROWS) over grid (cdiv(s_q·h_q,
    64), max(b, num_parts)): one program per part of scheduled_decode's device schedule
    (`schedule_decode`: seq_start, seq_splits, seq_slot, seq_first_part, totals, made with block_n = 64
    and `overhead_units`; a schedule has at most max(b, num_parts) parts: num_parts when it cuts, b when
    it runs sequences whole), doing the part's pieces one after the other. A piece that is its
    sequence's only one writes out [b, s_q, h_q, 512] (q.dtype) and lse [b, h_q, s_q] (float32,
    natural log); piece k of a split sequence writes out_part[k] [s_q·h_q, 512] and lse_part[k]
    (float32, normalised, base-2 lse, -inf for no key), which scheduled_decode's merge combines.
    out must have unit stride along its last dimension. No validation and no host sync (the caller
    checked `supports`); CUDA-graph capturable."""
    b, s_q, h_q, d = q.shape
    num_rows = s_q * h_q
    lat_layout, rope_layout = smem_layouts(q.dtype)
    rows = _cache_rows(kv_cache)
    lat_desc = TensorDescriptor(rows, list(rows.shape), list(rows.stride()), [BLOCK_N, HEAD_DIM_V], lat_layout)
    rope_desc = TensorDescriptor(rows, list(rows.shape), list(rows.stride()), [BLOCK_N, ROPE_DIM], rope_layout)
    kernel, rows, warps = _variant(num_rows)
    kernel[(triton.cdiv(num_rows, BLOCK_M), max(b, num_parts))](
        q, lat_desc, rope_desc, block_table, cache_seqlens, out, lse, out_part, lse_part, *schedule,
        softmax_scale * LOG2E, num_rows, h_q, s_q, b,
        q.stride(0), q.stride(1), q.stride(2),
        block_table.stride(0),
        out.stride(0), out.stride(1), out.stride(2),
        *lse.stride(),
        PAGE_SIZE=kv_cache.shape[1], CAUSAL=bool(causal), OVERHEAD_UNITS=overhead_units,
        BLOCK_B=_batch_block(b), BLOCK_N=BLOCK_N, HEAD_DIM_V=HEAD_DIM_V, ROPE_DIM=ROPE_DIM,
        NUM_STAGES=NUM_STAGES, num_warps=warps, **rows,
    )


def few_rows_tile(num_rows: int) -> int:
    """The N extent (query rows) of the few-rows kernel's tiles for this many rows."""
    return 16 if num_rows <= 16 else FEW_ROWS


def _variant(num_rows: int) -> tuple:
    """The split kernel for this many query rows, its row constexprs and its warps: the few-rows kernel
    (ROWS, WARPGROUPS) for at most FEW_ROWS rows, else the 8-warp kernel (BLOCK_M)."""
    if num_rows <= FEW_ROWS:
        tile = few_rows_tile(num_rows)
        groups = FEW_ROWS_WARPGROUPS[tile]
        return _hopper_few_rows_kernel, {"ROWS": tile, "WARPGROUPS": groups}, 4 * groups
    return _hopper_split_kernel, {"BLOCK_M": BLOCK_M}, NUM_WARPS


def _batch_block(b: int) -> int:
    """The width of the vector a program finds its sequence in (one load; see MAX_BATCH)."""
    return max(256, triton.next_power_of_2(max(b, 1)))


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compilation (no GPU needed): what tests/test_hopper_compile.py and the notes check
# ----------------------------------------------------------------------------------------------

def _descriptor_type(torch_dtype: torch.dtype, block_shape: list[int], layout) -> str:
    name = {torch.bfloat16: "bf16", torch.float16: "fp16"}[torch_dtype]
    return f"tensordesc<{name}[{','.join(map(str, block_shape))}],{layout!r}>"


def compile_for_sm90(torch_dtype: torch.dtype = torch.bfloat16, causal: bool = False, page_size: int = 64,
                     batch: int = 128, rows: int = BLOCK_M):
    """Compile the split kernel for sm_90a with the installed Triton, without a GPU: the 8-warp kernel,
    or for rows <= FEW_ROWS the few-rows kernel. Returns Triton's compiled kernel (asm:
    ttgir/ptx/cubin; metadata: shared, num_warps, ...)."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    name = {torch.bfloat16: "bf16", torch.float16: "fp16"}[torch_dtype]
    lat_layout, rope_layout = smem_layouts(torch_dtype)
    i32, i64 = "i32", "i64"
    signature = {
        "Q": f"*{name}", "lat_desc": _descriptor_type(torch_dtype, [BLOCK_N, HEAD_DIM_V], lat_layout),
        "rope_desc": _descriptor_type(torch_dtype, [BLOCK_N, ROPE_DIM], rope_layout),
        "BlockTable": "*i32", "SeqLens": "*i32", "Out": f"*{name}", "Lse": "*fp32", "OutPart": "*fp32",
        "LsePart": "*fp32", "SeqStart": "*i32", "SeqSplits": "*i32", "SeqSlot": "*i32", "SeqFirstPart": "*i32",
        "Totals": "*i32", "qk_scale": "fp32", "num_rows": i32, "h_q": i32, "s_q": i32, "num_seqs": i32,
        "stride_qb": i64, "stride_qs": i64, "stride_qh": i64, "stride_tb": i64,
        "stride_ob": i64, "stride_os": i64, "stride_oh": i64, "stride_lb": i64, "stride_lh": i64, "stride_ls": i64,
    }
    kernel, row_constexprs, warps = _variant(rows)
    constexprs = {"PAGE_SIZE": page_size, "CAUSAL": causal, "OVERHEAD_UNITS": 1, "BLOCK_B": _batch_block(batch),
                  "BLOCK_N": BLOCK_N, "HEAD_DIM_V": HEAD_DIM_V, "ROPE_DIM": ROPE_DIM, "NUM_STAGES": NUM_STAGES}
    constexprs.update(row_constexprs)
    for key in constexprs:
        signature[key] = "constexpr"
    src = GluonASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
