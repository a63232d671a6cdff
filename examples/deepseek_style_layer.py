"""A user's MLA attention layer, written as a plain torch.nn.Module the way DeepSeek-V3's
inference/model.py holds its weights, and the adapter that lets mla_verify certify it.

Part 1 (`MLAArgs`, `MLA`) knows nothing of mla_verify: it is the kind of module a model port
contains. Its parameters are nn.Linear / RMSNorm submodules named as in DeepSeek-V3's checkpoint
(wq or wq_a, q_norm, wq_b; wkv_a, kv_norm, wkv_b; wo); it keeps its own cache of normalised
latents and rotated rope keys; the attention path of prefill and of decode is a constructor
argument ("naive": K and V expanded per head from the cached latents; "absorb": W_UK folded into
the query and W_UV applied after attention, attending over the latents directly).

Part 2 (`factory`, `factory_naive`, `factory_absorbed`) is the adapter to mla_verify's layer
contract: it receives mla_verify's MLAConfig and float64 MLAWeights, builds the module in the
requested dtype, copies the weights in, and returns an object with prefill/decode/precision (and
the intermediates the stage checks read, taken with forward hooks). Certify it with

    mla-verify certify examples/deepseek_style_layer.py:factory

Einsum letters: b batch, s query positions, t key positions, h heads, d per-head width, c latent
(d_c), r rope (d_r).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from mla_verify.layer import InternalPrecision, LayerCapabilities, capture_submodules  # Part 2 only

# ==============================================================================================
# Part 1: the layer, as a model port would write it
# ==============================================================================================


@dataclass
class MLAArgs:
    """One attention layer's hyper-parameters (names as in DeepSeek-V3's config.json)."""

    dim: int
    n_heads: int
    q_lora_rank: int  # 0: the query is projected directly by wq
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    norm_eps: float = 1e-6
    # rope
    rope_theta: float = 10000.0
    rope_interleaved: bool = True  # pairs (x_2j, x_2j+1) as DeepSeek; False: halves (x_j, x_j+d_r/2)
    # yarn (rope_factor 1: off)
    rope_factor: float = 1.0
    original_seq_len: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0  # cos/sin magnitude numerator
    mscale_all_dim: float = 1.0  # the softmax temperature (and the cos/sin denominator)
    # cache
    max_batch_size: int = 1
    max_seq_len: int = 256


def yarn_temperature(factor: float, mscale: float) -> float:
    """YaRN's attention temperature 0.1·mscale·ln(factor) + 1 (1 without YaRN)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_table(args: MLAArgs, length: int, dtype: torch.dtype) -> torch.Tensor:
    """[length, d_r/2] complex rotations m·e^{iθ} for positions 0 … length−1, with θ = position·f and
    YaRN's blend of interpolated and original frequencies; computed in `dtype` (float32 or float64)."""
    half = args.qk_rope_head_dim // 2
    freqs = args.rope_theta ** -(torch.arange(half, dtype=dtype) * 2 / args.qk_rope_head_dim)
    magnitude = 1.0
    if args.rope_factor > 1:
        def band_edge(rotations: float) -> float:  # the frequency index that turns `rotations` times
            return (args.qk_rope_head_dim * math.log(args.original_seq_len / (2 * math.pi * rotations))
                    / (2 * math.log(args.rope_theta)))
        low = max(math.floor(band_edge(args.beta_fast)), 0)
        high = min(math.ceil(band_edge(args.beta_slow)), args.qk_rope_head_dim - 1)
        high = high + 0.001 if high == low else high
        interpolate = ((torch.arange(half, dtype=dtype) - low) / (high - low)).clamp(0, 1)
        freqs = freqs * (1 - interpolate) + freqs / args.rope_factor * interpolate
        magnitude = yarn_temperature(args.rope_factor, args.mscale) / yarn_temperature(args.rope_factor,
                                                                                      args.mscale_all_dim)
    angles = torch.outer(torch.arange(length, dtype=dtype), freqs)
    return torch.polar(torch.full_like(angles, magnitude), angles)


