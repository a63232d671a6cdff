"""Low-rank facts behind MLA: Eckart–Young truncation, GQA as MLA, and MHA/GQA → MLA by a joint SVD.

Notation (DeepSeek-V2/V3): D = hidden size, h = query heads, g = kv heads (groups), d_h = head dim
(keys and values alike, no RoPE part), d_c = kv_lora_rank (latent width), r = kept rank.
Conventions, as DeepSeek's reference code: c = x·W_DKVᵀ with W_DKV: [d_c, D]; per head
k_h = c·W_UK,hᵀ and v_h = c·W_UV,hᵀ with W_UK,h, W_UV,h: [d_h, d_c]. Source GQA weights are stacked
per kv group: w_k, w_v: [g*d_h, D], rows j*d_h … (j+1)*d_h − 1 belong to group j, and query head h
reads group h // (h_total/g) (HF's repeat_kv order).

Einsum letter legend: t key token, s query position, h query head, j kv group, d head dim d_h,
c latent (d_c or r), m hidden D, i/o rows/columns of a plain matrix.

Everything here is float64: it is the exact-arithmetic side of the suite, so tolerances are the
float64 floors below, never kernel tolerances.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "EXACT_RTOL", "SVD_RTOL",
    "LowRankFactors", "truncated_svd", "spectral_error", "frobenius_error", "optimal_errors",
    "check_eckart_young", "check_no_better_than_optimal",
    "MLAWeights", "gqa_as_mla", "MLAConversion", "convert_to_mla",
    "gqa_attention", "mla_attention", "conversion_error_bound", "relative_error",
]

F64 = torch.float64

# The float64 floors, one place for both. Identities that hold exactly in real arithmetic (GQA as
# MLA, a full-rank conversion) lose a few units of u = 1.1e-16 per operation, times at most the
# small reduction lengths used here (≤ a few hundred): observed ≤ 2e-14 relative, so 1e-12 leaves
# two orders of margin while any wrong head mapping, transposed block or dropped scale errs by O(1).
EXACT_RTOL = 1e-12
# An SVD is backward stable: computed singular values err by p(m, n)·u·σ_1 (LAPACK, p a modest
# polynomial), so errors of a truncation are compared in absolute terms scaled by σ_1. 1e-10 is
# ~10⁶·u: far above LAPACK's floor at these sizes, far below the gap a wrong rank index
# (σ_r for σ_{r+1}) or a badly scaled factor produces on a spectrum without ties.
SVD_RTOL = 1e-10


def _check_tensor(name: str, value: object, expected: tuple[int | None, ...], legend: str) -> None:
    """expected: the sizes, None where any size ≥ 1 fits; legend: the shape in the paper's letters."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor {legend}, float64; got {type(value).__name__}")
    if value.dtype != F64:
        raise TypeError(f"{name}: expected dtype float64 for {legend}; got {value.dtype}")
    want = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
    if value.dim() != len(expected) or any(
        size < 1 or (e is not None and e != size) for e, size in zip(expected, value.shape)
    ):
        raise ValueError(f"{name}: expected shape {legend} = {want} (sizes ≥ 1), float64; got {list(value.shape)}")


