"""Counterexamples as self-contained artifacts: the case, its tensors, and a standalone repro.

An artifact is a folder:
    case.json   implementation, property, failure kind and message, the case description
    inputs.pt   the exact tensors of each call (with their canary buffers), the float64 reference,
                the per-element bounds and the implementation's declared conventions
    repro.py    needs only torch and the implementation: `python repro.py` exits 1 while it fails
`mla-verify replay PATH` rebuilds the case from its description and reruns the property.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch

from mla_verify.cases import CANARY_ELEMENTS
from mla_verify.checks import CaseFailure, Implementation, expected_for
from mla_verify.decode_properties import property_named
from mla_verify.strategies import DecodeCase

__all__ = ["save_counterexample", "load_counterexample", "replay"]


def save_counterexample(directory: str | Path, impl: Implementation, prop_name: str, failure: CaseFailure) -> Path:
    """Write the artifact for `failure` under `directory`; returns its folder."""
    case = failure.case
    digest = hashlib.sha1(json.dumps(case.to_dict(), sort_keys=True).encode()).hexdigest()[:10]
    folder = Path(directory) / f"{_slug(impl.name)}-{prop_name}-{digest}"
    folder.mkdir(parents=True, exist_ok=True)
    calls = property_named(prop_name).calls(case)
    expected = expected_for(calls[0], impl.capabilities)
    caps = impl.capabilities
    torch.save({
        "calls": [{"q_buffer": c.q_buffer.cpu(), "q_shape": list(c.q.shape), "q_offset": CANARY_ELEMENTS,
                   "cache_buffer": c.cache_buffer.cpu(), "d": case.d, "block_table": c.block_table.cpu(),
                   "cache_seqlens": c.cache_seqlens.cpu()} for c in calls],
        "head_dim_v": case.head_dim_v, "softmax_scale": case.softmax_scale, "causal": case.causal,
        "device": case.device, "property": prop_name,
        "reference": {"out": expected.out.cpu(), "lse": expected.lse.cpu(), "out_bound": expected.out_bound.cpu(),
                      "lse_bound": expected.lse_bound.cpu(), "has_key": expected.has_key.cpu()},
        "lse_base": caps.lse_base, "empty_row_lse": caps.empty_row_lse, "deterministic": caps.deterministic,
    }, folder / "inputs.pt")
    (folder / "case.json").write_text(json.dumps({
        "implementation": impl.spec, "implementation_name": impl.name, "property": prop_name,
        "kind": failure.finding.kind.value, "message": failure.finding.message, "case": case.to_dict(),
    }, indent=2) + "\n")
    module, _, attr = impl.spec.partition(":")
    (folder / "repro.py").write_text(_REPRO.format(module=module, attr=attr, case=case.describe(),
                                                   kind=failure.finding.kind.value))
    return folder


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)[:40]


def load_counterexample(path: str | Path) -> dict:
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    meta = json.loads((folder / "case.json").read_text())
    meta["case"] = DecodeCase.from_dict(meta["case"])
    return meta


def replay(path: str | Path, impl: Implementation) -> CaseFailure | None:
    """Rerun the artifact's property on its case; the failure if it still fails, else None."""
    meta = load_counterexample(path)
    try:
        property_named(meta["property"]).check(impl, meta["case"])
    except CaseFailure as failure:
        return failure
    return None


_REPRO = '''"""Standalone repro of an mla_verify counterexample ({kind}).

case: {case}
Needs only torch and the implementation. Exits 1 while the implementation still fails.
"""
import math
import pathlib
import sys

import torch

from {module} import {attr} as kernel

data = torch.load(pathlib.Path(__file__).with_name("inputs.pt"), weights_only=False)
device = data["device"]


def arguments(call):
    q_buffer = call["q_buffer"].to(device)
    numel = math.prod(call["q_shape"])
    q = q_buffer[call["q_offset"]:call["q_offset"] + numel].view(call["q_shape"])
    cache_buffer = call["cache_buffer"].to(device)
    return (q, cache_buffer[..., :call["d"]], call["block_table"].to(device), call["cache_seqlens"].to(device),
            data["head_dim_v"], data["softmax_scale"]), (q_buffer, cache_buffer)


def run(call):
    args, buffers = arguments(call)
    before = [b.clone() for b in buffers]
    out, lse = kernel(*args, causal=data["causal"])
    for name, b0, b1 in zip(("q", "kv_cache"), before, buffers):
        if not torch.equal(b0.view(torch.uint8), b1.view(torch.uint8)):
            sys.exit(f"FAIL: the kernel wrote into {{name}} or its surrounding memory")
    return out.double().cpu(), lse.double().cpu()


outs = [run(call) for call in data["calls"]]
if data["property"] != "matches_reference":
    (out_a, lse_a), (out_b, lse_b) = outs
    rows = slice(0, 1) if data["property"] == "rows_independent" else slice(None)
    same = torch.equal(out_a[rows].nan_to_num(7.0), out_b[rows].nan_to_num(7.0)) and torch.equal(
        lse_a[rows].nan_to_num(7.0), lse_b[rows].nan_to_num(7.0))
    if not same:
        sys.exit(f"FAIL ({{data['property']}}): the two calls differ by up to "
                 f"{{(out_a[rows] - out_b[rows]).abs().max().item():.3g}}")
    print("passes: the two calls agree")
    sys.exit(0)

out, lse = outs[0]
ref = data["reference"]
if data["lse_base"] == "2":
    lse = lse * math.log(2)
has_key = ref["has_key"]
if (has_key[..., None] & ~out.isfinite()).any() or (has_key.permute(0, 2, 1) & ~lse.isfinite()).any():
    sys.exit("FAIL: NaN/inf in rows that see keys")
empty = ~has_key
if (empty[..., None] & (out != 0)).any() or (empty.permute(0, 2, 1) & (lse != data["empty_row_lse"])).any():
    sys.exit("FAIL: a row that sees no key must give out 0 and lse " + str(data["empty_row_lse"]))
for name, got, want, bound, mask in (("out", out, ref["out"], ref["out_bound"], has_key[..., None]),
                                     ("lse", lse, ref["lse"], ref["lse_bound"], has_key.permute(0, 2, 1))):
    error = torch.where(mask, (got - want).abs(), torch.zeros_like(got))
    ratio = torch.where(bound > 0, error / bound, torch.zeros_like(error))
    if ratio.numel() and ratio.max() > 1:
        at = tuple(int(i) for i in torch.unravel_index(ratio.argmax(), ratio.shape))
        sys.exit(f"FAIL: |{{name}} - ref| / bound = {{ratio.max().item():.3g}} at {{list(at)}}: "
                 f"{{got[at].item():.9g}} vs {{want[at].item():.9g}} (bound {{bound[at].item():.3g}})")
print("passes: out and lse within their bounds")
'''
