"""The layer contract: a whole MLA attention layer with its own cache, the precision it declares,
the intermediates it may expose, and the capabilities it claims.

Contract
--------
An implementation is built by a factory

    factory(config: MLAConfig, weights: MLAWeights, dtype: torch.dtype, device: str) -> MLALayer

from the reference's float64 weights (it rounds them to `dtype` itself; the linear weights to
`dtype`, the RMSNorm weights to the type its precision names); a factory may carry
`supports(config) -> str | None` (None, or why it cannot build that layer) and `capabilities`
(`LayerCapabilities`). The layer offers

    prefill(x [b, s, D]) -> out [b, s, D]   positions 0 … s−1; starts a fresh cache
    decode(x [b, n, D])  -> out [b, n, D]   n ≥ 1 new tokens at the next positions; uses and grows
                                            the cache filled so far
    precision: InternalPrecision            where each step rounds, for the dtype it was built in
    intermediates() -> dict[str, Tensor]    optional: the checkpoints of the last call (below)

Outputs are in `dtype`; the positions are causal with bottom-right alignment (each token sees every
earlier token and itself). Prefill then decode steps must give, token by token, the output of
`mla_forward` on the whole sequence.

Intermediates
-------------
After each prefill()/decode() call a layer may expose any subset of these checkpoints, each in the
layer's own rounding, exactly as it used it, for the tokens of that call only (`INTERMEDIATES`):

    "q"        [b, n, h, d_n + d_r]  query per head before RoPE (after W_UQ / W_Q)
    "latent"   [b, n, d_c]           c after kv_a_layernorm
    "k_pe_raw" [b, n, d_r]           rope key before RoPE (last d_r columns of x·W_DKV)
    "q_pe"     [b, n, h, d_r]        query rope part after RoPE
    "k_pe"     [b, n, d_r]           rope key after RoPE
    "o"        [b, n, h, d_v]        per-head attention output (the input of W_O)

The checks judge the layer stage by stage between the checkpoints it exposes (mla_verify.layer.checks).
`capture_submodules` exposes them from any nn.Module through forward hooks, without code changes.

The declared precision
----------------------
`InternalPrecision` names where a layer rounds. Six compute types, one per step — the type its
elementwise arithmetic runs in (products, rsqrt, exp, divisions, the angles): projections, rms_norm,
rope, scores, softmax, attention — and, separately:

- `accumulation`: the type sums run in (dot products, the mean of squares, the softmax's row sum,
  P·V). torch's bf16/fp16 matmuls accumulate in float32 on the CPU (oneDNN and the fallback gemm
  alike; checked on torch 2.13) and on the GPU, and the products of two bf16/fp16 values are exact
  in float32, so a bf16 linear map errs by γ_n(u_fp32)·Σ|a||w| before its result is rounded once.
- `stored`: the type a step's result is rounded to before the next step reads it (the module dtype).
- `scores_stored`: the type the scores are rounded to before the softmax (eager attention rounds
  q·k to the module dtype and multiplies by the scale there; fused kernels keep float32).
- `p_stored`: the type the probabilities are rounded to before P·V. torch 2.13's CPU SDPA takes its
  flash kernel when d_qk = d_v, which rounds exp(s − max) to bf16/fp16 before P·V, and its math path
  otherwise, which upcasts to float32 and keeps P there; HF's eager attention casts P to the module
  dtype.
- `rope_rotation`: the type the rotation's products and sum run in, cos/sin rounded to it first
  (HF DeepseekV3 casts cos/sin to the module dtype and rotates there; V2's complex product runs in
  float32).
- `norm_weights`: the type the RMSNorm weights are held in.
- `exp_error`: the relative error of exp (default `mla_verify.rounding.exp_relative_error` of the
  softmax type: 2^-18 in float32, which covers torch's CPU exp_u20).

A declaration that leaves `stored` unset is dtype-agnostic, the contract's first form: every step
rounds its result to its compute type, coarsened to the module dtype (`at_least`), and sums run in
the same type. `for_module(dtype, ...)` writes the declaration of a module that uses plain torch ops
in `dtype`: sums in float32 for bf16/fp16 (the dtype itself for float32/float64), elementwise steps
in the module dtype except the angles and the softmax (float32), every result stored in the module
dtype; a layer overrides what it computes more accurately. `resolved(dtype)` fills every unset field.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import nn

from mla_verify.config import MLAConfig
from mla_verify.reference import MLAWeights
from mla_verify.rounding import coarser, unit_roundoff

__all__ = ["InternalPrecision", "MLALayer", "LayerFactory", "LayerCapabilities", "layer_capabilities_of",
           "INTERMEDIATES", "capture_submodules", "SubmoduleCapture", "resolve_factory", "unsupported_reason",
           "dtype_name"]

F32, F64 = torch.float32, torch.float64
LOW_PRECISION = (torch.bfloat16, torch.float16)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def natural_accumulation(dtype: torch.dtype) -> torch.dtype:
    """The type torch's reductions on `dtype` tensors accumulate in: float32 for bf16/fp16."""
    return F32 if dtype in LOW_PRECISION else dtype


