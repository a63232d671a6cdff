"""The mutant zoo: every bug-injected decode kernel in tests/zoo must be caught by the certifier.

For each kernel, the property expected to catch it runs under the DEFAULT profile with seed 0 and
must fail with the expected failure kind, shrunk to a small case. The search stops at the first
round that finds its failures (one round per independent bug, `ZooKernel.distinct`): the
certifier's confirming round, a full run of the profile's examples that finds nothing new, would
only count the same failure again. The project's torch kernel (and the zoo's own template,
`zoo.common.correct_decode`) must pass the same properties with the same seed: a zoo without a
passing control proves nothing. The controls' profile (CONTROL_PROFILE) is the default's sizes and
serving-scale share, with its long contexts (to 32k tokens) and multi-token decode, with two
changes: 50 examples, four times what any mutant needs to be caught (at most 12), and no serving
batches past the default's max_batch of 4: a batch of ~128 rows × 8 queries × 128 heads over a few
tokens costs 15-25 s of float64 bounds per case, and a correct kernel's rows are judged one by one.
properties/decode certifies the torch kernel on the full default profile, large batches included,
on every test run.

Reproducibility: the example database is switched off and torch runs one intra-op thread while
this module runs (both restored afterwards), so the examples-to-catch are the same on every run.
A summary table (kernel, kind, examples to the first failure, examples with shrinking, seconds)
is printed at the end of the module.
"""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch
from hypothesis import settings

from mla_verify.certify import PropertyReport, run_property, runner
from mla_verify.decode.checks import CaseFailure, FailureKind, Implementation
from mla_verify.decode.properties import property_named
from mla_verify.certify.profiles import PROFILES, Profile
from mla_verify.certify.registry import resolve
from mla_verify.decode.case import DecodeCase

import zoo

PROFILE = PROFILES["default"]
CONTROL_PROFILE = dataclasses.replace(PROFILE, max_examples=50, limits=dataclasses.replace(
    PROFILE.limits, serving_batch=PROFILE.limits.max_batch))
SEED = 0
CONTROL_PROPERTIES = sorted({kernel.prop for kernel in zoo.ZOO})


@dataclasses.dataclass
class Run:
    report: PropertyReport
    first_failure_at: int | None  # examples drawn until the first failing one
    seconds: float

    @property
    def cases(self) -> list[DecodeCase]:
        """The minimal case of each distinct failure."""
        return [DecodeCase.from_dict(failure["case"]) for failure in self.report.failures]


_runs: dict[str, Run] = {}


@pytest.fixture(scope="module", autouse=True)
def reproducible(request):
    """No example database (a stored failure would be replayed first and change the counts) and
    one torch thread (on a 2-core machine two intra-op threads make these small cases ~3x slower)."""
    previous = settings.get_current_profile_name()
    settings.register_profile("mla-zoo", settings.get_profile(previous), database=None)
    settings.load_profile("mla-zoo")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    settings.load_profile(previous)
    torch.set_num_threads(threads)
    _print_summary(request.config)


def _run(impl: Implementation, prop_name: str, rounds: int = runner.MAX_SEARCH_ROUNDS,
         profile: Profile = PROFILE) -> Run:
    """run_property with the profile and seed 0 (at most `rounds` search rounds), counting the examples
    until the first failure."""
    key = f"{impl.spec}/{prop_name}"
    if key in _runs:
        return _runs[key]
    prop = property_named(prop_name)
    drawn, first = [0], []

    def counting(impl: Implementation, case: DecodeCase) -> float:
        drawn[0] += 1
        try:
            return prop.check(impl, case)
        except CaseFailure:
            if not first:
                first.append(drawn[0])
            raise

    started = time.perf_counter()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner, "MAX_SEARCH_ROUNDS", rounds)
        report = run_property(impl, dataclasses.replace(prop, check=counting), profile, seed=SEED)
    _runs[key] = Run(report, first[0] if first else None, time.perf_counter() - started)
    return _runs[key]


