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
   (:func:`fine_tuning_sweep`);
6. the pre-training ablation: MLM alone, MLM + NSP and MLM + SOP (ALBERT's
   sentence-order prediction), each pre-trained for three seeds, their sentence heads
   scored on NSP and SOP pairs, and each fine-tuned on a sentence-pair task and on the
   book-group task (:func:`pretraining_ablation`).

The task itself (data, model, loops, book groups, cached pre-training) lives in
:mod:`lmpg_utils.bert`; this module holds the settings and the order of the steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
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
    "ablation_pairs": 9,  # the ablation's labelled and test pairs, and their masks
}

#: the ablation's downstream tasks: a sentence pair (is B the verse after A, or a verse
#: of another book?) and a single verse (its book group, the chapter's task)
DOWNSTREAM_TASKS: tuple[str, ...] = ("next_or_other_book", "book_group")


@dataclass(frozen=True)
class Ablation:
    """The pre-training ablation (:func:`pretraining_ablation`): the chapter's BERT
    pre-trained with each sentence task next to the masked LM (the same encoder, data
    budget and steps), for ``seeds`` consecutive seeds, then fine-tuned on the tasks of
    :data:`DOWNSTREAM_TASKS`: the pair task with ``train_pairs`` labelled pairs and the
    ``finetune_*`` settings here, scored on at most ``test_pairs`` pairs of the test
    chapters; the book-group task as in the chapter's sweep, at its largest label
    count."""

    sentence_tasks: tuple[str, ...] = ("none", "nsp", "sop")
    seeds: int = 3
    train_pairs: int = 2000
    test_pairs: int = 2000
    finetune_steps: int = 150
    finetune_batch_size: int = 32
    finetune_lr: float = 1e-3

    def __post_init__(self) -> None:
        for name in (
            "seeds",
            "train_pairs",
            "test_pairs",
            "finetune_steps",
            "finetune_batch_size",
            "finetune_lr",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        unknown = [t for t in self.sentence_tasks if t not in bert.SENTENCE_TASKS]
        if not self.sentence_tasks or unknown or "nsp" not in self.sentence_tasks:
            raise ValueError(
                f"sentence_tasks must include 'nsp' (the chapter's model) and name only "
                f"{', '.join(bert.SENTENCE_TASKS)}; got {self.sentence_tasks!r}"
            )


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
    ablation: Ablation = Ablation()

    def __post_init__(self) -> None:
        configs.check_profile(self.profile)
        if not isinstance(self.ablation, Ablation):
            raise ValueError(f"ablation must be Ablation, got {type(self.ablation)}")
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
        ablation=Ablation(
            train_pairs=8000,
            test_pairs=3000,
            finetune_steps=500,
            finetune_lr=1e-4,
        ),
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
    ablation: AblationResult | None = None

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
            "ablation": None if self.ablation is None else self.ablation.summary(),
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
            classifier = bert.train_classifier(
                config.pretraining.model_config(),
                labelled,
                state,
                groups,
                steps=config.finetune_steps,
                batch_size=config.finetune_batch_size,
                lr=config.finetune_lr,
                init_seed=seed + SEED_OFFSETS["classifier_init"],
                batch_seed=seed + SEED_OFFSETS["finetune_batches"],
                device=device,
            )
            accuracies.append(bert.classifier_accuracy(classifier, test))
    return scores


def ablation_pretraining(config: Config, sentence_task: str) -> bert.Pretraining:
    """The chapter's pre-training with ``sentence_task`` next to the masked LM."""
    return replace(config.pretraining, sentence_task=sentence_task)


def ablation_seeds(config: Config, seed: int) -> list[int]:
    """The run seeds of the ablation: ``seed`` and the ones after it."""
    return [seed + i for i in range(config.ablation.seeds)]


@dataclass
class AblationResult:
    """What :func:`pretraining_ablation` measured, one value per seed in every list.

    ``downstream[variant][task]`` is the test accuracy of a classifier fine-tuned from
    each pre-training (and from ``"scratch"``, a random encoder) on a task of
    :data:`DOWNSTREAM_TASKS`. ``sentence_heads[variant]`` holds the accuracy of the
    pre-trained sentence head itself, with no fine-tuning, on NSP pairs (random
    negatives) and on SOP pairs (swapped order) of the test chapters; ``mlm_masked``
    the masked LM's accuracy at the positions showing ``[MASK]`` of the NSP pairs."""

    sentence_tasks: list[str]
    seeds: list[int]
    downstream: dict[str, dict[str, list[float]]]
    sentence_heads: dict[str, dict[str, list[float]]]
    mlm_masked: dict[str, list[float]]
    train_pairs: int
    test_pairs: int
    book_group_labels: int
    book_group_test: int
    pretrain_seconds: dict[str, list[float]]

    def summary(self) -> dict[str, Any]:
        """The ablation's numbers, rounded, for the JSON summary."""

        def rounded(values: list[float]) -> list[float]:
            return [round(v, 4) for v in values]

        return {
            "seeds": self.seeds,
            "downstream": {
                variant: {task: rounded(v) for task, v in tasks.items()}
                for variant, tasks in self.downstream.items()
            },
            "sentence_heads": {
                variant: {task: rounded(v) for task, v in tasks.items()}
                for variant, tasks in self.sentence_heads.items()
            },
            "mlm_masked": {k: rounded(v) for k, v in self.mlm_masked.items()},
            "train_pairs": self.train_pairs,
            "test_pairs": self.test_pairs,
            "book_group_labels": self.book_group_labels,
            "book_group_test": self.book_group_test,
        }


def _as_classes(pairs: bert.EncodedBatch) -> bert.EncodedBatch:
    """Encoded pairs whose ``is_next`` labels became class ids: IsNext 0, NotNext 1."""
    return replace(pairs, labels=bert.nsp_targets(pairs.labels))


def pretraining_ablation(
    config: Config,
    data: ChapterData,
    *,
    seed: int,
    device: torch.device,
    progress: bool = False,
    world: World = SINGLE,
) -> AblationResult:
    """Step 6: MLM alone, MLM + NSP and MLM + SOP (:attr:`Config.ablation`), each
    pre-trained for :func:`ablation_seeds` (cached, like the chapter's model, which is
    the NSP run of ``seed``), then:

    * its sentence head scored on NSP and SOP pairs of the test chapters (labels in
      the head's own convention: IsNext or in order is class 0), and its masked LM at
      the ``[MASK]`` positions of the NSP pairs;
    * fine-tuned, like a random encoder, on the tasks of :data:`DOWNSTREAM_TASKS`:
      the pair task on labelled pairs of the training chapters, scored on pairs of the
      test chapters; the book-group task as in :func:`fine_tuning_sweep` with its
      largest label count. Each seed draws the data, the initial head and the batches,
      the same for every pre-training."""
    ablation = config.ablation
    max_len = config.pretraining.model.max_len
    tokenizer, special = data.tokenizer, data.special
    seeds = ablation_seeds(config, seed)
    variants = [*ablation.sentence_tasks, "scratch"]
    groups = len(bert.BOOK_GROUPS)
    result = AblationResult(
        sentence_tasks=list(ablation.sentence_tasks),
        seeds=seeds,
        downstream={v: {task: [] for task in DOWNSTREAM_TASKS} for v in variants},
        sentence_heads={
            t: {"nsp": [], "sop": []} for t in ablation.sentence_tasks if t != "none"
        },
        mlm_masked={t: [] for t in ablation.sentence_tasks},
        train_pairs=0,
        test_pairs=0,
        book_group_labels=0,
        book_group_test=0,
        pretrain_seconds={t: [] for t in ablation.sentence_tasks},
    )
    for run_seed in seeds:
        draw = run_seed + SEED_OFFSETS["ablation_pairs"]
        heads_test = {
            "nsp": bert.make_nsp_pairs(
                data.test, "random", seed=draw, limit=ablation.test_pairs
            ),
            "sop": bert.sentence_order_pairs(
                bert.make_nsp_pairs(
                    data.test,
                    "random",
                    p_next=1.0,
                    seed=draw,
                    limit=ablation.test_pairs,
                ),
                draw,
            ),
        }
        heads_test = {
            head: bert.encode_nsp(tokenizer, pairs, special, max_len)
            for head, pairs in heads_test.items()
        }
        pair_train, pair_test = (
            _as_classes(
                bert.encode_nsp(
                    tokenizer,
                    bert.make_nsp_pairs(verses, "other_book", seed=draw, limit=limit),
                    special,
                    max_len,
                )
            )
            for verses, limit in (
                (data.train, ablation.train_pairs),
                (data.test, ablation.test_pairs),
            )
        )
        texts, labels = bert.classification_split(
            data.train,
            max(config.label_counts) // groups,
            run_seed + SEED_OFFSETS["label_pool"],
        )
        groups_train = bert.encode_single(
            bert.tokenize_texts(tokenizer, texts), special, max_len, labels
        )
        groups_test = book_group_test_set(config, data, run_seed)
        result.train_pairs, result.test_pairs = len(pair_train), len(pair_test)
        result.book_group_labels = len(groups_train)
        result.book_group_test = len(groups_test)
        states: dict[str, dict[str, torch.Tensor] | None] = {"scratch": None}
        for sentence_task in ablation.sentence_tasks:
            pretrained = bert.load_pretrained(
                ablation_pretraining(config, sentence_task),
                seed=run_seed + SEED_OFFSETS["pretraining"],
                device=device,
                progress=progress,
                world=world,
            )
            result.pretrain_seconds[sentence_task].append(pretrained.seconds)
            for head, pairs in heads_test.items():
                scores = bert.evaluate_pretraining(
                    pretrained.model, pairs, special, seed=draw
                )
                if sentence_task != "none":
                    result.sentence_heads[sentence_task][head].append(
                        float(scores["nsp_accuracy"])
                    )
                if head == "nsp":
                    result.mlm_masked[sentence_task].append(
                        float(scores["mlm_accuracy_masked"])
                    )
            states[sentence_task] = {
                k: v.detach().clone() for k, v in pretrained.model.state_dict().items()
            }
        settings = {
            "next_or_other_book": (
                pair_train,
                pair_test,
                2,
                ablation.finetune_steps,
                ablation.finetune_batch_size,
                ablation.finetune_lr,
            ),
            "book_group": (
                groups_train,
                groups_test,
                groups,
                config.finetune_steps,
                config.finetune_batch_size,
                config.finetune_lr,
            ),
        }
        for variant, state in states.items():
            for task, (train, test, classes, steps, batch, lr) in settings.items():
                classifier = bert.train_classifier(
                    config.pretraining.model_config(),
                    train,
                    state,
                    classes,
                    steps=steps,
                    batch_size=batch,
                    lr=lr,
                    init_seed=run_seed + SEED_OFFSETS["classifier_init"],
                    batch_seed=run_seed + SEED_OFFSETS["finetune_batches"],
                    device=device,
                )
                result.downstream[variant][task].append(
                    bert.classifier_accuracy(classifier, test)
                )
    return result


def prepare_models(
    config: Config,
    *,
    seed: int,
    device: str | torch.device,
    progress: bool = True,
    world: World = SINGLE,
) -> None:
    """Pre-train and cache the BERTs that :func:`run` (and the notebook) then loads:
    the chapter's, and the ablation's for each of its sentence tasks and seeds
    (data-parallel over the processes of ``world``)."""
    for run_seed in ablation_seeds(config, seed):
        for sentence_task in config.ablation.sentence_tasks:
            bert.load_pretrained(
                ablation_pretraining(config, sentence_task),
                seed=run_seed + SEED_OFFSETS["pretraining"],
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
    ablation = pretraining_ablation(
        config, data, seed=seed, device=device, progress=progress, world=world
    )
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
        ablation=ablation,
        history=pretrained.history,
        model=pretrained.model,
        tokenizer=data.tokenizer,
        special=data.special,
    )
