"""The decode-kernel properties a certificate is made of, as plain functions of (impl, case).

Each returns the observed/bound ratios it measured in both tiers (0 for exact properties) or raises
CaseFailure (CaseDeclined when the kernel refuses the case).
properties/decode/test_decode_kernel.py wraps them for pytest; mla_verify.certify runs them for the CLI.

DECODE_PROPERTIES apply to every kernel; FP8_SPARSE_PROPERTIES only to a kernel that declares
sparse decode or an FP8 quantiser (`DecodeProperty.applies`); `properties_for(impl)` lists the ones
that apply (properties/decode/test_decode_kernel.py runs every one under pytest, skipping those that do not apply). FP8 and sparse
cases also flow through the four general properties, drawn inside the declared capabilities.
A kernel that declares invalid_indices="raise" passes a case holding positive indices past the pool
by raising (the contract allows it).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch

from mla_verify.decode.inputs import DecodeInputs, build_inputs
from mla_verify.decode.checks import (CaseDeclined, CaseFailure, FailureKind, Finding, Implementation, Observed,
                                      RaisedAsDeclared, Ratios, call_kernel, check_case, compare, expected_for)
from mla_verify.decode.contract import Capabilities, capabilities_of, quantizer_of
from mla_verify.decode.case import DecodeCase
from mla_verify.decode.fp8 import FP8_FORMATS, quantizer_errors, reference_scales
from mla_verify.decode.sparse import HUGE_INDEX
from mla_verify.rounding import bits_differ, bitwise_equal

__all__ = ["DecodeProperty", "DECODE_PROPERTIES", "FP8_SPARSE_PROPERTIES", "ALL_PROPERTIES", "property_named",
           "properties_for", "sparse_variant", "CaseVerdict", "check"]


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
    # whether the property applies to an implementation (FP8/sparse properties need declarations)
    applies: Callable[[Implementation], bool] = lambda impl: True


def _raise_as_declared_passes(check: Callable[[Implementation, DecodeCase], Ratios]):
    """A kernel that declares invalid_indices="raise" and raises on a case holding positive indices
    past the pool passes it."""

    @functools.wraps(check)
    def checked(impl: Implementation, case: DecodeCase) -> Ratios:
        try:
            return check(impl, case)
        except RaisedAsDeclared:
            return Ratios()

    return checked


def _matches_reference(impl: Implementation, case: DecodeCase) -> Ratios:
    return check_case(impl, case)


def _identical_or_within(impl: Implementation, case: DecodeCase, first: Observed, second: Observed,
                         kind: FailureKind, what: str, rows: slice = slice(None),
                         first_inputs: DecodeInputs | None = None) -> Ratios:
    """Bit-identical results for a deterministic kernel; within twice the bound for one that
    declares itself nondeterministic (each run is within the bound of the same reference). When the
    two calls differ and `first_inputs` is given, the first call is repeated: a kernel that differs
    from itself on the same inputs is reported as nondeterministic, not as `kind`.

    What "identical" accepts (deterministic, page_order_invariant, rows_independent alike): the
    same bits (`mla_verify.rounding.bitwise_equal`), except that any NaN equals any NaN.
    - +0 against −0 is a difference. A deterministic kernel runs the same instructions on the same
      inputs, so it cannot flip the sign of a zero; one that does took another path (another
      reduction order, a split or a block skipped), which is what each property exists to show:
      for page_order_invariant, that the physical placement of the pages steered the arithmetic.
      The sign is also observable downstream (1/x, copysign, signbit, atan2), and batch-invariant
      serving compares logits bit for bit. Kernels that want latitude declare
      deterministic=False and are judged within twice the bound instead.
    - NaN's sign and payload are not: IEEE 754 leaves the payload of a produced NaN to the
      hardware and which operand's survives an addition to the order, and a NaN where a value is
      due is matches_reference's failure (NONFINITE), judged there with the case's NaN pattern."""
    a_out, b_out = first.out[rows], second.out[rows]
    a_lse, b_lse = first.lse[rows], second.lse[rows]
    if impl.capabilities.deterministic:
        if not _identical(a_out, b_out, a_lse, b_lse):
            difference = _difference(a_out, b_out, a_lse, b_lse)
            if first_inputs is not None:
                again = call_kernel(impl, first_inputs)
                if not _identical(first.out, again.out, first.lse, again.lse):
                    kind, what = FailureKind.NONDETERMINISM, "two calls on the same inputs"
            raise CaseFailure(Finding(kind, f"{what}: {difference} (the kernel declares itself deterministic, so "
                                            "results must be bit-identical)"), case)
        return Ratios()
    expected = expected_for(build_inputs(case), impl.capabilities)
    bound = 2 * expected.out_bound[rows].to(a_out.device)
    difference = (a_out.double() - b_out.double()).abs()
    ratio = float((difference / bound.clamp_min(1e-300)).max()) if difference.numel() else 0.0
    if ratio > 1:
        raise CaseFailure(Finding(kind, f"{what}: run-to-run difference / (2·bound) = {ratio:.3g}", ratio), case)
    return Ratios(sound=ratio)


def _identical(a_out: torch.Tensor, b_out: torch.Tensor, a_lse: torch.Tensor, b_lse: torch.Tensor) -> bool:
    """Both outputs bit for bit, any NaN equal to any NaN (see `_identical_or_within`)."""
    return bitwise_equal(a_out, b_out, nan_payload=False) and bitwise_equal(a_lse, b_lse, nan_payload=False)


def _difference(a_out: torch.Tensor, b_out: torch.Tensor, a_lse: torch.Tensor, b_lse: torch.Tensor) -> str:
    """How two results that are not bit-identical differ: per output, the elements whose bits
    differ and the largest difference ('only the sign of zero' when every one is +0 against −0)."""
    parts = []
    for name, a, b in (("out", a_out, b_out), ("lse", a_lse, b_lse)):
        if a.shape != b.shape or a.dtype != b.dtype:
            parts.append(f"{name} is {tuple(a.shape)} {a.dtype} once and {tuple(b.shape)} {b.dtype} the other time")
            continue
        differ = bits_differ(a, b, nan_payload=False)
        count = int(differ.sum())
        if count == 0:
            continue
        largest = (a.double() - b.double()).abs().nan_to_num(nan=math.inf)[differ].max().item()
        parts.append(f"{name} differs in {count} of {a.numel()} elements, by up to {largest:.3g}"
                     + (" (only the sign of zero: +0 against −0)" if largest == 0 else ""))
    return "; ".join(parts)


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
                   _raise_as_declared_passes(_matches_reference)),
    DecodeProperty("page_order_invariant", "moving pages to other physical blocks gives the identical result",
                   _raise_as_declared_passes(_page_order_invariant), calls=_pages_moved,
                   prepare=lambda case: case.replace(permute_pages=True)),
    DecodeProperty("rows_independent", "a batch row's result does not depend on the other rows' data",
                   _raise_as_declared_passes(_rows_independent), calls=_other_rows_redrawn, min_batch=2),
    DecodeProperty("deterministic", "two calls give the identical result (or within 2·bound when the "
                   "kernel declares itself nondeterministic)", _raise_as_declared_passes(_deterministic),
                   calls=_same_inputs_twice),
)


# ----------------------------------------------------------------------------------------------
# FP8 caches and sparse decode
# ----------------------------------------------------------------------------------------------

def sparse_variant(case: DecodeCase, capabilities: Capabilities, pattern: str | None = None) -> DecodeCase:
    """`case` as a sparse case the kernel declares: a sparse cache format (the case's own if the
    kernel takes it sparse), a declared topk, and the given index pattern (else the case's, or
    'subset' for a dense case). For 'all_visible' the topk covers every visible position: the
    smallest declared one at least max(lengths), else the largest, with the lengths cut to it."""
    formats = capabilities.sparse_kv_formats
    packable = case.head_dim_v % 4 == 0 and (case.d - case.head_dim_v) % 2 == 0
    usable = [f for f in formats if f != "fp8_ds_mla" or packable] or list(formats)
    kv_format = case.kv_format if case.kv_format in usable else usable[0]
    pattern = pattern or (case.index_pattern if case.sparse else "subset")
    allowed = (sorted(capabilities.topk_values) if capabilities.topk_values is not None
               else None)
    lengths = case.lengths
    if pattern == "all_visible":
        need = max(max(lengths, default=0), 1)
        if allowed is None:
            topk = min(need, capabilities.max_topk)
        else:
            topk = next((k for k in allowed if k >= need), allowed[-1])
        lengths = tuple(min(n, topk) for n in lengths)
    elif case.sparse and capabilities.supports_topk(case.topk):
        topk = case.topk
    else:
        topk = allowed[0] if allowed else min(max(2 * max(lengths, default=0), 2), capabilities.max_topk)
    scales = case.fp8_scales if kv_format != "native" else "amax"
    return case.replace(kv_format=kv_format, fp8_scales=scales, topk=topk, index_pattern=pattern, lengths=lengths)


def _sparse_matches_dense(impl: Implementation, case: DecodeCase) -> Ratios:
    """Indices listing every visible position of each query in order (causal and lengths applied
    by the lists): the sparse result must match the dense decode of the same cache (the float64
    dense reference, within both tiers)."""
    sparse_case = sparse_variant(case, impl.capabilities, "all_visible")
    inputs = build_inputs(sparse_case)
    observed = call_kernel(impl, inputs)
    expected = expected_for(inputs, impl.capabilities)
    try:
        return compare(observed, expected, impl.capabilities, sparse_case)
    except CaseFailure as failure:
        finding = failure.finding
        raise CaseFailure(Finding(FailureKind.SPARSE_DENSE_MISMATCH, f"indices listing every visible position in "
                                  f"order ({sparse_case.describe()}) do not give the dense result: "
                                  f"{finding.kind.value}: {finding.message}", finding.ratio, finding.locus,
                                  finding.tier), case) from None


def _permuted_lists(inputs: DecodeInputs, seed: int) -> DecodeInputs:
    """The same call with each query's index list permuted (one fixed permutation of the topk
    positions per case: -1 entries move too)."""
    topk = inputs.indices.shape[-1]
    order = torch.randperm(topk, generator=torch.Generator().manual_seed(seed)).to(inputs.indices.device)
    return dataclasses.replace(inputs, indices=inputs.indices[..., order].contiguous())


def _invalid_replaced(inputs: DecodeInputs, capabilities: Capabilities) -> DecodeInputs:
    """The same call with every -1 entry replaced by a positive index past the pool (just past it and
    near 2^31, alternately) when the kernel ignores those; else by -1 again (nothing to vary)."""
    if capabilities.invalid_indices != "ignore":
        return dataclasses.replace(inputs, indices=inputs.indices.clone())
    num_slots = inputs.kv_cache.shape[0] * inputs.case.page_size
    indices = inputs.indices.clone()
    holes = indices == -1
    replacement = torch.where(torch.arange(indices.numel(), device=indices.device).view(indices.shape) % 2 == 0,
                              torch.full_like(indices, num_slots), torch.full_like(indices, HUGE_INDEX))
    return dataclasses.replace(inputs, indices=torch.where(holes, replacement, indices))


def _same_or_within(impl: Implementation, case: DecodeCase, inputs: DecodeInputs, first: Observed,
                    second: Observed, bit_identical: bool, kind: FailureKind, what: str) -> Ratios:
    """Bit-identical results when promised, else within twice the bound (both calls are within
    the bound of the same reference)."""
    if bit_identical:
        if not _identical(first.out, second.out, first.lse, second.lse):
            raise CaseFailure(Finding(kind, f"{what}: {_difference(first.out, second.out, first.lse, second.lse)} "
                                            "(results must be bit-identical)"), case)
        return Ratios()
    expected = expected_for(inputs, impl.capabilities)
    out_ratio = _pair_ratio(first.out, second.out, expected.out_bound, expected.has_key[..., None])
    lse_ratio = _pair_ratio(first.lse, second.lse, expected.lse_bound, expected.has_key.permute(0, 2, 1))
    ratio = max(out_ratio, lse_ratio)
    if ratio > 1:
        raise CaseFailure(Finding(kind, f"{what}: the two results differ by {ratio:.3g}× twice the bound", ratio,
                                  tier="sound"), case)
    return Ratios(sound=ratio)


def _pair_ratio(a: torch.Tensor, b: torch.Tensor, bound: torch.Tensor, rows: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()  # exact: the same values (and NaNs) in one type
    difference = (a - b).abs()
    same = ~bits_differ(a, b, nan_payload=False)  # NaN against NaN, inf against inf: no difference
    difference = torch.where(same | ~rows.cpu(), 0.0, difference.nan_to_num(nan=float("inf")))
    allowed = 2 * bound.cpu()
    ratio = torch.where(allowed > 0, difference / allowed, torch.where(difference > 0, float("inf"), 0.0))
    return float(ratio.max()) if ratio.numel() else 0.0


def _index_order_invariant(impl: Implementation, case: DecodeCase) -> Ratios:
    sparse_case = sparse_variant(case, impl.capabilities)
    inputs = build_inputs(sparse_case)
    first = call_kernel(impl, inputs)
    second = call_kernel(impl, _permuted_lists(inputs, sparse_case.seed))
    return _same_or_within(impl, case, inputs, first, second,
                           impl.capabilities.index_order_independent and impl.capabilities.deterministic,
                           FailureKind.INDEX_ORDER_DEPENDENCE, "permuting each query's index list changed the result")


def _invalid_indices_ignored(impl: Implementation, case: DecodeCase) -> Ratios:
    sparse_case = sparse_variant(case, impl.capabilities, "subset")
    inputs = build_inputs(sparse_case)
    first = call_kernel(impl, inputs)
    ratios = compare(first, expected_for(inputs, impl.capabilities), impl.capabilities, sparse_case)
    second = call_kernel(impl, _invalid_replaced(inputs, impl.capabilities))
    return ratios.worst(_same_or_within(impl, case, inputs, first, second, impl.capabilities.deterministic,
                                        FailureKind.INVALID_INDEX_USED,
                                        "replacing the -1 entries by positive indices past the pool changed the "
                                        "result"))


def _quantizer_matches_format(impl: Implementation, case: DecodeCase) -> Ratios:
    """The kernel's quantiser on the case's cache rows (in the case's dtype, before quantisation):
    the format, the scales and every value within half an e4m3 step (mla_verify.decode.fp8.quantizer_errors)."""
    quantizer = quantizer_of(impl.fn)
    caps = impl.capabilities
    formats = [f for f in FP8_FORMATS if f in caps.kv_formats or f in caps.sparse_kv_formats]
    kv_format = case.kv_format if case.kv_format in formats else formats[0]
    if kv_format == "fp8_ds_mla" and (case.head_dim_v % 4 or (case.d - case.head_dim_v) % 2):
        kv_format = next((f for f in formats if f != "fp8_ds_mla"), None)
        if kv_format is None:
            return Ratios()
    fp8_case = case.replace(kv_format=kv_format, topk=0, index_pattern="subset", attn_sink="none")
    native = build_inputs(fp8_case).native_cache  # [blocks, page, 1, d], NaN in unused slots
    rows = native[:, :, 0].reshape(-1, case.d)
    rows = rows[~rows.isnan().any(-1)].cpu()
    if rows.shape[0] == 0:
        return Ratios()
    k_scale = None
    if kv_format == "fp8_e4m3":
        k_scale = reference_scales(rows.double().abs().amax(), caps.scale_format == "power_of_two").reshape(1)
    try:
        codes = quantizer(rows, case.head_dim_v, kv_format, k_scale) if k_scale is not None else \
            quantizer(rows, case.head_dim_v, kv_format)
    except Exception as error:
        raise CaseFailure(Finding(FailureKind.EXCEPTION, f"the quantiser raised {type(error).__name__}: {error}",
                                  locus=f"quantiser {type(error).__name__}"), case) from error
    ratio, problem = quantizer_errors(rows, codes, case.head_dim_v, kv_format, k_scale, caps.scale_format)
    if problem:
        raise CaseFailure(Finding(FailureKind.QUANTIZER_OUT_OF_SPEC, f"{kv_format}: {problem}", ratio,
                                  tier="sound"), case)
    return Ratios(sound=ratio, sound_at=f"quantised values: largest error / half an e4m3 step {ratio:.3g}")


def _declares_sparse(impl: Implementation) -> bool:
    return impl.capabilities.sparse


def _declares_quantizer(impl: Implementation) -> bool:
    caps = impl.capabilities
    return quantizer_of(impl.fn) is not None and any(f in FP8_FORMATS for f in caps.kv_formats + caps.sparse_kv_formats)


FP8_SPARSE_PROPERTIES = (
    DecodeProperty("sparse_matches_dense", "indices listing every visible position in order give the dense "
                   "result (within the bound of the dense float64 reference)",
                   _raise_as_declared_passes(_sparse_matches_dense), applies=_declares_sparse),
    DecodeProperty("index_order_invariant", "permuting a query's index list leaves its result unchanged "
                   "(bit-identical if the kernel declares index_order_independent, else within 2·bound)",
                   _raise_as_declared_passes(_index_order_invariant), applies=_declares_sparse),
    DecodeProperty("invalid_indices_ignored", "-1 entries anywhere are ignored, and positive indices past the "
                   "pool are ignored like them (bit-identical result), or raise if the kernel declares so",
                   _raise_as_declared_passes(_invalid_indices_ignored), applies=_declares_sparse),
    DecodeProperty("quantizer_matches_format", "the kernel's FP8 quantiser writes the declared format: rope "
                   "part bf16, scales float32 amax/448 (or declared powers of two), every value within half an "
                   "e4m3 step", _quantizer_matches_format, applies=_declares_quantizer),
)
ALL_PROPERTIES = DECODE_PROPERTIES + FP8_SPARSE_PROPERTIES


def properties_for(impl: Implementation) -> tuple[DecodeProperty, ...]:
    """The properties that apply to `impl`: the general four, and the FP8/sparse ones it declares."""
    return tuple(prop for prop in ALL_PROPERTIES if prop.applies(impl))


def property_named(name: str) -> DecodeProperty:
    for prop in ALL_PROPERTIES:
        if prop.name == name:
            return prop
    raise ValueError(f"property must be one of {[p.name for p in ALL_PROPERTIES]}; got {name!r}")


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
    for name in properties or [p.name for p in properties_for(impl)]:
        prop = property_named(name)
        if case.batch < prop.min_batch or not prop.applies(impl):
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
