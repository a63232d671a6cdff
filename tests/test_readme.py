"""The README's commands are the ones CI and users run, so the docs cannot drift from the code."""

import re
from pathlib import Path

from mla_verify.cli import _parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README, flags=re.S)


def test_ci_runs_the_readme_test_command():
    test_command = _bash_blocks()[1].strip()
    assert test_command.startswith("python -m pytest")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in [line.strip() for line in ci], f"{test_command!r} is not a line of .ci/run"


def test_main_job_command_sets_up_and_certifies():
    setup = _bash_blocks()[0]
    assert "pip install torch==2.13.0" in setup and setup.strip().endswith("mla-verify certify")
    assert "pip install -q torch==2.13.0" in (ROOT / ".ci" / "run").read_text()


def test_documented_options_exist():
    certify = _parser()._subparsers._group_actions[0].choices["certify"]
    options = {opt for action in certify._actions for opt in action.option_strings}
    usage = README[README.index("mla-verify certify [IMPL]"):README.index("mla-verify replay PATH")]
    for option in re.findall(r"\[(--[a-z-]+)", usage):
        assert option in options, f"README documents {option}, which certify does not accept"
