"""Word vocabulary and BPE tokenizer."""

from __future__ import annotations

import pytest

from lmpg_utils.tokenization import BPETokenizer, WordVocab, word_tokenize

TEXTS = [
    "The cat sat on the mat.",
    "The dog didn't sit!",
    "A cat and a dog met the cat.",
]


def test_word_tokenize_splits_punctuation_and_keeps_contractions():
    assert word_tokenize("The dog didn\u2019t sit!") == [
        "the",
        "dog",
        "didn't",
        "sit",
        "!",
    ]
    assert word_tokenize("Hello, World", lowercase=False) == ["Hello", ",", "World"]


def test_vocab_orders_by_frequency_and_maps_unknown_words():
    vocab = WordVocab.build(TEXTS, max_size=8)
    assert vocab.itos[:4] == ["<pad>", "<unk>", "<s>", "</s>"]
    assert vocab.itos[4:6] == ["the", "cat"]  # most frequent first
    assert len(vocab) == 8
    ids = vocab.encode("the zebra", add_bos=True, add_eos=True)
    assert ids == [vocab.bos_id, vocab.id("the"), vocab.unk_id, vocab.eos_id]
    assert vocab.decode(ids) == "the <unk>"


def test_vocab_state_round_trip_and_errors():
    vocab = WordVocab.build(TEXTS)
    again = WordVocab.from_state_dict(vocab.state_dict())
    assert again.itos == vocab.itos
    with pytest.raises(ValueError, match="outside the vocabulary"):
        vocab.decode([len(vocab)])
    with pytest.raises(ValueError, match="empty texts"):
        WordVocab.build([])
    with pytest.raises(ValueError, match="first four specials"):
        WordVocab(["a"], specials=("<s>",))


def test_bpe_round_trips_text_and_has_the_special_tokens():
    texts = TEXTS * 20 + ["Der Hund bellt laut.", "Die Katze schläft."] * 20
    tokenizer = BPETokenizer.train(texts, vocab_size=120)
    for text in ["The cat sat on the mat.", "Der Hund bellt laut."]:
        ids = tokenizer.encode(text, add_bos=True, add_eos=True)
        assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
        assert tokenizer.decode(ids) == text
    assert tokenizer.id("[MASK]") != tokenizer.id("[CLS]")
    assert tokenizer.pad_id == 0
    again = BPETokenizer.from_str(tokenizer.to_str())
    assert again.encode("The cat.") == tokenizer.encode("The cat.")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.decode([10_000])
    with pytest.raises(ValueError, match="too small"):
        BPETokenizer.train(texts, vocab_size=5)
