"""Command line: ``python -m lmpg_utils data`` and ``python -m lmpg_utils run EXPERIMENT``."""

from __future__ import annotations

import argparse
import json
import sys

from . import corpora


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmpg_utils", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    data = commands.add_parser("data", help="report (and with --install, install) the corpora")
    data.add_argument("--install", action="store_true", help="apt-get install missing Debian data packages when root")

    run = commands.add_parser("run", help="run a chapter's main experiment; the last line printed is JSON")
    run.add_argument("experiment", choices=sorted(EXPERIMENTS))
    run.add_argument("--profile", choices=("quick", "full"), default=None)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--estimator", default="leave-one-out", help="policy-gradient baseline (run pg only)")

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
    if args.experiment == "pg":
        from .policy_gradient import ESTIMATORS

        if args.estimator not in ESTIMATORS:
            parser.error(f"unknown --estimator {args.estimator!r}; choose one of: {', '.join(ESTIMATORS)}")
    result = EXPERIMENTS[args.experiment](args)
    print(json.dumps(result, sort_keys=True))
    return 0


def _run_language_models(args: argparse.Namespace) -> dict:
    from .experiments.language_models import run_language_models

    return run_language_models(profile=args.profile, seed=args.seed).summary()


def _run_policy_gradient(args: argparse.Namespace) -> dict:
    from .experiments.policy_gradient import run_policy_gradient
    from .policy_gradient import check_estimator

    check_estimator(args.estimator)
    return run_policy_gradient(args.estimator, profile=args.profile, seed=args.seed).summary()


def _run_gpt(args: argparse.Namespace) -> dict:
    from .experiments.gpt import run_gpt

    return run_gpt(profile=args.profile, seed=args.seed).summary()


def _run_bert(args: argparse.Namespace) -> dict:
    from . import runtime
    from .experiments.bert import run_bert

    runtime.set_threads()
    return run_bert(profile=args.profile, seed=args.seed).summary()


EXPERIMENTS = {
    "lm": _run_language_models,
    "bert": _run_bert,
    "gpt": _run_gpt,
    "pg": _run_policy_gradient,
}

if __name__ == "__main__":
    sys.exit(main())
