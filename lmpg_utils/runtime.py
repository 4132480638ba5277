"""Where and how experiments run: device, profile, seeds, threads and the memory allocator.

Two profiles exist. ``quick`` is the default on a CPU: it is what the tests and the
CPU book build execute, and every chapter still makes its point with it. ``full``
is the default when CUDA is present (Colab, a GPU server) and trains for longer on
more data. The environment variables ``LMPG_PROFILE`` and ``LMPG_DEVICE`` override
both choices.
"""

from __future__ import annotations

import ctypes
import os
import platform
import random
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

PROFILES: tuple[str, ...] = ("quick", "full")
Profile = Literal["quick", "full"]


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


def set_threads(count: int | None = None) -> int:
    """Set PyTorch's intra-op thread count (default: ``LMPG_THREADS`` or all cores)."""
    if count is None:
        text = os.environ.get("LMPG_THREADS", "0")
        try:
            count = int(text) or (os.cpu_count() or 1)
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
    """How this process runs, resolved once at the edge by :func:`resolve`."""

    profile: Profile
    device: torch.device
    threads: int
    seed: int
    allocator: str


def resolve(
    profile: str | None = None,
    device: str | None = None,
    threads: int | None = None,
    seed: int | None = None,
) -> Run:
    """Resolve, once, where and how a run happens, and apply it to this process.

    Called by the command line and by the setup cell at the top of each chapter; the
    experiments receive the result and read no environment variables themselves. Each
    argument left ``None`` comes from its environment variable (``LMPG_DEVICE``,
    ``LMPG_PROFILE``, ``LMPG_THREADS``, ``LMPG_SEED``), else its default: CUDA when
    present, the profile that device implies, every core, seed 0. The threads are set
    and the allocator is tuned (:func:`tune_allocator`). Bad values raise ``ValueError``.
    """
    resolved_device = get_device(device)
    resolved_profile = get_profile(profile, resolved_device)
    if seed is None:
        text = os.environ.get("LMPG_SEED", "0")
        try:
            seed = int(text)
        except ValueError:
            raise ValueError(f"LMPG_SEED must be an integer, got {text!r}") from None
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    resolved_threads = set_threads(threads)
    return Run(
        resolved_profile, resolved_device, resolved_threads, seed, tune_allocator()
    )


def describe(run: Run | None = None) -> dict[str, object]:
    """A short summary of the runtime, printed at the top of each chapter: of ``run``
    when given (what :func:`resolve` returned), else of the defaults."""
    device = run.device if run is not None else get_device()
    return {
        "device": str(device),
        "profile": run.profile if run is not None else get_profile(device=device),
        "seed": run.seed if run is not None else None,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "allocator": _allocator,
        "cuda": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }
