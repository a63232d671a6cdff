"""Certify a decode kernel: run every decode property under Hypothesis and write the certificate.

The search does not stop at the first failure: each distinct failure (its signature: the failure
kind and where it arises, see `mla_verify.checks.Finding`) is shrunk on its own by Hypothesis
(report_multiple_bugs) and gets its own minimal case, counterexample artifact and replay command.
A case the kernel declines (`mla_verify.Declined`, NotImplementedError) is counted with its reason
and the search goes on; with `strict` it is a failure.

Certificate schema (JSON, "schema": "mla-verify-certificate/2"):
    implementation  {name, spec, capabilities}        what was certified and what it claims
    versions        {mla_verify, torch, hypothesis, python, [triton]}
    device          {type, name}
    settings        {profile, max_examples, seed, isolated, strict, limits}
    verdict         "pass" | "pass with declined cases" | "fail"
    distinct_failures  int                            over all properties
    properties      [{name, description, verdict, examples, passed, failed, declined,
                      declined_reasons {reason: count}, max_ratio, max_sharp_ratio, worst_case,
                      worst_sharp_case, coverage, failures: [{signature, kind, message, case,
                      counterexample, flaky}]}]
    not_covered     [str]                             what the declaration left out and the limits drawn
    elapsed_s       float
max_ratio / max_sharp_ratio are the largest observed error / tolerance of each tier over the cases
that passed (≤ 1); worst_case / worst_sharp_case the cases that reached them.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import platform
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import hypothesis
import hypothesis.errors
import torch
from hypothesis import Phase, example, given, settings, target

import mla_verify
from mla_verify.checks import CaseDeclined, CaseFailure, FailureKind, Finding, Implementation, Ratios
from mla_verify.counterexample import save_counterexample
from mla_verify.decode_properties import DECODE_PROPERTIES, DecodeProperty, property_named
from mla_verify.profiles import PROFILES, Profile, hypothesis_settings
from mla_verify.strategies import DEFAULT_PAGES, DEFAULT_WIDTHS, DecodeCase, decode_cases, dtype_name, pinned_cases

__all__ = ["PropertyReport", "Certificate", "certify", "run_property", "Coverage", "not_covered"]

SCHEMA = "mla-verify-certificate/2"
PROGRESS_EVERY = 25  # cases between progress lines
MAX_SEARCH_ROUNDS = 8  # a round per newly found failure signature, then one that finds none


@dataclass
class Coverage:
    """What the examples actually exercised."""

    dtypes: set = field(default_factory=set)
    heads: set = field(default_factory=set)
    page_sizes: set = field(default_factory=set)
    widths: set = field(default_factory=set)
    s_q: set = field(default_factory=set)
    regimes: set = field(default_factory=set)
    length_kinds: set = field(default_factory=set)
    causal: set = field(default_factory=set)
    layouts: set = field(default_factory=set)
    max_length: int = 0
    max_batch: int = 0
    max_work: int = 0
    # cases with a batch of at least 32 or a sequence of at least 4096 tokens
    serving_scale: int = 0

    def add(self, case: DecodeCase) -> None:
        self.dtypes.add(case.dtype)
        self.heads.add(case.heads)
        self.page_sizes.add(case.page_size)
        self.widths.add(f"{case.d}/{case.head_dim_v}")
        self.s_q.add(case.s_q)
        self.regimes.add(case.regime)
        self.causal.add(case.causal)
        self.layouts.update(name for name, on in (("permuted", case.permute_pages), ("strided", case.strided_cache))
                            if on)
        for n in case.lengths:
            self.length_kinds.add(_length_kind(n, case.page_size))
        self.max_length = max(self.max_length, max(case.lengths, default=0))
        self.max_batch = max(self.max_batch, case.batch)
        self.max_work = max(self.max_work, case.work)
        self.serving_scale += case.batch >= 32 or max(case.lengths, default=0) >= 4096

    def to_dict(self) -> dict:
        return {key: sorted(value, key=lambda v: (type(v).__name__, v)) if isinstance(value, set) else value
                for key, value in vars(self).items()}


def _length_kind(n: int, page: int) -> str:
    if n in (0, 1):
        return str(n)
    for name, value in (("page-1", page - 1), ("page", page), ("page+1", page + 1)):
        if n == value:
            return name
    return "multiple of page" if n % page == 0 else "other"


@dataclass
class PropertyReport:
    name: str
    description: str
    examples: int = 0
    passed: int = 0
    failed: int = 0
    declined: int = 0
    declined_reasons: dict = field(default_factory=dict)
    max_ratio: float = 0.0
    max_sharp_ratio: float = 0.0
    worst_case: dict | None = None
    worst_sharp_case: dict | None = None
    coverage: Coverage = field(default_factory=Coverage)
    failures: list = field(default_factory=list)

    @property
    def verdict(self) -> str:
        if self.failures:
            return "fail"
        return "pass with declined cases" if self.declined else "pass"

    def record(self, ratios: Ratios, case: DecodeCase) -> None:
        self.passed += 1
        # exact properties (ratio 0) have no worst case
        if ratios.sound > self.max_ratio:
            self.max_ratio, self.worst_case = ratios.sound, case.to_dict()
        if ratios.sharp > self.max_sharp_ratio:
            self.max_sharp_ratio, self.worst_sharp_case = ratios.sharp, case.to_dict()

    def to_dict(self) -> dict:
        data = dict(vars(self))
        data["verdict"] = self.verdict
        data["coverage"] = self.coverage.to_dict()
        return data


@dataclass
class Certificate:
    implementation: dict
    versions: dict
    device: dict
    settings: dict
    properties: list[PropertyReport]
    not_covered: list[str]
    elapsed_s: float

    @property
    def distinct_failures(self) -> int:
        """Distinct failure signatures over all properties (a crash on one case fails every property
        that calls the kernel on it: one failure)."""
        return len({failure["signature"] for p in self.properties for failure in p.failures})

    @property
    def verdict(self) -> str:
        if self.distinct_failures:
            return "fail"
        return "pass with declined cases" if any(p.declined for p in self.properties) else "pass"

    def headline(self) -> str:
        if self.verdict == "fail":
            n = self.distinct_failures
            return f"FAIL: {n} distinct failure{'s' if n > 1 else ''}"
        if self.verdict == "pass":
            return "PASS"
        declined = sum(p.declined for p in self.properties)
        examples = sum(p.examples for p in self.properties)
        return f"PASS with declined cases ({declined} of {examples} cases declined)"

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "implementation": self.implementation, "versions": self.versions,
                "device": self.device, "settings": self.settings, "verdict": self.verdict,
                "distinct_failures": self.distinct_failures,
                "properties": [p.to_dict() for p in self.properties], "not_covered": self.not_covered,
                "elapsed_s": round(self.elapsed_s, 2)}

    def to_markdown(self) -> str:
        impl, lines = self.implementation, []
        lines.append(f"# MLA decode certificate: {impl['name']} — {self.headline()}")
        lines.append("")
        lines.append(f"- implementation: `{impl['spec']}`")
        lines.append(f"- device: {self.device['type']} ({self.device['name']})")
        lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in self.versions.items()))
        s = self.settings
        lines.append(f"- profile: {s['profile']}, {s['max_examples']} examples per property, seed {s['seed']}, "
                     f"isolated: {s['isolated']}, strict: {s['strict']}")
        lines.append(f"- elapsed: {self.elapsed_s:.1f} s")
        lines.append("")
        lines.append("| property | verdict | cases | passed | failed | declined | max error/bound (sound) "
                     "| max error/tolerance (sharp) |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for p in self.properties:
            lines.append(f"| {p.name} | {p.verdict} | {p.examples} | {p.passed} | {p.failed} | {p.declined} | "
                         f"{p.max_ratio:.3g} | {p.max_sharp_ratio:.3g} |")
        lines.append("")
        lines.append("The ratios are over the cases that passed. Sound tier: worst-case rounding-error bound, "
                     "element by element. Sharp tier: probabilistic rounding model on the lse and on each "
                     "row's error norm (see mla_verify/error_bounds.py).")
        for p in self.properties:
            for number, failure in enumerate(p.failures, 1):
                lines.append("")
                lines.append(f"## {p.name}: failure {number} of {len(p.failures)} — {_escape(failure['signature'])}")
                lines.append("")
                lines.append(f"- {_escape(failure['message'])}" + (" (flaky)" if failure.get("flaky") else ""))
                lines.append(f"- minimal case: `{DecodeCase.from_dict(failure['case']).describe()}`")
                if failure.get("counterexample"):
                    lines.append(f"- counterexample: `{failure['counterexample']}` "
                                 f"(replay: `mla-verify replay {failure['counterexample']}`)")
            if p.declined_reasons:
                lines.append("")
                lines.append(f"Declined by {p.name} ({p.declined} of {p.examples} cases):")
                lines += [f"- {count} × {_escape(reason)}" for reason, count in p.declined_reasons.items()]
        lines.append("")
        for p in self.properties:
            if p.worst_case:
                lines.append(f"- worst passing case of {p.name} (sound): `{DecodeCase.from_dict(p.worst_case).describe()}`")
            if p.worst_sharp_case:
                lines.append(f"- worst passing case of {p.name} (sharp): "
                             f"`{DecodeCase.from_dict(p.worst_sharp_case).describe()}`")
        lines.append("")
        coverage = self.properties[0].coverage.to_dict() if self.properties else {}
        lines.append(f"Coverage ({self.properties[0].name if self.properties else '-'}): "
                     + "; ".join(f"{k}: {v}" for k, v in coverage.items()))
        lines.append("")
        lines.append("Not covered: " + ("; ".join(self.not_covered) if self.not_covered else "nothing declared out"))
        return "\n".join(lines) + "\n"


def _escape(text: str) -> str:
    """Markdown-safe inside a line: pipes escaped, no line breaks."""
    return text.replace("|", "\\|").replace("\n", " ")


def not_covered(impl: Implementation, device: str, coverage: Coverage | None = None) -> list[str]:
    """What the declaration leaves out, what the strategies never draw, and the limits the run drew."""
    caps, gaps = impl.capabilities, []
    all_dtypes = ("float64", "float32", "float16", "bfloat16")
    declared = {dtype_name(t) for t in caps.dtypes}
    gaps += [f"dtype {name} (not declared)" for name in all_dtypes if name not in declared]
    if caps.page_sizes is not None:
        gaps.append(f"page sizes other than {list(caps.page_sizes)}")
    else:
        gaps.append(f"page sizes other than {list(DEFAULT_PAGES)} (not drawn)")
    if caps.head_counts is not None:
        gaps.append(f"head counts other than {list(caps.head_counts)}")
    elif caps.max_heads < 128:
        gaps.append(f"more than {caps.max_heads} heads")
    if caps.head_dims is not None:
        gaps.append(f"widths other than {[f'{d}/{v}' for d, v in caps.head_dims]}")
    else:
        gaps.append(f"widths other than {[f'{d}/{v}' for d, v in DEFAULT_WIDTHS]} (not drawn)")
    if not caps.causal:
        gaps.append("causal decode")
    if not caps.strided_cache:
        gaps.append("strided (non-contiguous) cache views")
    if caps.max_s_q < 8:
        gaps.append(f"s_q > {caps.max_s_q}")
    if device not in caps.devices and device.split(":")[0] not in caps.devices:
        gaps.append(f"device {device} is not declared ({list(caps.devices)})")
    if caps.empty_row_lse > 0:
        gaps.append("empty rows checked against the declared lse = +inf convention")
    if coverage is not None and coverage.s_q:
        gaps.append(f"drawn: sequences longer than {coverage.max_length} tokens, batches above {coverage.max_batch}, "
                    f"s_q above {max(coverage.s_q)}, more than {max(coverage.heads)} heads")
    return gaps


def _isolated_check(spec: str, prop_name: str, case_dict: dict) -> tuple[str, object]:
    """Child-process body: ('ok', (sound, sharp)), ('declined', reason) or ('fail', (kind, message, ratio, locus))."""
    from mla_verify.registry import resolve

    impl = resolve(spec)
    try:
        ratios = property_named(prop_name).check(impl, DecodeCase.from_dict(case_dict))
        return "ok", (ratios.sound, ratios.sharp)
    except CaseDeclined as declined:
        return "declined", declined.reason
    except CaseFailure as failure:
        f = failure.finding
        return "fail", (f.kind.value, f.message, f.ratio, f.locus)


class IsolatedRunner:
    """Runs each case in a child process, so that a segfault or a CUDA illegal-address error is a
    counterexample rather than the end of the run. The child is replaced after any failure."""

    def __init__(self) -> None:
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None

    def _executor(self) -> concurrent.futures.ProcessPoolExecutor:
        if self._pool is None:
            # A fork server that has imported torch (but touched no GPU) starts each child in
            # milliseconds and gives it a CUDA context of its own.
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(["torch", "mla_verify.checks", "mla_verify.registry"])
            self._pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=context)
        return self._pool

    def check(self, impl: Implementation, prop: DecodeProperty, case: DecodeCase) -> Ratios:
        try:
            status, payload = self._executor().submit(_isolated_check, impl.spec, prop.name, case.to_dict()).result()
        except concurrent.futures.process.BrokenProcessPool:
            self.close()
            raise CaseFailure(Finding(FailureKind.CRASH, "the child process running the kernel died "
                                      "(segfault, abort or a fatal CUDA error)"), case) from None
        if status == "ok":
            return Ratios(*payload)
        if status == "declined":
            raise CaseDeclined(payload, case)
        self.close()
        kind, message, ratio, locus = payload
        raise CaseFailure(Finding(FailureKind(kind), message, ratio, locus), case)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None


def _case_failures(error: BaseException) -> list[tuple[CaseFailure, bool]]:
    """The CaseFailures inside what Hypothesis raised (one failure, or a group of distinct ones),
    each with whether Hypothesis found it flaky (it did not fail the same way on replay)."""
    flaky = isinstance(error, hypothesis.errors.Flaky)
    if isinstance(error, CaseFailure):
        return [(error, flaky)]
    if isinstance(error, BaseExceptionGroup):
        return [(failure, flaky or inner_flaky) for inner in error.exceptions
                for failure, inner_flaky in _case_failures(inner)]
    return []


def _run_collecting(test: Callable[[], None]) -> dict[str, tuple[CaseFailure, bool]]:
    """Run a Hypothesis test; the distinct failures it raised, by signature."""
    try:
        test()
    except (CaseFailure, BaseExceptionGroup) as error:
        return {failure.finding.signature: (failure, flaky) for failure, flaky in reversed(_case_failures(error))}
    return {}


def run_property(impl: Implementation, prop: DecodeProperty, profile: Profile, device: str = "cpu",
                 max_examples: int | None = None, seed: int | None = None,
                 counterexamples: str | Path | None = None, isolated: IsolatedRunner | None = None,
                 strict: bool = False, progress: Callable[[str], None] = lambda message: None) -> PropertyReport:
    """Run one property under Hypothesis; shrink each distinct failure to a minimal case and save it."""
    report = PropertyReport(prop.name, prop.description)
    strategy = decode_cases(impl.capabilities, profile.limits, device, min_batch=prop.min_batch).map(prop.prepare)

    def check(case: DecodeCase) -> None:
        report.examples += 1
        report.coverage.add(case)
        failure = None
        try:
            ratios = isolated.check(impl, prop, case) if isolated else prop.check(impl, case)
        except CaseDeclined as declined:
            if not strict:
                report.declined += 1
                report.declined_reasons[declined.reason] = report.declined_reasons.get(declined.reason, 0) + 1
                return
            failure = CaseFailure(Finding(FailureKind.DECLINED, declined.reason), case)
        except CaseFailure as caught:
            failure = caught
        if failure is not None:
            report.failed += 1
            if failure.finding.signature in known:
                return  # reported by an earlier round: count it and search on
            raise failure.distinct()  # outside the except block: the signature alone tells failures apart
        report.record(ratios, case)
        if profile.targeted:
            target(ratios.sound, label="error/bound")
            target(ratios.sharp, label="error/sharp tolerance")
        if report.examples % PROGRESS_EVERY == 0:
            progress(f"  {prop.name}: {report.examples} cases, max error/bound {report.max_ratio:.3g} (sound), "
                     f"{report.max_sharp_ratio:.3g} (sharp), {report.failed} failing")

    # one example-database key per (implementation, property, device): a failure stored for one
    # kernel must not be replayed first for another
    check._hypothesis_internal_add_digest = f"{impl.spec}|{prop.name}|{device}".encode()
    # Hypothesis stops generating soon after its first failure (it then shrinks every distinct one
    # it has met). So the search runs in rounds: each round treats the failures already reported as
    # known (counted, not raised) and searches on; the last round is a full run of max_examples
    # that found nothing new, which is what the passing counts and ratios describe.
    found: dict[str, tuple[CaseFailure, bool]] = {}
    known: set[str] = set()
    for round_number in range(MAX_SEARCH_ROUNDS):
        search = hypothesis_settings(profile, max_examples)(given(strategy)(check))
        if seed is not None:
            search = hypothesis.seed(seed + round_number)(search)
        new = _run_collecting(search)
        for signature, entry in new.items():
            found.setdefault(signature, entry)
        if not new.keys() - known:
            break
        known |= new.keys()
    # The pinned regression cases run after the search: Hypothesis never shrinks an explicit
    # example, so trying them first would report them instead of the search's minimal case.
    pinned = given(strategy)(check)
    for case in pinned_cases(impl.capabilities, device, prop.min_batch):
        pinned = example(prop.prepare(case))(pinned)
    pinned = settings(hypothesis_settings(profile), phases=[Phase.explicit])(pinned)
    for signature, entry in _run_collecting(pinned).items():
        found.setdefault(signature, entry)
    for signature, (failure, flaky) in found.items():
        entry = {"signature": signature, "kind": failure.finding.kind.value, "message": failure.finding.message,
                 "case": failure.case.to_dict(), "flaky": flaky, "counterexample": None}
        if counterexamples is not None:
            entry["counterexample"] = str(save_counterexample(counterexamples, impl, prop.name, failure))
        report.failures.append(entry)
    return report


def _versions(impl: Implementation) -> dict:
    from mla_verify.registry import library_version

    versions = {"mla_verify": mla_verify.__version__, "torch": torch.__version__,
                "hypothesis": hypothesis.__version__, "python": platform.python_version()}
    library = library_version(impl.spec)
    if library is not None:
        versions[library[0]] = library[1]
    triton = sys.modules.get("triton")
    if triton is not None:
        versions["triton"] = getattr(triton, "__version__", "?")
    return versions


def _device_info(device: str) -> dict:
    if device.startswith("cuda"):
        return {"type": device, "name": torch.cuda.get_device_name(torch.device(device))}
    return {"type": device, "name": platform.processor() or platform.machine()}


def certify(impl: Implementation, profile: str = "default", device: str = "cpu", max_examples: int | None = None,
            seed: int | None = None, counterexamples: str | Path | None = None, isolate: bool = False,
            properties: list[str] | None = None, strict: bool = False,
            progress: Callable[[str], None] = lambda message: None) -> Certificate:
    chosen = PROFILES[profile]
    selected = [property_named(name) for name in properties] if properties else list(DECODE_PROPERTIES)
    seed = random.randrange(2**32) if seed is None else seed
    isolated = IsolatedRunner() if isolate else None
    started = time.perf_counter()
    reports = []
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)  # the cases are small: two intra-op threads made them ~3x slower on 2 cores
    try:
        for prop in selected:
            progress(f"{prop.name}: {prop.description}")
            report = run_property(impl, prop, chosen, device, max_examples, seed, counterexamples, isolated,
                                  strict, progress)
            progress(f"  {prop.name}: {report.verdict.upper()} ({report.examples} cases, {report.failed} failing, "
                     f"{report.declined} declined, {len(report.failures)} distinct failures)")
            reports.append(report)
    finally:
        torch.set_num_threads(threads)
        if isolated:
            isolated.close()
    caps = impl.capabilities
    capabilities = {key: (str(value) if not isinstance(value, (int, float, str, bool, type(None), tuple)) else value)
                    for key, value in vars(caps).items()}
    capabilities["dtypes"] = [dtype_name(t) for t in caps.dtypes]
    for name in ("accumulation_dtype", "p_dtype", "partials_dtype"):
        if getattr(caps, name) is not None:
            capabilities[name] = dtype_name(getattr(caps, name))
    return Certificate(
        implementation={"name": impl.name, "spec": impl.spec, "capabilities": capabilities},
        versions=_versions(impl), device=_device_info(device),
        settings={"profile": profile, "max_examples": max_examples or chosen.max_examples, "seed": seed,
                  "isolated": isolate, "strict": strict, "properties": [p.name for p in selected],
                  "limits": vars(chosen.limits)},
        properties=reports, not_covered=not_covered(impl, device, reports[0].coverage if reports else None),
        elapsed_s=time.perf_counter() - started)
