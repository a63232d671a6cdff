"""Certify a decode kernel: run every decode property under Hypothesis and write the certificate.

The search does not stop at the first failure: each distinct failure (its signature: the failure
kind and where it arises, see `mla_verify.decode.checks.Finding`) is shrunk on its own by Hypothesis
(report_multiple_bugs) and gets its own minimal case, counterexample artifact and replay command.
A case the kernel declines (`mla_verify.Declined`, NotImplementedError) is counted with its reason
and the search goes on; with `strict` it is a failure.

Certificate schema (JSON, "schema": "mla-verify-certificate/3"; strict JSON: non-finite floats are
the strings "inf", "-inf", "nan"):
    implementation  {name, spec, capabilities}        what was certified and what it claims
    versions        {mla_verify, torch, hypothesis, numpy, python, [triton], [the kernel's library]}
    device          {type, name}
    provenance      {created, command, revision, kernel_source {path, sha256}, cpu, host}
    settings        {profile, max_examples, seed, isolated, strict, timeout_s, properties, limits}
    verdict         "pass" | "pass with declined cases" | "fail"
    headline        "PASS" | "PASS with declined cases (k of n cases declined)" | "FAIL: N distinct failures"
    distinct_failures  int                            over all properties
    properties      [{name, description, verdict, examples, passed, failed, declined,
                      declined_reasons {reason: count}, max_ratio, max_sharp_ratio, worst_case,
                      worst_sharp_case, worst {sound, sharp}, coverage {..., counts {category: cases}},
                      failures: [{signature, kind, message, ratio, case, description, counterexample, flaky}],
                      cases: [{outcome, sound, sharp, dtype, heads, batch, s_q, max_length, page_size,
                               regime, causal}]}]
    not_covered     [str]                             what the declaration left out and the limits drawn
    elapsed_s       float
max_ratio / max_sharp_ratio are the largest observed error / tolerance of each tier over the cases
that passed (≤ 1); worst_case / worst_sharp_case the cases that reached them, and worst says where
(the element or row, its error and its tolerance). cases has one record per case judged, shrinking
steps included; a failing case carries the ratio of the tier it failed, when it has one.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import inspect
import math
import multiprocessing
import multiprocessing.connection
import platform
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import hypothesis
import hypothesis.errors
import numpy
import torch
from hypothesis import Phase, example, given, settings, target

import mla_verify
from mla_verify.decode.checks import (DEFAULT_TIMEOUT_S, CaseDeclined, CaseFailure, FailureKind, Finding,
                               Implementation, Ratios)
from mla_verify.counterexample import save_counterexample
from mla_verify.decode.properties import DECODE_PROPERTIES, DecodeProperty, property_named
from mla_verify.profiles import PROFILES, Profile, hypothesis_settings
from mla_verify.progress import Progress
from mla_verify.registry import module_root
from mla_verify.decode.case import SERVING_LENGTH, DecodeCase, dtype_name
from mla_verify.decode.strategies import DEFAULT_PAGES, DEFAULT_WIDTHS, decode_cases, pinned_cases

__all__ = ["PropertyReport", "Certificate", "certify", "run_property", "Coverage", "not_covered"]

SCHEMA = "mla-verify-certificate/3"
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
    # cases per category: each dtype, causal, empty rows, varlen, strided, permuted, pooled, ...
    counts: dict = field(default_factory=dict)

    def add(self, case: DecodeCase) -> None:
        for category, present in ((case.dtype, True), ("causal", case.causal), ("s_q > 1", case.s_q > 1),
                                  ("empty rows", 0 in case.lengths), ("varlen", len(set(case.lengths)) > 1),
                                  ("strided cache", case.strided_cache), ("permuted pages", case.permute_pages),
                                  ("pooled cache", case.pooled_cache), ("q " + case.q_layout, True),
                                  ("serving scale", _serving_scale(case))):
            if present:
                self.counts[category] = self.counts.get(category, 0) + 1
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
        self.serving_scale += _serving_scale(case)

    def to_dict(self) -> dict:
        return {key: sorted(value, key=lambda v: (type(v).__name__, v)) if isinstance(value, set) else
                dict(sorted(value.items())) if isinstance(value, dict) else value
                for key, value in vars(self).items()}


def _serving_scale(case: DecodeCase) -> bool:
    return case.batch >= 32 or max(case.lengths, default=0) >= SERVING_LENGTH


def _length_kind(n: int, page: int) -> str:
    if n in (0, 1):
        return str(n)
    for name, value in (("page-1", page - 1), ("page", page), ("page+1", page + 1)):
        if n == value:
            return name
    return "multiple of page" if n % page == 0 else "other"


def _case_record(case: DecodeCase, outcome: str, sound: float | None = None, sharp: float | None = None) -> dict:
    return {"outcome": outcome, "sound": sound, "sharp": sharp, "dtype": case.dtype, "heads": case.heads,
            "batch": case.batch, "s_q": case.s_q, "max_length": max(case.lengths, default=0),
            "page_size": case.page_size, "regime": case.regime, "causal": case.causal}


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
    # where each tier's largest ratio arose, with the error and the tolerance there
    worst: dict = field(default_factory=lambda: {"sound": "", "sharp": ""})
    coverage: Coverage = field(default_factory=Coverage)
    failures: list = field(default_factory=list)
    # one record per case judged (outcome, both ratios, the case's shape), for plots and audits
    cases: list = field(default_factory=list)

    @property
    def verdict(self) -> str:
        if self.failures:
            return "fail"
        return "pass with declined cases" if self.declined else "pass"

    def record(self, ratios: Ratios, case: DecodeCase) -> None:
        self.passed += 1
        self.cases.append(_case_record(case, "pass", ratios.sound, ratios.sharp))
        # exact properties (ratio 0) have no worst case
        if ratios.sound > self.max_ratio:
            self.max_ratio, self.worst_case, self.worst["sound"] = ratios.sound, case.to_dict(), ratios.sound_at
        if ratios.sharp > self.max_sharp_ratio:
            self.max_sharp_ratio, self.worst_sharp_case, self.worst["sharp"] = (ratios.sharp, case.to_dict(),
                                                                              ratios.sharp_at)

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
    provenance: dict = field(default_factory=dict)

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
        """The certificate as JSON-ready data (infinities and NaN as the strings "inf", "-inf", "nan")."""
        return json_safe({"schema": SCHEMA, "implementation": self.implementation, "versions": self.versions,
                          "device": self.device, "provenance": self.provenance, "settings": self.settings,
                          "verdict": self.verdict, "headline": self.headline(),
                          "distinct_failures": self.distinct_failures,
                          "properties": [p.to_dict() for p in self.properties], "not_covered": self.not_covered,
                          "elapsed_s": round(self.elapsed_s, 2)})

    def to_markdown(self) -> str:
        return certificate_markdown(self.to_dict())


def json_safe(value: object) -> object:
    """`value` with every non-finite float as a string: strict JSON has no inf or NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


