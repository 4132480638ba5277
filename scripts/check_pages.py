#!/usr/bin/env python3
"""Check the built book in a real browser, offline.

Serves the site (default `_build/html`) on 127.0.0.1 with Python's http.server and
opens the landing page and every page under `chapters/` in headless Chromium, with
every host name other than 127.0.0.1 made unresolvable, so nothing can come from a
CDN. A page fails (exit status 1, one line per problem naming the page) when

* math is not typeset: fewer MathJax `mjx-container` elements than math elements in
  the page source, a MathJax error (`mjx-merror`), or raw TeX (`$$`, `\\[`, `\\(`,
  `\\begin{`) left in the visible text;
* a mermaid diagram was not turned into an SVG, or mermaid drew its error diagram;
* a markdown table is visible as text (a `|---|` separator row outside code), as
  happens when myst-nb renders a cell's markdown output as CommonMark;
* a notebook output shows an error (myst-nb's `output traceback` block, or a
  Python traceback in any output);
* the page (or any page of the site, checked statically) loads a script, style
  sheet, font, image or frame from another host, or the browser tried to fetch
  anything from another host; links (Colab, GitHub, DOIs) are fine;
* the browser reports an uncaught JavaScript error, or a local file is missing (404).

A screenshot of each page goes to `_build/screenshots/` (next to the site folder).
Usage: python scripts/check_pages.py [SITE_DIR] [--screenshots DIR] [--browser PATH]
"""

from __future__ import annotations

import argparse
import functools
import html
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from html.parser import HTMLParser
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urljoin, urlsplit

VIRTUAL_TIME_MS = 15000
PAGE_TIMEOUT_S = 60
LOCAL_HOSTS = {"127.0.0.1"}
VOID = {
    "area",
    "base",
    "br",
    "col",
    "embed",
    "hr",
    "img",
    "input",
    "link",
    "meta",
    "param",
    "source",
    "track",
    "wbr",
}
# Elements whose text is code, markup or machinery, not prose a reader sees as TeX.
NO_PROSE = {
    "script",
    "style",
    "noscript",
    "template",
    "textarea",
    "pre",
    "code",
    "kbd",
    "samp",
    "mjx-container",
    "svg",
    "math",
}
RAW_TEX = re.compile(r"\$\$|\\\[|\\\]|\\\(|\\\)|\\begin\{")
# A markdown table's separator row left as text (`|---|---|`; Sphinx turns `---` into an em dash).
RAW_TABLE = re.compile(r"\|\s*:?(?:-{3,}|\u2014|\u2013):?\s*\|")
CONSOLE = re.compile(
    r":CONSOLE[^\]]*\] \"(?P<msg>.*)\", source: (?P<src>\S*)(?: \(\d+\))?\s*$"
)


# --------------------------------------------------------------------------- HTML


class Element:
    __slots__ = ("tag", "attrs", "classes", "children", "text")

    def __init__(self, tag: str, attrs: dict[str, str]):
        self.tag = tag
        self.attrs = attrs
        self.classes = set((attrs.get("class") or "").split())
        self.children: list[Element] = []
        self.text: list[str] = []

    def iter(self):
        yield self
        for child in self.children:
            yield from child.iter()

    def all_text(self, skip: frozenset[str] = frozenset()) -> str:
        if self.tag in skip:
            return ""
        return "".join(self.text) + "".join(
            child.all_text(skip) for child in self.children
        )


