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

__all__ = [
    "CONTRACT_ARGUMENTS",
    "Capabilities",
    "DecodeKernel",
    "Declined",
    "declare",
    "capabilities_of",
    "declares_capabilities",
    "check_signature",
    "validate_decode_inputs",
]

CONTRACT_ARGUMENTS = ("q", "kv_cache", "block_table", "cache_seqlens", "head_dim_v", "softmax_scale",
                      "causal")


class Declined(Exception):
    """Raised by a kernel (or its adapter) that cleanly refuses a case it cannot run, e.g. a planner's
    "unsupported" error. The certifier counts declined cases with their reasons and keeps searching;
    NotImplementedError is read the same way. `--strict` fails a kernel that declines a case inside
    its declared capabilities."""


class DecodeKernel(Protocol):
    def __call__(self, q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                 cache_seqlens: torch.Tensor, head_dim_v: int, softmax_scale: float,
                 causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]: ...


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
        for name in ("accumulation_dtype", "p_dtype", "partials_dtype"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, torch.dtype) and value.is_floating_point):
                raise TypeError(f"{name} must be a floating torch.dtype or None; got {value!r}")

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


_ATTRIBUTE = "__mla_capabilities__"


def declare(capabilities: Capabilities) -> Callable[[Callable], Callable]:
    """Decorator attaching `capabilities` to a decode kernel."""
    if not isinstance(capabilities, Capabilities):
        raise TypeError(f"capabilities must be a mla_verify.decode.contract.Capabilities; got {type(capabilities)}")

    def attach(fn: Callable) -> Callable:
        setattr(fn, _ATTRIBUTE, capabilities)
        return fn

    return attach


def declares_capabilities(fn: Callable) -> bool:
    """Whether `fn` carries a declaration (a bare function gets the defaults instead)."""
    return isinstance(getattr(fn, _ATTRIBUTE, None), Capabilities)


def capabilities_of(fn: Callable) -> Capabilities:
    declared = getattr(fn, _ATTRIBUTE, None)
    return declared if isinstance(declared, Capabilities) else Capabilities()


def check_signature(fn: object) -> str | None:
    """None if `fn` can be called with the contract's arguments, else a one-line reason."""
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
    return None


def _fail(argument: str, expected: str, tensor: torch.Tensor) -> None:
    raise ValueError(f"{argument} must be {expected}; got shape {tuple(tensor.shape)}, dtype {tensor.dtype}")


def validate_decode_inputs(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                           cache_seqlens: torch.Tensor, head_dim_v: int) -> None:
    """Raise ValueError/TypeError naming the argument when the inputs break the contract's layout."""
    for name, value in (("q", q), ("kv_cache", kv_cache), ("block_table", block_table),
                        ("cache_seqlens", cache_seqlens)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(value).__name__}")
    if q.dim() != 4:
        _fail("q", "[b, s_q, h_q, d]", q)
    b, _, _, d = q.shape
    if not q.is_floating_point():
        _fail("q", "a floating-point tensor [b, s_q, h_q, d]", q)
    if kv_cache.dim() != 4 or kv_cache.shape[2] != 1 or kv_cache.shape[3] != d:
        _fail("kv_cache", f"[num_blocks, page_size, 1, {d}] (d of q)", kv_cache)
    if kv_cache.dtype != q.dtype:
        _fail("kv_cache", f"of q's dtype {q.dtype}", kv_cache)
    if block_table.dim() != 2 or block_table.shape[0] != b or block_table.dtype != torch.int32:
        _fail("block_table", f"int32 [{b}, max_blocks]", block_table)
    if cache_seqlens.shape != (b,) or cache_seqlens.dtype != torch.int32:
        _fail("cache_seqlens", f"int32 [{b}]", cache_seqlens)
    if isinstance(head_dim_v, bool) or not isinstance(head_dim_v, int) or not 1 <= head_dim_v <= d:
        raise ValueError(f"head_dim_v must be an int in [1, {d}] (d of q); got {head_dim_v!r}")
    if b and int(cache_seqlens.min()) < 0:
        raise ValueError(f"cache_seqlens must be >= 0; got {cache_seqlens.tolist()}")
    page_size = kv_cache.shape[1]
    if b and int(cache_seqlens.max()) > block_table.shape[1] * page_size:
        raise ValueError(f"cache_seqlens must be <= max_blocks·page_size = "
                         f"{block_table.shape[1] * page_size}; got max {int(cache_seqlens.max())}")