@dataclass(frozen=True)
class InternalPrecision:
    """Where a layer rounds, step by step (see the module docstring)."""

    projections: torch.dtype = F64  # x·W_DQ, c_q·W_UQ / x·W_Q, x·W_DKV, c·W_UKV, o·W_O: products
    rms_norm: torch.dtype = F64  # q_a and kv_a norms: squares, rsqrt, products
    rope: torch.dtype = F64  # inverse frequencies, angles and cos/sin
    scores: torch.dtype = F64  # q·k products and the softmax scale
    softmax: torch.dtype = F64  # max, exp, division
    attention: torch.dtype = F64  # P·V products
    note: str = ""
    accumulation: torch.dtype | None = None  # sums; None: each step's compute type
    stored: torch.dtype | None = None  # results between steps; None: dtype-agnostic (each step's type)
    scores_stored: torch.dtype | None = None  # None: the module dtype (as eager attention)
    p_stored: torch.dtype | None = None  # None: the module dtype
    rope_rotation: torch.dtype | None = None  # None: the module dtype
    norm_weights: torch.dtype | None = None  # None: the module dtype
    exp_error: float | None = None  # None: rounding.exp_relative_error(softmax)

    STEPS = ("projections", "rms_norm", "rope", "scores", "softmax", "attention")
    DETAILS = ("accumulation", "stored", "scores_stored", "p_stored", "rope_rotation", "norm_weights")

    def __post_init__(self) -> None:
        for name in self.STEPS + self.DETAILS:
            value = getattr(self, name)
            if value is None and name in self.DETAILS:
                continue
            if not (isinstance(value, torch.dtype) and value.is_floating_point):
                raise TypeError(f"InternalPrecision.{name} must be a floating torch.dtype"
                                f"{' or None' if name in self.DETAILS else ''}; got {value!r}")
        if self.exp_error is not None and not (isinstance(self.exp_error, float) and 0 <= self.exp_error < 1):
            raise ValueError(f"InternalPrecision.exp_error must be a float in [0, 1) or None; got {self.exp_error!r}")

    @classmethod
    def uniform(cls, dtype: torch.dtype, note: str = "") -> InternalPrecision:
        """Every step computes, sums and rounds in dtype (the dtype-agnostic form)."""
        return cls(dtype, dtype, dtype, dtype, dtype, dtype, note)

    @classmethod
    def for_module(cls, dtype: torch.dtype, note: str = "", **overrides: object) -> InternalPrecision:
        """A module that runs plain torch ops in `dtype`: sums in float32 for bf16/fp16 (dtype
        otherwise), products of the linear maps, the scores and P·V exact in that accumulation type,
        RMSNorm and the rotation in the module dtype, angles/cos/sin and the softmax in float32 (or
        float64 in a float64 module), every result, the scores and P stored in the module dtype.
        `overrides` set any field."""
        acc = natural_accumulation(dtype)
        wide = F64 if dtype == F64 else F32
        fields = dict(projections=acc, rms_norm=dtype, rope=wide, scores=acc, softmax=wide, attention=acc,
                      note=note, accumulation=acc, stored=dtype, scores_stored=dtype, p_stored=dtype,
                      rope_rotation=dtype, norm_weights=dtype, exp_error=None)
        unknown = sorted(set(overrides) - set(fields))
        if unknown:
            raise TypeError(f"InternalPrecision.for_module got unknown fields {unknown}; expected some of "
                            f"{sorted(fields)}")
        fields.update(overrides)
        return cls(**fields)

    def at_least(self, dtype: torch.dtype) -> InternalPrecision:
        """Every step no finer than dtype (a float32 module cannot compute a step in float64)."""
        return dataclasses.replace(self, **{step: coarser(getattr(self, step), dtype) for step in self.STEPS})

    def resolved(self, dtype: torch.dtype) -> InternalPrecision:
        """Every field set, for a module of `dtype`. A dtype-agnostic declaration (stored unset)
        rounds every step to its compute type coarsened to dtype and sums in that type; an explicit
        one keeps its compute types, stores in the coarser of its `stored` and dtype, and fills the
        unset details with the module dtype (the conservative choice)."""
        if self.stored is None:
            p = self.at_least(dtype)
            return dataclasses.replace(
                p, accumulation=None, stored=dtype, scores_stored=p.scores, p_stored=p.softmax, rope_rotation=p.rope,
                norm_weights=self.norm_weights or dtype,
                exp_error=self._exp_error(p.softmax))
        stored = coarser(self.stored, dtype)
        return dataclasses.replace(
            self, stored=stored, scores_stored=self.scores_stored or stored, p_stored=self.p_stored or stored,
            rope_rotation=self.rope_rotation or stored, norm_weights=self.norm_weights or stored,
            exp_error=self._exp_error(self.softmax))

    def _exp_error(self, softmax: torch.dtype) -> float:
        from mla_verify.rounding import exp_relative_error

        return self.exp_error if self.exp_error is not None else exp_relative_error(softmax)

    def sums(self, step: str) -> torch.dtype:
        """The type the sums of `step` run in (a step cannot sum more accurately than it computes)."""
        compute = getattr(self, step)
        return compute if self.accumulation is None else coarser(compute, self.accumulation)

    @property
    def coarsest(self) -> torch.dtype:
        steps = [getattr(self, step) for step in self.STEPS]
        steps += [getattr(self, name) for name in self.DETAILS if getattr(self, name) is not None]
        return max(steps, key=unit_roundoff)

    def describe(self) -> str:
        groups: dict[torch.dtype, list[str]] = {}
        for step in self.STEPS:
            groups.setdefault(getattr(self, step), []).append(step)
        text = "; ".join(f"{', '.join(steps)} in {dtype_name(dtype)}" for dtype, steps in
                         sorted(groups.items(), key=lambda item: unit_roundoff(item[0])))
        details = [f"{name.replace('_', ' ')} {dtype_name(getattr(self, name))}" for name in self.DETAILS
                   if getattr(self, name) is not None]
        if details:
            text += "; " + ", ".join(details)
        return f"{text} ({self.note})" if self.note else text

    def precision_class(self, dtype: torch.dtype) -> str:
        """A short label: the module dtype, then the steps computed in a type a plain module of that
        dtype would not use — another type than the dtype itself, and for bf16/fp16 modules than
        float32 too (their sums and softmax run there anyway): 'float64 with float32
        RMSNorm/RoPE/softmax', 'bfloat16', 'bfloat16 with float64 RMSNorm/RoPE', 'bfloat16 (sums in
        bfloat16)'."""
        mine = self.resolved(dtype)
        plain = {dtype, F32} if dtype in LOW_PRECISION else {dtype}
        names = {"rms_norm": "RMSNorm", "rope": "RoPE", "softmax": "softmax", "projections": "projections",
                 "scores": "scores", "attention": "P·V"}
        by_type: dict[torch.dtype, list[str]] = {}
        for step in self.STEPS:
            if getattr(mine, step) not in plain:
                by_type.setdefault(getattr(mine, step), []).append(names[step])
        label = dtype_name(dtype)
        if dtype in LOW_PRECISION and mine.sums("projections") == dtype:
            label += f" (sums in {dtype_name(dtype)})"
        parts = [f"{dtype_name(t)} {'/'.join(steps)}" for t, steps in
                 sorted(by_type.items(), key=lambda item: unit_roundoff(item[0]))]
        return label + (" with " + ", ".join(parts) if parts else "")


