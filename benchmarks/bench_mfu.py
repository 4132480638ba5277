"""Model FLOP utilization of the book's Transformers (``make benchmark``; exits 0).

MFU = model FLOPs per second / the peak FLOP/s of a matmul probe measured in the same
run, with the same process and thread count. For chapter 2's GPT, chapter 3's BERT and
chapter 4's encoder-decoder at their ``quick`` sizes (read from the package's quick
profiles), in fp32 and in bf16 autocast:

1. Probe: the best FLOP/s of square matmuls (1024 and 2048, best of a few timed loops
   after a warm-up) in fp32 and in bf16; bf16 is skipped, with the reason, where
   oneDNN cannot run it on this CPU.
2. Model FLOPs per training step, counted exactly with
   ``torch.utils.flop_counter.FlopCounterMode`` over one forward and backward on the
   benchmark's batch (PyTorch's CPU flash-attention kernels are added to its table,
   without the scores their backward recomputes; attention counts as dense, causal
   masking not halved). The optimizer step is not model FLOPs. 6·N·tokens is printed
   for comparison.
3. Training throughput: ``lmpg_utils.training.train`` (forward, backward, clipping,
   AdamW step, as the chapters train) on one fixed batch of random token ids shaped
   like the quick training's real batches, after warm-up steps: tokens/s, achieved
   model FLOP/s and MFU against the probe's peak in the same precision.
4. A plain reference for the GPT: the same sizes built from
   ``torch.nn.TransformerEncoderLayer`` (pre-LN, GELU, causal, tied head), trained the
   same way; ours / reference tokens/s.
5. Goal: the GPT's training MFU at least 50% in its best precision (the one that
   trains fastest, in tokens/s), against that precision's peak. Below it,
   ``torch.profiler`` records a few steps of the GPT in that precision and the top
   ops by self CPU time are printed.

tokens/s counts what each model's training counts: the GPT's predicted tokens
B·(L-1), BERT's input tokens B·L, the translator's target tokens B·(T-1).
``--quick`` (tiny batches, 2 steps, a small probe) exercises the code; its numbers mean
nothing. Use ``--json PATH`` to keep the results.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from lmpg_utils import runtime, translation
from lmpg_utils.bert.model import BertModel
from lmpg_utils.bert.pretrained import PRETRAINING
from lmpg_utils.bert.training import PretrainingBatch, pretraining_loss
from lmpg_utils.experiments import ch4_policy_gradient as ch4
from lmpg_utils.language_modeling import GPT_PROFILES, GPT_VOCAB_SIZES, lm_loss
from lmpg_utils.training import TrainHistory, make_optimizer, train
from lmpg_utils.transformer import GPT, TransformerConfig, init_weights
from lmpg_utils.translation import mle_loss

GOAL_MFU = 0.5
PRECISIONS: tuple[str, ...] = ("fp32", "bf16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODELS: tuple[str, ...] = ("gpt", "bert", "encoder-decoder")

# Batch shapes of the quick trainings, measured on their real batches (seed 0, a few
# hundred batches): chapter 2's batches of 64 verses are 32.1 tokens wide on average;
# BERT's NSP pairs always fill max_len (64); the translator's token budget of 2,500
# target tokens gives about 87 pairs, sources 38.1 and targets 31.1 tokens wide.
GPT_LENGTH = 32
TRANSLATOR_SOURCE_LENGTH = 38
TRANSLATOR_TARGET_LENGTH = 31
PAD_ID = 0  # padding is id 0 in the word vocabulary and both BPE tokenizers
FIRST_ORDINARY_ID = 8  # above every special id of the three vocabularies
MLM_RATE = 0.15


# ------------------------------------------------------------------ the matmul probe


def matmul_peak(
    dtype: torch.dtype,
    sizes: Iterable[int] = (1024, 2048),
    repeats: int = 5,
    min_seconds: float = 0.1,
) -> dict:
    """The best FLOP/s of ``n x n`` matmuls in ``dtype`` over ``sizes``.

    Each size is warmed up, then timed ``repeats`` times, each time over as many
    products as fill about ``min_seconds``; the best loop counts (2·n³ FLOPs a
    product). Returns ``{"flops_per_s": best, "size": its n, "by_size": {n: FLOP/s}}``.
    """
    by_size: dict[str, float] = {}
    for n in sizes:
        a = torch.randn(n, n).to(dtype)
        b = torch.randn(n, n).to(dtype)
        out = torch.empty(n, n, dtype=dtype)
        began = time.perf_counter()
        torch.mm(a, b, out=out)  # warm-up, and the size of a timed loop
        once = max(time.perf_counter() - began, 1e-6)
        loops = max(1, math.ceil(min_seconds / once))
        torch.mm(a, b, out=out)
        best = math.inf
        for _ in range(repeats):
            began = time.perf_counter()
            for _ in range(loops):
                torch.mm(a, b, out=out)
            best = min(best, (time.perf_counter() - began) / loops)
        by_size[str(n)] = 2 * n**3 / best
    top = max(by_size, key=by_size.__getitem__)
    return {"flops_per_s": by_size[top], "size": int(top), "by_size": by_size}


def bf16_unsupported() -> str | None:
    """Why bf16 cannot run here (oneDNN missing, no bf16 on this CPU, a failed
    product), or None when it can."""
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (mkldnn), which runs bf16 on a CPU"
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        if check is not None and not check():
            return "oneDNN reports no bf16 support on this CPU"
        x = torch.randn(8, 8)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = x @ x
        if y.dtype != torch.bfloat16:
            return f"bf16 autocast returned {y.dtype}"
    except RuntimeError as error:
        return f"a bf16 matmul failed: {error}"
    return None


# --------------------------------------------------------------------- FLOP counts


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flop(
    grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs
) -> int:
    # the four products of the gradients, twice the forward's; PyTorch's formula adds
    # the scores the flash kernel recomputes, which are not model FLOPs (and which the
    # unfused path, taken under dropout, does not compute)
    return 2 * flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


#: PyTorch's CPU flash-attention kernels, missing from FlopCounterMode's table
CPU_SDPA_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: (
        _cpu_sdpa_backward_flop
    ),
}

LossFn = Callable[[nn.Module, object], tuple[Tensor, int]]


def count_training_flops(
    model: nn.Module, loss_fn: LossFn, batch: object
) -> tuple[int, dict[str, int]]:
    """Model FLOPs of one training step: one forward and backward of ``loss_fn`` on
    ``batch`` in train mode, counted by ``FlopCounterMode``. Returns the total and
    the count of each op; the gradients are cleared afterwards."""
    model.train()
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FORMULAS) as counter:
        loss, _ = loss_fn(model, batch)
        loss.backward()
    model.zero_grad(set_to_none=True)
    by_op = {str(op): int(n) for op, n in counter.get_flop_counts()["Global"].items()}
    return counter.get_total_flops(), by_op


def six_n_parameters(model: nn.Module, vocab_size: int, d_model: int) -> int:
    """N of 6·N·tokens: every parameter that multiplies activations (all but the
    embedding tables) plus one projection onto the vocabulary (each model here ties
    it to its token embeddings)."""
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    others = sum(p.numel() for p in model.parameters() if id(p) not in tables)
    return others + vocab_size * d_model


# ------------------------------------------------------------------- the workloads


@dataclass
class Workload:
    """One model's training step at its quick size: a builder (seeded), one batch,
    the loss the chapter trains with, and the tokens the step counts."""

    name: str
    build: Callable[[], nn.Module]
    batch: object
    loss_fn: LossFn
    tokens: int
    lr: float
    weight_decay: float
    shape: dict[str, object] = field(default_factory=dict)
    config: TransformerConfig | None = None


def random_ids(
    rows: int, length: int, vocab_size: int, generator: torch.Generator
) -> Tensor:
    """(rows, length) token ids drawn uniformly among the ordinary (non-special) ids."""
    return torch.randint(
        FIRST_ORDINARY_ID, vocab_size, (rows, length), generator=generator
    )


def seeded(make: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """``make`` after ``torch.manual_seed(0)``: each build has the same weights."""

    def build() -> nn.Module:
        torch.manual_seed(0)
        return make()

    return build


def gpt_workload(rows: int | None = None) -> Workload:
    """Chapter 2's GPT (``GPT_PROFILES["quick"]``, its vocabulary) on a batch of
    ``rows`` verses (default: the profile's batch size) of ``GPT_LENGTH`` tokens."""
    training = GPT_PROFILES["quick"]
    config = training.model.with_vocab(GPT_VOCAB_SIZES["quick"])
    rows = rows or training.batch_size
    generator = torch.Generator().manual_seed(0)
    batch = random_ids(rows, GPT_LENGTH, config.vocab_size, generator)
    return Workload(
        name="gpt",
        build=seeded(lambda: GPT(config)),
        batch=batch,
        loss_fn=lambda m, b: lm_loss(m, b, PAD_ID),
        tokens=rows * (GPT_LENGTH - 1),
        lr=training.lr,
        weight_decay=training.weight_decay,
        shape={"rows": rows, "length": GPT_LENGTH},
        config=config,
    )


class ReferenceGPT(nn.Module):
    """The plain reference: token and learned position embeddings, PyTorch's
    ``nn.TransformerEncoderLayer`` blocks (pre-LN, GELU, causal mask, batch first),
    a final LayerNorm and an output layer tied to the token embeddings; the sizes,
    dropout and initialisation of ``config``'s GPT."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        d = config.d_model
        self.token = nn.Embedding(config.vocab_size, d)
        self.position = nn.Embedding(config.max_len, d)
        self.dropout = nn.Dropout(config.dropout)
        layer = nn.TransformerEncoderLayer(
            d,
            config.num_heads,
            config.d_ff,
            config.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(
            layer, config.num_layers, norm=nn.LayerNorm(d), enable_nested_tensor=False
        )
        self.head = nn.Linear(d, config.vocab_size, bias=False)
        self.head.weight = self.token.weight
        self.apply(init_weights)

    def forward(self, ids: Tensor) -> Tensor:
        """Next-token logits (B, L, vocab) for ``ids`` (B, L)."""
        length = ids.shape[1]
        positions = torch.arange(length, device=ids.device)
        x = self.dropout(self.token(ids) + self.position(positions))
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=ids.device)
        return self.head(self.blocks(x, mask=mask, is_causal=True))


def reference_workload(gpt: Workload) -> Workload:
    """:class:`ReferenceGPT` on the GPT workload's batch, loss and budget."""
    config = gpt.config
    return Workload(
        name="gpt reference",
        build=seeded(lambda: ReferenceGPT(config)),
        batch=gpt.batch,
        loss_fn=gpt.loss_fn,
        tokens=gpt.tokens,
        lr=gpt.lr,
        weight_decay=gpt.weight_decay,
        shape=gpt.shape,
        config=config,
    )


def bert_workload(rows: int | None = None) -> Workload:
    """Chapter 3's BERT (``PRETRAINING["quick"]``) on a pre-training batch of ``rows``
    pairs (default: the profile's) of ``max_len`` tokens: sentences A and B half and
    half, 15% of the positions chosen for the MLM loss, random NSP labels."""
    pretraining = PRETRAINING["quick"]
    config = pretraining.model_config()
    rows = rows or pretraining.batch_size
    length = pretraining.model.max_len
    generator = torch.Generator().manual_seed(0)
    ids = random_ids(rows, length, config.vocab_size, generator)
    chosen = torch.rand(rows, length, generator=generator) < MLM_RATE
    chosen[:, 0] = False  # [CLS]
    chosen[0, 1] = True  # at least one MLM target
    batch = PretrainingBatch(
        ids=ids,
        segment_ids=(torch.arange(length) >= length // 2).long().expand(rows, -1),
        padding_mask=torch.zeros(rows, length, dtype=torch.bool),
        mlm_labels=torch.where(chosen, ids, torch.full_like(ids, -100)),
        nsp_labels=torch.randint(0, 2, (rows,), generator=generator),
    )
    return Workload(
        name="bert",
        build=seeded(lambda: BertModel(config)),
        batch=batch,
        loss_fn=lambda m, b: (pretraining_loss(m, b)[0], rows * length),
        tokens=rows * length,
        lr=pretraining.lr,
        weight_decay=0.01,  # pretrain()'s, train()'s default
        shape={"rows": rows, "length": length, "mlm_targets": int(chosen.sum())},
        config=config,
    )


def translator_workload(rows: int | None = None) -> Workload:
    """Chapter 4's encoder-decoder (``ch4.PROFILES["quick"].start``) on a batch of
    ``rows`` pairs (default: as many as its token budget holds) of
    ``TRANSLATOR_SOURCE_LENGTH`` source and ``TRANSLATOR_TARGET_LENGTH`` target tokens,
    with its label-smoothed MLE loss."""
    start = ch4.PROFILES["quick"].start
    config = start.model.with_vocab(start.vocab_size)
    rows = rows or start.mle_batch_tokens // TRANSLATOR_TARGET_LENGTH
    generator = torch.Generator().manual_seed(0)
    source = random_ids(rows, TRANSLATOR_SOURCE_LENGTH, config.vocab_size, generator)
    target = random_ids(rows, TRANSLATOR_TARGET_LENGTH, config.vocab_size, generator)
    smoothing = start.label_smoothing
    return Workload(
        name="encoder-decoder",
        build=seeded(lambda: translation.translator(start, start.vocab_size)),
        batch=(source, target),
        loss_fn=lambda m, b: mle_loss(m, b[0], b[1], PAD_ID, smoothing),
        tokens=rows * (TRANSLATOR_TARGET_LENGTH - 1),
        lr=start.mle_lr,
        weight_decay=0.01,  # train()'s default, as train_start uses
        shape={
            "rows": rows,
            "source_length": TRANSLATOR_SOURCE_LENGTH,
            "target_length": TRANSLATOR_TARGET_LENGTH,
        },
        config=config,
    )


# ------------------------------------------------------------------- measurements


def _train(
    model: nn.Module,
    workload: Workload,
    optimizer: torch.optim.Optimizer,
    steps: int,
    precision: str,
) -> TrainHistory:
    return train(
        model,
        itertools.repeat(workload.batch),
        workload.loss_fn,
        max_steps=steps,
        lr=workload.lr,
        warmup_steps=0,
        weight_decay=workload.weight_decay,
        optimizer=optimizer,
        progress=False,
        description=workload.name,
        precision=precision,
    )


def time_training(
    workload: Workload,
    precision: str,
    steps: int | None,
    warmup: int,
    seconds: float,
) -> dict:
    """Train a fresh model of ``workload`` with ``lmpg_utils.training.train`` in
    ``precision``: ``warmup`` steps, then ``steps`` timed ones (None: as many as
    fill about ``seconds``, at least 3, estimated from the warm-up). Returns steps,
    seconds, seconds per step and tokens/s."""
    model = workload.build()
    optimizer = make_optimizer(model, workload.lr, workload.weight_decay)
    warm = _train(model, workload, optimizer, warmup, precision)
    if steps is None:
        per_step = warm.seconds / warmup
        steps = max(3, min(1000, math.ceil(seconds / max(per_step, 1e-6))))
    history = _train(model, workload, optimizer, steps, precision)
    return {
        "steps": steps,
        "seconds": history.seconds,
        "s_per_step": history.seconds / steps,
        "tokens_per_s": workload.tokens * steps / history.seconds,
    }


def profile_training(workload: Workload, precision: str, steps: int) -> dict:
    """``torch.profiler`` over ``steps`` training steps of ``workload`` in
    ``precision`` (after one warm-up step): the key-averages table by self CPU time
    (top 12) and the same rows as data."""
    from torch.profiler import ProfilerActivity, profile

    model = workload.build()
    optimizer = make_optimizer(model, workload.lr, workload.weight_decay)
    _train(model, workload, optimizer, 1, precision)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _train(model, workload, optimizer, steps, precision)
    averages = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in averages) or 1.0
    ranked = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)
    top = [
        {
            "op": e.key,
            "calls": e.count,
            "self_cpu_ms": e.self_cpu_time_total / 1e3,
            "share": e.self_cpu_time_total / total,
        }
        for e in ranked[:12]
    ]
    table = averages.table(
        sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=48
    )
    return {
        "model": workload.name,
        "precision": precision,
        "steps": steps,
        "top_ops": top,
        "table": table,
    }


