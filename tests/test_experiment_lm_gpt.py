"""Chapters 1 and 2's experiments: tiny runs through ``run(..., device="cpu")``, the
cached models trained once then loaded, and cache keys that find the models cached
before the experiments were split."""

from __future__ import annotations

import pytest
from tiny_configs import TINY

from lmpg_utils import configs, corpora
from lmpg_utils import language_modeling as lm
from lmpg_utils.experiments import ch1_language_models as ch1
from lmpg_utils.experiments import ch2_gpt as ch2


def test_chapter_1_trains_once_then_loads_and_summarises(empty_model_cache):
    tiny = configs.apply_overrides(ch1.PROFILES["quick"], TINY["lm"])
    first = ch1.run(tiny, seed=0, device="cpu", progress=False)
    assert len(list(empty_model_cache.glob("ch1-models-*.pt"))) == 1
    second = ch1.run(tiny, seed=0, device="cpu", progress=False)
    assert second.test_perplexity == pytest.approx(first.test_perplexity, rel=1e-6)
    assert second.lstm_curve == first.lstm_curve and len(first.lstm_curve[0]) == 3
    summary = second.summary()
    assert list(summary)[: len(configs.SUMMARY_KEYS)] == list(configs.SUMMARY_KEYS)
    assert summary["experiment"] == "lm" and summary["device"] == "cpu"
    assert summary["config"]["model"]["d_hidden"] == 16
    assert set(summary["test_perplexity"]) == {"kneser_ney_2gram", "lstm"}
    assert summary["ngram_valid_by_order"] == {
        "2": summary["valid_perplexity"]["kneser_ney_2gram"]
    }
    assert set(summary["model_seconds"]) == {"ngram", "lstm", "cloze"}
    assert 0 < summary["test_unknown_rate"] < 0.5 and summary["seconds"] > 0


def test_chapter_2_trains_once_then_loads_and_reports_the_ngram(empty_model_cache):
    tiny = configs.apply_overrides(
        ch2.PROFILES["quick"], [*TINY["gpt"], "gpt.eval_every=2"]
    )
    ch2.prepare_models(tiny, seed=0, device="cpu", progress=False)
    loaded = ch2.run(tiny, seed=0, device="cpu", progress=False)
    assert loaded.cached and loaded.steps_done == 4
    assert loaded.history.eval_steps == [2, 4]
    assert loaded.model.config.vocab_size == loaded.vocab_size == len(loaded.vocab)
    data = lm.word_data(500)
    assert loaded.test_perplexity == pytest.approx(
        lm.gpt_perplexity(loaded.model, data.test, data.vocab), rel=1e-6
    )
    assert loaded.ngram_order == 2
    assert 1 < loaded.ngram_test_perplexity < loaded.test_perplexity
    summary = loaded.summary()
    assert list(summary)[: len(configs.SUMMARY_KEYS)] == list(configs.SUMMARY_KEYS)
    assert summary["experiment"] == "gpt" and summary["cached"]
    assert summary["config"]["gpt"]["model"]["d_model"] == 16
    assert summary["ngram_test_perplexity"] == loaded.ngram_test_perplexity
    assert summary["training_seconds"] == loaded.history.seconds


def test_the_gpt_trained_by_hand_is_the_gpt_that_is_cached(empty_model_cache):
    tiny = configs.apply_overrides(
        ch2.PROFILES["quick"], [*TINY["gpt"], "gpt.eval_every=2"]
    )
    data = lm.word_data(tiny.vocab_size)
    fresh = lm.cached_gpt(tiny.gpt, data, profile="quick", seed=1, device="cpu")
    again = lm.cached_gpt(tiny.gpt, data, profile="quick", seed=1, device="cpu")
    assert not fresh.cached and again.cached
    assert again.history.losses == fresh.history.losses
    model, history = lm.train_gpt(tiny.gpt, data, seed=1, device="cpu", progress=False)
    assert history.losses == fresh.history.losses  # same seed, same draws
    for name, tensor in model.state_dict().items():
        assert tensor.equal(again.model.state_dict()[name]), name
    # what later chapters call: the same cached model, with its vocabulary
    loaded = lm.load_gpt(
        "quick", training=tiny.gpt, vocab_size=500, seed=1, device="cpu"
    )
    assert loaded.cached and loaded.vocab.itos == data.vocab.itos
    assert loaded.history.losses == fresh.history.losses
    with pytest.raises(ValueError, match="unknown profile 'huge'"):
        lm.load_gpt("huge", seed=1, device="cpu")


