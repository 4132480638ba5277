"""Command line: ``python -m lmpg_utils data``, ``python -m lmpg_utils models`` and
``python -m lmpg_utils run EXPERIMENT``."""

from __future__ import annotations

import argparse
import json
import os
import sys

from . import corpora


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmpg_utils", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    data = commands.add_parser(
        "data", help="report (and with --install, install) the corpora"
    )
    data.add_argument(
        "--install",
        action="store_true",
        help="apt-get install missing Debian data packages when root",
    )

    models = commands.add_parser(
        "models",
        help="train, once per code version, the models the chapters reuse (loads them when cached)",
    )
    models.add_argument("--profile", choices=("quick", "full"), default=None)
    models.add_argument(
        "--seed", type=int, default=None, help="default: LMPG_SEED, else 0"
    )

    run = commands.add_parser(
        "run", help="run a chapter's main experiment; the last line printed is JSON"
    )
    run.add_argument("experiment", choices=sorted(EXPERIMENTS))
    run.add_argument("--profile", choices=("quick", "full"), default=None)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument(
        "--device",
        default=None,
        help="cpu, cuda, cuda:1, ... (default: cuda if present)",
    )
    run.add_argument(
        "--threads", type=int, default=None, help="CPU threads (default: every core)"
    )
    run.add_argument(
        "--estimator",
        default="leave-one-out",
        help="policy-gradient baseline (run pg only)",
    )

    args = parser.parse_args(argv)
    if args.command == "data":
        if args.install:
            try:
                installed = corpora.ensure_debian_packages(auto_install=True)
            except corpora.DataMissingError as error:
                print(error, file=sys.stderr)
                return 1
            for name, done in installed.items():
                if done:
                    print(f"installed Debian package {name}")
        return corpora.data_report()
    if args.command == "models":
        seed = (
            args.seed
            if args.seed is not None
            else int(os.environ.get("LMPG_SEED", "0"))
        )
        for name, seconds in train_models(args.profile, seed).items():
            print(f"{name}: {seconds:.0f} s")
        return 0
    if args.experiment == "pg":
        from .policy_gradient import ESTIMATORS

        if args.estimator not in ESTIMATORS:
            parser.error(
                f"unknown --estimator {args.estimator!r}; choose one of: {', '.join(ESTIMATORS)}"
            )
    from . import runtime

    # resolved once, here: the device, then the profile it implies, then the threads
    try:
        device = runtime.get_device(args.device)
        if args.threads is not None and args.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {args.threads}")
    except ValueError as error:
        parser.error(str(error))
    args.profile = runtime.get_profile(args.profile, device)
    args.device = str(device)
    runtime.set_threads(args.threads)
    runtime.tune_allocator()
    result = EXPERIMENTS[args.experiment](args)
    print(json.dumps(result, sort_keys=True))
    return 0


def train_models(profile: str | None, seed: int) -> dict[str, float]:
    """Train (or load) chapter 1's LSTMs, chapter 2's GPT, chapter 3's BERT and chapter 4's
    translator with every core, one after another, so that the notebooks only load them.
    Returns the seconds each step took."""
    import time

    from . import runtime
    from .experiments import bert, gpt, language_models, policy_gradient

    runtime.set_threads()
    runtime.tune_allocator()
    seconds = {}
    steps = {
        "chapter 1 LSTM and cloze models": lambda: language_models.run_language_models(
            profile=profile, seed=seed
        ),
        "chapter 2 GPT": lambda: gpt.run_gpt(profile=profile, seed=seed),
        "chapter 3 BERT": lambda: bert.run_bert(profile=profile, seed=seed),
        "chapter 4 translator (MLE start)": lambda: policy_gradient.prepare(
            policy_gradient.get_config(profile), progress=True
        ),
    }
    for name, step in steps.items():
        began = time.perf_counter()
        step()
        seconds[name] = time.perf_counter() - began
        print(f"{name}: ready after {seconds[name]:.0f} s", file=sys.stderr, flush=True)
    return seconds


def _run_language_models(args: argparse.Namespace) -> dict:
    from .experiments.language_models import run_language_models

    return run_language_models(
        profile=args.profile, seed=args.seed, device=args.device
    ).summary()


def _run_policy_gradient(args: argparse.Namespace) -> dict:
    from .experiments.policy_gradient import run_policy_gradient
    from .policy_gradient import check_estimator

    check_estimator(args.estimator)
    return run_policy_gradient(
        args.estimator, profile=args.profile, seed=args.seed, device=args.device
    ).summary()


def _run_gpt(args: argparse.Namespace) -> dict:
    from .experiments.gpt import run_gpt

    return run_gpt(profile=args.profile, seed=args.seed, device=args.device).summary()


def _run_bert(args: argparse.Namespace) -> dict:
    from .experiments.bert import run_bert

    return run_bert(profile=args.profile, seed=args.seed, device=args.device).summary()


EXPERIMENTS = {
    "lm": _run_language_models,
    "bert": _run_bert,
    "gpt": _run_gpt,
    "pg": _run_policy_gradient,
}

if __name__ == "__main__":
    sys.exit(main())
