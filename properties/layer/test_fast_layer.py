"""The layer-level fast path (SDPA prefill, absorbed paged decode) stays within the bounds of its
declared precision of the float64 reference layer, stage by stage (it exposes every intermediate)
and end to end in both tiers, over drawn layer cases: configs drawn and presets shrunk, prefill
lengths at page edges (16-token pages), decode steps of one to three tokens, every dtype, weight and
activation scales."""

from hypothesis import given, target

from mla_verify.impls.fast_layer import fast_layer_torch_decode
from mla_verify.layer import STAGES, check_layer, layer_cases


@given(case=layer_cases())
def test_fast_layer_within_its_declared_precision(case):
    report = check_layer(fast_layer_torch_decode, case)
    assert set(report.stages) == set(STAGES)
    target(report.end_to_end, label="end-to-end error/bound")
