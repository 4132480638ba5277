"""Policy gradient as parts: advantage estimators, losses, rollouts and one update loop.

The REINFORCE estimate of the gradient of the expected reward
:math:`J(\\theta)=E_{y\\sim\\pi_\\theta}[R(y)]` is

.. math:: \\hat g = \\frac{1}{N}\\sum_i (R(y_i) - b_i)\\, \\nabla_\\theta \\log \\pi_\\theta(y_i),
   \\qquad \\log \\pi_\\theta(y) = \\sum_t \\log \\pi_\\theta(y_t \\mid y_{<t}, x),

implemented as the surrogate loss ``-(R - b).detach() * log_prob``
(:func:`reinforce_loss`) whose gradient is :math:`-\\hat g`. The estimators of
:data:`ESTIMATORS` turn a rollout's rewards into advantages and declare what they need:

* ``none``: ``b = 0``;
* ``moving-average``: an exponential moving average of past batch-mean rewards
  (``needs_history``: the loop keeps a :class:`MovingAverage` for it alone; REINFORCE
  with a baseline);
* ``self-critical``: the reward of the greedy decode of the same source (Rennie et al.
  2017; ``needs_greedy``: the rollout also decodes greedily);
* ``leave-one-out``: the mean reward of the *other* K-1 samples of the same source (RLOO,
  Ahmadian et al. 2024);
* ``group-normalized``: ``(R - mean) / (std + eps)`` over the K samples of a source (GRPO,
  Shao et al. 2024);
* ``group-mean``: ``R - mean`` over the K samples, no std (Dr. GRPO, Liu et al. 2025);
* ``gae``: per-token generalized advantage estimates from per-token rewards and a learned
  value function (PPO, Schulman et al. 2017; GAE, Schulman et al. 2016;
  ``token_level`` and ``needs_values``).

A baseline that does not depend on the sample it multiplies leaves the estimator
unbiased; the toy :class:`TabularSequencePolicy` lets the notebook check that by
enumerating every sequence. Beside the REINFORCE surrogate, :func:`clipped_ratio_loss`
(PPO's and GRPO's clipped surrogate, per token, aggregated by
:func:`aggregate_tokens`), :func:`kl_penalty` (per-token estimates of the KL divergence
to a reference policy) and :func:`value_loss` (PPO's critic) are the parts RLHF adds.
:func:`rollout` samples and scores translations as described by a :class:`Decoding`,
and :func:`policy_update_loop` is the one loop that turns rollouts into updates.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import Tensor, nn

from . import distributed
from .distributed import SINGLE, World
from .generation import sequence_log_probs, target_mask, translate
from .training import autocast_dtype
from .transformer import EncoderDecoder

Batch = TypeVar("Batch")

#: ``reward_fn(sources, hypotheses, references) -> rewards``: one reward per hypothesis,
#: given the source it translates (a learned reward reads it) and its reference
RewardFn = Callable[[Sequence[str], Sequence[str], Sequence[str]], list[float]]


def _check_rewards(rewards: Tensor, name: str = "rewards") -> None:
    if rewards.dim() != 2 or rewards.numel() == 0:
        raise ValueError(
            f"{name} must be a non-empty (sources, samples) tensor, "
            f"got shape {tuple(rewards.shape)}"
        )
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError(f"{name} contain NaN or infinite values")


def leave_one_out_baseline(rewards: Tensor) -> Tensor:
    """For rewards (B, K): b[i, k] = mean of the other K-1 rewards of source i. Needs K >= 2."""
    _check_rewards(rewards)
    k = rewards.shape[1]
    if k < 2:
        raise ValueError(
            f"leave-one-out needs at least K=2 samples per source, got K={k}"
        )
    return (rewards.sum(dim=1, keepdim=True) - rewards) / (k - 1)


class MovingAverage:
    """Exponential moving average ``b <- beta * b + (1 - beta) * mean(R)`` (starts at the
    first mean): the history the ``moving-average`` estimator needs."""

    def __init__(self, beta: float = 0.9):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        self.beta = beta
        self.value: float | None = None

    def update(self, rewards: Tensor) -> None:
        """Add a batch's mean reward."""
        self.add(float(rewards.mean()))

    def add(self, mean: float) -> None:
        """Add a batch's mean reward, given as a number (e.g. summed over processes)."""
        self.value = (
            mean
            if self.value is None
            else self.beta * self.value + (1 - self.beta) * mean
        )


@dataclass(frozen=True)
class Estimator:
    """An advantage estimator: a name, what it needs, and how it computes advantages.

    ``needs_greedy``: the greedy decode's rewards (B,) must be passed;
    ``needs_history``: the value of a :class:`MovingAverage` of past rewards (the value
    *before* the current batch is added, so ``b`` does not depend on the current
    samples; ``None`` at first); ``min_samples``: the samples per source it needs;
    ``needs_values``: the rollout must carry value estimates (:attr:`Rollout.values`);
    ``token_level``: :meth:`rollout_advantages` returns per-token advantages
    (B*K, T) instead of per-sequence ones (B, K).
    """

    name: str
    needs_greedy: bool = False
    needs_history: bool = False
    min_samples: int = 1
    needs_values: bool = False
    token_level: bool = False

    def baseline(
        self,
        rewards: Tensor,
        greedy_rewards: Tensor | None = None,
        history: float | None = None,
    ) -> Tensor:
        """The baseline (B, K) subtracted from ``rewards`` (B, K)."""
        raise NotImplementedError(f"{type(self).__name__} defines no baseline")

    def advantages(
        self,
        rewards: Tensor,
        greedy_rewards: Tensor | None = None,
        history: float | None = None,
    ) -> Tensor:
        """``rewards - baseline`` (B, K), what the losses weight log-probabilities by."""
        return rewards - self.baseline(rewards, greedy_rewards, history)

    def rollout_advantages(self, roll: Rollout, history: float | None = None) -> Tensor:
        """The advantages of a whole rollout: (B, K) per sequence, or (B*K, T) per token
        when ``token_level``. For a sequence-level estimator this is
        :meth:`advantages` of the rollout's rewards (and greedy rewards)."""
        return self.advantages(roll.rewards, roll.greedy_rewards, history)


