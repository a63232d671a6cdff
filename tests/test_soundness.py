"""Soundness of the error bound at scale: the project's correct kernels never exceed it.

Slow (about 10^4 cases): run with `python -m pytest -m slow tests/test_soundness.py`. The result
(examples, the largest observed error/bound, time) is recorded in BENCHMARKS.md.
"""

import pytest

from mla_verify.certify import run_property
from mla_verify.decode_properties import property_named
from mla_verify.profiles import PROFILES
from mla_verify.registry import resolve

CASES = 10_000


@pytest.mark.slow
@pytest.mark.parametrize("name", ["torch"])
def test_correct_kernel_never_exceeds_the_bound(name):
    report = run_property(resolve(name), property_named("matches_reference"), PROFILES["default"],
                          max_examples=CASES, seed=20261128)
    print(f"\n{name}: {report.examples} cases, max error/bound {report.max_ratio:.4g}, "
          f"worst case {report.worst_case}")
    assert report.verdict == "pass", report.failure
    assert report.examples >= CASES
