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
  ≤ ½·(smallest subnormal) of the input or P type for weights that underflow: 2^-10 when P is
  rounded to e4m3, as SGLang's Triton kernel does against an FP8 V), accumulated over L keys:
      C_c = (u_p + γ_{L+2})·(1 + ρ)(1 + ν)·Σ_t p_t|v_tc| + tiny_p·Σ_t |v_tc|.
- the output is rounded to its type: ≤ u_out·(|o_c| + A_c + B_c + C_c) + tiny_out.
Flush to zero: a kernel computing in float32 may flush any subnormal float32 result to 0 (Triton's
and CUDA fast math's default), so every absolute floor above (tiny_p, tiny_dq, tiny_out) is at
least float32's smallest normal 2^-126 for such a kernel.
lse: lse is 1-Lipschitz in the scores' max-norm, so |Δlse| ≤ E + log(1 + u_exp) + γ_{L+8}
  + 6·u_a·(|lse| + max_t|s_t|) (log, base change and max added back) + u_lse·|lse| (stored as float32).

FP8 caches. The reference uses the exactly dequantised values (e4m3 × float32 scale in float64). A
kernel rounds each dequantised value it uses to its dequantisation type (u_dq: bf16 for FlashMLA's
tensor-core path, float32 for a float32 multiply; `Capabilities.dequant_dtype`, default the input
type): |k̂_tj − k_tj| ≤ u_dq·|k_tj| + tiny_dq. So every score errs by u_dq·(1 + γ_d)·S_t more (plus
the subnormal floor tiny_dq·scale·Σ_j|q_j|), and P·V by u_dq·Σ_t p_t|v_tc| (+ tiny_dq) more, in the
sound tier; in the sharp tier the score term joins c_g and the V rounding is one more independent
vector sum, (u_dq/√3)·sqrt(Σ_g P_g²‖v_g‖²) at its root mean square. For a power-of-two scale the
product is exact in any of these types and the terms are slack.

Attention sink (`with_attn_sink`). The output is o·σ with σ = 1/(1 + exp(sink − lse)); σ is
σ(1 − σ)-Lipschitz in lse, and over an lse error Δ its slope changes by at most e^{2Δ}, so the
kernel's σ' (from its own lse or running sum, error ≤ Δ) has |σ' − σ| ≤ σ(1 − σ)·Δ·e^{2Δ} + 4·u_a·σ
(its exp, add and divide), plus the smallest normal of the accumulation type (σ may flush to 0
below it). The bounds become σ·bound + (|o| + pre)·|Δσ| + tiny_out, with the lse
bound (sound) or the sharp lse tolerance (sharp) as Δ. A +inf sink (σ = 0) demands out 0 exactly.

Every term is a worst-case (not probabilistic) bound, so a correct kernel never exceeds it; the
terms scale with the case (d, L, |q||k|, the spread and size of V, the types), so a scale off by
0.5 %, an lse in base 2 or rounded through bf16, or P·V accumulated in float16 on float32 inputs
exceed it. Two refinements keep it sound and make it tighter: the softmax term is also at most
ρ·Σ_t p_t|v_tc| (each |Δp_t| ≤ ρ·p_t), and the lse's score term is also at most
e^{2E}·Σ_t p_t·err_t (the mean-value form Δlse = Σ_t p̃_t·δs_t with p̃_t ≤ e^{2E}·p_t). A kernel
that declares partials rounded to a type (split-KV, cascade or context-parallel merges) gets
u_part·Σ_t p_t|v_tc| more: a convex combination of partials each rounded relatively by u_part.

THE SHARP TIER (`sharp`). The worst case above assumes every rounding error takes its extreme value
with the same sign; at serving shapes that is ~10³ times what a correct kernel does, and a dropped
token at 16k, a scale off by 10⁻³ or P·V summed in bf16 hide inside it. The sharp tier keeps the
deterministic pieces and replaces the sums of many rounding errors by their probabilistic size
(Higham & Mary, "A new approach to probabilistic rounding error analysis", 2019): rounding errors
of *distinct* operations are modelled as independent and mean-zero, each bounded by its
worst case. Identical keys give identical rounding (a kernel computes the same dot product the same
way), so keys are first grouped by value: g runs over distinct keys, P_g = Σ_{t∈g} p_t, w_g = v_g − o.
Per row (b, s_q, h), with λ = 8 (a Hoeffding tail of 2·e^{-32}):

- lse. Score errors: each |δs_g| ≤ c_g = γ_d·S_g + 4u_a|s_g| (S_g = scale·Σ_j|q_j||k_gj|), summed
  with weights P_g: λ·sqrt(Σ_g P_g²c_g²) (Hoeffding over independent keys). Tensor cores truncate
  instead of rounding, a one-signed error when the products share a sign: at most 2u_a per
  16-wide MMA step of |s_g|, a bias (d/8)·u_a·Σ_g P_g|s_g| that does not average out. The row sum:
  λ·u_a·√n (n visible keys; each addition errs by ≤ u_a of the total). Log, base change, the max
  added back and the float32 store as in the sound tier: 6u_a(|lse| + max|s|) + u_lse|lse|.
- out, as the Euclidean norm over the head_dim_v columns of the row (an aggregate: an element-wise
  tolerance must cover the worst element, a norm only the typical one):
  - the output rounding, deterministic: sqrt(Σ_c h_c²), h_c half an ulp of o_c in the output type;
  - P rounded to the P type (u_p) before P·V: Σ_g P_g·ε_g·v_g = ε̄·o + Σ_g P_g·ε_g·w_g with
    ε̄ = Σ P_g ε_g. |ε̄| ≤ u_p·min(1, λ·sqrt(Σ_g P_g²)) (Hoeffding; 1 when one key dominates or all
    keys are equal), and the centred sum is a sum of independent random vectors with
    E‖·‖² ≤ (u_p²/3)·Σ_g P_g²‖w_g‖² (round to nearest: the error is uniform within half an ulp):
    allowed κ = 2 times that root mean square, never more than the deterministic u_p·Σ_g P_g‖w_g‖
    (which is what a few dominant keys can reach);
  - score errors through the softmax, Δo = Σ_g P_g(δs_g − δ̄)·w_g: the same vector-sum form with
    c_g in place of u_p (independent part), plus the truncation bias (d/8)·u_a·Σ_g P_g|s_g|‖w_g‖.
    This is first order in δs; along the path from the exact scores to the kernel's the
    probabilities stay within e^{2E} of p (E = max_g c_g, as in the sound tier), so the score terms
    of out and lse carry the factor e^{2E}: ≈ 1 at the errors of real cases, and what keeps the tier
    sound when scores err by ~1 or more (an FP8 cache dequantised to bf16 under huge q, where one
    rounding moves a score by hundreds and the first-order term alone was exceeded 2.2-fold);
  - the P·V accumulation and the normaliser: λ·u_a·√n·‖o‖ each (partial sums of a random-order
    sequence are of the size of the result), and for a kernel that normalises by exp(−lse) the
    lse's own log/max/store error (6u_a(|lse| + max|s|) + u_lse|lse| + log(1 + u_exp)) times ‖o‖;
  - declared partials (N merged, each rounded by u_part): u_part·(‖o‖ + N·sqrt(Σ_g P_g²‖v_g‖²)),
    capped by the deterministic u_part·Σ_g P_g‖v_g‖.
  The error before the output rounding is the sum of these, S; with R the output rounding term the
  tolerance is sqrt(R² + S² + 2·χ·R·S), χ = min(1, 3/√head_dim_v) (two independent random vectors
  are nearly orthogonal in a wide row; in a narrow one they may align), and never exceeds the norm
  of the sound bound.

The sharp tier is statistical: it assumes rounding errors of different keys do not conspire. It was
validated, not proved: ≥ 10⁵ generated cases of correct kernels (the project's own, and legitimate
variants: online exp2 softmax with P in bf16, split-KV with 16 splits and bf16 partials, reverse
summation order) never exceeded it, and on the H200 the Triton kernel and vLLM's stayed well inside
(BENCHMARKS.md has the numbers). The sound tier stays the proof; a sharp-tier failure says "no
correct kernel we know of does this", with the ratio.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mla_verify.reference import PagedDecodeTerms
from mla_verify.rounding import gamma, smallest_subnormal, unit_roundoff

__all__ = ["TAIL", "RoundingModel", "DecodeBounds",
           "decode_bounds", "with_attn_sink"]

F64 = torch.float64
EXP_RELATIVE_ERROR = {torch.float32: 2.0 ** -21, torch.float64: 2.0 ** -50}
# Hoeffding tail factor of the sharp tier: P(|sum| > TAIL·sqrt(Σ c²)) ≤ 2·exp(-TAIL²/2) = 2.5e-14.
TAIL = 8.0
# The centred random-vector sums of the sharp tier are allowed this many times their root mean square.
VECTOR_SPREAD = 2.0
# Largest width of one tensor-core MMA step over the contraction (bf16/fp16 k = 16 on Hopper).
MMA_STEP = 16


@dataclass(frozen=True)
class RoundingModel:
    """The types a correct kernel rounds through (from its declared capabilities)."""

    input: torch.dtype
    accumulation: torch.dtype
    output: torch.dtype
    p: torch.dtype
    partials: torch.dtype | None = None
    merged_partials: int = 1
    # the type a dequantised FP8 cache value is rounded to; None for a native cache (no rounding)
    dequant: torch.dtype | None = None

    @classmethod
    def of(cls, capabilities, input_dtype: torch.dtype, kv_format: str = "native") -> RoundingModel:
        return cls(input=input_dtype, accumulation=capabilities.accumulation_for(input_dtype), output=input_dtype,
                   p=capabilities.p_rounding_for(input_dtype), partials=capabilities.partials_dtype,
                   merged_partials=capabilities.merged_partials,
                   dequant=capabilities.dequant_for(input_dtype) if kv_format != "native" else None)


@dataclass
class DecodeBounds:
    """Sound per-element bounds out [b, s_q, h, head_dim_v] and lse [b, h, s_q]; sharp tolerances
    sharp_out [b, s_q, h] (on the row's Euclidean error norm) and sharp_lse [b, h, s_q]. float64,
    natural log; 0 on rows that see no key (checked exactly)."""

    out: torch.Tensor
    lse: torch.Tensor
    sharp_out: torch.Tensor
    sharp_lse: torch.Tensor


def decode_bounds(terms: PagedDecodeTerms, q: torch.Tensor, softmax_scale: float, head_dim_v: int,
                  model: RoundingModel) -> DecodeBounds:
    """Both tiers for one case (see the module docstring)."""
    b, s_q, h = terms.scores.shape[:3]
    if terms.rows.shape[1] == 0:  # no sequence has a key: every row is checked exactly
        zeros = torch.zeros(b, s_q, h, dtype=F64, device=terms.out.device)
        return DecodeBounds(out=torch.zeros_like(terms.out), lse=torch.zeros_like(terms.lse), sharp_out=zeros,
                            sharp_lse=zeros.permute(0, 2, 1).contiguous())
    u_a = unit_roundoff(model.accumulation)
    u_in, tiny_in = unit_roundoff(model.input), smallest_subnormal(model.input) / 2
    u_out, tiny_out = unit_roundoff(model.output), _output_floor(model)
    u_p = unit_roundoff(model.p)
    flush = _flush_floor(model)
    # weights that underflow when P is rounded: half a subnormal of the P type (e4m3 P: 2^-10), or
    # flushed to 0 below float32's smallest normal
    tiny_p = max(tiny_in, smallest_subnormal(model.p) / 2, flush)
    u_part = unit_roundoff(model.partials) if model.partials is not None else 0.0
    u_dq = unit_roundoff(model.dequant) if model.dequant is not None else 0.0
    # a dequantised value below the normal range: half a subnormal of its type, or 0 when the float32
    # multiply flushed it
    tiny_dq = max(smallest_subnormal(model.dequant) / 2, flush) if model.dequant is not None else 0.0
    u_exp = EXP_RELATIVE_ERROR.get(model.accumulation, 4 * u_a)
    u_lse = unit_roundoff(torch.float32)
    d = q.shape[-1]
    lengths = terms.valid.sum(-1).to(F64)  # [b]
    rows, visible, p, scores = terms.rows, terms.visible, terms.p, terms.scores
    values = rows[..., :head_dim_v]

    # --- the sound tier -------------------------------------------------------------------------
    abs_dot = torch.einsum("bshd,btd->bsht", q.to(F64).abs(), rows.abs()) * abs(softmax_scale)  # S_t
    abs_scores = scores.abs()
    max_abs_score = _masked_max(abs_scores, visible)  # [b, s, h]
    # dequantisation: each cache value off by u_dq relative (+ tiny_dq), before the length-d dot
    abs_q = q.to(F64).abs().sum(-1) * abs(softmax_scale)  # [b, s, h]
    dequant_error = u_dq * (1 + gamma(d, u_a)) * abs_dot + tiny_dq * (1 + gamma(d, u_a)) * abs_q[..., None]
    score_error = gamma(d, u_a) * abs_dot + 4 * u_a * max_abs_score[..., None] + dequant_error
    E = _masked_max(score_error, visible)  # [b, s, h]
    eta = (1 + u_exp) * torch.exp(E) - 1
    rho = torch.where(eta < 1, 2 * eta / (1 - eta), torch.full_like(eta, math.inf))
    gamma_sum = gamma(lengths + 8, u_a)[:, None, None]  # [b, 1, 1]
    nu = gamma_sum + eta

    neg_inf = torch.tensor(-math.inf, dtype=F64, device=rows.device)
    valid_values = terms.valid[..., None]
    spread = (torch.where(valid_values, values, neg_inf).amax(1) + torch.where(valid_values, -values, neg_inf).amax(1))
    spread = torch.where(torch.isfinite(spread), spread, torch.zeros_like(spread))  # [b, c]; 0 when empty
    weighted_abs = torch.einsum("bsht,btc->bshc", p, values.abs())  # Σ_t p_t|v_tc|
    A = torch.minimum(torch.clamp(rho, max=2.0)[..., None] * 0.5 * spread[:, None, None, :],
                      _times(rho[..., None], weighted_abs))
    B = nu[..., None] * (terms.out.abs() + A)
    sum_abs = values.abs().sum(1)[:, None, None, :]  # [b, 1, 1, c]
    C = (_times((u_p + u_part + u_dq + gamma(lengths + 2, u_a)[:, None, None, None]) * (1 + rho[..., None])
                * (1 + nu[..., None]), weighted_abs) + tiny_p * sum_abs + tiny_dq)
    pre = A + B + C
    out_bound = pre + u_out * (terms.out.abs() + pre) + tiny_out

    lse_ref = terms.lse.permute(0, 2, 1)  # [b, s, h]
    finite_lse = torch.where(torch.isfinite(lse_ref), lse_ref.abs(), torch.zeros_like(lse_ref))
    weighted_score_error = torch.exp(2 * E) * (p * score_error).sum(-1)
    deterministic_lse = 6 * u_a * (finite_lse + max_abs_score) + u_lse * finite_lse
    lse_bound = torch.minimum(E, weighted_score_error) + math.log1p(u_exp) + gamma_sum + deterministic_lse

    # --- the sharp tier -------------------------------------------------------------------------
    keys = _distinct_keys(rows, terms.valid)
    c = gamma(d, u_a) * abs_dot + 4 * u_a * abs_scores + dequant_error  # per-score worst case c_t
    bias = (math.ceil(d / MMA_STEP) * 2 * u_a) * abs_scores  # one-signed truncation, per score
    P2 = keys.squared_group_mass(p)  # P_g·p_t: Σ_t P_{g(t)}·p_t·f_t = Σ_g P_g²·f_g
    n = lengths[:, None, None]
    # the softmax's response to score errors, first order in δs, is exact in its mean-value form with
    # probabilities p̃ ≤ e^{2E}·p: the score terms below carry that factor (≈ 1 unless scores err by ~1)
    mean_value = _mean_value_factor(E)
    sharp_lse = (_times(mean_value, (p * bias).sum(-1) + TAIL * (P2 * c * c).sum(-1).sqrt()) + TAIL * u_a * n.sqrt()
                 + math.log1p(u_exp) + deterministic_lse)

    o = terms.out
    o_norm = o.norm(dim=-1)  # [b, s, h]
    v_sq = (values * values).sum(-1)  # [b, t]
    v_dot_o = torch.einsum("btc,bshc->bsht", values, o)
    w_norm = (v_sq[:, None, None, :] - 2 * v_dot_o + (o_norm ** 2)[..., None]).clamp_min(0).sqrt()  # ‖v_t − o‖
    mass_sq = P2.sum(-1)  # Σ_g P_g²

    def vector_sum(rms_per_key: torch.Tensor | float, worst_per_key: torch.Tensor | float) -> torch.Tensor:
        """Size of Σ_g P_g·x_g·w_g for independent mean-zero x_g (RMS ≤ rms_g, |x_g| ≤ worst_g):
        κ times its root mean square, capped by the worst case."""
        rms = (P2 * (rms_per_key * w_norm) ** 2).sum(-1).sqrt()
        worst = (p * worst_per_key * w_norm).sum(-1)
        return torch.minimum(VECTOR_SPREAD * rms, worst)

    # rounding to nearest leaves an error uniform within half an ulp: RMS ≤ u/√3, never more than u
    p_rounding = (u_p * torch.clamp(TAIL * mass_sq.sqrt(), max=1.0) * o_norm
                  + vector_sum(u_p / math.sqrt(3), u_p)
                  + tiny_p * v_sq.sqrt().sum(-1)[:, None, None])
    through_softmax = _times(mean_value, vector_sum(c, c) + (p * bias * w_norm).sum(-1))
    # P·V partial sums, and the normaliser: a kernel divides by its own row sum or multiplies by
    # exp(−lse) of its own lse, whose error beyond the score average is the lse's sum/log/store terms
    accumulation = (2 * TAIL * u_a * n.sqrt() + math.log1p(u_exp) + deterministic_lse) * o_norm
    partials = torch.zeros_like(o_norm)
    if u_part:
        spread_partials = o_norm + model.merged_partials * (P2 * v_sq[:, None, None, :]).sum(-1).sqrt()
        partials = u_part * torch.minimum(spread_partials, (p * v_sq.sqrt()[:, None, None, :]).sum(-1))
    dequantised_v = torch.zeros_like(o_norm)
    if u_dq:  # each V value rounded once, independently per key: a vector sum over the keys
        v_norm = v_sq.sqrt()[:, None, None, :]
        dequantised_v = torch.minimum(VECTOR_SPREAD * (u_dq / math.sqrt(3)) * (P2 * v_norm ** 2).sum(-1).sqrt(),
                                      u_dq * (p * v_norm).sum(-1)) + tiny_dq * math.sqrt(head_dim_v)
    sharp_pre = p_rounding + through_softmax + accumulation + partials + dequantised_v
    half_ulp = _half_ulp(o.abs() * (1 + 4 * u_out) + sharp_pre[..., None] / math.sqrt(head_dim_v), model.output)
    rounding = (half_ulp ** 2).sum(-1).sqrt()
    # the output rounding and the error before it add as two independent random vectors: in quadrature,
    # plus the cross term they may share (up to 3/√head_dim_v of its full size, all of it for narrow rows)
    before = sharp_pre * (1 + u_out)
    cross = min(1.0, 3 / math.sqrt(head_dim_v))
    sharp_out = (rounding ** 2 + before ** 2 + 2 * cross * rounding * before).sqrt() + tiny_out * math.sqrt(head_dim_v)

    # Rows with nothing visible are checked exactly (out 0, lse ∓inf); their bound is 0.
    has_key = visible.expand_as(scores).any(-1)  # [b, s, h]
    zero = torch.zeros((), dtype=F64, device=rows.device)
    out_bound = torch.where(has_key[..., None], out_bound, zero)
    lse_bound = torch.where(has_key, lse_bound, zero)
    sharp_out = torch.where(has_key, torch.minimum(sharp_out, out_bound.norm(dim=-1)), zero)
    sharp_lse = torch.where(has_key, torch.minimum(sharp_lse, lse_bound), zero)
    return DecodeBounds(out=out_bound, lse=lse_bound.permute(0, 2, 1).contiguous(), sharp_out=sharp_out,
                        sharp_lse=sharp_lse.permute(0, 2, 1).contiguous())


def _flush_floor(model: RoundingModel) -> float:
    """The absolute error of a float32 intermediate flushed to zero: float32's smallest normal when
    the kernel computes in float32, else 0 (float64 keeps its subnormals). Flush-to-zero is the
    default of Triton's code generation and of CUDA's fast math; on the H200 both of the project's
    Triton kernels returned 0 for float32 outputs of ~1e-40 (FP8 caches with near-zero scales)."""
    return torch.finfo(torch.float32).smallest_normal if model.accumulation == torch.float32 else 0.0


def _output_floor(model: RoundingModel) -> float:
    """The absolute error of one output element below the normal range: half a subnormal of the
    output type, or the float32 value flushed to zero before its conversion."""
    return max(smallest_subnormal(model.output) / 2, _flush_floor(model))


def _mean_value_factor(E: torch.Tensor) -> torch.Tensor:
    """e^{2E}, the factor by which the probabilities along the path from the exact to the kernel's
    scores (each moved by at most E) may exceed the exact ones; +inf past any useful size (the
    sharp tolerance then falls back to the sound bound)."""
    return torch.exp(2 * E.clamp(max=350.0)).where(E <= 350.0, torch.full_like(E, math.inf))


def with_attn_sink(bounds: DecodeBounds, out: torch.Tensor, lse: torch.Tensor, sigma: torch.Tensor,
                   model: RoundingModel) -> DecodeBounds:
    """Both tiers for an output multiplied by the sink factor sigma [b, s, h] (see the module
    docstring); out [b, s, h, c] and lse [b, h, s] are the reference before the sink. The lse
    bounds are unchanged (a sink does not touch the lse)."""
    u_a = unit_roundoff(model.accumulation)
    tiny_out = _output_floor(model)
    sigma = sigma.to(F64)

    # σ computed in the accumulation type may flush to 0 below its smallest normal (exp and divide
    # with flush-to-zero): an absolute floor on |Δσ|
    sigma_floor = torch.finfo(model.accumulation).smallest_normal

    def moved(delta: torch.Tensor) -> torch.Tensor:  # |Δσ| for an lse error delta [b, s, h]
        delta = delta.clamp(max=350.0)  # beyond it e^{2Δ}·Δ overflows and the bound is vacuous anyway
        return sigma * (1 - sigma) * delta * torch.exp(2 * delta) + 4 * u_a * sigma + sigma_floor

    sound = moved(bounds.lse.permute(0, 2, 1))
    sharp = moved(bounds.sharp_lse.permute(0, 2, 1))
    u_out = unit_roundoff(model.output)
    pre = bounds.out / (1 + u_out)  # the bound before the output rounding is at most this
    out_bound = sigma[..., None] * bounds.out + (out.abs() + pre) * sound[..., None] + tiny_out
    o_norm = out.norm(dim=-1)
    sharp_out = (sigma * bounds.sharp_out + (o_norm + bounds.sharp_out) * sharp
                 + tiny_out * math.sqrt(out.shape[-1]))
    exact = sigma == 0  # a +inf sink: out must be 0
    out_bound = torch.where(exact[..., None], torch.zeros((), dtype=F64, device=out.device), out_bound)
    sharp_out = torch.where(exact, torch.zeros((), dtype=F64, device=out.device), sharp_out)
    keyless = bounds.sharp_out == 0
    sharp_out = torch.where(keyless & (bounds.out.amax(-1) == 0), bounds.sharp_out, sharp_out)
    out_bound = torch.where((bounds.out == 0).all(-1, keepdim=True), bounds.out, out_bound)
    return DecodeBounds(out=out_bound, lse=bounds.lse, sharp_out=torch.minimum(sharp_out, out_bound.norm(dim=-1)),
                        sharp_lse=bounds.sharp_lse)


@dataclass
class _DistinctKeys:
    """Which cache rows of a sequence are bit-identical: group [b, t] (an id per distinct key)."""

    group: torch.Tensor | None  # None: every valid key is distinct

    def squared_group_mass(self, p: torch.Tensor) -> torch.Tensor:
        """[b, s, h, t]: P_{g(t)}·p_t, so that Σ_t of it times f_t is Σ_g P_g²·f_g for f constant on groups."""
        if self.group is None:
            return p * p
        index = self.group[:, None, None, :].expand_as(p)
        mass = torch.zeros_like(p).scatter_add_(-1, index, p)
        return torch.gather(mass, -1, index) * p


def _distinct_keys(rows: torch.Tensor, valid: torch.Tensor) -> _DistinctKeys:
    # a random projection tells distinct rows apart with probability 1, and equal rows stay equal
    probe = torch.randn(rows.shape[-1], generator=torch.Generator().manual_seed(0), dtype=F64).to(rows.device)
    fingerprint = rows @ probe  # [b, t]
    t = rows.shape[1]
    groups, repeated = [], False
    for row in range(rows.shape[0]):
        length = int(valid[row].sum())  # valid slots are a prefix
        _, inverse, counts = torch.unique(fingerprint[row, :length], return_inverse=True, return_counts=True)
        repeated = repeated or bool((counts > 1).any())
        # slots past the length (p = 0) get groups of their own
        groups.append(torch.cat((inverse, counts.shape[0] + torch.arange(t - length, device=rows.device))))
    return _DistinctKeys(torch.stack(groups) if repeated else None)


def _times(factor: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """factor·x with 0 where x is 0, even for an infinite factor (a vacuous ρ = ∞ times a column of
    zeros is no error, not NaN)."""
    return torch.where(x == 0, torch.zeros((), dtype=x.dtype, device=x.device), factor * x)


def _half_ulp(magnitude: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Half a unit in the last place of `dtype` at each magnitude (≤ u·magnitude), normals only."""
    info = torch.finfo(dtype)
    exponent = torch.floor(torch.log2(magnitude.clamp_min(info.smallest_normal)))
    return unit_roundoff(dtype) * torch.exp2(exponent)


def _masked_max(x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Max over the last axis of x where visible; 0 for a row with nothing visible."""
    if x.shape[-1] == 0:
        return torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device)
    return torch.where(visible, x, torch.zeros((), dtype=x.dtype, device=x.device)).amax(-1)
