"""Chapter 3's main experiment: pre-train a small BERT (MLM + NSP) on the World English
Bible, then fine-tune it on a few labelled verses and compare with training from scratch.

:func:`run` does, deterministically for a given configuration and seed:

1. train a BPE tokenizer on the train-split verses, build NSP pairs (50% IsNext, 50% a
   random verse from another chapter) from them, and pre-train
   :class:`~lmpg_utils.bert.BertModel` for a fixed number of steps, or load the model
   a previous run cached (:func:`lmpg_utils.bert.load_pretrained`);
2. load the verses and the encoded pre-training pairs (:func:`load_data`);
3. measure held-out MLM accuracy (masked positions of valid-split pairs) and NSP
   accuracy against their trivial baselines (:func:`evaluate_objectives`);
4. measure NSP accuracy on two harder test sets whose negatives come from another book
   (topic shift) or from the same chapter (coherence only)
   (:func:`evaluate_nsp_negatives`);
5. fine-tune on a balanced book-group classification task (law & history, poetry &
   wisdom, prophets, New Testament) with 50, 100, 200, ... labelled train verses, from
   the pre-trained weights and from scratch, and score both on test-split verses
   (:func:`fine_tuning_sweep`).

The task itself (data, model, loops, book groups, cached pre-training) lives in
:mod:`lmpg_utils.bert`; this module holds the settings and the order of the steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import bert, configs, corpora, runtime
from ..distributed import SINGLE, World
from ..tokenization import BPETokenizer
from ..transformer import count_parameters

NAME = "bert"

#: every random draw of a run is seeded with ``seed + SEED_OFFSETS[what]``
SEED_OFFSETS: dict[str, int] = {
    # NSP pairs (round r adds r * bert.ROUND_SEED_STEP), initial weights, batches, masks
    "pretraining": 0,
    "valid_pairs": 1,  # validation NSP pairs
    "valid_masking": 2,  # masks of the validation pairs
    "test_pairs": 3,  # the two harder NSP test sets
    "test_masking": 4,  # masks of those test sets
    "test_verses": 5,  # the classifier's test verses
    "label_pool": 6,  # the labelled train verses
    "classifier_init": 7,  # each classifier's initial weights
    "finetune_batches": 8,  # the order of the fine-tuning batches
}

_POSITIVE = (
    "eval_pairs",
    "finetune_steps",
    "finetune_batch_size",
    "finetune_lr",
    "test_per_class",
)


@dataclass(frozen=True)
class Config:
    """Sizes and budgets of one run; the defaults are the ``quick`` profile. Step
    budgets (not wall clock) keep results reproducible. ``pretraining`` is everything
    that determines the pre-trained BERT (its tokenizer size, encoder sizes, data and
    budget: :class:`~lmpg_utils.bert.Pretraining`); the other fields only evaluate it."""

    profile: str = "quick"
    pretraining: bert.Pretraining = bert.PRETRAINING["quick"]
    eval_pairs: int = 3000  # pairs of each NSP evaluation set (at most)
    label_counts: tuple[int, ...] = (50, 100, 200, 400)  # labelled verses per sweep
    finetune_steps: int = 40
    finetune_batch_size: int = 16
    finetune_lr: float = 1e-3
    test_per_class: int = 150  # test verses of each book group

    def __post_init__(self) -> None:
        configs.check_profile(self.profile)
        if not isinstance(self.pretraining, bert.Pretraining):
            raise ValueError(
                f"pretraining must be bert.Pretraining, got {type(self.pretraining)}"
            )
        for name in _POSITIVE:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        groups = len(bert.BOOK_GROUPS)
        if (
            not isinstance(self.label_counts, tuple)
            or not self.label_counts
            or any(not isinstance(n, int) or n < groups for n in self.label_counts)
        ):
            raise ValueError(
                f"label_counts must be a tuple of counts of at least {groups} each, "
                f"got {self.label_counts!r}"
            )


PROFILES: dict[str, Config] = {
    "quick": Config(),
    "full": Config(
        profile="full",
        pretraining=bert.PRETRAINING["full"],
        eval_pairs=3000,
        label_counts=(50, 100, 200, 400, 800, 1600),
        finetune_steps=200,
        finetune_batch_size=32,
        finetune_lr=1e-4,
        test_per_class=150,
    ),
}


@dataclass
class Result:
    """Everything :func:`run` measured, plus the objects the notebook inspects."""

    config: Config
    seed: int
    device: str
    parameters: int
    mlm_accuracy: float
    mlm_baseline: float
    mlm_scored: int
    mlm_by_kind: dict[str, dict[str, float]]
    pretrain_cached: bool
    nsp_accuracy: float
    nsp_eval_pairs: int
    nsp_baseline: float
    nsp_other_book: float
    nsp_same_chapter: float
    nsp_test_pairs: int
    pairs_truncated: int
    pairs_total: int
    label_counts: list[int]
    finetune_pretrained: list[float]
    finetune_scratch: list[float]
    test_examples: int
    pretrain_seconds: float
    seconds: float
    history: bert.PretrainHistory | None = field(repr=False, default=None)
    model: bert.BertModel | None = field(repr=False, default=None)
    tokenizer: BPETokenizer | None = field(repr=False, default=None)
    special: bert.SpecialIds | None = field(repr=False, default=None)
    world_size: int = 1

    def summary(self) -> dict[str, Any]:
        """The JSON line of ``python -m lmpg_utils run bert``."""
        return {
            **configs.summary_header(
                NAME,
                self.config,
                self.seed,
                self.device,
                self.seconds,
                self.world_size,
            ),
            "parameters": self.parameters,
            "mlm_accuracy": round(self.mlm_accuracy, 4),
            "mlm_baseline": round(self.mlm_baseline, 4),
            "mlm_by_kind": self.mlm_by_kind,
            "pretrain_cached": self.pretrain_cached,
            "nsp_accuracy": round(self.nsp_accuracy, 4),
            "nsp_eval_pairs": self.nsp_eval_pairs,
            "nsp_baseline": round(self.nsp_baseline, 4),
            "nsp_other_book": round(self.nsp_other_book, 4),
            "nsp_same_chapter": round(self.nsp_same_chapter, 4),
            "pairs_truncated": self.pairs_truncated,
            "label_counts": self.label_counts,
            "finetune_pretrained": [round(x, 4) for x in self.finetune_pretrained],
            "finetune_scratch": [round(x, 4) for x in self.finetune_scratch],
            "finetune_accuracy_pretrained": round(self.finetune_pretrained[-1], 4),
            "finetune_accuracy_scratch": round(self.finetune_scratch[-1], 4),
            "pretrain_seconds": round(self.pretrain_seconds, 1),
        }


@dataclass
class ChapterData:
    """The tokenizer, its special ids, the three splits of verses and the encoded
    pre-training pairs of a run."""

    tokenizer: BPETokenizer
    special: bert.SpecialIds
    train: list[corpora.Verse]
    valid: list[corpora.Verse]
    test: list[corpora.Verse]
    pretraining: bert.EncodedBatch


def load_data(
    config: Config, pretrained: bert.PretrainedBert, seed: int
) -> ChapterData:
    """The verses and the encoded NSP pre-training pairs (the MLM baseline and the
    truncation count are measured on them), with the pre-trained model's tokenizer."""
    return ChapterData(
        pretrained.tokenizer,
        pretrained.special,
        corpora.load_bible_verses("train"),
        corpora.load_bible_verses("valid"),
        corpora.load_bible_verses("test"),
        bert.pretraining_data(
            config.pretraining,
            pretrained.tokenizer,
            pretrained.special,
            seed + SEED_OFFSETS["pretraining"],
        ),
    )


