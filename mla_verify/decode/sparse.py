"""Sparse (top-k) decode: which index entries count, how the suite lays index lists out, and sinks.

The rules (the contract's docstring states them for kernel authors):

- indices int32 [b, s_q, topk]; entry k of query (i, j) names a token slot of the pool,
  block·page_size + offset. -1 is "no token". An entry is valid iff 0 <= index < num_slots
  (num_blocks·page_size); a positive index at or past num_slots is invalid too and must be ignored
  (or make the kernel raise, if it declares invalid_indices="raise"), never read.
- Query (i, j) attends to its valid entries, each one term of the softmax (duplicates count once per
  occurrence); order does not matter; a list with no valid entry is a row that sees no key.
- block_table and cache_seqlens do not restrict a sparse query and causal is passed as False: the
  lists carry the causal and length rules. The suite draws query j's list from the slots its dense
  rules let it see (positions < L, and < L − s_q + j + 1 under causal) and from a block no sequence
  owns (the pool's last block, filled with data), so that sparse ≡ dense is a property.

INDEX_PATTERNS, how a case's lists are laid out (each drawn inside the capabilities' topk):

    subset        a random subset of the query's candidates in random order, at random positions,
                  the other entries -1
    all_visible   every visible position in logical order (the last topk of them), then -1 padding:
                  the list that makes sparse decode equal dense decode
    with_invalid  as subset, the unused entries a mix of -1 and positive indices past the pool (some
                  just past it, where a kernel that reads them meets canary memory, some near 2^31)
    duplicates    as subset, drawn with replacement (the first two entries always equal)
    all_invalid   every entry -1
    last_slot     as subset over the candidates and the shared block, always listing the pool's last
                  slot (an off-by-one bounds check drops it)

SINKS: "none"; "finite": one finite sink per head, around the log of the row's key count (so the
sink factor exp(lse) / (exp(lse) + exp(sink)) is neither 0 nor 1); "infinite": heads cycle through
+inf (out 0), -inf (no effect) and a finite value.
"""

from __future__ import annotations

import math

import torch

__all__ = ["INDEX_PATTERNS", "SINKS", "CANARY_BLOCKS", "HUGE_INDEX", "query_limits", "draw_index_list",
           "valid_entries", "has_invalid_positive", "compact_valid", "sink_values", "sink_factor"]

INDEX_PATTERNS = ("subset", "all_visible", "with_invalid", "duplicates", "all_invalid", "last_slot")
SINKS = ("none", "finite", "infinite")
# blocks of canary memory (NaN) laid after the pool in the same allocation, for sparse cases: an
# out-of-range index a kernel reads lands there
CANARY_BLOCKS = 2
HUGE_INDEX = 2**31 - 1


def query_limits(length: int, s_q: int, causal: bool) -> list[int]:
    """Per query j of a row of `length` keys: it sees positions < limit_j (the dense rules)."""
    if not causal:
        return [length] * s_q
    return [max(length - s_q + j + 1, 0) for j in range(s_q)]


def _random_positions(topk: int, count: int, g: torch.Generator) -> torch.Tensor:
    return torch.randperm(topk, generator=g)[:count]


def _invalid_positive(count: int, num_slots: int, page_size: int, g: torch.Generator) -> torch.Tensor:
    """Positive indices past the pool: half into the canary blocks just after it, half near 2^31."""
    near = num_slots + torch.randint(0, CANARY_BLOCKS * page_size, (count,), generator=g)
    far = HUGE_INDEX - torch.randint(0, 1024, (count,), generator=g)
    pick = torch.rand(count, generator=g) < 0.5
    return torch.where(pick, near, far)


