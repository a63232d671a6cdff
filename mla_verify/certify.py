"""Certify a decode kernel: run every decode property under Hypothesis and write the certificate.

Certificate schema (JSON, "schema": "mla-verify-certificate/1"):
    implementation  {name, spec, capabilities}        what was certified and what it claims
    versions        {mla_verify, torch, hypothesis, python, [triton]}
    device          {type, name}
    settings        {profile, max_examples, seed, isolated, limits}
    verdict         "pass" | "fail"                   pass only if every property passed
    properties      [{name, description, verdict, examples, max_ratio, worst_case, coverage,
                      failure: {kind, message, case} | null, counterexample: path | null}]
    not_covered     [str]                             what the declared capabilities left out
    elapsed_s       float
max_ratio is the largest observed error / bound over all examples (≤ 1 passes); worst_case is the
case that reached it, reported whether the property passed or not.
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
from hypothesis import strategies as st

import mla_verify
from mla_verify.checks import CaseFailure, FailureKind, Finding, Implementation
from mla_verify.counterexample import save_counterexample
from mla_verify.decode_properties import DECODE_PROPERTIES, DecodeProperty, property_named
from mla_verify.profiles import PROFILES, Profile, hypothesis_settings
from mla_verify.strategies import DEFAULT_PAGES, DEFAULT_WIDTHS, DecodeCase, decode_cases, dtype_name, pinned_cases

__all__ = ["PropertyReport", "Certificate", "certify", "run_property", "Coverage", "not_covered"]

SCHEMA = "mla-verify-certificate/1"


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

    def to_dict(self) -> dict:
        return {key: sorted(value, key=str) if isinstance(value, set) else value for key, value in vars(self).items()}


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
    verdict: str = "pass"
    examples: int = 0
    max_ratio: float = 0.0
    worst_case: dict | None = None
    coverage: Coverage = field(default_factory=Coverage)
    failure: dict | None = None
    counterexample: str | None = None

    def to_dict(self) -> dict:
        data = dict(vars(self))
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
    def verdict(self) -> str:
        return "pass" if all(p.verdict == "pass" for p in self.properties) else "fail"

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "implementation": self.implementation, "versions": self.versions,
                "device": self.device, "settings": self.settings, "verdict": self.verdict,
                "properties": [p.to_dict() for p in self.properties], "not_covered": self.not_covered,
                "elapsed_s": round(self.elapsed_s, 2)}

    def to_markdown(self) -> str:
        impl, lines = self.implementation, []
        lines.append(f"# MLA decode certificate: {impl['name']} — {self.verdict.upper()}")
        lines.append("")
        lines.append(f"- implementation: `{impl['spec']}`")
        lines.append(f"- device: {self.device['type']} ({self.device['name']})")
        lines.append(f"- versions: " + ", ".join(f"{k} {v}" for k, v in self.versions.items()))
        s = self.settings
        lines.append(f"- profile: {s['profile']}, {s['max_examples']} examples per property, seed {s['seed']}, "
                     f"isolated: {s['isolated']}")
        lines.append(f"- elapsed: {self.elapsed_s:.1f} s")
        lines.append("")
        lines.append("| property | verdict | examples | max error/bound | failure |")
        lines.append("|---|---|---|---|---|")
        for p in self.properties:
            failure = f"{p.failure['kind']}: {p.failure['message']}" if p.failure else ""
            lines.append(f"| {p.name} | {p.verdict} | {p.examples} | {p.max_ratio:.3g} | "
                         f"{failure.replace('|', '/')[:200]} |")
        lines.append("")
        for p in self.properties:
            if p.worst_case:
                lines.append(f"- worst case of {p.name}: `{DecodeCase.from_dict(p.worst_case).describe()}`")
            if p.counterexample:
                lines.append(f"- counterexample of {p.name}: `{p.counterexample}` "
                             f"(replay: `mla-verify replay {p.counterexample}`)")
        lines.append("")
        coverage = self.properties[0].coverage.to_dict() if self.properties else {}
        lines.append("Coverage (matches_reference): " + "; ".join(f"{k}: {v}" for k, v in coverage.items()))
        lines.append("")
        lines.append("Not covered: " + ("; ".join(self.not_covered) if self.not_covered else "nothing declared out"))
        return "\n".join(lines) + "\n"


def not_covered(impl: Implementation, device: str) -> list[str]:
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
    return gaps


def _isolated_check(spec: str, prop_name: str, case_dict: dict) -> tuple[str, object]:
    """Child-process body: ('ok', ratio) or ('fail', (kind, message, ratio))."""
    from mla_verify.registry import resolve

    impl = resolve(spec)
    try:
        return "ok", property_named(prop_name).check(impl, DecodeCase.from_dict(case_dict))
    except CaseFailure as failure:
        f = failure.finding
        return "fail", (f.kind.value, f.message, f.ratio)


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

    def check(self, impl: Implementation, prop: DecodeProperty, case: DecodeCase) -> float:
        try:
            status, payload = self._executor().submit(_isolated_check, impl.spec, prop.name, case.to_dict()).result()
        except concurrent.futures.process.BrokenProcessPool:
            self.close()
            raise CaseFailure(Finding(FailureKind.CRASH, "the child process running the kernel died "
                                      "(segfault, abort or a fatal CUDA error)"), case) from None
        if status == "ok":
            return payload
        self.close()
        kind, message, ratio = payload
        raise CaseFailure(Finding(FailureKind(kind), message, ratio), case)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None


def run_property(impl: Implementation, prop: DecodeProperty, profile: Profile, device: str = "cpu",
                 max_examples: int | None = None, seed: int | None = None,
                 counterexamples: str | Path | None = None, isolated: IsolatedRunner | None = None,
                 progress: Callable[[str], None] = lambda message: None) -> PropertyReport:
    """Run one property under Hypothesis; shrink a failure to a minimal case and save it."""
    report = PropertyReport(prop.name, prop.description)
    last_failure: list[CaseFailure] = []
    strategy = decode_cases(impl.capabilities, profile.limits, device, min_batch=prop.min_batch).map(prop.prepare)

    def check(case: DecodeCase) -> None:
        report.examples += 1
        report.coverage.add(case)
        try:
            ratio = isolated.check(impl, prop, case) if isolated else prop.check(impl, case)
        except CaseFailure as failure:
            last_failure[:] = [failure]
            raise
        if profile.targeted:
            target(ratio, label="error/bound")
        if ratio > report.max_ratio:  # exact properties (ratio 0) have no worst case
            report.max_ratio, report.worst_case = ratio, case.to_dict()
        if report.examples % 25 == 0:
            progress(f"  {prop.name}: {report.examples} examples, max error/bound {report.max_ratio:.3g}")

    # one example-database key per (implementation, property, device): a failure stored for one
    # kernel must not be replayed first for another
    check._hypothesis_internal_add_digest = f"{impl.spec}|{prop.name}|{device}".encode()
    search = hypothesis_settings(profile, max_examples)(given(strategy)(check))
    if seed is not None:
        search = hypothesis.seed(seed)(search)
    # The pinned regression cases run after the search: Hypothesis never shrinks an explicit
    # example, so trying them first would report them instead of the search's minimal case.
    pinned = given(strategy)(check)
    for case in pinned_cases(impl.capabilities, device, prop.min_batch):
        pinned = example(prop.prepare(case))(pinned)
    pinned = settings(hypothesis_settings(profile), phases=[Phase.explicit])(pinned)
    flaky = False
    try:
        search()
        pinned()
    except CaseFailure:
        pass
    except hypothesis.errors.Flaky:
        # the same case failed differently (or not at all) on replay: nondeterministic output,
        # e.g. unwritten memory; still a failure, reported as the last one seen
        flaky = True
    if last_failure:
        failure = last_failure[0]  # Hypothesis replays the shrunk example last
        report.verdict = "fail"
        report.failure = {"kind": failure.finding.kind.value, "message": failure.finding.message,
                          "case": failure.case.to_dict()}
        if flaky:
            report.failure["message"] += " (flaky: replaying this case did not fail the same way)"
        if counterexamples is not None:
            report.counterexample = str(save_counterexample(counterexamples, impl, prop.name, failure))
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
            properties: list[str] | None = None,
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
                                  progress)
            progress(f"  {prop.name}: {report.verdict.upper()} ({report.examples} examples, "
                     f"max error/bound {report.max_ratio:.3g})")
            reports.append(report)
    finally:
        torch.set_num_threads(threads)
        if isolated:
            isolated.close()
    caps = impl.capabilities
    capabilities = {key: (str(value) if not isinstance(value, (int, float, str, bool, type(None), tuple)) else value)
                    for key, value in vars(caps).items()}
    capabilities["dtypes"] = [dtype_name(t) for t in caps.dtypes]
    if caps.accumulation_dtype is not None:
        capabilities["accumulation_dtype"] = dtype_name(caps.accumulation_dtype)
    return Certificate(
        implementation={"name": impl.name, "spec": impl.spec, "capabilities": capabilities},
        versions=_versions(impl), device=_device_info(device),
        settings={"profile": profile, "max_examples": max_examples or chosen.max_examples, "seed": seed,
                  "isolated": isolate, "properties": [p.name for p in selected], "limits": vars(chosen.limits)},
        properties=reports, not_covered=not_covered(impl, device), elapsed_s=time.perf_counter() - started)
