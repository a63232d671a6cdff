"""The layer properties a certificate runs, like decode's DECODE_PROPERTIES: each a callable
(factory, case, device) -> LayerReport that raises LayerFailure.

- matches_reference: every stage the layer exposes within its stage bound, and the output within
  the end-to-end bounds of the float64 layer (sound and sharp tiers): `check_layer`.
- absorbed_matches_naive: the output of decoding token t (the absorbed path of a layer with both
  paths) agrees with the output at t of one prefill over the whole sequence (the naive path), within
  the sum of the two paths' end-to-end bounds: each path is within its bound of the same float64
  layer, so |decode − prefill| ≤ bound_decode + bound_prefill element by element (sound), and the
  row norms within the sum of the two sharp tolerances (sharp). The equivalence the mission names,
  checked in the precision the layer is served in.
"""

from __future__ import annotations

from typing import Callable

import torch

from mla_verify.layer.bounds import layer_error_bound
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
    whole sequence, within the sum of both paths' bounds (module docstring)."""
    spec = factory if isinstance(factory, str) else None
    decoding, weights, x = build_layer(factory, case, device)
    precision = decoding.precision
    decoded = run_case(decoding, case, x, spec).out
    prefilling, _, _ = build_layer(factory, case, device)
    one_call = _whole_sequence(case)
    prefilled = run_case(prefilling, one_call, x, spec).out
    judged = layer_error_bound(case.config, weights, x, precision, case.torch_dtype)
    tokens = slice(case.prefill, case.length)
    difference = (decoded - prefilled)[:, tokens]
    bound = 2 * judged.bound[:, tokens]
    if not bool(torch.isfinite(bound).all()):
        raise LayerFailure(f"the declared precision ({precision.describe()}) gives no finite bound for this case",
                           case, spec, kind="no finite bound")
    ratio, index = worst_ratio(difference.abs(), bound)
    relative = float(difference.norm() / prefilled[:, tokens].norm().clamp_min(1e-300))
    if not ratio <= 1:
        at = tuple(index[:1]) + (index[1] + case.prefill,) + tuple(index[2:])
        raise LayerFailure(
            f"absorbed vs naive: |decode - prefill| / (bound_decode + bound_prefill) = {ratio:.3g} at [b, s, D] = "
            f"{list(at)}: decode {float(decoded[at]):.17g}, prefill {float(prefilled[at]):.17g}, bound "
            f"{float(bound[index]):.3g} (declared: {precision.describe()}; relative difference {relative:.3g})",
            case, spec, kind="absorbed vs naive", ratio=ratio)
    sharp_ratio = 0.0
    if judged.sharp is not None:
        sharp_ratio, row = worst_ratio(difference.norm(dim=-1), 2 * judged.sharp[:, tokens])
        if not sharp_ratio <= 1:
            raise LayerFailure(
                f"absorbed vs naive (sharp tier): ‖decode - prefill‖ / (tolerance_decode + tolerance_prefill) = "
                f"{sharp_ratio:.3g} on row [b, s] = {[row[0], row[1] + case.prefill]} (declared: "
                f"{precision.describe()}; relative difference {relative:.3g})", case, spec, kind="absorbed vs naive",
                ratio=sharp_ratio, tier="sharp")
    coarsest = precision.resolved(case.torch_dtype).coarsest
    scale = max(float(judged.reference.abs().max()), 1e-300)
    return LayerReport(ratio=ratio, observed=float(difference.abs()[index]) if index else 0.0,
                       bound=float(bound[index]) if index else 0.0, index=index, relative_error=relative,
                       amplification=float(bound.max()) / (unit_roundoff(coarsest) * scale),
                       precision=precision.describe(), end_to_end=ratio, sharp_ratio=sharp_ratio,
                       precision_class=precision.precision_class(case.torch_dtype), worst="absorbed vs naive",
                       property="absorbed_matches_naive")


def _whole_sequence(case: LayerCase) -> LayerCase:
    """The same tokens in one prefill call."""
    return case.replace(prefill=case.length, decode=())


LAYER_PROPERTIES: dict[str, Callable[[str | LayerFactory, LayerCase, str], LayerReport]] = {
    "matches_reference": matches_reference,
    "absorbed_matches_naive": absorbed_matches_naive,
}
