"""Layer-level certification: HF transformers' DeepseekV3/V2 attention, run as prefill then
incremental decode with its own DynamicCache, stays within the bound its declared internal precision
allows (mla_verify.layer_contract) of the float64 reference, over drawn MLA configs (q-LoRA on and
off, both RoPE layouts, YaRN on and off, any widths) and every HF variant (eager, sdpa, sdpa with
float64 RMSNorm and cos/sin).

Skipped when transformers is not importable; CI installs it. A failure prints observed vs bound,
the case and the command that replays it.
"""

import pytest
from hypothesis import assume, given, target
from hypothesis import strategies as st

from mla_verify.adapters import LAYER_ADAPTERS
from mla_verify.layer_contract import LayerCase, check_layer, unsupported_reason
from mla_verify.strategies import mla_configs

pytest.importorskip("transformers", minversion="5")

SPECS = [adapter.target for adapter in LAYER_ADAPTERS.values()]


@st.composite
def layer_cases(draw: st.DrawFn) -> LayerCase:
    """A drawn config with a short prefill and three decode calls of one or two tokens each."""
    return LayerCase(config=draw(mla_configs(), label="config"), batch=draw(st.integers(1, 2), label="batch"),
                     prefill=draw(st.integers(1, 5), label="prefill"),
                     decode=tuple(draw(st.lists(st.integers(1, 2), min_size=3, max_size=3), label="decode")),
                     seed=draw(st.integers(0, 2**31 - 1), label="seed"))


@given(spec=st.sampled_from(SPECS), case=layer_cases())
def test_hf_layer_within_declared_precision(spec, case):
    reason = unsupported_reason(spec, case.config)
    assume(reason is None)
    report = check_layer(spec, case)
    target(report.ratio, label="error/bound")
