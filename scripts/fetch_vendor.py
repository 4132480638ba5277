#!/usr/bin/env python3
"""Fetch MathJax and mermaid from the npm registry for an offline book.

The built site must not load any script from a CDN, so the two browser libraries
the book needs are taken from pinned npm tarballs and unpacked into

    <dest>/npm/      the downloaded tarballs (a cache: not fetched again)
    <dest>/static/   what `_config.yml` lists in `html_static_path`; Sphinx copies it
                     to `_build/html/_static/`, so the files end up at
                     `_static/vendor/mathjax/...` and `_static/vendor/mermaid/...`

Only the files a browser needs are unpacked (plus each project's LICENSE). The
tarballs are checked against pinned SHA-256 sums. `npm pack` is used when npm is
installed (it goes through npm's own cache, `npm config get cache`); otherwise the
tarball is downloaded from https://registry.npmjs.org with urllib.

Usage: python3 scripts/fetch_vendor.py [DEST]   (default: build/vendor)
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path

# name -> (version, sha256 of the npm tarball, files to keep: tarball path prefixes
#          relative to the package's root, mapped below `static/vendor/<name>/`)
PACKAGES = {
    "mathjax": (
        "3.2.2",
        "1b9c0a1c44df864e915690558e72adb9cc5203360daefd385084ced3b6c64c09",
        # es5/ becomes the root: tex-mml-chtml.js loads its components and fonts
        # relative to its own URL.
        {
            "LICENSE": "LICENSE",
            "es5/tex-mml-chtml.js": "tex-mml-chtml.js",
            "es5/input/": "input/",
            "es5/output/chtml/": "output/chtml/",
            "es5/ui/": "ui/",
            "es5/a11y/": "a11y/",
            "es5/sre/": "sre/",
            "es5/adaptors/": "adaptors/",
        },
    ),
    "mermaid": (
        # The version sphinxcontrib-mermaid 2.1.1 defaults to; it imports the ES module.
        "11.12.1",
        "3bd65ddefe97fb2e01d976a01d4078f8d773bfc56c6a75a9abf08b564ce0f8b2",
        {
            "LICENSE": "LICENSE",
            "dist/mermaid.esm.min.mjs": "mermaid.esm.min.mjs",
            "dist/chunks/mermaid.esm.min/": "chunks/mermaid.esm.min/",
        },
    ),
}
SKIP_SUFFIXES = (".map", ".d.ts", ".md")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch(name: str, version: str, digest: str, cache: Path) -> Path:
    tarball = cache / f"{name}-{version}.tgz"
    if tarball.is_file() and sha256(tarball) == digest:
        return tarball
    cache.mkdir(parents=True, exist_ok=True)
    npm = shutil.which("npm")
    if npm:
        print(f"fetch_vendor: npm pack {name}@{version}", flush=True)
        subprocess.run(
            [
                npm,
                "pack",
                f"{name}@{version}",
                "--pack-destination",
                str(cache),
                "--silent",
                "--prefer-offline",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    else:
        url = f"https://registry.npmjs.org/{name}/-/{name}-{version}.tgz"
        print(f"fetch_vendor: npm not found, downloading {url}", flush=True)
        with urllib.request.urlopen(url, timeout=120) as response:
            tarball.write_bytes(response.read())
    got = sha256(tarball)
    if got != digest:
        tarball.unlink()
        sys.exit(f"fetch_vendor: {tarball.name} has sha256 {got}, expected {digest}")
    return tarball


def unpack(tarball: Path, keep: dict[str, str], target: Path) -> int:
    if target.exists():
        shutil.rmtree(target)
    count = 0
    with tarfile.open(tarball, "r:gz") as archive:
        for member in archive.getmembers():
            if not member.isfile() or not member.name.startswith("package/"):
                continue
            inner = member.name[len("package/") :]
            if inner.endswith(SKIP_SUFFIXES):
                continue
            for prefix, mapped in keep.items():
                if inner == prefix or (
                    prefix.endswith("/") and inner.startswith(prefix)
                ):
                    rel = mapped + inner[len(prefix) :]
                    break
            else:
                continue
            out = (target / rel).resolve()
            if target.resolve() not in out.parents:
                sys.exit(
                    f"fetch_vendor: refusing to write outside {target}: {member.name}"
                )
            out.parent.mkdir(parents=True, exist_ok=True)
            with archive.extractfile(member) as source:
                out.write_bytes(source.read())
            count += 1
    return count


def main(argv: list[str]) -> int:
    dest = Path(argv[1] if len(argv) > 1 else "build/vendor")
    static = dest / "static" / "vendor"
    for name, (version, digest, keep) in PACKAGES.items():
        tarball = fetch(name, version, digest, dest / "npm")
        count = unpack(tarball, keep, static / name)
        print(f"fetch_vendor: {name}@{version}: {count} files in {static / name}")
    # The Makefile's stamp; a dotfile, so Sphinx does not copy it into the site.
    stamp = dest / "static" / ".complete"
    stamp.write_text("".join(f"{n}@{v[0]} {v[1]}\n" for n, v in PACKAGES.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
