"""Pre-training (masked LM + next-sentence prediction) and fine-tuning loops (chapter 3).

Both loops draw their batches from :func:`~lmpg_utils.bert.data.shuffled_batches` and
hand them to :func:`lmpg_utils.training.train`; pre-training masks every batch afresh
(dynamic masking) with the same random generator that shuffles the data.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed
from ..distributed import SINGLE, World
from ..training import TrainHistory, train
from ..transformer import TransformerConfig
from .data import EncodedBatch, check_sentence_task, shuffled_batches
from .masking import IGNORE_INDEX, SpecialIds, mask_tokens
from .model import BertClassifier, BertModel


def nsp_targets(is_next: Tensor) -> Tensor:
    """NSP class ids from booleans: IsNext -> 0, NotNext -> 1."""
    return (~is_next.bool()).long()


@dataclass
class PretrainingBatch:
    """A masked NSP batch: corrupted ids, segments, padding, MLM labels and NSP targets."""

    ids: Tensor
    segment_ids: Tensor
    padding_mask: Tensor
    mlm_labels: Tensor
    nsp_labels: Tensor

    def to(self, device: torch.device | str) -> PretrainingBatch:
        """The same batch on ``device``."""
        return PretrainingBatch(
            self.ids.to(device),
            self.segment_ids.to(device),
            self.padding_mask.to(device),
            self.mlm_labels.to(device),
            self.nsp_labels.to(device),
        )


def make_pretraining_batch(
    batch: EncodedBatch, special: SpecialIds, generator: torch.Generator | None = None
) -> PretrainingBatch:
    """Mask an encoded NSP batch (labels = ``is_next`` booleans) for :func:`pretraining_loss`."""
    if batch.labels is None:
        raise ValueError("the NSP batch needs labels (is_next)")
    masked = mask_tokens(batch.ids, special, generator)
    return PretrainingBatch(
        masked.input_ids,
        batch.segment_ids,
        batch.padding_mask,
        masked.labels,
        nsp_targets(batch.labels),
    )


def pretraining_loss(
    model: BertModel, batch: PretrainingBatch, sentence_task: str = "nsp"
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(total, MLM, sentence)``: MLM is the mean cross-entropy over chosen positions
    only; the sentence loss is the cross-entropy of the two-class head on ``[CLS]``
    (NSP's IsNext/NotNext, or SOP's in order/swapped, with the same head), ``None``
    when ``sentence_task`` is ``"none"`` and the total is the MLM loss alone."""
    check_sentence_task(sentence_task)
    hidden = model.encode(batch.ids, batch.segment_ids, batch.padding_mask)
    chosen = batch.mlm_labels != IGNORE_INDEX
    if not bool(chosen.any()):
        mlm = hidden.sum() * 0.0
    else:
        mlm = F.cross_entropy(
            model.mlm_logits(hidden[chosen]), batch.mlm_labels[chosen]
        )
    if sentence_task == "none":
        return mlm, mlm, None
    sentence = F.cross_entropy(model.nsp_logits(hidden), batch.nsp_labels)
    return mlm + sentence, mlm, sentence


@dataclass
class PretrainHistory(TrainHistory):
    """:class:`~lmpg_utils.training.TrainHistory` (``losses`` is the total) plus the
    loss of each objective at every step (``nsp_losses`` holds the sentence task's:
    NSP or SOP, empty without one)."""

    mlm_losses: list[float] = field(default_factory=list)
    nsp_losses: list[float] = field(default_factory=list)


