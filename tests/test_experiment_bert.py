"""Chapter 3's experiment (lmpg_utils/experiments/ch3_bert.py): its profiles, the cache
key of the pre-trained BERT, the checks of its Config, and a tiny run on the CPU."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from tiny_configs import TINY

from lmpg_utils import bert, configs
from lmpg_utils.experiments import ch3_bert as ch3

# --set assignments that shrink the quick profile to a run of seconds on a CPU

# The cache settings of the pre-trained BERT: only what determines the model, under
# the names the cache has always used.
QUICK_KEY = {
    "vocab_size": 4000,
    "d_model": 128,
    "num_heads": 4,
    "num_layers": 2,
    "d_ff": 256,
    "max_len": 64,
    "dropout": 0.0,
    "positional": "sinusoidal",
    "pretrain_pairs": 20000,
    "pretrain_steps": 2400,
    "batch_size": 32,
    "lr": 0.002,
    "warmup_steps": 30,
    "sentence_task": "nsp",
}
FULL_KEY = {
    "vocab_size": 8000,
    "d_model": 256,
    "num_heads": 8,
    "num_layers": 4,
    "d_ff": 1024,
    "max_len": 128,
    "dropout": 0.1,
    "positional": "learned",
    "pretrain_pairs": 300000,
    "pretrain_steps": 5000,
    "batch_size": 128,
    "lr": 0.001,
    "warmup_steps": 500,
    "sentence_task": "nsp",
}


def test_profiles_keep_the_cache_key_of_the_pretrained_model():
    for profile, expected in (("quick", QUICK_KEY), ("full", FULL_KEY)):
        assert ch3.PROFILES[profile].pretraining is bert.PRETRAINING[profile]
        settings = ch3.PROFILES[profile].pretraining.cache_settings()
        assert json.dumps(settings, sort_keys=True) == json.dumps(
            expected, sort_keys=True
        )
    changed = configs.apply_overrides(
        ch3.PROFILES["quick"], ["pretraining.model.d_model=64"]
    )
    assert changed.pretraining.cache_settings()["d_model"] == 64


def test_evaluation_settings_do_not_name_the_pretrained_model():
    quick = ch3.PROFILES["quick"]
    changed = configs.apply_overrides(
        quick,
        ["finetune_steps=5", "eval_pairs=10", "label_counts=8", "test_per_class=3"],
    )
    assert changed.pretraining == quick.pretraining
    assert changed.pretraining.cache_settings() == quick.pretraining.cache_settings()


def test_the_model_config_is_an_encoder_with_two_segments():
    config = ch3.PROFILES["full"].pretraining.model_config()
    assert (config.vocab_size, config.num_segments, config.d_model) == (8000, 2, 256)
    assert config.positional == "learned" and config.max_len == 128


QUICK = ch3.PROFILES["quick"]


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"finetune_steps": 0}, "finetune_steps"),
        ({"finetune_lr": 0.0}, "finetune_lr"),
        ({"label_counts": (2, 100)}, "label_counts"),
        ({"label_counts": [50, 100]}, "label_counts"),
        ({"pretraining": "quick"}, "pretraining"),
        ({"ablation": "none"}, "ablation"),
    ],
)
def test_config_names_the_bad_field(changes, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        dataclasses.replace(QUICK, **changes)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"steps": 0}, "steps"),
        ({"pairs": 0}, "pairs"),
        ({"lr": 0.0}, "lr"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"sentence_task": "order"}, "sentence_task"),
        ({"batch_size": 30000}, "batch_size"),
        (
            {"model": dataclasses.replace(QUICK.pretraining.model, max_len=2)},
            "model.max_len",
        ),
        (
            {
                "model": dataclasses.replace(
                    QUICK.pretraining.model, num_decoder_layers=2
                )
            },
            "model.num_decoder_layers",
        ),
    ],
)
def test_pretraining_names_the_bad_field(changes, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        dataclasses.replace(QUICK.pretraining, **changes)


def test_overrides_reach_the_nested_model_sizes():
    changed = configs.apply_overrides(
        QUICK, ["pretraining.model.num_layers=1", "label_counts=8,16"]
    )
    assert changed.pretraining.model.num_layers == 1
    assert changed.label_counts == (8, 16)
    assert changed.pretraining.model.d_model == QUICK.pretraining.model.d_model
    with pytest.raises(ValueError, match=r"pretraining\.steps"):
        configs.apply_overrides(QUICK, ["pretraining.steps=0"])


def test_tiny_run_on_cpu_trains_once_then_loads_the_same_model(
    empty_model_cache, one_thread
):
    tiny = configs.apply_overrides(ch3.PROFILES["quick"], TINY["bert"])
    first = ch3.run(tiny, seed=0, device="cpu", progress=False)
    assert not first.pretrain_cached and len(first.history.steps) == 6
    assert next(first.model.parameters()).device == torch.device("cpu")
    summary = first.summary()
    assert tuple(summary)[: len(configs.SUMMARY_KEYS)] == configs.SUMMARY_KEYS
    assert summary["experiment"] == "bert" and summary["device"] == "cpu"
    assert summary["config"]["pretraining"]["model"]["d_model"] == 128
    assert json.loads(json.dumps(summary)) == summary
    assert summary["label_counts"] == [8] and summary["nsp_eval_pairs"] == 60

    # the chapter's model is the ablation's NSP run: one model per sentence task
    tasks = tiny.ablation.sentence_tasks
    models = set(empty_model_cache.glob("ch3-bert-*.pt"))
    assert len(models) == len(tasks)
    ablation = summary["ablation"]
    assert ablation["seeds"] == [0] and set(ablation["downstream"]) == {
        *tasks,
        "scratch",
    }
    assert set(ablation["sentence_heads"]) == set(tasks) - {"none"}
    assert all(
        0.0 <= accuracy <= 1.0
        for by_task in ablation["downstream"].values()
        for values in by_task.values()
        for accuracy in values
    )
    assert ablation["train_pairs"] == 40 and ablation["test_pairs"] == 40
    ch3.prepare_models(tiny, seed=1, device="cpu", progress=False)
    assert len(set(empty_model_cache.glob("ch3-bert-*.pt")) - models) == len(tasks)

    second = ch3.run(tiny, seed=0, device="cpu", progress=False)
    assert second.pretrain_cached
    assert second.history.nsp_losses == first.history.nsp_losses
    assert second.history.mlm_losses == first.history.mlm_losses
    assert (second.mlm_accuracy, second.nsp_accuracy, second.finetune_pretrained) == (
        first.mlm_accuracy,
        first.nsp_accuracy,
        first.finetune_pretrained,
    )
    assert second.ablation.summary() == first.ablation.summary()
    assert ch3.run(tiny, seed=1, device="cpu", progress=False).pretrain_cached
    # fine-tuning settings do not name the pre-trained model: no retraining
    longer = configs.apply_overrides(tiny, ["finetune_steps=3"])
    assert ch3.run(longer, seed=0, device="cpu", progress=False).pretrain_cached


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"seeds": 0}, "seeds"),
        ({"finetune_lr": 0.0}, "finetune_lr"),
        ({"sentence_tasks": ("none", "sop")}, "sentence_tasks"),
        ({"sentence_tasks": ("nsp", "order")}, "sentence_tasks"),
    ],
)
def test_ablation_names_the_bad_field(changes, field):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(QUICK.ablation, **changes)


def test_ablation_pretrainings_differ_only_in_the_sentence_task():
    for task in bert.SENTENCE_TASKS:
        changed = ch3.ablation_pretraining(QUICK, task).cache_settings()
        expected = dict(QUICK.pretraining.cache_settings(), sentence_task=task)
        assert changed == expected
    assert ch3.ablation_pretraining(QUICK, "nsp") == QUICK.pretraining
    assert ch3.ablation_seeds(QUICK, 4) == [4, 5, 6]
