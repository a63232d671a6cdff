"""FP8 latent caches and sparse decode: the formats, the quantiser, the contract's validation, the
index rules on the float64 reference, the inputs the suite builds and the properties on the
project's torch kernel."""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings, strategies as st

from mla_verify.decode.case import DecodeCase
from mla_verify.decode.checks import Implementation
from mla_verify.decode.contract import Capabilities, capabilities_of, check_signature, declare, validate_decode_inputs
from mla_verify.decode.fp8 import (E4M3_MAX, dequantize, e4m3_half_step, packed_width, quantize, quantizer_errors,
                                   reference_scales, round_to_e4m3, split_packed)
from mla_verify.decode.inputs import build_inputs
from mla_verify.decode.properties import check, properties_for, sparse_variant
from mla_verify.decode.sparse import CANARY_BLOCKS, query_limits
from mla_verify.decode.strategies import case_supported, decode_cases
from mla_verify.impls.torch_decode import torch_paged_decode
from mla_verify.reference import decode_reference, paged_decode_reference

TORCH = Implementation("torch", "mla_verify.impls.torch_decode:torch_paged_decode", torch_paged_decode,
                       capabilities_of(torch_paged_decode))
BASE = dict(dtype="bfloat16", batch=2, s_q=2, heads=3, d=40, head_dim_v=32, page_size=4, lengths=(5, 9), causal=True,
            regime="unit", scale="inverse_sqrt_d", permute_pages=True, strided_cache=True, extra_blocks=1, seed=3,
            layout_seed=4, pooled_cache=True)


def case(**changes) -> DecodeCase:
    return DecodeCase(**{**BASE, **changes})


# ----------------------------------------------------------------------------------------------
# Formats and the quantiser
# ----------------------------------------------------------------------------------------------

def test_v32_row_is_656_bytes_and_the_views_share_it():
    assert packed_width(576, 512) == 512 + 4 * 4 + 64 * 2 == 656
    cache = torch.zeros(3, 64, 1, 656, dtype=torch.float8_e4m3fn)
    latent, scales, rope = split_packed(cache, 576, 512)
    assert (latent.shape[-1], scales.shape[-1], rope.shape[-1]) == (512, 4, 64)
    assert (latent.dtype, scales.dtype, rope.dtype) == (torch.float8_e4m3fn, torch.float32, torch.bfloat16)
    scales[1, 2, 0, 3] = 0.25
    assert cache.view(torch.uint8)[1, 2, 0, 512 + 12:512 + 16].view(torch.float32).item() == 0.25


def test_dequantisation_is_exact_in_float64_but_may_round_in_float32():
    """e4m3 (4 significant bits) × float32 scale (24) has up to 28 bits: exact in float64, not
    always in float32 (the issue's 'exact in float32' holds only for scales of ≤ 21 bits)."""
    g = torch.Generator().manual_seed(0)
    codes = (torch.randn(4096, generator=g) * 100).to(torch.float8_e4m3fn)
    scale = torch.tensor([1 + 2.0 ** -23], dtype=torch.float32)  # 24 significant bits
    exact = [Fraction(float(c)) * Fraction(float(scale)) for c in codes.float()]
    in64 = dequantize(codes, "fp8_e4m3", 1, 1, scale)
    assert all(Fraction(float(x)) == e for x, e in zip(in64, exact))
    in32 = codes.float() * scale
    assert any(Fraction(float(x)) != e for x, e in zip(in32, exact))


def test_rounding_to_e4m3_is_round_to_nearest_even_with_saturation():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(100_000, generator=g, dtype=torch.float32) * 100
    assert torch.equal(round_to_e4m3(x.double()), x.to(torch.float8_e4m3fn).double())  # float32 inputs: torch's RNE
    assert round_to_e4m3(torch.tensor([1e6, -500.0], dtype=torch.float64)).tolist() == [E4M3_MAX, -E4M3_MAX]
    # a float64 just above the tie 1.0625 rounds up; through float32 it would tie and round to even 1.0
    above_tie = torch.tensor([1 + 2.0 ** -4 + 2.0 ** -30], dtype=torch.float64)
    assert round_to_e4m3(above_tie).item() == 1.125
    assert above_tie.float().to(torch.float8_e4m3fn).float().item() == 1.0


