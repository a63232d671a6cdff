"""The certification runner, shared by decode kernels and whole layers: each property under
Hypothesis, searching in rounds for every distinct failure, then the certificate.

The search does not stop at the first failure: each distinct failure (its signature: the failure
kind and where it arises — for a decode kernel see `mla_verify.decode.checks.Finding`, for a layer
its kind and stage) is shrunk on its own by Hypothesis (report_multiple_bugs) and gets its own
minimal case, counterexample artifact and replay command. A case the implementation declines
(`mla_verify.Declined`, NotImplementedError) is counted with its reason and the search goes on;
with `strict` it is a failure. What differs between the halves (properties, cases, coverage,
judging one case, the artifact) is a `Half` (mla_verify.certify.halves); with `--isolate` each
case is judged in a child process (`IsolatedRunner`).
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import multiprocessing.connection
import random
import time
from pathlib import Path
from typing import Callable

import hypothesis
import hypothesis.errors
import torch
from hypothesis import Phase, example, given, settings, target

from mla_verify.certify.certificate import Certificate, PropertyReport, device_info, provenance, versions
from mla_verify.certify.halves import (CRASH, DECLINED, TIMEOUT, CaseFault, CaseRefused, DecodeHalf, Fault, Half,
                                       LayerHalf, LayerProperty, NothingToCertify, half_of)
from mla_verify.certify.profiles import PROFILES, Profile, hypothesis_settings
from mla_verify.certify.progress import Progress
from mla_verify.certify.registry import LayerImplementation
from mla_verify.decode.case import DecodeCase
from mla_verify.decode.checks import DEFAULT_TIMEOUT_S, Implementation, Ratios
from mla_verify.decode.properties import DecodeProperty

__all__ = ["MAX_SEARCH_ROUNDS", "IsolatedRunner", "run_property", "certify", "assemble", "in_process_worker"]

MAX_SEARCH_ROUNDS = 8  # a round per newly found failure signature, then one that finds none
# failures after which an isolated child may hold a broken state (a sticky CUDA error, a
# half-finished call)
_RESTART_AFTER = ("exception raised", "exception", CRASH, TIMEOUT)


# ----------------------------------------------------------------------------------------------
# Cases in a child process
# ----------------------------------------------------------------------------------------------

def _serve_isolated(connection: multiprocessing.connection.Connection, kind: str, spec: str,
                    timeout_s: float | None) -> None:
    """Child-process body: judge each (property, case, device) sent until None arrives. Replies
    ('ok', (Ratios, details)), ('declined', reason) or ('fail', Fault)."""
    from mla_verify.certify.registry import resolve_any

    impl = dataclasses.replace(resolve_any(spec, layer=kind == LayerHalf.kind), timeout_s=timeout_s)
    half = half_of(impl)
    while (request := connection.recv()) is not None:
        prop_name, case_dict, device = request
        if device == "cpu":
            torch.set_num_threads(1)  # as in the parent: small cases, 1 intra-op thread is fastest
        try:
            reply = "ok", half.judge(impl, half.property_named(prop_name), half.case_from_dict(case_dict), device)
        except CaseRefused as refused:
            reply = "declined", refused.reason
        except CaseFault as failure:
            reply = "fail", failure.fault
        connection.send(reply)


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
        self._key: tuple[str, str] | None = None

    def _start(self, kind: str, spec: str) -> multiprocessing.connection.Connection:
        if self._child is not None and self._key == (kind, spec) and self._child.is_alive():
            return self._connection
        self.close()
        # A fork server that has imported torch (but touched no GPU) starts each child quickly
        # and gives it a CUDA context of its own. The kernel's module is imported in the child:
        # one that touches CUDA on import would leave every forked child a broken context.
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["torch", "mla_verify.decode.properties", "mla_verify.certify.registry",
                                        "mla_verify.layer"])
        ours, theirs = context.Pipe()
        self._child = context.Process(target=_serve_isolated, args=(theirs, kind, spec, self.timeout_s),
                                      daemon=True)
        self._child.start()
        theirs.close()
        self._connection, self._key = ours, (kind, spec)
        return ours

    def judge(self, impl: object, prop: object, case: object, device: str = "cpu") -> tuple[Ratios, dict]:
        """As Half.judge, in the child process."""
        kind = getattr(impl, "kind", DecodeHalf.kind)
        connection = self._start(kind, impl.spec)
        limit = None if self.timeout_s is None else self.timeout_s + _ISOLATION_GRACE_S
        try:
            connection.send((prop.name, case.to_dict(), device))
            if not connection.poll(limit):
                self.close()
                raise CaseFault(Fault(TIMEOUT, f"the case did not finish within {limit:g} s; the child process "
                                               "running it was killed"), case)
            status, payload = connection.recv()
        except (EOFError, OSError):
            self.close()
            raise CaseFault(Fault(CRASH, "the child process running the implementation died (segfault, abort "
                                         "or a fatal CUDA error)"), case) from None
        if status == "ok":
            return payload
        if status == "declined":
            raise CaseRefused(payload, case)
        if payload.kind in _RESTART_AFTER:
            self.close()
        raise CaseFault(payload, case)

    def check(self, impl: Implementation, prop: DecodeProperty, case: DecodeCase) -> Ratios:
        """A decode case in the child: its ratios (CaseFault / CaseRefused as judge raises them)."""
        return self.judge(impl, prop, case, getattr(case, "device", "cpu"))[0]

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
        self._child = self._connection = self._key = None


# ----------------------------------------------------------------------------------------------
# The search
# ----------------------------------------------------------------------------------------------

def _case_faults(error: BaseException) -> list[tuple[CaseFault, bool]]:
    """The CaseFaults inside what Hypothesis raised (one failure, or a group of distinct ones),
    each with whether Hypothesis found it flaky (it did not fail the same way on replay)."""
    flaky = isinstance(error, hypothesis.errors.Flaky)
    if isinstance(error, CaseFault):
        return [(error, flaky)]
    if isinstance(error, BaseExceptionGroup):
        return [(failure, flaky or inner_flaky) for inner in error.exceptions
                for failure, inner_flaky in _case_faults(inner)]
    return []


# Row lengths a failure met in longer rows is tried again at, shortest first.
SHORT_ROWS = (3, 17, 130)


def _in_short_rows(failure: CaseFault, judge: Callable[[object], None]) -> CaseFault:
    """The same failure (same signature) on the case with every row cut to the first of SHORT_ROWS
    at which it still shows, else `failure` itself. Hypothesis cannot do this for a serving-scale
    draw: with the serving flag off, the rest of its choices make no case, so a bug that shows in
    any row would be reported at 16k tokens. Crashes, timeouts and refusals are not retried (each
    try could cost a timeout)."""
    case = failure.case
    if not isinstance(case, DecodeCase) or failure.fault.kind in (CRASH, TIMEOUT, DECLINED):
        return failure
    for rows in SHORT_ROWS:
        if max(case.lengths, default=0) <= rows:
            break
        try:
            shorter = case.replace(lengths=tuple(min(n, rows) for n in case.lengths))
            judge(shorter)
        except CaseFault as caught:
            if caught.fault.signature == failure.fault.signature:
                return caught
        except (CaseRefused, ValueError):
            continue
    return failure


def _run_collecting(test: Callable[[], None]) -> dict[str, tuple[CaseFault, bool]]:
    """Run a Hypothesis test; the distinct failures it raised, by signature."""
    try:
        test()
    except (CaseFault, BaseExceptionGroup) as error:
        return {failure.fault.signature: (failure, flaky) for failure, flaky in reversed(_case_faults(error))}
    return {}


def run_property(impl: Implementation | LayerImplementation, prop: DecodeProperty | LayerProperty, profile: Profile,
                 device: str = "cpu", max_examples: int | None = None, seed: int | None = None,
                 counterexamples: str | Path | None = None, isolated: IsolatedRunner | None = None,
                 strict: bool = False, progress: Progress | None = None, dtypes: tuple[str, ...] | None = None,
                 half: Half | None = None, search: bool = True, pinned: bool = True) -> PropertyReport:
    """Run one property under Hypothesis; shrink each distinct failure to a minimal case and save it.
    search: the drawn cases, in rounds; pinned: the half's pinned regression cases (a worker of a
    parallel run does one or the other: mla_verify.certify.workers)."""
    half = half or half_of(impl)
    report = PropertyReport(prop.name, prop.description, coverage=half.new_coverage())
    progress = progress or Progress()
    planned = max_examples or profile.max_examples
    plan = {"cases": planned}  # grows by a round's examples when a round finds a new failure
    strategy = half.strategy(impl, prop, profile, device, dtypes)

    def check(case: object) -> None:
        report.examples += 1
        report.coverage.add(case)
        try:
            judge(case)
        finally:
            progress.case_done(report, plan["cases"])

    def judge_once(case: object) -> tuple:
        """The property on one case, in this process or the isolated child: (ratios, details), or
        CaseFault / CaseRefused. Nothing counted."""
        return (isolated or half).judge(impl, prop, case, device)

    def judge(case: object) -> None:
        failure = None
        try:
            ratios, details = judge_once(case)
        except CaseRefused as refused:
            if not strict:
                report.declined += 1
                report.declined_reasons[refused.reason] = report.declined_reasons.get(refused.reason, 0) + 1
                report.cases.append(half.record(case, "declined"))
                return
            failure = CaseFault(Fault(DECLINED, refused.reason), case)
        except CaseFault as caught:
            failure = caught
        if failure is not None:
            report.failed += 1
            fault = failure.fault
            ratio = fault.ratio if math.isfinite(fault.ratio) else None
            report.cases.append(half.record(case, "fail", ratio if fault.tier == "sound" else None,
                                            ratio if fault.tier == "sharp" else None))
            if fault.signature in known:
                return  # reported by an earlier round: count it and search on
            raise failure.distinct()  # outside the except block: the signature alone tells failures apart
        report.record(ratios, case, half.record(case, "pass", ratios.sound, ratios.sharp))
        half.note(report, details, case)
        if profile.targeted:
            target(ratios.sound, label="error/bound")
            target(ratios.sharp, label="error/sharp tolerance")

    # one example-database key per (implementation, property, device): a failure stored for one
    # kernel must not be replayed first for another
    check._hypothesis_internal_add_digest = half.digest(impl, prop, device)
    # Hypothesis stops generating soon after its first failure (it then shrinks every distinct one
    # it has met). So the search runs in rounds: each round treats the failures already reported as
    # known (counted, not raised) and searches on; the last round is a full run of max_examples
    # that found nothing new, which is what the passing counts and ratios describe.
    found: dict[str, tuple[CaseFault, bool]] = {}
    known: set[str] = set()
    for round_number in range(MAX_SEARCH_ROUNDS if search else 0):
        search = hypothesis_settings(profile, max_examples)(given(strategy)(check))
        if seed is not None:
            search = hypothesis.seed(seed + round_number)(search)
        try:
            new = _run_collecting(search)
        except (hypothesis.errors.FailedHealthCheck, hypothesis.errors.Unsatisfiable) as error:
            raise NothingToCertify(half.nothing_drawn(impl, error)) from None
        for signature, entry in new.items():
            found.setdefault(signature, entry)
        if not new.keys() - known:
            break
        known |= new.keys()
        plan["cases"] = report.examples + planned
    # The pinned regression cases run after the search: Hypothesis never shrinks an explicit
    # example, so trying them first would report them instead of the search's minimal case.
    pinned_examples = half.pinned(impl, prop, device, dtypes) if pinned else []
    if pinned_examples:
        explicit = given(strategy)(check)
        for case in pinned_examples:
            explicit = example(case)(explicit)
        explicit = settings(hypothesis_settings(profile), phases=[Phase.explicit])(explicit)
        for signature, entry in _run_collecting(explicit).items():
            found.setdefault(signature, entry)
    for signature, (failure, flaky) in found.items():
        if not flaky:
            failure = _in_short_rows(failure, judge_once)
        fault = failure.fault
        entry = {"signature": signature, "kind": fault.kind, "message": fault.message, "ratio": fault.ratio,
                 "case": failure.case.to_dict(), "description": failure.description, "flaky": flaky,
                 "counterexample": None}
        if counterexamples is not None:
            entry["counterexample"] = str(half.save(counterexamples, impl, prop.name, fault, failure.case, device))
        report.failures.append(entry)
    return report


def certify(impl: Implementation | LayerImplementation, profile: str = "default", device: str = "cpu",
            max_examples: int | None = None, seed: int | None = None, counterexamples: str | Path | None = None,
            isolate: bool = False, properties: list[str] | None = None, strict: bool = False,
            progress: Progress | None = None, timeout_s: float | None = DEFAULT_TIMEOUT_S,
            command: str | None = None, dtypes: list[str] | tuple[str, ...] | None = None) -> Certificate:
    """Certify `impl` (a decode kernel or a layer) under a profile. timeout_s limits each kernel
    call, or each layer case (None: no limit); command is the command line recorded in the
    certificate; dtypes restricts the dtypes drawn (names, e.g. ("bfloat16",))."""
    chosen = PROFILES[profile]
    half = half_of(impl)
    applicable = half.properties(impl)
    if properties:
        names = [p.name for p in applicable]
        unknown = [name for name in properties if name not in names]
        if unknown:
            raise ValueError(f"properties must be among {names} for this {half.kind}; got {unknown}")
        selected = [p for name in properties for p in applicable if p.name == name]
    else:
        selected = list(applicable)
    dtypes = tuple(dtypes) if dtypes else None
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
                                  strict, progress, dtypes, half)
            progress.finish(report)
            reports.append(report)
    finally:
        torch.set_num_threads(threads)
        if isolated:
            isolated.close()
    return assemble(impl, half, reports, chosen, device, max_examples=max_examples, seed=seed, isolate=isolate,
                    strict=strict, timeout_s=timeout_s, dtypes=dtypes, elapsed_s=time.perf_counter() - started,
                    command=command, workers=[in_process_worker(device)])


def in_process_worker(device: str) -> dict:
    """The one worker of an in-process run: this process, on `device`."""
    return {"id": "main", "device": device, "name": device_info(device)["name"]}


def assemble(impl: Implementation | LayerImplementation, half: Half, reports: list[PropertyReport], profile: Profile,
             device: str, max_examples: int | None, seed: int, isolate: bool, strict: bool,
             timeout_s: float | None, dtypes: tuple[str, ...] | None, elapsed_s: float, command: str | None,
             workers: list[dict], worker_count: int | None = None, parts: int = 1,
             device_entry: dict | None = None) -> Certificate:
    """The certificate of `reports` (one per property run, in order): what `certify` returns, and what
    a parallel run's merged reports become (mla_verify.certify.workers)."""
    limits = profile.layer if half.kind == LayerHalf.kind else profile.limits
    return Certificate(
        implementation=half.implementation_entry(impl, reports, dtypes),
        versions=versions(impl), device=device_entry or device_info(device),
        settings={"profile": profile.name, "max_examples": max_examples or profile.max_examples, "seed": seed,
                  "isolated": isolate, "strict": strict, "timeout_s": timeout_s,
                  "properties": [p.name for p in reports], "dtypes": list(dtypes) if dtypes else None,
                  "limits": vars(limits), "workers": worker_count or len(workers), "parts": parts},
        properties=reports, not_covered=half.not_covered(impl, device, reports, dtypes, profile),
        elapsed_s=elapsed_s, provenance=provenance(impl, command), workers=workers)
