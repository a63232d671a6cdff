"""Soundness of the layer bounds at scale: correct layers never exceed a stage bound, the end-to-end
sound bound, the sharp tolerance, or the absorbed-vs-naive bounds.

Slow: `python -m pytest -m slow tests/test_layer_soundness.py -s` (LAYER_SOUNDNESS_CASES cases per
test, 1000 by default, drawn from LAYER_SOUNDNESS_SEED; the tests are independent and can run side
by side). The layers are the
project's fast layer (PyTorch decode kernel, 16-token pages) in float64, float32, bf16 and fp16, and
HF's eager DeepseekV3Attention in bf16; each runs both layer properties (matches_reference,
absorbed_matches_naive) on cases drawn like a certificate's (configs drawn and presets shrunk, page
edges, weight and activation scales). Each test prints its count and the largest ratio per tier and
stage, for BENCHMARKS.md; a failure is a LayerFailure with its replay command.
"""

import os
import time
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, seed, settings

from mla_verify.layer import LAYER_PROPERTIES, LayerCase, LayerReport, layer_cases, unsupported_reason

CASES = int(os.environ.get("LAYER_SOUNDNESS_CASES", "1000"))
SEED = int(os.environ.get("LAYER_SOUNDNESS_SEED", "20261202"))
FAST = "mla_verify.impls.fast_layer:fast_layer_torch_decode"
HF_EAGER = "mla_verify.adapters.hf:deepseek_v3_eager"
LAYERS = [(FAST, dtype) for dtype in ("float64", "float32", "bfloat16", "float16")] + [(HF_EAGER, "bfloat16")]


@dataclass
class Largest:
    """The largest ratio per tier and stage over the cases run, with the case of the largest."""

    cases: int = 0
    ratios: dict[str, float] = field(default_factory=dict)
    where: dict[str, LayerCase] = field(default_factory=dict)

    def add(self, report: LayerReport, case: LayerCase) -> None:
        self.cases += 1
        values = {"sound (end to end)": report.end_to_end, "sharp": report.sharp_ratio,
                  **{f"stage {name}": ratio for name, ratio in report.stages.items()}}
        for name, ratio in values.items():
            if ratio >= self.ratios.get(name, -1.0):
                self.ratios[name], self.where[name] = ratio, case

    def summary(self) -> str:
        return "; ".join(f"{name} {ratio:.3g}" for name, ratio in sorted(self.ratios.items()))


def soundness_run(spec: str, dtype: str, prop: str, cases: int = CASES, run_seed: int = SEED) -> Largest:
    """Run `prop` on `cases` drawn cases of one layer and dtype; a LayerFailure propagates."""
    largest = Largest()

    @settings(max_examples=cases, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @seed(run_seed)
    @given(case=layer_cases(dtypes=(dtype,), max_width=24, max_length=40))
    def one(case: LayerCase) -> None:
        if unsupported_reason(spec, case.config) is not None:
            return
        largest.add(LAYER_PROPERTIES[prop](spec, case, "cpu"), case)

    one()
    return largest


@pytest.mark.slow
@pytest.mark.parametrize("prop", sorted(LAYER_PROPERTIES))
@pytest.mark.parametrize("spec,dtype", LAYERS, ids=[f"{spec.rpartition(':')[2]}-{dtype}" for spec, dtype in LAYERS])
def test_correct_layer_never_exceeds_a_bound(spec, dtype, prop):
    if spec == HF_EAGER:
        pytest.importorskip("transformers", minversion="5")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    started = time.perf_counter()
    try:
        largest = soundness_run(spec, dtype, prop)
    finally:
        torch.set_num_threads(threads)
    print(f"\nlayer soundness {spec.rpartition(':')[2]} {dtype} {prop}: {largest.cases} cases, "
          f"{time.perf_counter() - started:.0f} s; largest ratios: {largest.summary()}")
    assert largest.cases >= CASES // 2  # unsupported configs are skipped, never most of them
