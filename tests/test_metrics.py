"""sacrebleu wrappers: corpus scores with signatures, sentence rewards in [0, 1]."""

import pytest

from lmpg_utils.metrics import corpus_bleu, corpus_chrf, sentence_rewards


def test_perfect_and_disjoint_scores():
    refs = ["the cat sat on the mat .", "i like green apples ."]
    assert corpus_bleu(refs, refs).score == pytest.approx(100.0)
    assert corpus_chrf(refs, refs).score == pytest.approx(100.0)
    assert corpus_bleu(["xyz qqq", "zzz"], refs).score < 1.0
    assert "nrefs:1" in corpus_bleu(refs, refs).signature
    assert corpus_bleu(refs, refs).length_ratio == pytest.approx(1.0)


def test_sentence_rewards_range_and_order():
    refs = ["the cat sat on the mat ."] * 3
    hyps = ["the cat sat on the mat .", "the cat sat on a mat .", "dogs bark"]
    bleu = sentence_rewards(hyps, refs, "bleu")
    chrf = sentence_rewards(hyps, refs, "chrf")
    for scores in (bleu, chrf):
        assert all(0.0 <= s <= 1.0 for s in scores)
        assert scores[0] == pytest.approx(1.0) and scores[0] > scores[1] > scores[2]


def test_effective_order_short_hypothesis_not_zero():
    # a two-word exact match has no 3- or 4-grams; effective order keeps its BLEU at 1
    assert sentence_rewards(["hello world"], ["hello world"])[0] == pytest.approx(1.0)


def test_empty_hypothesis_scores_zero():
    assert sentence_rewards([""], ["a b c"]) == [0.0]


def test_bad_input():
    with pytest.raises(ValueError, match="hypotheses but"):
        sentence_rewards(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="unknown reward"):
        sentence_rewards(["a"], ["a"], "rouge")
    with pytest.raises(ValueError, match="no sentences"):
        corpus_bleu([], [])
    with pytest.raises(ValueError, match="not a single string"):
        corpus_chrf("a b", "a b")
