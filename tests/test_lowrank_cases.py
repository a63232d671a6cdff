"""Hand-derived checks of mla_verify.lowrank, checks that its checkers reject wrong answers, and its
input validation."""

from __future__ import annotations

import math

import pytest
import torch

from mla_verify import lowrank
from mla_verify.lowrank import (
    EXACT_RTOL,
    LowRankFactors,
    MLAWeights,
    check_eckart_young,
    check_no_better_than_optimal,
    conversion_error_bound,
    convert_to_mla,
    frobenius_error,
    gqa_as_mla,
    gqa_attention,
    mla_attention,
    optimal_errors,
    relative_error,
    spectral_error,
    truncated_svd,
)

F64 = torch.float64
DIAG_531 = torch.diag(torch.tensor([5.0, 3.0, 1.0], dtype=F64))


def _assert_close(observed: float, expected: float, what: str) -> None:
    assert abs(observed - expected) <= EXACT_RTOL * max(1.0, abs(expected)), (
        f"{what}: observed {observed!r}, expected {expected!r}")


# --- Eckart–Young by hand ---------------------------------------------------------------------------


def test_diag_531_rank_1_errors_are_3_and_sqrt_10() -> None:
    factors = truncated_svd(DIAG_531, 1)
    assert factors.up.shape == (3, 1) and factors.down.shape == (1, 3), (
        f"up {list(factors.up.shape)}, down {list(factors.down.shape)}; expected [3, 1] and [1, 3]")
    expected = torch.diag(torch.tensor([5.0, 0.0, 0.0], dtype=F64))
    assert torch.allclose(factors.matrix(), expected, rtol=0, atol=EXACT_RTOL), (
        f"rank-1 truncation of diag(5,3,1): {factors.matrix().tolist()}, expected diag(5,0,0)")
    _assert_close(spectral_error(DIAG_531, factors), 3.0, "spectral error")
    _assert_close(frobenius_error(DIAG_531, factors), math.sqrt(10.0), "Frobenius error")
    check_eckart_young(DIAG_531, factors, case="diag(5,3,1), r=1")


def test_diag_531_optimal_errors_per_rank() -> None:
    for rank, expected in ((1, (3.0, math.sqrt(10.0))), (2, (1.0, 1.0)), (3, (0.0, 0.0))):
        observed = optimal_errors(DIAG_531, rank)
        for what, obs, exp in zip(("σ_r+1", "tail norm"), observed, expected):
            _assert_close(obs, exp, f"diag(5,3,1), r={rank}, {what}")


def test_checker_rejects_the_wrong_singular_direction() -> None:
    # keeping σ_2 = 3 instead of σ_1 = 5: errors 5 and sqrt(26), not 3 and sqrt(10)
    wrong = LowRankFactors(down=torch.tensor([[0.0, 1.0, 0.0]], dtype=F64),
                           up=torch.tensor([[0.0], [3.0], [0.0]], dtype=F64))
    with pytest.raises(AssertionError, match=r"spectral error of a rank-1 truncation: observed 5\.0, expected 3\.0"):
        check_eckart_young(DIAG_531, wrong, case="diag(5,3,1) keeping σ_2")


def test_checker_rejects_a_truncation_missing_its_scale() -> None:
    # up = U_r without Σ_r: the best direction at the wrong size
    best = truncated_svd(DIAG_531, 1)
    with pytest.raises(AssertionError, match="observed 4.0, expected 3.0"):
        check_eckart_young(DIAG_531, LowRankFactors(down=best.down, up=best.up / 5.0), case="up without Σ")


def test_better_than_optimal_checker_catches_an_off_by_one_optimum(monkeypatch: pytest.MonkeyPatch) -> None:
    # If the optimum were σ_r (an off-by-one), the true truncation would "beat" it: the checker must say so.
    def off_by_one(w: torch.Tensor, rank: int) -> tuple[float, float]:
        sigma = torch.linalg.svdvals(w)
        return sigma[rank - 1].item(), torch.linalg.vector_norm(sigma[rank - 1:]).item()

    monkeypatch.setattr(lowrank, "optimal_errors", off_by_one)
    with pytest.raises(AssertionError, match=r"beats Eckart–Young in the spectral norm: observed 3\.0 < optimum 5\."):
        check_no_better_than_optimal(DIAG_531, truncated_svd(DIAG_531, 1), case="off-by-one optimum")


def test_truncated_svd_accepts_ties() -> None:
    # σ_1 = σ_2: either direction is optimal, the errors are the same
    w = torch.eye(2, dtype=F64)
    factors = truncated_svd(w, 1)
    _assert_close(spectral_error(w, factors), 1.0, "spectral error of eye(2), r=1")
    _assert_close(frobenius_error(w, factors), 1.0, "Frobenius error of eye(2), r=1")


