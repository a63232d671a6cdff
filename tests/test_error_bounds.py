"""Unit checks of the tolerance model's ingredients and of its shape on hand-analysable cases."""

import math

import pytest
import torch

from mla_verify.error_bounds import decode_bounds, gamma, smallest_subnormal, unit_roundoff
from mla_verify.reference import paged_decode_terms


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
    return terms, decode_bounds(terms, q, 0.5, 6, dtype, torch.float32, dtype)


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
