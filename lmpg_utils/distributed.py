"""Data-parallel training over several processes (``torchrun``), the same optimisation
as one process.

:func:`lmpg_utils.runtime.resolve` sees that ``torchrun`` started the process, starts
the process group (:func:`start`) and hands the experiments a :class:`World`; nothing
here reads the environment. Every rank draws the same global batches from the same
seeded stream and trains on its own contiguous rows of each (:func:`shard`), with the
loss computed through :class:`~torch.nn.parallel.DistributedDataParallel`
(:func:`wrap_loss`).
:func:`lmpg_utils.training.train` weights each rank's loss so that the gradient is the
one of the global batch's mean, whatever the ranks' shares of it.

With one process (:data:`SINGLE`) every helper is a no-op and no collective runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

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


#: how long a collective waits for the slowest rank before the run fails
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=2)

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
    dist.init_process_group(
        backend_for(device),
        rank=world.rank,
        world_size=world.size,
        # the other ranks may wait this long while rank 0 alone trains a small model
        # that the others then load (:func:`main_first`)
        timeout=COLLECTIVE_TIMEOUT,
    )


def close(world: World) -> None:
    """Leave the process group at the end of a run (nothing for one process)."""
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def shard(batch: T, world: World) -> T:
    """This rank's contiguous slice of the rows of a global batch.

    ``batch`` is a tensor (rows: its first dimension), or a structure of them: a tuple,
    dict or dataclass whose tensors and lists all hold the same number of rows (a list
    is rows, e.g. the indices of the batch's examples; other values are kept as they
    are). The rows are split as evenly as possible, in order (the first
    ``rows % size`` ranks get one more row, as :func:`torch.tensor_split` does), so the
    shards of all ranks, concatenated by rank, are the batch. The last batch of an
    epoch may hold fewer rows than the others; that is why an uneven split is allowed,
    and the item-weighted loss of :func:`lmpg_utils.training.train` keeps it exact. A
    batch with fewer rows than processes raises ``ValueError`` (some rank would get
    none).
    """
    if world.size == 1:
        return batch
    rows = count_rows(batch)
    if rows < world.size:
        raise ValueError(
            f"a batch of {rows} rows cannot be split over {world.size} processes "
            "(each needs at least one row)"
        )
    base, extra = divmod(rows, world.size)
    begin = world.rank * base + min(world.rank, extra)
    return take_rows(batch, begin, begin + base + (world.rank < extra))


def _row_holders(batch: Any) -> Iterator[Any]:
    """The tensors and lists of a batch structure (see :func:`shard`)."""
    if isinstance(batch, (Tensor, list)):
        yield batch
    elif isinstance(batch, tuple):
        for part in batch:
            yield from _row_holders(part)
    elif isinstance(batch, dict):
        for part in batch.values():
            yield from _row_holders(part)
    elif dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        for f in dataclasses.fields(batch):
            yield from _row_holders(getattr(batch, f.name))


def count_rows(batch: Any) -> int:
    """The number of rows of a batch (see :func:`shard`); ``ValueError`` when its parts
    disagree or it holds no tensor or list."""
    counts = {len(part) for part in _row_holders(batch)}
    if len(counts) != 1:
        raise ValueError(
            "a batch to shard must hold tensors or lists with one number of rows, "
            f"got {type(batch).__qualname__} with row counts {sorted(counts)}"
        )
    return counts.pop()


def take_rows(batch: T, begin: int, end: int) -> T:
    """Rows ``begin:end`` of every tensor and list of a batch structure."""
    if isinstance(batch, (Tensor, list)):
        return batch[begin:end]  # type: ignore[return-value]
    if isinstance(batch, tuple):
        parts = [take_rows(part, begin, end) for part in batch]
        return type(batch)(*parts) if hasattr(batch, "_fields") else type(batch)(parts)
    if isinstance(batch, dict):
        return type(batch)((k, take_rows(v, begin, end)) for k, v in batch.items())
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return dataclasses.replace(
            batch,
            **{
                f.name: take_rows(getattr(batch, f.name), begin, end)
                for f in dataclasses.fields(batch)
                if f.init
            },
        )
    return batch


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


def rank_generator(
    generator: torch.Generator, seed: int, world: World
) -> torch.Generator:
    """The generator this rank samples with: ``generator`` itself for one process;
    with several, a generator of its own, seeded from ``seed`` and the rank, so that
    the ranks draw independent samples while ``generator`` (which draws the batches)
    stays in step on every rank."""
    if world.size == 1:
        return generator
    return torch.Generator(generator.device).manual_seed(
        seed * 1_000_003 + 7_919 * (world.rank + 1)
    )


@contextlib.contextmanager
def main_first(world: World) -> Iterator[None]:
    """Rank 0 runs the block first, then the other ranks run it: for work that rank 0
    alone should do and the others then find (a small model trained once and cached,
    on a disk every rank of the machine sees). Nothing for one process."""
    if world.size > 1 and not world.is_main:
        dist.barrier()
    try:
        yield
    finally:
        if world.size > 1 and world.is_main:
            dist.barrier()


class _Objective(nn.Module):
    """A model and its loss as one module, so that DDP sees the loss's computation as
    a forward call however the loss uses the model (its ``forward`` or its methods)."""

    def __init__(self, model: nn.Module, loss_fn: Callable[..., Any]):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, *inputs: Any) -> Any:
        return self.loss_fn(self.model, *inputs)


def wrap_loss(
    model: nn.Module, loss_fn: Callable[..., Any], world: World
) -> Callable[..., Any]:
    """``loss_fn(model, *inputs)`` as a function of ``inputs``: for one process just
    that; for several, called through :class:`~torch.nn.parallel.
    DistributedDataParallel`, so that ``backward`` averages the gradients of
    ``model``'s parameters over the ranks. Every parameter must take part in every
    loss (DDP's default, without the cost of searching the graph for unused ones).
    The model must be on this rank's device."""
    if world.size == 1:
        return functools.partial(loss_fn, model)
    objective = _Objective(model, loss_fn)
    device = next(model.parameters()).device
    ids = [device] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(
        objective, device_ids=ids, output_device=device if ids else None,
    )  # fmt: skip


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
