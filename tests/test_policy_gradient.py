"""Policy gradient parts: the REINFORCE baselines and loss, bad input, and unbiasedness on
an enumerable policy (the RLHF parts are tested in test_rlhf_parts.py)."""

import pytest
import torch

from lmpg_utils.policy_gradient import (
    ESTIMATORS,
    Decoding,
    MovingAverage,
    Rollout,
    TabularSequencePolicy,
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
    none, moving = ESTIMATORS["none"], ESTIMATORS["moving-average"]
    critical, loo = ESTIMATORS["self-critical"], ESTIMATORS["leave-one-out"]
    assert torch.equal(none.baseline(rewards), torch.zeros_like(rewards))
    assert torch.allclose(
        critical.baseline(rewards, greedy), torch.tensor([[0.5, 0.5], [0.1, 0.1]])
    )
    assert torch.equal(moving.baseline(rewards), torch.zeros_like(rewards))
    average = MovingAverage(beta=0.5)
    average.update(rewards)  # first value: the batch mean 0.5
    average.update(torch.full((2, 2), 1.0))  # 0.5 * 0.5 + 0.5 * 1.0
    assert average.value == pytest.approx(0.75)
    assert torch.allclose(
        moving.baseline(rewards, history=average.value), torch.full((2, 2), 0.75)
    )
    assert torch.allclose(
        loo.advantages(rewards), rewards - torch.tensor([[0.4, 0.2], [0.8, 0.6]])
    )
    with pytest.raises(ValueError, match="greedy_rewards"):
        critical.baseline(rewards)
    # each estimator declares what it needs; the registry is the one list of names
    assert [e for e, x in ESTIMATORS.items() if x.needs_greedy] == ["self-critical"]
    assert [e for e, x in ESTIMATORS.items() if x.needs_history] == ["moving-average"]
    assert [e for e, x in ESTIMATORS.items() if x.needs_values] == ["gae"]
    assert [e for e, x in ESTIMATORS.items() if x.token_level] == ["gae"]
    assert loo.min_samples == 2
    assert all(name == e.name for name, e in ESTIMATORS.items())
    assert list(ESTIMATORS) == [
        "none",
        "moving-average",
        "self-critical",
        "leave-one-out",
        "group-normalized",
        "group-mean",
        "gae",
    ]
    # a sequence-level estimator's rollout advantages are its advantages of the rewards
    roll = Rollout(
        tokens=torch.zeros(4, 2, dtype=torch.long),
        src=torch.zeros(4, 1, dtype=torch.long),
        rewards=rewards,
        greedy_rewards=greedy,
        log_probs=torch.zeros(4, 1),
        mask=torch.ones(4, 1, dtype=torch.bool),
        decoding=Decoding(samples=2, max_len=1, bos_id=0, eos_id=1, pad_id=2),
    )
    for name in ("self-critical", "leave-one-out", "group-normalized"):
        assert torch.equal(
            ESTIMATORS[name].rollout_advantages(roll),
            ESTIMATORS[name].advantages(rewards, greedy),
        )


def test_nan_rewards_rejected():
    rewards = torch.tensor([[0.1, float("nan")]])
    with pytest.raises(ValueError, match="NaN"):
        ESTIMATORS["leave-one-out"].baseline(rewards)
    with pytest.raises(ValueError, match="NaN"):
        reinforce_loss(torch.zeros(1, 2), rewards)


def test_surrogate_gradient_and_equal_rewards():
    logits = torch.zeros(2, 3, requires_grad=True)
    logp = torch.log_softmax(logits, -1)[:, :2]  # pretend two samples per source
    rewards = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    loss = reinforce_loss(logp, rewards - leave_one_out_baseline(rewards))
    loss.backward()
    # advantage (+1, -1) on source 0: the gradient raises sample 0 and lowers sample 1
    assert logits.grad[0, 0] < 0 < logits.grad[0, 1]
    # source 1 has equal rewards: zero advantage, zero gradient, no NaN
    assert torch.equal(logits.grad[1], torch.zeros(3))
    logits.grad = None
    equal = torch.full((2, 2), 0.3)
    loss = reinforce_loss(
        torch.log_softmax(logits, -1)[:, :2], equal - leave_one_out_baseline(equal)
    )
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.equal(logits.grad, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="shapes differ"):
        reinforce_loss(torch.zeros(2, 2), torch.zeros(2, 3))


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
        estimator=ESTIMATORS[estimator],
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

    plain = policy.reinforce_estimates(reward, 8, 2000, ESTIMATORS["none"], g)
    loo = policy.reinforce_estimates(reward, 8, 2000, ESTIMATORS["leave-one-out"], g)
    assert float(loo.var(0).sum()) < 0.5 * float(plain.var(0).sum())
    for name in ("self-critical", "moving-average"):  # the toy has no greedy or history
        with pytest.raises(ValueError, match="greedy decode or a training history"):
            policy.reinforce_estimates(reward, 8, 10, ESTIMATORS[name], g)
    with pytest.raises(ValueError, match="per token"):
        policy.reinforce_estimates(reward, 8, 10, ESTIMATORS["gae"], g)


def test_whiten_centres_and_scales_the_real_tokens_only():
    from lmpg_utils.policy_gradient import whiten

    values = torch.tensor([[1.0, 2.0, float("nan")], [3.0, 4.0, 5.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    out = whiten(values, mask)
    real = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    expected = (real - real.mean()) / real.std()
    assert torch.allclose(out[mask], expected, atol=1e-6)
    assert out[0, 2] == 0.0  # the masked NaN neither leaks nor counts
    assert abs(float(out[mask].mean())) < 1e-6
    with pytest.raises(ValueError, match="at least two real tokens"):
        whiten(values, torch.tensor([[True, False, False], [False, False, False]]))
