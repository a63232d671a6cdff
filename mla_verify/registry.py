"""Naming an implementation: a registered name, 'package.module:attr', or MLA_VERIFY_IMPL.

Installed packages register decode kernels in the entry-point group `mla_verify.implementations`
(name = "module:function"); the project registers its own PyTorch kernel as `torch`.
"""

from __future__ import annotations

import importlib
import os
from importlib.metadata import entry_points

from mla_verify.checks import Implementation
from mla_verify.contract import MissingDependency, capabilities_of, check_signature

__all__ = ["ENTRY_POINT_GROUP", "DEFAULT_IMPLEMENTATION", "ENVIRONMENT_VARIABLE", "ImplementationError",
           "registered", "resolve"]

ENTRY_POINT_GROUP = "mla_verify.implementations"
DEFAULT_IMPLEMENTATION = "torch"
ENVIRONMENT_VARIABLE = "MLA_VERIFY_IMPL"


class ImplementationError(Exception):
    """The named implementation cannot be used; the message is one line saying what was expected."""


def registered() -> dict[str, str]:
    """Registered name → 'module:attr'."""
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def resolve(name: str | None = None) -> Implementation:
    """The implementation called `name` (default: $MLA_VERIFY_IMPL, else the project's own)."""
    name = name or os.environ.get(ENVIRONMENT_VARIABLE) or DEFAULT_IMPLEMENTATION
    names = registered()
    spec = names.get(name, name)
    missing = _missing_library(name, spec)
    if missing is not None:
        raise ImplementationError(f"'{name}': {missing}")
    if ":" not in spec:
        raise ImplementationError(f"'{name}' is neither a registered implementation ({', '.join(sorted(names))}) "
                                  "nor 'package.module:attr'")
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except MissingDependency as error:
        raise ImplementationError(str(error)) from None
    except ImportError as error:
        raise ImplementationError(f"cannot import module '{module_name}' for '{name}': {error}") from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ImplementationError(f"module '{module_name}' has no attribute '{attr}' (from '{name}')")
    problem = check_signature(fn)
    if problem:
        raise ImplementationError(f"'{name}': {problem}")
    return Implementation(name=name, spec=spec, fn=fn, capabilities=capabilities_of(fn))


def _missing_library(name: str, spec: str) -> str | None:
    """The one-line install hint when `name` is an adapter whose library is absent (checked before
    the first call, so a missing library is a usage error rather than an exception per case)."""
    from mla_verify.adapters import DECODE_ADAPTERS, missing_dependency

    for adapter in DECODE_ADAPTERS.values():
        if name == adapter.name or spec == adapter.target:
            missing = missing_dependency(adapter.name)
            return str(missing) if missing is not None else None
    return None


def library_version(impl_spec: str) -> tuple[str, str] | None:
    """(package, version) of the third-party library behind an adapter, when installed."""
    from importlib.metadata import PackageNotFoundError, version

    from mla_verify.adapters import DECODE_ADAPTERS

    for adapter in DECODE_ADAPTERS.values():
        if impl_spec == adapter.target:
            try:
                return adapter.package, version(adapter.package)
            except PackageNotFoundError:
                return adapter.package, "unknown (not installed as a distribution)"
    return None
