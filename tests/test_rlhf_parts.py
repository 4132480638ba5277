"""The parts chapter 5 (RLHF) adds to policy gradient: group advantages (RLOO, GRPO,
Dr. GRPO), the KL estimators k1 and k3, the clipped ratio and its token aggregations,
GAE and the value loss, the GPT's value head, and several steps per rollout."""

import math

import pytest
import torch
from torch import nn

from lmpg_utils.policy_gradient import (
    ESTIMATORS,
    Decoding,
    Rollout,
    StepTimes,
    TabularSequencePolicy,
    aggregate_tokens,
    clipped_ratio_loss,
    generalized_advantages,
    kl_penalty,
    policy_update_loop,
    terminal_rewards,
    value_loss,
)
from lmpg_utils.transformer import GPT, TransformerConfig, ValueHead

# two prompts, three samples each
REWARDS = torch.tensor([[1.0, 2.0, 6.0], [0.0, 0.0, 3.0]])


def test_group_advantages_by_hand():
    # prompt 0: mean 3; prompt 1: mean 1
    rloo = ESTIMATORS["leave-one-out"].advantages(REWARDS)
    # r_i - mean of the other two: 1 - (2+6)/2, 2 - (1+6)/2, 6 - (1+2)/2, ...
    assert torch.allclose(rloo, torch.tensor([[-3.0, -1.5, 4.5], [-1.5, -1.5, 3.0]]))
    dr_grpo = ESTIMATORS["group-mean"].advantages(REWARDS)
    assert torch.allclose(dr_grpo, torch.tensor([[-2.0, -1.0, 3.0], [-1.0, -1.0, 2.0]]))
    # RLOO is K/(K-1) times the group-mean advantage
    assert torch.allclose(rloo, 1.5 * dr_grpo)
    # sample std (divisor K-1): sqrt((4+1+9)/2) = sqrt(7), sqrt((1+1+4)/2) = sqrt(3)
    grpo = ESTIMATORS["group-normalized"].advantages(REWARDS)
    expected = torch.tensor(
        [
            [
                -2.0 / (math.sqrt(7) + 1e-4),
                -1.0 / (math.sqrt(7) + 1e-4),
                3.0 / (math.sqrt(7) + 1e-4),
            ],
            [
                -1.0 / (math.sqrt(3) + 1e-4),
                -1.0 / (math.sqrt(3) + 1e-4),
                2.0 / (math.sqrt(3) + 1e-4),
            ],
        ]
    )
    assert torch.allclose(grpo, expected)
    population = dr_grpo / REWARDS.std(dim=1, correction=0, keepdim=True)
    assert not torch.allclose(grpo, population, atol=1e-2)
    # a group of equal rewards carries no signal: zero advantages, never NaN
    equal = ESTIMATORS["group-normalized"].advantages(torch.full((1, 3), 0.7))
    assert torch.equal(equal, torch.zeros(1, 3))
    for name in ("group-normalized", "group-mean"):
        assert ESTIMATORS[name].min_samples == 2 and not ESTIMATORS[name].token_level
        with pytest.raises(ValueError, match="K=2"):
            ESTIMATORS[name].advantages(torch.tensor([[1.0], [2.0]]))


def _per_token_log_probs(policy: TabularSequencePolicy, seqs: torch.Tensor):
    logp = torch.log_softmax(policy.theta, dim=-1)
    states = torch.cat(
        [torch.full((seqs.shape[0], 1), policy.vocab), seqs[:, :-1]], dim=1
    )
    return logp[torch.arange(policy.length), states, seqs]


