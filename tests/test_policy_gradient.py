"""REINFORCE estimators: baselines, surrogate loss, bad input, and unbiasedness on an enumerable policy."""

import pytest
import torch

from lmpg_utils.policy_gradient import (
    ESTIMATORS,
    MovingAverage,
    TabularSequencePolicy,
    baseline,
    check_estimator,
    leave_one_out_baseline,
    reinforce_loss,
)


def test_leave_one_out_values_and_k_check():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 6.0]])
    expected = torch.tensor([[2.5, 2.0, 1.5], [3.0, 3.0, 0.0]])
    assert torch.allclose(leave_one_out_baseline(rewards), expected)
    with pytest.raises(ValueError, match="K=2"):
        leave_one_out_baseline(torch.tensor([[1.0], [2.0]]))


def test_baselines_per_estimator():
    rewards = torch.tensor([[0.2, 0.4], [0.6, 0.8]])
    greedy = torch.tensor([0.5, 0.1])
    assert torch.equal(baseline("none", rewards), torch.zeros_like(rewards))
    assert torch.allclose(
        baseline("self-critical", rewards, greedy),
        torch.tensor([[0.5, 0.5], [0.1, 0.1]]),
    )
    average = MovingAverage(beta=0.5)
    assert torch.equal(
        baseline("moving-average", rewards, moving_average=average),
        torch.zeros_like(rewards),
    )
    average.update(rewards)  # first value: the batch mean 0.5
    average.update(torch.full((2, 2), 1.0))  # 0.5 * 0.5 + 0.5 * 1.0
    assert average.value == pytest.approx(0.75)
    assert torch.allclose(
        baseline("moving-average", rewards, moving_average=average),
        torch.full((2, 2), 0.75),
    )
    with pytest.raises(ValueError, match="greedy_rewards"):
        baseline("self-critical", rewards)
    with pytest.raises(ValueError, match="unknown estimator"):
        check_estimator("ppo")
    assert set(ESTIMATORS) == {
        "none",
        "moving-average",
        "self-critical",
        "leave-one-out",
    }


def test_nan_rewards_rejected():
    rewards = torch.tensor([[0.1, float("nan")]])
    with pytest.raises(ValueError, match="NaN"):
        baseline("leave-one-out", rewards)
    with pytest.raises(ValueError, match="NaN"):
        reinforce_loss(torch.zeros(1, 2), rewards, torch.zeros(1, 2))


def test_surrogate_gradient_and_equal_rewards():
    logits = torch.zeros(2, 3, requires_grad=True)
    logp = torch.log_softmax(logits, -1)[:, :2]  # pretend two samples per source
    rewards = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    loss = reinforce_loss(logp, rewards, leave_one_out_baseline(rewards))
    loss.backward()
    # advantage (+1, -1) on source 0: the gradient raises sample 0 and lowers sample 1
    assert logits.grad[0, 0] < 0 < logits.grad[0, 1]
    # source 1 has equal rewards: zero advantage, zero gradient, no NaN
    assert torch.equal(logits.grad[1], torch.zeros(3))
    logits.grad = None
    equal = torch.full((2, 2), 0.3)
    loss = reinforce_loss(
        torch.log_softmax(logits, -1)[:, :2], equal, leave_one_out_baseline(equal)
    )
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.equal(logits.grad, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="shapes differ"):
        reinforce_loss(torch.zeros(2, 2), torch.zeros(2, 3), torch.zeros(2, 3))


def _reward(seqs):
    # reward the number of 2s, plus a bonus for starting with 0: depends on the whole sequence
    return (seqs == 2).sum(1).double() + (seqs[:, 0] == 0).double()


@pytest.mark.parametrize("estimator", ["none", "leave-one-out"])
def test_toy_reinforce_is_unbiased(estimator):
    g = torch.Generator().manual_seed(0)
    policy = TabularSequencePolicy(vocab=3, length=3, generator=g)
    value, exact = policy.exact_gradient(_reward)
    assert 0.0 < value < 4.0
    estimates = policy.reinforce_estimates(
        _reward,
        samples_per_estimate=8,
        estimates=4000,
        estimator=estimator,
        generator=g,
    )
    mean = estimates.mean(0)
    se = estimates.std(0) / estimates.shape[0] ** 0.5
    z = (mean - exact.flatten()).abs() / se.clamp_min(1e-12)
    assert float(z.max()) < 5.0
    # a wrong estimator (reward without the score function's centring) is detectably biased
    wrong = (
        policy.score_function(policy.sample(4000, g)).flatten(1).clamp_min(0).mean(0)
    )
    assert float(((wrong - exact.flatten()).abs() / se.clamp_min(1e-12)).max()) > 5.0


def test_score_function_matches_autograd():
    policy = TabularSequencePolicy(
        vocab=3, length=2, generator=torch.Generator().manual_seed(3)
    )
    seqs = policy.all_sequences()
    closed = policy.score_function(seqs)
    for i in range(seqs.shape[0]):
        theta = policy.theta.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(
            policy.log_prob(seqs[i : i + 1], theta).sum(), theta
        )
        assert torch.allclose(grad, closed[i])


