"""Adapters: third-party MLA code mapped onto this project's contracts.

Decode kernels (FlashMLA, FlashInfer, vLLM's and SGLang's Triton decode) are wrapped as functions of
the decode contract (`mla_verify.decode.contract`); HF transformers' DeepseekV3/V2 attention is wrapped as
a layer of the layer contract (`mla_verify.layer_contract`). Every adapter imports its library
lazily, on the first call, so this package and every adapter module import on a machine that has
none of the libraries; a missing library raises `MissingDependency` naming what to install.

`DECODE_ADAPTERS` and `LAYER_ADAPTERS` list them: name → `Adapter` (target "module:attr", the
library's import name, its pip package, the install hint, the API version the adapter was written
against). The translations the adapters share (query rows of a multi-token decode flattened into
single-token rows, split-KV lse merging, binding arguments by the library's parameter names) live
here as small pure functions, tested on CPU in tests/test_adapters.py.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Iterable, Mapping

import torch

__all__ = [
    "Adapter",
    "MissingDependency",
    "DECODE_ADAPTERS",
    "LAYER_ADAPTERS",
    "adapter_named",
    "missing_dependency",
    "load_module",
    "expand_query_rows",
    "split_is_nonempty",
    "merge_split_lse",
    "bind_by_name",
    "parameter_names",
]


class MissingDependency(ImportError):
    """An adapter's library is not installed; the message is one line naming what to install."""

    def __init__(self, library: str, install: str) -> None:
        super().__init__(f"{library} is not installed: {install}")
        self.library = library
        self.install = install


@dataclass(frozen=True)
class Adapter:
    """One adapter: where it lives and what it needs."""

    name: str
    target: str  # "module:attr", as an entry point names it
    library: str  # the import name probed for presence
    package: str  # the pip package
    install: str  # one-line install hint
    api: str  # the library API version the adapter follows

    def entry_point(self) -> str:
        """The line to put under [project.entry-points."mla_verify.implementations"]."""
        return f'{self.name} = "{self.target}"'


DECODE_ADAPTERS: dict[str, Adapter] = {a.name: a for a in (
    Adapter("flashmla", "mla_verify.adapters.flashmla:flashmla_decode", "flash_mla", "flash-mla",
            "pip install flash-mla (or build github.com/deepseek-ai/FlashMLA from source; SM90)",
            "FlashMLA 1.0.0 (get_mla_metadata() -> FlashMLASchedMeta); the older tensor metadata works too"),
    Adapter("flashinfer", "mla_verify.adapters.flashinfer:flashinfer_decode", "flashinfer", "flashinfer-python",
            "pip install flashinfer-python",
            "FlashInfer 0.6.x BatchMLAPagedAttentionWrapper.plan/run (return_lse_base_on_e if present)"),
    Adapter("vllm-triton", "mla_verify.adapters.vllm:vllm_triton_decode", "vllm", "vllm", "pip install vllm",
            "vllm.v1.attention.ops.triton_decode_attention.decode_attention_fwd (with lse); "
            "the older vllm.attention.ops module works too"),
    Adapter("sglang-triton", "mla_verify.adapters.sglang:sglang_triton_decode", "sglang", "sglang",
            "pip install sglang",
            "sglang.srt.layers.attention.triton_ops.decode_attention.decode_attention_fwd "
            "(attn_lse, max_kv_splits, k_scale/v_scale); older signatures are bound by name"),
    Adapter("flashmla-sparse", "mla_verify.adapters.flashmla:flashmla_sparse_decode", "flash_mla", "flash-mla",
            "pip install flash-mla (or build github.com/deepseek-ai/FlashMLA from source; SM90)",
            "FlashMLA 1.0.0 flash_mla_with_kvcache(..., is_fp8_kvcache=True, indices, attn_sink)"),
    Adapter("vllm-triton-fp8", "mla_verify.adapters.vllm:vllm_triton_fp8_decode", "vllm", "vllm", "pip install vllm",
            "decode_attention_fwd(..., k_scale) over a per-tensor FP8 e4m3 cache"),
    Adapter("sglang-triton-fp8", "mla_verify.adapters.sglang:sglang_triton_fp8_decode", "sglang", "sglang",
            "pip install sglang", "decode_attention_fwd(..., k_scale, v_scale, sinks) over a per-tensor FP8 cache"),
)}

LAYER_ADAPTERS: dict[str, Adapter] = {a.name: a for a in (
    Adapter(f"hf-deepseek-{variant}", f"mla_verify.adapters.hf:{attr}", "transformers", "transformers",
            "pip install transformers", "transformers 5.x DeepseekV3Attention / DeepseekV2Attention")
    for variant, attr in (("v3-eager", "deepseek_v3_eager"), ("v3-sdpa", "deepseek_v3_sdpa"),
                          ("v3-sdpa-f64", "deepseek_v3_sdpa_float64"), ("v2-eager", "deepseek_v2_eager"),
                          ("v2-sdpa", "deepseek_v2_sdpa"))
)}


