"""Real corpora, read at run time from the Debian packages that install them.

Three corpora back the book:

* **German-English sentence pairs** from the Ding dictionary (Debian ``trans-de-en``,
  GPL-2+, file ``/usr/share/trans/de-en``). The dictionary is not redistributed here:
  it is parsed where the package installed it.
* **Ordered modern English** from the World English Bible (Debian ``sword-text-web``,
  public domain), read with PyPI's ``pysword``. The SWORD module is found through its
  ``.conf`` (``engWEB2015eb`` on Debian 12, ``engweb2025eb`` later, whose lower-case
  ``DataPath`` is matched case-insensitively). Verses keep their book, chapter and
  verse ids, in canonical order, so consecutive verses are true next sentences.
* **Spanish** from the Reina-Valera 1909 (Debian ``sword-text-sparv``, public domain,
  module ``spaRV1909eb``), read like the WEB and aligned with it verse by verse
  (:func:`load_verse_pairs`) for chapter 4's translation task.

Parsed corpora are cached as JSON in a user cache directory (``LMPG_CACHE_DIR``, else
``$XDG_CACHE_HOME/lmpg``, else ``~/.cache/lmpg``), keyed by a checksum of the source
files and the parser version, so a changed source is parsed again.

Splits (``train``/``valid``/``test``) are assigned by a SHA-256 hash of a stable key,
never Python's salted ``hash``, so they are identical on every machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .caching import cache_dir

DING_PATH = Path("/usr/share/trans/de-en")
SWORD_ROOT = Path("/usr/share/sword")
WEB_MODULE_PATTERN = r"engweb\d{4}eb"  # engWEB2015eb on Debian 12, engweb2025eb later
SPANISH_MODULE_PATTERN = r"sparv\d{4}eb"  # spaRV1909eb: Reina-Valera 1909
SPLITS: tuple[str, ...] = ("train", "valid", "test")
SPLIT_FRACTIONS: tuple[float, float, float] = (0.90, 0.05, 0.05)
PARSER_VERSION = "2"

DEBIAN_PACKAGES = {
    "ding": "trans-de-en",
    "web": "sword-text-web",
    "rv1909": "sword-text-sparv",
}
# name -> (module name pattern, conf Abbreviation, Debian package)
BIBLES = {
    "web": (WEB_MODULE_PATTERN, "WEB", DEBIAN_PACKAGES["web"]),
    "rv1909": (SPANISH_MODULE_PATTERN, "RV1909", DEBIAN_PACKAGES["rv1909"]),
}


class DataMissingError(FileNotFoundError):
    """A corpus is not installed; the message carries the exact command that installs it."""


class CorpusFormatError(ValueError):
    """A corpus file exists but cannot be used (empty, or nothing parseable in it)."""


def install_command(*packages: str) -> str:
    """The shell command that installs the given Debian packages."""
    names = " ".join(packages or DEBIAN_PACKAGES.values())
    return f"sudo apt-get update && sudo apt-get install -y {names}"


def ensure_debian_packages(auto_install: bool = True) -> dict[str, bool]:
    """Make sure every corpus (Ding, the WEB, the Reina-Valera 1909) is installed.

    When a package is missing and we are root on a Debian/Ubuntu system (CI, Colab),
    install it with apt-get. Otherwise raise :class:`DataMissingError` naming the exact
    command to run. Returns which packages were installed by this call.
    """
    missing = []
    if not DING_PATH.is_file():
        missing.append(DEBIAN_PACKAGES["ding"])
    for bible in BIBLES:
        try:
            _bible_paths(SWORD_ROOT, bible)
        except DataMissingError:
            missing.append(BIBLES[bible][2])
    installed = {name: False for name in DEBIAN_PACKAGES.values()}
    if not missing:
        return installed
    can_install = (
        auto_install and shutil.which("apt-get") is not None and os.geteuid() == 0
    )
    if not can_install:
        raise DataMissingError(
            f"missing Debian package(s) {', '.join(missing)}; install with:\n  {install_command(*missing)}"
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env)
    for name in missing:
        installed[name] = True
    return installed


# ---------------------------------------------------------------------------------
# Splits and cache


def split_of(key: str, fractions: Sequence[float] = SPLIT_FRACTIONS) -> str:
    """Assign ``key`` to ``train``, ``valid`` or ``test`` by a stable SHA-256 hash."""
    if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-9 or min(fractions) < 0:
        raise ValueError(
            f"fractions must be three non-negative numbers summing to 1, got {fractions}"
        )
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64
    if position < fractions[0]:
        return "train"
    if position < fractions[0] + fractions[1]:
        return "valid"
    return "test"


def check_split(name: str) -> str:
    """Return ``name`` if it is a valid split name, else raise ``ValueError``."""
    if name not in SPLITS:
        raise ValueError(
            f"unknown split {name!r}; valid splits are: {', '.join(SPLITS)}"
        )
    return name


def checksum(paths: Iterable[Path]) -> str:
    """SHA-256 over the bytes of ``paths`` (sorted), as hex."""
    digest = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _cached(name: str, source_sum: str, build):
    path = cache_dir() / f"{name}-{PARSER_VERSION}-{source_sum[:16]}.json"
    if path.is_file():
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            path.unlink()  # a torn write: rebuild below
    data = build()
    # one temporary file per process: the ranks of a torchrun may parse at once
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    tmp.replace(path)
    return data


# ---------------------------------------------------------------------------------
# Ding: German-English sentence pairs


@dataclass(frozen=True)
class TranslationPair:
    """One German sentence and its English translation, with the dictionary line it came from."""

    de: str
    en: str
    line: int

    @property
    def split(self) -> str:
        """The split this pair belongs to (keyed by the German side, so a source never leaks)."""
        return split_of("de:" + self.de)


@dataclass
class ParseReport:
    """What a parser kept and what it skipped, with reasons, so nothing is dropped silently."""

    source: str
    lines: int = 0
    entries: int = 0
    malformed: int = 0
    unaligned: int = 0
    sub_entries: int = 0
    kept: int = 0
    duplicates: int = 0
    first_malformed: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.source}: {self.lines} lines, {self.entries} entries, {self.sub_entries} aligned sub-entries; "
            f"kept {self.kept} sentence pairs; skipped {self.malformed} malformed lines, "
            f"{self.unaligned} entries whose sides do not align, {self.duplicates} duplicates"
        )


_ANNOTATION = re.compile(r"\{[^{}]*\}|\[[^\[\]]*\]|\([^()]*\)|<[^<>]*>")
_SPACE = re.compile(r"\s+")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([.,;:!?])")


def clean_ding_text(text: str) -> str:
    """First ``;`` alternative of a Ding sub-entry with annotations removed.

    Annotations are ``{m}``-style grammar tags, ``[coll.]``-style usage or domain
    labels, ``(...)`` explanations and ``<...>`` spelling variants; they are removed
    repeatedly so nested brackets go too.
    """
    first = text.split(";")[0]
    previous = None
    while previous != first:
        previous, first = first, _ANNOTATION.sub(" ", first)
    first = _SPACE.sub(" ", first).strip()
    return _SPACE_BEFORE_PUNCT.sub(r"\1", first)


def is_sentence(text: str, min_words: int = 3) -> bool:
    """A sentence starts with a capital letter, ends in . ? or ! and has ``min_words`` words."""
    return (
        len(text) > 1
        and text[0].isupper()
        and text[-1] in ".?!"
        and len(text.split()) >= min_words
    )


def parse_ding(
    path: Path | str = DING_PATH, min_words: int = 3
) -> tuple[list[TranslationPair], ParseReport]:
    """Parse the Ding dictionary into unique German-English sentence pairs.

    Rules, in order:

    1. Lines starting with ``#`` and blank lines are skipped (header and comments).
    2. A line is ``German side :: English side``; a line without exactly one ``::``
       is malformed (counted, the first few kept in the report).
    3. Each side holds sub-entries separated by `` | ``, aligned by position. When the
       counts differ the entry cannot be aligned and is skipped (counted).
    4. From each sub-entry take the first ``;`` alternative and strip annotations
       (see :func:`clean_ding_text`).
    5. Keep the pair when both sides are sentences (:func:`is_sentence`).
    6. Keep the first occurrence of each (German, English) pair.

    Raises :class:`DataMissingError` when the file is missing and
    :class:`CorpusFormatError` when it is empty or yields no pair.
    """
    path = Path(path)
    if not path.is_file():
        raise DataMissingError(
            f"Ding dictionary not found at {path}; install with:\n  {install_command(DEBIAN_PACKAGES['ding'])}"
        )
    report = ParseReport(source=str(path))
    pairs: list[TranslationPair] = []
    seen: set[tuple[str, str]] = set()
    with open(path, encoding="utf-8") as handle:
        for number, raw in enumerate(handle, start=1):
            report.lines += 1
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            sides = line.split(" :: ")
            if len(sides) != 2:
                report.malformed += 1
                if len(report.first_malformed) < 5:
                    report.first_malformed.append(f"{path}:{number}: {line[:80]}")
                continue
            report.entries += 1
            german, english = (side.split(" | ") for side in sides)
            if len(german) != len(english):
                report.unaligned += 1
                continue
            for de_raw, en_raw in zip(german, english, strict=True):
                report.sub_entries += 1
                de, en = clean_ding_text(de_raw), clean_ding_text(en_raw)
                if not (is_sentence(de, min_words) and is_sentence(en, min_words)):
                    continue
                if (de, en) in seen:
                    report.duplicates += 1
                    continue
                seen.add((de, en))
                pairs.append(TranslationPair(de, en, number))
    if report.lines == 0:
        raise CorpusFormatError(f"{path} is empty")
    if not pairs:
        raise CorpusFormatError(
            f"{path}: no sentence pairs found in {report.lines} lines ({report.summary()})"
        )
    report.kept = len(pairs)
    return pairs, report


def load_translation_pairs(
    split: str | None = None, path: Path | str = DING_PATH, max_words: int | None = None
) -> list[TranslationPair]:
    """German-English sentence pairs (cached), optionally one split and at most ``max_words`` a side."""
    if split is not None:
        check_split(split)
    path = Path(path)
    if not path.is_file():
        raise DataMissingError(
            f"Ding dictionary not found at {path}; install with:\n  {install_command(DEBIAN_PACKAGES['ding'])}"
        )

    def build():
        pairs, report = parse_ding(path)
        return {"pairs": [asdict(p) for p in pairs], "report": asdict(report)}

    data = _cached("ding", checksum([path]), build)
    pairs = [TranslationPair(**p) for p in data["pairs"]]
    if max_words is not None:
        pairs = [
            p
            for p in pairs
            if len(p.de.split()) <= max_words and len(p.en.split()) <= max_words
        ]
    if split is not None:
        pairs = [p for p in pairs if p.split == split]
    return pairs


# ---------------------------------------------------------------------------------
# World English Bible: ordered verses


def chapter_split(book: str, chapter: int) -> str:
    """The split of a Bible chapter: the same for every Bible, so a held-out chapter is
    held out in every chapter of the book."""
    return split_of(f"web:{book}:{chapter}")


@dataclass(frozen=True)
class Verse:
    """One verse with its canonical position. ``index`` is its rank in canonical order."""

    book: str
    chapter: int
    verse: int
    text: str
    index: int

    @property
    def split(self) -> str:
        """Split by chapter, so the verses of one chapter (and its NSP pairs) stay together."""
        return chapter_split(self.book, self.chapter)


_NOTE = re.compile(r"<note\b[^>]*>.*?</note>", re.DOTALL)
_TITLE = re.compile(r"<title\b[^>]*>.*?</title>", re.DOTALL)
_TAG = re.compile(r"<[^>]+>")


def clean_osis(markup: str) -> str:
    """Plain text from a verse's OSIS markup without gluing words together.

    Drops everything after a chapter-end marker (the module appends its glossary to
    the last verse of Revelation after ``<chapter eID="Rev.22"/>``), drops ``<note>``
    and ``<title>`` elements with their content, replaces every other tag by a space,
    then normalises spaces, including those before punctuation.
    """
    end_of_chapter = markup.find("<chapter eID=")
    if end_of_chapter >= 0:
        markup = markup[:end_of_chapter]
    text = _TITLE.sub(" ", _NOTE.sub(" ", markup))
    text = _TAG.sub(" ", text)
    text = text.replace("\u00b6", " ")  # pilcrow paragraph marks
    text = _SPACE.sub(" ", text).strip()
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", text)
    return re.sub(r"([\u201c\u2018(])\s+", r"\1", text)


def _read_conf(conf: Path) -> tuple[str, dict[str, str]]:
    """A SWORD ``.conf``: its ``[ModuleName]`` and its ``Key=Value`` entries (first value wins)."""
    name, entries = "", {}
    for line in conf.read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]") and not name:
            name = line[1:-1].strip()
        elif "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            entries.setdefault(key.strip(), value.strip())
    return name, entries


def _resolve_case_insensitively(root: Path, relative: str) -> Path | None:
    """``root / relative``, matching each path component case-insensitively; None if absent."""
    path = root
    for part in Path(relative).parts:
        if part in (".", ""):
            continue
        exact = path / part
        if exact.exists():
            path = exact
            continue
        matches = (
            [p for p in path.iterdir() if p.name.lower() == part.lower()]
            if path.is_dir()
            else []
        )
        if len(matches) != 1:
            return None
        path = matches[0]
    return path


def find_sword_module(
    sword_root: Path, name_pattern: str, abbreviation: str, package: str
) -> tuple[Path, Path, str]:
    """Find an installed SWORD module through its ``.conf``: ``(conf, data_dir, module_name)``.

    A module matches when its name matches ``name_pattern`` (a regular expression, case
    ignored) or its ``Abbreviation`` equals ``abbreviation``; among several, the name
    that sorts last (the newest edition) wins. Its ``DataPath`` is resolved under
    ``sword_root`` case-insensitively, since some packages ship a lower-case
    ``DataPath`` for a mixed-case directory. Raises :class:`DataMissingError` with the
    install command when nothing matches.
    """
    pattern = re.compile(name_pattern, re.IGNORECASE)
    found = []
    for conf in sorted((sword_root / "mods.d").glob("*.conf")):
        name, entries = _read_conf(conf)
        if not (
            pattern.fullmatch(name)
            or entries.get("Abbreviation", "").lower() == abbreviation.lower()
        ):
            continue
        data = _resolve_case_insensitively(sword_root, entries.get("DataPath", ""))
        if data is not None and data.is_dir() and data != sword_root:
            found.append((name.lower(), conf, data, name))
    if not found:
        raise DataMissingError(
            f"no SWORD module named like {name_pattern!r} or abbreviated {abbreviation!r} with its data "
            f"under {sword_root}; install with:\n  {install_command(package)}"
        )
    _, conf, data, name = max(found)
    return conf, data, name


def _bible_paths(sword_root: Path, bible: str = "web") -> tuple[Path, Path]:
    """A Bible's conf and data directory: ``web`` (``engWEB2015eb``, ``engweb2025eb``, ...)
    or ``rv1909`` (``spaRV1909eb``)."""
    if bible not in BIBLES:
        raise ValueError(f"unknown Bible {bible!r}; known: {', '.join(BIBLES)}")
    conf, data, _ = find_sword_module(sword_root, *BIBLES[bible])
    return conf, data


def _web_paths(sword_root: Path) -> tuple[Path, Path]:
    return _bible_paths(sword_root, "web")


def read_bible_verses(
    sword_root: Path | str = SWORD_ROOT, bible: str = "web"
) -> list[Verse]:
    """Read every non-empty verse of a Bible in canonical order with ``pysword`` (slow; cached by the loader)."""
    from pysword.bible import (
        SwordBible,
    )  # imported lazily: only needed when the cache is cold

    conf, data = _bible_paths(Path(sword_root), bible)
    versification = "default"
    for line in conf.read_text(encoding="utf-8").splitlines():
        if line.startswith("Versification="):
            versification = line.split("=", 1)[1].strip().lower()
    bible = SwordBible(str(data) + "/", "ztext", versification, "utf-8", "OSIS")
    verses: list[Verse] = []
    for testament in bible.get_structure().get_books().values():
        for book in testament:
            for chapter, length in enumerate(book.chapter_lengths, start=1):
                for number in range(1, length + 1):
                    markup = bible.get(
                        books=[book.name],
                        chapters=[chapter],
                        verses=[number],
                        clean=False,
                    )
                    text = clean_osis(markup)
                    if text:
                        verses.append(
                            Verse(book.name, chapter, number, text, len(verses))
                        )
    if not verses:
        raise CorpusFormatError(f"no verses could be read from {data}")
    return verses


def load_bible_verses(
    split: str | None = None, sword_root: Path | str = SWORD_ROOT, bible: str = "web"
) -> list[Verse]:
    """A Bible's verses in canonical order (cached), optionally one split.

    ``bible`` is ``web`` (the World English Bible, chapters 1-3) or ``rv1909`` (the
    Reina-Valera 1909, the Spanish side of chapter 4). Splits are by chapter and the
    same for both, so a held-out chapter is held out in every chapter of the book.
    """
    if split is not None:
        check_split(split)
    conf, data = _bible_paths(Path(sword_root), bible)
    files = [conf, *sorted(p for p in data.iterdir() if p.is_file())]
    rows = _cached(
        bible,
        checksum(files),
        lambda: [asdict(v) for v in read_bible_verses(sword_root, bible)],
    )
    verses = [Verse(**row) for row in rows]
    if split is not None:
        verses = [v for v in verses if v.split == split]
    return verses


@dataclass(frozen=True)
class VersePair:
    """A Spanish verse (Reina-Valera 1909) and the English verse (WEB) with the same reference."""

    book: str
    chapter: int
    verse: int
    es: str
    en: str

    split = property(
        lambda self: chapter_split(self.book, self.chapter),
        doc="The WEB verse's split.",
    )


def load_verse_pairs(
    split: str | None = None,
    max_words: int | None = None,
    sword_root: Path | str = SWORD_ROOT,
) -> list[VersePair]:
    """Spanish-English verse pairs aligned by (book, chapter, verse), in canonical order.

    Every reference present (non-empty) in both Bibles gives a pair; ``max_words``
    keeps pairs with at most that many words on both sides. The WEB is not translated
    from the Reina-Valera (both go back to the original languages), so a reference is
    a looser translation than in a translation corpus.
    """
    if max_words is not None and max_words < 1:
        raise ValueError(f"max_words must be positive, got {max_words}")
    english = {
        (v.book, v.chapter, v.verse): v.text
        for v in load_bible_verses(split, sword_root)
    }
    pairs = [
        VersePair(
            v.book, v.chapter, v.verse, v.text, english[(v.book, v.chapter, v.verse)]
        )
        for v in load_bible_verses(split, sword_root, "rv1909")
        if (v.book, v.chapter, v.verse) in english
    ]
    if max_words is not None:
        pairs = [
            p
            for p in pairs
            if len(p.es.split()) <= max_words and len(p.en.split()) <= max_words
        ]
    return pairs


# ---------------------------------------------------------------------------------
# Report for `python -m lmpg_utils data`


def data_report(stream=None) -> int:
    """Print path, per-split counts and checksum of each corpus; return 1 if one is missing."""
    stream = stream or sys.stdout
    status = 0
    try:
        pairs = load_translation_pairs(path=DING_PATH)
        counts = {s: sum(p.split == s for p in pairs) for s in SPLITS}
        print(
            f"ding: {DING_PATH} sha256={checksum([DING_PATH])[:16]} pairs={len(pairs)} {counts}",
            file=stream,
        )
    except DataMissingError as error:
        print(f"ding: MISSING. {error}", file=stream)
        status = 1
    for bible in BIBLES:
        try:
            verses = load_bible_verses(sword_root=SWORD_ROOT, bible=bible)
            conf, data = _bible_paths(SWORD_ROOT, bible)
            counts = {s: sum(v.split == s for v in verses) for s in SPLITS}
            files = [conf, *sorted(p for p in data.iterdir() if p.is_file())]
            print(
                f"{bible}: {data} sha256={checksum(files)[:16]} verses={len(verses)} {counts}",
                file=stream,
            )
        except DataMissingError as error:
            print(f"{bible}: MISSING. {error}", file=stream)
            status = 1
    return status
