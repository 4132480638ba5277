"""The training loop, the learning-rate schedule, the optimizer groups and checkpoints."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmpg_utils.training import (
    load_checkpoint,
    make_optimizer,
    save_checkpoint,
    train,
    warmup_cosine,
)
from lmpg_utils.transformer import GPT, TransformerConfig


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_warmup_cosine_shape():
    factor = warmup_cosine(10, 110, min_ratio=0.1)
    assert (
        math.isclose(factor(0), 0.1)
        and math.isclose(factor(4), 0.5)
        and math.isclose(factor(9), 1.0)
    )
    assert math.isclose(factor(10), 1.0)
    assert math.isclose(factor(60), 0.55)  # half-way through the decay
    assert math.isclose(factor(110), 0.1) and math.isclose(factor(500), 0.1)
    values = [factor(s) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(values))
    with pytest.raises(ValueError, match="warmup_steps >= 0 and total_steps > 0"):
        warmup_cosine(-1, 10)


def test_make_optimizer_decays_matrices_only():
    model = GPT(
        TransformerConfig(
            vocab_size=20, d_model=16, num_heads=2, num_layers=1, d_ff=32, max_len=8
        )
    )
    optimizer = make_optimizer(model, lr=1e-3, weight_decay=0.1)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(
        p.dim() < 2 for p in no_decay["params"]
    )
    # the tied embedding appears once
    total = len(decay["params"]) + len(no_decay["params"])
    assert total == len(list(model.parameters()))
    with pytest.raises(ValueError, match="learning rate must be positive"):
        make_optimizer(model, lr=0.0)


def _copy_task():
    """A tiny GPT learning to repeat a fixed pattern: loss must fall far below log(vocab)."""
    config = TransformerConfig(
        vocab_size=12,
        d_model=32,
        num_heads=2,
        num_layers=1,
        d_ff=64,
        max_len=16,
        dropout=0.0,
    )
    model = GPT(config)
    pattern = torch.tensor([4, 5, 6, 7, 8, 9, 10, 11] * 2)
    batches = itertools.repeat(pattern.expand(8, 16))

    def loss_fn(m, batch):
        logits = m(batch[:, :-1])
        return F.cross_entropy(logits.reshape(-1, 12), batch[:, 1:].reshape(-1)), batch[
            :, 1:
        ].numel()

    return model, batches, loss_fn


def test_train_learns_and_records_history():
    model, batches, loss_fn = _copy_task()
    evaluations = []

    def eval_fn(m):
        assert not m.training
        evaluations.append(1)
        return float(loss_fn(m, next(batches))[0])

    history = train(
        model,
        batches,
        loss_fn,
        max_steps=30,
        lr=1e-2,
        warmup_steps=5,
        eval_fn=eval_fn,
        eval_every=10,
        progress=False,
    )
    assert history.steps == list(range(1, 31))
    assert history.losses[0] > 2.0 and history.losses[-1] < 0.3
    assert history.eval_steps == [10, 20, 30] and len(evaluations) == 3
    assert history.eval_values[-1] < 0.3
    assert history.items == 30 * 8 * 15 and history.items_per_second > 0
    assert not model.training


def test_train_clips_gradients():
    model = nn.Linear(4, 1, bias=False)
    seen = []

    class Spy(torch.optim.SGD):
        def step(self, closure=None):
            seen.append(float(model.weight.grad.norm()))
            return super().step(closure)

    def loss_fn(m, batch):
        return 1000.0 * m(batch).sum(), 1

    optimizer = Spy(model.parameters(), lr=1e-6)
    train(
        model,
        itertools.repeat(torch.ones(2, 4)),
        loss_fn,
        max_steps=3,
        lr=1e-6,
        warmup_steps=0,
        clip_norm=0.5,
        optimizer=optimizer,
        progress=False,
    )
    assert all(n <= 0.5 + 1e-6 for n in seen)


def test_train_time_budget_stops_early_and_eval_runs_at_the_end():
    model, batches, loss_fn = _copy_task()
    history = train(
        model,
        batches,
        loss_fn,
        max_steps=10_000,
        lr=1e-3,
        time_budget_s=0.0,
        eval_fn=lambda m: 1.0,
        progress=False,
    )
    assert len(history.steps) == 1
    assert history.eval_steps == [1]


def test_train_rejects_bad_settings_and_non_finite_loss():
    model, batches, loss_fn = _copy_task()
    with pytest.raises(ValueError, match="max_steps must be positive"):
        train(model, batches, loss_fn, max_steps=0, lr=1e-3)
    with pytest.raises(FloatingPointError, match="loss became nan at step 1"):
        train(
            model,
            batches,
            lambda m, b: (torch.tensor(float("nan"), requires_grad=True), 1),
            max_steps=2,
            lr=1e-3,
            progress=False,
        )


def test_checkpoint_round_trip_is_weights_only(tmp_path):
    config = TransformerConfig(
        vocab_size=20, d_model=16, num_heads=2, num_layers=1, d_ff=32, max_len=8
    )
    model = GPT(config)
    path = save_checkpoint(
        tmp_path / "sub" / "gpt.pt", model, config.to_dict(), extra={"val_loss": 1.5}
    )
    assert path.is_file() and not path.with_suffix(".pt.tmp").exists()
    data = load_checkpoint(path)
    assert data["extra"] == {"val_loss": 1.5}
    restored = GPT(TransformerConfig(**data["config"]))
    restored.load_state_dict(data["state_dict"])
    ids = torch.randint(0, 20, (2, 6))
    model.eval(), restored.eval()
    assert torch.equal(model(ids), restored(ids))
    # the file holds only tensors and plain data: the safe loader accepts it
    torch.load(path, weights_only=True)


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an lmpg checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    # arbitrary Python objects are refused by the safe loader
    torch.save({"state_dict": {}, "config": Fraction(1, 3)}, tmp_path / "evil.pt")
    with pytest.raises(
        Exception, match="[Ww]eights only load failed|Unsupported global"
    ):
        load_checkpoint(tmp_path / "evil.pt")


def test_warmup_decay_linear_and_constant():
    from lmpg_utils.training import warmup_decay

    linear = warmup_decay(10, 110, "linear")
    assert linear(0) == pytest.approx(0.1) and linear(9) == pytest.approx(1.0)
    assert (
        linear(60) == pytest.approx(0.5) and linear(110) == 0.0 and linear(500) == 0.0
    )
    constant = warmup_decay(0, 5, "constant")
    assert constant(0) == constant(1000) == 1.0
    with pytest.raises(ValueError, match="unknown decay"):
        warmup_decay(1, 10, "step")


def test_average_states_is_the_elementwise_mean():
    from lmpg_utils.training import average_states

    a = {"w": torch.tensor([1.0, 3.0]), "n": torch.tensor(7)}
    b = {"w": torch.tensor([3.0, 5.0]), "n": torch.tensor(7)}
    mean = average_states([a, b])
    assert torch.equal(mean["w"], torch.tensor([2.0, 4.0])) and mean["n"].item() == 7
    with pytest.raises(ValueError, match="different keys"):
        average_states([a, {"w": a["w"]}])
    with pytest.raises(ValueError, match="no states"):
        average_states([])


def test_train_bf16_autocast_learns_and_keeps_fp32_weights():
    torch.manual_seed(0)
    model = nn.Linear(8, 1)
    x = torch.randn(256, 8)
    y = x @ torch.randn(8, 1)
    batches = iter(lambda: (x, y), None)
    seen = []

    def loss_fn(m, batch):
        out = m(batch[0])
        seen.append(out.dtype)
        return ((out.float() - batch[1]) ** 2).mean(), len(batch[0])

    steps = []
    history = train(
        model,
        batches,
        loss_fn,
        max_steps=150,
        lr=0.05,
        warmup_steps=5,
        precision="bf16",
        decay="linear",
        progress=False,
        on_step=lambda step, m: steps.append(step),
    )
    assert seen[0] == torch.bfloat16 and model.weight.dtype == torch.float32
    assert history.losses[-1] < 0.05 * history.losses[0]
    assert steps == list(range(1, 151))
    with pytest.raises(ValueError, match="precision"):
        train(
            model,
            batches,
            loss_fn,
            max_steps=1,
            lr=0.1,
            precision="fp8",
            progress=False,
        )
