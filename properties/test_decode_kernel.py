"""Decode-kernel certification: every property of mla_verify.decode_properties under Hypothesis.

The implementation comes from --mla-impl / MLA_VERIFY_IMPL (default: the project's own 'torch'),
the case sizes and example counts from --mla-profile. A failure shows the shrunk case, saves a
replayable artifact under --mla-counterexamples and prints the command that replays it.
Pinned examples are regressions the suite once found; those outside the implementation's declared
capabilities are skipped for it.
"""

import pytest
from hypothesis import example, given, reject, target

from mla_verify.checks import CaseFailure
from mla_verify.counterexample import save_counterexample
from mla_verify.decode_properties import DECODE_PROPERTIES
from mla_verify.plugin import selection
from mla_verify.strategies import case_supported, decode_cases, pinned_cases

SELECTED = selection()
IMPL = SELECTED.implementation()


def _run(prop, case) -> None:
    if not case_supported(IMPL.capabilities, case):
        reject()
    try:
        ratio = prop.check(IMPL, case)
    except CaseFailure as failure:
        folder = save_counterexample(SELECTED.counterexamples, IMPL, prop.name, failure)
        raise AssertionError(f"{failure}\n  artifact: {folder}\n  replay:   mla-verify replay {folder}"
                             f"\n  or:       python {folder}/repro.py") from None
    target(ratio, label="error/bound")


def _cases(prop):
    return decode_cases(IMPL.capabilities, SELECTED.profile.limits, SELECTED.device,
                        min_batch=prop.min_batch).map(prop.prepare)


PROPERTIES = {prop.name: prop for prop in DECODE_PROPERTIES}


def _pinned(prop_name: str):
    """The shared regression cases (strategies.pinned_cases) as explicit examples."""
    prop = PROPERTIES[prop_name]

    def decorate(test):
        for case in pinned_cases(IMPL.capabilities, SELECTED.device, prop.min_batch):
            test = example(case=prop.prepare(case))(test)
        return test

    return decorate


@given(case=_cases(PROPERTIES["matches_reference"]))
@_pinned("matches_reference")
def test_matches_reference(case):
    _run(PROPERTIES["matches_reference"], case)


@given(case=_cases(PROPERTIES["page_order_invariant"]))
@_pinned("page_order_invariant")
def test_page_order_invariant(case):
    _run(PROPERTIES["page_order_invariant"], case)


@given(case=_cases(PROPERTIES["rows_independent"]))
@_pinned("rows_independent")
def test_rows_independent(case):
    _run(PROPERTIES["rows_independent"], case)


@given(case=_cases(PROPERTIES["deterministic"]))
@_pinned("deterministic")
def test_deterministic(case):
    _run(PROPERTIES["deterministic"], case)


def test_every_property_is_collected():
    assert set(PROPERTIES) == {"matches_reference", "page_order_invariant", "rows_independent", "deterministic"}, (
        "a decode property was added or renamed without a test here")
