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
