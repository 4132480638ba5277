"""Corpus parsers, splits and cache on small files the tests write themselves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmpg_utils import corpora

# Invented lines in the Ding format (not copied from the dictionary).
DING_SAMPLE = """\
# Version :: test
# License :: test
Katze {f} | Die Katze schläft auf dem Sofa. :: cat | The cat sleeps on the sofa.
Hund {m} [zool.] | Der Hund (groß) bellt laut. ; Der Hund bellt. :: dog | The big dog barks loudly. ; The dog barks.
Baum {m} | Bäume {pl} :: tree | trees | extra
this line has no separator
Wir gehen heute ins Kino! :: We are going to the cinema today!
wir gehen :: we go
Wir gehen heute ins Kino! :: We are going to the cinema today!
"""


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMPG_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def write(tmp_path: Path, text: str, name: str = "de-en") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_clean_ding_text_strips_annotations_and_takes_first_alternative():
    assert (
        corpora.clean_ding_text("Der Hund (groß) {m} [coll.] <Hunt> bellt. ; Anders.")
        == "Der Hund bellt."
    )
    assert corpora.clean_ding_text("Nested (a (b) c) here !") == "Nested here!"


def test_is_sentence_rules():
    assert corpora.is_sentence("The cat sleeps.")
    assert not corpora.is_sentence("the cat sleeps.")  # no capital
    assert not corpora.is_sentence("The cat sleeps")  # no final punctuation
    assert not corpora.is_sentence("Cat sleeps.")  # two words


def test_parse_ding_keeps_aligned_sentences_and_reports_skips(tmp_path):
    pairs, report = corpora.parse_ding(write(tmp_path, DING_SAMPLE))
    assert [(p.de, p.en) for p in pairs] == [
        ("Die Katze schläft auf dem Sofa.", "The cat sleeps on the sofa."),
        ("Der Hund bellt laut.", "The big dog barks loudly."),
        ("Wir gehen heute ins Kino!", "We are going to the cinema today!"),
    ]
    assert pairs[0].line == 3
    assert (
        report.malformed == 1
        and "this line has no separator" in report.first_malformed[0]
    )
    assert ":6:" in report.first_malformed[0]  # file and line are named
    assert report.unaligned == 1
    assert report.duplicates == 1
    assert report.kept == 3
    assert "skipped 1 malformed" in report.summary()


def test_missing_file_names_the_install_command(tmp_path):
    with pytest.raises(
        corpora.DataMissingError, match="apt-get install -y trans-de-en"
    ):
        corpora.parse_ding(tmp_path / "nope")
    with pytest.raises(corpora.DataMissingError, match="sword-text-web"):
        corpora.load_bible_verses(sword_root=tmp_path)


def test_empty_file_is_an_error(tmp_path):
    with pytest.raises(corpora.CorpusFormatError, match="is empty"):
        corpora.parse_ding(write(tmp_path, ""))
    with pytest.raises(corpora.CorpusFormatError, match="no sentence pairs"):
        corpora.parse_ding(write(tmp_path, "# only a header\nwort :: word\n"))


def test_split_is_stable_and_roughly_proportional():
    # Fixed expectations: SHA-256 is the same on every machine, unlike Python's hash().
    keys = [f"key-{i}" for i in range(20000)]
    splits = [corpora.split_of(k) for k in keys]
    assert splits == [corpora.split_of(k) for k in keys]
    share = {s: splits.count(s) / len(splits) for s in corpora.SPLITS}
    assert abs(share["train"] - 0.90) < 0.01 and abs(share["test"] - 0.05) < 0.006
    assert corpora.split_of("de:Die Katze schläft.") == corpora.split_of(
        "de:Die Katze schläft."
    )


def test_unknown_split_and_bad_fractions():
    with pytest.raises(ValueError, match="unknown split 'dev'.*train, valid, test"):
        corpora.check_split("dev")
    with pytest.raises(ValueError, match="summing to 1"):
        corpora.split_of("x", (0.5, 0.5, 0.5))


def test_cache_is_used_and_invalidated_when_the_source_changes(
    tmp_path, cache, monkeypatch
):
    path = write(tmp_path, DING_SAMPLE)
    calls = []
    real_parse = corpora.parse_ding

    def counting_parse(*args, **kwargs):
        calls.append(1)
        return real_parse(*args, **kwargs)

    monkeypatch.setattr(corpora, "parse_ding", counting_parse)
    first = corpora.load_translation_pairs(path=path)
    second = corpora.load_translation_pairs(path=path)
    assert first == second and len(calls) == 1  # the second call came from the cache
    assert len(list(cache.glob("ding-*.json"))) == 1

    path.write_text(
        DING_SAMPLE + "Er liest ein Buch. :: He reads a book.\n", encoding="utf-8"
    )
    third = corpora.load_translation_pairs(path=path)
    assert len(calls) == 2 and len(third) == len(first) + 1
    assert third[-1].en == "He reads a book."


def test_corrupt_cache_is_rebuilt(tmp_path, cache):
    path = write(tmp_path, DING_SAMPLE)
    corpora.load_translation_pairs(path=path)
    (cached,) = cache.glob("ding-*.json")
    cached.write_text("{not json", encoding="utf-8")
    assert len(corpora.load_translation_pairs(path=path)) == 3
    json.loads(cached.read_text(encoding="utf-8"))


def test_load_filters_split_and_length(tmp_path, cache):
    path = write(tmp_path, DING_SAMPLE)
    pairs = corpora.load_translation_pairs(path=path)
    for split in corpora.SPLITS:
        assert all(
            p.split == split for p in corpora.load_translation_pairs(split, path=path)
        )
    assert sum(
        len(corpora.load_translation_pairs(s, path=path)) for s in corpora.SPLITS
    ) == len(pairs)
    short = corpora.load_translation_pairs(path=path, max_words=5)
    assert [p.en for p in short] == ["The big dog barks loudly."]
    with pytest.raises(ValueError, match="unknown split"):
        corpora.load_translation_pairs("training", path=path)


def test_clean_osis_drops_notes_and_titles_without_gluing_words():
    markup = (
        '<title type="section">A heading</title>In the <w lemma="x">beginning</w>,'
        '<note type="x">a note</note> God<transChange>created</transChange> the world .'
    )
    assert corpora.clean_osis(markup) == "In the beginning, God created the world."
    back_matter = 'Amen. <chapter eID="X.1"/><title>Glossary</title> A long appendix.'
    assert corpora.clean_osis(back_matter) == "Amen."


def test_missing_packages_message_when_not_root(monkeypatch, tmp_path):
    monkeypatch.setattr(corpora, "DING_PATH", tmp_path / "missing")
    monkeypatch.setattr(corpora.os, "geteuid", lambda: 1000)
    with pytest.raises(
        corpora.DataMissingError, match="sudo apt-get install -y trans-de-en"
    ):
        corpora.ensure_debian_packages(auto_install=True)


def test_real_ding_corpus_has_the_documented_size():
    # The dictionary differs by distribution: about 17,900 pairs on Ubuntu 24.04 (Colab),
    # 19,732 on Debian 12 and 21,300 on Debian 13. The parser's checks are the same everywhere.
    pairs = corpora.load_translation_pairs()
    assert 17000 <= len(pairs) <= 22500
    counts = {s: sum(p.split == s for p in pairs) for s in corpora.SPLITS}
    for split, share in zip(corpora.SPLITS, corpora.SPLIT_FRACTIONS, strict=True):
        assert abs(counts[split] / len(pairs) - share) < 0.01
    assert len({(p.de, p.en) for p in pairs}) == len(pairs)  # unique pairs


def test_real_bible_keeps_canonical_order_and_consecutive_verses():
    verses = corpora.load_bible_verses()
    assert 37000 <= len(verses) <= 38000
    assert verses[0].book == "Genesis" and (verses[0].chapter, verses[0].verse) == (
        1,
        1,
    )
    assert [v.index for v in verses[:100]] == list(range(100))
    assert all("<" not in v.text and ">" not in v.text for v in verses)
    assert (
        max(len(v.text.split()) for v in verses) < 1000
    )  # no appendix glued to a verse
    chapter_one = [v for v in verses if v.book == "Genesis" and v.chapter == 1]
    assert [v.verse for v in chapter_one] == list(range(1, len(chapter_one) + 1))
    assert len({v.split for v in chapter_one}) == 1  # a chapter never straddles splits


def _fake_sword_module(root, module, data_path, directory, abbreviation="WEB"):
    (root / "mods.d").mkdir(parents=True, exist_ok=True)
    (root / "mods.d" / f"{module.lower()}.conf").write_text(
        f"[{module}]\nAbbreviation={abbreviation}\nDataPath={data_path}\nModDrv=zText\n",
        encoding="utf-8",
    )
    (root / "modules" / "texts" / "ztext" / directory).mkdir(parents=True)


def test_web_module_is_found_through_its_conf_with_a_case_mismatched_data_path(
    tmp_path,
):
    # Debian 13 and later: module engweb2025eb, lower-case DataPath, mixed-case directory.
    _fake_sword_module(
        tmp_path, "engweb2025eb", "./modules/texts/ztext/engweb2025eb/", "engWEB2025eb"
    )
    _fake_sword_module(
        tmp_path,
        "spaRV1909eb",
        "./modules/texts/ztext/sparv1909eb/",
        "spaRV1909eb",
        "RV1909",
    )
    conf, data = corpora._web_paths(tmp_path)
    assert (
        conf.name == "engweb2025eb.conf"
        and data == tmp_path / "modules/texts/ztext/engWEB2025eb"
    )
    # Debian 12's module name is found by the same pattern
    other = tmp_path / "debian12"
    _fake_sword_module(
        other, "engWEB2015eb", "./modules/texts/ztext/engWEB2015eb/", "engWEB2015eb"
    )
    assert corpora._web_paths(other)[1].name == "engWEB2015eb"


def test_missing_web_module_names_the_install_command(tmp_path):
    _fake_sword_module(
        tmp_path,
        "spaRV1909eb",
        "./modules/texts/ztext/sparv1909eb/",
        "spaRV1909eb",
        "RV1909",
    )
    with pytest.raises(
        corpora.DataMissingError, match="sudo apt-get install -y sword-text-web"
    ):
        corpora._web_paths(tmp_path)
    # a conf whose data directory is missing does not count either
    _fake_sword_module(
        tmp_path, "engWEB2015eb", "./modules/texts/ztext/elsewhere/", "engWEB2015eb"
    )
    with pytest.raises(corpora.DataMissingError):
        corpora._web_paths(tmp_path)


def test_real_verse_pairs_align_spanish_and_english():
    pairs = corpora.load_verse_pairs()
    assert len(pairs) > 30000
    first = pairs[0]
    assert (first.book, first.chapter, first.verse) == ("Genesis", 1, 1)
    assert "principio" in first.es and first.en.startswith("In the beginning")
    short = corpora.load_verse_pairs("test", max_words=20)
    assert short and all(
        p.split == "test" and len(p.es.split()) <= 20 >= len(p.en.split())
        for p in short
    )
    english = {
        (v.book, v.chapter, v.verse): v.split for v in corpora.load_bible_verses()
    }
    assert all(
        english[(p.book, p.chapter, p.verse)] == p.split for p in pairs[::500]
    )  # same splits as ch. 1-3
    with pytest.raises(ValueError, match="max_words"):
        corpora.load_verse_pairs(max_words=0)


def test_missing_spanish_bible_names_its_package(tmp_path):
    (tmp_path / "mods.d").mkdir()
    with pytest.raises(corpora.DataMissingError, match="sword-text-sparv"):
        corpora.load_bible_verses(sword_root=tmp_path, bible="rv1909")
    with pytest.raises(ValueError, match="unknown Bible"):
        corpora.load_bible_verses(sword_root=tmp_path, bible="kjv")
