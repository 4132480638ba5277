"""Training loops, learning-rate schedules and checkpoints shared by the chapters.

:func:`train` runs AdamW with linear warm-up and cosine decay, gradient clipping,
periodic evaluation and a tqdm progress bar, for a number of steps or a wall-clock
budget (whichever ends first). Checkpoints hold only tensors and plain data, so
they load with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from . import distributed, runtime
from .distributed import SINGLE, World
from .tokenization import pad_batch


def bucketed_batches(
    sequences: list[list[int]], batch_size: int, pad_id: int, generator: torch.Generator
) -> Iterator[Tensor]:
    """Endless shuffled, right-padded (batch, length) batches of ``sequences``.

    Each epoch is shuffled; within chunks of 50 batches, sequences of similar length
    share a batch to limit padding, and the batches are then shuffled again.
    """
    if not sequences:
        raise ValueError("no sequences to batch")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    while True:
        order = torch.randperm(len(sequences), generator=generator).tolist()
        chunk = batch_size * 50
        for start in range(0, len(order), chunk):
            block = sorted(
                order[start : start + chunk], key=lambda i: len(sequences[i])
            )
            batches = [
                block[i : i + batch_size] for i in range(0, len(block), batch_size)
            ]
            for b in torch.randperm(len(batches), generator=generator).tolist():
                yield pad_batch([sequences[i] for i in batches[b]], pad_id)


DECAYS: tuple[str, ...] = ("cosine", "linear", "constant")


def warmup_decay(
    warmup_steps: int, total_steps: int, decay: str = "cosine"
) -> Callable[[int], float]:
    """Multiplier for the learning rate: linear warm-up, then ``decay``.

    ``cosine`` decays to 0.1 of the peak, ``linear`` to zero at ``total_steps`` (the
    better choice for a fixed, short budget), ``constant`` stays at the peak.
    """
    if decay not in DECAYS:
        raise ValueError(f"unknown decay {decay!r}; choose one of {', '.join(DECAYS)}")
    if decay == "cosine":
        return warmup_cosine(warmup_steps, total_steps)
    if warmup_steps < 0 or total_steps <= 0:
        raise ValueError(
            f"need warmup_steps >= 0 and total_steps > 0, got {warmup_steps}, {total_steps}"
        )

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if decay == "constant":
            return 1.0
        return max(0.0, 1 - (step - warmup_steps) / max(1, total_steps - warmup_steps))

    return factor


def resolve_precision(precision: str, device_type: str) -> str:
    """``fp32`` or ``bf16``: ``precision`` itself, or for ``auto`` the run's choice
    (:func:`lmpg_utils.runtime.default_precision`). What cache keys hold."""
    if precision not in runtime.PRECISIONS:
        raise ValueError(
            f"unknown precision {precision!r}; choose one of {runtime.PRECISIONS}"
        )
    if precision == "auto":
        return runtime.default_precision(device_type)
    return precision


def autocast_dtype(precision: str, device_type: str) -> torch.dtype | None:
    """The autocast dtype for ``precision`` (``fp32``, ``bf16`` or ``auto``, see
    :func:`resolve_precision`) on a device type; None for fp32."""
    if resolve_precision(precision, device_type) == "fp32":
        return None
    if device_type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("bf16 was requested but this GPU does not support it")
    return torch.bfloat16


def average_states(states: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Element-wise mean of state dicts with the same keys (checkpoint averaging), in each tensor's dtype."""
    if not states:
        raise ValueError("no states to average")
    keys = set(states[0])
    if any(set(s) != keys for s in states):
        raise ValueError("the state dicts to average have different keys")
    averaged = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            averaged[key] = (sum(s[key].double() for s in states) / len(states)).to(
                first.dtype
            )
        else:
            averaged[key] = first.clone()
    return averaged


