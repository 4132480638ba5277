"""Execute the chapter notebooks as tests, and keep the executed notebooks for the book.

Each notebook runs top to bottom in a fresh kernel (nbclient, through jupyter-cache's
own executor, the one the book build uses). Any exception, a failed ``assert``
included, fails the notebook and prints the cell and its traceback. A notebook that
passes is stored in the book's jupyter-cache, so ``make book`` afterwards renders this
very execution instead of running the notebook a second time: the book shows the
numbers the tests checked, and CI executes every notebook once, not twice. A notebook
that fails has its stored execution removed, so the book never shows a stale one.

``--workers`` notebooks run at once (each kernel inherits ``LMPG_THREADS``; set it to
cores / workers). The longest notebook, by the last measured time, starts first.

Usage: python scripts/run_notebooks.py CACHE NOTEBOOK... [--workers N] [--timeout S]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from datetime import datetime
from pathlib import Path

import nbformat

sys.path.insert(0, str(Path(__file__).resolve().parent))
import book_cache  # noqa: E402  (a sibling script)

TIMINGS = "notebook-seconds.json"  # next to the cache, kept when the cache is emptied
ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*m")


def _report(error: str) -> str:
    """The failing cell and its traceback, without nbclient's frames and colour codes."""
    text = ANSI_COLOUR.sub("", error)
    cell = text.find("An error occurred while executing the following cell")
    return text[cell:] if cell >= 0 else text


def slowest_cells(notebook: nbformat.NotebookNode, count: int = 3) -> str:
    """The ``count`` slowest code cells, as "cell N: S s" (nbclient's recorded timing)."""
    seconds = []
    for number, cell in enumerate(notebook.cells):
        timing = cell.get("metadata", {}).get("execution", {})
        began, ended = (
            timing.get("iopub.execute_input"),
            timing.get("shell.execute_reply"),
        )
        if cell.cell_type == "code" and began and ended:
            spent = datetime.fromisoformat(ended) - datetime.fromisoformat(began)
            seconds.append((spent.total_seconds(), number))
    slowest = sorted(seconds, reverse=True)[:count]
    return ", ".join(f"cell {number}: {spent:.0f} s" for spent, number in slowest)


def execute(path: str, timeout: int) -> tuple[str, str, float, str | None, str]:
    """Run one notebook in its own folder. Returns (path, the notebook as executed, as
    JSON, seconds, traceback or None, its slowest cells)."""
    from jupyter_cache.executors.utils import single_nb_execution

    notebook = nbformat.read(path, as_version=4)
    result = single_nb_execution(
        notebook,
        cwd=str(Path(path).resolve().parent),
        allow_errors=False,
        timeout=timeout,
        meta_override=True,
        record_timing=True,
    )
    slowest = slowest_cells(notebook)
    for (
        cell
    ) in notebook.cells:  # jupyter-cache hashes cell metadata: keep it as in the source
        cell.get("metadata", {}).pop("execution", None)
    error = None if result.err is None else result.exc_string or repr(result.err)
    return path, nbformat.writes(notebook), result.time, error, slowest


def _store(
    cache_dir: Path, path: str, executed: str, passed: bool, seconds: float
) -> None:
    """Put a passing execution into the book's cache; drop a stale one on failure. The
    cache matches by code cells, so the notebook as executed (not the file, which may
    have been edited meanwhile) finds its record."""
    from jupyter_cache import get_cache
    from jupyter_cache.base import CacheBundleIn

    cache = get_cache(str(cache_dir))
    notebook = nbformat.reads(executed, as_version=4)
    if not passed:
        try:
            cache.remove_cache(cache.match_cache_notebook(notebook).pk)
        except KeyError:
            pass  # nothing stored for this code
        return
    record = cache.add_nb_to_project(str(Path(path).resolve()))
    bundle = CacheBundleIn(notebook, record.uri, data={"execution_seconds": seconds})
    cache.cache_notebook_bundle(bundle, check_validity=False, overwrite=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache", type=Path, help="the book's jupyter-cache folder")
    parser.add_argument("notebooks", nargs="+", help="the .ipynb files to run")
    parser.add_argument("--workers", type=int, default=1, help="notebooks at once")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    missing = [p for p in args.notebooks if not Path(p).is_file()]
    if missing:
        parser.error(f"no such notebook: {', '.join(missing)}")

    book_cache.main(args.cache)  # empties the cache when lmpg_utils/ changed
    timings_file = args.cache.parent / TIMINGS
    timings = json.loads(timings_file.read_text()) if timings_file.is_file() else {}
    # Longest first (unknown ones count as longest), so the slowest does not start last.
    order = sorted(
        args.notebooks, key=lambda p: -timings.get(Path(p).name, float("inf"))
    )

    began = time.perf_counter()
    failed: list[str] = []
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        jobs = [pool.submit(execute, path, args.timeout) for path in order]
        for job in as_completed(jobs):
            path, executed, seconds, error, slowest = job.result()
            _store(args.cache, path, executed, error is None, seconds)
            name = Path(path).name
            if error is None:
                timings[name] = round(seconds, 1)
                print(
                    f"PASSED {name} in {seconds:.0f} s (slowest: {slowest})", flush=True
                )
            else:
                failed.append(name)
                print(
                    f"FAILED {name} after {seconds:.0f} s (slowest: {slowest})",
                    flush=True,
                )
                print(_report(error), flush=True)
    timings_file.parent.mkdir(parents=True, exist_ok=True)
    timings_file.write_text(json.dumps(timings, indent=1, sort_keys=True) + "\n")
    total = time.perf_counter() - began
    passed = len(order) - len(failed)
    print(f"{passed} of {len(order)} notebooks passed in {total:.0f} s", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
