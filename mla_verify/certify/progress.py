"""Progress of a certification run: a bar per property on a terminal, plain lines elsewhere, or none.

`certify` reports to a `Progress`: when a property starts (with the examples planned), after each
case, and when it ends. The CLI picks the form: tqdm bars when stderr is a terminal and CI is not
set, plain lines every `LINE_EVERY` cases otherwise, nothing under --quiet.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from mla_verify.certify.certificate import PropertyReport

__all__ = ["Progress", "LineProgress", "BarProgress", "progress_for"]

LINE_EVERY = 25  # cases between progress lines


class Progress:
    """Receives the run's events; this base class shows nothing (--quiet)."""

    def start(self, name: str, description: str, planned: int) -> None:
        pass

    def case_done(self, report: PropertyReport, planned: int) -> None:
        pass

    def finish(self, report: PropertyReport) -> None:
        pass

    def note(self, message: str) -> None:
        pass


def _summary(report: PropertyReport) -> str:
    return (f"max error/bound {report.max_ratio:.3g} (sound), {report.max_sharp_ratio:.3g} (sharp), "
            f"{report.failed} failing")


def _verdict_line(report: PropertyReport) -> str:
    return (f"  {report.name}: {report.verdict.upper()} ({report.examples} cases, {report.failed} failing, "
            f"{report.declined} declined, {len(report.failures)} distinct failures)")


class LineProgress(Progress):
    """Plain lines on a stream (a log file, CI): one per property, one every `every` cases; each line
    starts with `prefix` (a parallel run's worker and part, e.g. "[gw1 search 2/2] ")."""

    def __init__(self, stream: TextIO | None = None, every: int = LINE_EVERY, prefix: str = "") -> None:
        self.stream, self.every, self.prefix = stream or sys.stderr, every, prefix

    def _print(self, message: str) -> None:
        print(self.prefix + message.lstrip() if self.prefix else message, file=self.stream, flush=True)

    def start(self, name: str, description: str, planned: int) -> None:
        self._print(f"{name}: {description}")

    def case_done(self, report: PropertyReport, planned: int) -> None:
        if report.examples % self.every == 0:
            self._print(f"  {report.name}: {report.examples} cases, {_summary(report)}")

    def finish(self, report: PropertyReport) -> None:
        self._print(_verdict_line(report))

    def note(self, message: str) -> None:
        self._print(message)


class BarProgress(Progress):
    """A tqdm bar per property: cases done of planned, the current worst ratio of each tier, the time."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self._bar = None
        self._started = 0.0

    def start(self, name: str, description: str, planned: int) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=planned, desc=name, unit="case", file=self.stream, dynamic_ncols=True, leave=True)
        self._started = time.perf_counter()

    def case_done(self, report: PropertyReport, planned: int) -> None:
        if self._bar is None:
            return
        # the search goes on in rounds after a failure: the plan grows with them
        if planned > self._bar.total:
            self._bar.total = planned
        self._bar.update(report.examples - self._bar.n)
        self._bar.set_postfix_str(_summary(report), refresh=False)

    def finish(self, report: PropertyReport) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(f"{report.verdict.upper()}, {_summary(report)}", refresh=False)
            self._bar.close()
            self._bar = None

    def note(self, message: str) -> None:
        from tqdm import tqdm

        tqdm.write(message, file=self.stream)


def progress_for(quiet: bool, stream: TextIO | None = None) -> Progress:
    """None under --quiet; bars on an interactive terminal; plain lines when stderr is a file, a pipe or CI.
    stream: default the current sys.stderr (looked up at the call, not at import)."""
    if quiet:
        return Progress()
    stream = stream or sys.stderr
    interactive = getattr(stream, "isatty", lambda: False)() and not os.environ.get("CI")
    return BarProgress(stream) if interactive else LineProgress(stream)
