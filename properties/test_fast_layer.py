"""The layer-level fast path (SDPA prefill, absorbed paged decode) stays within the bound of its
declared uniform precision of the float64 reference layer, over drawn configs, prefill lengths that
cross pages, and decode steps of one to three tokens."""

from hypothesis import given
from hypothesis import strategies as st

from mla_verify.layer_contract import LayerCase, check_layer
from mla_verify.registry import OWN_LAYERS
from mla_verify.strategies import mla_configs

FACTORY = OWN_LAYERS["fast-layer-torch"]


@st.composite
def fast_layer_cases(draw: st.DrawFn) -> LayerCase:
    return LayerCase(config=draw(mla_configs(), label="config"), batch=draw(st.integers(1, 2), label="batch"),
                     prefill=draw(st.integers(1, 20), label="prefill"),
                     decode=tuple(draw(st.lists(st.integers(1, 3), min_size=3, max_size=3), label="decode")),
                     seed=draw(st.integers(0, 2**31 - 1), label="seed"),
                     dtype=draw(st.sampled_from(["float64", "float32"]), label="dtype"))


@given(case=fast_layer_cases())
def test_fast_layer_within_its_declared_precision(case):
    check_layer(FACTORY, case)
