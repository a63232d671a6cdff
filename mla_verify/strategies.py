"""Hypothesis strategies: draw a small decode-case description, never tensors.

A `DecodeCase` is plain data (JSON-serialisable); `mla_verify.cases.build_inputs` turns it into
tensors with explicit generators. Shrinking therefore works on the description: every choice lists
its simplest option first (batch 1, one head, the first declared dtype, unit-scale values, pages in
order), so a failure shrinks to a case a person can read.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from mla_verify.config import MLAConfig, YarnConfig
from mla_verify.contract import Capabilities

__all__ = ["REGIMES", "DecodeCase", "CaseLimits", "decode_cases", "dtype_name", "case_supported", "mla_configs",
           "pinned_cases"]

REGIMES = ("unit", "tiny", "large", "constant_keys", "extreme_positive", "extreme_negative", "large_q",
           "below_sentinel", "late_outlier", "shifted_maxima")
# the anchors' head counts, plus 17 (one past a 16-head group), MiniCPM3's 40 / GLM's 20 (a bug
# needing more than one head group shrinks to the first partial group) and 2, 4 (s_q == h hides
# layout mix-ups)
SPECIAL_HEADS = (1, 2, 3, 4, 9, 16, 17, 20, 40, 63, 64, 65, 126, 128)
# how q reaches the kernel: contiguous, a slice of a fused [q | other] projection, or a transpose
# of a [b, h, s_q, d] tensor
Q_LAYOUTS = ("contiguous", "fused", "transposed")
DEFAULT_PAGES = (16, 64, 1, 4, 7, 128)
# (d, head_dim_v): small widths for speed, the real 576/512, and MiniCPM3's 288/256.
DEFAULT_WIDTHS = ((40, 32), (80, 64), (576, 512), (24, 8), (288, 256))
SCALES = ("inverse_sqrt_d", "deepseek_v3", "one")
SERVING_LENGTH = 4096  # a context this long or a batch of 32 is serving scale


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class DecodeCase:
    """Everything needed to rebuild one decode call's inputs."""

    dtype: str
    batch: int
    s_q: int
    heads: int
    d: int
    head_dim_v: int
    page_size: int
    lengths: tuple[int, ...]
    causal: bool
    regime: str
    scale: str
    permute_pages: bool
    strided_cache: bool
    extra_blocks: int
    seed: int
    layout_seed: int
    device: str = "cpu"
    q_layout: str = "contiguous"
    # the cache is one layer of a pooled allocation (a view at a nonzero storage offset)
    pooled_cache: bool = False
    # the block table is a column slice of a wider table
    sliced_block_table: bool = False

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def softmax_scale(self) -> float:
        return {"inverse_sqrt_d": self.d ** -0.5, "deepseek_v3": 192 ** -0.5 * (1 + 0.1 * math.log(40)) ** 2,
                "one": 1.0}[self.scale]

    @property
    def work(self) -> int:
        return self.batch * self.s_q * self.heads * self.d * max(self.lengths, default=0)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> DecodeCase:
        """The case a to_dict() wrote; a hand-edited or damaged one raises ValueError naming the field."""
        if not isinstance(data, dict):
            raise ValueError(f"a case must be a JSON object, got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        missing = sorted(name for name, f in fields.items() if name not in data
                         and f.default is dataclasses.MISSING)
        if unknown or missing:
            raise ValueError("case fields: " + "; ".join(
                part for part in (f"unknown {unknown}" if unknown else "",
                                  f"missing {missing}" if missing else "") if part))
        lengths = data["lengths"]
        if not (isinstance(lengths, list | tuple) and all(_is_int(n) and n >= 0 for n in lengths)):
            raise ValueError(f"case field 'lengths': expected a list of integers ≥ 0, got {lengths!r}")
        case = {**data, "lengths": tuple(lengths)}
        for name in ("batch", "s_q", "heads", "d", "head_dim_v", "page_size"):
            if not (_is_int(case[name]) and case[name] >= 1):
                raise ValueError(f"case field '{name}': expected an integer ≥ 1, got {case[name]!r}")
        for name in ("extra_blocks", "seed", "layout_seed"):
            if not (_is_int(case[name]) and case[name] >= 0):
                raise ValueError(f"case field '{name}': expected an integer ≥ 0, got {case[name]!r}")
        for name in ("causal", "permute_pages", "strided_cache", "pooled_cache", "sliced_block_table"):
            if not isinstance(case.get(name, False), bool):
                raise ValueError(f"case field '{name}': expected true or false, got {case[name]!r}")
        choices = {"dtype": ("float64", "float32", "float16", "bfloat16"), "regime": REGIMES, "scale": SCALES,
                   "q_layout": Q_LAYOUTS}
        for name, allowed in choices.items():
            if name in case and case[name] not in allowed:
                raise ValueError(f"case field '{name}': expected one of {list(allowed)}, got {case[name]!r}")
        if len(case["lengths"]) != case["batch"]:
            raise ValueError(f"case field 'lengths': expected batch = {case['batch']} lengths, got "
                             f"{len(case['lengths'])}")
        if case["head_dim_v"] > case["d"]:
            raise ValueError(f"case fields 'd', 'head_dim_v': expected head_dim_v ≤ d, got "
                             f"{case['head_dim_v']} > {case['d']}")
        device = case.get("device", "cpu")
        if not (isinstance(device, str) and (device == "cpu" or device.split(":")[0] == "cuda")):
            raise ValueError(f"case field 'device': expected 'cpu', 'cuda' or 'cuda:N', got {device!r}")
        return cls(**case)

    def replace(self, **changes: object) -> DecodeCase:
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        lengths = list(self.lengths) if len(self.lengths) <= 8 else (
            f"[{', '.join(map(str, self.lengths[:6]))}, … {len(self.lengths)} rows, max {max(self.lengths)}]")
        layout = "".join(f" {name}" for name, on in (("q=" + self.q_layout, self.q_layout != "contiguous"),
                                                      ("pooled", self.pooled_cache),
                                                      ("sliced-table", self.sliced_block_table)) if on)
        return (f"{self.dtype} b={self.batch} s_q={self.s_q} h={self.heads} d={self.d}/{self.head_dim_v} "
                f"page={self.page_size} lengths={lengths} causal={self.causal} "
                f"regime={self.regime} scale={self.scale} permuted={self.permute_pages} "
                f"strided={self.strided_cache}{layout} seed={self.seed}")


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
    return DecodeCase(dtype=dtype, batch=batch, s_q=s_q, heads=heads, d=d, head_dim_v=head_dim_v,
                      page_size=page_size, lengths=lengths, causal=causal, regime=regime, scale=scale,
                      permute_pages=permute_pages, strided_cache=strided, extra_blocks=extra_blocks,
                      seed=seed, layout_seed=layout_seed, device=device, q_layout=q_layout, pooled_cache=pooled,
                      sliced_block_table=sliced_table)


def case_supported(capabilities: Capabilities, case: DecodeCase) -> bool:
    """Whether `case` lies within what the implementation declares (pinned examples use this)."""
    return (case.torch_dtype in capabilities.dtypes and capabilities.supports_heads(case.heads)
            and capabilities.supports_page(case.page_size) and capabilities.supports_dims(case.d, case.head_dim_v)
            and case.s_q <= capabilities.max_s_q and (capabilities.causal or not case.causal)
            and (capabilities.strided_cache or not case.strided_cache)
            and any(case.device.split(":")[0] == device for device in capabilities.devices))


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
    return [c for c in cases if case_supported(capabilities, c)]


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
