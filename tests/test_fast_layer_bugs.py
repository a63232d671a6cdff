"""The fast layer path: judged stage by stage, it passes in every dtype, its stage checks catch
realistic bugs of the decode path in the stage that has them (in float32 and bfloat16), and the
Triton kernel runs inside it (through the interpreter, fp32, in a subprocess: TRITON_INTERPRET must
be set before triton is imported)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from mla_verify.config import MLAConfig
from mla_verify.impls.fast_layer import FastMLALayer
from mla_verify.reference import apply_rope, rope_cos_sin
from mla_verify.impls.torch_decode import torch_paged_decode
from mla_verify.layer import STAGES, LayerCase, LayerFailure, absorbed_matches_naive, check_layer

CONFIG = MLAConfig("small", hidden_size=16, num_heads=3, q_lora_rank=8, kv_lora_rank=12, qk_nope_head_dim=4,
                   qk_rope_head_dim=4, v_head_dim=5)
CASE = LayerCase(config=CONFIG, batch=2, prefill=17, decode=(1, 3, 2), seed=1, dtype="float32")


def _factory(kernel):
    def build(config, weights, dtype, device="cpu"):
        return FastMLALayer(config, weights, dtype, device, decode_kernel=kernel, page_size=16)
    return build


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16", "float16"])
def test_correct_path_passes_every_stage(dtype):
    report = check_layer(_factory(torch_paged_decode), CASE.replace(dtype=dtype))
    assert set(report.stages) == set(STAGES), report.stages
    assert report.ratio <= 1 and report.end_to_end <= report.ratio and report.sharp_ratio <= 1


def _non_causal(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=False):
    return torch_paged_decode(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, False)


def _scale_off(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=False):
    return torch_paged_decode(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale * 1.005, causal)


def _drops_last_token(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=False):
    return torch_paged_decode(q, kv_cache, block_table, cache_seqlens - 1, head_dim_v, softmax_scale, causal)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kernel", [_non_causal, _drops_last_token], ids=["multi-token decode not causal",
                                                                          "last token dropped"])
def test_decode_path_bugs_are_caught_in_the_attention_stage(kernel, dtype):
    with pytest.raises(LayerFailure, match="bound") as caught:
        check_layer(_factory(kernel), CASE.replace(dtype=dtype))
    assert caught.value.kind == "attention" and caught.value.stage == "attention" and caught.value.ratio > 1


def test_a_softmax_scale_off_by_half_a_percent_is_caught_in_float32():
    """In bf16 a relative score error of 0.5 % is the size of the legitimate rounding of the keys
    (u = 0.39 %), so no sound bound can tell it from a correct layer on one case."""
    with pytest.raises(LayerFailure, match="bound") as caught:
        check_layer(_factory(_scale_off), CASE)
    assert caught.value.kind == "attention"


class _KeyRopeOtherLayout(FastMLALayer):
    """RoPE applied to the key in the other layout (halves for interleaved), the query's right."""

    def _project(self, x, start):
        q_nope, q_pe, rows = super()._project(x, start)
        c = self.config
        cos, sin = rope_cos_sin(c, torch.arange(start, start + x.shape[1]))
        other = "halves" if c.rope_layout == "interleaved" else "interleaved"
        k_pe = apply_rope(self._intermediates["k_pe_raw"], cos, sin, other).to(self.dtype)
        self._intermediates["k_pe"] = k_pe
        return q_nope, q_pe, torch.cat((rows[..., :c.kv_lora_rank], k_pe), dim=-1)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_rope_layout_swapped_on_the_key_side_only_fails_the_rope_stage(dtype):
    def build(config, weights, dtype, device="cpu"):
        return _KeyRopeOtherLayout(config, weights, dtype, device, decode_kernel=torch_paged_decode, page_size=16)

    with pytest.raises(LayerFailure) as caught:
        check_layer(build, CASE.replace(dtype=dtype))
    assert caught.value.kind == "rope" and caught.value.stage == "rope" and caught.value.ratio > 1


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_decode_agrees_with_prefill_in_every_dtype_and_a_decode_only_bug_breaks_it(dtype):
    case = CASE.replace(dtype=dtype)
    report = absorbed_matches_naive(_factory(torch_paged_decode), case)
    assert report.stages["attention"] <= 1 and report.property == "absorbed_matches_naive"
    with pytest.raises(LayerFailure, match="absorbed vs naive") as caught:
        absorbed_matches_naive(_factory(_drops_last_token), case)
    assert caught.value.kind == "absorbed vs naive" and caught.value.stage == "attention"


TRITON_IN_LAYER = textwrap.dedent('''
    import torch
    from mla_verify.config import MLAConfig
    from mla_verify.impls.fast_layer import FastMLALayer
    from mla_verify.kernels.triton_decode import triton_paged_decode
    from mla_verify.layer import LayerCase, check_layer

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
