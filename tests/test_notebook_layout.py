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
