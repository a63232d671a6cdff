"""Naming an implementation: a registered name, 'package.module:attr', 'path/to/file.py:attr', or
MLA_VERIFY_IMPL.

Two kinds are named the same way: a decode kernel (the decode contract, `mla_verify.contract`) and
a whole layer (a factory `factory(config, weights, dtype, device)` of the layer contract,
`mla_verify.layer_contract`). `resolve` takes decode kernels only; `resolve_any` takes either and
tells them apart by what is registered under the name, or else by the signature (`--layer` forces
a layer).

Installed packages register decode kernels in the entry-point group `mla_verify.implementations`
(name = "module:function"); the project registers its own PyTorch kernel as `torch`. Layers are
the HF adapters (`mla_verify.adapters.LAYER_ADAPTERS`) and the project's own fast layer.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import Callable

from mla_verify.adapters import MissingDependency
from mla_verify.decode.checks import DEFAULT_TIMEOUT_S, Implementation
from mla_verify.decode.contract import capabilities_of, check_signature

__all__ = ["ENTRY_POINT_GROUP", "DEFAULT_IMPLEMENTATION", "ENVIRONMENT_VARIABLE", "LAYER_ENVIRONMENT_VARIABLE",
           "ImplementationError", "LayerImplementation", "OWN_LAYERS", "registered", "registered_layers", "resolve",
           "resolve_layer", "resolve_any", "check_layer_signature", "module_root", "library_version"]

ENTRY_POINT_GROUP = "mla_verify.implementations"
DEFAULT_IMPLEMENTATION = "torch"
ENVIRONMENT_VARIABLE = "MLA_VERIFY_IMPL"
LAYER_ENVIRONMENT_VARIABLE = "MLA_VERIFY_LAYER"
LAYER_SIGNATURE = "factory(config, weights, dtype, device) returning a layer with prefill(x) and decode(x)"
DECODE_SIGNATURE = "fn(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=False)"


class ImplementationError(Exception):
    """The named implementation cannot be used; the message is one line saying what was expected."""


def registered() -> dict[str, str]:
    """Registered name → 'module:attr'."""
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


# the project's own whole layers (layer_contract factories), beside the HF adapters
OWN_LAYERS = {"fast-layer": "mla_verify.impls.fast_layer:fast_layer",
              "fast-layer-torch": "mla_verify.impls.fast_layer:fast_layer_torch_decode"}


def registered_layers() -> dict[str, str]:
    """Layer name → 'module:attr' of its factory (mla_verify.layer_contract.LayerFactory)."""
    from mla_verify.adapters import LAYER_ADAPTERS

    return {**{a.name: a.target for a in LAYER_ADAPTERS.values()}, **OWN_LAYERS}


@dataclass
class LayerImplementation:
    """A whole layer to certify: its factory and what it declares (`LayerCapabilities`); `spec` is
    how to import the factory ('module:attr', or 'path/file.py:attr')."""

    name: str
    spec: str
    factory: Callable
    capabilities: object
    # wall-time limit of one case (building the layer, prefill and every decode step); None: no limit
    timeout_s: float | None = DEFAULT_TIMEOUT_S
    kind = "layer"

    @property
    def fn(self) -> Callable:
        """The factory (the name the decode half uses for the code under test)."""
        return self.factory


def check_layer_signature(factory: object) -> str | None:
    """None if `factory` can be called as factory(config, weights, dtype, device), else a one-line reason."""
    if not callable(factory):
        return f"expected a callable layer factory, {LAYER_SIGNATURE}; got {type(factory).__name__}"
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return None
    try:
        signature.bind(*range(4))
    except TypeError as error:
        return f"expected a layer {LAYER_SIGNATURE}; {error}"
    return None


def _looks_like_layer(fn: object) -> bool:
    """A callable that binds the layer factory's four arguments but not the decode contract's, or
    whose first two parameters are named (config, weights)."""
    try:
        parameters = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return False
    if parameters[:2] == ["config", "weights"]:
        return True
    return check_layer_signature(fn) is None and check_signature(fn) is not None


def resolve_layer(name: str | None = None, search_path: tuple[str, ...] = ()) -> LayerImplementation:
    """The layer called `name` (a registered layer name, 'package.module:attr' or
    'path/to/file.py:attr' of a layer factory); default $MLA_VERIFY_LAYER."""
    resolved = resolve_any(name, search_path, layer=True)
    assert isinstance(resolved, LayerImplementation)
    return resolved


def resolve_any(name: str | None = None, search_path: tuple[str, ...] = (),
                layer: bool | None = None) -> Implementation | LayerImplementation:
    """A decode kernel or a layer, whichever `name` is: a registered layer name is a layer, a
    registered kernel name a kernel; 'module:attr' is told apart by its signature. layer=True
    takes only layers (default name $MLA_VERIFY_LAYER), False only decode kernels."""
    if layer is False:
        return resolve(name, search_path)
    variable = LAYER_ENVIRONMENT_VARIABLE if layer else ENVIRONMENT_VARIABLE
    from_environment = name is None and bool(os.environ.get(variable))
    if name is None and not from_environment:
        if layer:
            raise ImplementationError(f"name a layer ({', '.join(sorted(registered_layers()))}, or "
                                      f"'package.module:attr' of a {LAYER_SIGNATURE}), or set {variable}")
        return resolve(None, search_path)
    name = name or os.environ[variable]
    try:
        return _resolve_any(name, search_path, layer)
    except ImplementationError as error:
        if from_environment:
            raise ImplementationError(f"{variable}={name} (from the environment): {error}") from None
        raise


def _resolve_any(name: str, search_path: tuple[str, ...], layer: bool | None) -> Implementation | LayerImplementation:
    layers = registered_layers()
    if name in layers:
        return _layer(name, layers[name], search_path)
    if name in registered():
        if layer:
            raise ImplementationError(f"'{name}' is a decode kernel, and --layer asks for a layer factory "
                                      f"({LAYER_SIGNATURE}); drop --layer to certify the kernel")
        return _resolve(name, search_path)
    if ":" not in name:
        names = sorted(layers) if layer else sorted({*registered(), *layers})
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ImplementationError(f"'{name}' is neither a registered implementation ({', '.join(names)}) nor "
                                  f"'package.module:attr' nor 'path/to/file.py:attr'{hint}")
    fn, spec = _attribute(name, name, search_path)
    if layer or _looks_like_layer(fn):
        return _layer(name, spec, search_path, fn)
    problem = check_signature(fn)
    if problem:
        problem = problem.replace("expected a callable decode kernel",
                                  "expected a callable decode kernel or layer factory")
        if problem.startswith("expected fn("):
            problem = problem.replace(f"expected {DECODE_SIGNATURE}",
                                      f"expected {DECODE_SIGNATURE} or a layer factory(config, weights, dtype, "
                                      "device)", 1)
        raise ImplementationError(f"'{name}': {problem}")
    return Implementation(name=name, spec=spec, fn=fn, capabilities=capabilities_of(fn))


def _layer(name: str, spec: str, search_path: tuple[str, ...], factory: Callable | None = None) -> LayerImplementation:
    missing = _missing_library(name, spec)
    if missing is not None:
        raise ImplementationError(f"'{name}': {missing}")
    if factory is None:
        factory, spec = _attribute(name, spec, search_path)
    problem = check_layer_signature(factory)
    if problem:
        raise ImplementationError(f"'{name}': {problem}")
    from mla_verify.layer import layer_capabilities_of

    try:
        capabilities = layer_capabilities_of(factory)
    except (TypeError, ValueError) as error:
        raise ImplementationError(f"'{name}': its declared capabilities are not usable: {error}") from None
    return LayerImplementation(name=name, spec=spec, factory=factory, capabilities=capabilities)


def resolve(name: str | None = None, search_path: tuple[str, ...] = ()) -> Implementation:
    """The implementation called `name`: a registered name, 'package.module:attr' (the current
    folder is importable), or 'path/to/file.py:attr'. Default: $MLA_VERIFY_IMPL, else the project's
    own. search_path: folders tried after sys.path when the module is not found (where a recorded
    counterexample's kernel was imported from)."""
    from_environment = name is None and bool(os.environ.get(ENVIRONMENT_VARIABLE))
    name = name or os.environ.get(ENVIRONMENT_VARIABLE) or DEFAULT_IMPLEMENTATION
    try:
        return _resolve(name, search_path)
    except ImplementationError as error:
        if from_environment:
            raise ImplementationError(f"{ENVIRONMENT_VARIABLE}={name} (from the environment): {error}") from None
        raise


def _resolve(name: str, search_path: tuple[str, ...]) -> Implementation:
    names = registered()
    spec = names.get(name, name)
    missing = _missing_library(name, spec)
    if missing is not None:
        raise ImplementationError(f"'{name}': {missing}")
    if name in registered_layers():
        raise ImplementationError(f"'{name}' is a whole layer, and this takes a decode kernel; certify the layer "
                                  f"with: mla-verify certify {name} (under pytest: --mla-layer {name})")
    if ":" not in spec:
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ImplementationError(f"'{name}' is neither a registered implementation ({', '.join(sorted(names))}) "
                                  f"nor 'package.module:attr' nor 'path/to/file.py:attr'{hint}")
    fn, spec = _attribute(name, spec, search_path)
    problem = check_signature(fn)
    if problem:
        raise ImplementationError(f"'{name}': {problem}")
    return Implementation(name=name, spec=spec, fn=fn, capabilities=capabilities_of(fn))


def _attribute(name: str, spec: str, search_path: tuple[str, ...]) -> tuple[object, str]:
    """The object 'module:attr' (or 'path/file.py:attr') names, and the spec that imports it from
    anywhere (a file by its absolute path)."""
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise ImplementationError(f"'{name}': expected 'package.module:attr' or 'path/to/file.py:attr'")
    if module_name.endswith(".py"):
        module, spec = _module_from_file(name, module_name, attr)
    else:
        module = _import(name, module_name, search_path)
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            close = difflib.get_close_matches(part, [n for n in dir(module) if not n.startswith("_")], n=3)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise ImplementationError(f"module '{module_name}' has no attribute '{attr}' (from '{name}'){hint}")
    return fn, spec


def _import(name: str, module_name: str, search_path: tuple[str, ...]) -> ModuleType:
    try:
        return importlib.import_module(module_name)
    except MissingDependency as error:
        raise ImplementationError(str(error)) from None
    except ModuleNotFoundError as error:
        fallback = [folder for folder in search_path if folder not in sys.path and Path(folder).is_dir()]
        if error.name == module_name.split(".")[0] and fallback:
            sys.path.extend(fallback)
            return _import(name, module_name, ())
        raise ImplementationError(f"cannot import module '{module_name}' for '{name}': {error} (the current "
                                  "folder and PYTHONPATH are searched; or name a file: path/to/file.py:attr)") from None
    except ImportError as error:
        raise ImplementationError(f"cannot import module '{module_name}' for '{name}': {error}") from None
    except Exception as error:  # the user's module itself raised on import
        raise ImplementationError(f"importing module '{module_name}' for '{name}' raised "
                                  f"{type(error).__name__}: {error}") from None


def _module_from_file(name: str, file: str, attr: str) -> tuple[ModuleType, str]:
    """The module defined by a .py file, and the spec naming it by absolute path (so that replays
    and child processes find it from any folder)."""
    path = Path(file).expanduser().resolve()
    if not path.is_file():
        raise ImplementationError(f"'{name}': no such file {path}")
    module_name = f"{path.stem}" if path.stem.isidentifier() else "mla_verify_user_kernel"
    loaded = sys.modules.get(module_name)
    if loaded is not None and getattr(loaded, "__file__", None) == str(path):
        return loaded, f"{path}:{attr}"
    if loaded is not None:
        module_name = f"mla_verify_user_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}_{module_name}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # pickling and dataclasses look their module up here
    sys.path.insert(0, str(path.parent))  # so that the file can import its siblings
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[module_name]
        raise ImplementationError(f"importing {path} for '{name}' raised {type(error).__name__}: {error}") from None
    return module, f"{path}:{attr}"


def module_root(fn: object) -> str | None:
    """The folder from which the module defining `fn` was imported (its top-level package's parent)."""
    module = sys.modules.get(getattr(fn, "__module__", "") or "")
    file = getattr(module, "__file__", None)
    if file is None:
        return None
    root = Path(file).resolve().parent
    for _ in range(module.__name__.count(".")):
        root = root.parent
    return str(root)


def _missing_library(name: str, spec: str) -> str | None:
    """The one-line install hint when `name` is an adapter whose library is absent (checked before
    the first call, so a missing library is a usage error rather than an exception per case)."""
    from mla_verify.adapters import DECODE_ADAPTERS, LAYER_ADAPTERS, missing_dependency

    for adapter in (*DECODE_ADAPTERS.values(), *LAYER_ADAPTERS.values()):
        if name == adapter.name or spec == adapter.target:
            missing = missing_dependency(adapter.name)
            return str(missing) if missing is not None else None
    return None


def library_version(impl_spec: str) -> tuple[str, str] | None:
    """(package, version) of the third-party library behind an adapter, when installed."""
    from importlib.metadata import PackageNotFoundError, version

    from mla_verify.adapters import DECODE_ADAPTERS, LAYER_ADAPTERS

    for adapter in (*DECODE_ADAPTERS.values(), *LAYER_ADAPTERS.values()):
        if impl_spec == adapter.target:
            try:
                return adapter.package, version(adapter.package)
            except PackageNotFoundError:
                return adapter.package, "unknown (not installed as a distribution)"
    return None
