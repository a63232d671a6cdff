"""Proof of the float64 reference against an independent computation in mpmath at 50 digits.

The mpmath side is written from the formulas (loops, no torch), on tiny cases: softmax and lse, the
paged decode core (permuted pages, causal s_q > 1, an empty row), and one whole small layer in both
modes (q-LoRA on and off, YaRN, both RoPE layouts). Agreement is required to a relative 1e-13:
float64 rounding over these few-term sums stays below 1e-14.
"""

import math

import mpmath
import pytest
import torch

from mla_verify.config import MLAConfig, YarnConfig
from mla_verify.reference import (attention_scores_softmax, mla_forward, paged_decode_reference, random_weights,
                                  rope_inv_freq)

mpmath.mp.dps = 50
TOLERANCE = 1e-13


def mp(x: torch.Tensor):
    return [mpmath.mpf(float(v)) for v in x.flatten().tolist()]


def mp_softmax_lse(scores):
    m = max(scores)
    total = mpmath.fsum(mpmath.exp(s - m) for s in scores)
    return [mpmath.exp(s - m) / total for s in scores], m + mpmath.log(total)


def assert_close(got: torch.Tensor, want, scale=None):
    want_t = torch.tensor([float(w) for w in want], dtype=torch.float64).view(got.shape)
    scale = scale if scale is not None else float(want_t.abs().max())
    error = float((got - want_t).abs().max())
    assert error <= TOLERANCE * max(scale, 1e-300), f"max error {error:.3g} vs scale {scale:.3g}"


def test_softmax_and_lse_match_mpmath():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(3, 7, generator=g, dtype=torch.float64) * 30
    visible = torch.ones_like(scores, dtype=torch.bool)
    p, lse = attention_scores_softmax(scores, visible)
    for row in range(3):
        want_p, want_lse = mp_softmax_lse(mp(scores[row]))
        assert_close(p[row], want_p, scale=1.0)
        assert abs(float(lse[row]) - float(want_lse)) <= TOLERANCE * abs(float(want_lse))


def test_softmax_of_a_row_with_no_visible_key_is_zero_with_lse_minus_infinity():
    p, lse = attention_scores_softmax(torch.randn(2, 4, dtype=torch.float64),
                                      torch.tensor([[False] * 4, [True, False, False, False]]))
    assert p[0].eq(0).all() and lse[0] == -math.inf
    assert p[1].tolist() == [1.0, 0.0, 0.0, 0.0] and lse[1] != -math.inf


