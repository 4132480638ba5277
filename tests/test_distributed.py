"""Data-parallel training (``torchrun``, DistributedDataParallel) on CPU with gloo: the
same optimisation as one process, the sharding of a batch, and chapter 2's GPT run end
to end under ``torch.distributed.run``."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from tiny_configs import TINY

from lmpg_utils import __main__ as cli
from lmpg_utils import configs, distributed, runtime
from lmpg_utils import language_modeling as lm
from lmpg_utils.distributed import SINGLE, World
from lmpg_utils.experiments import ch2_gpt
from lmpg_utils.language_modeling import lm_loss
from lmpg_utils.training import train
from lmpg_utils.transformer import GPT, TransformerConfig

PAD = 0
STEPS = 3


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _batches() -> list[torch.Tensor]:
    """Three padded batches whose rows hold different numbers of real tokens: 4 rows
    (even shards of unequal token counts), 3 rows (uneven shards) and 1 row (fewer rows
    than processes: one rank computes a stand-in weighed zero)."""
    rows = [
        [[1, 5, 6, 7, 8, 9, 3, 4, 2], [1, 9, 2], [1, 4, 4, 5, 6, 2], [1, 2]],
        [[1, 7, 8, 2], [1, 3, 3, 3, 3, 3, 3, 2], [1, 6, 2]],
        [[1, 5, 9, 8, 7, 2]],
    ]
    width = max(len(r) for batch in rows for r in batch)
    return [
        torch.tensor([r + [PAD] * (width - len(r)) for r in batch]) for batch in rows
    ]


def _tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(
        TransformerConfig(
            vocab_size=12,
            d_model=16,
            num_heads=2,
            num_layers=1,
            d_ff=32,
            max_len=16,
            dropout=0.0,
        )
    )


def _train(
    world: World, naive: bool = False, adamw: bool = False, **options
) -> tuple[GPT, object]:
    """``STEPS`` updates of the tiny GPT on :func:`_batches`, with SGD and momentum
    (``adamw``: ``train``'s own AdamW). ``naive``: each rank's plain mean, averaged over
    the ranks (every rank claims one item)."""
    model = _tiny_gpt()
    if not adamw:
        options["optimizer"] = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)

    def loss_fn(m, batch):
        loss, items = lm_loss(m, batch, PAD)
        return loss, 1 if naive else items

    history = train(
        model,
        iter(_batches()),
        loss_fn,
        max_steps=STEPS,
        lr=0.02,
        warmup_steps=1,
        eval_fn=lambda m: float(lm_loss(m, _batches()[0], PAD)[0]),
        eval_every=2,
        progress=False,
        world=world,
        **options,
    )
    return model, history


def _worker(rank: int, size: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    world = World(rank=rank, size=size, local_rank=rank)
    distributed.start(world, torch.device("cpu"))
    try:
        results = {}
        for variant in ("scaled", "naive", "adamw"):
            model, history = _train(
                world, naive=variant == "naive", adamw=variant == "adamw"
            )
            results[variant] = {
                "state": model.state_dict(),
                "losses": history.losses,
                "items": history.items,
                "eval": history.eval_values,
            }
        # rank 0's clock decides when the time is up: rank 1 alone would go on
        _, history = _train(world, time_budget_s=0.0 if rank == 0 else 1e9)
        results["budget_steps"] = len(history.steps)
        try:
            train(
                _tiny_gpt(),
                iter([(b, b) for b in _batches()]),
                lambda m, b: lm_loss(m, b[0], PAD),
                max_steps=1,
                lr=0.01,
                progress=False,
                world=world,
            )
        except TypeError as error:
            results["type_error"] = str(error)
        results["from_main"] = distributed.from_main(
            {"rank": rank, "tensor": torch.arange(3) * (rank + 1)}, world
        )
        results["sum"] = distributed.all_sum(rank + 1, world)
        results["any"] = distributed.any_true(rank == 1, world)
        torch.manual_seed(0)
        with distributed.rank_generators(world):
            results["draw_within"] = torch.rand(3)
        results["draw_after"] = torch.rand(3)
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        distributed.close(world)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    """What :func:`_worker` reports from each of two gloo processes."""
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _max_difference(first: dict, second: dict) -> float:
    return max(float((first[k] - second[k]).abs().max()) for k in first)


def test_two_processes_train_exactly_as_one(two_ranks):
    single, history = _train(SINGLE)
    state = single.state_dict()
    for rank in two_ranks:
        scaled = rank["scaled"]
        assert _max_difference(scaled["state"], state) < 1e-6
        assert scaled["items"] == history.items == 16 + 12 + 5  # all targets
        assert scaled["losses"] == pytest.approx(history.losses, rel=1e-6)
        assert scaled["eval"] == pytest.approx(history.eval_values, rel=1e-6)
    # every rank holds the same weights
    assert _max_difference(two_ranks[0]["scaled"]["state"], two_ranks[1]["scaled"]["state"]) == 0  # fmt: skip


def test_two_processes_train_as_one_with_adamw(two_ranks):
    """With AdamW too, except the attention's key bias: its gradient is zero in exact
    arithmetic (a softmax ignores a shift shared by all its scores), so what remains is
    rounding noise of about 1e-9, which Adam divides by its own size, into steps of
    about the learning rate that differ between any two ways of summing the same
    numbers."""
    single, _ = _train(SINGLE, adamw=True)
    state, distributed_state = single.state_dict(), two_ranks[0]["adamw"]["state"]
    keys = [k for k in state if not k.endswith("k_proj.bias")]
    assert len(keys) == len(state) - 1
    assert (
        _max_difference(
            {k: state[k] for k in keys}, {k: distributed_state[k] for k in keys}
        )
        < 1e-6
    )


def test_without_the_item_weights_two_processes_would_not_match(two_ranks):
    single, _ = _train(SINGLE)
    naive = two_ranks[0]["naive"]["state"]
    assert _max_difference(naive, single.state_dict()) > 1e-3


def test_the_ranks_agree_on_stopping_and_share_values(two_ranks):
    first, second = two_ranks
    # each rank its own dropout masks while training, one shared stream after
    assert not torch.equal(first["draw_within"], second["draw_within"])
    assert torch.equal(first["draw_after"], second["draw_after"])
    for rank in two_ranks:
        assert rank["budget_steps"] == 1  # rank 0's budget ended it for both
        assert rank["from_main"]["rank"] == 0
        assert rank["from_main"]["tensor"].tolist() == [0, 1, 2]
        assert rank["sum"] == 3 and rank["any"] is True
        assert (
            "tuple" in rank["type_error"]
            and "not yet distributed" in (rank["type_error"])
        )


def test_shard_splits_rows_in_order_and_names_the_sizes():
    batch = torch.arange(14).reshape(7, 2)
    parts = [distributed.shard(batch, World(rank=r, size=3)) for r in range(3)]
    assert [len(p) for p in parts] == [3, 2, 2]
    assert torch.equal(torch.cat(parts), batch)
    assert distributed.shard(batch, SINGLE) is batch
    with pytest.raises(ValueError, match="batch of 2 rows cannot be split over 3"):
        distributed.shard(batch[:2], World(rank=0, size=3))
    distributed.check_divisible(64, World(rank=0, size=4))
    with pytest.raises(ValueError, match=r"gpt.batch_size=6 .* processes \(4\)"):
        distributed.check_divisible(6, World(rank=0, size=4), "gpt.batch_size")
    with pytest.raises(ValueError, match="rank must be in"):
        World(rank=2, size=2)
    assert SINGLE.is_main and not World(rank=1, size=2).is_main
    assert distributed.all_sum(2.5, SINGLE) == 2.5
    assert distributed.wrap(model := _tiny_gpt(), SINGLE) is model


def test_resolve_reads_what_torchrun_sets(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert runtime.detect_world() == (SINGLE, 1)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert runtime.detect_world() == (World(rank=3, size=4, local_rank=1), 2)
    monkeypatch.setenv("RANK", "many")
    with pytest.raises(ValueError, match="RANK must be an integer"):
        runtime.detect_world()
    monkeypatch.delenv("LMPG_THREADS", raising=False)
    before = torch.get_num_threads()
    try:  # the cores are shared among the processes of one machine
        assert runtime.set_threads(share=2) == max(1, (os.cpu_count() or 1) // 2)
        assert runtime.set_threads(1, share=2) == 1
    finally:
        torch.set_num_threads(before)
    monkeypatch.setenv("WORLD_SIZE", "1")
    run = runtime.resolve(device="cpu", threads=before)
    assert run.world is SINGLE and runtime.describe(run)["world_size"] == 1


@pytest.mark.parametrize("name", [n for n in cli.EXPERIMENTS if n != "gpt"])
def test_experiments_not_yet_distributed_say_so(name):
    module = cli.experiment_module(name)
    two = World(rank=0, size=2)
    for function in (module.run, module.prepare_models):
        with pytest.raises(NotImplementedError, match="not yet distributed"):
            function(module.PROFILES["quick"], seed=0, device="cpu", world=two)


def _torchrun_gpt() -> tuple[subprocess.CompletedProcess, dict]:
    """``run gpt`` with the tiny settings under ``torch.distributed.run`` on two CPU
    processes; the process and its one summary."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(_free_port()), "-m", "lmpg_utils", "run", "gpt",
         "--device", "cpu", "--threads", "1", "--profile", "quick",
         *[arg for setting in TINY["gpt"] for arg in ("--set", setting)]],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, done.stdout  # rank 0 alone prints
    return done, json.loads(lines[0])


