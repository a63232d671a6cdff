"""Bad input gets a clear error naming the argument and the expected shape/dtype (table-driven)."""

import pytest
import torch

from mla_verify.config import mla_preset
from mla_verify.decode.contract import Capabilities, declare
from mla_verify.impls.torch_decode import torch_paged_decode
from mla_verify.reference import mla_forward, paged_decode_reference, random_weights


def _good():
    return dict(q=torch.randn(2, 1, 3, 8), kv_cache=torch.randn(4, 4, 1, 8),
                block_table=torch.tensor([[0, 1], [2, 3]], dtype=torch.int32),
                cache_seqlens=torch.tensor([3, 8], dtype=torch.int32), head_dim_v=6, softmax_scale=0.3)


BAD = [
    ("q", torch.randn(2, 3, 8), "q must be \\[b, s_q, h_q, d\\]"),
    ("q", torch.ones(2, 1, 3, 8, dtype=torch.int32), "q must be a floating-point tensor"),
    ("kv_cache", torch.randn(4, 4, 8), "kv_cache must be \\[num_blocks, page_size, 1, 8\\]"),
    ("kv_cache", torch.randn(4, 4, 1, 9), "kv_cache must be \\[num_blocks, page_size, 1, 8\\]"),
    ("kv_cache", torch.randn(4, 4, 1, 8).half(), "kv_cache must be of q's dtype"),
    ("block_table", torch.tensor([[0, 1], [2, 3]]), "block_table must be int32 \\[2, max_blocks\\]"),
    ("block_table", torch.tensor([[0, 1]], dtype=torch.int32), "block_table must be int32 \\[2, max_blocks\\]"),
    ("cache_seqlens", torch.tensor([3, 8]), "cache_seqlens must be int32 \\[2\\]"),
    ("cache_seqlens", torch.tensor([3, 9], dtype=torch.int32), "cache_seqlens must be <= max_blocks·page_size"),
    ("cache_seqlens", torch.tensor([-1, 2], dtype=torch.int32), "cache_seqlens must be >= 0"),
    ("head_dim_v", 9, "head_dim_v must be an int in \\[1, 8\\]"),
    ("q", [[1.0]], "q must be a torch.Tensor"),
]


@pytest.mark.parametrize("fn", [paged_decode_reference, torch_paged_decode], ids=["reference", "torch"])
@pytest.mark.parametrize("argument, value, message", BAD, ids=[f"{a}-{i}" for i, (a, _, _) in enumerate(BAD)])
def test_bad_decode_input_names_the_argument(fn, argument, value, message):
    arguments = {**_good(), argument: value}
    with pytest.raises((ValueError, TypeError), match=message):
        fn(**arguments)


def test_good_input_is_accepted():
    out, lse = torch_paged_decode(**_good())
    assert out.shape == (2, 1, 3, 6) and lse.shape == (2, 3, 1) and lse.dtype == torch.float32


def test_layer_input_errors():
    config = mla_preset("DeepSeek-V2-Lite").replace(hidden_size=8, num_heads=2, kv_lora_rank=4, qk_nope_head_dim=2,
                                                    qk_rope_head_dim=2, v_head_dim=2)
    weights = random_weights(config, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="x must be \\[b, s, 8\\]"):
        mla_forward(config, weights, torch.randn(1, 3, 7, dtype=torch.float64))
    with pytest.raises(ValueError, match="mode must be 'naive' or 'absorbed'"):
        mla_forward(config, weights, torch.randn(1, 3, 8, dtype=torch.float64), mode="mqa")
    with pytest.raises(ValueError, match="start_pos must be 0 without a cache"):
        mla_forward(config, weights, torch.randn(1, 3, 8, dtype=torch.float64), start_pos=2)


def test_capabilities_are_validated():
    with pytest.raises(ValueError, match="lse_base must be 'e' or '2'"):
        Capabilities(lse_base="10")
    with pytest.raises(ValueError, match="empty_row_lse must be -inf or \\+inf"):
        Capabilities(empty_row_lse=0.0)
    with pytest.raises(TypeError, match="capabilities must be a mla_verify.decode.contract.Capabilities"):
        declare({"dtypes": (torch.float16,)})
