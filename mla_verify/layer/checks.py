"""Running a layer and judging it: stage by stage between the checkpoints it exposes, then end to
end in both tiers (mla_verify.layer.bounds); failures carry a kind, the stage, the ratio, the case
and a replay command.

A stage check compares an exposed checkpoint with the float64 reference of its stage fed the
layer's own values of the checkpoints before it, so a bug shows in the stage that has it and not in
the stages after it (they are fed the layer's own, wrong, values and judged on what they do with
them). The end-to-end check compares the output with the float64 layer from the float64 input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from mla_verify.adapters import MissingDependency
from mla_verify.decode.contract import Declined
from mla_verify.layer.bounds import (CHECKPOINTS, STAGES, LayerBound, layer_error_bound, stage_bounds,
                                     stage_of)
from mla_verify.layer.case import LayerCase
from mla_verify.layer.contract import (INTERMEDIATES, InternalPrecision, LayerFactory, MLALayer,
                                       intermediate_shape, resolve_factory)
from mla_verify.reference import MLAWeights
from mla_verify.rounding import unit_roundoff, worst_ratio

__all__ = ["LAYER_FAILURE_KINDS", "LayerFailure", "LayerReport", "LayerRun", "run_layer", "record_layer",
           "check_layer", "judge_layer", "replay"]

F64 = torch.float64
LAYER_FAILURE_KINDS = ("q path", "latent path", "rope", "attention", "output projection", "end to end",
                       "absorbed vs naive", "shape or dtype", "exception", "no finite bound")


class LayerFailure(AssertionError):
    """A layer case that fails: `kind` (one of LAYER_FAILURE_KINDS), `stage` (the stage, merged
    stages joined by ' + ', or None), `ratio` (observed/bound; inf when there is none), `tier`
    ('sound' or 'sharp'), `case`; the message names observed vs bound, the case and a replay command."""

    def __init__(self, message: str, case: LayerCase, spec: str | None = None, *, kind: str = "end to end",
                 stage: str | None = None, ratio: float = math.inf, tier: str = "sound") -> None:
        if kind not in LAYER_FAILURE_KINDS:
            raise ValueError(f"kind must be one of {LAYER_FAILURE_KINDS}; got {kind!r}")
        lines = [message, f"  case: {case.describe()}"]
        if spec is not None:
            lines.append(f"  replay: python -c \"from mla_verify.config import MLAConfig, YarnConfig; "
                         f"from mla_verify.layer import LayerCase, replay; replay({spec!r}, {case!r})\"")
        super().__init__("\n".join(lines))
        self.case, self.kind, self.stage, self.ratio, self.tier, self.spec = case, kind, stage, ratio, tier, spec


@dataclass
class LayerReport:
    """A passing case. `ratio` is the largest observed/bound of every sound check (stages and end to
    end), `worst` names that check and `observed`, `bound`, `index` are its values there; `stages`
    stage → ratio; `end_to_end` the sound end-to-end ratio, `sharp_ratio` the sharp tier's (row
    error norm / tolerance), `relative_error` ‖out − ref‖/‖ref‖, `amplification` max bound /
    (u of the coarsest declared type · max |ref|)."""

    ratio: float
    observed: float
    bound: float
    index: tuple[int, ...]
    relative_error: float
    amplification: float
    precision: str
    stages: dict[str, float] = field(default_factory=dict)
    end_to_end: float = 0.0
    sharp_ratio: float = 0.0
    precision_class: str = ""
    worst: str = "end to end"
    property: str = "matches_reference"


@dataclass
class LayerRun:
    """What a layer returned over a case: out [b, length, D] float64 and the checkpoints it exposed
    in every call (float64, concatenated over the calls), and the module dtype of each."""

    out: torch.Tensor
    intermediates: dict[str, torch.Tensor]
    dtypes: dict[str, torch.dtype]


def _fail_shape(message: str, case: LayerCase, spec: str | None) -> LayerFailure:
    return LayerFailure(message, case, spec, kind="shape or dtype")


def record_layer(layer: MLALayer, case: LayerCase, x: torch.Tensor, spec: str | None = None) -> LayerRun:
    """Prefill then the case's decode steps, keeping each call's intermediates when the layer
    exposes them. A shape or dtype the contract does not allow raises LayerFailure."""
    dtype = case.torch_dtype
    config = case.config
    steps = (case.prefill, *case.decode)
    outputs, exposed = [], []
    start = 0
    for i, n in enumerate(steps):
        chunk = x[:, start:start + n].to(dtype)
        out = layer.prefill(chunk) if i == 0 else layer.decode(chunk)
        if tuple(out.shape) != (case.batch, n, config.hidden_size) or out.dtype != dtype:
            raise _fail_shape(f"wrong shape or dtype: expected {[case.batch, n, config.hidden_size]} {case.dtype}, "
                              f"got {list(out.shape)} {out.dtype}", case, spec)
        outputs.append(out.detach().to(F64).cpu())
        found = layer.intermediates() if callable(getattr(layer, "intermediates", None)) else {}
        checked = {}
        for key, tensor in found.items():
            if key not in INTERMEDIATES:
                continue
            expected = (case.batch, n, *intermediate_shape(key, config))
            if tuple(tensor.shape) != expected:
                raise _fail_shape(f"intermediate {key!r} after call {i} ({'prefill' if i == 0 else 'decode'} of {n} "
                                  f"tokens): expected shape {list(expected)} ({INTERMEDIATES[key]}), got "
                                  f"{list(tensor.shape)}", case, spec)
            checked[key] = tensor.detach()
        exposed.append(checked)
        start += n
    keys = [key for key in INTERMEDIATES if all(key in call for call in exposed)]
    intermediates = {key: torch.cat([call[key].to(F64).cpu() for call in exposed], dim=1) for key in keys}
    dtypes = {key: exposed[0][key].dtype for key in keys}
    return LayerRun(torch.cat(outputs, dim=1), intermediates, dtypes)


def run_layer(layer: MLALayer, case: LayerCase, x: torch.Tensor) -> torch.Tensor:
    """Prefill then the case's decode steps; the outputs concatenated, float64 [b, length, D]."""
    return record_layer(layer, case, x).out


