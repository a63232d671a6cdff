"""Build a decode case's tensors from its description, adversarially laid out.

- Each sequence's values come from its own generator (seed, row), so one row can be redrawn
  without touching the others; the layout (page order) comes from layout_seed.
- Pages sit in random physical order; slots past a length and unused blocks hold NaN; unused
  block-table entries hold an id far out of range (int32 max): a kernel that reads any of them
  shows it.
- With strided_cache the cache is a view [..., :d] of a wider buffer whose extra columns are
  canaries; with pooled_cache it is one layer of a pool of three (a view at a nonzero storage
  offset, the other layers canaries); with sliced_block_table the table is a column slice of a
  wider one. q is the middle of a flat buffer with canaries on both sides, or a slice of a fused
  [q | canaries] projection, or the transpose of a [b, h, s_q, d] tensor. Snapshots of every
  buffer taken before the call tell an input modified (inside a tensor) from an out-of-bounds
  write (in a canary).
- FP8 caches (case.kv_format, mla_verify.decode.fp8): the values are drawn as for a native cache,
  rounded to the case's dtype (the cache a model would hold before quantising: the end-to-end
  reference) and quantised by the reference quantiser with the case's scale regime; padding slots,
  unused blocks and canaries are 0xFF bytes (NaN as e4m3, as a float32 scale and as bf16).
- Sparse cases (case.topk, mla_verify.decode.sparse): the pool gets one more block that no sequence
  owns, filled with data (the pool's last block: sparse lists may name any slot), and CANARY_BLOCKS
  blocks of NaN after the pool in the same allocation, where an index just past the pool lands.
  Each query's list is drawn from its row's own generator (so redrawing other rows leaves it
  unchanged) as logical choices mapped to slots through the block table (so moving pages moves
  the slots, not the choice).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mla_verify.decode.case import DecodeCase
from mla_verify.decode.fp8 import SCALE_GROUP, packed_width, poison_bytes, quantize, reference_scales
from mla_verify.decode.sparse import CANARY_BLOCKS, draw_index_list, query_limits, sink_values
from mla_verify.rounding import bits_differ

__all__ = ["OUT_OF_RANGE_BLOCK", "DecodeInputs", "build_inputs", "device_problem", "sequence_values"]

OUT_OF_RANGE_BLOCK = 2**31 - 1
CANARY_COLUMNS = 8
CANARY_ELEMENTS = 64
POOLED_LAYERS = 3
CALIBRATION_TOKENS = 256  # rows of the sample a per-tensor FP8 scale is calibrated on
F64 = torch.float64


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed % 2**63)


def sequence_values(case: DecodeCase, row: int, seed: int | None = None,
                    length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q [s_q, h, d] and cache rows [L_row, d] of one sequence, float64, in the case's regime
    (`length` overrides L_row: the shared block of a sparse case is row `batch`)."""
    g = _generator((case.seed if seed is None else seed) * 1_000_003 + row)
    length = case.lengths[row] if length is None else length
    d, scale = case.d, case.softmax_scale
    q = torch.randn(case.s_q, case.heads, d, generator=g, dtype=F64)
    keys = torch.randn(length, d, generator=g, dtype=F64)
    if case.regime == "tiny":
        q, keys = q * 2.0**-10, keys * 2.0**-10
    elif case.regime == "large":
        # large values with unit-sized logits: |k| ~ 64, |q| ~ 1/64
        q, keys = q / 64, keys * 64
    elif case.regime == "constant_keys":
        keys = keys[:1].expand(length, d).clone() if length else keys
    elif case.regime in ("extreme_positive", "extreme_negative", "below_sentinel"):
        # keys cluster around one direction; q points along it so every logit is about ±300 (or
        # below -5e4, under the finite "-infinity" sentinels some kernels use), with a spread of
        # order one (±300) among them
        direction = torch.randn(d, generator=g, dtype=F64)
        logit = {"extreme_positive": 300.0, "extreme_negative": -300.0, "below_sentinel": -6.0e4}[case.regime]
        if case.regime == "below_sentinel":
            # q and the keys share the magnitude (each ~ sqrt(6e4 / (scale d))): q alone would carry
            # elements past float16's 65504 at small d
            magnitude = math.sqrt(-logit / (scale * float(direction @ direction)))
            keys = magnitude * (direction + 0.05 * keys)
            q = -magnitude * direction.expand_as(q).clone()
        else:
            keys = direction + 0.05 * keys
            q = logit / (scale * float(direction @ direction)) * direction + 0.05 * q
    elif case.regime == "large_q":
        # |q| around 100 per element: split-KV lse merges have overflowed here
        q = q * 100.0
    elif case.regime == "late_outlier" and length:
        # one key far above all others (logit +30 for head 0's first query), late in the sequence
        at = length - 1 - int(torch.randint(max(length // 8, 1), (1,), generator=g))
        q0 = q[0, 0]
        keys[at] = keys[at] + 30.0 / (scale * float(q0 @ q0)) * q0
    elif case.regime == "boundary_keys" and length:
        # the keys where kernels cut their work (each page's and each 64-key tile's first and last
        # slot, the first key, the newest s_q keys) get one logit for head 0, 3 above every other key
        # it sees, so that they hold nearly all its weight, about 1 / their number each: a kernel that
        # loses any one of them (an off-by-one at a boundary, the newest token) moves head 0's lse by
        # about that much, where with random keys one token among thousands weighs ~1e-4 or less
        q[:, 0] = q[0, 0].clone()
        q0 = q[0, 0]
        positions = torch.arange(length)
        at = ((positions % case.page_size == 0) | (positions % case.page_size == case.page_size - 1)
              | (positions % 64 == 0) | (positions % 64 == 63) | (positions >= length - case.s_q))
        logits = scale * (keys @ q0)
        target = float(logits[~at].max()) + 3.0 if bool((~at).any()) else 0.0
        keys[at] = keys[at] + ((target - logits[at]) / (scale * float(q0 @ q0)))[:, None] * q0
    elif case.regime == "shifted_maxima":
        # a common key component; heads and batch rows see it with logit offsets of -100, 0, +100,
        # so their maxima differ by 100 or more (a max shared across heads or rows underflows)
        direction = torch.randn(d, generator=g, dtype=F64)
        keys = keys + 0.5 * direction
        offsets = 100.0 * ((torch.arange(case.heads, dtype=F64) + row) % 3 - 1)  # [h]
        q = q + (offsets / (scale * 0.5 * float(direction @ direction)))[None, :, None] * direction
    if case.fp8:
        q, keys = _fp8_scale_regime(case, q, keys, g)
    for name, values in (("q", q), ("keys", keys)):
        if not bool(values.to(case.torch_dtype).isfinite().all()):
            # a generator bug, not the kernel's: a kernel must never be failed on inputs the case did not mean
            raise RuntimeError(f"mla_verify drew non-finite {name} in {case.dtype} for regime {case.regime!r} "
                               f"(d={d}, scale={case.scale}); please report this case: {case}")
    return q, keys


# near_min / near_max: the cache is shifted by 2^∓SHIFT (scales near 2^∓107, dequantised values
# between 2^∓100·2^-9 and 2^∓100·448: normal and finite in float32 and bf16) and q by 2^±SHIFT
FP8_SHIFT = 100


def _fp8_scale_regime(case: DecodeCase, q: torch.Tensor, keys: torch.Tensor,
                      g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    if case.fp8_scales in ("near_min", "near_max"):
        shift = 2.0 ** (FP8_SHIFT if case.fp8_scales == "near_max" else -FP8_SHIFT)
        return q / shift, keys * shift
    if case.fp8_scales == "zero_blocks" and keys.shape[0]:
        # about half the tokens get one group of 128 latent values (all of them for a narrow
        # latent) set to zero: an all-zero group
        groups = -(-case.head_dim_v // SCALE_GROUP)
        chosen = torch.randint(0, groups, (keys.shape[0],), generator=g)
        hit = torch.rand(keys.shape[0], generator=g) < 0.5
        column = torch.arange(case.d) // SCALE_GROUP
        zero = hit[:, None] & (column[None, :] == chosen[:, None]) & (torch.arange(case.d) < case.head_dim_v)[None, :]
        keys = torch.where(zero, torch.zeros((), dtype=F64), keys)
    return q, keys


@dataclass
class DecodeInputs:
    """The contract's arguments plus the buffers they live in, for integrity checks; `logical`
    marks, per buffer, the elements that belong to the argument (the rest are canaries)."""

    case: DecodeCase
    q: torch.Tensor
    kv_cache: torch.Tensor
    block_table: torch.Tensor
    cache_seqlens: torch.Tensor
    q_buffer: torch.Tensor
    cache_buffer: torch.Tensor
    table_buffer: torch.Tensor
    logical: dict[str, torch.Tensor]
    # FP8 and sparse arguments (None when the case does not use them)
    k_scale: torch.Tensor | None = None
    indices: torch.Tensor | None = None
    attn_sink: torch.Tensor | None = None
    # an FP8 case's cache before quantisation, in the case's dtype (the end-to-end reference's)
    native_cache: torch.Tensor | None = None

    @property
    def arguments(self) -> tuple:
        c = self.case
        return (self.q, self.kv_cache, self.block_table, self.cache_seqlens, c.head_dim_v, c.softmax_scale)

    @property
    def keywords(self) -> dict:
        """The keyword arguments of the call: causal (False with indices: the lists carry it), and
        only the FP8/sparse/sink arguments the case uses."""
        c = self.case
        keywords: dict = {"causal": c.causal and not c.sparse}
        if c.kv_format == "fp8_ds_mla":
            keywords["is_fp8_kvcache"] = True
        for name in ("k_scale", "indices", "attn_sink"):
            if getattr(self, name) is not None:
                keywords[name] = getattr(self, name)
        return keywords

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor argument of the call by its contract name (what a counterexample saves)."""
        named = dict(zip(("q", "kv_cache", "block_table", "cache_seqlens"), self.arguments[:4]))
        named.update({name: value for name, value in self.keywords.items() if isinstance(value, torch.Tensor)})
        return named

    def buffers(self) -> dict[str, torch.Tensor]:
        extra = {name: getattr(self, name) for name in ("k_scale", "indices", "attn_sink")
                 if getattr(self, name) is not None}
        return {"q": self.q_buffer, "kv_cache": self.cache_buffer, "block_table": self.table_buffer,
                "cache_seqlens": self.cache_seqlens, **extra}

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {name: buffer.clone() for name, buffer in self.buffers().items()}

    def integrity(self, before: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
        """(tensors modified inside their logical extent, buffers written in their canaries)."""
        modified, out_of_bounds = [], []
        for name, now in self.buffers().items():
            # every bit counts, NaN payloads too: rewriting a NaN-poisoned slot is a write
            changed = bits_differ(before[name], now, nan_payload=True)
            if not changed.any():
                continue
            inside = self.logical.get(name)
            if inside is None:  # the whole buffer is the argument
                inside = torch.ones(now.shape, dtype=torch.bool, device=now.device)
            if (changed & inside).any():
                modified.append(name)
            if (changed & ~inside).any():
                out_of_bounds.append(name)
        return modified, out_of_bounds


def device_problem(device: str) -> str | None:
    """Why cases cannot be built on `device` ('cpu', 'cuda', 'cuda:N'), or None when they can."""
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda") or (kind == "cpu" and index) or (index and not index.isdigit()):
        return "expected cpu, cuda or cuda:N"
    if kind == "cuda":
        if not torch.cuda.is_available():
            return "torch sees no CUDA device on this machine"
        if index and int(index) >= torch.cuda.device_count():
            return f"torch sees {torch.cuda.device_count()} CUDA device(s), numbered from 0"
    return None


def build_inputs(case: DecodeCase, redraw_rows: dict[int, int] | None = None,
                 layout_seed: int | None = None) -> DecodeInputs:
    """Tensors for `case` on case.device. redraw_rows maps a row to another value seed (the other
    rows stay bit-identical); layout_seed overrides the page placement."""
    dtype, b, page, d = case.torch_dtype, case.batch, case.page_size, case.d
    redraw_rows = redraw_rows or {}
    blocks_per_row = [math.ceil(n / page) for n in case.lengths]
    shared = 1 if case.sparse else 0  # a sparse case's last block belongs to no sequence
    owned = sum(blocks_per_row) + case.extra_blocks
    num_blocks = owned + shared
    max_blocks = max(blocks_per_row, default=0) + 1  # at least one unused entry per row

    layout = _generator(case.layout_seed if layout_seed is None else layout_seed)
    physical = torch.randperm(owned, generator=layout) if case.permute_pages else torch.arange(owned)

    width = d + CANARY_COLUMNS if case.strided_cache else d
    layers = POOLED_LAYERS if case.pooled_cache else 1
    trailing = CANARY_BLOCKS if case.sparse else 0  # NaN blocks after the pool, same allocation
    pool = torch.full((layers, num_blocks + trailing, page, 1, width), math.nan, dtype=F64)
    cache_buffer = pool[layers // 2]
    table_offset = 1 if case.sliced_block_table else 0
    table_buffer = torch.full((b, max_blocks + 2 * table_offset), OUT_OF_RANGE_BLOCK, dtype=torch.int32)
    block_table = table_buffer[:, table_offset:table_offset + max_blocks]
    q = torch.empty(b, case.s_q, case.heads, d, dtype=F64)
    next_block = 0
    for row in range(b):
        q_row, keys = sequence_values(case, row, redraw_rows.get(row))
        q[row] = q_row
        count = blocks_per_row[row]
        blocks = physical[next_block:next_block + count]
        next_block += count
        block_table[row, :count] = blocks.to(torch.int32)
        padded = torch.full((count * page, d), math.nan, dtype=F64)  # slots past the length stay NaN
        padded[:keys.shape[0]] = keys
        cache_buffer[blocks, :, 0, :d] = padded.view(count, page, d)
    if shared:
        _, keys = sequence_values(case, b, length=page)
        cache_buffer[num_blocks - 1, :, 0, :d] = keys

    device = case.device
    native = pool.to(dtype)
    k_scale = native_cache = None
    if case.fp8:
        pool, cache_width, k_scale = _quantized_pool(case, native, layers, num_blocks)
        native_cache = native[layers // 2][:num_blocks, ..., :d].to(device)
        k_scale = k_scale.to(device) if k_scale is not None else None
    else:
        pool, cache_width = native, d
    pool = pool.to(device)
    cache_mask = torch.zeros(pool.shape, dtype=torch.bool, device=device)
    cache_mask[layers // 2, :num_blocks, ..., :cache_width] = True
    table_mask = torch.zeros(table_buffer.shape, dtype=torch.bool, device=device)
    table_mask[:, table_offset:table_offset + max_blocks] = True
    q_buffer, q_view, q_mask = _lay_out_query(q.to(dtype), case.q_layout)
    q_buffer, q_mask = q_buffer.to(device), q_mask.to(device)
    indices = _index_lists(case, block_table, num_blocks, redraw_rows).to(device) if case.sparse else None
    sink = None
    if case.attn_sink != "none":
        typical_lse = math.log1p(max(case.lengths, default=0) if not case.sparse else case.topk)
        sink = sink_values(case.attn_sink, case.heads, typical_lse, _generator(case.seed * 1_000_003 + 999_983))
        sink = sink.to(device)
    table_buffer = table_buffer.to(device)
    return DecodeInputs(case=case, q=_same_view(q_view, q_buffer), kv_cache=pool[layers // 2][:num_blocks, ..., :cache_width],
                        block_table=table_buffer[:, table_offset:table_offset + max_blocks],
                        cache_seqlens=torch.tensor(case.lengths, dtype=torch.int32, device=device),
                        q_buffer=q_buffer, cache_buffer=pool, table_buffer=table_buffer,
                        logical={"q": q_mask, "kv_cache": cache_mask, "block_table": table_mask,
                                 "cache_seqlens": torch.ones(b, dtype=torch.bool, device=device)},
                        k_scale=k_scale, indices=indices, attn_sink=sink, native_cache=native_cache)


def _quantized_pool(case: DecodeCase, native: torch.Tensor, layers: int,
                    num_blocks: int) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    """(the FP8 pool [layers, blocks, page, 1, bytes] with 0xFF canaries, the cache's byte width, k_scale)."""
    d, head_dim_v = case.d, case.head_dim_v
    values = native[layers // 2, :num_blocks, :, 0, :d]  # [n, page, d], NaN in padding slots
    power_of_two = case.fp8_scales == "power_of_two"
    k_scale = None
    if case.kv_format == "fp8_e4m3":
        # a calibrated per-tensor scale, as serving engines load it: amax/448 of a calibration
        # sample drawn like the cache (its own rows, so no row's scale depends on another row's
        # data); values beyond it saturate at ±448·k_scale, as they do in production
        _, sample = sequence_values(case, case.batch + 1, length=CALIBRATION_TOKENS)
        amax = sample.to(dtype=values.dtype).to(F64).abs().amax()
        k_scale = reference_scales(amax, power_of_two).reshape(1)
        codes, width = quantize(values, head_dim_v, "fp8_e4m3", k_scale), d
    else:
        codes, width = quantize(values, head_dim_v, "fp8_ds_mla", power_of_two=power_of_two), packed_width(d, head_dim_v)
    codes = codes.view(torch.uint8).clone()
    codes[values.isnan().any(-1)] = 0xFF  # padding slots: every byte NaN
    columns = width + CANARY_COLUMNS if case.strided_cache else width
    shape = (layers, native.shape[1], native.shape[2], 1, columns)
    pool = poison_bytes(math.prod(shape)).view(torch.uint8).view(shape).clone()
    pool[layers // 2, :num_blocks, :, 0, :width] = codes
    return pool.view(torch.float8_e4m3fn), width, k_scale


def _index_lists(case: DecodeCase, block_table: torch.Tensor, num_blocks: int,
                 redraw_rows: dict[int, int]) -> torch.Tensor:
    """int32 [b, s_q, topk]: each query's list (mla_verify.decode.sparse), drawn per row."""
    page = case.page_size
    num_slots = num_blocks * page
    shared = (num_blocks - 1) * page + torch.arange(page)
    lists = torch.empty(case.batch, case.s_q, case.topk, dtype=torch.int64)
    for row, length in enumerate(case.lengths):
        positions = torch.arange(length)
        slots = block_table[row, positions // page].to(torch.int64) * page + positions % page
        g = _generator(redraw_rows.get(row, case.seed) * 1_000_003 + row + 500_009)
        for query, limit in enumerate(query_limits(length, case.s_q, case.causal)):
            lists[row, query] = draw_index_list(case.index_pattern, case.topk, slots, limit, shared, num_slots, page, g)
    return lists.to(torch.int32)


def _lay_out_query(q: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(buffer, q as a view of it, mask of q's elements in the buffer) for one of the Q_LAYOUTS."""
    if layout == "fused":  # sliced from a fused projection [q | other heads' columns]
        buffer = torch.full((*q.shape[:-1], q.shape[-1] + CANARY_COLUMNS), math.nan, dtype=q.dtype)
        buffer[..., :q.shape[-1]] = q
        mask = torch.zeros(buffer.shape, dtype=torch.bool)
        mask[..., :q.shape[-1]] = True
        return buffer, buffer[..., :q.shape[-1]], mask
    if layout == "transposed":  # [b, h, s_q, d] transposed to [b, s_q, h, d]
        buffer = q.transpose(1, 2).contiguous()
        return buffer, buffer.transpose(1, 2), torch.ones(buffer.shape, dtype=torch.bool)
    buffer = torch.full((q.numel() + 2 * CANARY_ELEMENTS,), math.nan, dtype=q.dtype)
    buffer[CANARY_ELEMENTS:CANARY_ELEMENTS + q.numel()] = q.flatten()
    mask = torch.zeros(buffer.shape, dtype=torch.bool)
    mask[CANARY_ELEMENTS:CANARY_ELEMENTS + q.numel()] = True
    return buffer, buffer[CANARY_ELEMENTS:CANARY_ELEMENTS + q.numel()].view(q.shape), mask


def _same_view(view: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """`view`'s geometry over `buffer` (the buffer moved to the case's device)."""
    return buffer.as_strided(view.shape, view.stride(), view.storage_offset())
