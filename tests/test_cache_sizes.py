"""Cache figures against the facts sheet's hand-computed values, and the cache-table command."""

import json

import pytest
import torch

from mla_verify.cache_sizes import (INDEXER_PRESETS, bytes_per_token_layer, bytes_per_token_model, cache_table,
                                    fp8_mla_bytes_per_token_layer, fp8_per_tensor_bytes_per_token_layer,
                                    indexer_bytes_per_token_layer, mla_elements_per_token_layer,
                                    mla_expanded_elements_per_token_layer, reduction)
from mla_verify.cli import main
from mla_verify.config import gqa_preset, mla_preset

V3 = mla_preset("DeepSeek-V3")


def test_v3_per_token_per_layer_figures():
    assert mla_elements_per_token_layer(V3) == 576
    assert mla_expanded_elements_per_token_layer(V3) == 40_960
    assert round(40_960 / 576) == 71
    assert fp8_mla_bytes_per_token_layer(V3) == 656  # 512 e4m3 + 4 float32 scales + 64 bf16
    assert fp8_per_tensor_bytes_per_token_layer(V3) == 576  # 576 e4m3 (one float32 scale per layer)


def test_v32_sparse_fp8_figures():
    """DeepSeek-V3.2: the 656-byte latent row plus its indexer's 128 e4m3 + one float32 scale."""
    indexer = INDEXER_PRESETS["DeepSeek-V3.2"]
    assert indexer_bytes_per_token_layer(indexer) == 132
    row = cache_table()["sparse_fp8"]["DeepSeek-V3.2"]
    assert row["fp8_total_per_layer"] == 656 + 132 == 788
    assert row["fp8_total_per_model"] == 788 * 61
    assert cache_table()["mla"]["DeepSeek-V3"]["fp8_per_model"] == 656 * 61


def test_whole_model_bytes_per_token():
    assert bytes_per_token_model(V3) / 1024 == pytest.approx(68.6, abs=0.05)
    assert bytes_per_token_model(mla_preset("Kimi-K2")) / 1024 == pytest.approx(68.6, abs=0.05)
    assert bytes_per_token_model(gqa_preset("Qwen2.5-32B")) == 256 * 1024
    assert bytes_per_token_model(gqa_preset("Qwen2.5-72B")) == 320 * 1024


def test_the_seed_claim_holds_per_layer_and_not_over_the_model():
    q32, q72 = gqa_preset("Qwen2.5-32B"), gqa_preset("Qwen2.5-72B")
    assert reduction(bytes_per_token_layer(V3), bytes_per_token_layer(q32)) == 0.71875
    assert reduction(bytes_per_token_model(V3), bytes_per_token_model(q32)) == pytest.approx(0.7319, abs=5e-5)
    assert reduction(bytes_per_token_model(V3), bytes_per_token_model(q72)) == pytest.approx(0.7855, abs=5e-5)


def test_v2_paper_claim_needs_its_cache_quantisation():
    v2, dense = mla_preset("DeepSeek-V2"), gqa_preset("DeepSeek-LLM-67B")
    bf16 = reduction(bytes_per_token_model(v2), bytes_per_token_model(dense))
    assert bf16 == pytest.approx(0.822, abs=5e-4)  # not the paper's 93.3 %


def test_element_type_scales_bytes():
    assert bytes_per_token_layer(V3, torch.float32) == 2 * bytes_per_token_layer(V3, torch.bfloat16) == 2304
    assert bytes_per_token_layer(V3, torch.float8_e4m3fn) == 576
    with pytest.raises(TypeError, match="dtype must be a torch.dtype"):
        bytes_per_token_layer(V3, "bf16")


def test_cache_table_command_states_the_claim(capsys):
    assert main(["cache-table"]) == 0
    text = capsys.readouterr().out
    for figure in ("71.875%", "73.19%", "78.55%", "68.6 KiB", "256.0 KiB", "320.0 KiB", "656 B", "132 B",
                   "788 B"):
        assert figure in text


def test_cache_table_json_carries_the_same_data(capsys):
    assert main(["cache-table", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data == json.loads(json.dumps(cache_table()))
    assert data["mla"]["DeepSeek-V3"]["per_layer"] == 1152
    pair = next(r for r in data["reductions"] if r["mla"] == "DeepSeek-V3" and r["gqa"] == "Qwen2.5-72B")
    assert pair["per_model"] == pytest.approx(0.7855, abs=5e-5)