def test_k1_and_k3_are_unbiased_by_enumeration():
    # one token: a categorical policy and its reference
    pi = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    ref = torch.tensor([0.2, 0.2, 0.6], dtype=torch.float64)
    exact = float((pi * (pi / ref).log()).sum())
    mask = torch.ones(3, 1, dtype=torch.bool)
    k1 = kl_penalty(pi.log()[:, None], ref.log()[:, None], mask, "k1")
    k3 = kl_penalty(pi.log()[:, None], ref.log()[:, None], mask, "k3")
    assert float((pi * k1).sum()) == pytest.approx(exact, rel=1e-12)
    assert float((pi * k3).sum()) == pytest.approx(exact, rel=1e-12)
    assert bool((k3 >= 0).all()) and bool((k1 < 0).any())
    # three-token sequences: the per-token sums estimate the sequence KL
    g = torch.Generator().manual_seed(0)
    policy = TabularSequencePolicy(vocab=3, length=3, generator=g)
    reference = TabularSequencePolicy(vocab=3, length=3, generator=g)
    seqs = policy.all_sequences()
    p, q = policy.log_prob(seqs), reference.log_prob(seqs)
    exact = float((p.exp() * (p - q)).sum())
    logp, ref_logp = (
        _per_token_log_probs(policy, seqs),
        _per_token_log_probs(reference, seqs),
    )
    mask = torch.ones_like(logp, dtype=torch.bool)
    for kind in ("k1", "k3"):
        per_token = kl_penalty(logp, ref_logp, mask, kind, reduce="none")
        assert per_token.shape == logp.shape
        assert float((p.exp() * per_token.sum(1)).sum()) == pytest.approx(exact)
        assert torch.equal(per_token.sum(1), kl_penalty(logp, ref_logp, mask, kind))
    k3 = kl_penalty(logp, ref_logp, mask, "k3", reduce="none")
    assert bool((k3 >= 0).all())
    assert bool((kl_penalty(logp, ref_logp, mask, "k1", reduce="none") < 0).any())
    # per token: k3 = exp(ref - logp) - (ref - logp) - 1, 0 at a masked position
    d = ref_logp[:2] - logp[:2]
    assert torch.allclose(k3[:2], d.exp() - d - 1)
    half = torch.tensor([[True, False, False]]).expand(2, 3)
    masked = kl_penalty(logp[:2], ref_logp[:2], half, "k3", reduce="none")
    assert torch.equal(masked[:, 1:], torch.zeros(2, 2))
    with pytest.raises(ValueError, match="reduce"):
        kl_penalty(logp, ref_logp, mask, "k1", reduce="mean")
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_penalty(logp, ref_logp, mask, "k2")


def test_clipped_ratio_gradient_is_zero_outside_the_clip_region():
    old = torch.zeros(1, 4)
    # ratios exp(.) = 1.5, 0.5, 1.1, 0.9 on four tokens; clip 0.2: the first two are outside
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.9]])).requires_grad_(True)
    mask = torch.ones(1, 4, dtype=torch.bool)
    clipped_ratio_loss(new, old, torch.tensor([1.0]), mask, clip=0.2).backward()
    # positive advantage: a ratio above 1 + clip is clipped (no gradient); below 1 - clip
    # the unclipped term is the smaller one; inside, -d/dlogp (r A) / 4 = -r / 4
    assert new.grad[0, 0] == 0.0
    assert torch.allclose(new.grad[0, 1:], -torch.tensor([0.5, 1.1, 0.9]) / 4)
    new.grad = None
    clipped_ratio_loss(new, old, torch.tensor([-1.0]), mask, clip=0.2).backward()
    # negative advantage: the ratio below 1 - clip is the clipped, gradient-free one
    assert new.grad[0, 1] == 0.0
    assert torch.allclose(new.grad[0, [0, 2, 3]], torch.tensor([1.5, 1.1, 0.9]) / 4)
    with pytest.raises(ValueError, match="clip"):
        clipped_ratio_loss(new, old, torch.tensor([1.0]), mask, clip=1.5)
    with pytest.raises(ValueError, match="differ"):
        clipped_ratio_loss(new, old[:, :3], torch.tensor([1.0]), mask)
    with pytest.raises(ValueError, match="number of sequences"):
        clipped_ratio_loss(new, old, torch.tensor([1.0, 2.0]), mask)


