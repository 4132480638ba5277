"""Cache keys follow the code: editing the package's source changes every artifact's key."""

from __future__ import annotations

import shutil

import pytest
import torch

from lmpg_utils import caching
from lmpg_utils.experiments.ch4_policy_gradient import Config
from lmpg_utils.training import save_checkpoint


@pytest.fixture
def package_copy(tmp_path):
    copy = tmp_path / "lmpg_utils"
    shutil.copytree(
        caching.PACKAGE_ROOT, copy, ignore=shutil.ignore_patterns("__pycache__")
    )
    return copy


def test_source_hash_changes_with_any_edit_of_a_copy(package_copy):
    original = caching.source_hash(package_copy)
    assert original == caching.source_hash.__wrapped__(
        caching.PACKAGE_ROOT
    )  # the copy hashes like the package
    target = package_copy / "training.py"
    target.write_text(target.read_text() + "\n# an edit\n")
    edited = caching.source_hash.__wrapped__(package_copy)
    assert edited != original
    (package_copy / "new_module.py").write_text("X = 1\n")  # a new file counts too
    assert caching.source_hash.__wrapped__(package_copy) not in {original, edited}


def test_artifact_key_depends_on_code_config_seed_and_torch(package_copy):
    config = {"d_model": 32, "steps": 10}
    key = caching.artifact_key("toy", config, seed=0, root=package_copy)
    assert key["torch"] == torch.__version__ and key["code"] == caching.source_hash(
        package_copy
    )
    assert (
        caching.artifact_key(
            "toy", dict(reversed(list(config.items()))), 0, package_copy
        )
        == key
    )
    assert caching.artifact_key("toy", config, 1, package_copy) != key
    assert caching.artifact_key("toy", {**config, "steps": 11}, 0, package_copy) != key
    (package_copy / "runtime.py").write_text("# edited\n")
    caching.source_hash.cache_clear()
    edited = caching.artifact_key("toy", config, 0, package_copy)
    assert edited["code"] != key["code"]
    assert caching.key_digest(edited) != caching.key_digest(key)
    with pytest.raises(ValueError, match="seed"):
        caching.artifact_key("toy", config, -1)
    with pytest.raises(ValueError, match="kind"):
        caching.artifact_key("a/b", config, 0)
    with pytest.raises(TypeError, match="JSON"):
        caching.artifact_key("toy", {"f": object()}, 0)


def test_trained_artifacts_are_keyed_by_this_code():
    key = Config().start_key()
    assert key["code"] == caching.source_hash() and key["torch"] == torch.__version__
    assert key["seed"] == Config().start_seed
    assert (
        Config(pg_lr=0.5).start_key() == key
    )  # fine-tuning settings do not retrain the start
    assert Config(start_seed=1).start_key() != key


def test_load_current_never_loads_a_file_made_under_another_key(tmp_path, monkeypatch):
    monkeypatch.setenv("LMPG_CACHE_DIR", str(tmp_path))
    key = caching.artifact_key("toy", {"n": 1}, 0)
    path = caching.artifact_path(key)
    assert path.parent == tmp_path and path.name.startswith("toy-")
    assert caching.load_current(path, key) is None  # missing
    model = torch.nn.Linear(2, 2)
    save_checkpoint(path, model, {"n": 1}, caching.tag({"seconds": 1.5}, key))
    loaded = caching.load_current(path, key)
    assert loaded is not None and loaded["extra"]["seconds"] == 1.5
    stale = dict(key, code="0" * 64)  # the same file asked for by other code
    with pytest.warns(UserWarning, match="other code or settings"):
        assert caching.load_current(path, stale) is None
    untagged = tmp_path / "untagged.pt"
    save_checkpoint(untagged, model, {"n": 1})
    with pytest.warns(UserWarning):
        assert caching.load_current(untagged, key) is None
    path.write_bytes(b"torn")
    with pytest.warns(UserWarning, match="unreadable"):
        assert caching.load_current(path, key) is None


@pytest.mark.skipif(caching.fcntl is None, reason="advisory locks need POSIX fcntl")
def test_exclusive_makes_a_second_trainer_wait(tmp_path):
    import threading
    import time

    path = tmp_path / "model.pt"
    order = []

    def first():
        with caching.exclusive(path):
            order.append("first in")
            time.sleep(0.4)
            order.append("first out")

    thread = threading.Thread(target=first)
    thread.start()
    while not order:
        time.sleep(0.01)
    began = time.perf_counter()
    with caching.exclusive(path):
        waited = time.perf_counter() - began
        order.append("second in")
    thread.join()
    assert order == ["first in", "first out", "second in"] and waited > 0.2
