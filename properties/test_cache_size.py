"""Cache-size formulas equal the bytes the reference really allocates, per layer and per model,
for drawn configs and element types, for MHA, GQA, MQA, MLA (latent, expanded, paged) and FP8."""

import torch
from hypothesis import given, strategies as st

from mla_verify.cache_sizes import (allocate_fp8_latent_cache, bytes_per_token_layer, bytes_per_token_model,
                                    fp8_mla_bytes_per_token_layer, mla_expanded_elements_per_token_layer)
from mla_verify.config import GQAConfig
from mla_verify.reference import (ExpandedCache, GQACache, LatentCache, allocate_paged_latent_cache, mla_forward,
                                  random_weights)
from mla_verify.strategies import mla_configs

DTYPES = st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn])


@given(config=mla_configs(), dtype=DTYPES, batch=st.integers(1, 3), tokens=st.integers(1, 9),
       layers=st.integers(1, 4))
def test_mla_formulas_match_allocated_bytes(config, dtype, batch, tokens, layers):
    config = config.replace(num_layers=layers)
    per_layer = [LatentCache.allocate(config, batch, tokens, dtype) for _ in range(config.num_layers)]
    assert per_layer[0].nbytes == batch * tokens * bytes_per_token_layer(config, dtype)
    assert sum(c.nbytes for c in per_layer) == batch * tokens * bytes_per_token_model(config, dtype)
    expanded = ExpandedCache.allocate(config, batch, tokens, dtype)
    assert expanded.nbytes == batch * tokens * mla_expanded_elements_per_token_layer(config) * dtype.itemsize
    paged = allocate_paged_latent_cache(config, num_blocks=batch * tokens, page_size=3, dtype=dtype)
    assert paged.nbytes == batch * tokens * 3 * bytes_per_token_layer(config, dtype)


@given(config=mla_configs(), tokens=st.integers(1, 5))
def test_the_cache_the_forward_pass_fills_is_the_one_measured(config, tokens):
    """The formula counts what the reference actually writes: every latent slot it allocates is
    filled by a prefill of that length."""
    g = torch.Generator().manual_seed(tokens)
    cache = LatentCache.allocate(config, 1, tokens)
    cache.kv.fill_(float("nan"))
    cache.pe.fill_(float("nan"))
    mla_forward(config, random_weights(config, g), torch.randn(1, tokens, config.hidden_size, generator=g,
                                                               dtype=torch.float64), 0, cache)
    assert not cache.kv.isnan().any() and not cache.pe.isnan().any()
    assert cache.nbytes == tokens * bytes_per_token_layer(config, torch.float64)


@given(layers=st.integers(1, 130), heads=st.integers(1, 16), group=st.integers(1, 16), head_dim=st.integers(1, 256),
       dtype=DTYPES, tokens=st.integers(1, 4), kind=st.sampled_from(["mha", "gqa", "mqa"]))
def test_gqa_family_formulas_match_allocated_bytes(layers, heads, group, head_dim, dtype, tokens, kind):
    kv_heads = {"mha": heads * group, "gqa": heads, "mqa": 1}[kind]
    config = GQAConfig("drawn", layers, heads * group, kv_heads, head_dim)
    cache = GQACache.allocate(config, 1, tokens, dtype)
    assert cache.nbytes == tokens * bytes_per_token_layer(config, dtype) == tokens * 2 * kv_heads * head_dim * dtype.itemsize
    assert bytes_per_token_model(config, dtype) == layers * bytes_per_token_layer(config, dtype)


@given(config=mla_configs(max_width=300), blocks=st.integers(1, 4), page=st.sampled_from([1, 16, 64]))
def test_fp8_layout_formula_matches_allocated_bytes(config, blocks, page):
    parts = allocate_fp8_latent_cache(config, blocks, page)
    assert sum(t.nbytes for t in parts.values()) == blocks * page * fp8_mla_bytes_per_token_layer(config)
