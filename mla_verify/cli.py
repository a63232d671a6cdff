"""mla-verify: certify, compare, check, replay, report, list, cache-table.

Every command that takes an implementation takes a decode kernel or a whole layer: a registered
name (`mla-verify list`), 'package.module:attr' or 'path/to/file.py:attr'. A layer factory is told
from a decode kernel by its signature, factory(config, weights, dtype, device); --layer forces it.

Exit codes: 0 success; 1 a property failed (certify, compare, check), a counterexample still fails
(replay), or the kernel crashed or hung the process running it; 2 a usage error (an implementation
that cannot be resolved, a bad argument or path, a counterexample that cannot be read); 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import traceback
from pathlib import Path

__all__ = ["main", "entry"]

class UsageError(Exception):
    """A one-line message for the user; exit code 2."""


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---- argument checks (before anything runs, so that a bad path never costs a whole run) ----

def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number ≥ 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number ≥ 1, got {value}")
    return value


def _workers(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a whole number ≥ 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a whole number ≥ 1, got {value}")
    return value


def _seconds(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds (a number > 0, or 0 for no limit), got {text!r}") from None
    if value < 0 or value != value:
        raise argparse.ArgumentTypeError(f"expected seconds (a number > 0, or 0 for no limit), got {text!r}")
    return value or None


def _check_device(device: str) -> None:
    from mla_verify.decode.inputs import device_problem

    problem = device_problem(device)
    if problem:
        raise UsageError(f"--device {device}: {problem}")


def _check_output_file(option: str, path: str | None) -> None:
    """An output file must be writable where it is named: its folder exists, it is not a folder."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise UsageError(f"{option} {path}: is a folder; name a file, e.g. {target / 'cert'}")
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise UsageError(f"{option} {path}: the folder {folder} does not exist (create it first)")
    if not os.access(folder, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise UsageError(f"{option} {path}: not writable")


def _check_output_folder(option: str, path: str | None) -> None:
    """A folder that is created on first use: it, or the nearest folder above it, must be writable."""
    if path is None:
        return
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise UsageError(f"{option} {path}: exists and is not a folder")
    existing = target
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise UsageError(f"{option} {path}: cannot create or write it ({existing} is not a writable folder)")


def _resolve(spec: str | None, layer: bool | None = None, **options: object):
    """A decode kernel or a layer (layer=True: only a layer; None: whichever `spec` names)."""
    from mla_verify.certify.registry import ImplementationError, resolve_any

    try:
        return resolve_any(spec, layer=layer or None, **options)
    except ImplementationError as error:
        raise UsageError(str(error)) from None


def _is_layer(impl) -> bool:
    return getattr(impl, "kind", "") == "layer"


def _check_declared_device(impl, device: str) -> None:
    from mla_verify.decode.contract import declares_capabilities

    if _is_layer(impl):
        devices = tuple(getattr(impl.capabilities, "devices", ("cpu",)))
        if device.split(":")[0] not in devices:
            raise UsageError(f"'{impl.name}' declares devices {list(devices)}; pass --device {devices[0]}")
        return
    # a declared device list is a claim; a bare function's default ('cpu') is only a guess
    if declares_capabilities(impl.fn) and device.split(":")[0] not in impl.capabilities.devices:
        hint = (" (Triton's interpreter runs it on the CPU: set TRITON_INTERPRET=1)"
                if impl.name in ("triton", "triton-scheduled") and device == "cpu" else "")
        raise UsageError(f"'{impl.name}' declares devices {list(impl.capabilities.devices)}; pass --device "
                         f"{impl.capabilities.devices[0]}{hint}")


def _check_selection(impl, args: argparse.Namespace) -> None:
    """--property names a property of this implementation's half; --dtype names a dtype it declares."""
    from mla_verify.certify.halves import LayerHalf, half_of

    half = half_of(impl)
    if getattr(args, "property", None):
        names = [p.name for p in half.properties(impl)]
        for name in args.property:
            if name not in names:
                raise UsageError(f"--property {name}: not a property of {half.kind} '{impl.name}' (its properties: "
                                 f"{', '.join(names)})")
    if getattr(args, "dtype", None):
        from mla_verify.certify.halves import _dtype_names

        declared = (LayerHalf.dtypes(impl, None) if isinstance(half, LayerHalf)
                    else _dtype_names(impl.capabilities.dtypes))
        outside = [name for name in args.dtype if name not in declared]
        if outside:
            raise UsageError(f"--dtype {' '.join(outside)}: '{impl.name}' declares dtypes {list(declared)}")


def _write_outputs(certificate_data: dict, args: argparse.Namespace, markdown: str | None) -> None:
    from mla_verify.certify.certificate import write_outputs

    write_outputs(certificate_data, getattr(args, "json", None), getattr(args, "markdown", None),
                  getattr(args, "html", None), markdown)


def _check_report_available(args: argparse.Namespace) -> None:
    if getattr(args, "html", None):
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise UsageError(f"--html {args.html}: the HTML report needs matplotlib: pip install 'mla-verify[report]'")


# ---- commands ----

def _certify_one(impl, args: argparse.Namespace, progress):
    from mla_verify.certify.runner import certify

    if getattr(args, "workers", 1) > 1:
        return _certify_on_workers(impl, args, progress)
    return certify(impl, profile=args.profile, device=args.device, max_examples=args.max_examples, seed=args.seed,
                   counterexamples=args.counterexamples, isolate=args.isolate, properties=args.property,
                   strict=args.strict, progress=progress, timeout_s=args.timeout, command=_command_line(),
                   dtypes=args.dtype)


def _check_workers(args: argparse.Namespace) -> None:
    """--workers: 'auto' becomes a number (a worker per visible GPU with --device cuda, else one per
    CPU core); more than one needs pytest-xdist and a device each worker can have (cpu, or cuda: one
    GPU each)."""
    from mla_verify.certify.workers import auto_workers

    if args.workers == "auto":
        args.workers = auto_workers(args.device)
    if args.workers == 1:
        if getattr(args, "parts", None):
            raise UsageError(f"--parts {args.parts}: the parts of a property's search run on workers; add --workers N "
                             "(N > 1), or drop --parts")
        return
    import importlib.util

    if importlib.util.find_spec("xdist") is None:
        raise UsageError(f"--workers {args.workers}: running on several workers needs pytest-xdist: "
                         "pip install 'mla-verify[workers]' (or --workers 1)")
    if args.device.startswith("cuda:"):
        raise UsageError(f"--workers {args.workers} --device {args.device}: each worker gets a GPU of its own with "
                         f"--device cuda; to use the one GPU {args.device}, pass --workers 1")


def _certify_on_workers(impl, args: argparse.Namespace, progress):
    """`certify --workers N` (N > 1): pytest with pytest-xdist on mla_verify.certify.suite with the
    plugin's options, in this process (its output kept unless it fails to run); the plugin merges
    the workers' parts into one certificate."""
    import contextlib
    import io

    import pytest

    from mla_verify import plugin
    from mla_verify.certify import suite
    from mla_verify.certify.halves import NothingToCertify

    suite_path = Path(suite.__file__)
    # no faulthandler: a worker that crashes is reported in the certificate, not by a stack dump
    argv = [str(suite_path), "-n", str(args.workers), "-q", "-p", "no:cacheprovider", "-p", "no:faulthandler",
            "--noconftest",
            "-c", os.devnull, "--rootdir", str(suite_path.parent), "--tb=no", "-o", "console_output_style=classic",
            "--mla-layer" if _is_layer(impl) else "--mla-impl", impl.name, "--mla-profile", args.profile,
            "--mla-device", args.device, "--mla-seed", str(args.seed), "--mla-counterexamples", args.counterexamples,
            "--mla-timeout", str(args.timeout or 0), "--mla-progress", "none" if args.quiet else "lines",
            "--mla-command", _command_line()]
    if os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD"):
        argv += ["-p", "xdist.plugin", "-p", "mla_verify.plugin"]
    if args.max_examples:
        argv += ["--mla-max-examples", str(args.max_examples)]
    if args.parts:
        argv += ["--mla-parts", str(args.parts)]
    for flag in ("isolate", "strict"):
        if getattr(args, flag):
            argv.append(f"--mla-{flag}")
    for dtype in args.dtype or ():
        argv += ["--mla-dtype", dtype]
    for name in args.property or ():
        argv += ["--mla-property", name]
    progress.note(f"{args.workers} workers (pytest-xdist) on {args.device}, seed {args.seed}")
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        code = pytest.main(argv)
    if code == pytest.ExitCode.INTERRUPTED:
        raise KeyboardInterrupt
    certificates, problems = plugin.session_certificates()
    if problems and not certificates:
        raise NothingToCertify(problems[0])
    if len(certificates) != 1:
        tail = "\n".join(output.getvalue().strip().splitlines()[-15:])
        raise UsageError(f"the workers produced no certificate (pytest exit code {int(code)}):\n{tail}")
    return certificates[0]


def _command_line() -> str:
    return shlex.join(["mla-verify", *sys.argv[1:]]) if sys.argv[1:] else "mla-verify"


def _cmd_certify(args: argparse.Namespace) -> int:
    from mla_verify.certify.progress import progress_for

    impl = _resolve(args.impl, layer=args.layer)
    _check_device(args.device)
    _check_declared_device(impl, args.device)
    _check_selection(impl, args)
    for option in ("json", "markdown", "html"):
        _check_output_file(f"--{option}", getattr(args, option))
    _check_output_folder("--counterexamples", args.counterexamples)
    _check_report_available(args)
    _check_workers(args)
    if args.workers > 1 and args.seed is None:
        import random

        args.seed = random.randrange(2**32)  # chosen here: the workers' seeds derive from it
    progress = progress_for(args.quiet)
    kind = "layer" if _is_layer(impl) else "decode kernel"
    progress.note(f"certifying {kind} {impl.name} ({impl.spec}) on {args.device}, profile {args.profile}")
    certificate = _certify_one(impl, args, progress)
    data = certificate.to_dict()
    _write_outputs(data, args, certificate.to_markdown())
    for report in certificate.properties:
        print(f"{report.verdict.upper():4}  {report.name}: {report.examples} cases ({report.passed} passed, "
              f"{report.failed} failed, {report.declined} declined); passing cases: max error/bound "
              f"{report.max_ratio:.3g} (sound), {report.max_sharp_ratio:.3g} (sharp)")
        stages = report.extra.get("max_stage_ratios")
        if stages:
            print("      per stage: " + ", ".join(f"{stage} {ratio:.3g}" for stage, ratio in stages.items()))
        if report.extra.get("max_relative_error") is not None:
            print(f"      largest relative error |out - ref| / |ref|: {report.extra['max_relative_error']:.3g}")
        for number, failure in enumerate(report.failures, 1):
            print(f"      failure {number}/{len(report.failures)}: {failure['signature']}"
                  + (" (flaky)" if failure["flaky"] else ""))
            print(f"        {failure['message']}")
            print(f"        minimal case: {failure['description']}")
            if failure["counterexample"]:
                print(f"        replay: mla-verify replay {failure['counterexample']}")
        for reason, count in report.declined_reasons.items():
            print(f"      declined {count}×: {reason}")
    print(f"verdict: {certificate.headline()} ({certificate.elapsed_s:.1f} s)")
    return 0 if certificate.verdict != "fail" else 1


def _cmd_compare(args: argparse.Namespace) -> int:
    from mla_verify.certify.comparison import comparison_markdown, comparison_table
    from mla_verify.certify.progress import progress_for

    if len(args.impls) < 2:
        raise UsageError("compare: name at least two implementations, e.g. mla-verify compare torch triton")
    impls = [_resolve(spec, layer=args.layer) for spec in args.impls]
    if len({_is_layer(impl) for impl in impls}) > 1:
        raise UsageError("compare: name decode kernels only or layers only (they are judged by different "
                         "properties on different cases)")
    _check_device(args.device)
    for impl in impls:
        _check_declared_device(impl, args.device)
        _check_selection(impl, args)
    for option in ("json", "markdown", "html"):
        _check_output_file(f"--{option}", getattr(args, option))
    _check_output_folder("--counterexamples", args.counterexamples)
    _check_report_available(args)
    _check_workers(args)
    if args.seed is None:
        import random

        args.seed = random.randrange(2**32)  # one seed for all: the same drawn cases where capabilities agree
    progress = progress_for(args.quiet)
    certificates = []
    for impl in impls:
        progress.note(f"certifying {impl.name} ({impl.spec}) on {args.device}, profile {args.profile}, "
                      f"seed {args.seed}")
        certificates.append(_certify_one(impl, args, progress).to_dict())
    data = {"schema": "mla-verify-comparison/1", "certificates": certificates}
    _write_outputs(data, args, comparison_markdown(certificates))
    print(comparison_table(certificates))
    return 0 if all(c["verdict"] != "fail" for c in certificates) else 1


def _read_case_file(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UsageError(f"--case {path}: expected a case.json (a counterexample's, or the case dict alone); "
                         f"{type(error).__name__}: {error}") from None


def _cmd_check(args: argparse.Namespace) -> int:
    from mla_verify.decode.case import DecodeCase
    from mla_verify.decode.properties import check

    path = Path(args.case)
    data = _read_case_file(path)
    recorded_layer = isinstance(data, dict) and data.get("implementation_kind") == "layer"
    spec = args.impl
    if spec is None and recorded_layer and not args.layer and isinstance(data.get("implementation"), str):
        spec = _recorded(data)  # a layer's counterexample names its layer
    impl = _resolve(spec, layer=args.layer or None,
                    search_path=tuple(data.get("search_path") or ()) if isinstance(data, dict) else ())
    if _is_layer(impl):
        return _check_layer_case(impl, path, data, args)
    try:
        case = DecodeCase.from_dict(data.get("case", data) if isinstance(data, dict) else data)
    except (ValueError, TypeError, AttributeError) as error:
        raise UsageError(f"--case {path}: expected a case.json (a counterexample's, or the case dict alone); "
                         f"{type(error).__name__}: {error}") from None
    if args.device:
        _check_device(args.device)
        case = case.replace(device=args.device)
    elif case.device != "cpu":
        _check_device(case.device)
    print(f"checking {impl.name} on {case.describe()}")
    _check_selection(impl, args)
    verdicts = check(impl, case, tuple(args.property) if args.property else None)
    for verdict in verdicts:
        print(verdict.describe())
    return 0 if all(v.failure is None for v in verdicts) else 1


def _check_layer_case(impl, path: Path, data: object, args: argparse.Namespace) -> int:
    """`check` of a layer case: every layer property (or the named ones) on the one case."""
    from mla_verify.certify.halves import CaseFault, CaseRefused, LayerHalf, layer_case_from_dict

    try:
        case = layer_case_from_dict(data["case"] if isinstance(data, dict) and "case" in data else data)
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise UsageError(f"--case {path}: expected a layer case.json (a counterexample's, or the case dict alone); "
                         f"{type(error).__name__}: {error}") from None
    device = args.device or (data.get("device") if isinstance(data, dict) else None) or "cpu"
    _check_device(device)
    _check_declared_device(impl, device)
    _check_selection(impl, args)
    half = LayerHalf()
    print(f"checking layer {impl.name} on {case.describe()}")
    failed = False
    for prop in half.properties(impl):
        if args.property and prop.name not in args.property:
            continue
        try:
            ratios, details = half.judge(impl, prop, case, device)
        except CaseRefused as refused:
            print(f"DECLINED  {prop.name}: {refused.reason}")
            failed = True
            continue
        except CaseFault as failure:
            print(f"FAIL  {prop.name}: {failure.fault.signature}: {failure.fault.message}")
            failed = True
            continue
        relative = details.get("relative_error")
        print(f"PASS  {prop.name}: max error/bound {ratios.sound:.3g} (sound), {ratios.sharp:.3g} (sharp)"
              + (f", relative error {relative:.3g}" if relative is not None else "")
              + f"; precision class {details.get('precision_class')}")
    return 1 if failed else 0


# kinds whose replay needs a child process: the failure ends or wedges the process that meets it
_CHILD_PROCESS_KINDS = ("process crashed", "call did not return in time")


def _recorded(meta: dict) -> str:
    """The implementation a counterexample names: its registered name when that still names the
    same target, else the recorded 'module:attr'."""
    from mla_verify.certify.registry import registered, registered_layers

    name, spec = meta.get("implementation_name"), meta["implementation"]
    return name if name and {**registered(), **registered_layers()}.get(name) == spec else spec


def _cmd_replay(args: argparse.Namespace) -> int:
    from mla_verify.certify.halves import CaseFault, CaseRefused, half_of
    from mla_verify.certify.counterexample import load_counterexample

    path = Path(args.path)
    if not (path / "case.json").exists() and not (path.name == "case.json" and path.exists()):
        raise UsageError(f"{path} is not a counterexample folder (expected case.json inside)")
    try:
        meta = load_counterexample(path)
    except ValueError as error:
        raise UsageError(str(error)) from None
    layer = meta.get("implementation_kind") == "layer"
    impl = _resolve(args.impl or _recorded(meta), layer=layer, search_path=tuple(meta.get("search_path") or ()))
    if _is_layer(impl) != layer:
        raise UsageError(f"--impl {args.impl}: the counterexample is of a {'layer' if layer else 'decode kernel'}, "
                         f"and '{impl.name}' is not")
    case = meta["case"]
    device = meta.get("device", "cpu") if layer else case.device
    if device != "cpu":
        _check_device(device)
    half = half_of(impl)
    prop = half.property_named(meta["property"])
    print(f"replaying {prop.name} on {impl.name}: {case.describe()}")
    print(f"recorded: {meta.get('signature', meta['kind'])}: {meta['message']}")
    isolate = args.isolate or meta["kind"] in _CHILD_PROCESS_KINDS
    if isolate and not args.isolate:
        print("(recorded as a crash or a hang: replaying in a child process)")
    isolated = None
    if isolate:
        from mla_verify.certify.runner import IsolatedRunner

        isolated = IsolatedRunner(args.timeout)
    try:
        isolated.judge(impl, prop, case, device) if isolated else half.judge(impl, prop, case, device)
    except CaseRefused as declined:
        print(f"declined by the {half.kind}: {declined.reason}")
        return 1
    except CaseFault as failure:
        print(f"still fails: {failure.fault.signature}: {failure.fault.message}")
        return 1
    finally:
        if isolated:
            isolated.close()
    print("passes now")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from mla_verify.certify.certificate import certificate_markdown

    path = Path(args.certificate)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UsageError(f"{path}: expected a certificate written by --json ({type(error).__name__}: {error})") from None
    if not isinstance(data, dict) or not ("properties" in data or "certificates" in data):
        raise UsageError(f"{path}: expected a certificate written by --json (no 'properties' in it)")
    if not (args.html or args.markdown):
        raise UsageError("report: say what to write: --html PATH and/or --markdown PATH")
    for option in ("markdown", "html"):
        _check_output_file(f"--{option}", getattr(args, option))
    _check_report_available(args)
    markdown = None
    if args.markdown:
        if "certificates" in data:
            from mla_verify.certify.comparison import comparison_markdown

            markdown = comparison_markdown(data["certificates"])
        else:
            try:
                markdown = certificate_markdown(data)
            except (KeyError, TypeError, ValueError) as error:
                raise UsageError(f"{path}: a certificate of an older schema cannot be written as Markdown "
                                 f"({type(error).__name__}: {error}); --html still works") from None
    _write_outputs(data, args, markdown)
    for option in ("html", "markdown"):
        if getattr(args, option):
            print(f"wrote {getattr(args, option)}")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from mla_verify.certify.registry import DEFAULT_IMPLEMENTATION, registered, registered_layers

    rows = [(name, "decode kernel", spec + ("  (default)" if name == DEFAULT_IMPLEMENTATION else ""))
            for name, spec in sorted(registered().items())]
    rows += [(name, "layer", spec) for name, spec in sorted(registered_layers().items())]
    width = max(len(name) for name, _, _ in rows)
    print(f"{'name':{width}}  {'kind':13}  target")
    for name, kind, spec in rows:
        print(f"{name:{width}}  {kind:13}  {spec}")
    return 0


def _cmd_cache_table(args: argparse.Namespace) -> int:
    from mla_verify.cache_sizes import cache_table, format_cache_table

    table = cache_table()
    print(json.dumps(table, indent=2) if args.json else format_cache_table(table))
    return 0


def _property_names() -> list[str]:
    """Every property name of both halves (which apply is checked once the implementation is known)."""
    from mla_verify.certify.halves import layer_properties
    from mla_verify.decode.properties import ALL_PROPERTIES

    return list(dict.fromkeys([p.name for p in ALL_PROPERTIES] + [p.name for p in layer_properties()]))


def _add_run_options(command: argparse.ArgumentParser) -> None:
    from mla_verify.certify.halves import ALL_DTYPES

    command.add_argument("--layer", action="store_true",
                         help="IMPL is a layer factory(config, weights, dtype, device) (default: told by its "
                              "signature)")
    command.add_argument("--dtype", action="append", choices=ALL_DTYPES,
                         help="draw only this dtype (repeatable; default: every declared dtype)")
    command.add_argument("--profile", choices=("quick", "default", "thorough"), default="default")
    command.add_argument("--max-examples", type=_positive_int, help="examples per property (overrides the profile)")
    command.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    command.add_argument("--seed", type=int, help="Hypothesis seed (recorded in the certificate)")
    command.add_argument("--json", help="write the JSON certificate here")
    command.add_argument("--markdown", help="write the Markdown certificate here")
    command.add_argument("--html", help="write a self-contained HTML report here (needs mla-verify[report])")
    command.add_argument("--counterexamples", default="counterexamples",
                         help="folder for counterexample artifacts (default: ./counterexamples)")
    command.add_argument("--isolate", action="store_true",
                         help="run each case in a child process (crashes, CUDA faults and hangs become "
                              "counterexamples)")
    command.add_argument("--timeout", type=_seconds, default=600.0,
                         help="seconds a kernel call may take before it counts as hung (default 600; 0: no limit)")
    command.add_argument("--property", action="append", choices=_property_names(),
                         help="run only this property (repeatable; default: all of the implementation's half)")
    command.add_argument("--strict", action="store_true",
                         help="a case the kernel declines although its capabilities claim it is a failure")
    command.add_argument("--quiet", action="store_true", help="no progress output")
    command.add_argument("--parts", type=_positive_int,
                         help="with --workers: split each property's search into this many parts, each with its own "
                              "seed and share of the examples (default: one per worker; more parts balance the "
                              "workers better when case costs vary, and give the same cases on any number of workers)")
    command.add_argument("--workers", type=_workers, default=1,
                         help="run the cases on N processes with pytest-xdist, merged into one certificate: 'auto' "
                              "is one per visible GPU with --device cuda (each worker on its own GPU), else one per "
                              "CPU core (default 1: in this process)")


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, with where to read more (argparse would print the whole usage)."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mla-verify", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    certify = commands.add_parser("certify", help="certify a decode kernel or a whole layer against the float64 "
                                  "reference")
    certify.add_argument("impl", nargs="?", help="registered name (mla-verify list), package.module:attr or "
                         "path/to/file.py:attr of a decode kernel or a layer factory (default: $MLA_VERIFY_IMPL, "
                         "else the project's own 'torch'; with --layer, $MLA_VERIFY_LAYER)")
    _add_run_options(certify)
    certify.set_defaults(run=_cmd_certify)

    compare = commands.add_parser("compare", help="certify several implementations on the same drawn cases")
    compare.add_argument("impls", nargs="+", help="two or more implementations (names or module:attr)")
    _add_run_options(compare)
    compare.set_defaults(run=_cmd_compare)

    one = commands.add_parser("check", help="judge one given case (a case.json) with both tiers")
    one.add_argument("impl", nargs="?", help="registered name or package.module:attr (default: a layer "
                     "counterexample's own layer, else $MLA_VERIFY_IMPL or 'torch')")
    one.add_argument("--case", required=True, help="a counterexample's case.json, or a file with the case dict")
    one.add_argument("--device", help="build the case on this device instead of the recorded one")
    one.add_argument("--layer", action="store_true", help="IMPL is a layer factory")
    one.add_argument("--property", action="append", choices=_property_names(),
                     help="judge by this property only (repeatable; default: all)")
    one.set_defaults(run=_cmd_check)

    replay = commands.add_parser("replay", help="rerun a saved counterexample; exit 1 while it fails")
    replay.add_argument("path")
    replay.add_argument("--impl", help="replay against another implementation than the recorded one")
    replay.add_argument("--isolate", action="store_true", help="run the kernel in a child process (for crashes)")
    replay.add_argument("--timeout", type=_seconds, default=600.0, help="seconds a kernel call may take (0: no limit)")
    replay.set_defaults(run=_cmd_replay)

    report = commands.add_parser("report", help="render a JSON certificate (certify/compare --json) as HTML or Markdown")
    report.add_argument("certificate", help="a certificate written by --json")
    report.add_argument("--html", help="write the self-contained HTML report here")
    report.add_argument("--markdown", help="write the Markdown certificate here")
    report.set_defaults(run=_cmd_report)

    listing = commands.add_parser("list", help="list registered decode kernels and layers")
    listing.set_defaults(run=_cmd_list)

    table = commands.add_parser("cache-table", help="KV-cache bytes per token for the presets")
    table.add_argument("--json", action="store_true", help="the same data as JSON")
    table.set_defaults(run=_cmd_cache_table)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command in this process; returns the exit code."""
    # the current folder is importable, as under `python -m` and pytest: `certify my_kernel:decode`
    # finds my_kernel.py where the user stands
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except UsageError as error:
        _stderr(f"mla-verify: {error}")
        return 2
    except Exception as error:
        from mla_verify.certify.halves import NothingToCertify

        if not isinstance(error, NothingToCertify):
            raise
        _stderr(f"mla-verify: {error}")
        return 2
    except KeyboardInterrupt:
        _stderr("mla-verify: interrupted")
        return 130


def entry() -> int:
    """The console command: `main` in a child process when the platform can fork, so that a kernel
    that kills its process (a segfault, an abort) ends with a line that says what happened and
    what to do, not with a bare signal exit."""
    if not hasattr(os, "fork") or os.environ.get("MLA_VERIFY_NO_SUPERVISOR"):
        return main()
    child = os.fork()
    if child == 0:
        code = 1
        try:
            code = main()
        except SystemExit as stop:  # argparse: --help, usage errors
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 2)
            if isinstance(stop.code, str):
                _stderr(stop.code)
        except BaseException:  # a bug of mla_verify itself: its traceback is what a report needs
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # the child handles Ctrl-C and reports it
    try:
        _, status = os.waitpid(child, 0)
    finally:
        signal.signal(signal.SIGINT, previous)
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        name = signal.Signals(number).name if number in signal.Signals._value2member_map_ else str(number)
        _stderr(f"mla-verify: the process running the kernel was killed by {name} (a crash in the kernel or "
                f"a library it calls); the last line above names the property it was on. Rerun with --isolate: "
                "each case then runs in a child process, and a crash becomes a shrunk, replayable counterexample.")
        return 1
    return os.WEXITSTATUS(status)


if __name__ == "__main__":
    sys.exit(entry())
