"""Decode-kernel certification: every property of mla_verify.decode.properties, run as
`mla-verify certify` runs it (mla_verify.certify.runner).

The implementation comes from --mla-impl / MLA_VERIFY_IMPL (default: the project's own 'torch'),
the case sizes and example counts from --mla-profile. Each property searches in rounds until no new
distinct failure (its kind and where it arises) turns up; each distinct failure is shrunk on its own,
saved as a replayable artifact under --mla-counterexamples, and the test fails listing them with the
commands that replay them. Under pytest-xdist (`-n N`) each property's search is split into N parts,
one per worker, and the plugin merges every part into one certificate (--mla-json, --mla-markdown,
--mla-html). Pinned examples are regressions the suite once found; those outside the
implementation's declared capabilities are skipped for it. They run in tests of their own
(explicit phase only): Hypothesis never shrinks an explicit example, and one that fails first would
stand in for the search's minimal case.
"""

import pytest

from mla_verify.decode.properties import ALL_PROPERTIES
from mla_verify.plugin import DECODE, certification_test

pytestmark = pytest.mark.mla_implementation

PROPERTIES = {prop.name: prop for prop in ALL_PROPERTIES}

test_matches_reference = certification_test(DECODE, "matches_reference")
test_matches_reference_pinned = certification_test(DECODE, "matches_reference", pinned=True)
test_page_order_invariant = certification_test(DECODE, "page_order_invariant")
test_page_order_invariant_pinned = certification_test(DECODE, "page_order_invariant", pinned=True)
test_rows_independent = certification_test(DECODE, "rows_independent")
test_rows_independent_pinned = certification_test(DECODE, "rows_independent", pinned=True)
test_deterministic = certification_test(DECODE, "deterministic")
test_deterministic_pinned = certification_test(DECODE, "deterministic", pinned=True)
# FP8 caches and sparse decode: skipped for a kernel that declares neither
test_sparse_matches_dense = certification_test(DECODE, "sparse_matches_dense")
test_index_order_invariant = certification_test(DECODE, "index_order_invariant")
test_invalid_indices_ignored = certification_test(DECODE, "invalid_indices_ignored")
test_quantizer_matches_format = certification_test(DECODE, "quantizer_matches_format")


def test_every_property_is_collected():
    assert set(PROPERTIES) == {"matches_reference", "page_order_invariant", "rows_independent", "deterministic",
                               "sparse_matches_dense", "index_order_invariant", "invalid_indices_ignored",
                               "quantizer_matches_format"}, "a decode property was added or renamed without a test here"