def test_reference_quantiser_meets_its_own_format():
    g = torch.Generator().manual_seed(2)
    values = torch.randn(50, 576, generator=g).to(torch.bfloat16)
    values[3, 128:256] = 0  # an all-zero group
    codes = quantize(values, 512, "fp8_ds_mla")
    ratio, problem = quantizer_errors(values, codes, 512, "fp8_ds_mla")
    assert problem == "" and ratio <= 1
    latent, scales, rope = split_packed(codes, 576, 512)
    assert scales[3, 1].item() == 1.0 and not latent[3, 128:256].float().any()
    assert torch.equal(rope.view(torch.int16), values[:, 512:].view(torch.int16))  # bf16 rope kept bit for bit
    amax = values[:, :512].double().abs().reshape(50, 4, 128).amax(-1)
    assert torch.equal(scales, reference_scales(amax))


def test_quantizer_errors_name_what_is_wrong():
    g = torch.Generator().manual_seed(3)
    values = torch.randn(20, 576, generator=g).to(torch.bfloat16)
    power_of_two = quantize(values, 512, "fp8_ds_mla", power_of_two=True)
    ratio, problem = quantizer_errors(values, power_of_two, 512, "fp8_ds_mla")
    assert math.isinf(ratio) and "not rounded to a power of two" in problem
    assert quantizer_errors(values, power_of_two, 512, "fp8_ds_mla", scale_format="power_of_two")[1] == ""
    rope_quantized = quantize(values, 512, "fp8_ds_mla")
    rope = split_packed(rope_quantized, 576, 512)[2]
    rope.copy_(round_to_e4m3(rope.double()).to(torch.bfloat16))
    assert "rope part" in quantizer_errors(values, rope_quantized, 512, "fp8_ds_mla")[1]
    assert "expected float8_e4m3fn [20, 656]" in quantizer_errors(values, torch.zeros(20, 576), 512, "fp8_ds_mla")[1]
    truncated = quantize(values, 512, "fp8_ds_mla")
    latent = split_packed(truncated, 576, 512)[0]
    latent.view(torch.uint8).sub_((latent.view(torch.uint8) & 0x7F > 0).to(torch.uint8))  # one step toward zero
    ratio, problem = quantizer_errors(values, truncated, 512, "fp8_ds_mla")
    assert ratio > 1 and "half e4m3 step" in problem


def test_half_step_bounds_a_correct_rounding():
    x = torch.linspace(-440, 440, 10_001, dtype=torch.float64)
    assert ((round_to_e4m3(x) - x).abs() <= e4m3_half_step(x.abs())).all()


# ----------------------------------------------------------------------------------------------
# The contract's arguments
# ----------------------------------------------------------------------------------------------

def _args(b=2, s_q=1, h=3, d=40, dv=32):
    return dict(q=torch.randn(b, s_q, h, d), block_table=torch.zeros(b, 2, dtype=torch.int32),
                cache_seqlens=torch.tensor([3] * b, dtype=torch.int32), head_dim_v=dv)


@pytest.mark.parametrize("changes, message", [
    (dict(kv_cache=torch.zeros(4, 4, 1, 40, dtype=torch.float8_e4m3fn)), "an FP8 cache needs is_fp8_kvcache=True or k_scale"),
    (dict(kv_cache=torch.zeros(4, 4, 1, 40, dtype=torch.float8_e4m3fn), is_fp8_kvcache=True), r"\[num_blocks, page_size, 1, 52\]"),
    (dict(kv_cache=torch.zeros(4, 4, 1, 52, dtype=torch.float8_e4m3fn), is_fp8_kvcache=True, k_scale=torch.ones(1)),
     "not both"),
    (dict(kv_cache=torch.zeros(4, 4, 1, 40, dtype=torch.float8_e4m3fn), k_scale=torch.ones(2)), "k_scale must be a float32 tensor of one element"),
    (dict(kv_cache=torch.zeros(4, 4, 1, 40), indices=torch.zeros(2, 1, 3)), r"indices must be int32 \[2, 1, topk\]"),
    (dict(kv_cache=torch.zeros(4, 4, 1, 40), indices=torch.full((2, 1, 3), -2, dtype=torch.int32)), "indices must be >= -1"),
    (dict(kv_cache=torch.zeros(4, 4, 1, 40), attn_sink=torch.zeros(2)), r"attn_sink must be float32 \[3\]"),
])
def test_bad_fp8_and_sparse_arguments_are_named(changes, message):
    with pytest.raises(ValueError, match=message):
        validate_decode_inputs(**{**_args(), **changes})