@dataclass
class ObjectiveScores:
    """Held-out MLM and NSP accuracy (validation chapters) and their trivial baselines."""

    mlm_accuracy: float
    mlm_baseline: float  # always guessing the most frequent pre-training token
    mlm_scored: int
    mlm_by_kind: dict[str, dict[str, float]]
    nsp_accuracy: float
    nsp_baseline: float  # always answering the majority class
    nsp_pairs: int


def evaluate_objectives(
    config: Config, data: ChapterData, model: bert.BertModel, seed: int
) -> ObjectiveScores:
    """Step 3: MLM accuracy (overall and by kind of chosen position) and NSP accuracy on
    validation pairs with random negatives."""
    pairs = bert.make_nsp_pairs(
        data.valid,
        "random",
        seed=seed + SEED_OFFSETS["valid_pairs"],
        limit=config.eval_pairs,
    )
    held_out = bert.encode_nsp(
        data.tokenizer, pairs, data.special, config.pretraining.model.max_len
    )
    # specials (padding) are not counted
    top_token, _ = bert.most_frequent_token(data.pretraining.ids, data.special)
    masking_seed = seed + SEED_OFFSETS["valid_masking"]
    scores = bert.evaluate_pretraining(
        model, held_out, data.special, seed=masking_seed, baseline_token=top_token
    )
    targets = bert.masked_targets(held_out, data.special, seed=masking_seed)
    return ObjectiveScores(
        mlm_accuracy=float(scores["mlm_accuracy"]),
        mlm_baseline=float((targets == top_token).float().mean()),
        mlm_scored=int(scores["mlm_labels"]),
        mlm_by_kind={
            kind: {
                "accuracy": float(scores[f"mlm_accuracy_{kind}"]),
                "baseline": float(scores[f"mlm_baseline_{kind}"]),
                "count": int(scores[f"mlm_count_{kind}"]),
            }
            for kind in bert.MLM_KINDS
        },
        nsp_accuracy=float(scores["nsp_accuracy"]),
        nsp_baseline=float(scores["nsp_majority"]),
        nsp_pairs=len(held_out),
    )