def test_paged_decode_core_matches_mpmath():
    g = torch.Generator().manual_seed(2)
    b, s_q, h, d, dv, page = 3, 2, 2, 6, 4, 2
    lengths = [3, 0, 4]
    q = torch.randn(b, s_q, h, d, generator=g, dtype=torch.float64)
    num_blocks = 6
    kv = torch.full((num_blocks, page, 1, d), math.nan, dtype=torch.float64)
    block_table = torch.tensor([[4, 1, 2**31 - 1], [2**31 - 1] * 3, [0, 5, 2**31 - 1]], dtype=torch.int32)
    tokens = {}
    for row, length in enumerate(lengths):
        for t in range(length):
            vec = torch.randn(d, generator=g, dtype=torch.float64)
            kv[block_table[row, t // page], t % page, 0] = vec
            tokens[row, t] = vec
    scale = 0.37
    for causal in (False, True):
        out, lse = paged_decode_reference(q, kv, block_table, torch.tensor(lengths, dtype=torch.int32), dv, scale,
                                          causal)
        for row, length in enumerate(lengths):
            for i in range(s_q):
                limit = length - s_q + i + 1 if causal else length
                for head in range(h):
                    if limit <= 0:
                        assert out[row, i, head].eq(0).all() and lse[row, head, i] == -math.inf
                        continue
                    qv = mp(q[row, i, head])
                    keys = [mp(tokens[row, t]) for t in range(limit)]
                    scores = [mpmath.fsum(a * b for a, b in zip(qv, k)) * mpmath.mpf(scale) for k in keys]
                    p, want_lse = mp_softmax_lse(scores)
                    want_out = [mpmath.fsum(p[t] * keys[t][c] for t in range(limit)) for c in range(dv)]
                    assert_close(out[row, i, head], want_out, scale=max(abs(float(x)) for k in keys for x in k))
                    assert abs(float(lse[row, head, i]) - float(want_lse)) <= TOLERANCE * max(1, abs(float(want_lse)))


# --- one whole layer -------------------------------------------------------------------------

def mp_rms_norm(x, w, eps):
    rms = mpmath.sqrt(mpmath.fsum(v * v for v in x) / len(x) + mpmath.mpf(eps))
    return [v / rms * wi for v, wi in zip(x, w)]


def mp_matvec(W: torch.Tensor, x):
    rows = W.shape[0]
    Wm = mp(W)
    n = len(x)
    return [mpmath.fsum(Wm[r * n + j] * x[j] for j in range(n)) for r in range(rows)]


def mp_rope(x, pos, inv_freq, layout, magnitude):
    half = len(x) // 2
    out = list(x)
    for j in range(half):
        angle = pos * inv_freq[j]
        c, s = mpmath.cos(angle) * magnitude, mpmath.sin(angle) * magnitude
        a, b = (2 * j, 2 * j + 1) if layout == "interleaved" else (j, j + half)
        out[a] = x[a] * c - x[b] * s
        out[b] = x[b] * c + x[a] * s
    return out


def mp_yarn_m(factor, mscale):
    return mpmath.mpf(1) if factor <= 1 else mpmath.mpf("0.1") * mpmath.mpf(mscale) * mpmath.log(factor) + 1


def mp_inv_freq(config: MLAConfig):
    """DeepSeek's precompute_freqs_cis, YaRN ramp included, in mpmath."""
    dim, base = config.qk_rope_head_dim, mpmath.mpf(config.rope_theta)
    freqs = [1 / base ** (mpmath.mpf(i) / dim) for i in range(0, dim, 2)]
    yarn = config.yarn
    if yarn is None or yarn.factor <= 1:
        return freqs

    def correction_dim(rotations):
        return dim * mpmath.log(yarn.original_max_position_embeddings / (rotations * 2 * mpmath.pi)) / (
            2 * mpmath.log(base))

    low = max(int(mpmath.floor(correction_dim(yarn.beta_fast))), 0)
    high = min(int(mpmath.ceil(correction_dim(yarn.beta_slow))), dim - 1)
    high = high + mpmath.mpf("0.001") if low == high else high
    out = []
    for j, f in enumerate(freqs):
        ramp = min(max((j - low) / mpmath.mpf(high - low), 0), 1)
        out.append(f / yarn.factor * ramp + f * (1 - ramp))
    return out


def mp_layer(config: MLAConfig, weights, x: torch.Tensor):
    """Naive MHA-form MLA written from the formulas, causal, positions 0..s-1."""
    h, dn, dr, dv, dc = (config.num_heads, config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim,
                         config.kv_lora_rank)
    inv_freq = mp_inv_freq(config)
    eps = config.rms_norm_eps
    scale = 1 / mpmath.sqrt(dn + dr)
    magnitude = mpmath.mpf(1)
    if config.yarn is not None:
        scale *= mp_yarn_m(config.yarn.factor, config.yarn.mscale_all_dim) ** 2
        magnitude = mp_yarn_m(config.yarn.factor, config.yarn.mscale) / mp_yarn_m(config.yarn.factor,
                                                                                 config.yarn.mscale_all_dim)
    seq = x.shape[1]
    outputs = []
    keys, values = [], []
    qs = []
    for t in range(seq):
        xt = mp(x[0, t])
        if weights.wq is not None:
            q = mp_matvec(weights.wq, xt)
        else:
            q = mp_matvec(weights.wq_b, mp_rms_norm(mp_matvec(weights.wq_a, xt), mp(weights.q_norm), eps))
        kv = mp_matvec(weights.wkv_a, xt)
        c = mp_rms_norm(kv[:dc], mp(weights.kv_norm), eps)
        k_pe = mp_rope(kv[dc:], t, inv_freq, config.rope_layout, magnitude)
        expanded = mp_matvec(weights.wkv_b, c)  # [h·(dn+dv)]
        keys.append([expanded[hh * (dn + dv):hh * (dn + dv) + dn] + k_pe for hh in range(h)])
        values.append([expanded[hh * (dn + dv) + dn:(hh + 1) * (dn + dv)] for hh in range(h)])
        qs.append([q[hh * (dn + dr):hh * (dn + dr) + dn]
                   + mp_rope(q[hh * (dn + dr) + dn:(hh + 1) * (dn + dr)], t, inv_freq, config.rope_layout, magnitude)
                   for hh in range(h)])
    for t in range(seq):
        heads_out = []
        for hh in range(h):
            scores = [mpmath.fsum(a * b for a, b in zip(qs[t][hh], keys[u][hh])) * scale for u in range(t + 1)]
            p, _ = mp_softmax_lse(scores)
            heads_out += [mpmath.fsum(p[u] * values[u][hh][c] for u in range(t + 1)) for c in range(dv)]
        outputs.append(mp_matvec(weights.wo, heads_out))
    return [v for row in outputs for v in row]


@pytest.mark.parametrize("q_lora, layout, yarn", [
    (None, "interleaved", None),
    (5, "halves", None),
    (4, "interleaved", YarnConfig(factor=40.0, original_max_position_embeddings=4, mscale=0.707,
                                  mscale_all_dim=0.707)),
])
def test_whole_layer_matches_mpmath_in_both_modes(q_lora, layout, yarn):
    config = MLAConfig("tiny", hidden_size=6, num_heads=2, q_lora_rank=q_lora, kv_lora_rank=4, qk_nope_head_dim=3,
                       qk_rope_head_dim=4, v_head_dim=3, rope_layout=layout, yarn=yarn)
    g = torch.Generator().manual_seed(3)
    weights = random_weights(config, g)
    x = torch.randn(1, 4, config.hidden_size, generator=g, dtype=torch.float64)
    want = mp_layer(config, weights, x)
    for mode in ("naive", "absorbed"):
        got = mla_forward(config, weights, x, mode=mode)
        assert_close(got, want)


@pytest.mark.parametrize("yarn", [None, YarnConfig(factor=40.0, original_max_position_embeddings=4096),
                                  YarnConfig(factor=8.0, original_max_position_embeddings=64, beta_fast=16)])
def test_rope_frequencies_match_mpmath(yarn):
    config = MLAConfig("rope", hidden_size=4, num_heads=1, q_lora_rank=None, kv_lora_rank=4, qk_nope_head_dim=2,
                       qk_rope_head_dim=64, v_head_dim=2, yarn=yarn)
    assert_close(rope_inv_freq(config), mp_inv_freq(config))


def test_mpmath_layer_would_catch_a_wrong_scale():
    """The comparison can fail: a 0.5 % scale change is far outside the tolerance."""
    config = MLAConfig("tiny", hidden_size=6, num_heads=2, q_lora_rank=None, kv_lora_rank=4, qk_nope_head_dim=3,
                       qk_rope_head_dim=4, v_head_dim=3)
    g = torch.Generator().manual_seed(4)
    weights = random_weights(config, g)
    x = torch.randn(1, 3, 6, generator=g, dtype=torch.float64)
    want = mp_layer(config.replace(yarn=YarnConfig(factor=1.0001, original_max_position_embeddings=4,
                                                    mscale_all_dim=100.0)), weights, x)
    with pytest.raises(AssertionError):
        assert_close(mla_forward(config, weights, x), want)
