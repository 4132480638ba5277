"""Speed report for chapter 2 (run with ``make benchmark``; it is a report, it always exits 0).

1. The package's ``MultiHeadAttention`` (forward + backward, causal self-attention)
   against a bare reference with the same four projections that calls
   ``F.scaled_dot_product_attention`` directly, and against ``nn.MultiheadAttention``.
   Goal: ours / bare reference <= 1.15.
2. Generating 256 tokens for a batch of 8 with the KV cache against re-running the
   whole prefix at every step. Goal: the cache at least 3x faster.
3. Training throughput (tokens/s) of the chapter's GPT (quick configuration) on real
   batches of the World English Bible.

Timings use ``torch.utils.benchmark.Timer`` (warm-up, then repeated measurement; the
median is reported). On a shared machine the numbers are noisy; the ratios matter.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.benchmark import Timer

from lmpg_utils import runtime
from lmpg_utils.attention import MultiHeadAttention
from lmpg_utils.generation import generate
from lmpg_utils.transformer import GPT

ATTENTION_GOAL = 1.15
CACHE_GOAL = 3.0


class BareAttention(nn.Module):
    """The reference: four projections and one call of PyTorch's fused attention, no checks."""

    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
            nn.Linear(d_model, d_model) for _ in range(4)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, d_model = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, self.heads, d_model // self.heads).transpose(
                1, 2
            )

        out = F.scaled_dot_product_attention(
            split(self.q_proj(x)),
            split(self.k_proj(x)),
            split(self.v_proj(x)),
            is_causal=True,
        )
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, d_model))


def median_seconds(fn, min_run_time: float) -> float:
    fn()  # warm-up
    return (
        Timer(stmt="fn()", globals={"fn": fn})
        .blocked_autorange(min_run_time=min_run_time)
        .median
    )


def bench_attention(
    device: torch.device, sizes: list[tuple[int, int, int, int]], min_run_time: float
) -> list[dict]:
    rows = []
    for batch, length, d_model, heads in sizes:
        ours = MultiHeadAttention(d_model, heads).to(device)
        bare = BareAttention(d_model, heads).to(device)
        bare.load_state_dict(ours.state_dict())
        torch_mha = nn.MultiheadAttention(d_model, heads, batch_first=True).to(device)
        causal = torch.ones(length, length, dtype=torch.bool, device=device).triu(
            1
        )  # True = blocked (PyTorch)
        x = torch.randn(batch, length, d_model, device=device, requires_grad=True)
        with torch.no_grad():
            assert torch.allclose(ours(x, is_causal=True)[0], bare(x), atol=1e-4), (
                "ours and the reference disagree"
            )

        # default arguments bind this iteration's modules and input
        def run_ours(ours=ours, x=x):
            ours(x, is_causal=True)[0].sum().backward()

        def run_bare(bare=bare, x=x):
            bare(x).sum().backward()

        def run_torch(torch_mha=torch_mha, x=x, causal=causal):
            torch_mha(x, x, x, attn_mask=causal, need_weights=False, is_causal=True)[
                0
            ].sum().backward()

        t_ours = median_seconds(run_ours, min_run_time)
        t_bare = median_seconds(run_bare, min_run_time)
        t_torch = median_seconds(run_torch, min_run_time)
        rows.append(
            {
                "size": f"B={batch} L={length} d={d_model} h={heads}",
                "ours_ms": 1e3 * t_ours,
                "bare_ms": 1e3 * t_bare,
                "torch_mha_ms": 1e3 * t_torch,
                "ours/bare": t_ours / t_bare,
                "ours/torch_mha": t_ours / t_torch,
            }
        )
    return rows