def evaluate_nsp_negatives(
    config: Config, data: ChapterData, model: bert.BertModel, seed: int
) -> tuple[dict[str, float], int]:
    """Step 4: what NSP learned. NSP accuracy on test pairs whose negatives come from
    another book and from the same chapter, and the size of the smaller test set."""
    accuracy, smallest = {}, 0
    for kind in ("other_book", "same_chapter"):
        pairs = bert.make_nsp_pairs(
            data.test,
            kind,
            seed=seed + SEED_OFFSETS["test_pairs"],
            limit=config.eval_pairs,
        )
        smallest = min(smallest, len(pairs)) if smallest else len(pairs)
        accuracy[kind] = float(
            bert.evaluate_pretraining(
                model,
                bert.encode_nsp(
                    data.tokenizer,
                    pairs,
                    data.special,
                    config.pretraining.model.max_len,
                ),
                data.special,
                seed=seed + SEED_OFFSETS["test_masking"],
            )["nsp_accuracy"]
        )
    return accuracy, smallest


def book_group_test_set(
    config: Config, data: ChapterData, seed: int
) -> bert.EncodedBatch:
    """``config.test_per_class`` test-split verses of each book group, encoded."""
    texts, labels = bert.classification_split(
        data.test, config.test_per_class, seed + SEED_OFFSETS["test_verses"]
    )
    return bert.encode_single(
        bert.tokenize_texts(data.tokenizer, texts),
        data.special,
        config.pretraining.model.max_len,
        labels,
    )


@dataclass
class SweepScores:
    """Test accuracy of the book-group classifier at each label count."""

    pretrained: list[float]
    scratch: list[float]
    test_examples: int


