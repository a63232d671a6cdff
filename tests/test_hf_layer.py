"""HF transformers' DeepseekV3Attention and DeepseekV2Attention against the float64 reference, through
the layer contract: prefill then three decode calls with HF's own DynamicCache, eager and sdpa,
q-LoRA on and off, both RoPE layouts, YaRN on and off, in float64 and in bf16 (the precision HF is
served in), judged stage by stage on the intermediates the adapter captures. Each variant must meet
the bounds of the precision it declares; declaring more precision than HF delivers must fail; and
real bugs (a softmax scale off by 0.5 %, the other RoPE layout, a missing norm, stale decode
positions) must fail, in the stage that has them, in float32 and bf16.

The layer contract's own machinery (bound, report, failure message) is also checked on a float64
layer built from the reference, which needs no transformers.
"""

import dataclasses

import pytest
import torch
from torch import nn

from mla_verify.config import MLAConfig, YarnConfig, yarn_mscale
from mla_verify.layer import (InternalPrecision, LayerCase, LayerFailure, check_layer, layer_error_bound,
                              unsupported_reason)
from mla_verify.reference import LatentCache, apply_rope, mla_forward

F32, F64 = torch.float32, torch.float64

from mla_verify.adapters import hf  # imports without transformers: the library loads on first use

try:
    import transformers

    HAVE_TRANSFORMERS = int(transformers.__version__.split(".")[0]) >= 5
except ImportError:
    HAVE_TRANSFORMERS = False
needs_transformers = pytest.mark.skipif(not HAVE_TRANSFORMERS, reason="needs transformers>=5")

BASE = MLAConfig("small", hidden_size=16, num_heads=4, q_lora_rank=8, kv_lora_rank=6, qk_nope_head_dim=4,
                 qk_rope_head_dim=6, v_head_dim=5)
YARN = YarnConfig(factor=40.0, original_max_position_embeddings=4, mscale=0.707, mscale_all_dim=0.707)
CONFIGS = {
    f"{'qlora' if q else 'noqlora'}-{layout}-{'yarn' if yarn else 'rope'}": BASE.replace(
        q_lora_rank=8 if q else None, rope_layout=layout, yarn=YARN if yarn else None)
    for q in (True, False) for layout in ("interleaved", "halves") for yarn in (False, True)
}
VARIANTS = ["v3-eager", "v3-sdpa", "v3-sdpa-f64", "v2-eager", "v2-sdpa"]
FLOAT32_INTERNAL = ["v3-eager", "v3-sdpa", "v2-eager", "v2-sdpa"]


def _spec(variant: str) -> str:
    return f"mla_verify.adapters.hf:deepseek_{variant.replace('-', '_').replace('f64', 'float64')}"


def _case(config: MLAConfig, seed: int = 0) -> LayerCase:
    return LayerCase(config, batch=2, prefill=4, decode=(1, 2, 1), seed=seed)


# ----------------------------------------------------------------------------------------------
# HF meets what it declares, and no more
# ----------------------------------------------------------------------------------------------

@needs_transformers
@pytest.mark.parametrize("config_name", sorted(CONFIGS))
@pytest.mark.parametrize("variant", VARIANTS)
def test_hf_attention_meets_its_declared_precision(variant, config_name):
    report = check_layer(_spec(variant), _case(CONFIGS[config_name]))
    assert report.ratio <= 1


@needs_transformers
@pytest.mark.parametrize("config_name", sorted(CONFIGS))
@pytest.mark.parametrize("variant", VARIANTS)
def test_hf_attention_in_bf16_meets_its_declared_precision_stage_by_stage(variant, config_name):
    report = check_layer(_spec(variant), _case(CONFIGS[config_name]).replace(dtype="bfloat16"))
    assert set(report.stages) == {"q path", "latent path", "rope", "rope + attention", "output projection"}
    assert report.precision_class.startswith("bfloat16")


@needs_transformers
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_hf_eager_in_float16_and_float32_meets_its_declared_precision(dtype):
    for config in CONFIGS.values():
        check_layer(_spec("v3-eager"), _case(config).replace(dtype=dtype))


@needs_transformers
@pytest.mark.parametrize("variant", FLOAT32_INTERNAL)
def test_claiming_float64_for_hfs_float32_internal_steps_fails(variant):
    with pytest.raises(LayerFailure, match="declared: projections, rms_norm, rope, scores, softmax, attention in "
                                           "float64"):
        check_layer(_spec(variant), _case(CONFIGS["qlora-interleaved-yarn"]), declared=InternalPrecision.uniform(F64))


