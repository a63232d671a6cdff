"""Unit tests of the layer half's numerics (mla_verify.layer, mla_verify.rounding): the stage bounds
hold for a correct low-precision stage with a ratio that means something and fail a hand-made
wrong one, stages merge where a checkpoint is missing, the analysis's float64 values are the
reference layer's, torch's rounding facts the bounds rely on still hold, the capture helper,
precision declarations and case serialisation."""

import dataclasses
import json
import math

import pytest
import torch
from torch import nn

from mla_verify.config import MLAConfig, YarnConfig
from mla_verify.impls.fast_layer import fast_layer_torch_decode
from mla_verify.layer import (CHECKPOINTS, STAGES, InternalPrecision, LayerCase, LayerFailure, capture_submodules,
                              check_layer, judge_layer, layer_error_bound, record_layer, stage_bounds, stage_of)
from mla_verify.layer.bounds import Bounded, LayerAnalysis, _linear, _Weights
from mla_verify.reference import mla_forward, rms_norm
from mla_verify.rounding import gamma, probabilistic_gamma, unit_roundoff, worst_ratio

BF16, F16, F32, F64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
CONFIG = MLAConfig("small", hidden_size=16, num_heads=3, q_lora_rank=8, kv_lora_rank=12, qk_nope_head_dim=4,
                   qk_rope_head_dim=4, v_head_dim=5,
                   yarn=YarnConfig(factor=4.0, original_max_position_embeddings=16, mscale=0.707, mscale_all_dim=0.707))
CASE = LayerCase(config=CONFIG, batch=2, prefill=17, decode=(1, 3), seed=2, dtype="bfloat16")


def _recorded(case: LayerCase = CASE):
    weights, x = case.build()
    layer = fast_layer_torch_decode(case.config, weights, case.torch_dtype)
    return layer, weights, x, record_layer(layer, case, x)


# ----------------------------------------------------------------------------------------------
# Rounding facts the bounds rely on
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [BF16, F16])
def test_low_precision_matmuls_sum_in_float32(dtype):
    """1 + 1023·2^-9 is 2.998 summed in float32, 1 summed in bf16: torch's bf16/fp16 matmul, linear
    and einsum give the float32 sum rounded once (the accumulation the layer bounds assume)."""
    a = torch.full((1, 1024), 2.0 ** -9, dtype=dtype)
    a[0, 0] = 1
    w = torch.ones(2, 1024, dtype=dtype)
    exact = float((a.double() @ w.double().T)[0, 0])
    for result in (a @ w.T, nn.functional.linear(a, w), torch.einsum("bc,dc->bd", a, w)):
        assert float(result[0, 0]) == float(torch.tensor(exact).to(dtype))


@pytest.mark.parametrize("dtype", [BF16, F16])
def test_torch_rounds_float64_to_low_precision_through_float32(dtype):
    """A double rounding (one half ulp of float32 beyond half an ulp): the bounds allow for it."""
    ulp = torch.finfo(dtype).eps
    tie_plus = torch.tensor([1 + ulp / 2 + 2.0 ** -30], dtype=F64)
    assert float(tie_plus.to(dtype)) == float(tie_plus.to(F32).to(dtype)) == 1.0  # nearest would be 1 + ulp
    rounded = Bounded.exact(tie_plus, sharp=False)
    from mla_verify.layer.bounds import _round

    allowed = _round(rounded, dtype, F64).error
    assert float((tie_plus.to(dtype).double() - tie_plus).abs()) <= float(allowed)


def test_probabilistic_gamma_is_never_above_the_worst_case_and_below_it_for_long_sums():
    u = unit_roundoff(F32)
    for n in (1, 10, 64, 10_000, 10 ** 6):
        assert probabilistic_gamma(n, u) <= gamma(n, u)
    assert probabilistic_gamma(10 ** 6, u) < gamma(10 ** 6, u) / 10


def test_worst_ratio_counts_an_error_over_a_zero_bound_and_nan_as_infinite():
    assert worst_ratio(torch.tensor([0.0, 1.0]), torch.tensor([0.0, 2.0])) == (0.5, (1,))
    assert worst_ratio(torch.tensor([1.0]), torch.tensor([0.0]))[0] == math.inf
    assert worst_ratio(torch.tensor([math.nan]), torch.tensor([0.0]))[0] == math.inf
    assert worst_ratio(torch.tensor([math.nan]), torch.tensor([1.0]))[0] == math.inf


