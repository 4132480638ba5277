"""Next-sentence-prediction pairs and their encoding into padded model inputs (chapter 3).

* :func:`make_nsp_pairs` / :func:`pretraining_pairs`: pairs ``(A, B, is_next)`` of
  verses; B follows A, or is a negative of one of :data:`NEGATIVE_KINDS`.
* :func:`encode_pairs` / :func:`encode_nsp`: ``[CLS] A [SEP] B [SEP]`` with segment ids
  0 for ``[CLS] A [SEP]`` and 1 for ``B [SEP]``. Pairs longer than the model's maximum
  are truncated BERT's way, one token at a time from the end of the longer side, and
  the number of truncated pairs is reported.
* :func:`encode_single`: ``[CLS] A [SEP]`` for classification.
* :class:`EncodedBatch`: the padded tensors, with row selection and batching helpers.

Verses are any objects with ``book``, ``chapter``, ``index`` and ``text`` attributes;
this module loads no data itself.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from ..tokenization import BPETokenizer, pad_batch
from .masking import SpecialIds, check_known_ids

NEGATIVE_KINDS: tuple[str, ...] = ("random", "other_book", "same_chapter")

#: the sentence-level task of pre-training next to the masked LM: BERT's next-sentence
#: prediction, ALBERT's sentence-order prediction, or none (the masked LM alone)
SENTENCE_TASKS: tuple[str, ...] = ("nsp", "sop", "none")


def check_sentence_task(sentence_task: str) -> None:
    """Raise ``ValueError`` naming ``sentence_task`` unless it is in :data:`SENTENCE_TASKS`."""
    if sentence_task not in SENTENCE_TASKS:
        raise ValueError(
            f"unknown sentence_task {sentence_task!r}; valid tasks are: "
            f"{', '.join(SENTENCE_TASKS)}"
        )


#: how much the seed of :func:`pretraining_pairs` grows from one round to the next
ROUND_SEED_STEP = 1000


class VerseLike(Protocol):
    book: str
    chapter: int
    index: int
    text: str


@dataclass(frozen=True)
class SentencePair:
    """Sentence A, sentence B, and whether B really follows A (``is_next``)."""

    a: str
    b: str
    is_next: bool


def make_nsp_pairs(
    verses: Sequence[VerseLike],
    negatives: str = "random",
    p_next: float = 0.5,
    seed: int = 0,
    limit: int | None = None,
) -> list[SentencePair]:
    """Next-sentence pairs from verses in canonical order.

    Each verse that has a successor in its chapter becomes sentence A once (in a
    shuffled order, at most ``limit`` of them). With probability ``p_next`` B is that
    successor (IsNext); otherwise B is a NotNext verse drawn according to ``negatives``:

    * ``"random"``: any verse outside A's chapter (BERT's "random sentence from the corpus");
    * ``"other_book"``: a verse from a different book (a change of topic);
    * ``"same_chapter"``: a verse of A's own chapter at least two verses away from A
      (same topic, so only coherence can tell it apart).

    Raises ``ValueError`` on an unknown ``negatives`` kind, an empty verse text, or
    when no pair can be formed.
    """
    if negatives not in NEGATIVE_KINDS:
        raise ValueError(
            f"unknown negatives kind {negatives!r}; valid kinds are: {', '.join(NEGATIVE_KINDS)}"
        )
    if not 0.0 <= p_next <= 1.0:
        raise ValueError(f"p_next must be in [0, 1], got {p_next}")
    for verse in verses:
        if not verse.text.strip():
            raise ValueError(
                f"empty text in verse {verse.book} {verse.chapter} (index {verse.index})"
            )
    rng = random.Random(seed)
    chapters: dict[tuple[str, int], list[int]] = {}
    for position, verse in enumerate(verses):
        chapters.setdefault((verse.book, verse.chapter), []).append(position)
    anchors = [
        p
        for p in range(len(verses) - 1)
        if (verses[p].book, verses[p].chapter)
        == (verses[p + 1].book, verses[p + 1].chapter)
        and verses[p + 1].index == verses[p].index + 1
    ]
    if negatives == "same_chapter":  # A needs a verse two or more away in its chapter
        anchors = [
            p
            for p in anchors
            if len(chapters[(verses[p].book, verses[p].chapter)]) >= 4
        ]
    if not anchors:
        raise ValueError(
            f"no next-sentence pair can be formed from {len(verses)} verses"
        )
    rng.shuffle(anchors)
    if limit is not None:
        anchors = anchors[:limit]
    books = sorted({v.book for v in verses})
    if negatives == "other_book" and len(books) < 2:
        raise ValueError("negatives='other_book' needs verses from at least two books")
    pairs = []
    for p in anchors:
        a = verses[p]
        if rng.random() < p_next:
            pairs.append(SentencePair(a.text, verses[p + 1].text, True))
            continue
        while True:
            if negatives == "same_chapter":
                q = rng.choice(chapters[(a.book, a.chapter)])
                ok = abs(verses[q].index - a.index) >= 2
            else:
                q = rng.randrange(len(verses))
                b = verses[q]
                ok = (
                    b.book != a.book
                    if negatives == "other_book"
                    else (b.book, b.chapter) != (a.book, a.chapter)
                )
            if ok:
                break
        pairs.append(SentencePair(a.text, verses[q].text, False))
    return pairs


def pretraining_pairs(
    verses: Sequence[VerseLike], count: int, seed: int, sentence_task: str = "nsp"
) -> list[SentencePair]:
    """``count`` pre-training pairs of consecutive verses for ``sentence_task``, in rounds.

    Each round uses every verse that has a successor in its chapter once as sentence A
    (:func:`make_nsp_pairs`, seed ``seed + round * ROUND_SEED_STEP``) until ``count``
    pairs exist. ``is_next`` is the label of the sentence task:

    * ``"nsp"``: B follows A, or is BERT's random verse from another chapter (NotNext);
      later rounds draw fresh negatives;
    * ``"sop"``: ALBERT's sentence-order prediction: always two consecutive verses,
      in order (``is_next``) or swapped (A and B exchanged, ``is_next`` false), with
      probability 1/2 each (drawn with ``seed``);
    * ``"none"``: two consecutive verses in order, all labelled ``is_next``; the masked
      LM trains on them alone (contiguous text, as in RoBERTa without NSP).
    """
    if count <= 0:
        raise ValueError(f"count must be positive, got {count}")
    check_sentence_task(sentence_task)
    p_next = 0.5 if sentence_task == "nsp" else 1.0
    pairs: list[SentencePair] = []
    round_seed = seed
    while len(pairs) < count:
        pairs += make_nsp_pairs(
            verses, "random", p_next=p_next, seed=round_seed, limit=count - len(pairs)
        )
        round_seed += ROUND_SEED_STEP
    return sentence_order_pairs(pairs, seed) if sentence_task == "sop" else pairs


def sentence_order_pairs(
    pairs: Sequence[SentencePair], seed: int
) -> list[SentencePair]:
    """ALBERT's sentence-order prediction from pairs of consecutive sentences: each
    pair kept in order (``is_next``) or swapped (A and B exchanged, ``is_next``
    false), with probability 1/2 each, drawn with ``seed``. Every pair must be in
    order (``is_next``)."""
    if not all(p.is_next for p in pairs):
        raise ValueError("sentence-order pairs are made from consecutive pairs only")
    order = random.Random(seed)
    return [p if order.random() < 0.5 else SentencePair(p.b, p.a, False) for p in pairs]


def tokenize_texts(tokenizer: BPETokenizer, texts: Sequence[str]) -> list[list[int]]:
    """BPE ids of each text; an empty (or all-space) text is a ``ValueError``."""
    texts = list(texts)
    if not texts:
        raise ValueError("no texts to tokenize")
    for i, text in enumerate(texts):
        if not text or not text.strip():
            raise ValueError(f"text {i} is empty")
    return tokenizer.encode_batch(texts)


def truncate_pair(
    a: Sequence[int], b: Sequence[int], max_tokens: int
) -> tuple[list[int], list[int], bool]:
    """BERT's rule: while ``len(a) + len(b) > max_tokens`` drop the last token of the longer side.

    Ties drop from ``b``. Returns the truncated sides and whether anything was dropped.
    """
    if max_tokens < 2:
        raise ValueError(
            f"max_tokens must be at least 2 (one token a side), got {max_tokens}"
        )
    a, b = list(a), list(b)
    truncated = False
    while len(a) + len(b) > max_tokens:
        (a if len(a) > len(b) else b).pop()
        truncated = True
    return a, b, truncated


@dataclass
class EncodedBatch:
    """Padded model inputs: ids, segment ids, padding mask (True = pad) and optional labels.

    ``truncated`` counts the sequences that had to be shortened to fit ``max_len``.
    """

    ids: Tensor
    segment_ids: Tensor
    padding_mask: Tensor
    labels: Tensor | None
    truncated: int

    def __len__(self) -> int:
        return self.ids.shape[0]

    def select(self, index: Tensor | Sequence[int]) -> EncodedBatch:
        """Rows ``index`` (trailing all-padding columns are kept; harmless)."""
        index = torch.as_tensor(index, dtype=torch.long)
        labels = self.labels[index] if self.labels is not None else None
        return EncodedBatch(
            self.ids[index],
            self.segment_ids[index],
            self.padding_mask[index],
            labels,
            0,
        )

    def to(self, device: torch.device | str) -> EncodedBatch:
        """The same batch on ``device``."""
        labels = self.labels.to(device) if self.labels is not None else None
        return EncodedBatch(
            self.ids.to(device),
            self.segment_ids.to(device),
            self.padding_mask.to(device),
            labels,
            self.truncated,
        )

    def trimmed(self) -> EncodedBatch:
        """The batch without the all-padding columns at its end."""
        length = int((~self.padding_mask).sum(1).max())
        return EncodedBatch(
            self.ids[:, :length],
            self.segment_ids[:, :length],
            self.padding_mask[:, :length],
            self.labels,
            self.truncated,
        )

    def in_order(self, batch_size: int) -> Iterator[EncodedBatch]:
        """Consecutive trimmed batches of ``batch_size`` rows (the last may be smaller)."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        for start in range(0, len(self), batch_size):
            yield self.select(
                range(start, min(start + batch_size, len(self)))
            ).trimmed()


