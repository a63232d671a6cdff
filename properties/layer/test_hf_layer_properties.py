"""Layer-level certification: HF transformers' DeepseekV3/V2 attention, run as prefill then
incremental decode with its own DynamicCache, stays within the bounds its declared internal precision
allows (mla_verify.layer) of the float64 reference, stage by stage and end to end, over drawn layer
cases (configs drawn and presets shrunk: q-LoRA on and off, both RoPE layouts, YaRN on and off; page
edges; weight and activation scales) in float64 and bf16, and every HF variant (eager, sdpa, sdpa
with float64 RMSNorm and cos/sin).

Skipped when transformers is not importable; CI installs it. A failure prints observed vs bound,
the stage, the case and the command that replays it.
"""

import pytest
from hypothesis import assume, given, target
from hypothesis import strategies as st

from mla_verify.adapters import LAYER_ADAPTERS
from mla_verify.layer import check_layer, layer_cases, unsupported_reason

pytest.importorskip("transformers", minversion="5")

SPECS = [adapter.target for adapter in LAYER_ADAPTERS.values()]


@given(spec=st.sampled_from(SPECS), case=layer_cases(dtypes=("float64", "bfloat16"), max_length=12,
                                                      max_decode_steps=3, max_decode_tokens=2))
def test_hf_layer_within_declared_precision(spec, case):
    assume(unsupported_reason(spec, case.config) is None)
    report = check_layer(spec, case)
    target(report.end_to_end, label="end-to-end error/bound")