def test_token_aggregations_by_hand():
    # at ratio 1 the per-token loss is -A; row 0 has 3 real tokens, row 1 one
    advantages = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    expected = {
        "token-mean": -(1 + 2 + 3 + 4) / 4,  # every real token weighs the same
        "sequence-mean": -(6 / 3 + 4 / 1) / 2,  # every sequence weighs the same
        "constant": -(6 / 4 + 4 / 4) / 2,  # sums over a constant 4, then over rows
    }
    # d loss / d logp at ratio 1: -A / 4; -A / (length * 2); -A / (4 * 2)
    gradients = {
        "token-mean": [[-1 / 4, -2 / 4, -3 / 4], [-4 / 4, 0, 0]],
        "sequence-mean": [[-1 / 6, -2 / 6, -3 / 6], [-4 / 2, 0, 0]],
        "constant": [[-1 / 8, -2 / 8, -3 / 8], [-4 / 8, 0, 0]],
    }
    for mode, value in expected.items():
        logp = torch.zeros(2, 3, requires_grad=True)
        constant = 4.0 if mode == "constant" else None
        loss = clipped_ratio_loss(
            logp, torch.zeros(2, 3), advantages, mask, aggregate=mode, constant=constant
        )
        assert float(loss.detach()) == pytest.approx(value)
        loss.backward()
        assert torch.allclose(logp.grad, torch.tensor(gradients[mode]))
    # the default is the token mean; a sequence advantage (rows,) covers its tokens
    assert float(
        clipped_ratio_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2), mask)
    ) == pytest.approx(-1.0)
    # a NaN at a masked position does not leak
    poisoned = torch.tensor([[1.0, 1.0, 1.0], [2.0, float("nan"), float("inf")]])
    assert float(aggregate_tokens(poisoned, mask)) == pytest.approx(1.25)
    with pytest.raises(ValueError, match="constant is required"):
        aggregate_tokens(poisoned, mask, "constant")
    with pytest.raises(ValueError, match="constant is required"):
        aggregate_tokens(poisoned, mask, "token-mean", constant=3.0)
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate_tokens(poisoned, mask, "sum")


# a 3-token trajectory and one padding position (reward and value there are ignored)
TOKEN_REWARDS = torch.tensor([[0.0, 0.0, 1.0, 5.0]])
VALUES = torch.tensor([[0.5, 0.4, 0.8, 9.0]])
MASK = torch.tensor([[True, True, True, False]])


@pytest.mark.parametrize(
    ("gamma", "lam", "advantages", "returns"),
    [
        # deltas: 0.4 - 0.5 = -0.1, 0.8 - 0.4 = 0.4, 1 - 0.8 = 0.2 (V = 0 after the end)
        # A_2 = 0.2, A_1 = 0.4 + 0.95 * 0.2 = 0.59, A_0 = -0.1 + 0.95 * 0.59 = 0.4605
        (1.0, 0.95, [0.4605, 0.59, 0.2, 0.0], [0.9605, 0.99, 1.0, 0.0]),
        # deltas: 0.9 * 0.4 - 0.5 = -0.14, 0.9 * 0.8 - 0.4 = 0.32, 0.2; with lam = 1
        # A_t is the discounted return minus V_t: 0.81 - 0.5, 0.9 - 0.4, 1 - 0.8
        (0.9, 1.0, [0.31, 0.5, 0.2, 0.0], [0.81, 0.9, 1.0, 0.0]),
    ],
)
def test_gae_by_hand(gamma, lam, advantages, returns):
    got_a, got_r = generalized_advantages(TOKEN_REWARDS, VALUES, MASK, gamma, lam)
    assert torch.allclose(got_a, torch.tensor([advantages]))
    assert torch.allclose(got_r, torch.tensor([returns]))
    # the same trajectory after a masked prompt position: the same numbers, shifted
    shifted = generalized_advantages(
        torch.cat([torch.full((1, 1), 7.0), TOKEN_REWARDS[:, :3]], 1),
        torch.cat([torch.full((1, 1), 3.0), VALUES[:, :3]], 1),
        torch.tensor([[False, True, True, True]]),
        gamma,
        lam,
    )[0]
    assert torch.allclose(shifted, torch.tensor([[0.0, *advantages[:3]]]))


def test_gae_estimator_and_bad_input():
    decoding = Decoding(samples=1, max_len=4, bos_id=0, eos_id=1, pad_id=2)
    roll = Rollout(
        tokens=torch.zeros(1, 5, dtype=torch.long),
        src=torch.zeros(1, 1, dtype=torch.long),
        rewards=torch.tensor([[1.0]]),
        greedy_rewards=None,
        log_probs=torch.zeros(1, 4),
        mask=MASK,
        decoding=decoding,
        values=VALUES,
    )
    gae = ESTIMATORS["gae"]
    assert gae.token_level and gae.needs_values and (gae.gamma, gae.lam) == (1.0, 0.95)
    # without token rewards the sequence reward sits on the last real token
    assert torch.equal(terminal_rewards(roll.rewards[0], MASK), TOKEN_REWARDS * MASK)
    assert torch.allclose(
        gae.rollout_advantages(roll), torch.tensor([[0.4605, 0.59, 0.2, 0.0]])
    )
    roll.values = None
    with pytest.raises(ValueError, match="values"):
        gae.rollout_advantages(roll)
    with pytest.raises(ValueError, match="per token"):
        gae.advantages(REWARDS)
    with pytest.raises(ValueError, match="contiguous"):
        generalized_advantages(
            TOKEN_REWARDS, VALUES, torch.tensor([[True, False, True, False]]), 1.0, 1.0
        )
    with pytest.raises(ValueError, match="lam"):
        generalized_advantages(TOKEN_REWARDS, VALUES, MASK, 1.0, 1.5)
    with pytest.raises(ValueError, match="differ"):
        generalized_advantages(TOKEN_REWARDS, VALUES[:, :3], MASK, 1.0, 1.0)