# --- GQA as MLA by hand -----------------------------------------------------------------------------


def test_gqa_g1_h2_weights_and_output_by_hand() -> None:
    # g=1, h=2, d_h=1, D=2: k_t = x_t,0, v_t = 2·x_t,1, both heads share the group
    w_k = torch.tensor([[1.0, 0.0]], dtype=F64)
    w_v = torch.tensor([[0.0, 2.0]], dtype=F64)
    weights = gqa_as_mla(w_k, w_v, num_heads=2, num_kv_heads=1, head_dim=1)
    assert torch.equal(weights.w_dkv, torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=F64)), f"W_DKV: {weights.w_dkv}"
    assert torch.equal(weights.w_uk, torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]]], dtype=F64)), f"W_UK: {weights.w_uk}"
    assert torch.equal(weights.w_uv, torch.tensor([[[0.0, 1.0]], [[0.0, 1.0]]], dtype=F64)), f"W_UV: {weights.w_uv}"

    # tokens e_0, e_1: keys (1, 0), values (0, 2); queries +1 and −1, scale 1
    x = torch.eye(2, dtype=F64)
    q = torch.tensor([[[1.0], [-1.0]]], dtype=F64)
    e = math.e
    expected = torch.tensor([[[2 / (e + 1)], [2 * e / (e + 1)]]], dtype=F64)
    for name, out in (("GQA", gqa_attention(x, q, w_k, w_v, 1, 1.0)), ("MLA", mla_attention(x, q, weights, 1.0))):
        assert relative_error(out, expected) <= EXACT_RTOL, (
            f"{name} output {out.flatten().tolist()}, expected {expected.flatten().tolist()}")


def test_gqa_head_to_group_mapping_g2_h4() -> None:
    # heads 0, 1 read group 0 and heads 2, 3 read group 1 (HF's repeat_kv order), d_h = 2
    w_k = torch.arange(8.0, dtype=F64).reshape(4, 2)
    weights = gqa_as_mla(w_k, -w_k, num_heads=4, num_kv_heads=2, head_dim=2)
    key_column = weights.w_uk.argmax(dim=-1)[:, 0].tolist()  # where each head's first key row reads the latent
    value_column = weights.w_uv.argmax(dim=-1)[:, 0].tolist()
    assert key_column == [0, 0, 2, 2], f"key selector columns per head: {key_column}, expected [0, 0, 2, 2]"
    assert value_column == [4, 4, 6, 6], f"value selector columns per head: {value_column}, expected [4, 4, 6, 6]"


def test_swapped_selectors_are_caught() -> None:
    # The embedding check must fail for a wrong head mapping: give each head the other group.
    gen = torch.Generator().manual_seed(0)
    w_k, w_v = (torch.randn(4, 5, generator=gen, dtype=F64) for _ in range(2))
    x = torch.randn(6, 5, generator=gen, dtype=F64)
    q = torch.randn(2, 2, 2, generator=gen, dtype=F64)
    right = gqa_as_mla(w_k, w_v, num_heads=2, num_kv_heads=2, head_dim=2)
    swapped = MLAWeights(w_dkv=right.w_dkv, w_uk=right.w_uk.flip(0), w_uv=right.w_uv.flip(0))
    source = gqa_attention(x, q, w_k, w_v, 2, 0.5)
    error = relative_error(mla_attention(x, q, right, 0.5), source)
    assert error <= EXACT_RTOL, f"right head mapping: relative error {error:.3e} > {EXACT_RTOL:.0e}"
    error = relative_error(mla_attention(x, q, swapped, 0.5), source)
    assert error > EXACT_RTOL, f"swapped head mapping passed: relative error {error:.3e} ≤ {EXACT_RTOL:.0e}"


# --- the conversion and its bound by hand ----------------------------------------------------------


def test_bound_is_attained_by_a_dropped_value_direction() -> None:
    # [W_K; W_V] = diag(3, 1): rank 1 keeps the key and drops the value (σ_2 = 1). One token x = (0, 2):
    # v = 2, v' = 0, so ‖o' − o‖ = 2 = σ_2·‖x‖, and the softmax term vanishes (one key).
    w_k = torch.tensor([[3.0, 0.0]], dtype=F64)
    w_v = torch.tensor([[0.0, 1.0]], dtype=F64)
    conversion = convert_to_mla(w_k, w_v, num_heads=1, num_kv_heads=1, head_dim=1, rank=1)
    _assert_close(conversion.sigma_tail, 1.0, "σ_2 of diag(3, 1)")
    x = torch.tensor([[0.0, 2.0]], dtype=F64)
    q = torch.tensor([[[0.7]]], dtype=F64)
    observed = (mla_attention(x, q, conversion.weights, 1.0) - gqa_attention(x, q, w_k, w_v, 1, 1.0)).abs().item()
    bound = conversion_error_bound(x, q, w_v, 1, conversion.sigma_tail, 1.0).item()
    _assert_close(observed, 2.0, "‖o' − o‖")
    _assert_close(bound, 2.0, "bound")


