"""Rounding facts: the one copy of unit roundoff, γ_n, their probabilistic counterpart, half an ulp,
the worst error/bound ratio and bit equality. Both halves (decode and layer) build their bounds from
these.

IEEE round to nearest: a real x in the normal range of a type rounds to fl(x) = x·(1 + δ) with
|δ| ≤ u, the unit roundoff (half the machine epsilon); below the normal range the absolute error is
at most half the smallest subnormal. So every rounding of a value v to a type costs at most
u·|v| + tiny/2 (`rounding_error`).

A sum or dot product of n terms computed in a type of unit roundoff u, in any order, errs by at
most γ_n·Σ|terms| with γ_n = n·u/(1 − n·u) (Higham, "Accuracy and Stability of Numerical
Algorithms", §3.1): the worst case, every rounding at its extreme with the same sign. When the
roundings are modelled as independent and mean zero (Higham & Mary, "A new approach to
probabilistic rounding error analysis", SIAM J. Sci. Comput. 2019, Theorem 2.4), the same sum errs
by at most γ̃_n(λ)·Σ|terms| with γ̃_n(λ) = exp(λ·√n·u + n·u²/(1 − u)) − 1 ≈ λ·√n·u, except with
probability 2·exp(−λ²(1 − u)²/2)·n at most; `probabilistic_gamma` returns the smaller of the two
(for n below about λ² the worst case is the smaller). λ = TAIL = 8 puts that probability at 2.5e-14
per sum.

Bit equality (`bits_differ`, `bitwise_equal`) is the other side of the same facts: where a result is
promised identical rather than within a bound, it is compared by its bits, so +0 and −0 differ.
"""

from __future__ import annotations

import math

import torch

__all__ = ["TAIL", "unit_roundoff", "smallest_subnormal", "gamma", "probabilistic_gamma", "rounding_error",
           "half_ulp", "coarser", "finer", "exp_relative_error", "worst_ratio", "bits_differ", "bitwise_equal"]

F64 = torch.float64
# Hoeffding tail factor of the probabilistic (sharp) tiers: P(|sum| > TAIL·sqrt(Σ c²)) ≤ 2·exp(-TAIL²/2) = 2.5e-14.
TAIL = 8.0


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = ½·machine epsilon: fp64 1.1e-16, fp32 6.0e-8, fp16 4.9e-4, bf16 3.9e-3."""
    return torch.finfo(dtype).eps / 2


def smallest_subnormal(dtype: torch.dtype) -> float:
    info = torch.finfo(dtype)
    return info.smallest_normal * info.eps


def gamma(n: int | torch.Tensor, u: float) -> float | torch.Tensor:
    """γ_n = n·u / (1 − n·u): the worst-case relative error of an n-term sum or dot product
    (+inf once n·u ≥ 1)."""
    nu = n * u
    if isinstance(nu, torch.Tensor):
        return torch.where(nu < 1, nu / (1 - nu), torch.full_like(nu, math.inf))
    return nu / (1 - nu) if nu < 1 else math.inf


def probabilistic_gamma(n: int | torch.Tensor, u: float, tail: float = TAIL) -> float | torch.Tensor:
    """min(γ_n, γ̃_n(λ)) with γ̃_n(λ) = exp(λ·√n·u + n·u²/(1 − u)) − 1 (Higham & Mary 2019): the
    relative error of an n-term sum whose roundings are independent and mean zero, exceeded with
    probability at most 2n·exp(−λ²(1 − u)²/2)."""
    if isinstance(n, torch.Tensor):
        n64 = n.to(F64)
        sharp = torch.expm1(tail * n64.sqrt() * u + n64 * u * u / (1 - u))
        return torch.minimum(gamma(n64, u), sharp)
    return min(gamma(n, u), math.expm1(tail * math.sqrt(n) * u + n * u * u / (1 - u)))


def rounding_error(magnitude: torch.Tensor | float, dtype: torch.dtype) -> torch.Tensor | float:
    """The largest error of rounding a value of this magnitude to dtype: u·|v| + half the smallest
    subnormal (underflow); +inf past the largest finite value (overflow)."""
    info = torch.finfo(dtype)
    error = unit_roundoff(dtype) * magnitude + smallest_subnormal(dtype) / 2
    if isinstance(error, torch.Tensor):
        return torch.where(magnitude <= info.max, error, torch.full_like(error, math.inf))
    return error if magnitude <= info.max else math.inf


def half_ulp(magnitude: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Half a unit in the last place of dtype at each magnitude (≤ u·magnitude; the exact rounding
    bound of a normal value), half the subnormal spacing below the normal range."""
    info = torch.finfo(dtype)
    exponent = torch.floor(torch.log2(magnitude.clamp_min(info.smallest_normal)))
    return unit_roundoff(dtype) * torch.exp2(exponent)


