"""Held-out measurements of chapter 3: MLM and NSP accuracy with their trivial baselines,
and a classifier's accuracy."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .data import EncodedBatch
from .masking import IGNORE_INDEX, SpecialIds, check_known_ids
from .model import BertClassifier, BertModel
from .training import make_pretraining_batch

MLM_KINDS: tuple[str, ...] = ("masked", "random", "kept")


@torch.no_grad()
def evaluate_pretraining(
    model: BertModel,
    data: EncodedBatch,
    special: SpecialIds,
    seed: int = 1234,
    batch_size: int = 256,
    baseline_token: int | None = None,
) -> dict[str, float | int]:
    """Held-out MLM accuracy (over chosen positions, with a fixed masking seed) and NSP accuracy.

    Also returns ``mlm_labels`` (the number of scored positions), ``nsp_majority``
    (accuracy of always answering the majority class), and per kind of chosen position
    (``masked``: the input shows ``[MASK]``; ``random``: a different token; ``kept``:
    the original token, including random draws that hit it) ``mlm_accuracy_KIND`` and
    ``mlm_count_KIND``; with ``baseline_token``, ``mlm_baseline_KIND`` is the accuracy of
    always guessing that token.
    """
    if data.labels is None:
        raise ValueError("the evaluation pairs need labels (is_next)")
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    mlm_right = mlm_total = nsp_right = 0
    by_kind = {k: [0, 0, 0] for k in MLM_KINDS}  # right, count, baseline right
    predictions: list[Tensor] = []
    targets: list[Tensor] = []
    for part in data.in_order(batch_size):
        batch = make_pretraining_batch(part, special, generator).to(device)
        hidden = model.encode(batch.ids, batch.segment_ids, batch.padding_mask)
        chosen = batch.mlm_labels != IGNORE_INDEX
        guess = model.mlm_logits(hidden[chosen]).argmax(-1)
        gold = batch.mlm_labels[chosen]
        mlm_right += int((guess == gold).sum())
        mlm_total += int(chosen.sum())
        shown = batch.ids[chosen]
        kinds = {"masked": shown == special.mask, "kept": shown == gold}
        kinds["random"] = ~(kinds["masked"] | kinds["kept"])
        for kind, where in kinds.items():
            by_kind[kind][0] += int((guess[where] == gold[where]).sum())
            by_kind[kind][1] += int(where.sum())
            if baseline_token is not None:
                by_kind[kind][2] += int((gold[where] == baseline_token).sum())
        predictions.append(guess.cpu())
        targets.append(batch.mlm_labels[chosen].cpu())
        nsp_right += int(
            (model.nsp_logits(hidden).argmax(-1) == batch.nsp_labels).sum()
        )
    is_next = data.labels.float().mean().item()
    out: dict[str, float | int] = {
        "mlm_accuracy": mlm_right / max(1, mlm_total),
        "mlm_labels": mlm_total,
        "nsp_accuracy": nsp_right / len(data),
        "nsp_majority": max(is_next, 1 - is_next),
        "pairs": len(data),
    }
    for kind, (right, count, base) in by_kind.items():
        out[f"mlm_accuracy_{kind}"] = right / max(1, count)
        out[f"mlm_count_{kind}"] = count
        if baseline_token is not None:
            out[f"mlm_baseline_{kind}"] = base / max(1, count)
    return out


def masked_targets(
    data: EncodedBatch, special: SpecialIds, seed: int = 1234, batch_size: int = 256
) -> Tensor:
    """The original ids at the positions :func:`evaluate_pretraining` scores (same seed, same order)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for part in data.in_order(batch_size):
        batch = make_pretraining_batch(part, special, generator)
        out.append(batch.mlm_labels[batch.mlm_labels != IGNORE_INDEX])
    return torch.cat(out)


def most_frequent_token(
    ids: Tensor | Sequence[Sequence[int]], special: SpecialIds
) -> tuple[int, float]:
    """The most frequent non-special token in ``ids`` (a tensor or lists of ids) and its frequency there."""
    if isinstance(ids, Tensor):
        flat = ids.reshape(-1).long()
    else:
        flat = torch.tensor([i for row in ids for i in row], dtype=torch.long)
    check_known_ids(flat, special.vocab_size)
    counts = torch.bincount(flat, minlength=special.vocab_size)
    counts[list(special.specials)] = 0
    total = int(counts.sum())
    if total == 0:
        raise ValueError("no ordinary token to count")
    top = int(counts.argmax())
    return top, int(counts[top]) / total


@torch.no_grad()
def classifier_accuracy(
    model: BertClassifier, data: EncodedBatch, batch_size: int = 256
) -> float:
    """Accuracy of ``model`` on the labelled ``data``."""
    if data.labels is None:
        raise ValueError("evaluation data needs labels")
    model.eval()
    device = next(model.parameters()).device
    right = 0
    for part in data.in_order(batch_size):
        part = part.to(device)
        right += int(
            (
                model(part.ids, part.segment_ids, part.padding_mask).argmax(-1)
                == part.labels
            ).sum()
        )
    return right / len(data)
