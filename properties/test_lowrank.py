"""Low-rank properties: Eckart–Young, GQA as MLA, and the joint-SVD MHA/GQA → MLA conversion's bound.

Strategies draw a small case description (shapes, rank, seed, ...), never tensors; `build()` makes
the tensors from the seed with an explicit torch.Generator, so a failure shrinks to a readable case
and its repr is the repro: `MatrixCase(...).build()` or `AttentionCase(...).build()`.
Sizes stay tiny (matrices ≤ 8×8, L ≤ 8) so each example takes about a millisecond.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from hypothesis import given, target
from hypothesis import strategies as st

from mla_verify.lowrank import (
    EXACT_RTOL,
    SVD_RTOL,
    LowRankFactors,
    check_eckart_young,
    check_no_better_than_optimal,
    conversion_error_bound,
    convert_to_mla,
    frobenius_error,
    gqa_as_mla,
    gqa_attention,
    mla_attention,
    relative_error,
    spectral_error,
    truncated_svd,
)

F64 = torch.float64
MAX_SIDE = 8
SEEDS = st.integers(0, 2**32 - 1)

# --- strategies ---------------------------------------------------------------------------------

# gaussian: a plain random matrix; geometric: σ_i = 2^-i; tied: all σ equal, so σ_r = σ_{r+1} and
# the truncation is not unique; rank_deficient: the trailing half of the σ are exactly 0.
SPECTRA = ("gaussian", "geometric", "tied", "rank_deficient")


def _orthonormal_columns(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=F64)).Q


@dataclass(frozen=True)
class MatrixCase:
    m: int
    n: int
    rank: int
    spectrum: str
    magnitude: int  # W is scaled by 10**magnitude
    seed: int

    def build(self) -> torch.Tensor:
        """W: [m, n], float64."""
        gen = torch.Generator().manual_seed(self.seed)
        k = min(self.m, self.n)
        if self.spectrum == "gaussian":
            w = torch.randn(self.m, self.n, generator=gen, dtype=F64)
        else:
            sigma = {"geometric": 2.0 ** -torch.arange(k, dtype=F64),
                     "tied": torch.ones(k, dtype=F64),
                     "rank_deficient": (torch.arange(k) < (k + 1) // 2).to(F64)}[self.spectrum]
            u, v = _orthonormal_columns(self.m, k, gen), _orthonormal_columns(self.n, k, gen)
            w = torch.einsum("ic,c,oc->io", u, sigma, v)
        return w * 10.0 ** self.magnitude


@st.composite
def matrix_cases(draw: st.DrawFn) -> MatrixCase:
    m = draw(st.integers(1, MAX_SIDE), label="m")
    n = draw(st.integers(1, MAX_SIDE), label="n")
    return MatrixCase(m=m, n=n, rank=draw(st.integers(1, min(m, n)), label="rank"),
                      spectrum=draw(st.sampled_from(SPECTRA), label="spectrum"),
                      magnitude=draw(st.integers(-4, 4), label="magnitude"), seed=draw(SEEDS, label="seed"))


@dataclass(frozen=True)
class AttentionCase:
    num_kv_heads: int  # g
    heads_per_group: int  # h / g
    head_dim: int  # d_h
    d_model: int  # D
    length: int  # L key tokens
    s_q: int  # S queries
    rank: int  # r, 1 … min(2*g*d_h, D)
    causal: bool
    query_gain: float  # multiplies q: 0 = uniform softmax, large = near-argmax
    seed: int

    @property
    def num_heads(self) -> int:
        return self.num_kv_heads * self.heads_per_group

    @property
    def full_rank(self) -> int:
        return min(2 * self.num_kv_heads * self.head_dim, self.d_model)

    @property
    def scale(self) -> float:
        return self.head_dim ** -0.5

    def build(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [L, D], q: [S, h, d_h], w_k and w_v: [g*d_h, D], all float64."""
        gen = torch.Generator().manual_seed(self.seed)
        rows = self.num_kv_heads * self.head_dim
        # weights at 1/√D keep k and v of unit size, so the query gain alone sets the softmax's peakiness
        w_k = torch.randn(rows, self.d_model, generator=gen, dtype=F64) / math.sqrt(self.d_model)
        w_v = torch.randn(rows, self.d_model, generator=gen, dtype=F64) / math.sqrt(self.d_model)
        x = torch.randn(self.length, self.d_model, generator=gen, dtype=F64)
        q = self.query_gain * torch.randn(self.s_q, self.num_heads, self.head_dim, generator=gen, dtype=F64)
        return x, q, w_k, w_v


