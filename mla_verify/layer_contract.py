"""The layer contract: a whole MLA attention layer with its own cache, judged against the float64
reference within a bound derived from the precision it declares.

Contract
--------
An implementation is built by a factory

    factory(config: MLAConfig, weights: MLAWeights, dtype: torch.dtype, device: str) -> MLALayer

from the reference's float64 weights (it rounds them to `dtype` itself); a factory may carry
`supports(config) -> str | None` (None, or why it cannot build that layer). The layer offers

    prefill(x [b, s, D]) -> out [b, s, D]   positions 0 … s−1; starts a fresh cache
    decode(x [b, n, D])  -> out [b, n, D]   n ≥ 1 new tokens at the next positions; uses and grows
                                            the cache filled so far
    precision: InternalPrecision            the type each step of the layer rounds to

Outputs are in `dtype`; the positions are causal with bottom-right alignment (each token sees every
earlier token and itself). Prefill then decode steps must give, token by token, the output of
`mla_forward` on the whole sequence.

The declared precision
----------------------
`InternalPrecision` names, step by step (linear projections, RMSNorm, RoPE, scores, softmax,
P·V), the floating type the implementation rounds to there. A float64 module may still round some
steps to float32: HF transformers' eager DeepseekV3Attention computes RMSNorm, the RoPE angles and
cos/sin, and the softmax in float32. An implementation must declare that; the bound then allows
exactly that much, and no more.

The bound (`layer_error_bound`)
-------------------------------
A running error analysis of the naive (MHA-mode) layer, evaluated on the case's own float64
intermediates. Each step maps (value, elementwise error bound) of its operands to those of its
result; every rule is a worst-case inequality, so the result bounds |out_impl − out_exact| for any
summation order. With u the unit roundoff of the step's declared type and γ_n = n·u/(1 − n·u):

- rounding the input x and the weights to the module dtype: u_dtype·|x|, u_dtype·|W| (0 in float64);
- a linear map y = a·Wᵀ over n inputs:
  |Δy| ≤ Δa·|W|ᵀ + (|a| + Δa)·(u_w|W|)ᵀ + γ_n·(|a| + Δa)·(|W|(1 + u_w))ᵀ;
- a product of perturbed factors: |x̂ŷ − xy| ≤ Δx|y| + |x|Δy + ΔxΔy, then u·(|xy| + that) for its rounding;
- RMSNorm over n: the operand cast (u), the mean of squares (γ_{n+2}: squares, sum, division,
  + eps) perturb the mean square by a relative δ; the reciprocal square root moves by
  (1 − δ)^(−1/2)·(1 + 2u) − 1 (rsqrt within one ulp), then two products;
- RoPE: the inverse frequency f_j = θ_base^(−2j/d_r) has relative error (ln(θ_base)·2j/d_r + 3)·u
  (the rounded exponent is amplified by the power; the power and the reciprocal); with YaRN the
  interpolated frequency and the ramp blend add their roundings frequency by frequency
  (`_inv_freq_error`); the angle θ = position·f is one more product, so large positions amplify;
  cos/sin are within one ulp (2u) of their computed angle, times the YaRN magnitude m. The
  operands are rounded to the RoPE type first (HF's DeepseekV2 casts q_pe and k_pe to float32 for
  its complex product); the rotation is two products and a sum;
- scores s = scale·q·k over d = d_n + d_r: the dot-product rule with γ_{d+3}, which also covers a
  scale applied to q, or as √scale to both q and k (torch SDPA's math path), then the scale's product;
- softmax: every exponent s_t − max is off by at most ε = max_t(Δs_t + u(|s_t| + |max| + |s_t − max|))
  + |log(1 − u_exp)| (exp within one ulp, u_exp = 2u), which moves every probability by a factor
  within e^{±2ε}; the normaliser's sum (γ over 2L + 4 terms: an online softmax may rescale its
  running sum once per key), the division and the cast back give ρ = exp(2ε − log(1 − γ) + 2·log(1 + u)) − 1
  and |Δp_t| ≤ ρ·p_t;
- P·V over L keys and the output projection: the dot-product rule.

The bound covers the implementation's rounding (its declared types) plus the reference's own
float64 rounding (the same analysis with u = 2^-53 everywhere), since both are compared with the
exact layer. Where the case amplifies rounding — long dot products, large activations, scores far
from their maximum, positions with large angles — the terms grow with it; that growth divided by u
is the case's amplification factor, reported with the result.

No rule drops a higher-order term (products of errors are kept), so the bound is rigorous, not a
first-order estimate. It is +inf only when a declared type is too coarse for the case (n·u ≥ 1 in
some γ_n, or RMSNorm's mean-square perturbation δ reaching 1); check_layer then fails the case,
since nothing can be certified. A float32-internal layer then passes with room, while a
softmax scale off by 0.5 %, the other RoPE layout, a missing kv_norm or stale decode positions move
the output by 10^-3 or more relative and fail.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from mla_verify.config import MLAConfig, yarn_mscale
from mla_verify.reference import (MLAWeights, apply_rope, mla_forward, random_weights, rms_norm, rope_cos_sin,
                                  rope_inv_freq)

__all__ = [
    "InternalPrecision",
    "MLALayer",
    "LayerFactory",
    "LayerCase",
    "LayerBound",
    "LayerReport",
    "LayerFailure",
    "unit_roundoff",
    "layer_error_bound",
    "run_layer",
    "check_layer",
    "resolve_factory",
    "unsupported_reason",
    "replay",
]

F64 = torch.float64


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = ½·machine epsilon of dtype (float64 1.1e-16, float32 6.0e-8)."""
    return torch.finfo(dtype).eps / 2


