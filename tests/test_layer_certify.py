"""Whole layers through the command line and pytest, as a user meets them: a registered layer
certified with its precision class named; a user's layer factory with a 0.5 % softmax-scale bug
failing with a replayable counterexample (replay, repro.py, check), then passing once fixed; bad
names, signatures and options as one line with exit 2; and `pytest properties --mla-layer`."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mla_verify.cli import main

REPO = Path(__file__).resolve().parents[1]
FAST = ("--profile", "quick", "--max-examples", "4", "--seed", "2", "--dtype", "float64", "--quiet")

USER_LAYER = textwrap.dedent('''
    """A user's layer: the project's fast layer with its own softmax scale."""
    import dataclasses

    import torch

    from mla_verify.config import MLAConfig
    from mla_verify.impls.fast_layer import FastMLALayer
    from mla_verify.layer import LayerCapabilities
    from mla_verify.impls.torch_decode import torch_paged_decode

    SCALE_ERROR = FACTOR


    class OwnScale(MLAConfig):
        @property
        def softmax_scale(self):
            return super().softmax_scale * SCALE_ERROR


    def layer(config, weights, dtype, device):
        own = OwnScale(**{f.name: getattr(config, f.name) for f in dataclasses.fields(config)})
        return FastMLALayer(own, weights, dtype, device, decode_kernel=torch_paged_decode)


    layer.capabilities = LayerCapabilities(dtypes=(torch.float64,))


    class Loud(FastMLALayer):
        """Every output 1 % too large: fails on the first case, so it shrinks at once."""

        def prefill(self, x):
            return super().prefill(x) * 1.01

        def decode(self, x):
            return super().decode(x) * 1.01


    def loud(config, weights, dtype, device):
        return Loud(config, weights, dtype, device, decode_kernel=torch_paged_decode)


    loud.capabilities = layer.capabilities


    def fussy(config, weights, dtype, device):
        return layer(config, weights, dtype, device)


    fussy.supports = lambda config: f"{config.num_heads} heads are not supported"


    def not_a_factory(config, weights):
        return None


    def helper(x):
        return x


    from mla_verify import Capabilities, declare


    @declare(Capabilities(dtypes=(torch.float32,)))
    def float32_kernel(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=False):
        return torch_paged_decode(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal)
''')


def _user_layer(folder: Path, name: str, factor: str) -> Path:
    path = folder / f"{name}.py"
    path.write_text(USER_LAYER.replace("FACTOR", factor))
    return path


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_certify_of_a_registered_layer_names_its_kind_and_precision_class(tmp_path, capsys):
    pytest.importorskip("transformers", minversion="5")
    code = main(["certify", "hf-deepseek-v3-eager", *FAST, "--json", str(tmp_path / "cert.json"),
                 "--markdown", str(tmp_path / "cert.md"), "--counterexamples", str(tmp_path / "cx")])
    out = capsys.readouterr().out
    certificate = json.loads((tmp_path / "cert.json").read_text())
    implementation = certificate["implementation"]
    assert code == 0, out
    assert implementation["kind"] == "layer" and implementation["dtypes"] == ["float64"]
    # HF's eager attention rounds RMSNorm, the RoPE angles and the softmax to float32 in a float64 module
    label = implementation["precision_class"]
    assert all(word in label for word in ("float64", "float32", "RMSNorm", "RoPE", "softmax")), label
    assert implementation["precision_classes"] == {"float64": label} and "float64" in implementation["precision"]
    assert label in certificate["headline"] and label in out and label in (tmp_path / "cert.md").read_text()
    report = certificate["properties"][0]
    assert report["examples"] >= 4 and 0 < report["max_ratio"] <= 1
    coverage = report["coverage"]
    assert coverage["dtypes"] == ["float64"] and coverage["counts"]["float64"] == report["examples"]
    assert {"configs", "rope_layouts", "q_lora", "yarn", "heads", "widths", "page_crossings"} <= coverage.keys()
    assert {"outcome", "sound", "dtype", "heads", "max_length", "prefill", "decode"} <= report["cases"][0].keys()
    assert any("not requested with --dtype" in line for line in certificate["not_covered"])


def test_a_user_layer_with_a_scale_bug_fails_with_a_replayable_counterexample(tmp_path, capsys):
    buggy = _user_layer(tmp_path, "scaled_layer", "1.005")
    cert = tmp_path / "cert.json"
    code = main(["certify", f"{buggy}:layer", *FAST, "--json", str(cert), "--counterexamples", str(tmp_path / "cx")])
    out = capsys.readouterr().out
    assert code == 1 and "FAIL" in out, out
    certificate = json.loads(cert.read_text())
    assert certificate["implementation"]["kind"] == "layer" and certificate["verdict"] == "fail"
    failure = certificate["properties"][0]["failures"][0]
    assert failure["ratio"] > 1 and failure["counterexample"], failure
    artifact = Path(failure["counterexample"])
    assert {"case.json", "inputs.pt", "repro.py"} <= {p.name for p in artifact.iterdir()}
    recorded = json.loads((artifact / "case.json").read_text())
    assert recorded["implementation_kind"] == "layer" and recorded["signature"] == failure["signature"]

    assert main(["replay", str(artifact)]) == 1
    assert "still fails" in capsys.readouterr().out
    assert main(["check", "--case", str(artifact / "case.json")]) == 1
    assert failure["signature"] in capsys.readouterr().out
    repro = subprocess.run([sys.executable, str(artifact / "repro.py")], cwd=tmp_path, capture_output=True,
                           text=True, timeout=600)
    assert repro.returncode == 1 and "still fails" in repro.stdout, repro.stdout + repro.stderr

    fixed = _user_layer(tmp_path, "fixed_layer", "1.0")
    assert main(["replay", str(artifact), "--impl", f"{fixed}:layer"]) == 0
    assert "passes now" in capsys.readouterr().out


@pytest.mark.parametrize("args, words", [
    (["certify", "{folder}/scaled_layer.py:not_a_factory"], "expected a layer factory(config, weights, dtype, device"),
    (["certify", "{folder}/scaled_layer.py:helper"], "or a layer factory(config, weights, dtype, device)"),
    (["certify", "{folder}/scaled_layer.py:helper", "--layer"], "expected a layer factory(config, weights"),
    (["certify", "{folder}/scaled_layer.py:OwnScale.nothing"], "has no attribute"),
    (["certify", "hf-deepseek-v3-eagr"], "did you mean 'hf-deepseek-v3-eager'"),
    (["certify", "torch", "--layer"], "is a decode kernel"),
    (["certify", "fast-layer-torch", "--property", "page_order_invariant"], "not a property of layer"),
    (["certify", "{folder}/scaled_layer.py:float32_kernel", "--dtype", "float64"], "declares dtypes ['float32']"),
    (["certify", "fast-layer-torch", "--device", "cuda:0"], "--device cuda:0"),
    (["check", "fast-layer-torch", "--case", "{folder}/decode_case.json"], "expected a layer case.json"),
    (["certify", "{folder}/scaled_layer.py:fussy", "--max-examples", "2", "--quiet"], "supports none of the"),
])
def test_a_bad_layer_name_signature_or_option_is_one_line_and_exit_2(tmp_path, capsys, args, words):
    _user_layer(tmp_path, "scaled_layer", "1.0")
    (tmp_path / "decode_case.json").write_text(json.dumps({"dtype": "float32", "batch": 1}))
    argv = [arg.replace("{folder}", str(tmp_path)) for arg in args]
    assert main(argv) == 2
    assert words in _one_line_error(capsys)


def test_mla_layer_runs_the_layer_properties_under_pytest(tmp_path):
    buggy = _user_layer(tmp_path, "scaled_layer", "1.005")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(REPO / "properties"),
                          "--mla-layer", f"{buggy}:loud", "--mla-profile", "quick", "--rootdir", str(REPO),
                          "--mla-counterexamples", str(tmp_path / "cx"), "--hypothesis-seed", "0",
                          "-k", "matches_reference"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "MLA_VERIFY_LAYER": ""})
    assert run.returncode == 1, run.stdout + run.stderr
    assert "FAILED" in run.stdout and "test_named_layer.py::test_matches_reference" in run.stdout
    assert "deselected" in run.stdout and "test_decode_kernel" not in run.stdout
    assert "mla_verify counterexamples" in run.stdout and "replay:   mla-verify replay" in run.stdout
    assert any((tmp_path / "cx").iterdir())
