"""KV-cache sizes: per token per layer and per model, for MHA, GQA, MQA and MLA.

Elements per token per layer: MHA 2·h·d_h; GQA 2·g·d_h; MQA 2·d_h; MLA d_c + d_r (absorbed, the
latent cache) or h·(d_n + d_r + d_v) (naive, K and V expanded per head).

FP8 latent caches (the decode contract's formats, mla_verify.decode.fp8), bytes per token per layer:
- fp8_ds_mla (FlashMLA's sparse path, DeepSeek-V3.2): d_c e4m3 bytes, one float32 scale per 128
  latent columns, d_r bf16 rope values: 512 + 16 + 128 = 656 for DeepSeek-V3/V3.2;
- fp8_e4m3 (vLLM's and SGLang's per-tensor layout): d_c + d_r e4m3 bytes = 576 (and one float32
  scale per layer, not per token).
DeepSeek-V3.2's lightning indexer keeps a key cache of its own in every layer: index_head_dim = 128
e4m3 values and one float32 scale per 128 of them, 132 bytes per token per layer (its inference
code's k_cache and k_scale_cache). With it, V3.2 in FP8 caches 656 + 132 = 788 bytes per token per
layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mla_verify.config import GQA_PRESETS, MLA_PRESETS, GQAConfig, MLAConfig
from mla_verify.decode.fp8 import packed_width

__all__ = [
    "FP8_SCALE_GROUP",
    "gqa_elements_per_token_layer",
    "mla_elements_per_token_layer",
    "mla_expanded_elements_per_token_layer",
    "bytes_per_token_layer",
    "bytes_per_token_model",
    "fp8_mla_bytes_per_token_layer",
    "fp8_per_tensor_bytes_per_token_layer",
    "allocate_fp8_latent_cache",
    "allocate_packed_fp8_cache",
    "IndexerConfig",
    "INDEXER_PRESETS",
    "indexer_bytes_per_token_layer",
    "allocate_indexer_key_cache",
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


def fp8_per_tensor_bytes_per_token_layer(config: MLAConfig) -> int:
    """(d_c + d_r)·1: the per-tensor e4m3 layout (its one float32 scale is per layer, not per token)."""
    return config.kv_lora_rank + config.qk_rope_head_dim


def allocate_packed_fp8_cache(config: MLAConfig, num_blocks: int, page_size: int) -> torch.Tensor:
    """The decode contract's fp8_ds_mla cache: float8_e4m3fn [num_blocks, page_size, 1, packed] with
    packed = mla_verify.decode.fp8.packed_width (the bytes every FP8 case is built in)."""
    width = packed_width(config.latent_width, config.kv_lora_rank)
    return torch.zeros(num_blocks, page_size, 1, width, dtype=torch.float8_e4m3fn)


@dataclass(frozen=True)
class IndexerConfig:
    """A sparse-attention indexer's key cache (DeepSeek-V3.2's lightning indexer): one key of
    head_dim e4m3 values per token per layer, with one float32 scale per scale_group of them."""

    name: str
    head_dim: int
    scale_group: int
    num_layers: int


INDEXER_PRESETS: dict[str, IndexerConfig] = {
    "DeepSeek-V3.2": IndexerConfig("DeepSeek-V3.2", head_dim=128, scale_group=128, num_layers=61),
}


def indexer_bytes_per_token_layer(indexer: IndexerConfig) -> int:
    """head_dim·1 (e4m3) + ⌈head_dim / scale_group⌉·4 (float32 scales): 132 for DeepSeek-V3.2."""
    return indexer.head_dim + 4 * math.ceil(indexer.head_dim / indexer.scale_group)


def allocate_indexer_key_cache(indexer: IndexerConfig, batch: int, max_len: int) -> dict[str, torch.Tensor]:
    """The indexer's per-layer buffers as DeepSeek-V3.2's inference code registers them: k_cache
    float8_e4m3fn [batch, max_len, head_dim] and k_scale_cache float32 [batch, max_len, groups]."""
    groups = math.ceil(indexer.head_dim / indexer.scale_group)
    return {"k_cache": torch.zeros(batch, max_len, indexer.head_dim, dtype=torch.float8_e4m3fn),
            "k_scale_cache": torch.zeros(batch, max_len, groups, dtype=torch.float32)}


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
                  "fp8_per_model": fp8_mla_bytes_per_token_layer(c) * c.num_layers,
                  "fp8_per_tensor_per_layer": fp8_per_tensor_bytes_per_token_layer(c),
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
    indexers = {}
    for name, indexer in INDEXER_PRESETS.items():
        latent = fp8_mla_bytes_per_token_layer(MLA_PRESETS["DeepSeek-V3"])  # V3.2 has V3's MLA shapes
        per_layer = indexer_bytes_per_token_layer(indexer)
        indexers[name] = {"indexer_per_layer": per_layer, "layers": indexer.num_layers,
                          "fp8_latent_per_layer": latent, "fp8_total_per_layer": latent + per_layer,
                          "fp8_total_per_model": (latent + per_layer) * indexer.num_layers}
    return {"dtype": str(dtype).removeprefix("torch."), "mla": mla, "gqa": gqa, "reductions": reductions,
            "sparse_fp8": indexers}


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
    lines += ["", "FP8 latent caches (bytes per token: per layer / whole model)", "",
              f"{'model':18} {'fp8_ds_mla':>22} {'fp8_e4m3 per-tensor':>22}"]
    for name, row in table["mla"].items():
        lines.append(f"{name:18} {row['fp8_per_layer']:>8,} B / {_kib(row['fp8_per_model']):>10} "
                     f"{row['fp8_per_tensor_per_layer']:>8,} B / "
                     f"{_kib(row['fp8_per_tensor_per_layer'] * row['layers']):>10}")
    for name, row in table.get("sparse_fp8", {}).items():
        lines += ["", f"{name} sparse attention in FP8: {row['fp8_latent_per_layer']} B latent (fp8_ds_mla) + "
                      f"{row['indexer_per_layer']} B indexer key cache (128 e4m3 + one float32 scale) = "
                      f"{row['fp8_total_per_layer']} B per token per layer, {_kib(row['fp8_total_per_model'])} per "
                      f"token over {row['layers']} layers"]
    v3_32, v3_72 = by_pair["DeepSeek-V3", "Qwen2.5-32B"], by_pair["DeepSeek-V3", "Qwen2.5-72B"]
    lines += ["", "Claim: \"DeepSeek-V3's KV cache is 71.88% smaller than Qwen2.5-32B/72B\"",
              f"  true per layer: {v3_32['per_layer']:.3%} against both (576 vs 2048 elements per token per layer);",
              f"  over the whole model: {v3_32['per_model']:.2%} against Qwen2.5-32B and "
              f"{v3_72['per_model']:.2%} against Qwen2.5-72B (layer counts differ: 61 vs 64 and 80)."]
    return "\n".join(lines)
