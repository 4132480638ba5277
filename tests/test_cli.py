"""The command line: `python -m lmpg_utils data` and argument errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lmpg_utils import __main__ as cli
from lmpg_utils import corpora


def test_data_reports_both_corpora(capsys):
    assert cli.main(["data"]) == 0
    out = capsys.readouterr().out
    assert (
        "ding: /usr/share/trans/de-en sha256=" in out
        and "pairs=" in out
        and "'test':" in out
    )
    assert "web: " in out and "verses=" in out


def test_data_reports_a_missing_corpus_with_the_install_command(
    monkeypatch, tmp_path, capsys
):
    monkeypatch.setattr(corpora, "DING_PATH", tmp_path / "missing")
    assert cli.main(["data"]) == 1
    out = capsys.readouterr().out
    assert "ding: MISSING" in out and "apt-get install -y trans-de-en" in out
    assert "web: " in out and "verses=" in out  # the other corpus is still reported


def test_unknown_experiment_and_profile_are_rejected():
    for argv in (["run", "nope"], ["run", "lm", "--profile", "fast"]):
        with pytest.raises(SystemExit) as error:
            cli.main(argv)
        assert error.value.code == 2


def test_bad_device_and_threads_are_rejected_by_name(capsys):
    for argv, word in (
        (["run", "lm", "--device", "abacus"], "abacus"),
        (["run", "lm", "--threads", "0"], "--threads"),
    ):
        with pytest.raises(SystemExit) as error:
            cli.main(argv)
        assert error.value.code == 2 and word in capsys.readouterr().err


def test_module_entry_point_runs():
    done = subprocess.run(
        [sys.executable, "-m", "lmpg_utils", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "run" in done.stdout and "data" in done.stdout
