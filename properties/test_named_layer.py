"""Whole-layer certification under pytest: every layer property on the layer named by --mla-layer.

`python -m pytest properties --mla-layer NAME` (a registered layer: `mla-verify list`, or
'module:attr' / 'path/to/file.py:attr' of a layer factory; or MLA_VERIFY_LAYER) runs the same
properties, cases and judgement as `mla-verify certify NAME`; only the tests marked `mla_layer` are
collected. Each distinct failure of a property (its kind and stage) is shrunk on its own; the
plugin saves a replayable artifact of each minimal case under --mla-counterexamples and prints the
command that replays it. Cases the layer declines are counted as Hypothesis events.

Without a layer named, these tests are skipped: the project's own layers are certified by
properties/test_layer.py and properties/test_fast_layer.py.
"""

import pytest
from hypothesis import event, given, target

from mla_verify.certify import CaseFault, CaseRefused, LayerHalf, layer_properties
from mla_verify.plugin import selection

pytestmark = pytest.mark.mla_layer

SELECTED = selection()
LAYER = SELECTED.layer()
HALF = LayerHalf()
PROPERTIES = {prop.name: prop for prop in layer_properties()}
APPLICABLE = {prop.name for prop in HALF.properties(LAYER)} if LAYER is not None else set()


def _run(prop, case) -> None:
    failure = None
    try:
        ratios, _ = HALF.judge(LAYER, prop, case, SELECTED.device)
    except CaseRefused as refused:
        event(f"declined: {refused.reason}")
        return
    except CaseFault as caught:
        failure = caught.distinct()
    if failure is not None:
        failure.property_name = prop.name  # the plugin saves the minimal case's artifact
        raise failure  # outside the except block: the signature alone tells failures apart
    target(ratios.sound, label="error/bound")
    target(ratios.sharp, label="error/sharp tolerance")


def _certify(name: str):
    """The test of one property: Hypothesis over the layer's cases, or a skip saying why not."""
    if LAYER is None or name not in APPLICABLE:
        reason = ("no layer named: pass --mla-layer NAME (or set MLA_VERIFY_LAYER)" if LAYER is None
                  else f"{name} does not apply to {LAYER.name}" if name in PROPERTIES
                  else f"{name} is not a layer property of this mla_verify")

        def skipped():
            pytest.skip(reason)

        return skipped
    prop = PROPERTIES[name]

    @given(case=HALF.strategy(LAYER, prop, SELECTED.profile, SELECTED.device, None))
    def test(case):
        _run(prop, case)

    return test


test_matches_reference = _certify("matches_reference")
test_absorbed_matches_naive = _certify("absorbed_matches_naive")


def test_every_layer_property_is_collected():
    tested = {name.removeprefix("test_") for name in globals() if name.startswith("test_")}
    assert set(PROPERTIES) <= tested, f"layer properties without a test here: {set(PROPERTIES) - tested}"