def pretrain(
    model: BertModel,
    data: EncodedBatch,
    special: SpecialIds,
    steps: int,
    batch_size: int,
    lr: float,
    warmup_steps: int = 100,
    seed: int = 0,
    progress: bool = True,
    world: World = SINGLE,
    sentence_task: str = "nsp",
) -> PretrainHistory:
    """Pre-train on encoded NSP pairs (labels ``is_next``) with fresh (dynamic) masking
    for every batch; the batches go to the model's device.

    ``sentence_task`` is the loss next to the masked LM (:func:`pretraining_loss`); the
    pairs' labels must be that task's. ``history.losses`` is the total loss; the
    per-objective losses are in ``history.mlm_losses`` and ``history.nsp_losses``.

    With several processes (``world``) every rank draws and masks the same global
    batches and trains on its rows of each (:func:`lmpg_utils.training.train`, whose
    weights count the masked tokens: exact for the MLM term, the NSP term weighted
    by each rank's share of them); ``batch_size`` must be a multiple of
    ``world.size``, and the per-objective losses are rank 0's.
    """
    distributed.check_divisible(batch_size, world, "pretraining batch_size")
    if data.labels is None:
        raise ValueError("the pre-training pairs need labels (is_next)")
    check_sentence_task(sentence_task)
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    mlm_losses: list[float] = []
    nsp_losses: list[float] = []

    def batches() -> Iterator[PretrainingBatch]:
        for part in shuffled_batches(data, batch_size, generator):
            yield make_pretraining_batch(part, special, generator).to(device)

    def loss_fn(m: nn.Module, batch: PretrainingBatch) -> tuple[Tensor, int]:
        total, mlm, sentence = pretraining_loss(m, batch, sentence_task)  # type: ignore[arg-type]
        mlm_losses.append(mlm.item())
        if sentence is not None:
            nsp_losses.append(sentence.item())
        return total, int((batch.mlm_labels != IGNORE_INDEX).sum())

    # Without a sentence task the pooler and its head take no part in the loss: frozen
    # for the run, so that data-parallel training does not wait for their gradients.
    idle = [model.pooler, model.nsp_head] if sentence_task == "none" else []
    for module in idle:
        module.requires_grad_(False)
    try:
        history = train(
            model,
            batches(),
            loss_fn,
            max_steps=steps,
            lr=lr,
            warmup_steps=warmup_steps,
            progress=progress,
            description="pre-train",
            world=world,
        )
    finally:
        for module in idle:
            module.requires_grad_(True)
    return PretrainHistory(
        **history.to_dict(), mlm_losses=mlm_losses, nsp_losses=nsp_losses
    )


def fine_tune(
    model: BertClassifier,
    data: EncodedBatch,
    steps: int,
    batch_size: int,
    lr: float,
    warmup_steps: int = 10,
    seed: int = 0,
    progress: bool = False,
) -> TrainHistory:
    """Train every weight of ``model`` with cross-entropy on the labelled ``data``
    (batches of ``min(batch_size, len(data))`` rows, on the model's device)."""
    if data.labels is None:
        raise ValueError("fine-tuning data needs labels")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    parts = shuffled_batches(data, min(batch_size, len(data)), generator)

    def loss_fn(m: nn.Module, batch: EncodedBatch) -> tuple[Tensor, int]:
        return F.cross_entropy(
            m(batch.ids, batch.segment_ids, batch.padding_mask), batch.labels
        ), len(batch)

    # The MLM and NSP heads get no gradient here; AdamW skips parameters whose grad is None.
    return train(
        model,
        (part.to(device) for part in parts),
        loss_fn,
        max_steps=steps,
        lr=lr,
        warmup_steps=warmup_steps,
        progress=progress,
        description="fine-tune",
    )


def train_classifier(
    model_config: TransformerConfig,
    labelled: EncodedBatch,
    pretrained_state: Mapping[str, Tensor] | None,
    num_classes: int,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    init_seed: int,
    batch_seed: int,
    device: torch.device | str,
    progress: bool = False,
) -> BertClassifier:
    """A :class:`BertClassifier` of ``num_classes`` classes fine-tuned on ``labelled``
    (class ids 0 to ``num_classes - 1``; :func:`fine_tune`).

    Its encoder starts from ``pretrained_state`` (a :class:`BertModel` state dict), or
    from scratch when that is ``None``. The weights are drawn on the CPU after seeding
    with ``init_seed`` (so every device starts from the same ones), then moved to
    ``device``; ``batch_seed`` orders the fine-tuning batches. ``progress`` shows a
    progress bar.
    """
    torch.manual_seed(init_seed)
    encoder = BertModel(model_config)
    if pretrained_state is not None:
        encoder.load_state_dict(pretrained_state)
    classifier = BertClassifier(encoder, num_classes).to(device)
    fine_tune(
        classifier,
        labelled,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=batch_seed,
        progress=progress,
    )
    return classifier
