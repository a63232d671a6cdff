"""Run one decode case against an implementation and judge it: the checks behind every property.

A check either returns the observed/bound ratios of both tiers (`Ratios`) or raises `CaseFailure`
carrying a `Finding`: the failure kind, a message with observed vs expected, and the case. A kernel
that cleanly refuses a case (`mla_verify.decode.contract.Declined` or NotImplementedError) raises
`CaseDeclined` instead: not a failure, counted apart.

Every failure has a `signature`, the kind and where it arises (rows that see no key, the type of a
raised exception): the certifier reports one minimal case per distinct signature.
"""

from __future__ import annotations

import contextlib
import enum
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from mla_verify.decode.bounds import DecodeBounds, RoundingModel, decode_bounds, with_attn_sink
from mla_verify.decode.case import DecodeCase
from mla_verify.decode.contract import Capabilities, Declined
from mla_verify.decode.fp8 import round_to_e4m3, split_packed
from mla_verify.decode.inputs import DecodeInputs, build_inputs
from mla_verify.decode.sparse import has_invalid_positive
from mla_verify.reference import attn_sink_factor, decode_reference, decode_terms, paged_decode_terms
from mla_verify.rounding import worst_ratio

__all__ = ["FailureKind", "Finding", "CaseFailure", "CaseDeclined", "RaisedAsDeclared", "Implementation",
           "Expected", "Observed", "Ratios", "EMPTY_ROWS", "DEFAULT_TIMEOUT_S", "CallTimedOut", "deadline",
           "call_kernel", "expected_for", "compare", "diagnose", "check_case"]


# a first call may compile (Triton, FlashInfer's JIT): minutes are normal, an hour is a hang
DEFAULT_TIMEOUT_S = 600.0


class FailureKind(str, enum.Enum):
    WRONG_VALUES = "wrong values"
    WRONG_LSE = "wrong lse"
    NONFINITE = "NaN/inf where a finite value is due"
    WRONG_SHAPE = "wrong shape or dtype"
    EXCEPTION = "exception raised"
    INPUT_MODIFIED = "input modified"
    OUT_OF_BOUNDS_WRITE = "out-of-bounds write"
    NONDETERMINISM = "nondeterminism"
    LAYOUT_DEPENDENCE = "result depends on physical page order"
    CROSS_ROW_DEPENDENCE = "result depends on other batch rows"
    CRASH = "process crashed"
    TIMEOUT = "call did not return in time"
    DECLINED = "declined a case its capabilities claim"
    # FP8 caches and sparse decode
    SPARSE_DENSE_MISMATCH = "sparse result differs from dense"
    INDEX_ORDER_DEPENDENCE = "result depends on index order"
    INVALID_INDEX_USED = "invalid index not ignored"
    QUANTIZER_OUT_OF_SPEC = "quantiser output out of spec"


@dataclass
class Finding:
    kind: FailureKind
    message: str
    ratio: float = math.inf
    # where the failure arises, as part of its signature ("rows that see no key", an exception type)
    locus: str = ""
    # the tolerance tier `ratio` is measured against: "sound", "sharp", or "" for exact checks
    tier: str = ""

    @property
    def signature(self) -> str:
        return f"{self.kind.value} ({self.locus})" if self.locus else self.kind.value


class CaseFailure(AssertionError):
    def __init__(self, finding: Finding, case: DecodeCase) -> None:
        super().__init__(f"{finding.kind.value}: {finding.message}\n  case: {case.describe()}")
        self.finding = finding
        self.case = case

    def distinct(self) -> CaseFailure:
        """This failure as an instance of a subclass of its own signature. Hypothesis tells failures
        apart by exception type and raise site, so raising these from one line makes it shrink and
        report each distinct failure separately (report_multiple_bugs)."""
        signature = self.finding.signature
        kind = _SIGNATURE_TYPES.get(signature)
        if kind is None:
            kind = type(f"CaseFailure[{signature}]", (CaseFailure,), {"__module__": __name__})
            _SIGNATURE_TYPES[signature] = kind
        return kind(self.finding, self.case)


_SIGNATURE_TYPES: dict[str, type[CaseFailure]] = {}


class RaisedAsDeclared(Exception):
    """The kernel raised on a case holding positive indices past the pool, as its capabilities
    declare (invalid_indices="raise"): what the contract allows instead of ignoring them."""

    def __init__(self, reason: str, case: DecodeCase) -> None:
        super().__init__(reason)
        self.case = case


