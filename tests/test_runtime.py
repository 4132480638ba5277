"""Device, profile and seed selection."""

from __future__ import annotations

import pytest
import torch

from lmpg_utils import runtime


def test_profile_defaults_by_device(monkeypatch):
    monkeypatch.delenv("LMPG_PROFILE", raising=False)
    assert runtime.get_profile(device=torch.device("cpu")) == "quick"
    assert runtime.get_profile(device=torch.device("cuda")) == "full"


def test_profile_environment_override_and_argument(monkeypatch):
    monkeypatch.setenv("LMPG_PROFILE", "FULL ")
    assert runtime.get_profile(device=torch.device("cpu")) == "full"
    assert runtime.get_profile("quick") == "quick"


def test_unknown_profile_lists_the_valid_ones(monkeypatch):
    monkeypatch.setenv("LMPG_PROFILE", "fast")
    with pytest.raises(
        ValueError, match="unknown profile 'fast'; valid profiles are: quick, full"
    ):
        runtime.get_profile()


def test_device_override_and_errors(monkeypatch):
    monkeypatch.setenv("LMPG_DEVICE", "cpu")
    assert runtime.get_device() == torch.device("cpu")
    monkeypatch.setenv("LMPG_DEVICE", "gpu0")
    with pytest.raises(ValueError, match="not a valid torch device"):
        runtime.get_device()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            runtime.get_device("cuda")


def test_seed_makes_draws_repeatable():
    generator = runtime.set_seed(7)
    first = (torch.rand(3), torch.rand(3, generator=generator))
    generator = runtime.set_seed(7)
    second = (torch.rand(3), torch.rand(3, generator=generator))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    with pytest.raises(ValueError, match="non-negative integer"):
        runtime.set_seed(-1)


def test_threads_and_describe(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert runtime.set_threads(1) == 1 and torch.get_num_threads() == 1
        with pytest.raises(ValueError, match="at least 1"):
            runtime.set_threads(0)
    finally:
        torch.set_num_threads(before)
    monkeypatch.setenv("LMPG_DEVICE", "cpu")
    monkeypatch.delenv("LMPG_PROFILE", raising=False)
    info = runtime.describe()
    assert info["device"] == "cpu" and info["profile"] == "quick"


def test_tune_allocator_reports_what_it_did():
    """In a child process, so the test process keeps glibc's defaults."""
    import platform
    import subprocess
    import sys

    code = (
        "from lmpg_utils import runtime\n"
        "assert runtime.describe()['allocator'] == 'default'\n"
        "done = runtime.tune_allocator()\n"
        "assert runtime.tune_allocator() == done == runtime.describe()['allocator']\n"
        "import torch; x = torch.ones(1 << 22); del x  # allocation still works\n"
        "print(done)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert out == ("glibc: freed memory kept" if glibc else "default (not glibc)")


def test_precision_is_bf16_where_it_is_fast_and_can_be_overridden(monkeypatch):
    from lmpg_utils.training import autocast_dtype, resolve_precision

    monkeypatch.setattr(runtime, "_run_precision", None)
    monkeypatch.delenv("LMPG_PRECISION", raising=False)
    cpu = torch.device("cpu")
    for fast, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(runtime, "_cpu_has_bf16", lambda fast=fast: fast)
        assert runtime.fast_bf16("cpu") is fast
        assert runtime.choose_precision(None, cpu) == expected
        assert resolve_precision("auto", "cpu") == expected
        # an explicit setting is kept whatever the machine
        assert resolve_precision("fp32", "cpu") == "fp32"
        assert autocast_dtype("bf16", "cpu") is torch.bfloat16
    monkeypatch.setenv("LMPG_PRECISION", "fp32")
    monkeypatch.setattr(runtime, "_cpu_has_bf16", lambda: True)
    run = runtime.resolve(device="cpu", threads=torch.get_num_threads())
    # the run's choice is what "auto" settings now train in
    assert run.precision == "fp32" and runtime.describe(run)["precision"] == "fp32"
    assert resolve_precision("auto", "cpu") == "fp32"
    assert autocast_dtype("auto", "cpu") is None
    assert runtime.describe(run)["fast_bf16"] is True
    monkeypatch.setenv("LMPG_PRECISION", "fp16")
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        runtime.resolve(device="cpu", threads=torch.get_num_threads())
    with pytest.raises(ValueError, match="unknown precision 'half'"):
        resolve_precision("half", "cpu")
