"""Where and how experiments run: device, profile, seeds, threads and the memory allocator.

Two profiles exist. ``quick`` is the default on a CPU: it is what the tests and the
CPU book build execute, and every chapter still makes its point with it. ``full``
is the default when CUDA is present (Colab, a GPU server) and trains for longer on
more data. The environment variables ``LMPG_PROFILE`` and ``LMPG_DEVICE`` override
both choices. The precision that models set to ``"auto"`` train in is chosen here too:
bf16 autocast where it is fast (a GPU with native bf16, a CPU with AVX512-BF16 or
AMX), else fp32; ``LMPG_PRECISION`` (or ``--precision``) overrides it. Under
``torchrun``, :func:`resolve` also reads the process's place in the run
(``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``) and joins the process group
(:mod:`lmpg_utils.distributed`).
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from . import distributed
from .distributed import SINGLE, World

PROFILES: tuple[str, ...] = ("quick", "full")
Profile = Literal["quick", "full"]

#: what a precision setting may say; ``auto``: :func:`default_precision`
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")

# the run's precision for "auto" settings, once :func:`resolve` has chosen it
_run_precision: str | None = None


@functools.cache
def _cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls natively (AVX512-BF16 or AMX; Linux)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", flags) is not None


def fast_bf16(device_type: str) -> bool:
    """Whether bf16 autocast is fast on ``device_type`` here: a GPU with native bf16
    (Ampere or newer; not a T4, which emulates it) or a CPU with AVX512-BF16 or AMX.
    On other CPUs bf16 runs, emulated, slower than fp32."""
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return False
        try:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # an older torch without the argument
            return torch.cuda.is_bf16_supported()
    return device_type == "cpu" and _cpu_has_bf16()


def choose_precision(requested: str | None, device: torch.device) -> str:
    """``fp32`` or ``bf16``: ``requested``, else ``LMPG_PRECISION``, else ``auto``;
    ``auto`` is bf16 where :func:`fast_bf16`, else fp32. bf16 asked of a GPU that
    cannot run it raises ``ValueError``."""
    name = (requested or os.environ.get("LMPG_PRECISION") or "auto").strip().lower()
    if name not in PRECISIONS:
        raise ValueError(
            f"unknown precision {name!r} (LMPG_PRECISION/--precision); "
            f"choose one of: {', '.join(PRECISIONS)}"
        )
    if name == "auto":
        return "bf16" if fast_bf16(device.type) else "fp32"
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("bf16 was requested but this GPU does not support it")
    return name


def default_precision(device_type: str) -> str:
    """The precision of a model whose setting is ``auto``: the run's
    (:func:`resolve`), else bf16 where :func:`fast_bf16` on ``device_type``, else
    fp32."""
    if _run_precision is not None:
        return _run_precision
    return "bf16" if fast_bf16(device_type) else "fp32"


def get_device(requested: str | None = None) -> torch.device:
    """Return the device to run on.

    Order of precedence: the ``requested`` argument, then ``LMPG_DEVICE``, then
    CUDA when it is available, else the CPU. Asking for CUDA on a machine without
    it is an error rather than a silent fall-back.
    """
    name = (
        requested
        or os.environ.get("LMPG_DEVICE")
        or ("cuda" if torch.cuda.is_available() else "cpu")
    )
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(
            f"LMPG_DEVICE/device {name!r} is not a valid torch device: {error}"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {name!r} was requested but CUDA is not available on this machine"
        )
    return device


def get_profile(
    requested: str | None = None, device: torch.device | None = None
) -> Profile:
    """Return the run profile: ``requested``, else ``LMPG_PROFILE``, else by device.

    An unknown profile name raises ``ValueError`` listing the valid ones.
    """
    name = requested or os.environ.get("LMPG_PROFILE")
    if not name:
        device = device or get_device()
        name = "full" if device.type == "cuda" else "quick"
    name = name.strip().lower()
    if name not in PROFILES:
        raise ValueError(
            f"unknown profile {name!r}; valid profiles are: {', '.join(PROFILES)}"
        )
    return name  # type: ignore[return-value]


def set_seed(seed: int) -> torch.Generator:
    """Seed Python, NumPy and PyTorch (all devices) and return a seeded CPU generator."""
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def set_threads(count: int | None = None, share: int = 1) -> int:
    """Set PyTorch's intra-op thread count (default: ``LMPG_THREADS``, else all cores
    divided among the ``share`` processes that run on this machine, at least one)."""
    if share < 1:
        raise ValueError(f"share must be at least 1, got {share}")
    if count is None:
        text = os.environ.get("LMPG_THREADS", "0")
        try:
            count = int(text) or max(1, (os.cpu_count() or 1) // share)
        except ValueError:
            raise ValueError(f"LMPG_THREADS must be an integer, got {text!r}") from None
    if count < 1:
        raise ValueError(f"thread count must be at least 1, got {count}")
    torch.set_num_threads(count)
    return count


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_allocator = "default"


def tune_allocator() -> str:
    """Keep freed tensor memory in the process instead of giving it back to the system.

    A training step frees and allocates the same activation buffers again and again. By
    default glibc serves large blocks with ``mmap`` and trims the top of its heap, so each
    step gives the pages back and faults them in again (about 110,000 page faults per
    update of chapter 4's translator, a fifth of its CPU time in the kernel). Serving
    blocks up to 32 MiB from the heap, never trimming it and growing it 1 GiB at a time
    keeps the memory for the next step; ``benchmarks/bench_allocator.py`` measures the
    gain against the default in the same run. The price is a resident size that stays
    at its peak. Only glibc (Linux) is changed; elsewhere nothing happens. Returns what
    was done, also reported by :func:`describe`.
    """
    global _allocator
    if platform.system() != "Linux" or not platform.libc_ver()[0] == "glibc":
        _allocator = "default (not glibc)"
        return _allocator
    libc = ctypes.CDLL(None)
    settings = (
        (_M_MMAP_THRESHOLD, 32 << 20),
        (_M_TRIM_THRESHOLD, 2**31 - 1),
        (_M_TOP_PAD, 1 << 30),
    )
    for parameter, value in settings:
        if libc.mallopt(ctypes.c_int(parameter), ctypes.c_int(value)) != 1:
            raise RuntimeError(f"glibc mallopt({parameter}, {value}) failed")
    _allocator = "glibc: freed memory kept"
    return _allocator


@dataclass(frozen=True)
class Run:
    """How this process runs, resolved once at the edge by :func:`resolve`; ``world``
    is its place among the processes of a ``torchrun`` (:data:`SINGLE` without)."""

    profile: Profile
    device: torch.device
    threads: int
    seed: int
    allocator: str
    world: World = SINGLE
    precision: str = "fp32"


def _torchrun_int(name: str, default: int) -> int:
    """One of the integers ``torchrun`` puts in each process's environment."""
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {text!r}") from None


def detect_world() -> tuple[World, int]:
    """This process's :class:`~lmpg_utils.distributed.World` and the number of
    processes on its machine, from the variables ``torchrun`` sets (``WORLD_SIZE``,
    ``RANK``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``); one process without them."""
    size = _torchrun_int("WORLD_SIZE", 1)
    if size <= 1:
        return SINGLE, 1
    world = World(
        rank=_torchrun_int("RANK", 0),
        size=size,
        local_rank=_torchrun_int("LOCAL_RANK", 0),
    )
    return world, max(1, _torchrun_int("LOCAL_WORLD_SIZE", 1))


def _rank_device(device: torch.device, world: World) -> torch.device:
    """The device of this rank: on CUDA, the GPU of its local rank."""
    if world.size == 1 or device.type != "cuda":
        return device
    if device.index is not None and device.index != world.local_rank:
        raise ValueError(
            f"under torchrun each process uses the GPU of its local rank: local rank "
            f"{world.local_rank} would use cuda:{world.local_rank}, not {device}; "
            "pass --device cuda"
        )
    if world.local_rank >= torch.cuda.device_count():
        raise ValueError(
            f"local rank {world.local_rank} has no GPU: this machine has "
            f"{torch.cuda.device_count()}; start at most that many processes per node"
        )
    return torch.device("cuda", world.local_rank)


def resolve(
    profile: str | None = None,
    device: str | None = None,
    threads: int | None = None,
    seed: int | None = None,
    precision: str | None = None,
) -> Run:
    """Resolve, once, where and how a run happens, and apply it to this process.

    Called by the command line and by the setup cell at the top of each chapter; the
    experiments receive the result and read no environment variables themselves. Each
    argument left ``None`` comes from its environment variable (``LMPG_DEVICE``,
    ``LMPG_PROFILE``, ``LMPG_THREADS``, ``LMPG_SEED``, ``LMPG_PRECISION``), else its
    default: CUDA when present, the profile that device implies, every core, seed 0,
    bf16 where it is fast (:func:`choose_precision`). The threads are set, the
    precision becomes what ``auto`` settings train in (:func:`default_precision`) and
    the allocator is tuned (:func:`tune_allocator`). Bad values raise ``ValueError``.

    Under ``torchrun`` with more than one process (``WORLD_SIZE`` > 1), this also joins
    the process group (NCCL on CUDA, gloo on a CPU), gives each process the GPU of its
    ``LOCAL_RANK``, divides the cores among the processes of a machine when the threads
    are not given, and returns the process's place in :attr:`Run.world`. Every rank
    gets the same seed: they draw the same batches and each trains on its share.
    """
    world, local_size = detect_world()
    resolved_device = _rank_device(get_device(device), world)
    resolved_profile = get_profile(profile, resolved_device)
    if seed is None:
        text = os.environ.get("LMPG_SEED", "0")
        try:
            seed = int(text)
        except ValueError:
            raise ValueError(f"LMPG_SEED must be an integer, got {text!r}") from None
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    resolved_precision = choose_precision(precision, resolved_device)
    resolved_threads = set_threads(threads, share=local_size)
    global _run_precision
    _run_precision = resolved_precision
    if resolved_device.type == "cuda" and world.size > 1:
        torch.cuda.set_device(resolved_device)
    distributed.start(world, resolved_device)
    return Run(
        resolved_profile,
        resolved_device,
        resolved_threads,
        seed,
        tune_allocator(),
        world,
        resolved_precision,
    )


def describe(run: Run | None = None) -> dict[str, object]:
    """A short summary of the runtime, printed at the top of each chapter: of ``run``
    when given (what :func:`resolve` returned), else of the defaults."""
    device = run.device if run is not None else get_device()
    return {
        "device": str(device),
        "profile": run.profile if run is not None else get_profile(device=device),
        "seed": run.seed if run is not None else None,
        "world_size": run.world.size if run is not None else 1,
        "precision": run.precision
        if run is not None
        else default_precision(device.type),
        "fast_bf16": fast_bf16(device.type),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "allocator": _allocator,
        "cuda": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }
