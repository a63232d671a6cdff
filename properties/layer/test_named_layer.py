"""Whole-layer certification under pytest: every layer property on the layer named by --mla-layer.

`python -m pytest properties --mla-layer NAME` (a registered layer: `mla-verify list`, or
'module:attr' / 'path/to/file.py:attr' of a layer factory; or MLA_VERIFY_LAYER) runs the same
properties, cases and judgement as `mla-verify certify NAME` (mla_verify.certify.runner); only the
tests marked `mla_layer` are collected. Each distinct failure of a property (its kind and stage) is
shrunk on its own and saved as a replayable artifact under --mla-counterexamples; the test fails
listing them with the commands that replay them. Under pytest-xdist (`-n N`) each property's
search is split into N parts, one per worker, merged into one certificate (--mla-json, ...).

Without a layer named, these tests are skipped: the project's own layers are certified by
properties/layer/test_hf_layer_properties.py and properties/layer/test_fast_layer.py.
"""

import pytest

from mla_verify.certify import layer_properties
from mla_verify.plugin import LAYER, certification_test

pytestmark = pytest.mark.mla_layer

PROPERTIES = {prop.name: prop for prop in layer_properties()}

test_matches_reference = certification_test(LAYER, "matches_reference")
test_absorbed_matches_naive = certification_test(LAYER, "absorbed_matches_naive")


def test_every_layer_property_is_collected():
    tested = {name.removeprefix("test_") for name in globals() if name.startswith("test_")}
    assert set(PROPERTIES) <= tested, f"layer properties without a test here: {set(PROPERTIES) - tested}"
