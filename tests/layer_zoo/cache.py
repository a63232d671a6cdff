"""Cache bugs of a model port: the order of writing and reading, and what is written."""

from __future__ import annotations

from .common import TemplateMLA


class AppendedAfterAttention(TemplateMLA):
    """Decode attends before the new tokens are written to the cache: the attention reads the cache
    up to the new length, whose last slots still hold what the buffer held (zeros of a fresh
    allocation, another sequence's rows in a reused one), and the new latents are written
    afterwards. Prefill attends over its own keys and is right."""

    def forward(self, x, start_pos):
        if start_pos == 0:
            return super().forward(x, 0)
        b, s, _ = x.shape
        rotations = self.rotations_at(start_pos, start_pos + s)
        q_nope, q_pe = self.query(x, rotations)
        latent, k_pe = self.keys(x, rotations, start_pos)
        kv, pe = (t.clone() for t in self.cached(b, start_pos + s))  # BUG: read before the write below
        self.store(latent, k_pe, start_pos)
        return self.output(self.attend(q_nope, q_pe, kv, pe, start_pos, self.decode_path))


class KvNormSkippedInDecode(TemplateMLA):
    """kv_a_layernorm applied in prefill but not in decode: the decode path, written separately for
    the absorbed form, caches the raw latent x·W_DKV[:d_c] for the new tokens."""

    def normalise(self, latent, start_pos):
        if start_pos > 0:
            return latent  # BUG: no RMSNorm on the decode path
        return self.kv_norm(latent)