def shuffled_batches(
    data: EncodedBatch, batch_size: int, generator: torch.Generator
) -> Iterator[EncodedBatch]:
    """Endless trimmed batches of ``batch_size`` rows: each pass over ``data`` follows a
    fresh permutation drawn from ``generator`` and drops its incomplete last batch."""
    if not 0 < batch_size <= len(data):
        raise ValueError(f"batch_size must be in 1..{len(data)}, got {batch_size}")

    def endless() -> Iterator[EncodedBatch]:
        while True:
            order = torch.randperm(len(data), generator=generator)
            for start in range(0, len(order) - batch_size + 1, batch_size):
                yield data.select(order[start : start + batch_size]).trimmed()

    return endless()


def _encoded(
    rows: list[list[int]],
    segments: list[list[int]],
    special: SpecialIds,
    labels: Sequence[int] | None,
    truncated: int,
) -> EncodedBatch:
    """Rows padded with ``[PAD]`` (segments with 0), their padding mask and labels."""
    ids = pad_batch(rows, special.pad)
    return EncodedBatch(
        ids,
        pad_batch(segments, 0),
        ids == special.pad,
        None if labels is None else torch.tensor(list(labels)),
        truncated,
    )


def encode_pairs(
    a_ids: Sequence[Sequence[int]],
    b_ids: Sequence[Sequence[int]],
    special: SpecialIds,
    max_len: int,
    labels: Sequence[int] | None = None,
) -> EncodedBatch:
    """``[CLS] A [SEP] B [SEP]`` with segment ids 0 for ``[CLS] A [SEP]`` and 1 for ``B [SEP]``.

    Pairs longer than ``max_len`` are truncated with :func:`truncate_pair` (never
    silently: the count is in ``EncodedBatch.truncated``). An empty side or an unknown
    token id raises ``ValueError``.
    """
    if len(a_ids) != len(b_ids):
        raise ValueError(
            f"{len(a_ids)} first sentences but {len(b_ids)} second sentences"
        )
    if not a_ids:
        raise ValueError("no sentence pairs to encode")
    if labels is not None and len(labels) != len(a_ids):
        raise ValueError(f"{len(labels)} labels for {len(a_ids)} pairs")
    rows, segments, truncated = [], [], 0
    for i, (a, b) in enumerate(zip(a_ids, b_ids, strict=True)):
        if not a or not b:
            raise ValueError(f"pair {i} has an empty sentence")
        check_known_ids(torch.tensor(list(a) + list(b)), special.vocab_size)
        a, b, cut = truncate_pair(a, b, max_len - 3)
        truncated += cut
        rows.append([special.cls, *a, special.sep, *b, special.sep])
        segments.append([0] * (len(a) + 2) + [1] * (len(b) + 1))
    return _encoded(rows, segments, special, labels, truncated)


