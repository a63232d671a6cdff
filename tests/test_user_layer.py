"""A user's own layer certifies: examples/deepseek_style_layer.py, a plain torch.nn.Module written
the way DeepSeek-V3's inference/model.py holds its weights, through its adapter factories (naive
prefill with absorbed decode, naive throughout, absorbed throughout), in float32 and bfloat16,
through the layer properties on drawn cases and through the command line as README's "Certify
your own layer" shows.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings

from mla_verify.adapters.hf import hf_weights
from mla_verify.config import MLAConfig, YarnConfig, mla_preset
from mla_verify.layer import (INTERMEDIATES, LAYER_PROPERTIES, LayerCase, layer_capabilities_of, layer_cases)
from mla_verify.reference import random_weights

from layer_zoo.common import EXAMPLE, EXAMPLE_PATH

FACTORIES = {"factory": EXAMPLE.factory, "factory_naive": EXAMPLE.factory_naive,
             "factory_absorbed": EXAMPLE.factory_absorbed}
DTYPES = ("float32", "bfloat16")
CONFIG = MLAConfig("small", hidden_size=16, num_heads=3, q_lora_rank=6, kv_lora_rank=6, qk_nope_head_dim=4,
                   qk_rope_head_dim=6, v_head_dim=5,
                   yarn=YarnConfig(factor=40.0, original_max_position_embeddings=16, mscale=1.0, mscale_all_dim=0.707))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on two shared cores, intra-op threads make these small cases ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _certify(factory, case: LayerCase) -> None:
    """Every layer property (raises LayerFailure)."""
    for prop in LAYER_PROPERTIES.values():
        prop(factory, case, "cpu")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_example_layer_certifies_on_drawn_cases(name, dtype):
    @settings(max_examples=20, deadline=None, derandomize=True, database=None)
    @given(case=layer_cases(dtypes=(dtype,), max_heads=4, max_width=12, max_length=20))
    def certified(case: LayerCase) -> None:
        _certify(FACTORIES[name], case)

    certified()


@pytest.mark.parametrize("dtype", DTYPES)
def test_example_layer_certifies_at_a_preset_shape(dtype):
    """DeepSeek-V3's per-head widths (d_n 128, d_r 64, d_v 128, d_c 512, YaRN factor 40) on two heads."""
    config = mla_preset("DeepSeek-V3").replace(hidden_size=256, num_heads=2, q_lora_rank=96)
    _certify(EXAMPLE.factory, LayerCase(config, batch=1, prefill=9, decode=(1, 2), seed=7, dtype=dtype))


def test_factory_loads_the_documented_layout():
    """Every parameter of the module is the float64 weight of the documented layout rounded to the
    module's dtype; every intermediate of the contract is exposed, for the tokens of the last call."""
    for q_lora_rank in (6, None):
        config = CONFIG.replace(q_lora_rank=q_lora_rank)
        weights = random_weights(config, torch.Generator().manual_seed(0))
        layer = EXAMPLE.factory(config, weights, torch.bfloat16)
        for name, parameter in layer.module.named_parameters():
            source = getattr(weights, name.split(".")[0])
            assert parameter.dtype == torch.bfloat16
            assert torch.equal(parameter, source.to(torch.bfloat16)), name
        layer.prefill(torch.randn(2, 5, config.hidden_size, dtype=torch.bfloat16))
        layer.decode(torch.randn(2, 2, config.hidden_size, dtype=torch.bfloat16))
        seen = layer.intermediates()
        assert set(seen) == set(INTERMEDIATES), sorted(seen)
        assert all(tensor.shape[:2] == (2, 2) and tensor.dtype == torch.bfloat16 for tensor in seen.values())


def test_factories_declare_which_paths_they_run():
    assert layer_capabilities_of(EXAMPLE.factory).both_paths
    assert not layer_capabilities_of(EXAMPLE.factory_naive).both_paths
    assert not layer_capabilities_of(EXAMPLE.factory_absorbed).both_paths


def test_factory_names_a_missing_weight():
    weights = random_weights(CONFIG, torch.Generator().manual_seed(0))
    weights.wq_b = None
    with pytest.raises(ValueError, match="wq_b"):
        EXAMPLE.factory(CONFIG, weights, torch.float32)


def test_layer_rejects_a_wrong_input_with_one_clear_error():
    layer = EXAMPLE.factory(CONFIG, random_weights(CONFIG, torch.Generator().manual_seed(0)), torch.float32)
    with pytest.raises(ValueError, match=r"x must be \[b, s, 16\] torch.float32"):
        layer.prefill(torch.zeros(1, 3, 16, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="prefill"):
        layer.decode(torch.zeros(1, 1, 16))


def test_hf_names_of_the_same_weights():
    """The second adapter example (HF transformers' parameter names) maps the same tensors as the
    project's HF adapter does for the interleaved layout."""
    for q_lora_rank in (6, None):
        config = CONFIG.replace(q_lora_rank=q_lora_rank)
        weights = random_weights(config, torch.Generator().manual_seed(1))
        ours, theirs = EXAMPLE.hf_state_dict(weights), hf_weights(config, weights, permute_rope=False)
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[name], theirs[name]) for name in ours)


def test_cache_grows_past_its_first_allocation():
    """A sequence longer than the module's first cache (256 positions) is still the reference layer."""
    case = LayerCase(CONFIG.replace(hidden_size=8, num_heads=1), batch=1, prefill=250, decode=(3, 5), seed=2,
                     dtype="float32")
    _certify(EXAMPLE.factory, case)


@pytest.mark.parametrize("dtype", DTYPES)
def test_example_layer_certifies_through_the_command_line(dtype, tmp_path):
    """README's command, one dtype at a time: exit 0 and a passing certificate naming the precision class."""
    certificate = tmp_path / "cert.json"
    run = subprocess.run([sys.executable, "-m", "mla_verify.cli", "certify", f"{EXAMPLE_PATH}:factory",
                          "--dtype", dtype, "--max-examples", "10", "--json", str(certificate), "--counterexamples",
                          str(tmp_path / "counterexamples"), "--quiet"], capture_output=True, text=True, timeout=600,
                         cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(certificate.read_text())
    assert result["verdict"] == "pass", result["headline"]
    assert result["implementation"]["kind"] == "layer"
    assert result["implementation"]["precision_classes"] == {dtype: dtype}, result["implementation"]


def _readme_section() -> str:
    readme = (EXAMPLE_PATH.parents[1] / "README.md").read_text()
    start = readme.index("### Certify your own layer")
    return readme[start:readme.index("\n## ", start)]


def test_readme_section_documents_the_whole_contract():
    """README's "Certify your own layer" names every weight with its shape, every intermediate, and
    only certify options that exist."""
    from mla_verify.cli import _parser
    from mla_verify.reference import MLAWeights

    section = _readme_section()
    for field in dataclasses.fields(MLAWeights):
        assert f"| `{field.name}` |" in section, f"the weight table lacks {field.name}"
    for key in INTERMEDIATES:
        assert f'"{key}" [b, n' in section, f"the intermediates list lacks {key}"
    certify = _parser()._subparsers._group_actions[0].choices["certify"]
    options = {opt for action in certify._actions for opt in action.option_strings}
    for command in re.findall(r"^\s*mla-verify certify (.*)$", section, flags=re.M):
        for option in re.findall(r"(--[a-z-]+)", command):
            assert option in options, f"README's {command!r} uses {option}, which certify does not accept"
