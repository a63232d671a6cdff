"""Several workers, one certificate: a certification split over pytest-xdist workers.

pytest-xdist is the distribution engine (`python -m pytest properties -n N --mla-impl NAME`, or
`mla-verify certify NAME --workers N`, which runs the same through pytest). This module is what the
plugin (mla_verify.plugin) needs around it:

    parts           Each property's search is split into N parts, one per worker: part i runs
                    `share(M, i, N)` of the M examples with its own seed `part_seed(S, i)` (part 0
                    keeps the session seed S), and searches in rounds until its own rounds find
                    nothing new, as `run_property` does in one process. The pinned regression cases
                    of a property are one more part. A part is a pytest test item; xdist hands the
                    items to the workers.
    devices         With --device cuda, worker k sees one GPU (CUDA_VISIBLE_DEVICES set before it
                    starts: `worker_gpu`), so its cases are built on "cuda", i.e. its own GPU, and a
                    counterexample replays on any one-GPU machine.
    part files      Each part writes what it found (its PropertyReport, the half's state, the worker
                    and its device) to a file in the session's folder; a part that started and left
                    no file is a worker that died.
    merge           At the end of the session the controller merges the parts into one
                    certificate: counts and coverage added, the worst case of each tier the worst
                    over all parts, per-case records concatenated, and the distinct failures
                    de-duplicated by signature, keeping the smallest minimal case (and deleting the
                    other workers' artifacts of the same failure).

The failures found do not depend on N: every part searches until nothing new turns up, and the
merge loses no signature (the cases drawn differ with N; tests/test_workers.py checks the distinct
failures on 1 and 2 workers).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import time
from pathlib import Path

import torch

from mla_verify.certify.certificate import Certificate, PropertyReport, device_info
from mla_verify.certify.halves import CRASH, Half, NothingToCertify
from mla_verify.certify.profiles import Profile
from mla_verify.certify.progress import Progress

__all__ = ["part_seed", "share", "visible_gpus", "auto_workers", "worker_gpu", "worker_entry", "run_part",
           "PartFiles", "merge_reports", "merged_certificate"]

SEARCH, PINNED = "search", "pinned"


def part_seed(seed: int, index: int) -> int:
    """The seed of search part `index`: part 0 keeps the session seed (one worker reproduces the
    in-process run), the others a 32-bit hash of (seed, index), far from seed + round."""
    if index == 0:
        return seed
    return int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:4], "big")


def share(total: int, index: int, count: int) -> int:
    """Examples of part `index` of `count` when a property runs `total`: equal shares, the first
    `total % count` parts one more; at least 1."""
    return max(1, total // count + (index < total % count))


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them (or their indices)."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    named = os.environ.get("CUDA_VISIBLE_DEVICES")
    if named is not None:
        return [name.strip() for name in named.split(",") if name.strip()][:count]
    return [str(i) for i in range(count)]


def auto_workers(device: str) -> int:
    """`--workers auto`: one worker per visible GPU for --device cuda, else one per CPU core."""
    if device.startswith("cuda"):
        return max(1, len(visible_gpus()))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def worker_gpu(worker_index: int, gpus: list[str]) -> str:
    """The GPU worker `worker_index` is pinned to: round robin over the visible ones."""
    return gpus[worker_index % len(gpus)]


def worker_entry(worker_id: str, device: str) -> dict:
    """This process as a worker of the certificate: its id, device and the device's name."""
    entry = {"id": worker_id, "device": device, "name": device_info(device)["name"]}
    if device.startswith("cuda"):
        entry["visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    return entry


def run_part(impl: object, half: Half, prop: object, profile: Profile, device: str, *, seed: int, index: int,
             count: int, part: str, max_examples: int | None, counterexamples: str | None, isolate: bool,
             strict: bool, dtypes: tuple[str, ...] | None, progress: Progress | None,
             worker: dict) -> tuple[dict, PropertyReport | None]:
    """Run one part of one property in this process (one torch thread on the CPU, as `certify`):
    the part record for its file, and the report (None when nothing could be drawn)."""
    from mla_verify.certify.runner import IsolatedRunner, run_property

    total = max_examples or profile.max_examples
    examples = share(total, index, count) if part == SEARCH else None
    seed = part_seed(seed, index) if part == SEARCH else seed
    record = {"kind": half.kind, "implementation": impl.name, "property": prop.name, "part": part, "index": index,
              "count": count, "seed": seed, "examples": examples, "worker": worker}
    isolated = IsolatedRunner(impl.timeout_s) if isolate else None
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)
    started = time.perf_counter()
    report = None
    progress = progress or Progress()
    progress.start(prop.name, prop.description, examples or 0)
    try:
        report = run_property(impl, prop, profile, device, examples or total, seed, counterexamples, isolated,
                              strict, progress, dtypes, half, search=part == SEARCH, pinned=part == PINNED)
    except NothingToCertify as error:
        record["nothing_to_certify"] = str(error)
    finally:
        torch.set_num_threads(threads)
        if isolated:
            isolated.close()
    record["elapsed_s"] = time.perf_counter() - started
    if report is not None:
        progress.finish(report)
    record["state"] = half.state()
    record["report"] = report.to_dict() if report is not None else None
    return record, report