def _small(case: DecodeCase, kernel: zoo.ZooKernel) -> list[str]:
    """What makes the shrunk case larger than a person should have to read."""
    problems = []
    if case.batch > 2:
        problems.append(f"batch {case.batch} > 2")
    if case.heads > kernel.max_heads:
        problems.append(f"heads {case.heads} > {kernel.max_heads}")
    if case.s_q > kernel.max_s_q:
        problems.append(f"s_q {case.s_q} > {kernel.max_s_q}")
    longest = max(2 * case.page_size + 1, 130, kernel.min_length + 2 * case.page_size)
    if any(n > longest for n in case.lengths):
        problems.append(f"lengths {list(case.lengths)} exceed {longest}")
    return problems


def test_zoo_is_large_and_documented():
    assert len(zoo.ZOO) >= 40
    assert len({kernel.name for kernel in zoo.ZOO}) == len(zoo.ZOO)
    for kernel in zoo.ZOO:
        assert kernel.fn.__doc__ and len(kernel.fn.__doc__.split()) > 15, f"{kernel.name}: docstring missing"
        assert kernel.kinds and all(isinstance(kind, FailureKind) for kind in kernel.kinds)


def _mutant_run(kernel: zoo.ZooKernel) -> Run:
    """The search for a mutant's bugs: a round for each of its `distinct` bugs (each round that finds
    a new failure is followed by one more; a mutant's last round has nothing left to find)."""
    return _run(zoo.implementation(kernel.fn), kernel.prop, rounds=kernel.distinct)


@pytest.mark.parametrize("kernel", zoo.ZOO, ids=lambda kernel: kernel.name)
def test_mutant_is_caught(kernel):
    run = _mutant_run(kernel)
    report = run.report
    assert report.verdict == "fail", (
        f"{kernel.name} was NOT caught by {kernel.prop} in {report.examples} examples "
        f"(max error/bound {report.max_ratio:.3g})")
    found = [f"{failure['signature']}: {failure['message']}" for failure in report.failures]
    assert len(report.failures) >= kernel.distinct, (
        f"{kernel.name} has {kernel.distinct} independent bugs, the run reported {len(found)}: {found}")
    for failure, case in zip(report.failures, run.cases):
        kind = FailureKind(failure["kind"])
        assert kind in kernel.kinds, (
            f"{kernel.name} caught as {kind.name}, expected one of {sorted(k.name for k in kernel.kinds)}: {found}")
        if failure["flaky"]:  # it depends on what the allocator returned: Hypothesis cannot shrink it reliably
            continue
        problems = _small(case, kernel)
        assert not problems, f"{kernel.name} shrank only to {case.describe()}: {'; '.join(problems)}"


@pytest.mark.parametrize("kernel", [k for k in zoo.ZOO if k.benign is not None], ids=lambda kernel: kernel.name)
def test_mutant_is_right_where_its_bug_does_not_reach(kernel):
    """Each mutant is a targeted bug, not a broken kernel: on a case its bug does not touch it passes
    (so the catch above is the bug, found by the search)."""
    impl = zoo.implementation(kernel.fn)
    case = DecodeCase(**{**zoo.BENIGN_CASE, **kernel.benign})
    for name in {kernel.prop, "matches_reference"}:
        property_named(name).check(impl, case)  # raises CaseFailure if wrong


def test_head_tail_shrinks_to_the_first_partial_group():
    """The head-tail bug needs only h = 17 (one head past a full group of 16); it once shrank only to
    63, until 17 joined the special head counts."""
    kernel = next(k for k in zoo.ZOO if k.fn is zoo.heads.head_tail_dropped)
    run = _mutant_run(kernel)
    assert run.report.verdict == "fail"
    assert run.cases and all(case.heads == 17 for case in run.cases), [case.describe() for case in run.cases]


