"""Where and how experiments run: device, profile, seeds and threads.

Two profiles exist. ``quick`` is the default on a CPU: it is what the tests and the
CPU book build execute, and every chapter still makes its point with it. ``full``
is the default when CUDA is present (Colab, a GPU server) and trains for longer on
more data. The environment variables ``LMPG_PROFILE`` and ``LMPG_DEVICE`` override
both choices.
"""

from __future__ import annotations

import os
import random
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
    name = requested or os.environ.get("LMPG_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"LMPG_DEVICE/device {name!r} is not a valid torch device: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was requested but CUDA is not available on this machine")
    return device


def get_profile(requested: str | None = None, device: torch.device | None = None) -> Profile:
    """Return the run profile: ``requested``, else ``LMPG_PROFILE``, else by device.

    An unknown profile name raises ``ValueError`` listing the valid ones.
    """
    name = requested or os.environ.get("LMPG_PROFILE")
    if not name:
        device = device or get_device()
        name = "full" if device.type == "cuda" else "quick"
    name = name.strip().lower()
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; valid profiles are: {', '.join(PROFILES)}")
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
        count = int(os.environ.get("LMPG_THREADS", "0")) or (os.cpu_count() or 1)
    if count < 1:
        raise ValueError(f"thread count must be at least 1, got {count}")
    torch.set_num_threads(count)
    return count


def describe() -> dict[str, object]:
    """A short summary of the runtime, printed at the top of each chapter."""
    device = get_device()
    return {
        "device": str(device),
        "profile": get_profile(device=device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
    }
