"""The book-group task of chapter 3: which part of the Bible does a verse come from?

Four groups of books (:data:`BOOK_GROUPS`); the deuterocanonical books belong to none
and are left out. :func:`classification_split` draws a balanced, shuffled set of
labelled verses, :func:`balanced_prefix` the first few of each class of such a set, and
:func:`~lmpg_utils.bert.training.train_classifier` with ``len(BOOK_GROUPS)`` classes
fine-tunes a classifier on them, from pre-trained weights or from scratch.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from .data import VerseLike

#: the classes of the task, in label order (the deuterocanonical books are in none)
BOOK_GROUPS: dict[str, tuple[str, ...]] = {
    "law & history": (
        "Genesis",
        "Exodus",
        "Leviticus",
        "Numbers",
        "Deuteronomy",
        "Joshua",
        "Judges",
        "Ruth",
        "I Samuel",
        "II Samuel",
        "I Kings",
        "II Kings",
        "I Chronicles",
        "II Chronicles",
        "Ezra",
        "Nehemiah",
        "Esther",
    ),
    "poetry & wisdom": ("Job", "Psalms", "Proverbs", "Ecclesiastes", "Song of Solomon"),
    "prophets": (
        "Isaiah",
        "Jeremiah",
        "Lamentations",
        "Ezekiel",
        "Daniel",
        "Hosea",
        "Joel",
        "Amos",
        "Obadiah",
        "Jonah",
        "Micah",
        "Nahum",
        "Habakkuk",
        "Zephaniah",
        "Haggai",
        "Zechariah",
        "Malachi",
    ),
    "new testament": (
        "Matthew",
        "Mark",
        "Luke",
        "John",
        "Acts",
        "Romans",
        "I Corinthians",
        "II Corinthians",
        "Galatians",
        "Ephesians",
        "Philippians",
        "Colossians",
        "I Thessalonians",
        "II Thessalonians",
        "I Timothy",
        "II Timothy",
        "Titus",
        "Philemon",
        "Hebrews",
        "James",
        "I Peter",
        "II Peter",
        "I John",
        "II John",
        "III John",
        "Jude",
        "Revelation of John",
    ),
}


def book_group_of(book: str) -> int | None:
    """Index of ``book``'s group in :data:`BOOK_GROUPS`, or ``None`` (deuterocanon)."""
    for label, books in enumerate(BOOK_GROUPS.values()):
        if book in books:
            return label
    return None


def classification_split(
    verses: Sequence[VerseLike], per_class: int, seed: int
) -> tuple[list[str], list[int]]:
    """Texts and labels of ``per_class`` verses of each book group, drawn with ``seed``,
    in a shuffled order. Too few verses in a group is a ``ValueError``."""
    if per_class <= 0:
        raise ValueError(f"per_class must be positive, got {per_class}")
    rng = random.Random(seed)
    by_class: dict[int, list[VerseLike]] = {i: [] for i in range(len(BOOK_GROUPS))}
    for verse in verses:
        label = book_group_of(verse.book)
        if label is not None:
            by_class[label].append(verse)
    texts, labels = [], []
    for label, group in by_class.items():
        if len(group) < per_class:
            raise ValueError(
                f"only {len(group)} verses for class {label}, {per_class} asked for"
            )
        for verse in rng.sample(group, per_class):
            texts.append(verse.text)
            labels.append(label)
    order = list(range(len(texts)))
    rng.shuffle(order)
    return [texts[i] for i in order], [labels[i] for i in order]


def balanced_prefix(labels: Sequence[int], per_class: int) -> list[int]:
    """Indices of the first ``per_class`` examples of each class (nested as ``per_class`` grows)."""
    seen: dict[int, int] = {}
    chosen = []
    for i, label in enumerate(labels):
        if seen.get(label, 0) < per_class:
            seen[label] = seen.get(label, 0) + 1
            chosen.append(i)
    return chosen