# what a bare function is assumed to do; a declaration that differs is printed in the certificate
_DEFAULT_CLAIMS = {"lse_base": "e", "empty_row_lse": "-inf", "accumulation_dtype": None, "p_dtype": None,
                   "partials_dtype": None, "deterministic": True}


def _ratio(value: object) -> str:
    return value if isinstance(value, str) else f"{value:.3g}"


def certificate_markdown(data: dict) -> str:
    """The Markdown page of a certificate's data (to_dict()); pipes in messages are escaped."""
    impl, lines = data["implementation"], []
    lines.append(f"# MLA decode certificate: {impl['name']} — {data['headline']}")
    lines.append("")
    lines.append(f"- implementation: `{impl['spec']}`")
    claims = {k: impl["capabilities"].get(k) for k, v in _DEFAULT_CLAIMS.items()
              if k in impl["capabilities"] and impl["capabilities"].get(k) != v}
    if claims:
        lines.append("- declared, judged accordingly: " + ", ".join(f"{k} = {v}" for k, v in claims.items()))
    lines.append(f"- device: {data['device']['type']} ({data['device']['name']})")
    lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in data["versions"].items()))
    s = data["settings"]
    lines.append(f"- profile: {s['profile']}, {s['max_examples']} examples per property, seed {s['seed']}, "
                 f"isolated: {s['isolated']}, strict: {s['strict']}, time limit per call: {s.get('timeout_s')} s")
    provenance = data.get("provenance") or {}
    if provenance.get("command"):
        lines.append(f"- command: `{provenance['command']}`")
    for key in ("created", "revision", "cpu"):
        if provenance.get(key):
            lines.append(f"- {key}: {provenance[key]}")
    if provenance.get("kernel_source"):
        source = provenance["kernel_source"]
        lines.append(f"- kernel source: `{source['path']}` (sha256 {source['sha256'][:16]}…)")
    lines.append(f"- elapsed: {data['elapsed_s']:.1f} s")
    lines.append("")
    lines.append("| property | verdict | cases | passed | failed | declined | max error/bound (sound) "
                 "| max error/tolerance (sharp) | worst failure (error/bound) |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for p in data["properties"]:
        worst_failure = max((f["ratio"] for f in p["failures"] if not isinstance(f["ratio"], str)), default=None)
        failing = ("—" if not p["failures"] else "∞ or not a ratio" if worst_failure is None
                   else f"{worst_failure:.3g}")
        lines.append(f"| {p['name']} | {p['verdict']} | {p['examples']} | {p['passed']} | {p['failed']} | "
                     f"{p['declined']} | {_ratio(p['max_ratio'])} | {_ratio(p['max_sharp_ratio'])} | {failing} |")
    lines.append("")
    lines.append("error/bound is the observed error divided by the tolerance the case allows; ≤ 1 passes. The "
                 "max columns are over the cases that passed. Sound tier: a worst-case rounding-error bound, "
                 "element by element. Sharp tier: a probabilistic rounding model on the lse and on each row's "
                 "error norm (see mla_verify/decode/bounds.py).")
    for p in data["properties"]:
        for number, failure in enumerate(p["failures"], 1):
            lines.append("")
            lines.append(f"## {p['name']}: failure {number} of {len(p['failures'])} — "
                         f"{_escape(failure['signature'])}")
            lines.append("")
            lines.append(f"- {_escape(failure['message'])}" + (" (flaky)" if failure.get("flaky") else ""))
            lines.append(f"- minimal case: `{_describe_case(failure)}`")
            if failure.get("counterexample"):
                lines.append(f"- counterexample: `{failure['counterexample']}` "
                             f"(replay: `mla-verify replay {failure['counterexample']}`)")
        if p["declined_reasons"]:
            lines.append("")
            lines.append(f"Declined by {p['name']} ({p['declined']} of {p['examples']} cases):")
            lines += [f"- {count} × {_escape(reason)}" for reason, count in p["declined_reasons"].items()]
    lines.append("")
    for p in data["properties"]:
        for tier, case_key in (("sound", "worst_case"), ("sharp", "worst_sharp_case")):
            if p.get(case_key):
                where = p.get("worst", {}).get(tier)
                lines.append(f"- worst passing case of {p['name']} ({tier}): "
                             f"`{DecodeCase.from_dict(p[case_key]).describe()}`"
                             + (f"; {_escape(where)}" if where else ""))
    lines.append("")
    first = data["properties"][0] if data["properties"] else None
    if first:
        counts = first["coverage"].get("counts", {})
        lines.append(f"Cases of {first['name']} per category: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        lines.append("")
        coverage = {k: v for k, v in first["coverage"].items() if k != "counts"}
        lines.append(f"Coverage ({first['name']}): " + "; ".join(f"{k}: {v}" for k, v in coverage.items()))
        lines.append("")
    lines.append("Not covered: " + ("; ".join(data["not_covered"]) if data["not_covered"] else "nothing declared out"))
    return "\n".join(lines) + "\n"


def _describe_case(failure: dict) -> str:
    return failure.get("description") or DecodeCase.from_dict(failure["case"]).describe()


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


def _serve_isolated(connection: multiprocessing.connection.Connection, spec: str, timeout_s: float | None) -> None:
    """Child-process body: judge each (property, case) sent until None arrives. Replies
    ('ok', Ratios), ('declined', reason) or ('fail', Finding)."""
    from mla_verify.registry import resolve

    impl = dataclasses.replace(resolve(spec), timeout_s=timeout_s)
    while (request := connection.recv()) is not None:
        prop_name, case_dict = request
        try:
            reply = "ok", property_named(prop_name).check(impl, DecodeCase.from_dict(case_dict))
        except CaseDeclined as declined:
            reply = "declined", declined.reason
        except CaseFailure as failure:
            reply = "fail", failure.finding
        connection.send(reply)


# failures after which the child may hold a broken state (a sticky CUDA error, a half-finished call)
_RESTART_AFTER = {FailureKind.EXCEPTION, FailureKind.CRASH, FailureKind.TIMEOUT}
# time a child gets beyond the kernel's own limit (building the case, the reference) before it is killed
_ISOLATION_GRACE_S = 120.0


class IsolatedRunner:
    """Runs each case in a child process, so that a segfault, a CUDA illegal-address error or a
    hang is a counterexample rather than the end of the run. The child is replaced after a crash,
    a timeout or an exception; wrong numbers leave it running, as starting one costs seconds
    (CUDA context, kernel loading)."""

    def __init__(self, timeout_s: float | None = DEFAULT_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s
        self._child: multiprocessing.process.BaseProcess | None = None
        self._connection: multiprocessing.connection.Connection | None = None
        self._spec: str | None = None

    def _start(self, spec: str) -> multiprocessing.connection.Connection:
        if self._child is not None and self._spec == spec and self._child.is_alive():
            return self._connection
        self.close()
        # A fork server that has imported torch (but touched no GPU) starts each child quickly
        # and gives it a CUDA context of its own. The kernel's module is imported in the child:
        # one that touches CUDA on import would leave every forked child a broken context.
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["torch", "mla_verify.decode.properties", "mla_verify.registry"])
        ours, theirs = context.Pipe()
        self._child = context.Process(target=_serve_isolated, args=(theirs, spec, self.timeout_s), daemon=True)
        self._child.start()
        theirs.close()
        self._connection, self._spec = ours, spec
        return ours

    def check(self, impl: Implementation, prop: DecodeProperty, case: DecodeCase) -> Ratios:
        connection = self._start(impl.spec)
        limit = None if self.timeout_s is None else self.timeout_s + _ISOLATION_GRACE_S
        try:
            connection.send((prop.name, case.to_dict()))
            if not connection.poll(limit):
                self.close()
                raise CaseFailure(Finding(FailureKind.TIMEOUT, f"the case did not finish within {limit:g} s; "
                                          "the child process running it was killed"), case)
            status, payload = connection.recv()
        except (EOFError, OSError):
            self.close()
            raise CaseFailure(Finding(FailureKind.CRASH, "the child process running the kernel died "
                                      "(segfault, abort or a fatal CUDA error)"), case) from None
        if status == "ok":
            return payload
        if status == "declined":
            raise CaseDeclined(payload, case)
        if payload.kind in _RESTART_AFTER:
            self.close()
        raise CaseFailure(payload, case)

    def close(self) -> None:
        if self._child is not None:
            try:
                self._connection.send(None)
            except OSError:
                pass
            self._child.join(1.0)
            if self._child.is_alive():
                self._child.kill()
                self._child.join()
            self._connection.close()
        self._child = self._connection = self._spec = None


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
                 strict: bool = False, progress: Progress | None = None) -> PropertyReport:
    """Run one property under Hypothesis; shrink each distinct failure to a minimal case and save it."""
    report = PropertyReport(prop.name, prop.description)
    progress = progress or Progress()
    planned = max_examples or profile.max_examples
    plan = {"cases": planned}  # grows by a round's examples when a round finds a new failure
    strategy = decode_cases(impl.capabilities, profile.limits, device, min_batch=prop.min_batch).map(prop.prepare)

    def check(case: DecodeCase) -> None:
        report.examples += 1
        report.coverage.add(case)
        try:
            judge(case)
        finally:
            progress.case_done(report, plan["cases"])

    def judge(case: DecodeCase) -> None:
        failure = None
        try:
            ratios = isolated.check(impl, prop, case) if isolated else prop.check(impl, case)
        except CaseDeclined as declined:
            if not strict:
                report.declined += 1
                report.declined_reasons[declined.reason] = report.declined_reasons.get(declined.reason, 0) + 1
                report.cases.append(_case_record(case, "declined"))
                return
            failure = CaseFailure(Finding(FailureKind.DECLINED, declined.reason), case)
        except CaseFailure as caught:
            failure = caught
        if failure is not None:
            report.failed += 1
            finding = failure.finding
            ratio = finding.ratio if math.isfinite(finding.ratio) else None
            report.cases.append(_case_record(case, "fail", ratio if finding.tier == "sound" else None,
                                             ratio if finding.tier == "sharp" else None))
            if failure.finding.signature in known:
                return  # reported by an earlier round: count it and search on
            raise failure.distinct()  # outside the except block: the signature alone tells failures apart
        report.record(ratios, case)
        if profile.targeted:
            target(ratios.sound, label="error/bound")
            target(ratios.sharp, label="error/sharp tolerance")

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
        plan["cases"] = report.examples + planned
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
                 "ratio": failure.finding.ratio, "case": failure.case.to_dict(),
                 "description": failure.case.describe(), "flaky": flaky, "counterexample": None}
        if counterexamples is not None:
            entry["counterexample"] = str(save_counterexample(counterexamples, impl, prop.name, failure))
        report.failures.append(entry)
    return report