def adapter_named(name: str) -> Adapter:
    table = {**DECODE_ADAPTERS, **LAYER_ADAPTERS}
    if name not in table:
        raise ValueError(f"name must be one of {sorted(table)}; got {name!r}")
    return table[name]


def missing_dependency(name: str) -> MissingDependency | None:
    """The MissingDependency the adapter `name` would raise, or None when its library is importable
    (probed with importlib.util.find_spec: the library itself is not imported)."""
    adapter = adapter_named(name)
    if importlib.util.find_spec(adapter.library) is None:
        return MissingDependency(adapter.library, adapter.install)
    return None


def load_module(module: str, library: str, install: str) -> ModuleType:
    """Import `module`; raise MissingDependency(library, install) if its top-level package is absent.

    Any other import failure (the library is there but lacks `module`, or is broken) propagates
    unchanged."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError:
        if importlib.util.find_spec(module.partition(".")[0]) is None:
            raise MissingDependency(library, install) from None
        raise


# ----------------------------------------------------------------------------------------------
# Shared translations
# ----------------------------------------------------------------------------------------------

def expand_query_rows(block_table: torch.Tensor, cache_seqlens: torch.Tensor, s_q: int,
                      causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten a decode of s_q query tokens per sequence into b·s_q single-token rows.

    Row r = i·s_q + j (sequence i, query j) reads sequence i's pages and sees its first
    L_i keys, or with causal the first max(L_i − s_q + j + 1, 0) (bottom-right alignment): exactly
    the contract's visibility. Returns (block_table_rows int32 [b·s_q, max_blocks],
    seqlens_rows int32 [b·s_q]). This is how vLLM feeds speculative-decode tokens to its
    single-token decode kernel."""
    if s_q < 1:
        raise ValueError(f"s_q must be >= 1; got {s_q}")
    lengths = cache_seqlens.to(torch.int64)
    if causal:
        offset = torch.arange(s_q, device=lengths.device) - s_q + 1  # [s_q]: −(s_q−1) … 0
        rows = (lengths[:, None] + offset[None, :]).clamp_min(0)
    else:
        rows = lengths[:, None].expand(-1, s_q)
    return (block_table.repeat_interleave(s_q, dim=0).to(torch.int32).contiguous(),
            rows.reshape(-1).to(torch.int32).contiguous())


def split_is_nonempty(seqlens: torch.Tensor, num_splits: torch.Tensor | int, max_splits: int,
                      min_block: int = 1) -> torch.Tensor:
    """[rows, max_splits] bool: which KV splits of a split-KV decode hold at least one key.

    The vLLM/SGLang stage-1 kernels cut a row of L keys into splits of
    per = ceil(ceil(L / splits) / min_block)·min_block keys (vLLM: min_block 1; SGLang: 32) and
    write a partial result only for a split with start < min(start + per, L)."""
    lengths = seqlens.to(torch.int64)
    splits = torch.as_tensor(num_splits, dtype=torch.int64, device=lengths.device).expand_as(lengths)
    if bool((splits < 1).any()):
        raise ValueError(f"num_splits must be >= 1; got {splits.tolist()}")
    per = -(-(-(-lengths // splits)) // min_block) * min_block  # ceil(ceil(L/S)/m)·m
    start = per[:, None] * torch.arange(max_splits, device=lengths.device)[None, :]
    return start < lengths[:, None]


def merge_split_lse(partial_lse: torch.Tensor, nonempty: torch.Tensor) -> torch.Tensor:
    """Natural-log lse of a row from its splits' lse: log Σ_s exp(lse_s) over the non-empty splits,
    in float32 (the type the kernels keep it in); −inf for a row with no non-empty split.

    partial_lse [rows, heads, splits] (the kernel leaves empty splits unwritten: they are never
    read), nonempty [rows, splits] → [rows, heads]."""
    if partial_lse.dim() != 3 or nonempty.shape != (partial_lse.shape[0], partial_lse.shape[2]):
        raise ValueError(f"partial_lse must be [rows, heads, splits] and nonempty [rows, splits]; got "
                         f"{tuple(partial_lse.shape)} and {tuple(nonempty.shape)}")
    masked = torch.where(nonempty[:, None, :], partial_lse.to(torch.float32),
                         torch.tensor(-math.inf, dtype=torch.float32, device=partial_lse.device))
    return torch.logsumexp(masked, dim=-1)


def parameter_names(fn: Callable) -> tuple[str, ...]:
    """The names a library function takes (through functools.wraps decorators)."""
    return tuple(inspect.signature(fn).parameters)


def bind_by_name(parameters: Iterable[str], values: Mapping[str, object],
                 required: Iterable[str] = ()) -> dict[str, object]:
    """Keyword arguments for a library function whose signature changed across versions: every
    value whose name the function takes. Raises TypeError naming the `required` names it lacks."""
    parameters = tuple(parameters)
    missing = [name for name in required if name not in parameters]
    if missing:
        raise TypeError(f"the installed library's function takes ({', '.join(parameters)}); expected it to "
                        f"take {missing}: an API version this adapter does not know")
    return {name: value for name, value in values.items() if name in parameters}
