"""Translation metrics from sacrebleu: corpus scores for evaluation, sentence scores as rewards.

Evaluation uses sacrebleu's standard corpus BLEU
and chrF on detokenized text, and reports the signature so
the numbers can be reproduced. Rewards for policy gradient are *sentence* scores:
``BLEU(effective_order=True).sentence_score(hyp, [ref])`` (13a tokenization, exp
smoothing, n-gram orders capped by the hypothesis length) and sentence chrF, both
divided by 100 so that a reward lies in [0, 1]. BLEU's brevity penalty punishes a
hypothesis that is too short; ``length_penalty`` adds the missing long side (see
:func:`long_side_penalty`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from sacrebleu.metrics import BLEU, CHRF
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

REWARDS: tuple[str, ...] = ("bleu", "chrf")


def _check_pairs(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    if isinstance(hypotheses, str) or isinstance(references, str):
        raise ValueError("pass lists of sentences, not a single string")
    if len(hypotheses) != len(references):
        raise ValueError(
            f"{len(hypotheses)} hypotheses but {len(references)} references"
        )
    if len(hypotheses) == 0:
        raise ValueError("no sentences to score")


@dataclass
class CorpusScore:
    """A corpus-level score with sacrebleu's reproducibility signature."""

    score: float
    signature: str
    length_ratio: float | None = None


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> CorpusScore:
    """Corpus BLEU (0-100) of detokenized ``hypotheses`` against one reference each."""
    _check_pairs(hypotheses, references)
    metric = BLEU()
    result = metric.corpus_score(list(hypotheses), [list(references)])
    return CorpusScore(
        result.score,
        str(metric.get_signature()),
        result.sys_len / max(1, result.ref_len),
    )


def corpus_chrf(hypotheses: Sequence[str], references: Sequence[str]) -> CorpusScore:
    """Corpus chrF (0-100) of detokenized ``hypotheses`` against one reference each."""
    _check_pairs(hypotheses, references)
    metric = CHRF()
    result = metric.corpus_score(list(hypotheses), [list(references)])
    return CorpusScore(result.score, str(metric.get_signature()))


_SENTENCE_BLEU = BLEU(effective_order=True)
_SENTENCE_CHRF = CHRF()


_TOKENIZE_13A = Tokenizer13a()


def token_count(sentence: str) -> int:
    """Length of ``sentence`` in BLEU's 13a tokens (the unit of BLEU's length ratio)."""
    return len(_TOKENIZE_13A(sentence.strip()).split())


def long_side_penalty(
    hypothesis_length: int, reference_length: int, strength: float
) -> float:
    """``exp(-strength * (h / r - 1))`` for a hypothesis longer than its reference, else 1.

    BLEU's brevity penalty ``exp(1 - r / h)`` only punishes ``h < r``; a policy optimizing
    sentence BLEU can therefore lengthen its outputs at the cost of a little n-gram
    precision. This factor is the long side's counterpart; ``strength`` 0 switches it off.
    """
    if strength < 0:
        raise ValueError(f"length penalty strength must be >= 0, got {strength}")
    if reference_length < 1 or hypothesis_length <= reference_length or strength == 0:
        return 1.0
    return math.exp(-strength * (hypothesis_length / reference_length - 1.0))


def sentence_rewards(
    hypotheses: Sequence[str],
    references: Sequence[str],
    metric: str = "bleu",
    length_penalty: float = 0.0,
) -> list[float]:
    """Sentence-level reward in [0, 1] for each hypothesis: sentence BLEU or chrF divided by 100,
    times :func:`long_side_penalty` with strength ``length_penalty`` (0: the plain metric).

    BLEU uses ``effective_order=True`` (a 3-word hypothesis is not zeroed for lacking
    4-grams) with sacrebleu's default exponential smoothing. An empty hypothesis scores 0.
    """
    _check_pairs(hypotheses, references)
    if metric not in REWARDS:
        raise ValueError(
            f"unknown reward metric {metric!r}; valid: {', '.join(REWARDS)}"
        )
    if length_penalty < 0:
        raise ValueError(f"length_penalty must be >= 0, got {length_penalty}")
    scorer = _SENTENCE_BLEU if metric == "bleu" else _SENTENCE_CHRF
    rewards = []
    for hyp, ref in zip(hypotheses, references, strict=True):
        if not hyp.strip():
            rewards.append(0.0)
            continue
        value = scorer.sentence_score(hyp, [ref]).score / 100.0
        if not math.isfinite(value):
            raise ValueError(f"sacrebleu returned a non-finite score for {hyp!r}")
        if length_penalty > 0:
            value *= long_side_penalty(
                token_count(hyp), token_count(ref), length_penalty
            )
        rewards.append(
            min(1.0, max(0.0, value))
        )  # sacrebleu can return 100.00000000000004
    return rewards


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Distinct-n (Li et al. 2016): distinct word n-grams over all n-grams of ``texts``
    (split on whitespace), pooled over the texts. 1 when no n-gram repeats; near 0 when
    the texts say the same thing again and again. A text shorter than ``n`` words adds
    no n-gram; with no n-gram at all the value is undefined (``ValueError``)."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    grams = [
        tuple(words[i : i + n])
        for words in (text.split() for text in texts)
        for i in range(len(words) - n + 1)
    ]
    if not grams:
        raise ValueError(f"the texts contain no {n}-gram")
    return len(set(grams)) / len(grams)