def bench_generation(device: torch.device, new_tokens: int, batch: int) -> dict:
    from lmpg_utils.experiments.ch2_gpt import PROFILES

    model_config = PROFILES["quick"].gpt.model.with_vocab(6000)
    model_config.max_len = max(model_config.max_len, new_tokens + 1)
    model = GPT(model_config).to(device).eval()
    prompt = torch.full((batch, 1), 2, device=device)
    timings = {}
    outputs = {}
    for use_cache in (True, False):
        generate(model, prompt, 8, temperature=0, use_cache=use_cache)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        outputs[use_cache] = generate(
            model, prompt, new_tokens, temperature=0, use_cache=use_cache
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
        timings[use_cache] = time.perf_counter() - began
    same = bool(torch.equal(outputs[True], outputs[False]))
    return {
        "tokens": new_tokens,
        "batch": batch,
        "cache_s": timings[True],
        "no_cache_s": timings[False],
        "speed-up": timings[False] / timings[True],
        "same_tokens": same,
    }


def bench_training(device: torch.device, steps: int) -> dict:
    from lmpg_utils.experiments.ch2_gpt import PROFILES
    from lmpg_utils.language_modeling import all_windows, lm_loss, word_data
    from lmpg_utils.training import bucketed_batches, train

    config = PROFILES["quick"].gpt
    data = word_data(PROFILES["quick"].vocab_size)
    generator = runtime.set_seed(0)
    model = GPT(config.model.with_vocab(len(data.vocab))).to(device)
    batches = (
        b.to(device)
        for b in bucketed_batches(
            all_windows(data.train, data.vocab, config.model.max_len),
            config.batch_size,
            data.vocab.pad_id,
            generator,
        )
    )
    loss_fn = lambda m, b: lm_loss(m, b, data.vocab.pad_id)  # noqa: E731
    train(model, batches, loss_fn, max_steps=3, lr=config.lr, progress=False)  # warm-up
    history = train(
        model,
        batches,
        loss_fn,
        max_steps=steps,
        lr=config.lr,
        warmup_steps=1,
        progress=False,
    )
    return {
        "steps": steps,
        "batch_size": config.batch_size,
        "tokens_per_s": history.items_per_second,
        "s_per_step": history.seconds / steps,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default=None)
    parser.add_argument(
        "--min-run-time",
        type=float,
        default=1.0,
        help="seconds of measurement per timing",
    )
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--train-steps", type=int, default=20)
    args = parser.parse_args(argv)
    device = runtime.get_device(args.device)
    runtime.set_seed(0)
    print(
        f"device={device} threads={torch.get_num_threads()} torch={torch.__version__}"
    )

    print(
        "\n1) multi-head attention, causal self-attention, forward + backward (median)"
    )
    rows = bench_attention(
        device, [(16, 128, 256, 4), (8, 256, 512, 8)], args.min_run_time
    )
    print(
        f"{'size':<26}{'ours ms':>10}{'bare ms':>10}{'nn.MHA ms':>11}{'ours/bare':>11}{'ours/nn.MHA':>13}"
    )
    for r in rows:
        print(
            f"{r['size']:<26}{r['ours_ms']:>10.2f}{r['bare_ms']:>10.2f}{r['torch_mha_ms']:>11.2f}{r['ours/bare']:>11.3f}{r['ours/torch_mha']:>13.3f}"
        )
    worst = max(r["ours/bare"] for r in rows)
    print(
        f"worst ours/bare = {worst:.3f} (goal <= {ATTENTION_GOAL}): {'met' if worst <= ATTENTION_GOAL else 'NOT met'}"
    )

    print(f"\n2) generation of {args.new_tokens} tokens, batch 8, chapter-2 GPT size")
    g = bench_generation(device, args.new_tokens, 8)
    print(
        f"with KV cache {g['cache_s']:.2f} s, recomputing the prefix {g['no_cache_s']:.2f} s, "
        f"speed-up {g['speed-up']:.1f}x (goal >= {CACHE_GOAL}x): "
        f"{'met' if g['speed-up'] >= CACHE_GOAL else 'NOT met'}; "
        f"identical greedy tokens: {g['same_tokens']}"
    )

    print(
        "\n3) training throughput of the chapter-2 GPT (quick configuration, real batches)"
    )
    t = bench_training(device, args.train_steps)
    print(
        f"{t['tokens_per_s']:.0f} tokens/s ({t['s_per_step']:.3f} s/step, batch {t['batch_size']} verses)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
