"""The code is formatted and linted with ruff (pyproject.toml's [tool.ruff]): the package,
the tests, the scripts, the benchmarks and the notebooks' code cells."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True
    )


def test_ruff_is_installed():
    assert ruff("--version").returncode == 0, (
        "ruff is missing: pip install -r requirements.txt"
    )


def test_code_is_formatted():
    done = ruff("format", "--check", ".")
    assert done.returncode == 0, f"run `ruff format .`:\n{done.stdout}{done.stderr}"


def test_lint_passes():
    done = ruff("check", "--output-format", "concise", ".")
    assert done.returncode == 0, f"ruff check found:\n{done.stdout}{done.stderr}"