def _check_int(name: str, value: object, low: int, high: int | None = None, legend: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int{' ' + legend if legend else ''}; got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        allowed = f"in [{low}, {high}]" if high is not None else f"≥ {low}"
        raise ValueError(f"{name}: expected an int {allowed}{' ' + legend if legend else ''}; got {value}")
    return value


def _check_scale(scale: object) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a float (softmax scale > 0); got {type(scale).__name__}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale: expected a finite float > 0; got {scale}")
    return float(scale)


# --- truncated SVD and Eckart–Young–Mirsky --------------------------------------------------------


@dataclass(frozen=True)
class LowRankFactors:
    """W ≈ up·down.

    up: [m, r], float64; down: [r, n], float64. For a truncated SVD up = U_r·Σ_r and down = V_rᵀ,
    the MHA2MLA convention: down is the (orthonormal-row) down projection, up carries the scale.
    """

    down: torch.Tensor
    up: torch.Tensor

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def matrix(self) -> torch.Tensor:
        """up·down: [m, n]."""
        return torch.einsum("ic,co->io", self.up, self.down)


def truncated_svd(w: torch.Tensor, rank: int) -> LowRankFactors:
    """The best rank-`rank` approximation of w in both the spectral and Frobenius norms.

    w: [m, n], float64; rank: 1 ≤ r ≤ min(m, n). Returns up = U_r·Σ_r: [m, r], down = V_rᵀ: [r, n].
    When σ_r = σ_{r+1} the truncation is not unique; any choice attains the same errors.
    """
    _check_tensor("w", w, (None, None), "[m, n]")
    m, n = w.shape
    _check_int("rank", rank, 1, min(m, n), f"(min(m, n) for w: [{m}, {n}])")
    u, sigma, vh = torch.linalg.svd(w, full_matrices=False)
    return LowRankFactors(down=vh[:rank], up=u[:, :rank] * sigma[:rank])


def _check_factors(w: torch.Tensor, factors: LowRankFactors) -> None:
    _check_tensor("w", w, (None, None), "[m, n]")
    m, n = w.shape
    _check_tensor("factors.down", factors.down, (None, n), "[r, n]")
    _check_tensor("factors.up", factors.up, (m, factors.down.shape[0]), "[m, r]")


def spectral_error(w: torch.Tensor, factors: LowRankFactors) -> float:
    """‖w − up·down‖₂, the largest singular value of the residual. w: [m, n], float64."""
    _check_factors(w, factors)
    return torch.linalg.matrix_norm(w - factors.matrix(), ord=2).item()


def frobenius_error(w: torch.Tensor, factors: LowRankFactors) -> float:
    """‖w − up·down‖_F. w: [m, n], float64."""
    _check_factors(w, factors)
    return torch.linalg.matrix_norm(w - factors.matrix(), ord="fro").item()


def optimal_errors(w: torch.Tensor, rank: int) -> tuple[float, float]:
    """Eckart–Young–Mirsky: the least (spectral, Frobenius) errors of any rank-`rank` approximation.

    (σ_{r+1}, sqrt(Σ_{i>r} σ_i²)), with σ_{r+1} = 0 at full rank. w: [m, n], float64.
    """
    _check_tensor("w", w, (None, None), "[m, n]")
    _check_int("rank", rank, 1, min(w.shape), f"(min(m, n) for w: {list(w.shape)})")
    sigma = torch.linalg.svdvals(w)
    tail = sigma[rank:]
    return (tail[0].item() if tail.numel() else 0.0), torch.linalg.vector_norm(tail).item()


def _svd_slack(w: torch.Tensor, factors: LowRankFactors) -> float:
    # Residual norms are computed from w and from up·down, so their rounding scales with the larger.
    top = max(torch.linalg.matrix_norm(w, ord=2).item(),
              torch.linalg.matrix_norm(factors.up, ord=2).item() * torch.linalg.matrix_norm(factors.down, ord=2).item())
    return SVD_RTOL * top


def check_eckart_young(w: torch.Tensor, factors: LowRankFactors, case: str = "") -> None:
    """Raise AssertionError unless up·down attains the Eckart–Young optimum in both norms.

    Both |‖w − up·down‖ − optimum| must be ≤ SVD_RTOL·max(σ_1, ‖up‖₂‖down‖₂).
    """
    slack = _svd_slack(w, factors)
    expected = optimal_errors(w, factors.rank)
    observed = (spectral_error(w, factors), frobenius_error(w, factors))
    for norm, obs, exp in zip(("spectral", "Frobenius"), observed, expected):
        if abs(obs - exp) > slack:
            raise AssertionError(f"{norm} error of a rank-{factors.rank} truncation: observed {obs!r}, "
                                 f"expected {exp!r} (Eckart–Young), |diff| {abs(obs - exp):.3e} > slack "
                                 f"{slack:.3e}; case: {case}")


def check_no_better_than_optimal(w: torch.Tensor, factors: LowRankFactors, case: str = "") -> None:
    """Raise AssertionError if a rank-r factorisation beats the Eckart–Young optimum in either norm.

    Rounding may make a near-optimal factorisation look better by at most SVD_RTOL·max(σ_1, ‖up‖₂‖down‖₂).
    """
    slack = _svd_slack(w, factors)
    expected = optimal_errors(w, factors.rank)
    observed = (spectral_error(w, factors), frobenius_error(w, factors))
    for norm, obs, exp in zip(("spectral", "Frobenius"), observed, expected):
        if obs < exp - slack:
            raise AssertionError(f"a rank-{factors.rank} factorisation beats Eckart–Young in the {norm} norm: "
                                 f"observed {obs!r} < optimum {exp!r} − slack {slack:.3e}; case: {case}")


# --- GQA as MLA, and the joint-SVD conversion -------------------------------------------------------


@dataclass(frozen=True)
class MLAWeights:
    """MLA key/value weights without RoPE.

    w_dkv: [d_c, D], float64 (c = x·W_DKVᵀ); w_uk, w_uv: [h, d_h, d_c], float64 (k_h = c·W_UK,hᵀ,
    v_h = c·W_UV,hᵀ).
    """

    w_dkv: torch.Tensor
    w_uk: torch.Tensor
    w_uv: torch.Tensor

    @property
    def kv_lora_rank(self) -> int:
        return self.w_dkv.shape[0]


def _check_gqa_weights(w_k: object, w_v: object, num_heads: object, num_kv_heads: object,
                       head_dim: object) -> int:
    """Validate the source GQA layer; returns D."""
    g = _check_int("num_kv_heads", num_kv_heads, 1, legend="(g)")
    h = _check_int("num_heads", num_heads, 1, legend="(h)")
    d_h = _check_int("head_dim", head_dim, 1, legend="(d_h)")
    if h % g:
        raise ValueError(f"num_heads: expected a multiple of num_kv_heads = {g}; got {h}")
    _check_tensor("w_k", w_k, (g * d_h, None), "[g*d_h, D]")
    _check_tensor("w_v", w_v, (g * d_h, w_k.shape[1]), "[g*d_h, D]")
    return w_k.shape[1]


def _kv_selectors(num_heads: int, num_kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """0/1 matrices that read head h's key and value out of the stacked [k; v]: [h, d_h, 2*g*d_h] each."""
    g, d_h = num_kv_heads, head_dim
    group = torch.arange(num_heads) // (num_heads // g)
    eye = torch.eye(d_h, dtype=F64)
    select_k = torch.zeros(num_heads, d_h, 2 * g * d_h, dtype=F64)
    select_v = torch.zeros_like(select_k)
    for head, j in enumerate(group.tolist()):
        select_k[head, :, j * d_h:(j + 1) * d_h] = eye
        select_v[head, :, (g + j) * d_h:(g + j + 1) * d_h] = eye
    return select_k, select_v


def gqa_as_mla(w_k: torch.Tensor, w_v: torch.Tensor, num_heads: int, num_kv_heads: int,
               head_dim: int) -> MLAWeights:
    """A GQA layer without RoPE written exactly as MLA (no approximation).

    w_k, w_v: [g*d_h, D], float64. Returns W_DKV = [W_K; W_V]: [d_c, D] with d_c = 2·g·d_h, and
    selector up-projections: W_UK,h has an identity block on the columns of head h's key group
    and zeros elsewhere, W_UV,h likewise on its value group. The latent is the GQA cache itself, so
    the MLA output equals the GQA output up to float64 rounding (multiplying by 0 and 1 is exact).
    """
    _check_gqa_weights(w_k, w_v, num_heads, num_kv_heads, head_dim)
    select_k, select_v = _kv_selectors(num_heads, num_kv_heads, head_dim)
    return MLAWeights(w_dkv=torch.cat([w_k, w_v]), w_uk=select_k, w_uv=select_v)


@dataclass(frozen=True)
class MLAConversion:
    """A rank-r MLA layer made from a GQA/MHA layer by a joint SVD of [W_K; W_V].

    weights: the MLA layer (d_c = r); factors: the truncation of the stack, [W_K; W_V] ≈ up·down
    with down = W_DKV = V_rᵀ: [r, D] and up = U_r·Σ_r: [2*g*d_h, r]; singular_values: all of the
    stack's, descending: [min(2*g*d_h, D)].
    """

    weights: MLAWeights
    factors: LowRankFactors
    singular_values: torch.Tensor

    @property
    def rank(self) -> int:
        return self.factors.rank

    @property
    def sigma_tail(self) -> float:
        """σ_{r+1} of the stack (0 at full rank): the spectral norm of the dropped part."""
        tail = self.singular_values[self.rank:]
        return tail[0].item() if tail.numel() else 0.0

    @property
    def sigma_tail_with_rounding(self) -> float:
        """σ_{r+1} + EXACT_RTOL·σ_1, the σ to put in the bound when comparing computed outputs.

        The bound is for exact arithmetic (0 at full rank). Rounding in the converted layer
        (rebuilding k and v from c, the scores, the products) perturbs k, v and the scores by a
        few u·σ_1·‖x_t‖ (times the short reduction lengths here), which adding EXACT_RTOL·σ_1
        to σ_{r+1} covers with margin."""
        return self.sigma_tail + EXACT_RTOL * self.singular_values[0].item()


def convert_to_mla(w_k: torch.Tensor, w_v: torch.Tensor, num_heads: int, num_kv_heads: int,
                   head_dim: int, rank: int) -> MLAConversion:
    """MHA/GQA → MLA by one joint SVD of the stacked key and value weights (as MHA2MLA, no RoPE).

    w_k, w_v: [g*d_h, D], float64; rank: 1 ≤ r ≤ min(2*g*d_h, D) (r = d_c, the kv_lora_rank).
    [W_K; W_V] = U·Σ·Vᵀ; W_DKV = V_rᵀ, and the up-projections are the per-head row blocks of
    U_r·Σ_r: it is `gqa_as_mla` with its latent truncated to rank r. At r = min(2*g*d_h, D) the
    conversion is exact (up to rounding).
    """
    d_model = _check_gqa_weights(w_k, w_v, num_heads, num_kv_heads, head_dim)
    stacked = torch.cat([w_k, w_v])
    _check_int("rank", rank, 1, min(stacked.shape[0], d_model),
               f"(min(2*g*d_h, D) for [W_K; W_V]: {list(stacked.shape)})")
    u, sigma, vh = torch.linalg.svd(stacked, full_matrices=False)
    factors = LowRankFactors(down=vh[:rank], up=u[:, :rank] * sigma[:rank])
    select_k, select_v = _kv_selectors(num_heads, num_kv_heads, head_dim)
    weights = MLAWeights(
        w_dkv=factors.down,
        w_uk=torch.einsum("hdi,ic->hdc", select_k, factors.up),  # head h's key rows of U_r·Σ_r
        w_uv=torch.einsum("hdi,ic->hdc", select_v, factors.up),
    )
    return MLAConversion(weights=weights, factors=factors, singular_values=sigma)


# --- attention, and the a-priori bound on the conversion's error -------------------------------------


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    """softmax(scale·q·kᵀ)·v per head. q: [S, h, d_h]; k, v: [L, h, d_h]. Returns [S, h, d_h]."""
    s_q, length = q.shape[0], k.shape[0]
    scores = scale * torch.einsum("shd,thd->sht", q, k)
    if causal:
        # bottom-right aligned: query s sits at absolute position L − S + s
        hidden = torch.arange(length)[None, :] > torch.arange(s_q)[:, None] + (length - s_q)
        scores = scores.masked_fill(hidden[:, None, :], -math.inf)
    return torch.einsum("sht,thd->shd", torch.softmax(scores, dim=-1), v)


def _check_attention_inputs(x: object, q: object, causal: object) -> None:
    _check_tensor("x", x, (None, None), "[L, D]")
    _check_tensor("q", q, (None, None, None), "[S, h, d_h]")
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool; got {type(causal).__name__}")
    if causal and q.shape[0] > x.shape[0]:
        raise ValueError(f"q: a bottom-right causal mask needs S ≤ L; got S = {q.shape[0]}, L = {x.shape[0]}")


def _check_kv_heads_of_q(num_kv_heads: object, h: int) -> int:
    g = _check_int("num_kv_heads", num_kv_heads, 1, legend="(g)")
    if h % g:
        raise ValueError(f"num_kv_heads: expected a divisor of num_heads h = {h} (from q: [S, h, d_h]); got {g}")
    return g


def gqa_attention(x: torch.Tensor, q: torch.Tensor, w_k: torch.Tensor, w_v: torch.Tensor, num_kv_heads: int,
                  scale: float, causal: bool = False) -> torch.Tensor:
    """The source layer: plain softmax attention of given queries over GQA keys/values, no RoPE.

    x: [L, D], float64 (the L key tokens); q: [S, h, d_h], float64 (queries, e.g. x_s·W_Qᵀ: they
    are the same in the source and the converted layer); w_k, w_v: [g*d_h, D], float64.
    causal: no mask (False) or a bottom-right aligned mask, query s at position L − S + s (needs
    S ≤ L). Returns o: [S, h, d_h], float64, before W_O.
    """
    _check_attention_inputs(x, q, causal)
    _, h, d_h = q.shape
    g = _check_kv_heads_of_q(num_kv_heads, h)
    _check_gqa_weights(w_k, w_v, h, g, d_h)
    _check_tensor("x", x, (None, w_k.shape[1]), "[L, D]")
    scale = _check_scale(scale)
    group = torch.arange(h) // (h // g)
    k = torch.einsum("tm,jdm->tjd", x, w_k.reshape(g, d_h, -1))[:, group]  # group j's key for head h
    v = torch.einsum("tm,jdm->tjd", x, w_v.reshape(g, d_h, -1))[:, group]
    return _attend(q, k, v, scale, causal)


def mla_attention(x: torch.Tensor, q: torch.Tensor, weights: MLAWeights, scale: float,
                  causal: bool = False) -> torch.Tensor:
    """The MLA layer in naive (MHA) mode, no RoPE: c = x·W_DKVᵀ, k_h = c·W_UK,hᵀ, v_h = c·W_UV,hᵀ.

    x: [L, D], float64; q: [S, h, d_h], float64; weights: w_dkv [d_c, D], w_uk and w_uv
    [h, d_h, d_c]. causal as `gqa_attention`. Returns o: [S, h, d_h], float64.
    """
    _check_attention_inputs(x, q, causal)
    _, h, d_h = q.shape
    _check_tensor("weights.w_dkv", weights.w_dkv, (None, x.shape[1]), "[d_c, D]")
    d_c = weights.w_dkv.shape[0]
    _check_tensor("weights.w_uk", weights.w_uk, (h, d_h, d_c), "[h, d_h, d_c]")
    _check_tensor("weights.w_uv", weights.w_uv, (h, d_h, d_c), "[h, d_h, d_c]")
    scale = _check_scale(scale)
    c = torch.einsum("tm,cm->tc", x, weights.w_dkv)  # the cached latent, one per token
    k = torch.einsum("tc,hdc->thd", c, weights.w_uk)
    v = torch.einsum("tc,hdc->thd", c, weights.w_uv)
    return _attend(q, k, v, scale, causal)


def conversion_error_bound(x: torch.Tensor, q: torch.Tensor, w_v: torch.Tensor, num_kv_heads: int,
                           sigma_tail: float, scale: float) -> torch.Tensor:
    """A-priori bound on ‖o'_{s,h} − o_{s,h}‖₂, converted (rank-r) layer vs source, any mask.

    x: [L, D], float64; q: [S, h, d_h], float64; w_v: [g*d_h, D], float64 (the source values);
    sigma_tail: σ_{r+1} of [W_K; W_V] (`MLAConversion.sigma_tail`); scale: softmax scale.
    Returns [S, h], float64:

        bound_{s,h} = σ_{r+1}·X + ½·min(2, ε_{s,h})·diam_h,
        X = max_t ‖x_t‖₂,   ε_{s,h} = scale·‖q_{s,h}‖₂·σ_{r+1}·X,
        diam_h = max_{t,u} ‖v_t − v_u‖₂ over the source values of head h's kv group.

    Derivation (exact arithmetic; holds for any size of error, not only to first order):
    1. Weights. The converted layer computes [k'_t; v'_t] = W_r·x_t, W_r the rank-r truncation of
       W = [W_K; W_V]. Head h's key and value errors are row blocks of (W − W_r)·x_t, and a row
       block of a matrix has spectral norm at most the matrix's, so
       ‖Δk_t‖, ‖Δv_t‖ ≤ ‖W − W_r‖₂·‖x_t‖ = σ_{r+1}·‖x_t‖ ≤ σ_{r+1}·X  (Eckart–Young).
    2. Scores. s_t = scale·q·k_t, so |Δs_t| = scale·|q·Δk_t| ≤ scale·‖q‖·σ_{r+1}·X = ε.
    3. Softmax. Let p(τ) = softmax(s + τ·Δs), τ ∈ [0, 1]. dp/dτ = (diag p − p·pᵀ)·Δs, whose entries
       are p_t·(Δs_t − E_p[Δs]), so ‖dp/dτ‖₁ = E_p|Δs − E_p Δs|, the mean absolute deviation of
       a variable confined to an interval of length range(Δs); that is at most range(Δs)/2
       (attained by two equal atoms at the ends). Integrating over τ:
       ‖p' − p‖₁ ≤ range(Δs)/2 ≤ ε, and always ‖p' − p‖₁ ≤ 2. Two equal scores shifted by ±ε
       attain it to first order. (The ratio bound p'_t/p_t ∈ [e^{−2ε}, e^{2ε}] is also sound but
       weaker: it gives ‖p' − p‖₁ ≤ e^{2ε} − 1 ≥ 2ε.)
    4. Output. o' − o = Σ_t p'_t·Δv_t + Σ_t (p'_t − p_t)·v_t. The first sum is a convex combination,
       so its norm is ≤ max_t ‖Δv_t‖ ≤ σ_{r+1}·X. In the second, Δp sums to zero, so its positive
       and negative parts each have mass ½‖Δp‖₁ and the sum is ½‖Δp‖₁·(a − b) with a, b convex
       combinations of the v_t: its norm is ≤ ½‖Δp‖₁·diam_h ≤ ½·min(2, ε)·diam_h.
    A mask only removes keys, and X and diam_h over all L keys dominate those over the visible
    ones, so the bound holds for the bottom-right causal mask too. Coarser but weight-only:
    diam_h ≤ 2·‖W_V,j‖₂·X. At full rank σ_{r+1} = 0 and the bound is 0; for floating-point
    outputs pass `MLAConversion.sigma_tail_with_rounding` instead.
    """
    _check_tensor("x", x, (None, None), "[L, D]")
    _check_tensor("q", q, (None, None, None), "[S, h, d_h]")
    _, h, d_h = q.shape
    g = _check_kv_heads_of_q(num_kv_heads, h)
    _check_tensor("w_v", w_v, (g * d_h, x.shape[1]), "[g*d_h, D]")
    if isinstance(sigma_tail, bool) or not isinstance(sigma_tail, (int, float)):
        raise TypeError(f"sigma_tail: expected a float σ_{{r+1}} ≥ 0; got {type(sigma_tail).__name__}")
    if not sigma_tail >= 0:  # also rejects NaN
        raise ValueError(f"sigma_tail: expected a float σ_{{r+1}} ≥ 0; got {sigma_tail!r}")
    scale = _check_scale(scale)
    x_max = torch.linalg.vector_norm(x, dim=-1).max()
    v = torch.einsum("tm,jdm->tjd", x, w_v.reshape(g, d_h, -1))
    # pairwise differences, not torch.cdist: cdist's matmul shortcut cancels for close values
    diam = torch.linalg.vector_norm(v[:, None] - v[None, :], dim=-1).amax(dim=(0, 1))  # [g]
    eps = scale * torch.linalg.vector_norm(q, dim=-1) * sigma_tail * x_max  # [S, h]
    group = torch.arange(h) // (h // g)
    return sigma_tail * x_max + 0.5 * eps.clamp(max=2.0) * diam[group]


def relative_error(observed: torch.Tensor, reference: torch.Tensor) -> float:
    """‖observed − reference‖_F / ‖reference‖_F (the absolute error when the reference is all zero)."""
    if observed.shape != reference.shape:
        raise ValueError(f"observed: expected the reference's shape {list(reference.shape)}; "
                         f"got {list(observed.shape)}")
    diff = torch.linalg.vector_norm(observed - reference).item()
    size = torch.linalg.vector_norm(reference).item()
    return diff / size if size > 0 else diff
