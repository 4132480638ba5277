"""REINFORCE for sequences: baselines, the surrogate loss, and an exactly checkable toy policy.

The estimator of the gradient of the expected reward :math:`J(\\theta)=E_{y\\sim\\pi_\\theta}[R(y)]` is

.. math:: \\hat g = \\frac{1}{N}\\sum_i (R(y_i) - b_i)\\, \\nabla_\\theta \\log \\pi_\\theta(y_i),
   \\qquad \\log \\pi_\\theta(y) = \\sum_t \\log \\pi_\\theta(y_t \\mid y_{<t}, x),

implemented as the surrogate loss ``-(R - b).detach() * log_prob`` whose gradient is
:math:`-\\hat g`. The four estimators differ only in the baseline ``b``:

* ``none``: ``b = 0``;
* ``moving-average``: an exponential moving average of past batch-mean rewards;
* ``self-critical``: the reward of the greedy decode of the same source (Rennie et al. 2017);
* ``leave-one-out``: the mean reward of the *other* K-1 samples of the same source (RLOO).

A baseline that does not depend on the sample it multiplies leaves the estimator
unbiased; the toy :class:`TabularSequencePolicy` lets the notebook check that by
enumerating every sequence.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .generation import sequence_log_probs, translate
from .transformer import EncoderDecoder

ESTIMATORS: tuple[str, ...] = (
    "none",
    "moving-average",
    "self-critical",
    "leave-one-out",
)


def check_estimator(name: str) -> str:
    """Return ``name`` if it is a known estimator, else raise ``ValueError`` listing them."""
    if name not in ESTIMATORS:
        raise ValueError(
            f"unknown estimator {name!r}; valid estimators are: {', '.join(ESTIMATORS)}"
        )
    return name


def _check_rewards(rewards: Tensor) -> None:
    if rewards.dim() != 2 or rewards.numel() == 0:
        raise ValueError(
            f"rewards must be a non-empty (sources, samples) tensor, got shape {tuple(rewards.shape)}"
        )
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards contain NaN or infinite values")


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
    """Exponential moving average baseline ``b <- beta * b + (1 - beta) * mean(R)`` (starts at the first mean)."""

    def __init__(self, beta: float = 0.9):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        self.beta = beta
        self.value: float | None = None

    def update(self, rewards: Tensor) -> None:
        mean = float(rewards.mean())
        self.value = (
            mean
            if self.value is None
            else self.beta * self.value + (1 - self.beta) * mean
        )


def baseline(
    estimator: str,
    rewards: Tensor,
    greedy_rewards: Tensor | None = None,
    moving_average: MovingAverage | float | None = None,
) -> Tensor:
    """The baseline (B, K) that ``estimator`` subtracts from ``rewards`` (B, K).

    ``self-critical`` needs ``greedy_rewards`` (B,); ``moving-average`` uses the value
    *before* this batch is added (so b does not depend on the current samples; 0 at first).
    """
    check_estimator(estimator)
    _check_rewards(rewards)
    if estimator == "none":
        return torch.zeros_like(rewards)
    if estimator == "leave-one-out":
        return leave_one_out_baseline(rewards)
    if estimator == "self-critical":
        if greedy_rewards is None or greedy_rewards.shape != rewards.shape[:1]:
            raise ValueError(
                f"self-critical needs greedy_rewards of shape ({rewards.shape[0]},)"
            )
        if not bool(torch.isfinite(greedy_rewards).all()):
            raise ValueError("greedy rewards contain NaN or infinite values")
        return greedy_rewards[:, None].expand_as(rewards).to(rewards.dtype)
    value = (
        moving_average.value
        if isinstance(moving_average, MovingAverage)
        else moving_average
    )
    return torch.full_like(rewards, 0.0 if value is None else float(value))


def reinforce_loss(log_probs: Tensor, rewards: Tensor, baselines: Tensor) -> Tensor:
    """Surrogate loss ``-mean((R - b) * log pi(y))``; its gradient is minus the REINFORCE estimate.

    All three are (B, K). ``R - b`` is detached: rewards are not differentiated. If every
    advantage is zero the loss (and its gradient) is exactly zero, never NaN.
    """
    if log_probs.shape != rewards.shape or baselines.shape != rewards.shape:
        raise ValueError(
            f"shapes differ: log_probs {tuple(log_probs.shape)}, rewards {tuple(rewards.shape)}, "
            f"baselines {tuple(baselines.shape)}"
        )
    _check_rewards(rewards)
    if not bool(torch.isfinite(baselines).all()):
        raise ValueError("baselines contain NaN or infinite values")
    advantage = (rewards - baselines).detach().to(log_probs.dtype)
    return -(advantage * log_probs).mean()


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
        estimator: str = "none",
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """``estimates`` independent REINFORCE gradients, each from ``samples_per_estimate`` samples.

        Returns (estimates, theta.numel()). ``estimator`` is ``none`` or ``leave-one-out``
        (the other baselines need a model to decode greedily or a training history).
        """
        if estimator not in ("none", "leave-one-out"):
            raise ValueError(
                f"the toy policy supports 'none' and 'leave-one-out', got {estimator!r}"
            )
        m = samples_per_estimate
        seqs = self.sample(estimates * m, generator)
        rewards = reward(seqs).to(self.theta.dtype).reshape(estimates, m)
        b = baseline(estimator, rewards)
        scores = self.score_function(seqs).reshape(estimates, m, -1)
        return ((rewards - b)[..., None] * scores).mean(dim=1)


# ---------------------------------------------------------------------------------------------
# One policy-gradient update of the translation model
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


@dataclass
class Rollout:
    """K sampled translations per source, their rewards (B, K), greedy rewards (B,) if decoded, lengths."""

    tokens: Tensor
    src: Tensor
    rewards: Tensor
    greedy_rewards: Tensor | None
    hypotheses: list[str] = field(default_factory=list)


def rollout(
    model: EncoderDecoder,
    src: Tensor,
    references: Sequence[str],
    decode: Callable[[Sequence[int]], str],
    reward_fn: Callable[[list[str], list[str]], list[float]],
    bos_id: int,
    eos_id: int,
    pad_id: int,
    samples: int,
    max_len: int,
    greedy: bool = False,
    generator: torch.Generator | None = None,
    times: StepTimes | None = None,
) -> Rollout:
    """Sample ``samples`` translations of every source (batched, KV cache) and score them.

    With ``greedy`` also decodes and scores the greedy translation (self-critical's baseline).
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if src.shape[0] != len(references):
        raise ValueError(f"{src.shape[0]} sources but {len(references)} references")
    times = times if times is not None else StepTimes()
    began = time.perf_counter()
    repeated = src.repeat_interleave(samples, dim=0)
    tokens = translate(
        model,
        repeated,
        bos_id,
        eos_id,
        pad_id,
        max_len,
        temperature=1.0,
        generator=generator,
    )
    greedy_tokens = (
        translate(model, src, bos_id, eos_id, pad_id, max_len) if greedy else None
    )
    times.sampling += time.perf_counter() - began
    began = time.perf_counter()
    hypotheses = [decode(row) for row in tokens.tolist()]
    refs = [r for r in references for _ in range(samples)]
    rewards = torch.tensor(
        reward_fn(hypotheses, refs), dtype=torch.float32, device=src.device
    ).reshape(src.shape[0], samples)
    greedy_rewards = None
    if greedy_tokens is not None:
        greedy_hyps = [decode(row) for row in greedy_tokens.tolist()]
        greedy_rewards = torch.tensor(
            reward_fn(greedy_hyps, list(references)),
            dtype=torch.float32,
            device=src.device,
        )
    times.reward += time.perf_counter() - began
    times.samples += tokens.shape[0]
    return Rollout(tokens, repeated, rewards, greedy_rewards, hypotheses)


def policy_log_probs(
    model: EncoderDecoder, roll: Rollout, eos_id: int, pad_id: int
) -> Tensor:
    """log pi(y) of every sample (B, K), with gradients, counting tokens up to and including EOS."""
    logp, _ = sequence_log_probs(model, roll.src, roll.tokens, eos_id, pad_id)
    return logp.reshape(roll.rewards.shape)


def flat_grad(model: torch.nn.Module) -> Tensor:
    """All parameter gradients concatenated into one vector (zeros where a gradient is missing)."""
    params = {id(p): p for p in model.parameters() if p.requires_grad}.values()
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
