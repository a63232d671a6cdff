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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mla_verify.decode.case import DecodeCase

__all__ = ["OUT_OF_RANGE_BLOCK", "DecodeInputs", "build_inputs", "device_problem", "sequence_values"]

OUT_OF_RANGE_BLOCK = 2**31 - 1
CANARY_COLUMNS = 8
CANARY_ELEMENTS = 64
POOLED_LAYERS = 3
F64 = torch.float64


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed % 2**63)


def sequence_values(case: DecodeCase, row: int, seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q [s_q, h, d] and cache rows [L_row, d] of one sequence, float64, in the case's regime."""
    g = _generator((case.seed if seed is None else seed) * 1_000_003 + row)
    length, d, scale = case.lengths[row], case.d, case.softmax_scale
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
        keys = direction + 0.05 * keys
        logit = {"extreme_positive": 300.0, "extreme_negative": -300.0, "below_sentinel": -6.0e4}[case.regime]
        strength = logit / (scale * float(direction @ direction))
        q = strength * direction + 0.05 * q * (1.0 if case.regime != "below_sentinel" else 0.0)
    elif case.regime == "large_q":
        # |q| around 100 per element: split-KV lse merges have overflowed here
        q = q * 100.0
    elif case.regime == "late_outlier" and length:
        # one key far above all others (logit +30 for head 0's first query), late in the sequence
        at = length - 1 - int(torch.randint(max(length // 8, 1), (1,), generator=g))
        q0 = q[0, 0]
        keys[at] = keys[at] + 30.0 / (scale * float(q0 @ q0)) * q0
    elif case.regime == "shifted_maxima":
        # a common key component; heads and batch rows see it with logit offsets of -100, 0, +100,
        # so their maxima differ by 100 or more (a max shared across heads or rows underflows)
        direction = torch.randn(d, generator=g, dtype=F64)
        keys = keys + 0.5 * direction
        offsets = 100.0 * ((torch.arange(case.heads, dtype=F64) + row) % 3 - 1)  # [h]
        q = q + (offsets / (scale * 0.5 * float(direction @ direction)))[None, :, None] * direction
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

    @property
    def arguments(self) -> tuple:
        c = self.case
        return (self.q, self.kv_cache, self.block_table, self.cache_seqlens, c.head_dim_v, c.softmax_scale)

    def buffers(self) -> dict[str, torch.Tensor]:
        return {"q": self.q_buffer, "kv_cache": self.cache_buffer, "block_table": self.table_buffer,
                "cache_seqlens": self.cache_seqlens}

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {name: buffer.clone() for name, buffer in self.buffers().items()}

    def integrity(self, before: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
        """(tensors modified inside their logical extent, buffers written in their canaries)."""
        modified, out_of_bounds = [], []
        for name, now in self.buffers().items():
            changed = _bitwise_changed(before[name], now)
            if not changed.any():
                continue
            inside = self.logical[name]
            if (changed & inside).any():
                modified.append(name)
            if (changed & ~inside).any():
                out_of_bounds.append(name)
        return modified, out_of_bounds


def _bitwise_changed(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Elementwise 'bits differ' (NaN-safe)."""
    if before.dtype.is_floating_point:
        width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[before.element_size()]
        return before.view(width) != after.view(width)
    return before != after


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
    num_blocks = sum(blocks_per_row) + case.extra_blocks
    max_blocks = max(blocks_per_row, default=0) + 1  # at least one unused entry per row

    layout = _generator(case.layout_seed if layout_seed is None else layout_seed)
    physical = torch.randperm(num_blocks, generator=layout) if case.permute_pages else torch.arange(num_blocks)

    width = d + CANARY_COLUMNS if case.strided_cache else d
    layers = POOLED_LAYERS if case.pooled_cache else 1
    pool = torch.full((layers, num_blocks, page, 1, width), math.nan, dtype=F64)
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

    device = case.device
    pool = pool.to(dtype).to(device)
    cache_mask = torch.zeros(pool.shape, dtype=torch.bool, device=device)
    cache_mask[layers // 2, ..., :d] = True
    table_mask = torch.zeros(table_buffer.shape, dtype=torch.bool, device=device)
    table_mask[:, table_offset:table_offset + max_blocks] = True
    q_buffer, q_view, q_mask = _lay_out_query(q.to(dtype), case.q_layout)
    q_buffer, q_mask = q_buffer.to(device), q_mask.to(device)
    table_buffer = table_buffer.to(device)
    return DecodeInputs(case=case, q=_same_view(q_view, q_buffer), kv_cache=pool[layers // 2][..., :d],
                        block_table=table_buffer[:, table_offset:table_offset + max_blocks],
                        cache_seqlens=torch.tensor(case.lengths, dtype=torch.int32, device=device),
                        q_buffer=q_buffer, cache_buffer=pool, table_buffer=table_buffer,
                        logical={"q": q_mask, "kv_cache": cache_mask, "block_table": table_mask,
                                 "cache_seqlens": torch.ones(b, dtype=torch.bool, device=device)})


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
