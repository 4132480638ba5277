"""The package docstring names every module, and README's table every experiment."""

from __future__ import annotations

from pathlib import Path

import lmpg_utils

PACKAGE = Path(lmpg_utils.__file__).resolve().parent
README = (PACKAGE.parent / "README.md").read_text()


def test_package_docstring_lists_every_module():
    modules = [p.stem for p in PACKAGE.glob("*.py") if not p.stem.startswith("__")]
    modules += [  # subpackages, and the modules inside them as ``package.module``
        name
        for package in PACKAGE.iterdir()
        if (package / "__init__.py").is_file() and package.name != "experiments"
        for name in [package.name]
        + [f"{package.name}.{p.stem}" for p in package.glob("[!_]*.py")]
    ]
    missing = [
        m for m in modules + ["experiments"] if f"``{m}``" not in lmpg_utils.__doc__
    ]
    assert not missing, f"lmpg_utils/__init__.py does not name: {', '.join(missing)}"


def test_readme_maps_every_experiment_to_its_chapter():
    experiments = [
        p.name for p in (PACKAGE / "experiments").glob("*.py") if p.stem != "__init__"
    ]
    missing = [name for name in experiments if f"experiments/{name}" not in README]
    assert not missing, f"README's chapter table lacks: {', '.join(missing)}"