class CaseDeclined(Exception):
    """The kernel refused the case cleanly; `reason` is its one-line message."""

    def __init__(self, reason: str, case: DecodeCase) -> None:
        super().__init__(reason)
        self.reason = reason
        self.case = case


@dataclass(frozen=True)
class Ratios:
    """Largest observed error / tolerance of a case in each tier (0 for exact properties), and where
    each was reached with the error and the tolerance there (empty for exact properties)."""

    sound: float = 0.0
    sharp: float = 0.0
    sound_at: str = ""
    sharp_at: str = ""
    # FP8 cases: the error against the reference on the cache before quantisation (reported, not
    # judged): the largest ‖out − ref‖/‖ref‖ of a row and the largest |lse − ref| (0 otherwise)
    end_to_end_out: float = 0.0
    end_to_end_lse: float = 0.0

    def worst(self, other: Ratios) -> Ratios:
        sound = self if self.sound >= other.sound else other
        sharp = self if self.sharp >= other.sharp else other
        return Ratios(sound.sound, sharp.sharp, sound.sound_at, sharp.sharp_at,
                      max(self.end_to_end_out, other.end_to_end_out), max(self.end_to_end_lse, other.end_to_end_lse))


@dataclass
class Implementation:
    """A decode kernel and what it claims; `spec` is how to import it ('module:attr') or a name."""

    name: str
    spec: str
    fn: Callable
    capabilities: Capabilities = field(default_factory=Capabilities)
    # wall-time limit of one kernel call; None: no limit
    timeout_s: float | None = DEFAULT_TIMEOUT_S


@dataclass
class Observed:
    out: torch.Tensor
    lse: torch.Tensor


@dataclass
class Expected:
    """float64 reference, the sound per-element bounds and the sharp tolerances (sharp_out on each
    row's error norm [b, s_q, h], sharp_lse [b, h, s_q]); has_key [b, s_q, h] marks rows that see a key."""

    out: torch.Tensor
    lse: torch.Tensor
    out_bound: torch.Tensor
    lse_bound: torch.Tensor
    sharp_out: torch.Tensor
    sharp_lse: torch.Tensor
    has_key: torch.Tensor
    # FP8 cases: (out, lse) of the reference on the cache before quantisation (end to end)
    end_to_end: tuple[torch.Tensor, torch.Tensor] | None = None


class CallTimedOut(BaseException):
    """Raised into a kernel call that outlives its time limit; a BaseException, so that a kernel's
    own `except Exception` does not swallow it."""


@contextlib.contextmanager
def deadline(seconds: float | None) -> Iterator[None]:
    """Interrupt the block with CallTimedOut after `seconds` of wall time. It works where Python
    regains control (a Python loop, a sleep); a call stuck inside native code is stopped only by
    running each case in a child process (--isolate), whose parent kills it."""
    usable = (seconds is not None and hasattr(signal, "setitimer")
              and threading.current_thread() is threading.main_thread())
    if not usable:
        yield
        return

    # someone else's alarm (pytest-timeout's signal method, the caller's own) that is due first stays
    # in charge; one that is due later is set again afterwards, less the time spent here
    pending, interval = signal.getitimer(signal.ITIMER_REAL)
    if pending and pending <= seconds:
        yield
        return

    def expire(signum: int, frame: object) -> None:
        raise CallTimedOut

    previous = signal.signal(signal.SIGALRM, expire)
    started = time.monotonic()
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if pending:
            signal.setitimer(signal.ITIMER_REAL, max(pending - (time.monotonic() - started), 1e-3), interval)


def _type_names(result: object) -> str:
    """What a kernel returned, named so that the fix is plain (numpy arrays, a single tensor, …)."""
    items = result if isinstance(result, (tuple, list)) else None
    if items is None:
        return type(result).__name__
    names = [f"{type(t).__module__.split('.')[0]}.{type(t).__name__}" for t in items]
    hint = ("; convert numpy arrays with torch.from_numpy(...).to(q.device)"
            if any(name.startswith("numpy.") for name in names) else "")
    return f"{type(result).__name__} of {len(items)} ({', '.join(names)}){hint}"