def test_value_loss_by_hand():
    values = torch.tensor([[1.0, 2.0, 0.0]], requires_grad=True)
    old = torch.tensor([[0.8, 2.5, 0.0]])
    returns = torch.tensor([[2.0, 3.0, float("nan")]])  # the masked token is ignored
    mask = torch.tensor([[True, True, False]])
    # 0.5 * ((1 - 2)^2 + (2 - 3)^2) / 2 tokens
    loss = value_loss(values, old, returns, mask)
    assert float(loss.detach()) == pytest.approx(0.5)
    loss.backward()
    assert torch.allclose(values.grad, torch.tensor([[-0.5, -0.5, 0.0]]))
    values.grad = None
    # clip 0.1: token 0 clipped to 0.9, (0.9 - 2)^2 = 1.21 > 1, so the clipped term
    # counts and has no gradient; token 1 clipped to 2.4, (2.4 - 3)^2 = 0.36 < 1
    loss = value_loss(values, old, returns, mask, clip=0.1)
    assert float(loss.detach()) == pytest.approx(0.5 * (1.21 + 1.0) / 2)
    loss.backward()
    assert torch.allclose(values.grad, torch.tensor([[0.0, -0.5, 0.0]]))
    with pytest.raises(ValueError, match="clip"):
        value_loss(values, old, returns, mask, clip=0.0)


def test_gpt_hidden_states_and_value_head():
    torch.manual_seed(0)
    config = TransformerConfig(
        vocab_size=30, d_model=16, num_heads=2, num_layers=2, d_ff=32, max_len=12
    )
    model = GPT(config).eval()
    ids = torch.randint(0, 30, (3, 7))
    hidden = model.hidden_states(ids)
    assert hidden.shape == (3, 7, 16)
    assert torch.equal(model.head(hidden), model(ids))
    cache = model.new_cache()
    first = model.hidden_states(ids[:, :4], cache=cache)
    rest = model.hidden_states(ids[:, 4:], cache=cache)
    assert torch.allclose(torch.cat([first, rest], 1), hidden, atol=1e-5)
    head = ValueHead(16)
    assert head(hidden).shape == (3, 7)
    with pytest.raises(ValueError, match="d_model=16"):
        head(torch.zeros(3, 7, 8))


# ---------------------------------------------------------------------------------------
# the update loop with several steps per rollout, on a categorical toy policy
# ---------------------------------------------------------------------------------------

K, T, SOURCES = 3, 2, 4


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(4))
        self.value = nn.Parameter(torch.zeros(()))

    def token_log_probs(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.logits, -1)[tokens]


def _toy_run(estimator: str, epochs: int, minibatches: int):
    g = torch.Generator().manual_seed(0)
    model = Toy()
    calls: list[Rollout] = []
    decoding = Decoding(samples=K, max_len=T, bos_id=0, eos_id=1, pad_id=2)

    def sample(m: Toy, batch: int, times: StepTimes) -> Rollout:
        with torch.no_grad():
            probs = torch.softmax(m.logits, -1)
            tokens = torch.multinomial(probs, SOURCES * K * T, True, generator=g)
            tokens = tokens.reshape(SOURCES * K, T)
            rewards = (tokens == 0).sum(1).float().reshape(SOURCES, K)
            return Rollout(
                tokens=tokens,
                src=torch.arange(SOURCES).repeat_interleave(K)[:, None],
                rewards=rewards,
                greedy_rewards=None,
                log_probs=m.token_log_probs(tokens),
                mask=torch.ones(SOURCES * K, T, dtype=torch.bool),
                decoding=decoding,
                values=m.value.expand(SOURCES * K, T).clone(),
                stats={"batch": float(batch)},
            )

    def loss_fn(m: Toy, batch: int, roll: Rollout, advantages: torch.Tensor):
        calls.append((roll, advantages))
        logp = m.token_log_probs(roll.tokens)
        per_token = ESTIMATORS[estimator].token_level
        flat = advantages if per_token else advantages.reshape(-1)
        ratio = (logp - roll.log_probs).exp()
        loss = clipped_ratio_loss(logp, roll.log_probs, flat, roll.mask)
        if per_token:
            returns = advantages + roll.values
            current = m.value.expand_as(returns)
            loss = loss + value_loss(current, roll.values, returns, roll.mask, 0.2)
        return loss, {"ratio": ratio.mean()}

    history = policy_update_loop(
        model,
        iter(range(100)),
        sample,
        ESTIMATORS[estimator],
        loss_fn,
        torch.optim.SGD(model.parameters(), lr=0.5),
        steps=3,
        evaluate=lambda m: float(torch.softmax(m.logits.detach(), -1)[0]),
        eval_every=3,
        epochs=epochs,
        minibatches=minibatches,
        generator=g,
    )
    return history, calls