@dataclass
class _Check:
    name: str  # the checkpoint
    stage: tuple[str, ...]
    ratio: float
    index: tuple[int, ...]
    observed: float
    bound: float
    impl: float
    reference: float
    finite: bool


def _compare(name: str, stage: tuple[str, ...], impl: torch.Tensor, reference: torch.Tensor,
             bound: torch.Tensor) -> _Check:
    error = (impl - reference).abs()
    ratio, index = worst_ratio(error, bound)
    at = (lambda t: float(t[index])) if index else (lambda t: 0.0)
    return _Check(name, stage, ratio, index, at(error), at(bound), at(impl), at(reference),
                  bool(torch.isfinite(bound).all()))


def _stage_name(stages: tuple[str, ...]) -> str:
    return " + ".join(stages)


def _kind(stages: tuple[str, ...]) -> str:
    """A merged stage fails with the kind of its last stage (where the difference is observed);
    all five merged is the whole layer."""
    return "end to end" if len(stages) == len(STAGES) else stages[-1]


def judge_layer(run: LayerRun, case: LayerCase, weights: MLAWeights, x: torch.Tensor,
                precision: InternalPrecision, spec: str | None = None, sharp: bool = True) -> LayerReport:
    """Judge a recorded run (stages, then end to end in both tiers); raises LayerFailure."""
    dtype = case.torch_dtype
    config = case.config
    checks: list[_Check] = []
    given = run.intermediates
    if given:
        names = tuple(name for name in CHECKPOINTS if name in given) + ("out",)
        bounds = stage_bounds(config, weights, x, precision, dtype, given, names)
        for name in names:
            impl = run.out if name == "out" else given[name]
            checks.append(_compare(name, stage_of(name, set(given)), impl, bounds[name].value, bounds[name].error))
    judged: LayerBound = layer_error_bound(config, weights, x, precision, dtype, sharp=sharp)
    reference = judged.reference
    end_to_end = _compare("out", STAGES, run.out, reference, judged.bound)
    resolved = precision.resolved(dtype)
    described = resolved.describe() if precision.stored is not None else precision.at_least(dtype).describe()
    relative = float((run.out - reference).norm() / reference.norm().clamp_min(1e-300))

    for check in [*checks, end_to_end]:
        if not check.finite:
            raise LayerFailure(f"the declared precision ({described}) gives no finite bound for the "
                               f"{_stage_name(check.stage) if check is not end_to_end else 'end-to-end'} check of this "
                               "case: its rounding is too coarse for the sums and norms involved, or a value "
                               f"overflows {case.dtype}", case, spec, kind="no finite bound",
                               stage=None if check is end_to_end else _stage_name(check.stage))
    failing = [check for check in checks if not check.ratio <= 1]
    if failing:
        first = failing[0]
        others = "".join(f"; also {_stage_name(c.stage)} ({c.name}) {c.ratio:.3g}" for c in failing[1:])
        raise LayerFailure(
            f"{_stage_name(first.stage)} check: |{first.name} - ref| / bound = {first.ratio:.3g} at "
            f"{first.name}{list(first.index)}: layer {first.impl:.17g}, ref {first.reference:.17g}, bound "
            f"{first.bound:.3g} (ref: the float64 stage fed the layer's own inputs; declared: {described}; "
            f"end to end |out - ref| / bound = {end_to_end.ratio:.3g}, relative error {relative:.3g}){others}",
            case, spec, kind=_kind(first.stage), stage=_stage_name(first.stage), ratio=first.ratio)
    if not end_to_end.ratio <= 1:
        raise LayerFailure(
            f"end to end: |out - ref| / bound = {end_to_end.ratio:.3g} at [b, s, D] = {list(end_to_end.index)}: out "
            f"{end_to_end.impl:.17g}, ref {end_to_end.reference:.17g}, bound {end_to_end.bound:.3g} (declared: "
            f"{described}; relative error {relative:.3g})", case, spec, kind="end to end", ratio=end_to_end.ratio)
    sharp_ratio = 0.0
    if sharp and judged.sharp is not None:
        row_error = (run.out - reference).norm(dim=-1)
        sharp_ratio, at = worst_ratio(row_error, judged.sharp)
        if not sharp_ratio <= 1:
            raise LayerFailure(
                f"end to end (sharp tier): ‖out - ref‖ / tolerance = {sharp_ratio:.3g} on row [b, s] = {list(at)}: "
                f"error norm {float(row_error[at]):.3g}, tolerance {float(judged.sharp[at]):.3g} (a probabilistic "
                f"bound no correct layer we know of exceeds; declared: {described}; sound ratio "
                f"{end_to_end.ratio:.3g}; relative error {relative:.3g})", case, spec, kind="end to end",
                ratio=sharp_ratio, tier="sharp")
    stages: dict[str, float] = {}
    for check in checks:
        name = _stage_name(check.stage)
        stages[name] = max(stages.get(name, 0.0), check.ratio)
    worst = max([*checks, end_to_end], key=lambda c: c.ratio)
    coarsest = precision.at_least(dtype).coarsest if precision.stored is None else resolved.coarsest
    return LayerReport(
        ratio=worst.ratio, observed=worst.observed, bound=worst.bound, index=worst.index, relative_error=relative,
        amplification=float(judged.bound.max()) / (unit_roundoff(coarsest) * max(float(reference.abs().max()),
                                                                                   1e-300)),
        precision=described, stages=stages, end_to_end=end_to_end.ratio, sharp_ratio=sharp_ratio,
        precision_class=precision.precision_class(dtype),
        worst="end to end" if worst is end_to_end else _stage_name(worst.stage))


