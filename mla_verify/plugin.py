"""pytest plugin: choose the implementation and profile a `pytest properties` run certifies, run each
property as the certifier does, split over pytest-xdist workers with `-n N`, and write one
certificate at the end of the session.

Options: --mla-impl NAME|module:attr (the decode kernel; default $MLA_VERIFY_IMPL, else 'torch'),
--mla-layer NAME|module:attr (a whole layer: a registered layer name or a layer factory; default
$MLA_VERIFY_LAYER, else none), --mla-profile quick|default|thorough (default: quick when CI is set,
else default), --mla-device, --mla-counterexamples DIR (where failing cases are saved as replayable
artifacts), and the certifier's own: --mla-seed, --mla-max-examples, --mla-dtype, --mla-property,
--mla-strict, --mla-isolate, --mla-timeout, and --mla-json / --mla-markdown / --mla-html (where the
certificate is written). The report header names the implementation under test and the versions.

A certifying test (`certification_test`) runs one property through mla_verify.certify.runner, the
code `mla-verify certify` runs: the search in rounds for every distinct failure, each shrunk to its
own minimal case and saved as a counterexample. Under pytest-xdist (`-n N`) each property's search
is split into N parts, one per worker, each with its own seed and share of the examples
(mla_verify.certify.workers); with --mla-device cuda each worker is pinned to its own GPU. Every
part leaves its results in a file of the session's folder, and the controller merges them into one
certificate at the end of the session.

Installed, the plugin is loaded by every pytest run in the environment, so it changes nothing
unless asked: it loads a Hypothesis profile only under --mla-profile (the project's own conftest.py
loads one for the project's tests); under --mla-impl it keeps only the tests that certify a decode
kernel (the `mla_implementation` marker), under --mla-layer only those that certify a layer (the
`mla_layer` marker), under both the tests of either.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field

import pytest
from hypothesis import settings

from mla_verify.certify.profiles import PROFILES, Profile, hypothesis_settings

__all__ = ["Selection", "selection", "certification_test", "session_certificates", "CertificationFailed",
           "IMPLEMENTATION_MARKER", "LAYER_MARKER"]

IMPLEMENTATION_MARKER = "mla_implementation"
LAYER_MARKER = "mla_layer"
DECODE, LAYER = "decode kernel", "layer"
# a certifying test function carries (kind, property name, pinned) under this attribute
_PROPERTY_ATTRIBUTE = "_mla_verify_property"
_DTYPES = ("float64", "float32", "bfloat16", "float16")


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


@dataclass
class _Session:
    """This process's part of a certifying session: the session seed, the folder of part files, who
    this process is (a worker "gw<k>" of `part_count`, or "main")."""

    seed: int
    worker_id: str = "main"
    part_count: int = 1
    parts: str | None = None  # the folder of part files (created by the controller when needed)
    started: float = field(default_factory=time.perf_counter)
    controller: bool = True
    created_parts: bool = False

    def files(self):
        from mla_verify.certify.workers import PartFiles

        if self.parts is None:
            self.parts, self.created_parts = tempfile.mkdtemp(prefix="mla-verify-parts-"), True
        return PartFiles(self.parts)


_SESSION = pytest.StashKey[_Session]()
# what the last session on this process certified: its certificates, or why it could not
_last: dict = {"certificates": [], "problems": []}


def session_certificates() -> tuple[list, list[str]]:
    """The certificates the last pytest session in this process merged (one per implementation), and
    the problems that kept one from being made (e.g. nothing could be drawn); for `mla-verify
    certify --workers N`, which runs that session."""
    return list(_last["certificates"]), list(_last["problems"])


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("mla_verify", "MLA kernel certification")
    group.addoption("--mla-impl", default=None, help="decode kernel to certify: registered name or module:attr")
    group.addoption("--mla-layer", default=None,
                    help="whole layer to certify: registered layer name or module:attr of a layer factory")
    group.addoption("--mla-profile", default=None, choices=sorted(PROFILES),
                    help="case sizes and example counts (default: quick under CI, else default)")
    group.addoption("--mla-device", default="cpu",
                    help="device the cases are built on (cpu, cuda; with -n N and cuda, each worker gets its own "
                         "GPU)")
    group.addoption("--mla-counterexamples", default="counterexamples", help="folder for counterexample artifacts")
    group.addoption("--mla-seed", type=int, default=None,
                    help="session seed (default: --hypothesis-seed, else random); recorded in the certificate; "
                         "with -n N, part i of each property's search draws from a seed derived from it and i")
    group.addoption("--mla-parts", type=int, default=None,
                    help="split each property's search into this many parts, each with its own seed and share of "
                         "the examples (default: one per xdist worker); the same parts give the same cases on any "
                         "number of workers")
    group.addoption("--mla-max-examples", type=int, default=None,
                    help="examples per property (default: the profile's), shared among the workers")
    group.addoption("--mla-dtype", action="append", choices=_DTYPES, default=None,
                    help="draw only this dtype (repeatable; default: every declared dtype)")
    group.addoption("--mla-property", action="append", default=None,
                    help="certify only this property (repeatable; default: all of the implementation's half)")
    group.addoption("--mla-strict", action="store_true",
                    help="a case the implementation declines although its capabilities claim it is a failure")
    group.addoption("--mla-isolate", action="store_true",
                    help="judge each case in a child process (crashes and hangs become counterexamples)")
    group.addoption("--mla-timeout", type=float, default=600.0,
                    help="seconds a kernel call (a layer: a whole case) may take (default 600; 0: no limit)")
    group.addoption("--mla-json", default=None, help="write the session's certificate here (JSON)")
    group.addoption("--mla-markdown", default=None, help="write the session's certificate here (Markdown)")
    group.addoption("--mla-html", default=None,
                    help="write the session's certificate here (self-contained HTML; needs mla-verify[report])")
    group.addoption("--mla-progress", choices=("none", "lines"), default="none",
                    help="a progress line every 25 cases of each part on stderr (default: none)")
    group.addoption("--mla-command", default=None, help=argparse.SUPPRESS)


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
    layer = None
    if config.getoption("--mla-layer") or os.environ.get("MLA_VERIFY_LAYER"):
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        layer = _validate_layer(chosen)
    decode = None
    if config.getoption("--mla-impl") or os.environ.get("MLA_VERIFY_IMPL") or chosen.device != "cpu":
        # the user's kernel module sits where they stand, as for the CLI (plain `pytest` does not
        # put the current folder on sys.path)
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        decode = _validate(chosen)
    _selection[:] = [chosen]
    _validate_certifier_options(config, [impl for impl in (decode, layer) if impl is not None])
    workerinput = getattr(config, "workerinput", None)
    parts = config.getoption("--mla-parts")
    if parts is not None and parts < 1:
        raise pytest.UsageError(f"mla_verify: --mla-parts: expected a whole number ≥ 1, got {parts}")
    if workerinput is not None and "mla_verify_seed" in workerinput:
        session = _Session(seed=workerinput["mla_verify_seed"], worker_id=workerinput["workerid"],
                           part_count=parts or int(workerinput["workercount"]), parts=workerinput["mla_verify_parts"],
                           controller=False)
    else:
        session = _Session(seed=_session_seed(config), part_count=parts or _worker_count(config))
    config.stash[_SESSION] = session


def _worker_count(config: pytest.Config) -> int:
    """The xdist workers this session starts (1 without xdist)."""
    if getattr(config.option, "dist", "no") == "no":
        return 1
    return max(1, len(getattr(config.option, "tx", None) or []))


def _session_seed(config: pytest.Config) -> int:
    seed = config.getoption("--mla-seed")
    if seed is not None:
        return seed
    hypothesis_seed = config.getoption("hypothesis_seed", default=None)
    if hypothesis_seed is not None:
        try:
            return int(hypothesis_seed)
        except ValueError:
            return int.from_bytes(str(hypothesis_seed).encode()[:4].ljust(4, b"\0"), "big")
    return random.randrange(2**32)


def _validate(chosen: Selection):
    """Bad choices stop the run with one line, before any test is collected."""
    from mla_verify.certify.registry import ImplementationError

    try:
        impl = chosen.implementation()
    except ImplementationError as error:
        raise pytest.UsageError(f"mla_verify: {error}") from None
    from mla_verify.decode.inputs import device_problem

    problem = device_problem(chosen.device)
    if problem:
        raise pytest.UsageError(f"mla_verify: --mla-device {chosen.device}: {problem}")
    return impl


def _validate_layer(chosen: Selection):
    from mla_verify.certify.registry import ImplementationError

    try:
        return chosen.layer()
    except ImplementationError as error:
        raise pytest.UsageError(f"mla_verify: {error}") from None


def _validate_certifier_options(config: pytest.Config, impls: list) -> None:
    """The certificate's paths, --mla-property and --mla-dtype (against what the implementations
    declare), the example count: one line each, before anything runs."""
    from mla_verify.cli import UsageError, _check_output_file, _check_report_available, _check_selection

    options = argparse.Namespace(json=config.getoption("--mla-json"), markdown=config.getoption("--mla-markdown"),
                                 html=config.getoption("--mla-html"), property=config.getoption("--mla-property"),
                                 dtype=config.getoption("--mla-dtype"))
    try:
        for option in ("json", "markdown", "html"):
            _check_output_file(f"--mla-{option}", getattr(options, option))
        _check_report_available(options)
        if options.property:
            names = {prop for impl in impls for prop in _property_names(impl)} if impls else None
            unknown = [name for name in options.property if names is not None and name not in names]
            if unknown:
                raise UsageError(f"--mla-property {' '.join(unknown)}: not a property of what this run certifies "
                                 f"(its properties: {', '.join(sorted(names))})")
        for impl in impls:
            _check_selection(impl, argparse.Namespace(property=None, dtype=options.dtype))
    except UsageError as error:
        raise pytest.UsageError(f"mla_verify: {str(error).replace('--html', '--mla-html')}") from None
    examples = config.getoption("--mla-max-examples")
    if examples is not None and examples < 1:
        raise pytest.UsageError(f"mla_verify: --mla-max-examples: expected a whole number ≥ 1, got {examples}")
    timeout = config.getoption("--mla-timeout")
    if not timeout >= 0:
        raise pytest.UsageError(f"mla_verify: --mla-timeout: expected seconds ≥ 0 (0: no limit), got {timeout}")


def _property_names(impl) -> list[str]:
    from mla_verify.certify.halves import half_of

    return [prop.name for prop in half_of(impl).properties(impl)]


# ---- pytest-xdist: one worker per GPU, the session seed and the parts folder for every worker ----

@pytest.hookimpl(optionalhook=True)
def pytest_xdist_setupnodes(config: pytest.Config, specs: list) -> None:
    """With --mla-device cuda, worker k sees only GPU k (round robin when there are more workers than
    GPUs): CUDA_VISIBLE_DEVICES is set in its environment before it starts, so every case it builds on
    "cuda" is on its own GPU."""
    if config.getoption("--mla-device") != "cuda":
        return
    from mla_verify.certify.workers import visible_gpus, worker_gpu

    gpus = visible_gpus()
    for index, spec in enumerate(specs):
        if gpus and "CUDA_VISIBLE_DEVICES" not in spec.env:
            spec.env["CUDA_VISIBLE_DEVICES"] = worker_gpu(index, gpus)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:
    session = node.config.stash[_SESSION]
    node.workerinput["mla_verify_seed"] = session.seed
    node.workerinput["mla_verify_parts"] = session.files().folder.as_posix()


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """`-n auto` with --mla-device cuda: one worker per visible GPU (else xdist's own: one per core)."""
    if config.getoption("--mla-device") == "cuda":
        from mla_verify.certify.workers import visible_gpus

        return max(1, len(visible_gpus()))
    return None


# ---- the certifying tests ----

def certification_test(kind: str, name: str, pinned: bool = False):
    """A pytest test that certifies property `name` of the selected decode kernel (kind "decode
    kernel") or layer ("layer"): the search (split into one part per xdist worker), or with pinned
    the pinned regression cases. It fails listing each distinct failure with its counterexample."""

    def test(request: pytest.FixtureRequest, mla_part: int) -> None:
        _certify_part(request, kind, name, mla_part, pinned)

    setattr(test, _PROPERTY_ATTRIBUTE, (kind, name, pinned))
    test.__doc__ = (f"{name} of the selected {kind}: "
                    + ("its pinned regression cases" if pinned else "the search, in parts under -n N"))
    return test


@pytest.fixture
def mla_part() -> int:
    """The part of a property's search a certifying test runs (0 of 1 without xdist)."""
    return 0


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    spec = getattr(metafunc.function, _PROPERTY_ATTRIBUTE, None)
    if spec is None or spec[2] or "mla_part" not in metafunc.fixturenames:
        return
    count = metafunc.config.stash[_SESSION].part_count
    if count > 1:
        metafunc.parametrize("mla_part", range(count), ids=[f"part{i + 1}of{count}" for i in range(count)])


class CertificationFailed(AssertionError):
    """A certifying test found failures: each distinct one with its message, minimal case and
    counterexample (`failures`: the report's entries)."""

    def __init__(self, impl_name: str, prop_name: str, failures: list[dict]) -> None:
        lines = [f"{prop_name} of {impl_name}: {len(failures)} distinct failure{'s' if len(failures) > 1 else ''}"]
        for number, failure in enumerate(failures, 1):
            lines.append(f"failure {number}/{len(failures)}: {failure['signature']}"
                         + (" (flaky)" if failure.get("flaky") else ""))
            lines.append(f"  {failure['message']}")
            lines.append(f"  minimal case: {failure['description']}")
        super().__init__("\n".join(lines))
        self.failures = failures


def _certify_part(request: pytest.FixtureRequest, kind: str, name: str, index: int, pinned: bool) -> None:
    from mla_verify.certify.halves import half_of
    from mla_verify.certify.progress import LineProgress, Progress
    from mla_verify.certify.workers import PINNED, SEARCH, PartFiles, part_seed, run_part, worker_entry

    config, chosen = request.config, selection()
    session = config.stash[_SESSION]
    impl = chosen.layer() if kind == LAYER else chosen.implementation()
    if impl is None:
        pytest.skip("no layer named: pass --mla-layer NAME (or set MLA_VERIFY_LAYER)")
    half = half_of(impl)
    applicable = [prop.name for prop in half.properties(impl)]
    if name not in applicable:
        pytest.skip(f"{name} is not certified for {impl.name} by this {half.kind}'s certifier"
                    if name in _all_property_names()
                    else f"{name} is not a property of this mla_verify")
    if pinned and not half.pinned(impl, half.property_named(name), chosen.device, _dtypes(config)):
        pytest.skip(f"no pinned case of {name} lies within what {impl.name} declares")
    timeout = config.getoption("--mla-timeout")
    impl = dataclasses.replace(impl, timeout_s=timeout or None)
    part, count = (PINNED, 1) if pinned else (SEARCH, session.part_count)
    worker = worker_entry(session.worker_id, chosen.device)
    files = session.files()
    key = PartFiles.key(request.node.nodeid, session.worker_id)
    files.started(key, {"kind": half.kind, "implementation": impl.name, "property": name, "part": part,
                        "index": index, "count": count, "worker": worker,
                        "seed": part_seed(session.seed, index) if part == SEARCH else session.seed})
    progress = Progress()
    if config.getoption("--mla-progress") == "lines":
        label = PINNED if pinned else f"part {index + 1}/{count}"
        progress = LineProgress(_Uncaptured(config), prefix=f"[{session.worker_id} {label}] ")
    try:
        record, report = run_part(impl, half, half.property_named(name), chosen.profile, chosen.device,
                                  seed=session.seed, index=index, count=count, part=part,
                                  max_examples=config.getoption("--mla-max-examples"),
                                  counterexamples=chosen.counterexamples, isolate=config.getoption("--mla-isolate"),
                                  strict=config.getoption("--mla-strict"), dtypes=_dtypes(config),
                                  progress=progress, worker=worker)
    except Exception as error:  # recorded for the certificate, then reported by pytest as it is
        files.finished(key, {**files.started_record(key), "raised": f"{type(error).__name__}: {error}",
                             "report": None, "state": {}})
        raise
    files.finished(key, record)
    if report is None:
        pytest.fail(f"mla_verify: {record['nothing_to_certify']}", pytrace=False)
    if report.failures:
        raise CertificationFailed(impl.name, name, report.failures)


def _dtypes(config: pytest.Config) -> tuple[str, ...] | None:
    dtypes = config.getoption("--mla-dtype")
    return tuple(dtypes) if dtypes else None


def _all_property_names() -> set[str]:
    from mla_verify.certify.halves import layer_properties
    from mla_verify.decode.properties import ALL_PROPERTIES

    return {p.name for p in ALL_PROPERTIES} | {p.name for p in layer_properties()}


class _Uncaptured:
    """stderr past pytest's output capturing (a worker's progress lines reach the terminal)."""

    def __init__(self, config: pytest.Config) -> None:
        self.capture = config.pluginmanager.getplugin("capturemanager")

    def write(self, text: str) -> int:
        if self.capture is None:
            return sys.stderr.write(text)
        with self.capture.global_and_fixture_disabled():
            written = sys.stderr.write(text)
            sys.stderr.flush()
        return written

    def flush(self) -> None:
        pass


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    _select(config, items)
    _interleave(items)


def _interleave(items: list[pytest.Item]) -> None:
    """Certifying tests in the order part 1 of every property, part 2 of every property, ..., the
    pinned parts last, so that xdist's scheduler, which hands out consecutive tests, spreads each
    property's parts over the workers."""
    spots = [i for i, item in enumerate(items) if hasattr(getattr(item, "function", None), _PROPERTY_ATTRIBUTE)]
    if len(spots) < 2:
        return

    def order(item: pytest.Item) -> tuple:
        pinned = getattr(item.function, _PROPERTY_ATTRIBUTE)[2]
        callspec = getattr(item, "callspec", None)
        part = callspec.params.get("mla_part", 0) if callspec is not None else 0
        return (pinned, part)

    ordered = sorted((items[i] for i in spots), key=order)  # stable: the property order stays within a part
    for spot, item in zip(spots, ordered):
        items[spot] = item


def _select(config: pytest.Config, items: list[pytest.Item]) -> None:
    markers = [marker for option, marker in (("--mla-impl", IMPLEMENTATION_MARKER), ("--mla-layer", LAYER_MARKER))
               if config.getoption(option)]
    properties = config.getoption("--mla-property")
    if not markers and not properties:
        return

    def wanted(item: pytest.Item) -> bool:
        if markers and not any(item.get_closest_marker(marker) for marker in markers):
            return False
        spec = getattr(getattr(item, "function", None), _PROPERTY_ATTRIBUTE, None)
        return not (properties and spec is not None and spec[1] not in properties)

    kept = [item for item in items if wanted(item)]
    deselected = [item for item in items if not wanted(item)]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """After a property test failed: the counterexample of each distinct minimal failure, with the
    commands that replay it. A certifying test's were saved by the runner; a plain Hypothesis test
    that raised its failures (with `property_name` set) has them saved here."""
    outcome = yield
    if call.when != "call" or call.excinfo is None:
        return
    error, lines = call.excinfo.value, []
    if isinstance(error, CertificationFailed):
        for number, failure in enumerate(error.failures, 1):
            lines.append(f"failure {number}/{len(error.failures)}: {failure['signature']}\n"
                         f"  minimal case: {failure['description']}")
            folder = failure.get("counterexample")
            if folder:
                lines.append(f"  artifact: {folder}\n  replay:   mla-verify replay {folder}\n"
                             f"  or:       python {folder}/repro.py")
    else:
        failures = _property_failures(error)
        if not failures:
            return
        from mla_verify.certify.counterexample import save_counterexample

        chosen = selection()
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


# ---- the end of the session: one certificate from every part ----

def pytest_sessionstart(session: pytest.Session) -> None:
    if _SESSION in session.config.stash:
        session.config.stash[_SESSION].started = time.perf_counter()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    state = config.stash.get(_SESSION, None)
    if state is None or not state.controller:
        return
    _last["certificates"], _last["problems"] = [], []
    if state.parts is None:
        return
    from mla_verify.certify.halves import NothingToCertify, half_of
    from mla_verify.certify.workers import PartFiles, merged_certificate

    records, lost = PartFiles(state.parts).records()
    groups: dict[tuple[str, str], tuple[list, list]] = {}
    for record in records:
        groups.setdefault((record["kind"], record["implementation"]), ([], []))[0].append(record)
    for record in lost:
        groups.setdefault((record["kind"], record["implementation"]), ([], []))[1].append(record)
    chosen = selection()
    for (kind, _), (done, died) in groups.items():
        impl = chosen.layer() if kind == LAYER else chosen.implementation()
        timeout = config.getoption("--mla-timeout")
        try:
            certificate = merged_certificate(
                impl, half_of(impl), done, died, chosen.profile, chosen.device, seed=state.seed,
                worker_count=_worker_count(config), parts=state.part_count,
                max_examples=config.getoption("--mla-max-examples"),
                isolate=config.getoption("--mla-isolate"), strict=config.getoption("--mla-strict"),
                timeout_s=timeout or None, dtypes=_dtypes(config), elapsed_s=time.perf_counter() - state.started,
                command=config.getoption("--mla-command") or _pytest_command(config))
        except NothingToCertify as error:
            _last["problems"].append(str(error))
            continue
        _last["certificates"].append(certificate)
    _write_session_certificates(config)


def _pytest_command(config: pytest.Config) -> str:
    return shlex.join(["python", "-m", "pytest", *config.invocation_params.args])


def _write_session_certificates(config: pytest.Config) -> None:
    from mla_verify.certify.certificate import write_outputs

    certificates = _last["certificates"]
    paths = {option: config.getoption(f"--mla-{option}") for option in ("json", "markdown", "html")}
    if not certificates or not any(paths.values()):
        return
    if len(certificates) == 1:
        data, markdown = certificates[0].to_dict(), certificates[0].to_markdown()
    else:  # a decode kernel and a layer in one session: both, as `mla-verify compare` writes them
        from mla_verify.certify.comparison import comparison_markdown

        data = {"schema": "mla-verify-comparison/1", "certificates": [c.to_dict() for c in certificates]}
        markdown = comparison_markdown(data["certificates"])
    write_outputs(data, paths["json"], paths["markdown"], paths["html"], markdown)


def pytest_unconfigure(config: pytest.Config) -> None:
    state = config.stash.get(_SESSION, None)
    if state is not None and state.controller and state.created_parts:
        from mla_verify.certify.workers import PartFiles

        PartFiles(state.parts).remove()


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    state = config.stash.get(_SESSION, None)
    if state is None or not state.controller or not (_last["certificates"] or _last["problems"]):
        return
    terminalreporter.section("mla_verify certificate")
    for problem in _last["problems"]:
        terminalreporter.write_line(f"nothing certified: {problem}")
    for certificate in _last["certificates"]:
        examples = sum(p.examples for p in certificate.properties)
        workers = certificate.workers
        terminalreporter.write_line(
            f"{certificate.implementation['name']}: {certificate.headline()} ({examples} cases, seed "
            f"{certificate.settings['seed']}, {len(workers)} worker{'s' if len(workers) > 1 else ''}: "
            + ", ".join(f"{w['id']} on {w['device']}" for w in workers) + ")")
        for report in certificate.properties:
            for failure in report.failures:
                folder = failure.get("counterexample")
                terminalreporter.write_line(f"  {report.name}: {failure['signature']}"
                                            + (f" — replay: mla-verify replay {folder}" if folder else ""))
    written = [config.getoption(f"--mla-{option}") for option in ("json", "markdown", "html")]
    if any(written) and _last["certificates"]:
        terminalreporter.write_line("written: " + ", ".join(path for path in written if path))


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

    state = config.stash.get(_SESSION, None)
    seed = f", seed {state.seed}" if state is not None else ""
    lines = [f"mla_verify: implementation {described}, profile {chosen.profile.name}, device {chosen.device}{seed}"]
    try:
        layer = chosen.layer()
        if layer is not None:
            lines.append(f"mla_verify: layer {layer.name} ({layer.spec})")
    except ImplementationError as error:
        lines.append(f"mla_verify: layer unresolved: {error}")
    return lines + [f"mla_verify: torch {torch.__version__}, hypothesis {hypothesis.__version__}"]