class TreeBuilder(HTMLParser):
    """A forgiving HTML -> Element tree (enough for Sphinx pages and Chromium's DOM dump)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = Element("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag, attrs):
        element = Element(tag, {k: (v or "") for k, v in attrs})
        self.stack[-1].children.append(element)
        if tag not in VOID:
            self.stack.append(element)

    def handle_startendtag(self, tag, attrs):
        self.stack[-1].children.append(Element(tag, {k: (v or "") for k, v in attrs}))

    def handle_endtag(self, tag):
        for depth in range(len(self.stack) - 1, 0, -1):
            if self.stack[depth].tag == tag:
                del self.stack[depth:]
                return

    def handle_data(self, data):
        # Keep text in document order relative to children: attach to a text node.
        text_node = Element("#text", {})
        text_node.text.append(data)
        self.stack[-1].children.append(text_node)


def parse(markup: str) -> Element:
    builder = TreeBuilder()
    builder.feed(markup)
    builder.close()
    return builder.root


def visible_prose(node: Element) -> str:
    if node.tag in NO_PROSE or node.classes & {
        "highlight",
        "mermaid",
        "output",
        "cell_input",
    }:
        return ""
    if node.attrs.get("aria-hidden") == "true" or "hidden" in node.attrs:
        return ""
    return "".join(node.text) + "".join(visible_prose(child) for child in node.children)


def is_remote(url: str, base: str) -> bool:
    absolute = urljoin(base, url.strip())
    parts = urlsplit(absolute)
    if parts.scheme in {"data", "blob", "about", "javascript", "mailto"}:
        return False
    return bool(parts.hostname) and parts.hostname not in LOCAL_HOSTS


def remote_loads(root: Element, base: str) -> list[str]:
    """Resources the page itself loads from another host (not plain links)."""
    found = []
    loading_rels = {
        "stylesheet",
        "preload",
        "modulepreload",
        "prefetch",
        "icon",
        "manifest",
        "preconnect",
        "dns-prefetch",
    }
    for el in root.iter():
        urls = []
        if el.tag in {
            "script",
            "img",
            "iframe",
            "frame",
            "embed",
            "audio",
            "video",
            "source",
            "track",
            "input",
        }:
            urls.append(el.attrs.get("src", ""))
        if el.tag == "object":
            urls.append(el.attrs.get("data", ""))
        if (
            el.tag == "link"
            and set(el.attrs.get("rel", "").lower().split()) & loading_rels
        ):
            urls.append(el.attrs.get("href", ""))
        for url in filter(None, urls):
            if is_remote(url, base):
                found.append(f"<{el.tag}> loads {url}")
        if el.tag == "script" and not el.attrs.get("src"):
            body = el.all_text()
            for match in re.finditer(
                r"""(?:\bimport\s*\(?\s*|\bfrom\s*|\bimportScripts\s*\(\s*)["'](https?:)?//[^"']+["']""",
                body,
            ):
                found.append(
                    f"inline script imports {match.group(0).split(None, 1)[-1]}"
                )
            for match in re.finditer(
                r"""@import\s+(?:url\()?["']?(https?:)?//[^"')\s]+""", body
            ):
                found.append(f"inline CSS {match.group(0)}")
        if el.tag == "style":
            for match in re.finditer(
                r"""(?:@import\s+(?:url\()?|url\()\s*["']?(?:https?:)?//[^"')\s]+""",
                el.all_text(),
            ):
                found.append(f"<style> loads {match.group(0)}")
    return found


# --------------------------------------------------------------------------- server


class QuietHandler(SimpleHTTPRequestHandler):
    extensions_map = {
        **SimpleHTTPRequestHandler.extensions_map,
        ".js": "text/javascript",
        ".mjs": "text/javascript",
        ".css": "text/css",
        ".json": "application/json",
        ".svg": "image/svg+xml",
        ".woff": "font/woff",
        ".woff2": "font/woff2",
    }
    requests: list[tuple[str, int]] = []
    lock = threading.Lock()

    def log_request(self, code="-", size="-"):
        try:
            status = int(code)
        except (TypeError, ValueError):
            status = 0
        with self.lock:
            self.requests.append((self.path, status))

    def log_message(self, format, *args):  # noqa: A002 - silence the default stderr log
        pass


def serve(site: Path) -> tuple[ThreadingHTTPServer, str]:
    handler = functools.partial(QuietHandler, directory=str(site))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


# --------------------------------------------------------------------------- browser


def find_browser(explicit: str | None) -> str:
    for candidate in (
        explicit,
        os.environ.get("CHROMIUM"),
        "chromium",
        "chromium-browser",
        "google-chrome",
        "google-chrome-stable",
    ):
        if candidate and (path := shutil.which(candidate)):
            return path
    sys.exit(
        "check_pages: no Chromium found (apt-get install chromium, or set CHROMIUM=/path/to/chrome)"
    )


def run_browser(
    browser: str, url: str, screenshot: Path
) -> tuple[str, str, list[str], float]:
    """Returns the dumped DOM, the browser's log, the remote URLs the page requested, seconds."""
    with tempfile.TemporaryDirectory(prefix="check-pages-profile-") as profile:
        netlog = Path(profile) / "netlog.json"
        command = [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-quic",
            "--disable-extensions",
            "--disable-default-apps",
            "--mute-audio",
            f"--user-data-dir={profile}",
            # Any other host fails to resolve: a CDN load cannot succeed, and is logged.
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            "--enable-logging=stderr",
            "--v=0",  # console messages, uncaught errors
            f"--log-net-log={netlog}",  # every request the browser started
            f"--virtual-time-budget={VIRTUAL_TIME_MS}",
            "--window-size=1280,2000",
            f"--screenshot={screenshot}",
            "--dump-dom",
            url,
        ]
        start = time.monotonic()
        try:
            done = subprocess.run(
                command,
                capture_output=True,
                text=True,
                timeout=PAGE_TIMEOUT_S,
                errors="replace",
            )
        except subprocess.TimeoutExpired as error:
            return (
                "",
                f"TIMEOUT after {PAGE_TIMEOUT_S}s: {error}",
                [],
                time.monotonic() - start,
            )
        return (
            done.stdout,
            done.stderr,
            page_remote_requests(netlog),
            time.monotonic() - start,
        )


def page_remote_requests(netlog: Path) -> list[str]:
    """URLs on other hosts that the page (not Chromium's own background services) requested.

    A request belongs to the page when its network isolation key names the page's
    site (http://127.0.0.1); Chromium's update and account pings have none.
    """
    try:
        text = netlog.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ["(no network log written)"]
    try:
        log = json.loads(text)
    except json.JSONDecodeError:
        try:  # a log cut short lacks its closing brackets
            log = json.loads(text.rstrip().rstrip(",") + "]}")
        except json.JSONDecodeError:
            return ["(network log unreadable)"]
    start_job = (
        log.get("constants", {}).get("logEventTypes", {}).get("URL_REQUEST_START_JOB")
    )
    remote = []
    for event in log.get("events", []):
        params = event.get("params") or {}
        if event.get("type") != start_job or "url" not in params:
            continue
        page_site = str(params.get("network_isolation_key", "")).split(" ")[0]
        initiator = str(params.get("initiator", ""))
        from_page = (
            urlsplit(page_site).hostname in LOCAL_HOSTS
            or urlsplit(initiator).hostname in LOCAL_HOSTS
        )
        if from_page and is_remote(params["url"], "http://127.0.0.1/"):
            remote.append(params["url"])
    return list(dict.fromkeys(remote))


# --------------------------------------------------------------------------- checks


def check_page(
    site: Path, rel: str, base_url: str, browser: str, shots: Path
) -> tuple[list[str], str]:
    url = urljoin(base_url, rel)
    source = parse((site / rel).read_text(encoding="utf-8", errors="replace"))
    problems = remote_loads(source, url)  # the page source itself

    math_expected = sum(
        1 for el in source.iter() if "math" in el.classes and el.tag in {"span", "div"}
    )
    mermaid_expected = sum(
        1
        for el in source.iter()
        if "mermaid" in el.classes and el.tag in {"pre", "div"}
    )

    screenshot = shots / (rel.replace("/", "__").removesuffix(".html") + ".png")
    first_request = len(QuietHandler.requests)
    dom_text, log, remote_requests, seconds = run_browser(browser, url, screenshot)
    with QuietHandler.lock:
        requests = QuietHandler.requests[first_request:]
    if not dom_text.strip():
        problems.append(
            f"browser returned no DOM ({log.strip().splitlines()[-1:] or 'no output'})"
        )
        return problems, f"{seconds:.1f}s"
    dom = parse(dom_text)

    # Math.
    typeset = sum(1 for el in dom.iter() if el.tag == "mjx-container")
    if typeset < math_expected:
        problems.append(f"MathJax typeset {typeset} of {math_expected} math elements")
    for el in dom.iter():
        if el.tag == "mjx-merror":
            problems.append(
                f"MathJax error: {html.unescape(el.attrs.get('data-mjx-error') or el.all_text())[:120]}"
            )
    raw = RAW_TEX.search(visible_prose(dom))
    if raw:
        prose = visible_prose(dom)
        snippet = " ".join(prose[max(0, raw.start() - 40) : raw.end() + 40].split())
        problems.append(f"raw TeX visible: ...{snippet}...")

    # Tables: a markdown output rendered as text shows its pipes instead of a table.
    raw_table = RAW_TABLE.search(visible_prose(dom))
    if raw_table:
        prose = visible_prose(dom)
        snippet = " ".join(
            prose[max(0, raw_table.start() - 60) : raw_table.end() + 20].split()
        )
        problems.append(f"raw markdown table visible: ...{snippet}...")

    # Mermaid.
    drawn = 0
    for el in dom.iter():
        if "mermaid" in el.classes and el.tag in {"pre", "div"}:
            svgs = [child for child in el.iter() if child.tag == "svg"]
            if not svgs or el.attrs.get("data-mermaid-render-failed") == "true":
                problems.append(
                    "mermaid diagram not rendered to SVG: "
                    + " ".join(el.all_text().split())[:80]
                )
            elif (
                any(svg.attrs.get("aria-roledescription") == "error" for svg in svgs)
                or "Syntax error in text" in el.all_text()
            ):
                problems.append("mermaid drew its syntax-error diagram")
            else:
                drawn += 1
    if drawn < mermaid_expected and not any("mermaid" in p for p in problems):
        problems.append(f"mermaid rendered {drawn} of {mermaid_expected} diagrams")

    # Notebook errors: myst-nb renders an error output as `<div class="output traceback ...">`.
    tracebacks = [el for el in dom.iter() if {"output", "traceback"} <= el.classes]
    for el in tracebacks:
        lines = [
            line
            for line in el.all_text(frozenset({"button"})).strip().splitlines()
            if line.strip()
        ]
        problems.append(
            "notebook error output: "
            + (lines[-1].strip()[:160] if lines else "(empty traceback)")
        )
    if not tracebacks and any(
        el.classes & {"output", "cell_output"}
        and "Traceback (most recent call last)" in el.all_text()
        for el in dom.iter()
    ):
        problems.append("Python traceback in a cell output")

    # What the browser did.
    for remote_url in remote_requests:
        problems.append(f"requested a non-local URL: {remote_url}")
    for line in log.splitlines():
        match = CONSOLE.search(line)
        if not match:
            continue
        message, src = match.group("msg"), match.group("src")
        if (
            message.startswith("Uncaught")
            or "Failed to fetch dynamically imported module" in message
            or "Failed to load module script" in message
        ):
            problems.append(f"JavaScript error: {message[:160]} ({src})")
    for path, status in requests:
        if status >= 400 and not path.startswith("/favicon.ico"):
            problems.append(f"HTTP {status} for {path}")
    problems = list(dict.fromkeys(problems))

    summary = (
        f"math {typeset}/{math_expected} typeset, mermaid {drawn}/{mermaid_expected} drawn, "
        f"{len(requests)} local and {len(remote_requests)} remote requests, {seconds:.1f}s, screenshot {screenshot}"
    )
    return problems, summary


def landing_page(site: Path) -> str:
    index = site / "index.html"
    if index.is_file():
        refresh = re.search(
            r"""http-equiv=["']?refresh["']?\s+content=["'][^"']*url=([^"'>\s]+)""",
            index.read_text(encoding="utf-8", errors="replace"),
            re.I,
        )
        target = refresh.group(1) if refresh else "index.html"
        if (site / target).is_file():
            return target
    return "index.html"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("site", nargs="?", default="_build/html", type=Path)
    parser.add_argument(
        "--screenshots", type=Path, default=None, help="default: SITE/../screenshots"
    )
    parser.add_argument(
        "--browser",
        default=None,
        help="Chromium executable (default: $CHROMIUM or chromium)",
    )
    args = parser.parse_args(argv)

    site = args.site.resolve()
    if not (site / "index.html").is_file():
        print(f"check_pages: FAIL no built site at {site} (run `make book`)")
        return 1
    shots = (args.screenshots or site.parent / "screenshots").resolve()
    shots.mkdir(parents=True, exist_ok=True)
    browser = find_browser(args.browser)

    start = time.monotonic()
    failures = 0
    pages = [landing_page(site)] + sorted(
        p.relative_to(site).as_posix() for p in (site / "chapters").glob("*.html")
    )
    # The other pages (search, index, ...) statically: nothing may be loaded from another host.
    for page in sorted(site.rglob("*.html")):
        rel = page.relative_to(site).as_posix()
        if rel.startswith("_static/") or rel in pages:
            continue
        problems = remote_loads(
            parse(page.read_text(encoding="utf-8", errors="replace")),
            "http://127.0.0.1/" + rel,
        )
        for problem in problems:
            print(f"FAIL {rel}: {problem}")
        failures += bool(problems)

    server, base_url = serve(site)
    try:
        for rel in pages:
            problems, summary = check_page(site, rel, base_url, browser, shots)
            if problems:
                failures += 1
                for problem in problems:
                    print(f"FAIL {rel}: {problem}")
                print(f"     {rel}: {summary}")
            else:
                print(f"ok   {rel}: {summary}")
    finally:
        server.shutdown()
    elapsed = time.monotonic() - start
    if not (site / "chapters").is_dir():
        print("note: no chapters/ pages in the site; only the landing page was checked")
    print(
        f"check_pages: {len(pages)} pages opened in {elapsed:.0f}s, "
        + (f"{failures} pages FAILED" if failures else "all passed")
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
