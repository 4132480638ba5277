"""Data-parallel training over several processes (``torchrun``), the same optimisation
as one process.

:func:`lmpg_utils.runtime.resolve` sees that ``torchrun`` started the process, starts
the process group (:func:`start`) and hands the experiments a :class:`World`; nothing
here reads the environment. Every rank draws the same global batches from the same
seeded stream and trains on its own contiguous rows of each (:func:`shard`), with the
model wrapped in :class:`~torch.nn.parallel.DistributedDataParallel` (:func:`wrap`).
:func:`lmpg_utils.training.train` weights each rank's loss so that the gradient is the
one of the global batch's mean, whatever the ranks' shares of it.

With one process (:data:`SINGLE`) every helper is a no-op and no collective runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place among the ``size`` processes of a run: its global ``rank``
    and its ``local_rank`` on its machine (the GPU it drives)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"world size must be at least 1, got {self.size}")
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank must be in [0, {self.size}), got {self.rank}")
        if self.local_rank < 0:
            raise ValueError(f"local_rank must be >= 0, got {self.local_rank}")

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the process that prints, shows progress and writes
        the cache."""
        return self.rank == 0


#: one process, no process group: what notebooks and plain ``python -m lmpg_utils`` use
SINGLE = World()


def backend_for(device: torch.device) -> str:
    """The collective backend for ``device``: ``nccl`` on CUDA, ``gloo`` on a CPU."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def start(world: World, device: torch.device) -> None:
    """Join the process group of ``world`` (the rendezvous ``torchrun`` set up) on
    ``device``; nothing when ``world.size`` is 1 or the group already exists."""
    if world.size == 1 or dist.is_initialized():
        return
    dist.init_process_group(backend_for(device), rank=world.rank, world_size=world.size)


def close(world: World) -> None:
    """Leave the process group at the end of a run (nothing for one process)."""
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def shard(batch: Tensor, world: World) -> Tensor:
    """This rank's contiguous slice of the rows (first dimension) of a global batch.

    The rows are split as evenly as possible, in order (the first ``rows % size`` ranks
    get one more row, as :func:`torch.tensor_split` does), so the shards of all ranks,
    concatenated by rank, are the batch. The last batch of an epoch may hold fewer rows
    than the others; that is why an uneven split is allowed, and the item-weighted loss
    of :func:`lmpg_utils.training.train` keeps it exact. A batch with fewer rows than
    processes raises ``ValueError`` (some rank would get none).
    """
    if world.size == 1:
        return batch
    rows = batch.shape[0]
    if rows < world.size:
        raise ValueError(
            f"a batch of {rows} rows cannot be split over {world.size} processes "
            "(each needs at least one row)"
        )
    base, extra = divmod(rows, world.size)
    begin = world.rank * base + min(world.rank, extra)
    return batch[begin : begin + base + (world.rank < extra)]


def check_divisible(batch_size: int, world: World, name: str = "batch_size") -> None:
    """Raise ``ValueError`` unless the global ``batch_size`` splits evenly over the
    processes (so that every rank does the same work on a full batch)."""
    if batch_size % world.size:
        raise ValueError(
            f"{name}={batch_size} is not divisible by the number of processes "
            f"({world.size}); choose a global batch size that is a multiple of it"
        )


def all_sum(value: float, world: World) -> float:
    """The sum of ``value`` over all ranks (``value`` itself for one process)."""
    if world.size == 1:
        return value
    total = torch.tensor([float(value)], dtype=torch.float64, device=_device())
    dist.all_reduce(total)
    return float(total.item())


def all_sums(values: list[float], world: World) -> list[float]:
    """Element-wise sums over all ranks of a few numbers, in one collective."""
    if world.size == 1:
        return list(values)
    totals = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(totals)
    return totals.tolist()


def any_true(flag: bool, world: World) -> bool:
    """Whether ``flag`` holds on any rank: the ranks agree, e.g. on stopping."""
    if world.size == 1:
        return bool(flag)
    return all_sum(1.0 if flag else 0.0, world) > 0


def from_main(value: T, world: World) -> T:
    """Rank 0's ``value`` (any picklable object), on every rank."""
    if world.size == 1:
        return value
    box = [value if world.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]  # type: ignore[return-value]


@contextlib.contextmanager
def rank_generators(world: World) -> Iterator[None]:
    """Within, torch's global generators (CPU and CUDA) draw a different stream on each
    rank; after, one stream shared by all ranks again.

    The ranks start from the same seed (they draw the same batches and initial
    weights), so without this each rank's dropout would draw the same masks as every
    other's, and row ``i`` of every shard would be dropped alike. Both seeds are drawn
    from the shared state, so a run is repeatable. Nothing happens for one process.
    """
    if world.size == 1:
        yield
        return
    during, after = torch.randint(2**62, (2,)).tolist()
    torch.manual_seed(during + world.rank)
    try:
        yield
    finally:
        torch.manual_seed(after)


def wrap(model: nn.Module, world: World) -> nn.Module:
    """``model`` in :class:`~torch.nn.parallel.DistributedDataParallel` when there are
    several processes (gradients are averaged over the ranks during ``backward``), else
    ``model`` itself. The model must already be on this rank's device."""
    if world.size == 1:
        return model
    device = next(model.parameters()).device
    if device.type == "cuda":
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[device], output_device=device
        )
    return nn.parallel.DistributedDataParallel(model)


def require_single(world: World, what: str) -> None:
    """Raise ``NotImplementedError`` naming ``what`` when ``world`` has several
    processes: for the experiments that do not train data-parallel yet."""
    if world.size > 1:
        raise NotImplementedError(
            f"{what} is not yet distributed: run it as one process, without torchrun "
            f"(this run has {world.size} processes)"
        )


def _device() -> torch.device:
    """Where this rank's collectives put their tensors: its GPU under NCCL."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