class PartFiles:
    """The session's folder of part files: `<key>.started` when a part begins, `<key>.json` (its
    record) when it ends."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    @staticmethod
    def key(nodeid: str, worker_id: str) -> str:
        return hashlib.sha1(f"{worker_id}|{nodeid}".encode()).hexdigest()[:16]

    def started(self, key: str, record: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"{key}.started").write_text(json.dumps(record))

    def finished(self, key: str, record: dict) -> None:
        # not strict JSON (inf stays inf): these files are read back only by `records`
        temporary = self.folder / f"{key}.json.partial"
        temporary.write_text(json.dumps(record))
        temporary.replace(self.folder / f"{key}.json")

    def started_record(self, key: str) -> dict:
        return json.loads((self.folder / f"{key}.started").read_text())

    def records(self) -> tuple[list[dict], list[dict]]:
        """(finished part records, parts that started and never finished: their worker died)."""
        if not self.folder.is_dir():
            return [], []
        done = {path.stem: json.loads(path.read_text()) for path in self.folder.glob("*.json")}
        lost = [json.loads(path.read_text()) for path in sorted(self.folder.glob("*.started"))
                if path.stem not in done]
        # a part that raised (a bug of mla_verify's or Hypothesis's, not the implementation's finding)
        # is reported with the lost ones, with what it raised
        lost += [record for record in done.values() if record.get("raised")]
        return [record for record in done.values() if not record.get("raised")], lost

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _part_order(record: dict) -> tuple:
    return (record["part"] == PINNED, record["index"])


def _worker_order(worker_id: str) -> tuple:
    digits = re.sub(r"\D", "", worker_id)
    return (int(digits) if digits else -1, worker_id)


def _merge_extra(merged: dict, extra: dict) -> None:
    """What a half adds to a report (a layer's max_stage_ratios, max_relative_error,
    precision_classes, precision): numbers by their maximum, labels first come first kept."""
    for key, value in extra.items():
        if isinstance(value, dict):
            into = merged.setdefault(key, {})
            for name, item in value.items():
                if isinstance(item, (int, float)) and isinstance(into.get(name), (int, float)):
                    into[name] = max(into[name], item)
                else:
                    into.setdefault(name, item)
        elif isinstance(value, (int, float)) or value is None:
            known = [v for v in (merged.get(key), value) if isinstance(v, (int, float))]
            merged[key] = max(known) if known else None
        else:
            merged.setdefault(key, value)


def merge_reports(impl: object, half: Half, records: list[dict],
                  lost: list[dict] = ()) -> tuple[list[PropertyReport], list[str]]:
    """One PropertyReport per property from its parts' records (in the half's property order), and the
    counterexample folders of failures another part shrank smaller (to delete). A part in `lost`
    (started, no record: its worker died) becomes a "process crashed" failure of its property."""
    order = {name: i for i, name in enumerate(p.name for p in half.properties(impl))}
    by_property: dict[str, list[dict]] = {}
    for record in sorted(records, key=lambda r: (order.get(r["property"], len(order)), _part_order(r))):
        if record.get("report") is not None:
            by_property.setdefault(record["property"], []).append(record)
    for record in lost:
        by_property.setdefault(record["property"], [])
    reports, dropped = [], []
    for name in sorted(by_property, key=lambda n: order.get(n, len(order))):
        parts = [record["report"] for record in by_property[name]]
        record_of = {id(record["report"]): record for record in by_property[name]}
        description = parts[0]["description"] if parts else half.property_named(name).description
        merged = PropertyReport(name, description, coverage=half.merged_coverage([p["coverage"] for p in parts]))
        candidates: dict[str, list[dict]] = {}
        for part in parts:
            merged.examples += part["examples"]
            merged.passed += part["passed"]
            merged.failed += part["failed"]
            merged.declined += part["declined"]
            for reason, count in part["declined_reasons"].items():
                merged.declined_reasons[reason] = merged.declined_reasons.get(reason, 0) + count
            for tier, ratio_key, case_key in (("sound", "max_ratio", "worst_case"),
                                              ("sharp", "max_sharp_ratio", "worst_sharp_case")):
                if part[ratio_key] > getattr(merged, ratio_key):
                    setattr(merged, ratio_key, part[ratio_key])
                    setattr(merged, case_key, part[case_key])
                    merged.worst[tier] = part["worst"][tier]
                    merged.worst_description[tier] = part["worst_description"][tier]
            merged.cases += part["cases"]
            for failure in part["failures"]:
                candidates.setdefault(failure["signature"], []).append((record_of[id(part)]["part"] == PINNED, failure))
            names = {f.name for f in dataclasses.fields(PropertyReport)} | {"coverage", "verdict"}
            _merge_extra(merged.extra, {k: v for k, v in part.items() if k not in names})
        for signature, found in candidates.items():
            # as in one process, a failure the search shrank stands before a pinned case of the same
            # signature (never shrunk); among the search parts' the smallest minimal case (min is
            # stable: the first part wins a tie)
            _, kept = min(found, key=lambda entry: (entry[0], half.case_size(entry[1]["case"])))
            merged.failures.append(kept)
            dropped += [failure["counterexample"] for _, failure in found
                        if failure["counterexample"] and failure["counterexample"] != kept["counterexample"]]
        for record in lost:
            if record["property"] == name:
                merged.failures.append(_lost_part_failure(record))
        reports.append(merged)
    return reports, dropped


def _lost_part_failure(record: dict) -> dict:
    worker = record["worker"]["id"]
    what = "the pinned cases" if record["part"] == PINNED else f"search part {record['index'] + 1} of {record['count']}"
    if record.get("raised"):
        return {"signature": f"exception ({record['raised'].split(':')[0]})", "kind": "exception",
                "ratio": math.inf, "case": {}, "flaky": False, "counterexample": None,
                "message": f"{what} of {record['property']} on {worker} raised {record['raised']}; its cases are lost",
                "description": f"unknown: the part raised before it reported (seed {record['seed']})"}
    return {"signature": CRASH, "kind": CRASH, "ratio": math.inf, "case": {}, "flaky": False, "counterexample": None,
            "message": (f"worker {worker} died while running {what} of {record['property']} (a crash in the "
                        "implementation or a library it calls, or the machine ran out of memory); its cases are "
                        "lost. Rerun with --isolate: each case then runs in a child process, and a crash becomes a "
                        "shrunk, replayable counterexample"),
            "description": f"unknown: {worker} died before it reported (seed {record['seed']})"}


def _workers(records: list[dict], lost: list[dict], order: dict[str, int]) -> list[dict]:
    workers: dict[str, dict] = {}
    for record in sorted(records + list(lost), key=lambda r: (order.get(r["property"], len(order)), _part_order(r))):
        entry = workers.setdefault(record["worker"]["id"], {**record["worker"], "parts": []})
        report = record.get("report")
        entry["parts"].append({"property": record["property"],
                               "part": (PINNED if record["part"] == PINNED
                                        else f"{SEARCH} {record['index'] + 1} of {record['count']}"),
                               "seed": record["seed"], "examples": report["examples"] if report else None,
                               "elapsed_s": round(record["elapsed_s"], 2) if "elapsed_s" in record else None,
                               **({} if report or "elapsed_s" in record else
                                  {"outcome": f"raised {record['raised']}" if record.get("raised")
                                   else "worker died"})})
    return [workers[key] for key in sorted(workers, key=_worker_order)]


def merged_certificate(impl: object, half: Half, records: list[dict], lost: list[dict], profile: Profile,
                       device: str, *, seed: int, worker_count: int, parts: int, max_examples: int | None,
                       isolate: bool,
                       strict: bool, timeout_s: float | None, dtypes: tuple[str, ...] | None, elapsed_s: float,
                       command: str | None) -> Certificate:
    """The one certificate of a parallel run, from every part's record; the duplicate counterexample
    folders of a failure are deleted (the certificate names the one it keeps). NothingToCertify
    when no part could draw a case."""
    from mla_verify.certify.runner import assemble

    nothing = [r["nothing_to_certify"] for r in records if r.get("nothing_to_certify")]
    if nothing and not any(r.get("report") for r in records):
        raise NothingToCertify(nothing[0])
    for record in records:
        half.add_state(record.get("state") or {})
    reports, dropped = merge_reports(impl, half, records, lost)
    for folder in dropped:
        shutil.rmtree(folder, ignore_errors=True)
    workers = _workers(records, lost, {prop.name: i for i, prop in enumerate(half.properties(impl))})
    names = list(dict.fromkeys(worker["name"] for worker in workers))
    return assemble(impl, half, reports, profile, device, max_examples=max_examples, seed=seed, isolate=isolate,
                    strict=strict, timeout_s=timeout_s, dtypes=dtypes, elapsed_s=elapsed_s, command=command,
                    workers=workers, worker_count=worker_count, parts=parts,
                    device_entry={"type": device, "name": "; ".join(names) or device_info(device)["name"]})

