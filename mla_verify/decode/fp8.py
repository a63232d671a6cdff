"""FP8 latent caches: the two formats of the decode contract, their exact dequantisation, and the
reference quantiser.

KV_FORMATS names what a cache holds:

- "native": the cache is in q's dtype ([num_blocks, page, 1, d], the contract's original layout).
- "fp8_ds_mla": FlashMLA's / DeepSeek-V3.2's packed layout (vLLM calls it fp8_ds_mla). kv_cache is
  float8_e4m3fn [num_blocks, page, 1, packed_width(d, head_dim_v)]; each token row holds, in bytes,

      [0, head_dim_v)                        the latent c, float8_e4m3fn, quantised per group
      [head_dim_v, head_dim_v + 4·groups)    one float32 scale per SCALE_GROUP = 128 latent values
                                             (groups = ⌈head_dim_v / 128⌉; the last may be shorter)
      [.., + 2·(d − head_dim_v))             the rope part k_pe, bfloat16, not quantised

  For DeepSeek-V3 (d = 576, head_dim_v = 512) that is 512 + 16 + 128 = 656 bytes. The contract's
  widths other than 576/512 use the same rule (the suite's small widths keep CPU runs short).
  Latent value j of a token dequantises to e4m3[j] · scale[j // 128]; the rope part is as stored.
- "fp8_e4m3": the per-tensor layout vLLM and SGLang use: kv_cache is float8_e4m3fn [num_blocks,
  page, 1, d] (the rope part quantised too) with one float32 scale `k_scale` (a tensor of one
  element) that dequantises every value, K and V alike: value = e4m3 · k_scale.

Exact dequantisation. An e4m3 value has 4 significant bits and a float32 scale 24, so their product
has up to 28: it is always exact in float64 (the reference's type) but NOT always in float32 (it is
when the scale has at most 21 significant bits, e.g. a power of two). A kernel's own dequantisation
therefore may round: to float32 if it multiplies in float32, to bf16/fp16 if it converts the product
to the input type for its tensor-core dot (FlashMLA on Hopper, vLLM's Triton MLA for K). The error
model charges a relative u of the type the kernel declares (`Capabilities.dequant_dtype`, default
the input type) on every cache value it uses; see mla_verify.decode.bounds.

The reference quantiser (`quantize`) chooses scales = amax / 448 rounded to float32 (never a power
of two unless asked), rounds x / scale to the nearest e4m3 value (ties to even) computed in float64
(torch's own float64 → float8 conversion goes through float32 and can round twice), and saturates at
±448. An all-zero group gets scale 1.
"""

from __future__ import annotations

import math

import torch

from mla_verify.rounding import bits_differ

__all__ = ["KV_FORMATS", "FP8_FORMATS", "SCALE_GROUP", "E4M3_MAX", "FP8_SCALES", "packed_width", "scale_groups",
           "round_to_e4m3", "e4m3_half_step", "reference_scales", "quantize", "dequantize", "split_packed",
           "poison_bytes", "scale_is_power_of_two",
           "quantizer_errors"]

KV_FORMATS = ("native", "fp8_ds_mla", "fp8_e4m3")
FP8_FORMATS = ("fp8_ds_mla", "fp8_e4m3")
SCALE_GROUP = 128
E4M3_MAX = 448.0
E4M3 = torch.float8_e4m3fn
# How a case's scales come about (DecodeCase.fp8_scales): amax/448 in float32 (not powers of two),
# powers of two (ue8m0-style, what FlashMLA's own test quantiser does), data shifted by 2^-100 or
# 2^+100 so scales sit near the float32 extremes (dequantised values stay normal and finite), and
# amax scales with some groups (or tokens) entirely zero.
FP8_SCALES = ("amax", "power_of_two", "near_min", "near_max", "zero_blocks")
F64 = torch.float64


