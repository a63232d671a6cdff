"""The layer half: a whole MLA attention layer (prefill and decode with its own cache) judged
against the float64 reference layer, stage by stage and end to end.

    contract     the factory and layer protocol, `InternalPrecision`, `LayerCapabilities`, the
                 intermediates a layer may expose and `capture_submodules` to expose them
    case         `LayerCase`: the JSON description of one run
    strategies   Hypothesis strategies that draw layer cases
    bounds       the stage and end-to-end bounds, sound and sharp
    checks       running a layer, judging it, `LayerFailure` and its kinds, `check_layer`, `replay`
    properties   the layer properties a certificate runs (`LAYER_PROPERTIES`)
"""

from mla_verify.layer.bounds import (CHECKPOINTS, STAGES, Bounded, LayerBound, layer_error_bound, stage_bounds,
                                     stage_of)
from mla_verify.layer.case import LAYER_DTYPES, LayerCase
from mla_verify.layer.checks import (LAYER_FAILURE_KINDS, LayerFailure, LayerReport, LayerRun, build_layer,
                                     check_layer, judge_layer, record_layer, replay, run_layer)
from mla_verify.layer.contract import (INTERMEDIATES, InternalPrecision, LayerCapabilities, LayerFactory, MLALayer,
                                       SubmoduleCapture, capture_submodules, layer_capabilities_of, resolve_factory,
                                       unsupported_reason)
from mla_verify.layer.properties import LAYER_PROPERTIES, absorbed_matches_naive, matches_reference
from mla_verify.layer.strategies import layer_cases, shrink_preset, shrunk_presets
from mla_verify.rounding import unit_roundoff

__all__ = [
    # contract
    "InternalPrecision", "MLALayer", "LayerFactory", "LayerCapabilities", "layer_capabilities_of", "INTERMEDIATES",
    "capture_submodules", "SubmoduleCapture", "resolve_factory", "unsupported_reason",
    # case and strategies
    "LayerCase", "LAYER_DTYPES", "layer_cases", "shrink_preset", "shrunk_presets",
    # bounds
    "unit_roundoff", "Bounded", "LayerBound", "layer_error_bound", "stage_bounds", "stage_of", "STAGES",
    "CHECKPOINTS",
    # checks
    "LAYER_FAILURE_KINDS", "LayerFailure", "LayerReport", "LayerRun", "run_layer", "record_layer", "build_layer",
    "judge_layer", "check_layer", "replay",
    # properties
    "LAYER_PROPERTIES", "matches_reference", "absorbed_matches_naive",
]