def test_the_format_is_returned():
    assert validate_decode_inputs(**_args(), kv_cache=torch.zeros(4, 4, 1, 40)) == "native"
    assert validate_decode_inputs(**_args(), kv_cache=torch.zeros(4, 4, 1, 52, dtype=torch.float8_e4m3fn),
                                  is_fp8_kvcache=True) == "fp8_ds_mla"
    assert validate_decode_inputs(**_args(), kv_cache=torch.zeros(4, 4, 1, 40, dtype=torch.float8_e4m3fn),
                                  k_scale=torch.ones(1)) == "fp8_e4m3"


@pytest.mark.parametrize("changes, error", [
    (dict(kv_formats=("fp4",)), "kv_formats must be a tuple of"),
    (dict(kv_formats=(), sparse_kv_formats=()), "cannot both be empty"),
    (dict(topk_values=()), "topk_values must be None or a non-empty tuple"),
    (dict(invalid_indices="clamp"), "invalid_indices must be 'ignore' or 'raise'"),
    (dict(scale_format="e8m0"), "scale_format must be"),
    (dict(max_topk=0), "max_topk must be an int >= 1"),
])
def test_bad_capabilities_are_named(changes, error):
    with pytest.raises(ValueError, match=error):
        Capabilities(**changes)


def test_declared_features_need_their_keywords():
    @declare(Capabilities(sparse_kv_formats=("native",)))
    def no_indices(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=False):
        raise AssertionError

    assert "indices" in check_signature(no_indices)
    assert check_signature(torch_paged_decode) is None


@pytest.mark.parametrize("changes, message", [
    (dict(kv_format="fp4"), "'kv_format'"),
    (dict(topk=-1), "'topk'"),
    (dict(index_pattern="random"), "'index_pattern'"),
    (dict(attn_sink="maybe"), "'attn_sink'"),
    (dict(fp8_scales="near_max", dtype="float16"), "float32's range"),
    (dict(kv_format="fp8_ds_mla", d=37, head_dim_v=21), "fp8_ds_mla layout needs"),
])
def test_case_files_with_bad_fp8_or_sparse_fields_are_named(changes, message):
    with pytest.raises(ValueError, match=message):
        DecodeCase.from_dict({**dataclasses.asdict(case()), **changes})


def test_case_files_from_before_fp8_still_load():
    data = dataclasses.asdict(case())
    for name in ("kv_format", "fp8_scales", "topk", "index_pattern", "attn_sink"):
        del data[name]
    assert DecodeCase.from_dict(data) == case()


# ----------------------------------------------------------------------------------------------
# Index rules and sinks on the float64 reference (exact arithmetic: q = 0 makes p uniform)
# ----------------------------------------------------------------------------------------------

def _pool():
    """One block of 4 slots holding integers; q = 0, so each query averages its listed values."""
    cache = torch.arange(4 * 6, dtype=torch.float64).reshape(1, 4, 1, 6)
    return dict(q=torch.zeros(1, 1, 2, 6, dtype=torch.float64), kv_cache=cache,
                block_table=torch.zeros(1, 1, dtype=torch.int32), cache_seqlens=torch.tensor([4], dtype=torch.int32),
                head_dim_v=4, softmax_scale=1.0)


def _sparse(indices, **extra):
    return decode_reference(**_pool(), indices=torch.tensor([[indices]], dtype=torch.int32), **extra)


def test_duplicates_count_per_occurrence_and_invalid_entries_not_at_all():
    values = _pool()["kv_cache"][0, :, 0, :4]
    out, lse = _sparse([2, 2, -1, 0, 4, 2**31 - 1, 1, -1])  # 4 is past the 4-slot pool
    assert torch.equal(out[0, 0, 0], (2 * values[2] + values[0] + values[1]) / 4)
    assert lse[0, 0, 0].item() == math.log(4)
    permuted, _ = _sparse([1, -1, 0, 2, 2**31 - 1, -1, 2, 4])
    assert torch.equal(permuted, out)