def test_baseline_lowers_toy_variance():
    g = torch.Generator().manual_seed(1)
    policy = TabularSequencePolicy(vocab=3, length=3, generator=g)

    def reward(s):
        return _reward(s) + 5.0  # a large constant offset is what a baseline removes

    plain = policy.reinforce_estimates(reward, 8, 2000, "none", g).var(0).sum()
    loo = policy.reinforce_estimates(reward, 8, 2000, "leave-one-out", g).var(0).sum()
    assert float(loo) < 0.5 * float(plain)
    with pytest.raises(ValueError):
        policy.reinforce_estimates(reward, 8, 10, "self-critical", g)


def test_experiment_config_and_bad_estimator():
    from lmpg_utils.experiments.policy_gradient import (
        QUICK,
        PGConfig,
        run_policy_gradient,
    )

    with pytest.raises(ValueError, match="weak_step"):
        PGConfig(mle_steps=10, weak_step=10)
    with pytest.raises(ValueError, match="mle_mix"):
        PGConfig(mle_mix=-1.0)
    with pytest.raises(ValueError, match="length_penalty"):
        PGConfig(length_penalty=-0.1)
    with pytest.raises(ValueError, match="token budgets"):
        PGConfig(mle_batch_tokens=10)
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        PGConfig(pg_precision="fp16")
    # the MLE start's cache key ignores fine-tuning settings but not model settings
    assert (
        PGConfig(pg_lr=0.5).start_key()
        == QUICK.start_key()
        != PGConfig(d_model=64).start_key()
    )
    with pytest.raises(ValueError, match="unknown estimator"):
        run_policy_gradient("greedy")


def test_cli_rejects_unknown_estimator(capsys):
    from lmpg_utils.__main__ import main

    with pytest.raises(SystemExit):
        main(["run", "pg", "--estimator", "ppo"])
    assert (
        "none, moving-average, self-critical, leave-one-out" in capsys.readouterr().err
    )


def test_tiny_translation_experiment_end_to_end(tmp_path, monkeypatch):
    """A tiny config trained from scratch on the real verse pairs: start (cached), PG, the
    equal-time control; nothing is loaded from a cache the test did not write."""
    import dataclasses
    import shutil

    from lmpg_utils import caching, corpora
    from lmpg_utils.experiments import policy_gradient as pgx

    corpora.load_verse_pairs("train", 8)  # parse the Bibles into the normal cache first
    for parsed in caching.cache_dir().glob(
        "*.json"
    ):  # reuse the parsed corpora, never a trained model
        shutil.copy(parsed, tmp_path)
    monkeypatch.setenv("LMPG_CACHE_DIR", str(tmp_path))
    tiny = dataclasses.replace(
        pgx.QUICK,
        train_words=6,
        eval_words=6,
        vocab_size=300,
        d_model=32,
        num_heads=2,
        num_layers=1,
        d_ff=64,
        max_tokens=24,
        mle_steps=12,
        mle_batch_tokens=400,
        mle_warmup=2,
        weak_step=4,
        average_last=2,
        max_len=12,
        pg_steps=2,
        pg_batch=4,
        samples=2,
        eval_every=1,
        valid_sources=8,
        control_batch_tokens=400,
    )
    setup = pgx.prepare(tiny, device="cpu")
    assert setup.device == torch.device("cpu")
    assert not setup.cached and len(setup.mle_history["losses"]) == tiny.mle_steps
    assert setup.mle_history["averaged_steps"] == [11, 12]  # evenly over the last fifth
    again = pgx.prepare(tiny)
    assert again.cached
    assert all(
        torch.equal(again.start_state[k], v) for k, v in setup.start_state.items()
    )
    model, history = pgx.fine_tune(setup, "leave-one-out", tiny.pg_steps, seed=0)
    assert history.steps == [0, 1, 2] and len(history.valid_reward) == 3
    # every run from the start begins at the start's expected reward, computed once
    start_reward = pgx.expected_reward(setup.new_model(), setup)
    assert history.valid_reward[0] == setup.start_reward() == start_reward
    assert set(setup._start_rewards) == {"start"}
    weak_reward = pgx.expected_reward(setup.new_model(setup.weak_state), setup)
    assert setup.start_reward(setup.weak_state) == weak_reward
    assert history.valid_reward[-1] == pgx.expected_reward(
        model, setup
    )  # the end, fresh
    # another reward on the same start: its own start reward, the original's memo untouched
    plain = setup.with_config(length_penalty=0.0)
    assert plain.config.length_penalty == 0.0 and plain.start_state is setup.start_state
    assert plain.start_reward() == pgx.expected_reward(plain.new_model(), plain)
    assert setup.start_reward() == start_reward and set(setup._start_rewards) == {
        "start",
        "weak",
    }
    with pytest.raises(ValueError, match="d_model define the cached start"):
        setup.with_config(d_model=64)
    control, control_history = pgx.continue_mle(
        setup, seconds=max(history.total_seconds, 0.5), seed=0
    )
    assert control_history.valid_reward[0] == start_reward
    assert control_history.steps[-1] >= 1
    assert control_history.total_seconds >= max(history.total_seconds, 0.5)
    result = pgx.evaluate(model, setup, "valid")
    assert 0.0 <= result.bleu <= 100.0 and len(result.hypotheses) == len(setup.valid)
    # the whole run on the given setup: its config and its device
    summary = pgx.run_policy_gradient(setup=setup).summary()
    assert summary["device"] == "cpu" and summary["pg_steps"] == tiny.pg_steps