def scale_groups(head_dim_v: int) -> int:
    """Float32 scales per token in the fp8_ds_mla layout: ⌈head_dim_v / 128⌉."""
    return -(-head_dim_v // SCALE_GROUP)


def packed_width(d: int, head_dim_v: int) -> int:
    """Bytes per token of the fp8_ds_mla layout: head_dim_v + 4·groups + 2·(d − head_dim_v) (656 for 576/512)."""
    return head_dim_v + 4 * scale_groups(head_dim_v) + 2 * (d - head_dim_v)


def _check_packable(d: int, head_dim_v: int) -> None:
    if head_dim_v % 4 or (d - head_dim_v) % 2:
        raise ValueError(f"the fp8_ds_mla layout needs head_dim_v % 4 == 0 and an even rope width (aligned float32 "
                         f"scales); got d={d}, head_dim_v={head_dim_v}")


def round_to_e4m3(y: torch.Tensor) -> torch.Tensor:
    """y (float64) rounded to the nearest float8_e4m3fn value, ties to even, saturating at ±448;
    returned in float64 (exactly representable in e4m3). NaN stays NaN."""
    y = y.to(F64)
    magnitude = y.abs().clamp(max=E4M3_MAX)
    exponent = torch.floor(torch.log2(magnitude.clamp_min(2.0 ** -6)))  # subnormals share 2^-6's step
    step = torch.exp2(exponent - 3)
    rounded = (torch.round(magnitude / step) * step).clamp(max=E4M3_MAX)  # torch.round: half to even
    return torch.where(torch.isnan(y), y, torch.copysign(rounded, y))


def e4m3_half_step(magnitude: torch.Tensor) -> torch.Tensor:
    """Half the e4m3 spacing at |x| (float64): the largest error of a correct rounding to e4m3."""
    exponent = torch.floor(torch.log2(magnitude.to(F64).abs().clamp(min=2.0 ** -6, max=E4M3_MAX)))
    return torch.exp2(exponent - 4)


def reference_scales(amax: torch.Tensor, power_of_two: bool = False) -> torch.Tensor:
    """float32 scales for groups whose largest |value| is amax: amax / 448 rounded to float32 (or the
    power of two at or above it); 1 for an all-zero group."""
    amax = amax.to(F64)
    scale = amax / E4M3_MAX
    if power_of_two:
        scale = torch.exp2(torch.ceil(torch.log2(scale.clamp_min(2.0 ** -149))))
    return torch.where(amax > 0, scale, torch.ones_like(scale)).to(torch.float32)


def quantize(values: torch.Tensor, head_dim_v: int, kv_format: str, k_scale: torch.Tensor | None = None,
             power_of_two: bool = False) -> torch.Tensor:
    """The reference quantiser. values [..., d] (any float type; NaN rows give NaN bytes) →

    - fp8_ds_mla: float8_e4m3fn [..., packed_width(d, head_dim_v)];
    - fp8_e4m3: float8_e4m3fn [..., d], quantised with `k_scale` (float32, one element; required).

    This is also the `quantizer` the project's torch kernel declares (see `Capabilities`)."""
    if kv_format not in FP8_FORMATS:
        raise ValueError(f"kv_format must be one of {list(FP8_FORMATS)}; got {kv_format!r}")
    d = values.shape[-1]
    if not 1 <= head_dim_v <= d:
        raise ValueError(f"head_dim_v must be in [1, {d}] (the last dim of values); got {head_dim_v}")
    x = values.to(F64)
    if kv_format == "fp8_e4m3":
        if k_scale is None or k_scale.numel() != 1:
            raise ValueError("k_scale must be a float32 tensor of one element for the fp8_e4m3 format")
        scale = float(k_scale.reshape(()).to(torch.float32))
        return round_to_e4m3(x / scale).to(E4M3)
    _check_packable(d, head_dim_v)
    groups = scale_groups(head_dim_v)
    latent = x[..., :head_dim_v]
    padded = torch.nn.functional.pad(latent, (0, groups * SCALE_GROUP - head_dim_v))
    blocks = padded.reshape(*latent.shape[:-1], groups, SCALE_GROUP)
    scales = reference_scales(blocks.abs().amax(-1), power_of_two)  # [..., groups]; NaN rows: NaN
    codes = round_to_e4m3(blocks / scales.to(F64)[..., None])
    codes = codes.reshape(*latent.shape[:-1], groups * SCALE_GROUP)[..., :head_dim_v]
    out = torch.empty(*x.shape[:-1], packed_width(d, head_dim_v), dtype=torch.uint8, device=values.device)
    out[..., :head_dim_v] = codes.to(E4M3).view(torch.uint8)
    out[..., head_dim_v:head_dim_v + 4 * groups] = scales.contiguous().view(torch.uint8)
    out[..., head_dim_v + 4 * groups:] = x[..., head_dim_v:].to(torch.bfloat16).contiguous().view(torch.uint8)
    return out.view(E4M3)


def split_packed(kv_cache: torch.Tensor, d: int, head_dim_v: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views of a fp8_ds_mla cache [..., packed] sharing its storage: (latent float8_e4m3fn
    [..., head_dim_v], scales float32 [..., groups], rope bfloat16 [..., d − head_dim_v])."""
    _check_packable(d, head_dim_v)
    if kv_cache.shape[-1] != packed_width(d, head_dim_v) or kv_cache.element_size() != 1:
        raise ValueError(f"kv_cache must be a 1-byte tensor [..., {packed_width(d, head_dim_v)}] (fp8_ds_mla for "
                         f"d={d}, head_dim_v={head_dim_v}); got shape {tuple(kv_cache.shape)}, dtype {kv_cache.dtype}")
    groups = scale_groups(head_dim_v)
    raw = kv_cache.view(torch.uint8)
    return (raw[..., :head_dim_v].view(E4M3), raw[..., head_dim_v:head_dim_v + 4 * groups].view(torch.float32),
            raw[..., head_dim_v + 4 * groups:].view(torch.bfloat16))


def dequantize(kv_cache: torch.Tensor, kv_format: str, d: int, head_dim_v: int, k_scale: torch.Tensor | None = None,
               dtype: torch.dtype = F64, group_size: int = SCALE_GROUP) -> torch.Tensor:
    """The cache's values [..., d] in `dtype`, computed exactly in float64 (e4m3 × float32 scale, the
    scales as stored) and then converted. `group_size` exists for the diagnosis of wrong kernels
    (scales read per 64 values); the contract's is 128."""
    if kv_format == "native":
        return kv_cache.to(dtype)
    if kv_format == "fp8_e4m3":
        if k_scale is None:
            raise ValueError("k_scale must be given for the fp8_e4m3 format")
        return (kv_cache.to(F64) * float(k_scale.reshape(()).to(torch.float32))).to(dtype)
    if kv_format != "fp8_ds_mla":
        raise ValueError(f"kv_format must be one of {list(KV_FORMATS)}; got {kv_format!r}")
    latent, scales, rope = split_packed(kv_cache, d, head_dim_v)
    group = torch.arange(head_dim_v, device=kv_cache.device) // group_size
    group = group.clamp(max=scales.shape[-1] - 1)
    values = torch.cat((latent.to(F64) * scales.to(F64)[..., group], rope.to(F64)), dim=-1)
    return values.to(dtype)


def poison_bytes(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """n bytes of 0xFF as float8_e4m3fn: NaN read as e4m3, as a float32 scale and as bf16 alike."""
    return torch.full((n,), 0xFF, dtype=torch.uint8, device=device).view(E4M3)


def scale_is_power_of_two(scale: torch.Tensor) -> torch.Tensor:
    """Elementwise: the scale is ±2^k."""
    mantissa, _ = torch.frexp(scale.to(F64))
    return mantissa.abs() == 0.5


def quantizer_errors(values: torch.Tensor, codes: object, head_dim_v: int, kv_format: str,
                     k_scale: torch.Tensor | None = None, scale_format: str = "float32") -> tuple[float, str]:
    """Judge a quantiser's output `codes` for `values` [n, d] (the model-dtype cache rows it was
    given): (largest error / allowance over the values, "" ) when it meets the format, else (ratio,
    what is wrong). The rules:

    - codes: float8_e4m3fn (or uint8) [n, packed_width] for fp8_ds_mla, [n, d] for fp8_e4m3;
    - fp8_ds_mla: the rope part is the values rounded to bf16, bit for bit (not quantised); each
      group's scale is a finite positive float32: amax/448 within float32 rounding (2^-22 relative),
      or, with scale_format="power_of_two", the power of two in [amax/448, 2·amax/448); an all-zero
      group may have any finite positive scale;
    - fp8_e4m3: every value uses the given k_scale;
    - every value is within half an e4m3 step of value/scale, times the scale (+ 2^-22·|value| for
      the float32 division before the rounding): |e4m3·scale − value| ≤ half_step(|value|/scale)·scale.
    """
    n, d = values.shape
    width = packed_width(d, head_dim_v) if kv_format == "fp8_ds_mla" else d
    if not isinstance(codes, torch.Tensor) or codes.dtype not in (E4M3, torch.uint8) or tuple(codes.shape) != (n, width):
        got = (f"shape {tuple(codes.shape)}, dtype {codes.dtype}" if isinstance(codes, torch.Tensor)
               else type(codes).__name__)
        return math.inf, f"expected float8_e4m3fn [{n}, {width}] ({kv_format}), got {got}"
    codes = codes.detach().cpu().view(E4M3)
    x = values.detach().cpu().to(F64)
    slack = 2.0 ** -22
    if kv_format == "fp8_e4m3":
        scale = torch.full_like(x, float(k_scale.reshape(()).to(torch.float32)))
        stored = codes.to(F64)
    else:
        latent, scales, rope = split_packed(codes, d, head_dim_v)
        want_rope = x[:, head_dim_v:].to(torch.bfloat16)
        altered = bits_differ(rope, want_rope, nan_payload=True)
        if altered.any():
            at = torch.nonzero(altered)[0].tolist()
            return math.inf, (f"the rope part must be the values rounded to bf16, not quantised: token {at[0]}, rope "
                              f"column {at[1]} holds {float(rope[tuple(at)]):.6g}, expected {float(want_rope[tuple(at)]):.6g}")
        groups = scale_groups(head_dim_v)
        padded = torch.nn.functional.pad(x[:, :head_dim_v].abs(), (0, groups * SCALE_GROUP - head_dim_v))
        amax = padded.reshape(n, groups, SCALE_GROUP).amax(-1)
        s = scales.to(F64)
        bad = ~torch.isfinite(s) | (s <= 0)
        if bad.any():
            at = torch.nonzero(bad)[0].tolist()
            return math.inf, f"scale {at[1]} of token {at[0]} is {float(s[tuple(at)])!r}: expected a finite positive float32"
        ideal = amax / E4M3_MAX
        nonzero = amax > 0
        if scale_format == "power_of_two":
            wrong = nonzero & (~scale_is_power_of_two(s) | (s < ideal * (1 - slack)) | (s >= 2 * ideal * (1 + slack)))
            rule = "the power of two in [amax/448, 2·amax/448) (scale_format='power_of_two')"
        else:
            wrong = nonzero & ((s - ideal).abs() > slack * ideal)
            rule = ("amax/448 in float32 (not rounded to a power of two; declare scale_format='power_of_two' if the "
                    "quantiser writes powers of two)")
        if wrong.any():
            at = torch.nonzero(wrong)[0].tolist()
            return math.inf, (f"scale {at[1]} of token {at[0]} is {float(s[tuple(at)]):.9g}; expected {rule}: "
                              f"amax/448 = {float(ideal[tuple(at)]):.9g}")
        column = torch.arange(head_dim_v) // SCALE_GROUP
        scale = torch.cat((s[:, column], torch.ones(n, d - head_dim_v, dtype=F64)), dim=1)
        stored = torch.cat((latent.to(F64), x[:, head_dim_v:]), dim=1)  # the rope part is checked above
    error = (stored * scale - x).abs()
    allowance = e4m3_half_step(x.abs() / scale) * scale + slack * x.abs()
    ratio = torch.where(allowance > 0, error / allowance, torch.where(error > 0, math.inf, 0.0))
    ratio = torch.nan_to_num(ratio, nan=math.inf)
    worst = float(ratio.max()) if ratio.numel() else 0.0
    if worst > 1:
        at = tuple(int(i) for i in torch.nonzero(ratio == ratio.max())[0])
        return worst, (f"value [token, column] = {list(at)}: {float(x[at]):.9g} stored as {float(stored[at] * scale[at]):.9g}"
                       f" (e4m3 {float(stored[at]):g} × scale {float(scale[at]):.9g}), {worst:.3g}× the allowed half "
                       "e4m3 step")
    return worst, ""
