"""The experiment contract, and the one way a configuration is changed from outside.

Every module ``lmpg_utils/experiments/chN_*.py`` exposes the same names:

- ``NAME``: its name on the command line (``python -m lmpg_utils run NAME``);
- ``Config``: a frozen dataclass whose first field, ``profile``, names the profile it
  started from; model sizes are one nested field, not copied fields;
- ``PROFILES = {"quick": Config(...), "full": Config(...)}``;
- ``run(config, *, seed, device, progress=True, world=SINGLE) -> Result`` and
  ``prepare_models`` with the same parameters; ``world``
  (:class:`lmpg_utils.distributed.World`) is where the process stands under
  ``torchrun`` (an experiment that cannot run on several processes raises
  ``NotImplementedError``: chapter 1's ``run``);
- ``Result.summary()``: plain JSON data that starts with :data:`SUMMARY_KEYS`.

Profile, device and threads are resolved once, at the edge (the command line or a
notebook's setup cell, through :func:`lmpg_utils.runtime.resolve`), and passed down;
nothing below the experiments reads environment variables to decide them.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import torch

from . import runtime

C = TypeVar("C")

#: keys every experiment's ``Result.summary()`` starts with
SUMMARY_KEYS: tuple[str, ...] = (
    "experiment",
    "profile",
    "seed",
    "device",
    "world_size",
    "precision",
    "seconds",
    "config",
)


def check_profile(profile: str) -> None:
    """Raise ``ValueError`` unless ``profile`` is a known profile (``Config.__post_init__``)."""
    if profile not in runtime.PROFILES:
        raise ValueError(
            f"profile must be one of {', '.join(runtime.PROFILES)}, got {profile!r}"
        )


def profile_config(profiles: Mapping[str, C], profile: str) -> C:
    """``profiles[profile]``, with an error that lists the profiles when it is unknown."""
    if profile not in profiles:
        raise ValueError(
            f"unknown profile {profile!r}; valid profiles are: {', '.join(profiles)}"
        )
    return profiles[profile]


def setting_names(config: Any, prefix: str = "") -> list[str]:
    """Every settable name of a config dataclass; nested dataclasses as ``outer.inner``."""
    names = []
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        if dataclasses.is_dataclass(value):
            names += setting_names(value, f"{prefix}{item.name}.")
        else:
            names.append(prefix + item.name)
    return names


def _parse(text: str, current: Any, name: str) -> Any:
    """``text`` read as a value of the type ``current`` has."""
    try:
        if isinstance(current, bool):
            lowered = text.strip().lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(f"expected true or false, got {text!r}")
            return lowered in ("true", "1", "yes")
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
        if isinstance(current, tuple):
            kind = type(current[0]) if current else str
            return tuple(_parse(part, kind(), name) for part in text.split(",") if part)
        if isinstance(current, str):
            return text
        if current is None:
            return None if text.strip().lower() == "none" else json.loads(text)
    except ValueError as error:
        raise ValueError(f"cannot set {name}={text!r}: {error}") from None
    raise ValueError(f"{name} ({type(current).__name__}) cannot be set from text")


def apply_overrides(config: C, assignments: Iterable[str]) -> C:
    """A copy of ``config`` with ``key=value`` assignments applied (``model.d_model=256``
    reaches into a nested dataclass). Values are read as the type of the field's current
    value, and the config's own ``__post_init__`` validates the result. An unknown key,
    a malformed assignment or a bad value raises ``ValueError`` that names it."""
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"a setting must look like key=value, got {assignment!r}")
        if key == "profile":
            raise ValueError("choose the profile with --profile, not --set profile=...")
        valid = setting_names(config)
        if key not in valid:
            raise ValueError(
                f"unknown setting {key!r} for {type(config).__name__}; "
                f"valid settings are: {', '.join(valid)}"
            )
        config = _replace_path(config, key.split("."), text, key)
    return config


def _replace_path(config: Any, path: list[str], text: str, full_name: str) -> Any:
    head, *rest = path
    current = getattr(config, head)
    if rest:
        value = _replace_path(current, rest, text, full_name)
    else:
        value = _parse(text, current, full_name)
    try:
        return dataclasses.replace(config, **{head: value})
    except (TypeError, ValueError) as error:
        raise ValueError(f"--set {full_name}={text}: {error}") from None


def summary_header(
    experiment: str,
    config: Any,
    seed: int,
    device: str | torch.device,
    seconds: float,
    world_size: int = 1,
) -> dict[str, Any]:
    """The keys every summary starts with (:data:`SUMMARY_KEYS`), as JSON-able data;
    ``world_size`` is the number of processes that ran it (``torchrun``) and
    ``precision`` what the config's ``auto`` precisions meant
    (:func:`runtime.default_precision`)."""
    return {
        "experiment": experiment,
        "profile": config.profile,
        "seed": seed,
        "device": str(device),
        "world_size": int(world_size),
        "precision": runtime.default_precision(torch.device(device).type),
        "seconds": round(float(seconds), 1),
        "config": json.loads(json.dumps(dataclasses.asdict(config))),
    }
