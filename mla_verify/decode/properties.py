"""The decode-kernel properties a certificate is made of, as plain functions of (impl, case).

Each returns the observed/bound ratios it measured in both tiers (0 for exact properties) or raises
CaseFailure (CaseDeclined when the kernel refuses the case).
properties/test_decode_kernel.py wraps them for pytest; mla_verify.certify runs them for the CLI.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from mla_verify.decode.inputs import DecodeInputs, build_inputs
from mla_verify.decode.checks import (CaseDeclined, CaseFailure, FailureKind, Finding, Implementation, Observed, Ratios, call_kernel,
                               check_case, expected_for)
from mla_verify.decode.contract import capabilities_of
from mla_verify.decode.case import DecodeCase

__all__ = ["DecodeProperty", "DECODE_PROPERTIES", "property_named", "CaseVerdict", "check"]


def _one_call(case: DecodeCase) -> list[DecodeInputs]:
    return [build_inputs(case)]


def _pages_moved(case: DecodeCase) -> list[DecodeInputs]:
    return [build_inputs(case), build_inputs(case, layout_seed=case.layout_seed + 1)]


def _kept_rows(case: DecodeCase) -> list[int]:
    """The rows whose neighbours are redrawn: the first and the last (a bug that carries state from
    one row to the next shows in the last; one that mixes rows in a tile, in either)."""
    return sorted({0, case.batch - 1})


def _other_rows_redrawn(case: DecodeCase) -> list[DecodeInputs]:
    calls = [build_inputs(case)]
    for kept in _kept_rows(case):
        calls.append(build_inputs(case, redraw_rows={row: case.seed + 1 for row in range(case.batch) if row != kept}))
    return calls


def _same_inputs_twice(case: DecodeCase) -> list[DecodeInputs]:
    inputs = build_inputs(case)
    return [inputs, inputs]


@dataclass(frozen=True)
class DecodeProperty:
    """`calls` builds the inputs of each kernel call the property makes (the counterexample artifact
    saves exactly these)."""

    name: str
    description: str
    check: Callable[[Implementation, DecodeCase], Ratios]
    calls: Callable[[DecodeCase], list[DecodeInputs]] = _one_call
    min_batch: int = 1
    prepare: Callable[[DecodeCase], DecodeCase] = lambda case: case


def _matches_reference(impl: Implementation, case: DecodeCase) -> Ratios:
    return check_case(impl, case)


def _identical_or_within(impl: Implementation, case: DecodeCase, first: Observed, second: Observed,
                         kind: FailureKind, what: str, rows: slice = slice(None),
                         first_inputs: DecodeInputs | None = None) -> Ratios:
    """Bitwise equality for a deterministic kernel; within twice the bound for one that declares
    itself nondeterministic (each run is within the bound of the same reference). When the two
    calls differ and `first_inputs` is given, the first call is repeated: a kernel that differs
    from itself on the same inputs is reported as nondeterministic, not as `kind`."""
    a_out, b_out = first.out[rows], second.out[rows]
    a_lse, b_lse = first.lse[rows], second.lse[rows]
    if impl.capabilities.deterministic:
        same = _bitwise_equal(a_out, b_out) and _bitwise_equal(a_lse, b_lse)
        if not same:
            if first_inputs is not None:
                again = call_kernel(impl, first_inputs)
                if not (_bitwise_equal(first.out, again.out) and _bitwise_equal(first.lse, again.lse)):
                    kind, what = FailureKind.NONDETERMINISM, "two calls on the same inputs"
            difference = (a_out.double() - b_out.double()).abs().nan_to_num(nan=float("inf")).max().item()
            raise CaseFailure(Finding(kind, f"{what}: out differs by up to {difference:.3g} (the kernel "
                                            "declares itself deterministic, so results must be bit-identical)"),
                              case)
        return Ratios()
    expected = expected_for(build_inputs(case), impl.capabilities)
    bound = 2 * expected.out_bound[rows].to(a_out.device)
    difference = (a_out.double() - b_out.double()).abs()
    ratio = float((difference / bound.clamp_min(1e-300)).max()) if difference.numel() else 0.0
    if ratio > 1:
        raise CaseFailure(Finding(kind, f"{what}: run-to-run difference / (2·bound) = {ratio:.3g}", ratio), case)
    return Ratios(sound=ratio)


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


def _page_order_invariant(impl: Implementation, case: DecodeCase) -> Ratios:
    calls = _pages_moved(case)
    first, second = (call_kernel(impl, inputs) for inputs in calls)
    return _identical_or_within(impl, case, first, second, FailureKind.LAYOUT_DEPENDENCE,
                                "placing the same pages at other physical blocks changed the result",
                                first_inputs=calls[0])


def _rows_independent(impl: Implementation, case: DecodeCase) -> Ratios:
    calls = _other_rows_redrawn(case)
    observed = [call_kernel(impl, inputs) for inputs in calls]
    ratios = Ratios()
    for kept, redrawn in zip(_kept_rows(case), observed[1:]):
        ratios = ratios.worst(_identical_or_within(
            impl, case, observed[0], redrawn, FailureKind.CROSS_ROW_DEPENDENCE,
            f"changing the other rows' q and cache changed row {kept}", rows=slice(kept, kept + 1),
            first_inputs=calls[0]))
    return ratios


def _deterministic(impl: Implementation, case: DecodeCase) -> Ratios:
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


@dataclass
class CaseVerdict:
    """One property's judgement of one case: ratios when it passed, else the failure or the refusal."""

    prop: str
    ratios: Ratios | None = None
    failure: Finding | None = None
    declined: str | None = None

    @property
    def passed(self) -> bool:
        return self.failure is None and self.declined is None

    def describe(self) -> str:
        if self.failure is not None:
            return f"FAIL  {self.prop}: {self.failure.signature}: {self.failure.message}"
        if self.declined is not None:
            return f"DECLINED  {self.prop}: {self.declined}"
        return (f"PASS  {self.prop}: max error/bound {self.ratios.sound:.3g} (sound), "
                f"error/tolerance {self.ratios.sharp:.3g} (sharp)")


