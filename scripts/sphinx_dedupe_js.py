"""Sphinx extension: drop duplicate <script> entries from each HTML page.

Sphinx 7.4's HTML builder re-adds inline scripts registered after its init with the
filename ``''`` instead of ``None`` (``prepare_writing``), so they no longer compare
equal and are written twice. For sphinx-thebe's inline config that is a
``const THEBE_JS_URL`` declared twice: an uncaught SyntaxError on every page, which
`scripts/check_pages.py` rightly treats as a page error. Loaded from `_config.yml`
(`sphinx.local_extensions`).
"""

from __future__ import annotations


def _dedupe_scripts(app, pagename, templatename, context, doctree) -> None:
    scripts = context.get("script_files")
    if not scripts:
        return
    seen: set[tuple] = set()
    unique = []
    for script in scripts:
        filename = getattr(script, "filename", script) or ""
        attributes = tuple(sorted(getattr(script, "attributes", {}).items()))
        key = (filename, attributes)
        if key not in seen:
            seen.add(key)
            unique.append(script)
    scripts[:] = unique


def setup(app):
    # Late, so that scripts other extensions add per page are already in the list.
    app.connect("html-page-context", _dedupe_scripts, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
