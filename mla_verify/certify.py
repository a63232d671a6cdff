"""Certify a decode kernel or a whole MLA layer: run every property of its half under Hypothesis and
write the certificate.

One runner serves both halves. What differs between them is a `Half`: the property list, the case
strategy, the case record and coverage, how one case is judged, and the counterexample artifact
(`DecodeHalf`, `LayerHalf`). What they share is here: the search in rounds for every distinct
failure, the certificate, progress, counterexample saving and the isolated child process.

The search does not stop at the first failure: each distinct failure (its signature: the failure
kind and where it arises — for a decode kernel see `mla_verify.decode.checks.Finding`, for a layer
its kind and stage) is shrunk on its own by Hypothesis (report_multiple_bugs) and gets its own
minimal case, counterexample artifact and replay command. A case the implementation declines
(`mla_verify.Declined`, NotImplementedError) is counted with its reason and the search goes on;
with `strict` it is a failure.

Certificate schema (JSON, "schema": "mla-verify-certificate/3"; strict JSON: non-finite floats are
the strings "inf", "-inf", "nan"):
    implementation  {name, spec, kind, capabilities}  what was certified and what it claims; kind is
                    "decode kernel" or "layer"; a layer adds precision {dtype: declared steps},
                    precision_class (one line), precision_classes {dtype: class} and dtypes
    versions        {mla_verify, torch, hypothesis, numpy, python, [triton], [the library behind an adapter]}
    device          {type, name}
    provenance      {created, command, revision, kernel_source {path, sha256}, cpu, host}
    settings        {profile, max_examples, seed, isolated, strict, timeout_s, properties, dtypes, limits}
    verdict         "pass" | "pass with declined cases" | "fail"
    headline        "PASS" | "PASS with declined cases (k of n cases declined)" | "FAIL: N distinct failures";
                    a layer's adds " — precision class: …"
    distinct_failures  int                            over all properties
    properties      [{name, description, verdict, examples, passed, failed, declined,
                      declined_reasons {reason: count}, max_ratio, max_sharp_ratio, worst_case,
                      worst_sharp_case, worst {sound, sharp}, worst_description {sound, sharp},
                      coverage {..., counts {category: cases}},
                      failures: [{signature, kind, message, ratio, case, description, counterexample, flaky}],
                      cases: [one record per case judged: {outcome, sound, sharp, dtype, heads, batch,
                              max_length, regime, ...}],
                      layer only: max_stage_ratios {stage: ratio}, max_relative_error, precision_classes}]
    not_covered     [str]                             what the declaration left out and the limits drawn
    elapsed_s       float
max_ratio / max_sharp_ratio are the largest observed error / tolerance of each tier over the cases
that passed (≤ 1); worst_case / worst_sharp_case the cases that reached them, and worst says where
(the element or row, its error and its tolerance). cases has one record per case judged, shrinking
steps included; a failing case carries the ratio of the tier it failed, when it has one.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import inspect
import json
import math
import multiprocessing
import multiprocessing.connection
import platform
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import hypothesis
import hypothesis.errors
import numpy
import torch
from hypothesis import Phase, example, given, settings, target
from hypothesis import strategies as st

import mla_verify
from mla_verify.decode.case import SERVING_LENGTH, DecodeCase, dtype_name
from mla_verify.decode.checks import (DEFAULT_TIMEOUT_S, CallTimedOut, CaseDeclined, CaseFailure, Implementation,
                                      Ratios, deadline)
from mla_verify.decode.contract import Declined
from mla_verify.decode.properties import DECODE_PROPERTIES, DecodeProperty, property_named
from mla_verify.decode.strategies import DEFAULT_PAGES, DEFAULT_WIDTHS, decode_cases, pinned_cases
from mla_verify.profiles import PROFILES, LayerLimits, Profile, hypothesis_settings
from mla_verify.progress import Progress
from mla_verify.registry import LayerImplementation, module_root

__all__ = ["PropertyReport", "Certificate", "certify", "run_property", "Coverage", "LayerCoverage", "not_covered",
           "Fault", "CaseFault", "CaseRefused", "Half", "DecodeHalf", "LayerHalf", "half_of", "LayerProperty",
           "layer_properties", "layer_property_named", "layer_capabilities", "layer_case_from_dict",
           "layer_case_to_dict", "IsolatedRunner", "certificate_markdown", "ALL_DTYPES"]

SCHEMA = "mla-verify-certificate/3"
MAX_SEARCH_ROUNDS = 8  # a round per newly found failure signature, then one that finds none
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

    # the decode pytest plugin and the zoo read `.finding` (kind, signature, message, ratio)
    @property
    def finding(self) -> Fault:
        return self.fault

    def distinct(self) -> CaseFault:
        signature = self.fault.signature
        kind = _SIGNATURE_TYPES.get(signature)
        if kind is None:
            kind = type(f"CaseFault[{signature}]", (CaseFault,), {"__module__": __name__})
            _SIGNATURE_TYPES[signature] = kind
        return kind(self.fault, self.case, self.description)


_SIGNATURE_TYPES: dict[str, type[CaseFault]] = {}


class CaseRefused(Exception):
    """The implementation declined the case cleanly; `reason` is its one-line message."""

    def __init__(self, reason: str, case: object) -> None:
        super().__init__(reason)
        self.reason, self.case = reason, case


# failures after which an isolated child may hold a broken state (a sticky CUDA error, a
# half-finished call)
_RESTART_AFTER = ("exception raised", "exception", CRASH, TIMEOUT)


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
                                  ("serving scale", _serving_scale(case))):
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
            "page_size": case.page_size, "regime": case.regime, "causal": case.causal}


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


# ----------------------------------------------------------------------------------------------
# Property reports and the certificate
# ----------------------------------------------------------------------------------------------

@dataclass
class PropertyReport:
    name: str
    description: str
    examples: int = 0
    passed: int = 0
    failed: int = 0
    declined: int = 0
    declined_reasons: dict = field(default_factory=dict)
    max_ratio: float = 0.0
    max_sharp_ratio: float = 0.0
    worst_case: dict | None = None
    worst_sharp_case: dict | None = None
    # where each tier's largest ratio arose, with the error and the tolerance there
    worst: dict = field(default_factory=lambda: {"sound": "", "sharp": ""})
    # the worst cases in words
    worst_description: dict = field(default_factory=lambda: {"sound": "", "sharp": ""})
    coverage: Coverage | LayerCoverage = field(default_factory=Coverage)
    failures: list = field(default_factory=list)
    # one record per case judged (outcome, both ratios, the case's shape), for plots and audits
    cases: list = field(default_factory=list)
    # what one half adds (a layer: max_stage_ratios, max_relative_error, precision_classes)
    extra: dict = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        if self.failures:
            return "fail"
        return "pass with declined cases" if self.declined else "pass"

    def record(self, ratios: Ratios, case: object, record: dict | None = None) -> None:
        self.passed += 1
        self.cases.append(record if record is not None else _case_record(case, "pass", ratios.sound, ratios.sharp))
        # exact properties (ratio 0) have no worst case
        if ratios.sound > self.max_ratio:
            self.max_ratio, self.worst_case, self.worst["sound"] = ratios.sound, _to_dict(case), ratios.sound_at
            self.worst_description["sound"] = case.describe()
        if ratios.sharp > self.max_sharp_ratio:
            self.max_sharp_ratio, self.worst_sharp_case, self.worst["sharp"] = (ratios.sharp, _to_dict(case),
                                                                              ratios.sharp_at)
            self.worst_description["sharp"] = case.describe()

    def to_dict(self) -> dict:
        data = {key: value for key, value in vars(self).items() if key != "extra"}
        data["verdict"] = self.verdict
        data["coverage"] = self.coverage.to_dict()
        data.update(self.extra)
        return data


def _to_dict(case: object) -> dict:
    return case.to_dict() if isinstance(case, DecodeCase) else layer_case_to_dict(case)


@dataclass
class Certificate:
    implementation: dict
    versions: dict
    device: dict
    settings: dict
    properties: list[PropertyReport]
    not_covered: list[str]
    elapsed_s: float
    provenance: dict = field(default_factory=dict)

    @property
    def distinct_failures(self) -> int:
        """Distinct failure signatures over all properties (a crash on one case fails every property
        that calls the kernel on it: one failure)."""
        return len({failure["signature"] for p in self.properties for failure in p.failures})

    @property
    def verdict(self) -> str:
        if self.distinct_failures:
            return "fail"
        return "pass with declined cases" if any(p.declined for p in self.properties) else "pass"

    def headline(self) -> str:
        if self.verdict == "fail":
            n = self.distinct_failures
            text = f"FAIL: {n} distinct failure{'s' if n > 1 else ''}"
        elif self.verdict == "pass":
            text = "PASS"
        else:
            declined = sum(p.declined for p in self.properties)
            examples = sum(p.examples for p in self.properties)
            text = f"PASS with declined cases ({declined} of {examples} cases declined)"
        precision = self.implementation.get("precision_class")
        return f"{text} — precision class: {precision}" if precision else text

    def to_dict(self) -> dict:
        """The certificate as JSON-ready data (infinities and NaN as the strings "inf", "-inf", "nan")."""
        return json_safe({"schema": SCHEMA, "implementation": self.implementation, "versions": self.versions,
                          "device": self.device, "provenance": self.provenance, "settings": self.settings,
                          "verdict": self.verdict, "headline": self.headline(),
                          "distinct_failures": self.distinct_failures,
                          "properties": [p.to_dict() for p in self.properties], "not_covered": self.not_covered,
                          "elapsed_s": round(self.elapsed_s, 2)})

    def to_markdown(self) -> str:
        return certificate_markdown(self.to_dict())


def json_safe(value: object) -> object:
    """`value` with every non-finite float as a string: strict JSON has no inf or NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