def _fail(kind: FailureKind, message: str, case: DecodeCase, ratio: float = math.inf, locus: str = "",
          tier: str = "") -> CaseFailure:
    return CaseFailure(Finding(kind, message, ratio, locus, tier), case)


def _poison_allocator(case: DecodeCase, device: torch.device) -> None:
    """Fill and free memory of the outputs' size, so a kernel that returns torch.empty storage it
    never wrote likely returns NaN rather than zeros that happen to pass."""
    elements = case.batch * case.s_q * case.heads * (case.head_dim_v + 1)
    for _ in range(2):
        torch.full((elements,), math.nan, dtype=torch.float32, device=device)


def call_kernel(impl: Implementation, inputs: DecodeInputs) -> Observed:
    """Call the kernel on the case's inputs; check output types and the inputs' integrity."""
    case = inputs.case
    before = inputs.snapshot()
    _poison_allocator(case, inputs.q.device)
    raise_allowed = (case.sparse and impl.capabilities.invalid_indices == "raise"
                     and has_invalid_positive(inputs.indices, inputs.kv_cache.shape[0] * case.page_size))
    try:
        with deadline(impl.timeout_s):
            result = impl.fn(*inputs.arguments, **inputs.keywords)
            if case.device.startswith("cuda"):
                torch.cuda.synchronize()
    except (Declined, NotImplementedError) as error:
        raise CaseDeclined(f"{type(error).__name__}: {error}".strip().splitlines()[0][:300], case) from None
    except CallTimedOut:
        raise _fail(FailureKind.TIMEOUT, f"the kernel did not return within {impl.timeout_s:g} s "
                    "(raise the limit with --timeout)", case) from None
    except SystemExit as error:  # would otherwise end the certifier with the kernel's exit code
        raise _fail(FailureKind.EXCEPTION, f"the kernel called sys.exit({error.code!r})", case,
                    locus="SystemExit") from None
    except Exception as error:  # the kernel's own failure is the finding
        if raise_allowed:  # positive indices past the pool, and the kernel declares it raises on them
            raise RaisedAsDeclared(f"{type(error).__name__}: {error}".strip().splitlines()[0][:300], case) from None
        raise _fail(FailureKind.EXCEPTION, f"{type(error).__name__}: {error}".strip(), case,
                    locus=type(error).__name__) from error
    modified, out_of_bounds = inputs.integrity(before)
    if out_of_bounds:
        raise _fail(FailureKind.OUT_OF_BOUNDS_WRITE, f"canary memory around {', '.join(out_of_bounds)} "
                    "was overwritten", case)
    if modified:
        raise _fail(FailureKind.INPUT_MODIFIED, f"{', '.join(modified)} changed during the call", case)
    if not (isinstance(result, (tuple, list)) and len(result) == 2
            and all(isinstance(t, torch.Tensor) for t in result)):
        raise _fail(FailureKind.WRONG_SHAPE, f"expected a tuple (out, lse) of torch tensors, got "
                    f"{_type_names(result)}", case)
    # copies: a kernel may hand back the same static buffer on every call
    out, lse = (t.detach().clone() for t in result)
    want_out = (case.batch, case.s_q, case.heads, case.head_dim_v)
    want_lse = (case.batch, case.heads, case.s_q)
    problems = []
    if tuple(out.shape) != want_out or out.dtype != case.torch_dtype:
        problems.append(f"out: expected {list(want_out)} {case.dtype}, got {list(out.shape)} "
                        f"{str(out.dtype).removeprefix('torch.')}")
    if tuple(lse.shape) != want_lse or lse.dtype != torch.float32:
        problems.append(f"lse: expected {list(want_lse)} float32, got {list(lse.shape)} "
                        f"{str(lse.dtype).removeprefix('torch.')}")
    if out.device != inputs.q.device or lse.device != inputs.q.device:
        problems.append(f"outputs on {out.device}/{lse.device}, inputs on {inputs.q.device}")
    if problems:
        raise _fail(FailureKind.WRONG_SHAPE, "; ".join(problems), case)
    return Observed(out=out, lse=lse)


