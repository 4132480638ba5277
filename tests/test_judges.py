"""Chapter 5's book-group judges (lmpg_utils/judges.py): the text form they read, the
disjoint verses of the proxy and the gold judge, and a tiny judge trained, cached and
loaded on the CPU."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lmpg_utils import bert, corpora, judges
from lmpg_utils import language_modeling as lm
from lmpg_utils.transformer import ModelSizes

TINY_PRETRAINING = bert.Pretraining(
    model=ModelSizes(
        d_model=16,
        num_heads=2,
        num_layers=1,
        d_ff=32,
        max_len=32,
        dropout=0.0,
        positional="sinusoidal",
    ),
    pairs=64,
    steps=3,
    batch_size=8,
    warmup_steps=1,
)
TINY_JUDGE = judges.JudgeConfig(labels_per_class=6, steps=3, batch_size=8)


@pytest.fixture(scope="module")
def vocab():
    return lm.word_data(500).vocab


def test_normalise_is_the_gpt_text_form_and_a_fixed_point(vocab):
    text = "And Zorblax said to them: <unk> is here."
    normal = judges.normalise(text, vocab)
    assert normal == "and <unk> said to them : <unk> is here ."
    assert judges.normalise(normal, vocab) == normal
    ids = vocab.encode("And Zorblax said.")
    assert vocab.unk_id in ids
    assert judges.render(ids, vocab) == judges.normalise("And Zorblax said.", vocab)
    assert judges.render([], vocab) == ""
    with pytest.raises(ValueError, match="special '</s>'"):
        judges.render([*ids, vocab.eos_id], vocab)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        judges.render([len(vocab)], vocab)


def test_the_bpe_tokenizer_reads_a_rendered_unk_as_its_unk_token():
    tokenizer = bert.train_bible_tokenizer(4000)
    assert tokenizer.unk_id in tokenizer.encode("and <unk> wept")


def test_proxy_and_gold_judges_learn_from_disjoint_verses():
    halves = [judges.judge_verses(half) for half in (0, 1)]
    indices = [{v.index for v in verses} for verses in halves]
    assert indices[0] and not indices[0] & indices[1]
    train = corpora.load_bible_verses("train")
    assert indices[0] | indices[1] == {v.index for v in train}
    for profile in ("quick", "full"):
        proxy, gold = judges.PROXY_JUDGE[profile], judges.GOLD_JUDGE[profile]
        assert {proxy.half, gold.half} == {0, 1} and proxy.seed != gold.seed
        assert gold.labels_per_class > proxy.labels_per_class
        assert gold.steps > proxy.steps
    with pytest.raises(ValueError, match="half must be 0 or 1"):
        judges.judge_verses(2)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"labels_per_class": 0}, "labels_per_class"),
        ({"steps": 0}, "steps"),
        ({"lr": -1.0}, "lr"),
        ({"half": 2}, "half"),
        ({"seed": -1}, "seed"),
    ],
)
def test_judge_config_names_the_bad_field(changes, field):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(TINY_JUDGE, **changes)


def test_rendered_split_is_balanced_and_normalised(vocab):
    texts, labels = judges.rendered_split(judges.judge_verses(0), 3, 0, vocab)
    assert sorted(labels) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert all(judges.normalise(t, vocab) == t for t in texts)
    assert all(t == t.lower() for t in texts)


def test_a_tiny_judge_trains_once_then_loads_the_same_judge(empty_model_cache, vocab):
    def judge(config):
        return judges.cached_judge(
            config,
            TINY_PRETRAINING,
            pretraining_seed=0,
            vocab=vocab,
            device="cpu",
            progress=False,
        )

    first = judge(TINY_JUDGE)
    assert not first.cached and first.seconds > 0
    assert len(list(empty_model_cache.glob("ch3-bert-*.pt"))) == 1
    assert len(list(empty_model_cache.glob("ch5-judge-*.pt"))) == 1
    texts = ["and god said , let there be light", "", "<unk> <unk> amen"]
    again = judge(TINY_JUDGE)
    assert again.cached and again.seconds == first.seconds
    assert torch.equal(again.log_probs(texts), first.log_probs(texts))

    other = judge(dataclasses.replace(TINY_JUDGE, seed=1, half=1))
    assert not other.cached
    assert len(list(empty_model_cache.glob("ch5-judge-*.pt"))) == 2
    assert len(list(empty_model_cache.glob("ch3-bert-*.pt"))) == 1  # reused
    assert not torch.equal(other.log_probs(texts), first.log_probs(texts))


def test_log_probs_are_distributions_and_the_reward_is_one_column(
    empty_model_cache, vocab
):
    judge = judges.cached_judge(
        TINY_JUDGE,
        TINY_PRETRAINING,
        pretraining_seed=0,
        vocab=vocab,
        device="cpu",
        progress=False,
    )
    judge.batch_size = 2  # more than one batch
    texts = ["in the beginning", "", "blessed is the man", "and jesus wept ."]
    log_probs = judge.log_probs(texts)
    assert log_probs.shape == (4, len(bert.BOOK_GROUPS))
    assert torch.allclose(log_probs.exp().sum(-1), torch.ones(4), atol=1e-5)
    # batched or one at a time: the same scores
    alone = torch.cat([judge.log_probs([t]) for t in texts])
    assert torch.allclose(alone, log_probs, atol=1e-5)
    for target in range(len(bert.BOOK_GROUPS)):
        assert torch.equal(judge.reward(texts, target), log_probs[:, target])
    assert judge.accuracy(texts, judge.predict(texts).tolist()) == 1.0
    with pytest.raises(ValueError, match="target must be a group index"):
        judge.reward(texts, len(bert.BOOK_GROUPS))
    with pytest.raises(ValueError, match="not one string"):
        judge.log_probs("in the beginning")
    with pytest.raises(ValueError, match="3 labels for 4 texts"):
        judge.accuracy(texts, [0, 1, 2])
