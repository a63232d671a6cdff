"""mla-verify: certify, check, replay, list, cache-table.

Exit codes: 0 success; 1 a property failed (certify, check) or a counterexample still fails (replay);
2 a usage error (an implementation that cannot be resolved, an unknown profile, a bad path).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

__all__ = ["main"]


def _json_safe(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _cmd_certify(args: argparse.Namespace) -> int:
    from mla_verify.certify import certify
    from mla_verify.registry import ImplementationError, resolve

    try:
        impl = resolve(args.impl)
    except ImplementationError as error:
        _stderr(f"mla-verify: {error}")
        return 2
    from mla_verify.contract import declares_capabilities

    # a declared device list is a claim; a bare function's default ('cpu') is only a guess
    if declares_capabilities(impl.fn) and args.device.split(":")[0] not in impl.capabilities.devices:
        _stderr(f"mla-verify: '{impl.name}' declares devices {list(impl.capabilities.devices)}; "
                f"pass --device {impl.capabilities.devices[0]}")
        return 2
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            _stderr("mla-verify: --device cuda was asked for but torch sees no CUDA device")
            return 2
    _stderr(f"certifying {impl.name} ({impl.spec}) on {args.device}, profile {args.profile}")
    certificate = certify(impl, profile=args.profile, device=args.device, max_examples=args.max_examples,
                          seed=args.seed, counterexamples=args.counterexamples, isolate=args.isolate,
                          properties=args.property, strict=args.strict, progress=_stderr)
    data = _json_safe(certificate.to_dict())
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(certificate.to_markdown())
    for report in certificate.properties:
        print(f"{report.verdict.upper():4}  {report.name}: {report.examples} cases ({report.passed} passed, "
              f"{report.failed} failed, {report.declined} declined); passing cases: max error/bound "
              f"{report.max_ratio:.3g} (sound), {report.max_sharp_ratio:.3g} (sharp)")
        for number, failure in enumerate(report.failures, 1):
            print(f"      failure {number}/{len(report.failures)}: {failure['signature']}"
                  + (" (flaky)" if failure["flaky"] else ""))
            print(f"        {failure['message']}")
            print(f"        minimal case: {_describe(failure['case'])}")
            if failure["counterexample"]:
                print(f"        replay: mla-verify replay {failure['counterexample']}")
        for reason, count in report.declined_reasons.items():
            print(f"      declined {count}×: {reason}")
    print(f"verdict: {certificate.headline()} ({certificate.elapsed_s:.1f} s)")
    return 0 if certificate.verdict != "fail" else 1


def _describe(case: dict) -> str:
    from mla_verify.strategies import DecodeCase

    return DecodeCase.from_dict(case).describe()


def _cmd_check(args: argparse.Namespace) -> int:
    from mla_verify.decode_properties import check
    from mla_verify.registry import ImplementationError, resolve
    from mla_verify.strategies import DecodeCase

    try:
        impl = resolve(args.impl)
    except ImplementationError as error:
        _stderr(f"mla-verify: {error}")
        return 2
    path = Path(args.case)
    try:
        data = json.loads(path.read_text())
        case = DecodeCase.from_dict(data.get("case", data))
    except (OSError, ValueError, TypeError, AttributeError) as error:
        _stderr(f"mla-verify: --case {path}: expected a case.json (a counterexample's, or the case dict alone); "
                f"{type(error).__name__}: {error}")
        return 2
    if args.device:
        case = case.replace(device=args.device)
    print(f"checking {impl.name} on {case.describe()}")
    verdicts = check(impl, case, tuple(args.property) if args.property else None)
    for verdict in verdicts:
        print(verdict.describe())
    return 0 if all(v.failure is None for v in verdicts) else 1


def _cmd_replay(args: argparse.Namespace) -> int:
    from mla_verify.checks import CaseDeclined, CaseFailure
    from mla_verify.counterexample import load_counterexample
    from mla_verify.decode_properties import property_named
    from mla_verify.registry import ImplementationError, resolve

    path = Path(args.path)
    if not (path / "case.json").exists() and not (path.name == "case.json" and path.exists()):
        _stderr(f"mla-verify: {path} is not a counterexample folder (expected case.json inside)")
        return 2
    try:
        meta = load_counterexample(path)
        impl = resolve(args.impl or meta["implementation"])
    except (ValueError, ImplementationError) as error:
        _stderr(f"mla-verify: {error}")
        return 2
    prop = property_named(meta["property"])
    print(f"replaying {prop.name} on {impl.name}: {meta['case'].describe()}")
    print(f"recorded: {meta.get('signature', meta['kind'])}: {meta['message']}")
    isolated = None
    if args.isolate:
        from mla_verify.certify import IsolatedRunner

        isolated = IsolatedRunner()
    try:
        isolated.check(impl, prop, meta["case"]) if isolated else prop.check(impl, meta["case"])
    except CaseDeclined as declined:
        print(f"declined by the kernel: {declined.reason}")
        return 1
    except CaseFailure as failure:
        print(f"still fails: {failure.finding.signature}: {failure.finding.message}")
        return 1
    finally:
        if isolated:
            isolated.close()
    print("passes now")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from mla_verify.registry import DEFAULT_IMPLEMENTATION, registered

    for name, spec in sorted(registered().items()):
        marker = "  (default)" if name == DEFAULT_IMPLEMENTATION else ""
        print(f"{name:12} {spec}{marker}")
    return 0


def _cmd_cache_table(args: argparse.Namespace) -> int:
    from mla_verify.cache_sizes import cache_table, format_cache_table

    table = cache_table()
    print(json.dumps(table, indent=2) if args.json else format_cache_table(table))
    return 0


def _parser() -> argparse.ArgumentParser:
    from mla_verify.decode_properties import DECODE_PROPERTIES

    parser = argparse.ArgumentParser(prog="mla-verify", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    certify = commands.add_parser("certify", help="certify a decode kernel against the float64 reference")
    certify.add_argument("impl", nargs="?", help="registered name or package.module:attr "
                         "(default: $MLA_VERIFY_IMPL, else the project's own 'torch')")
    certify.add_argument("--profile", choices=("quick", "default", "thorough"), default="default")
    certify.add_argument("--max-examples", type=int, help="examples per property (overrides the profile)")
    certify.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    certify.add_argument("--seed", type=int, help="Hypothesis seed (recorded in the certificate)")
    certify.add_argument("--json", help="write the JSON certificate here")
    certify.add_argument("--markdown", help="write the Markdown certificate here")
    certify.add_argument("--counterexamples", default="counterexamples",
                         help="folder for counterexample artifacts (default: ./counterexamples)")
    certify.add_argument("--isolate", action="store_true",
                         help="run each case in a child process (reports segfaults and CUDA faults)")
    certify.add_argument("--property", action="append", choices=[p.name for p in DECODE_PROPERTIES],
                         help="run only this property (repeatable; default: all)")
    certify.add_argument("--strict", action="store_true",
                         help="a case the kernel declines although its capabilities claim it is a failure")
    certify.set_defaults(run=_cmd_certify)

    one = commands.add_parser("check", help="judge one given case (a case.json) with both tiers")
    one.add_argument("impl", nargs="?", help="registered name or package.module:attr")
    one.add_argument("--case", required=True, help="a counterexample's case.json, or a file with the case dict")
    one.add_argument("--device", help="build the case on this device instead of the recorded one")
    one.add_argument("--property", action="append", choices=[p.name for p in DECODE_PROPERTIES],
                     help="judge by this property only (repeatable; default: all)")
    one.set_defaults(run=_cmd_check)

    replay = commands.add_parser("replay", help="rerun a saved counterexample; exit 1 while it fails")
    replay.add_argument("path")
    replay.add_argument("--impl", help="replay against another implementation than the recorded one")
    replay.add_argument("--isolate", action="store_true", help="run the kernel in a child process (for crashes)")
    replay.set_defaults(run=_cmd_replay)

    listing = commands.add_parser("list", help="list registered implementations")
    listing.set_defaults(run=_cmd_list)

    table = commands.add_parser("cache-table", help="KV-cache bytes per token for the presets")
    table.add_argument("--json", action="store_true", help="the same data as JSON")
    table.set_defaults(run=_cmd_cache_table)
    return parser


def main(argv: list[str] | None = None) -> int:
    # the current folder is importable, as under `python -m` and pytest: `certify my_kernel:decode`
    # finds my_kernel.py where the user stands
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    args = _parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