def expected_for(inputs: DecodeInputs, capabilities: Capabilities) -> Expected:
    """The float64 reference of the call (FP8 dequantised exactly, sparse lists, sinks) with both
    tiers' bounds for the rounding model the capabilities declare."""
    case = inputs.case
    if not (case.fp8 or case.sparse or inputs.attn_sink is not None):  # the original contract
        terms = paged_decode_terms(*inputs.arguments, causal=case.causal)
        bounds = decode_bounds(terms, inputs.q, case.softmax_scale, case.head_dim_v,
                               RoundingModel.of(capabilities, case.torch_dtype))
        has_key = terms.visible.expand_as(terms.scores).any(-1)
        return Expected(out=terms.out, lse=terms.lse, out_bound=bounds.out, lse_bound=bounds.lse,
                        sharp_out=bounds.sharp_out, sharp_lse=bounds.sharp_lse, has_key=has_key)
    keywords = {name: value for name, value in inputs.keywords.items() if name != "attn_sink"}
    terms = decode_terms(*inputs.arguments, **keywords)
    b, s_q, h, _ = inputs.q.shape
    model = RoundingModel.of(capabilities, case.torch_dtype, case.kv_format)
    flat_q = inputs.q.reshape(b * s_q, 1, h, case.d) if case.sparse else inputs.q
    bounds = decode_bounds(terms, flat_q, case.softmax_scale, case.head_dim_v, model)
    has_key = terms.visible.expand_as(terms.scores).any(-1)
    out, lse = terms.out, terms.lse
    if case.sparse:  # back from b·s_q single-query sequences to [b, s_q, ...]
        out, lse, has_key = out.reshape(b, s_q, h, -1), _unflatten_lse(lse, b, s_q), has_key.reshape(b, s_q, h)
        bounds = DecodeBounds(out=bounds.out.reshape(b, s_q, h, -1), lse=_unflatten_lse(bounds.lse, b, s_q),
                              sharp_out=bounds.sharp_out.reshape(b, s_q, h),
                              sharp_lse=_unflatten_lse(bounds.sharp_lse, b, s_q))
    if inputs.attn_sink is not None:
        sigma = attn_sink_factor(lse, inputs.attn_sink)
        bounds = with_attn_sink(bounds, out, lse, sigma, model)
        out = out * sigma[..., None]
    end_to_end = None
    if inputs.native_cache is not None:
        end_to_end = decode_reference(inputs.q, inputs.native_cache, inputs.block_table, inputs.cache_seqlens,
                                      case.head_dim_v, case.softmax_scale, case.causal and not case.sparse,
                                      indices=inputs.indices, attn_sink=inputs.attn_sink)
    return Expected(out=out, lse=lse, out_bound=bounds.out, lse_bound=bounds.lse, sharp_out=bounds.sharp_out,
                    sharp_lse=bounds.sharp_lse, has_key=has_key, end_to_end=end_to_end)


def _unflatten_lse(lse: torch.Tensor, b: int, s_q: int) -> torch.Tensor:
    """[b·s_q, h, 1] (sparse terms, one query per sequence) → the contract's [b, h, s_q]."""
    return lse.reshape(b, s_q, -1).permute(0, 2, 1).contiguous()


def _end_to_end(observed: Observed, expected: Expected) -> tuple[float, float]:
    """(largest relative row error of out, largest |Δlse|) against the reference on the cache before
    quantisation, over rows that see a key."""
    if expected.end_to_end is None:
        return 0.0, 0.0
    ref_out, ref_lse = (t.cpu() for t in expected.end_to_end)
    has_key = expected.has_key.cpu()
    out = observed.out.to(torch.float64).cpu()
    lse = observed.lse.to(torch.float64).cpu()
    norm = ref_out.norm(dim=-1)
    relative = torch.where(has_key & (norm > 0), (out - ref_out).norm(dim=-1) / norm.clamp_min(1e-300), 0.0)
    both = has_key.permute(0, 2, 1) & torch.isfinite(ref_lse) & torch.isfinite(lse)
    lse_error = torch.where(both, (lse - ref_lse).abs(), 0.0)
    return (float(relative.max()) if relative.numel() else 0.0, float(lse_error.max()) if lse_error.numel() else 0.0)


EMPTY_ROWS = "rows that see no key"