def test_bound_formula_by_hand() -> None:
    # two tokens, g=1, d_h=1, D=2: X = max(‖(3,4)‖, ‖(0,1)‖) = 5, values w_v·x = (3+4, 1) → diam 6;
    # σ = 0.1, scale 0.5, ‖q‖ = 2 → ε = 0.5·2·0.1·5 = 0.5; bound = 0.1·5 + ½·0.5·6 = 2.0
    x = torch.tensor([[3.0, 4.0], [0.0, 1.0]], dtype=F64)
    w_v = torch.tensor([[1.0, 1.0]], dtype=F64)
    q = torch.tensor([[[2.0]]], dtype=F64)
    _assert_close(conversion_error_bound(x, q, w_v, 1, 0.1, 0.5).item(), 2.0, "bound")
    # a large ε saturates the softmax term at ‖Δp‖₁ ≤ 2: bound = 10·5 + ½·2·6 = 56
    _assert_close(conversion_error_bound(x, q, w_v, 1, 10.0, 0.5).item(), 56.0, "saturated bound")


def test_bound_rejects_an_unscaled_up_projection() -> None:
    # A conversion that forgets Σ_r in up = U_r·Σ_r must break the bound.
    gen = torch.Generator().manual_seed(1)
    w_k, w_v = (torch.randn(4, 6, generator=gen, dtype=F64) for _ in range(2))
    x = torch.randn(5, 6, generator=gen, dtype=F64)
    q = torch.randn(1, 4, 2, generator=gen, dtype=F64)
    conversion = convert_to_mla(w_k, w_v, num_heads=4, num_kv_heads=2, head_dim=2, rank=6)
    sigma = conversion.singular_values[:6]
    unscaled = MLAWeights(w_dkv=conversion.weights.w_dkv, w_uk=conversion.weights.w_uk / sigma,
                          w_uv=conversion.weights.w_uv / sigma)
    source = gqa_attention(x, q, w_k, w_v, 2, 0.5)
    bound = conversion_error_bound(x, q, w_v, 2, conversion.sigma_tail_with_rounding, 0.5)
    good = torch.linalg.vector_norm(mla_attention(x, q, conversion.weights, 0.5) - source, dim=-1)
    bad = torch.linalg.vector_norm(mla_attention(x, q, unscaled, 0.5) - source, dim=-1)
    assert (good <= bound).all(), f"correct conversion: {good.tolist()} vs bound {bound.tolist()}"
    assert (bad > bound).any(), f"unscaled up-projection within the bound: {bad.tolist()} vs {bound.tolist()}"


def test_full_rank_conversion_has_zero_tail() -> None:
    w_k, w_v = torch.eye(2, 3, dtype=F64), torch.ones(2, 3, dtype=F64)
    conversion = convert_to_mla(w_k, w_v, num_heads=2, num_kv_heads=1, head_dim=2, rank=3)
    assert conversion.sigma_tail == 0.0, f"σ_r+1 at full rank: {conversion.sigma_tail!r}, expected 0"
    assert conversion.weights.kv_lora_rank == 3, f"d_c = {conversion.weights.kv_lora_rank}, expected r = 3"


# --- input validation ---------------------------------------------------------------------------------

W = torch.ones(3, 4, dtype=F64)
WK = torch.ones(4, 5, dtype=F64)  # g=2, d_h=2, D=5
X = torch.ones(3, 5, dtype=F64)
Q = torch.ones(2, 4, 2, dtype=F64)  # S=2, h=4, d_h=2
GOOD = gqa_as_mla(WK, WK, 4, 2, 2)

