"""Counterexamples as self-contained artifacts: the case, its tensors, and a repro script.

An artifact is a folder:
    case.json   implementation (and its kind: "decode kernel" or "layer"), property, failure
                signature, kind and message, the case description
    inputs.pt   a decode kernel's: the exact arguments of each kernel call the property makes
                (views kept with their buffers), the float64 reference and both tiers' bounds;
                a layer's: its float64 weights, the input x [b, length, D] and the float64
                reference output; for inspection
    repro.py    `python repro.py` reruns the property on the case through mla_verify itself (the
                same code the certifier ran, never a second copy of it): exit 0 passes now,
                1 still fails, 2 cannot run
`mla-verify replay PATH` does the same as repro.py; `mla-verify check IMPL --case PATH/case.json`
judges the case by every property.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch

from mla_verify.decode.case import DecodeCase
from mla_verify.decode.checks import expected_for
from mla_verify.decode.properties import property_named
from mla_verify.certify.registry import module_root

__all__ = ["save_counterexample", "load_counterexample", "replay", "LAYER_KIND"]

LAYER_KIND = "layer"


def save_counterexample(directory: str | Path, impl: object, prop_name: str, failure: object,
                        case: object = None, device: str = "cpu") -> Path:
    """Write the artifact of one failure under `directory`; returns its folder. `failure` is a
    certify.Fault (with `case`), or an exception carrying both (`CaseFault`, a decode `CaseFailure`)."""
    fault = getattr(failure, "fault", None) or getattr(failure, "finding", None) or failure
    case = case if case is not None else failure.case
    kind = getattr(fault, "kind", "")
    kind = getattr(kind, "value", kind)
    layer = getattr(impl, "kind", "") == LAYER_KIND
    case_dict = case.to_dict()
    digest = hashlib.sha1(json.dumps(case_dict, sort_keys=True).encode()).hexdigest()[:10]
    folder = Path(directory) / f"{_slug(impl.name)}-{prop_name}-{digest}"
    folder.mkdir(parents=True, exist_ok=True)
    if layer:
        _save_layer_inputs(folder, case)
    else:
        _save_decode_inputs(folder, impl, prop_name, case)
    record = {"implementation": impl.spec, "implementation_name": impl.name,
              "implementation_kind": LAYER_KIND if layer else "decode kernel", "property": prop_name,
              "signature": fault.signature, "kind": kind, "message": fault.message, "case": case_dict,
              # where the code under test was imported from: a replay from another folder still finds it
              "search_path": [root] if (root := module_root(impl.fn)) else []}
    if layer:
        record["device"] = device
    (folder / "case.json").write_text(json.dumps(record, indent=2) + "\n")
    (folder / "repro.py").write_text(_REPRO.format(case=case.describe(), signature=fault.signature))
    return folder


def _save_decode_inputs(folder: Path, impl: object, prop_name: str, case: DecodeCase) -> None:
    calls = property_named(prop_name).calls(case)
    expected = expected_for(calls[0], impl.capabilities)
    torch.save({
        "calls": [{name: tensor.cpu() for name, tensor in c.tensors().items()} for c in calls],
        "keywords": [{k: v for k, v in c.keywords.items() if not isinstance(v, torch.Tensor)} for c in calls],
        "head_dim_v": case.head_dim_v, "softmax_scale": case.softmax_scale, "causal": case.causal and not case.sparse,
        "reference": {name: getattr(expected, name).cpu() for name in
                      ("out", "lse", "out_bound", "lse_bound", "sharp_out", "sharp_lse", "has_key")},
    }, folder / "inputs.pt")


def _save_layer_inputs(folder: Path, case: object) -> None:
    from mla_verify.reference import mla_forward

    weights, x = case.build()
    named = ({f.name: getattr(weights, f.name) for f in dataclasses.fields(weights)}
             if dataclasses.is_dataclass(weights) else dict(vars(weights)))
    torch.save({"weights": {name: t for name, t in named.items() if t is not None}, "x": x,
                "reference": mla_forward(case.config, weights, x.to(torch.float64), mode="naive")},
               folder / "inputs.pt")


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)[:40]


def load_counterexample(path: str | Path) -> dict:
    """case.json of an artifact folder (or the file itself), with the case as a DecodeCase or a
    LayerCase (`implementation_kind`); ValueError naming the file when it is not one."""
    from mla_verify.certify.halves import layer_case_from_dict, layer_property_named

    path = Path(path)
    file = path / "case.json" if path.is_dir() else path
    try:
        meta = json.loads(file.read_text())
        if meta.get("implementation_kind") == LAYER_KIND:
            meta["case"] = layer_case_from_dict(meta["case"])
            layer_property_named(meta["property"])
        else:
            meta["case"] = DecodeCase.from_dict(meta["case"])
            property_named(meta["property"])
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as error:
        raise ValueError(f"{file} is not a readable counterexample case.json ({type(error).__name__}: {error})") from None
    return meta


def replay(path: str | Path, impl: object) -> object | None:
    """Rerun the artifact's property on its case; the CaseFault if it still fails, else None."""
    from mla_verify.certify.halves import CaseFault, half_of

    meta = load_counterexample(path)
    half = half_of(impl)
    try:
        half.judge(impl, half.property_named(meta["property"]), meta["case"], meta.get("device", "cpu"))
    except CaseFault as failure:
        return failure
    return None


_REPRO = '''"""Repro of an mla_verify counterexample: {signature}.

case: {case}
Reruns the property through mla_verify (the same check the certifier ran).
Exit codes: 0 passes now, 1 still fails, 2 cannot run (mla_verify or the implementation cannot be imported).
"""
import pathlib
import sys

try:
    from mla_verify.cli import main
except ImportError as error:
    sys.exit(print(f"cannot run: {{error}} (pip install mla-verify, or run from its checkout)", file=sys.stderr) or 2)

sys.exit(main(["replay", str(pathlib.Path(__file__).resolve().parent)] + sys.argv[1:]))
'''
