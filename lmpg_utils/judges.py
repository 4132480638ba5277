"""The book-group judges of chapter 5: the learned reward and the gold judge.

A judge is chapter 3's pre-trained BERT (:func:`lmpg_utils.bert.load_pretrained`)
fine-tuned to tell which of the four book groups (:data:`lmpg_utils.bert.BOOK_GROUPS`)
a verse comes from. Chapter 5's policy, chapter 2's GPT, is rewarded with the log
probability that the proxy judge gives a target group; the gold judge, trained on
other verses, with another seed and more labels, is never seen by the policy and
measures how much of the proxy's reward is real.

The GPT writes lower-cased words of its :class:`~lmpg_utils.tokenization.WordVocab`,
so a judge is trained and scored on text in that same form: a verse is
:func:`normalise`-d (tokenised into words, each rare word replaced by ``<unk>``, joined
by spaces), and the GPT's ids are :func:`render`-ed the same way. The BPE tokenizer
reads a literal ``<unk>`` as its own ``<unk>`` token.

Each judge draws its labelled verses from one half of the train-split verses
(:func:`judge_verses`: alternate verses in canonical order), so the proxy and the
gold judge learn from different verses. A judge is trained once per settings, seed,
vocabulary and code version, then loaded from the cache (:func:`cached_judge`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from . import bert, caching, corpora
from .tokenization import UNK, BPETokenizer, WordVocab
from .training import save_checkpoint

#: the cache kind of a judge
CACHE_KIND = "ch5-judge"

#: a judge's draws are seeded with ``JudgeConfig.seed + SEED_OFFSETS[what]``
SEED_OFFSETS: dict[str, int] = {
    "labelled_verses": 0,  # which verses of its half it learns from
    "init": 1,  # the classification head's initial weights
    "batches": 2,  # the order of the fine-tuning batches
}

# ------------------------------------------------------------------ the text form


def render(word_ids: Sequence[int], vocab: WordVocab) -> str:
    """The words of ``word_ids`` joined by spaces, ``<unk>`` kept as the string
    ``"<unk>"``: the text form a judge reads. ``<pad>``, ``<s>`` and ``</s>`` are a
    ``ValueError`` (cut a generated sequence at its ``</s>`` first)."""
    words = []
    for i in word_ids:
        i = int(i)
        if not 0 <= i < len(vocab):
            raise ValueError(
                f"word id {i} is outside the vocabulary of size {len(vocab)}"
            )
        if i != vocab.unk_id and vocab.itos[i] in vocab.specials:
            raise ValueError(
                f"word id {i} is the special {vocab.itos[i]!r}: only words and "
                "<unk> can be rendered"
            )
        words.append(vocab.itos[i])
    return " ".join(words)


def normalise(text: str, vocab: WordVocab) -> str:
    """``text`` as the GPT would have written it: ``render(vocab.encode(text))``.

    A literal ``<unk>`` in ``text`` stays one ``<unk>``, so normalising twice changes
    nothing (``normalise(render(ids)) == render(ids)``).
    """
    ids: list[int] = []
    for position, piece in enumerate(text.split(UNK)):
        if position:
            ids.append(vocab.unk_id)
        ids += vocab.encode(piece)
    return render(ids, vocab)


def judge_verses(half: int) -> list[corpora.Verse]:
    """Half ``half`` (0 or 1) of the train-split verses: every other verse in canonical
    order, starting from the first (0) or the second (1). The halves are disjoint."""
    if half not in (0, 1):
        raise ValueError(f"half must be 0 or 1, got {half}")
    return corpora.load_bible_verses("train")[half::2]


def rendered_split(
    verses: Sequence[bert.VerseLike], per_class: int, seed: int, vocab: WordVocab
) -> tuple[list[str], list[int]]:
    """``per_class`` verses of each book group drawn with ``seed``
    (:func:`lmpg_utils.bert.classification_split`), normalised to ``vocab``'s text
    form, and their labels."""
    texts, labels = bert.classification_split(verses, per_class, seed)
    return [normalise(t, vocab) for t in texts], labels


def vocab_hash(vocab: WordVocab) -> str:
    """SHA-256 (hex) of a word vocabulary: part of a judge's cache key, since the
    vocabulary decides which words a judge sees as ``<unk>``."""
    return hashlib.sha256(json.dumps(vocab.state_dict()).encode()).hexdigest()


# ---------------------------------------------------------------------- a judge


@dataclass(frozen=True)
class JudgeConfig:
    """How one judge is fine-tuned: ``labels_per_class`` verses of each book group,
    drawn from half ``half`` of the train-split verses (:func:`judge_verses`), for
    ``steps`` steps of ``batch_size`` verses at peak learning rate ``lr``; ``seed``
    draws the verses, the head's weights and the batches."""

    labels_per_class: int
    steps: int
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 0
    half: int = 0

    def __post_init__(self) -> None:
        for name in ("labels_per_class", "steps", "batch_size", "lr"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.half not in (0, 1):
            raise ValueError(f"half must be 0 or 1, got {self.half}")


#: the learned reward of each profile: fewer labels, fewer steps
PROXY_JUDGE: dict[str, JudgeConfig] = {
    "quick": JudgeConfig(labels_per_class=300, steps=300, seed=0, half=0),
    "full": JudgeConfig(
        labels_per_class=400, steps=600, batch_size=32, lr=1e-4, seed=0, half=0
    ),
}

#: the gold judge of each profile: other verses, another seed, more labels and steps
GOLD_JUDGE: dict[str, JudgeConfig] = {
    "quick": JudgeConfig(labels_per_class=1500, steps=1200, seed=1, half=1),
    "full": JudgeConfig(
        labels_per_class=1500, steps=3000, batch_size=32, lr=1e-4, seed=1, half=1
    ),
}


@dataclass
class Judge:
    """A fine-tuned book-group classifier (in eval mode) with the tokenizer it reads,
    the seconds its fine-tuning took and whether it came from the cache.

    Scores come back on the classifier's device.
    """

    classifier: bert.BertClassifier
    tokenizer: BPETokenizer
    special: bert.SpecialIds
    seconds: float
    cached: bool
    batch_size: int = 256

    @property
    def device(self) -> torch.device:
        """The device the classifier (and every score) lives on."""
        return next(self.classifier.parameters()).device

    def encode(
        self, texts: Sequence[str], labels: Sequence[int] | None = None
    ) -> bert.EncodedBatch:
        """``[CLS] text [SEP]`` of each text (an empty text is ``[CLS] [SEP]``)."""
        if isinstance(texts, str):
            raise ValueError("texts must be a sequence of strings, not one string")
        if not texts:
            raise ValueError("no texts to judge")
        return bert.encode_single(
            self.tokenizer.encode_batch(list(texts)),
            self.special,
            self.classifier.bert.config.max_len,
            labels,
            allow_empty=True,
        )

    @torch.no_grad()
    def log_probs(self, texts: Sequence[str]) -> Tensor:
        """(N, number of book groups) log-probabilities of each group for each text,
        in eval mode, in batches of ``batch_size``."""
        self.classifier.eval()
        parts = []
        for part in self.encode(texts).in_order(self.batch_size):
            part = part.to(self.device)
            logits = self.classifier(part.ids, part.segment_ids, part.padding_mask)
            parts.append(logits.float().log_softmax(-1))
        return torch.cat(parts)

    def reward(self, texts: Sequence[str], target: int) -> Tensor:
        """(N,) ``log p(target | text)``: the reward of each text for group ``target``."""
        if not 0 <= target < len(bert.BOOK_GROUPS):
            raise ValueError(
                f"target must be a group index in 0..{len(bert.BOOK_GROUPS) - 1}, "
                f"got {target}"
            )
        return self.log_probs(texts)[:, target]

    def predict(self, texts: Sequence[str]) -> Tensor:
        """(N,) the most probable group of each text."""
        return self.log_probs(texts).argmax(-1)

    def accuracy(self, texts: Sequence[str], labels: Sequence[int]) -> float:
        """The share of ``texts`` whose most probable group is their label."""
        if len(labels) != len(texts):
            raise ValueError(f"{len(labels)} labels for {len(texts)} texts")
        truth = torch.as_tensor(list(labels), device=self.device)
        return float((self.predict(texts) == truth).float().mean())


def cached_judge(
    config: JudgeConfig,
    pretraining: bert.Pretraining,
    *,
    pretraining_seed: int,
    vocab: WordVocab,
    device: str | torch.device,
    progress: bool = True,
) -> Judge:
    """The judge of ``config`` on ``device``: fine-tuned once from the pre-trained BERT
    of ``pretraining`` and ``pretraining_seed`` on verses normalised to ``vocab``, then
    loaded from the cache.

    The cache key holds ``config``, the pre-trained model's settings, seed and
    tokenizer, and the vocabulary's hash.
    """
    device = torch.device(device)
    tokenizer = bert.train_bible_tokenizer(pretraining.vocab_size)
    special = bert.SpecialIds.from_tokenizer(tokenizer)
    settings = {
        **dataclasses.asdict(config),
        "pretraining": pretraining.cache_settings(),
        "pretraining_seed": pretraining_seed,
        "tokenizer": bert.tokenizer_hash(tokenizer),
        "word_vocab": vocab_hash(vocab),
    }
    key = caching.artifact_key(CACHE_KIND, settings, config.seed)
    path = caching.artifact_path(key)
    groups = len(bert.BOOK_GROUPS)
    with caching.exclusive(path):
        stored = caching.load_current(path, key)
        if stored is not None:
            encoder = bert.BertModel(pretraining.model_config())
            classifier = bert.BertClassifier(encoder, groups).to(device)
            classifier.load_state_dict(stored["state_dict"])
            classifier.eval()
            seconds = float(stored["extra"]["seconds"])
            return Judge(classifier, tokenizer, special, seconds, cached=True)
        pretrained = bert.load_pretrained(
            pretraining, seed=pretraining_seed, device=device, progress=progress
        )
        texts, labels = rendered_split(
            judge_verses(config.half),
            config.labels_per_class,
            config.seed + SEED_OFFSETS["labelled_verses"],
            vocab,
        )
        labelled = bert.encode_single(
            bert.tokenize_texts(tokenizer, texts),
            special,
            pretraining.model.max_len,
            labels,
        )
        began = time.perf_counter()
        classifier = bert.train_classifier(
            pretraining.model_config(),
            labelled,
            pretrained.model.state_dict(),
            len(bert.BOOK_GROUPS),
            steps=config.steps,
            batch_size=config.batch_size,
            lr=config.lr,
            init_seed=config.seed + SEED_OFFSETS["init"],
            batch_seed=config.seed + SEED_OFFSETS["batches"],
            device=device,
            progress=progress,
        )
        seconds = time.perf_counter() - began
        save_checkpoint(
            path, classifier, settings, caching.tag({"seconds": seconds}, key)
        )
    classifier.eval()
    return Judge(classifier, tokenizer, special, seconds, cached=False)
