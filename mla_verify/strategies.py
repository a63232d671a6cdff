"""Hypothesis strategies of MLA layer configs, shared by the reference, RoPE, cache-size and layer
properties."""

from __future__ import annotations

from hypothesis import strategies as st

from mla_verify.config import MLAConfig, YarnConfig

__all__ = ["mla_configs"]


@st.composite
def mla_configs(draw: st.DrawFn, max_heads: int = 4, max_width: int = 16) -> MLAConfig:
    """Small MLA layer configs beyond the presets: q-LoRA on and off, both RoPE layouts, YaRN on
    and off, every width independent."""
    width = st.integers(1, max_width)
    yarn = draw(st.one_of(st.none(), st.builds(
        YarnConfig, factor=st.sampled_from([4.0, 40.0, 1.5]), original_max_position_embeddings=st.sampled_from([16, 64]),
        mscale=st.sampled_from([1.0, 0.707]), mscale_all_dim=st.sampled_from([1.0, 0.707, 0.0]))), label="yarn")
    return MLAConfig(
        name="drawn",
        hidden_size=draw(st.integers(2, 24), label="hidden_size"),
        num_heads=draw(st.integers(1, max_heads), label="num_heads"),
        q_lora_rank=draw(st.one_of(st.none(), width), label="q_lora_rank"),
        kv_lora_rank=draw(width, label="kv_lora_rank"),
        qk_nope_head_dim=draw(width, label="qk_nope_head_dim"),
        qk_rope_head_dim=2 * draw(st.integers(1, max_width // 2), label="qk_rope_half"),
        v_head_dim=draw(width, label="v_head_dim"),
        rope_layout=draw(st.sampled_from(["interleaved", "halves"]), label="rope_layout"),
        rope_theta=draw(st.sampled_from([10000.0, 50000.0, 100.0]), label="rope_theta"),
        yarn=yarn,
    )