@needs_transformers
def test_the_declarations_say_where_hf_rounds_to_float32():
    assert hf.deepseek_v3_eager.precision.softmax == F32 and hf.deepseek_v3_sdpa.precision.softmax == F64
    assert hf.deepseek_v3_sdpa_float64.precision.coarsest == F64
    for factory in (hf.deepseek_v2_eager, hf.deepseek_v2_sdpa):  # V2's complex RoPE product is float32
        assert factory.precision.rope == F32 and factory.precision.rope_rotation == F32
        assert factory.precision.coarsest == F32
    eager = hf.hf_precision("v3-eager", torch.bfloat16)  # q·kᵀ and P rounded to bf16, sums in float32
    assert (eager.scores_stored, eager.p_stored, eager.accumulation) == (torch.bfloat16, torch.bfloat16, F32)
    assert hf.hf_precision("v3-sdpa", torch.bfloat16).scores_stored == F32
    assert hf.deepseek_v3_eager.precision.precision_class(F64) == "float64 with float32 RMSNorm/RoPE/softmax"
    assert not hf.deepseek_v3_eager.capabilities.both_paths  # HF decodes the naive way


@needs_transformers
def test_a_float32_module_meets_the_float32_bound():
    case = dataclasses.replace(_case(CONFIGS["noqlora-halves-yarn"]), dtype="float32")
    report = check_layer(_spec("v3-eager"), case)
    assert report.ratio <= 1 and "float32" in report.precision


@needs_transformers
def test_v2_refuses_a_hidden_size_that_its_config_rejects():
    odd = BASE.replace(num_heads=3)
    assert unsupported_reason(_spec("v2-eager"), odd) is not None and unsupported_reason(_spec("v3-eager"), odd) is None
    with pytest.raises(ValueError, match="hidden_size % num_attention_heads"):
        hf.deepseek_v2_eager(odd, _case(odd).build()[0])


# ----------------------------------------------------------------------------------------------
# Real differences fail
# ----------------------------------------------------------------------------------------------

def _mutant(factory, mutate):
    def build(*arguments):
        layer = factory(*arguments)
        mutate(layer)
        return layer

    build.precision = factory.precision
    build.capabilities = factory.capabilities
    return build


def _scale_off_by_half_a_percent(layer):
    layer.module.scaling *= 1.005


def _other_rope_layout(layer):
    layer.hf_config.rope_interleave = not layer.hf_config.rope_interleave


def _no_kv_norm(layer):
    layer.module.kv_a_layernorm = nn.Identity()


def _no_q_norm(layer):
    layer.module.q_a_layernorm = nn.Identity()


def _decode_positions_lag_by_one(layer):
    decode = layer.decode

    def lagging(x):
        layer.position -= 1
        return decode(x)

    layer.decode = lagging


MUTANTS = {"scale x1.005": _scale_off_by_half_a_percent, "other rope layout": _other_rope_layout,
           "no kv_norm": _no_kv_norm, "no q_norm": _no_q_norm, "stale decode positions": _decode_positions_lag_by_one}
# the stage each bug shows in: the key's RoPE is read from HF's cache ("rope"); the query's is functional code
# inside the module, judged with attention ("rope + attention")
EXPECTED_STAGE = {"scale x1.005": "rope + attention", "other rope layout": "rope",
                  "no kv_norm": "latent path", "no q_norm": "q path", "stale decode positions": "rope"}


@needs_transformers
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mutant", sorted(MUTANTS))
@pytest.mark.parametrize("variant", ["v3-eager", "v3-sdpa-f64"])
def test_a_real_difference_fails_in_its_stage(variant, mutant, dtype):
    if mutant == "scale x1.005" and dtype == "bfloat16":
        pytest.skip("eager attention rounds q·kᵀ and its scaling to bf16: a legitimate relative score error of up "
                    "to 0.8 %, so a 0.5 % scale error is within what a correct bf16 layer may do on one case")
    factory = getattr(hf, _spec(variant).partition(":")[2])
    for config_name in ("qlora-interleaved-rope", "qlora-halves-yarn"):
        with pytest.raises(LayerFailure, match="bound") as caught:
            check_layer(_mutant(factory, MUTANTS[mutant]), _case(CONFIGS[config_name]).replace(dtype=dtype))
        assert caught.value.stage == EXPECTED_STAGE[mutant] and caught.value.ratio > 1


