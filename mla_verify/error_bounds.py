"""The one tolerance model: a-priori error bounds for a decode kernel, derived from the case itself.

The reference is computed in float64 from the same rounded inputs the kernel sees, so every bound
below covers only the kernel's own arithmetic. The model of a correct kernel:

- scores s_t = scale·q·k_t accumulated in the accumulation type (unit roundoff u_a; float32 unless
  declared): products of inputs are exact in u_a (tensor cores, or plain fp32 on fp16/bf16 inputs),
  the length-d reduction errs by at most γ_d·Σ_j|q_j||k_tj| (γ_n = n·u_a/(1 − n·u_a), worst case,
  any summation order), and the scale multiply, the log2(e) fold and the running-max subtraction
  add at most 4·u_a·max_t|s_t|. So every score errs by at most
      E = max_t scale·γ_d·(|q|·|k_t|) + 4·u_a·max_t|s_t|.
- unnormalised weights w_t = exp(s_t − m) are off by a factor in [e^−E, e^E]·(1 ± u_exp), u_exp the
  relative error of the exponential (ex2.approx: ≤ 2^-21). Write η = (1 + u_exp)·e^E − 1. The
  normalised probabilities of the perturbed weights satisfy p'_t/p_t ∈ [(1−η)/(1+η), (1+η)/(1−η)],
  so |p'_t − p_t| ≤ ρ·p_t with ρ = 2η/(1 − η). Because Σ(p'_t − p_t) = 0, the output moves by
      A_c = min(ρ, 2)·½·range_c(v)        (range over the sequence's keys, column c)
  and no more (Σ Δp_t v_tc = Σ Δp_t (v_tc − mid_c)).
- the normaliser: a kernel divides by its own sum (error γ_{L+8} with the split merge) or
  multiplies by exp(−lse) of its own lse (error of the order η): either way the output is scaled by
  1 + ν with ν = γ_{L+8} + η, giving B_c = ν·(|o_c| + A_c).
- the P·V product: P may be rounded to the input type (relative u_p = u_in, and an absolute
  ≤ ½·(smallest subnormal) for weights that underflow), accumulated over L keys:
      C_c = (u_p + γ_{L+2})·(1 + ρ)(1 + ν)·Σ_t p_t|v_tc| + tiny_in·Σ_t |v_tc|.
- the output is rounded to its type: ≤ u_out·(|o_c| + A_c + B_c + C_c) + tiny_out.
lse: lse is 1-Lipschitz in the scores' max-norm, so |Δlse| ≤ E + log(1 + u_exp) + γ_{L+8}
  + 6·u_a·(|lse| + max_t|s_t|) (log, base change and max added back) + u_lse·|lse| (stored as float32).

Every term is a worst-case (not probabilistic) bound, so a correct kernel never exceeds it; the
terms scale with the case (d, L, |q||k|, the spread and size of V, the types), so a scale off by
0.5 %, an lse in base 2 or rounded through bf16, or P·V accumulated in float16 on float32 inputs
exceed it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mla_verify.reference import PagedDecodeTerms

__all__ = ["unit_roundoff", "smallest_subnormal", "gamma", "DecodeBounds", "decode_bounds"]

F64 = torch.float64
EXP_RELATIVE_ERROR = {torch.float32: 2.0 ** -21, torch.float64: 2.0 ** -50}


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = ½·machine epsilon: fp64 1.1e-16, fp32 6.0e-8, fp16 4.9e-4, bf16 3.9e-3."""
    return torch.finfo(dtype).eps / 2


def smallest_subnormal(dtype: torch.dtype) -> float:
    info = torch.finfo(dtype)
    return info.smallest_normal * info.eps


def gamma(n: int | torch.Tensor, u: float) -> float | torch.Tensor:
    """γ_n = n·u / (1 − n·u): the worst-case relative error of an n-term sum or dot product."""
    nu = n * u
    if isinstance(nu, torch.Tensor):
        return torch.where(nu < 1, nu / (1 - nu), torch.full_like(nu, math.inf))
    return nu / (1 - nu) if nu < 1 else math.inf


@dataclass
class DecodeBounds:
    """Per-element bounds: out [b, s_q, h, head_dim_v] and lse [b, h, s_q], float64 (natural log)."""

    out: torch.Tensor
    lse: torch.Tensor


