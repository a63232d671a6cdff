"""The certify / check / replay / list commands as a user meets them: a kernel written from a blank
file, certified, its counterexample replayed, fixed, and certified again; a kernel with two bugs
reported twice in one run; a kernel that declines cases; and the usage errors."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mla_verify.cli import main

BROKEN = textwrap.dedent('''
    import torch

    def decode(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=False):
        """Attention over the paged cache; the scale is squared by mistake (bug under test)."""
        b, s_q, h, d = q.shape
        page = kv_cache.shape[1]
        out = torch.zeros(b, s_q, h, head_dim_v, dtype=q.dtype)
        lse = torch.full((b, h, s_q), float("-inf"))
        for i in range(b):
            n = int(cache_seqlens[i])
            if n == 0:
                continue
            blocks = block_table[i, : (n + page - 1) // page].long()
            keys = kv_cache[blocks, :, 0].reshape(-1, d)[:n].float()
            for j in range(s_q):
                visible = n - s_q + j + 1 if causal else n
                if visible <= 0:
                    continue
                scores = q[i, j].float() @ keys[:visible].T * SCALE(softmax_scale)
                lse[i, :, j] = torch.logsumexp(scores, -1)
                out[i, j] = (torch.softmax(scores, -1) @ keys[:visible, :head_dim_v]).to(q.dtype)
        return out, lse
''')


def _cli(*args: str, cwd: Path, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(cwd), **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "mla_verify.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def _write_kernel(folder: Path, scale_expression: str) -> None:
    (folder / "my_kernel.py").write_text(BROKEN.replace("SCALE(softmax_scale)", scale_expression))


def test_broken_kernel_counterexample_replay_fix_certify(tmp_path):
    # matches_reference only: the property the bug fails; the journey does not need the other three,
    # each of which costs as much again with this Python-loop kernel
    _write_kernel(tmp_path, "softmax_scale * softmax_scale")
    run = _cli("certify", "my_kernel:decode", "--profile", "quick", "--property", "matches_reference", "--json",
               "cert.json", "--markdown", "cert.md", cwd=tmp_path)
    assert run.returncode == 1, run.stdout + run.stderr
    certificate = json.loads((tmp_path / "cert.json").read_text())
    assert certificate["schema"] == "mla-verify-certificate/3" and certificate["verdict"] == "fail"
    failed = [p for p in certificate["properties"] if p["verdict"] == "fail"]
    assert failed and failed[0]["name"] == "matches_reference"
    assert failed[0]["failures"][0]["kind"] in ("wrong lse", "wrong values")
    minimal = failed[0]["failures"][0]["case"]
    assert minimal["batch"] == 1 and minimal["heads"] == 1 and max(minimal["lengths"]) <= 1, minimal
    artifact = Path(failed[0]["failures"][0]["counterexample"])
    artifact = artifact if artifact.is_absolute() else tmp_path / artifact
    assert {"case.json", "inputs.pt", "repro.py"} <= {p.name for p in artifact.iterdir()}
    assert "FAIL" in (tmp_path / "cert.md").read_text().upper()

    standalone = subprocess.run([sys.executable, str(artifact / "repro.py")], cwd=tmp_path, capture_output=True,
                                text=True, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert standalone.returncode == 1 and "still fails" in standalone.stdout, standalone.stdout + standalone.stderr
    assert _cli("replay", str(artifact), cwd=tmp_path).returncode == 1

    _write_kernel(tmp_path, "softmax_scale")
    replayed = _cli("replay", str(artifact), cwd=tmp_path)
    assert replayed.returncode == 0, replayed.stdout
    standalone = subprocess.run([sys.executable, str(artifact / "repro.py")], cwd=tmp_path, capture_output=True,
                                text=True, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert standalone.returncode == 0, standalone.stdout + standalone.stderr
    certified = _cli("certify", "my_kernel:decode", "--profile", "quick", "--property", "matches_reference", "--json",
                     "cert.json", cwd=tmp_path)
    assert certified.returncode == 0, certified.stdout + certified.stderr
    certificate = json.loads((tmp_path / "cert.json").read_text())
    assert certificate["verdict"] == "pass"
    matches = certificate["properties"][0]
    assert matches["examples"] >= 25 and 0 < matches["max_ratio"] <= 1 and matches["worst_case"]
    assert "float32" in matches["coverage"]["dtypes"]


@pytest.mark.parametrize("spec, words", [
    ("no_such_name", "neither a registered implementation"),
    ("no_such_module_xyz:fn", "cannot import module"),
    ("mla_verify.config:missing_attr", "has no attribute"),
    ("mla_verify.config:MLA_PRESETS", "expected a callable decode kernel"),
    ("mla_verify.config:mla_preset", "expected fn(q, kv_cache, block_table"),
])
def test_unusable_implementation_is_one_line_and_exit_2(spec, words, capsys):
    assert main(["certify", spec]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1, err


def test_environment_variable_names_the_implementation(tmp_path):
    run = _cli("certify", "--max-examples", "2", "--profile", "quick", cwd=tmp_path,
               env_extra={"MLA_VERIFY_IMPL": "mla_verify.config:mla_preset"})
    assert run.returncode == 2 and "mla_verify.config:mla_preset" in run.stderr


def test_a_device_the_kernel_does_not_declare_is_a_usage_error(capsys):
    assert main(["certify", "triton", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "declares devices ['cuda']; pass --device cuda" in err and len(err.splitlines()) == 1


def test_list_shows_decode_kernels_and_layers_with_their_kind(capsys):
    assert main(["list"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    kinds = {row[0]: " ".join(row[1:3]) if row[1] == "decode" else row[1] for row in rows}
    assert kinds["torch"] == "decode kernel" and kinds["triton"] == "decode kernel"
    assert kinds["hf-deepseek-v3-eager"] == "layer" and kinds["fast-layer"] == "layer"
    assert any(row[0] == "torch" and "mla_verify.impls.torch_decode:torch_paged_decode" in row for row in rows)


def test_replay_of_a_folder_that_is_not_an_artifact_exits_2(tmp_path, capsys):
    assert main(["replay", str(tmp_path)]) == 2
    assert "not a counterexample folder" in capsys.readouterr().err


CRASHING = textwrap.dedent('''
    import ctypes

    def decode(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=False):
        ctypes.string_at(0)  # a null read: segfault
''')


def test_isolated_mode_reports_a_segfault_as_a_counterexample(tmp_path):
    (tmp_path / "crashing.py").write_text(CRASHING)
    run = _cli("certify", "crashing:decode", "--isolate", "--max-examples", "3", "--property", "matches_reference",
               "--json", "cert.json", cwd=tmp_path)
    assert run.returncode == 1, run.stdout + run.stderr
    certificate = json.loads((tmp_path / "cert.json").read_text())
    assert certificate["properties"][0]["failures"][0]["kind"] == "process crashed"


TWO_BUGS = textwrap.dedent('''
    import sys
    sys.path.insert(0, TESTS)
    from zoo.subtle import two_bugs_empty_nan_and_one_head_bf16_scores as decode
''')

DECLINING = textwrap.dedent('''
    from mla_verify import Declined
    from mla_verify.impls.torch_decode import torch_paged_decode

    def decode(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=False):
        if q.shape[2] > 8:
            raise Declined(f"planner: {q.shape[2]} heads are unsupported")
        return torch_paged_decode(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal)
''')


def test_two_independent_bugs_are_both_reported_with_their_own_replayable_case(tmp_path):
    (tmp_path / "two_bugs.py").write_text(TWO_BUGS.replace("TESTS", repr(str(Path(__file__).parent))))
    run = _cli("certify", "two_bugs:decode", "--profile", "quick", "--seed", "1", "--property", "matches_reference",
               "--json", "cert.json", "--markdown", "cert.md", cwd=tmp_path)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "FAIL: 2 distinct failures" in run.stdout
    certificate = json.loads((tmp_path / "cert.json").read_text())
    failures = certificate["properties"][0]["failures"]
    assert certificate["distinct_failures"] == 2
    assert {f["kind"] for f in failures} == {"NaN/inf where a finite value is due", "wrong lse"}, failures
    for failure in failures:
        artifact = tmp_path / failure["counterexample"]
        assert _cli("replay", str(artifact), cwd=tmp_path).returncode == 1
        checked = _cli("check", "two_bugs:decode", "--case", str(artifact / "case.json"), cwd=tmp_path)
        assert checked.returncode == 1 and failure["signature"] in checked.stdout, checked.stdout
    markdown = (tmp_path / "cert.md").read_text()
    assert "failure 1 of 2" in markdown and "failure 2 of 2" in markdown


def test_declined_cases_are_counted_and_fail_only_under_strict(tmp_path):
    (tmp_path / "declining.py").write_text(DECLINING)
    args = ("certify", "declining:decode", "--profile", "quick", "--seed", "3", "--property", "matches_reference",
            "--json", "cert.json")
    run = _cli(*args, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    certificate = json.loads((tmp_path / "cert.json").read_text())
    report = certificate["properties"][0]
    assert certificate["verdict"] == "pass with declined cases" and report["declined"] > 0
    assert report["passed"] > 0 and any("heads are unsupported" in reason for reason in report["declined_reasons"])
    assert "PASS with declined cases" in run.stdout
    strict = _cli(*args, "--strict", cwd=tmp_path)
    assert strict.returncode == 1 and "declined a case its capabilities claim" in strict.stdout


def test_check_of_an_unreadable_case_file_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "case.json").write_text("{not json")
    assert main(["check", "torch", "--case", str(tmp_path / "case.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert "expected a case.json" in err and len(err.splitlines()) == 1


def test_a_failure_met_in_long_rows_is_reported_in_the_shortest_rows_that_show_it():
    """The runner's last reduction (`_in_short_rows`): every row cut to 3, 17 or 130 keys, the first at
    which the same signature still fails; else the case Hypothesis gave. Crashes are not retried."""
    from mla_verify.certify.halves import CRASH, CaseFault, Fault
    from mla_verify.certify.runner import _in_short_rows
    from mla_verify.decode.case import DecodeCase

    case = DecodeCase(dtype="float32", batch=2, s_q=1, heads=1, d=40, head_dim_v=32, page_size=16,
                      lengths=(16384, 5), causal=False, regime="unit", scale="inverse_sqrt_d", permute_pages=False,
                      strided_cache=False, extra_blocks=0, seed=0, layout_seed=0)
    tried = []

    def judge_failing_from(rows: int, kind: str = "nondeterminism"):
        def judge(shorter):
            tried.append(shorter.lengths)
            if max(shorter.lengths) >= rows:
                raise CaseFault(Fault(kind, "differs"), shorter)
        return judge

    found = CaseFault(Fault("nondeterminism", "differs"), case)
    assert _in_short_rows(found, judge_failing_from(3)).case.lengths == (3, 3)
    assert _in_short_rows(found, judge_failing_from(17)).case.lengths == (17, 5)
    assert _in_short_rows(found, judge_failing_from(1000)) is found  # shows only in the long row
    tried.clear()
    assert _in_short_rows(found, judge_failing_from(3, kind="wrong output")) is found  # another bug: not this one
    assert tried == [(3, 3), (17, 5), (130, 5)]
    tried.clear()
    crash = CaseFault(Fault(CRASH, "segfault"), case)
    assert _in_short_rows(crash, judge_failing_from(3)) is crash and tried == []
