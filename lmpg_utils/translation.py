"""Translation with the encoder-decoder: data preparation and the MLE recipe.

* :func:`frequent_word_subset` picks the easier pairs (short, only frequent words) that
  a CPU-sized model can learn in minutes.
* :func:`train_tokenizer` learns one BPE vocabulary for both languages (the model
  shares its embedding table between the two sides).
* :class:`EncodedPairs` holds token ids; :meth:`EncodedPairs.batches` yields shuffled
  padded batches of a number of pairs forever, :meth:`EncodedPairs.token_batches`
  batches of about a number of target tokens.
* :func:`mle_loss` is maximum likelihood with teacher forcing and label smoothing.
* :func:`translate_texts` decodes a list of German sentences into English strings.

This module takes plain (source, reference) strings; loading the corpus is the
caller's job (models never import data loading).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .generation import translate
from .tokenization import BPETokenizer
from .transformer import EncoderDecoder

_WORD = re.compile(r"\w+", re.UNICODE)


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def frequent_word_subset(
    pairs: Sequence[tuple[str, str]],
    reference_pairs: Sequence[tuple[str, str]],
    max_words: int,
    top_words: int,
) -> list[int]:
    """Indices of ``pairs`` with at most ``max_words`` words a side, all among the ``top_words``
    most frequent words (per language) of ``reference_pairs`` (the training split)."""
    if max_words < 1 or top_words < 1:
        raise ValueError(
            f"max_words and top_words must be positive, got {max_words}, {top_words}"
        )
    keep_de = {
        w
        for w, _ in Counter(
            w for de, _ in reference_pairs for w in _words(de)
        ).most_common(top_words)
    }
    keep_en = {
        w
        for w, _ in Counter(
            w for _, en in reference_pairs for w in _words(en)
        ).most_common(top_words)
    }
    chosen = []
    for i, (de, en) in enumerate(pairs):
        if len(de.split()) > max_words or len(en.split()) > max_words:
            continue
        if all(w in keep_de for w in _words(de)) and all(
            w in keep_en for w in _words(en)
        ):
            chosen.append(i)
    return chosen


def train_tokenizer(pairs: Sequence[tuple[str, str]], vocab_size: int) -> BPETokenizer:
    """One BPE vocabulary learned from both sides of ``pairs`` (German and English)."""
    if not pairs:
        raise ValueError("cannot train a tokenizer on no pairs")
    texts = [de for de, _ in pairs] + [en for _, en in pairs]
    return BPETokenizer.train(
        texts, vocab_size, specials=("<pad>", "<unk>", "<s>", "</s>")
    )


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int) -> Tensor:
    """Right-pad integer sequences into a (batch, max length) tensor."""
    if not sequences:
        raise ValueError("cannot pad an empty list of sequences")
    if any(len(s) == 0 for s in sequences):
        raise ValueError("cannot batch an empty sequence")
    width = max(len(s) for s in sequences)
    out = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    for i, s in enumerate(sequences):
        out[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    return out


@dataclass
class EncodedPairs:
    """Sources (German ids, no BOS/EOS), targets (English ids framed by BOS ... EOS) and raw texts."""

    sources: list[list[int]]
    targets: list[list[int]]
    source_texts: list[str]
    reference_texts: list[str]
    pad_id: int
    dropped: int = 0

    @classmethod
    def build(
        cls,
        tokenizer: BPETokenizer,
        pairs: Sequence[tuple[str, str]],
        max_tokens: int = 64,
    ) -> EncodedPairs:
        """Encode ``(source, target)`` pairs; pairs longer than ``max_tokens`` on either side
        are dropped and counted in ``dropped``."""
        if not pairs:
            raise ValueError("no pairs to encode")
        empty = [
            i for i, (de, en) in enumerate(pairs) if not de.strip() or not en.strip()
        ]
        if empty:
            raise ValueError(f"pairs {empty[:5]} have an empty source or reference")
        src = tokenizer.encode_batch([de for de, _ in pairs])
        tgt = tokenizer.encode_batch(
            [en for _, en in pairs], add_bos=True, add_eos=True
        )
        keep = [
            i
            for i in range(len(pairs))
            if len(src[i]) <= max_tokens and len(tgt[i]) <= max_tokens
        ]
        return cls(
            [src[i] for i in keep],
            [tgt[i] for i in keep],
            [pairs[i][0] for i in keep],
            [pairs[i][1] for i in keep],
            tokenizer.pad_id,
            len(pairs) - len(keep),
        )

    def __len__(self) -> int:
        return len(self.sources)

    def subset(self, indices: Sequence[int]) -> EncodedPairs:
        return EncodedPairs(
            [self.sources[i] for i in indices],
            [self.targets[i] for i in indices],
            [self.source_texts[i] for i in indices],
            [self.reference_texts[i] for i in indices],
            self.pad_id,
        )

    def batch(self, indices: Sequence[int]) -> tuple[Tensor, Tensor, list[int]]:
        """Padded ``(src, tgt)`` tensors for the given indices, and the indices."""
        indices = list(indices)
        return (
            pad_batch([self.sources[i] for i in indices], self.pad_id),
            pad_batch([self.targets[i] for i in indices], self.pad_id),
            indices,
        )

    def token_batches(
        self, max_tokens: int, generator: torch.Generator
    ) -> Iterator[tuple[Tensor, Tensor, list[int]]]:
        """Shuffled batches forever, each holding about ``max_tokens`` padded target tokens.

        Pairs of similar target length share a batch (sorted within chunks of the
        shuffled order), so little of each batch is padding, and every batch carries
        about the same number of tokens whatever the sentence lengths.
        """
        longest = max(len(t) for t in self.targets)
        if max_tokens < longest:
            raise ValueError(
                f"max_tokens={max_tokens} is below the longest target ({longest} tokens)"
            )
        while True:
            order = torch.randperm(len(self), generator=generator).tolist()
            chunk = max(1, 100 * max_tokens // longest)
            for start in range(0, len(order), chunk):
                block = sorted(
                    order[start : start + chunk],
                    key=lambda i: (len(self.targets[i]), len(self.sources[i])),
                )
                groups, current, width = [], [], 0
                for i in block:
                    width_with = max(width, len(self.targets[i]))
                    if current and width_with * (len(current) + 1) > max_tokens:
                        groups.append(current)
                        current, width_with = [], len(self.targets[i])
                    current.append(i)
                    width = width_with
                if current:
                    groups.append(current)
                for g in torch.randperm(len(groups), generator=generator).tolist():
                    yield self.batch(groups[g])

    def batches(
        self, batch_size: int, generator: torch.Generator
    ) -> Iterator[tuple[Tensor, Tensor, list[int]]]:
        """Shuffled batches forever (a new permutation every epoch, from ``generator``)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if len(self) == 0:
            raise ValueError("no pairs to batch")
        while True:
            order = torch.randperm(len(self), generator=generator).tolist()
            for start in range(0, len(order), batch_size):
                yield self.batch(order[start : start + batch_size])


