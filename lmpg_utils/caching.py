"""Where trained artifacts are cached, and the keys that keep a cache honest.

A trained model is cached under a key made of everything that produced it: the
configuration, the seed, the torch version and a hash of the package's own source
(every ``*.py`` file under ``lmpg_utils/``). Editing any of that code changes the
key, so the next run trains again instead of loading weights that older code made.
The key is also stored inside the file and compared on load, so a renamed or
hand-copied file is never loaded silently either.

Parsed corpora (``corpora.py``) are keyed by the source data's checksum and the
parser version instead: parsing is not training, and re-parsing after every edit
would make a warm cache useless while writing a chapter.

The cache directory is ``LMPG_CACHE_DIR``, else ``$XDG_CACHE_HOME/lmpg``, else
``~/.cache/lmpg``. ``make test-cold`` points it at an empty temporary directory.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from . import distributed
from .distributed import SINGLE, World

try:
    import fcntl
except ImportError:  # not POSIX: no locking
    fcntl = None  # type: ignore[assignment]

PACKAGE_ROOT = Path(__file__).resolve().parent


def cache_dir() -> Path:
    """The directory where parsed corpora and trained models are cached (created if needed)."""
    root = os.environ.get("LMPG_CACHE_DIR")
    if root:
        path = Path(root)
    else:
        path = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lmpg"
    path.mkdir(parents=True, exist_ok=True)
    return path


@functools.lru_cache(maxsize=8)
def source_hash(root: Path = PACKAGE_ROOT) -> str:
    """SHA-256 (hex) over the relative path and bytes of every ``*.py`` file under ``root``.

    Files are visited in sorted order of their relative path, so the hash is the same
    on every machine and changes when any file is edited, added, renamed or removed.
    Cached per process: a notebook that edits the package must restart its kernel.
    """
    root = Path(root)
    files = sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)
    if not files:
        raise FileNotFoundError(f"no Python source files under {root}")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(b"\0")
        digest.update(path.read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()


def artifact_key(
    kind: str, config: Mapping[str, Any], seed: int, root: Path = PACKAGE_ROOT
) -> dict[str, Any]:
    """Everything that determines a trained artifact, as plain JSON-able data.

    ``config`` must be JSON-serializable (a dataclass's ``asdict``); key order does not
    matter because the key is serialized with sorted keys.
    """
    if not kind or not kind.replace("-", "").replace("_", "").isalnum():
        raise ValueError(
            f"artifact kind must be a short name of letters, digits, '-' or '_', got {kind!r}"
        )
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    try:
        json.dumps(dict(config), sort_keys=True)
    except TypeError as error:
        raise TypeError(
            f"config of {kind!r} is not JSON-serializable: {error}"
        ) from None
    return {
        "kind": kind,
        "config": json.loads(json.dumps(dict(config), sort_keys=True)),
        "seed": seed,
        "torch": str(
            torch.__version__
        ),  # a plain str: TorchVersion does not load with weights_only
        "code": source_hash(root),
    }


def key_digest(key: Mapping[str, Any]) -> str:
    """A short, stable hex digest of a key (16 hex digits of its sorted-JSON SHA-256)."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def artifact_path(key: Mapping[str, Any], suffix: str = ".pt") -> Path:
    """The cache file for ``key``: ``<cache_dir>/<kind>-<digest><suffix>``."""
    return cache_dir() / f"{key['kind']}-{key_digest(key)}{suffix}"


def key_matches(stored: Any, key: Mapping[str, Any]) -> bool:
    """Whether a key stored in a cached file equals the key the current code asks for."""
    return isinstance(stored, Mapping) and json.dumps(
        stored, sort_keys=True
    ) == json.dumps(key, sort_keys=True)


def load_current(path: Path, key: Mapping[str, Any]) -> dict | None:
    """Load a cached checkpoint (``weights_only=True``) only if it was made under ``key``.

    Returns ``None`` when the file is missing, unreadable, or carries another key in
    ``extra["cache_key"]`` (stale or foreign files are never used); the caller then
    trains and saves anew with :func:`tag`.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a torn or foreign file: retrain rather than crash
        warnings.warn(f"ignoring unreadable cache file {path}: {error}", stacklevel=2)
        return None
    stored = data.get("extra", {}).get("cache_key") if isinstance(data, dict) else None
    if not key_matches(stored, key):
        warnings.warn(
            f"ignoring cache file {path}: it was made by other code or settings",
            stacklevel=2,
        )
        return None
    return data


def tag(extra: Mapping[str, Any], key: Mapping[str, Any]) -> dict[str, Any]:
    """``extra`` metadata with the cache key added, for :func:`training.save_checkpoint`."""
    return {**dict(extra), "cache_key": dict(key)}


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Hold an advisory lock next to ``path`` while an artifact is loaded or trained.

    Two notebooks that need the same model at once (chapters 1 and 2 under parallel
    tests) then train it once: the second waits and loads what the first saved.
    Without ``fcntl`` (not POSIX) this does nothing.
    """
    if fcntl is None:
        yield
        return
    lock_path = Path(path).with_name(Path(path).name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def shared_entry(
    paths: Sequence[Path], key: Mapping[str, Any], world: World = SINGLE
) -> Iterator[list[dict | None]]:
    """Within, the cached artifacts at ``paths`` (each :func:`load_current`'s result,
    ``None`` where missing or stale) on every rank of ``world``, under the lock of the
    first path (:func:`exclusive`): what to train when something is missing, and save
    before the block ends.

    With several processes rank 0 alone locks, reads and (by the caller's choice)
    writes; it sends what it read to the other ranks, which then need no shared disk.
    """
    lock = exclusive(paths[0]) if world.is_main else contextlib.nullcontext()
    with lock:
        stored = [load_current(p, key) for p in paths] if world.is_main else None
        yield distributed.from_main(stored, world)