def warmup_cosine(
    warmup_steps: int, total_steps: int, min_ratio: float = 0.1
) -> Callable[[int], float]:
    """Multiplier for the learning rate: linear warm-up, then cosine decay to ``min_ratio``."""
    if warmup_steps < 0 or total_steps <= 0:
        raise ValueError(
            f"need warmup_steps >= 0 and total_steps > 0, got {warmup_steps}, {total_steps}"
        )

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def make_optimizer(
    model: nn.Module, lr: float, weight_decay: float = 0.01
) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases, norms or embeddings' 1-d params)."""
    if lr <= 0:
        raise ValueError(f"learning rate must be positive, got {lr}")
    params = [p for p in model.parameters() if p.requires_grad]  # shared ones once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=lr,
    )


@dataclass
class TrainHistory:
    """What happened during training: per-step losses and periodic evaluations."""

    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_values: list[float] = field(default_factory=list)
    eval_seconds: list[float] = field(default_factory=list)
    seconds: float = 0.0
    items: int = 0

    @property
    def items_per_second(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        """The recorded fields as plain data (JSON-able), for a cached model's metadata."""
        return asdict(self)

    @classmethod
    def from_dict(cls, record: dict) -> TrainHistory:
        """A history from :meth:`to_dict`'s output; keys that are not fields are ignored."""
        return cls(**{k: v for k, v in record.items() if k in cls.__dataclass_fields__})


def train(
    model: nn.Module,
    batches: Iterator,
    loss_fn: Callable[[nn.Module, object], tuple[Tensor, int]],
    max_steps: int,
    lr: float,
    warmup_steps: int = 100,
    time_budget_s: float | None = None,
    clip_norm: float = 1.0,
    weight_decay: float = 0.01,
    eval_fn: Callable[[nn.Module], float] | None = None,
    eval_every: int = 0,
    optimizer: torch.optim.Optimizer | None = None,
    progress: bool = True,
    description: str = "train",
    decay: str = "cosine",
    precision: str = "fp32",
    on_step: Callable[[int, nn.Module], None] | None = None,
    world: World = SINGLE,
) -> TrainHistory:
    """Train ``model`` on ``batches`` with AdamW, warm-up + decay schedule and clipping.

    ``loss_fn(model, batch)`` returns ``(mean loss, number of items)`` where items are
    what throughput counts (tokens, sentences). Stops after ``max_steps`` or
    ``time_budget_s`` seconds. ``eval_fn(model)`` runs every ``eval_every`` steps and
    at the end, in eval mode; its values are recorded in the history. ``decay`` is a
    schedule of :func:`warmup_decay`; ``precision="bf16"`` runs the forward pass under
    bfloat16 autocast (weights, gradients and optimizer state stay fp32).
    ``on_step(step, model)`` runs after every update (snapshots for averaging).

    With several processes (``world``, under ``torchrun``), every rank draws the same
    global batches and trains on its rows of each (:func:`distributed.shard`: a tensor
    or a tuple, dict or dataclass of them), with ``model`` in
    ``DistributedDataParallel``. Each rank's mean
    loss is scaled by ``items * world.size / global items`` before ``backward``, so the
    averaged gradient is that of the mean over every item of the global batch: the same
    optimisation as one process. The recorded losses and items are global; evaluation
    runs on every rank (same weights, same data), only rank 0 shows progress, and the
    time budget is rank 0's clock. With one process nothing of this runs.
    """
    if max_steps <= 0:
        raise ValueError(f"max_steps must be positive, got {max_steps}")
    device_type = next(model.parameters()).device.type
    amp_dtype = autocast_dtype(precision, device_type)
    optimizer = optimizer or make_optimizer(model, lr, weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_decay(warmup_steps, max_steps, decay)
    )
    history = TrainHistory()
    start = time.perf_counter()
    eval_time = 0.0

    def evaluate(step: int) -> None:
        nonlocal eval_time
        began = time.perf_counter()
        model.eval()
        with torch.no_grad():
            value = float(eval_fn(model))
        model.train()
        eval_time += time.perf_counter() - began
        history.eval_steps.append(step)
        history.eval_values.append(value)
        history.eval_seconds.append(time.perf_counter() - start)

    model.train()
    # several processes: the loss computed through DDP (nothing of it for one)
    objective = distributed.wrap_loss(model, loss_fn, world)
    bar = tqdm(
        total=max_steps,
        desc=description,
        disable=not (progress and world.is_main),
        mininterval=2.0,
        leave=False,
    )
    step = 0
    # several processes: each rank its own dropout masks (nothing for one)
    with distributed.rank_generators(world):
        for step in range(1, max_steps + 1):
            batch = next(batches)
            if world.size > 1:
                items, loss_value = _distributed_step(
                    objective, batch, world, device_type, amp_dtype, optimizer, step
                )
            else:
                with torch.autocast(
                    device_type,
                    dtype=amp_dtype or torch.float32,
                    enabled=amp_dtype is not None,
                ):
                    loss, items = loss_fn(model, batch)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"loss became {loss.item()} at step {step}"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                loss_value = loss.item()
            if clip_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
            optimizer.step()
            schedule.step()
            history.steps.append(step)
            history.losses.append(loss_value)
            history.items += int(items)
            if on_step is not None:
                on_step(step, model)
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss_value:.3f}")
            if eval_fn is not None and eval_every and step % eval_every == 0:
                evaluate(step)
            if time_budget_s is not None and distributed.any_true(
                world.is_main
                and time.perf_counter() - start - eval_time > time_budget_s,
                world,
            ):
                break
    bar.close()
    if eval_fn is not None and (
        not history.eval_steps or history.eval_steps[-1] != step
    ):
        evaluate(step)
    history.seconds = time.perf_counter() - start - eval_time
    model.eval()
    return history


