"""MLA and GQA attention configurations, validated, with the published presets.

Notation follows DeepSeek-V2/V3: h heads, d_n = qk_nope_head_dim, d_r = qk_rope_head_dim,
d_v = v_head_dim, d_c = kv_lora_rank, d_q' = q_lora_rank (None: the query is projected directly),
D = hidden_size.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

RopeLayout = Literal["interleaved", "halves"]

__all__ = [
    "YarnConfig",
    "MLAConfig",
    "GQAConfig",
    "MLA_PRESETS",
    "GQA_PRESETS",
    "mla_preset",
    "gqa_preset",
]


def _require(condition: bool, field: str, rule: str, value: object) -> None:
    if not condition:
        raise ValueError(f"{field} must be {rule}; got {value!r}")


def _positive_int(field: str, value: object) -> None:
    _require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
             field, "a positive int", value)


@dataclass(frozen=True)
class YarnConfig:
    """YaRN context extension as DeepSeek and HF configure it (rope_scaling type 'yarn')."""

    # frequency interpolation
    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    # attention temperature: m = 0.1·mscale_all_dim·ln(factor) + 1 multiplies the softmax scale twice
    mscale: float = 1.0
    mscale_all_dim: float = 1.0

    def __post_init__(self) -> None:
        _require(self.factor >= 1.0, "yarn.factor", ">= 1", self.factor)
        _positive_int("yarn.original_max_position_embeddings", self.original_max_position_embeddings)
        _require(self.beta_fast > self.beta_slow > 0, "yarn.beta_fast/beta_slow",
                 "beta_fast > beta_slow > 0", (self.beta_fast, self.beta_slow))
        _require(self.mscale >= 0 and self.mscale_all_dim >= 0, "yarn.mscale/mscale_all_dim",
                 "non-negative", (self.mscale, self.mscale_all_dim))


def yarn_mscale(factor: float, mscale: float) -> float:
    """YaRN's attention temperature 0.1·mscale·ln(factor) + 1 (1 when factor ≤ 1)."""
    return 1.0 if factor <= 1.0 else 0.1 * mscale * math.log(factor) + 1.0


@dataclass(frozen=True)
class MLAConfig:
    """One MLA attention layer's shape, plus the layer count for whole-model figures."""

    name: str
    hidden_size: int
    num_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    num_layers: int = 1
    # rope
    rope_layout: RopeLayout = "interleaved"
    rope_theta: float = 10000.0
    yarn: YarnConfig | None = None
    # norms
    rms_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        for field in ("hidden_size", "num_heads", "kv_lora_rank", "qk_nope_head_dim",
                      "qk_rope_head_dim", "v_head_dim", "num_layers"):
            _positive_int(field, getattr(self, field))
        if self.q_lora_rank is not None:
            _positive_int("q_lora_rank", self.q_lora_rank)
        _require(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim",
                 "even (RoPE rotates pairs)", self.qk_rope_head_dim)
        _require(self.rope_layout in ("interleaved", "halves"), "rope_layout",
                 "'interleaved' (DeepSeek) or 'halves' (HF rope_interleave=False)", self.rope_layout)
        _require(self.rope_theta > 0, "rope_theta", "positive", self.rope_theta)
        _require(self.rms_norm_eps > 0, "rms_norm_eps", "positive", self.rms_norm_eps)
        _require(self.yarn is None or isinstance(self.yarn, YarnConfig), "yarn",
                 "None or a YarnConfig", self.yarn)

    @property
    def qk_head_dim(self) -> int:
        """d_n + d_r: the width a query head is scored over in MHA mode."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_width(self) -> int:
        """d_c + d_r: one row of the absorbed-mode cache (576 for DeepSeek-V3)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """(d_n + d_r)^-1/2 · m², with m the YaRN temperature (HF/vLLM convention: applied whenever
        YaRN is configured)."""
        scale = self.qk_head_dim ** -0.5
        if self.yarn is not None:
            scale *= yarn_mscale(self.yarn.factor, self.yarn.mscale_all_dim) ** 2
        return scale

    def replace(self, **changes: object) -> MLAConfig:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class GQAConfig:
    """A grouped-query attention model, for cache comparisons (MHA: kv heads = heads; MQA: 1)."""

    name: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    def __post_init__(self) -> None:
        for field in ("num_layers", "num_heads", "num_kv_heads", "head_dim"):
            _positive_int(field, getattr(self, field))
        _require(self.num_heads % self.num_kv_heads == 0, "num_heads",
                 f"a multiple of num_kv_heads={self.num_kv_heads}", self.num_heads)


