"""RoPE bugs of a model port: a side left unrotated or rotated twice, the two pairings mixed, the
decode position shifted."""

from __future__ import annotations

from .common import EXAMPLE, TemplateMLA, rotate


class RopeOnQNotK(TemplateMLA):
    """RoPE applied to the query's rope part but not to the shared rope key (the key rotation lost
    when the rope key was split off the latent projection's output): scores then depend on the
    query's absolute position instead of the relative one."""

    def rope_k(self, k_pe, rotations):
        return k_pe  # BUG: the rope key is cached unrotated


class RopeTwiceOnCachedK(TemplateMLA):
    """The cached rope keys rotated again when they are read: the cache stores rotated keys, but the
    attention code was written for a cache of raw keys and rotates every cached key by its position
    before use, so a key at position t is rotated by 2t."""

    def cached(self, b, end):
        kv, pe = super().cached(b, end)
        return kv, rotate(pe, self.rotations[:end], self.args.rope_interleaved)  # BUG: second rotation


class RopeLayoutMixed(TemplateMLA):
    """The query rotated with the other pairing than the key: interleaved pairs (x_2j, x_2j+1) on one
    side and halves (x_j, x_j+d_r/2) on the other, as when a port converts a checkpoint's rope rows
    for HF's rotate_half on the key projection only. Indistinguishable at d_r = 2 (one pair); needs
    d_r ≥ 4."""

    def __init__(self, args, **kwargs):
        super().__init__(args, **kwargs)
        self.q_rope = EXAMPLE.Rotary(not args.rope_interleaved)  # BUG: the other layout on the query


class DecodePositionOffByOne(TemplateMLA):
    """Decode rotates the new tokens at position start_pos + 1 (1-based positions, or the new token
    counted into the cache length before its position is taken): every decoded token's query and
    key are rotated one step too far, and its cached key stays wrong for all later tokens."""

    def allocate(self, max_batch_size, max_seq_len):
        super().allocate(max_batch_size, max_seq_len + 1)

    def rotations_at(self, start_pos, end):
        if start_pos == 0:
            return self.rotations[:end]
        return self.rotations[start_pos + 1:end + 1]  # BUG: one position too far