@dataclass(frozen=True)
class NoBaseline(Estimator):
    """``b = 0``: plain REINFORCE."""

    name: str = "none"

    def baseline(self, rewards, greedy_rewards=None, history=None) -> Tensor:
        _check_rewards(rewards)
        return torch.zeros_like(rewards)


@dataclass(frozen=True)
class MovingAverageBaseline(Estimator):
    """``b`` = a moving average of past batch-mean rewards (0 before the first batch)."""

    name: str = "moving-average"
    needs_history: bool = True

    def baseline(self, rewards, greedy_rewards=None, history=None) -> Tensor:
        _check_rewards(rewards)
        return torch.full_like(rewards, 0.0 if history is None else float(history))


@dataclass(frozen=True)
class SelfCritical(Estimator):
    """``b`` = the reward of the greedy translation of the same source."""

    name: str = "self-critical"
    needs_greedy: bool = True

    def baseline(self, rewards, greedy_rewards=None, history=None) -> Tensor:
        _check_rewards(rewards)
        if greedy_rewards is None or greedy_rewards.shape != rewards.shape[:1]:
            raise ValueError(
                f"self-critical needs greedy_rewards of shape ({rewards.shape[0]},)"
            )
        if not bool(torch.isfinite(greedy_rewards).all()):
            raise ValueError("greedy rewards contain NaN or infinite values")
        return greedy_rewards[:, None].expand_as(rewards).to(rewards.dtype)


@dataclass(frozen=True)
class LeaveOneOut(Estimator):
    """``b`` = the mean reward of the other samples of the same source (RLOO)."""

    name: str = "leave-one-out"
    min_samples: int = 2

    def baseline(self, rewards, greedy_rewards=None, history=None) -> Tensor:
        return leave_one_out_baseline(rewards)


def _group_mean(rewards: Tensor, name: str) -> Tensor:
    _check_rewards(rewards)
    if rewards.shape[1] < 2:
        raise ValueError(
            f"{name} needs at least K=2 samples per source, got K={rewards.shape[1]}"
        )
    return rewards.mean(dim=1, keepdim=True).expand_as(rewards)


@dataclass(frozen=True)
class GroupMean(Estimator):
    """``A_i = R_i - mean_k R_k`` over the K samples of the same source, the mean
    including ``R_i`` itself (Dr. GRPO). It equals ``(K-1)/K`` times the leave-one-out
    advantage, so it is RLOO with a smaller step."""

    name: str = "group-mean"
    min_samples: int = 2

    def baseline(self, rewards, greedy_rewards=None, history=None) -> Tensor:
        return _group_mean(rewards, self.name)


@dataclass(frozen=True)
class GroupNormalized(Estimator):
    """``A_i = (R_i - mean) / (std + eps)`` over the K samples of the same source (GRPO).

    ``std`` is the *sample* standard deviation (Bessel-corrected, divisor K-1), what
    ``torch.Tensor.std`` computes by default and what GRPO's reference implementations
    use. A group whose rewards are all equal gets zero advantages. Dividing by the
    std makes the advantage depend on the sample itself, so the estimate is no longer
    an unbiased REINFORCE gradient; it rescales each source's step instead.
    """

    name: str = "group-normalized"
    min_samples: int = 2
    eps: float = 1e-4

    def __post_init__(self) -> None:
        if not self.eps > 0.0:
            raise ValueError(f"eps must be positive, got {self.eps}")

    def baseline(self, rewards, greedy_rewards=None, history=None) -> Tensor:
        return _group_mean(rewards, self.name)

    def advantages(self, rewards, greedy_rewards=None, history=None) -> Tensor:
        centred = rewards - self.baseline(rewards)
        return centred / (rewards.std(dim=1, keepdim=True) + self.eps)