def draw_index_list(pattern: str, topk: int, slots: torch.Tensor, limit: int, shared: torch.Tensor,
                    num_slots: int, page_size: int, g: torch.Generator) -> torch.Tensor:
    """One query's list, int64 [topk]. slots [L] are the pool slots of the row's logical positions;
    the query may see the first `limit` of them; `shared` are the slots of the block no sequence
    owns (candidates for 'last_slot'; its last entry is the pool's last slot)."""
    if pattern not in INDEX_PATTERNS:
        raise ValueError(f"pattern must be one of {list(INDEX_PATTERNS)}; got {pattern!r}")
    entries = torch.full((topk,), -1, dtype=torch.int64)
    visible = slots[:limit].to(torch.int64)
    if pattern == "all_invalid":
        return entries
    if pattern == "all_visible":
        window = visible[max(0, limit - topk):]
        entries[:window.numel()] = window
        return entries
    candidates = torch.cat((visible, shared.to(torch.int64))) if pattern == "last_slot" else visible
    n = candidates.numel()
    room = topk - 1 if pattern == "with_invalid" else topk  # keep one entry for an invalid index
    most = min(n, room) if pattern != "duplicates" else (room if n else 0)
    count = most - int(torch.randint(0, most // 2 + 1, (1,), generator=g)) if most else 0
    if pattern == "duplicates":
        chosen = candidates[torch.randint(0, n, (count,), generator=g)] if count else candidates[:0]
        if count >= 2:
            chosen[1] = chosen[0]
    else:
        chosen = candidates[torch.randperm(n, generator=g)[:count]]
    if pattern == "last_slot" and topk >= 1 and shared.numel():
        last = shared[-1:].to(torch.int64)
        chosen = torch.cat((last, chosen[chosen != last[0]]))[:max(count, 1)]
    places = _random_positions(topk, chosen.numel(), g)
    entries[places] = chosen
    if pattern == "with_invalid":
        free = torch.nonzero(entries < 0).flatten()
        bad = free[torch.rand(free.numel(), generator=g) < 0.5]
        if bad.numel() == 0 and free.numel():
            bad = free[:1]
        entries[bad] = _invalid_positive(bad.numel(), num_slots, page_size, g)
    return entries


def valid_entries(indices: torch.Tensor, num_slots: int) -> torch.Tensor:
    """The entries a query attends to: 0 <= index < num_slots."""
    return (indices >= 0) & (indices < num_slots)


def has_invalid_positive(indices: torch.Tensor, num_slots: int) -> bool:
    return bool((indices >= num_slots).any())


def compact_valid(indices: torch.Tensor, num_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(slots, valid) with each list's valid entries moved to the front in their order: slots
    int64 [..., topk] (0 where invalid), valid bool [..., topk] (a prefix)."""
    valid = valid_entries(indices, num_slots)
    order = torch.sort((~valid).to(torch.int8), dim=-1, stable=True).indices
    slots = torch.gather(torch.where(valid, indices.to(torch.int64), 0), -1, order)
    return slots, torch.gather(valid, -1, order)


def sink_values(kind: str, heads: int, typical_lse: float, g: torch.Generator) -> torch.Tensor | None:
    """float32 [heads] sinks for a case's SINKS choice (None for 'none')."""
    if kind == "none":
        return None
    finite = typical_lse + 2.0 * torch.randn(heads, generator=g, dtype=torch.float64)
    if kind == "finite":
        return finite.to(torch.float32)
    if kind != "infinite":
        raise ValueError(f"kind must be one of {list(SINKS)}; got {kind!r}")
    cycle = torch.tensor([math.inf, -math.inf, 0.0], dtype=torch.float64)[torch.arange(heads) % 3]
    return torch.where(cycle == 0, finite, cycle).to(torch.float32)


def sink_factor(lse: torch.Tensor, sink: torch.Tensor) -> torch.Tensor:
    """exp(lse) / (exp(lse) + exp(sink)) = 1 / (1 + exp(sink − lse)), float64, for lse [..., h]
    and sink [h]; 0 where the sink is +inf, 1 where it is -inf (a row with lse -inf gets 0: its
    output is 0 anyway)."""
    sink = sink.to(torch.float64).to(lse.device)
    shifted = torch.where(torch.isneginf(sink), -math.inf, sink - torch.where(torch.isfinite(lse), lse, 0.0))
    return torch.where(torch.isfinite(lse), torch.sigmoid(-shifted), torch.zeros_like(lse))
