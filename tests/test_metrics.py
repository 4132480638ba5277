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


def test_length_penalty_punishes_only_the_long_side():
    import math

    from lmpg_utils.metrics import long_side_penalty, token_count

    ref = "the cat sat on the mat ."  # 7 tokens
    long = "the cat sat on the mat . the cat sat on the mat ."  # 14 tokens: h / r = 2
    short = "the cat sat ."
    assert token_count(ref) == 7 and token_count(long) == 14
    plain = sentence_rewards([long, short, ref], [ref] * 3)
    shaped = sentence_rewards([long, short, ref], [ref] * 3, length_penalty=3.0)
    assert shaped[0] == pytest.approx(plain[0] * math.exp(-3.0))
    assert shaped[1:] == pytest.approx(
        plain[1:]
    )  # BLEU's own brevity penalty covers h < r
    assert (
        sentence_rewards([long], [ref], "chrf", 1.0)[0]
        < sentence_rewards([long], [ref], "chrf")[0]
    )
    assert long_side_penalty(10, 5, 0.0) == 1.0 and long_side_penalty(5, 10, 9.0) == 1.0
    with pytest.raises(ValueError, match="length_penalty must be >= 0"):
        sentence_rewards([ref], [ref], length_penalty=-1.0)
    with pytest.raises(ValueError, match="strength must be >= 0"):
        long_side_penalty(3, 2, -0.5)


def test_distinct_n_counts_distinct_ngrams_over_all_texts():
    from lmpg_utils.metrics import distinct_n

    assert distinct_n(["a b c", "a b d"], 2) == 3 / 4  # (a b) twice, (b c), (b d)
    assert distinct_n(["a a a a"], 1) == 1 / 4
    assert distinct_n(["a b", "c"], 2) == 1.0  # "c" has no bigram
    with pytest.raises(ValueError, match="no 2-gram"):
        distinct_n(["a", "b"], 2)
    with pytest.raises(ValueError, match="at least 1"):
        distinct_n(["a b"], 0)