def test_loop_defaults_make_one_on_policy_step_per_rollout():
    history, calls = _toy_run("group-normalized", epochs=1, minibatches=1)
    assert len(calls) == 3 and all(a.shape == (SOURCES, K) for _, a in calls)
    # on-policy: the ratio is exactly 1 at every step
    assert history.extra["ratio"] == [1.0, 1.0, 1.0]
    assert history.extra["batch"] == [0.0, 1.0, 2.0]
    assert len(history.grad_norm) == len(history.update_seconds) == 3
    assert history.update_seconds == sorted(history.update_seconds)
    assert history.valid_reward[-1] > history.valid_reward[0]  # more token 0


def test_loop_epochs_and_minibatches():
    history, calls = _toy_run("group-normalized", epochs=3, minibatches=2)
    assert len(calls) == 3 * 3 * 2
    # each pass covers the sources once, in minibatches of whole groups of K
    for update in range(3):
        for epoch in range(3):
            parts = calls[update * 6 + epoch * 2 : update * 6 + epoch * 2 + 2]
            sources = sorted(int(s) for r, _ in parts for s in r.src[::K, 0])
            assert sources == list(range(SOURCES))
            for roll, advantages in parts:
                assert roll.rewards.shape == (SOURCES // 2, K)
                assert roll.tokens.shape == (SOURCES // 2 * K, T)
                expected = ESTIMATORS["group-normalized"].advantages(roll.rewards)
                assert torch.allclose(advantages, expected)
    # the later steps of an update are off-policy: the mean ratio moves off 1
    assert all(r != 1.0 for r in history.extra["ratio"])
    with pytest.raises(ValueError, match="minibatches"):
        _toy_run("group-normalized", epochs=1, minibatches=SOURCES + 1)


def test_loop_with_gae_passes_token_advantages():
    history, calls = _toy_run("gae", epochs=2, minibatches=2)
    assert len(calls) == 3 * 2 * 2
    for roll, advantages in calls:
        assert advantages.shape == roll.tokens.shape == (SOURCES // 2 * K, T)
        # the rows of the minibatch's samples, computed on the whole rollout
        assert torch.equal(advantages, ESTIMATORS["gae"].rollout_advantages(roll))
    assert history.method == "gae" and len(history.extra["ratio"]) == 3


def test_rollout_select_picks_whole_groups():
    decoding = Decoding(samples=2, max_len=1, bos_id=0, eos_id=1, pad_id=2)
    roll = Rollout(
        tokens=torch.arange(6)[:, None],
        src=torch.arange(6)[:, None],
        rewards=torch.arange(6.0).reshape(3, 2),
        greedy_rewards=torch.tensor([7.0, 8.0, 9.0]),
        log_probs=torch.zeros(6, 1),
        mask=torch.ones(6, 1, dtype=torch.bool),
        decoding=decoding,
        hypotheses=list("abcdef"),
    )
    part = roll.select(torch.tensor([2, 0]))
    assert part.tokens[:, 0].tolist() == [4, 5, 0, 1]
    assert part.rewards.tolist() == [[4.0, 5.0], [0.0, 1.0]]
    assert part.greedy_rewards.tolist() == [9.0, 7.0]
    assert part.hypotheses == ["e", "f", "a", "b"] and part.values is None
    with pytest.raises(ValueError, match="outside"):
        roll.select(torch.tensor([3]))
