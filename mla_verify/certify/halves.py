"""The two halves a certification runs over: what differs between certifying a decode kernel and a
whole layer, behind one interface (`Half`) that the runner (`mla_verify.certify.runner`) drives.

    DecodeHalf   the decode properties (mla_verify.decode.properties), decode cases drawn inside the
                 kernel's declared capabilities, the decode coverage and case record
    LayerHalf    the layer properties (mla_verify.layer.LAYER_PROPERTIES), layer cases (configs,
                 prefill and decode lengths, dtypes, scales) drawn inside the layer's declared
                 capabilities, the layer coverage and case record, its precision class

A half judges one case: it returns the case's ratios of both tiers (and what it adds to the
report), or raises `CaseFault` (the failure as the runner sees it: kind, message, ratio, where it
arises, tier) or `CaseRefused` (the implementation declined the case).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from hypothesis import strategies as st

from mla_verify.certify.profiles import LayerLimits, Profile
from mla_verify.certify.registry import LayerImplementation
from mla_verify.decode.case import SERVING_LENGTH, DecodeCase, dtype_name
from mla_verify.decode.checks import CallTimedOut, CaseDeclined, CaseFailure, Implementation, Ratios, deadline
from mla_verify.decode.contract import Declined
from mla_verify.decode.fp8 import KV_FORMATS
from mla_verify.decode.properties import DecodeProperty, properties_for, property_named
from mla_verify.decode.strategies import DEFAULT_PAGES, DEFAULT_WIDTHS, decode_cases, pinned_cases

if TYPE_CHECKING:
    from mla_verify.certify.certificate import PropertyReport

__all__ = ["ALL_DTYPES", "CRASH", "TIMEOUT", "DECLINED", "Fault", "CaseFault", "CaseRefused", "NothingToCertify",
           "Coverage",
           "LayerCoverage", "not_covered", "LayerProperty", "layer_properties", "layer_property_named",
           "layer_case_from_dict", "Half", "DecodeHalf", "LayerHalf", "half_of", "merged_coverage"]

ALL_DTYPES = ("float64", "float32", "bfloat16", "float16")


# ----------------------------------------------------------------------------------------------
# Failures as the runner sees them, from either half
# ----------------------------------------------------------------------------------------------

# the runner's own failure kinds (both halves)
CRASH = "process crashed"
TIMEOUT = "call did not return in time"
DECLINED = "declined a case its capabilities claim"


@dataclass(frozen=True)
class Fault:
    """One failing case's finding: its kind, a message with observed vs expected, the ratio (∞ when
    there is none), where it arises (part of its signature) and the tier the ratio is measured in.
    Plain data, so an isolated child can send it back."""

    kind: str
    message: str
    ratio: float = math.inf
    locus: str = ""
    tier: str = ""

    @property
    def signature(self) -> str:
        return f"{self.kind} ({self.locus})" if self.locus else self.kind

    @classmethod
    def of(cls, finding: object) -> Fault:
        """From a decode `Finding`."""
        kind = getattr(finding, "kind")
        return cls(getattr(kind, "value", str(kind)), finding.message, finding.ratio, finding.locus,
                   finding.tier)


class CaseFault(AssertionError):
    """A case failed: its Fault and the case. `distinct()` gives the same failure as an instance of
    a type of its own signature: Hypothesis tells failures apart by exception type and raise site,
    so raising these from one line makes it shrink and report each distinct failure separately."""

    def __init__(self, fault: Fault, case: object, description: str = "") -> None:
        describe = getattr(case, "describe", None)
        description = description or (describe() if describe else str(case))
        super().__init__(f"{fault.kind}: {fault.message}\n  case: {description}")
        self.fault, self.case, self.description = fault, case, description

    def distinct(self) -> CaseFault:
        signature = self.fault.signature
        kind = _SIGNATURE_TYPES.get(signature)
        if kind is None:
            kind = type(f"CaseFault[{signature}]", (CaseFault,), {"__module__": __name__})
            _SIGNATURE_TYPES[signature] = kind
        return kind(self.fault, self.case, self.description)


_SIGNATURE_TYPES: dict[str, type[CaseFault]] = {}


class NothingToCertify(Exception):
    """Hypothesis could not draw cases the implementation accepts (every drawn config refused by
    the layer's `supports`, or capabilities that leave nothing to draw); a one-line message."""


class CaseRefused(Exception):
    """The implementation declined the case cleanly; `reason` is its one-line message."""

    def __init__(self, reason: str, case: object) -> None:
        super().__init__(reason)
        self.reason, self.case = reason, case


def _first_line(text: str, limit: int = 300) -> str:
    return (text.strip().splitlines() or [""])[0][:limit]


# ----------------------------------------------------------------------------------------------
# Coverage and case records
# ----------------------------------------------------------------------------------------------

@dataclass
class Coverage:
    """What the decode examples actually exercised."""

    dtypes: set = field(default_factory=set)
    heads: set = field(default_factory=set)
    page_sizes: set = field(default_factory=set)
    widths: set = field(default_factory=set)
    s_q: set = field(default_factory=set)
    regimes: set = field(default_factory=set)
    length_kinds: set = field(default_factory=set)
    causal: set = field(default_factory=set)
    layouts: set = field(default_factory=set)
    max_length: int = 0
    max_batch: int = 0
    max_work: int = 0
    # cases with a batch of at least 32 or a sequence of at least 4096 tokens
    serving_scale: int = 0
    # cases per category: each dtype, causal, empty rows, varlen, strided, permuted, pooled, ...
    counts: dict = field(default_factory=dict)

    def add(self, case: DecodeCase) -> None:
        for category, present in ((case.dtype, True), ("causal", case.causal), ("s_q > 1", case.s_q > 1),
                                  ("empty rows", 0 in case.lengths), ("varlen", len(set(case.lengths)) > 1),
                                  ("strided cache", case.strided_cache), ("permuted pages", case.permute_pages),
                                  ("pooled cache", case.pooled_cache), ("q " + case.q_layout, True),
                                  ("serving scale", _serving_scale(case)),
                                  ("fp8 " + case.kv_format, case.kv_format != "native"),
                                  ("fp8 scales " + case.fp8_scales, case.kv_format != "native"),
                                  ("sparse", case.sparse), ("sparse " + case.index_pattern, case.sparse),
                                  ("sparse topk not a multiple of 64", case.sparse and case.topk % 64 != 0),
                                  ("attention sink " + case.attn_sink, case.attn_sink != "none")):
            if present:
                self.counts[category] = self.counts.get(category, 0) + 1
        self.dtypes.add(case.dtype)
        self.heads.add(case.heads)
        self.page_sizes.add(case.page_size)
        self.widths.add(f"{case.d}/{case.head_dim_v}")
        self.s_q.add(case.s_q)
        self.regimes.add(case.regime)
        self.causal.add(case.causal)
        self.layouts.update(name for name, on in (("permuted", case.permute_pages), ("strided", case.strided_cache))
                            if on)
        for n in case.lengths:
            self.length_kinds.add(_length_kind(n, case.page_size))
        self.max_length = max(self.max_length, max(case.lengths, default=0))
        self.max_batch = max(self.max_batch, case.batch)
        self.max_work = max(self.max_work, case.work)
        self.serving_scale += _serving_scale(case)

    def to_dict(self) -> dict:
        return _coverage_dict(self)


def merged_coverage(cls: type, dicts: list[dict]) -> Coverage | LayerCoverage:
    """One coverage of class `cls` (Coverage or LayerCoverage) from several `to_dict()`s, as if one
    process had seen every case: sets are united, per-category counts and other counts added, and the
    max_* fields are the largest."""
    coverage = cls()
    for data in dicts:
        for f in dataclasses.fields(cls):
            if f.name not in data:
                continue
            value, mine = data[f.name], getattr(coverage, f.name)
            if isinstance(mine, set):
                mine.update(value)
            elif isinstance(mine, dict):
                for key, count in value.items():
                    mine[key] = mine.get(key, 0) + count
            elif f.name.startswith("max_"):
                setattr(coverage, f.name, max(mine, value))
            else:  # a count of cases (serving_scale)
                setattr(coverage, f.name, mine + value)
    return coverage


def _coverage_dict(coverage: object) -> dict:
    return {key: sorted(value, key=lambda v: (type(v).__name__, v)) if isinstance(value, set) else
            dict(sorted(value.items())) if isinstance(value, dict) else value
            for key, value in vars(coverage).items()}


def _serving_scale(case: DecodeCase) -> bool:
    return case.batch >= 32 or max(case.lengths, default=0) >= SERVING_LENGTH


def _length_kind(n: int, page: int) -> str:
    if n in (0, 1):
        return str(n)
    for name, value in (("page-1", page - 1), ("page", page), ("page+1", page + 1)):
        if n == value:
            return name
    return "multiple of page" if n % page == 0 else "other"


def _case_record(case: DecodeCase, outcome: str, sound: float | None = None, sharp: float | None = None) -> dict:
    return {"outcome": outcome, "sound": sound, "sharp": sharp, "dtype": case.dtype, "heads": case.heads,
            "batch": case.batch, "s_q": case.s_q, "max_length": max(case.lengths, default=0),
            "page_size": case.page_size, "regime": case.regime, "causal": case.causal, "kv_format": case.kv_format,
            "topk": case.topk if case.sparse else None, "attn_sink": case.attn_sink}


# page sizes whose boundaries a layer case's cache lengths are counted crossing (the fast layer's
# pages; the layer strategy draws lengths on either side of them)
LAYER_PAGES = (16, 64)


def _cache_lengths(case: object) -> list[int]:
    """The cache length after the prefill and after each decode step."""
    lengths, total = [case.prefill], case.prefill
    for n in case.decode:
        total += n
        lengths.append(total)
    return lengths


def _crosses_page(case: object, page: int) -> bool:
    """Whether a decode step grows the cache across a boundary of `page`-token pages."""
    lengths = _cache_lengths(case)
    return any((a - 1) // page != (b - 1) // page for a, b in zip(lengths, lengths[1:]))


def _config_kind(config: object) -> str:
    """'drawn' for a config drawn by the strategy, else the preset it comes from."""
    return str(getattr(config, "name", "drawn") or "drawn")


@dataclass
class LayerCoverage:
    """What the layer examples actually exercised: configs (presets and drawn; q-LoRA, RoPE layout,
    YaRN, heads, widths), prefill and decode lengths, page crossings, dtypes, weight and activation
    scales."""

    dtypes: set = field(default_factory=set)
    configs: set = field(default_factory=set)
    heads: set = field(default_factory=set)
    # D / d_c / d_r / d_n / d_v
    widths: set = field(default_factory=set)
    rope_layouts: set = field(default_factory=set)
    q_lora: set = field(default_factory=set)
    yarn: set = field(default_factory=set)
    decode_steps: set = field(default_factory=set)
    weight_scales: set = field(default_factory=set)
    activation_scales: set = field(default_factory=set)
    max_prefill: int = 0
    max_length: int = 0
    max_batch: int = 0
    max_decode_calls: int = 0
    # cases whose decode steps grow the cache across a page boundary, per page size
    page_crossings: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)

    def add(self, case: object) -> None:
        c = case.config
        preset = _config_kind(c) != "drawn"
        for category, present in ((case.dtype, True), ("preset config", preset), ("drawn config", not preset),
                                  ("q-LoRA", c.q_lora_rank is not None), ("no q-LoRA", c.q_lora_rank is None),
                                  (f"RoPE {c.rope_layout}", True), ("YaRN", c.yarn is not None),
                                  ("no YaRN", c.yarn is None), ("batch > 1", case.batch > 1),
                                  ("prefill only", not case.decode),
                                  ("multi-token decode", any(n > 1 for n in case.decode)),
                                  ("weights scaled", getattr(case, "weight_scale", 1.0) != 1.0),
                                  ("activations scaled", getattr(case, "activation_scale", 1.0) != 1.0)):
            if present:
                self.counts[category] = self.counts.get(category, 0) + 1
        self.dtypes.add(case.dtype)
        self.configs.add(_config_kind(c))
        self.heads.add(c.num_heads)
        self.widths.add(f"{c.hidden_size}/{c.kv_lora_rank}/{c.qk_rope_head_dim}/{c.qk_nope_head_dim}/{c.v_head_dim}")
        self.rope_layouts.add(c.rope_layout)
        self.q_lora.add(c.q_lora_rank is not None)
        self.yarn.add(c.yarn is not None)
        self.decode_steps.update(case.decode)
        self.weight_scales.add(float(getattr(case, "weight_scale", 1.0)))
        self.activation_scales.add(float(getattr(case, "activation_scale", 1.0)))
        self.max_prefill = max(self.max_prefill, case.prefill)
        self.max_length = max(self.max_length, case.length)
        self.max_batch = max(self.max_batch, case.batch)
        self.max_decode_calls = max(self.max_decode_calls, len(case.decode))
        for page in LAYER_PAGES:
            self.page_crossings[f"page {page}"] = self.page_crossings.get(f"page {page}", 0) + _crosses_page(case, page)

    def to_dict(self) -> dict:
        data = _coverage_dict(self)
        data["widths_legend"] = "hidden_size/d_c/d_r/d_n/d_v"
        return data


def _layer_record(case: object, outcome: str, sound: float | None = None, sharp: float | None = None) -> dict:
    c = case.config
    return {"outcome": outcome, "sound": sound, "sharp": sharp, "dtype": case.dtype, "heads": c.num_heads,
            "batch": case.batch, "max_length": case.length, "prefill": case.prefill, "decode": list(case.decode),
            "config": _config_kind(c), "q_lora": c.q_lora_rank is not None, "rope_layout": c.rope_layout,
            "yarn": c.yarn is not None, "weight_scale": getattr(case, "weight_scale", 1.0),
            "activation_scale": getattr(case, "activation_scale", 1.0), "regime": _config_kind(c)}


def not_covered(impl: Implementation, device: str, coverage: Coverage | None = None,
                dtypes: tuple[str, ...] | None = None) -> list[str]:
    """What the declaration leaves out, what the strategies never draw, and the limits the run drew."""
    caps, gaps = impl.capabilities, []
    declared = {dtype_name(t) for t in caps.dtypes}
    gaps += [f"dtype {name} (not declared)" for name in ALL_DTYPES if name not in declared]
    if dtypes:
        gaps += [f"dtype {name} (not requested with --dtype)" for name in ALL_DTYPES
                 if name in declared and name not in dtypes]
    if caps.page_sizes is not None:
        gaps.append(f"page sizes other than {list(caps.page_sizes)}")
    else:
        gaps.append(f"page sizes other than {list(DEFAULT_PAGES)} (not drawn)")
    if caps.head_counts is not None:
        gaps.append(f"head counts other than {list(caps.head_counts)}")
    elif caps.max_heads < 128:
        gaps.append(f"more than {caps.max_heads} heads")
    if caps.head_dims is not None:
        gaps.append(f"widths other than {[f'{d}/{v}' for d, v in caps.head_dims]}")
    else:
        gaps.append(f"widths other than {[f'{d}/{v}' for d, v in DEFAULT_WIDTHS]} (not drawn)")
    if not caps.causal:
        gaps.append("causal decode")
    if not caps.strided_cache:
        gaps.append("strided (non-contiguous) cache views")
    if caps.max_s_q < 8:
        gaps.append(f"s_q > {caps.max_s_q}")
    if device not in caps.devices and device.split(":")[0] not in caps.devices:
        gaps.append(f"device {device} is not declared ({list(caps.devices)})")
    if caps.empty_row_lse > 0:
        gaps.append("empty rows checked against the declared lse = +inf convention")
    missing = [f for f in KV_FORMATS if f not in caps.kv_formats]
    if missing:
        gaps.append(f"dense decode over cache formats {missing} (not declared)")
    if not caps.sparse:
        gaps.append("sparse (top-k) decode (not declared)")
    else:
        sparse_missing = [f for f in KV_FORMATS if f not in caps.sparse_kv_formats]
        if sparse_missing:
            gaps.append(f"sparse decode over cache formats {sparse_missing} (not declared)")
        if caps.topk_values is not None:
            gaps.append(f"topk other than {list(caps.topk_values)}")
        elif caps.max_topk < 2048:
            gaps.append(f"topk above {caps.max_topk}")
        if caps.invalid_indices == "raise":
            gaps.append("positive indices past the pool checked as 'raises' (declared)")
    if not caps.attn_sink:
        gaps.append("attention sinks (not declared)")
    if coverage is not None and coverage.s_q:
        gaps.append(f"drawn: sequences longer than {coverage.max_length} tokens, batches above {coverage.max_batch}, "
                    f"s_q above {max(coverage.s_q)}, more than {max(coverage.heads)} heads")
    return gaps


# ----------------------------------------------------------------------------------------------
# The layer half's properties and cases (mla_verify.layer)
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerProperty:
    """A layer property: check(factory, case, device) returns a LayerReport or raises LayerFailure."""

    name: str
    description: str
    check: Callable


# what each layer property checks, in one line (progress and certificates)
_LAYER_DESCRIPTIONS = {
    "matches_reference": "every stage the layer exposes within its stage bound, and the output within the "
                         "end-to-end bounds (sound and sharp) of the float64 reference layer",
    "absorbed_matches_naive": "decoding token t (absorbed) agrees with one prefill's output at t (naive) within "
                              "the sum of both paths' bounds at the declared precision",
}


def layer_properties() -> tuple[LayerProperty, ...]:
    """The layer properties (mla_verify.layer.LAYER_PROPERTIES), each as a LayerProperty."""
    from mla_verify.layer import LAYER_PROPERTIES

    return tuple(LayerProperty(name, _LAYER_DESCRIPTIONS.get(name) or _first_line(check.__doc__ or name), check)
                 for name, check in LAYER_PROPERTIES.items())


def layer_property_named(name: str) -> LayerProperty:
    properties = layer_properties()
    for prop in properties:
        if prop.name == name:
            return prop
    raise ValueError(f"property must be one of {[p.name for p in properties]}; got {name!r}")


def _dtype_names(dtypes: tuple) -> list[str]:
    return [t if isinstance(t, str) else dtype_name(t) for t in dtypes]


def layer_case_from_dict(data: object) -> object:
    """The LayerCase a to_dict() wrote; ValueError naming the field when it is damaged."""
    from mla_verify.layer import LayerCase

    return LayerCase.from_dict(data)


# ----------------------------------------------------------------------------------------------
# The two halves
# ----------------------------------------------------------------------------------------------

class Half:
    """What differs between certifying a decode kernel and a whole layer."""

    kind = ""

    def properties(self, impl: object) -> tuple:
        raise NotImplementedError

    def property_named(self, name: str) -> object:
        raise NotImplementedError

    def strategy(self, impl: object, prop: object, profile: Profile, device: str,
                 dtypes: tuple[str, ...] | None) -> st.SearchStrategy:
        raise NotImplementedError

    def pinned(self, impl: object, prop: object, device: str, dtypes: tuple[str, ...] | None) -> list:
        return []

    def judge(self, impl: object, prop: object, case: object, device: str) -> tuple[Ratios, dict]:
        """(ratios, details) of a passing case; raises CaseFault or CaseRefused."""
        raise NotImplementedError

    def new_coverage(self) -> Coverage | LayerCoverage:
        raise NotImplementedError

    def record(self, case: object, outcome: str, sound: float | None = None, sharp: float | None = None) -> dict:
        raise NotImplementedError

    def note(self, report: PropertyReport, details: dict, case: object) -> None:
        """Fold a passing case's details into the property's report."""

    def case_from_dict(self, data: dict) -> object:
        raise NotImplementedError

    def digest(self, impl: object, prop: object, device: str) -> bytes:
        return f"{impl.spec}|{prop.name}|{device}".encode()

    def case_size(self, case: dict) -> tuple:
        """An order on minimal cases (a case's to_dict()): when several workers shrank the same failure,
        the merged certificate keeps the smallest. The last key makes the order total."""
        return (len(json.dumps(case, sort_keys=True)), json.dumps(case, sort_keys=True))

    def merged_coverage(self, dicts: list[dict]) -> Coverage | LayerCoverage:
        return merged_coverage(type(self.new_coverage()), dicts)

    def state(self) -> dict:
        """What the half learnt while drawing (JSON-ready), for a parallel run's merge."""
        return {}

    def add_state(self, state: dict) -> None:
        """Fold another worker's `state()` into this half."""

    def implementation_entry(self, impl: object, reports: list[PropertyReport],
                             dtypes: tuple[str, ...] | None) -> dict:
        raise NotImplementedError

    def not_covered(self, impl: object, device: str, reports: list[PropertyReport],
                    dtypes: tuple[str, ...] | None, profile: Profile) -> list[str]:
        raise NotImplementedError

    def nothing_drawn(self, impl: object, error: BaseException) -> str:
        """Why Hypothesis drew no usable case (`error`: its health check or Unsatisfiable)."""
        return (f"no case could be drawn within what '{impl.name}' declares "
                f"({type(error).__name__}: {_first_line(str(error), 200)})")

    def save(self, directory: str | Path, impl: object, prop_name: str, fault: Fault, case: object,
             device: str) -> Path:
        from mla_verify.certify.counterexample import save_counterexample

        return save_counterexample(directory, impl, prop_name, fault, case, device=device)


class DecodeHalf(Half):
    kind = "decode kernel"

    def properties(self, impl: Implementation) -> tuple:
        return properties_for(impl)

    def property_named(self, name: str) -> DecodeProperty:
        return property_named(name)

    @staticmethod
    def _capabilities(impl: Implementation, dtypes: tuple[str, ...] | None):
        caps = impl.capabilities
        if dtypes:
            caps = caps.replace(dtypes=tuple(t for t in caps.dtypes if dtype_name(t) in dtypes))
        return caps

    def strategy(self, impl, prop, profile, device, dtypes):
        return decode_cases(self._capabilities(impl, dtypes), profile.limits, device,
                            min_batch=prop.min_batch).map(prop.prepare)

    def pinned(self, impl, prop, device, dtypes):
        return [prop.prepare(case) for case in pinned_cases(self._capabilities(impl, dtypes), device, prop.min_batch)]

    def judge(self, impl, prop, case, device):
        fault = refused = None
        try:
            ratios = prop.check(impl, case)
        except CaseDeclined as declined:
            refused = declined.reason
        except CaseFailure as failure:
            fault = Fault.of(failure.finding)
        if refused is not None:
            raise CaseRefused(refused, case)
        if fault is not None:
            raise CaseFault(fault, case)
        return ratios, {"fp8_end_to_end_out": ratios.end_to_end_out, "fp8_end_to_end_lse": ratios.end_to_end_lse}

    def new_coverage(self) -> Coverage:
        return Coverage()

    def note(self, report: PropertyReport, details: dict, case: object) -> None:
        # FP8 cases: the error against the reference on the cache before quantisation, reported, not judged
        if getattr(case, "kv_format", "native") == "native":
            return
        for key in ("fp8_end_to_end_out", "fp8_end_to_end_lse"):
            value = details.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                report.extra[f"max_{key}"] = max(report.extra.get(f"max_{key}", 0.0), float(value))

    def record(self, case, outcome, sound=None, sharp=None):
        return _case_record(case, outcome, sound, sharp)

    def case_from_dict(self, data: dict) -> DecodeCase:
        return DecodeCase.from_dict(data)

    def case_size(self, case: dict) -> tuple:
        decoded = DecodeCase.from_dict(case)
        return (decoded.work, decoded.batch * decoded.heads * decoded.s_q, sum(decoded.lengths),
                *super().case_size(case))

    def implementation_entry(self, impl, reports, dtypes):
        caps = impl.capabilities
        capabilities = {key: (str(value) if not isinstance(value, (int, float, str, bool, type(None), tuple))
                              else value) for key, value in vars(caps).items()}
        capabilities["dtypes"] = [dtype_name(t) for t in caps.dtypes]
        for name in ("accumulation_dtype", "p_dtype", "partials_dtype"):
            if getattr(caps, name) is not None:
                capabilities[name] = dtype_name(getattr(caps, name))
        return {"name": impl.name, "spec": impl.spec, "kind": self.kind, "capabilities": capabilities}

    def not_covered(self, impl, device, reports, dtypes, profile):
        return not_covered(impl, device, reports[0].coverage if reports else None, dtypes)


class LayerHalf(Half):
    """A whole layer: cases are configs × prefill and decode lengths × dtypes × scales, judged by the
    layer properties (mla_verify.layer); one case builds the layer from float64 weights, prefills
    and decodes."""

    kind = "layer"

    def __init__(self) -> None:
        # reasons the factory's supports(config) gave for configs the strategy skipped: the reason
        # with its numbers blanked out → (an example of it, how many configs)
        self.refused_configs: dict[str, tuple[str, int]] = {}

    def properties(self, impl: LayerImplementation) -> tuple:
        both = getattr(impl.capabilities, "both_paths", True)
        return tuple(p for p in layer_properties() if both or p.name != "absorbed_matches_naive")

    def property_named(self, name: str) -> LayerProperty:
        return layer_property_named(name)

    @staticmethod
    def dtypes(impl: LayerImplementation, dtypes: tuple[str, ...] | None) -> tuple[str, ...]:
        declared = _dtype_names(getattr(impl.capabilities, "dtypes", ALL_DTYPES))
        return tuple(t for t in declared if not dtypes or t in dtypes)

    def _supported(self, factory: Callable, case: object) -> bool:
        supports = getattr(factory, "supports", None)
        try:
            reason = supports(case.config) if supports is not None else None
        except Exception:  # noqa: BLE001 - kept: judging the case reports the broken declaration
            return True
        if reason:
            example = _first_line(str(reason), 160)
            key = re.sub(r"\d+", "N", example)
            first, count = self.refused_configs.get(key, (example, 0))
            self.refused_configs[key] = (first, count + 1)
        return not reason

    def strategy(self, impl, prop, profile, device, dtypes):
        limits: LayerLimits = profile.layer
        max_heads = limits.max_heads
        declared_heads = getattr(impl.capabilities, "max_heads", None)
        if declared_heads:
            max_heads = min(max_heads, declared_heads)
        from mla_verify.layer import layer_cases

        cases = layer_cases(dtypes=self.dtypes(impl, dtypes), max_heads=max_heads, max_width=limits.max_width,
                            max_length=limits.max_length)
        return cases.filter(lambda case: self._supported(impl.factory, case))

    def judge(self, impl, prop, case, device):
        from mla_verify.layer import LayerFailure

        fault = refused = None
        report = None
        supports = getattr(impl.factory, "supports", None)
        try:
            if supports is not None:
                supports(case.config)
        except Exception as error:  # noqa: BLE001 - a declaration that raises is the layer's failure
            raise CaseFault(Fault("exception", _first_line(f"its supports(config) raised {type(error).__name__}: "
                                                            f"{error}"), locus=type(error).__name__), case) from None
        try:
            with deadline(impl.timeout_s):
                report = prop.check(impl.factory, case, device)
        except LayerFailure as failure:
            if isinstance(failure.__cause__, (Declined, NotImplementedError)):  # the layer refused the case
                refused = _first_line(f"{type(failure.__cause__).__name__}: {failure.__cause__}")
            else:
                fault = _layer_fault(failure)
        except (Declined, NotImplementedError) as error:
            refused = _first_line(f"{type(error).__name__}: {error}")
        except CallTimedOut:
            fault = Fault(TIMEOUT, f"the layer did not finish the case within {impl.timeout_s:g} s (building it, "
                                   "prefill and every decode step; raise the limit with --timeout)")
        except SystemExit as error:
            fault = Fault("exception", f"the layer called sys.exit({error.code!r})", locus="SystemExit")
        except Exception as error:  # the layer's own failure is the finding
            fault = Fault("exception", _first_line(f"{type(error).__name__}: {error}"), locus=type(error).__name__)
        if refused is not None:
            raise CaseRefused(refused, case)
        if fault is not None:
            raise CaseFault(fault, case)
        return _layer_ratios(report), _layer_details(report)

    def new_coverage(self) -> LayerCoverage:
        return LayerCoverage()

    def record(self, case, outcome, sound=None, sharp=None):
        return _layer_record(case, outcome, sound, sharp)

    def note(self, report: PropertyReport, details: dict, case: object) -> None:
        extra = report.extra
        stages = extra.setdefault("max_stage_ratios", {})
        for stage, ratio in (details.get("stages") or {}).items():
            if isinstance(ratio, (int, float)) and math.isfinite(ratio):
                stages[stage] = max(stages.get(stage, 0.0), float(ratio))
        relative = details.get("relative_error")
        if isinstance(relative, (int, float)) and math.isfinite(relative):
            extra["max_relative_error"] = max(extra.get("max_relative_error") or 0.0, float(relative))
        else:
            extra.setdefault("max_relative_error", None)
        classes = extra.setdefault("precision_classes", {})
        if details.get("precision_class"):
            classes.setdefault(case.dtype, details["precision_class"])
        precision = extra.setdefault("precision", {})
        if details.get("precision"):
            precision.setdefault(case.dtype, details["precision"])

    def case_from_dict(self, data: dict) -> object:
        return layer_case_from_dict(data)

    def case_size(self, case: dict) -> tuple:
        decoded = layer_case_from_dict(case)
        c = decoded.config
        widths = c.hidden_size + c.kv_lora_rank + c.qk_rope_head_dim + c.qk_nope_head_dim + c.v_head_dim
        return (decoded.batch * decoded.length * c.num_heads * widths, decoded.length, len(decoded.decode),
                *super().case_size(case))

    def state(self) -> dict:
        return {"refused_configs": {key: list(entry) for key, entry in self.refused_configs.items()}}

    def add_state(self, state: dict) -> None:
        for key, (example, count) in (state.get("refused_configs") or {}).items():
            first, total = self.refused_configs.get(key, (example, 0))
            self.refused_configs[key] = (first, total + count)

    def nothing_drawn(self, impl, error):
        if self.refused_configs:
            refused = sum(count for _, count in self.refused_configs.values())
            example = next(iter(self.refused_configs.values()))[0]
            return (f"'{impl.name}' supports none of the {refused} configs drawn (its supports(config) refused "
                    f"them, e.g.: {example}); nothing to certify within the profile's limits")
        return super().nothing_drawn(impl, error)

    def digest(self, impl, prop, device):
        return f"layer|{impl.spec}|{prop.name}|{device}".encode()

    def implementation_entry(self, impl, reports, dtypes):
        caps = impl.capabilities
        capabilities = {}
        for key, value in (vars(caps) if hasattr(caps, "__dict__") else dataclasses.asdict(caps)).items():
            if key == "dtypes":
                value = _dtype_names(value)
            elif not isinstance(value, (int, float, str, bool, type(None), tuple, list)):
                value = str(value)
            capabilities[key] = list(value) if isinstance(value, tuple) else value
        chosen = self.dtypes(impl, dtypes)
        classes: dict[str, str] = {}
        precision: dict[str, str] = {}
        for report in reports:
            for dtype, label in report.extra.get("precision_classes", {}).items():
                classes.setdefault(dtype, label)
            for dtype, steps in report.extra.get("precision", {}).items():
                precision.setdefault(dtype, steps)
        declared = getattr(impl.factory, "precision", None)
        for dtype in chosen:  # dtypes without a passing case: from the factory's declaration, if it has one
            if dtype not in classes and hasattr(declared, "precision_class"):
                classes[dtype] = declared.precision_class(getattr(torch, dtype))
                precision.setdefault(dtype, declared.describe())
        drawn = [dtype for dtype in chosen if any(dtype in report.coverage.dtypes for report in reports)]
        ordered = {dtype: classes[dtype] for dtype in drawn if dtype in classes}
        label = "; ".join(dict.fromkeys(ordered.values()))
        return {"name": impl.name, "spec": impl.spec, "kind": self.kind, "capabilities": capabilities,
                "precision": {dtype: precision[dtype] for dtype in drawn if dtype in precision},
                "precision_class": label or None, "precision_classes": ordered, "dtypes": drawn}

    def not_covered(self, impl, device, reports, dtypes, profile):
        caps, gaps = impl.capabilities, []
        declared = _dtype_names(getattr(caps, "dtypes", ALL_DTYPES))
        gaps += [f"dtype {name} (not declared)" for name in ALL_DTYPES if name not in declared]
        if dtypes:
            gaps += [f"dtype {name} (not requested with --dtype)" for name in declared if name not in dtypes]
        drawn = {dtype for report in reports for dtype in report.coverage.dtypes}
        gaps += [f"dtype {name} (declared, but no case of it was drawn: raise --max-examples)"
                 for name in self.dtypes(impl, dtypes) if reports and name not in drawn]
        devices = tuple(getattr(caps, "devices", ("cpu",)))
        if device.split(":")[0] not in devices:
            gaps.append(f"device {device} is not declared ({list(devices)})")
        if not getattr(caps, "both_paths", True):
            gaps.append("absorbed_matches_naive: the layer declares a single path for prefill and decode")
        limits = profile.layer
        gaps.append(f"more than {limits.max_heads} heads, widths above {limits.max_width}, sequences beyond about "
                    f"{limits.max_length} tokens (the {profile.name} profile's limits)")
        for example, count in self.refused_configs.values():
            gaps.append(f"configs the layer does not support ({count} drawn configs skipped), e.g.: {example}")
        coverage = reports[0].coverage if reports else None
        if isinstance(coverage, LayerCoverage) and coverage.dtypes:
            crossings = ", ".join(f"{n} across a {page} boundary" for page, n in coverage.page_crossings.items())
            gaps.append(f"drawn: sequences up to {coverage.max_length} tokens, batches up to {coverage.max_batch}, "
                        f"up to {max(coverage.heads)} heads; decode steps {crossings}")
        return gaps


def _layer_fault(failure: BaseException) -> Fault:
    """A LayerFailure as a Fault: its kind and stage (the signature), its ratio and tier, the message
    without the case and replay lines (the runner records the case and writes its own replay)."""
    lines = [line.strip() for line in str(failure).splitlines()
             if line.strip() and not line.strip().startswith(("case:", "replay:"))]
    ratio = float(failure.ratio)
    locus = failure.stage if failure.stage and failure.stage != failure.kind else ""
    if failure.kind == "exception" and not locus and failure.__cause__ is not None:
        locus = type(failure.__cause__).__name__  # distinct exceptions are distinct failures
    return Fault(failure.kind, " ".join(lines), ratio, locus, failure.tier if math.isfinite(ratio) else "")


def _finite(value: float) -> float:
    return value if math.isfinite(value) else 0.0


def _layer_ratios(report: object) -> Ratios:
    """Both tiers' ratios of a LayerReport, and where each was reached."""
    sound_at = (f"{report.worst} at {list(report.index)}: error {report.observed:.3g}, bound {report.bound:.3g}; "
                f"relative error {report.relative_error:.3g}")
    sharp_at = f"end to end, row norms; relative error {report.relative_error:.3g}" if report.sharp_ratio else ""
    return Ratios(_finite(report.ratio), _finite(report.sharp_ratio), sound_at, sharp_at)


def _layer_details(report: object) -> dict:
    """What a passing LayerReport adds to its property's report: precision, stages, relative error."""
    return {"precision_class": report.precision_class, "precision": report.precision,
            "stages": {str(stage): float(ratio) for stage, ratio in report.stages.items()},
            "relative_error": float(report.relative_error)}


def half_of(impl: object) -> Half:
    """The half that certifies `impl` (a fresh one per run: a LayerHalf keeps what it skipped)."""
    return LayerHalf() if isinstance(impl, LayerImplementation) else DecodeHalf()
