"""The template every layer mutant departs from: the example DeepSeek-style module
(examples/deepseek_style_layer.py) with its forward written out in named steps, so that a mutant
overrides one step and the bug is the line marked BUG in it.

`TemplateMLA` computes exactly what the example's `MLA.forward` computes (it is certified as a
control beside the example itself); `contract_factory(cls)` builds the layer-contract factory of
a module class the way the example's `factory` does (naive prefill, absorbed decode), or with
one path throughout.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from typing import Callable

import torch

__all__ = ["EXAMPLE", "EXAMPLE_PATH", "TemplateMLA", "contract_factory", "rotate"]

EXAMPLE_PATH = Path(__file__).resolve().parents[2] / "examples" / "deepseek_style_layer.py"


def _load_example():
    """The example module, under the name mla_verify gives a file it loads (so both share it)."""
    loaded = sys.modules.get(EXAMPLE_PATH.stem)
    if loaded is not None and getattr(loaded, "__file__", None) == str(EXAMPLE_PATH):
        return loaded
    spec = importlib.util.spec_from_file_location(EXAMPLE_PATH.stem, EXAMPLE_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[EXAMPLE_PATH.stem] = module
    spec.loader.exec_module(module)
    return module


EXAMPLE = _load_example()
rotate = EXAMPLE.rotate


class TemplateMLA(EXAMPLE.MLA):
    """MLA.forward in steps: query → keys (normalised latent, rotated rope key) → store in the
    cache → attend (naive or absorbed) → output projection."""

    def rotations_at(self, start_pos: int, end: int) -> torch.Tensor:
        """[s, d_r/2] complex rotations of positions start_pos … end−1."""
        return self.rotations[start_pos:end]

    def rope_q(self, q_pe: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
        return self.q_rope(q_pe, rotations[:, None])

    def rope_k(self, k_pe: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
        return self.k_rope(k_pe, rotations)

    def query(self, x: torch.Tensor, rotations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q_nope [b, s, h, d_n], rotated q_pe [b, s, h, d_r]."""
        b, s, _ = x.shape
        q = self.wq(x) if self.args.q_lora_rank == 0 else self.wq_b(self.q_norm(self.wq_a(x)))
        q_nope, q_pe = q.view(b, s, self.n_heads, -1).split([self.qk_nope_head_dim, self.qk_rope_head_dim], -1)
        return q_nope, self.rope_q(q_pe, rotations)

    def normalise(self, latent: torch.Tensor, start_pos: int) -> torch.Tensor:
        return self.kv_norm(latent)

    def keys(self, x: torch.Tensor, rotations: torch.Tensor, start_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The normalised latent [b, s, d_c] and the rotated rope key [b, s, d_r] of the new tokens."""
        latent, k_pe = self.wkv_a(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        return self.normalise(latent, start_pos), self.rope_k(k_pe, rotations)

    def store(self, latent: torch.Tensor, k_pe: torch.Tensor, start_pos: int) -> None:
        b, s, _ = latent.shape
        self.kv_cache[:b, start_pos:start_pos + s] = latent
        self.pe_cache[:b, start_pos:start_pos + s] = k_pe

    def cached(self, b: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached latents [b, end, d_c] and rope keys [b, end, d_r]."""
        return self.kv_cache[:b, :end], self.pe_cache[:b, :end]

    def split_wkv_b(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [h, d_n, d_c] and W_UV [h, d_v, d_c]: each head's rows of wkv_b are [W_UK; W_UV]."""
        wkv_b = self.wkv_b.weight.view(self.n_heads, -1, self.kv_lora_rank)
        return wkv_b[:, :self.qk_nope_head_dim], wkv_b[:, -self.v_head_dim:]

    def scale(self) -> float:
        return self.softmax_scale

    def attend(self, q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, pe: torch.Tensor,
               start_pos: int, path: str) -> torch.Tensor:
        """Per-head attention output o [b, s, h, d_v] of queries at start_pos … over keys 0 … end−1."""
        b, s, h, _ = q_nope.shape
        end = kv.shape[1]
        hidden = torch.arange(end)[None, :] > torch.arange(end - s, end)[:, None]
        wide = torch.promote_types(q_nope.dtype, torch.float32)
        w_uk, w_uv = self.split_wkv_b()
        if path == "naive":
            k_nope = torch.einsum("btc,hdc->bthd", kv, w_uk)
            v = torch.einsum("btc,hdc->bthd", kv, w_uv)
            k = torch.cat((k_nope, pe[:, :, None, :].expand(b, end, h, self.qk_rope_head_dim)), dim=-1)
            scores = torch.einsum("bshd,bthd->bsht", torch.cat((q_nope, q_pe), dim=-1), k) * self.scale()
            probs = scores.masked_fill(hidden[:, None, :], -math.inf).softmax(-1, dtype=wide)
            return torch.einsum("bsht,bthd->bshd", probs.type_as(q_nope), v)
        q_latent = torch.einsum("bshd,hdc->bshc", q_nope, w_uk)
        scores = (torch.einsum("bshc,btc->bsht", q_latent, kv) + torch.einsum("bshr,btr->bsht", q_pe, pe)) * self.scale()
        probs = scores.masked_fill(hidden[:, None, :], -math.inf).softmax(-1, dtype=wide)
        o_latent = torch.einsum("bsht,btc->bshc", probs.type_as(q_nope), kv)
        return torch.einsum("bshc,hdc->bshd", o_latent, w_uv)

    def output(self, o: torch.Tensor) -> torch.Tensor:
        """[b, s, h, d_v] → wo(heads concatenated) [b, s, dim]."""
        return self.wo(o.flatten(2))

    def forward(self, x: torch.Tensor, start_pos: int) -> torch.Tensor:
        b, s, _ = x.shape
        end = start_pos + s
        rotations = self.rotations_at(start_pos, end)
        q_nope, q_pe = self.query(x, rotations)
        latent, k_pe = self.keys(x, rotations, start_pos)
        self.store(latent, k_pe, start_pos)
        kv, pe = self.cached(b, end)
        path = self.prefill_path if start_pos == 0 else self.decode_path
        return self.output(self.attend(q_nope, q_pe, kv, pe, start_pos, path))


def contract_factory(module_class: type, prefill: str = "naive", decode: str = "absorb") -> Callable:
    """A layer-contract factory building `module_class` like the example's `factory`."""

    def build(config, weights, dtype, device="cpu"):
        return EXAMPLE.build(config, weights, dtype, device, prefill=prefill, decode=decode, module_class=module_class)

    suffix = "" if (prefill, decode) == ("naive", "absorb") else f"_{prefill}_{decode}"
    build.__name__ = build.__qualname__ = f"{module_class.__name__}{suffix}"
    build.__doc__ = module_class.__doc__
    return build
