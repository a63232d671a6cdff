"""Soundness of both tiers at scale: correct kernels never exceed the sound bound or the sharp tolerance.

Slow (10^5 cases in all, 18 tests of 5,700 cases: 6 kernels × 3 seeds, independent, so they can
run side by side): run with `python -m pytest -m slow tests/test_soundness.py -s`. The
kernels are the project's torch kernel, the zoo's fp32 template and the legitimate variants of
tests/zoo/legit.py (online exp2 softmax with P rounded to the input type, split-KV with 16
splits and a log-sum-exp merge, the same with bf16 partials declared, reverse summation order).
Cases are the default profile's, with smaller caps so that 10^5 of them fit in a CPU run. Each kernel's result (cases, the largest ratio of each tier, its case, time) is printed and
recorded in BENCHMARKS.md. A second test runs one regime alone (2,500 cases a kernel;
`-k boundary_keys`, `-k below_sentinel`).
"""

import dataclasses
import itertools
import time

import pytest
import torch

import zoo
from zoo import legit

from mla_verify.certify import run_property
from mla_verify.decode.properties import property_named
from mla_verify.certify.profiles import PROFILES, Profile
from mla_verify.certify.registry import resolve
from mla_verify.decode.case import REGIMES, SCALES, WIDE_RANGE_DTYPES, DecodeCase
from mla_verify.decode.fp8 import FP8_SCALES
from mla_verify.decode.inputs import sequence_values
from mla_verify.decode.strategies import DEFAULT_WIDTHS

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


REGIME_CASES = 2_500
# regimes whose values a change of the input generator redrew, each run alone (CASES_PER_TEST draws
# any one regime only ~1/11 of the time): boundary_keys (page and tile edge keys hold head 0's
# weight, so a kernel's rounding concentrates on few keys) and below_sentinel (logits near -6e4,
# q and keys of magnitude ~sqrt(6e4 / (scale d)))
REGIME_RUNS = ("boundary_keys", "below_sentinel")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(KERNELS))
@pytest.mark.parametrize("regime", REGIME_RUNS)
def test_correct_kernel_passes_every_case_of_one_regime(regime, name, monkeypatch):
    """REGIME_CASES cases per kernel at the soundness profile's shapes, every one in `regime`, none
    over either tier."""
    from mla_verify.decode import strategies

    monkeypatch.setattr(strategies, "REGIMES", (regime,))
    profile = dataclasses.replace(SOUNDNESS, max_examples=REGIME_CASES)
    report = run_property(KERNELS[name](), property_named("matches_reference"), profile, seed=SEEDS[0])
    print(f"\n{regime} {name}: {report.examples} cases, max error/bound {report.max_ratio:.4g} (sound), "
          f"max error/tolerance {report.max_sharp_ratio:.4g} (sharp)")
    assert report.verdict == "pass", report.failures
    assert report.examples >= REGIME_CASES


@pytest.mark.parametrize("regime", REGIMES)
def test_every_regime_draws_finite_inputs_in_every_dtype(regime):
    """A kernel is judged only on inputs the case meant: every regime's q and keys are finite once
    rounded to the input type, at every width and scale, FP8 scale regimes included. below_sentinel's
    logits of -6e4 once put q past float16's 65504 in 2.4 % of rows at d=24 with DeepSeek-V3's scale
    (the narrowest type, the smallest scale times width), and a correct kernel failed on the inf:
    that corner gets 400 draws, the rest 6."""
    for dtype, (d, head_dim_v), scale in itertools.product(("float16", "bfloat16", "float32"), DEFAULT_WIDTHS, SCALES):
        formats = [("native", "amax")] + ([("fp8_e4m3", s) for s in FP8_SCALES] if dtype in WIDE_RANGE_DTYPES else [])
        draws = 400 if (dtype, d, scale) == ("float16", 24, "deepseek_v3") else 6
        for (kv_format, fp8_scales), seed in itertools.product(formats, range(draws)):
            case = DecodeCase(dtype=dtype, batch=1, s_q=2, heads=2, d=d, head_dim_v=head_dim_v, page_size=16,
                              lengths=(70,), causal=False, regime=regime, scale=scale, permute_pages=False,
                              strided_cache=False, extra_blocks=0, seed=seed, layout_seed=0, kv_format=kv_format,
                              fp8_scales=fp8_scales)
            q, keys = sequence_values(case, 0)
            assert q.to(case.torch_dtype).isfinite().all() and keys.to(case.torch_dtype).isfinite().all(), case