def _coarser(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    return a if unit_roundoff(a) >= unit_roundoff(b) else b


@dataclass(frozen=True)
class InternalPrecision:
    """The floating type each step of a layer rounds its results to."""

    projections: torch.dtype = F64  # x·W_DQ, c_q·W_UQ / x·W_Q, x·W_DKV, c·W_UKV, o·W_O
    rms_norm: torch.dtype = F64  # q_a and kv_a norms
    rope: torch.dtype = F64  # inverse frequencies, angles, cos/sin and the rotation
    scores: torch.dtype = F64  # q·k and the softmax scale
    softmax: torch.dtype = F64
    attention: torch.dtype = F64  # P·V
    note: str = ""

    STEPS = ("projections", "rms_norm", "rope", "scores", "softmax", "attention")

    @classmethod
    def uniform(cls, dtype: torch.dtype, note: str = "") -> InternalPrecision:
        return cls(dtype, dtype, dtype, dtype, dtype, dtype, note)

    def at_least(self, dtype: torch.dtype) -> InternalPrecision:
        """Every step no finer than dtype (a float32 module cannot compute a step in float64)."""
        return dataclasses.replace(self, **{step: _coarser(getattr(self, step), dtype) for step in self.STEPS})

    @property
    def coarsest(self) -> torch.dtype:
        return max((getattr(self, step) for step in self.STEPS), key=unit_roundoff)

    def describe(self) -> str:
        groups: dict[torch.dtype, list[str]] = {}
        for step in self.STEPS:
            groups.setdefault(getattr(self, step), []).append(step)
        text = "; ".join(f"{', '.join(steps)} in {str(dtype).removeprefix('torch.')}" for dtype, steps in
                         sorted(groups.items(), key=lambda item: unit_roundoff(item[0])))
        return f"{text} ({self.note})" if self.note else text


class MLALayer(Protocol):
    precision: InternalPrecision

    def prefill(self, x: torch.Tensor) -> torch.Tensor: ...

    def decode(self, x: torch.Tensor) -> torch.Tensor: ...


LayerFactory = Callable[[MLAConfig, MLAWeights, torch.dtype, str], MLALayer]


# ----------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerCase:
    """A prefill of `prefill` tokens then one decode call per entry of `decode` (its token count),
    on `batch` sequences; weights and inputs from `seed`."""

    config: MLAConfig
    batch: int = 1
    prefill: int = 3
    decode: tuple[int, ...] = (1, 1, 1)
    seed: int = 0
    dtype: str = "float64"

    def __post_init__(self) -> None:
        if self.batch < 1 or self.prefill < 1 or any(n < 1 for n in self.decode):
            raise ValueError(f"batch, prefill and every decode step must be >= 1; got {self.batch}, "
                             f"{self.prefill}, {self.decode}")

    @property
    def length(self) -> int:
        return self.prefill + sum(self.decode)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def build(self) -> tuple[MLAWeights, torch.Tensor]:
        """float64 weights and x [batch, length, D]."""
        g = torch.Generator().manual_seed(self.seed)
        weights = random_weights(self.config, g)
        x = torch.randn(self.batch, self.length, self.config.hidden_size, generator=g, dtype=F64)
        return weights, x

    def describe(self) -> str:
        c = self.config
        yarn = "none" if c.yarn is None else (f"factor {c.yarn.factor}, original "
                                              f"{c.yarn.original_max_position_embeddings}, "
                                              f"mscale {c.yarn.mscale}/{c.yarn.mscale_all_dim}")
        return (f"{self.dtype} b={self.batch} prefill={self.prefill} decode={list(self.decode)} seed={self.seed}; "
                f"D={c.hidden_size} h={c.num_heads} q_lora={c.q_lora_rank} kv_lora={c.kv_lora_rank} "
                f"nope/rope/v={c.qk_nope_head_dim}/{c.qk_rope_head_dim}/{c.v_head_dim} rope={c.rope_layout} "
                f"theta={c.rope_theta} yarn={yarn}")


# ----------------------------------------------------------------------------------------------
# The error bound
# ----------------------------------------------------------------------------------------------

def _gamma(n: int, u: float) -> float:
    nu = n * u
    return nu / (1 - nu) if nu < 1 else math.inf


def _linear(a: torch.Tensor, ea: torch.Tensor, w: torch.Tensor, u: float,
            u_w: float) -> tuple[torch.Tensor, torch.Tensor]:
    """y = a·wᵀ and its error bound (a ± ea; w rounded by u_w; n = in_features terms summed at u)."""
    wa = w.abs()
    y = a @ w.T
    magnitude = (a.abs() + ea) @ wa.T * (1 + u_w)
    error = ea @ wa.T + (a.abs() + ea) @ wa.T * u_w + _gamma(w.shape[1], u) * magnitude
    return y, error


def _product(x: torch.Tensor, ex: torch.Tensor, y: torch.Tensor, ey: torch.Tensor, u: float) -> torch.Tensor:
    """Error bound of fl(x̂·ŷ) for magnitudes x, y ≥ 0 with errors ex, ey."""
    error = ex * y + x * ey + ex * ey
    return error + u * (x * y + error)


def _rms_norm(a: torch.Tensor, ea: torch.Tensor, weight: torch.Tensor, eps: float, u: float,
              u_w: float) -> tuple[torch.Tensor, torch.Tensor]:
    n = a.shape[-1]
    y = rms_norm(a, weight, eps)
    ea1 = ea + u * (a.abs() + ea)  # cast to the norm's type
    mean_square = a.pow(2).mean(-1, keepdim=True) + eps
    perturbation = ((2 * a.abs() * ea1 + ea1 ** 2).mean(-1, keepdim=True)
                    + _gamma(n + 2, u) * ((a.abs() + ea1) ** 2).mean(-1, keepdim=True) + eps * _gamma(n + 2, u))
    delta = perturbation / mean_square
    r = mean_square.rsqrt()
    delta_r = torch.where(delta < 1, torch.expm1(-0.5 * torch.log1p(-delta.clamp(max=0.999999)) + math.log1p(2 * u)),
                          torch.full_like(delta, math.inf))
    w = weight.abs().to(F64)
    scaled = _product(a.abs(), ea1, r.expand_as(a), (r * delta_r).expand_as(a), u)  # a·r
    error = _product(a.abs() * r, scaled, w.expand_as(a), (u_w * w).expand_as(a), u)  # ·weight
    return y, error


def _rope_error(x: torch.Tensor, ex: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, e_cs: torch.Tensor,
                layout: str, u: float) -> torch.Tensor:
    """Error bound of the rotated x [..., d_r] (the reference's apply_rope pairing); cos, sin, e_cs
    broadcast against x[..., :d_r/2]."""
    ex = ex + u * (x.abs() + ex)  # operands rounded to the rope type
    if layout == "interleaved":
        a, b, ea, eb = x[..., 0::2], x[..., 1::2], ex[..., 0::2], ex[..., 1::2]
    else:
        half = x.shape[-1] // 2
        a, b, ea, eb = x[..., :half], x[..., half:], ex[..., :half], ex[..., half:]
    c, s = cos.abs(), sin.abs()
    ac, bs = _product(a.abs(), ea, c, e_cs, u), _product(b.abs(), eb, s, e_cs, u)
    bc, as_ = _product(b.abs(), eb, c, e_cs, u), _product(a.abs(), ea, s, e_cs, u)
    first = ac + bs + u * (a.abs() * c + b.abs() * s + ac + bs)
    second = bc + as_ + u * (b.abs() * c + a.abs() * s + bc + as_)
    if layout == "interleaved":
        return torch.stack((first, second), dim=-1).flatten(-2)
    return torch.cat((first, second), dim=-1)


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


def _cos_sin_error(config: MLAConfig, positions: torch.Tensor, u: float) -> torch.Tensor:
    """[len(positions), d_r/2] bound on |Δ(m·cos θ)| and |Δ(m·sin θ)|: θ = position·f (one product),
    cos/sin within one ulp (≤ 2u, |cos| ≤ 1) of the computed angle, then times the YaRN magnitude m
    (itself rounded, and one product)."""
    f, df = _inv_freq_error(config, u)
    p = positions.to(F64).abs()[:, None]
    d_theta = _product(p, torch.zeros_like(p), f[None, :], df[None, :], u)
    magnitude = 1.0
    if config.yarn is not None:
        magnitude = yarn_mscale(config.yarn.factor, config.yarn.mscale) / yarn_mscale(
            config.yarn.factor, config.yarn.mscale_all_dim)
    ones = torch.ones_like(d_theta)
    return _product(ones, d_theta + 2 * u, magnitude * ones, magnitude * u * ones, u)


@dataclass
class LayerBound:
    """reference out [b, s, D] (float64, naive mode) and the elementwise bound on |out − reference|."""

    reference: torch.Tensor
    bound: torch.Tensor


def _running_bound(config: MLAConfig, weights: MLAWeights, x: torch.Tensor, p: InternalPrecision,
                   u_dtype: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(naive-mode output, its error bound) for a layer rounding step by step as `p` says, with
    inputs and weights rounded by u_dtype."""
    u = {step: unit_roundoff(getattr(p, step)) for step in InternalPrecision.STEPS}
    h, dn, dr, dv, dc = (config.num_heads, config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim,
                         config.kv_lora_rank)
    b, S, _ = x.shape
    x = x.to(F64)
    ex = u_dtype * x.abs()
    W = lambda t: t.to(F64)  # noqa: E731

    # query
    if weights.wq is not None:
        q, eq = _linear(x, ex, W(weights.wq), u["projections"], u_dtype)
    else:
        qa, eqa = _linear(x, ex, W(weights.wq_a), u["projections"], u_dtype)
        cq, ecq = _rms_norm(qa, eqa, W(weights.q_norm), config.rms_norm_eps, u["rms_norm"], u_dtype)
        q, eq = _linear(cq, ecq, W(weights.wq_b), u["projections"], u_dtype)
    q, eq = q.view(b, S, h, dn + dr), eq.view(b, S, h, dn + dr)
    # latent and rope key
    kv, ekv = _linear(x, ex, W(weights.wkv_a), u["projections"], u_dtype)
    c, ec = _rms_norm(kv[..., :dc], ekv[..., :dc], W(weights.kv_norm), config.rms_norm_eps, u["rms_norm"], u_dtype)
    positions = torch.arange(S)
    cos, sin = rope_cos_sin(config, positions)
    e_cs = _cos_sin_error(config, positions, u["rope"])
    q_pe = apply_rope(q[..., dn:], cos[:, None, :], sin[:, None, :], config.rope_layout)
    eq_pe = _rope_error(q[..., dn:], eq[..., dn:], cos[:, None, :], sin[:, None, :], e_cs[:, None, :],
                        config.rope_layout, u["rope"])
    k_pe = apply_rope(kv[..., dc:], cos, sin, config.rope_layout)
    ek_pe = _rope_error(kv[..., dc:], ekv[..., dc:], cos, sin, e_cs, config.rope_layout, u["rope"])
    # expanded keys and values per head
    wkv_b = W(weights.wkv_b).view(h, dn + dv, dc)
    k_nope, ek_nope = _linear(c, ec, wkv_b[:, :dn].reshape(h * dn, dc), u["projections"], u_dtype)
    v, ev = _linear(c, ec, wkv_b[:, dn:].reshape(h * dv, dc), u["projections"], u_dtype)
    k_nope, ek_nope = k_nope.view(b, S, h, dn), ek_nope.view(b, S, h, dn)
    v, ev = v.view(b, S, h, dv), ev.view(b, S, h, dv)
    qf = torch.cat((q[..., :dn], q_pe), -1)
    eqf = torch.cat((eq[..., :dn], eq_pe), -1)
    kf = torch.cat((k_nope, k_pe[:, :, None, :].expand(b, S, h, dr)), -1)
    ekf = torch.cat((ek_nope, ek_pe[:, :, None, :].expand(b, S, h, dr)), -1)
    # scores
    scale = config.softmax_scale
    dot = torch.einsum("bshd,bthd->bsht", qf, kf)
    aq, ak = qf.abs(), kf.abs()
    e_dot = (torch.einsum("bshd,bthd->bsht", eqf, ak) + torch.einsum("bshd,bthd->bsht", aq, ekf)
             + torch.einsum("bshd,bthd->bsht", eqf, ekf)
             + _gamma(dn + dr + 3, u["scores"]) * torch.einsum("bshd,bthd->bsht", aq + eqf, ak + ekf))
    s = dot * scale
    es = scale * e_dot + u["scores"] * scale * (dot.abs() + e_dot)
    # softmax
    visible = torch.ones(S, S, dtype=torch.bool).tril()[None, :, None, :]  # [1, s, 1, t]: t ≤ s
    neg_inf = torch.tensor(-math.inf, dtype=F64)
    masked = torch.where(visible, s, neg_inf)
    row_max = masked.amax(-1, keepdim=True)
    p_ref = torch.softmax(masked, dim=-1)
    u_sm = u["softmax"]
    exponent_error = es + u_sm * (s.abs() + row_max.abs() + (s - row_max).abs())
    eps_max = torch.where(visible, exponent_error, torch.zeros((), dtype=F64)).amax(-1, keepdim=True)
    eps_max = eps_max - math.log1p(-2 * u_sm)
    gamma_sum = _gamma(2 * S + 4, u_sm)
    rho = torch.expm1(2 * eps_max - math.log1p(-gamma_sum) + 2 * math.log1p(u_sm)) if gamma_sum < 1 else \
        torch.full_like(eps_max, math.inf)
    ep = rho * p_ref
    # P·V
    av = v.abs()
    o = torch.einsum("bsht,bthd->bshd", p_ref, v)
    eo = (torch.einsum("bsht,bthd->bshd", ep, av) + torch.einsum("bsht,bthd->bshd", p_ref, ev)
          + torch.einsum("bsht,bthd->bshd", ep, ev)
          + _gamma(S, u["attention"]) * torch.einsum("bsht,bthd->bshd", p_ref + ep, av + ev))
    # output projection
    out, eout = _linear(o.flatten(2), eo.flatten(2), W(weights.wo), u["projections"], u_dtype)
    if u_dtype:
        eout = eout + u_dtype * (out.abs() + eout)
    return out, eout


def layer_error_bound(config: MLAConfig, weights: MLAWeights, x: torch.Tensor, precision: InternalPrecision,
                      dtype: torch.dtype = F64) -> LayerBound:
    """The float64 reference (naive mode over the whole sequence x [b, s, D]) and the elementwise
    bound on |out_impl − reference| for an implementation of module dtype `dtype` declaring
    `precision`: its own rounding plus the reference's (see the module docstring)."""
    u_dtype = 0.0 if dtype == F64 else unit_roundoff(dtype)
    _, impl_bound = _running_bound(config, weights, x, precision.at_least(dtype), u_dtype)
    _, reference_bound = _running_bound(config, weights, x, InternalPrecision.uniform(F64), 0.0)
    reference = mla_forward(config, weights, x.to(F64), mode="naive")
    return LayerBound(reference=reference, bound=impl_bound + reference_bound)


# ----------------------------------------------------------------------------------------------
# Running and judging a layer
# ----------------------------------------------------------------------------------------------

def resolve_factory(spec: str | LayerFactory) -> LayerFactory:
    """A factory from 'package.module:attr' (or the factory itself)."""
    if callable(spec):
        return spec
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise ValueError(f"spec must be 'package.module:attr'; got {spec!r}")
    return getattr(importlib.import_module(module_name), attr)


def unsupported_reason(factory: str | LayerFactory, config: MLAConfig) -> str | None:
    """Why `factory` cannot build `config` (its optional `supports` attribute), or None."""
    supports = getattr(resolve_factory(factory), "supports", None)
    return supports(config) if supports is not None else None


def run_layer(layer: MLALayer, case: LayerCase, x: torch.Tensor) -> torch.Tensor:
    """Prefill then the case's decode steps; the outputs concatenated, float64 [b, length, D]."""
    dtype = case.torch_dtype
    outputs = [layer.prefill(x[:, :case.prefill].to(dtype))]
    start = case.prefill
    for n in case.decode:
        outputs.append(layer.decode(x[:, start:start + n].to(dtype)))
        start += n
    for out, n in zip(outputs, (case.prefill, *case.decode)):
        if tuple(out.shape) != (case.batch, n, case.config.hidden_size) or out.dtype != dtype:
            raise LayerFailure(f"wrong shape or dtype: expected {[case.batch, n, case.config.hidden_size]} "
                               f"{case.dtype}, got {list(out.shape)} {out.dtype}", case)
    return torch.cat([out.to(F64).cpu() for out in outputs], dim=1)


@dataclass
class LayerReport:
    """ratio = max |out − ref| / bound (≤ 1 passes); observed and bound at that element."""

    ratio: float
    observed: float
    bound: float
    index: tuple[int, ...]
    relative_error: float  # ‖out − ref‖ / ‖ref‖
    amplification: float  # max bound / (u of the coarsest declared type · max |ref|)
    precision: str


class LayerFailure(AssertionError):
    def __init__(self, message: str, case: LayerCase, spec: str | None = None) -> None:
        lines = [message, f"  case: {case.describe()}"]
        if spec is not None:
            lines.append(f"  replay: python -c \"from mla_verify.config import MLAConfig, YarnConfig; "
                         f"from mla_verify.layer_contract import LayerCase, replay; replay({spec!r}, {case!r})\"")
        super().__init__("\n".join(lines))
        self.case = case


def check_layer(factory: str | LayerFactory, case: LayerCase, declared: InternalPrecision | None = None,
                device: str = "cpu") -> LayerReport:
    """Build the layer, run prefill + decode steps, and compare with the reference within the bound
    of its declared precision (or `declared`, to test a claim). Raises LayerFailure on a violation."""
    spec = factory if isinstance(factory, str) else None
    weights, x = case.build()
    layer = resolve_factory(factory)(case.config, weights, case.torch_dtype, device)
    precision = declared or layer.precision
    out = run_layer(layer, case, x)
    judged = layer_error_bound(case.config, weights, x, precision, case.torch_dtype)
    error = (out - judged.reference).abs()
    bound = judged.bound
    if not bool(torch.isfinite(bound).all()):
        raise LayerFailure(f"the declared precision ({precision.describe()}) gives no finite bound for this case: "
                           "its rounding is too coarse for the sums and norms involved", case, spec)
    ratio = torch.where(bound > 0, error / bound, torch.where(error > 0, math.inf, 0.0))
    ratio = torch.nan_to_num(ratio, nan=math.inf)
    flat = int(torch.argmax(ratio))
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), ratio.shape))
    reference_scale = float(judged.reference.abs().max())
    report = LayerReport(
        ratio=float(ratio[index]), observed=float(error[index]), bound=float(bound[index]), index=index,
        relative_error=float((out - judged.reference).norm() / judged.reference.norm().clamp_min(1e-300)),
        amplification=float(bound.max()) / (unit_roundoff(precision.at_least(case.torch_dtype).coarsest)
                                            * max(reference_scale, 1e-300)),
        precision=precision.describe())
    if not report.ratio <= 1:
        raise LayerFailure(f"|out - ref| / bound = {report.ratio:.3g} at [b, s, D] = {list(index)}: out "
                           f"{float(out[index]):.17g}, ref {float(judged.reference[index]):.17g}, bound "
                           f"{report.bound:.3g} (declared: {report.precision}; relative error "
                           f"{report.relative_error:.3g})", case, spec)
    return report


def replay(spec: str, case: LayerCase) -> LayerReport:
    """Rerun one layer case (the command a LayerFailure prints) and print the result."""
    report = check_layer(spec, case)
    print(f"passes: error/bound {report.ratio:.3g}, relative error {report.relative_error:.3g}")
    return report
