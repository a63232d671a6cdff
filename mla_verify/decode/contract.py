"""The decode-kernel contract every implementation is certified against (FlashMLA's layout).

    fn(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=False) -> (out, lse)

    q:             [b, s_q, h_q, d]                   query; latent part first, rope part last
    kv_cache:      [num_blocks, page_size, 1, d]      paged latent cache; row = [c (head_dim_v) | k_pe]
                                                      (c doubles as V; k_pe is already rotated)
    block_table:   [b, max_blocks], int32             physical block of each logical page
    cache_seqlens: [b], int32                         valid tokens per sequence
    out:           [b, s_q, h_q, head_dim_v], q.dtype
    lse:           [b, h_q, s_q], float32             log-sum-exp of the scaled scores, natural log

With causal and s_q > 1, query i sees positions < cache_seqlens - s_q + i + 1 (bottom-right
alignment). A row that sees no key returns out 0 and lse -inf (+inf if the implementation declares
it, as FlashMLA does).

FP8 caches and sparse decode, with FlashMLA's keyword names (passed only to a kernel that declares
them, so a kernel of the original contract is called exactly as before):

    is_fp8_kvcache=True  kv_cache is float8_e4m3fn [num_blocks, page_size, 1, packed] in the
                         fp8_ds_mla layout (656 bytes a token for 576/512: 512 e4m3 latent values,
                         4 float32 scales, one per 128 of them, 64 bf16 rope values; see
                         mla_verify.decode.fp8)
    k_scale              float32 tensor of one element: kv_cache is float8_e4m3fn [num_blocks,
                         page_size, 1, d], every value (latent and rope) dequantised as e4m3·k_scale
                         (vLLM's and SGLang's per-tensor layout)
    indices              int32 [b, s_q, topk]: sparse decode. Entry k of query (i, j) names a token
                         slot of the pool, block·page_size + offset (FlashMLA's convention); -1 means
                         "no token". An entry is valid iff 0 <= index < num_blocks·page_size; a
                         positive index past the pool is invalid too: the kernel must ignore it like
                         -1, or raise if it declares invalid_indices="raise", and never read it.
                         Entries below -1 are outside the contract (ValueError).
                         Query (i, j) attends to exactly its valid entries, each entry one term of
                         the softmax: a duplicated index counts once per occurrence (what a kernel
                         that loops over the list computes, and FlashMLA's reference). The order of
                         the entries does not matter. block_table and cache_seqlens are passed but do
                         not restrict a sparse query, and causal is passed as False (FlashMLA rejects
                         causal with indices): the lists carry the causal and length rules. The suite
                         draws each query's list inside what the dense rules let it see (positions
                         < cache_seqlens, and < cache_seqlens - s_q + j + 1 for query j of a causal
                         multi-token decode), plus invalid entries, plus slots of a block no
                         sequence owns; "sparse equals dense" checks the two agree. A query whose
                         list has no valid entry is a row that sees no key.
    attn_sink            float32 [h_q]: the output of head h is multiplied by
                         exp(lse) / (exp(lse) + exp(attn_sink[h])) (+inf gives out 0, -inf changes
                         nothing); the returned lse is not affected.

An implementation states what it supports with `Capabilities`, attached by `declare`; the suite
then draws only supported cases and the certificate lists what it left out. A bare function gets
`Capabilities()`: the conservative defaults below.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass
from typing import Callable, Literal, Protocol

import torch

from mla_verify.decode.fp8 import KV_FORMATS, packed_width, scale_groups

__all__ = [
    "CONTRACT_ARGUMENTS",
    "OPTIONAL_ARGUMENTS",
    "Capabilities",
    "DecodeKernel",
    "Declined",
    "declare",
    "capabilities_of",
    "declares_capabilities",
    "check_signature",
    "validate_decode_inputs",
    "quantizer_of",
]

CONTRACT_ARGUMENTS = ("q", "kv_cache", "block_table", "cache_seqlens", "head_dim_v", "softmax_scale",
                      "causal")
# keyword arguments passed only to a kernel that declares the feature (FlashMLA's names)
OPTIONAL_ARGUMENTS = ("is_fp8_kvcache", "k_scale", "indices", "attn_sink")


class Declined(Exception):
    """Raised by a kernel (or its adapter) that cleanly refuses a case it cannot run, e.g. a planner's
    "unsupported" error. The certifier counts declined cases with their reasons and keeps searching;
    NotImplementedError is read the same way. `--strict` fails a kernel that declines a case inside
    its declared capabilities."""


class DecodeKernel(Protocol):
    def __call__(self, q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                 cache_seqlens: torch.Tensor, head_dim_v: int, softmax_scale: float,
                 causal: bool = False, *, is_fp8_kvcache: bool = False, k_scale: torch.Tensor | None = None,
                 indices: torch.Tensor | None = None,
                 attn_sink: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass(frozen=True)
class Capabilities:
    """What an implementation claims to support. None means 'any'."""

    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
    devices: tuple[str, ...] = ("cpu",)
    page_sizes: tuple[int, ...] | None = None
    head_counts: tuple[int, ...] | None = None
    max_heads: int = 128
    max_s_q: int = 4
    causal: bool = True
    # (d, head_dim_v) pairs; None: any d > head_dim_v.
    head_dims: tuple[tuple[int, int], ...] | None = None
    lse_base: Literal["e", "2"] = "e"
    empty_row_lse: float = -math.inf
    deterministic: bool = True
    # Accepts a cache that is a strided view of a wider buffer.
    strided_cache: bool = True
    # Type of the score and P·V accumulators; None: float32 (float64 for float64 inputs).
    accumulation_dtype: torch.dtype | None = None
    # Type the probabilities P are rounded to before the P·V product; None: the input type (what
    # FlashMLA and vLLM's Triton MLA do). Declaring float32 tightens both tiers.
    p_dtype: torch.dtype | None = None
    # Partial results (split-KV splits, cascade levels, context-parallel ranks) rounded to this type
    # before they are merged, and how many are merged at most; None: partials stay in the
    # accumulation type (a single rounding of the output).
    partials_dtype: torch.dtype | None = None
    merged_partials: int = 1
    # --- FP8 caches and sparse decode (mla_verify.decode.fp8; the module docstring above) ---
    # cache formats accepted in dense decode: "native" (q's dtype), "fp8_ds_mla", "fp8_e4m3"
    kv_formats: tuple[str, ...] = ("native",)
    # cache formats accepted with sparse `indices`; empty: no sparse decode
    sparse_kv_formats: tuple[str, ...] = ()
    # top-k widths (indices.shape[-1]) accepted; None: any from 1 to max_topk
    topk_values: tuple[int, ...] | None = None
    max_topk: int = 2048
    # accepts `attn_sink` (in every mode it accepts)
    attn_sink: bool = False
    # a positive index past the pool: "ignore" it as -1, or "raise" (any exception) on it
    invalid_indices: Literal["ignore", "raise"] = "ignore"
    # permuting a query's index list gives a bit-identical result (else: within twice the bound)
    index_order_independent: bool = False
    # the type a dequantised FP8 value is rounded to before the dot products; None: the input type
    # (FlashMLA and vLLM's Triton MLA convert to bf16 for the tensor cores); float32 is tighter
    dequant_dtype: torch.dtype | None = None
    # the scales the implementation's quantiser writes (see `declare(..., quantizer=)`): float32
    # amax/448, or powers of two (ue8m0-style, as FlashMLA's own test quantiser writes them)
    scale_format: Literal["float32", "power_of_two"] = "float32"

    def __post_init__(self) -> None:
        if not self.dtypes:
            raise ValueError("dtypes must name at least one torch dtype")
        if self.lse_base not in ("e", "2"):
            raise ValueError(f"lse_base must be 'e' or '2'; got {self.lse_base!r}")
        if self.empty_row_lse not in (-math.inf, math.inf):
            raise ValueError(f"empty_row_lse must be -inf or +inf; got {self.empty_row_lse!r}")
        if self.max_s_q < 1 or self.max_heads < 1:
            raise ValueError("max_s_q and max_heads must be >= 1")
        if isinstance(self.merged_partials, bool) or not isinstance(self.merged_partials, int) \
                or self.merged_partials < 1:
            raise ValueError(f"merged_partials must be an int >= 1; got {self.merged_partials!r}")
        for name in ("accumulation_dtype", "p_dtype", "partials_dtype", "dequant_dtype"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, torch.dtype) and value.is_floating_point):
                raise TypeError(f"{name} must be a floating torch.dtype or None; got {value!r}")
        for name in ("kv_formats", "sparse_kv_formats"):
            formats = getattr(self, name)
            if not isinstance(formats, tuple) or any(f not in KV_FORMATS for f in formats):
                raise ValueError(f"{name} must be a tuple of {list(KV_FORMATS)}; got {formats!r}")
        if not self.kv_formats and not self.sparse_kv_formats:
            raise ValueError("kv_formats and sparse_kv_formats cannot both be empty: the kernel decodes nothing")
        if isinstance(self.max_topk, bool) or not isinstance(self.max_topk, int) or self.max_topk < 1:
            raise ValueError(f"max_topk must be an int >= 1; got {self.max_topk!r}")
        if self.topk_values is not None and not (self.topk_values and all(
                isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in self.topk_values)):
            raise ValueError(f"topk_values must be None or a non-empty tuple of ints >= 1; got {self.topk_values!r}")
        if self.invalid_indices not in ("ignore", "raise"):
            raise ValueError(f"invalid_indices must be 'ignore' or 'raise'; got {self.invalid_indices!r}")
        if self.scale_format not in ("float32", "power_of_two"):
            raise ValueError(f"scale_format must be 'float32' or 'power_of_two'; got {self.scale_format!r}")

    def replace(self, **changes: object) -> Capabilities:
        return dataclasses.replace(self, **changes)

    def accumulation_for(self, input_dtype: torch.dtype) -> torch.dtype:
        if self.accumulation_dtype is not None:
            return self.accumulation_dtype
        return torch.float64 if input_dtype == torch.float64 else torch.float32

    def p_rounding_for(self, input_dtype: torch.dtype) -> torch.dtype:
        """The type P is rounded to before P·V (never finer than the accumulation type)."""
        declared = self.p_dtype if self.p_dtype is not None else input_dtype
        accumulation = self.accumulation_for(input_dtype)
        return declared if torch.finfo(declared).eps >= torch.finfo(accumulation).eps else accumulation

    def supports_heads(self, h_q: int) -> bool:
        if self.head_counts is not None:
            return h_q in self.head_counts
        return 1 <= h_q <= self.max_heads

    def supports_page(self, page_size: int) -> bool:
        return self.page_sizes is None or page_size in self.page_sizes

    def supports_dims(self, d: int, head_dim_v: int) -> bool:
        if self.head_dims is None:
            return d > head_dim_v >= 1
        return (d, head_dim_v) in self.head_dims

    def dequant_for(self, input_dtype: torch.dtype) -> torch.dtype:
        """The type dequantised cache values are rounded to (never finer than float64)."""
        return self.dequant_dtype if self.dequant_dtype is not None else input_dtype

    @property
    def sparse(self) -> bool:
        return bool(self.sparse_kv_formats)

    def supports_format(self, kv_format: str, sparse: bool) -> bool:
        return kv_format in (self.sparse_kv_formats if sparse else self.kv_formats)

    def supports_topk(self, topk: int) -> bool:
        if self.topk_values is not None:
            return topk in self.topk_values
        return 1 <= topk <= self.max_topk


_ATTRIBUTE = "__mla_capabilities__"
_QUANTIZER = "__mla_quantizer__"


def declare(capabilities: Capabilities, *, quantizer: Callable | None = None) -> Callable[[Callable], Callable]:
    """Decorator attaching `capabilities` to a decode kernel, and optionally the quantiser that
    writes its FP8 caches:

        quantizer(values, head_dim_v, kv_format, k_scale=None) -> codes

    values [n, d] in the model's dtype; for "fp8_ds_mla" it returns float8_e4m3fn [n, packed]
    (scales chosen by the quantiser, as `Capabilities.scale_format` says), for "fp8_e4m3"
    float8_e4m3fn [n, d] quantised with the given float32 k_scale. The property
    quantizer_matches_format checks it (mla_verify.decode.properties)."""
    if not isinstance(capabilities, Capabilities):
        raise TypeError(f"capabilities must be a mla_verify.decode.contract.Capabilities; got {type(capabilities)}")
    if quantizer is not None and not callable(quantizer):
        raise TypeError(f"quantizer must be callable or None; got {type(quantizer).__name__}")

    def attach(fn: Callable) -> Callable:
        setattr(fn, _ATTRIBUTE, capabilities)
        if quantizer is not None:
            setattr(fn, _QUANTIZER, quantizer)
        return fn

    return attach


def quantizer_of(fn: Callable) -> Callable | None:
    """The FP8 quantiser declared with the kernel, or None."""
    quantizer = getattr(fn, _QUANTIZER, None)
    return quantizer if callable(quantizer) else None


def declares_capabilities(fn: Callable) -> bool:
    """Whether `fn` carries a declaration (a bare function gets the defaults instead)."""
    return isinstance(getattr(fn, _ATTRIBUTE, None), Capabilities)


def capabilities_of(fn: Callable) -> Capabilities:
    declared = getattr(fn, _ATTRIBUTE, None)
    return declared if isinstance(declared, Capabilities) else Capabilities()


def check_signature(fn: object, capabilities: Capabilities | None = None) -> str | None:
    """None if `fn` can be called with the contract's arguments (and the keywords its capabilities
    declare: is_fp8_kvcache, k_scale, indices, attn_sink), else a one-line reason."""
    if not callable(fn):
        return f"expected a callable decode kernel, got {type(fn).__name__}"
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return None  # builtins and extension functions: trust them, the call will tell
    try:
        signature.bind(*range(6), causal=False)
    except TypeError as error:
        return (f"expected fn(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, "
                f"causal=False); {error}")
    keywords = _declared_keywords(capabilities or capabilities_of(fn))
    if keywords:
        try:
            signature.bind(*range(6), causal=False, **{name: None for name in keywords})
        except TypeError as error:
            return f"the declared capabilities need keyword arguments {list(keywords)}; {error}"
    return None


def _declared_keywords(capabilities: Capabilities) -> tuple[str, ...]:
    formats = set(capabilities.kv_formats) | set(capabilities.sparse_kv_formats)
    return tuple(name for name, used in (("is_fp8_kvcache", "fp8_ds_mla" in formats),
                                         ("k_scale", "fp8_e4m3" in formats), ("indices", capabilities.sparse),
                                         ("attn_sink", capabilities.attn_sink)) if used)


def _fail(argument: str, expected: str, tensor: torch.Tensor) -> None:
    raise ValueError(f"{argument} must be {expected}; got shape {tuple(tensor.shape)}, dtype {tensor.dtype}")


def validate_decode_inputs(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                           cache_seqlens: torch.Tensor, head_dim_v: int, *, is_fp8_kvcache: bool = False,
                           k_scale: torch.Tensor | None = None, indices: torch.Tensor | None = None,
                           attn_sink: torch.Tensor | None = None) -> str:
    """Raise ValueError/TypeError naming the argument when the inputs break the contract's layout;
    return the cache format ("native", "fp8_ds_mla" or "fp8_e4m3")."""
    for name, value in (("q", q), ("kv_cache", kv_cache), ("block_table", block_table),
                        ("cache_seqlens", cache_seqlens)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(value).__name__}")
    if q.dim() != 4:
        _fail("q", "[b, s_q, h_q, d]", q)
    b, s_q, h_q, d = q.shape
    if not q.is_floating_point():
        _fail("q", "a floating-point tensor [b, s_q, h_q, d]", q)
    if isinstance(head_dim_v, bool) or not isinstance(head_dim_v, int) or not 1 <= head_dim_v <= d:
        raise ValueError(f"head_dim_v must be an int in [1, {d}] (d of q); got {head_dim_v!r}")
    kv_format = _cache_format(q, kv_cache, head_dim_v, is_fp8_kvcache, k_scale)
    if block_table.dim() != 2 or block_table.shape[0] != b or block_table.dtype != torch.int32:
        _fail("block_table", f"int32 [{b}, max_blocks]", block_table)
    if cache_seqlens.shape != (b,) or cache_seqlens.dtype != torch.int32:
        _fail("cache_seqlens", f"int32 [{b}]", cache_seqlens)
    if b and int(cache_seqlens.min()) < 0:
        raise ValueError(f"cache_seqlens must be >= 0; got {cache_seqlens.tolist()}")
    page_size = kv_cache.shape[1]
    if b and int(cache_seqlens.max()) > block_table.shape[1] * page_size:
        raise ValueError(f"cache_seqlens must be <= max_blocks·page_size = "
                         f"{block_table.shape[1] * page_size}; got max {int(cache_seqlens.max())}")
    if indices is not None:
        if not isinstance(indices, torch.Tensor):
            raise TypeError(f"indices must be a torch.Tensor or None; got {type(indices).__name__}")
        if indices.dim() != 3 or indices.shape[:2] != (b, s_q) or indices.shape[2] < 1 or indices.dtype != torch.int32:
            _fail("indices", f"int32 [{b}, {s_q}, topk] with topk >= 1", indices)
        if indices.numel() and int(indices.min()) < -1:
            raise ValueError(f"indices must be >= -1 (-1: no token); got min {int(indices.min())}")
    if attn_sink is not None:
        if not isinstance(attn_sink, torch.Tensor):
            raise TypeError(f"attn_sink must be a torch.Tensor or None; got {type(attn_sink).__name__}")
        if attn_sink.shape != (h_q,) or attn_sink.dtype != torch.float32:
            _fail("attn_sink", f"float32 [{h_q}] (one per query head)", attn_sink)
    return kv_format


def _cache_format(q: torch.Tensor, kv_cache: torch.Tensor, head_dim_v: int, is_fp8_kvcache: bool,
                  k_scale: torch.Tensor | None) -> str:
    d = q.shape[-1]
    if is_fp8_kvcache and k_scale is not None:
        raise ValueError("pass either is_fp8_kvcache=True (the fp8_ds_mla layout) or k_scale (the per-tensor "
                         "fp8_e4m3 layout), not both")
    if is_fp8_kvcache:
        width = packed_width(d, head_dim_v)
        if kv_cache.dim() != 4 or kv_cache.shape[2] != 1 or kv_cache.shape[3] != width:
            _fail("kv_cache", f"[num_blocks, page_size, 1, {width}] (fp8_ds_mla: {head_dim_v} e4m3 + "
                  f"{4 * scale_groups(head_dim_v)} scale bytes + {2 * (d - head_dim_v)} bf16 rope bytes)", kv_cache)
        if kv_cache.dtype != torch.float8_e4m3fn:
            _fail("kv_cache", "float8_e4m3fn (is_fp8_kvcache=True)", kv_cache)
        return "fp8_ds_mla"
    if kv_cache.dim() != 4 or kv_cache.shape[2] != 1 or kv_cache.shape[3] != d:
        _fail("kv_cache", f"[num_blocks, page_size, 1, {d}] (d of q)", kv_cache)
    if k_scale is not None:
        if not isinstance(k_scale, torch.Tensor) or k_scale.numel() != 1 or k_scale.dtype != torch.float32:
            raise ValueError(f"k_scale must be a float32 tensor of one element; got "
                             f"{tuple(k_scale.shape) if isinstance(k_scale, torch.Tensor) else type(k_scale).__name__}"
                             f"{', dtype ' + str(k_scale.dtype) if isinstance(k_scale, torch.Tensor) else ''}")
        if k_scale.device != q.device:
            raise ValueError(f"k_scale must be on q's device {q.device}; got {k_scale.device}")
        if kv_cache.dtype != torch.float8_e4m3fn:
            _fail("kv_cache", "float8_e4m3fn (k_scale given: the per-tensor fp8_e4m3 layout)", kv_cache)
        return "fp8_e4m3"
    if kv_cache.dtype != q.dtype:
        hint = (" (an FP8 cache needs is_fp8_kvcache=True or k_scale)" if kv_cache.element_size() == 1 else "")
        _fail("kv_cache", f"of q's dtype {q.dtype}{hint}", kv_cache)
    return "native"
