"""Chapters 1-2's task module: framing, batching, one scoring loop, one perplexity, the
baselines and the GPT's windows (no corpus needed)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lmpg_utils import language_modeling as lm
from lmpg_utils.neural_lm import BidirectionalLSTMCloze, LSTMLanguageModel
from lmpg_utils.tokenization import WordVocab, pad_batch
from lmpg_utils.transformer import GPT, ModelSizes, TransformerConfig


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _vocab() -> WordVocab:
    return WordVocab.build(["the cat sat on the mat", "a dog sat"])


def _toy_gpt():
    vocab = _vocab()
    config = TransformerConfig(
        vocab_size=len(vocab),
        d_model=16,
        num_heads=2,
        num_layers=1,
        d_ff=32,
        max_len=4,
        dropout=0.0,
    )
    return GPT(config).eval(), vocab


def _toy_data() -> lm.WordLMData:
    vocab = _vocab()
    train = [vocab.encode(t) for t in ("the cat sat on the mat", "a dog sat") * 5]
    valid = [vocab.encode("the cat sat"), vocab.encode("a dog sat on the mat")]
    test = [vocab.encode("the dog sat on the cat"), vocab.encode("a zebra")]
    return lm.WordLMData(vocab, train, valid, test)


def test_frame_and_training_batches_are_framed_and_padded():
    vocab = _vocab()
    assert lm.frame([5, 6], vocab) == [vocab.bos_id, 5, 6, vocab.eos_id]
    sentences = [[5], [5, 6, 7], [6, 7]]
    batches = lm.batch_iterator(sentences, vocab, 2, torch.Generator().manual_seed(0))
    rows = []
    for batch in (next(batches), next(batches)):
        for row in batch.tolist():
            while row[-1] == vocab.pad_id:
                row.pop()
            rows.append(row)
    assert sorted(rows) == sorted(lm.frame(s, vocab) for s in sentences)


def test_unknown_rate_is_the_share_of_unk_words():
    vocab = _vocab()
    data = lm.WordLMData(vocab, [], [], [vocab.encode("the zebra sat"), [4]])
    assert data.unknown_rate("test") == pytest.approx(1 / 4)


def test_length_batches_respect_the_budget_and_cover_every_index_once():
    lengths = [5, 2, 9, 2, 4, 7, 3]
    batches = list(lm.length_batches(lengths, max_tokens=12))
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        widest = max(lengths[i] for i in batch)
        assert widest * len(batch) <= 12 or len(batch) == 1
    # by length, ties in input order
    assert [i for b in batches for i in b] == [1, 3, 6, 4, 0, 5, 2]
    assert [len(b) for b in lm.length_batches(lengths, 100, max_rows=3)] == [3, 3, 1]
    assert list(lm.length_batches([20], 5)) == [[0]]  # too long: a batch alone
    with pytest.raises(ValueError, match="max_tokens"):
        list(lm.length_batches(lengths, 0))
    with pytest.raises(ValueError, match="max_rows"):
        list(lm.length_batches(lengths, 10, max_rows=0))


def test_one_perplexity():
    rows = [[math.log(0.5), math.log(0.25)], [math.log(0.5)]]
    nll, events = lm.summed_nll(rows)
    assert events == 3 and nll == pytest.approx(-math.log(0.5**2 * 0.25))
    assert lm.perplexity_of(nll, events) == pytest.approx((0.5**2 * 0.25) ** (-1 / 3))
    with pytest.raises(ValueError, match="no events"):
        lm.perplexity_of(0.0, 0)


@pytest.mark.parametrize("kind", ["lstm", "cloze"])
def test_token_log_probs_score_each_sentence_as_if_alone_in_input_order(kind):
    vocab = _vocab()
    V = len(vocab)
    if kind == "lstm":
        model = LSTMLanguageModel(V, 8, 12, dropout=0.5, cutoffs=(5,))
        scorer = lm.lstm_scorer(model)
    else:
        model = BidirectionalLSTMCloze(V, 8, 12, dropout=0.5, cutoffs=(5,))
        scorer = lm.cloze_scorer(model, vocab.pad_id)
    assert not model.training  # dropout off: scores are deterministic
    sentences = [[5, 6, 7, 8], [9], [10, 4], [6, 5, 4, 7, 9, 10]]
    got = lm.token_log_probs(scorer, sentences, vocab, max_tokens=10)
    ends = 1 if kind == "lstm" else 0
    assert [len(r) for r in got] == [len(s) + ends for s in sentences]
    for sentence, row in zip(sentences, got, strict=True):
        framed = torch.tensor([lm.frame(sentence, vocab)])
        with torch.no_grad():
            if kind == "lstm":
                log_probs = model(framed[:, :-1])[0][0]
                targets = framed[0, 1:]
            else:
                log_probs = model(framed, torch.tensor([framed.shape[1]]))[0]
                targets = framed[0, 1:-1]
        alone = log_probs.gather(-1, targets[:, None]).squeeze(-1)
        assert torch.allclose(torch.tensor(row), alone, atol=1e-5)
        assert all(p <= 0 for p in row)


def test_best_ngram_keeps_the_order_best_on_validation():
    data = _toy_data()
    choice = lm.best_ngram(data, (3, 1, 2))
    assert sorted(choice.valid_by_order) == [1, 2, 3]
    assert choice.order == min(choice.valid_by_order, key=choice.valid_by_order.get)
    assert choice.model.order == choice.order
    assert choice.valid_by_order[choice.order] == choice.model.perplexity(data.valid)
    assert choice.valid_by_order[1] > choice.valid_by_order[choice.order]
    with pytest.raises(ValueError, match="orders"):
        lm.best_ngram(data, ())


def test_unigram_perplexity_and_seen_ngram_rate_by_hand():
    vocab = _vocab()
    the, cat, dog = vocab.id("the"), vocab.id("cat"), vocab.id("dog")
    train = [[the, cat], [the]]  # events: the cat </s> the </s>
    test = [[the, dog]]  # dog never occurs in train
    with pytest.raises(ValueError, match="probability zero"):
        lm.unigram_perplexity(train, test, vocab)
    test = [[cat, the]]  # events: cat (1/5), the (2/5), </s> (2/5)
    expected = (1 / 5 * 2 / 5 * 2 / 5) ** (-1 / 3)
    assert lm.unigram_perplexity(train, test, vocab) == pytest.approx(expected)
    # bigrams of test: (<s> cat) unseen, (cat the) unseen, (the </s>) seen
    assert lm.seen_ngram_rate(train, test, vocab, n=2) == pytest.approx(1 / 3)
    assert lm.seen_ngram_rate(train, train, vocab, n=3) == 1.0
    with pytest.raises(ValueError, match="n must be"):
        lm.seen_ngram_rate(train, test, vocab, n=0)


def test_windows_cover_every_event_once():
    vocab = WordVocab(["a"])
    sentence = list(range(4, 13))  # 9 words -> 10 events
    pieces = lm.windows(sentence, vocab, context=4)
    assert [len(p) for p in pieces] == [5, 5, 3]
    targets = [t for p in pieces for t in p[1:]]
    assert targets == sentence + [vocab.eos_id]
    assert pieces[0][0] == vocab.bos_id and pieces[1][0] == pieces[0][-1]
    assert lm.windows([5], vocab, context=10) == [[vocab.bos_id, 5, vocab.eos_id]]
    with pytest.raises(ValueError, match="context must be >= 1"):
        lm.windows(sentence, vocab, 0)


def test_gpt_perplexity_follows_the_chapter_1_contract():
    model, vocab = _toy_gpt()
    sentences = [
        vocab.encode("the cat sat"),
        vocab.encode("a dog sat on the mat"),
        vocab.encode("zebra"),
    ]
    assert vocab.unk_id in sentences[2]
    # by hand: each verse from <s>, predicting every word and </s>, long verses in
    # windows of max_len=4
    nll, count = 0.0, 0
    for s in sentences:
        framed = [vocab.bos_id, *s, vocab.eos_id]
        for start in range(0, len(framed) - 1, 4):
            piece = torch.tensor([framed[start : start + 5]])
            with torch.no_grad():
                log_probs = F.log_softmax(model(piece[:, :-1]), -1)
            nll -= float(log_probs.gather(-1, piece[:, 1:, None]).sum())
            count += piece.shape[1] - 1
    assert count == sum(len(s) + 1 for s in sentences)
    got_nll, got_count = lm.total_nll(model, sentences, vocab, batch_size=2)
    assert got_count == count and math.isclose(got_nll, nll, rel_tol=1e-5)
    small_nll, small_count = lm.total_nll(model, sentences, vocab, max_tokens=6)
    assert small_count == count and math.isclose(small_nll, nll, rel_tol=1e-5)
    assert math.isclose(
        lm.gpt_perplexity(model, sentences, vocab), math.exp(nll / count), rel_tol=1e-5
    )
    # the training loss ignores padding and counts the same events
    batch = pad_batch(
        [[vocab.bos_id, *s, vocab.eos_id] for s in sentences[:1]]
        + [[vocab.bos_id, 4, vocab.eos_id]],
        vocab.pad_id,
    )
    loss, items = lm.lm_loss(model, batch, vocab.pad_id)
    assert items == len(sentences[0]) + 1 + 2 and torch.isfinite(loss)
    with pytest.raises(ValueError, match="no sentences to score"):
        lm.total_nll(model, [], vocab)


def test_sample_verses_and_attention_weights():
    model, vocab = _toy_gpt()
    texts = lm.sample_verses(
        model,
        vocab,
        count=3,
        max_new_tokens=10,
        generator=torch.Generator().manual_seed(0),
    )
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    maps = lm.attention_weights(model, [vocab.bos_id, 4, 5])
    assert len(maps) == 1 and maps[0].shape == (2, 3, 3)
    assert float(maps[0].triu(1).abs().max()) == 0.0
    with pytest.raises(ValueError, match="count must be positive"):
        lm.sample_verses(model, vocab, count=0)


def test_gpt_training_settings_are_checked_and_flattened_for_the_cache():
    with pytest.raises(ValueError, match="not divisible"):
        lm.GPTTraining(model=ModelSizes(d_model=30, num_heads=4))
    with pytest.raises(ValueError, match="steps must be positive"):
        lm.GPTTraining(steps=0)
    with pytest.raises(ValueError, match="model.max_len"):
        lm.GPTTraining(model=ModelSizes(max_len=1))
    with pytest.raises(ValueError, match="num_decoder_layers"):
        lm.GPTTraining(model=ModelSizes(num_decoder_layers=2))
    with pytest.raises(ValueError, match="precision"):
        lm.GPTTraining(precision="fp8")
    flat = lm.GPTTraining().cache_config()
    assert flat["d_model"] == 128 and flat["max_len"] == 128 and flat["steps"] == 3000
    assert "model" not in flat and "num_decoder_layers" not in flat
