"""Cache-size formulas equal the bytes the reference really allocates, per layer and per model,
for drawn configs and element types, for MHA, GQA, MQA, MLA (latent, expanded, paged), FP8 (the
decode contract's packed fp8_ds_mla and per-tensor layouts, as the suite's cases build them) and
DeepSeek-V3.2's indexer key cache."""

import torch
from hypothesis import given, strategies as st

from mla_verify.cache_sizes import (INDEXER_PRESETS, IndexerConfig, allocate_fp8_latent_cache,
                                    allocate_indexer_key_cache, allocate_packed_fp8_cache, bytes_per_token_layer,
                                    bytes_per_token_model, fp8_mla_bytes_per_token_layer,
                                    fp8_per_tensor_bytes_per_token_layer, indexer_bytes_per_token_layer,
                                    mla_expanded_elements_per_token_layer)
from mla_verify.decode.case import DecodeCase
from mla_verify.decode.fp8 import quantize
from mla_verify.decode.inputs import build_inputs
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


@given(config=mla_configs(max_width=300), blocks=st.integers(1, 4), page=st.sampled_from([1, 16, 64]))
def test_packed_fp8_cache_formula_matches_allocated_and_quantised_bytes(config, blocks, page):
    """The packed fp8_ds_mla tensor, and what the reference quantiser writes for that many tokens,
    hold exactly the formula's bytes."""
    packed = allocate_packed_fp8_cache(config, blocks, page)
    assert packed.nbytes == blocks * page * fp8_mla_bytes_per_token_layer(config)
    if config.kv_lora_rank % 4 or config.qk_rope_head_dim % 2:
        return  # the packed layout's float32 scales need 4-byte alignment: such widths are not quantised
    rows = torch.randn(blocks * page, config.latent_width, generator=torch.Generator().manual_seed(page),
                       dtype=torch.float64)
    assert quantize(rows, config.kv_lora_rank, "fp8_ds_mla").nbytes == blocks * page * fp8_mla_bytes_per_token_layer(config)
    assert quantize(rows, config.kv_lora_rank, "fp8_e4m3", torch.ones(1)).nbytes == (
        blocks * page * fp8_per_tensor_bytes_per_token_layer(config))


@given(kv_format=st.sampled_from(["fp8_ds_mla", "fp8_e4m3"]), lengths=st.lists(st.integers(0, 40), min_size=1,
                                                                                max_size=3),
       page=st.sampled_from([1, 4, 16]), widths=st.sampled_from([(40, 32), (80, 64), (288, 256), (576, 512)]))
def test_the_cache_a_case_hands_the_kernel_is_the_one_measured(kv_format, lengths, page, widths):
    """An FP8 case's cache (what the certifier passes to a kernel) is num_blocks·page tokens of the
    formula's bytes each."""
    d, head_dim_v = widths
    config = mla_configs_width(d, head_dim_v)
    case = DecodeCase(dtype="bfloat16", batch=len(lengths), s_q=1, heads=1, d=d, head_dim_v=head_dim_v,
                      page_size=page, lengths=tuple(lengths), causal=False, regime="unit", scale="one",
                      permute_pages=False, strided_cache=False, extra_blocks=1, seed=0, layout_seed=0,
                      kv_format=kv_format)
    cache = build_inputs(case).kv_cache
    per_token = (fp8_mla_bytes_per_token_layer(config) if kv_format == "fp8_ds_mla"
                 else fp8_per_tensor_bytes_per_token_layer(config))
    assert cache.nbytes == cache.shape[0] * page * per_token


def mla_configs_width(d: int, head_dim_v: int):
    """A config whose latent row is [head_dim_v | d − head_dim_v] (only the widths matter here)."""
    from mla_verify.config import mla_preset

    return mla_preset("DeepSeek-V3").replace(kv_lora_rank=head_dim_v, qk_rope_head_dim=d - head_dim_v)


@given(head_dim=st.integers(1, 300), group=st.sampled_from([32, 64, 128]), batch=st.integers(1, 3),
       tokens=st.integers(1, 9))
def test_indexer_key_cache_formula_matches_allocated_bytes(head_dim, group, batch, tokens):
    indexer = IndexerConfig("drawn", head_dim=head_dim, scale_group=group, num_layers=1)
    buffers = allocate_indexer_key_cache(indexer, batch, tokens)
    assert sum(t.nbytes for t in buffers.values()) == batch * tokens * indexer_bytes_per_token_layer(indexer)
    v32 = INDEXER_PRESETS["DeepSeek-V3.2"]
    assert sum(t.nbytes for t in allocate_indexer_key_cache(v32, batch, tokens).values()) == batch * tokens * 132
