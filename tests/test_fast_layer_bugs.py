"""The fast layer path: its bound catches realistic bugs of the decode path, and the Triton kernel
runs inside it (through the interpreter, fp32, in a subprocess: TRITON_INTERPRET must be set before
triton is imported)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from mla_verify.config import MLAConfig
from mla_verify.impls.fast_layer import FastMLALayer
from mla_verify.impls.torch_decode import torch_paged_decode
from mla_verify.layer_contract import LayerCase, LayerFailure, check_layer

CONFIG = MLAConfig("small", hidden_size=16, num_heads=3, q_lora_rank=8, kv_lora_rank=12, qk_nope_head_dim=4,
                   qk_rope_head_dim=4, v_head_dim=5)
CASE = LayerCase(config=CONFIG, batch=2, prefill=17, decode=(1, 3, 2), seed=1, dtype="float32")


def _factory(kernel):
    def build(config, weights, dtype, device="cpu"):
        return FastMLALayer(config, weights, dtype, device, decode_kernel=kernel, page_size=16)
    return build


def test_correct_path_passes_with_margin():
    report = check_layer(_factory(torch_paged_decode), CASE)
    assert report.ratio < 0.1, report


def _non_causal(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=False):
    return torch_paged_decode(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, False)


def _scale_off(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=False):
    return torch_paged_decode(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale * 1.005, causal)


def _drops_last_token(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=False):
    return torch_paged_decode(q, kv_cache, block_table, cache_seqlens - 1, head_dim_v, softmax_scale, causal)


@pytest.mark.parametrize("kernel", [_non_causal, _scale_off, _drops_last_token],
                         ids=["multi-token decode not causal", "scale off by 0.5%", "last token dropped"])
def test_decode_path_bugs_are_caught(kernel):
    with pytest.raises(LayerFailure, match="bound"):
        check_layer(_factory(kernel), CASE)


TRITON_IN_LAYER = textwrap.dedent('''
    import torch
    from mla_verify.config import MLAConfig
    from mla_verify.impls.fast_layer import FastMLALayer
    from mla_verify.kernels.triton_decode import triton_paged_decode
    from mla_verify.layer_contract import LayerCase, check_layer

    config = MLAConfig("small", hidden_size=16, num_heads=3, q_lora_rank=None, kv_lora_rank=12,
                       qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=5)
    case = LayerCase(config=config, batch=2, prefill=17, decode=(1, 2), seed=3, dtype="float32")
    build = lambda c, w, dtype, device="cpu": FastMLALayer(c, w, dtype, device, decode_kernel=triton_paged_decode,
                                                           page_size=16)
    print("ratio", check_layer(build, case).ratio)
''')


def test_triton_kernel_inside_the_layer_through_the_interpreter():
    run = subprocess.run([sys.executable, "-c", TRITON_IN_LAYER], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    assert run.returncode == 0, run.stdout + run.stderr
    assert float(run.stdout.split("ratio")[-1]) <= 1
