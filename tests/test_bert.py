"""Unit tests for lmpg_utils.bert: masking statistics, NSP pairs, pair encoding and
batching, the model's heads, the loops, and the book-group task."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from lmpg_utils import bert
from lmpg_utils.tokenization import BPETokenizer
from lmpg_utils.transformer import TransformerConfig


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a shared CPU extra threads spin and stall."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SPECIAL = bert.SpecialIds(
    pad=0, cls=5, sep=6, mask=4, vocab_size=200, specials=tuple(range(7))
)


@dataclass(frozen=True)
class FakeVerse:
    book: str
    chapter: int
    verse: int
    text: str
    index: int


def _verses() -> list[FakeVerse]:
    verses = []
    for book in ("Alpha", "Beta", "Gamma"):
        for chapter in (1, 2):
            for number in range(1, 9):
                verses.append(
                    FakeVerse(
                        book,
                        chapter,
                        number,
                        f"{book} {chapter}:{number} says word{number}.",
                        len(verses),
                    )
                )
    return verses


def _batch(rows: int = 400, length: int = 60, seed: int = 0) -> torch.Tensor:
    """Random ordinary ids framed like NSP pairs, with [CLS], [SEP] and trailing padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(7, SPECIAL.vocab_size, (rows, length), generator=g)
    ids[:, 0] = SPECIAL.cls
    ids[:, length // 2] = SPECIAL.sep
    lengths = torch.randint(length // 2 + 2, length + 1, (rows,), generator=g)
    for i, n in enumerate(lengths.tolist()):
        ids[i, n - 1] = SPECIAL.sep
        ids[i, n:] = SPECIAL.pad
    return ids


def _within(measured: float, p: float, n: int, sigmas: float = 5.0) -> bool:
    return abs(measured - p) <= sigmas * math.sqrt(p * (1 - p) / n)


def test_masking_proportions_match_bert():
    ids = _batch()
    masked = bert.mask_tokens(ids, SPECIAL, torch.Generator().manual_seed(1))
    stats = bert.masking_statistics(ids, masked, SPECIAL)
    assert stats["eligible"] > 15000 and stats["special_chosen"] == 0
    assert _within(stats["chosen_fraction"], 0.15, stats["eligible"])
    assert _within(stats["mask_fraction"], 0.8, stats["chosen"])
    assert _within(stats["random_fraction"], 0.1, stats["chosen"])
    assert _within(stats["kept_fraction"], 0.1, stats["chosen"])
    # the proportions test can fail: a 30% masking rate is far outside the band
    wrong = bert.mask_tokens(
        ids, SPECIAL, torch.Generator().manual_seed(1), mask_prob=0.3
    )
    assert not _within(
        bert.masking_statistics(ids, wrong, SPECIAL)["chosen_fraction"],
        0.15,
        stats["eligible"],
    )


def test_masking_never_touches_specials_and_labels_only_chosen():
    ids = _batch(seed=3)
    masked = bert.mask_tokens(
        ids, SPECIAL, torch.Generator().manual_seed(2), mask_prob=0.9
    )
    special = torch.isin(ids, torch.tensor(SPECIAL.specials))
    assert torch.equal(
        masked.input_ids[special], ids[special]
    )  # [CLS], [SEP], padding untouched
    assert (masked.labels[special] == bert.IGNORE_INDEX).all()
    chosen = masked.labels != bert.IGNORE_INDEX
    assert torch.equal(masked.labels[chosen], ids[chosen])
    assert torch.equal(masked.input_ids[~chosen], ids[~chosen])
    assert (masked.input_ids[masked.action == bert.MASKED] == SPECIAL.mask).all()
    assert torch.equal(
        masked.input_ids[masked.action == bert.KEPT], ids[masked.action == bert.KEPT]
    )
    randoms = masked.input_ids[masked.action == bert.RANDOM]
    assert (
        randoms.numel() > 0
        and not torch.isin(randoms, torch.tensor(SPECIAL.specials)).any()
    )


def test_masking_is_reproducible_with_a_generator():
    ids = _batch(rows=20)
    one = bert.mask_tokens(ids, SPECIAL, torch.Generator().manual_seed(7))
    two = bert.mask_tokens(ids, SPECIAL, torch.Generator().manual_seed(7))
    other = bert.mask_tokens(ids, SPECIAL, torch.Generator().manual_seed(8))
    assert torch.equal(one.input_ids, two.input_ids) and torch.equal(
        one.labels, two.labels
    )
    assert not torch.equal(one.labels, other.labels)


def test_masking_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown token id"):
        bert.mask_tokens(torch.tensor([[5, 200, 6]]), SPECIAL)
    with pytest.raises(ValueError, match="unknown token id"):
        bert.mask_tokens(torch.tensor([[5, -1, 6]]), SPECIAL)
    with pytest.raises(ValueError, match="batch, length"):
        bert.mask_tokens(torch.tensor([5, 9, 6]), SPECIAL)
    with pytest.raises(ValueError, match="mask_prob"):
        bert.mask_tokens(_batch(rows=2), SPECIAL, mask_prob=0.0)


def test_nsp_pairs_half_next_and_negatives_by_kind():
    verses = _verses()
    by_text = {v.text: v for v in verses}
    for kind in bert.NEGATIVE_KINDS:
        pairs = bert.make_nsp_pairs(verses, kind, seed=0)
        assert len(pairs) == 3 * 2 * 7  # every verse with a successor in its chapter
        for pair in pairs:
            a, b = by_text[pair.a], by_text[pair.b]
            if pair.is_next:
                assert (b.book, b.chapter, b.index) == (a.book, a.chapter, a.index + 1)
            elif kind == "other_book":
                assert b.book != a.book
            elif kind == "same_chapter":
                assert (b.book, b.chapter) == (a.book, a.chapter) and abs(
                    b.index - a.index
                ) >= 2
            else:
                assert (b.book, b.chapter) != (a.book, a.chapter)
    many = bert.make_nsp_pairs(verses, "random", seed=1, p_next=0.5)
    share = sum(p.is_next for p in many) / len(many)
    assert 0.2 < share < 0.8
    with pytest.raises(ValueError, match="negatives kind"):
        bert.make_nsp_pairs(verses, "nearby")
    with pytest.raises(ValueError, match="empty text"):
        bert.make_nsp_pairs([*verses[:3], FakeVerse("Alpha", 1, 4, "  ", 3)])


def test_encode_pairs_layout_and_segments():
    batch = bert.encode_pairs(
        [[10, 11, 12]], [[20, 21]], SPECIAL, max_len=16, labels=[True]
    )
    assert batch.ids.tolist() == [[5, 10, 11, 12, 6, 20, 21, 6]]
    assert batch.segment_ids.tolist() == [[0, 0, 0, 0, 0, 1, 1, 1]]
    assert batch.truncated == 0 and not batch.padding_mask.any()


def test_too_long_pairs_are_truncated_longer_side_first_and_counted():
    a, b = list(range(10, 30)), list(range(40, 45))
    batch = bert.encode_pairs(
        [a, [7, 8]], [b, [9]], SPECIAL, max_len=13, labels=[True, False]
    )
    assert batch.truncated == 1
    row = batch.ids[0].tolist()
    assert len(row) == 13 and row[0] == SPECIAL.cls and row.count(SPECIAL.sep) == 2
    # 10 tokens fit: the longer side A is cut down to 5, B (5 tokens) is kept whole
    assert row == [5, *range(10, 15), 6, *range(40, 45), 6]
    assert batch.padding_mask[1].tolist() == [False] * 6 + [True] * 7
    assert bert.truncate_pair([1, 2, 3], [4, 5, 6], 4) == ([1, 2], [4, 5], True)


def test_encoding_rejects_empty_and_unknown():
    with pytest.raises(ValueError, match="empty"):
        bert.encode_pairs([[]], [[9]], SPECIAL, max_len=16)
    with pytest.raises(ValueError, match="unknown token id 999"):
        bert.encode_pairs([[9, 999]], [[9]], SPECIAL, max_len=16)
    with pytest.raises(ValueError, match="unknown token id"):
        bert.encode_single([[9, 200]], SPECIAL, max_len=16)
    with pytest.raises(ValueError, match="sentence 1 is empty"):
        bert.encode_single([[9], []], SPECIAL, max_len=16)


def test_an_empty_sentence_is_cls_sep_when_allowed():
    batch = bert.encode_single([[9, 10], []], SPECIAL, max_len=16, allow_empty=True)
    assert batch.ids[1, :2].tolist() == [SPECIAL.cls, SPECIAL.sep]
    assert batch.padding_mask[1].tolist() == [False, False, True, True]


def test_tokenize_texts_rejects_empty_text():
    tokenizer = BPETokenizer.train(
        ["in the beginning god created the heavens and the earth"] * 5, 60
    )
    assert bert.tokenize_texts(tokenizer, ["the earth"])[0]
    with pytest.raises(ValueError, match="text 1 is empty"):
        bert.tokenize_texts(tokenizer, ["the earth", ""])
    special = bert.SpecialIds.from_tokenizer(tokenizer)
    assert {special.pad, special.cls, special.sep, special.mask} <= set(
        special.specials
    )


def _tiny_model() -> bert.BertModel:
    torch.manual_seed(0)
    config = TransformerConfig(
        vocab_size=200,
        d_model=32,
        num_heads=2,
        num_layers=1,
        d_ff=64,
        max_len=16,
        dropout=0.0,
        num_segments=2,
    )
    return bert.BertModel(config)


def test_model_heads_shapes_and_tied_decoder():
    model = _tiny_model()
    batch = bert.encode_pairs(
        [[10, 11, 12], [13]],
        [[20, 21], [22, 23]],
        SPECIAL,
        max_len=16,
        labels=[True, False],
    )
    mlm, nsp = model(batch.ids, batch.segment_ids, batch.padding_mask)
    assert mlm.shape == (2, batch.ids.shape[1], 200) and nsp.shape == (2, 2)
    with torch.no_grad():
        model.encoder.embeddings.token.weight[42] += (
            1.0  # the decoder reads the same table
        )
        hidden = model.encode(batch.ids, batch.segment_ids, batch.padding_mask)
        direct = (
            model.mlm_transform(hidden) @ model.encoder.embeddings.token.weight.T
            + model.mlm_bias
        )
    assert torch.allclose(model.mlm_logits(hidden), direct)
    with pytest.raises(ValueError, match="num_segments=2"):
        bert.BertModel(
            TransformerConfig(
                vocab_size=50, d_model=16, num_heads=2, num_layers=1, max_len=8
            )
        )


def test_pretraining_overfits_a_tiny_batch_and_finetuning_runs():
    model = _tiny_model()
    a = [[10 + i, 30 + i, 50 + i] for i in range(8)]
    b = [[70 + i, 90 + i] for i in range(8)]
    data = bert.encode_pairs(
        a, b, SPECIAL, max_len=16, labels=[i % 2 == 0 for i in range(8)]
    )
    history = bert.pretrain(
        model,
        data,
        SPECIAL,
        steps=150,
        batch_size=8,
        lr=3e-3,
        warmup_steps=5,
        progress=False,
    )
    assert sum(history.nsp_losses[-10:]) / 10 < 0.3 < history.nsp_losses[0]
    scores = bert.evaluate_pretraining(model, data, SPECIAL)
    assert scores["nsp_accuracy"] == 1.0 and scores["nsp_majority"] == 0.5
    classifier = bert.BertClassifier(model, 2)
    labelled = bert.encode_single(
        a, SPECIAL, max_len=16, labels=[i % 2 for i in range(8)]
    )
    bert.fine_tune(classifier, labelled, steps=60, batch_size=8, lr=3e-3)
    assert bert.classifier_accuracy(classifier, labelled) == 1.0


def test_mlm_accuracy_by_kind_of_position_adds_up():
    torch.manual_seed(0)
    model = bert.BertModel(
        TransformerConfig(
            vocab_size=SPECIAL.vocab_size,
            d_model=16,
            num_heads=2,
            num_layers=1,
            d_ff=32,
            max_len=40,
            num_segments=2,
        )
    )
    g = torch.Generator().manual_seed(0)
    a = [
        torch.randint(5, SPECIAL.vocab_size, (15,), generator=g).tolist()
        for _ in range(200)
    ]
    data = bert.encode_pairs(
        a, a, SPECIAL, max_len=40, labels=[i % 2 == 0 for i in range(200)]
    )
    scores = bert.evaluate_pretraining(model, data, SPECIAL, baseline_token=7)
    counts = {k: scores[f"mlm_count_{k}"] for k in bert.MLM_KINDS}
    assert sum(counts.values()) == scores["mlm_labels"] > 500
    assert abs(counts["masked"] / scores["mlm_labels"] - 0.8) < 0.05
    assert (
        abs(counts["random"] / scores["mlm_labels"] - 0.1) < 0.04
    )  # a random draw may hit the original
    right = sum(scores[f"mlm_accuracy_{k}"] * counts[k] for k in bert.MLM_KINDS)
    assert abs(right / scores["mlm_labels"] - scores["mlm_accuracy"]) < 1e-9
    assert all(0 <= scores[f"mlm_baseline_{k}"] <= 1 for k in bert.MLM_KINDS)


def test_pretraining_pairs_fill_the_count_in_rounds_with_fresh_negatives():
    verses = _verses()
    one_round = len(bert.make_nsp_pairs(verses, "random", seed=3))
    pairs = bert.pretraining_pairs(verses, 2 * one_round + 5, seed=3)
    assert len(pairs) == 2 * one_round + 5
    assert pairs[:one_round] == bert.make_nsp_pairs(verses, "random", seed=3)
    second = bert.make_nsp_pairs(verses, "random", seed=3 + bert.ROUND_SEED_STEP)
    assert pairs[one_round : 2 * one_round] == second != pairs[:one_round]
    with pytest.raises(ValueError, match="count must be positive"):
        bert.pretraining_pairs(verses, 0, seed=3)


def _ragged_batch(rows: int = 10) -> bert.EncodedBatch:
    a = [[10 + i] * (1 + i % 4) for i in range(rows)]
    return bert.encode_pairs(a, [[20]] * rows, SPECIAL, max_len=16, labels=[1] * rows)


def test_batches_are_trimmed_and_cover_the_data():
    data = _ragged_batch()
    assert data.ids.shape[1] == 8  # [CLS] + 4 + [SEP] + 1 + [SEP]
    short = data.select([0, 4]).trimmed()  # one A token each: 5 columns
    assert short.ids.shape[1] == 5 and not short.padding_mask.any()
    chunks = list(data.in_order(4))
    assert [len(c) for c in chunks] == [4, 4, 2]
    assert torch.equal(chunks[2].ids, data.ids[8:, : chunks[2].ids.shape[1]])
    shuffled = bert.shuffled_batches(data, 3, torch.Generator().manual_seed(0))
    first_pass = [next(shuffled) for _ in range(3)]  # 10 rows: 3 batches, 1 row left
    firsts = sorted(int(b.ids[i, 1]) for b in first_pass for i in range(len(b)))
    assert len(set(firsts)) == 9 and set(firsts) <= {10 + i for i in range(10)}
    with pytest.raises(ValueError, match="batch_size must be in 1..10"):
        bert.shuffled_batches(data, 11, torch.Generator())


def test_book_groups_split_is_balanced_and_prefixes_nest():
    assert bert.book_group_of("Genesis") == 0 and bert.book_group_of("Psalms") == 1
    assert bert.book_group_of("Tobit") is None  # deuterocanon: in no group
    groups = [books[0] for books in bert.BOOK_GROUPS.values()]
    verses = [
        FakeVerse(book, 1, n, f"{book} verse {n}", i)
        for i, (book, n) in enumerate(
            (b, n) for b in [*groups, "Tobit"] for n in range(6)
        )
    ]
    texts, labels = bert.classification_split(verses, 4, seed=0)
    assert sorted(labels) == sorted(list(range(len(groups))) * 4)
    assert all(
        text.split()[0] == groups[label]
        for text, label in zip(texts, labels, strict=True)
    )
    assert (texts, labels) == bert.classification_split(verses, 4, seed=0)
    small, large = bert.balanced_prefix(labels, 1), bert.balanced_prefix(labels, 3)
    assert sorted(labels[i] for i in small) == list(range(len(groups)))
    assert set(small) < set(large) and len(large) == 3 * len(groups)
    with pytest.raises(ValueError, match="only 6 verses for class 0"):
        bert.classification_split(verses, 7, seed=0)


def test_book_group_classifier_starts_from_the_given_weights():
    model = _tiny_model()
    labelled = bert.encode_single(
        [[10 + i, 30 + i] for i in range(8)],
        SPECIAL,
        max_len=16,
        labels=[0, 1, 2, 3] * 2,
    )
    kwargs = dict(
        steps=1, batch_size=8, lr=1e-9, init_seed=1, batch_seed=2, device="cpu"
    )
    pretrained = bert.train_classifier(
        model.config, labelled, model.state_dict(), len(bert.BOOK_GROUPS), **kwargs
    )
    scratch = bert.train_classifier(
        model.config, labelled, None, len(bert.BOOK_GROUPS), **kwargs
    )
    token = "encoder.embeddings.token.weight"
    assert torch.allclose(
        pretrained.bert.state_dict()[token], model.state_dict()[token]
    )
    assert not torch.allclose(
        scratch.bert.state_dict()[token], model.state_dict()[token]
    )
    assert pretrained.head.out_features == len(bert.BOOK_GROUPS)


def test_pretraining_pairs_for_each_sentence_task():
    verses = _verses()
    successor = {
        v.text: w.text
        for v, w in zip(verses, verses[1:], strict=False)
        if (v.book, v.chapter, v.index + 1) == (w.book, w.chapter, w.index)
    }
    nsp = bert.pretraining_pairs(verses, 300, seed=5)
    assert nsp == bert.pretraining_pairs(verses, 300, seed=5, sentence_task="nsp")
    none = bert.pretraining_pairs(verses, 300, seed=5, sentence_task="none")
    assert all(p.is_next and successor[p.a] == p.b for p in none)
    sop = bert.pretraining_pairs(verses, 300, seed=5, sentence_task="sop")
    # always two consecutive verses: in order (is_next) or swapped
    assert all(
        successor[p.a] == p.b if p.is_next else successor[p.b] == p.a for p in sop
    )
    assert 0.35 < sum(p.is_next for p in sop) / len(sop) < 0.65
    with pytest.raises(ValueError, match="sentence_task"):
        bert.pretraining_pairs(verses, 300, seed=5, sentence_task="order")


def test_pretraining_without_a_sentence_task_is_the_masked_lm_alone():
    model = _tiny_model()
    a = [[10 + i, 30 + i, 50 + i] for i in range(8)]
    data = bert.encode_pairs(a, a, SPECIAL, max_len=16, labels=[True] * 8)
    batch = bert.make_pretraining_batch(data, SPECIAL, torch.Generator().manual_seed(0))
    total, mlm, sentence = bert.pretraining_loss(model, batch, "none")
    assert sentence is None and torch.equal(total, mlm)
    with_nsp, _, nsp = bert.pretraining_loss(model, batch, "nsp")
    assert torch.allclose(with_nsp, mlm + nsp)
    head = model.nsp_head.weight.detach().clone()
    history = bert.pretrain(
        model, data, SPECIAL, steps=5, batch_size=8, lr=1e-2, progress=False,
        sentence_task="none",
    )  # fmt: skip
    assert history.nsp_losses == [] and len(history.mlm_losses) == 5
    assert torch.equal(model.nsp_head.weight, head)  # the head took no step
    assert all(p.requires_grad for p in model.parameters())  # and is trainable again
    with pytest.raises(ValueError, match="sentence_task"):
        bert.pretrain(model, data, SPECIAL, steps=1, batch_size=8, lr=1e-2,
                      sentence_task="order")  # fmt: skip


def test_sentence_order_pairs_swap_about_half_and_need_consecutive_pairs():
    verses = _verses()
    in_order = bert.make_nsp_pairs(verses, "random", p_next=1.0, seed=2)
    swapped = bert.sentence_order_pairs(in_order, seed=2)
    assert swapped == bert.sentence_order_pairs(in_order, seed=2)
    for before, after in zip(in_order, swapped, strict=True):
        assert after in (before, bert.SentencePair(before.b, before.a, False))
    assert 0 < sum(not p.is_next for p in swapped) < len(swapped)
    with pytest.raises(ValueError, match="consecutive"):
        bert.sentence_order_pairs(bert.make_nsp_pairs(verses, seed=2), seed=2)
