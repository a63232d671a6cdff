"""A zoo of bug-injected MLA decode kernels, each modelled on a real public attention-kernel bug
class, each in the decode contract's shape. tests/test_mutant_zoo.py checks that the certifier
catches every one with the expected failure kind and shrinks it to a small case.

Every kernel is written out from the building blocks of `common.correct_decode` (a correct
kernel, certified as a control) with one step broken, on the line marked BUG, so the bug is
visible at a glance; its docstring names the real-world bug it models. `benign` names a case the
bug does not reach, on which the mutant must pass: each is a targeted bug, not a broken kernel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from mla_verify.decode.checks import FailureKind, Implementation
from mla_verify.decode.contract import capabilities_of

from . import (cross_row, determinism, fp8, heads, interface, legit, lse, masking, paging, precision, scale, sparse,
               split_kv, subtle)
from .common import correct_decode

__all__ = ["ZooKernel", "ZOO", "BENIGN_CASE", "implementation", "correct_decode", "legit", "fp8", "sparse"]

K = FailureKind


@dataclass(frozen=True)
class ZooKernel:
    """A mutant, the property expected to catch it, and the failure kinds that count as caught."""

    fn: Callable
    prop: str
    kinds: frozenset
    # changes to BENIGN_CASE under which the mutant is right (None: the bug shows on every case):
    # evidence that each mutant is a targeted bug rather than a broken kernel
    benign: dict | None = None
    max_heads: int = 16  # the shrunk case needs no more heads (unless the bug is about heads)
    distinct: int = 1  # independent bugs in the kernel, each to be reported with its own case
    min_length: int = 0  # the shortest sequence on which the bug shows (serving-scale bugs)
    max_s_q: int = 2  # the shrunk case needs no more queries
    name: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", self.fn.__name__)

    @property
    def spec(self) -> str:
        return f"{self.fn.__module__}:{self.fn.__name__}"


def _zoo(fn: Callable, prop: str, *kinds: FailureKind, **extra) -> ZooKernel:
    return ZooKernel(fn, prop, frozenset(kinds), **extra)


# One float32 sequence of 5 tokens in one page of 16, one head, one query.
BENIGN_CASE = dict(dtype="float32", batch=1, s_q=1, heads=1, d=40, head_dim_v=32, page_size=16, lengths=(5,),
                   causal=False, regime="unit", scale="inverse_sqrt_d", permute_pages=False, strided_cache=False,
                   extra_blocks=0, seed=0, layout_seed=0)

M = "matches_reference"
ZOO = (
    _zoo(scale.scale_flashmla_default, M, K.WRONG_LSE, K.WRONG_VALUES, benign={}),
    _zoo(scale.scale_off_by_half_percent, M, K.WRONG_LSE, K.WRONG_VALUES, benign={"regime": "tiny"}),
    _zoo(paging.last_full_page_dropped, M, K.NONFINITE, K.WRONG_LSE, K.WRONG_VALUES, benign={}),
    _zoo(paging.reads_one_slot_past_length, M, K.NONFINITE, K.EXCEPTION, benign={"lengths": (16,)}),
    _zoo(paging.prefetches_unused_block, M, K.EXCEPTION),
    _zoo(paging.nan_padding_leaks, M, K.NONFINITE, benign={"lengths": (32,)}),
    _zoo(paging.assumes_contiguous_cache, M, K.NONFINITE, K.WRONG_LSE, K.WRONG_VALUES, benign={}),
    _zoo(paging.masks_with_batch_max_length, M, K.NONFINITE, K.WRONG_LSE, K.WRONG_VALUES,
         benign={"batch": 2, "lengths": (5, 5)}),
    _zoo(masking.empty_row_gives_nan, M, K.NONFINITE, benign={"causal": True, "s_q": 2}),
    _zoo(masking.empty_row_lse_plus_inf, M, K.WRONG_LSE, benign={"causal": True, "s_q": 2}),
    _zoo(masking.finite_minus_infinity_sentinel, M, K.NONFINITE, K.WRONG_LSE, K.WRONG_VALUES, benign={}),
    _zoo(masking.causal_top_left, M, K.WRONG_LSE, K.WRONG_VALUES, benign={"s_q": 2}),
    _zoo(masking.causal_excludes_own_position, M, K.NONFINITE, K.WRONG_LSE, K.WRONG_VALUES, benign={"s_q": 2}),
    _zoo(lse.lse_base2, M, K.WRONG_LSE),
    _zoo(lse.lse_through_bf16, M, K.WRONG_LSE),
    _zoo(precision.pv_accumulated_in_fp16, M, K.WRONG_VALUES),
    _zoo(precision.tf32_scores, M, K.WRONG_LSE, K.WRONG_VALUES, benign={"dtype": "bfloat16"}),
    _zoo(split_kv.merge_without_rescale, M, K.WRONG_LSE, K.WRONG_VALUES, benign={"lengths": (1,)}),
    _zoo(split_kv.empty_split_counted, M, K.WRONG_LSE, K.WRONG_VALUES, benign={"lengths": (4,)}),
    # needs h > 16: shrinks to 17 (see test_head_tail_shrinks_to_the_first_partial_group)
    _zoo(heads.head_tail_dropped, M, K.WRONG_LSE, K.WRONG_VALUES, benign={"heads": 32}, max_heads=17),
    _zoo(interface.q_scaled_in_place, M, K.INPUT_MODIFIED, benign={"scale": "one"}),
    _zoo(interface.out_in_float32, M, K.WRONG_SHAPE, benign={}),
    _zoo(interface.v_from_wrong_columns, M, K.WRONG_VALUES),
    _zoo(interface.scores_without_rope, M, K.WRONG_LSE, K.WRONG_VALUES),
    # what the unwritten rows hold depends on the allocator, so its shrinking is not reproducible
    _zoo(interface.out_rows_left_unwritten, M, K.WRONG_VALUES, K.NONFINITE, benign={"heads": 16}, max_s_q=4),
    _zoo(determinism.atomic_split_accumulation, "deterministic", K.NONDETERMINISM, benign={"lengths": (2,)}),
    _zoo(cross_row.softmax_max_over_batch, "rows_independent", K.CROSS_ROW_DEPENDENCE,
         benign={"batch": 2, "lengths": (5, 0)}),
    # subtle bugs under the worst-case bound at serving scale: the sharp tier (or the search's
    # serving-scale share) must find them
    _zoo(subtle.token_dropped_from_4096, M, K.WRONG_LSE, K.WRONG_VALUES, benign={"lengths": (4095,)},
         min_length=32768),
    _zoo(subtle.scale_off_by_1e3, M, K.WRONG_LSE, K.WRONG_VALUES),
    _zoo(subtle.pv_accumulated_in_bf16_tiles, M, K.WRONG_VALUES, benign={"dtype": "bfloat16", "lengths": (64,)}),
    _zoo(subtle.normaliser_in_bf16, M, K.WRONG_LSE, K.WRONG_VALUES, benign={"dtype": "bfloat16", "lengths": (1,)},
         min_length=300),
    _zoo(subtle.late_rescale, M, K.WRONG_LSE, K.WRONG_VALUES, benign={"lengths": (4096,)}, min_length=32768),
    # two independent bugs (vLLM's Triton MLA, seen on an H200): both must be reported, each with its own case
    # (its second failure may be met first in a serving-scale case, whose lengths shrink only to half the cap)
    _zoo(subtle.two_bugs_empty_nan_and_one_head_bf16_scores, M, K.NONFINITE, K.WRONG_LSE, K.WRONG_VALUES,
         benign={"heads": 2}, distinct=2, min_length=16384),
    # FP8 latent caches (mla_verify.decode.fp8): each benign where its misreading changes nothing
    _zoo(fp8.scales_per_64_values, M, K.WRONG_LSE, K.WRONG_VALUES, K.NONFINITE, benign={"kv_format": "fp8_ds_mla"}),
    _zoo(fp8.scales_rounded_to_power_of_two, M, K.WRONG_LSE, K.WRONG_VALUES,
         benign={"kv_format": "fp8_ds_mla", "fp8_scales": "power_of_two"}),
    _zoo(fp8.rope_part_quantized, M, K.WRONG_LSE, K.WRONG_VALUES, benign={"kv_format": "native"}),
    _zoo(fp8.v_not_dequantized, M, K.WRONG_VALUES, benign={"kv_format": "native"}),
    # found on the H200 in the project's Triton kernel: > 32 query rows over an fp8_ds_mla cache
    _zoo(fp8.many_rows_out_of_shared_memory, M, K.EXCEPTION, benign={"kv_format": "fp8_ds_mla"}, max_heads=33,
         max_s_q=4),
    _zoo(fp8.quantizer_writes_power_of_two_scales, "quantizer_matches_format", K.QUANTIZER_OUT_OF_SPEC),
    # sparse (top-k) decode (mla_verify.decode.sparse)
    _zoo(sparse.minus_one_reads_slot_zero, M, K.NONFINITE, K.WRONG_LSE, K.WRONG_VALUES,
         benign={"topk": 5, "index_pattern": "all_visible"}),
    _zoo(sparse.reads_indices_past_the_pool, "invalid_indices_ignored", K.INVALID_INDEX_USED, K.EXCEPTION,
         K.NONFINITE, benign={"topk": 1}),  # one valid entry and no -1 to replace
    # only the causal limit tells the queries' lists apart in sparse ≡ dense: caught on causal s_q ≥ 2
    _zoo(sparse.one_index_list_for_every_query, "sparse_matches_dense", K.SPARSE_DENSE_MISMATCH,
         benign={"topk": 5, "index_pattern": "subset"}),
)


def implementation(fn: Callable, name: str | None = None) -> Implementation:
    """An Implementation for a zoo kernel (or the control), with its declared capabilities."""
    return Implementation(name=name or fn.__name__, spec=f"{fn.__module__}:{fn.__name__}", fn=fn,
                          capabilities=capabilities_of(fn))