def generalized_advantages(
    token_rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimates and returns, per token (Schulman et al. 2016).

    For each row of (N, T) tensors, over its real tokens (``mask`` True, one
    contiguous run per row: a prompt before it and padding after it are masked out):

    .. math:: \\delta_t = r_t + \\gamma V_{t+1} - V_t, \\qquad
       A_t = \\sum_{l \\ge 0} (\\gamma\\lambda)^l \\delta_{t+l}, \\qquad
       G_t = A_t + V_t,

    with :math:`V = 0` after the last real token (the episode ends there) and the sum
    stopping at it. ``lam = 1`` gives the Monte-Carlo return minus the value; ``lam =
    0`` the one-step TD error. Returns ``(advantages, returns)``, both (N, T), 0 at
    masked positions and detached (they are regression and weighting targets).
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    if mask.dim() != 2:
        raise ValueError(f"mask must be (rows, tokens), got shape {tuple(mask.shape)}")
    _check_per_token(mask, token_rewards=token_rewards, values=values)
    starts = mask & ~torch.nn.functional.pad(mask[:, :-1], (1, 0), value=False)
    if bool((starts.sum(dim=1) > 1).any()):
        raise ValueError("each row's mask must be one contiguous run of real tokens")
    rewards = torch.where(mask, token_rewards.detach(), 0.0)
    values = torch.where(mask, values.detach(), 0.0)
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    for t in range(mask.shape[1] - 1, -1, -1):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = torch.where(mask[:, t], delta + gamma * lam * next_advantage, 0.0)
        advantages[:, t] = advantage
        next_value, next_advantage = values[:, t], advantage
    return advantages, torch.where(mask, advantages + values, 0.0)


def terminal_rewards(rewards: Tensor, mask: Tensor) -> Tensor:
    """Per-token rewards (N, T) that are 0 except the sequence reward ``rewards`` (N,)
    on each row's last real token (where a reward model scores the whole sequence).
    Add ``-beta * kl_penalty(..., reduce="none")`` to them for PPO's KL-shaped reward."""
    if rewards.shape != mask.shape[:1] or mask.dim() != 2:
        raise ValueError(
            f"rewards {tuple(rewards.shape)} must be (N,) for a mask (N, T), "
            f"got mask {tuple(mask.shape)}"
        )
    _check_per_token(mask)
    if not bool(mask.any(dim=1).all()):
        raise ValueError("every row needs at least one real token to put its reward on")
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = torch.where(mask, positions, -1).max(dim=1).values
    out = torch.zeros(mask.shape, dtype=rewards.dtype, device=rewards.device)
    out[torch.arange(mask.shape[0], device=mask.device), last] = rewards
    return out


@dataclass(frozen=True)
class GeneralizedAdvantage(Estimator):
    """Per-token advantages by :func:`generalized_advantages` (PPO's estimator).

    Reads the rollout's :attr:`Rollout.values` (the value head's estimates at sampling
    time) and its :attr:`Rollout.token_rewards`, or, when the sampler left those out,
    :func:`terminal_rewards` of its sequence rewards. The returns a value loss regresses
    on are ``advantages + roll.values`` (masked).
    """

    name: str = "gae"
    needs_values: bool = True
    token_level: bool = True
    gamma: float = 1.0
    lam: float = 0.95

    def __post_init__(self) -> None:
        if not (0.0 <= self.gamma <= 1.0 and 0.0 <= self.lam <= 1.0):
            raise ValueError(
                f"gamma and lam must be in [0, 1], got {self.gamma}, {self.lam}"
            )

    def advantages(self, rewards, greedy_rewards=None, history=None) -> Tensor:
        raise ValueError(
            "gae works per token from values: call rollout_advantages(rollout)"
        )

    def rollout_advantages(self, roll: Rollout, history: float | None = None) -> Tensor:
        if roll.values is None:
            raise ValueError("gae needs the rollout's values (Rollout.values)")
        _check_rewards(roll.rewards)
        token_rewards = roll.token_rewards
        if token_rewards is None:
            token_rewards = terminal_rewards(roll.rewards.reshape(-1), roll.mask)
        advantages, _ = generalized_advantages(
            token_rewards, roll.values, roll.mask, self.gamma, self.lam
        )
        return advantages


#: the one list of estimator names (the command line and configs take their choices here)
ESTIMATORS: dict[str, Estimator] = {
    e.name: e
    for e in (
        NoBaseline(),
        MovingAverageBaseline(),
        SelfCritical(),
        LeaveOneOut(),
        GroupNormalized(),
        GroupMean(),
        GeneralizedAdvantage(),
    )
}


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------


def reinforce_loss(log_probs: Tensor, advantages: Tensor) -> Tensor:
    """Surrogate loss ``-mean(A * log pi(y))``; its gradient is minus the REINFORCE estimate.

    Both are (B, K); ``A = R - b`` comes from an :class:`Estimator` and is detached:
    rewards are not differentiated. If every advantage is zero the loss (and its
    gradient) is exactly zero, never NaN.
    """
    if log_probs.shape != advantages.shape:
        raise ValueError(
            f"shapes differ: log_probs {tuple(log_probs.shape)}, "
            f"advantages {tuple(advantages.shape)}"
        )
    _check_rewards(advantages, "advantages")
    return -(advantages.detach().to(log_probs.dtype) * log_probs).mean()


def _check_per_token(mask: Tensor, **tensors: Tensor) -> None:
    for name, tensor in tensors.items():
        if tensor.shape != mask.shape:
            raise ValueError(
                f"{name} {tuple(tensor.shape)} and mask {tuple(mask.shape)} differ"
            )
    if mask.dtype != torch.bool or not bool(mask.any()):
        raise ValueError("mask must be a boolean tensor with at least one True")


#: how :func:`aggregate_tokens` turns per-token losses into one number
AGGREGATIONS: tuple[str, ...] = ("token-mean", "sequence-mean", "constant")


def aggregate_tokens(
    per_token: Tensor,
    mask: Tensor,
    mode: str = "token-mean",
    constant: float | None = None,
) -> Tensor:
    """One scalar from per-token values ``x`` (N, T) over the real tokens (``mask``).

    * ``"token-mean"``: :math:`\\sum_{i,t} m_{it} x_{it} / \\sum_{i,t} m_{it}`, every
      real token of the batch weighs the same (PPO as usually implemented, DAPO);
    * ``"sequence-mean"``: :math:`\\frac{1}{N}\\sum_i \\sum_t m_{it} x_{it} /
      \\sum_t m_{it}`, each sequence weighs the same, so a token of a long sequence
      weighs less (GRPO); a row without real tokens counts as 0;
    * ``"constant"``: :math:`\\frac{1}{N}\\sum_i \\sum_t m_{it} x_{it} / C` with a
      fixed ``constant`` C such as the maximum number of generated tokens (Dr. GRPO:
      no length normalisation).

    Masked positions are never read (a NaN there does not leak into the result).
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {mode!r}; choose one of {AGGREGATIONS}")
    if per_token.dim() != 2:
        raise ValueError(
            f"per-token values must be (rows, tokens), got shape {tuple(per_token.shape)}"
        )
    _check_per_token(mask, per_token=per_token)
    if (mode == "constant") != (constant is not None):
        raise ValueError("constant is required by, and only by, mode='constant'")
    if constant is not None and not constant > 0:
        raise ValueError(f"constant must be positive, got {constant}")
    masked = torch.where(mask, per_token, torch.zeros_like(per_token))
    if mode == "token-mean":
        return masked.sum() / mask.sum()
    if mode == "sequence-mean":
        return (masked.sum(dim=1) / mask.sum(dim=1).clamp_min(1)).mean()
    return (masked.sum(dim=1) / constant).mean()


def whiten(values: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """``values`` (N, T) shifted and scaled to mean 0 and standard deviation 1 over the
    real tokens (``mask``), 0 elsewhere: PPO's advantage normalisation, which keeps the
    size of an update independent of the reward's scale and, while the critic is
    still poor, stops every sampled token being pushed the same way."""
    _check_per_token(mask, values=values)
    real = values[mask]
    if real.numel() < 2:
        raise ValueError("whitening needs at least two real tokens")
    centred = (values - real.mean()) / (real.std() + eps)
    return torch.where(mask, centred, torch.zeros_like(values))


def clipped_ratio_loss(
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip: float = 0.2,
    aggregate: str = "token-mean",
    constant: float | None = None,
) -> Tensor:
    """PPO's clipped surrogate (the loss of PPO and GRPO), aggregated over the masked tokens.

    Per token, with the ratio ``r = exp(log_probs - old_log_probs)`` of the current policy
    to the one that sampled: ``-min(r A, clip(r, 1 - clip, 1 + clip) A)``. Where the
    clipped term is the smaller one the loss has no gradient, so one rollout cannot push
    the policy far from the sampling policy. ``log_probs``, ``old_log_probs`` and
    ``mask`` are (N, T); ``advantages`` is (N,) per sequence (broadcast over its
    tokens) or (N, T) per token. ``old_log_probs`` and ``advantages`` are detached.
    ``aggregate`` (and ``constant``) choose how tokens are averaged, see
    :func:`aggregate_tokens`; the default, ``"token-mean"``, averages over all real
    tokens of the batch.
    """
    if not 0.0 < clip < 1.0:
        raise ValueError(f"clip must be in (0, 1), got {clip}")
    if advantages.dim() == 1:
        if advantages.shape[0] != log_probs.shape[0]:
            raise ValueError(
                f"advantages {tuple(advantages.shape)} and log_probs "
                f"{tuple(log_probs.shape)} differ in their number of sequences"
            )
        advantages = advantages[:, None].expand_as(log_probs)
    _check_per_token(
        mask, log_probs=log_probs, old_log_probs=old_log_probs, advantages=advantages
    )
    # detached inputs zeroed where masked, so a NaN there cannot reach a gradient
    advantages = torch.where(mask, advantages.detach(), 0.0).to(log_probs.dtype)
    old_log_probs = torch.where(mask, old_log_probs.detach(), 0.0)
    ratio = torch.exp(log_probs - old_log_probs)
    surrogate = torch.minimum(
        ratio * advantages, ratio.clamp(1.0 - clip, 1.0 + clip) * advantages
    )
    return aggregate_tokens(-surrogate, mask, aggregate, constant)


KL_KINDS: tuple[str, ...] = ("k1", "k3")


def kl_penalty(
    log_probs: Tensor,
    ref_log_probs: Tensor,
    mask: Tensor,
    kind: str = "k1",
    reduce: str = "sum",
) -> Tensor:
    """Estimates of KL(pi || ref) from tokens sampled from ``pi``: per sequence (N,) or
    per token (N, T).

    With ``d = ref_log_probs - log_probs`` per token: ``k1 = -d = log pi - log ref``
    (unbiased, can be negative) or ``k3 = exp(d) - d - 1 = pi_ref/pi - log(pi_ref/pi)
    - 1`` (unbiased and never negative, lower variance; Schulman 2020; GRPO's KL
    term). Each token's estimate has that token's KL(pi(.|prefix) || ref(.|prefix)) as
    its expectation under ``pi``, so their sum estimates the sequence KL. ``reduce``:
    ``"sum"`` over the masked tokens of each sequence (N,), or ``"none"``: the (N, T)
    per-token estimates, 0 at masked positions (a per-token reward shaping or a loss
    term for :func:`aggregate_tokens`). Gradients flow through both inputs.
    """
    if kind not in KL_KINDS:
        raise ValueError(f"unknown KL estimator {kind!r}; choose one of {KL_KINDS}")
    if reduce not in ("sum", "none"):
        raise ValueError(f"reduce must be 'sum' or 'none', got {reduce!r}")
    _check_per_token(mask, log_probs=log_probs, ref_log_probs=ref_log_probs)
    difference = ref_log_probs - log_probs
    terms = -difference if kind == "k1" else torch.expm1(difference) - difference
    per_token = torch.where(mask, terms, torch.zeros_like(terms))
    return per_token if reduce == "none" else per_token.sum(dim=1)


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip: float | None = None,
    aggregate: str = "token-mean",
) -> Tensor:
    """The critic's loss, ``0.5 (V - G)^2`` per real token, aggregated by
    :func:`aggregate_tokens` (all (N, T)).

    With ``clip`` (PPO's value clipping), per token
    ``0.5 max((V - G)^2, (V_old + clip(V - V_old, -clip, clip) - G)^2)``: the value
    gains nothing by moving more than ``clip`` from its sampling-time estimate
    ``old_values``. ``old_values`` and ``returns`` are detached.
    """
    if clip is not None and not clip > 0:
        raise ValueError(f"clip must be positive or None, got {clip}")
    _check_per_token(mask, values=values, old_values=old_values, returns=returns)
    # detached targets zeroed where masked, so a NaN there cannot reach a gradient
    returns = torch.where(mask, returns.detach(), torch.zeros_like(returns))
    old_values = torch.where(mask, old_values.detach(), torch.zeros_like(old_values))
    squared = (values - returns) ** 2
    if clip is not None:
        clipped = old_values + (values - old_values).clamp(-clip, clip)
        squared = torch.maximum(squared, (clipped - returns) ** 2)
    return aggregate_tokens(0.5 * squared, mask, aggregate)


# ---------------------------------------------------------------------------------------------
# A toy policy small enough to enumerate: exact gradient of E[R] versus the Monte-Carlo estimate
# ---------------------------------------------------------------------------------------------


class TabularSequencePolicy:
    """pi(y_t | y_{t-1}) = softmax(theta[t, y_{t-1}]) over a tiny vocabulary, for sequences of fixed length.

    ``theta`` has shape (length, vocab + 1, vocab): row ``vocab`` of step 0 is the start
    state. With ``length == 1`` this is a plain categorical policy.
    """

    def __init__(
        self,
        vocab: int,
        length: int,
        generator: torch.Generator | None = None,
        scale: float = 1.0,
    ):
        if vocab < 2 or length < 1:
            raise ValueError(f"need vocab >= 2 and length >= 1, got {vocab}, {length}")
        self.vocab, self.length = vocab, length
        self.theta = scale * torch.randn(
            length, vocab + 1, vocab, generator=generator, dtype=torch.float64
        )

    def _states(self, sequences: Tensor) -> Tensor:
        start = torch.full((sequences.shape[0], 1), self.vocab, dtype=torch.long)
        return torch.cat([start, sequences[:, :-1]], dim=1)

    def log_prob(self, sequences: Tensor, theta: Tensor | None = None) -> Tensor:
        """log pi(y) = sum_t log pi(y_t | y_{t-1}) for sequences (N, length)."""
        theta = self.theta if theta is None else theta
        logp = torch.log_softmax(theta, dim=-1)
        steps = torch.arange(self.length)
        return logp[steps, self._states(sequences), sequences].sum(dim=1)

    def all_sequences(self) -> Tensor:
        """Every sequence, (vocab ** length, length)."""
        return torch.tensor(
            list(itertools.product(range(self.vocab), repeat=self.length)),
            dtype=torch.long,
        )

    def exact_gradient(
        self, reward: Callable[[Tensor], Tensor]
    ) -> tuple[float, Tensor]:
        """E[R] and its exact gradient, by enumerating all sequences and differentiating sum p(y) R(y)."""
        theta = self.theta.clone().requires_grad_(True)
        seqs = self.all_sequences()
        objective = (self.log_prob(seqs, theta).exp() * reward(seqs)).sum()
        (grad,) = torch.autograd.grad(objective, theta)
        return float(objective.detach()), grad

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` sequences drawn from the policy, (n, length)."""
        probs = torch.softmax(self.theta, dim=-1)
        out = torch.empty(n, self.length, dtype=torch.long)
        state = torch.full((n,), self.vocab, dtype=torch.long)
        for t in range(self.length):
            out[:, t] = torch.multinomial(
                probs[t, state], 1, generator=generator
            ).squeeze(1)
            state = out[:, t]
        return out

    def score_function(self, sequences: Tensor) -> Tensor:
        """grad_theta log pi(y) for each sequence, (N, *theta.shape), in closed form: onehot - softmax per step."""
        probs = torch.softmax(self.theta, dim=-1)
        n = sequences.shape[0]
        grad = torch.zeros(n, *self.theta.shape, dtype=self.theta.dtype)
        states = self._states(sequences)
        rows = torch.arange(n)
        for t in range(self.length):
            grad[rows, t, states[:, t]] -= probs[t, states[:, t]]
            grad[rows, t, states[:, t], sequences[:, t]] += 1.0
        return grad

    def reinforce_estimates(
        self,
        reward: Callable[[Tensor], Tensor],
        samples_per_estimate: int,
        estimates: int,
        estimator: Estimator = ESTIMATORS["none"],
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """``estimates`` independent REINFORCE gradients, each from ``samples_per_estimate`` samples.

        Returns (estimates, theta.numel()). The toy has no greedy decode and no training
        history, so an ``estimator`` that needs either is refused.
        """
        if estimator.needs_greedy or estimator.needs_history:
            raise ValueError(
                f"{estimator.name} needs a greedy decode or a training history, "
                "which the toy policy does not have"
            )
        if estimator.token_level or estimator.needs_values:
            raise ValueError(
                f"{estimator.name} works per token from values; the toy's estimates "
                "are per sequence"
            )
        m = samples_per_estimate
        seqs = self.sample(estimates * m, generator)
        rewards = reward(seqs).to(self.theta.dtype).reshape(estimates, m)
        advantages = estimator.advantages(rewards)
        scores = self.score_function(seqs).reshape(estimates, m, -1)
        return (advantages[..., None] * scores).mean(dim=1)


# ---------------------------------------------------------------------------------------------
# Rollouts and the update loop
# ---------------------------------------------------------------------------------------------


@dataclass
class StepTimes:
    """Seconds spent in each part of the policy-gradient updates so far."""

    sampling: float = 0.0
    reward: float = 0.0
    backward: float = 0.0
    samples: int = 0

    @property
    def total(self) -> float:
        return self.sampling + self.reward + self.backward

    def shares(self) -> dict[str, float]:
        total = self.total or 1.0
        return {
            "sampling": self.sampling / total,
            "reward": self.reward / total,
            "backward": self.backward / total,
        }

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.total if self.total else 0.0


@dataclass(frozen=True)
class Decoding:
    """How a rollout decodes: ``samples`` translations per source (temperature 1) of at
    most ``max_len`` tokens, the special ids, and whether to also decode greedily
    (``greedy_baseline``: the self-critical baseline)."""

    samples: int
    max_len: int
    bos_id: int
    eos_id: int
    pad_id: int
    greedy_baseline: bool = False

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")
        if self.max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {self.max_len}")


def _group_rows(sources: Tensor, k: int) -> Tensor:
    """The rows (B'*K,) of the samples of ``sources`` (B',) when each has K in a row."""
    return (sources[:, None] * k + torch.arange(k, device=sources.device)).reshape(-1)


@dataclass
class Rollout:
    """K sampled continuations per source and what the losses need of them.

    ``tokens`` (B*K, T) start with BOS; ``src`` (B*K, S) is each source repeated K times
    (for a decoder-only model, what the samples are conditioned on: the prompt);
    ``rewards`` (B, K); ``greedy_rewards`` (B,) when the decoding asked for them;
    ``log_probs`` (B*K, T-1) are the sampling-time per-token log-probabilities under the
    policy and ``mask`` (B*K, T-1) marks the tokens that count (for a translation: up
    to and including each EOS). What an RLHF sampler may add, all (B*K, T-1) and
    aligned with ``mask``: ``ref_log_probs`` under the frozen reference policy,
    ``values`` (the value head's estimates, what ``gae`` needs) and
    ``token_rewards`` (per-token rewards, e.g. a KL penalty on every token and the
    sequence reward on the last). ``stats``: numbers the sampler wants logged once per
    update (they go to :attr:`FineTuneHistory.extra`).
    """

    tokens: Tensor
    src: Tensor
    rewards: Tensor
    greedy_rewards: Tensor | None
    log_probs: Tensor
    mask: Tensor
    decoding: Decoding
    hypotheses: list[str] = field(default_factory=list)
    ref_log_probs: Tensor | None = None
    values: Tensor | None = None
    token_rewards: Tensor | None = None
    stats: dict[str, float] = field(default_factory=dict)

    def select(self, sources: Tensor) -> Rollout:
        """The rollout of the sources ``sources`` (a 1-d index into the B sources), all
        K samples of each, in that order (a minibatch of whole groups)."""
        b, k = self.rewards.shape
        if sources.dim() != 1 or sources.numel() == 0:
            raise ValueError(
                f"sources must be a non-empty 1-d index, got {tuple(sources.shape)}"
            )
        if int(sources.min()) < 0 or int(sources.max()) >= b:
            raise ValueError(f"source index outside 0..{b - 1}")
        sources = sources.to(self.rewards.device)
        rows = _group_rows(sources, k)

        def pick(tensor: Tensor | None) -> Tensor | None:
            return None if tensor is None else tensor[rows.to(tensor.device)]

        return Rollout(
            tokens=pick(self.tokens),
            src=pick(self.src),
            rewards=self.rewards[sources],
            greedy_rewards=None
            if self.greedy_rewards is None
            else self.greedy_rewards[sources],
            log_probs=pick(self.log_probs),
            mask=pick(self.mask),
            decoding=self.decoding,
            hypotheses=[self.hypotheses[i] for i in rows.tolist()]
            if self.hypotheses
            else [],
            ref_log_probs=pick(self.ref_log_probs),
            values=pick(self.values),
            token_rewards=pick(self.token_rewards),
            stats=dict(self.stats),
        )


def rollout(
    model: EncoderDecoder,
    src: Tensor,
    sources: Sequence[str],
    references: Sequence[str],
    decoding: Decoding,
    decode: Callable[[Sequence[int]], str],
    reward_fn: RewardFn,
    generator: torch.Generator | None = None,
    times: StepTimes | None = None,
) -> Rollout:
    """Sample ``decoding.samples`` translations of every source (batched, KV cache) and
    score them with ``reward_fn(sources, hypotheses, references)``, on ``src``'s device.

    ``sources`` are the source texts and ``references`` the reference translations, one
    per row of ``src``; ``decode`` turns token ids into text. Time spent sampling and
    scoring is added to ``times``.
    """
    if not src.shape[0] == len(sources) == len(references):
        raise ValueError(
            f"{src.shape[0]} sources, {len(sources)} source texts and "
            f"{len(references)} references"
        )
    times = times if times is not None else StepTimes()
    d = decoding
    began = time.perf_counter()
    repeated = src.repeat_interleave(d.samples, dim=0)
    tokens, log_probs = translate(
        model,
        repeated,
        d.bos_id,
        d.eos_id,
        d.pad_id,
        d.max_len,
        temperature=1.0,
        generator=generator,
        return_log_probs=True,
    )
    greedy_tokens = (
        translate(model, src, d.bos_id, d.eos_id, d.pad_id, d.max_len)
        if d.greedy_baseline
        else None
    )
    times.sampling += time.perf_counter() - began
    began = time.perf_counter()
    hypotheses = [decode(row) for row in tokens.tolist()]
    each_source = [s for s in sources for _ in range(d.samples)]
    each_reference = [r for r in references for _ in range(d.samples)]
    rewards = torch.tensor(
        reward_fn(each_source, hypotheses, each_reference),
        dtype=torch.float32,
        device=src.device,
    ).reshape(src.shape[0], d.samples)
    greedy_rewards = None
    if greedy_tokens is not None:
        greedy_hyps = [decode(row) for row in greedy_tokens.tolist()]
        greedy_rewards = torch.tensor(
            reward_fn(list(sources), greedy_hyps, list(references)),
            dtype=torch.float32,
            device=src.device,
        )
    times.reward += time.perf_counter() - began
    times.samples += tokens.shape[0]
    mask = target_mask(tokens, d.eos_id, d.pad_id)
    return Rollout(
        tokens, repeated, rewards, greedy_rewards, log_probs, mask, d, hypotheses
    )


def policy_log_probs(model: EncoderDecoder, roll: Rollout) -> Tensor:
    """log pi(y) of every sample (B, K), with gradients, counting tokens up to and including EOS."""
    d = roll.decoding
    logp, _ = sequence_log_probs(model, roll.src, roll.tokens, d.eos_id, d.pad_id)
    return logp.reshape(roll.rewards.shape)


@dataclass
class FineTuneHistory:
    """Learning curve of one fine-tuning run: at each evaluated step its seconds of
    training and the evaluation value (``valid_reward``: the expected reward on held-out
    data); per update the mean sampled reward (``train_reward``), the training seconds
    so far (``update_seconds``), the gradient norm before clipping (``grad_norm``, the
    mean over the update's optimizer steps) and any named numbers the sampler or the
    loss report (``extra``); and where the time went."""

    method: str
    steps: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    valid_reward: list[float] = field(default_factory=list)
    train_reward: list[float] = field(default_factory=list)
    update_seconds: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    extra: dict[str, list[float]] = field(default_factory=dict)
    times: StepTimes = field(default_factory=StepTimes)
    total_seconds: float = 0.0

    def record(self, step: int, seconds: float, value: float) -> None:
        """Add one evaluation."""
        self.steps.append(step)
        self.seconds.append(seconds)
        self.valid_reward.append(value)

    def log(self, stats: dict[str, float]) -> None:
        """Append one update's named numbers to :attr:`extra`."""
        for name, value in stats.items():
            self.extra.setdefault(name, []).append(float(value))


#: ``loss_fn(model, batch, rollout, advantages)``: the loss, or the loss and named
#: numbers to log (averaged over the update's optimizer steps)
LossFn = Callable[
    [nn.Module, Batch, Rollout, Tensor], Tensor | tuple[Tensor, dict[str, float]]
]


def _update_parts(
    roll: Rollout,
    advantages: Tensor,
    estimator: Estimator,
    epochs: int,
    minibatches: int,
    generator: torch.Generator | None,
) -> Iterator[tuple[Rollout, Tensor]]:
    """The (rollout, advantages) of each optimizer step of one update: ``epochs``
    passes, each over ``minibatches`` shuffled minibatches of whole groups (the whole
    rollout itself, and no random draw, when there is one minibatch)."""
    sources, k = roll.rewards.shape
    if minibatches > sources:
        raise ValueError(
            f"{minibatches} minibatches of whole groups need at least as many "
            f"sources, got {sources}"
        )

    def parts() -> Iterator[tuple[Rollout, Tensor]]:
        for _ in range(epochs):
            if minibatches == 1:
                yield roll, advantages
                continue
            order = torch.randperm(sources, generator=generator)
            for chosen in order.tensor_split(minibatches):
                rows = _group_rows(chosen, k) if estimator.token_level else chosen
                yield roll.select(chosen), advantages[rows.to(advantages.device)]

    return parts()


def policy_update_loop(
    model: nn.Module,
    batches: Iterator[Batch],
    sample: Callable[[nn.Module, Batch, StepTimes], Rollout],
    estimator: Estimator,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    steps: int,
    evaluate: Callable[[nn.Module], float],
    eval_every: int,
    start_value: float | None = None,
    precision: str = "fp32",
    ma_beta: float = 0.9,
    clip_norm: float = 1.0,
    epochs: int = 1,
    minibatches: int = 1,
    generator: torch.Generator | None = None,
    world: World = SINGLE,
    loss_items: Callable[[Rollout], float] | None = None,
) -> FineTuneHistory:
    """``steps`` policy-gradient updates of ``model``; returns its learning curve.

    Each update takes the next batch, draws a rollout with ``sample(model, batch,
    times)`` (which must decode greedily if ``estimator.needs_greedy`` and fill
    ``Rollout.values`` if ``estimator.needs_values``), turns it into advantages with
    ``estimator.rollout_advantages`` ((B, K), or (B*K, T) for a token-level estimator;
    keeping a :class:`MovingAverage` of rate ``ma_beta`` only if the estimator needs a
    history), and then makes ``epochs`` passes over the rollout, each in
    ``minibatches`` minibatches of whole groups (the B sources shuffled with
    ``generator`` each pass; with one minibatch nothing is drawn). Each minibatch is
    one step of ``optimizer`` on ``loss_fn(model, batch, rollout, advantages)`` with
    that minibatch's rollout (:meth:`Rollout.select`) and advantages (``batch`` is
    always the whole batch), gradients of ``model``'s parameters clipped to
    ``clip_norm``, under autocast in ``precision``. Train a value head by making it a
    submodule of ``model``. A ratio loss takes the rollout's sampling-time
    ``log_probs`` as the old policy, so the steps after the first of an update are
    off-policy and its clipping matters (PPO, GRPO with several iterations); with the
    defaults (one epoch, one minibatch) each rollout makes one on-policy step.

    Dropout stays off throughout, so the sampling policy and the differentiated policy
    coincide. ``evaluate(model)`` is recorded at step 0 (``start_value`` when it is
    already known), every ``eval_every`` updates and at the end; its time is not
    counted as training time. Besides, per update: the rollout's mean reward, the
    training seconds so far, the mean gradient norm, and in ``history.extra`` the
    rollout's ``stats`` and the means of the numbers ``loss_fn`` returns.

    With several processes (``world``, under ``torchrun``) every rank draws the same
    global batches and keeps its rows (:func:`distributed.shard`, whole groups: each
    source with all its samples), which must split evenly; ``sample`` sees only those
    (it should draw with a generator of its own rank,
    :func:`distributed.rank_generator`). The advantages are computed per rank (every
    estimator's baseline is per sample or per group), except the moving average, which
    is fed the reward mean of the global batch. ``loss_fn`` runs through
    ``DistributedDataParallel``; each rank's loss is weighted by its share of
    ``loss_items(rollout)``, what the loss averages over (default: sequences, whose
    shares are equal), so the update is the one of the global batch. The logged
    rewards and numbers are global means; evaluation runs on every rank alike.
    """
    if steps < 1:
        raise ValueError(f"steps must be positive, got {steps}")
    if eval_every < 1:
        raise ValueError(f"eval_every must be positive, got {eval_every}")
    if epochs < 1 or minibatches < 1:
        raise ValueError(
            f"epochs and minibatches must be positive, got {epochs}, {minibatches}"
        )
    device_type = next(model.parameters()).device.type
    dtype = autocast_dtype(precision, device_type)
    average = MovingAverage(ma_beta) if estimator.needs_history else None
    history = FineTuneHistory(estimator.name)
    objective = distributed.wrap_loss(model, loss_fn, world)

    def count(roll: Rollout) -> float:
        return float(roll.tokens.shape[0] if loss_items is None else loss_items(roll))

    def weight(roll: Rollout) -> float:
        """The factor on this rank's loss: its share of the global items times the
        number of ranks (DDP averages), 1 for one process."""
        if world.size == 1:
            return 1.0
        own = count(roll)
        return own * world.size / distributed.all_sum(own, world)

    def autocast() -> torch.autocast:
        return torch.autocast(
            device_type, dtype=dtype or torch.bfloat16, enabled=dtype is not None
        )

    elapsed = 0.0
    model.eval()
    history.record(0, elapsed, evaluate(model) if start_value is None else start_value)
    for step in range(1, steps + 1):
        began = time.perf_counter()
        batch = _own_rows(next(batches), world)
        model.eval()
        with autocast():
            roll = sample(model, batch, history.times)
            back = time.perf_counter()
            advantages = estimator.rollout_advantages(
                roll, None if average is None else average.value
            )
            reward_sum, reward_count, *roll_stats = distributed.all_sums(
                [float(roll.rewards.sum()), roll.rewards.numel(), *roll.stats.values()],
                world,
            )
            # one process: the mean as it always was computed (the same bits)
            mean_reward = (
                float(roll.rewards.mean())
                if world.size == 1
                else reward_sum / reward_count
            )
            if average is not None:
                average.add(mean_reward)
            parts = _update_parts(
                roll, advantages, estimator, epochs, minibatches, generator
            )
            # the first step's loss in the sampling's autocast region (whose cached
            # low-precision weights are still current); each later step's in its own,
            # since the optimizer has changed the weights by then
            part = next(parts)
            out = objective(batch, *part)
        history.train_reward.append(mean_reward)
        norms: list[float] = []
        sums: dict[str, float] = {}
        for index in range(epochs * minibatches):
            if index > 0:
                part = next(parts)
                with autocast():
                    out = objective(batch, *part)
            loss, stats = out if isinstance(out, tuple) else (out, {})
            factor = weight(part[0])
            for name, value in stats.items():
                value = value.detach() if isinstance(value, Tensor) else value
                sums[name] = sums.get(name, 0.0) + float(value) * factor
            optimizer.zero_grad(set_to_none=True)
            (loss * factor if world.size > 1 else loss).backward()
            norms.append(
                float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm))
            )
            optimizer.step()
        history.times.backward += time.perf_counter() - back
        elapsed += time.perf_counter() - began
        history.update_seconds.append(elapsed)
        history.grad_norm.append(sum(norms) / len(norms))
        history.log(
            {n: v / world.size for n, v in zip(roll.stats, roll_stats, strict=True)}
        )
        loss_sums = distributed.all_sums(list(sums.values()), world)
        history.log(
            {
                n: v / world.size / len(norms)
                for n, v in zip(sums, loss_sums, strict=True)
            }
        )
        if step % eval_every == 0 or step == steps:
            model.eval()
            history.record(step, elapsed, evaluate(model))
    history.total_seconds = elapsed
    model.eval()
    return history


def _own_rows(batch: Batch, world: World) -> Batch:
    """This rank's rows of a global batch of sources, which must split evenly."""
    if world.size == 1:
        return batch
    rows = distributed.count_rows(batch)
    if rows % world.size:
        raise ValueError(
            f"a batch of {rows} sources does not split evenly over {world.size} "
            "processes; choose a batch size that is a multiple of their number"
        )
    return distributed.shard(batch, world)


def flat_grad(model: torch.nn.Module) -> Tensor:
    """All parameter gradients concatenated into one vector (zeros where a gradient is missing)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.cat(
        [
            (p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
            for p in params
        ]
    )


def entropy_and_rank(
    model: EncoderDecoder, src: Tensor, tgt: Tensor, pad_id: int
) -> tuple[float, float, float]:
    """Peakiness under teacher forcing on references: mean entropy (nats) of the next-token
    distribution, mean rank of the reference token (1 = top) and the share where it is top-1."""
    device = next(model.parameters()).device
    src, tgt = src.to(device), tgt.to(device)
    with torch.no_grad():
        logits = model(src, tgt[:, :-1], pad_id=pad_id).float()
        gold = tgt[:, 1:]
        mask = gold != pad_id
        logp = torch.log_softmax(logits, dim=-1)
        entropy = -(logp.exp() * logp).sum(-1)
        gold_logit = logits.gather(-1, gold[..., None])
        rank = (logits > gold_logit).sum(-1) + 1
        return (
            float(entropy[mask].mean()),
            float(rank[mask].float().mean()),
            float((rank[mask] == 1).float().mean()),
        )