def build_layer(factory: str | LayerFactory, case: LayerCase, device: str = "cpu"):
    """(layer, float64 weights, x) for the case; an exception of the factory raises LayerFailure
    (kind 'exception'); a missing library (MissingDependency) and a refusal (Declined,
    NotImplementedError) propagate as they are."""
    spec = factory if isinstance(factory, str) else None
    weights, x = case.build()
    build = resolve_factory(factory)
    try:
        layer = build(case.config, weights, case.torch_dtype, device)
    except (MissingDependency, LayerFailure, Declined, NotImplementedError):
        raise
    except Exception as error:  # noqa: BLE001 - the layer's own failure, reported as such
        raise LayerFailure(f"the factory raised {type(error).__name__}: {error}", case, spec,
                           kind="exception") from error
    return layer, weights, x


def run_case(layer: MLALayer, case: LayerCase, x: torch.Tensor, spec: str | None) -> LayerRun:
    try:
        return record_layer(layer, case, x, spec)
    except (MissingDependency, LayerFailure, Declined, NotImplementedError):  # a refusal is not a failure
        raise
    except Exception as error:  # noqa: BLE001
        raise LayerFailure(f"the layer raised {type(error).__name__}: {error}", case, spec,
                           kind="exception") from error


def check_layer(factory: str | LayerFactory, case: LayerCase, declared: InternalPrecision | None = None,
                device: str = "cpu", sharp: bool = True) -> LayerReport:
    """Build the layer, run prefill + decode steps, and judge it against the float64 reference
    within the bounds of its declared precision (or `declared`, to test a claim): every exposed
    stage, then end to end in the sound tier and (unless sharp=False) the sharp tier. Raises
    LayerFailure on a violation."""
    spec = factory if isinstance(factory, str) else None
    layer, weights, x = build_layer(factory, case, device)
    precision = declared or layer.precision
    run = run_case(layer, case, x, spec)
    return judge_layer(run, case, weights, x, precision, spec, sharp)


def replay(spec: str, case: LayerCase) -> LayerReport:
    """Rerun one layer case (the command a LayerFailure prints) and print the result."""
    report = check_layer(spec, case)
    stages = ", ".join(f"{name} {ratio:.3g}" for name, ratio in report.stages.items())
    print(f"passes: error/bound {report.ratio:.3g} ({report.worst}); end to end {report.end_to_end:.3g}, sharp "
          f"{report.sharp_ratio:.3g}{'; stages: ' + stages if stages else ''}; relative error "
          f"{report.relative_error:.3g}; {report.precision_class}")
    return report



