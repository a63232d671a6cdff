"""The project's own test runs (tests/ and properties/) use the project's Hypothesis profile:
quick under CI, else default, unless --hypothesis-profile or --mla-profile says otherwise."""

import os

from hypothesis import settings

from mla_verify.certify.profiles import PROFILES, hypothesis_settings


def pytest_configure(config):
    if config.getoption("--hypothesis-profile", default=None) or config.getoption("--mla-profile", default=None):
        return
    name = "quick" if os.environ.get("CI") else "default"
    settings.register_profile(f"mla-{name}", hypothesis_settings(PROFILES[name]))
    settings.load_profile(f"mla-{name}")