def _versions(impl: Implementation) -> dict:
    from mla_verify.registry import library_version

    versions = {"mla_verify": mla_verify.__version__, "torch": torch.__version__,
                "hypothesis": hypothesis.__version__, "numpy": numpy.__version__, "python": platform.python_version()}
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


def _provenance(impl: Implementation, command: str | None) -> dict:
    """When, how and from what the certificate was made: enough to rerun it and to tell whether the
    kernel's source or this tool has changed since."""
    return {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": command, "revision": _revision(), "kernel_source": _source_of(impl.fn),
            "cpu": _cpu_model(), "host": platform.platform()}


def _revision() -> str | None:
    """The version-control revision of this mla_verify checkout ('+dirty' with local changes), if any."""
    here = Path(mla_verify.__file__).resolve().parent
    try:
        revision = subprocess.run(["git", "-C", str(here), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                  text=True, timeout=10)
        if revision.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no", "--", "."],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return revision.stdout.strip() + ("+dirty" if dirty else "")


def _source_of(fn: Callable) -> dict | None:
    try:
        path = inspect.getsourcefile(inspect.unwrap(fn))
    except TypeError:
        return None
    if path is None or not Path(path).is_file():
        return None
    # named from the folder it was imported from, so that certificates carry no machine's layout
    root = module_root(inspect.unwrap(fn))
    shown = Path(path).resolve()
    if root is not None and shown.is_relative_to(root):
        shown = shown.relative_to(root)
    return {"path": shown.as_posix() if not shown.is_absolute() else shown.name,
            "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest()}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def certify(impl: Implementation, profile: str = "default", device: str = "cpu", max_examples: int | None = None,
            seed: int | None = None, counterexamples: str | Path | None = None, isolate: bool = False,
            properties: list[str] | None = None, strict: bool = False, progress: Progress | None = None,
            timeout_s: float | None = DEFAULT_TIMEOUT_S, command: str | None = None) -> Certificate:
    """Certify `impl` under a profile. timeout_s limits each kernel call (None: no limit); command is
    the command line recorded in the certificate."""
    chosen = PROFILES[profile]
    selected = [property_named(name) for name in properties] if properties else list(DECODE_PROPERTIES)
    seed = random.randrange(2**32) if seed is None else seed
    progress = progress or Progress()
    impl = dataclasses.replace(impl, timeout_s=timeout_s)
    isolated = IsolatedRunner(timeout_s) if isolate else None
    started = time.perf_counter()
    reports = []
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)  # the cases are small: two intra-op threads made them ~3x slower on 2 cores
    try:
        for prop in selected:
            progress.start(prop.name, prop.description, max_examples or chosen.max_examples)
            report = run_property(impl, prop, chosen, device, max_examples, seed, counterexamples, isolated,
                                  strict, progress)
            progress.finish(report)
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
                  "isolated": isolate, "strict": strict, "timeout_s": timeout_s,
                  "properties": [p.name for p in selected], "limits": vars(chosen.limits)},
        properties=reports, not_covered=not_covered(impl, device, reports[0].coverage if reports else None),
        elapsed_s=time.perf_counter() - started, provenance=_provenance(impl, command))