BAD_CALLS = [  # (id, call, error, message)
    ("rank 0", lambda: truncated_svd(W, 0), ValueError, r"rank: expected an int in \[1, 3\]"),
    ("rank > min(m, n)", lambda: truncated_svd(W, 4), ValueError, r"rank: expected an int in \[1, 3\].*got 4"),
    ("rank not an int", lambda: truncated_svd(W, 1.0), TypeError, r"rank: expected an int"),
    ("rank a bool", lambda: truncated_svd(W, True), TypeError, r"rank: expected an int"),
    ("w float32", lambda: truncated_svd(W.float(), 1), TypeError,
     r"w: expected dtype float64 for \[m, n\]; got torch\.float32"),
    ("w 1-D", lambda: truncated_svd(W[0], 1), ValueError, r"w: expected shape \[m, n\]"),
    ("w a list", lambda: truncated_svd([[1.0]], 1), TypeError,
     r"w: expected a torch\.Tensor \[m, n\], float64; got list"),
    ("w empty", lambda: truncated_svd(torch.ones(0, 3, dtype=F64), 1), ValueError,
     r"w: expected shape \[m, n\] = \[\*, \*\] \(sizes ≥ 1\)"),
    ("factors mismatched",
     lambda: spectral_error(W, LowRankFactors(down=torch.ones(1, 4, dtype=F64), up=torch.ones(2, 1, dtype=F64))),
     ValueError, r"factors\.up: expected shape \[m, r\] = \[3, 1\]"),
    ("optimal rank too big", lambda: optimal_errors(W, 5), ValueError, r"rank: expected an int in \[1, 3\]"),
    ("heads not a multiple", lambda: gqa_as_mla(WK, WK, 3, 2, 2), ValueError,
     r"num_heads: expected a multiple of num_kv_heads = 2; got 3"),
    ("num_kv_heads 0", lambda: gqa_as_mla(WK, WK, 4, 0, 2), ValueError,
     r"num_kv_heads: expected an int ≥ 1 \(g\); got 0"),
    ("w_k rows", lambda: gqa_as_mla(WK, WK, 4, 2, 3), ValueError,
     r"w_k: expected shape \[g\*d_h, D\] = \[6, \*\].*got \[4, 5\]"),
    ("w_v hidden size", lambda: gqa_as_mla(WK, WK[:, :4], 4, 2, 2), ValueError,
     r"w_v: expected shape \[g\*d_h, D\] = \[4, 5\]"),
    ("w_v float32", lambda: gqa_as_mla(WK, WK.float(), 4, 2, 2), TypeError, r"w_v: expected dtype float64"),
    ("conversion rank 0", lambda: convert_to_mla(WK, WK, 4, 2, 2, 0), ValueError, r"rank: expected an int in \[1, 5\]"),
    ("conversion rank > min(2gd_h, D)", lambda: convert_to_mla(WK, WK, 4, 2, 2, 6), ValueError,
     r"rank: expected an int in \[1, 5\] \(min\(2\*g\*d_h, D\).*got 6"),
    ("q float32", lambda: gqa_attention(X, Q.float(), WK, WK, 2, 0.5), TypeError,
     r"q: expected dtype float64 for \[S, h, d_h\]"),
    ("x hidden size", lambda: gqa_attention(X[:, :4], Q, WK, WK, 2, 0.5), ValueError,
     r"x: expected shape \[L, D\] = \[\*, 5\]"),
    ("kv heads not dividing h", lambda: gqa_attention(X, Q, WK, WK, 3, 0.5), ValueError,
     r"num_kv_heads: expected a divisor of num_heads h = 4"),
    ("causal S > L", lambda: gqa_attention(X[:1], Q, WK, WK, 2, 0.5, causal=True), ValueError, r"q: .*S ≤ L"),
    ("scale 0", lambda: gqa_attention(X, Q, WK, WK, 2, 0.0), ValueError, r"scale: expected a finite float > 0"),
    ("scale nan", lambda: mla_attention(X, Q, GOOD, math.nan), ValueError, r"scale: expected a finite float > 0"),
    ("w_uk shape", lambda: mla_attention(X, Q, MLAWeights(GOOD.w_dkv, GOOD.w_uk[:, :1], GOOD.w_uv), 0.5), ValueError,
     r"weights\.w_uk: expected shape \[h, d_h, d_c\] = \[4, 2, 8\]"),
    ("w_dkv hidden size", lambda: mla_attention(X, Q, MLAWeights(GOOD.w_dkv[:, :4], GOOD.w_uk, GOOD.w_uv), 0.5),
     ValueError, r"weights\.w_dkv: expected shape \[d_c, D\] = \[\*, 5\]"),
    ("negative sigma_tail", lambda: conversion_error_bound(X, Q, WK, 2, -1.0, 0.5), ValueError,
     r"sigma_tail: expected a float"),
    ("bound w_v shape", lambda: conversion_error_bound(X, Q, WK[:2], 2, 0.1, 0.5), ValueError,
     r"w_v: expected shape \[g\*d_h, D\] = \[4, 5\]"),
]


@pytest.mark.parametrize("call, error, message", [row[1:] for row in BAD_CALLS], ids=[row[0] for row in BAD_CALLS])
def test_bad_arguments_are_rejected(call, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        call()


def test_valid_calls_pass_validation() -> None:
    # the table above fails only for its one bad argument: the same calls with good arguments run
    truncated_svd(W, 3)
    convert_to_mla(WK, WK, 4, 2, 2, 5)
    gqa_attention(X, Q, WK, WK, 2, 0.5, causal=True)
    mla_attention(X, Q, GOOD, 0.5)
    conversion_error_bound(X, Q, WK, 2, 0.1, 0.5)
