"""Counterexamples as self-contained artifacts: the case, its tensors, and a repro script.

An artifact is a folder:
    case.json   implementation, property, failure signature, kind and message, the case description
    inputs.pt   the exact arguments of each kernel call the property makes (views kept with their
                buffers), the float64 reference and both tiers' bounds, for inspection
    repro.py    `python repro.py` reruns the property on the case through mla_verify itself (the
                same code the certifier ran, never a second copy of it): exit 0 passes now,
                1 still fails, 2 cannot run
`mla-verify replay PATH` does the same as repro.py; `mla-verify check IMPL --case PATH/case.json`
judges the case by every property.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from mla_verify.decode.checks import CaseFailure, Implementation, expected_for
from mla_verify.decode.properties import property_named
from mla_verify.registry import module_root
from mla_verify.decode.case import DecodeCase

__all__ = ["save_counterexample", "load_counterexample", "replay"]


def save_counterexample(directory: str | Path, impl: Implementation, prop_name: str, failure: CaseFailure) -> Path:
    """Write the artifact for `failure` under `directory`; returns its folder."""
    case = failure.case
    digest = hashlib.sha1(json.dumps(case.to_dict(), sort_keys=True).encode()).hexdigest()[:10]
    folder = Path(directory) / f"{_slug(impl.name)}-{prop_name}-{digest}"
    folder.mkdir(parents=True, exist_ok=True)
    calls = property_named(prop_name).calls(case)
    expected = expected_for(calls[0], impl.capabilities)
    torch.save({
        "calls": [{name: tensor.cpu() for name, tensor in zip(("q", "kv_cache", "block_table", "cache_seqlens"),
                                                             c.arguments[:4])} for c in calls],
        "head_dim_v": case.head_dim_v, "softmax_scale": case.softmax_scale, "causal": case.causal,
        "reference": {name: getattr(expected, name).cpu() for name in
                      ("out", "lse", "out_bound", "lse_bound", "sharp_out", "sharp_lse", "has_key")},
    }, folder / "inputs.pt")
    (folder / "case.json").write_text(json.dumps({
        "implementation": impl.spec, "implementation_name": impl.name, "property": prop_name,
        "signature": failure.finding.signature, "kind": failure.finding.kind.value,
        "message": failure.finding.message, "case": case.to_dict(),
        # where the kernel's module was imported from: a replay from another folder still finds it
        "search_path": [root] if (root := module_root(impl.fn)) else [],
    }, indent=2) + "\n")
    (folder / "repro.py").write_text(_REPRO.format(case=case.describe(), signature=failure.finding.signature))
    return folder


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)[:40]


def load_counterexample(path: str | Path) -> dict:
    """case.json of an artifact folder (or the file itself), with the case as a DecodeCase;
    ValueError naming the file when it is not one."""
    path = Path(path)
    file = path / "case.json" if path.is_dir() else path
    try:
        meta = json.loads(file.read_text())
        meta["case"] = DecodeCase.from_dict(meta["case"])
        property_named(meta["property"])
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as error:
        raise ValueError(f"{file} is not a readable counterexample case.json ({type(error).__name__}: {error})") from None
    return meta


def replay(path: str | Path, impl: Implementation) -> CaseFailure | None:
    """Rerun the artifact's property on its case; the failure if it still fails, else None."""
    meta = load_counterexample(path)
    try:
        property_named(meta["property"]).check(impl, meta["case"])
    except CaseFailure as failure:
        return failure
    return None


_REPRO = '''"""Repro of an mla_verify counterexample: {signature}.

case: {case}
Reruns the property through mla_verify (the same check the certifier ran).
Exit codes: 0 passes now, 1 still fails, 2 cannot run (mla_verify or the kernel cannot be imported).
"""
import pathlib
import sys

try:
    from mla_verify.cli import main
except ImportError as error:
    sys.exit(print(f"cannot run: {{error}} (pip install mla-verify, or run from its checkout)", file=sys.stderr) or 2)

sys.exit(main(["replay", str(pathlib.Path(__file__).resolve().parent)] + sys.argv[1:]))
'''
