"""Tokenizers: a word-level vocabulary (chapters 1-2) and subword BPE (chapters 3-4).

Word level is the lesson's tokenization: an n-gram model and a neural model scored
on the same word vocabulary give perplexities that can be compared directly. BPE is
not the lesson, so it comes from Hugging Face ``tokenizers``.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
MASK, CLS, SEP = "[MASK]", "[CLS]", "[SEP]"
WORD_SPECIALS: tuple[str, ...] = (PAD, UNK, BOS, EOS)

_WORD = re.compile(r"\w+(?:['\u2019]\w+)*|[^\w\s]")


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int) -> Tensor:
    """Right-pad lists of token ids into a ``(batch, longest)`` long tensor.

    The one padding helper of the package. An empty batch or an empty sequence is an
    error: a model cannot read a row with no tokens, and silently padding it would hide
    a bug upstream.
    """
    if not sequences:
        raise ValueError("cannot pad an empty batch")
    if any(len(s) == 0 for s in sequences):
        raise ValueError("cannot pad an empty sequence")
    width = max(len(s) for s in sequences)
    out = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        out[row, : len(sequence)] = torch.as_tensor(list(sequence), dtype=torch.long)
    return out


def word_tokenize(text: str, lowercase: bool = True) -> list[str]:
    """Split text into words and single punctuation marks (``"Don't!"`` -> ``["don't", "!"]``)."""
    if lowercase:
        text = text.lower()
    return _WORD.findall(text.replace("\u2019", "'"))


class WordVocab:
    """A word vocabulary with ``<pad>`` = 0, ``<unk>`` = 1, ``<s>`` = 2, ``</s>`` = 3 and extra specials.

    Words outside the vocabulary map to ``<unk>``; both models in a comparison
    must use the same vocabulary so their perplexities are over the same events.
    """

    def __init__(self, words: Sequence[str], specials: Sequence[str] = WORD_SPECIALS):
        if list(specials[:4]) != list(WORD_SPECIALS):
            raise ValueError(
                f"the first four specials must be {WORD_SPECIALS}, got {tuple(specials[:4])}"
            )
        self.itos: list[str] = list(specials) + [w for w in words if w not in specials]
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("vocabulary words must be unique")
        self.pad_id, self.unk_id, self.bos_id, self.eos_id = 0, 1, 2, 3
        self.specials = tuple(specials)

    @classmethod
    def build(
        cls,
        texts: Iterable[str],
        max_size: int | None = None,
        min_count: int = 1,
        specials: Sequence[str] = WORD_SPECIALS,
    ) -> WordVocab:
        """Vocabulary of the most frequent words in ``texts`` (ties broken alphabetically)."""
        counts = Counter(word for text in texts for word in word_tokenize(text))
        if not counts:
            raise ValueError("cannot build a vocabulary from empty texts")
        ranked = sorted(
            (w for w, c in counts.items() if c >= min_count),
            key=lambda w: (-counts[w], w),
        )
        if max_size is not None:
            ranked = ranked[: max(0, max_size - len(specials))]
        return cls(ranked, specials)

    def __len__(self) -> int:
        return len(self.itos)

    def id(self, token: str) -> int:
        """The id of a token (``<unk>``'s id for unknown tokens)."""
        return self.stoi.get(token, self.unk_id)

    def encode(
        self, text: str, add_bos: bool = False, add_eos: bool = False
    ) -> list[int]:
        """Ids of the words of ``text``, optionally framed by ``<s>`` and ``</s>``."""
        ids = [self.stoi.get(w, self.unk_id) for w in word_tokenize(text)]
        return (
            ([self.bos_id] if add_bos else [])
            + ids
            + ([self.eos_id] if add_eos else [])
        )

    def decode(self, ids: Iterable[int], skip_specials: bool = True) -> str:
        """Words for ``ids`` joined by spaces (specials dropped unless asked for)."""
        words = []
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self.itos):
                raise ValueError(
                    f"token id {i} is outside the vocabulary of size {len(self.itos)}"
                )
            if skip_specials and self.itos[i] in self.specials and i != self.unk_id:
                continue
            words.append(self.itos[i])
        return " ".join(words)

    def state_dict(self) -> dict[str, list[str]]:
        """A plain-data form that a ``weights_only`` checkpoint can hold."""
        return {"itos": list(self.itos), "specials": list(self.specials)}

    @classmethod
    def from_state_dict(cls, state: dict[str, list[str]]) -> WordVocab:
        specials = state["specials"]
        return cls(state["itos"][len(specials) :], specials)


class BPETokenizer:
    """Byte-pair encoding from Hugging Face ``tokenizers`` with SentencePiece-style spaces.

    The ``Metaspace`` pre-tokenizer and decoder make decoding the exact inverse of
    encoding for ordinary text, which matters when detokenized output is scored
    with sacrebleu.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.pad_id = self.id(PAD)
        self.unk_id = self.id(UNK)
        self.bos_id = self.id(BOS)
        self.eos_id = self.id(EOS)

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        specials: Sequence[str] = (PAD, UNK, BOS, EOS, MASK, CLS, SEP),
        min_frequency: int = 2,
    ) -> BPETokenizer:
        """Learn a BPE vocabulary of at most ``vocab_size`` pieces from ``texts``."""
        from tokenizers import (
            Tokenizer,
            decoders,
            models,
            normalizers,
            pre_tokenizers,
            trainers,
        )

        if vocab_size < len(specials) + 2:
            raise ValueError(
                f"vocab_size {vocab_size} is too small for {len(specials)} special tokens"
            )
        texts = list(texts)
        if not texts:
            raise ValueError("cannot train a BPE tokenizer on no texts")
        tokenizer = Tokenizer(models.BPE(unk_token=UNK))
        tokenizer.normalizer = normalizers.NFC()
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Metaspace(), pre_tokenizers.Punctuation()]
        )
        tokenizer.decoder = decoders.Metaspace()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(specials),
            min_frequency=min_frequency,
            show_progress=False,
        )
        tokenizer.train_from_iterator(texts, trainer=trainer)
        return cls(tokenizer)

    def __len__(self) -> int:
        return self.tokenizer.get_vocab_size()

    def id(self, token: str) -> int:
        found = self.tokenizer.token_to_id(token)
        if found is None:
            raise ValueError(f"token {token!r} is not in the BPE vocabulary")
        return found

    def encode(
        self, text: str, add_bos: bool = False, add_eos: bool = False
    ) -> list[int]:
        ids = self.tokenizer.encode(text).ids
        return (
            ([self.bos_id] if add_bos else [])
            + ids
            + ([self.eos_id] if add_eos else [])
        )

    def encode_batch(
        self, texts: Sequence[str], add_bos: bool = False, add_eos: bool = False
    ) -> list[list[int]]:
        encoded = self.tokenizer.encode_batch(list(texts))
        return [
            ([self.bos_id] if add_bos else [])
            + e.ids
            + ([self.eos_id] if add_eos else [])
            for e in encoded
        ]

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        size = len(self)
        bad = [i for i in ids if not 0 <= i < size]
        if bad:
            raise ValueError(
                f"token id {bad[0]} is outside the vocabulary of size {size}"
            )
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def to_str(self) -> str:
        """Serialized tokenizer (JSON), storable in a ``weights_only`` checkpoint."""
        return self.tokenizer.to_str()

    @classmethod
    def from_str(cls, data: str) -> BPETokenizer:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_str(data))