def measure_model(
    workload: Workload,
    peaks: dict[str, dict],
    steps: int | None,
    warmup: int,
    seconds: float,
) -> dict:
    """FLOPs per step (counted, and 6·N·tokens) and, in each precision with a
    measured peak, the training throughput, achieved FLOP/s and MFU of ``workload``;
    a precision without a peak gets ``{"skipped": reason}``."""
    model = workload.build()
    flops, by_op = count_training_flops(model, workload.loss_fn, workload.batch)
    config = workload.config
    n = six_n_parameters(model, config.vocab_size, config.d_model)
    result: dict = {
        "shape": workload.shape,
        "sizes": {
            k: getattr(config, k)
            for k in ("d_model", "num_heads", "num_layers", "d_ff", "vocab_size")
        },
        "parameters": sum(p.numel() for p in model.parameters()),
        "tokens_per_step": workload.tokens,
        "flops_per_step": flops,
        "flops_by_op": by_op,
        "six_n": n,
        "six_n_tokens": 6 * n * workload.tokens,
        "flops_over_six_n_tokens": flops / (6 * n * workload.tokens),
        "precisions": {},
    }
    del model
    for precision in PRECISIONS:
        peak = peaks[precision]
        if "skipped" in peak:
            result["precisions"][precision] = {"skipped": peak["skipped"]}
            continue
        row = time_training(workload, precision, steps, warmup, seconds)
        row["flops_per_s"] = flops * row["tokens_per_s"] / workload.tokens
        row["mfu"] = row["flops_per_s"] / peak["flops_per_s"]
        result["precisions"][precision] = row
    rows = result["precisions"]
    result["bf16_speedup"] = (
        rows["bf16"]["tokens_per_s"] / rows["fp32"]["tokens_per_s"]
        if "tokens_per_s" in rows.get("bf16", {})
        else None
    )
    return result


