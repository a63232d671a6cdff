"""Error bounds of an MLA layer: stage by stage between the checkpoints a layer exposes, and end to
end, in a sound tier (worst case) and a sharp tier (probabilistic).

What is bounded
---------------
A running error analysis evaluated on the case's own float64 values. Every quantity is carried as
`Bounded(value, error, sq)`: `value` the float64 reference of that quantity, `error` an elementwise
worst-case bound on |implementation − exact|, `sq` (sharp tier) the sum of squares Σ_k c_k² of the
independent rounding contributions c_k·δ_k (|δ_k| ≤ 1) that make up the error. Each step maps the
triples of its operands to that of its result. The rounding facts are mla_verify.rounding's:
u of a type, γ_n(u) = n·u/(1 − n·u), rounding_error(v) = u·|v| + half the smallest subnormal.

The model of a correct layer (`InternalPrecision`, resolved for the module dtype): each step's
elementwise arithmetic runs in its compute type, sums in the accumulation type, and the step's
result is rounded to the stored type (the module dtype) before the next step reads it. A rounding to
a type no coarser than the one the value is already in costs nothing; every other rounding costs
rounding_error(|v| + error). The rules, each a worst-case inequality (any summation order, higher
order terms kept):

- linear map y = a·Wᵀ over n inputs, W rounded by u_w (relative, 0 when the reference is fed the
  rounded weights), products in the projections type (u_p; the product of two bf16/fp16 values is
  exact in float32), sums in the accumulation type (u_s):
      |Δy| ≤ Δa·|W|ᵀ + u_w·(|a| + Δa)·|W|ᵀ + ((1 + u_p)(1 + γ_n(u_s)) − 1)·(|a| + Δa)·(|W|(1 + u_w))ᵀ,
  then the rounding to the stored type. This is where bf16 differs from the first form of this
  analysis, which took γ_n at bf16's u (n·u ≥ 1 from n = 256: no bound at all): torch sums bf16
  products in float32, so a bf16 projection errs by γ_n(2^-24)·Σ|a||w| plus one rounding of its
  result, ≈ u_bf16·|y|.
- product of perturbed magnitudes: |x̂ŷ − xy| ≤ Δx|y| + |x|Δy + ΔxΔy, then u·(|xy| + that).
- RMSNorm over n: the operand cast to the norm's type (when coarser), the mean of squares (squares,
  the sum γ_n(u_s), the division and + eps: a relative (1 + u)³(1 + γ_n) − 1) plus the operand's
  own error perturb the mean square by a relative δ; rsqrt moves by (1 − δ)^(−1/2)·(1 + 2u) − 1
  (within an ulp); then a·r (a product; never off by more than |a·r| + √n, since |a_j|·r ≤ √n), the
  result rounded to the stored type (HF casts it back to the module dtype before the weight
  product), times the weight (a product), rounded again. A layer that rounds once (the fast layer)
  is allowed one rounding more than it makes.
- RoPE: the inverse frequency f_j = θ^(−2j/d_r) at the rope type has relative error
  (ln θ·2j/d_r + 3)·u (the rounded exponent amplified by the power; the power and the reciprocal);
  with YaRN the interpolated frequency and the ramp blend add theirs (`_inv_freq_error`); the angle
  position·f is one more product, so large positions amplify; cos/sin are within an ulp (2u) of
  the computed angle, times the YaRN magnitude m; then rounded to the rotation type when that is
  coarser (HF DeepseekV3 casts cos/sin to the module dtype). The rotation (two products and a sum
  per element) runs in the rotation type on operands cast to it, and is rounded to the stored type.
- scores s = scale·q·k over d = d_n + d_r (naive) or d_c + d_r (absorbed): the dot-product rule with
  (1 + u_sc)³(1 + γ_d(u_s)) − 1 (which also covers a scale applied to q, or as √scale to both q and
  k, as torch's SDPA math path does), rounded to the scores' stored type (eager: the module dtype),
  then the scale's product in the coarser of the scores and stored types.
- softmax, key by key: the exponent s_t − max is off by at most x_t = Δs_t + u(|s_t| + |max| +
  |s_t − max|) (the cast and the subtraction), so the unnormalised weight moves by a factor within
  e^{±x_t}(1 ± u_exp), η_t = (1 + u_exp)e^{x_t} − 1. Normalising exactly, p'_t = p_t·f_t/Z with
  Z = Σ p_t f_t ∈ [1 − η̄, 1 + η̄] (η̄ = Σ_t p_t η_t), so |p'_t − p_t| ≤ p_t(η_t + η̄)/(1 − η̄), and
  the plain form |p'_t − p_t| ≤ (e^{2ε} − 1)·p_t (ε = max_t x_t + log((1 + u_exp)/(1 − u_exp)))
  where that is smaller. Since Σ_t (p'_t − p_t) = 0, the output moves by at most
  Σ_t |p'_t − p_t|·|v_t − o| (centred values: a uniform score error moves nothing). The
  normaliser's own sum (γ over 2L + 4 terms: an online softmax may rescale its running sum once per
  key), the division or exp(−lse) (2u(|max| + ln L): the log and the max added back) scale every
  weight by 1 ± ν; rounding P to its stored type (SDPA's flash kernel and eager attention round it
  to the module dtype) adds u_p per weight and half the smallest subnormal. Whatever the score
  errors, the output is Σ_t p̂_t v̂_t with p̂_t ≥ 0 summing to at most S = (1 + ν)(1 + u_p) + L·tiny,
  so |o' − o| ≤ S·max_t(|v_t − o| + Δv_t) + (S − 1)|o| (the convex hull) caps the bound, which
  keeps it finite where the scores' errors are too large for the rules above.
- P·V over L keys: the dot-product rule; the result rounded to the stored type.
- the attention stage in either form: naive (K and V expanded per head through W_UK, W_UV; SDPA
  prefill, HF's cache) and absorbed (q̃ = q_nope·W_UK rounded to the stored type, attention over the
  latent rows [c | k_pe], the latent output rounded, then W_UV). Which form a layer uses for which
  token is not declared, so the bound of the attention stage is the larger of the two, element by
  element.

Stages
------
A stage's reference is the float64 computation of that stage fed the implementation's own values of
its input checkpoints (exact: error 0) and the weights rounded to the module dtype (u_w = 0); its
bound is the analysis above over that stage alone, ending with the rounding of its result to the
stored type, plus the reference's own float64 error (the same analysis in float64). A checkpoint the
layer does not expose is recomputed from the checkpoints before it, and the stages merge
("rope + attention" for a layer that exposes q but not q_pe). End to end, the reference is the
float64 layer (`mla_forward`, naive mode) from the float64 input and weights, and the bound starts
from the rounding of x and of every weight to the module dtype.

The sharp tier
--------------
The worst case assumes every rounding error takes its extreme value with the same sign. The sharp
tier models them as independent and mean zero (Higham & Mary 2019: each rounding δ_k with |δ_k| ≤ u
independent of the others) and bounds the Euclidean norm of each output row (b, s): with X the
row's error, a sum of independent contributions c_k·δ_k, McDiarmid's inequality gives
‖X‖ ≤ sqrt(E‖X‖²) + λ·sqrt(Σ_k ‖c_k‖²) except with probability exp(−λ²/2), and
E‖X‖² ≤ Σ_k ‖c_k‖²/3 for roundings uniform within their half ulp. So the tolerance is
(λ + 1/√3)·sqrt(Σ_j sq_j) plus the norm of the output's own rounding (its half ulps, deterministic),
at most the norm of the sound bound; λ = TAIL = 8. `sq` is propagated to first order: through a
linear map as Σ_i W_ji²·sq_i (the errors of different inputs treated as independent — the
approximation that makes this tier statistical, not proved), through RMSNorm by its derivative;
through the softmax the query's errors (shared by every key) enter through G_dc = Σ_t p_t k_td
(v_tc − o_c), the keys' and the scores' own errors key by key as p_t²(v_tc − o_c)²; P's rounding
as p_t²v_tc², sums of n roundings as n·(u·Σ|terms|)². The sharp tier was validated on generated
cases of correct layers (tests/test_layer_soundness.py records the largest ratio per tier), not
proved; the sound tier stays the proof.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from mla_verify.config import MLAConfig, yarn_mscale
from mla_verify.layer.contract import InternalPrecision
from mla_verify.reference import MLAWeights, apply_rope, mla_forward, rope_cos_sin, rope_inv_freq
from mla_verify.rounding import (TAIL, coarser, gamma, half_ulp, rounding_error, smallest_subnormal,
                                 unit_roundoff)

__all__ = ["Bounded", "LayerBound", "layer_error_bound", "stage_bounds", "LayerAnalysis", "CHECKPOINTS", "STAGES",
           "stage_of", "sharp_row_tolerance"]

F64 = torch.float64
# the pipeline's stages, in order, and the checkpoint each one ends in
STAGES = ("q path", "latent path", "rope", "attention", "output projection")
CHECKPOINTS = ("q", "latent", "k_pe_raw", "q_pe", "k_pe", "o", "out")
_STAGE = {"q": "q path", "latent": "latent path", "k_pe_raw": "latent path", "q_pe": "rope", "k_pe": "rope",
          "o": "attention", "out": "output projection"}
_INPUTS = {"q": ("x",), "latent": ("x",), "k_pe_raw": ("x",), "q_pe": ("q",), "k_pe": ("k_pe_raw",),
           "o": ("q", "q_pe", "latent", "k_pe"), "out": ("o",)}


# ----------------------------------------------------------------------------------------------
# Bounded values and the rules
# ----------------------------------------------------------------------------------------------

@dataclass
class Bounded:
    """A float64 reference value, a worst-case elementwise error bound, and (sharp tier) the sum of
    squares of its independent rounding contributions (None when the sharp tier is not tracked)."""

    value: torch.Tensor
    error: torch.Tensor
    sq: torch.Tensor | None = None

    @classmethod
    def exact(cls, value: torch.Tensor, sharp: bool) -> Bounded:
        value = value.to(F64)
        zero = torch.zeros_like(value)
        return cls(value, zero, zero.clone() if sharp else None)

    @property
    def magnitude(self) -> torch.Tensor:
        return self.value.abs() + self.error

    def map(self, fn) -> Bounded:
        """The same view/index/reshape applied to value, error and sq."""
        return Bounded(fn(self.value), fn(self.error), None if self.sq is None else fn(self.sq))

    def maximum(self, other: Bounded) -> Bounded:
        """Same value, the larger bound of the two (either computation may have been used)."""
        sq = None if self.sq is None else torch.maximum(self.sq, other.sq)
        return Bounded(self.value, torch.maximum(self.error, other.error), sq)

    def plus_reference(self, reference: Bounded) -> Bounded:
        """Add the float64 reference's own error (same value, computed by the f64 analysis; without
        its sharp part, its sound bound counts as one contribution)."""
        if self.sq is None:
            return Bounded(self.value, self.error + reference.error)
        extra = reference.sq if reference.sq is not None else reference.error ** 2
        return Bounded(self.value, self.error + reference.error, self.sq + extra)


def _cat(parts: list[Bounded], dim: int = -1) -> Bounded:
    sq = None if parts[0].sq is None else torch.cat([p.sq for p in parts], dim)
    return Bounded(torch.cat([p.value for p in parts], dim), torch.cat([p.error for p in parts], dim), sq)


def _is_coarser(target: torch.dtype, source: torch.dtype) -> bool:
    return unit_roundoff(target) > unit_roundoff(source)


def _round(b: Bounded, target: torch.dtype, source: torch.dtype) -> Bounded:
    """Round a value held in `source` to `target` (free when target is no coarser). torch converts
    float64 to bf16/fp16 through float32 (checked on torch 2.13: 1 + 2^-8 + 2^-30 becomes 1 in bf16),
    a double rounding that may exceed half an ulp by half an ulp of float32: that is allowed too."""
    if not _is_coarser(target, source):
        return b
    magnitude = b.magnitude
    r = rounding_error(magnitude, target)
    if _is_coarser(torch.float32, source) and _is_coarser(target, torch.float32):
        r = r + rounding_error(magnitude, torch.float32) * (1 + unit_roundoff(target))
    return Bounded(b.value, b.error + r, None if b.sq is None else b.sq + r * r)


def _product(x: torch.Tensor, ex: torch.Tensor, y: torch.Tensor, ey: torch.Tensor, u: float) -> torch.Tensor:
    """Error bound of fl(x̂·ŷ) for magnitudes x, y ≥ 0 with errors ex, ey."""
    error = ex * y + x * ey + ex * ey
    return error + u * (x * y + error)


def _contract(spec: str, a: Bounded, w: torch.Tensor, u_w: float, n: int, p: InternalPrecision,
              step: str = "projections") -> Bounded:
    """y = einsum(spec, a, w) summing n products (a linear map; see the module docstring)."""
    u_p, sums = unit_roundoff(getattr(p, step)), p.sums(step)
    u_s = unit_roundoff(sums)
    wa = w.abs()
    magnitude = a.magnitude

    def ein(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.einsum(spec, x, y)

    total = ein(magnitude, wa)
    g = (1 + u_p) * (1 + gamma(n, u_s)) - 1
    error = ein(a.error, wa) + u_w * total + g * total * (1 + u_w)
    sq = None
    if a.sq is not None:
        wa2 = wa * wa
        sq = (ein(a.sq, wa2) + (u_w * u_w + u_p * u_p) * ein(magnitude * magnitude, wa2)
              + n * (u_s * total) ** 2)
    return _round(Bounded(ein(a.value, w), error, sq), p.stored, sums)


def _linear(a: Bounded, w: torch.Tensor, u_w: float, p: InternalPrecision) -> Bounded:
    """a [..., n] · w [m, n]ᵀ."""
    return _contract("...n,mn->...m", a, w, u_w, w.shape[1], p)


def _rms_norm(a: Bounded, weight: torch.Tensor, u_w: float, eps: float, p: InternalPrecision) -> Bounded:
    n = a.value.shape[-1]
    compute, stored = p.rms_norm, p.stored
    u_c, u_s = unit_roundoff(compute), unit_roundoff(p.sums("rms_norm"))
    a = _round(a, compute, stored)  # the operand cast to the norm's type
    v, ea = a.value, a.error
    av, magnitude = v.abs(), a.magnitude
    mean_square = v.pow(2).mean(-1, keepdim=True) + eps
    g = (1 + u_c) ** 3 * (1 + gamma(n, u_s)) - 1  # squares, sum, division, + eps
    perturbation = (2 * av * ea + ea ** 2).mean(-1, keepdim=True) + g * (magnitude.pow(2).mean(-1, keepdim=True)
                                                                         + eps)
    delta = perturbation / mean_square
    r = mean_square.rsqrt()
    delta_r = torch.where(delta < 1, torch.expm1(-0.5 * torch.log1p(-delta.clamp(max=0.999999))
                                                 + math.log1p(2 * u_c)), torch.full_like(delta, math.inf))
    normalized = v * r
    error = _product(av, ea, r.expand_as(v), (r * delta_r).expand_as(v), u_c)
    # |a_j|·r ≤ √n for any a (a_j² ≤ Σ a²), so a normalised value is never off by more than |a_j r| + √n·(1 + 2u)
    error = torch.minimum(torch.nan_to_num(error, nan=math.inf), normalized.abs() + math.sqrt(n) * (1 + 2 * u_c))
    sq = None
    if a.sq is not None:
        radial = (v * v * a.sq).sum(-1, keepdim=True) / (n * mean_square) ** 2
        sq = (2 * r * r * (a.sq + v * v * radial) + ((g / 2 + 3 * u_c) * normalized) ** 2)
    y = _round(Bounded(normalized, error, sq), stored, compute)  # HF casts back before the weight product
    w = weight.abs()
    error = _product(y.value.abs(), y.error, w.expand_as(v), (u_w * w).expand_as(v), u_c)
    out = y.value * weight
    sq = None
    if y.sq is not None:
        sq = weight * weight * y.sq + (u_w * u_w + u_c * u_c) * (y.value * weight) ** 2
    return _round(Bounded(out, error, sq), stored, compute)


def _inv_freq_error(config: MLAConfig, u: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(f, Δf) [d_r/2]: the inverse frequencies and a bound on their error when computed at u as
    DeepSeek and HF do: f_e = 1/θ_base^e with the exponent e = 2j/d_r rounded (relative error u,
    amplified to ln(θ_base)·e·u by the power), the power within one ulp (2u), the reciprocal (u);
    with YaRN also f_i = 1/(factor·θ_base^e) (one more product) and the blend
    f = f_i·(1 − w) + f_e·w, whose ramp weight w is off by ≤ 2u and 1 − w by ≤ 3u."""
    dim, base = config.qk_rope_head_dim, config.rope_theta
    exponent = torch.arange(0, dim, 2, dtype=F64) / dim
    f_e = base ** -exponent
    df_e = (math.log(base) * exponent + 3) * u * f_e
    f = rope_inv_freq(config)
    yarn = config.yarn
    if yarn is None or yarn.factor <= 1:
        return f, df_e
    f_i = f_e / yarn.factor
    df_i = (math.log(base) * exponent + 4) * u * f_i
    w = ((f - f_i) / (f_e - f_i)).clamp(0, 1)  # the ramp weight of the original frequency
    interpolated = _product(f_i, df_i, 1 - w, torch.full_like(w, 3 * u), u)
    extrapolated = _product(f_e, df_e, w, torch.full_like(w, 2 * u), u)
    return f, interpolated + extrapolated + u * (f + interpolated + extrapolated)


