"""Count-based n-gram language model with interpolated Kneser-Ney smoothing.

For the highest order the probability of word ``w`` after context ``h`` is

    P(w | h) = max(c(h w) - D, 0) / c(h .)  +  D * N1+(h .) / c(h .) * P_lower(w | h')

where ``h'`` drops the oldest word of ``h``, ``c`` are counts and ``N1+(h .)`` is the
number of distinct words seen after ``h``. Lower orders use *continuation counts*
(how many distinct words precede ``h w``) instead of raw counts: a word that follows
many different contexts is a better guess for an unseen context than a word that is
frequent in one fixed phrase. The lowest order is interpolated with the uniform
distribution, so every word of the vocabulary has non-zero probability. Each order's
discount is estimated from counts of counts, ``D = n1 / (n1 + 2 n2)``
(Ney, Essen and Kneser 1994), as Chen and Goodman recommend.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence


class KneserNeyLM:
    """Interpolated Kneser-Ney n-gram model over integer token ids.

    Sentences are lists of word ids without boundary markers; the model pads each
    with ``order - 1`` copies of ``bos_id`` and predicts the words and a final
    ``eos_id``.
    """

    def __init__(self, order: int, vocab_size: int, bos_id: int, eos_id: int):
        if order < 1:
            raise ValueError(f"order must be >= 1, got {order}")
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
        self.order, self.vocab_size, self.bos_id, self.eos_id = (
            order,
            vocab_size,
            bos_id,
            eos_id,
        )
        # counts[k][(context, word)] for n-grams of length k+1; highest order uses raw counts,
        # lower orders continuation counts.
        self.counts: list[Counter] = [Counter() for _ in range(order)]
        self.context_totals: list[Counter] = [Counter() for _ in range(order)]
        self.context_types: list[Counter] = [Counter() for _ in range(order)]
        self.discounts: list[float] = [0.75] * order
        self.fitted = False

    def _ngrams(self, sentence: Sequence[int]) -> Iterable[tuple[int, ...]]:
        padded = [self.bos_id] * (self.order - 1) + list(sentence) + [self.eos_id]
        for end in range(self.order - 1, len(padded)):
            yield tuple(padded[end - self.order + 1 : end + 1])

    def fit(self, sentences: Iterable[Sequence[int]]) -> KneserNeyLM:
        """Count n-grams in ``sentences`` (lists of word ids) and estimate discounts."""
        top = Counter()
        for sentence in sentences:
            for gram in self._ngrams(sentence):
                if max(gram) >= self.vocab_size or min(gram) < 0:
                    raise ValueError(
                        f"token id {max(gram)} is outside the vocabulary of size {self.vocab_size}"
                    )
                top[gram] += 1
        if not top:
            raise ValueError("cannot fit an n-gram model on no sentences")
        self.counts[self.order - 1] = top
        # Continuation counts for lower orders: N1+(. w_2..w_k) = number of distinct left extensions.
        for k in range(self.order - 1, 0, -1):
            lower = Counter()
            for gram in self.counts[k]:
                lower[gram[1:]] += 1
            self.counts[k - 1] = lower
        for k in range(self.order):
            totals, types = Counter(), Counter()
            for gram, count in self.counts[k].items():
                totals[gram[:-1]] += count
                types[gram[:-1]] += 1
            self.context_totals[k], self.context_types[k] = totals, types
            histogram = Counter(c for c in self.counts[k].values() if c <= 2)
            n1, n2 = histogram[1], histogram[2]
            self.discounts[k] = n1 / (n1 + 2 * n2) if n1 + n2 > 0 else 0.75
        self.fitted = True
        return self

    def prob(self, word: int, context: Sequence[int]) -> float:
        """P(word | context) using the last ``order - 1`` ids of ``context``."""
        if not self.fitted:
            raise RuntimeError("fit the model before asking for probabilities")
        if not 0 <= word < self.vocab_size:
            raise ValueError(
                f"token id {word} is outside the vocabulary of size {self.vocab_size}"
            )
        context = tuple(context[-(self.order - 1) :]) if self.order > 1 else ()
        if len(context) < self.order - 1:
            context = (self.bos_id,) * (self.order - 1 - len(context)) + context
        probability = 1.0 / self.vocab_size  # order "0": uniform
        for k in range(self.order):
            history = context[len(context) - k :] if k else ()
            total = self.context_totals[k].get(history, 0)
            if total == 0:
                continue  # unseen context: keep the lower-order estimate unchanged
            discount = self.discounts[k]
            count = self.counts[k].get(history + (word,), 0)
            backoff_weight = discount * self.context_types[k][history] / total
            probability = (
                max(count - discount, 0.0) / total + backoff_weight * probability
            )
        return probability

    def sentence_log_prob(self, sentence: Sequence[int]) -> tuple[float, int]:
        """Natural-log probability of a sentence (its words and ``</s>``) and the number of predicted events."""
        log_prob = 0.0
        count = 0
        for gram in self._ngrams(sentence):
            log_prob += math.log(self.prob(gram[-1], gram[:-1]))
            count += 1
        return log_prob, count

    def token_log_probs(self, sentence: Sequence[int]) -> list[float]:
        """Per-event log-probabilities (each word, then ``</s>``)."""
        return [math.log(self.prob(g[-1], g[:-1])) for g in self._ngrams(sentence)]

    def context_seen(self, sentence: Sequence[int]) -> list[bool]:
        """For each predicted event, whether its full ``order - 1`` word context occurred in training."""
        top = self.order - 1
        return [
            self.context_totals[top].get(g[:-1], 0) > 0 for g in self._ngrams(sentence)
        ]

    def perplexity(self, sentences: Iterable[Sequence[int]]) -> float:
        """exp(total negative log-likelihood / number of predicted events)."""
        total, count = 0.0, 0
        for sentence in sentences:
            log_prob, n = self.sentence_log_prob(sentence)
            total -= log_prob
            count += n
        if count == 0:
            raise ValueError("perplexity of no sentences is undefined")
        return math.exp(total / count)
