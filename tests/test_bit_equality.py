"""Bit equality, the one copy (mla_verify.rounding.bits_differ / bitwise_equal), and what the
properties that promise identical results accept: +0 against −0 is a difference (for deterministic
and page_order_invariant alike), two NaNs are not, whatever their sign and payload; the inputs'
integrity check counts every bit, NaN payloads too."""

import pytest
import torch

import zoo
from mla_verify.decode.case import DecodeCase
from mla_verify.decode.checks import CaseFailure, FailureKind, Implementation
from mla_verify.decode.contract import capabilities_of
from mla_verify.decode.inputs import build_inputs
from mla_verify.decode.properties import property_named
from mla_verify.rounding import bits_differ, bitwise_equal

NAN = torch.tensor([0x7FC00000], dtype=torch.int32).view(torch.float32)
NEGATIVE_NAN = torch.tensor([-0x00400000], dtype=torch.int32).view(torch.float32)  # 0xFFC00000
PAYLOAD_NAN = torch.tensor([0x7FC00001], dtype=torch.int32).view(torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16,
                                   torch.float8_e4m3fn])
def test_signed_zeros_differ_and_equal_values_do_not(dtype):
    a = torch.tensor([0.0, 1.0, -2.0, 448.0]).to(dtype)
    b = torch.tensor([-0.0, 1.0, -2.0, 448.0]).to(dtype)
    for nan_payload in (True, False):
        assert bits_differ(a, b, nan_payload=nan_payload).tolist() == [True, False, False, False]
        assert not bitwise_equal(a, b, nan_payload=nan_payload)
        assert bitwise_equal(a, a.clone(), nan_payload=nan_payload)


def test_nans_are_equal_to_themselves_and_their_payload_counts_only_when_asked():
    assert not bits_differ(NAN, NAN.clone(), nan_payload=True).any()  # NaN-safe: not NaN != NaN
    for other in (NEGATIVE_NAN, PAYLOAD_NAN):
        assert other.isnan().all()
        assert bits_differ(NAN, other, nan_payload=True).all()
        assert not bits_differ(NAN, other, nan_payload=False).any()
    assert bits_differ(NAN, torch.tensor([1.0]), nan_payload=False).all()


def test_shape_and_dtype_must_agree():
    a = torch.zeros(3)
    assert not bitwise_equal(a, torch.zeros(3, dtype=torch.float64), nan_payload=False)
    assert not bitwise_equal(a, torch.zeros(4), nan_payload=False)
    with pytest.raises(ValueError, match="one shape and dtype"):
        bits_differ(a, torch.zeros(3, dtype=torch.float64), nan_payload=False)
    ints = torch.tensor([1, 2, 3])
    assert bits_differ(ints, torch.tensor([1, 0, 3]), nan_payload=True).tolist() == [False, True, False]


def test_strided_views_compare_element_by_element():
    wide = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    other = wide.clone()
    other[1, 2] = -other[1, 2]
    assert bits_differ(wide[:, ::2], other[:, ::2], nan_payload=True).tolist() == [[False] * 2, [False, True],
                                                                                    [False] * 2]


# ----------------------------------------------------------------------------------------------
# What the properties accept
# ----------------------------------------------------------------------------------------------

# row 0 has keys, row 1 is empty (its out must be 0): the zeros whose sign the kernels below play with
CASE = DecodeCase(**{**zoo.BENIGN_CASE, "batch": 2, "lengths": (40, 0), "permute_pages": True})


def _impl(fn) -> Implementation:
    return Implementation(name=fn.__name__, spec=f"{__name__}:{fn.__name__}", fn=fn, capabilities=capabilities_of(fn))


def zero_sign_from_the_first_physical_block(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale,
                                            causal=False):
    """Writes an empty row's zeros as −0 when row 0's first page sits at an odd physical block: the
    values are right, the placement of the pages steered the arithmetic."""
    out, lse = zoo.correct_decode(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal)
    if int(block_table[0, 0]) % 2:
        out = torch.where(out == 0, -out.abs(), out)
    return out, lse


_calls = [0]


def zero_sign_alternating(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=False):
    """Writes an empty row's zeros as −0 on every other call."""
    out, lse = zoo.correct_decode(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal)
    _calls[0] += 1
    return (torch.where(out == 0, -out.abs(), out) if _calls[0] % 2 else out), lse


def nan_sign_alternating(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=False):
    """An empty row's out as NaN (matches_reference's failure), its sign flipping on every call."""
    out, lse = zoo.correct_decode(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal)
    _calls[0] += 1
    nan = (NEGATIVE_NAN if _calls[0] % 2 else NAN).to(out.dtype)
    return torch.where(out == 0, nan, out), lse


def _layout_seed_moving_row_0_to_the_other_parity() -> int:
    for seed in range(100):
        first = build_inputs(CASE.replace(layout_seed=seed)).block_table[0, 0]
        moved = build_inputs(CASE.replace(layout_seed=seed), layout_seed=seed + 1).block_table[0, 0]
        if (int(first) - int(moved)) % 2:
            return seed
    raise AssertionError("no layout seed below 100 moves row 0's first page to a block of the other parity")


def test_a_zero_whose_sign_follows_the_page_placement_fails_page_order_invariant():
    impl = _impl(zero_sign_from_the_first_physical_block)
    case = CASE.replace(layout_seed=_layout_seed_moving_row_0_to_the_other_parity())
    property_named("matches_reference").check(impl, case)  # −0 is the value 0: within every bound
    property_named("deterministic").check(impl, case)  # the same inputs give the same bits
    with pytest.raises(CaseFailure) as caught:
        property_named("page_order_invariant").check(impl, case)
    assert caught.value.finding.kind is FailureKind.LAYOUT_DEPENDENCE
    assert "only the sign of zero" in caught.value.finding.message


def test_a_zero_whose_sign_changes_from_call_to_call_fails_deterministic():
    with pytest.raises(CaseFailure) as caught:
        property_named("deterministic").check(_impl(zero_sign_alternating), CASE)
    assert caught.value.finding.kind is FailureKind.NONDETERMINISM
    assert "only the sign of zero" in caught.value.finding.message


def test_nans_of_either_sign_are_identical_for_deterministic_and_wrong_for_matches_reference():
    impl = _impl(nan_sign_alternating)
    property_named("deterministic").check(impl, CASE)
    with pytest.raises(CaseFailure) as caught:
        property_named("matches_reference").check(impl, CASE)
    assert caught.value.finding.kind is FailureKind.NONFINITE


def test_rewriting_a_nan_poisoned_slot_with_another_nan_modifies_the_input():
    inputs = build_inputs(CASE)
    before = inputs.snapshot()
    poisoned = inputs.cache_buffer.isnan()
    assert poisoned.any()
    bits = inputs.cache_buffer.view(torch.int32)
    bits[poisoned] ^= 1 << 31  # the same value, NaN, with its sign bit flipped
    modified, out_of_bounds = inputs.integrity(before)
    assert modified or out_of_bounds
