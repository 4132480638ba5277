"""Empty jupyter-cache when the code behind the notebooks changed since it was filled.

jupyter-cache re-executes a notebook only when the notebook's own code cells change.
The book's numbers also depend on ``lmpg_utils/`` and on the pinned requirements, so
``make book`` calls this first: it keeps a stamp (the package's source hash, the torch
version and the requirements' hash) next to the cache and removes the cache when the
stamp differs, so every notebook runs again against the current code.

Usage: python scripts/book_cache.py _build/.jupyter_cache
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

import torch

from lmpg_utils.caching import source_hash

ROOT = Path(__file__).resolve().parent.parent


def code_stamp() -> str:
    requirements = hashlib.sha256((ROOT / "requirements.txt").read_bytes()).hexdigest()
    return f"lmpg_utils {source_hash()}\ntorch {torch.__version__}\nrequirements {requirements}\n"


def main(cache: Path) -> int:
    stamp = cache / "lmpg-code-stamp"
    current = code_stamp()
    if stamp.is_file() and stamp.read_text() == current:
        print(f"{cache}: executed notebooks match the current code")
        return 0
    if cache.exists():
        shutil.rmtree(cache)
        print(
            f"{cache}: lmpg_utils/ or the requirements changed; every notebook will be executed again"
        )
    cache.mkdir(parents=True)
    stamp.write_text(current)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(Path(sys.argv[1])))