def test_a_list_with_no_valid_entry_is_a_row_that_sees_no_key():
    out, lse = _sparse([-1, 4, 7, -1])
    assert not out.any() and torch.isneginf(lse).all()


def test_every_visible_position_in_order_equals_dense():
    dense_out, dense_lse = paged_decode_reference(**_pool())
    out, lse = _sparse([0, 1, 2, 3])
    assert torch.equal(out, dense_out) and torch.equal(lse, dense_lse)


def test_sinks_scale_the_output_not_the_lse():
    plain, lse = _sparse([0, 1, 2, 3])
    sink = torch.tensor([math.inf, -math.inf], dtype=torch.float32)
    out, sunk_lse = _sparse([0, 1, 2, 3], attn_sink=sink)
    assert torch.equal(sunk_lse, lse)
    assert not out[0, 0, 0].any() and torch.equal(out[0, 0, 1], plain[0, 0, 1])
    one, _ = _sparse([2, -1, -1])  # one key of score 0: lse 0 = the sink of head 0, which halves it
    out, _ = _sparse([2, -1, -1], attn_sink=torch.tensor([0.0, -math.inf]))
    assert torch.equal(out[0, 0, 0], one[0, 0, 0] / 2) and torch.equal(out[0, 0, 1], one[0, 0, 1])


# ----------------------------------------------------------------------------------------------
# The inputs the suite builds
# ----------------------------------------------------------------------------------------------

def test_fp8_padding_slots_are_nan_bytes():
    inputs = build_inputs(case(kv_format="fp8_ds_mla", strided_cache=False, pooled_cache=False, permute_pages=False,
                               extra_blocks=0))
    raw = inputs.kv_cache.view(torch.uint8)
    assert (raw[1, 1:, 0] == 0xFF).all()  # row 0 has 5 tokens: block 1 holds one, slots 1.. are padding
    assert not (raw[1, 0, 0] == 0xFF).all()


