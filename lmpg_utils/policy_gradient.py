"""Policy gradient as parts: advantage estimators, losses, rollouts and one update loop.

The REINFORCE estimate of the gradient of the expected reward
:math:`J(\\theta)=E_{y\\sim\\pi_\\theta}[R(y)]` is

.. math:: \\hat g = \\frac{1}{N}\\sum_i (R(y_i) - b_i)\\, \\nabla_\\theta \\log \\pi_\\theta(y_i),
   \\qquad \\log \\pi_\\theta(y) = \\sum_t \\log \\pi_\\theta(y_t \\mid y_{<t}, x),

implemented as the surrogate loss ``-(R - b).detach() * log_prob``
(:func:`reinforce_loss`) whose gradient is :math:`-\\hat g`. The estimators of
:data:`ESTIMATORS` differ only in the baseline ``b`` and declare what it needs:

* ``none``: ``b = 0``;
* ``moving-average``: an exponential moving average of past batch-mean rewards
  (``needs_history``: the loop keeps a :class:`MovingAverage` for it alone);
* ``self-critical``: the reward of the greedy decode of the same source (Rennie et al.
  2017; ``needs_greedy``: the rollout also decodes greedily);
* ``leave-one-out``: the mean reward of the *other* K-1 samples of the same source (RLOO).

A baseline that does not depend on the sample it multiplies leaves the estimator
unbiased; the toy :class:`TabularSequencePolicy` lets the notebook check that by
enumerating every sequence. Beside the REINFORCE surrogate, :func:`clipped_ratio_loss`
(PPO's clipped surrogate, per token) and :func:`kl_penalty` (per-token estimates of the
KL divergence to a reference policy) are the parts RLHF adds. :func:`rollout` samples
and scores translations as described by a :class:`Decoding`, and
:func:`policy_update_loop` is the one loop that turns rollouts into updates.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import Tensor, nn

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
        mean = float(rewards.mean())
        self.value = (
            mean
            if self.value is None
            else self.beta * self.value + (1 - self.beta) * mean
        )


@dataclass(frozen=True)
class Estimator:
    """An advantage estimator: a name, what it needs, and its baseline.

    ``needs_greedy``: the greedy decode's rewards (B,) must be passed;
    ``needs_history``: the value of a :class:`MovingAverage` of past rewards (the value
    *before* the current batch is added, so ``b`` does not depend on the current
    samples; ``None`` at first); ``min_samples``: the samples per source it needs.
    """

    name: str
    needs_greedy: bool = False
    needs_history: bool = False
    min_samples: int = 1

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


#: the one list of estimator names (the command line and configs take their choices here)
ESTIMATORS: dict[str, Estimator] = {
    e.name: e
    for e in (NoBaseline(), MovingAverageBaseline(), SelfCritical(), LeaveOneOut())
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


def clipped_ratio_loss(
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip: float = 0.2,
) -> Tensor:
    """PPO's clipped surrogate (the loss of PPO and GRPO), averaged over the masked tokens.

    Per token, with the ratio ``r = exp(log_probs - old_log_probs)`` of the current policy
    to the one that sampled: ``-min(r A, clip(r, 1 - clip, 1 + clip) A)``. Where the
    clipped term is the smaller one the loss has no gradient, so one rollout cannot push
    the policy far from the sampling policy. ``log_probs``, ``old_log_probs`` and
    ``mask`` are (B, T); ``advantages`` is (B,) per sequence or (B, T) per token.
    ``old_log_probs`` and ``advantages`` are detached.
    """
    if not 0.0 < clip < 1.0:
        raise ValueError(f"clip must be in (0, 1), got {clip}")
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(log_probs)
    _check_per_token(
        mask, log_probs=log_probs, old_log_probs=old_log_probs, advantages=advantages
    )
    advantages = advantages.detach().to(log_probs.dtype)
    ratio = torch.exp(log_probs - old_log_probs.detach())
    surrogate = torch.minimum(
        ratio * advantages, ratio.clamp(1.0 - clip, 1.0 + clip) * advantages
    )
    return -(surrogate * mask).sum() / mask.sum()


KL_KINDS: tuple[str, ...] = ("k1", "k3")


def kl_penalty(
    log_probs: Tensor, ref_log_probs: Tensor, mask: Tensor, kind: str = "k1"
) -> Tensor:
    """Per-sequence estimates (B,) of KL(pi || ref) from tokens sampled from ``pi``.

    Sums over the masked tokens of (B, T) per-token estimates, with
    ``d = ref_log_probs - log_probs``: ``k1 = -d`` (unbiased, can be negative) or
    ``k3 = exp(d) - 1 - d`` (unbiased and never negative, lower variance; Schulman 2020).
    Each has the sequence KL as its expectation under ``pi``.
    """
    if kind not in KL_KINDS:
        raise ValueError(f"unknown KL estimator {kind!r}; choose one of {KL_KINDS}")
    _check_per_token(mask, log_probs=log_probs, ref_log_probs=ref_log_probs)
    difference = ref_log_probs - log_probs
    terms = -difference if kind == "k1" else torch.expm1(difference) - difference
    return torch.where(mask, terms, torch.zeros_like(terms)).sum(dim=1)


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


@dataclass
class Rollout:
    """K sampled translations per source and what the losses need of them.

    ``tokens`` (B*K, T) start with BOS; ``src`` (B*K, S) is each source repeated K times;
    ``rewards`` (B, K); ``greedy_rewards`` (B,) when the decoding asked for them;
    ``log_probs`` (B*K, T-1) are the sampling-time per-token log-probabilities under the
    policy and ``mask`` (B*K, T-1) marks the tokens up to and including each EOS.
    """

    tokens: Tensor
    src: Tensor
    rewards: Tensor
    greedy_rewards: Tensor | None
    log_probs: Tensor
    mask: Tensor
    decoding: Decoding
    hypotheses: list[str] = field(default_factory=list)


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
    data), the mean sampled reward of every update, and where the time went."""

    method: str
    steps: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    valid_reward: list[float] = field(default_factory=list)
    train_reward: list[float] = field(default_factory=list)
    times: StepTimes = field(default_factory=StepTimes)
    total_seconds: float = 0.0

    def record(self, step: int, seconds: float, value: float) -> None:
        """Add one evaluation."""
        self.steps.append(step)
        self.seconds.append(seconds)
        self.valid_reward.append(value)