def decode_bounds(terms: PagedDecodeTerms, q: torch.Tensor, softmax_scale: float, head_dim_v: int,
                  input_dtype: torch.dtype, accumulation_dtype: torch.dtype,
                  output_dtype: torch.dtype) -> DecodeBounds:
    """Bounds on |out − out_ref| and |lse − lse_ref| for one case (see the module docstring)."""
    if terms.rows.shape[1] == 0:  # no sequence has a key: every row is checked exactly
        return DecodeBounds(out=torch.zeros_like(terms.out), lse=torch.zeros_like(terms.lse))
    u_a = unit_roundoff(accumulation_dtype)
    u_in, tiny_in = unit_roundoff(input_dtype), smallest_subnormal(input_dtype) / 2
    u_out, tiny_out = unit_roundoff(output_dtype), smallest_subnormal(output_dtype) / 2
    u_exp = EXP_RELATIVE_ERROR.get(accumulation_dtype, 4 * u_a)
    d = q.shape[-1]
    lengths = terms.valid.sum(-1).to(F64)  # [b]
    rows, visible = terms.rows, terms.visible
    values = rows[..., :head_dim_v]

    abs_dot = torch.einsum("bshd,btd->bsht", q.to(F64).abs(), rows.abs()) * abs(softmax_scale)
    score_error = gamma(d, u_a) * abs_dot + 4 * u_a * _masked_max(terms.scores.abs(), visible)[..., None]
    max_abs_score = _masked_max(terms.scores.abs(), visible)  # [b, s, h]
    E = _masked_max(score_error, visible)  # [b, s, h]
    eta = (1 + u_exp) * torch.exp(E) - 1
    rho = torch.where(eta < 1, 2 * eta / (1 - eta), torch.full_like(eta, math.inf))
    gamma_sum = gamma(lengths + 8, u_a)[:, None, None]  # [b, 1, 1]
    nu = gamma_sum + eta

    neg_inf = torch.tensor(-math.inf, dtype=F64, device=rows.device)
    valid_values = terms.valid[..., None]
    spread = (torch.where(valid_values, values, neg_inf).amax(1) + torch.where(valid_values, -values, neg_inf).amax(1))
    spread = torch.where(torch.isfinite(spread), spread, torch.zeros_like(spread))  # [b, c]; 0 when empty
    A = torch.clamp(rho, max=2.0)[..., None] * 0.5 * spread[:, None, None, :]
    B = nu[..., None] * (terms.out.abs() + A)
    weighted_abs = torch.einsum("bsht,btc->bshc", terms.p, values.abs())
    sum_abs = values.abs().sum(1)[:, None, None, :]  # [b, 1, 1, c]
    C = ((u_in + gamma(lengths + 2, u_a)[:, None, None, None]) * (1 + rho[..., None]) * (1 + nu[..., None])
         * weighted_abs + tiny_in * sum_abs)
    pre = A + B + C
    out_bound = pre + u_out * (terms.out.abs() + pre) + tiny_out

    lse_ref = terms.lse.permute(0, 2, 1)  # [b, s, h]
    finite_lse = torch.where(torch.isfinite(lse_ref), lse_ref.abs(), torch.zeros_like(lse_ref))
    u_lse = unit_roundoff(torch.float32)
    lse_bound = (E + math.log1p(u_exp) + gamma_sum + 6 * u_a * (finite_lse + max_abs_score) + u_lse * finite_lse)
    # Rows with nothing visible are checked exactly (out 0, lse ∓inf); their bound is 0.
    has_key = visible.expand_as(terms.scores).any(-1)  # [b, s, h]
    out_bound = torch.where(has_key[..., None], out_bound, torch.zeros_like(out_bound))
    lse_bound = torch.where(has_key, lse_bound, torch.zeros_like(lse_bound))
    return DecodeBounds(out=out_bound, lse=lse_bound.permute(0, 2, 1).contiguous())


def _masked_max(x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Max over the last axis of x where visible; 0 for a row with nothing visible."""
    if x.shape[-1] == 0:
        return torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device)
    return torch.where(visible, x, torch.zeros((), dtype=x.dtype, device=x.device)).amax(-1)