@pytest.mark.parametrize("pattern", ["subset", "all_visible", "with_invalid", "duplicates", "last_slot"])
def test_each_querys_list_stays_inside_what_the_dense_rules_let_it_see(pattern):
    c = case(topk=11, index_pattern=pattern, lengths=(5, 9, 13), batch=3, s_q=3)
    inputs = build_inputs(c)
    num_blocks, page = inputs.kv_cache.shape[:2]
    shared = set(range((num_blocks - 1) * page, num_blocks * page))
    for row, length in enumerate(c.lengths):
        positions = torch.arange(length)
        slots = (inputs.block_table[row, positions // page].long() * page + positions % page).tolist()
        for query, limit in enumerate(query_limits(length, c.s_q, c.causal)):
            listed = inputs.indices[row, query].tolist()
            valid = [i for i in listed if 0 <= i < num_blocks * page]
            assert all(i in slots[:limit] or (pattern == "last_slot" and i in shared) for i in valid)
            if pattern == "with_invalid":
                assert any(i >= num_blocks * page for i in listed)
            if pattern == "last_slot":
                assert num_blocks * page - 1 in listed
            if pattern == "all_visible":
                assert valid == slots[max(0, limit - c.topk):limit]


def test_indices_just_past_the_pool_land_in_canary_blocks():
    inputs = build_inputs(case(topk=11, index_pattern="with_invalid", pooled_cache=False))
    num_blocks = inputs.kv_cache.shape[0]
    assert inputs.cache_buffer.shape[1] == num_blocks + CANARY_BLOCKS
    assert inputs.cache_buffer[0, num_blocks:].isnan().all()


def test_lists_follow_the_pages_and_belong_to_their_row():
    c = case(topk=7, index_pattern="subset", batch=3, lengths=(5, 9, 6))
    first, moved = build_inputs(c), build_inputs(c, layout_seed=99)
    redrawn = build_inputs(c, redraw_rows={1: 77})
    page = c.page_size

    def logical(inputs, row):
        table = inputs.block_table[row].long()
        return [(table == i // page).nonzero()[0].item() * page + i % page if 0 <= i < table.max() * page + page
                else i for i in inputs.indices[row].flatten().tolist()]

    assert logical(first, 0) == logical(moved, 0)
    assert torch.equal(first.indices[0], redrawn.indices[0]) and torch.equal(first.indices[2], redrawn.indices[2])


# ----------------------------------------------------------------------------------------------
# Strategies and properties
# ----------------------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_drawn_cases_stay_inside_the_declaration(data):
    caps = Capabilities(kv_formats=(), sparse_kv_formats=("fp8_ds_mla",), topk_values=(64, 128),
                        dtypes=(torch.bfloat16, torch.float16))
    drawn = data.draw(decode_cases(caps))
    assert case_supported(caps, drawn) and drawn.sparse and drawn.kv_format == "fp8_ds_mla"
    assert drawn.topk in (64, 128) and drawn.attn_sink == "none"
    assert drawn.fp8_scales not in ("near_min", "near_max") or drawn.dtype == "bfloat16"


@settings(max_examples=60, deadline=None)
@given(drawn=decode_cases(Capabilities()))
def test_a_kernel_of_the_original_contract_draws_original_cases(drawn):
    assert (drawn.kv_format, drawn.topk, drawn.attn_sink) == ("native", 0, "none")


def test_the_fp8_and_sparse_properties_apply_to_what_a_kernel_declares():
    assert [p.name for p in properties_for(TORCH)][4:] == ["sparse_matches_dense", "index_order_invariant",
                                                          "invalid_indices_ignored", "quantizer_matches_format"]
    plain = Implementation("plain", "x", TORCH.fn, Capabilities())
    assert [p.name for p in properties_for(plain)] == ["matches_reference", "page_order_invariant",
                                                       "rows_independent", "deterministic"]


def test_sparse_variant_covers_every_visible_position():
    caps = Capabilities(kv_formats=(), sparse_kv_formats=("fp8_ds_mla",), topk_values=(8, 64))
    variant = sparse_variant(case(lengths=(5, 9)), caps, "all_visible")
    assert (variant.topk, variant.kv_format, variant.lengths) == (64, "fp8_ds_mla", (5, 9))
    small = sparse_variant(case(lengths=(5, 90)), caps.replace(topk_values=(8,)), "all_visible")
    assert small.topk == 8 and small.lengths == (5, 8)


@pytest.mark.parametrize("changes", [
    dict(kv_format="fp8_ds_mla"), dict(kv_format="fp8_e4m3", fp8_scales="power_of_two"),
    dict(kv_format="fp8_ds_mla", fp8_scales="near_max", topk=13, index_pattern="with_invalid", attn_sink="finite"),
    dict(kv_format="fp8_e4m3", fp8_scales="near_min", topk=6, index_pattern="duplicates", attn_sink="infinite"),
    dict(kv_format="native", topk=3, index_pattern="all_invalid"),
    dict(kv_format="fp8_ds_mla", fp8_scales="zero_blocks", topk=20, index_pattern="last_slot"),
])
def test_the_torch_kernel_passes_every_property_on_fp8_and_sparse_cases(changes):
    verdicts = check(TORCH, case(**changes))
    assert [v.prop for v in verdicts] == [p.name for p in properties_for(TORCH)]
    assert all(v.passed for v in verdicts), [v.describe() for v in verdicts if not v.passed]


def test_end_to_end_error_against_the_unquantised_cache_is_reported():
    fp8 = check(TORCH, case(kv_format="fp8_ds_mla"), ("matches_reference",))[0].ratios
    native = check(TORCH, case(), ("matches_reference",))[0].ratios
    assert fp8.end_to_end_out > 0 and fp8.end_to_end_lse > 0
    assert native.end_to_end_out == native.end_to_end_lse == 0


def _raising(capabilities: Capabilities):
    @declare(capabilities)
    def kernel(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=False, *, indices=None):
        if indices is not None and bool((indices >= kv_cache.shape[0] * kv_cache.shape[1]).any()):
            raise IndexError("index past the pool")
        return torch_paged_decode(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal,
                                  indices=indices)

    return Implementation("raising", "x", kernel, capabilities)


def test_raising_on_indices_past_the_pool_passes_only_when_declared():
    sparse = Capabilities(kv_formats=("native",), sparse_kv_formats=("native",))
    bad = case(dtype="float32", topk=9, index_pattern="with_invalid")
    declared = check(_raising(sparse.replace(invalid_indices="raise")), bad)
    assert all(v.passed for v in declared), [v.describe() for v in declared]
    undeclared = check(_raising(sparse), bad, ("matches_reference",))[0]
    assert undeclared.failure is not None and undeclared.failure.kind.value == "exception raised"