# ----------------------------------------------------------------------------------------------
# The analysis's values are the reference layer's
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("q_lora", [8, None])
@pytest.mark.parametrize("layout", ["interleaved", "halves"])
def test_the_analysis_computes_the_float64_layer(q_lora, layout):
    config = CONFIG.replace(q_lora_rank=q_lora, rope_layout=layout)
    weights, x = dataclasses.replace(CASE, config=config).build()
    exact = InternalPrecision.uniform(F64).resolved(F64)
    analysis = LayerAnalysis(config, _Weights.of(weights, exact, rounded=False), Bounded.exact(x, True), exact)
    out = analysis.value("out")
    reference = mla_forward(config, weights, x, mode="naive")
    assert bool(((out.value - reference).abs() <= 2 * out.error).all())


# ----------------------------------------------------------------------------------------------
# Stage bounds
# ----------------------------------------------------------------------------------------------

def test_a_correct_bf16_stage_is_within_its_bound_with_a_ratio_that_means_something():
    _, weights, x, run = _recorded()
    bounds = stage_bounds(CONFIG, weights, x, fast_layer_torch_decode(CONFIG, weights, BF16).precision, BF16,
                          run.intermediates, ("latent", "k_pe", "o"))
    for name, bounded in bounds.items():
        ratio, _ = worst_ratio((run.intermediates[name] - bounded.value).abs(), bounded.error)
        # the stage's result is rounded to bf16 once: the bound is not orders of magnitude above it
        assert 1 >= ratio > unit_roundoff(BF16) * 4, (name, ratio)


def test_a_hand_made_wrong_stage_violates_its_bound():
    """kv_norm computed without its weight (the weights are 1 ± 0.1): the latent stage fails alone."""
    layer, weights, x, run = _recorded()
    kv = x.to(BF16) @ weights.wkv_a.to(BF16).T
    wrong = rms_norm(kv[..., :CONFIG.kv_lora_rank], torch.ones(CONFIG.kv_lora_rank, dtype=F64),
                     CONFIG.rms_norm_eps).to(BF16).double()
    given = {**run.intermediates, "latent": wrong}
    bounds = stage_bounds(CONFIG, weights, x, layer.precision, BF16, given, ("latent",))
    ratio, _ = worst_ratio((wrong - bounds["latent"].value).abs(), bounds["latent"].error)
    assert ratio > 1
    with pytest.raises(LayerFailure) as caught:
        judge_layer(dataclasses.replace(run, intermediates=given), CASE, weights, x, layer.precision)
    assert caught.value.kind == "latent path" and caught.value.stage == "latent path"


def test_stages_merge_where_a_checkpoint_is_missing():
    everything = set(CHECKPOINTS) - {"out"}
    assert stage_of("o", everything) == ("attention",)
    assert stage_of("o", {"q", "latent", "k_pe_raw"}) == ("rope", "attention")  # HF's checkpoints
    assert stage_of("o", {"latent"}) == ("q path", "latent path", "rope", "attention")
    assert stage_of("out", set()) == STAGES
    assert stage_of("k_pe", {"q"}) == ("latent path", "rope")


def test_a_layer_exposing_some_checkpoints_is_judged_on_the_merged_stages():
    class Partial:
        def __init__(self, layer):
            self.layer, self.precision = layer, layer.precision

        def prefill(self, x):
            return self.layer.prefill(x)

        def decode(self, x):
            return self.layer.decode(x)

        def intermediates(self):
            return {key: value for key, value in self.layer.intermediates().items() if key in ("latent", "o")}

    def partial(config, weights, dtype, device="cpu"):
        return Partial(fast_layer_torch_decode(config, weights, dtype, device))

    report = check_layer(partial, CASE)
    assert set(report.stages) == {"latent path", "q path + latent path + rope + attention", "output projection"}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_summing_in_float32_is_what_makes_the_low_precision_bound_finite_and_tight(dtype):
    """The first form of this analysis took every sum at the module dtype's u (no bound at all in
    fp16, 10^13 too loose in bf16); the declared float32 accumulation bounds a bf16 projection by
    about one rounding of its result."""
    case = CASE.replace(dtype=dtype)
    weights, x = case.build()
    module = case.torch_dtype
    declared = InternalPrecision.for_module(module)
    a = Bounded.exact(x.to(module), sharp=False)
    w = weights.wkv_a.to(module).double()
    tight = _linear(a, w, 0.0, declared.resolved(module))
    loose = _linear(a, w, 0.0, InternalPrecision.uniform(module).resolved(module))
    observed = (x.to(module) @ weights.wkv_a.to(module).T).double() - tight.value
    ratio, _ = worst_ratio(observed.abs(), tight.error)
    assert 1 >= ratio > unit_roundoff(module) * 4
    assert bool((loose.error > tight.error).all())


def test_the_sharp_tier_is_within_the_sound_one_and_both_hold_end_to_end():
    _, weights, x, run = _recorded()
    judged = layer_error_bound(CONFIG, weights, x, fast_layer_torch_decode(CONFIG, weights, BF16).precision, BF16)
    assert bool((judged.sharp <= judged.bound.norm(dim=-1)).all())
    error = (run.out - judged.reference).abs()
    assert bool((error <= judged.bound).all()) and bool((error.norm(dim=-1) <= judged.sharp).all())