def fine_tuning_sweep(
    config: Config,
    data: ChapterData,
    model: bert.BertModel,
    seed: int,
    device: torch.device,
) -> SweepScores:
    """Step 5: for each label count, fine-tune a book-group classifier from the
    pre-trained weights and one from scratch on the same labelled train verses (nested
    as the count grows), and score both on the same test verses."""
    test = book_group_test_set(config, data, seed)
    groups = len(bert.BOOK_GROUPS)
    pool_texts, pool_labels = bert.classification_split(
        data.train,
        max(config.label_counts) // groups,
        seed + SEED_OFFSETS["label_pool"],
    )
    pool_ids = bert.tokenize_texts(data.tokenizer, pool_texts)
    pretrained_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    scores = SweepScores([], [], len(test))
    for count in config.label_counts:
        chosen = bert.balanced_prefix(pool_labels, count // groups)
        labelled = bert.encode_single(
            [pool_ids[i] for i in chosen],
            data.special,
            config.pretraining.model.max_len,
            [pool_labels[i] for i in chosen],
        )
        for state, accuracies in (
            (pretrained_state, scores.pretrained),
            (None, scores.scratch),
        ):
            classifier = bert.train_book_group_classifier(
                config.pretraining.model_config(),
                labelled,
                state,
                steps=config.finetune_steps,
                batch_size=config.finetune_batch_size,
                lr=config.finetune_lr,
                init_seed=seed + SEED_OFFSETS["classifier_init"],
                batch_seed=seed + SEED_OFFSETS["finetune_batches"],
                device=device,
            )
            accuracies.append(bert.classifier_accuracy(classifier, test))
    return scores


def prepare_models(
    config: Config,
    *,
    seed: int,
    device: str | torch.device,
    progress: bool = True,
    world: World = SINGLE,
) -> None:
    """Pre-train and cache the BERT that :func:`run` (and the notebook) then loads
    (data-parallel over the processes of ``world``)."""
    bert.load_pretrained(
        config.pretraining,
        seed=seed + SEED_OFFSETS["pretraining"],
        device=device,
        progress=progress,
        world=world,
    )


def run(
    config: Config,
    *,
    seed: int,
    device: str | torch.device,
    progress: bool = True,
    world: World = SINGLE,
) -> Result:
    """Pre-train (or load), evaluate and fine-tune a small BERT on ``device``; see the
    module docstring. Under ``torchrun`` (``world``) the pre-training is data-parallel;
    the evaluations and the small fine-tuning sweep run alike on every rank."""
    began = time.perf_counter()
    device = torch.device(device)
    runtime.set_seed(seed)  # global generators too; each draw has its own seed below
    pretrained = bert.load_pretrained(
        config.pretraining,
        seed=seed + SEED_OFFSETS["pretraining"],
        device=device,
        progress=progress,
        world=world,
    )
    data = load_data(config, pretrained, seed)
    objectives = evaluate_objectives(config, data, pretrained.model, seed)
    negatives, test_pairs = evaluate_nsp_negatives(config, data, pretrained.model, seed)
    sweep = fine_tuning_sweep(config, data, pretrained.model, seed, device)
    return Result(
        config=config,
        seed=seed,
        device=str(device),
        parameters=count_parameters(pretrained.model),
        mlm_accuracy=objectives.mlm_accuracy,
        mlm_baseline=objectives.mlm_baseline,
        mlm_scored=objectives.mlm_scored,
        mlm_by_kind=objectives.mlm_by_kind,
        pretrain_cached=pretrained.cached,
        nsp_accuracy=objectives.nsp_accuracy,
        nsp_eval_pairs=objectives.nsp_pairs,
        nsp_baseline=objectives.nsp_baseline,
        nsp_other_book=negatives["other_book"],
        nsp_same_chapter=negatives["same_chapter"],
        nsp_test_pairs=test_pairs,
        pairs_truncated=data.pretraining.truncated,
        pairs_total=len(data.pretraining),
        label_counts=list(config.label_counts),
        finetune_pretrained=sweep.pretrained,
        finetune_scratch=sweep.scratch,
        test_examples=sweep.test_examples,
        pretrain_seconds=pretrained.seconds,
        seconds=time.perf_counter() - began,
        world_size=world.size,
        history=pretrained.history,
        model=pretrained.model,
        tokenizer=data.tokenizer,
        special=data.special,
    )