class MLALayer(Protocol):
    precision: InternalPrecision

    def prefill(self, x: torch.Tensor) -> torch.Tensor: ...

    def decode(self, x: torch.Tensor) -> torch.Tensor: ...


LayerFactory = Callable[[MLAConfig, MLAWeights, torch.dtype, str], MLALayer]


# ----------------------------------------------------------------------------------------------
# Capabilities
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerCapabilities:
    """What a layer claims: the module dtypes and devices it runs in, the most heads it builds
    (None: any), whether prefill and decode are two different computations (`both_paths`: naive
    prefill, absorbed decode; the absorbed_matches_naive property compares them), and a note."""

    dtypes: tuple[torch.dtype, ...] = (F64, F32, torch.bfloat16, torch.float16)
    devices: tuple[str, ...] = ("cpu",)
    max_heads: int | None = None
    both_paths: bool = True
    note: str = ""

    def __post_init__(self) -> None:
        if not self.dtypes or not all(isinstance(t, torch.dtype) and t.is_floating_point for t in self.dtypes):
            raise ValueError(f"LayerCapabilities.dtypes must be a non-empty tuple of floating torch dtypes; "
                             f"got {self.dtypes!r}")
        if not self.devices or not all(isinstance(d, str) for d in self.devices):
            raise ValueError(f"LayerCapabilities.devices must be a non-empty tuple of device names; got "
                             f"{self.devices!r}")
        if self.max_heads is not None and not (isinstance(self.max_heads, int) and self.max_heads >= 1):
            raise ValueError(f"LayerCapabilities.max_heads must be None or an int >= 1; got {self.max_heads!r}")

    def replace(self, **changes: object) -> LayerCapabilities:
        return dataclasses.replace(self, **changes)

    def supports_device(self, device: str) -> bool:
        return device.split(":")[0] in self.devices