def policy_update_loop(
    model: nn.Module,
    batches: Iterator[Batch],
    sample: Callable[[nn.Module, Batch, StepTimes], Rollout],
    estimator: Estimator,
    loss_fn: Callable[[nn.Module, Batch, Rollout, Tensor], Tensor],
    optimizer: torch.optim.Optimizer,
    steps: int,
    evaluate: Callable[[nn.Module], float],
    eval_every: int,
    start_value: float | None = None,
    precision: str = "fp32",
    ma_beta: float = 0.9,
    clip_norm: float = 1.0,
) -> FineTuneHistory:
    """``steps`` policy-gradient updates of ``model``; returns its learning curve.

    Each update takes the next batch, draws a rollout with ``sample(model, batch,
    times)`` (which must decode greedily if ``estimator.needs_greedy``), turns its
    rewards into advantages with ``estimator`` (keeping a :class:`MovingAverage` of
    rate ``ma_beta`` only if the estimator needs a history), and steps ``optimizer`` on
    ``loss_fn(model, batch, rollout, advantages)`` with gradients clipped to
    ``clip_norm``, under autocast in ``precision``. Dropout stays off throughout, so the
    sampling policy and the differentiated policy coincide. ``evaluate(model)`` is
    recorded at step 0 (``start_value`` when it is already known), every
    ``eval_every`` updates and at the end; its time is not counted as training time.
    """
    if steps < 1:
        raise ValueError(f"steps must be positive, got {steps}")
    if eval_every < 1:
        raise ValueError(f"eval_every must be positive, got {eval_every}")
    device_type = next(model.parameters()).device.type
    dtype = autocast_dtype(precision, device_type)
    average = MovingAverage(ma_beta) if estimator.needs_history else None
    history = FineTuneHistory(estimator.name)
    elapsed = 0.0
    model.eval()
    history.record(0, elapsed, evaluate(model) if start_value is None else start_value)
    for step in range(1, steps + 1):
        began = time.perf_counter()
        batch = next(batches)
        model.eval()
        with torch.autocast(
            device_type, dtype=dtype or torch.bfloat16, enabled=dtype is not None
        ):
            roll = sample(model, batch, history.times)
            back = time.perf_counter()
            advantages = estimator.advantages(
                roll.rewards,
                roll.greedy_rewards,
                None if average is None else average.value,
            )
            if average is not None:
                average.update(roll.rewards)
            loss = loss_fn(model, batch, roll, advantages)
        history.train_reward.append(float(roll.rewards.mean()))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
        optimizer.step()
        history.times.backward += time.perf_counter() - back
        elapsed += time.perf_counter() - began
        if step % eval_every == 0 or step == steps:
            model.eval()
            history.record(step, elapsed, evaluate(model))
    history.total_seconds = elapsed
    model.eval()
    return history


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