@st.composite
def attention_cases(draw: st.DrawFn, full_rank: bool = False) -> AttentionCase:
    g = draw(st.integers(1, 3), label="num_kv_heads")
    d_h = draw(st.integers(1, 4), label="head_dim")
    d_model = draw(st.integers(1, 12), label="d_model")
    length = draw(st.integers(1, 8), label="length")
    top = min(2 * g * d_h, d_model)
    return AttentionCase(
        num_kv_heads=g, heads_per_group=draw(st.integers(1, 3), label="heads_per_group"), head_dim=d_h,
        d_model=d_model, length=length, s_q=draw(st.integers(1, min(length, 3)), label="s_q"),
        rank=top if full_rank else draw(st.integers(1, top), label="rank"),
        causal=draw(st.booleans(), label="causal"),
        query_gain=draw(st.floats(0.0, 16.0, allow_nan=False), label="query_gain"),
        seed=draw(SEEDS, label="seed"))


# --- Eckart–Young–Mirsky ---------------------------------------------------------------------------


@given(case=matrix_cases())
def test_truncated_svd_attains_eckart_young(case: MatrixCase) -> None:
    w = case.build()
    check_eckart_young(w, truncated_svd(w, case.rank), case=repr(case))


@given(case=matrix_cases(), factor_seed=SEEDS, gain=st.integers(-3, 3))
def test_no_random_rank_r_matrix_does_better(case: MatrixCase, factor_seed: int, gain: int) -> None:
    w = case.build()
    gen = torch.Generator().manual_seed(factor_seed)
    size = 10.0 ** (case.magnitude + gain)
    factors = LowRankFactors(down=torch.randn(case.rank, case.n, generator=gen, dtype=F64),
                             up=size * torch.randn(case.m, case.rank, generator=gen, dtype=F64))
    check_no_better_than_optimal(w, factors, case=f"{case!r}, random A·B from seed {factor_seed}, gain 10^{gain}")


@given(case=matrix_cases(), factor_seed=SEEDS, log_eta=st.integers(-10, 0))
def test_perturbed_optimum_does_no_better(case: MatrixCase, factor_seed: int, log_eta: int) -> None:
    # The optimum is stationary, so small perturbations raise the error only to second order: the
    # hardest competitors for the checker's slack.
    w = case.build()
    best = truncated_svd(w, case.rank)
    gen = torch.Generator().manual_seed(factor_seed)
    eta = 10.0 ** log_eta
    size = 10.0 ** case.magnitude
    factors = LowRankFactors(down=best.down + eta * torch.randn(best.down.shape, generator=gen, dtype=F64),
                             up=best.up + eta * size * torch.randn(best.up.shape, generator=gen, dtype=F64))
    check_no_better_than_optimal(w, factors, case=f"{case!r}, optimum perturbed by 10^{log_eta}, seed {factor_seed}")


@given(case=matrix_cases())
def test_truncation_error_monotone_in_rank_and_zero_at_full_rank(case: MatrixCase) -> None:
    w = case.build()
    full = min(case.m, case.n)
    slack = SVD_RTOL * torch.linalg.matrix_norm(w, ord=2).item()
    errors = [(spectral_error(w, f), frobenius_error(w, f)) for f in (truncated_svd(w, r) for r in range(1, full + 1))]
    for r in range(1, full):
        for norm, before, after in zip(("spectral", "Frobenius"), errors[r - 1], errors[r]):
            assert after <= before + slack, (
                f"{norm} error rose with rank: {before!r} at r={r}, {after!r} at r={r + 1} "
                f"(slack {slack:.3e}); case: {case!r}")
    assert max(errors[-1]) <= slack, (
        f"full-rank (r={full}) truncation errors {errors[-1]} exceed 0 + slack {slack:.3e}; case: {case!r}")


