"""Kneser-Ney n-gram model: normalisation, continuation counts, perplexity."""

from __future__ import annotations

import math
import random

import pytest

from lmpg_utils.ngram import KneserNeyLM

VOCAB, BOS, EOS = 12, 2, 3


def corpus(seed: int = 0, n: int = 300) -> list[list[int]]:
    rng = random.Random(seed)
    return [
        [rng.choice(range(4, VOCAB)) for _ in range(rng.randint(1, 8))]
        for _ in range(n)
    ]


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_every_conditional_distribution_sums_to_one(order):
    model = KneserNeyLM(order, VOCAB, BOS, EOS).fit(corpus())
    for context in (
        [],
        [4],
        [4, 5],
        [BOS, BOS, 7],
        [11, 11, 11],
    ):  # seen and unseen contexts
        total = sum(model.prob(w, context) for w in range(VOCAB))
        assert total == pytest.approx(1.0, abs=1e-9)


def test_continuation_counts_favour_words_with_many_left_contexts():
    # "francisco" is frequent but only after "san"; "glasses" follows many words.
    san, francisco, glasses = 4, 5, 6
    others = [7, 8, 9, 10]
    sentences = [[san, francisco]] * 20 + [[o, glasses] for o in others] * 2
    model = KneserNeyLM(2, VOCAB, BOS, EOS).fit(sentences)
    unseen_context = [11]
    assert model.prob(glasses, unseen_context) > model.prob(francisco, unseen_context)
    assert model.prob(francisco, [san]) > 0.9


def test_perplexity_matches_sum_of_log_probs_and_prefers_in_domain_text():
    train = corpus(0)
    model = KneserNeyLM(3, VOCAB, BOS, EOS).fit(train)
    sentence = train[0]
    log_prob, events = model.sentence_log_prob(sentence)
    assert events == len(sentence) + 1
    assert log_prob == pytest.approx(sum(model.token_log_probs(sentence)))
    assert model.perplexity([sentence]) == pytest.approx(math.exp(-log_prob / events))
    repetitive = [[4, 5, 6]] * 50
    assert KneserNeyLM(3, VOCAB, BOS, EOS).fit(repetitive).perplexity([[4, 5, 6]]) < 1.5


def test_bad_input():
    with pytest.raises(ValueError, match="order must be"):
        KneserNeyLM(0, VOCAB, BOS, EOS)
    with pytest.raises(ValueError, match="no sentences"):
        KneserNeyLM(2, VOCAB, BOS, EOS).fit([])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        KneserNeyLM(2, VOCAB, BOS, EOS).fit([[99]])
    with pytest.raises(RuntimeError, match="fit the model"):
        KneserNeyLM(2, VOCAB, BOS, EOS).prob(4, [])
    with pytest.raises(ValueError, match="no sentences|undefined"):
        KneserNeyLM(2, VOCAB, BOS, EOS).fit(corpus()).perplexity([])