def compare(observed: Observed, expected: Expected, capabilities: Capabilities, case: DecodeCase) -> Ratios:
    """Both tiers' largest error/tolerance; raises CaseFailure on any violation (sound tier first)."""
    out = observed.out.to(torch.float64).cpu()
    lse = observed.lse.to(torch.float64).cpu()
    if capabilities.lse_base == "2":
        lse = lse * math.log(2)
    ref_out, ref_lse = expected.out.cpu(), expected.lse.cpu()
    has_key = expected.has_key.cpu()  # [b, s, h]
    has_key_lse = has_key.permute(0, 2, 1)

    bad_out = has_key[..., None] & ~torch.isfinite(out)
    bad_lse = has_key_lse & ~torch.isfinite(lse)
    if bad_out.any() or bad_lse.any():
        where = torch.nonzero(bad_out)[0].tolist() if bad_out.any() else torch.nonzero(bad_lse)[0].tolist()
        raise _fail(FailureKind.NONFINITE, f"{int(bad_out.sum())} out and {int(bad_lse.sum())} lse elements "
                    f"are not finite in rows that see keys; first at {'out' if bad_out.any() else 'lse'}"
                    f"{where}", case)
    empty = ~has_key
    if empty.any():
        nonfinite = empty[..., None] & ~torch.isfinite(out)
        if nonfinite.any():
            index = torch.nonzero(nonfinite)[0].tolist()
            raise _fail(FailureKind.NONFINITE, f"a row that sees no key must give out 0; out{index} = "
                        f"{out[tuple(index)].item()!r}", case, locus=EMPTY_ROWS)
        nonzero = empty[..., None] & (out != 0)
        if nonzero.any():
            index = torch.nonzero(nonzero)[0].tolist()
            raise _fail(FailureKind.WRONG_VALUES, f"a row that sees no key must give out 0; out{index} = "
                        f"{out[tuple(index)].item()!r}", case, locus=EMPTY_ROWS)
        convention = capabilities.empty_row_lse
        wrong = empty.permute(0, 2, 1) & (lse != convention)
        if wrong.any():
            index = torch.nonzero(wrong)[0].tolist()
            raise _fail(FailureKind.WRONG_LSE, f"a row that sees no key must give lse {convention}; lse{index} = "
                        f"{lse[tuple(index)].item()!r}", case, locus=EMPTY_ROWS)

    out_error = torch.where(has_key[..., None], (out - ref_out).abs(), torch.zeros_like(out))
    lse_error = torch.where(has_key_lse, (lse - ref_lse).abs(), torch.zeros_like(lse))
    out_ratio, out_at = worst_ratio(out_error, expected.out_bound.cpu())
    lse_ratio, lse_at = worst_ratio(lse_error, expected.lse_bound.cpu())
    if lse_ratio > 1:
        raise _fail(FailureKind.WRONG_LSE, f"|lse - ref| / bound = {lse_ratio:.3g} at [b, h, s_q] = "
                    f"{list(lse_at)}: lse {lse[lse_at].item():.9g}, ref {ref_lse[lse_at].item():.9g}, "
                    f"bound {expected.lse_bound.cpu()[lse_at].item():.3g} (sound tier)", case,
                    lse_ratio, tier="sound")
    if out_ratio > 1:
        raise _fail(FailureKind.WRONG_VALUES, f"|out - ref| / bound = {out_ratio:.3g} at [b, s_q, h, c] = "
                    f"{list(out_at)}: out {out[out_at].item():.9g}, ref {ref_out[out_at].item():.9g}, "
                    f"bound {expected.out_bound.cpu()[out_at].item():.3g} (sound tier)", case,
                    out_ratio, tier="sound")

    row_error = (out - ref_out).norm(dim=-1) * has_key  # [b, s, h]
    sharp_out_ratio, row_at = worst_ratio(row_error, expected.sharp_out.cpu())
    sharp_lse_ratio, sharp_lse_at = worst_ratio(lse_error, expected.sharp_lse.cpu())
    if sharp_lse_ratio > 1:
        at = sharp_lse_at
        raise _fail(FailureKind.WRONG_LSE, f"|lse - ref| / sharp tolerance = {sharp_lse_ratio:.3g} at [b, h, s_q] = "
                    f"{list(at)}: lse {lse[at].item():.9g}, ref {ref_lse[at].item():.9g}, |error| "
                    f"{lse_error[at].item():.3g}, tolerance {expected.sharp_lse.cpu()[at].item():.3g} "
                    f"(sharp tier; the sound bound {expected.lse_bound.cpu()[at].item():.3g} holds)", case,
                    sharp_lse_ratio, tier="sharp")
    if sharp_out_ratio > 1:
        at = row_at
        reference_norm = ref_out[at].norm().item()
        raise _fail(FailureKind.WRONG_VALUES, f"‖out - ref‖ / sharp tolerance = {sharp_out_ratio:.3g} in row "
                    f"[b, s_q, h] = {list(at)}: relative error {row_error[at].item() / max(reference_norm, 1e-300):.3g}"
                    f", tolerance {expected.sharp_out.cpu()[at].item() / max(reference_norm, 1e-300):.3g} of ‖ref‖ "
                    f"(sharp tier; every element is within its sound bound)", case, sharp_out_ratio,
                    tier="sharp")
    if lse_ratio >= out_ratio:
        sound_at = _where("lse", "[b, h, s_q]", lse_at, lse_error, expected.lse_bound.cpu())
    else:
        sound_at = _where("out", "[b, s_q, h, c]", out_at, out_error, expected.out_bound.cpu())
    if sharp_lse_ratio >= sharp_out_ratio:
        sharp_at = _where("lse", "[b, h, s_q]", sharp_lse_at, lse_error, expected.sharp_lse.cpu())
    else:
        sharp_at = _where("‖out row‖", "[b, s_q, h]", row_at, row_error, expected.sharp_out.cpu())
    end_to_end_out, end_to_end_lse = _end_to_end(observed, expected)
    return Ratios(sound=max(out_ratio, lse_ratio), sharp=max(sharp_out_ratio, sharp_lse_ratio),
                  sound_at=sound_at, sharp_at=sharp_at, end_to_end_out=end_to_end_out,
                  end_to_end_lse=end_to_end_lse)


