"""The decode-kernel properties a certificate is made of, as plain functions of (impl, case).

Each returns the observed/bound ratio it measured (0 for exact properties) or raises CaseFailure.
properties/test_decode_kernel.py wraps them for pytest; mla_verify.certify runs them for the CLI.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from mla_verify.cases import DecodeInputs, build_inputs
from mla_verify.checks import (CaseFailure, FailureKind, Finding, Implementation, Observed, call_kernel,
                               check_case, expected_for)
from mla_verify.strategies import DecodeCase

__all__ = ["DecodeProperty", "DECODE_PROPERTIES", "property_named"]


def _one_call(case: DecodeCase) -> list[DecodeInputs]:
    return [build_inputs(case)]


def _pages_moved(case: DecodeCase) -> list[DecodeInputs]:
    return [build_inputs(case), build_inputs(case, layout_seed=case.layout_seed + 1)]


def _other_rows_redrawn(case: DecodeCase) -> list[DecodeInputs]:
    return [build_inputs(case), build_inputs(case, redraw_rows={row: case.seed + 1 for row in range(1, case.batch)})]


def _same_inputs_twice(case: DecodeCase) -> list[DecodeInputs]:
    inputs = build_inputs(case)
    return [inputs, inputs]


@dataclass(frozen=True)
class DecodeProperty:
    """`calls` builds the inputs of each kernel call the property makes (the counterexample artifact
    saves exactly these)."""

    name: str
    description: str
    check: Callable[[Implementation, DecodeCase], float]
    calls: Callable[[DecodeCase], list[DecodeInputs]] = _one_call
    min_batch: int = 1
    prepare: Callable[[DecodeCase], DecodeCase] = lambda case: case


def _matches_reference(impl: Implementation, case: DecodeCase) -> float:
    return max(check_case(impl, case))


def _identical_or_within(impl: Implementation, case: DecodeCase, first: Observed, second: Observed,
                         kind: FailureKind, what: str, rows: slice = slice(None)) -> float:
    """Bitwise equality for a deterministic kernel; within twice the bound for one that declares
    itself nondeterministic (each run is within the bound of the same reference)."""
    a_out, b_out = first.out[rows], second.out[rows]
    a_lse, b_lse = first.lse[rows], second.lse[rows]
    if impl.capabilities.deterministic:
        same = _bitwise_equal(a_out, b_out) and _bitwise_equal(a_lse, b_lse)
        if not same:
            difference = (a_out.double() - b_out.double()).abs().nan_to_num(nan=float("inf")).max().item()
            raise CaseFailure(Finding(kind, f"{what}: out differs by up to {difference:.3g} (the kernel "
                                            "declares itself deterministic, so results must be bit-identical)"),
                              case)
        return 0.0
    expected = expected_for(build_inputs(case), impl.capabilities)
    bound = 2 * expected.out_bound[rows].to(a_out.device)
    difference = (a_out.double() - b_out.double()).abs()
    ratio = float((difference / bound.clamp_min(1e-300)).max()) if difference.numel() else 0.0
    if ratio > 1:
        raise CaseFailure(Finding(kind, f"{what}: run-to-run difference / (2·bound) = {ratio:.3g}", ratio), case)
    return ratio


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


def _page_order_invariant(impl: Implementation, case: DecodeCase) -> float:
    first, second = (call_kernel(impl, inputs) for inputs in _pages_moved(case))
    return _identical_or_within(impl, case, first, second, FailureKind.LAYOUT_DEPENDENCE,
                                "placing the same pages at other physical blocks changed the result")


def _rows_independent(impl: Implementation, case: DecodeCase) -> float:
    first, second = (call_kernel(impl, inputs) for inputs in _other_rows_redrawn(case))
    return _identical_or_within(impl, case, first, second, FailureKind.CROSS_ROW_DEPENDENCE,
                                "changing the other rows' q and cache changed row 0", rows=slice(0, 1))


def _deterministic(impl: Implementation, case: DecodeCase) -> float:
    first, second = (call_kernel(impl, inputs) for inputs in _same_inputs_twice(case))
    return _identical_or_within(impl, case, first, second, FailureKind.NONDETERMINISM,
                                "two calls on the same inputs")


DECODE_PROPERTIES = (
    DecodeProperty("matches_reference", "out and lse within the case's derived bound of the float64 "
                   "reference; NaN/inf pattern, empty rows, shapes, dtypes and input integrity exact",
                   _matches_reference),
    DecodeProperty("page_order_invariant", "moving pages to other physical blocks gives the identical result",
                   _page_order_invariant, calls=_pages_moved, prepare=lambda case: case.replace(permute_pages=True)),
    DecodeProperty("rows_independent", "a batch row's result does not depend on the other rows' data",
                   _rows_independent, calls=_other_rows_redrawn, min_batch=2),
    DecodeProperty("deterministic", "two calls give the identical result (or within 2·bound when the "
                   "kernel declares itself nondeterministic)", _deterministic, calls=_same_inputs_twice),
)


def property_named(name: str) -> DecodeProperty:
    for prop in DECODE_PROPERTIES:
        if prop.name == name:
            return prop
    raise ValueError(f"property must be one of {[p.name for p in DECODE_PROPERTIES]}; got {name!r}")