def mle_loss(
    model: EncoderDecoder,
    src: Tensor,
    tgt: Tensor,
    pad_id: int,
    label_smoothing: float = 0.1,
) -> tuple[Tensor, int]:
    """Teacher-forced cross-entropy with label smoothing, averaged over target tokens.

    ``tgt`` (B, T) is BOS ... EOS padded; the model reads ``tgt[:, :-1]`` and predicts
    ``tgt[:, 1:]``. Returns ``(loss, number of target tokens)``.
    """
    if src.shape[0] != tgt.shape[0]:
        raise ValueError(f"batch sizes differ: src {src.shape[0]}, tgt {tgt.shape[0]}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    logits = model(src, tgt[:, :-1], pad_id=pad_id)
    gold = tgt[:, 1:]
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        gold.reshape(-1),
        ignore_index=pad_id,
        label_smoothing=label_smoothing,
    )
    return loss, int((gold != pad_id).sum())


@torch.no_grad()
def teacher_forced_stats(
    model: EncoderDecoder, data: EncodedPairs, batch_size: int = 128
) -> dict[str, float]:
    """Teacher-forced token accuracy and NLL (nats/token, no smoothing) of the references."""
    model.eval()
    correct = total = 0
    nll = 0.0
    device = next(model.parameters()).device
    for start in range(0, len(data), batch_size):
        src, tgt, _ = data.batch(range(start, min(len(data), start + batch_size)))
        src, tgt = src.to(device), tgt.to(device)
        logits = model(src, tgt[:, :-1], pad_id=data.pad_id)
        gold = tgt[:, 1:]
        mask = gold != data.pad_id
        nll += float(
            F.cross_entropy(logits.transpose(1, 2).float(), gold, reduction="none")[
                mask
            ].sum()
        )
        correct += int(((logits.argmax(-1) == gold) & mask).sum())
        total += int(mask.sum())
    return {"token_accuracy": correct / total, "nll": nll / total}


@torch.no_grad()
def translate_texts(
    model: EncoderDecoder,
    tokenizer: BPETokenizer,
    sources: Sequence[Sequence[int]],
    max_len: int = 48,
    batch_size: int = 128,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> list[str]:
    """Decode encoded German ``sources`` to English strings (greedy unless ``temperature`` > 0)."""
    if len(sources) == 0:
        raise ValueError("no sources to translate")
    outputs: list[str] = []
    device = next(model.parameters()).device
    for start in range(0, len(sources), batch_size):
        src = pad_batch(sources[start : start + batch_size], tokenizer.pad_id).to(
            device
        )
        tokens = translate(
            model,
            src,
            tokenizer.bos_id,
            tokenizer.eos_id,
            tokenizer.pad_id,
            max_len,
            temperature=temperature,
            generator=generator,
        )
        outputs.extend(tokenizer.decode(row) for row in tokens.tolist())
    return outputs
