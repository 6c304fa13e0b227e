"""Lint as tests: `pytest tests/unit` alone catches a lint or type error, with
the tools' own report as the failure message (the same checks as `make lint`)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support.testhost import REPO


@pytest.mark.parametrize("argv", [
    ["ruff", "check", "daemon", "tests"],
    ["mypy"],  # strict, on daemon/unitbox: [tool.mypy] in pyproject.toml
], ids=["ruff", "mypy-strict"])
def test_lint_passes(argv: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", *argv], cwd=REPO, capture_output=True, text=True,
                          check=False, timeout=300)
    assert done.returncode == 0, f"{' '.join(argv)} failed:\n{done.stdout}{done.stderr}"