# ---------------------------------------------------------------------- reporting


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def best_precision(result: dict) -> tuple[str, float] | None:
    """The precision that trains fastest (the most tokens/s: the one a reader would
    choose), and its MFU against that precision's own peak (None: none measured)."""
    measured = {p: r for p, r in result["precisions"].items() if "mfu" in r}
    if not measured:
        return None
    name = max(measured, key=lambda p: measured[p]["tokens_per_s"])
    return name, measured[name]["mfu"]


def print_table(results: dict) -> None:
    """One fixed-width row per model and precision."""
    header = (
        f"{'model':<17}{'prec':<6}{'steps':>6}{'s/step':>9}{'tokens/s':>11}"
        f"{'GFLOP/step':>12}{'GFLOP/s':>10}{'peak GF/s':>11}{'MFU':>8}"
    )
    print(header)
    print("-" * len(header))
    entries = [(name, results["models"][name]) for name in MODELS]
    entries.insert(1, ("gpt reference", results["models"]["gpt"]["reference"]))
    for name, result in entries:
        for precision, row in result["precisions"].items():
            if "skipped" in row:
                print(f"{name:<17}{precision:<6}  skipped: {row['skipped']}")
                continue
            peak = results["peak"][precision]["flops_per_s"]
            print(
                f"{name:<17}{precision:<6}{row['steps']:>6}{row['s_per_step']:>9.3f}"
                f"{row['tokens_per_s']:>11.0f}{result['flops_per_step'] / 1e9:>12.2f}"
                f"{row['flops_per_s'] / 1e9:>10.1f}{peak / 1e9:>11.1f}"
                f"{row['mfu']:>8.1%}"
            )


