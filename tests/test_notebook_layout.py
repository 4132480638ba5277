"""The chapters' code fits the rendered page: the book's column shows 88 characters."""

from __future__ import annotations

import json
from pathlib import Path

CHAPTERS = Path(__file__).resolve().parent.parent / "chapters"
WIDTH = 88


def test_no_notebook_code_line_runs_past_the_column():
    long_lines = []
    for notebook in sorted(CHAPTERS.glob("*.ipynb")):
        cells = json.loads(notebook.read_text())["cells"]
        for number, cell in enumerate(cells):
            if cell["cell_type"] != "code":
                continue
            for line in "".join(cell["source"]).splitlines():
                if len(line) > WIDTH:
                    long_lines.append(f"{notebook.name} cell {number}: {line[:60]}...")
    assert not long_lines, (
        f"{len(long_lines)} code lines over {WIDTH} characters:\n"
        + "\n".join(long_lines)
    )


def test_every_cell_has_a_unique_id():
    """nbformat 4.5 requires cell ids (a missing one is a warning today, an error in
    future nbformat versions), and jupyter-cache and myst-nb key outputs by them."""
    problems = []
    for notebook in sorted(CHAPTERS.glob("*.ipynb")):
        cells = json.loads(notebook.read_text())["cells"]
        ids = [cell.get("id") for cell in cells]
        missing = [number for number, id_ in enumerate(ids) if not id_]
        if missing:
            problems.append(f"{notebook.name}: cells {missing} have no id")
        repeated = sorted({id_ for id_ in ids if id_ and ids.count(id_) > 1})
        if repeated:
            problems.append(f"{notebook.name}: ids {repeated} repeat")
    assert not problems, "\n".join(problems)