def test_gpt_runs_under_torchrun_on_two_processes(empty_model_cache):
    _, summary = _torchrun_gpt()
    assert set(configs.SUMMARY_KEYS) <= set(summary)
    assert summary["world_size"] == 2 and summary["experiment"] == "gpt"
    assert summary["steps"] == 4 and not summary["cached"]
    assert len(list(empty_model_cache.glob("ch2-gpt-*.pt"))) == 1
    # again: rank 0 finds it in the cache and sends it to rank 1
    _, again = _torchrun_gpt()
    assert again["cached"] and again["test_perplexity"] == summary["test_perplexity"]
    # the key does not hold the number of processes: one process finds this model
    tiny = configs.apply_overrides(ch2_gpt.PROFILES["quick"], TINY["gpt"])
    loaded = ch2_gpt.run(tiny, seed=0, device="cpu", progress=False)
    assert loaded.cached and loaded.world_size == 1
    assert loaded.test_perplexity == pytest.approx(summary["test_perplexity"])
    assert len(list(empty_model_cache.glob("ch2-gpt-*.pt"))) == 1
    data = lm.word_data(tiny.vocab_size)
    with pytest.raises(ValueError, match=r"gpt.batch_size=8 is not divisible .*\(3\)"):
        lm.train_gpt(tiny.gpt, data, seed=0, device="cpu", world=World(0, 3))