def coarser(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """The type with the larger unit roundoff (a on a tie)."""
    return a if unit_roundoff(a) >= unit_roundoff(b) else b


def finer(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """The type with the smaller unit roundoff (a on a tie)."""
    return a if unit_roundoff(a) <= unit_roundoff(b) else b


def exp_relative_error(dtype: torch.dtype) -> float:
    """A bound on the relative error of exp computed in dtype by the libraries layers run on:
    float32 2^-18 (torch's CPU flash attention uses exp_u20, a polynomial within 20 ulps ≈ 2^-18.7;
    GPU ex2.approx is within 2^-21; libm within an ulp), float64 2^-50, others 2u."""
    if dtype == torch.float32:
        return 2.0 ** -18
    if dtype == F64:
        return 2.0 ** -50
    return 2 * unit_roundoff(dtype)


def worst_ratio(error: torch.Tensor, bound: torch.Tensor) -> tuple[float, tuple[int, ...]]:
    """The largest error/bound and where; an error over a zero bound is infinitely over, NaN counts
    as inf, an empty tensor gives (0, ())."""
    ratio = torch.where(bound > 0, error / bound, torch.where(error == 0, 0.0, math.inf))
    if ratio.numel() == 0:
        return 0.0, ()
    flat = int(torch.argmax(torch.nan_to_num(ratio, nan=math.inf)))
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), ratio.shape))
    value = float(ratio[index])
    return (math.inf if math.isnan(value) else value), index


_SAME_WIDTH_INTEGER = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits_differ(a: torch.Tensor, b: torch.Tensor, *, nan_payload: bool) -> torch.Tensor:
    """Elementwise: whether a and b (same shape and dtype) hold different bit patterns. Floating
    values are compared as the integers of their width, so the comparison is NaN-safe (a NaN is not
    unequal to itself) and +0 differs from −0. nan_payload: whether two NaNs with different sign or
    payload bits differ (True: every bit counts, as for memory that must not be written); with
    False every NaN equals every other (IEEE 754 leaves the payload of a produced NaN to the
    hardware, and which operand's payload survives a sum to the order, so a kernel's NaN bits say
    nothing about its arithmetic that NaN itself does not)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(f"bits_differ compares tensors of one shape and dtype; got {tuple(a.shape)} {a.dtype} and "
                         f"{tuple(b.shape)} {b.dtype}")
    if not a.dtype.is_floating_point:
        return a != b
    width = _SAME_WIDTH_INTEGER[a.element_size()]
    differ = a.view(width) != b.view(width)
    if not nan_payload:
        differ &= ~(a.isnan() & b.isnan())
    return differ


def bitwise_equal(a: torch.Tensor, b: torch.Tensor, *, nan_payload: bool) -> bool:
    """Whether a and b are the same tensor bit for bit: one shape, one dtype, no element whose bits
    differ (`bits_differ`; nan_payload as there)."""
    return a.shape == b.shape and a.dtype == b.dtype and not bool(bits_differ(a, b, nan_payload=nan_payload).any())