def _distributed_step(
    objective: Callable[[object], tuple[Tensor, int]],
    batch: object,
    world: World,
    device_type: str,
    amp_dtype: torch.dtype | None,
    optimizer: torch.optim.Optimizer,
    step: int,
) -> tuple[int, float]:
    """One rank's forward and backward on its shard of the global ``batch``, its loss
    weighted so that DDP's average over the ranks is the gradient of the global mean.
    Returns the global item count and the global mean loss."""
    rows = distributed.count_rows(batch)
    if rows == 0:
        raise ValueError(f"the global batch of step {step} is empty")
    if rows >= world.size:
        part, counts = distributed.shard(batch, world), True
    else:
        # an epoch's last batch may have fewer rows than there are ranks: a rank
        # without a row computes on one it does not own and weighs it zero, so that
        # every rank still runs forward and backward (DDP's all-reduce needs them all)
        row = min(world.rank, rows - 1)
        part, counts = distributed.take_rows(batch, row, row + 1), world.rank < rows
    with torch.autocast(
        device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
    ):
        loss, items = objective(part)
    own = int(items) if counts else 0
    value = float(loss.detach())
    # one collective for both: the global item count and the item-weighted loss sum
    global_items, global_sum = distributed.all_sums(
        [float(own), value * own if math.isfinite(value) else math.nan], world
    )
    if not math.isfinite(global_sum):
        raise FloatingPointError(
            f"loss became {global_sum} (summed over the ranks) at step {step}"
        )
    if global_items <= 0:
        raise ValueError(f"the global batch of step {step} has no items to train on")
    optimizer.zero_grad(set_to_none=True)
    (loss * (own * world.size / global_items)).backward()
    return int(global_items), global_sum / global_items


def save_checkpoint(
    path: str | Path, model: nn.Module, config: dict, extra: dict | None = None
) -> Path:
    """Save weights and plain-data metadata (loadable with ``weights_only=True``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(
        {
            "state_dict": model.state_dict(),
            "config": dict(config),
            "extra": dict(extra or {}),
        },
        tmp,
    )
    tmp.replace(path)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint saved by :func:`save_checkpoint`, safely (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    data = torch.load(path, map_location=map_location, weights_only=True)
    missing = {"state_dict", "config"} - set(data)
    if missing:
        raise ValueError(
            f"{path} is not an lmpg checkpoint (missing {sorted(missing)})"
        )
    return data