def _cos_sin_error(config: MLAConfig, positions: torch.Tensor, p: InternalPrecision) -> torch.Tensor:
    """[len(positions), d_r/2] bound on |Δ(m·cos θ)| and |Δ(m·sin θ)| as the rotation sees them:
    θ = position·f (one product) at the rope type, cos/sin within one ulp (2u) of the computed
    angle, times the YaRN magnitude m (itself rounded, and one product), then rounded to the
    rotation type when that is coarser."""
    u = unit_roundoff(p.rope)
    f, df = _inv_freq_error(config, u)
    position = positions.to(F64).abs()[:, None]
    d_theta = _product(position, torch.zeros_like(position), f[None, :], df[None, :], u)
    magnitude = 1.0
    if config.yarn is not None:
        magnitude = yarn_mscale(config.yarn.factor, config.yarn.mscale) / yarn_mscale(
            config.yarn.factor, config.yarn.mscale_all_dim)
    ones = torch.ones_like(d_theta)
    error = _product(ones, d_theta + 2 * u, magnitude * ones, magnitude * u * ones, u)
    if _is_coarser(p.rope_rotation, p.rope):
        error = error + rounding_error(magnitude + error, p.rope_rotation)
    return error


def _split_pairs(t: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    if layout == "interleaved":
        return t[..., 0::2], t[..., 1::2]
    half = t.shape[-1] // 2
    return t[..., :half], t[..., half:]


def _join_pairs(first: torch.Tensor, second: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "interleaved":
        return torch.stack((first, second), dim=-1).flatten(-2)
    return torch.cat((first, second), dim=-1)


def _rope(x: Bounded, cos: torch.Tensor, sin: torch.Tensor, e_cs: torch.Tensor, layout: str,
          p: InternalPrecision) -> Bounded:
    """Rotate x [..., d_r] (the reference's apply_rope pairing); cos, sin, e_cs broadcast against
    x[..., :d_r/2]."""
    rotation = p.rope_rotation
    u = unit_roundoff(rotation)
    x = _round(x, rotation, p.stored)  # operands cast to the rotation type
    a, b = _split_pairs(x.value.abs(), layout)
    ea, eb = _split_pairs(x.error, layout)
    c, s = cos.abs(), sin.abs()
    ac, bs = _product(a, ea, c, e_cs, u), _product(b, eb, s, e_cs, u)
    bc, as_ = _product(b, eb, c, e_cs, u), _product(a, ea, s, e_cs, u)
    first = ac + bs + u * (a * c + b * s + ac + bs)
    second = bc + as_ + u * (b * c + a * s + bc + as_)
    value = apply_rope(x.value, cos, sin, layout)
    sq = None
    if x.sq is not None:
        qa, qb = _split_pairs(x.sq, layout)
        y1, y2 = _split_pairs(value.abs(), layout)
        common = (a * a + b * b) * e_cs * e_cs
        sq1 = c * c * qa + s * s * qb + common + u * u * ((a * c) ** 2 + (b * s) ** 2 + y1 * y1)
        sq2 = c * c * qb + s * s * qa + common + u * u * ((b * c) ** 2 + (a * s) ** 2 + y2 * y2)
        sq = _join_pairs(sq1, sq2, layout)
    return _round(Bounded(value, _join_pairs(first, second, layout), sq), p.stored, rotation)


# the largest [queries, heads, keys, columns] block _attend holds at once
_BLOCK_ELEMENTS = 4_000_000


def _attend(q: Bounded, k: Bounded, v: Bounded, visible: torch.Tensor, scale: float,
            p: InternalPrecision) -> Bounded:
    """o [b, s, h, c] = softmax(scale·q·kᵀ)·v for q [b, s, h, d], k [b, t, h, d], v [b, t, h, c]
    (expanded views allowed) over the keys visible [s, t] to each query (a prefix of the keys: the
    causal mask); queries in blocks."""
    b, s, h, _ = q.value.shape
    t, c = k.value.shape[1], v.value.shape[-1]
    step = max(1, _BLOCK_ELEMENTS // max(1, b * h * t * c))
    if step >= s:
        return _attend_block(q, k, v, visible, scale, p)
    parts = [_attend_block(q.map(lambda x, i=i: x[:, i:i + step]), k, v, visible[i:i + step], scale, p)
             for i in range(0, s, step)]
    return _cat(parts, dim=1)


def _attend_block(q: Bounded, k: Bounded, v: Bounded, visible: torch.Tensor, scale: float,
                  p: InternalPrecision) -> Bounded:
    d = q.value.shape[-1]
    keys = visible.sum(-1).to(F64)[None, :, None, None]  # L per query [1, s, 1, 1]
    qa, ka = q.value.abs(), k.value.abs()
    dot = torch.einsum("bshd,bthd->bsht", q.value, k.value)
    total = torch.einsum("bshd,bthd->bsht", q.magnitude, k.magnitude)
    sums = p.sums("scores")
    u_sc, u_ss = unit_roundoff(p.scores), unit_roundoff(sums)
    g = (1 + u_sc) ** 3 * (1 + gamma(d, u_ss)) - 1
    e_dot = (torch.einsum("bshd,bthd->bsht", q.error, ka) + torch.einsum("bshd,bthd->bsht", qa, k.error)
             + torch.einsum("bshd,bthd->bsht", q.error, k.error) + g * total)
    stored_dot = torch.zeros_like(dot)
    if _is_coarser(p.scores_stored, sums):
        stored_dot = rounding_error(dot.abs() + e_dot, p.scores_stored)
        e_dot = e_dot + stored_dot
    u_mul = unit_roundoff(coarser(p.scores, p.scores_stored))
    s = dot * scale
    e_s = scale * e_dot + u_mul * scale * (dot.abs() + e_dot)
    if _is_coarser(p.softmax, coarser(p.scores, p.scores_stored)):
        e_s = e_s + rounding_error(s.abs() + e_s, p.softmax)

    # softmax, key by key: x_t bounds the error of the exponent s_t − max, so the unnormalised
    # weight is off by a factor within e^{±x_t}(1 ± u_exp): η_t = (1 + u_exp)e^{x_t} − 1. With
    # Z = Σ p_t·(perturbation) ∈ [1 − η̄, 1 + η̄] (η̄ = Σ p_t η_t), the exactly normalised
    # perturbed p'_t = p_t·(perturbation)/Z satisfies |p'_t − p_t| ≤ p_t(η_t + η̄)/(1 − η̄), and since
    # Σ (p'_t − p_t) = 0 the output moves by Σ_t |p'_t − p_t|·|v_t − o| (centred values). The
    # normaliser's own sum (γ over 2L + 4 terms), the division or exp(−lse) (log and max added back:
    # 2u(|max| + ln L)) scale every p'_t by 1 ± ν; P's rounding adds u_p per weight.
    u_sm, u_sum = unit_roundoff(p.softmax), unit_roundoff(p.sums("softmax"))
    u_exp = p.exp_error
    mask = visible[None, :, None, :]
    zero = torch.zeros((), dtype=F64)
    masked = torch.where(mask, s, torch.tensor(-math.inf, dtype=F64))
    row_max = masked.amax(-1, keepdim=True)
    probabilities = torch.softmax(masked, dim=-1)
    own = u_sm * (s.abs() + row_max.abs() + (s - row_max).abs())  # cast, max subtraction
    exponent_error = torch.where(mask, e_s + own, zero)
    eta = torch.where(mask, (1 + u_exp) * torch.exp(exponent_error) - 1, zero)
    eta_bar = (probabilities * eta).sum(-1, keepdim=True)
    gamma_sum = gamma(2 * keys + 4, u_sum)
    nu = torch.where(gamma_sum < 1, (1 + gamma_sum.clamp(max=0.5)) * (1 + u_sm) ** 2
                     * torch.exp(2 * u_sm * (row_max.abs() + keys.log())) - 1, torch.full_like(gamma_sum, math.inf))
    valid = (eta_bar < 1).expand_as(probabilities)
    inf = torch.full_like(probabilities, math.inf)
    moved = torch.where(valid, probabilities * (eta + eta_bar) / (1 - eta_bar).clamp_min(1e-300), inf)
    perturbed = torch.where(valid, probabilities * (1 + eta) / (1 - eta_bar).clamp_min(1e-300), inf)
    # where the exponent errors are large the plain form is tighter: every ratio p'_t/p_t lies
    # within e^{±2ε} with ε = max_t x_t + log((1 + u_exp)/(1 − u_exp)), so |p'_t − p_t| ≤ (e^{2ε} − 1)·p_t
    epsilon = exponent_error.amax(-1, keepdim=True) + math.log1p(u_exp) - math.log1p(-u_exp)
    rho = torch.expm1(2 * epsilon)
    moved = torch.minimum(moved, rho * probabilities)
    perturbed = torch.minimum(perturbed, (1 + rho) * probabilities)
    u_p, tiny_p = 0.0, 0.0
    if _is_coarser(p.p_stored, p.softmax):
        u_p, tiny_p = unit_roundoff(p.p_stored), smallest_subnormal(p.p_stored) / 2
    computed = perturbed * (1 + nu)
    stored_p = computed * (1 + u_p) + tiny_p * mask

    # P·V
    att_sums = p.sums("attention")
    u_a, u_as = unit_roundoff(p.attention), unit_roundoff(att_sums)
    ga = (1 + u_a) * (1 + gamma(keys, u_as)) - 1
    va = v.value.abs()
    o = torch.einsum("bsht,bthc->bshc", probabilities, v.value)
    centred = v.value.permute(0, 2, 1, 3)[:, None] - o[:, :, :, None, :]  # v_t − o [b, s, h, t, c]
    visible_abs = torch.einsum("bsht,bthc->bshc", mask.to(F64).expand_as(probabilities), va)
    e_o = (torch.einsum("bsht,bshtc->bshc", moved, centred.abs())
           + nu * torch.einsum("bsht,bthc->bshc", perturbed, va)
           + u_p * torch.einsum("bsht,bthc->bshc", computed, va) + tiny_p * visible_abs
           + torch.einsum("bsht,bthc->bshc", stored_p, v.error)
           + ga * torch.einsum("bsht,bthc->bshc", stored_p, v.magnitude))
    # whatever the score errors, the computed output is Σ_t p̂_t·v̂_t with p̂_t ≥ 0 and Σ p̂_t ≤ S
    # (the normaliser's and P's roundings): o' − o = Σ p̂_t(v̂_t − o) + (Σ p̂_t − 1)·o, so
    # |o' − o| ≤ S·max_t(|v_t − o| + Δv_t) + (S − 1)|o| plus the sum's rounding. This keeps the bound
    # finite (and the convex hull's) where the scores' errors are too large for the rules above.
    total_p = (1 + nu) * (1 + u_p) + tiny_p * keys
    last = (visible.sum(-1) - 1).clamp_min(0)  # the visible keys are a prefix (causal): 0 … last
    highest = torch.cummax(v.value + v.error, dim=1).values[:, last]  # [b, s, h, c] over the visible keys
    lowest = torch.cummin(v.value - v.error, dim=1).values[:, last]
    largest = torch.cummax(v.magnitude, dim=1).values[:, last]
    spread = torch.maximum(highest - o, o - lowest)
    hull = total_p * spread + (total_p - 1) * o.abs() + ga * total_p * largest
    e_o = torch.minimum(torch.nan_to_num(e_o, nan=math.inf), hull)

    sq = None
    if q.sq is not None:
        p2 = probabilities * probabilities
        weighted = torch.einsum("bsht,bthc->bshc", probabilities, va)
        shared = torch.einsum("bsht,bthd,bshtc->bshdc", probabilities, k.value, centred)  # G_dc
        per_key = (scale * scale * torch.einsum("bshd,bthd->bsht", q.value ** 2, k.sq)
                   + d * (u_ss * scale * total) ** 2
                   + (scale * stored_dot + u_mul * scale * dot.abs() + 3 * u_sc * scale * total + own) ** 2
                   + u_exp ** 2)
        per_key = torch.where(mask, per_key, zero)
        sq = (scale * scale * torch.einsum("bshd,bshdc->bshc", q.sq, shared ** 2)
              + torch.einsum("bsht,bshtc->bshc", p2 * per_key, centred ** 2)
              + torch.einsum("bsht,bthc->bshc", p2, v.sq)
              + (u_p * u_p + u_a * u_a) * torch.einsum("bsht,bthc->bshc", p2, v.value ** 2)
              + nu ** 2 * o ** 2 + keys * (u_as * weighted) ** 2 + (tiny_p * visible_abs) ** 2)
    return _round(Bounded(o, e_o, sq), p.stored, att_sums)


# ----------------------------------------------------------------------------------------------
# The layer's stages
# ----------------------------------------------------------------------------------------------

@dataclass
class _Weights:
    """The weights the reference uses and the relative rounding the implementation's differ by."""

    w: MLAWeights
    u_linear: float
    u_norm: float

    @classmethod
    def of(cls, weights: MLAWeights, p: InternalPrecision, rounded: bool) -> _Weights:
        """rounded: the weights as the layer holds them (linear ones in the module dtype, norms in
        their declared type), exact for the reference; else the float64 ones with the rounding as
        an error."""
        if not rounded:
            return cls(weights, unit_roundoff(p.stored) if p.stored != F64 else 0.0,
                       unit_roundoff(p.norm_weights) if p.norm_weights != F64 else 0.0)

        def cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
            return None if t is None else t.to(dtype).to(F64)

        linear = {name: cast(getattr(weights, name), p.stored) for name in ("wq", "wq_a", "wq_b", "wkv_a", "wkv_b",
                                                                             "wo")}
        norms = {name: cast(getattr(weights, name), p.norm_weights) for name in ("q_norm", "kv_norm")}
        return cls(MLAWeights(**linear, **norms), 0.0, 0.0)


@dataclass
class LayerAnalysis:
    """The bounded values of a layer's checkpoints at one declared precision.

    `given`: checkpoint → the implementation's own values (float64 copies, whole sequence), used as
    exact inputs of the stages after them; x is given (exact) when the reference is fed the rounded
    input, else it carries its rounding to the module dtype. `value(name)` is the float64
    reference of that checkpoint computed from the given ones before it, with its bound."""

    config: MLAConfig
    weights: _Weights
    x: Bounded
    precision: InternalPrecision
    given: dict[str, torch.Tensor] = field(default_factory=dict)
    sharp: bool = False
    # the attention forms the bound covers (the float64 reference is the naive form)
    forms: tuple[str, ...] = ("naive", "absorbed")
    _memo: dict[str, Bounded] = field(default_factory=dict)

    def source(self, name: str) -> Bounded:
        """A stage's input: the implementation's value if given, else recomputed."""
        if name == "x":
            return self.x
        if name in self.given:
            return Bounded.exact(self.given[name], self.sharp)
        return self.value(name)

    def value(self, name: str) -> Bounded:
        if name not in self._memo:
            self._memo[name] = getattr(self, "_" + name)()
        return self._memo[name]

    # -- the rules of each checkpoint ----------------------------------------------------------
    def _q(self) -> Bounded:
        c, w, p = self.config, self.weights, self.precision
        x = self.source("x")
        if w.w.wq is not None:
            q = _linear(x, w.w.wq, w.u_linear, p)
        else:
            q = _linear(_rms_norm(_linear(x, w.w.wq_a, w.u_linear, p), w.w.q_norm, w.u_norm, c.rms_norm_eps, p),
                        w.w.wq_b, w.u_linear, p)
        b, s = q.value.shape[:2]
        return q.map(lambda t: t.reshape(b, s, c.num_heads, c.qk_head_dim))

    def _kv(self) -> Bounded:
        if "_kv" not in self._memo:
            self._memo["_kv"] = _linear(self.source("x"), self.weights.w.wkv_a, self.weights.u_linear, self.precision)
        return self._memo["_kv"]

    def _latent(self) -> Bounded:
        c, w = self.config, self.weights
        return _rms_norm(self._kv().map(lambda t: t[..., :c.kv_lora_rank]), w.w.kv_norm, w.u_norm, c.rms_norm_eps,
                         self.precision)

    def _k_pe_raw(self) -> Bounded:
        return self._kv().map(lambda t: t[..., self.config.kv_lora_rank:])

    def _cos_sin(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        positions = torch.arange(self.x.value.shape[1])
        cos, sin = rope_cos_sin(self.config, positions)
        return cos, sin, _cos_sin_error(self.config, positions, self.precision)

    def _q_pe(self) -> Bounded:
        cos, sin, e_cs = self._cos_sin()
        q = self.source("q").map(lambda t: t[..., self.config.qk_nope_head_dim:])
        return _rope(q, cos[:, None, :], sin[:, None, :], e_cs[:, None, :], self.config.rope_layout, self.precision)

    def _k_pe(self) -> Bounded:
        cos, sin, e_cs = self._cos_sin()
        return _rope(self.source("k_pe_raw"), cos, sin, e_cs, self.config.rope_layout, self.precision)

    def _o(self) -> Bounded:
        c, w, p = self.config, self.weights, self.precision
        h, dn, dv, dc = c.num_heads, c.qk_nope_head_dim, c.v_head_dim, c.kv_lora_rank
        q_nope = self.source("q").map(lambda t: t[..., :dn])
        q_pe, latent, k_pe = self.source("q_pe"), self.source("latent"), self.source("k_pe")
        b, s = latent.value.shape[:2]
        visible = torch.ones(s, s, dtype=torch.bool).tril()
        wkv_b = w.w.wkv_b.view(h, dn + dv, dc)
        w_uk, w_uv = wkv_b[:, :dn], wkv_b[:, dn:]
        dr = c.qk_rope_head_dim

        # naive: K and V expanded per head
        k_nope = _linear(latent, w_uk.reshape(h * dn, dc), w.u_linear, p).map(lambda t: t.view(b, s, h, dn))
        v = _linear(latent, w_uv.reshape(h * dv, dc), w.u_linear, p).map(lambda t: t.view(b, s, h, dv))
        k_rope = k_pe.map(lambda t: t[:, :, None, :].expand(b, s, h, dr))
        naive = _attend(_cat([q_nope, q_pe]), _cat([k_nope, k_rope]), v, visible, c.softmax_scale, p)
        if "absorbed" not in self.forms:
            return naive

        # absorbed: q̃ = q_nope·W_UK, attention over the latent rows, then W_UV
        q_latent = _contract("bshn,hcn->bshc", q_nope, w_uk.transpose(1, 2), w.u_linear, dn, p)
        rows = _cat([latent, k_pe]).map(lambda t: t[:, :, None, :].expand(b, s, h, dc + dr))
        values = latent.map(lambda t: t[:, :, None, :].expand(b, s, h, dc))
        out_latent = _attend(_cat([q_latent, q_pe]), rows, values, visible, c.softmax_scale, p)
        absorbed = _contract("bshc,hdc->bshd", out_latent, w_uv, w.u_linear, dc, p)
        return naive.maximum(absorbed)

    def _out(self) -> Bounded:
        o = self.source("o")
        b, s = o.value.shape[:2]
        return _linear(o.map(lambda t: t.reshape(b, s, -1)), self.weights.w.wo, self.weights.u_linear,
                       self.precision)


def stage_of(checkpoint: str, given: set[str]) -> tuple[str, ...]:
    """The stages a checkpoint's check covers: its own, merged with those of every checkpoint before
    it that is not given (recomputed from the ones before it), in pipeline order."""
    stages = {_STAGE[checkpoint]}
    pending = list(_INPUTS[checkpoint])
    while pending:
        name = pending.pop()
        if name == "x" or name in given:
            continue
        stages.add(_STAGE[name])
        pending.extend(_INPUTS[name])
    return tuple(stage for stage in STAGES if stage in stages)


def _analyses(config: MLAConfig, weights: MLAWeights, x: torch.Tensor, precision: InternalPrecision,
              dtype: torch.dtype, given: dict[str, torch.Tensor] | None, sharp: bool) -> tuple[LayerAnalysis,
                                                                                                LayerAnalysis]:
    """The implementation's analysis at its resolved precision and the float64 reference's own."""
    p = precision.resolved(dtype)
    exact = InternalPrecision.uniform(F64).resolved(F64)
    if given is None:  # end to end: the float64 input and weights, rounded by the implementation
        x_impl = Bounded.exact(x, sharp)
        if dtype != F64:
            x_impl = _round(x_impl, dtype, F64)
        impl = LayerAnalysis(config, _Weights.of(weights, p, rounded=False), x_impl, p, {}, sharp)
        reference = LayerAnalysis(config, _Weights.of(weights, exact, rounded=False), Bounded.exact(x, sharp), exact,
                                  {}, sharp, ("naive",))
        return impl, reference
    rounded = _Weights.of(weights, p, rounded=True)
    x_rounded = Bounded.exact(x.to(dtype), sharp)
    impl = LayerAnalysis(config, rounded, x_rounded, p, given, sharp)
    reference = LayerAnalysis(config, _Weights(rounded.w, 0.0, 0.0), Bounded.exact(x.to(dtype), False), exact,
                              given, False, ("naive",))
    return impl, reference


def stage_bounds(config: MLAConfig, weights: MLAWeights, x: torch.Tensor, precision: InternalPrecision,
                 dtype: torch.dtype, given: dict[str, torch.Tensor],
                 checkpoints: tuple[str, ...]) -> dict[str, Bounded]:
    """checkpoint → its stage reference (value) and bound (error: the implementation's rounding
    plus the reference's), each stage fed the implementation's `given` checkpoints and x rounded
    to dtype, the weights rounded to the module dtype."""
    impl, reference = _analyses(config, weights, x, precision, dtype, given, sharp=False)
    return {name: impl.value(name).plus_reference(reference.value(name)) for name in checkpoints}


@dataclass
class LayerBound:
    """reference out [b, s, D] (float64, naive mode), the elementwise sound bound on
    |out − reference|, and the sharp tolerance [b, s] on each row's Euclidean error norm."""

    reference: torch.Tensor
    bound: torch.Tensor
    sharp: torch.Tensor | None = None


def sharp_row_tolerance(out: Bounded, pre_rounding: Bounded, stored: torch.dtype) -> torch.Tensor:
    """[b, s]: (λ + 1/√3)·sqrt(Σ_j sq_j) of the error before the output's rounding, plus the norm of
    that rounding's half ulps, at most the norm of the sound bound (module docstring)."""
    random_part = (TAIL + 3 ** -0.5) * pre_rounding.sq.sum(-1).sqrt()
    rounding = torch.zeros_like(random_part)
    if stored != F64:
        rounding = half_ulp(pre_rounding.value.abs() + pre_rounding.error, stored).pow(2).sum(-1).sqrt()
    return torch.minimum(random_part + rounding, out.error.norm(dim=-1))


def layer_error_bound(config: MLAConfig, weights: MLAWeights, x: torch.Tensor, precision: InternalPrecision,
                      dtype: torch.dtype = F64, sharp: bool = True) -> LayerBound:
    """The float64 reference (naive mode over the whole sequence x [b, s, D]) and the bounds on
    |out_impl − reference| for an implementation of module dtype `dtype` declaring `precision`:
    its own rounding from the float64 input and weights, plus the reference's."""
    impl, reference = _analyses(config, weights, x.to(F64), precision, dtype, None, sharp)
    out = impl.value("out").plus_reference(reference.value("out"))
    ref = mla_forward(config, weights, x.to(F64), mode="naive")
    tolerance = None
    if sharp:
        p = impl.precision
        unrounded = dataclasses.replace(p, stored=p.sums("projections"))  # the output before its rounding
        o = impl.value("o")
        b, s = o.value.shape[:2]
        pre = _linear(o.map(lambda t: t.reshape(b, s, -1)), impl.weights.w.wo, impl.weights.u_linear, unrounded)
        pre = pre.plus_reference(reference.value("out"))
        tolerance = sharp_row_tolerance(out, pre, p.stored)
    return LayerBound(reference=ref, bound=out.error, sharp=tolerance)
