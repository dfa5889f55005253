"""The code is linted and formatted by ruff, with the rule set in pyproject.toml: a change that breaks either fails
the suite, in the fast tier too."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUFF = Path(sys.executable).parent / "ruff"


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["check", "format"])
def test_ruff_is_clean(command):
    if not RUFF.is_file():
        pytest.fail(f"{RUFF} is missing: run scripts/setup.sh, which installs ruff")
    result = subprocess.run(
        [str(RUFF), *command, "--no-cache", "src", "tests", "scripts"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
