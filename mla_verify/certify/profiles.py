"""Hypothesis profiles: quick (CI), default, thorough; and the case-size limits each one allows,
for decode cases (`CaseLimits`) and for whole-layer cases (`LayerLimits`).

Built on Hypothesis's own 'ci' profile when the CI environment variable is set (derandomised, no
example database); otherwise the example database is on, so a failure is replayed first next time.
No deadline anywhere: a kernel's first call compiles.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from hypothesis import HealthCheck, Phase, settings

from mla_verify.decode.strategies import CaseLimits

__all__ = ["Profile", "LayerLimits", "PROFILES", "hypothesis_settings"]


@dataclass(frozen=True)
class LayerLimits:
    """Size caps of a whole-layer case: heads, every width (d_c, d_r, d_n, d_v, q-LoRA rank; presets
    are shrunk to them) and the sequence length (prefill plus every decode step). A layer case runs
    the float64 reference and its error bound over the whole sequence, so these stay small on a CPU."""

    max_heads: int = 4
    max_width: int = 16
    max_length: int = 80


@dataclass(frozen=True)
class Profile:
    name: str
    max_examples: int
    limits: CaseLimits
    # steer the search toward the largest observed/bound ratio (Hypothesis `target`)
    targeted: bool = False
    layer: LayerLimits = LayerLimits()


# Every profile draws a share of serving-scale cases (batches to 128, contexts to 32k tokens,
# s_q to 8) under a work cap b·s_q·h·d·L that keeps the float64 reference within the profile's
# time: on a CPU a 32k-token case then has few heads or a narrow width, on the GPU (thorough) any.
PROFILES = {
    "quick": Profile("quick", 25, CaseLimits(max_len=300, max_batch=3, max_s_q=3, max_work=10_000_000,
                                             serving_share=0.1, serving_len=16384, serving_work=5_000_000),
                     layer=LayerLimits(max_heads=4, max_width=16, max_length=80)),
    "default": Profile("default", 100, CaseLimits(max_len=600, max_batch=4, max_s_q=4, max_work=40_000_000,
                                                  serving_share=0.2, serving_work=20_000_000),
                       layer=LayerLimits(max_heads=8, max_width=32, max_length=160)),
    # serving scale, sized for a GPU: the work cap trades batch against length (b=128 × h=128 ×
    # d=576 still reaches ~200 tokens; h=16 at b=4 reaches 32k)
    "thorough": Profile("thorough", 1000, CaseLimits(max_len=32768, max_batch=128, max_s_q=8,
                                                     max_work=2_000_000_000, serving_share=0.5,
                                                     serving_len=65536, serving_work=2_000_000_000),
                        targeted=True, layer=LayerLimits(max_heads=32, max_width=128, max_length=600)),
}


def hypothesis_settings(profile: Profile, max_examples: int | None = None) -> settings:
    parent = settings.get_profile("ci") if os.environ.get("CI") else settings.default
    # no explain phase: it reruns a shrunk failure ~100 times and its output is not used
    skipped = {Phase.explain} if profile.targeted else {Phase.explain, Phase.target}
    phases = tuple(p for p in Phase if p not in skipped)
    return settings(parent, max_examples=max_examples or profile.max_examples, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture],
                    report_multiple_bugs=True, phases=phases, print_blob=True)
