"""Unit checks of the tolerance model's ingredients and of its shape on hand-analysable cases."""

import math

import pytest
import torch

from mla_verify.decode.bounds import RoundingModel, decode_bounds
from mla_verify.reference import paged_decode_terms
from mla_verify.rounding import gamma, smallest_subnormal, unit_roundoff


@pytest.mark.parametrize("dtype, u", [(torch.float64, 1.1e-16), (torch.float32, 6.0e-8), (torch.float16, 4.9e-4),
                                      (torch.bfloat16, 3.9e-3)])
def test_unit_roundoffs_match_the_facts_sheet(dtype, u):
    assert unit_roundoff(dtype) == pytest.approx(u, rel=0.02)


def test_gamma_and_subnormals():
    assert gamma(10, 2.0**-24) == pytest.approx(10 * 2.0**-24, rel=1e-6)
    assert gamma(2**24, 2.0**-24) == math.inf
    assert smallest_subnormal(torch.float16) == 2.0**-24


def _single(length: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(length)
    q = torch.randn(1, 1, 1, 8, generator=g).to(dtype)
    cache = torch.randn(1, max(length, 1), 1, 8, generator=g).to(dtype)
    table = torch.zeros(1, 1, dtype=torch.int32)
    terms = paged_decode_terms(q, cache, table, torch.tensor([length], dtype=torch.int32), 6, 0.5)
    return terms, decode_bounds(terms, q, 0.5, 6, RoundingModel(input=dtype, accumulation=torch.float32,
                                                                 output=dtype, p=dtype))


def test_one_key_bound_is_rounding_of_that_value():
    """With one key p = 1 exactly, so the out bound is a few roundings of |v|, nothing more."""
    terms, bounds = _single(1, torch.float16)
    v = terms.rows[0, 0, :6].abs()
    ratio = bounds.out[0, 0, 0] / v
    assert (ratio > unit_roundoff(torch.float16)).all() and (ratio < 3 * unit_roundoff(torch.float16)).all()


def test_empty_rows_get_zero_bound_and_are_checked_exactly():
    terms, bounds = _single(0)
    assert bounds.out.eq(0).all() and bounds.lse.eq(0).all()


def test_bound_grows_with_length():
    short, long = _single(4)[1], _single(4000)[1]
    assert long.lse.max() > short.lse.max()


def test_sharp_tier_never_exceeds_the_sound_one():
    for length in (1, 4, 4000):
        terms, bounds = _single(length, torch.bfloat16)
        assert (bounds.sharp_lse <= bounds.lse).all()
        assert (bounds.sharp_out <= bounds.out.norm(dim=-1)).all()


def test_sharp_tier_is_far_tighter_at_long_contexts():
    """At L = 4000 the sound lse bound is dominated by worst-case γ_L sums; the sharp one by their
    √L-sized probabilistic counterparts, a factor of order √L/λ smaller."""
    _, bounds = _single(4000, torch.bfloat16)
    assert float(bounds.sharp_lse.max()) < 0.2 * float(bounds.lse.max())


def test_identical_keys_are_one_group():
    """Equal keys round identically, so the sharp tier must treat them as one term: with every key
    equal the P-rounding allowance is that of a single key (u_p·‖o‖), not of L independent ones."""
    from mla_verify.decode.bounds import _distinct_keys

    rows = torch.randn(2, 6, 4, dtype=torch.float64)
    rows[0, 3] = rows[0, 1]
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[1, 4:] = False
    keys = _distinct_keys(rows, valid)
    p = torch.full((2, 1, 1, 6), 1 / 6, dtype=torch.float64)
    mass = keys.squared_group_mass(p)
    assert torch.allclose(mass[0, 0, 0, 1], torch.tensor(2 / 36, dtype=torch.float64))  # P_g·p_t with P_g = 2/6
    assert torch.allclose(mass[1, 0, 0, 0], torch.tensor(1 / 36, dtype=torch.float64))


def test_constant_keys_allow_one_full_rounding_of_p():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 1, 1, 8, generator=g).to(torch.bfloat16)
    cache = torch.randn(1, 1, 1, 8, generator=g).expand(1, 600, 1, 8).contiguous().to(torch.bfloat16)
    table = torch.zeros(1, 1, dtype=torch.int32)
    terms = paged_decode_terms(q, cache, table, torch.tensor([600], dtype=torch.int32), 6, 0.5)
    bounds = decode_bounds(terms, q, 0.5, 6, RoundingModel(input=torch.bfloat16, accumulation=torch.float32,
                                                          output=torch.bfloat16, p=torch.bfloat16))
    o = terms.out[0, 0, 0]
    # a kernel rounding p = 1/600 to bf16 scales the whole output by (1 + ε), |ε| up to u: allowed
    assert float(bounds.sharp_out[0, 0, 0]) >= unit_roundoff(torch.bfloat16) * float(o.norm())


def test_mean_value_factor_of_the_sharp_tier():
    """e^{2E} for the score terms of the sharp tier: 1 at exact scores, +inf past any useful size,
    and a term that is 0 (one key, w = v − o = 0) stays 0 under an infinite factor, never NaN."""
    from mla_verify.decode.bounds import _mean_value_factor, _times

    E = torch.tensor([0.0, 1e-3, 0.5, 400.0, math.inf], dtype=torch.float64)
    factor = _mean_value_factor(E)
    assert factor[0] == 1 and math.isclose(float(factor[1]), math.exp(2e-3)) and math.isclose(float(factor[2]), math.e)
    assert torch.isinf(factor[3:]).all()
    scaled = _times(factor, torch.tensor([0.0, 1.0, 0.0, 0.0, 2.0], dtype=torch.float64))
    assert scaled[0] == 0 and scaled[2] == 0 and scaled[3] == 0 and torch.isinf(scaled[4])
    assert not scaled.isnan().any()
