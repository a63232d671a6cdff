"""A new user's first hour, one test per class of rough edge: the kernel is found where the user
stands, hangs / exits / crashes end in a line that says what happened, repro.py and replay agree,
every bad argument is one line with exit 2 (never a traceback), the pytest route is quiet about
what it was not asked, certificates say what a reader needs, and the hints name likely causes."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mla_verify.decode.checks import Implementation
from mla_verify.certify import certify
from mla_verify.cli import main
from mla_verify.certify.progress import BarProgress, LineProgress, Progress, progress_for

REPO = Path(__file__).resolve().parents[1]
CONSOLE = Path(sys.executable).with_name("mla-verify")

KERNELS = textwrap.dedent('''
    import ctypes
    import sys
    import time

    import numpy
    import torch

    from mla_verify.impls.torch_decode import torch_paged_decode as good


    def decode(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=False):
        return good(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal)


    def hangs(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=False):
        while True:
            time.sleep(0.05)


    def exits(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=False):
        sys.exit(3)


    def segfaults(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=False):
        ctypes.string_at(0)


    def float32_out(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=False):
        out, lse = good(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal)
        return out.float(), lse


    def lse_transposed(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=False):
        out, lse = good(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal)
        return out, lse.transpose(1, 2).contiguous()


    def lse_base_2(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=False):
        out, lse = good(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal)
        return out, lse / 0.6931471805599453


    def out_scaled(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=False):
        out, lse = good(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal)
        return out * 1.01, lse


    def own_scale(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=False):
        return good(q, kv_cache, block_table, cache_seqlens, head_dim_v, q.shape[-1] ** -0.5, causal)


    def as_numpy(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=False):
        out, lse = good(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal)
        return out.numpy(), lse.numpy()
''')


def _folder_with_kernels(tmp_path: Path) -> Path:
    (tmp_path / "my_kernels.py").write_text(KERNELS)
    return tmp_path


def _console(*args: str, cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """The installed `mla-verify` command, with no PYTHONPATH: what a user types."""
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLA_VERIFY_IMPL")}
    return subprocess.run([str(CONSOLE), *args], cwd=cwd, env={**clean, **(env or {})}, capture_output=True,
                          text=True, timeout=timeout)


QUICK = ("--profile", "quick", "--property", "matches_reference", "--quiet")

needs_console = pytest.mark.skipif(not CONSOLE.exists(), reason="the mla-verify console script is not installed")


# ---- 1. the kernel is found where the user stands ----

@needs_console
def test_kernel_in_the_current_folder_and_by_file_path_without_pythonpath(tmp_path):
    folder = _folder_with_kernels(tmp_path)
    by_module = _console("certify", "my_kernels:decode", *QUICK, "--max-examples", "3", cwd=folder)
    assert by_module.returncode == 0, by_module.stdout + by_module.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    by_path = _console("certify", "../my_kernels.py:decode", *QUICK, "--max-examples", "3", cwd=elsewhere)
    assert by_path.returncode == 0, by_path.stdout + by_path.stderr
    assert "verdict: PASS" in by_path.stdout


@needs_console
def test_a_counterexample_replays_from_another_folder(tmp_path):
    folder = _folder_with_kernels(tmp_path)
    run = _console("certify", "my_kernels:out_scaled", *QUICK, "--max-examples", "5", "--json", "cert.json",
                   cwd=folder)
    assert run.returncode == 1, run.stdout + run.stderr
    artifact = folder / json.loads((folder / "cert.json").read_text())["properties"][0]["failures"][0]["counterexample"]
    replayed = _console("replay", str(artifact), cwd=Path("/"))
    assert replayed.returncode == 1 and "still fails" in replayed.stdout, replayed.stdout + replayed.stderr


# ---- 2. hangs, exits and crashes ----

@pytest.mark.parametrize("isolate", [False, True], ids=["in-process", "isolated"])
def test_a_hanging_kernel_is_a_timeout_failure(tmp_path, isolate, monkeypatch):
    folder = _folder_with_kernels(tmp_path)
    monkeypatch.chdir(folder)
    args = ["certify", "my_kernels:hangs", *QUICK, "--max-examples", "2", "--timeout", "0.5", "--json", "cert.json"]
    assert main(args + (["--isolate"] if isolate else [])) == 1
    failure = json.loads((folder / "cert.json").read_text())["properties"][0]["failures"][0]
    assert failure["kind"] == "call did not return in time", failure


def test_the_call_deadline_interrupts_python_and_keeps_an_outer_alarm():
    import signal
    import time

    from mla_verify.decode.checks import CallTimedOut, deadline

    with pytest.raises(CallTimedOut):
        with deadline(0.2):
            while True:
                time.sleep(0.01)
    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *_: fired.append(True))
    try:
        signal.setitimer(signal.ITIMER_REAL, 5.0)
        with deadline(1.0):
            pass
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 3.0 < remaining <= 5.0 and not fired
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_a_kernel_calling_sys_exit_is_a_failure_not_the_exit_code(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(_folder_with_kernels(tmp_path))
    assert main(["certify", "my_kernels:exits", *QUICK, "--max-examples", "2"]) == 1
    assert "the kernel called sys.exit(3)" in capsys.readouterr().out


@needs_console
def test_a_segfault_without_isolate_ends_with_a_hint_and_its_replay_does_not_crash(tmp_path):
    folder = _folder_with_kernels(tmp_path)
    run = _console("certify", "my_kernels:segfaults", *QUICK, "--max-examples", "2", cwd=folder)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "killed by SIGSEGV" in run.stderr and "--isolate" in run.stderr and "Traceback" not in run.stderr
    isolated = _console("certify", "my_kernels:segfaults", *QUICK, "--max-examples", "2", "--isolate", "--json",
                        "cert.json", cwd=folder)
    assert isolated.returncode == 1, isolated.stdout + isolated.stderr
    artifact = json.loads((folder / "cert.json").read_text())["properties"][0]["failures"][0]["counterexample"]
    replayed = _console("replay", artifact, cwd=folder)
    assert replayed.returncode == 1 and "child process" in replayed.stdout, replayed.stdout + replayed.stderr
    assert "still fails: process crashed" in replayed.stdout


# ---- 3. repro.py and replay agree, with exit codes that say which is which ----

@needs_console
@pytest.mark.parametrize("kernel, signature", [("float32_out", "wrong shape or dtype"),
                                               ("lse_transposed", "wrong shape or dtype")])
def test_repro_and_replay_agree(tmp_path, kernel, signature):
    folder = _folder_with_kernels(tmp_path)
    # float16 only: a float32 case would let float32_out pass
    run = _console("certify", f"my_kernels:{kernel}", *QUICK, "--max-examples", "3", "--dtype", "float16",
                   "--json", "cert.json", cwd=folder)
    failure = json.loads((folder / "cert.json").read_text())["properties"][0]["failures"][0]
    assert run.returncode == 1 and failure["kind"] == signature, failure
    replayed = _console("replay", failure["counterexample"], cwd=folder)
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    repro = subprocess.run([sys.executable, str(folder / failure["counterexample"] / "repro.py")], cwd=folder,
                           capture_output=True, text=True, env=clean)
    assert replayed.returncode == repro.returncode == 1, replayed.stdout + repro.stdout + repro.stderr
    assert "Traceback" not in repro.stderr
    broken = subprocess.run([sys.executable, "-S", str(folder / failure["counterexample"] / "repro.py")],
                            cwd=folder, capture_output=True, text=True, env=clean)
    assert broken.returncode == 2 and "cannot run" in broken.stderr, broken.stdout + broken.stderr


# ---- 4. every bad argument: one line, exit 2 ----

def _case_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "case.json"
    path.write_text(text)
    return str(path)


GOOD_CASE = {"dtype": "float32", "batch": 1, "s_q": 1, "heads": 1, "d": 40, "head_dim_v": 32, "page_size": 16,
             "lengths": [3], "causal": False, "regime": "unit", "scale": "inverse_sqrt_d", "permute_pages": False,
             "strided_cache": False, "extra_blocks": 0, "seed": 0, "layout_seed": 0}


@pytest.mark.parametrize("argv, words", [
    (["certify", "--device", "gpu"], "--device gpu: expected cpu, cuda or cuda:N"),
    (["certify", "--device", "meta"], "--device meta"),
    (["certify", "--device", "cuda:x"], "--device cuda:x"),
    (["certify", "--max-examples", "0"], "expected a whole number ≥ 1"),
    (["certify", "--max-examples", "-5"], "expected a whole number ≥ 1"),
    (["certify", "--timeout", "soon"], "expected seconds"),
    (["certify", "--json", "{tmp}"], "is a folder"),
    (["certify", "--json", "{tmp}/new/dir/cert.json"], "does not exist"),
    (["certify", "--markdown", "{tmp}/missing/cert.md"], "does not exist"),
    (["certify", "--counterexamples", "{tmp}/a_file"], "exists and is not a folder"),
    (["certify", "trition"], "did you mean 'triton'"),
    (["certify", "mla_verify.impls.torch_decode:torch_paged_decod"], "did you mean 'torch_paged_decode'"),
    (["check", "torch", "--case", "{bad_json}"], "expected a case.json"),
    (["check", "torch", "--case", "{bad_field}"], "case field 'heads': expected an integer ≥ 1"),
    (["check", "torch", "--case", "{bad_dtype}"], "case field 'dtype': expected one of"),
    (["check", "torch", "--case", "{bad_lengths}"], "expected batch = 1 lengths"),
    (["replay", "{tmp}/nothing_here"], "not a counterexample folder"),
    (["replay", "{tmp}"], "is not a readable counterexample case.json"),
    (["report", "{tmp}/none.json", "--html", "{tmp}/r.html"], "expected a certificate written by --json"),
    (["compare", "torch"], "name at least two implementations"),
])
def test_bad_input_is_one_line_and_exit_2(argv, words, tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    paths = {"tmp": str(tmp_path), "bad_json": _case_file(tmp_path, "{not json")}
    for name, change in (("bad_field", {"heads": -3}), ("bad_dtype", {"dtype": "float8"}),
                         ("bad_lengths", {"lengths": [1, 2]})):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({**GOOD_CASE, **change}))
        paths[name] = str(path)
    argv = [part.format(**paths) for part in argv]
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse's own usage errors
        code = stop.code
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert words in err, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err


def test_an_environment_variable_that_names_nothing_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLA_VERIFY_IMPL", "not_a_kernel")
    assert main(["certify"]) == 2
    assert "MLA_VERIFY_IMPL=not_a_kernel (from the environment)" in capsys.readouterr().err


# ---- 5. the pytest route ----

def _pytest(*args: str, cwd: Path = REPO, env: dict | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k != "MLA_VERIFY_IMPL"}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=cwd,
                          env={**clean, **(env or {})}, capture_output=True, text=True, timeout=300)


def test_mla_impl_collects_only_the_tests_that_certify_it():
    run = _pytest("properties", "--mla-impl", "torch", "--collect-only", "-q")
    collected = [line for line in run.stdout.splitlines() if "::" in line]
    assert collected and all("test_decode_kernel.py" in line for line in collected), run.stdout
    assert "deselected" in run.stdout


@pytest.mark.skipif(not CONSOLE.with_name("pytest").exists(), reason="the pytest console script is not installed")
def test_plain_pytest_finds_the_users_kernel_in_the_current_folder(tmp_path):
    folder = _folder_with_kernels(tmp_path)
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLA_VERIFY_IMPL")}
    run = subprocess.run([str(CONSOLE.with_name("pytest")), "-p", "no:cacheprovider", "-q",
                          str(REPO / "properties" / "decode" / "test_decode_kernel.py"), "--mla-impl", "my_kernels:out_scaled",
                          "-k", "test_matches_reference_pinned"], cwd=folder, env=clean, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 1 and "1 failed" in run.stdout, run.stdout + run.stderr
    assert "constant factor" in run.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_mla_device_cuda_without_a_gpu_is_one_usage_error():
    run = _pytest("properties", "--mla-device", "cuda", "-q")
    assert run.returncode == 4 and "torch sees no CUDA device" in run.stderr, run.stdout + run.stderr
    assert "FailedHealthCheck" not in run.stdout + run.stderr


def test_mla_impl_from_the_environment_that_names_nothing_says_so():
    run = _pytest("properties", "-q", "--collect-only", env={"MLA_VERIFY_IMPL": "not_a_kernel"})
    assert run.returncode == 4 and "MLA_VERIFY_IMPL=not_a_kernel (from the environment)" in run.stderr, run.stderr


def test_the_installed_plugin_leaves_other_projects_hypothesis_settings_alone(tmp_path):
    (tmp_path / "test_other.py").write_text(textwrap.dedent('''
        from hypothesis import settings

        def test_defaults_untouched():
            assert settings().max_examples == settings.get_profile("default").max_examples
            assert settings().report_multiple_bugs == settings.get_profile("default").report_multiple_bugs
    '''))
    run = _pytest("-q", str(tmp_path / "test_other.py"), "--rootdir", str(tmp_path), cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr


# ---- 6. certificates that say what a reader needs ----

def _zoo_like(fn_name: str):
    import importlib.util

    spec = importlib.util.spec_from_loader("first_use_kernels", loader=None)
    module = importlib.util.module_from_spec(spec)
    exec(KERNELS, module.__dict__)
    fn = getattr(module, fn_name)
    return Implementation(fn_name, f"first_use_kernels:{fn_name}", fn)


def test_certificate_is_strict_json_with_provenance_counts_and_the_failure_ratio():
    certificate = certify(_zoo_like("out_scaled"), profile="quick", max_examples=5, seed=1,
                          properties=["matches_reference"], command="mla-verify certify x")
    data = certificate.to_dict()
    json.dumps(data, allow_nan=False)  # strict JSON: no inf/NaN literals
    assert data["schema"] == "mla-verify-certificate/3" and data["headline"].startswith("FAIL")
    assert {"created", "command", "revision", "cpu"} <= data["provenance"].keys()
    assert "numpy" in data["versions"]
    report = data["properties"][0]
    assert report["failures"][0]["ratio"] > 1
    assert report["cases"] and {"outcome", "sound", "sharp", "max_length", "heads"} <= report["cases"][0].keys()
    assert sum(report["coverage"]["counts"].get(d, 0) for d in ("float32", "float16", "bfloat16", "float64")) \
        == report["examples"]
    markdown = certificate.to_markdown()
    assert "worst failure (error/bound)" in markdown and f"{report['failures'][0]['ratio']:.3g}" in markdown
    assert "≤ 1 passes" in markdown


def test_worst_passing_case_says_where_with_its_error_and_tolerance():
    certificate = certify(_zoo_like("decode"), profile="quick", max_examples=5, seed=1,
                          properties=["matches_reference"])
    report = certificate.to_dict()["properties"][0]
    assert "error" in report["worst"]["sound"] and "tolerance" in report["worst"]["sound"]
    assert report["worst"]["sound"].split(" at ")[0] in ("out", "lse")


def test_declared_conventions_are_printed_in_the_markdown():
    from mla_verify import Capabilities

    claims = Capabilities(lse_base="2", dtypes=(torch.float32,))
    impl = Implementation("base2", "first_use_kernels:lse_base_2", _zoo_like("lse_base_2").fn, claims)
    certificate = certify(impl, profile="quick", max_examples=3, seed=1, properties=["matches_reference"])
    assert certificate.verdict == "pass"
    assert "lse_base = 2" in certificate.to_markdown()


# ---- 7. the project's Triton kernel on a CPU, through Triton's interpreter ----

@needs_console
def test_triton_certifies_on_the_cpu_through_the_interpreter(tmp_path):
    pytest.importorskip("triton")
    run = _console("certify", "triton", *QUICK, "--max-examples", "2", cwd=tmp_path, env={"TRITON_INTERPRET": "1"})
    assert run.returncode == 0 and "verdict: PASS" in run.stdout, run.stdout + run.stderr


# ---- 8. hints ----

@pytest.mark.parametrize("kernel, hint", [
    ("lse_base_2", "lse ≈ ref / ln 2"),
    ("out_scaled", "constant factor"),
    ("own_scale", "softmax scale of its own"),
    ("as_numpy", "numpy"),
])
def test_a_failure_names_its_likely_cause(kernel, hint):
    certificate = certify(_zoo_like(kernel), profile="quick", max_examples=5, seed=1,
                          properties=["matches_reference"])
    messages = [f["message"] for p in certificate.properties for f in p.failures]
    assert messages and any(hint in m for m in messages), messages


# ---- beyond the fixes: compare, report, progress ----

def test_compare_prints_one_table_on_the_same_cases(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(_folder_with_kernels(tmp_path))
    code = main(["compare", "torch", "my_kernels:out_scaled", *QUICK, "--max-examples", "3", "--seed", "5",
                 "--json", "cmp.json", "--markdown", "cmp.md"])
    out = capsys.readouterr().out
    assert code == 1
    lines = out.splitlines()
    assert "seed 5" in lines[0] and lines[1].startswith("implementation")
    assert any(line.startswith("torch") and "PASS" in line for line in lines)
    assert any(line.startswith("my_kernels:out_scaled") and "FAIL: 1 distinct failure" in line for line in lines)
    data = json.loads((tmp_path / "cmp.json").read_text())
    assert [c["settings"]["seed"] for c in data["certificates"]] == [5, 5]
    assert "| torch |" in (tmp_path / "cmp.md").read_text()


def test_report_renders_a_saved_certificate_as_html(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(_folder_with_kernels(tmp_path))
    assert main(["certify", "my_kernels:out_scaled", *QUICK, "--max-examples", "4", "--json", "cert.json"]) == 1
    assert main(["report", "cert.json", "--html", "cert.html", "--markdown", "cert.md"]) == 0
    html = (tmp_path / "cert.html").read_text()
    assert html.count('data-plot="') == 4 and "FAIL: 1 distinct failure" in html
    assert "worst failure" in (tmp_path / "cert.md").read_text()


class _Terminal:
    def __init__(self, tty: bool) -> None:
        self.tty, self.text = tty, ""

    def isatty(self) -> bool:
        return self.tty

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def flush(self) -> None:
        pass


def test_progress_is_bars_on_a_terminal_lines_elsewhere_and_none_when_quiet(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    assert isinstance(progress_for(False, _Terminal(True)), BarProgress)
    assert isinstance(progress_for(False, _Terminal(False)), LineProgress)
    assert type(progress_for(True, _Terminal(True))) is Progress
    monkeypatch.setenv("CI", "true")
    assert isinstance(progress_for(False, _Terminal(True)), LineProgress)
    monkeypatch.delenv("CI")
    terminal = _Terminal(True)
    certify(_zoo_like("decode"), profile="quick", max_examples=3, seed=1, properties=["matches_reference"],
            progress=progress_for(False, terminal))
    assert "matches_reference" in terminal.text and "case" in terminal.text and "PASS" in terminal.text
