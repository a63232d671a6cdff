"""Run-to-run nondeterminism in a kernel that declares itself deterministic."""

from __future__ import annotations

import itertools

import torch

from mla_verify.decode.contract import validate_decode_inputs

from .common import finish, gather, masked_softmax, qk, visible_mask

NUM_SPLITS = 4
_calls = itertools.count()


def atomic_split_accumulation(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=False):
    """Split-K P·V whose per-split partial outputs are added into the output with float32 atomicAdd,
    so the summation order is whichever split finishes first: results differ in the last bits run
    to run, while the kernel keeps the default `deterministic=True` claim. Here the arrival order
    flips between first-to-last and last-to-first on every call (a stand-in for the scheduler), so
    two consecutive calls never add the splits in the same order."""
    validate_decode_inputs(q, kv_cache, block_table, cache_seqlens, head_dim_v)
    keys, valid, positions = gather(kv_cache, block_table, cache_seqlens)
    visible = visible_mask(valid, positions, cache_seqlens, q.shape[1], causal)
    p, lse = masked_softmax(qk(q, keys) * softmax_scale, visible)
    chunks = torch.arange(p.shape[-1]) % NUM_SPLITS  # key t goes to split t mod NUM_SPLITS
    partials = [torch.einsum("bsht,btc->bshc", p * (chunks == i), keys[..., :head_dim_v])
                for i in range(NUM_SPLITS)]
    arrival = partials if next(_calls) % 2 == 0 else partials[::-1]
    out = torch.zeros_like(partials[0])
    for partial in arrival:  # BUG: accumulation order depends on arrival order
        out = out + partial
    return finish(out, lse, q)
