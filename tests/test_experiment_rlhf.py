"""Chapter 5's experiment: its config, a tiny run trained from scratch into an empty
cache, and the summary keys the command line promises."""

from __future__ import annotations

import pytest
from tiny_configs import TINY

from lmpg_utils import configs
from lmpg_utils.experiments import ch5_rlhf as ch5

PROMISED = ("reward_start", "reward_end", "gold_reward_start", "gold_reward_end",
            "kl_end", "distinct_2", "seconds")  # fmt: skip


def test_config_names_the_bad_field():
    with pytest.raises(ValueError, match="method must be one of"):
        ch5.Config(method="dpo")
    with pytest.raises(ValueError, match="eval_every"):
        ch5.Config(eval_every=0)
    with pytest.raises(ValueError, match="prompts_per_update"):
        ch5.Config(train_prompts=4, prompts_per_update=8)
    with pytest.raises(ValueError, match="k >= 2"):
        ch5.Config(method="grpo", samples=1)


def test_a_tiny_run_trains_its_models_then_fine_tunes_and_summarises(
    empty_model_cache,
):
    tiny = configs.apply_overrides(ch5.PROFILES["quick"], TINY["rlhf"])
    result = ch5.run(tiny, seed=0, device="cpu", progress=False)
    summary = result.summary()
    assert set(PROMISED) <= set(summary)
    assert summary["method"] == tiny.method and summary["beta"] == tiny.beta
    assert summary["kl_end"] == result.end.kl
    assert len(result.fine_tuned.history.update_seconds) == tiny.steps
    # the judges and the GPT are cached now: a second setup trains nothing
    cached = sorted(p.name for p in empty_model_cache.glob("*.pt"))
    setup = ch5.prepare(tiny, seed=0, device="cpu", progress=False)
    assert sorted(p.name for p in empty_model_cache.glob("*.pt")) == cached
    longer = setup.fine_tune(1, method="grpo", beta=0.0, steps=tiny.steps + 2)
    assert len(longer.history.update_seconds) == tiny.steps + 2
    assert longer.history.steps[-1] == tiny.steps + 2
    with pytest.raises(ValueError, match="steps must be positive"):
        setup.fine_tune(1, steps=0)
