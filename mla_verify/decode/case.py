"""A decode case: the small, JSON-serialisable description of one decode call's inputs.

`mla_verify.decode.inputs.build_inputs` turns it into tensors with explicit generators;
`mla_verify.decode.strategies` draws it. Everything a replay needs is here, so a counterexample is
this description and nothing else.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from mla_verify.decode.fp8 import FP8_SCALES, KV_FORMATS
from mla_verify.decode.sparse import INDEX_PATTERNS, SINKS

__all__ = ["REGIMES", "SCALES", "Q_LAYOUTS", "SERVING_LENGTH", "DecodeCase", "dtype_name", "KV_FORMATS", "FP8_SCALES",
           "INDEX_PATTERNS", "SINKS", "WIDE_RANGE_DTYPES"]

REGIMES = ("unit", "tiny", "large", "constant_keys", "extreme_positive", "extreme_negative", "large_q",
           "below_sentinel", "late_outlier", "shifted_maxima", "boundary_keys")
# how q reaches the kernel: contiguous, a slice of a fused [q | other] projection, or a transpose
# of a [b, h, s_q, d] tensor
Q_LAYOUTS = ("contiguous", "fused", "transposed")
SCALES = ("inverse_sqrt_d", "deepseek_v3", "one")
SERVING_LENGTH = 4096  # a context this long or a batch of 32 is serving scale
# input types with float32's exponent range: the only ones FP8 scales near the float32 extremes are
# drawn for (q must hold 2^±100 to keep the logits unit-sized)
WIDE_RANGE_DTYPES = ("float64", "float32", "bfloat16")


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
    # the cache format (mla_verify.decode.fp8.KV_FORMATS) and how its FP8 scales come about
    kv_format: str = "native"
    fp8_scales: str = "amax"
    # sparse decode: 0 for dense, else the width of indices [b, s_q, topk], laid out by index_pattern
    # (mla_verify.decode.sparse.INDEX_PATTERNS)
    topk: int = 0
    index_pattern: str = "subset"
    # per-head attention sinks (mla_verify.decode.sparse.SINKS)
    attn_sink: str = "none"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def softmax_scale(self) -> float:
        return {"inverse_sqrt_d": self.d ** -0.5, "deepseek_v3": 192 ** -0.5 * (1 + 0.1 * math.log(40)) ** 2,
                "one": 1.0}[self.scale]

    @property
    def work(self) -> int:
        keys = self.topk if self.topk else max(self.lengths, default=0)
        return self.batch * self.s_q * self.heads * self.d * keys

    @property
    def sparse(self) -> bool:
        return self.topk > 0

    @property
    def fp8(self) -> bool:
        return self.kv_format != "native"

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
        for name in ("extra_blocks", "seed", "layout_seed", "topk"):
            if name in case and not (_is_int(case[name]) and case[name] >= 0):
                raise ValueError(f"case field '{name}': expected an integer ≥ 0, got {case[name]!r}")
        for name in ("causal", "permute_pages", "strided_cache", "pooled_cache", "sliced_block_table"):
            if not isinstance(case.get(name, False), bool):
                raise ValueError(f"case field '{name}': expected true or false, got {case[name]!r}")
        choices = {"dtype": ("float64", "float32", "float16", "bfloat16"), "regime": REGIMES, "scale": SCALES,
                   "q_layout": Q_LAYOUTS, "kv_format": KV_FORMATS, "fp8_scales": FP8_SCALES,
                   "index_pattern": INDEX_PATTERNS, "attn_sink": SINKS}
        for name, allowed in choices.items():
            if name in case and case[name] not in allowed:
                raise ValueError(f"case field '{name}': expected one of {list(allowed)}, got {case[name]!r}")
        if len(case["lengths"]) != case["batch"]:
            raise ValueError(f"case field 'lengths': expected batch = {case['batch']} lengths, got "
                             f"{len(case['lengths'])}")
        if case["head_dim_v"] > case["d"]:
            raise ValueError(f"case fields 'd', 'head_dim_v': expected head_dim_v ≤ d, got "
                             f"{case['head_dim_v']} > {case['d']}")
        if case.get("kv_format") == "fp8_ds_mla" and (case["head_dim_v"] % 4 or (case["d"] - case["head_dim_v"]) % 2):
            raise ValueError(f"case fields 'kv_format', 'd', 'head_dim_v': the fp8_ds_mla layout needs head_dim_v % 4 "
                             f"== 0 and an even rope width, got d={case['d']}, head_dim_v={case['head_dim_v']}")
        if case.get("fp8_scales") in ("near_min", "near_max") and case["dtype"] not in WIDE_RANGE_DTYPES:
            raise ValueError(f"case fields 'fp8_scales', 'dtype': scales near the float32 extremes need a dtype with "
                             f"float32's range {list(WIDE_RANGE_DTYPES)}, got {case['dtype']!r}")
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
                                                      ("sliced-table", self.sliced_block_table),
                                                      (f"kv={self.kv_format} scales={self.fp8_scales}", self.fp8),
                                                      (f"topk={self.topk} indices={self.index_pattern}", self.sparse),
                                                      (f"sink={self.attn_sink}", self.attn_sink != "none")) if on)
        return (f"{self.dtype} b={self.batch} s_q={self.s_q} h={self.heads} d={self.d}/{self.head_dim_v} "
                f"page={self.page_size} lengths={lengths} causal={self.causal} "
                f"regime={self.regime} scale={self.scale} permuted={self.permute_pages} "
                f"strided={self.strided_cache}{layout} seed={self.seed}")
