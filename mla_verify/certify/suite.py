"""The certification as pytest tests, for `mla-verify certify NAME --workers N`: the CLI runs pytest
with pytest-xdist on this module (-n N, the plugin's --mla-* options), so the parts of each
property's search run on N workers and the plugin merges them into one certificate. One test per
property of each half and one per decode property's pinned cases (a property the implementation's
half does not run is skipped); the plugin keeps those of the half named by --mla-impl or
--mla-layer. properties/decode/test_decode_kernel.py and
properties/layer/test_named_layer.py are the same tests for a `python -m pytest properties` run.
"""

import pytest

from mla_verify.certify.halves import layer_properties
from mla_verify.decode.properties import ALL_PROPERTIES
from mla_verify.plugin import DECODE, LAYER, certification_test


def _tests() -> dict:
    tests = {}
    for prop in ALL_PROPERTIES:
        for pinned in (False, True):
            name = f"test_decode_{prop.name}" + ("_pinned" if pinned else "")
            tests[name] = pytest.mark.mla_implementation(certification_test(DECODE, prop.name, pinned))
    for prop in layer_properties():
        tests[f"test_layer_{prop.name}"] = pytest.mark.mla_layer(certification_test(LAYER, prop.name))
    return tests


globals().update(_tests())