def encode_single(
    ids_list: Sequence[Sequence[int]],
    special: SpecialIds,
    max_len: int,
    labels: Sequence[int] | None = None,
    allow_empty: bool = False,
) -> EncodedBatch:
    """``[CLS] A [SEP]`` (segment 0) for classification; too long sequences lose their end (counted).

    An empty sentence is a ``ValueError`` unless ``allow_empty`` (then it is ``[CLS]
    [SEP]``: a judge of generated text must score an empty continuation too).
    """
    if not ids_list:
        raise ValueError("no sentences to encode")
    if labels is not None and len(labels) != len(ids_list):
        raise ValueError(f"{len(labels)} labels for {len(ids_list)} sentences")
    if max_len < 3:
        raise ValueError(f"max_len must be at least 3, got {max_len}")
    rows, truncated = [], 0
    for i, a in enumerate(ids_list):
        if not a and not allow_empty:
            raise ValueError(f"sentence {i} is empty")
        check_known_ids(torch.tensor(list(a), dtype=torch.long), special.vocab_size)
        truncated += len(a) > max_len - 2
        rows.append([special.cls, *list(a)[: max_len - 2], special.sep])
    return _encoded(rows, [[0] * len(r) for r in rows], special, labels, truncated)


def encode_nsp(
    tokenizer: BPETokenizer,
    pairs: Sequence[SentencePair],
    special: SpecialIds,
    max_len: int,
) -> EncodedBatch:
    """Tokenize and encode NSP pairs (:func:`encode_pairs`); labels are ``is_next``."""
    a = tokenize_texts(tokenizer, [p.a for p in pairs])
    b = tokenize_texts(tokenizer, [p.b for p in pairs])
    return encode_pairs(a, b, special, max_len, [p.is_next for p in pairs])