def check(kernel: Callable | Implementation | str, case: DecodeCase | dict,
          properties: tuple[str, ...] | None = None) -> list[CaseVerdict]:
    """Judge one given case with both tiers, by every property (or the named ones).

    `kernel` is a decode-contract function (its declared capabilities apply), an Implementation,
    or a registered name / 'module:attr'; `case` a DecodeCase or its dict (the "case" entry of a
    counterexample's case.json). Example::

        from mla_verify import check
        for verdict in check(my_decode, case):
            print(verdict.describe())
    """
    impl = _implementation(kernel)
    if isinstance(case, dict):
        case = DecodeCase.from_dict(case)
    if not isinstance(case, DecodeCase):
        raise TypeError(f"case must be a mla_verify DecodeCase or its dict; got {type(case).__name__}")
    verdicts = []
    for name in properties or [p.name for p in DECODE_PROPERTIES]:
        prop = property_named(name)
        if case.batch < prop.min_batch:
            continue
        try:
            verdicts.append(CaseVerdict(name, ratios=prop.check(impl, prop.prepare(case))))
        except CaseDeclined as declined:
            verdicts.append(CaseVerdict(name, declined=declined.reason))
        except CaseFailure as failure:
            verdicts.append(CaseVerdict(name, failure=failure.finding))
    return verdicts


def _implementation(kernel: Callable | Implementation | str) -> Implementation:
    if isinstance(kernel, Implementation):
        return kernel
    if isinstance(kernel, str):
        from mla_verify.certify.registry import resolve

        return resolve(kernel)
    if not callable(kernel):
        raise TypeError(f"kernel must be a decode function, an Implementation or a name; got {type(kernel).__name__}")
    name = getattr(kernel, "__name__", type(kernel).__name__)
    return Implementation(name=name, spec=f"{getattr(kernel, '__module__', '?')}:{name}", fn=kernel,
                          capabilities=capabilities_of(kernel))
