"""The code passes the linter configured in pyproject.toml ([tool.ruff]): the suite fails on a lint
error."""

import subprocess
import sys

from tests.helpers import ROOT


def test_ruff_finds_nothing():
    done = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