def rotate(x: torch.Tensor, rotations: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate x [..., s, (h,) d_r] by rotations [s, (1,) d_r/2] as complex numbers, in the table's
    precision, and round back to x's dtype."""
    real = x.to(rotations.real.dtype)
    if interleaved:  # (not view_as_complex: a slice of q may start at an odd offset)
        z = torch.complex(real[..., 0::2], real[..., 1::2]) * rotations
        return torch.stack((z.real, z.imag), dim=-1).flatten(-2).to(x.dtype)
    half = x.shape[-1] // 2
    z = torch.complex(real[..., :half], real[..., half:]) * rotations
    return torch.cat((z.real, z.imag), dim=-1).to(x.dtype)


class Rotary(nn.Module):
    """Applies `rotate` (a module only so that forward hooks can see the rotated tensors)."""

    def __init__(self, interleaved: bool) -> None:
        super().__init__()
        self.interleaved = interleaved

    def forward(self, x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
        return rotate(x, rotations, self.interleaved)


class RMSNorm(nn.Module):
    """x / rms(x) · weight, computed in float32 at least, rounded to x's dtype."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype | None = None, device=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = x.to(torch.promote_types(x.dtype, torch.float32))
        normed = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.to(wide.dtype)).to(x.dtype)


class MLA(nn.Module):
    """Multi-head Latent Attention with its own latent cache.

    forward(x [b, s, dim], start_pos) attends the s new tokens (positions start_pos …) to every
    cached token and to each other (causal), appends their latent and rotated rope key to the
    cache first, and returns [b, s, dim]. `prefill` and `decode` name the path ("naive" or
    "absorb") used when start_pos is 0 and when it is not. Parameters and the cache are created
    in `dtype` on `device` (as DeepSeek builds its model under a default dtype); the rope table
    stays complex in float32 (float64 for a float64 module)."""

    PATHS = ("naive", "absorb")

    def __init__(self, args: MLAArgs, prefill: str = "naive", decode: str = "absorb",
                 dtype: torch.dtype | None = None, device=None) -> None:
        super().__init__()
        for name, path in (("prefill", prefill), ("decode", decode)):
            if path not in self.PATHS:
                raise ValueError(f"{name} must be one of {self.PATHS}; got {path!r}")
        self.args, self.prefill_path, self.decode_path = args, prefill, decode
        h, dn, dr, dv, dc = (args.n_heads, args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim,
                             args.kv_lora_rank)
        self.n_heads, self.qk_nope_head_dim, self.qk_rope_head_dim = h, dn, dr
        self.v_head_dim, self.kv_lora_rank = dv, dc
        kw = dict(dtype=dtype, device=device)
        if args.q_lora_rank == 0:
            self.wq = nn.Linear(args.dim, h * (dn + dr), bias=False, **kw)
        else:
            self.wq_a = nn.Linear(args.dim, args.q_lora_rank, bias=False, **kw)
            self.q_norm = RMSNorm(args.q_lora_rank, args.norm_eps, **kw)
            self.wq_b = nn.Linear(args.q_lora_rank, h * (dn + dr), bias=False, **kw)
        self.wkv_a = nn.Linear(args.dim, dc + dr, bias=False, **kw)
        self.kv_norm = RMSNorm(dc, args.norm_eps, **kw)
        self.wkv_b = nn.Linear(dc, h * (dn + dv), bias=False, **kw)
        self.wo = nn.Linear(h * dv, args.dim, bias=False, **kw)
        self.q_rope, self.k_rope = Rotary(args.rope_interleaved), Rotary(args.rope_interleaved)
        # YaRN's temperature whenever YaRN is on (as HF and vLLM do; DeepSeek's code only when
        # max_seq_len exceeds original_seq_len, which a port must not copy with a short max_seq_len)
        self.softmax_scale = (dn + dr) ** -0.5 * yarn_temperature(args.rope_factor, args.mscale_all_dim) ** 2
        self.allocate(args.max_batch_size, args.max_seq_len)

    def allocate(self, max_batch_size: int, max_seq_len: int) -> None:
        """(Re)size the cache and the rope table, keeping what is cached."""
        dtype = self.wkv_a.weight.dtype
        device = self.wkv_a.weight.device
        kv = torch.zeros(max_batch_size, max_seq_len, self.kv_lora_rank, dtype=dtype, device=device)
        pe = torch.zeros(max_batch_size, max_seq_len, self.qk_rope_head_dim, dtype=dtype, device=device)
        if hasattr(self, "kv_cache"):
            b, t = min(max_batch_size, self.kv_cache.shape[0]), min(max_seq_len, self.kv_cache.shape[1])
            kv[:b, :t], pe[:b, :t] = self.kv_cache[:b, :t], self.pe_cache[:b, :t]
        self.register_buffer("kv_cache", kv, persistent=False)
        self.register_buffer("pe_cache", pe, persistent=False)
        table_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.register_buffer("rotations", rope_table(self.args, max_seq_len, table_dtype).to(device),
                             persistent=False)

    def forward(self, x: torch.Tensor, start_pos: int) -> torch.Tensor:
        b, s, _ = x.shape
        end = start_pos + s
        h, dn, dr, dv, dc = self.n_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim, \
            self.kv_lora_rank
        if b > self.kv_cache.shape[0] or end > self.kv_cache.shape[1]:
            raise ValueError(f"x needs a cache of batch {b} and length {end}; allocated "
                             f"{tuple(self.kv_cache.shape[:2])} (call allocate first)")
        rotations = self.rotations[start_pos:end]
        # query [b, s, h, d_n + d_r]
        q = self.wq(x) if self.args.q_lora_rank == 0 else self.wq_b(self.q_norm(self.wq_a(x)))
        q_nope, q_pe = q.view(b, s, h, dn + dr).split([dn, dr], dim=-1)
        q_pe = self.q_rope(q_pe, rotations[:, None])
        # latent and the shared rope key, into the cache before attention
        latent, k_pe = self.wkv_a(x).split([dc, dr], dim=-1)
        self.kv_cache[:b, start_pos:end] = self.kv_norm(latent)
        self.pe_cache[:b, start_pos:end] = self.k_rope(k_pe, rotations)
        kv, pe = self.kv_cache[:b, :end], self.pe_cache[:b, :end]
        # query i (position start_pos + i) sees keys at positions ≤ start_pos + i
        hidden = torch.arange(end, device=x.device)[None, :] > torch.arange(start_pos, end, device=x.device)[:, None]
        path = self.prefill_path if start_pos == 0 else self.decode_path
        wide = torch.promote_types(x.dtype, torch.float32)  # the softmax's type
        if path == "naive":
            k_nope, v = self.wkv_b(kv).view(b, end, h, dn + dv).split([dn, dv], dim=-1)
            k = torch.cat((k_nope, pe[:, :, None, :].expand(b, end, h, dr)), dim=-1)
            scores = torch.einsum("bshd,bthd->bsht", torch.cat((q_nope, q_pe), dim=-1), k) * self.softmax_scale
            probs = scores.masked_fill(hidden[:, None, :], -math.inf).softmax(-1, dtype=wide)
            o = torch.einsum("bsht,bthd->bshd", probs.type_as(x), v)
        else:
            wkv_b = self.wkv_b.weight.view(h, dn + dv, dc)
            q_latent = torch.einsum("bshd,hdc->bshc", q_nope, wkv_b[:, :dn])
            scores = (torch.einsum("bshc,btc->bsht", q_latent, kv)
                      + torch.einsum("bshr,btr->bsht", q_pe, pe)) * self.softmax_scale
            probs = scores.masked_fill(hidden[:, None, :], -math.inf).softmax(-1, dtype=wide)
            o_latent = torch.einsum("bsht,btc->bshc", probs.type_as(x), kv)
            o = torch.einsum("bshc,hdc->bshd", o_latent, wkv_b[:, -dv:])
        return self.wo(o.flatten(2))


# ==============================================================================================
# Part 2: the adapter to mla_verify's layer contract
# ==============================================================================================

def args_from_config(config, batch: int = 1, max_seq_len: int = 256) -> MLAArgs:
    """mla_verify's MLAConfig → this module's MLAArgs."""
    yarn = config.yarn
    return MLAArgs(
        dim=config.hidden_size, n_heads=config.num_heads, q_lora_rank=config.q_lora_rank or 0,
        kv_lora_rank=config.kv_lora_rank, qk_nope_head_dim=config.qk_nope_head_dim,
        qk_rope_head_dim=config.qk_rope_head_dim, v_head_dim=config.v_head_dim, norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta, rope_interleaved=config.rope_layout == "interleaved",
        **({} if yarn is None else dict(rope_factor=yarn.factor, original_seq_len=yarn.original_max_position_embeddings,
                                        beta_fast=yarn.beta_fast, beta_slow=yarn.beta_slow, mscale=yarn.mscale,
                                        mscale_all_dim=yarn.mscale_all_dim)),
        max_batch_size=batch, max_seq_len=max_seq_len)


def load_weights(module: MLA, weights) -> None:
    """Copy mla_verify's float64 MLAWeights into the module (rounded to its dtype). Both use
    nn.Linear's [out, in] layout:
        W_DQ wq_a [d_q', D], q_a_layernorm q_norm [d_q'], W_UQ wq_b [h·(d_n+d_r), d_q']  (or W_Q wq)
        W_DKV wkv_a [d_c+d_r, D], kv_a_layernorm kv_norm [d_c]
        W_UKV wkv_b [h·(d_n+d_v), d_c], per head the rows [W_UK (d_n); W_UV (d_v)]
        W_O wo [D, h·d_v]"""
    sources = {"wkv_a.weight": weights.wkv_a, "kv_norm.weight": weights.kv_norm, "wkv_b.weight": weights.wkv_b,
               "wo.weight": weights.wo}
    if weights.wq is not None:
        sources["wq.weight"] = weights.wq
    else:
        sources.update({"wq_a.weight": weights.wq_a, "q_norm.weight": weights.q_norm, "wq_b.weight": weights.wq_b})
    sources = {name: tensor for name, tensor in sources.items() if tensor is not None}
    missing = {name for name, _ in module.named_parameters()} - set(sources)
    if missing:
        raise ValueError(f"weights has no tensor for {sorted(missing)}")
    module.load_state_dict(sources, strict=False)  # copies in place, rounding to the module's dtype


def hf_state_dict(weights) -> dict:
    """The same weights under HF transformers' DeepseekV3Attention names, for a module written the HF
    way (load it with module.load_state_dict(hf_state_dict(weights)))."""
    names = {"wq": "q_proj", "wq_a": "q_a_proj", "q_norm": "q_a_layernorm", "wq_b": "q_b_proj",
             "wkv_a": "kv_a_proj_with_mqa", "kv_norm": "kv_a_layernorm", "wkv_b": "kv_b_proj", "wo": "o_proj"}
    return {f"{hf}.weight": getattr(weights, ours) for ours, hf in names.items() if getattr(weights, ours) is not None}


# The intermediates the stage checks compare (optional): (submodule, "input" | "output") per key.
TAPS_Q_LORA = {"q": ("wq_b", "output"), "latent": ("kv_norm", "output"), "k_pe_raw": ("wkv_a", "output"),
               "q_pe": ("q_rope", "output"), "k_pe": ("k_rope", "output"), "o": ("wo", "input")}
TAPS_NO_Q_LORA = {**TAPS_Q_LORA, "q": ("wq", "output")}


class ContractLayer:
    """The layer contract around an MLA module: prefill starts a fresh cache at position 0, decode
    appends at the next positions; outputs in the module's dtype."""

    def __init__(self, module: MLA, dtype: torch.dtype, precision) -> None:
        self.module, self.dtype, self.precision = module, dtype, precision
        self.position = 0
        self.taps = None

    def _run(self, x: torch.Tensor, start_pos: int) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.module.args.dim or x.dtype != self.dtype:
            raise ValueError(f"x must be [b, s, {self.module.args.dim}] {self.dtype}; got {list(x.shape)} {x.dtype}")
        end = start_pos + x.shape[1]
        cache = self.module.kv_cache.shape
        if x.shape[0] > cache[0] or end > cache[1]:
            self.module.allocate(max(x.shape[0], cache[0]), max(end, 2 * cache[1]))
        if self.taps is not None:
            self.taps.clear()
        with torch.no_grad():
            out = self.module(x, start_pos)
        self.position = end
        return out

    def prefill(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, 0)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        if self.position == 0:
            raise RuntimeError("decode() needs a prefill() first")
        return self._run(x, self.position)

    def intermediates(self) -> dict:
        return {} if self.taps is None else self.taps.intermediates()


def build(config, weights, dtype: torch.dtype, device: str = "cpu", prefill: str = "naive",
          decode: str = "absorb", module_class: type = MLA) -> ContractLayer:
    """The module for `config` in `dtype` on `device`, with `weights` loaded, wrapped in the contract."""
    module = module_class(args_from_config(config), prefill=prefill, decode=decode, dtype=dtype, device=device)
    load_weights(module, weights)
    # Plain torch ops in the module's dtype: every result stored in it, sums in float32 for bf16/fp16,
    # the angles and the softmax in float32 (float64 in a float64 module); this module also computes
    # RMSNorm and the rotation in float32 before rounding their results, so it says so.
    wide = torch.promote_types(dtype, torch.float32)
    precision = InternalPrecision.for_module(dtype, note=f"{prefill} prefill, {decode} decode", rms_norm=wide,
                                             rope_rotation=wide)
    layer = ContractLayer(module, dtype, precision)
    layer.taps = capture_submodules(module, TAPS_NO_Q_LORA if config.q_lora_rank is None else TAPS_Q_LORA, config)
    return layer


def factory(config, weights, dtype: torch.dtype, device: str = "cpu") -> ContractLayer:
    """Naive prefill, absorbed decode: the split serving engines run."""
    return build(config, weights, dtype, device, prefill="naive", decode="absorb")


def factory_naive(config, weights, dtype: torch.dtype, device: str = "cpu") -> ContractLayer:
    """The naive path throughout."""
    return build(config, weights, dtype, device, prefill="naive", decode="naive")


def factory_absorbed(config, weights, dtype: torch.dtype, device: str = "cpu") -> ContractLayer:
    """The absorbed path throughout."""
    return build(config, weights, dtype, device, prefill="absorb", decode="absorb")


# What each factory claims (optional; without it: float64, float32, bf16 and fp16 on the CPU, both paths).
factory.capabilities = LayerCapabilities(devices=("cpu", "cuda"))
# one path throughout: prefill and decode are the same computation
factory_naive.capabilities = factory_absorbed.capabilities = factory.capabilities.replace(both_paths=False)
