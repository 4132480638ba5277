"""bf16 autocast against fp32 at equal steps: speed and quality (not in ``make test``).

For chapter 2's GPT and chapter 4's translator at their ``quick`` sizes, on real data,
from the same seed: train ``--steps`` updates in fp32 and in bf16 autocast (weights,
gradients and AdamW state stay fp32), then report the training seconds, their ratio,
and the validation loss of each (the GPT's mean NLL per word of the validation verses
it evaluates during training; the translator's teacher-forced NLL per target token
of the validation verses, without label smoothing). bf16 passes when its loss is at
most ``--tolerance`` nats above fp32's (default 0.02: a fifth of the spread of the
GPT's fp32 validation loss over seeds 0-2, 0.11); lower is better, not a failure.

    python benchmarks/bench_precision.py --model translator --steps 800

The full-budget GPT figures of the book (3,000 steps) come from
``python -m lmpg_utils run gpt --seed S --set gpt.precision=bf16`` against the same
command in fp32. Run on an idle machine: the ratio is a wall-clock ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from lmpg_utils import language_modeling as lm
from lmpg_utils import translation
from lmpg_utils.experiments import ch4_policy_gradient as ch4


def gpt_run(precision: str, steps: int, seed: int) -> dict[str, float]:
    """Train the quick GPT for ``steps`` in ``precision``; its final validation NLL."""
    training = dataclasses.replace(
        lm.GPT_PROFILES["quick"], steps=steps, precision=precision
    )
    data = lm.word_data(lm.GPT_VOCAB_SIZES["quick"])
    _, history = lm.train_gpt(
        training, data, seed=seed, device=torch.device("cpu"), progress=False
    )
    return {"seconds": history.seconds, "valid_nll": history.eval_values[-1]}


def translator_run(precision: str, steps: int, seed: int) -> dict[str, float]:
    """Train the quick translator's MLE start for ``steps`` in ``precision``; its
    teacher-forced validation NLL."""
    start = dataclasses.replace(
        ch4.PROFILES["quick"].start,
        mle_steps=steps,
        weak_step=min(ch4.PROFILES["quick"].weak_step, steps - 1),
        mle_precision=precision,
        seed=seed,
    )
    splits = translation.load_pairs(start)
    tokenizer = translation.train_tokenizer(splits["train"], start.vocab_size)
    encoded = {
        name: translation.EncodedPairs.build(tokenizer, pairs, start.max_tokens)
        for name, pairs in splits.items()
    }
    began = time.perf_counter()
    state, _, record = translation.train_start(
        start, tokenizer, encoded["train"], torch.device("cpu")
    )
    seconds = time.perf_counter() - began
    model = translation.translator(start, len(tokenizer), state).eval()
    stats = translation.teacher_forced_stats(model, encoded["valid"])
    return {"seconds": seconds, "valid_nll": stats["nll"]}


RUNS = {"gpt": gpt_run, "translator": translator_run}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(RUNS), default="translator")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tolerance", type=float, default=0.02)
    args = parser.parse_args()
    results = {p: RUNS[args.model](p, args.steps, args.seed) for p in ("fp32", "bf16")}
    gap = results["bf16"]["valid_nll"] - results["fp32"]["valid_nll"]
    speedup = results["fp32"]["seconds"] / results["bf16"]["seconds"]
    print(
        json.dumps(
            {
                "model": args.model,
                "steps": args.steps,
                "seed": args.seed,
                "threads": torch.get_num_threads(),
                **{f"{p}_{k}": v for p, r in results.items() for k, v in r.items()},
                "bf16_minus_fp32_nll": gap,
                "bf16_speedup": speedup,
                "tolerance": args.tolerance,
                "bf16_within_tolerance": gap <= args.tolerance,
            },
            sort_keys=True,
        )
    )


if __name__ == "__main__":
    main()
