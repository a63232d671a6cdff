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
from mla_verify.strategies import DecodeCase, case_supported, decode_cases

SELECTED = selection()
IMPL = SELECTED.implementation()


def _pinned(**fields) -> DecodeCase:
    base = dict(dtype="float32", batch=1, s_q=1, heads=1, d=40, head_dim_v=32, page_size=16, lengths=(1,),
                causal=False, regime="unit", scale="inverse_sqrt_d", permute_pages=False, strided_cache=False,
                extra_blocks=0, seed=0, layout_seed=0, device=SELECTED.device)
    return DecodeCase(**{**base, **fields})


def _run(prop, case: DecodeCase) -> None:
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


@given(case=_cases(PROPERTIES["matches_reference"]))
# every length zero: the reference's bound once crashed on an empty gather
@example(case=_pinned(batch=2, lengths=(0, 0)))
# a NaN-poisoned slot right after a full page, with causal s_q > 1
@example(case=_pinned(batch=2, s_q=2, causal=True, lengths=(16, 17), permute_pages=True, extra_blocks=2))
def test_matches_reference(case):
    _run(PROPERTIES["matches_reference"], case)


@given(case=_cases(PROPERTIES["page_order_invariant"]))
def test_page_order_invariant(case):
    _run(PROPERTIES["page_order_invariant"], case)


@given(case=_cases(PROPERTIES["rows_independent"]))
def test_rows_independent(case):
    _run(PROPERTIES["rows_independent"], case)


@given(case=_cases(PROPERTIES["deterministic"]))
def test_deterministic(case):
    _run(PROPERTIES["deterministic"], case)


def test_every_property_is_collected():
    assert set(PROPERTIES) == {"matches_reference", "page_order_invariant", "rows_independent", "deterministic"}, (
        "a decode property was added or renamed without a test here")
