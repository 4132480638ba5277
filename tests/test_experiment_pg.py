"""Chapter 4's experiment: its config, the cache key of the MLE start, and a tiny run on
the real verse pairs, trained from scratch into a temporary cache."""

from __future__ import annotations

import shutil

import pytest
import torch
from tiny_configs import TINY

from lmpg_utils import caching, configs, corpora, translation
from lmpg_utils.experiments import ch4_policy_gradient as ch4
from lmpg_utils.policy_gradient import ESTIMATORS
from lmpg_utils.training import resolve_precision

# the --set assignments that shrink the quick profile to seconds on a CPU (in this order:
# each one is validated on its own, and weak_step must stay below mle_steps)


def test_config_validates_once_by_name():
    with pytest.raises(ValueError, match="weak_step"):
        ch4.Config(mle_steps=10, weak_step=10)
    with pytest.raises(ValueError, match="mle_mix"):
        ch4.Config(mle_mix=-1.0)
    with pytest.raises(ValueError, match="length_penalty"):
        ch4.Config(length_penalty=-0.1)
    with pytest.raises(ValueError, match="token budgets"):
        ch4.Config(mle_batch_tokens=10)
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        ch4.Config(pg_precision="fp16")
    with pytest.raises(ValueError, match="estimator 'greedy'.*leave-one-out"):
        ch4.Config(estimator="greedy")
    with pytest.raises(ValueError, match="samples must be at least 2"):
        ch4.Config(samples=1)
    assert ch4.Config(samples=1, estimator="self-critical").samples == 1
    with pytest.raises(ValueError, match="model.max_len"):
        configs.apply_overrides(ch4.Config(), ["max_len=200"])
    assert ch4.PROFILES["full"].profile == "full"


def test_start_key_holds_exactly_what_it_held_before():
    """The cached translators are found again: the key's content is the same as before
    the config was restructured (nested model sizes, a StartConfig)."""
    quick = ch4.PROFILES["quick"].start_key()
    assert quick["kind"] == "ch4-mle-start" and quick["seed"] == 0
    assert quick["config"] == {
        "train_words": 30,
        "eval_words": 20,
        "vocab_size": 8000,
        "d_model": 256,
        "num_heads": 4,
        "num_layers": 3,
        "d_ff": 1024,
        "dropout": 0.1,
        "max_tokens": 96,
        "mle_steps": 2300,
        "mle_batch_tokens": 2500,
        "mle_lr": 2e-3,
        "mle_warmup": 200,
        "mle_precision": resolve_precision("auto", "cpu"),  # bf16 where it is fast
        "average_last": 1,
        "label_smoothing": 0.1,
        "weak_step": 300,
        "corpus_parser": corpora.PARSER_VERSION,
        "corpus": "rv1909-web",
    }
    full = ch4.PROFILES["full"].start_key()["config"]
    assert (full["d_model"], full["max_tokens"], full["mle_steps"]) == (384, 128, 4000)
    # fine-tuning settings do not retrain the start; model settings do, the ones the
    # first key left out included
    quick_config = ch4.PROFILES["quick"]
    for same in ("pg_lr=0.5", "estimator=none", "length_penalty=0"):
        assert configs.apply_overrides(quick_config, [same]).start_key() == quick
    for other in ("model.d_model=64", "model.positional=sinusoidal", "start_seed=1"):
        assert configs.apply_overrides(quick_config, [other]).start_key() != quick
    longer = configs.apply_overrides(quick_config, ["model.max_len=120"]).start_key()
    assert longer["config"]["max_len"] == 120


def test_tiny_run_end_to_end(tmp_path, monkeypatch):
    """Start (trained, then cached), PG, the equal-time control and the whole run on
    the CPU; nothing is loaded from a cache the test did not write."""
    corpora.load_verse_pairs("train", 8)  # parse the Bibles into the normal cache first
    for parsed in caching.cache_dir().glob("*.json"):  # parsed corpora, never a model
        shutil.copy(parsed, tmp_path)
    monkeypatch.setenv("LMPG_CACHE_DIR", str(tmp_path))
    tiny = configs.apply_overrides(ch4.PROFILES["quick"], TINY["pg"])
    setup = translation.prepare(tiny, device="cpu")
    assert setup.device == torch.device("cpu")
    assert not setup.cached and len(setup.mle_history["losses"]) == tiny.mle_steps
    assert setup.mle_history["averaged_steps"] == [11, 12]  # evenly over the last fifth
    again = translation.prepare(tiny, device="cpu")
    assert again.cached
    assert all(
        torch.equal(again.start_state[k], v) for k, v in setup.start_state.items()
    )
    model, history = ch4.fine_tune(
        setup, ESTIMATORS["leave-one-out"], tiny.pg_steps, seed=0
    )
    assert history.steps == [0, 1, 2] and len(history.valid_reward) == 3
    assert len(history.train_reward) == 2 and history.times.samples > 0
    # every run from the start begins at the start's expected reward, computed once
    start_reward = translation.expected_reward(setup.new_model(), setup)
    assert history.valid_reward[0] == setup.start_reward() == start_reward
    assert set(setup._start_rewards) == {"start"}
    weak_reward = translation.expected_reward(setup.new_model(setup.weak_state), setup)
    assert setup.start_reward(setup.weak_state) == weak_reward
    assert history.valid_reward[-1] == translation.expected_reward(model, setup)
    # self-critical decodes greedily; the moving average keeps a history
    for name in ("self-critical", "moving-average"):
        _, other = ch4.fine_tune(setup, ESTIMATORS[name], 1, seed=0, eval_every=1)
        assert other.method == name and len(other.train_reward) == 1
    # another reward on the same start: its own start reward, the original's memo untouched
    plain = setup.with_config(length_penalty=0.0)
    assert plain.config.length_penalty == 0.0 and plain.start_state is setup.start_state
    assert plain.start_reward() == translation.expected_reward(plain.new_model(), plain)
    assert setup.start_reward() == start_reward
    with pytest.raises(ValueError, match="model define the cached start"):
        setup.with_config(model=tiny.model.__class__(d_model=64, max_len=26))
    control, control_history = ch4.continue_mle(
        setup, seconds=max(history.total_seconds, 0.5), seed=0
    )
    assert control_history.valid_reward[0] == start_reward
    assert control_history.steps[-1] >= 1
    assert control_history.total_seconds >= max(history.total_seconds, 0.5)
    result = translation.evaluate(model, setup, "valid")
    assert 0.0 <= result.bleu <= 100.0 and len(result.hypotheses) == len(setup.valid)
    variance = ch4.gradient_variance(setup, batches=1, draws=2, batch_size=4)
    assert set(variance) == {f"variance_{e}" for e in ch4.COMPARED} | {
        "reward_sample",
        "reward_greedy",
    }
    assert all(v >= 0 for v in variance.values())
    positions = translation.position_accuracy(model, setup, "valid", positions=4)
    assert len(positions["teacher_forced"]) == len(positions["free_running"]) == 4
    # the whole run, through the contract: its config, its device, the common keys
    summary = ch4.run(tiny, seed=0, device="cpu", progress=False).summary()
    assert list(summary)[: len(configs.SUMMARY_KEYS)] == list(configs.SUMMARY_KEYS)
    assert summary["device"] == "cpu" and summary["experiment"] == "pg"
    assert (
        summary["pg_steps"] == tiny.pg_steps and summary["estimator"] == "leave-one-out"
    )
    assert summary["reward_start"] == round(start_reward, 4)
    for key in ("bleu_mle", "bleu_pg", "bleu_control", "length_ratio_pg", "reward_end"):
        assert isinstance(summary[key], float), key
