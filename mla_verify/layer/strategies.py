"""Hypothesis strategies that draw layer cases: configs (every preset shrunk to testable widths, and
configs drawn by `mla_verify.strategies.mla_configs`: q-LoRA on and off, both RoPE layouts, YaRN on
and off, head counts, widths), a prefill and a series of decode calls whose cache lengths cross
page boundaries (16 and 64 tokens: the fast layer's pages), module dtypes, weight and activation
scales. Every choice lists its simplest option first, so a failure shrinks to a readable case.
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from mla_verify.config import MLA_PRESETS, MLAConfig
from mla_verify.layer.case import LAYER_DTYPES, LayerCase
from mla_verify.strategies import mla_configs

__all__ = ["layer_cases", "shrink_preset", "shrunk_presets", "WEIGHT_SCALES", "ACTIVATION_SCALES", "PAGE_EDGES"]

# scores grow with the weight scale squared: 0.5 flattens the softmax, 2 sharpens it 4×
WEIGHT_SCALES = (1.0, 0.5, 2.0)
# inputs 10× smaller or larger (the RMSNorms remove the scale, the direct query and the rope key keep it)
ACTIVATION_SCALES = (1.0, 0.1, 10.0)
# cache lengths on either side of a page of 16 and of 64 tokens
PAGE_EDGES = (1, 15, 16, 17, 31, 32, 33, 63, 64, 65)


def shrink_preset(config: MLAConfig, max_width: int = 16, max_heads: int = 4) -> MLAConfig:
    """The preset with every width divided by kv_lora_rank / max_width (at least 1, at most
    3·max_width; the rope width even and ≥ 2; the hidden size at most 4·max_width) and at most
    max_heads heads; q-LoRA, the RoPE layout and θ, YaRN and eps kept."""
    scale = max(1.0, config.kv_lora_rank / max_width)

    def width(value: int, cap: int = 3 * max_width) -> int:
        return max(1, min(cap, round(value / scale)))

    return config.replace(
        name=f"{config.name} (shrunk)", hidden_size=max(2, width(config.hidden_size, 4 * max_width)),
        num_heads=min(config.num_heads, max_heads),
        q_lora_rank=None if config.q_lora_rank is None else width(config.q_lora_rank),
        kv_lora_rank=width(config.kv_lora_rank), qk_nope_head_dim=width(config.qk_nope_head_dim),
        qk_rope_head_dim=max(2, 2 * round(config.qk_rope_head_dim / scale / 2)), v_head_dim=width(config.v_head_dim),
        num_layers=1)


def shrunk_presets(max_width: int = 16, max_heads: int = 4) -> list[MLAConfig]:
    return [shrink_preset(config, max_width, max_heads) for config in MLA_PRESETS.values()]


def _names(dtypes) -> list[str]:
    names = [str(t).removeprefix("torch.") if isinstance(t, torch.dtype) else t for t in dtypes]
    bad = [name for name in names if name not in LAYER_DTYPES]
    if not names or bad:
        raise ValueError(f"dtypes must name some of {list(LAYER_DTYPES)}; got {list(dtypes)!r}")
    return names


@st.composite
def layer_cases(draw: st.DrawFn, dtypes=LAYER_DTYPES, max_heads: int = 4, max_width: int = 16,
                max_length: int = 24, max_batch: int = 2, max_decode_steps: int = 4, max_decode_tokens: int = 3,
                scales: bool = True, configs: st.SearchStrategy[MLAConfig] | None = None) -> LayerCase:
    """A layer case: a config (drawn by mla_configs, or a preset shrunk to max_width), a prefill of
    up to max_length tokens (page edges drawn often), 1 … max_decode_steps decode calls of
    1 … max_decode_tokens tokens, batch up to max_batch, a dtype among `dtypes` (names or torch
    dtypes), and weight/activation scales (1.0 when `scales` is False). `configs` replaces the
    config strategy."""
    names = _names(dtypes)
    if configs is None:
        configs = st.one_of(mla_configs(max_heads=max_heads, max_width=max_width),
                            st.sampled_from(shrunk_presets(max_width, max_heads)))
    config = draw(configs, label="config")
    edges = [n for n in PAGE_EDGES if n <= max_length]
    prefill = draw(st.one_of(st.integers(1, max_length), st.sampled_from(edges)), label="prefill")
    decode = tuple(draw(st.lists(st.integers(1, max_decode_tokens), min_size=1, max_size=max_decode_steps),
                        label="decode"))
    return LayerCase(
        config=config, batch=draw(st.integers(1, max_batch), label="batch"), prefill=prefill, decode=decode,
        seed=draw(st.integers(0, 2**31 - 1), label="seed"), dtype=draw(st.sampled_from(names), label="dtype"),
        weight_scale=draw(st.sampled_from(WEIGHT_SCALES), label="weight_scale") if scales else 1.0,
        activation_scale=draw(st.sampled_from(ACTIVATION_SCALES), label="activation_scale") if scales else 1.0)
