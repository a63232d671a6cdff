"""A layer case: the small, JSON-serialisable description of one layer run (config, batch, prefill
length, decode steps, seed, dtype, weight and activation scales). Everything a replay needs is
here, so a counterexample is this description and the layer's name.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from mla_verify.config import MLAConfig, YarnConfig
from mla_verify.reference import MLAWeights, random_weights

__all__ = ["LayerCase", "LAYER_DTYPES"]

F64 = torch.float64
LAYER_DTYPES = ("float64", "float32", "bfloat16", "float16")
# the linear weights a weight scale multiplies (RMSNorm weights stay near 1)
_LINEAR = ("wq", "wq_a", "wq_b", "wkv_a", "wkv_b", "wo")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class LayerCase:
    """A prefill of `prefill` tokens then one decode call per entry of `decode` (its token count),
    on `batch` sequences in module dtype `dtype`; weights and inputs from `seed`, the linear weights
    multiplied by `weight_scale` (scores grow with its square) and the input by `activation_scale`."""

    config: MLAConfig
    batch: int = 1
    prefill: int = 3
    decode: tuple[int, ...] = (1, 1, 1)
    seed: int = 0
    dtype: str = "float64"
    weight_scale: float = 1.0
    activation_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.batch < 1 or self.prefill < 1 or any(n < 1 for n in self.decode):
            raise ValueError(f"batch, prefill and every decode step must be >= 1; got {self.batch}, "
                             f"{self.prefill}, {self.decode}")
        if self.dtype not in LAYER_DTYPES:
            raise ValueError(f"dtype must be one of {list(LAYER_DTYPES)}; got {self.dtype!r}")
        for name in ("weight_scale", "activation_scale"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
                    and value > 0):
                raise ValueError(f"{name} must be a finite number > 0; got {value!r}")

    @property
    def length(self) -> int:
        return self.prefill + sum(self.decode)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def replace(self, **changes: object) -> LayerCase:
        return dataclasses.replace(self, **changes)

    def build(self) -> tuple[MLAWeights, torch.Tensor]:
        """float64 weights and x [batch, length, D]."""
        g = torch.Generator().manual_seed(self.seed)
        weights = random_weights(self.config, g)
        if self.weight_scale != 1.0:
            for name in _LINEAR:
                if getattr(weights, name) is not None:
                    setattr(weights, name, getattr(weights, name) * self.weight_scale)
        x = torch.randn(self.batch, self.length, self.config.hidden_size, generator=g, dtype=F64)
        return weights, x * self.activation_scale

    def describe(self) -> str:
        c = self.config
        yarn = "none" if c.yarn is None else (f"factor {c.yarn.factor}, original "
                                              f"{c.yarn.original_max_position_embeddings}, "
                                              f"mscale {c.yarn.mscale}/{c.yarn.mscale_all_dim}")
        scales = "".join(f" {name}={value:g}" for name, value in (("weight_scale", self.weight_scale),
                                                                   ("activation_scale", self.activation_scale))
                         if value != 1.0)
        return (f"{self.dtype} b={self.batch} prefill={self.prefill} decode={list(self.decode)} seed={self.seed}"
                f"{scales}; D={c.hidden_size} h={c.num_heads} q_lora={c.q_lora_rank} kv_lora={c.kv_lora_rank} "
                f"nope/rope/v={c.qk_nope_head_dim}/{c.qk_rope_head_dim}/{c.v_head_dim} rope={c.rope_layout} "
                f"theta={c.rope_theta} yarn={yarn}")

    def to_dict(self) -> dict:
        """Plain JSON data (the config as its fields, YaRN nested or null)."""
        data = dataclasses.asdict(self)
        data["decode"] = list(self.decode)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> LayerCase:
        """The case a to_dict() wrote; a hand-edited or damaged one raises ValueError naming the field."""
        if not isinstance(data, dict):
            raise ValueError(f"a layer case must be a JSON object, got {type(data).__name__}")
        _check_fields("layer case", data, cls)
        config = data["config"]
        if not isinstance(config, dict):
            raise ValueError(f"case field 'config': expected an object of MLAConfig fields, got {config!r}")
        _check_fields("case field 'config'", config, MLAConfig)
        yarn = config.get("yarn")
        if yarn is not None:
            if not isinstance(yarn, dict):
                raise ValueError(f"case field 'config.yarn': expected null or an object, got {yarn!r}")
            _check_fields("case field 'config.yarn'", yarn, YarnConfig)
            try:
                yarn = YarnConfig(**yarn)
            except (TypeError, ValueError) as error:
                raise ValueError(f"case field 'config.yarn': {error}") from None
        try:
            mla_config = MLAConfig(**{**config, "yarn": yarn})
        except (TypeError, ValueError) as error:
            raise ValueError(f"case field 'config': {error}") from None
        decode = data["decode"]
        if not (isinstance(decode, list | tuple) and all(_is_int(n) and n >= 1 for n in decode)):
            raise ValueError(f"case field 'decode': expected a list of integers ≥ 1, got {decode!r}")
        for name in ("batch", "prefill"):
            if not (_is_int(data[name]) and data[name] >= 1):
                raise ValueError(f"case field '{name}': expected an integer ≥ 1, got {data[name]!r}")
        if not (_is_int(data.get("seed", 0)) and data.get("seed", 0) >= 0):
            raise ValueError(f"case field 'seed': expected an integer ≥ 0, got {data['seed']!r}")
        if data.get("dtype", "float64") not in LAYER_DTYPES:
            raise ValueError(f"case field 'dtype': expected one of {list(LAYER_DTYPES)}, got {data['dtype']!r}")
        for name in ("weight_scale", "activation_scale"):
            value = data.get(name, 1.0)
            if not (isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
                    and value > 0):
                raise ValueError(f"case field '{name}': expected a finite number > 0, got {value!r}")
        return cls(**{**data, "config": mla_config, "decode": tuple(decode),
                      **{name: float(data[name]) for name in ("weight_scale", "activation_scale") if name in data}})


def _check_fields(what: str, data: dict, cls: type) -> None:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    missing = sorted(name for name, f in fields.items() if name not in data and f.default is dataclasses.MISSING
                     and f.default_factory is dataclasses.MISSING)
    if unknown or missing:
        raise ValueError(f"{what}: " + "; ".join(part for part in (f"unknown fields {unknown}" if unknown else "",
                                                                   f"missing fields {missing}" if missing else "")
                                                 if part))
