"""Hypothesis strategies: draw a decode-case description, never tensors.

Shrinking works on the description (`mla_verify.decode.case.DecodeCase`): every choice lists its
simplest option first (batch 1, one head, the first declared dtype, unit-scale values, pages in
order), so a failure shrinks to a case a person can read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import assume, strategies as st

from mla_verify.decode.case import (FP8_SCALES, INDEX_PATTERNS, Q_LAYOUTS, REGIMES, SCALES, SERVING_LENGTH, SINKS,
                                    WIDE_RANGE_DTYPES, DecodeCase, dtype_name)
from mla_verify.decode.contract import Capabilities

__all__ = ["SPECIAL_HEADS", "DEFAULT_PAGES", "DEFAULT_WIDTHS", "SPECIAL_TOPK", "CaseLimits", "decode_cases",
           "case_supported", "pinned_cases"]

# the anchors' head counts, plus 17 (one past a 16-head group), MiniCPM3's 40 / GLM's 20 (a bug
# needing more than one head group shrinks to the first partial group) and 2, 4 (s_q == h hides
# layout mix-ups)
SPECIAL_HEADS = (1, 2, 3, 4, 9, 16, 17, 20, 40, 63, 64, 65, 126, 128)
DEFAULT_PAGES = (16, 64, 1, 4, 7, 128)
# (d, head_dim_v): small widths for speed, the real 576/512, and MiniCPM3's 288/256.
DEFAULT_WIDTHS = ((40, 32), (80, 64), (576, 512), (24, 8), (288, 256))
# top-k widths: one entry, widths that are no multiple of any tile (7, 63, 65, 100), tile sizes,
# and DeepSeek-V3.2's 2048
SPECIAL_TOPK = (1, 7, 16, 63, 64, 65, 100, 128, 2048)


@dataclass(frozen=True)
class CaseLimits:
    """Size caps set by the profile: the longest sequence, the largest batch, and the work
    b·s_q·h·d·L allowed in one case (keeps the float64 reference fast on a CPU). A share of the
    examples (`serving_share`, 0 for none) are serving-scale cases under their own caps: batches
    to `serving_batch`, sequences to `serving_len`, s_q to `serving_s_q`, work to `serving_work`."""

    max_len: int = 600
    max_batch: int = 4
    max_s_q: int = 4
    max_work: int = 40_000_000
    serving_share: float = 0.0
    serving_len: int = 32768
    serving_batch: int = 128
    serving_s_q: int = 8
    serving_work: int = 100_000_000


def _lengths(page_size: int, max_len: int) -> st.SearchStrategy[int]:
    special = [n for n in (1, 0, page_size - 1, page_size, page_size + 1, 2 * page_size,
                           3 * page_size - 1, 4 * page_size + 1) if 0 <= n <= max_len]
    return st.one_of(st.sampled_from(special), st.integers(0, max_len))


@st.composite
def decode_cases(draw: st.DrawFn, capabilities: Capabilities, limits: CaseLimits = CaseLimits(),
                 device: str = "cpu", min_batch: int = 1) -> DecodeCase:
    """A decode case the implementation claims to support, within the profile's limits; a share
    of them at serving scale (large batches, long contexts, multi-token decode)."""
    serving = limits.serving_share > 0 and draw(
        st.integers(0, 999).map(lambda x: x >= 1000 * (1 - limits.serving_share)), label="serving_scale")
    dtype = draw(st.sampled_from([dtype_name(t) for t in capabilities.dtypes]), label="dtype")
    widths = capabilities.head_dims or DEFAULT_WIDTHS
    d, head_dim_v = draw(st.sampled_from(widths), label="widths")
    if capabilities.head_counts is not None:
        heads = draw(st.sampled_from(capabilities.head_counts), label="heads")
    else:
        special = [h for h in SPECIAL_HEADS if h <= capabilities.max_heads]
        heads = draw(st.one_of(st.sampled_from(special), st.integers(1, capabilities.max_heads)), label="heads")
    pages = capabilities.page_sizes or DEFAULT_PAGES
    page_size = draw(st.sampled_from(pages), label="page_size")
    max_batch, max_s_q, max_len, max_work = ((limits.serving_batch, limits.serving_s_q, limits.serving_len,
                                              limits.serving_work) if serving else
                                             (limits.max_batch, limits.max_s_q, limits.max_len, limits.max_work))
    batch = draw(st.integers(min_batch, max(max_batch, min_batch)), label="batch")
    s_q = draw(st.integers(1, min(capabilities.max_s_q, max_s_q)), label="s_q")
    causal = draw(st.booleans(), label="causal") if capabilities.causal else False
    max_len = min(max_len, max(max_work // (batch * s_q * heads * d), page_size + 1))
    if serving:
        # long rows: near the cap (half of them, the rows where a bug past a length threshold shows
        # most), else anywhere from 4096 tokens (or an eighth of the cap) up, so that every band of
        # serving lengths is met
        near_cap = st.integers(max_len // 2, max_len)
        long = near_cap if max_len < 8192 else st.one_of(near_cap, st.integers(max(SERVING_LENGTH, max_len // 8),
                                                                               max_len))
        lengths = tuple(draw(st.lists(st.one_of(long, _lengths(page_size, max_len)), min_size=batch,
                                      max_size=batch), label="lengths"))
    else:
        lengths = tuple(draw(st.lists(_lengths(page_size, max_len), min_size=batch, max_size=batch),
                             label="lengths"))
    regime = draw(st.sampled_from(REGIMES), label="regime")
    scale = draw(st.sampled_from(SCALES), label="scale")
    permute_pages = draw(st.booleans(), label="permute_pages")
    strided = draw(st.booleans(), label="strided_cache") if capabilities.strided_cache else False
    extra_blocks = draw(st.integers(0, 3), label="extra_blocks")
    seed = draw(st.integers(0, 2**31 - 1), label="seed")
    layout_seed = draw(st.integers(0, 2**31 - 1), label="layout_seed")
    q_layout = draw(st.sampled_from(Q_LAYOUTS), label="q_layout")
    pooled = draw(st.booleans(), label="pooled_cache")
    sliced_table = draw(st.booleans(), label="sliced_block_table")
    case = DecodeCase(dtype=dtype, batch=batch, s_q=s_q, heads=heads, d=d, head_dim_v=head_dim_v,
                      page_size=page_size, lengths=lengths, causal=causal, regime=regime, scale=scale,
                      permute_pages=permute_pages, strided_cache=strided, extra_blocks=extra_blocks,
                      seed=seed, layout_seed=layout_seed, device=device, q_layout=q_layout, pooled_cache=pooled,
                      sliced_block_table=sliced_table)
    if capabilities.kv_formats == ("native",) and not capabilities.sparse and not capabilities.attn_sink:
        return case  # the original contract: nothing more is drawn (its examples stay as they were)
    return draw(_fp8_sparse_fields(case, capabilities, max_work if not serving else limits.serving_work))


def _packable(case: DecodeCase) -> bool:
    return case.head_dim_v % 4 == 0 and (case.d - case.head_dim_v) % 2 == 0


@st.composite
def _fp8_sparse_fields(draw: st.DrawFn, case: DecodeCase, capabilities: Capabilities, max_work: int) -> DecodeCase:
    """The cache format, scale regime, top-k layout and sinks, inside what the kernel declares."""
    dense_ok = bool(capabilities.kv_formats)
    sparse = capabilities.sparse and (not dense_ok or draw(st.booleans(), label="sparse"))
    formats = [f for f in (capabilities.sparse_kv_formats if sparse else capabilities.kv_formats)
               if f != "fp8_ds_mla" or _packable(case)]
    if not formats:  # the drawn widths fit no declared format of this mode (odd widths)
        assume(dense_ok and "native" in capabilities.kv_formats)
        return case
    kv_format = draw(st.sampled_from(formats), label="kv_format")
    fp8_scales = "amax"
    if kv_format != "native":
        wide = (case.dtype in WIDE_RANGE_DTYPES
                and dtype_name(capabilities.dequant_for(case.torch_dtype)) in WIDE_RANGE_DTYPES)
        fp8_scales = draw(st.sampled_from([r for r in FP8_SCALES if wide or not r.startswith("near")]),
                          label="fp8_scales")
    topk, pattern = 0, "subset"
    if sparse:
        cap = max(1, min(capabilities.max_topk, max_work // max(case.batch * case.s_q * case.heads * case.d, 1)))
        if capabilities.topk_values is not None:
            allowed = [k for k in capabilities.topk_values if k <= cap] or [min(capabilities.topk_values)]
            topk = draw(st.sampled_from(allowed), label="topk")
        else:
            special = [k for k in SPECIAL_TOPK if k <= cap]
            topk = draw(st.one_of(st.sampled_from(special), st.integers(1, cap)), label="topk")
        pattern = draw(st.sampled_from(INDEX_PATTERNS), label="index_pattern")
    sink = draw(st.sampled_from(SINKS), label="attn_sink") if capabilities.attn_sink else "none"
    return case.replace(kv_format=kv_format, fp8_scales=fp8_scales, topk=topk, index_pattern=pattern,
                        attn_sink=sink)


def case_supported(capabilities: Capabilities, case: DecodeCase) -> bool:
    """Whether `case` lies within what the implementation declares (pinned examples use this)."""
    return (case.torch_dtype in capabilities.dtypes and capabilities.supports_heads(case.heads)
            and capabilities.supports_page(case.page_size) and capabilities.supports_dims(case.d, case.head_dim_v)
            and case.s_q <= capabilities.max_s_q and (capabilities.causal or not case.causal or case.sparse)
            and (capabilities.strided_cache or not case.strided_cache)
            and any(case.device.split(":")[0] == device for device in capabilities.devices)
            and capabilities.supports_format(case.kv_format, case.sparse)
            and (not case.sparse or capabilities.supports_topk(case.topk))
            and (capabilities.attn_sink or case.attn_sink == "none"))


def pinned_cases(capabilities: Capabilities, device: str = "cpu", min_batch: int = 1) -> list[DecodeCase]:
    """Regression cases every run tries first (Hypothesis explicit examples), adapted to what the
    implementation declares: every row empty with no block in the pool (the bound once crashed on
    an empty gather; vLLM's Triton MLA returns NaN there, FlashMLA crashes), one head over a key and
    over a page and one (vLLM's one-head path), and a full page followed by a NaN-poisoned slot with
    causal s_q = 2."""
    dtype = dtype_name(capabilities.dtypes[0])
    d, head_dim_v = (capabilities.head_dims or DEFAULT_WIDTHS)[0]
    page = (capabilities.page_sizes or DEFAULT_PAGES)[0]
    heads = capabilities.head_counts[0] if capabilities.head_counts else 1
    base = DecodeCase(dtype=dtype, batch=max(2, min_batch), s_q=1, heads=heads, d=d, head_dim_v=head_dim_v,
                      page_size=page, lengths=(0, 0), causal=False, regime="unit", scale="inverse_sqrt_d",
                      permute_pages=False, strided_cache=False, extra_blocks=0, seed=0, layout_seed=0,
                      device=device)
    # one head over keys: vLLM's Triton MLA takes its MHA path there and rounds the scores to bf16
    cases = [base, base.replace(lengths=(1, page + 1), permute_pages=True)]
    if capabilities.causal and capabilities.max_s_q >= 2:
        cases.append(base.replace(s_q=2, causal=True, lengths=(page, page + 1), permute_pages=True, extra_blocks=2))
    # FP8 and sparse regressions, for a kernel that declares them: scales that are not powers of two;
    # a list with no valid entry next to one naming the pool's last slot (FlashMLA gives +inf there);
    # positive indices past the pool
    fp8 = [f for f in ("fp8_ds_mla", "fp8_e4m3") if f in capabilities.kv_formats]
    if fp8:
        cases.append(base.replace(kv_format=fp8[0], lengths=(page + 1, 3), permute_pages=True))
    if "fp8_ds_mla" in capabilities.kv_formats:
        # found on the H200: the project's Triton kernel could not launch its 64-row tiles over this
        # format at DeepSeek's width (shared memory), and the sharp tier once failed a correct kernel
        # that dequantises to bf16 when huge q makes every score err by hundreds
        sixteen_bit = [dtype_name(t) for t in capabilities.dtypes if t in (torch.bfloat16, torch.float16)]
        if sixteen_bit:
            cases.append(base.replace(dtype=sixteen_bit[0], heads=64, d=576, head_dim_v=512, kv_format="fp8_ds_mla",
                                      lengths=(page + 1, 3), permute_pages=True))
        # float32 outputs of ~1e-40 (scales of zero next to huge q): a kernel that flushes float32
        # subnormals to zero, as the project's Triton kernels do on the H200, once failed the sound tier
        cases.append(base.replace(dtype="float32", heads=4, d=40, head_dim_v=32, page_size=16, lengths=(300, 3),
                                  regime="large_q", kv_format="fp8_ds_mla", fp8_scales="zero_blocks",
                                  permute_pages=True))
        if min_batch <= 1:
            cases.append(DecodeCase(dtype="bfloat16", batch=1, s_q=3, heads=123, d=288, head_dim_v=256, page_size=64,
                                    lengths=(191,), causal=False, regime="large_q", scale="one", permute_pages=False,
                                    strided_cache=False, extra_blocks=3, seed=4232, layout_seed=282, device=device,
                                    kv_format="fp8_ds_mla", fp8_scales="near_min"))
    if capabilities.sparse:
        topk = capabilities.topk_values[0] if capabilities.topk_values else min(7, capabilities.max_topk)
        sparse = base.replace(kv_format=capabilities.sparse_kv_formats[0], topk=topk, lengths=(page + 1, 3),
                              index_pattern="all_invalid")
        cases += [sparse, sparse.replace(index_pattern="last_slot"), sparse.replace(index_pattern="with_invalid")]
    return [c for c in cases if case_supported(capabilities, c)]