# what a bare function is assumed to do; a declaration that differs is printed in the certificate
_DEFAULT_CLAIMS = {"lse_base": "e", "empty_row_lse": "-inf", "accumulation_dtype": None, "p_dtype": None,
                   "partials_dtype": None, "deterministic": True}


def _ratio(value: object) -> str:
    return value if isinstance(value, str) else f"{value:.3g}"


def is_layer_certificate(data: dict) -> bool:
    return (data.get("implementation") or {}).get("kind") == "layer"


def certificate_markdown(data: dict) -> str:
    """The Markdown page of a certificate's data (to_dict()); pipes in messages are escaped."""
    impl, lines = data["implementation"], []
    layer = is_layer_certificate(data)
    lines.append(f"# MLA {'layer' if layer else 'decode'} certificate: {impl['name']} — {data['headline']}")
    lines.append("")
    lines.append(f"- implementation: `{impl['spec']}` ({impl.get('kind', 'decode kernel')})")
    if layer:
        lines.append(f"- precision class: {impl.get('precision_class') or 'unknown'}")
        for dtype, steps in (impl.get("precision") or {}).items():
            lines.append(f"- declared precision with {dtype} inputs: {_escape(str(steps))}")
        lines.append(f"- dtypes certified: {', '.join(impl.get('dtypes') or []) or 'none'}")
    else:
        claims = {k: impl["capabilities"].get(k) for k, v in _DEFAULT_CLAIMS.items()
                  if k in impl["capabilities"] and impl["capabilities"].get(k) != v}
        if claims:
            lines.append("- declared, judged accordingly: " + ", ".join(f"{k} = {v}" for k, v in claims.items()))
    lines.append(f"- device: {data['device']['type']} ({data['device']['name']})")
    lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in data["versions"].items()))
    s = data["settings"]
    lines.append(f"- profile: {s['profile']}, {s['max_examples']} examples per property, seed {s['seed']}, "
                 f"isolated: {s['isolated']}, strict: {s['strict']}, time limit per call: {s.get('timeout_s')} s"
                 + (f", dtypes: {', '.join(s['dtypes'])}" if s.get("dtypes") else ""))
    provenance = data.get("provenance") or {}
    if provenance.get("command"):
        lines.append(f"- command: `{provenance['command']}`")
    for key in ("created", "revision", "cpu"):
        if provenance.get(key):
            lines.append(f"- {key}: {provenance[key]}")
    if provenance.get("kernel_source"):
        source = provenance["kernel_source"]
        lines.append(f"- source: `{source['path']}` (sha256 {source['sha256'][:16]}…)")
    lines.append(f"- elapsed: {data['elapsed_s']:.1f} s")
    lines.append("")
    lines.append("| property | verdict | cases | passed | failed | declined | max error/bound (sound) "
                 "| max error/tolerance (sharp) | worst failure (error/bound) |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for p in data["properties"]:
        worst_failure = max((f["ratio"] for f in p["failures"] if not isinstance(f["ratio"], str)), default=None)
        failing = ("—" if not p["failures"] else "∞ or not a ratio" if worst_failure is None
                   else f"{worst_failure:.3g}")
        lines.append(f"| {p['name']} | {p['verdict']} | {p['examples']} | {p['passed']} | {p['failed']} | "
                     f"{p['declined']} | {_ratio(p['max_ratio'])} | {_ratio(p['max_sharp_ratio'])} | {failing} |")
    lines.append("")
    if layer:
        lines.append("error/bound is the observed error divided by the bound the case allows; ≤ 1 passes. The max "
                     "columns are over the cases that passed. Sound tier: the layer's worst-case rounding bound at "
                     "its declared precision (stage by stage and end to end); sharp tier: a probabilistic rounding "
                     "model of the end-to-end error (see mla_verify/layer).")
        for p in data["properties"]:
            stages = p.get("max_stage_ratios") or {}
            if stages:
                lines.append(f"- {p['name']}, largest error/bound per stage over passing cases: "
                             + ", ".join(f"{stage} {_ratio(ratio)}" for stage, ratio in stages.items()))
            if p.get("max_relative_error") is not None:
                lines.append(f"- {p['name']}, largest relative error ‖out − ref‖/‖ref‖: "
                             f"{_ratio(p['max_relative_error'])}")
    else:
        lines.append("error/bound is the observed error divided by the tolerance the case allows; ≤ 1 passes. The "
                     "max columns are over the cases that passed. Sound tier: a worst-case rounding-error bound, "
                     "element by element. Sharp tier: a probabilistic rounding model on the lse and on each row's "
                     "error norm (see mla_verify/decode/bounds.py).")
    for p in data["properties"]:
        for number, failure in enumerate(p["failures"], 1):
            lines.append("")
            lines.append(f"## {p['name']}: failure {number} of {len(p['failures'])} — "
                         f"{_escape(failure['signature'])}")
            lines.append("")
            lines.append(f"- {_escape(failure['message'])}" + (" (flaky)" if failure.get("flaky") else ""))
            lines.append(f"- minimal case: `{_describe_failure_case(failure, layer)}`")
            if failure.get("counterexample"):
                lines.append(f"- counterexample: `{failure['counterexample']}` "
                             f"(replay: `mla-verify replay {failure['counterexample']}`)")
        if p["declined_reasons"]:
            lines.append("")
            lines.append(f"Declined by {p['name']} ({p['declined']} of {p['examples']} cases):")
            lines += [f"- {count} × {_escape(reason)}" for reason, count in p["declined_reasons"].items()]
    lines.append("")
    for p in data["properties"]:
        for tier, case_key in (("sound", "worst_case"), ("sharp", "worst_sharp_case")):
            if p.get(case_key):
                where = p.get("worst", {}).get(tier)
                described = (p.get("worst_description") or {}).get(tier) or _describe_case(p[case_key], layer)
                lines.append(f"- worst passing case of {p['name']} ({tier}): `{described}`"
                             + (f"; {_escape(where)}" if where else ""))
    lines.append("")
    first = data["properties"][0] if data["properties"] else None
    if first:
        counts = first["coverage"].get("counts", {})
        lines.append(f"Cases of {first['name']} per category: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        lines.append("")
        coverage = {k: v for k, v in first["coverage"].items() if k != "counts"}
        lines.append(f"Coverage ({first['name']}): " + "; ".join(f"{k}: {v}" for k, v in coverage.items()))
        lines.append("")
    lines.append("Not covered: " + ("; ".join(data["not_covered"]) if data["not_covered"] else "nothing declared out"))
    return "\n".join(lines) + "\n"


def _describe_failure_case(failure: dict, layer: bool) -> str:
    return failure.get("description") or _describe_case(failure["case"], layer)


def _describe_case(case: dict, layer: bool) -> str:
    try:
        return layer_case_from_dict(case).describe() if layer else DecodeCase.from_dict(case).describe()
    except (ValueError, TypeError, KeyError):
        return json.dumps(case)


def _escape(text: str) -> str:
    """Markdown-safe inside a line: pipes escaped, no line breaks."""
    return text.replace("|", "\\|").replace("\n", " ")


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
    if coverage is not None and coverage.s_q:
        gaps.append(f"drawn: sequences longer than {coverage.max_length} tokens, batches above {coverage.max_batch}, "
                    f"s_q above {max(coverage.s_q)}, more than {max(coverage.heads)} heads")
    return gaps


# ----------------------------------------------------------------------------------------------
# The layer half's names (mla_verify.layer), with stand-ins while parts of it are missing
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


def layer_capabilities(factory: Callable) -> object:
    """What a layer factory declares (mla_verify.layer.layer_capabilities_of: its `capabilities`
    attribute, else the defaults); TypeError when that attribute is not a LayerCapabilities."""
    from mla_verify.layer import layer_capabilities_of

    return layer_capabilities_of(factory)


def _dtype_names(dtypes: tuple) -> list[str]:
    return [t if isinstance(t, str) else dtype_name(t) for t in dtypes]


def layer_case_to_dict(case: object) -> dict:
    return case.to_dict()


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

    def implementation_entry(self, impl: object, reports: list[PropertyReport],
                             dtypes: tuple[str, ...] | None) -> dict:
        raise NotImplementedError

    def not_covered(self, impl: object, device: str, reports: list[PropertyReport],
                    dtypes: tuple[str, ...] | None, profile: Profile) -> list[str]:
        raise NotImplementedError

    def save(self, directory: str | Path, impl: object, prop_name: str, fault: Fault, case: object,
             device: str) -> Path:
        from mla_verify.counterexample import save_counterexample

        return save_counterexample(directory, impl, prop_name, fault, case, device=device)


class DecodeHalf(Half):
    kind = "decode kernel"

    def properties(self, impl: Implementation) -> tuple:
        return DECODE_PROPERTIES

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
        return ratios, {}

    def new_coverage(self) -> Coverage:
        return Coverage()

    def record(self, case, outcome, sound=None, sharp=None):
        return _case_record(case, outcome, sound, sharp)

    def case_from_dict(self, data: dict) -> DecodeCase:
        return DecodeCase.from_dict(data)

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
        # reasons the factory's supports(config) gave for configs the strategy skipped
        self.refused_configs: dict[str, int] = {}

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
        except Exception as error:  # noqa: BLE001 - the layer's own declaration is broken: say so, skip the config
            reason = f"its supports(config) raised {type(error).__name__}: {error}"
        if reason:
            key = _first_line(str(reason), 120)
            self.refused_configs[key] = self.refused_configs.get(key, 0) + 1
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
        return _layer_ratios(report), _layer_details(report, impl, case)

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
        gaps.append(f"more than {limits.max_heads} heads, widths above {limits.max_width}, sequences longer than "
                    f"{limits.max_length} tokens (the {profile.name} profile's limits)")
        for reason, count in self.refused_configs.items():
            gaps.append(f"configs the layer does not support ({count} drawn configs skipped): {reason}")
        coverage = reports[0].coverage if reports else None
        if isinstance(coverage, LayerCoverage) and coverage.dtypes:
            crossings = ", ".join(f"{n} across a {page} boundary" for page, n in coverage.page_crossings.items())
            gaps.append(f"drawn: sequences up to {coverage.max_length} tokens, batches up to {coverage.max_batch}, "
                        f"up to {max(coverage.heads)} heads; decode steps {crossings}")
        return gaps


def _layer_fault(failure: BaseException) -> Fault:
    """A LayerFailure as a Fault: its kind and stage (the signature), its ratio, the message without
    the case and replay lines (the runner records the case and writes its own replay command)."""
    text = str(failure)
    lines = [line for line in text.splitlines() if not line.strip().startswith(("case:", "replay:"))]
    message = " ".join(line.strip() for line in lines if line.strip()) or text
    kind = failure.kind
    stage = getattr(failure, "stage", None)
    ratio = getattr(failure, "ratio", None)
    ratio = float(ratio) if isinstance(ratio, (int, float)) else math.inf
    tier = getattr(failure, "tier", None) if math.isfinite(ratio) else ""
    locus = str(stage) if stage and stage != kind else ""
    if kind == "exception" and not locus and failure.__cause__ is not None:
        locus = type(failure.__cause__).__name__  # distinct exceptions are distinct failures
    return Fault(str(kind), message, ratio, locus, tier or "")


def _layer_ratios(report: object) -> Ratios:
    def finite(value: object) -> float:
        return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else 0.0

    sound, sharp = finite(getattr(report, "ratio", 0.0)), finite(getattr(report, "sharp_ratio", 0.0))
    index = getattr(report, "index", None)
    where = (f"out at [b, s, D] = {list(index)}: error {getattr(report, 'observed', math.nan):.3g}, "
             f"bound {getattr(report, 'bound', math.nan):.3g}" if index is not None else "")
    stages = getattr(report, "stages", None) or {}
    if stages:
        worst = max(stages, key=lambda s: finite(stages[s]))
        where += f"; worst stage {worst} ({finite(stages[worst]):.3g})"
    relative = getattr(report, "relative_error", None)
    if isinstance(relative, (int, float)):
        where += f"; relative error {relative:.3g}"
    return Ratios(sound, sharp, where.lstrip("; "), f"end to end; relative error {relative:.3g}"
                  if isinstance(relative, (int, float)) and sharp else "")


def _layer_details(report: object, impl: LayerImplementation, case: object) -> dict:
    label = getattr(report, "precision_class", None)
    stages = getattr(report, "stages", None) or {}
    relative = getattr(report, "relative_error", None)
    return {"precision_class": label or case.dtype, "precision": getattr(report, "precision", None),
            "stages": {str(k): float(v) for k, v in stages.items() if isinstance(v, (int, float))},
            "relative_error": float(relative) if isinstance(relative, (int, float)) else None}


def half_of(impl: object) -> Half:
    """The half that certifies `impl` (a fresh one per run: a LayerHalf keeps what it skipped)."""
    return LayerHalf() if isinstance(impl, LayerImplementation) else DecodeHalf()


# ----------------------------------------------------------------------------------------------
# Cases in a child process
# ----------------------------------------------------------------------------------------------

def _serve_isolated(connection: multiprocessing.connection.Connection, kind: str, spec: str,
                    timeout_s: float | None) -> None:
    """Child-process body: judge each (property, case, device) sent until None arrives. Replies
    ('ok', (Ratios, details)), ('declined', reason) or ('fail', Fault)."""
    from mla_verify.registry import resolve_any

    impl = dataclasses.replace(resolve_any(spec, layer=kind == LayerHalf.kind), timeout_s=timeout_s)
    half = half_of(impl)
    while (request := connection.recv()) is not None:
        prop_name, case_dict, device = request
        try:
            reply = "ok", half.judge(impl, half.property_named(prop_name), half.case_from_dict(case_dict), device)
        except CaseRefused as refused:
            reply = "declined", refused.reason
        except CaseFault as failure:
            reply = "fail", failure.fault
        connection.send(reply)


# time a child gets beyond the kernel's own limit (building the case, the reference) before it is killed
_ISOLATION_GRACE_S = 120.0


class IsolatedRunner:
    """Runs each case in a child process, so that a segfault, a CUDA illegal-address error or a
    hang is a counterexample rather than the end of the run. The child is replaced after a crash,
    a timeout or an exception; wrong numbers leave it running, as starting one costs seconds
    (CUDA context, kernel loading)."""

    def __init__(self, timeout_s: float | None = DEFAULT_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s
        self._child: multiprocessing.process.BaseProcess | None = None
        self._connection: multiprocessing.connection.Connection | None = None
        self._key: tuple[str, str] | None = None

    def _start(self, kind: str, spec: str) -> multiprocessing.connection.Connection:
        if self._child is not None and self._key == (kind, spec) and self._child.is_alive():
            return self._connection
        self.close()
        # A fork server that has imported torch (but touched no GPU) starts each child quickly
        # and gives it a CUDA context of its own. The kernel's module is imported in the child:
        # one that touches CUDA on import would leave every forked child a broken context.
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["torch", "mla_verify.decode.properties", "mla_verify.registry",
                                        "mla_verify.layer"])
        ours, theirs = context.Pipe()
        self._child = context.Process(target=_serve_isolated, args=(theirs, kind, spec, self.timeout_s),
                                      daemon=True)
        self._child.start()
        theirs.close()
        self._connection, self._key = ours, (kind, spec)
        return ours

    def judge(self, impl: object, prop: object, case: object, device: str = "cpu") -> tuple[Ratios, dict]:
        """As Half.judge, in the child process."""
        kind = getattr(impl, "kind", DecodeHalf.kind)
        connection = self._start(kind, impl.spec)
        limit = None if self.timeout_s is None else self.timeout_s + _ISOLATION_GRACE_S
        try:
            connection.send((prop.name, _to_dict(case), device))
            if not connection.poll(limit):
                self.close()
                raise CaseFault(Fault(TIMEOUT, f"the case did not finish within {limit:g} s; the child process "
                                               "running it was killed"), case)
            status, payload = connection.recv()
        except (EOFError, OSError):
            self.close()
            raise CaseFault(Fault(CRASH, "the child process running the implementation died (segfault, abort "
                                         "or a fatal CUDA error)"), case) from None
        if status == "ok":
            return payload
        if status == "declined":
            raise CaseRefused(payload, case)
        if payload.kind in _RESTART_AFTER:
            self.close()
        raise CaseFault(payload, case)

    def check(self, impl: Implementation, prop: DecodeProperty, case: DecodeCase) -> Ratios:
        """A decode case in the child: its ratios (CaseFault / CaseRefused as judge raises them)."""
        return self.judge(impl, prop, case, getattr(case, "device", "cpu"))[0]

    def close(self) -> None:
        if self._child is not None:
            try:
                self._connection.send(None)
            except OSError:
                pass
            self._child.join(1.0)
            if self._child.is_alive():
                self._child.kill()
                self._child.join()
            self._connection.close()
        self._child = self._connection = self._key = None


# ----------------------------------------------------------------------------------------------
# The search
# ----------------------------------------------------------------------------------------------

def _case_faults(error: BaseException) -> list[tuple[CaseFault, bool]]:
    """The CaseFaults inside what Hypothesis raised (one failure, or a group of distinct ones),
    each with whether Hypothesis found it flaky (it did not fail the same way on replay)."""
    flaky = isinstance(error, hypothesis.errors.Flaky)
    if isinstance(error, CaseFault):
        return [(error, flaky)]
    if isinstance(error, BaseExceptionGroup):
        return [(failure, flaky or inner_flaky) for inner in error.exceptions
                for failure, inner_flaky in _case_faults(inner)]
    return []


def _run_collecting(test: Callable[[], None]) -> dict[str, tuple[CaseFault, bool]]:
    """Run a Hypothesis test; the distinct failures it raised, by signature."""
    try:
        test()
    except (CaseFault, BaseExceptionGroup) as error:
        return {failure.fault.signature: (failure, flaky) for failure, flaky in reversed(_case_faults(error))}
    return {}


def run_property(impl: Implementation | LayerImplementation, prop: DecodeProperty | LayerProperty, profile: Profile,
                 device: str = "cpu", max_examples: int | None = None, seed: int | None = None,
                 counterexamples: str | Path | None = None, isolated: IsolatedRunner | None = None,
                 strict: bool = False, progress: Progress | None = None, dtypes: tuple[str, ...] | None = None,
                 half: Half | None = None) -> PropertyReport:
    """Run one property under Hypothesis; shrink each distinct failure to a minimal case and save it."""
    half = half or half_of(impl)
    report = PropertyReport(prop.name, prop.description, coverage=half.new_coverage())
    progress = progress or Progress()
    planned = max_examples or profile.max_examples
    plan = {"cases": planned}  # grows by a round's examples when a round finds a new failure
    strategy = half.strategy(impl, prop, profile, device, dtypes)

    def check(case: object) -> None:
        report.examples += 1
        report.coverage.add(case)
        try:
            judge(case)
        finally:
            progress.case_done(report, plan["cases"])

    def judge(case: object) -> None:
        failure = None
        try:
            if isolated:
                ratios, details = isolated.judge(impl, prop, case, device)
            else:
                ratios, details = half.judge(impl, prop, case, device)
        except CaseRefused as refused:
            if not strict:
                report.declined += 1
                report.declined_reasons[refused.reason] = report.declined_reasons.get(refused.reason, 0) + 1
                report.cases.append(half.record(case, "declined"))
                return
            failure = CaseFault(Fault(DECLINED, refused.reason), case)
        except CaseFault as caught:
            failure = caught
        if failure is not None:
            report.failed += 1
            fault = failure.fault
            ratio = fault.ratio if math.isfinite(fault.ratio) else None
            report.cases.append(half.record(case, "fail", ratio if fault.tier == "sound" else None,
                                            ratio if fault.tier == "sharp" else None))
            if fault.signature in known:
                return  # reported by an earlier round: count it and search on
            raise failure.distinct()  # outside the except block: the signature alone tells failures apart
        report.record(ratios, case, half.record(case, "pass", ratios.sound, ratios.sharp))
        half.note(report, details, case)
        if profile.targeted:
            target(ratios.sound, label="error/bound")
            target(ratios.sharp, label="error/sharp tolerance")

    # one example-database key per (implementation, property, device): a failure stored for one
    # kernel must not be replayed first for another
    check._hypothesis_internal_add_digest = half.digest(impl, prop, device)
    # Hypothesis stops generating soon after its first failure (it then shrinks every distinct one
    # it has met). So the search runs in rounds: each round treats the failures already reported as
    # known (counted, not raised) and searches on; the last round is a full run of max_examples
    # that found nothing new, which is what the passing counts and ratios describe.
    found: dict[str, tuple[CaseFault, bool]] = {}
    known: set[str] = set()
    for round_number in range(MAX_SEARCH_ROUNDS):
        search = hypothesis_settings(profile, max_examples)(given(strategy)(check))
        if seed is not None:
            search = hypothesis.seed(seed + round_number)(search)
        new = _run_collecting(search)
        for signature, entry in new.items():
            found.setdefault(signature, entry)
        if not new.keys() - known:
            break
        known |= new.keys()
        plan["cases"] = report.examples + planned
    # The pinned regression cases run after the search: Hypothesis never shrinks an explicit
    # example, so trying them first would report them instead of the search's minimal case.
    pinned_examples = half.pinned(impl, prop, device, dtypes)
    if pinned_examples:
        pinned = given(strategy)(check)
        for case in pinned_examples:
            pinned = example(case)(pinned)
        pinned = settings(hypothesis_settings(profile), phases=[Phase.explicit])(pinned)
        for signature, entry in _run_collecting(pinned).items():
            found.setdefault(signature, entry)
    for signature, (failure, flaky) in found.items():
        fault = failure.fault
        entry = {"signature": signature, "kind": fault.kind, "message": fault.message, "ratio": fault.ratio,
                 "case": _to_dict(failure.case), "description": failure.description, "flaky": flaky,
                 "counterexample": None}
        if counterexamples is not None:
            entry["counterexample"] = str(half.save(counterexamples, impl, prop.name, fault, failure.case, device))
        report.failures.append(entry)
    return report


def _versions(impl: Implementation) -> dict:
    from mla_verify.registry import library_version

    versions = {"mla_verify": mla_verify.__version__, "torch": torch.__version__,
                "hypothesis": hypothesis.__version__, "numpy": numpy.__version__, "python": platform.python_version()}
    library = library_version(impl.spec)
    if library is not None:
        versions[library[0]] = library[1]
    triton = sys.modules.get("triton")
    if triton is not None:
        versions["triton"] = getattr(triton, "__version__", "?")
    return versions


def _device_info(device: str) -> dict:
    if device.startswith("cuda"):
        return {"type": device, "name": torch.cuda.get_device_name(torch.device(device))}
    return {"type": device, "name": platform.processor() or platform.machine()}


def _provenance(impl: Implementation, command: str | None) -> dict:
    """When, how and from what the certificate was made: enough to rerun it and to tell whether the
    kernel's source or this tool has changed since."""
    return {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": command, "revision": _revision(), "kernel_source": _source_of(impl.fn),
            "cpu": _cpu_model(), "host": platform.platform()}


def _revision() -> str | None:
    """The version-control revision of this mla_verify checkout ('+dirty' with local changes), if any."""
    here = Path(mla_verify.__file__).resolve().parent
    try:
        revision = subprocess.run(["git", "-C", str(here), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                  text=True, timeout=10)
        if revision.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no", "--", "."],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return revision.stdout.strip() + ("+dirty" if dirty else "")


def _source_of(fn: Callable) -> dict | None:
    try:
        path = inspect.getsourcefile(inspect.unwrap(fn))
    except TypeError:
        return None
    if path is None or not Path(path).is_file():
        return None
    # named from the folder it was imported from, so that certificates carry no machine's layout
    root = module_root(inspect.unwrap(fn))
    shown = Path(path).resolve()
    if root is not None and shown.is_relative_to(root):
        shown = shown.relative_to(root)
    return {"path": shown.as_posix() if not shown.is_absolute() else shown.name,
            "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest()}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def certify(impl: Implementation | LayerImplementation, profile: str = "default", device: str = "cpu",
            max_examples: int | None = None, seed: int | None = None, counterexamples: str | Path | None = None,
            isolate: bool = False, properties: list[str] | None = None, strict: bool = False,
            progress: Progress | None = None, timeout_s: float | None = DEFAULT_TIMEOUT_S,
            command: str | None = None, dtypes: list[str] | tuple[str, ...] | None = None) -> Certificate:
    """Certify `impl` (a decode kernel or a layer) under a profile. timeout_s limits each kernel
    call, or each layer case (None: no limit); command is the command line recorded in the
    certificate; dtypes restricts the dtypes drawn (names, e.g. ("bfloat16",))."""
    chosen = PROFILES[profile]
    half = half_of(impl)
    applicable = half.properties(impl)
    if properties:
        names = [p.name for p in applicable]
        unknown = [name for name in properties if name not in names]
        if unknown:
            raise ValueError(f"properties must be among {names} for this {half.kind}; got {unknown}")
        selected = [p for name in properties for p in applicable if p.name == name]
    else:
        selected = list(applicable)
    dtypes = tuple(dtypes) if dtypes else None
    seed = random.randrange(2**32) if seed is None else seed
    progress = progress or Progress()
    impl = dataclasses.replace(impl, timeout_s=timeout_s)
    isolated = IsolatedRunner(timeout_s) if isolate else None
    started = time.perf_counter()
    reports = []
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)  # the cases are small: two intra-op threads made them ~3x slower on 2 cores
    try:
        for prop in selected:
            progress.start(prop.name, prop.description, max_examples or chosen.max_examples)
            report = run_property(impl, prop, chosen, device, max_examples, seed, counterexamples, isolated,
                                  strict, progress, dtypes, half)
            progress.finish(report)
            reports.append(report)
    finally:
        torch.set_num_threads(threads)
        if isolated:
            isolated.close()
    limits = chosen.layer if half.kind == LayerHalf.kind else chosen.limits
    return Certificate(
        implementation=half.implementation_entry(impl, reports, dtypes),
        versions=_versions(impl), device=_device_info(device),
        settings={"profile": profile, "max_examples": max_examples or chosen.max_examples, "seed": seed,
                  "isolated": isolate, "strict": strict, "timeout_s": timeout_s,
                  "properties": [p.name for p in selected], "dtypes": list(dtypes) if dtypes else None,
                  "limits": vars(limits)},
        properties=reports, not_covered=half.not_covered(impl, device, reports, dtypes, chosen),
        elapsed_s=time.perf_counter() - started, provenance=_provenance(impl, command))
