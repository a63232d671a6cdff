"""The layer properties a certificate runs, like decode's DECODE_PROPERTIES: each a callable
(factory, case, device) -> LayerReport that raises LayerFailure.

- matches_reference: every stage the layer exposes within its stage bound, and the output within
  the end-to-end bounds of the float64 layer (sound and sharp tiers): `check_layer`.
- absorbed_matches_naive: the output of decoding token t (the absorbed path of a layer with both
  paths) agrees with the output at t of one prefill over the whole sequence (the naive path). Run A
  is the case (prefill, then decode calls), run B one prefill of every token; both are compared on
  the decoded tokens. Each run is within its bounds of the same float64 quantities, so for every
  checkpoint Y both runs expose, with ref_Y(A) the float64 stage of Y fed run A's own inputs and
  E_Y(A) its stage bound,
      |Y_A − Y_B| ≤ E_Y(A) + |ref_Y(A) − ref_Y(B)| + E_Y(B)
  (the middle term is computed exactly: both references are known), which is where the two paths
  differ — the attention stage, naive in B and absorbed in A — judged at the stage bound rather
  than the end-to-end one; and end to end, |out_A − out_B| ≤ 2·bound (sound, element by element)
  and ‖out_A − out_B‖ ≤ 2·tolerance (sharp, row by row). The equivalence the mission names,
  checked in the precision the layer is served in.
"""

from __future__ import annotations

from typing import Callable

import torch

from mla_verify.layer.bounds import CHECKPOINTS, layer_error_bound, stage_bounds, stage_of
from mla_verify.layer.case import LayerCase
from mla_verify.layer.checks import LayerFailure, LayerReport, build_layer, check_layer, run_case
from mla_verify.layer.contract import LayerFactory
from mla_verify.rounding import unit_roundoff, worst_ratio

__all__ = ["LAYER_PROPERTIES", "matches_reference", "absorbed_matches_naive"]

F64 = torch.float64


def matches_reference(factory: str | LayerFactory, case: LayerCase, device: str = "cpu") -> LayerReport:
    """Stages and end to end against the float64 reference (see check_layer)."""
    return check_layer(factory, case, device=device)