@needs_transformers
@pytest.mark.parametrize("mutant", ["scale x1.005", "no kv_norm", "stale decode positions"])
def test_a_real_difference_fails_in_v2(mutant):
    with pytest.raises(LayerFailure) as caught:
        check_layer(_mutant(hf.deepseek_v2_eager, MUTANTS[mutant]), _case(CONFIGS["qlora-halves-yarn"]))
    assert caught.value.stage == EXPECTED_STAGE[mutant]


@needs_transformers
def test_v2_needs_the_rope_row_permutation_for_a_halves_config():
    def unpermuted(config, weights, dtype=F64, device="cpu"):
        layer = hf.deepseek_v2_eager(config, weights, dtype, device)
        with torch.no_grad():
            parameters = dict(layer.module.named_parameters())
            for name, value in hf.hf_weights(config, weights, permute_rope=False).items():
                parameters[name].copy_(value.to(dtype))
        return layer

    unpermuted.precision = hf.deepseek_v2_eager.precision
    with pytest.raises(LayerFailure):
        check_layer(unpermuted, _case(CONFIGS["noqlora-halves-rope"]))


# ----------------------------------------------------------------------------------------------
# The mapping
# ----------------------------------------------------------------------------------------------

def test_interleaving_the_halves_turns_halves_rope_into_interleaved_rope():
    width = 6
    x = torch.randn(3, width, dtype=F64)
    angles = torch.randn(3, width // 2, dtype=F64)
    cos, sin = angles.cos(), angles.sin()
    order = hf.interleave_halves(width)
    assert order.tolist() == [0, 3, 1, 4, 2, 5]
    assert torch.equal(apply_rope(x[:, order], cos, sin, "interleaved"), apply_rope(x, cos, sin, "halves")[:, order])


@needs_transformers
def test_every_weight_lands_in_its_hf_parameter():
    for config in (CONFIGS["qlora-halves-yarn"], CONFIGS["noqlora-interleaved-rope"]):
        weights, _ = _case(config).build()
        layer = hf.deepseek_v3_eager(config, weights)
        parameters = dict(layer.module.named_parameters())
        mapped = hf.hf_weights(config, weights, permute_rope=False)
        assert set(mapped) == set(parameters)
        for name, value in mapped.items():
            assert torch.equal(parameters[name], value), name


@needs_transformers
def test_the_yarn_magnitude_is_passed_as_deepseek_defines_it():
    """HF infers the cos/sin magnitude as mscale(f, mscale)/mscale(f, mscale_all_dim) only when both
    are non-zero, else mscale(f): for mscale_all_dim = 0 that is not DeepSeek's definition, so the
    adapter passes attention_factor explicitly."""
    corner = BASE.replace(yarn=YarnConfig(factor=40.0, original_max_position_embeddings=4, mscale=0.707,
                                          mscale_all_dim=0.0))
    arguments = hf.hf_config_arguments(corner, "v3")
    deepseek = yarn_mscale(40.0, 0.707) / yarn_mscale(40.0, 0.0)
    assert arguments["rope_parameters"]["attention_factor"] == deepseek
    inferred = dict(arguments["rope_parameters"])
    del inferred["attention_factor"]
    config = transformers.DeepseekV3Config(**{**arguments, "rope_parameters": inferred})
    rotary = hf._modeling("v3").DeepseekV3RotaryEmbedding(config)
    assert rotary.attention_scaling == pytest.approx(yarn_mscale(40.0, 1.0)) != pytest.approx(deepseek)
    check_layer(_spec("v3-eager"), _case(corner))  # with the explicit factor, HF matches the reference


# ----------------------------------------------------------------------------------------------
# The layer contract's machinery, on a float64 layer built from the reference
# ----------------------------------------------------------------------------------------------

class _ReferenceLayer:
    """mla_forward in absorbed mode with a LatentCache: a float64 layer of the contract."""

    precision = InternalPrecision.uniform(F64, "the reference itself")

    def __init__(self, config, weights, dtype=F64, device="cpu", scale_error=1.0):
        self.config, self.weights, self.scale_error = config, weights, scale_error
        self.cache, self.position = None, 0

    def prefill(self, x):
        self.cache, self.position = LatentCache.allocate(self.config, x.shape[0], 64), 0
        return self.decode(x)

    def decode(self, x):
        config = self.config if self.scale_error == 1.0 else _ScaledConfig(self.config, self.scale_error)
        out = mla_forward(config, self.weights, x, self.position, self.cache, "absorbed")
        self.position += x.shape[1]
        return out


class _ScaledConfig:
    """The config with its softmax scale multiplied by `factor` (a scale bug under test)."""

    def __init__(self, config, factor):
        self._config, self._factor = config, factor

    def __getattr__(self, name):
        return getattr(self._config, name)

    @property
    def softmax_scale(self):
        return self._config.softmax_scale * self._factor


def test_the_absorbed_reference_layer_meets_the_float64_bound_of_the_naive_one():
    for config in CONFIGS.values():
        report = check_layer(_ReferenceLayer, _case(config, seed=3))
        assert report.ratio <= 1


def test_a_failure_shows_observed_bound_case_and_a_replay_command():
    def wrong_scale(config, weights, dtype=F64, device="cpu"):
        return _ReferenceLayer(config, weights, scale_error=1.0001)

    with pytest.raises(LayerFailure) as raised:
        check_layer(wrong_scale, _case(CONFIGS["qlora-interleaved-yarn"]))
    message = str(raised.value)
    assert "|out - ref| / bound" in message and "case: float64 b=2 prefill=4 decode=[1, 2, 1]" in message
    if HAVE_TRANSFORMERS:
        with pytest.raises(LayerFailure, match="replay: python -c"):
            check_layer(_spec("v3-eager"), _case(CONFIGS["qlora-interleaved-yarn"]),
                        declared=InternalPrecision.uniform(F64))


def test_the_bound_grows_with_the_declared_rounding():
    config = CONFIGS["qlora-halves-yarn"]
    weights, x = _case(config).build()
    exact = layer_error_bound(config, weights, x, InternalPrecision.uniform(F64))
    float32_softmax = layer_error_bound(config, weights, x, dataclasses.replace(InternalPrecision.uniform(F64),
                                                                                softmax=F32))
    assert torch.equal(exact.reference, float32_softmax.reference)
    assert bool((float32_softmax.bound > exact.bound).all())
    all_float32 = layer_error_bound(config, weights, x, InternalPrecision.uniform(F32))
    assert bool((float32_softmax.bound < all_float32.bound).all())


# ----------------------------------------------------------------------------------------------
# What HF cannot run is declared
# ----------------------------------------------------------------------------------------------

ODD_NOPE, ODD_LATENT = BASE.replace(qk_nope_head_dim=3), BASE.replace(kv_lora_rank=5)


@needs_transformers
def test_v2_in_float32_without_the_declaration_raises_on_an_odd_nope_or_latent_width(monkeypatch):
    """HF's DeepseekV2 apply_rotary_emb views a float32 slice as complex: an odd offset raises. If
    this stops failing, HF fixed it and the declaration below can go."""
    monkeypatch.setattr(hf, "unsupported_dtype", lambda config, version, dtype: None)
    for config in (ODD_NOPE, ODD_LATENT):
        with pytest.raises(LayerFailure, match="divisible by 2"):
            check_layer(_spec("v2-eager"), _case(config).replace(dtype="float32"))


@needs_transformers
def test_v2_declines_float32_with_an_odd_nope_or_latent_width_and_the_certifier_counts_it_declined():
    from mla_verify import Declined
    from mla_verify.certify.halves import CaseRefused, half_of
    from mla_verify.certify.registry import resolve_layer

    for config, odd in ((ODD_NOPE, "qk_nope_head_dim"), (ODD_LATENT, "kv_lora_rank")):
        for variant in ("v2-eager", "v2-sdpa"):
            reason = hf.unsupported_dtype(config, "v2", F32)
            assert reason and odd in reason and "view_as_complex" in reason
            factory = getattr(hf, f"deepseek_{variant.replace('-', '_')}")
            assert factory.supports(config) is None  # the config alone is fine: float64, bf16, fp16 run
            assert factory.supports(config, F32) == reason
            with pytest.raises(Declined, match=odd):
                factory(config, _case(config).build()[0], F32)
        assert hf.unsupported_dtype(config, "v3", F32) is None  # V3 rotates with cos/sin
        assert all(hf.unsupported_dtype(config, "v2", dtype) is None for dtype in (F64, torch.bfloat16, torch.float16))
    assert hf.unsupported_dtype(BASE, "v2", F32) is None
    assert "odd qk_nope_head_dim" in hf.deepseek_v2_eager.capabilities.note
    impl = resolve_layer("hf-deepseek-v2-eager")
    half = half_of(impl)
    with pytest.raises(CaseRefused, match="Declined: HF DeepseekV2 in float32 with an odd qk_nope_head_dim"):
        half.judge(impl, half.properties(impl)[0], _case(ODD_NOPE).replace(dtype="float32"), "cpu")
    check_layer(_spec("v2-eager"), _case(ODD_NOPE).replace(dtype="float64"))  # the same config in float64 runs