_V3_YARN = YarnConfig(factor=40.0, original_max_position_embeddings=4096, mscale=1.0, mscale_all_dim=1.0)
_V2_YARN = YarnConfig(factor=40.0, original_max_position_embeddings=4096, mscale=0.707, mscale_all_dim=0.707)
_KIMI_YARN = YarnConfig(factor=32.0, original_max_position_embeddings=4096, mscale=1.0, mscale_all_dim=1.0)

_DEEPSEEK_V3 = MLAConfig("DeepSeek-V3", hidden_size=7168, num_heads=128, q_lora_rank=1536,
                         kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                         num_layers=61, yarn=_V3_YARN)

MLA_PRESETS: dict[str, MLAConfig] = {
    c.name: c
    for c in [
        _DEEPSEEK_V3,
        _DEEPSEEK_V3.replace(name="DeepSeek-V2", hidden_size=5120, num_layers=60, yarn=_V2_YARN),
        MLAConfig("DeepSeek-V2-Lite", hidden_size=2048, num_heads=16, q_lora_rank=None, kv_lora_rank=512,
                  qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, num_layers=27,
                  yarn=_V2_YARN),
        MLAConfig("Kimi-K2", hidden_size=7168, num_heads=64, q_lora_rank=1536, kv_lora_rank=512,
                  qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, num_layers=61,
                  rope_theta=50000.0, yarn=_KIMI_YARN),
        MLAConfig("Moonlight", hidden_size=2048, num_heads=16, q_lora_rank=None, kv_lora_rank=512,
                  qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, num_layers=27,
                  rope_theta=50000.0),
        # MiniCPM3 uses LongRoPE scaling, which changes frequencies but not the softmax scale.
        MLAConfig("MiniCPM3-4B", hidden_size=2560, num_heads=40, q_lora_rank=768, kv_lora_rank=256,
                  qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, num_layers=62),
        MLAConfig("GLM-4.7-Flash", hidden_size=2048, num_heads=20, q_lora_rank=768, kv_lora_rank=512,
                  qk_nope_head_dim=192, qk_rope_head_dim=64, v_head_dim=256, num_layers=47,
                  rope_theta=1_000_000.0),
    ]
}
_MLA_ALIASES = {"DeepSeek-R1": "DeepSeek-V3", "DeepSeek-V3.1": "DeepSeek-V3",
                "DeepSeek-V3.2": "DeepSeek-V3"}

GQA_PRESETS: dict[str, GQAConfig] = {
    c.name: c
    for c in [
        GQAConfig("Qwen2.5-32B", num_layers=64, num_heads=40, num_kv_heads=8, head_dim=128),
        GQAConfig("Qwen2.5-72B", num_layers=80, num_heads=64, num_kv_heads=8, head_dim=128),
        GQAConfig("Llama-3.1-8B", num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128),
        GQAConfig("Llama-3.1-70B", num_layers=80, num_heads=64, num_kv_heads=8, head_dim=128),
        GQAConfig("Llama-3.1-405B", num_layers=126, num_heads=128, num_kv_heads=8, head_dim=128),
        # The dense model the DeepSeek-V2 paper compares its cache against.
        GQAConfig("DeepSeek-LLM-67B", num_layers=95, num_heads=64, num_kv_heads=8, head_dim=128),
    ]
}


def mla_preset(name: str) -> MLAConfig:
    """The MLA preset called `name` (DeepSeek-R1 / V3.1 / V3.2 are aliases of DeepSeek-V3)."""
    canonical = _MLA_ALIASES.get(name, name)
    if canonical not in MLA_PRESETS:
        raise ValueError(f"name must be one of {sorted(MLA_PRESETS) + sorted(_MLA_ALIASES)}; got {name!r}")
    config = MLA_PRESETS[canonical]
    return config if canonical == name else config.replace(name=name)


def gqa_preset(name: str) -> GQAConfig:
    if name not in GQA_PRESETS:
        raise ValueError(f"name must be one of {sorted(GQA_PRESETS)}; got {name!r}")
    return GQA_PRESETS[name]
