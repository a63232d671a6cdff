"""Several workers, one certificate: `python -m pytest properties -n 2` and `mla-verify certify
--workers 2` split each property's search over two pytest-xdist workers (CPU workers here) and
merge them into one certificate, whose case counts add up over the workers, which records each
worker with its device and the parts it ran, and whose distinct failures are those of a run on one
worker with the same seed: for a decode kernel with two independent bugs (tests/zoo) and a layer
with two (tests/layer_zoo: W_UV split at d_v, which raises when d_n < d_v and is silently wrong
when d_n > d_v)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mla_verify.certify.halves import CRASH, half_of
from mla_verify.certify.profiles import PROFILES
from mla_verify.certify.registry import resolve
from mla_verify.certify.workers import PINNED, SEARCH, merged_certificate, part_seed, run_part, share, worker_entry
from mla_verify.cli import main

pytest.importorskip("xdist", reason="several workers need pytest-xdist (pip install 'mla-verify[workers]')")

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
TWO_BUGS = "zoo.subtle:two_bugs_empty_nan_and_one_head_bf16_scores"
TWO_BUG_KINDS = {"NaN/inf where a finite value is due", "wrong lse"}
SPLIT_LAYER = textwrap.dedent('''
    import sys
    sys.path.insert(0, TESTS)
    from layer_zoo import weights
    from layer_zoo.common import contract_factory

    split = contract_factory(weights.SplitAtVHeadDim)
''')
SPLIT_KINDS = {"exception", "attention"}


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in ("MLA_VERIFY_IMPL", "MLA_VERIFY_LAYER")}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(cwd)])
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _signatures(certificate: dict) -> list[str]:
    return [f["signature"] for p in certificate["properties"] for f in p["failures"]]


def _assert_one_merged_certificate(certificate: dict, workers: int) -> None:
    """The cases add up over the workers' parts, every worker is recorded with its device, each
    property's search ran in `workers` parts with their own seeds (part 1: the session seed)."""
    assert certificate["settings"]["workers"] == workers
    recorded = certificate["workers"]
    assert [w["id"] for w in recorded] == [f"gw{i}" for i in range(workers)], recorded
    assert all(w["device"] == "cpu" and w["name"] for w in recorded), recorded
    parts = [dict(part, worker=w["id"]) for w in recorded for part in w["parts"]]
    seed = certificate["settings"]["seed"]
    for report in certificate["properties"]:
        name = report["name"]
        assert report["examples"] == report["passed"] + report["failed"] + report["declined"] == len(report["cases"])
        assert report["examples"] == sum(p["examples"] for p in parts if p["property"] == name), (name, parts)
        counts = report["coverage"]["counts"]
        assert sum(counts[dtype] for dtype in report["coverage"]["dtypes"]) == report["examples"]
        searched = {p["part"]: p["seed"] for p in parts if p["property"] == name and p["part"].startswith(SEARCH)}
        assert searched == {f"{SEARCH} {i + 1} of {workers}": part_seed(seed, i) for i in range(workers)}, searched
        assert len(set(searched.values())) == workers
    # one counterexample per distinct failure: the duplicates other workers shrank are gone
    assert len(_signatures(certificate)) == len(set(_signatures(certificate))) == certificate["distinct_failures"]


def _artifacts(folder: Path) -> set[str]:
    return {path.name for path in folder.iterdir()} if folder.exists() else set()


def test_certify_workers_2_merges_one_certificate_with_the_failures_of_one_worker(tmp_path):
    """A decode kernel with two independent bugs, `certify --workers 1` (in this process) and
    `--workers 2` (two xdist workers) on the same seed: the same two distinct failures, each once."""
    common = ("-m", "mla_verify.cli", "certify", TWO_BUGS, "--profile", "quick", "--seed", "1", "--property",
              "matches_reference", "--quiet")
    one = _run(*common, "--workers", "1", "--json", "one.json", "--counterexamples", "cx1", cwd=tmp_path)
    two = _run(*common, "--workers", "2", "--json", "two.json", "--markdown", "two.md", "--counterexamples", "cx2",
               cwd=tmp_path)
    assert one.returncode == 1 and two.returncode == 1, one.stderr + two.stdout + two.stderr
    single, merged = (json.loads((tmp_path / name).read_text()) for name in ("one.json", "two.json"))
    assert single["workers"] == [{"id": "main", "device": "cpu", "name": single["device"]["name"]}]
    _assert_one_merged_certificate(merged, workers=2)
    assert set(_signatures(merged)) == set(_signatures(single))
    assert {f["kind"] for p in merged["properties"] for f in p["failures"]} == TWO_BUG_KINDS
    assert "FAIL: 2 distinct failures" in two.stdout
    assert "workers: 2 — gw0 on cpu, gw1 on cpu" in (tmp_path / "two.md").read_text()
    named = {Path(f["counterexample"]).name for p in merged["properties"] for f in p["failures"]}
    assert _artifacts(tmp_path / "cx2") == named
    artifact = merged["properties"][0]["failures"][0]["counterexample"]
    replay = _run("-m", "mla_verify.cli", "replay", artifact, cwd=tmp_path)
    assert replay.returncode == 1 and "still fails" in replay.stdout, replay.stdout + replay.stderr


