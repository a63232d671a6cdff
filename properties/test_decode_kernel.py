"""Decode-kernel certification: every property of mla_verify.decode.properties under Hypothesis.

The implementation comes from --mla-impl / MLA_VERIFY_IMPL (default: the project's own 'torch'),
the case sizes and example counts from --mla-profile. Each distinct failure of a property (its
kind and where it arises) is shrunk on its own and reported; the plugin saves a replayable artifact
of each minimal case under --mla-counterexamples and prints the command that replays it. Cases the
kernel declines are counted as Hypothesis events (see --hypothesis-show-statistics).
Pinned examples are regressions the suite once found; those outside the implementation's declared
capabilities are skipped for it. They run in tests of their own (explicit phase only): Hypothesis
never shrinks an explicit example, and one that fails first would stand in for the search's
minimal case.
"""

import pytest
from hypothesis import Phase, event, example, given, reject, settings, target

from mla_verify.decode.checks import CaseDeclined, CaseFailure
from mla_verify.decode.properties import DECODE_PROPERTIES
from mla_verify.plugin import selection
from mla_verify.decode.strategies import case_supported, decode_cases, pinned_cases

pytestmark = pytest.mark.mla_implementation

SELECTED = selection()
IMPL = SELECTED.implementation()


def _run(prop, case) -> None:
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
        raise failure  # outside the except block: the signature alone tells failures apart
    target(ratios.sound, label="error/bound")
    target(ratios.sharp, label="error/sharp tolerance")


def _cases(prop):
    return decode_cases(IMPL.capabilities, SELECTED.profile.limits, SELECTED.device,
                        min_batch=prop.min_batch).map(prop.prepare)


PROPERTIES = {prop.name: prop for prop in DECODE_PROPERTIES}


def _pinned(prop_name: str):
    """The shared regression cases (strategies.pinned_cases) as explicit examples, run alone."""
    prop = PROPERTIES[prop_name]

    def decorate(test):
        for case in pinned_cases(IMPL.capabilities, SELECTED.device, prop.min_batch):
            test = example(case=prop.prepare(case))(test)
        return settings(phases=[Phase.explicit])(test)

    return decorate


@given(case=_cases(PROPERTIES["matches_reference"]))
def test_matches_reference(case):
    _run(PROPERTIES["matches_reference"], case)


@given(case=_cases(PROPERTIES["matches_reference"]))
@_pinned("matches_reference")
def test_matches_reference_pinned(case):
    _run(PROPERTIES["matches_reference"], case)


@given(case=_cases(PROPERTIES["page_order_invariant"]))
def test_page_order_invariant(case):
    _run(PROPERTIES["page_order_invariant"], case)


@given(case=_cases(PROPERTIES["page_order_invariant"]))
@_pinned("page_order_invariant")
def test_page_order_invariant_pinned(case):
    _run(PROPERTIES["page_order_invariant"], case)


@given(case=_cases(PROPERTIES["rows_independent"]))
def test_rows_independent(case):
    _run(PROPERTIES["rows_independent"], case)


@given(case=_cases(PROPERTIES["rows_independent"]))
@_pinned("rows_independent")
def test_rows_independent_pinned(case):
    _run(PROPERTIES["rows_independent"], case)


@given(case=_cases(PROPERTIES["deterministic"]))
def test_deterministic(case):
    _run(PROPERTIES["deterministic"], case)


@given(case=_cases(PROPERTIES["deterministic"]))
@_pinned("deterministic")
def test_deterministic_pinned(case):
    _run(PROPERTIES["deterministic"], case)


def test_every_property_is_collected():
    assert set(PROPERTIES) == {"matches_reference", "page_order_invariant", "rows_independent", "deterministic"}, (
        "a decode property was added or renamed without a test here")