def absorbed_matches_naive(factory: str | LayerFactory, case: LayerCase, device: str = "cpu") -> LayerReport:
    """Decode of tokens prefill … length−1 (after the case's prefill) against one prefill of the
    whole sequence, stage by stage where both runs expose checkpoints and end to end (module
    docstring). Raises LayerFailure of kind 'absorbed vs naive'."""
    spec = factory if isinstance(factory, str) else None
    decoding, weights, x = build_layer(factory, case, device)
    precision = decoding.precision
    dtype = case.torch_dtype
    decoded = run_case(decoding, case, x, spec)
    prefilling, _, _ = build_layer(factory, case, device)
    prefilled = run_case(prefilling, _whole_sequence(case), x, spec)
    tokens = slice(case.prefill, case.length)
    described = precision.describe()

    def fail(what: str, ratio: float, detail: str, stage: str | None = None, tier: str = "sound") -> LayerFailure:
        where = (f" ({stage})" if stage else "") + (" (sharp tier)" if tier == "sharp" else "")
        return LayerFailure(f"absorbed vs naive{where}: {what} = {ratio:.3g}{detail} (A: prefill {case.prefill} then "
                            f"decode {list(case.decode)}; B: one prefill of {case.length}; declared: {described})",
                            case, spec,
                            kind="absorbed vs naive", stage=stage, ratio=ratio, tier=tier)

    stages: dict[str, float] = {}
    # the worst stage check: (ratio, observed, allowed, index in the whole sequence)
    worst_stage = (0.0, 0.0, 0.0, ())
    common = [name for name in decoded.intermediates if name in prefilled.intermediates]
    if common:
        names = tuple(name for name in CHECKPOINTS if name in common) + ("out",)
        given_a = {name: decoded.intermediates[name] for name in common}
        given_b = {name: prefilled.intermediates[name] for name in common}
        bounds_a = stage_bounds(case.config, weights, x, precision, dtype, given_a, names)
        bounds_b = stage_bounds(case.config, weights, x, precision, dtype, given_b, names)
        for name in names:
            value_a = decoded.out if name == "out" else given_a[name]
            value_b = prefilled.out if name == "out" else given_b[name]
            a, b = bounds_a[name], bounds_b[name]
            allowed = (a.error + b.error + (a.value - b.value).abs())[:, tokens]
            ratio, index = worst_ratio((value_a - value_b).abs()[:, tokens], allowed)
            stage = " + ".join(stage_of(name, set(common)))
            stages[stage] = max(stages.get(stage, 0.0), ratio)
            at = (index[0], index[1] + case.prefill, *index[2:]) if index else ()
            if index and ratio > worst_stage[0]:
                worst_stage = (ratio, float((value_a - value_b).abs()[at]), float(allowed[index]), at)
            if not ratio <= 1:
                raise fail(f"|{name}_A - {name}_B| / (E_A + |ref_A - ref_B| + E_B)", ratio,
                           f" at {name}{list(at)}: A {float(value_a[at]):.17g}, B {float(value_b[at]):.17g}, allowed "
                           f"{float(allowed[index]):.3g}", stage)

    judged = layer_error_bound(case.config, weights, x, precision, dtype)
    difference = (decoded.out - prefilled.out)[:, tokens]
    bound = 2 * judged.bound[:, tokens]
    if not bool(torch.isfinite(bound).all()):
        raise LayerFailure(f"the declared precision ({described}) gives no finite bound for this case", case, spec,
                           kind="no finite bound")
    end_to_end, index = worst_ratio(difference.abs(), bound)
    relative = float(difference.norm() / prefilled.out[:, tokens].norm().clamp_min(1e-300))
    if not end_to_end <= 1:
        at = (index[0], index[1] + case.prefill, *index[2:])
        raise fail("|out_A - out_B| / (bound_A + bound_B)", end_to_end,
                   f" at [b, s, D] = {list(at)}: A {float(decoded.out[at]):.17g}, B {float(prefilled.out[at]):.17g}, "
                   f"bound {float(bound[index]):.3g}, relative difference {relative:.3g}")
    sharp_ratio = 0.0
    if judged.sharp is not None:
        sharp_ratio, row = worst_ratio(difference.norm(dim=-1), 2 * judged.sharp[:, tokens])
        if not sharp_ratio <= 1:
            raise fail("‖out_A - out_B‖ / (tolerance_A + tolerance_B)", sharp_ratio,
                       f" on row [b, s] = {[row[0], row[1] + case.prefill]}, relative difference {relative:.3g}",
                       tier="sharp")
    ratio = max([end_to_end, *stages.values()])
    if stages and worst_stage[0] >= end_to_end:
        worst = max(stages, key=stages.get)
        _, observed, allowed_at, where = worst_stage
    else:
        worst = "end to end"
        where = (index[0], index[1] + case.prefill, *index[2:]) if index else ()
        observed = float(difference.abs()[index]) if index else 0.0
        allowed_at = float(bound[index]) if index else 0.0
    coarsest = precision.resolved(dtype).coarsest
    scale = max(float(judged.reference.abs().max()), 1e-300)
    return LayerReport(ratio=ratio, observed=observed, bound=allowed_at, index=where, relative_error=relative,
                       amplification=float(bound.max()) / (unit_roundoff(coarsest) * scale), precision=described,
                       stages=stages, end_to_end=end_to_end, sharp_ratio=sharp_ratio,
                       precision_class=precision.precision_class(dtype), worst=worst,
                       property="absorbed_matches_naive")


def _whole_sequence(case: LayerCase) -> LayerCase:
    """The same tokens in one prefill call."""
    return case.replace(prefill=case.length, decode=())


LAYER_PROPERTIES: dict[str, Callable[[str | LayerFactory, LayerCase, str], LayerReport]] = {
    "matches_reference": matches_reference,
    "absorbed_matches_naive": absorbed_matches_naive,
}
