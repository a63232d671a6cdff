"""Configs: hand-derived softmax scales, presets and aliases, and clear errors for invalid fields."""

import math

import pytest

from mla_verify.config import GQAConfig, MLAConfig, YarnConfig, gqa_preset, mla_preset


@pytest.mark.parametrize("name, scale", [
    ("DeepSeek-V3", 0.135234), ("DeepSeek-R1", 0.135234), ("DeepSeek-V3.2", 0.135234),
    ("DeepSeek-V2-Lite", 0.114721), ("Kimi-K2", 0.130861), ("Moonlight", 0.0721688),
])
def test_softmax_scale_matches_hand_derived_value(name, scale):
    assert mla_preset(name).softmax_scale == pytest.approx(scale, abs=5e-7)


def test_v3_scale_from_the_formula():
    # 192^-1/2 · (1 + 0.1·ln 40)²
    assert mla_preset("DeepSeek-V3").softmax_scale == pytest.approx(192 ** -0.5 * (1 + 0.1 * math.log(40)) ** 2,
                                                                    rel=1e-15)


def test_aliases_keep_the_v3_shape_under_their_own_name():
    r1 = mla_preset("DeepSeek-R1")
    assert r1.name == "DeepSeek-R1" and r1.replace(name="DeepSeek-V3") == mla_preset("DeepSeek-V3")


def test_preset_shapes_match_the_published_configs():
    v3 = mla_preset("DeepSeek-V3")
    assert (v3.num_heads, v3.q_lora_rank, v3.kv_lora_rank, v3.latent_width, v3.num_layers) == (128, 1536, 512, 576, 61)
    assert mla_preset("DeepSeek-V2-Lite").q_lora_rank is None
    glm = mla_preset("GLM-4.7-Flash")
    assert (glm.qk_nope_head_dim, glm.qk_rope_head_dim, glm.v_head_dim) == (192, 64, 256)
    assert gqa_preset("Llama-3.1-405B").num_layers == 126


@pytest.mark.parametrize("field, value, words", [
    ("qk_rope_head_dim", 63, "qk_rope_head_dim must be even"),
    ("kv_lora_rank", 0, "kv_lora_rank must be a positive int"),
    ("num_heads", -4, "num_heads must be a positive int"),
    ("q_lora_rank", 0, "q_lora_rank must be a positive int"),
    ("rope_layout", "neox", "rope_layout must be"),
    ("hidden_size", 7.5, "hidden_size must be a positive int"),
    ("rope_theta", 0.0, "rope_theta must be positive"),
])
def test_invalid_config_names_the_field_and_rule(field, value, words):
    with pytest.raises(ValueError, match=words):
        mla_preset("DeepSeek-V3").replace(**{field: value})


def test_invalid_yarn_and_gqa_configs_raise_named_errors():
    with pytest.raises(ValueError, match="yarn.factor"):
        YarnConfig(factor=0.5, original_max_position_embeddings=4096)
    with pytest.raises(ValueError, match="num_heads must be a multiple of num_kv_heads"):
        GQAConfig("bad", num_layers=2, num_heads=10, num_kv_heads=4, head_dim=64)
    with pytest.raises(ValueError, match="name must be one of"):
        mla_preset("DeepSeek-V4")


def test_a_config_can_be_built_from_scratch():
    config = MLAConfig("mine", hidden_size=64, num_heads=4, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16,
                       qk_rope_head_dim=8, v_head_dim=16)
    assert config.softmax_scale == 24 ** -0.5
