"""Data-parallel training (``torchrun``, DistributedDataParallel) on CPU with gloo: the
same optimisation as one process, the sharding of a batch, and chapter 2's GPT run end
to end under ``torch.distributed.run``."""

from __future__ import annotations

import dataclasses
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
from lmpg_utils.policy_gradient import (
    ESTIMATORS,
    Decoding,
    Rollout,
    clipped_ratio_loss,
    policy_update_loop,
    reinforce_loss,
)
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


def _hidden_loss(m: GPT, batch: tuple) -> tuple[torch.Tensor, int]:
    """The LM loss of ``batch[0]`` through the model's methods (as BERT's loss and
    chapter 5's policy use theirs); ``batch[1]`` lists each row's index."""
    ids, indices = batch
    assert len(indices) == len(ids)
    logits = m.head(m.hidden_states(ids[:, :-1]))
    gold = ids[:, 1:]
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), gold.reshape(-1), ignore_index=PAD
    )
    return loss, int((gold != PAD).sum())


def _train_tuples(world: World) -> tuple[GPT, object]:
    model = _tiny_gpt()
    history = train(
        model,
        iter([(b, list(range(len(b)))) for b in _batches()]),
        _hidden_loss,
        max_steps=STEPS,
        lr=0.5,
        warmup_steps=1,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9),
        progress=False,
        world=world,
    )
    return model, history


#: the policy-gradient updates compared: (estimator, loss, epochs, loss items)
PG_VARIANTS = {
    # a sequence-level loss and the moving average of the global batch's rewards
    "reinforce": ("moving-average", "reinforce", 1),
    # PPO's clipped loss, averaged over tokens (unequal counts on the two ranks), and
    # two passes over each rollout
    "clipped": ("group-normalized", "clipped", 2),
}
SOURCES, SAMPLES, LENGTH = 4, 3, 6


def _fixed_rollout() -> Rollout:
    """Every source's SAMPLES continuations with their rewards and sampling-time
    log-probabilities: what a sampler would return, fixed so that one process and two
    see the same samples. Sources 0-1 (rank 0's) earn less than 2-3 (rank 1's)."""
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, 12, (SOURCES * SAMPLES, LENGTH), generator=generator)
    tokens[:, 0] = 1
    lengths = torch.randint(1, LENGTH, (SOURCES * SAMPLES,), generator=generator)
    mask = torch.arange(LENGTH - 1)[None, :] < lengths[:, None]
    rewards = torch.rand(SOURCES, SAMPLES, generator=generator)
    rewards += torch.arange(SOURCES)[:, None].float()
    old = -torch.rand(SOURCES * SAMPLES, LENGTH - 1, generator=generator) - 1.0
    return Rollout(
        tokens=tokens,
        src=tokens[:, :1],
        rewards=rewards,
        greedy_rewards=None,
        log_probs=torch.where(mask, old, 0.0),
        mask=mask,
        decoding=Decoding(SAMPLES, LENGTH, bos_id=1, eos_id=2, pad_id=PAD),
    )


def _token_log_probs(m: GPT, roll: Rollout) -> torch.Tensor:
    logits = m.head(m.hidden_states(roll.tokens[:, :-1]))
    chosen = torch.log_softmax(logits, -1).gather(-1, roll.tokens[:, 1:, None])
    return torch.where(roll.mask, chosen.squeeze(-1), 0.0)


def _policy_updates(world: World, name: str) -> tuple[GPT, object]:
    """Three updates of the tiny GPT on :func:`_fixed_rollout`'s samples, over the
    sources in three orders, each rank sampling only its own."""
    estimator_name, kind, epochs = PG_VARIANTS[name]
    model = _tiny_gpt()
    fixed = _fixed_rollout()

    def loss_fn(m, batch, roll, advantages):
        log_probs = _token_log_probs(m, roll)
        if kind == "reinforce":
            value = reinforce_loss(log_probs.sum(1).view(-1, SAMPLES), advantages)
        else:
            value = clipped_ratio_loss(
                log_probs, roll.log_probs, advantages.reshape(-1), roll.mask
            )
        return value, {"loss": value.detach()}

    orders = [torch.arange(SOURCES), torch.tensor([3, 1, 0, 2]), torch.arange(SOURCES)]
    history = policy_update_loop(
        model,
        iter(orders),
        lambda m, batch, times: fixed.select(batch),
        ESTIMATORS[estimator_name],
        loss_fn,
        torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9),
        steps=len(orders),
        evaluate=lambda m: 0.0,
        eval_every=1,
        epochs=epochs,
        world=world,
        loss_items=(lambda roll: float(roll.mask.sum())) if kind == "clipped" else None,
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
        # a tuple batch and a loss that calls the model's methods, not its forward
        tupled = _train_tuples(world)
        results["tuples"] = {"state": tupled[0].state_dict(), "items": tupled[1].items}
        for name in PG_VARIANTS:
            model, history = _policy_updates(world, name)
            results[name] = {
                "state": model.state_dict(),
                "train_reward": history.train_reward,
                "grad_norm": history.grad_norm,
                "extra": history.extra,
            }
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