def summary_line(name: str, result: dict) -> str:
    """Counted FLOPs against 6·N·tokens, the best MFU and the bf16 speed-up."""
    text = (
        f"{name}: {result['flops_per_step'] / 1e9:.2f} GFLOP/step counted, "
        f"6N·tokens {result['six_n_tokens'] / 1e9:.2f} "
        f"(x{result['flops_over_six_n_tokens']:.2f}, N={result['six_n'] / 1e6:.2f}M, "
        f"{result['tokens_per_step']} tokens)"
    )
    best = best_precision(result)
    if best is not None:
        text += f"; best MFU {best[1]:.1%} in {best[0]}"
    if result["bf16_speedup"] is not None:
        text += f"; bf16/fp32 tokens/s {result['bf16_speedup']:.2f}x"
    return text


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    """Measure, print the report (and write ``--json``); always returns 0."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="timed training steps per measurement (default: about --seconds' worth)",
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=6.0,
        help="target seconds per measurement when --steps is not given",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra-op threads (default: LMPG_THREADS, else every core)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny run for tests: 2 steps, batches of 2 rows, a small probe",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write JSON here")
    args = parser.parse_args(argv)

    threads = runtime.set_threads(args.threads)
    allocator = runtime.tune_allocator()  # as the chapters' runs (runtime.resolve)
    runtime.set_seed(0)
    if args.quick:
        steps, warmup, rows, probe, repeats = 2, 1, 2, (256,), 2
        profile_steps = 1
    else:
        steps, warmup, rows, probe, repeats = args.steps, 2, None, (1024, 2048), 5
        profile_steps = 3
    print(
        f"cpu={cpu_name()} threads={threads} torch={torch.__version__} "
        f"allocator={allocator}"
        + (" (--quick: the numbers mean nothing)" if args.quick else "")
    )

    peaks: dict[str, dict] = {"fp32": matmul_peak(torch.float32, probe, repeats)}
    reason = bf16_unsupported()
    if reason is None:
        peaks["bf16"] = matmul_peak(torch.bfloat16, probe, repeats)
        if peaks["bf16"]["flops_per_s"] < peaks["fp32"]["flops_per_s"]:
            peaks["bf16"]["note"] = "bf16 matmuls slower than fp32 (emulated?)"
    else:
        peaks["bf16"] = {"skipped": reason}
    for precision, peak in peaks.items():
        if "skipped" in peak:
            print(f"matmul peak {precision}: skipped ({peak['skipped']})")
        else:
            sizes = ", ".join(f"{n}: {f / 1e9:.1f}" for n, f in peak["by_size"].items())
            print(
                f"matmul peak {precision}: {peak['flops_per_s'] / 1e9:.1f} GFLOP/s "
                f"(n = {sizes} GFLOP/s){' ' + peak['note'] if 'note' in peak else ''}"
            )

    gpt = gpt_workload(rows)
    workloads = {
        "gpt": gpt,
        "bert": bert_workload(rows),
        "encoder-decoder": translator_workload(rows),
    }
    measured = {}
    for name, workload in workloads.items():
        measured[name] = measure_model(workload, peaks, steps, warmup, args.seconds)
    reference = measure_model(
        reference_workload(gpt), peaks, steps, warmup, args.seconds
    )
    for precision, row in reference["precisions"].items():
        ours = measured["gpt"]["precisions"][precision]
        if "tokens_per_s" in row:
            row["ours_over_reference"] = ours["tokens_per_s"] / row["tokens_per_s"]
    measured["gpt"]["reference"] = reference

    results: dict = {
        "environment": {
            "cpu": cpu_name(),
            "threads": threads,
            "torch": torch.__version__,
            "allocator": allocator,
            "quick": args.quick,
        },
        "peak": peaks,
        "models": measured,
    }
    print()
    print_table(results)
    print()
    for name in MODELS:
        print(summary_line(name, measured[name]))
    ratios = ", ".join(
        f"{p} {r['ours_over_reference']:.2f}x"
        for p, r in reference["precisions"].items()
        if "ours_over_reference" in r
    )
    print(f"gpt / nn.TransformerEncoderLayer reference, tokens/s: {ratios}")

    best = best_precision(measured["gpt"])
    met = best is not None and best[1] >= GOAL_MFU
    results["goal"] = {
        "model": "gpt",
        "target_mfu": GOAL_MFU,
        "precision": best[0] if best else None,
        "mfu": best[1] if best else None,
        "met": met,
    }
    if best is not None:
        print(
            f"goal: GPT training MFU {best[1]:.1%} in {best[0]} "
            f"(goal >= {GOAL_MFU:.0%}): {'met' if met else 'NOT met'}"
        )
    results["profile"] = None
    if best is not None and not met:
        print(f"\nwhere the GPT's time goes ({best[0]}, {profile_steps} steps):")
        results["profile"] = profile_training(gpt, best[0], profile_steps)
        print(results["profile"]["table"])

    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