def test_pytest_n_2_merges_one_layer_certificate_with_the_failures_of_one_worker(tmp_path):
    """A layer with two independent bugs under `python -m pytest properties -n 2 --mla-layer` and
    under `certify --workers 1` on the same seed: the same distinct failures."""
    (tmp_path / "split_layer.py").write_text(SPLIT_LAYER.replace("TESTS", repr(str(TESTS))))
    layer = f"{tmp_path / 'split_layer.py'}:split"
    one = _run("-m", "mla_verify.cli", "certify", layer, "--profile", "quick", "--max-examples", "10", "--seed", "1",
               "--dtype", "float32", "--property", "matches_reference", "--quiet", "--json", "one.json",
               "--counterexamples", "cx1", cwd=tmp_path)
    two = _run("-m", "pytest", "-p", "no:cacheprovider", "-q", str(REPO / "properties"), "--rootdir", str(REPO),
               "-n", "2", "--mla-layer", layer, "--mla-profile", "quick", "--mla-max-examples", "10",
               "--mla-seed", "1", "--mla-dtype", "float32", "--mla-property", "matches_reference",
               "--mla-json", str(tmp_path / "two.json"), "--mla-counterexamples", str(tmp_path / "cx2"), cwd=tmp_path)
    assert one.returncode == 1, one.stdout + one.stderr
    assert two.returncode == 1 and "test_named_layer.py::test_matches_reference[part1of2]" in two.stdout, two.stdout
    assert "mla_verify certificate" in two.stdout and "2 workers: gw0 on cpu, gw1 on cpu" in two.stdout
    single, merged = (json.loads((tmp_path / name).read_text()) for name in ("one.json", "two.json"))
    _assert_one_merged_certificate(merged, workers=2)
    assert merged["implementation"]["kind"] == "layer" and merged["implementation"]["precision_class"]
    assert set(_signatures(merged)) == set(_signatures(single))
    assert {f["kind"] for p in merged["properties"] for f in p["failures"]} == SPLIT_KINDS
    named = {Path(f["counterexample"]).name for p in merged["properties"] for f in p["failures"]}
    assert _artifacts(tmp_path / "cx2") == named


def test_merge_keeps_the_search_parts_smallest_case_and_reports_a_dead_worker(tmp_path):
    """The merge itself, in this process: two search parts and the pinned part of the two-bug
    kernel, and a part that started on a worker that died before it reported."""
    impl = resolve(TWO_BUGS)
    half = half_of(impl)
    prop = half.property_named("matches_reference")
    profile, seed, folder = PROFILES["quick"], 7, tmp_path / "cx"
    records = []
    for part, index, count in ((SEARCH, 0, 2), (SEARCH, 1, 2), (PINNED, 0, 1)):
        record, _ = run_part(impl, half, prop, profile, "cpu", seed=seed, index=index, count=count, part=part,
                             max_examples=None, counterexamples=str(folder), isolate=False, strict=False,
                             dtypes=None, progress=None, worker=worker_entry(f"gw{index}", "cpu"))
        records.append(record)
    shares = [record["examples"] for record in records[:2]]
    assert shares == [share(profile.max_examples, i, 2) for i in range(2)] and sum(shares) == profile.max_examples
    assert [record["seed"] for record in records] == [seed, part_seed(seed, 1), seed]
    lost = {"kind": half.kind, "implementation": impl.name, "property": prop.name, "part": SEARCH, "index": 1,
            "count": 2, "seed": part_seed(seed, 1), "worker": worker_entry("gw2", "cpu")}
    certificate = merged_certificate(impl, half, records, [lost], profile, "cpu", seed=seed, worker_count=2, parts=2,
                                     max_examples=None, isolate=False, strict=False, timeout_s=None, dtypes=None,
                                     elapsed_s=0.0, command=None).to_dict()
    report = certificate["properties"][0]
    assert report["examples"] == sum(record["report"]["examples"] for record in records)
    found = {f["signature"]: f for r in records for f in r["report"]["failures"]}
    failures = {f["signature"]: f for f in report["failures"]}
    assert set(failures) == set(found) | {CRASH}
    for signature, failure in failures.items():
        if signature == CRASH:
            assert "gw2 died" in failure["message"] and "--isolate" in failure["message"]
            continue
        searched = [f for r in records[:2] for f in r["report"]["failures"] if f["signature"] == signature]
        candidates = searched or [found[signature]]
        assert half.case_size(failure["case"]) == min(half.case_size(f["case"]) for f in candidates)
    assert _artifacts(folder) == {Path(f["counterexample"]).name for f in failures.values() if f["counterexample"]}
    assert [w["id"] for w in certificate["workers"]] == ["gw0", "gw1", "gw2"]
    assert certificate["workers"][2]["parts"][0]["outcome"] == "worker died"


@pytest.mark.parametrize("value", ["0", "two"])
def test_a_bad_worker_count_is_a_usage_error(value, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["certify", "torch", "--workers", value])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "--workers" in err and "'auto' or a whole number" in err and len(err.splitlines()) == 1, err


def test_with_cuda_each_worker_is_pinned_to_its_own_gpu(monkeypatch):
    """--mla-device cuda: worker k's environment names GPU k of the visible ones (round robin past
    their number) before it starts; on the CPU the workers' environment is left alone."""
    import execnet

    from mla_verify import plugin
    from mla_verify.certify import workers

    monkeypatch.setattr(workers, "visible_gpus", lambda: ["3", "5"])

    class Options:
        def __init__(self, device: str) -> None:
            self.device = device

        def getoption(self, name: str) -> str:
            assert name == "--mla-device"
            return self.device

    specs = [execnet.XSpec("popen") for _ in range(3)]
    plugin.pytest_xdist_setupnodes(Options("cuda"), specs)
    assert [spec.env["CUDA_VISIBLE_DEVICES"] for spec in specs] == ["3", "5", "3"]
    assert plugin.pytest_xdist_auto_num_workers(Options("cuda")) == 2
    cpu = [execnet.XSpec("popen") for _ in range(2)]
    plugin.pytest_xdist_setupnodes(Options("cpu"), cpu)
    assert all("CUDA_VISIBLE_DEVICES" not in spec.env for spec in cpu)
    assert plugin.pytest_xdist_auto_num_workers(Options("cpu")) is None