def test_a_tuple_batch_and_a_loss_through_methods_train_as_one(two_ranks):
    single, history = _train_tuples(SINGLE)
    for rank in two_ranks:
        assert _max_difference(rank["tuples"]["state"], single.state_dict()) < 1e-6
        assert rank["tuples"]["items"] == history.items


@pytest.mark.parametrize("name", PG_VARIANTS)
def test_a_policy_gradient_update_on_two_processes_is_the_update_on_one(
    two_ranks, name
):
    single, history = _policy_updates(SINGLE, name)
    for rank in two_ranks:
        assert _max_difference(rank[name]["state"], single.state_dict()) < 1e-6
        assert rank[name]["train_reward"] == pytest.approx(history.train_reward)
        assert rank[name]["grad_norm"] == pytest.approx(history.grad_norm, rel=1e-5)
        assert rank[name]["extra"]["loss"] == pytest.approx(
            history.extra["loss"], rel=1e-5, abs=1e-5
        )
    # the update moved the weights far more than the tolerance
    assert _max_difference(single.state_dict(), _tiny_gpt().state_dict()) > 1e-2


def test_a_rank_that_averaged_its_own_rewards_would_differ():
    """The check above can fail: rank 0's sources alone give another moving average,
    and so other weights, than the global batch's."""
    fixed = _fixed_rollout()
    own = fixed.select(torch.tensor([0, 1])).rewards.mean()
    assert abs(float(own) - float(fixed.rewards.mean())) > 0.5


@dataclasses.dataclass
class _Pairs:
    ids: torch.Tensor
    labels: torch.Tensor
    device: str


def test_shard_splits_structures_row_by_row():
    batch = (torch.arange(10).reshape(5, 2), [10, 11, 12, 13, 14], "name")
    first, second = (distributed.shard(batch, World(rank=r, size=2)) for r in (0, 1))
    assert first[0].tolist() == [[0, 1], [2, 3], [4, 5]] and first[1] == [10, 11, 12]
    assert second[1] == [13, 14] and second[2] == "name"
    pairs = _Pairs(torch.arange(5), torch.arange(5) * 2, device="cpu")
    part = distributed.shard(pairs, World(rank=1, size=3))
    assert part.ids.tolist() == [2, 3] and part.labels.tolist() == [4, 6]
    assert part.device == "cpu"
    with pytest.raises(ValueError, match=r"row counts \[3, 4\]"):
        distributed.count_rows((torch.zeros(3), [1, 2, 3, 4]))


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


def test_chapter_1s_run_says_it_is_not_distributed():
    module = cli.experiment_module("lm")
    with pytest.raises(NotImplementedError, match="not yet distributed"):
        module.run(
            module.PROFILES["quick"], seed=0, device="cpu", world=World(0, size=2)
        )


def _torchrun(experiment: str = "gpt") -> tuple[subprocess.CompletedProcess, dict]:
    """``run EXPERIMENT`` with the tiny settings under ``torch.distributed.run`` on two
    CPU processes; the process and its one summary."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(_free_port()), "-m", "lmpg_utils", "run", experiment,
         "--device", "cpu", "--threads", "1", "--profile", "quick",
         *[arg for setting in TINY[experiment] for arg in ("--set", setting)]],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, done.stdout  # rank 0 alone prints
    return done, json.loads(lines[0])


def test_gpt_runs_under_torchrun_on_two_processes(empty_model_cache):
    _, summary = _torchrun()
    assert set(configs.SUMMARY_KEYS) <= set(summary)
    assert summary["world_size"] == 2 and summary["experiment"] == "gpt"
    assert summary["steps"] == 4 and not summary["cached"]
    assert len(list(empty_model_cache.glob("ch2-gpt-*.pt"))) == 1
    # again: rank 0 finds it in the cache and sends it to rank 1
    _, again = _torchrun()
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


@pytest.mark.parametrize("experiment", ["pg", "rlhf"])
def test_policy_gradient_runs_under_torchrun_on_two_processes(
    empty_model_cache, experiment
):
    """Chapter 4 (the translator's MLE start, policy gradient and the continued-MLE
    control) and chapter 5 (the GPT and BERT data-parallel, the judges trained by rank
    0 alone, the fine-tuning data-parallel) end to end on two processes."""
    _, summary = _torchrun(experiment)
    assert summary["world_size"] == 2 and summary["experiment"] == experiment
    saved: dict[str, int] = {}
    for path in empty_model_cache.glob("*.pt"):
        kind = "-".join(path.name.split("-")[:2])
        saved[kind] = saved.get(kind, 0) + 1
    expected = {
        "pg": {"ch4-mle": 2},  # the start and its weak snapshot
        "rlhf": {"ch2-gpt": 1, "ch3-bert": 1, "ch5-judge": 2},
    }
    assert saved == expected[experiment]
