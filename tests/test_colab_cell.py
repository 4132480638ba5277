"""Every chapter starts with the same Colab set-up cell, generated from _config.yml."""

from __future__ import annotations

import json


def test_every_chapter_starts_with_the_generated_cell(load_script):
    colab_cell = load_script("colab_cell")
    assert len(colab_cell.chapters()) >= 4
    assert colab_cell.main(["colab_cell.py", "--check"]) == 0


def test_the_cell_follows_config_and_stays_within_the_page(
    load_script, tmp_path, monkeypatch
):
    colab_cell = load_script("colab_cell")
    url, branch = colab_cell.repository()
    source = colab_cell.cell_source()
    assert f"git+{url}@{branch}" in source and 'data", "--install' in source
    assert max(len(line) for line in source.splitlines()) <= 88
    monkeypatch.setattr(
        colab_cell, "repository", lambda: ("https://example.org/fork/lmpg", "dev")
    )
    assert "git+https://example.org/fork/lmpg@dev" in colab_cell.cell_source()
    # a notebook whose cell was generated from the old URL is now stale; --write fixes it
    notebook = tmp_path / "chapters" / "99_x.ipynb"
    notebook.parent.mkdir()
    original = json.loads(colab_cell.chapters()[0].read_text(encoding="utf-8"))
    notebook.write_text(json.dumps(original), encoding="utf-8")
    monkeypatch.setattr(colab_cell, "chapters", lambda: [notebook])
    assert colab_cell.stale(notebook)
    colab_cell.write(notebook)
    assert not colab_cell.stale(notebook)
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    assert len(cells) == len(original["cells"])  # replaced in place, not inserted again
