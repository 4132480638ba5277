"""Command line: ``python -m lmpg_utils data``, ``python -m lmpg_utils models`` and
``python -m lmpg_utils run EXPERIMENT``.

Every experiment is run the same way (the contract in :mod:`lmpg_utils.configs`)::

    python -m lmpg_utils run pg --profile quick --device cpu --threads 2 --seed 0 \\
        --set estimator=self-critical --set pg_steps=10

and prints its summary as JSON on its last line. ``--show-config`` prints the
configuration the run would use, after ``--set``, and exits.

Under ``torchrun`` (``torchrun --nproc_per_node 4 -m lmpg_utils run gpt``) every
process runs the experiment data-parallel; rank 0 alone prints and shows progress.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from types import ModuleType
from typing import TYPE_CHECKING

from . import corpora

if TYPE_CHECKING:
    from . import runtime

#: command-line name -> module under ``lmpg_utils.experiments``; the one list of experiments
EXPERIMENTS: dict[str, str] = {
    "lm": "ch1_language_models",
    "gpt": "ch2_gpt",
    "bert": "ch3_bert",
    "pg": "ch4_policy_gradient",
    "rlhf": "ch5_rlhf",
}


def experiment_module(name: str) -> ModuleType:
    """The experiment module registered under command-line ``name``."""
    if name not in EXPERIMENTS:
        raise ValueError(
            f"unknown experiment {name!r}; choose one of: {', '.join(EXPERIMENTS)}"
        )
    return importlib.import_module(f"lmpg_utils.experiments.{EXPERIMENTS[name]}")


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--profile",
        choices=("quick", "full"),
        default=None,
        help="default: LMPG_PROFILE, else full on CUDA and quick on a CPU",
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="default: LMPG_SEED, else 0"
    )
    parser.add_argument(
        "--device",
        default=None,
        help="cpu, cuda, cuda:1, ... (default: LMPG_DEVICE, else cuda if present)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (default: LMPG_THREADS, else every core)",
    )
    parser.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default=None,
        help="what models set to auto train in (default: LMPG_PRECISION, else auto: "
        "bf16 where it is fast, a recent GPU or a CPU with AVX512-BF16, else fp32)",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lmpg_utils",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
        help="train, once per code version, the models the chapters reuse "
        "(loads them when cached)",
    )
    _add_run_options(models)

    run = commands.add_parser(
        "run", help="run a chapter's main experiment; the last line printed is JSON"
    )
    run.add_argument("experiment", choices=list(EXPERIMENTS))
    _add_run_options(run)
    run.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change one setting of the profile's Config (repeatable; nested as "
        "model.d_model=256)",
    )
    run.add_argument(
        "--show-config",
        action="store_true",
        help="print the configuration after --set and exit",
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

    from . import distributed, runtime

    # resolved once, here: device, then the profile it implies, threads, seed, allocator
    # (and, under torchrun, this process's place in the process group)
    try:
        if args.threads is not None and args.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {args.threads}")
        where = runtime.resolve(
            args.profile, args.device, args.threads, args.seed, args.precision
        )
    except ValueError as error:
        parser.error(str(error))
    try:
        return _run_command(parser, args, where)
    finally:
        distributed.close(where.world)


def _run_command(
    parser: argparse.ArgumentParser, args: argparse.Namespace, where: runtime.Run
) -> int:
    """The ``models`` and ``run`` commands on the resolved ``where``; only rank 0
    prints."""
    from . import configs

    main_rank = where.world.is_main
    if args.command == "models":
        for name, seconds in train_models(where).items():
            if main_rank:
                print(f"{name}: {seconds:.0f} s")
        return 0

    module = experiment_module(args.experiment)
    try:
        config = configs.apply_overrides(
            configs.profile_config(module.PROFILES, where.profile), args.settings
        )
    except ValueError as error:
        parser.error(str(error))
    if args.show_config:
        if main_rank:
            print(
                json.dumps(
                    configs.summary_header(
                        module.NAME, config, where.seed, where.device, 0.0
                    )["config"],
                    sort_keys=True,
                )
            )
        return 0
    result = module.run(
        config,
        seed=where.seed,
        device=where.device,
        progress=main_rank,
        world=where.world,
    )
    if main_rank:
        print(json.dumps(result.summary(), sort_keys=True))
    return 0


def train_models(where: runtime.Run) -> dict[str, float]:
    """Train (or load) every chapter's cached models, one chapter after another, so that
    the notebooks only load them. ``where`` is :func:`runtime.resolve`'s result.
    Returns the seconds each experiment module took, by module name."""
    seconds = {}
    for name in EXPERIMENTS:
        module = experiment_module(name)
        began = time.perf_counter()
        module.prepare_models(
            module.PROFILES[where.profile],
            seed=where.seed,
            device=where.device,
            progress=where.world.is_main,
            world=where.world,
        )
        seconds[EXPERIMENTS[name]] = time.perf_counter() - began
        if where.world.is_main:
            print(
                f"{EXPERIMENTS[name]}: ready after {seconds[EXPERIMENTS[name]]:.0f} s",
                file=sys.stderr,
                flush=True,
            )
    return seconds


if __name__ == "__main__":
    sys.exit(main())
