"""The project's own test runs (tests/ and properties/) use the project's Hypothesis profile:
quick under CI, else default, unless --hypothesis-profile or --mla-profile says otherwise; and one
torch intra-op thread per process: the tests' tensors are small, and two threads made them 2-4x
slower on a 2-core machine (the certifier runs its cases with one for the same reason), while
`pytest -n 2` already keeps both cores busy."""

import os

import torch
from hypothesis import settings

from mla_verify.certify.profiles import PROFILES, hypothesis_settings


def pytest_configure(config):
    torch.set_num_threads(1)
    if config.getoption("--hypothesis-profile", default=None) or config.getoption("--mla-profile", default=None):
        return
    name = "quick" if os.environ.get("CI") else "default"
    settings.register_profile(f"mla-{name}", hypothesis_settings(PROFILES[name]))
    settings.load_profile(f"mla-{name}")
