"""FP8-cache and sparse-decode certification: the properties of mla_verify.decode.properties that apply
only to a kernel declaring sparse decode or an FP8 quantiser, under Hypothesis.

The implementation and profile come from the plugin's selection, as in properties/test_decode_kernel.py
(default: the project's own 'torch', which declares both FP8 layouts, sparse indices, sinks and its
quantiser). For a kernel that declares none of it these tests are skipped: its FP8 and sparse
coverage, if any, comes through the four general properties. Cases are drawn inside the declared
capabilities; a kernel that refuses one cleanly is counted as a Hypothesis event.
"""

import pytest
from hypothesis import event, given, reject, target

from mla_verify.decode.checks import CaseDeclined, CaseFailure
from mla_verify.decode.properties import FP8_SPARSE_PROPERTIES
from mla_verify.decode.strategies import case_supported, decode_cases
from mla_verify.plugin import selection

pytestmark = pytest.mark.mla_implementation

SELECTED = selection()
IMPL = SELECTED.implementation()
PROPERTIES = {prop.name: prop for prop in FP8_SPARSE_PROPERTIES}


def _run(prop, case) -> None:
    if not prop.applies(IMPL):
        pytest.skip(f"{IMPL.name} declares no {'sparse decode' if 'quantizer' not in prop.name else 'FP8 quantiser'}")
    if not case_supported(IMPL.capabilities, case):
        reject()
    failure = None
    try:
        ratios = prop.check(IMPL, case)
    except CaseDeclined as declined:
        event(f"declined: {declined.reason}")
        return
    except CaseFailure as caught:
        failure = caught.distinct()
    if failure is not None:
        failure.property_name = prop.name  # the plugin saves the minimal case's artifact
        raise failure
    target(ratios.sound, label="error/bound")
    target(ratios.sharp, label="error/sharp tolerance")


def _cases(prop):
    return decode_cases(IMPL.capabilities, SELECTED.profile.limits, SELECTED.device,
                        min_batch=prop.min_batch).map(prop.prepare)


@given(case=_cases(PROPERTIES["sparse_matches_dense"]))
def test_sparse_matches_dense(case):
    _run(PROPERTIES["sparse_matches_dense"], case)


@given(case=_cases(PROPERTIES["index_order_invariant"]))
def test_index_order_invariant(case):
    _run(PROPERTIES["index_order_invariant"], case)


@given(case=_cases(PROPERTIES["invalid_indices_ignored"]))
def test_invalid_indices_ignored(case):
    _run(PROPERTIES["invalid_indices_ignored"], case)


@given(case=_cases(PROPERTIES["quantizer_matches_format"]))
def test_quantizer_matches_format(case):
    _run(PROPERTIES["quantizer_matches_format"], case)


def test_every_fp8_sparse_property_is_collected():
    assert set(PROPERTIES) == {"sparse_matches_dense", "index_order_invariant", "invalid_indices_ignored",
                               "quantizer_matches_format"}, "an FP8/sparse property was added or renamed without a test here"
