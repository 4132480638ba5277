"""benchmarks/bench_mfu.py: the FLOP count, the matmul probe, a missing bf16, and a
``--quick`` run end to end (its numbers are not checked, only its shape)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmpg_utils.language_modeling import lm_loss
from lmpg_utils.transformer import GPT, ModelSizes

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "bench_mfu.py"


@pytest.fixture(scope="module")
def bench():
    """The benchmark script as a module (benchmarks/ is not a package); registered in
    ``sys.modules`` while it loads, as its dataclasses need."""
    spec = importlib.util.spec_from_file_location("bench_mfu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def tiny_gpt(dropout: float) -> GPT:
    torch.manual_seed(0)
    sizes = ModelSizes(
        d_model=32, num_heads=2, num_layers=2, d_ff=64, max_len=16, dropout=dropout
    )
    return GPT(sizes.with_vocab(100))


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gpt_flops_are_counted_exactly(bench, one_thread, dropout):
    # dropout 0 runs PyTorch's CPU flash attention, 0.1 the unfused math path: the
    # count must see the attention either way
    model = tiny_gpt(dropout)
    batch = torch.randint(4, 100, (4, 17))
    rows, length, d, d_ff, layers, vocab = 4, 16, 32, 64, 2, 100
    flops, by_op = bench.count_training_flops(
        model, lambda m, b: lm_loss(m, b, 0), batch
    )
    tokens = rows * length
    # forward: 2 FLOPs per weight per token, QK^T and AV over every key (causal
    # masking not halved), the tied output layer; backward costs twice the forward
    per_token = layers * (2 * (4 * d * d + 2 * d * d_ff) + 4 * length * d)
    forward = tokens * (per_token + 2 * d * vocab)
    assert flops == 3 * forward, by_op
    six_n_tokens = 6 * bench.six_n_parameters(model, vocab, d) * tokens
    assert 1.0 <= flops / six_n_tokens <= 3.0
    assert all(p.grad is None for p in model.parameters())


def test_matmul_probe_returns_positive_flops(bench, one_thread):
    peak = bench.matmul_peak(torch.float32, sizes=(64, 96), repeats=1, min_seconds=0)
    assert peak["flops_per_s"] > 0
    assert set(peak["by_size"]) == {"64", "96"}
    assert all(f > 0 for f in peak["by_size"].values())
    assert peak["flops_per_s"] == max(peak["by_size"].values())
    if bench.bf16_unsupported() is None:
        bf16 = bench.matmul_peak(torch.bfloat16, sizes=(64,), repeats=1)
        assert bf16["flops_per_s"] > 0


def test_precision_without_a_peak_is_skipped_with_its_reason(bench, one_thread):
    peaks = {"fp32": {"flops_per_s": 1e9}, "bf16": {"skipped": "no bf16 here"}}
    result = bench.measure_model(
        bench.gpt_workload(rows=1), peaks, steps=1, warmup=1, seconds=0
    )
    assert result["precisions"]["bf16"] == {"skipped": "no bf16 here"}
    assert result["precisions"]["fp32"]["mfu"] > 0
    assert result["bf16_speedup"] is None


def test_quick_run_reports_every_model_and_precision(tmp_path):
    out = tmp_path / "mfu.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "MFU" in done.stdout and "goal:" in done.stdout
    results = json.loads(out.read_text())
    assert results["environment"]["quick"] is True
    assert results["peak"]["fp32"]["flops_per_s"] > 0
    assert (
        "flops_per_s" in results["peak"]["bf16"] or results["peak"]["bf16"]["skipped"]
    )
    assert set(results["models"]) == {"gpt", "bert", "encoder-decoder"}
    reference = results["models"]["gpt"]["reference"]
    for name, result in [*results["models"].items(), ("reference", reference)]:
        assert result["flops_per_step"] > 0 and result["six_n_tokens"] > 0, name
        assert set(result["precisions"]) == {"fp32", "bf16"}, name
        for precision, row in result["precisions"].items():
            if "skipped" in row:
                assert precision == "bf16" and row["skipped"], (name, row)
                continue
            assert row["steps"] == 2, (name, precision)
            for key in ("tokens_per_s", "flops_per_s", "mfu", "s_per_step"):
                assert row[key] > 0, (name, precision, key)
            if name == "reference":
                assert row["ours_over_reference"] > 0
    goal = results["goal"]
    assert goal["target_mfu"] == 0.5 and goal["precision"] in ("fp32", "bf16")
    if goal["met"]:
        assert results["profile"] is None
    else:
        assert results["profile"]["top_ops"], "below the goal the GPT is profiled"
