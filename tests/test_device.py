"""Every chapter obeys the device: nothing in ``experiments/`` pins work to the CPU, and
each experiment reports the device it ran on."""

from __future__ import annotations

import re
from pathlib import Path

import torch

EXPERIMENTS = Path(__file__).resolve().parent.parent / "lmpg_utils" / "experiments"
PINNED = re.compile(r"""torch\.device\(\s*["']cpu["']\s*\)|\.cpu\(\)""")


def test_no_experiment_pins_work_to_the_cpu():
    """A literal CPU device or ``.cpu()`` is allowed only on a line marked as reporting."""
    found = [
        f"{path.name}:{number}: {line.strip()}"
        for path in sorted(EXPERIMENTS.glob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if PINNED.search(line) and "# reporting" not in line
    ]
    assert not found, "work pinned to the CPU:\n" + "\n".join(found)


def test_the_pattern_catches_what_it_must():
    assert PINNED.search('device = torch.device("cpu")')
    assert PINNED.search("x = y.cpu()")
    assert not PINNED.search("device = runtime.get_device()")


def test_chapter_1_runs_on_the_requested_device(tmp_path, monkeypatch):
    import shutil

    from lmpg_utils import caching, configs, corpora
    from lmpg_utils.experiments import ch1_language_models as ch1

    corpora.load_bible_verses()  # parsed into the normal cache, then copied: no model
    for parsed in caching.cache_dir().glob("*.json"):
        shutil.copy(parsed, tmp_path)
    monkeypatch.setenv("LMPG_CACHE_DIR", str(tmp_path))
    tiny = configs.apply_overrides(
        ch1.PROFILES["quick"],
        ["vocab_size=500", "ngram_orders=2", "model.d_embed=16", "model.d_hidden=16",
         "lstm_steps=3", "cloze_steps=2", "batch_size=8"],
    )  # fmt: skip
    result = ch1.run(tiny, seed=0, device="cpu", progress=False)
    assert result.summary()["device"] == "cpu"
    assert next(result.lstm.parameters()).device == torch.device("cpu")
    assert result.test_perplexity["lstm"] > 1.0