def layer_capabilities_of(factory: str | LayerFactory) -> LayerCapabilities:
    """The factory's `capabilities` attribute, or the default (float64, float32, bfloat16, float16
    on the CPU, both paths)."""
    declared = getattr(resolve_factory(factory), "capabilities", None)
    if declared is None:
        return LayerCapabilities()
    if not isinstance(declared, LayerCapabilities):
        raise TypeError(f"a layer factory's capabilities must be a LayerCapabilities; got {type(declared).__name__}")
    return declared


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


# ----------------------------------------------------------------------------------------------
# Intermediates
# ----------------------------------------------------------------------------------------------

# key → its shape after [b, n] (in MLAConfig's names) and what it is
INTERMEDIATES: dict[str, str] = {
    "q": "[b, n, h, d_n + d_r] query per head before RoPE (after W_UQ / W_Q)",
    "latent": "[b, n, d_c] c after kv_a_layernorm",
    "k_pe_raw": "[b, n, d_r] rope key before RoPE (last d_r columns of x·W_DKV)",
    "q_pe": "[b, n, h, d_r] query rope part after RoPE",
    "k_pe": "[b, n, d_r] rope key after RoPE",
    "o": "[b, n, h, d_v] per-head attention output (the input of W_O)",
}


def intermediate_shape(key: str, config: MLAConfig) -> tuple[int, ...]:
    """The per-token shape of an intermediate (after [b, n])."""
    h, dn, dr, dv, dc = (config.num_heads, config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim,
                         config.kv_lora_rank)
    return {"q": (h, dn + dr), "latent": (dc,), "k_pe_raw": (dr,), "q_pe": (h, dr), "k_pe": (dr,),
            "o": (h, dv)}[key]


