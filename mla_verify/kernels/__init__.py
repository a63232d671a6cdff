"""The project's GPU decode kernels. Triton is an optional dependency (`pip install -e .[triton]`),
so nothing here imports it until a kernel is asked for:

    from mla_verify.kernels import triton_paged_decode   # imports triton now
"""

from __future__ import annotations

import importlib

__all__ = ["triton_paged_decode"]

_LAZY = {"triton_paged_decode": "mla_verify.kernels.triton_decode"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mla_verify.kernels' has no attribute {name!r}")
