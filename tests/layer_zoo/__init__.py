"""A zoo of bug-injected MLA layers, each modelled on a bug class met when porting DeepSeek-style
attention between codebases. tests/test_layer_mutant_zoo.py checks that the layer checks catch
every one, in float32 and in bfloat16, with the expected failure kind, on drawn cases.

Most mutants are the example DeepSeek-style module (examples/deepseek_style_layer.py), written
out in steps by `common.TemplateMLA`, with one step broken on the line marked BUG; two live in
the paged decode path of the project's fast layer. Each declares the failure kinds that count as
caught (the stage where the bug first shows, given the intermediates the layer exposes: a
checkpoint the buggy layer stops producing merges its stage with the next, and the failure is
named after the last stage of the merge, so it also declares a stage the merge must include) and, when
the bug needs a feature of the config to show (YaRN for the temperature, d_n ≠ d_v for the
W_UK/W_UV split), that feature: on drawn configs with it the mutant must be caught, on drawn
configs without it the mutant must pass (evidence that it is a targeted bug, not a broken layer).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from mla_verify.config import MLAConfig, yarn_mscale

from . import cache, fast, rope, scale, weights
from .common import EXAMPLE, TemplateMLA, contract_factory

__all__ = ["LayerMutant", "ZOO", "CONTROLS", "EXAMPLE"]


def yarn_temperature_applies(config: MLAConfig) -> bool:
    """YaRN configured with a softmax temperature m ≠ 1 (factor > 1 and mscale_all_dim > 0)."""
    return config.yarn is not None and yarn_mscale(config.yarn.factor, config.yarn.mscale_all_dim) != 1


def several_rope_pairs(config: MLAConfig) -> bool:
    """d_r ≥ 4: interleaved and halves pairings differ."""
    return config.qk_rope_head_dim >= 4


def nope_and_v_widths_differ(config: MLAConfig) -> bool:
    return config.qk_nope_head_dim != config.v_head_dim


def several_heads_and_features(config: MLAConfig) -> bool:
    """h ≥ 2 and d_v ≥ 2: a transpose of [h, d_v] changes the order."""
    return config.num_heads >= 2 and config.v_head_dim >= 2


@dataclass(frozen=True)
class LayerMutant:
    """A bug-injected layer factory, the failure kinds that count as catching it, a stage the
    failing check must include (None: any), and the config feature its bug needs to show (None:
    every config)."""

    factory: Callable
    kinds: frozenset[str]
    needs: Callable[[MLAConfig], bool] | None = None
    stage: str | None = None
    name: str = field(default="")

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", self.factory.__name__)


def _mutant(module_class: type, *kinds: str, needs=None, stage=None) -> LayerMutant:
    return LayerMutant(contract_factory(module_class), frozenset(kinds), needs, stage)


# The example exposes every checkpoint: q (wq_b / wq output), the latent (kv_norm output), the raw
# rope key (wkv_a output), q_pe and k_pe (its two Rotary modules' outputs) and o (wo's input).
ZOO: tuple[LayerMutant, ...] = (
    _mutant(scale.YarnMscaleMissing, "attention", needs=yarn_temperature_applies),
    _mutant(scale.YarnMscaleDoubled, "attention", needs=yarn_temperature_applies),
    _mutant(scale.ScaleFromNopeDim, "attention"),
    # k_rope is never called: no k_pe checkpoint, so RoPE is judged together with attention
    _mutant(rope.RopeOnQNotK, "attention", stage="rope"),
    # the cached keys are rotated correctly (k_pe passes) and rotated again when attention reads them
    _mutant(rope.RopeTwiceOnCachedK, "attention"),
    _mutant(rope.RopeLayoutMixed, "rope", needs=several_rope_pairs),
    _mutant(rope.DecodePositionOffByOne, "rope"),
    # d_n > d_v: wrong values; d_n < d_v: the short W_UV slice makes wo raise
    _mutant(weights.SplitAtVHeadDim, "attention", "exception", needs=nope_and_v_widths_differ),
    # kv_norm is not called in decode: no latent checkpoint there, so the latent path is judged with attention
    _mutant(cache.KvNormSkippedInDecode, "attention", stage="latent path"),
    _mutant(cache.AppendedAfterAttention, "attention"),
    # o is taken at W_O's input, after the wrong flatten: the attention stage's output is wrong
    _mutant(weights.HeadsPermutedBeforeWo, "attention", needs=several_heads_and_features),
    LayerMutant(fast.fast_appended_after_attention, frozenset({"attention"})),
    LayerMutant(fast.fast_decode_position_off_by_one, frozenset({"rope"})),
)

# Correct layers that must pass: the example's three factories and the zoo's template.
CONTROLS: dict[str, Callable] = {
    "example factory (naive prefill, absorbed decode)": EXAMPLE.factory,
    "example factory_naive": EXAMPLE.factory_naive,
    "example factory_absorbed": EXAMPLE.factory_absorbed,
    "zoo template": contract_factory(TemplateMLA),
}
