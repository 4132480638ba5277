"""scripts/run_notebooks.py: notebooks as tests whose passing executions the book reuses."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
from jupyter_cache import get_cache
from nbformat.v4 import new_code_cell, new_notebook

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "run_notebooks.py"


def _notebook(path: Path, *sources: str) -> Path:
    notebook = new_notebook(cells=[new_code_cell(s) for s in sources])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3"}
    nbformat.write(notebook, path)
    return path


def _run(cache: Path, *notebooks: Path, env: dict | None = None):
    return subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            str(cache),
            *map(str, notebooks),
            "--workers",
            "2",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


def _cached(cache: Path, path: Path):
    try:
        return get_cache(str(cache)).match_cache_notebook(
            nbformat.read(path, as_version=4)
        )
    except KeyError:
        return None


def test_a_failing_assert_fails_the_run_and_a_passing_notebook_is_kept_for_the_book(
    tmp_path,
):
    cache = tmp_path / ".jupyter_cache"
    good = _notebook(tmp_path / "good.ipynb", "x = 6 * 7\nprint(x)", "assert x == 42")
    bad = _notebook(tmp_path / "bad.ipynb", "y = 3", "assert y == 4, 'y is not four'")
    result = _run(cache, good, bad)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "PASSED good.ipynb" in result.stdout and "FAILED bad.ipynb" in result.stdout
    assert re.search(
        r"PASSED good.ipynb in \d+ s \(slowest: cell \d: \d+ s, cell \d", result.stdout
    )
    assert "y is not four" in result.stdout and "\x1b[" not in result.stdout
    record = _cached(cache, good)
    assert record is not None and _cached(cache, bad) is None
    outputs = get_cache(str(cache)).get_cache_bundle(record.pk).nb.cells[0].outputs
    assert outputs[0]["text"] == "42\n"  # the executed outputs, which the book renders


def test_a_notebook_that_fails_now_loses_its_earlier_passing_execution(tmp_path):
    cache = tmp_path / ".jupyter_cache"
    flaky = _notebook(
        tmp_path / "flaky.ipynb",
        "import os\nassert os.environ.get('NOTEBOOK_SHOULD_FAIL') != '1'",
    )
    assert _run(cache, flaky).returncode == 0 and _cached(cache, flaky) is not None
    failed = _run(cache, flaky, env={"NOTEBOOK_SHOULD_FAIL": "1"})
    assert failed.returncode == 1 and "FAILED flaky.ipynb" in failed.stdout
    assert _cached(cache, flaky) is None  # the book cannot show the stale success


def test_missing_notebook_is_named(tmp_path):
    result = _run(tmp_path / "cache", tmp_path / "nowhere.ipynb")
    assert result.returncode == 2 and "no such notebook" in result.stderr
