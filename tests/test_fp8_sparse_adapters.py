"""The FP8 and sparse translations of the adapters (FlashMLA's sparse FP8 decode, vLLM's and SGLang's
FP8 Triton paths), tested on the CPU as pure functions of the libraries' parameter names: no fake of
any library, and nothing here imports one."""

from __future__ import annotations

import math

import pytest
import torch

from mla_verify.adapters.flashmla import (SPARSE_CAPABILITIES, flashmla_sparse_decode, sparse_call_arguments,
                                          sparse_metadata_arguments)
from mla_verify.adapters.sglang import scale_arguments, sglang_triton_fp8_decode
from mla_verify.adapters.vllm import fp8_arguments, vllm_triton_fp8_decode
from mla_verify.decode.contract import Declined, capabilities_of, check_signature
from mla_verify.decode.fp8 import packed_width

# FlashMLA 1.0.0: get_mla_metadata(*args, **kwargs); the September 2025 release named its arguments
METADATA_1_0 = ("args", "kwargs")
METADATA_2025_09 = ("cache_seqlens", "num_q_tokens_per_head_k", "num_heads_k", "num_heads_q", "is_fp8_kvcache", "topk")
# flash_mla_with_kvcache in 1.0.0 (flash_mla/flash_mla_interface.py)
WITH_KVCACHE = ("q", "k_cache", "block_table", "cache_seqlens", "head_dim_v", "tile_scheduler_metadata", "num_splits",
                "softmax_scale", "causal", "is_fp8_kvcache", "indices", "attn_sink", "extra_k_cache",
                "extra_indices_in_kvcache", "topk_length", "extra_topk_length")


def test_flashmla_metadata_binds_either_release():
    lengths = torch.tensor([5, 9], dtype=torch.int32)
    assert sparse_metadata_arguments(METADATA_1_0, lengths, 2, 128, 1, 2048) == {}
    bound = sparse_metadata_arguments(METADATA_2025_09, lengths, 2, 128, 1, 2048)
    assert bound["num_q_tokens_per_head_k"] == 256 and bound["num_heads_q"] == 128 and bound["topk"] == 2048
    assert bound["is_fp8_kvcache"] is True and bound["cache_seqlens"] is lengths


def test_flashmla_sparse_call_passes_no_block_table_and_no_causal():
    q, cache = torch.zeros(1, 1, 64, 576), torch.zeros(2, 64, 1, 656, dtype=torch.float8_e4m3fn)
    indices, sink = torch.zeros(1, 1, 64, dtype=torch.int32), torch.zeros(64)
    kwargs = sparse_call_arguments(WITH_KVCACHE, q, cache, 512, "meta", None, 0.1, indices, sink)
    assert kwargs["block_table"] is None and kwargs["cache_seqlens"] is None and kwargs["causal"] is False
    assert kwargs["is_fp8_kvcache"] is True and kwargs["indices"] is indices and kwargs["attn_sink"] is sink
    assert "attn_sink" not in sparse_call_arguments(WITH_KVCACHE, q, cache, 512, "meta", None, 0.1, indices, None)
    older = tuple(name for name in WITH_KVCACHE if name != "attn_sink")
    with pytest.raises(Declined, match="no attn_sink"):
        sparse_call_arguments(older, q, cache, 512, "meta", None, 0.1, indices, sink)
    with pytest.raises(TypeError, match="indices"):
        sparse_call_arguments(WITH_KVCACHE[:8], q, cache, 512, "meta", None, 0.1, indices, None)


def test_flashmla_sparse_declares_what_its_kernel_checks():
    caps = capabilities_of(flashmla_sparse_decode)
    assert caps is SPARSE_CAPABILITIES
    assert caps.kv_formats == () and caps.sparse_kv_formats == ("fp8_ds_mla",) and caps.attn_sink
    assert caps.head_counts == (64, 128) and caps.head_dims == ((576, 512),) and caps.dtypes == (torch.bfloat16,)
    assert caps.empty_row_lse == math.inf and not caps.strided_cache
    assert packed_width(576, 512) == 512 + 64 * 2 + (512 // 128) * 4  # FlashMLA's bytes_per_token
    assert check_signature(flashmla_sparse_decode) is None


def test_vllm_fp8_passes_k_scale_or_declines():
    scale = torch.tensor([0.5])
    assert fp8_arguments(("q", "k_scale"), None) == {}
    assert torch.equal(fp8_arguments(("q", "k_scale"), scale)["k_scale"], scale)
    with pytest.raises(Declined, match="no k_scale"):
        fp8_arguments(("q", "sm_scale"), scale)
    assert capabilities_of(vllm_triton_fp8_decode).kv_formats == ("fp8_e4m3",)
    assert check_signature(vllm_triton_fp8_decode) is None


def test_sglang_fp8_folds_one_scale_for_k_and_v_and_passes_sinks():
    parameters = ("q", "k_scale", "v_scale", "sinks")
    assert scale_arguments(parameters, None, None) == {"k_scale": 1.0, "v_scale": 1.0}
    bound = scale_arguments(parameters, torch.tensor([0.25]), torch.tensor([1.0, -math.inf]))
    assert bound["k_scale"] == bound["v_scale"] == 0.25 and bound["sinks"].dtype == torch.float32
    with pytest.raises(Declined, match="no sinks"):
        scale_arguments(("q", "k_scale", "v_scale"), None, torch.zeros(2))
    with pytest.raises(Declined, match="no k_scale"):
        scale_arguments(("q",), torch.tensor([0.25]), None)
    caps = capabilities_of(sglang_triton_fp8_decode)
    assert caps.p_dtype == torch.float8_e4m3fn and caps.attn_sink and caps.kv_formats == ("fp8_e4m3",)
