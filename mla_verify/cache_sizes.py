"""KV-cache sizes: per token per layer and per model, for MHA, GQA, MQA and MLA.

Elements per token per layer: MHA 2·h·d_h; GQA 2·g·d_h; MQA 2·d_h; MLA d_c + d_r (absorbed, the
latent cache) or h·(d_n + d_r + d_v) (naive, K and V expanded per head). The FP8 MLA layout
(FlashMLA's sparse path) stores per token d_c e4m3 bytes, one float32 scale per 128 latent
columns, and d_r bf16 rope values: 656 bytes for DeepSeek-V3.
"""

from __future__ import annotations

import math

import torch

from mla_verify.config import GQA_PRESETS, MLA_PRESETS, GQAConfig, MLAConfig

__all__ = [
    "FP8_SCALE_GROUP",
    "gqa_elements_per_token_layer",
    "mla_elements_per_token_layer",
    "mla_expanded_elements_per_token_layer",
    "bytes_per_token_layer",
    "bytes_per_token_model",
    "fp8_mla_bytes_per_token_layer",
    "allocate_fp8_latent_cache",
    "reduction",
    "cache_table",
    "format_cache_table",
]

FP8_SCALE_GROUP = 128  # latent columns sharing one float32 scale in the FP8 layout


def gqa_elements_per_token_layer(config: GQAConfig) -> int:
    """2·g·d_h: one K and one V row per kv head (g = h for MHA, 1 for MQA)."""
    return 2 * config.num_kv_heads * config.head_dim


def mla_elements_per_token_layer(config: MLAConfig) -> int:
    """d_c + d_r: the absorbed-mode latent cache row."""
    return config.kv_lora_rank + config.qk_rope_head_dim


def mla_expanded_elements_per_token_layer(config: MLAConfig) -> int:
    """h·(d_n + d_r + d_v): K and V expanded per head, as the naive (MHA-mode) form caches them."""
    return config.num_heads * (config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim)


def _elements(config: MLAConfig | GQAConfig) -> int:
    if isinstance(config, MLAConfig):
        return mla_elements_per_token_layer(config)
    if isinstance(config, GQAConfig):
        return gqa_elements_per_token_layer(config)
    raise TypeError(f"config must be an MLAConfig or GQAConfig; got {type(config).__name__}")


def bytes_per_token_layer(config: MLAConfig | GQAConfig, dtype: torch.dtype = torch.bfloat16) -> int:
    return _elements(config) * _itemsize(dtype)


def bytes_per_token_model(config: MLAConfig | GQAConfig, dtype: torch.dtype = torch.bfloat16) -> int:
    return bytes_per_token_layer(config, dtype) * config.num_layers


def _itemsize(dtype: torch.dtype) -> int:
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype; got {dtype!r}")
    return torch.empty((), dtype=dtype).element_size()


def fp8_mla_bytes_per_token_layer(config: MLAConfig) -> int:
    """d_c·1 (e4m3) + ⌈d_c/128⌉·4 (float32 scales) + d_r·2 (bf16 rope)."""
    groups = math.ceil(config.kv_lora_rank / FP8_SCALE_GROUP)
    return config.kv_lora_rank + 4 * groups + 2 * config.qk_rope_head_dim


def allocate_fp8_latent_cache(config: MLAConfig, num_blocks: int, page_size: int) -> dict[str, torch.Tensor]:
    """The FP8 layout's three parts as separate tensors: latent e4m3 [n, p, d_c], scales float32
    [n, p, ⌈d_c/128⌉], rope bf16 [n, p, d_r]."""
    groups = math.ceil(config.kv_lora_rank / FP8_SCALE_GROUP)
    return {
        "latent": torch.zeros(num_blocks, page_size, config.kv_lora_rank, dtype=torch.float8_e4m3fn),
        "scales": torch.zeros(num_blocks, page_size, groups, dtype=torch.float32),
        "rope": torch.zeros(num_blocks, page_size, config.qk_rope_head_dim, dtype=torch.bfloat16),
    }


def reduction(smaller: int, larger: int) -> float:
    """Fractional reduction 1 − smaller/larger."""
    return 1.0 - smaller / larger


def cache_table(dtype: torch.dtype = torch.bfloat16) -> dict:
    """Per-layer and per-model KV bytes per token for every preset, and the reduction of each MLA
    model against each GQA model, per layer and over the whole model."""
    mla = {name: {"per_layer": bytes_per_token_layer(c, dtype), "layers": c.num_layers,
                  "per_model": bytes_per_token_model(c, dtype),
                  "fp8_per_layer": fp8_mla_bytes_per_token_layer(c),
                  "expanded_per_layer": mla_expanded_elements_per_token_layer(c) * _itemsize(dtype)}
           for name, c in MLA_PRESETS.items()}
    gqa = {name: {"per_layer": bytes_per_token_layer(c, dtype), "layers": c.num_layers,
                  "per_model": bytes_per_token_model(c, dtype)}
           for name, c in GQA_PRESETS.items()}
    reductions = [
        {"mla": m, "gqa": g,
         "per_layer": reduction(mla[m]["per_layer"], gqa[g]["per_layer"]),
         "per_model": reduction(mla[m]["per_model"], gqa[g]["per_model"])}
        for m in mla for g in gqa
    ]
    return {"dtype": str(dtype).removeprefix("torch."), "mla": mla, "gqa": gqa, "reductions": reductions}


def _kib(n: int) -> str:
    return f"{n / 1024:,.1f} KiB"


def format_cache_table(table: dict) -> str:
    """The cache table as text, with the seed's claim about DeepSeek-V3 vs Qwen2.5 stated."""
    lines = [f"KV cache per token ({table['dtype']})", ""]
    lines.append(f"{'model':18} {'kind':4} {'layers':>6} {'per layer':>12} {'per model':>12}")
    for kind, rows in (("MLA", table["mla"]), ("GQA", table["gqa"])):
        for name, row in rows.items():
            lines.append(f"{name:18} {kind:4} {row['layers']:>6} {row['per_layer']:>10,} B "
                         f"{_kib(row['per_model']):>12}")
    lines += ["", "MLA reduction against each GQA model (per layer / whole model)", ""]
    gqa_names = list(table["gqa"])
    lines.append(f"{'':18} " + " ".join(f"{g:>22}" for g in gqa_names))
    by_pair = {(r["mla"], r["gqa"]): r for r in table["reductions"]}
    for m in table["mla"]:
        cells = [f"{by_pair[m, g]['per_layer']:>10.3%} / {by_pair[m, g]['per_model']:>8.2%}" for g in gqa_names]
        lines.append(f"{m:18} " + " ".join(f"{c:>22}" for c in cells))
    v3_32, v3_72 = by_pair["DeepSeek-V3", "Qwen2.5-32B"], by_pair["DeepSeek-V3", "Qwen2.5-72B"]
    lines += ["", "Claim: \"DeepSeek-V3's KV cache is 71.88% smaller than Qwen2.5-32B/72B\"",
              f"  true per layer: {v3_32['per_layer']:.3%} against both (576 vs 2048 elements per token per layer);",
              f"  over the whole model: {v3_32['per_model']:.2%} against Qwen2.5-32B and "
              f"{v3_72['per_model']:.2%} against Qwen2.5-72B (layer counts differ: 61 vs 64 and 80)."]
    return "\n".join(lines)
