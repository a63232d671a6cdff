"""HF transformers' DeepseekV3Attention / DeepseekV2Attention as layers of the layer contract.

Written against transformers 5.x (5.24 here): modeling_deepseek_v3.py / modeling_deepseek_v2.py.
What the adapter does, and what it maps:

- Config: MLAConfig → DeepseekV3Config / DeepseekV2Config with num_key_value_heads equal to
  num_attention_heads (the module repeats K/V by their ratio; MLA has one latent shared by all
  heads, expanded per head), attention_bias off, rope_parameters {rope_type "default" | "yarn",
  rope_theta, factor, original_max_position_embeddings, beta_fast, beta_slow, mscale,
  mscale_all_dim, attention_factor} and, for V3, rope_interleave = (layout == "interleaved").
  attention_factor (the cos/sin magnitude) is passed explicitly as DeepSeek defines it,
  yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim): HF infers it the same
  way only when both mscale and mscale_all_dim are non-zero, and falls back to
  yarn_get_mscale(factor) otherwise (so mscale_all_dim = 0 with mscale ≠ 1 would differ).
  The softmax scale is HF's own (qk_head_dim^-1/2 · mscale(factor, mscale_all_dim)²).
- Weights (nn.Linear's [out, in] like ours): wq → q_proj, or wq_a/q_norm/wq_b → q_a_proj/
  q_a_layernorm/q_b_proj; wkv_a → kv_a_proj_with_mqa; kv_norm → kv_a_layernorm; wkv_b → kv_b_proj;
  wo → o_proj. DeepseekV2Attention rotates interleaved pairs only; a 'halves' config is loaded with
  the rope rows of W_UQ (per head) and of W_DKV permuted (`interleave_halves`), which permutes q_pe
  and k_pe alike and leaves every score unchanged.
- Running: prefill starts a DynamicCache (which keeps the compressed latent and the rotated rope
  key), decode appends to it; position_ids continue from the cache length; the mask comes from
  HF's create_causal_mask (None where sdpa's is_causal suffices); the rotary embedding is HF's
  (V3: cos/sin, V2: complex freqs_cis), called as DeepseekV3Model calls it.

Declared internal precision (`hf_precision(variant, dtype)`: what HF computes in a module of dtype):
- DeepseekV3RMSNorm/V2RMSNorm cast to float32, normalise there, cast back to the module dtype and
  multiply by the weight in the module dtype; the rotary embeddings compute inv_freq, the angles and
  cos/sin in float32; V3 casts cos/sin to the module dtype and rotates there (q·cos + rotate_half(q)·sin,
  each product and the sum rounded), V2's complex product runs in float32 and is cast back;
  eager_attention_forward rounds q·kᵀ to the module dtype, multiplies by the scaling there, softmaxes
  in float32 and casts P back to the module dtype before P·V; sdpa keeps the scores in float32 (its
  math path upcasts bf16/fp16, its flash kernel rounds P). Linear maps and matmuls sum in float32 for
  bf16/fp16 (products exact), in the module dtype otherwise. So "v3-eager" in float64 declares
  RMSNorm, RoPE and softmax in float32 (observed ~1e-7 relative), "v3-sdpa" RMSNorm and RoPE
  (torch's SDPA keeps float64); in bf16 every result is stored in bf16.
- "v3-sdpa-f64" swaps the two RMSNorms for float64 ones with the same weights and feeds cos/sin
  computed in float64 (mla_verify.reference.rope_cos_sin, in HF's cat(freqs, freqs) layout): with
  sdpa every step is then float64 in a float64 module (observed ~1e-15 relative). It certifies HF's
  projections, RoPE application, cache, masking, scaling and attention, not its float32 norm and
  angle code.
- DeepseekV2's apply_rotary_emb casts q_pe and k_pe to float32 for its complex product, whatever
  the module dtype, so both V2 variants declare RoPE (and RMSNorm) in float32; eager adds the
  softmax.

Intermediates: the adapter exposes q (q_b_proj or q_proj output), latent (kv_a_layernorm output),
k_pe_raw (the last d_r columns of kv_a_proj_with_mqa's output) and o (o_proj's input) through
forward hooks (mla_verify.layer.capture_submodules), and k_pe from the DynamicCache (HF 5 caches the
latent and the rotated rope key). The query's RoPE is functional code inside the module, so q_pe is
not exposed and the query side of RoPE is judged with attention ("rope + attention"), the key side
on its own ("rope"). V2 with a 'halves' config un-permutes the rope columns of q, k_pe_raw and k_pe. HF's decode runs the naive path over a DynamicCache of expanded K and V,
so prefill and decode are the same computation (`capabilities.both_paths` is False).

What HF cannot run (declared, so a certification skips it with the reason): DeepseekV2Config
rejects hidden_size % heads ≠ 0 (`unsupported`, a factory's `supports(config)`); and DeepseekV2's
apply_rotary_emb views q_pe and k_pe as complex numbers (torch.view_as_complex on
`xq.float().reshape(..., -1, 2)`), which in a float32 module is a view of the projection's output,
not a copy: its storage offset (d_n for q_pe, d_c for k_pe) and row strides must be even, so a
float32 V2 module with an odd qk_nope_head_dim or kv_lora_rank raises "Tensor must have a
storage_offset divisible by 2" (or "... a stride divisible by 2 ...") on every call. That depends on
the dtype, which `supports(config)` is not given: the factory raises `mla_verify.Declined` there
(`unsupported_dtype`), and the certifier counts those cases as declined, with the reason.
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch
from torch import nn

from mla_verify.adapters import LAYER_ADAPTERS, load_module
from mla_verify.config import MLAConfig, yarn_mscale
from mla_verify.adapters import MissingDependency
from mla_verify.decode.contract import Declined
from mla_verify.layer.contract import InternalPrecision, LayerCapabilities, capture_submodules, natural_accumulation
from mla_verify.reference import MLAWeights, rope_cos_sin

__all__ = ["HFDeepseekAttention", "hf_config_arguments", "interleave_halves", "hf_weights", "unsupported",
           "unsupported_dtype",
           "hf_precision", "deepseek_v3_eager", "deepseek_v3_sdpa", "deepseek_v3_sdpa_float64", "deepseek_v2_eager",
           "deepseek_v2_sdpa", "VARIANTS", "CAPABILITIES"]

F32, F64 = torch.float32, torch.float64
_ADAPTER = LAYER_ADAPTERS["hf-deepseek-v3-eager"]
_MODELING = {"v3": "transformers.models.deepseek_v3.modeling_deepseek_v3",
             "v2": "transformers.models.deepseek_v2.modeling_deepseek_v2"}


@functools.cache
def _transformers() -> ModuleType:
    transformers = load_module("transformers", _ADAPTER.library, _ADAPTER.install)
    if int(transformers.__version__.split(".")[0]) < 5:
        raise MissingDependency(f"transformers>=5 (found {transformers.__version__})",
                                "pip install -U 'transformers>=5'")
    return transformers


def _modeling(version: str) -> ModuleType:
    _transformers()
    return load_module(_MODELING[version], _ADAPTER.library, _ADAPTER.install)


# ----------------------------------------------------------------------------------------------
# Mapping
# ----------------------------------------------------------------------------------------------

def hf_config_arguments(config: MLAConfig, version: str) -> dict:
    """Keyword arguments of DeepseekV3Config ('v3') or DeepseekV2Config ('v2') for one layer."""
    if version not in _MODELING:
        raise ValueError(f"version must be 'v3' or 'v2'; got {version!r}")
    rope: dict = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.yarn is not None:
        y = config.yarn
        rope = {"rope_type": "yarn", "rope_theta": config.rope_theta, "factor": y.factor,
                "original_max_position_embeddings": y.original_max_position_embeddings, "beta_fast": y.beta_fast,
                "beta_slow": y.beta_slow, "mscale": y.mscale, "mscale_all_dim": y.mscale_all_dim,
                "attention_factor": yarn_mscale(y.factor, y.mscale) / yarn_mscale(y.factor, y.mscale_all_dim)}
    arguments = dict(
        hidden_size=config.hidden_size, num_hidden_layers=1, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        q_lora_rank=config.q_lora_rank, kv_lora_rank=config.kv_lora_rank,
        qk_nope_head_dim=config.qk_nope_head_dim, qk_rope_head_dim=config.qk_rope_head_dim,
        v_head_dim=config.v_head_dim, rms_norm_eps=config.rms_norm_eps, rope_parameters=rope,
        max_position_embeddings=_max_positions(config), attention_bias=False, attention_dropout=0.0)
    if version == "v3":
        arguments["rope_interleave"] = config.rope_layout == "interleaved"
    return arguments


def _max_positions(config: MLAConfig) -> int:
    """The context length YaRN extends to (HF warns when factor disagrees with it); 4096 without."""
    if config.yarn is None:
        return 4096
    return max(1, round(config.yarn.original_max_position_embeddings * config.yarn.factor))


def unsupported(config: MLAConfig, version: str) -> str | None:
    """Why HF cannot build this layer, or None. DeepseekV2Config validates hidden_size % heads == 0
    (a check meant for MHA models; MLA does not need it, and V3's config drops it)."""
    if version == "v2" and config.hidden_size % config.num_heads:
        return (f"DeepseekV2Config requires hidden_size % num_attention_heads == 0; got {config.hidden_size} and "
                f"{config.num_heads}")
    return None


def unsupported_dtype(config: MLAConfig, version: str, dtype: torch.dtype) -> str | None:
    """Why HF's module of `dtype` cannot run this layer, or None: DeepseekV2's apply_rotary_emb calls
    torch.view_as_complex on q_pe and k_pe, slices of the projections' outputs at offsets d_n and
    d_c; `.float()` copies them in any other dtype, but in float32 it returns them as they are, and
    view_as_complex needs an even storage offset and even strides. (V3 rotates with cos/sin.)"""
    if version != "v2" or dtype != F32:
        return None
    odd = [name for name in ("qk_nope_head_dim", "kv_lora_rank") if getattr(config, name) % 2]
    if not odd:
        return None
    return (f"HF DeepseekV2 in float32 with an odd {' and '.join(odd)}: its apply_rotary_emb calls "
            "torch.view_as_complex on a float32 slice at an odd offset (RuntimeError: Tensor must have a "
            "storage_offset divisible by 2)")


def interleave_halves(width: int) -> torch.Tensor:
    """Row order [0, w/2, 1, w/2+1, …]: rotating pairs (2j, 2j+1) of the permuted rows is rotating
    pairs (j, j + w/2) of the original ones, so 'halves' weights run in an interleaved-only module."""
    half = width // 2
    return torch.stack((torch.arange(half), torch.arange(half) + half), dim=1).flatten()


def hf_weights(config: MLAConfig, weights: MLAWeights, permute_rope: bool) -> dict[str, torch.Tensor]:
    """Parameter name → tensor for the HF attention module (float64, before the dtype cast)."""
    h, dn, dr, dc = config.num_heads, config.qk_nope_head_dim, config.qk_rope_head_dim, config.kv_lora_rank
    order = interleave_halves(dr) if permute_rope else torch.arange(dr)

    def query_rows(w: torch.Tensor) -> torch.Tensor:
        per_head = w.reshape(h, dn + dr, -1)
        return torch.cat((per_head[:, :dn], per_head[:, dn:][:, order]), dim=1).reshape(w.shape)

    named = {"kv_a_proj_with_mqa.weight": torch.cat((weights.wkv_a[:dc], weights.wkv_a[dc:][order])),
             "kv_a_layernorm.weight": weights.kv_norm, "kv_b_proj.weight": weights.wkv_b, "o_proj.weight": weights.wo}
    if config.q_lora_rank is None:
        named["q_proj.weight"] = query_rows(weights.wq)
    else:
        named.update({"q_a_proj.weight": weights.wq_a, "q_a_layernorm.weight": weights.q_norm,
                      "q_b_proj.weight": query_rows(weights.wq_b)})
    return named


class _Float64RMSNorm(nn.Module):
    """RMSNorm computed in float64 (HF's casts to float32), same weight and eps."""

    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.to(F64)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (self.weight.to(F64) * x).to(hidden_states.dtype)


# ----------------------------------------------------------------------------------------------
# The layer
# ----------------------------------------------------------------------------------------------

class HFDeepseekAttention:
    """One HF Deepseek attention module with its DynamicCache, as an MLALayer.

    `module`, `rotary` and `hf_config` are HF's objects (tests mutate them); `position` is the next
    token's position."""

    def __init__(self, config: MLAConfig, weights: MLAWeights, dtype: torch.dtype = F64, device: str = "cpu", *,
                 version: str = "v3", attn_implementation: str = "eager", float64_norm_and_rope: bool = False,
                 precision: InternalPrecision, capture: bool = True) -> None:
        reason = unsupported(config, version)
        if reason:
            raise ValueError(reason)
        reason = unsupported_dtype(config, version, dtype)
        if reason:
            raise Declined(reason)
        transformers = _transformers()
        modeling = _modeling(version)
        config_class = transformers.DeepseekV3Config if version == "v3" else transformers.DeepseekV2Config
        attention_class = modeling.DeepseekV3Attention if version == "v3" else modeling.DeepseekV2Attention
        rotary_class = modeling.DeepseekV3RotaryEmbedding if version == "v3" else modeling.DeepseekV2RotaryEmbedding
        self.config, self.version, self.dtype, self.device = config, version, dtype, torch.device(device)
        self.hf_config = config_class(**hf_config_arguments(config, version), attn_implementation=attn_implementation)
        self.module = attention_class(self.hf_config, layer_idx=0).to(device=self.device, dtype=dtype).eval()
        with torch.no_grad():
            parameters = dict(self.module.named_parameters())
            for name, value in hf_weights(config, weights, permute_rope=version == "v2"
                                          and config.rope_layout == "halves").items():
                parameters[name].copy_(value.to(dtype))
        self.rotary = rotary_class(self.hf_config).to(self.device)
        self.float64_norm_and_rope = float64_norm_and_rope
        if float64_norm_and_rope:
            if version != "v3":
                raise ValueError("float64_norm_and_rope needs DeepseekV3Attention (V2 rounds RoPE to float32)")
            for name in ("q_a_layernorm", "kv_a_layernorm"):
                norm = getattr(self.module, name)
                if norm is not None:
                    setattr(self.module, name, _Float64RMSNorm(norm.weight, norm.variance_epsilon))
        self.precision = precision
        self._capture = capture_submodules(self.module, _taps(config), config) if capture else None
        self._rope_order = (torch.argsort(interleave_halves(config.qk_rope_head_dim))
                            if version == "v2" and config.rope_layout == "halves" else None)
        self._masks = load_module("transformers.masking_utils", _ADAPTER.library, _ADAPTER.install)
        self._cache_class = load_module("transformers.cache_utils", _ADAPTER.library, _ADAPTER.install).DynamicCache
        self.cache = None
        self.position = 0

    def intermediates(self) -> dict[str, torch.Tensor]:
        """q, latent, k_pe_raw and o of the last call (layer contract), in the module dtype; V2's
        permuted rope columns put back in the config's order."""
        if self._capture is None:
            return {}
        found = self._capture.intermediates()
        k_pe = self._cached_rope_key()
        if k_pe is not None:
            found["k_pe"] = k_pe
        if self._rope_order is not None:
            dn = self.config.qk_nope_head_dim
            if "q" in found:
                q = found["q"]
                found["q"] = torch.cat((q[..., :dn], q[..., dn:][..., self._rope_order.to(q.device)]), dim=-1)
            for key in ("k_pe_raw", "k_pe"):
                if key in found:
                    found[key] = found[key][..., self._rope_order.to(found[key].device)]
        return found

    def _cached_rope_key(self) -> torch.Tensor | None:
        """The rotated rope key of the last call's tokens, read from the DynamicCache (HF 5 caches
        the latent and the rotated rope key, [b, 1, T, d_r]); V3 with rope_interleave stores the
        rotated pairs as [firsts | seconds], put back in pairs. None where the cache is not laid
        out that way."""
        layers = getattr(self.cache, "layers", None)
        values = getattr(layers[0], "values", None) if layers else None
        dr = self.config.qk_rope_head_dim
        if not isinstance(values, torch.Tensor) or values.dim() != 4 or values.shape[-1] != dr or values.shape[1] != 1:
            return None
        k_pe = values[:, 0, -self._last_tokens:]
        if self.version == "v3" and self.hf_config.rope_interleave:
            k_pe = torch.stack((k_pe[..., :dr // 2], k_pe[..., dr // 2:]), dim=-1).flatten(-2)
        return k_pe.detach().clone()

    def prefill(self, x: torch.Tensor) -> torch.Tensor:
        self.cache = self._cache_class(config=self.hf_config)
        self.position = 0
        return self._forward(x)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        if self.cache is None:
            raise RuntimeError("decode() needs a prefill() first: the cache is empty")
        return self._forward(x)

    def _position_embeddings(self, x: torch.Tensor, position_ids: torch.Tensor):
        if self.float64_norm_and_rope:
            cos, sin = rope_cos_sin(self.config, position_ids[0].cpu())
            return (torch.cat((cos, cos), -1)[None].to(self.device, x.dtype),
                    torch.cat((sin, sin), -1)[None].to(self.device, x.dtype))
        return self.rotary(x, position_ids)

    @torch.no_grad()
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.config.hidden_size:
            raise ValueError(f"x must be [b, s, {self.config.hidden_size}]; got shape {tuple(x.shape)}")
        x = x.to(self.device, self.dtype)
        if self._capture is not None:
            self._capture.clear()
        s = x.shape[1]
        self._last_tokens = s
        position_ids = torch.arange(self.position, self.position + s, device=self.device)[None]
        mask = self._masks.create_causal_mask(config=self.hf_config, inputs_embeds=x, attention_mask=None,
                                              cache=self.cache, position_ids=position_ids)
        out, _ = self.module(hidden_states=x, position_embeddings=self._position_embeddings(x, position_ids),
                             attention_mask=mask, cache=self.cache)
        self.position += s
        return out


def _taps(config: MLAConfig) -> dict[str, tuple[str, str]]:
    return {"q": ("q_proj" if config.q_lora_rank is None else "q_b_proj", "output"),
            "latent": ("kv_a_layernorm", "output"), "k_pe_raw": ("kv_a_proj_with_mqa", "output"),
            "o": ("o_proj", "input")}


_NOTES = {
    "v3-eager": "HF casts RMSNorm, RoPE angles/cos/sin and the eager softmax to float32",
    "v3-sdpa": "HF casts RMSNorm and RoPE angles/cos/sin to float32",
    "v3-sdpa-f64": "float64 RMSNorm and cos/sin supplied by the adapter",
    "v2-eager": "HF casts RMSNorm, the complex RoPE product and the eager softmax to float32",
    "v2-sdpa": "HF casts RMSNorm and the complex RoPE product to float32",
}


def hf_precision(variant: str, dtype: torch.dtype = F64) -> InternalPrecision:
    """What HF's attention computes in a module of `dtype` (see the module docstring)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}; got {variant!r}")
    version, implementation, float64_parts = VARIANTS[variant]
    fields: dict[str, torch.dtype] = {
        "rms_norm": F64 if float64_parts else F32,  # HF's norm in float32, the adapter's in float64
        "rope": F64 if float64_parts else F32,  # angles and cos/sin
        "softmax": F32 if implementation == "eager" else (F64 if dtype == F64 else F32),
    }
    if version == "v2":
        fields["rope_rotation"] = F32  # the complex product (V3 rotates in the module dtype: for_module's default)
    if implementation == "sdpa":
        fields["scores_stored"] = natural_accumulation(dtype)  # never rounded to bf16/fp16
    return InternalPrecision.for_module(dtype, note=_NOTES[variant], **fields)


# name → (version, attention implementation, float64 norm and rope)
VARIANTS = {
    "v3-eager": ("v3", "eager", False),
    "v3-sdpa": ("v3", "sdpa", False),
    "v3-sdpa-f64": ("v3", "sdpa", True),
    "v2-eager": ("v2", "eager", False),
    "v2-sdpa": ("v2", "sdpa", False),
}

CAPABILITIES = LayerCapabilities(devices=("cpu", "cuda"), both_paths=False,
                                 note="decode runs the naive path over HF's DynamicCache of expanded K and V")
# V2 cannot run float32 with an odd qk_nope_head_dim or kv_lora_rank (`unsupported_dtype`): declined
V2_CAPABILITIES = CAPABILITIES.replace(note=CAPABILITIES.note + "; float32 with an odd qk_nope_head_dim or "
                                       "kv_lora_rank is declined (HF's view_as_complex needs even offsets)")


def _factory(variant: str):
    version, implementation, float64_parts = VARIANTS[variant]

    def build(config: MLAConfig, weights: MLAWeights, dtype: torch.dtype = F64,
              device: str = "cpu") -> HFDeepseekAttention:
        return HFDeepseekAttention(config, weights, dtype, device, version=version, attn_implementation=implementation,
                                   float64_norm_and_rope=float64_parts, precision=hf_precision(variant, dtype))

    build.__name__ = build.__qualname__ = f"deepseek_{variant.replace('-', '_')}"
    build.__doc__ = (f"Layer factory: HF Deepseek{version.upper()}Attention, {implementation}; in a float64 module "
                     f"declares {hf_precision(variant).describe()}.")
    build.precision = hf_precision(variant)  # in a float64 module; hf_precision(variant, dtype) for others
    build.supports = lambda config, dtype=None: unsupported(config, version) or (
        unsupported_dtype(config, version, dtype) if dtype is not None else None)
    build.capabilities = V2_CAPABILITIES if version == "v2" else CAPABILITIES
    return build


deepseek_v3_eager = _factory("v3-eager")
deepseek_v3_sdpa = _factory("v3-sdpa")
deepseek_v3_sdpa_float64 = _factory("v3-sdpa-f64")
deepseek_v2_eager = _factory("v2-eager")
deepseek_v2_sdpa = _factory("v2-sdpa")
