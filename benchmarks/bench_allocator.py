"""Speed report for ``runtime.tune_allocator`` (run with ``make benchmark``; a report, exits 0).

Chapter 4's translator (quick configuration, real verse batches, bf16 autocast as in
its one-time training) trains for a fixed number of updates in fresh processes, with
glibc's default allocator settings and with ``runtime.tune_allocator()``, alternating
the two so that a change in the machine's speed hits both. It prints tokens/s, the
minor page faults and the CPU seconds spent in the kernel, and the ratio of the
medians. The allocator is a per-process setting, hence the child processes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = """
import json, resource, sys
from lmpg_utils import runtime, translation
from lmpg_utils.experiments import ch4_policy_gradient as ch4
from lmpg_utils.training import train
from lmpg_utils.translation import EncodedPairs, mle_loss, train_tokenizer

tuned, steps = sys.argv[1] == "tuned", int(sys.argv[2])
runtime.set_threads()
if tuned:
    runtime.tune_allocator()
start = ch4.PROFILES["quick"].start
pairs = translation.load_pairs(start)["train"]
tokenizer = train_tokenizer(pairs, start.vocab_size)
data = EncodedPairs.build(tokenizer, pairs, max_tokens=start.max_tokens)
model = translation.translator(start, len(tokenizer))
batches = data.token_batches(start.mle_batch_tokens, runtime.set_seed(0))
pad = tokenizer.pad_id
before = resource.getrusage(resource.RUSAGE_SELF)
history = train(model, batches, lambda m, b: mle_loss(m, b[0], b[1], pad, 0.1), max_steps=steps,
                lr=start.mle_lr, warmup_steps=10, decay="linear", precision=start.mle_precision,
                progress=False, description="benchmark")
after = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"tokens_per_second": history.items_per_second,
                  "page_faults": after.ru_minflt - before.ru_minflt,
                  "kernel_seconds": after.ru_stime - before.ru_stime,
                  "allocator": runtime.describe()["allocator"]}))
"""


def measure(tuned: bool, steps: int) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, "tuned" if tuned else "default", str(steps)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="updates per measurement")
    parser.add_argument(
        "--rounds", type=int, default=2, help="alternating default/tuned pairs"
    )
    args = parser.parse_args(argv)
    runs: dict[str, list[dict]] = {"default": [], "tuned": []}
    for _ in range(args.rounds):
        for name in runs:
            runs[name].append(measure(name == "tuned", args.steps))
            last = runs[name][-1]
            print(
                f"  {name:8s} {last['tokens_per_second']:7.0f} tokens/s, {last['page_faults']:>9,} page faults, "
                f"{last['kernel_seconds']:5.1f} s in the kernel ({last['allocator']})",
                flush=True,
            )
    median = {
        name: statistics.median(r["tokens_per_second"] for r in rs)
        for name, rs in runs.items()
    }
    print(
        f"translator training, {args.steps} updates: tune_allocator / default = "
        f"{median['tuned'] / median['default']:.2f}x tokens/s (medians of {args.rounds})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
