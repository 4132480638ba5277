"""Shared test helpers."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


@pytest.fixture
def load_script():
    """Import ``scripts/<name>.py`` (the build tooling is not a package) and return the module."""

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture
def empty_model_cache(tmp_path, monkeypatch):
    """A cache directory holding only the parsed corpora (copied from the normal cache,
    parsing again takes about 45 s), so every model a test asks for is trained."""
    from lmpg_utils import caching, corpora

    corpora.load_bible_verses()
    for parsed in caching.cache_dir().glob("*.json"):
        shutil.copy(parsed, tmp_path)
    monkeypatch.setenv("LMPG_CACHE_DIR", str(tmp_path))
    return tmp_path


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from threads, and on a shared CPU extra threads stall."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
