"""Build a decode case's tensors from its description, adversarially laid out.

- Each sequence's values come from its own generator (seed, row), so one row can be redrawn
  without touching the others; the layout (page order) comes from layout_seed.
- Pages sit in random physical order; slots past a length and unused blocks hold NaN; unused
  block-table entries hold an id far out of range (int32 max): a kernel that reads any of them
  shows it.
- With strided_cache the cache is a view [..., :d] of a wider buffer whose extra columns are
  canaries; q is the middle of a flat buffer with canaries on both sides. Snapshots of every
  buffer taken before the call tell an input modified (inside a tensor) from an out-of-bounds
  write (in a canary).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mla_verify.strategies import DecodeCase

__all__ = ["OUT_OF_RANGE_BLOCK", "DecodeInputs", "build_inputs", "sequence_values"]

OUT_OF_RANGE_BLOCK = 2**31 - 1
CANARY_COLUMNS = 8
CANARY_ELEMENTS = 64
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
    elif case.regime in ("extreme_positive", "extreme_negative"):
        # keys cluster around one direction; q points along it so every logit is about ±300,
        # with a spread of order one among them
        direction = torch.randn(d, generator=g, dtype=F64)
        keys = direction + 0.05 * keys
        sign = 1.0 if case.regime == "extreme_positive" else -1.0
        strength = sign * 300.0 / (scale * float(direction @ direction))
        q = strength * direction + 0.05 * q
    return q, keys


@dataclass
class DecodeInputs:
    """The contract's arguments plus the buffers they live in, for integrity checks."""

    case: DecodeCase
    q: torch.Tensor
    kv_cache: torch.Tensor
    block_table: torch.Tensor
    cache_seqlens: torch.Tensor
    q_buffer: torch.Tensor
    cache_buffer: torch.Tensor

    @property
    def arguments(self) -> tuple:
        c = self.case
        return (self.q, self.kv_cache, self.block_table, self.cache_seqlens, c.head_dim_v, c.softmax_scale)

    def buffers(self) -> dict[str, torch.Tensor]:
        return {"q": self.q_buffer, "kv_cache": self.cache_buffer, "block_table": self.block_table,
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
            inside = self._logical_mask(name, now)
            if (changed & inside).any():
                modified.append(name)
            if (changed & ~inside).any():
                out_of_bounds.append(name)
        return modified, out_of_bounds

    def _logical_mask(self, name: str, buffer: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(buffer.shape, dtype=torch.bool, device=buffer.device)
        if name == "q":
            mask[CANARY_ELEMENTS:CANARY_ELEMENTS + self.q.numel()] = True
        elif name == "kv_cache":
            mask[..., :self.case.d] = True
        else:
            mask[...] = True
        return mask


def _bitwise_changed(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Elementwise 'bits differ' (NaN-safe)."""
    if before.dtype.is_floating_point:
        width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[before.element_size()]
        return before.view(width) != after.view(width)
    return before != after


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
    cache_buffer = torch.full((num_blocks, page, 1, width), math.nan, dtype=F64)
    block_table = torch.full((b, max_blocks), OUT_OF_RANGE_BLOCK, dtype=torch.int32)
    q = torch.empty(b, case.s_q, case.heads, d, dtype=F64)
    next_block = 0
    for row in range(b):
        q_row, keys = sequence_values(case, row, redraw_rows.get(row))
        q[row] = q_row
        for j in range(blocks_per_row[row]):
            block = int(physical[next_block])
            next_block += 1
            block_table[row, j] = block
            chunk = keys[j * page:(j + 1) * page]
            cache_buffer[block, :chunk.shape[0], 0, :d] = chunk

    q_flat = torch.full((q.numel() + 2 * CANARY_ELEMENTS,), math.nan, dtype=dtype)
    q_flat[CANARY_ELEMENTS:CANARY_ELEMENTS + q.numel()] = q.to(dtype).flatten()
    q_flat = q_flat.to(case.device)
    cache_buffer = cache_buffer.to(dtype).to(case.device)
    q_view = q_flat[CANARY_ELEMENTS:CANARY_ELEMENTS + q.numel()].view(q.shape)
    return DecodeInputs(case=case, q=q_view, kv_cache=cache_buffer[..., :d], block_table=block_table.to(case.device),
                        cache_seqlens=torch.tensor(case.lengths, dtype=torch.int32, device=case.device),
                        q_buffer=q_flat, cache_buffer=cache_buffer)