@pytest.mark.parametrize("scale", ["deepseek_v3", "inverse_sqrt_d"])
def test_boundary_keys_catch_the_newest_token_dropped_at_deepseek_scale(scale):
    """With random keys a token among 4,097 weighs ~1e-4 at DeepSeek-V3's scale, below what bf16
    rounding of the larger logits leaves room for (BENCHMARKS.md: missed at h = 16); in the
    boundary_keys regime the newest key is one of the ~130 that hold head 0's weight, so dropping it
    fails matches_reference, while the zoo's template passes the same case."""
    case = DecodeCase(dtype="bfloat16", batch=1, s_q=1, heads=16, d=576, head_dim_v=512, page_size=64,
                      lengths=(4097,), causal=False, regime="boundary_keys", scale=scale, permute_pages=True,
                      strided_cache=False, extra_blocks=0, seed=1, layout_seed=1)
    prop = property_named("matches_reference")
    prop.check(zoo.implementation(zoo.correct_decode, "zoo_template"), case)
    with pytest.raises(CaseFailure) as caught:
        prop.check(zoo.implementation(zoo.subtle.token_dropped_from_4096), case)
    assert caught.value.finding.kind in (FailureKind.WRONG_LSE, FailureKind.WRONG_VALUES), caught.value.finding


CONTROLS = {"torch": lambda: resolve("torch"),
            "zoo_template": lambda: zoo.implementation(zoo.correct_decode, "zoo_template"),
            "sparse_template": lambda: zoo.implementation(zoo.sparse.correct_sparse_decode, "sparse_template"),
            **{fn.__name__: (lambda fn=fn: zoo.implementation(fn)) for fn in zoo.legit.LEGITIMATE}}
# the properties each control runs: every one it declares for the torch kernel and the zoo's
# template; for the FP8/sparse template (whose dense path is the FP8 mutants' template too, and whose
# quantiser is torch's) the properties its mutants are caught by; matches_reference for the
# legitimate variants (they differ from the template only in arithmetic)
CONTROL_SCOPE = {"torch": None, "zoo_template": None,
                 "sparse_template": ("matches_reference", "sparse_matches_dense", "invalid_indices_ignored")}


@pytest.mark.parametrize("prop_name", CONTROL_PROPERTIES)
@pytest.mark.parametrize("control", sorted(CONTROLS))
def test_control_passes(control, prop_name):
    """The correct kernels, and the legitimate variants that compute differently (online exp2
    softmax with P in bf16, split-KV merges, bf16 partials declared, reverse order, FP8 values
    dequantised to the input type), pass."""
    scope = CONTROL_SCOPE.get(control, ("matches_reference",))
    if scope is not None and prop_name not in scope:
        pytest.skip(f"{control} runs {list(scope)} (see CONTROL_SCOPE)")
    impl = CONTROLS[control]()
    if not property_named(prop_name).applies(impl):
        pytest.skip(f"{prop_name} does not apply to {control} (it declares no sparse decode or quantiser)")
    report = _run(impl, prop_name, profile=CONTROL_PROFILE).report
    assert report.verdict == "pass", f"control {control} fails {prop_name}: {report.failures}"
    assert report.examples >= CONTROL_PROFILE.max_examples


def _print_summary(config) -> None:
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or not _runs:
        return
    if capture is not None:
        with capture.global_and_fixture_disabled():
            _write_summary(reporter)
    else:
        _write_summary(reporter)


def _write_summary(reporter) -> None:
    reporter.write_line("")
    reporter.write_line(f"mutant zoo: profile {PROFILE.name} (controls: {CONTROL_PROFILE.max_examples} examples, "
                        f"serving-scale batches to {CONTROL_PROFILE.limits.serving_batch}), seed {SEED}")
    reporter.write_line(f"{'implementation/property':48} {'verdict':7} {'kind':36} {'1st fail':>8} "
                        f"{'examples':>8} {'seconds':>7}  shrunk case (or max error/bound of a pass)")
    total = 0.0
    for key, run in _runs.items():
        report = run.report
        total += run.seconds
        kind = " + ".join(failure["kind"] for failure in report.failures)
        case = (" | ".join(c.describe() for c in run.cases) if report.failures
                else f"max error/bound {report.max_ratio:.3g} (sound), {report.max_sharp_ratio:.3g} (sharp)")
        first = "" if run.first_failure_at is None else str(run.first_failure_at)
        reporter.write_line(f"{key.split(':')[-1]:48} {report.verdict:7} {kind[:36]:36} {first:>8} "
                            f"{report.examples:>8} {run.seconds:7.1f}  {case}")
    reporter.write_line(f"total {total:.1f} s in run_property")