def test_cache_keys_hold_what_they_held_before_the_split():
    """The models cached before the experiments were split are found again: the keys'
    settings are exactly those the old ``_cache_key`` and ``run_gpt`` built."""
    assert ch1._cache_key(ch1.PROFILES["quick"], 0)["config"] == {
        "vocab_size": 6000,
        "d_embed": 128,
        "d_hidden": 256,
        "batch_size": 64,
        "lr": 5e-3,
        "lstm_steps": 500,
        "cloze_steps": 200,
        "dropout": 0.1,
        "eval_every": 0,
        "corpus_parser": corpora.PARSER_VERSION,
    }
    full = ch1._cache_key(ch1.PROFILES["full"], 0)["config"]
    assert (full["vocab_size"], full["d_hidden"], full["dropout"]) == (12000, 1024, 0.3)
    assert ch2.PROFILES["quick"].gpt.cache_config() == {
        "d_model": 128,
        "num_heads": 4,
        "num_layers": 2,
        "d_ff": 512,
        "max_len": 128,
        "dropout": 0.1,
        "positional": "learned",
        "batch_size": 64,
        "lr": 3e-3,
        "warmup_steps": 100,
        "steps": 3000,
        "weight_decay": 0.01,
        "eval_every": 300,
        "valid_subset": 300,
        "precision": "auto",  # the key holds what it means here (cached_gpt)
    }


def test_both_chapters_read_the_same_words_in_each_profile():
    for profile in ("quick", "full"):
        assert ch1.PROFILES[profile].vocab_size == ch2.PROFILES[profile].vocab_size


def test_chapter_2_profiles_are_the_gpt_profiles_later_chapters_load():
    assert sorted(lm.GPT_PROFILES) == sorted(lm.GPT_VOCAB_SIZES) == ["full", "quick"]
    for profile, config in ch2.PROFILES.items():
        assert config.profile == profile
        assert config.gpt is lm.GPT_PROFILES[profile]
        assert config.vocab_size == lm.GPT_VOCAB_SIZES[profile]
    assert (lm.GPT_VOCAB_SIZES["quick"], lm.GPT_VOCAB_SIZES["full"]) == (6000, 12000)
    full = lm.GPT_PROFILES["full"]
    assert (full.model.d_model, full.model.num_layers, full.steps) == (384, 6, 8000)
    assert (full.lr, full.warmup_steps, full.valid_subset) == (1e-3, 400, 2605)


def test_configs_name_the_bad_field():
    with pytest.raises(ValueError, match="ngram_orders"):
        configs.apply_overrides(ch1.PROFILES["quick"], ["ngram_orders=0"])
    with pytest.raises(ValueError, match="lstm_steps must be positive"):
        configs.apply_overrides(ch1.PROFILES["quick"], ["lstm_steps=0"])
    with pytest.raises(ValueError, match="d_embed must be positive"):
        configs.apply_overrides(ch1.PROFILES["quick"], ["model.d_embed=-1"])
    with pytest.raises(ValueError, match="vocab_size"):
        configs.apply_overrides(ch2.PROFILES["quick"], ["vocab_size=3"])
    with pytest.raises(ValueError, match="steps must be positive"):
        configs.apply_overrides(ch2.PROFILES["full"], ["gpt.steps=0"])
    with pytest.raises(ValueError, match="profile must be one of"):
        ch2.Config(profile="huge")
    shorter = configs.apply_overrides(ch2.PROFILES["full"], ["gpt.steps=5"])
    assert (
        shorter.gpt.steps == 5 and shorter.gpt.model == ch2.PROFILES["full"].gpt.model
    )