# --- GQA as MLA and the conversion ------------------------------------------------------------------


@given(scores_seed=SEEDS, length=st.integers(1, 8), shift_gain=st.floats(0.0, 50.0, allow_nan=False))
def test_softmax_shift_lemma(scores_seed: int, length: int, shift_gain: float) -> None:
    # Step 3 of conversion_error_bound's derivation: ‖softmax(s + δ) − softmax(s)‖₁ ≤ range(δ)/2 for any δ.
    gen = torch.Generator().manual_seed(scores_seed)
    scores = 4 * torch.randn(length, generator=gen, dtype=F64)
    delta = shift_gain * torch.randn(length, generator=gen, dtype=F64)
    observed = (torch.softmax(scores + delta, -1) - torch.softmax(scores, -1)).abs().sum().item()
    bound = min(2.0, (delta.max() - delta.min()).item() / 2)
    assert observed <= bound + EXACT_RTOL, (
        f"‖Δp‖₁ = {observed!r} > min(2, range(δ)/2) = {bound!r}; "
        f"scores seed {scores_seed}, L={length}, shift gain {shift_gain!r}")


@given(case=attention_cases())
def test_gqa_embeds_exactly_into_mla(case: AttentionCase) -> None:
    x, q, w_k, w_v = case.build()
    source = gqa_attention(x, q, w_k, w_v, case.num_kv_heads, case.scale, case.causal)
    weights = gqa_as_mla(w_k, w_v, case.num_heads, case.num_kv_heads, case.head_dim)
    assert weights.kv_lora_rank == 2 * case.num_kv_heads * case.head_dim, (
        f"d_c = {weights.kv_lora_rank}, expected 2·g·d_h = {2 * case.num_kv_heads * case.head_dim}; case: {case!r}")
    error = relative_error(mla_attention(x, q, weights, case.scale, case.causal), source)
    assert error <= EXACT_RTOL, f"GQA as MLA: relative error {error:.3e} > {EXACT_RTOL:.0e}; case: {case!r}"


@given(case=attention_cases())
def test_conversion_error_within_derived_bound(case: AttentionCase) -> None:
    x, q, w_k, w_v = case.build()
    conversion = convert_to_mla(w_k, w_v, case.num_heads, case.num_kv_heads, case.head_dim, case.rank)
    source = gqa_attention(x, q, w_k, w_v, case.num_kv_heads, case.scale, case.causal)
    converted = mla_attention(x, q, conversion.weights, case.scale, case.causal)
    observed = torch.linalg.vector_norm(converted - source, dim=-1)  # [S, h]
    bound = conversion_error_bound(x, q, w_v, case.num_kv_heads, conversion.sigma_tail_with_rounding, case.scale)
    ratio = observed / bound
    worst = int(ratio.argmax())
    s, h = divmod(worst, case.num_heads)
    assert (observed <= bound).all(), (
        f"‖o' − o‖ = {observed[s, h].item()!r} > bound {bound[s, h].item()!r} at query {s}, head {h} "
        f"(σ_r+1 = {conversion.sigma_tail!r}); case: {case!r}")
    target(ratio.max().item(), label="observed/bound")


@given(case=attention_cases(full_rank=True))
def test_full_rank_conversion_reproduces_source(case: AttentionCase) -> None:
    x, q, w_k, w_v = case.build()
    conversion = convert_to_mla(w_k, w_v, case.num_heads, case.num_kv_heads, case.head_dim, case.rank)
    assert conversion.sigma_tail == 0.0, (
        f"σ_r+1 at full rank r={case.rank}: {conversion.sigma_tail!r}, expected 0; case: {case!r}")
    source = gqa_attention(x, q, w_k, w_v, case.num_kv_heads, case.scale, case.causal)
    error = relative_error(mla_attention(x, q, conversion.weights, case.scale, case.causal), source)
    assert error <= EXACT_RTOL, f"full-rank conversion: relative error {error:.3e} > {EXACT_RTOL:.0e}; case: {case!r}"
