"""pytest plugin: choose the implementation and profile a `pytest properties` run certifies.

Options: --mla-impl NAME|module:attr (the decode kernel; default $MLA_VERIFY_IMPL, else 'torch'),
--mla-layer NAME|module:attr (a whole layer: a registered layer name or a layer factory; default
$MLA_VERIFY_LAYER, else none), --mla-profile quick|default|thorough (default: quick when CI is set,
else default), --mla-device, and --mla-counterexamples DIR (where failing cases are saved as
replayable artifacts). The report header names the implementation under test and the versions.

Installed, the plugin is loaded by every pytest run in the environment, so it changes nothing
unless asked: it loads a Hypothesis profile only under --mla-profile (the project's own conftest.py
loads one for the project's tests); under --mla-impl it keeps only the tests that certify a decode
kernel (the `mla_implementation` marker), under --mla-layer only those that certify a layer (the
`mla_layer` marker), under both the tests of either.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import pytest
from hypothesis import settings

from mla_verify.certify.profiles import PROFILES, Profile, hypothesis_settings

__all__ = ["Selection", "selection", "IMPLEMENTATION_MARKER", "LAYER_MARKER"]

IMPLEMENTATION_MARKER = "mla_implementation"
LAYER_MARKER = "mla_layer"


@dataclass(frozen=True)
class Selection:
    impl_name: str | None
    profile: Profile
    device: str
    counterexamples: str
    layer_name: str | None = None

    def implementation(self):
        from mla_verify.certify.registry import resolve

        return resolve(self.impl_name)

    def layer(self):
        """The layer named by --mla-layer or $MLA_VERIFY_LAYER; None when neither names one."""
        from mla_verify.certify.registry import LAYER_ENVIRONMENT_VARIABLE, resolve_layer

        if self.layer_name is None and not os.environ.get(LAYER_ENVIRONMENT_VARIABLE):
            return None
        return resolve_layer(self.layer_name)


_selection: list[Selection] = []


def selection() -> Selection:
    """The run's choices; outside pytest, the defaults (environment variable, default profile)."""
    if _selection:
        return _selection[0]
    return Selection(None, PROFILES["quick" if os.environ.get("CI") else "default"],
                     "cpu", "counterexamples")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("mla_verify", "MLA kernel certification")
    group.addoption("--mla-impl", default=None, help="decode kernel to certify: registered name or module:attr")
    group.addoption("--mla-layer", default=None,
                    help="whole layer to certify: registered layer name or module:attr of a layer factory")
    group.addoption("--mla-profile", default=None, choices=sorted(PROFILES),
                    help="case sizes and example counts (default: quick under CI, else default)")
    group.addoption("--mla-device", default="cpu", help="device the cases are built on (cpu, cuda)")
    group.addoption("--mla-counterexamples", default="counterexamples", help="folder for counterexample artifacts")


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{IMPLEMENTATION_MARKER}: certifies the implementation chosen by --mla-impl")
    config.addinivalue_line("markers", f"{LAYER_MARKER}: certifies the layer chosen by --mla-layer")
    asked = config.getoption("--mla-profile")
    name = asked or ("quick" if os.environ.get("CI") else "default")
    if asked and not config.getoption("--hypothesis-profile", default=None):
        settings.register_profile(f"mla-{name}", hypothesis_settings(PROFILES[name]))
        settings.load_profile(f"mla-{name}")
    # no name: resolve() reads MLA_VERIFY_IMPL itself, and says so when it names nothing
    chosen = Selection(config.getoption("--mla-impl"), PROFILES[name],
                       config.getoption("--mla-device"), config.getoption("--mla-counterexamples"),
                       config.getoption("--mla-layer"))
    if config.getoption("--mla-layer") or os.environ.get("MLA_VERIFY_LAYER"):
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        _validate_layer(chosen)
    if config.getoption("--mla-impl") or os.environ.get("MLA_VERIFY_IMPL") or chosen.device != "cpu":
        # the user's kernel module sits where they stand, as for the CLI (plain `pytest` does not
        # put the current folder on sys.path)
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        _validate(chosen)
    _selection[:] = [chosen]


def _validate(chosen: Selection) -> None:
    """Bad choices stop the run with one line, before any test is collected."""
    from mla_verify.certify.registry import ImplementationError

    try:
        chosen.implementation()
    except ImplementationError as error:
        raise pytest.UsageError(f"mla_verify: {error}") from None
    from mla_verify.decode.inputs import device_problem

    problem = device_problem(chosen.device)
    if problem:
        raise pytest.UsageError(f"mla_verify: --mla-device {chosen.device}: {problem}")


def _validate_layer(chosen: Selection) -> None:
    from mla_verify.certify.registry import ImplementationError

    try:
        chosen.layer()
    except ImplementationError as error:
        raise pytest.UsageError(f"mla_verify: {error}") from None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    markers = [marker for option, marker in (("--mla-impl", IMPLEMENTATION_MARKER), ("--mla-layer", LAYER_MARKER))
               if config.getoption(option)]
    if not markers:
        return

    def wanted(item: pytest.Item) -> bool:
        return any(item.get_closest_marker(marker) for marker in markers)

    kept = [item for item in items if wanted(item)]
    deselected = [item for item in items if not wanted(item)]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """After a property test failed: save an artifact for each distinct minimal failure (Hypothesis
    raised them once more at the end, alone or as a group) and add the replay commands to the report."""
    outcome = yield
    if call.when != "call" or call.excinfo is None:
        return
    failures = _property_failures(call.excinfo.value)
    if not failures:
        return
    from mla_verify.certify.counterexample import save_counterexample

    chosen, lines = selection(), []
    impl = chosen.layer() if item.get_closest_marker(LAYER_MARKER) else chosen.implementation()
    for number, failure in enumerate(failures, 1):
        folder = save_counterexample(chosen.counterexamples, impl, failure.property_name, failure,
                                     device=chosen.device)
        signature = (getattr(failure, "fault", None) or failure.finding).signature
        lines.append(f"failure {number}/{len(failures)}: {signature}\n"
                     f"  minimal case: {failure.case.describe()}\n  artifact: {folder}\n"
                     f"  replay:   mla-verify replay {folder}\n  or:       python {folder}/repro.py")
    outcome.get_result().sections.append(("mla_verify counterexamples", "\n".join(lines)))


def _property_failures(error: BaseException) -> list:
    from mla_verify.certify.halves import CaseFault
    from mla_verify.decode.checks import CaseFailure

    if isinstance(error, (CaseFailure, CaseFault)) and hasattr(error, "property_name"):
        return [error]
    if isinstance(error, BaseExceptionGroup):
        return [failure for inner in error.exceptions for failure in _property_failures(inner)]
    return []


def pytest_report_header(config: pytest.Config) -> list[str]:
    from mla_verify.certify.registry import ImplementationError

    chosen = selection()
    try:
        impl = chosen.implementation()
        described = f"{impl.name} ({impl.spec})"
    except ImplementationError as error:
        described = f"unresolved: {error}"
    import hypothesis
    import torch

    lines = [f"mla_verify: implementation {described}, profile {chosen.profile.name}, device {chosen.device}"]
    try:
        layer = chosen.layer()
        if layer is not None:
            lines.append(f"mla_verify: layer {layer.name} ({layer.spec})")
    except ImplementationError as error:
        lines.append(f"mla_verify: layer unresolved: {error}")
    return lines + [f"mla_verify: torch {torch.__version__}, hypothesis {hypothesis.__version__}"]
