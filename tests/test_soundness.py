"""Soundness of both tiers at scale: correct kernels never exceed the sound bound or the sharp tolerance.

Slow (10^5 cases in all, 18 tests of 5,700 cases: 6 kernels × 3 seeds, independent, so they can
run side by side): run with `python -m pytest -m slow tests/test_soundness.py -s`. The
kernels are the project's torch kernel, the zoo's fp32 template and the legitimate variants of
tests/zoo/legit.py (online exp2 softmax with P rounded to the input type, split-KV with 16
splits and a log-sum-exp merge, the same with bf16 partials declared, reverse summation order).
Cases are the default profile's, with smaller caps so that 10^5 of them fit in a CPU run. Each kernel's result (cases, the largest ratio of each tier, its case, time) is printed and
recorded in BENCHMARKS.md. A second test runs the boundary_keys regime alone (2,500 cases a kernel;
`-k boundary_keys`).
"""

import dataclasses
import time

import pytest
import torch

import zoo
from zoo import legit

from mla_verify.certify import run_property
from mla_verify.decode.properties import property_named
from mla_verify.certify.profiles import PROFILES, Profile
from mla_verify.certify.registry import resolve
from mla_verify.decode.case import DecodeCase

CASES_PER_TEST = 5_700
SEEDS = (20261201, 20261202, 20261203)
SOUNDNESS = Profile("soundness", CASES_PER_TEST, dataclasses.replace(
    PROFILES["default"].limits, max_len=200, max_batch=3, max_work=400_000, serving_share=0.02,
    serving_work=2_000_000))
KERNELS = {
    "torch": lambda: resolve("torch"),
    "zoo_template": lambda: zoo.implementation(zoo.correct_decode, "zoo_template"),
    **{fn.__name__: (lambda fn=fn: zoo.implementation(fn)) for fn in legit.LEGITIMATE},
}


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", sorted(KERNELS))
def test_correct_kernel_never_exceeds_either_tier(name, seed):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    started = time.perf_counter()
    try:
        report = run_property(KERNELS[name](), property_named("matches_reference"), SOUNDNESS, seed=seed,
                              progress=_every_thousand)
    finally:
        torch.set_num_threads(threads)
    worst = DecodeCase.from_dict(report.worst_sharp_case).describe() if report.worst_sharp_case else "-"
    print(f"\nsoundness {name} seed {seed}: {report.examples} cases, max error/bound {report.max_ratio:.4g} (sound), "
          f"max error/tolerance {report.max_sharp_ratio:.4g} (sharp), {time.perf_counter() - started:.0f} s; "
          f"worst sharp case: {worst}")
    assert report.verdict == "pass", report.failures
    assert report.examples >= CASES_PER_TEST


def _every_thousand(message: str) -> None:
    """Progress lines ('  matches_reference: N cases, …') for every thousandth case."""
    if int(message.split(":")[1].split()[0]) % 1000 == 0:
        print(message, flush=True)


BOUNDARY_CASES = 2_500


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(KERNELS))
def test_correct_kernel_passes_every_boundary_keys_case(name, monkeypatch):
    """The boundary_keys regime alone (its keys at page and tile edges hold head 0's weight, so a
    kernel's rounding concentrates on few keys): BOUNDARY_CASES cases per kernel at the soundness
    profile's shapes, every one in that regime, none over either tier."""
    from mla_verify.decode import strategies

    monkeypatch.setattr(strategies, "REGIMES", ("boundary_keys",))
    profile = dataclasses.replace(SOUNDNESS, max_examples=BOUNDARY_CASES)
    report = run_property(KERNELS[name](), property_named("matches_reference"), profile, seed=SEEDS[0])
    print(f"\nboundary_keys {name}: {report.examples} cases, max error/bound {report.max_ratio:.4g} (sound), "
          f"max error/tolerance {report.max_sharp_ratio:.4g} (sharp)")
    assert report.verdict == "pass", report.failures
    assert report.examples >= BOUNDARY_CASES
