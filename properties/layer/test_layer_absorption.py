"""Absorbed ≡ non-absorbed in the layer's own precision: decoding token t (the absorbed path) gives
the output that one prefill of the whole sequence (the naive path) gives at t, within the bounds the
declared precision derives — stage by stage where the layer exposes its intermediates, end to end in
both tiers (mla_verify.layer.properties.absorbed_matches_naive). The fast layer in every dtype; HF's
eager attention in bf16 (its decode is the naive path over its cache: the same property then says
incremental decode ≡ one prefill)."""

import pytest
from hypothesis import assume, given, target

from mla_verify.impls.fast_layer import fast_layer_torch_decode
from mla_verify.layer import absorbed_matches_naive, layer_cases, unsupported_reason


@given(case=layer_cases())
def test_fast_layer_decode_matches_its_prefill(case):
    report = absorbed_matches_naive(fast_layer_torch_decode, case)
    target(report.ratio, label="absorbed vs naive error/bound")


@given(case=layer_cases(dtypes=("bfloat16",), max_length=12, max_decode_steps=3, max_decode_tokens=2))
def test_hf_eager_decode_matches_its_prefill_in_bf16(case):
    pytest.importorskip("transformers", minversion="5")
    spec = "mla_verify.adapters.hf:deepseek_v3_eager"
    assume(unsupported_reason(spec, case.config) is None)
    absorbed_matches_naive(spec, case)