# ----------------------------------------------------------------------------------------------
# The capture helper
# ----------------------------------------------------------------------------------------------

class _Toy(nn.Module):
    """Linear layers named like DeepSeek-V3's inference/model.py MLA (wkv_a, kv_norm, wo)."""

    def __init__(self, config: MLAConfig):
        super().__init__()
        c = config
        self.wkv_a = nn.Linear(c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim, bias=False)
        self.kv_norm = nn.LayerNorm(c.kv_lora_rank)
        self.wo = nn.Linear(c.num_heads * c.v_head_dim, c.hidden_size, bias=False)
        self.config = c

    def forward(self, x):
        kv = self.wkv_a(x)
        latent = self.kv_norm(kv[..., :self.config.kv_lora_rank])
        o = latent[..., :1].repeat(1, 1, self.config.num_heads * self.config.v_head_dim)
        return self.wo(o)


def test_capture_records_the_documented_shapes_and_follows_a_replaced_submodule():
    toy = _Toy(CONFIG).double()
    capture = capture_submodules(toy, {"latent": ("kv_norm", "output"), "k_pe_raw": ("wkv_a", "output"),
                                       "o": ("wo", "input")}, CONFIG)
    x = torch.randn(2, 5, CONFIG.hidden_size, dtype=F64)
    capture.clear()
    toy(x)
    found = capture.intermediates()
    assert found["latent"].shape == (2, 5, CONFIG.kv_lora_rank)
    assert torch.equal(found["k_pe_raw"], toy.wkv_a(x)[..., CONFIG.kv_lora_rank:])
    assert found["o"].shape == (2, 5, CONFIG.num_heads, CONFIG.v_head_dim)
    toy.kv_norm = nn.Identity()  # a mutant: the tap now reads the replacement
    capture.clear()
    toy(x)
    assert torch.equal(capture.intermediates()["latent"], toy.wkv_a(x)[..., :CONFIG.kv_lora_rank])
    capture.clear()
    assert capture.intermediates() == {}


def test_capture_rejects_unknown_keys_paths_and_places():
    toy = _Toy(CONFIG)
    with pytest.raises(ValueError, match="unknown intermediate keys"):
        capture_submodules(toy, {"k": ("wo", "input")})
    with pytest.raises(ValueError, match="no submodule 'wq_b'"):
        capture_submodules(toy, {"q": ("wq_b", "output")})
    with pytest.raises(ValueError, match="'input' \\| 'output'"):
        capture_submodules(toy, {"o": ("wo", "inside")})


# ----------------------------------------------------------------------------------------------
# Declarations and cases
# ----------------------------------------------------------------------------------------------

def test_precision_classes_name_what_a_layer_computes_beyond_its_module_dtype():
    assert InternalPrecision.for_module(BF16).precision_class(BF16) == "bfloat16"
    fast = fast_layer_torch_decode(CONFIG, CASE.build()[0], BF16).precision
    assert fast.precision_class(BF16) == "bfloat16 with float64 RMSNorm/RoPE"
    hf_like = InternalPrecision.for_module(F64, rms_norm=F32, rope=F32, softmax=F32)
    assert hf_like.precision_class(F64) == "float64 with float32 RMSNorm/RoPE/softmax"
    assert InternalPrecision.uniform(BF16).precision_class(BF16) == "bfloat16 (sums in bfloat16)"


def test_a_declaration_names_its_fields_when_wrong():
    with pytest.raises(TypeError, match="InternalPrecision.p_stored must be a floating torch.dtype or None"):
        InternalPrecision.for_module(BF16, p_stored="bf16")
    with pytest.raises(TypeError, match="unknown fields \\['softmax_type'\\]"):
        InternalPrecision.for_module(BF16, softmax_type=F32)


def test_a_case_survives_json_and_a_damaged_one_names_its_field():
    case = CASE.replace(weight_scale=2.0, activation_scale=0.1)
    assert LayerCase.from_dict(json.loads(json.dumps(case.to_dict()))) == case
    data = case.to_dict()
    for path, value, message in [(("decode",), [1, 0], "'decode'"), (("dtype",), "bf16", "'dtype'"),
                                 (("weight_scale",), -1, "'weight_scale'"),
                                 (("config", "qk_rope_head_dim"), 3, "'config'.*qk_rope_head_dim"),
                                 (("config", "yarn", "factor"), 0.5, "'config.yarn'")]:
        damaged = json.loads(json.dumps(data))
        target = damaged
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        with pytest.raises(ValueError, match=message):
            LayerCase.from_dict(damaged)
    with pytest.raises(ValueError, match="unknown fields \\['page'\\]"):
        LayerCase.from_dict({**data, "page": 16})