def _where(name: str, axes: str, at: tuple[int, ...], error: torch.Tensor, bound: torch.Tensor) -> str:
    if not at:
        return ""
    return f"{name} at {axes} = {list(at)}: error {error[at].item():.3g}, tolerance {bound[at].item():.3g}"


def diagnose(observed: Observed, inputs: DecodeInputs, expected: Expected, capabilities: Capabilities) -> str:
    """A likely cause of wrong values, when the numbers show one: an lse in the other base, the
    output off by one constant factor, or a result computed with another softmax scale."""
    case = inputs.case
    has_key = expected.has_key.cpu()
    lse = observed.lse.to(torch.float64).cpu() * (math.log(2) if capabilities.lse_base == "2" else 1.0)
    ref_lse = expected.lse.cpu()
    rows = has_key.permute(0, 2, 1) & torch.isfinite(lse) & (ref_lse.abs() > 1e-2)
    if rows.any():
        quotient = (lse[rows] / ref_lse[rows]).median().item()
        for factor, hint in ((1 / math.log(2), "lse ≈ ref / ln 2: the lse is in base 2 (declare "
                              "Capabilities(lse_base='2'), or multiply it by ln 2)"),
                             (math.log(2), "lse ≈ ref · ln 2: the lse is natural but lse_base='2' is declared")):
            if abs(quotient - factor) < 1e-3 * factor:
                return hint
    alternative = _matching_scale(observed, inputs, expected, capabilities)
    if alternative:
        return alternative
    out = torch.where(has_key[..., None], observed.out.to(torch.float64).cpu(), 0.0)
    ref = expected.out.cpu()
    reference_energy = float((ref * ref).sum())
    if reference_energy > 0:
        factor = float((out * ref).sum()) / reference_energy
        residual = float((out - factor * ref).norm())
        if abs(factor - 1) > 1e-6 and residual < 0.05 * float((out - ref).norm()):
            return (f"out ≈ {factor:.6g} × ref in every row: a constant factor (an extra scale, or the "
                    "softmax normaliser off)")
    return ""


# the kernel's work (b·s_q·h·d·L) up to which a failure is re-judged against other softmax scales
_RESCALE_WORK = 50_000_000


