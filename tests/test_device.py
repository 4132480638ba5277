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


def test_chapter_1_runs_on_the_requested_device():
    from lmpg_utils.experiments.language_models import (
        LanguageModelConfig,
        run_language_models,
    )

    tiny = LanguageModelConfig(
        vocab_size=500,
        ngram_orders=(2,),
        d_embed=16,
        d_hidden=16,
        lstm_steps=3,
        cloze_steps=2,
        batch_size=8,
    )
    result = run_language_models(
        config=tiny, use_cache=False, progress=False, device="cpu"
    )
    assert result.summary()["device"] == "cpu"
    assert next(result.lstm.parameters()).device == torch.device("cpu")
    assert result.test_perplexity["lstm"] > 1.0