class SubmoduleCapture:
    """Forward hooks on submodules that record the intermediates of the last call (see
    `capture_submodules`)."""

    def __init__(self, module: nn.Module, taps: dict[str, tuple[str, str]], config: MLAConfig | None) -> None:
        unknown = sorted(set(taps) - set(INTERMEDIATES))
        if unknown:
            raise ValueError(f"taps: unknown intermediate keys {unknown}; expected some of {list(INTERMEDIATES)}")
        self.config = config
        self._module = module
        self._taps = dict(taps)
        self._recorded: dict[str, torch.Tensor] = {}
        self._hooked: dict[str, tuple[nn.Module, object]] = {}  # key → (submodule, hook handle)
        for key, tap in taps.items():
            if not (isinstance(tap, tuple) and len(tap) == 2 and tap[1] in ("input", "output")):
                raise ValueError(f"taps[{key!r}] must be (submodule path, 'input' | 'output'); got {tap!r}")
        self._attach()

    def _attach(self) -> None:
        """Hook every tapped submodule; a submodule replaced since (a test swapping a norm for
        nn.Identity, a user's patch) is hooked again at its path."""
        submodules = dict(self._module.named_modules())
        for key, (path, where) in self._taps.items():
            if path not in submodules:
                raise ValueError(f"taps[{key!r}]: no submodule {path!r} in {type(self._module).__name__}; it has "
                                 f"{sorted(name for name in submodules if name)[:20]}")
            hooked = self._hooked.get(key)
            if hooked is not None and hooked[0] is submodules[path]:
                continue
            if hooked is not None:
                hooked[1].remove()
            self._hooked[key] = (submodules[path], submodules[path].register_forward_hook(self._hook(key, where)))

    def _hook(self, key: str, where: str):
        def record(_module, inputs, output):
            tensor = inputs[0] if where == "input" else (output[0] if isinstance(output, tuple) else output)
            self._recorded[key] = tensor.detach().clone()

        return record

    def clear(self) -> None:
        """Forget what was recorded and re-hook replaced submodules (call at the start of each
        prefill/decode)."""
        self._recorded = {}
        self._attach()

    def remove(self) -> None:
        """Remove the hooks."""
        for _, handle in self._hooked.values():
            handle.remove()
        self._hooked = {}

    def intermediates(self) -> dict[str, torch.Tensor]:
        """The recorded intermediates in the documented shapes ([b, n] then `INTERMEDIATES`'s):
        'k_pe_raw' is the last d_r columns of the tapped tensor; per-head keys are split by head.
        Needs the config for any key whose shape is not the tapped tensor's."""
        out = {}
        for key, tensor in self._recorded.items():
            if self.config is None:
                out[key] = tensor
                continue
            if tensor.dim() < 2:
                raise ValueError(f"intermediate {key!r}: the tapped tensor must be token-major [b, n, ...]; got "
                                 f"shape {tuple(tensor.shape)}")
            b, n = tensor.shape[:2]
            if key == "k_pe_raw":
                tensor = tensor[..., -self.config.qk_rope_head_dim:]
            shape = (b, n, *intermediate_shape(key, self.config))
            if tensor.numel() != b * n * torch.Size(shape[2:]).numel():
                raise ValueError(f"intermediate {key!r}: tapped tensor of shape {tuple(tensor.shape)} cannot be "
                                 f"read as {list(shape)} ({INTERMEDIATES[key]})")
            out[key] = tensor.reshape(shape)
        return out


def capture_submodules(module: nn.Module, taps: dict[str, tuple[str, str]],
                       config: MLAConfig | None = None) -> SubmoduleCapture:
    """Expose intermediates of any nn.Module layer through forward hooks, without code changes.

    `taps` maps an intermediate key (`INTERMEDIATES`) to (dotted submodule path, 'input' | 'output'):
    the tensor that submodule receives (its first positional argument) or returns (the first element
    of a tuple), recorded on every call, the last call kept. Tapped tensors must be token-major
    [b, n, ...] (what nn.Linear and RMSNorm modules see); with `config`, 'k_pe_raw' is sliced to the
    last d_r columns of the tap (the wkv_a / kv_a_proj_with_mqa output) and per-head keys are split
    by head ([b, n, h·d_v] → [b, n, h, d_v]). Example, for DeepSeek-V3's inference/model.py MLA:

        capture = capture_submodules(mla, {"q": ("wq_b", "output"), "latent": ("kv_norm", "output"),
                                           "k_pe_raw": ("wkv_a", "output"), "o": ("wo", "input")}, config)

    and in the layer: `capture.clear()` before each call, `intermediates()` returns
    `capture.intermediates()`."""
    return SubmoduleCapture(module, taps, config)