def _matching_scale(observed: Observed, inputs: DecodeInputs, expected: Expected, capabilities: Capabilities) -> str:
    case = inputs.case
    if case.work > _RESCALE_WORK or not expected.has_key.any():
        return ""
    given = case.softmax_scale
    candidates = {"1/√d": case.d ** -0.5, "1/√head_dim_v": case.head_dim_v ** -0.5,
                  "1/√(rope width)": max(case.d - case.head_dim_v, 1) ** -0.5, "1": 1.0,
                  "softmax_scale · log2(e)": given / math.log(2), "softmax_scale²": given * given,
                  "softmax_scale applied twice as 1/scale": 1 / given}
    lse = observed.lse.to(torch.float64).cpu() * (math.log(2) if capabilities.lse_base == "2" else 1.0)
    rows = expected.has_key.cpu().permute(0, 2, 1) & torch.isfinite(lse)
    for name, scale in candidates.items():
        if abs(scale - given) <= 1e-9 * given:
            continue
        error = (lse - _reference_lse(inputs, softmax_scale=scale)).abs()[rows]
        tolerance = expected.lse_bound.cpu()[rows] * max(scale / given, given / scale, 1.0)
        if bool((error <= tolerance).all()):
            return (f"out and lse match the reference computed with softmax_scale = {name} = {scale:.6g} "
                    f"instead of the {given:.6g} passed in: the kernel uses a softmax scale of its own")
    return _matching_misreading(lse, rows, inputs, expected)


def _reference_lse(inputs: DecodeInputs, softmax_scale: float | None = None, kv_cache: torch.Tensor | None = None,
                   indices: torch.Tensor | None = None) -> torch.Tensor:
    """The float64 reference lse [b, h, s_q] of the call with some of its inputs replaced."""
    case = inputs.case
    keywords = {name: value for name, value in inputs.keywords.items() if name not in ("attn_sink", "causal")}
    if indices is not None:
        keywords["indices"] = indices
    _, lse = decode_reference(inputs.q, inputs.kv_cache if kv_cache is None else kv_cache, inputs.block_table,
                              inputs.cache_seqlens, case.head_dim_v,
                              case.softmax_scale if softmax_scale is None else softmax_scale,
                              case.causal and not case.sparse, **keywords)
    return lse.cpu()


def _misreadings(inputs: DecodeInputs) -> dict[str, dict]:
    """FP8 and sparse inputs as a wrong kernel reads them (what `_matching_misreading` tries)."""
    case = inputs.case
    found: dict[str, dict] = {}
    if case.kv_format == "fp8_ds_mla":
        pow2 = inputs.kv_cache.clone()
        _, scales, rope = split_packed(pow2, case.d, case.head_dim_v)
        scales.copy_(torch.exp2(torch.ceil(torch.log2(scales.double()))).float())
        found["its FP8 scales rounded up to powers of two (e8m0)"] = {"kv_cache": pow2}
        quantized_rope = inputs.kv_cache.clone()
        rope = split_packed(quantized_rope, case.d, case.head_dim_v)[2]
        rope.copy_(round_to_e4m3(rope.double()).to(torch.bfloat16))
        found["the bf16 rope part rounded through e4m3"] = {"kv_cache": quantized_rope}
    if case.sparse:
        found["-1 entries read as slot 0"] = {"indices": inputs.indices.clamp_min(0)}
        if case.s_q > 1:
            found["every query reading the last query's index list"] = {
                "indices": inputs.indices[:, -1:].expand_as(inputs.indices).contiguous()}
    return found


def _matching_misreading(lse: torch.Tensor, rows: torch.Tensor, inputs: DecodeInputs, expected: Expected) -> str:
    for name, replaced in _misreadings(inputs).items():
        reference = _reference_lse(inputs, **replaced)
        if not torch.isfinite(reference[rows]).all():
            continue
        error = (lse - reference).abs()[rows]
        if bool((error <= expected.lse_bound.cpu()[rows]).all()) and bool((lse - expected.lse.cpu()).abs()[rows].max()
                                                                         > 0):
            return f"out and lse match the reference computed with {name}"
    return ""


def check_case(impl: Implementation, case: DecodeCase) -> Ratios:
    """Build the case, run the kernel, compare with the float64 reference within both tiers."""
    inputs = build_inputs(case)
    try:
        observed = call_kernel(impl, inputs)
    except RaisedAsDeclared:
        return Ratios()
    expected = expected_for(inputs, impl.capabilities)
    try:
        return compare(observed, expected, impl.capabilities, case)
    except CaseFailure as failure:
        finding = failure.finding
        hint = (diagnose(observed, inputs, expected, impl.capabilities)
                if finding.kind in (FailureKind.WRONG_VALUES, FailureKind.WRONG_LSE) and not finding.locus else "")
        if not hint:
            raise
        raise _fail(finding.kind, f"{finding.message}; hint: {hint}", case, finding.ratio, finding.locus,
                    finding.tier) from None
