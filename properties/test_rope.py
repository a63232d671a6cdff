"""RoPE: DeepSeek's interleaved pairs ≡ HF's halves under the weight permutation, and scores depend
only on relative position.

Bound for the shift property, derived from float64 rounding: each angle θ = p·f errs by at most
u·|θ|, so cos/sin err by at most u·(|θ| + 1); a rotated pair then moves by ≤ 2u(|θ| + 1)·|x|, and
the d_r-term dot product adds γ_{d_r}. Hence |Δ(q·k)| ≤ (4u(θ_max + 1) + γ_{d_r})·|q||k|, doubled
because both positions (shifted and not) are rounded.
"""

import torch
from hypothesis import given, strategies as st

from mla_verify.reference import apply_rope, mla_forward, random_weights, rope_cos_sin, rope_inv_freq
from mla_verify.strategies import mla_configs

U64 = 2.0**-53


def _halves_permutation(d_r: int) -> torch.Tensor:
    """P = [even indices, then odd]: an interleaved pair (2j, 2j+1) becomes (j, j + d_r/2)."""
    return torch.cat((torch.arange(0, d_r, 2), torch.arange(1, d_r, 2)))


@given(config=mla_configs(), seed=st.integers(0, 2**31 - 1), seq=st.integers(1, 5), start=st.integers(0, 3000))
def test_interleaved_equals_halves_under_weight_permutation(config, seed, seq, start):
    interleaved = config.replace(rope_layout="interleaved")
    halves = config.replace(rope_layout="halves")
    g = torch.Generator().manual_seed(seed)
    weights = random_weights(interleaved, g)
    x = torch.randn(1, seq, config.hidden_size, generator=g, dtype=torch.float64)
    h, dn, dr = config.num_heads, config.qk_nope_head_dim, config.qk_rope_head_dim
    perm = _halves_permutation(dr)
    permuted = random_weights(halves, torch.Generator().manual_seed(seed))  # same shapes; overwritten below
    for name in ("wkv_a", "kv_norm", "wkv_b", "wo", "wq", "wq_a", "q_norm", "wq_b"):
        setattr(permuted, name, None if getattr(weights, name) is None else getattr(weights, name).clone())
    q_proj = "wq" if weights.wq is not None else "wq_b"
    per_head = getattr(permuted, q_proj).view(h, dn + dr, -1)
    per_head[:, dn:] = per_head[:, dn:][:, perm]
    permuted.wkv_a[config.kv_lora_rank:] = weights.wkv_a[config.kv_lora_rank:][perm]
    for mode in ("absorbed", "naive"):
        a = mla_forward(interleaved, weights, x, mode=mode)
        b = mla_forward(halves, permuted, x, mode=mode)
        error = float((a - b).norm() / a.norm().clamp_min(1e-300))
        assert error <= 1e-12, f"{mode}: interleaved vs permuted halves differ by {error:.3g} for {config}"


@given(config=mla_configs(), seed=st.integers(0, 2**31 - 1), positions=st.tuples(
    st.integers(0, 4096), st.integers(0, 4096)), shift=st.integers(-4096, 100_000))
def test_scores_depend_only_on_relative_position(config, seed, positions, shift):
    m, n = positions
    shift = max(shift, -min(m, n))
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(config.qk_rope_head_dim, generator=g, dtype=torch.float64)
    k = torch.randn(config.qk_rope_head_dim, generator=g, dtype=torch.float64)

    def score(p_q: int, p_k: int) -> float:
        cos, sin = rope_cos_sin(config, torch.tensor([p_q, p_k]))
        rq = apply_rope(q[None], cos[:1], sin[:1], config.rope_layout)[0]
        rk = apply_rope(k[None], cos[1:], sin[1:], config.rope_layout)[0]
        return float(rq @ rk)

    theta_max = float(max(m, n) + max(shift, 0)) * float(rope_inv_freq(config).max())
    cos, _ = rope_cos_sin(config, torch.tensor([0]))
    magnitude2 = float(cos.abs().max()) ** 2  # YaRN's cos/sin factor, squared by the two rotations
    d_r = config.qk_rope_head_dim
    bound = 2 * (4 * U64 * (theta_max + 1) + d_r * U64 / (1 - d_r * U64)) * float(q.norm() * k.norm()) * magnitude2
    a, b = score(m, n), score(m + shift, n + shift)
    assert abs(a - b) <= bound, f"score at ({m},{n}) {a!r} vs shifted by {shift} {b!r}: |Δ| {abs(a - b):.3g} > {bound:.3g}"
