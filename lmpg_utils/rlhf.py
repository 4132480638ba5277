"""Chapter 5's task: continue a verse so that a judge hears another part of the Bible.

A prompt is ``<s>`` and the first few words of a verse from one book group (by default
*law & history*). The policy, chapter 2's GPT, writes a continuation up to ``</s>`` or
``max_new_tokens``. A judge, chapter 3's BERT fine-tuned to tell the four book groups
apart (:mod:`lmpg_utils.judges`), reads the whole verse (prompt and continuation) and
the reward is the log-probability it gives the target group (by default *poetry &
wisdom*). The fine-tuning objective is the KL-regularised reward

.. math:: J(\\theta) = E_{y \\sim \\pi_\\theta}[r(x, y)] - \\beta\\,
   \\mathrm{KL}(\\pi_\\theta(\\cdot \\mid x) \\,\\|\\, \\pi_{\\mathrm{ref}}(\\cdot \\mid x)),

with the frozen GPT as :math:`\\pi_{\\mathrm{ref}}`. This module holds the task (prompts,
sampling, rendering, rewards), the evaluation (proxy and gold reward, KL, distinct-2,
perplexity under the reference) and the two controls that need no reinforcement
learning: supervised fine-tuning on target-group verses (SFT) and best-of-N sampling.
The methods themselves are parts of :mod:`lmpg_utils.policy_gradient`.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import corpora, distributed
from .bert.book_groups import BOOK_GROUPS, book_group_of
from .distributed import SINGLE, World
from .generation import continuation_log_probs, forbid, sample_continuations
from .judges import render
from .language_modeling import lm_loss
from .metrics import distinct_n
from .policy_gradient import (
    AGGREGATIONS,
    ESTIMATORS,
    Decoding,
    FineTuneHistory,
    Rollout,
    StepTimes,
    aggregate_tokens,
    clipped_ratio_loss,
    flat_grad,
    kl_penalty,
    policy_update_loop,
    reinforce_loss,
    terminal_rewards,
    value_loss,
    whiten,
)
from .tokenization import WordVocab
from .training import TrainHistory, bucketed_batches, make_optimizer, train
from .transformer import GPT, ValueHead


class Judge(Protocol):
    """What the task needs of a reward model: log p(group | text) for each text."""

    def log_probs(self, texts: Sequence[str]) -> Tensor: ...


@dataclass(frozen=True)
class Task:
    """Which group the prompts come from, which group the judge should hear, and sizes."""

    source_group: str = "law & history"
    target_group: str = "poetry & wisdom"
    prompt_words: int = 4
    max_new_tokens: int = 20

    def __post_init__(self) -> None:
        for name in ("source_group", "target_group"):
            if getattr(self, name) not in BOOK_GROUPS:
                raise ValueError(
                    f"{name} must be one of {', '.join(BOOK_GROUPS)}, "
                    f"got {getattr(self, name)!r}"
                )
        if self.source_group == self.target_group:
            raise ValueError("source_group and target_group must differ")
        for name in ("prompt_words", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"{name} must be at least 1, got {getattr(self, name)}"
                )

    @property
    def target(self) -> int:
        """The target group's label (its index in :data:`BOOK_GROUPS`)."""
        return list(BOOK_GROUPS).index(self.target_group)

    @property
    def source(self) -> int:
        return list(BOOK_GROUPS).index(self.source_group)


def render_words(ids: Sequence[int], vocab: WordVocab) -> str:
    """The text a judge reads for word ids that may hold ``<s>``, ``</s>`` and padding
    (dropped): :func:`lmpg_utils.judges.render` of the words."""
    drop = {vocab.bos_id, vocab.eos_id, vocab.pad_id}
    return render([int(i) for i in ids if int(i) not in drop], vocab)


def group_verses(vocab: WordVocab, split: str, group: int) -> list[list[int]]:
    """Word ids (no ``<s>``/``</s>``) of the WEB verses of one book group in ``split``."""
    return [
        vocab.encode(v.text)
        for v in corpora.load_bible_verses(split)
        if book_group_of(v.book) == group
    ]


def make_prompts(
    vocab: WordVocab, split: str, task: Task, count: int, seed: int
) -> Tensor:
    """``count`` prompts (count, prompt_words + 1): ``<s>`` and the first words of
    source-group verses of ``split`` that are at least two words longer than a prompt,
    drawn without replacement with ``seed``. Too few such verses is a ``ValueError``."""
    verses = [
        v
        for v in group_verses(vocab, split, task.source)
        if len(v) >= task.prompt_words + 2
    ]
    if count > len(verses):
        raise ValueError(
            f"{split} has {len(verses)} {task.source_group!r} verses long enough "
            f"for a prompt, {count} were asked for"
        )
    chosen = random.Random(seed).sample(verses, count)
    return torch.tensor([[vocab.bos_id, *v[: task.prompt_words]] for v in chosen])


@dataclass
class Samples:
    """``k`` continuations of each of B prompts, as rows ``b * k + i``."""

    prompts: Tensor  # (B * k, P), each prompt repeated k times
    tokens: Tensor  # (B * k, T), padding after </s>
    log_probs: Tensor  # (B * k, T) under the sampling policy, when drawn
    mask: Tensor  # (B * k, T), True up to and including </s>
    texts: list[str]  # the whole verses a judge reads
    k: int

    @property
    def lengths(self) -> Tensor:
        return self.mask.sum(dim=1)


def sample(
    policy: GPT,
    prompts: Tensor,
    k: int,
    task: Task,
    vocab: WordVocab,
    generator: torch.Generator | None = None,
) -> Samples:
    """Draw ``k`` continuations of every prompt from ``policy`` (``<s>`` never, PAD
    never) and render the verses."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    repeated = prompts.repeat_interleave(k, dim=0)
    tokens, log_probs, mask = sample_continuations(
        policy,
        repeated,
        task.max_new_tokens,
        eos_id=vocab.eos_id,
        pad_id=vocab.pad_id,
        forbidden=(vocab.bos_id,),
        generator=generator,
    )
    texts = [
        render_words([*p.tolist(), *t[m].tolist()], vocab)
        for p, t, m in zip(repeated, tokens, mask, strict=True)
    ]
    return Samples(repeated, tokens, log_probs, mask, texts, k)


def continuations(drawn: Samples, vocab: WordVocab) -> list[str]:
    """The continuations alone, rendered (the prompts left out)."""
    return [
        render_words(t[m].tolist(), vocab)
        for t, m in zip(drawn.tokens, drawn.mask, strict=True)
    ]


def token_log_probs(model: GPT, samples: Samples, vocab: WordVocab) -> Tensor:
    """Per-token log-probabilities (B * k, T) of the samples' continuations under
    ``model`` (the policy being trained, or the reference), with gradients if enabled."""
    return continuation_log_probs(
        model,
        samples.prompts,
        samples.tokens,
        samples.mask,
        pad_id=vocab.pad_id,
        forbidden=(vocab.bos_id,),
    )


def rewards(judge: Judge, texts: Sequence[str], task: Task) -> Tensor:
    """log p(target group | text) for each text (what the policy maximises)."""
    return judge.log_probs(texts)[:, task.target]


@dataclass
class Evaluation:
    """A policy on held-out prompts: rewards under the proxy judge (the one trained
    against) and the gold judge (never seen), the KL to the reference, diversity."""

    proxy: float
    proxy_se: float
    gold: float
    gold_se: float
    gold_target_share: float  # share of verses the gold judge assigns to the target
    kl: float  # mean over samples of sum_t log pi(y_t) - log pi_ref(y_t): unbiased
    kl_se: float
    distinct_2: float
    reference_perplexity: float  # of the continuations, under the reference
    mean_length: float  # continuation tokens, </s> included
    examples: list[str] = field(default_factory=list, repr=False)

    def row(self) -> dict[str, float]:
        """The numbers, for a table."""
        return {k: v for k, v in self.__dict__.items() if isinstance(v, (int, float))}


def _mean_se(values: Tensor) -> tuple[float, float]:
    values = values.double()
    se = float(values.std() / math.sqrt(len(values))) if len(values) > 1 else 0.0
    return float(values.mean()), se


@torch.no_grad()
def evaluate(
    policy: GPT,
    reference: GPT,
    prompts: Tensor,
    k: int,
    task: Task,
    vocab: WordVocab,
    proxy: Judge,
    gold: Judge,
    seed: int,
    examples: int = 4,
) -> Evaluation:
    """Sample ``k`` continuations of each held-out prompt (a fixed sampling ``seed``, so
    two policies are compared on the same random numbers) and score them."""
    generator = torch.Generator(device=prompts.device).manual_seed(seed)
    drawn = sample(policy, prompts, k, task, vocab, generator)
    return score(drawn, reference, task, vocab, proxy, gold, examples)


@torch.no_grad()
def score(
    drawn: Samples,
    reference: GPT,
    task: Task,
    vocab: WordVocab,
    proxy: Judge,
    gold: Judge,
    examples: int = 4,
    kl: Tensor | None = None,
) -> Evaluation:
    """The :class:`Evaluation` of samples already drawn. ``kl`` (one value per sample)
    replaces the sampled KL estimate when the KL is known another way (best-of-N)."""
    reference_log_probs = token_log_probs(reference, drawn, vocab)
    if kl is None:
        kl = (drawn.log_probs - reference_log_probs).sum(dim=1)
    gold_log_probs = gold.log_probs(drawn.texts)
    proxy_mean, proxy_se = _mean_se(rewards(proxy, drawn.texts, task))
    gold_mean, gold_se = _mean_se(gold_log_probs[:, task.target])
    kl_mean, kl_se = _mean_se(kl)
    tokens = drawn.mask.sum()
    return Evaluation(
        proxy=proxy_mean,
        proxy_se=proxy_se,
        gold=gold_mean,
        gold_se=gold_se,
        gold_target_share=float(
            (gold_log_probs.argmax(dim=1) == task.target).double().mean()
        ),
        kl=kl_mean,
        kl_se=kl_se,
        distinct_2=_distinct_2(continuations(drawn, vocab)),
        reference_perplexity=math.exp(-float(reference_log_probs.sum() / tokens)),
        mean_length=float(drawn.lengths.double().mean()),
        examples=drawn.texts[: examples * drawn.k : drawn.k],
    )


def reward_at_kl(path: Sequence[Evaluation], kl: float, judge: str) -> float:
    """The held-out reward (``judge``: ``"proxy"`` or ``"gold"``) of a run whose
    evaluations are ``path``, where the path first reaches ``kl``: linear interpolation
    between evaluations over the furthest KL reached so far; NaN if it never gets that
    far. Compares runs, and controls, at equal KL."""
    if judge not in ("proxy", "gold"):
        raise ValueError(f"judge must be 'proxy' or 'gold', got {judge!r}")
    if not path:
        raise ValueError("the path has no evaluations")
    reach = [path[0].kl]
    for evaluation in path[1:]:
        reach.append(max(reach[-1], evaluation.kl))
    if kl > reach[-1]:
        return math.nan
    values = [getattr(e, judge) for e in path]
    for i in range(1, len(path)):
        if kl <= reach[i] and reach[i] > reach[i - 1]:
            share = (kl - reach[i - 1]) / (reach[i] - reach[i - 1])
            return values[i - 1] + max(0.0, share) * (values[i] - values[i - 1])
    return values[0]


def _distinct_2(texts: list[str]) -> float:
    """Distinct-2 of the continuations; 0 when none has two words (a policy that only
    ends the verse has no diversity to measure)."""
    if all(len(text.split()) < 2 for text in texts):
        return 0.0
    return distinct_n(texts, 2)


def best_of_n_kl(n: int) -> float:
    """The KL of best-of-``n`` sampling from its base policy, ``log n - (n - 1) / n``
    (Stiennon et al. 2020, appendix G; an upper bound when rewards can tie)."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    return math.log(n) - (n - 1) / n


@torch.no_grad()
def best_of_n(
    reference: GPT,
    prompts: Tensor,
    n: int,
    task: Task,
    vocab: WordVocab,
    proxy: Judge,
    gold: Judge,
    seed: int,
) -> Evaluation:
    """Best-of-``n``: for each prompt draw ``n`` continuations from the reference and keep
    the one the proxy judge likes best; no training. Its KL is :func:`best_of_n_kl`."""
    generator = torch.Generator(device=prompts.device).manual_seed(seed)
    drawn = sample(reference, prompts, n, task, vocab, generator)
    best = rewards(proxy, drawn.texts, task).view(-1, n).argmax(dim=1)
    rows = torch.arange(len(prompts), device=prompts.device) * n + best
    kept = Samples(
        drawn.prompts[rows],
        drawn.tokens[rows],
        drawn.log_probs[rows],
        drawn.mask[rows],
        [drawn.texts[int(i)] for i in rows],
        1,
    )
    kl = torch.full((len(prompts),), best_of_n_kl(n), dtype=torch.float64)
    return score(kept, reference, task, vocab, proxy, gold, kl=kl)


def supervised_control(
    policy: GPT,
    verses: Sequence[Sequence[int]],
    vocab: WordVocab,
    seconds: float,
    lr: float,
    batch_size: int,
    seed: int,
    max_steps: int = 100_000,
) -> TrainHistory:
    """SFT, the control without a reward: continue the policy's maximum-likelihood
    training on ``verses`` (target-group verses, word ids) for ``seconds`` of wall-clock
    time, with a constant learning rate after a short warm-up. Trains ``policy`` in
    place and returns its history."""
    if seconds <= 0:
        raise ValueError(f"seconds must be positive, got {seconds}")
    generator = torch.Generator().manual_seed(seed)
    device = next(policy.parameters()).device
    policy.requires_grad_(True)  # a copy of a reference that fine_tune froze
    batches = bucketed_batches(
        [[vocab.bos_id, *v, vocab.eos_id] for v in verses],
        batch_size,
        vocab.pad_id,
        generator,
    )
    return train(
        policy,
        batches,
        lambda model, batch: lm_loss(model, batch.to(device), vocab.pad_id),
        max_steps=max_steps,
        lr=lr,
        warmup_steps=5,
        time_budget_s=seconds,
        decay="constant",
        progress=False,
        description="SFT control",
    )


# ---------------------------------------------------------------------------------------------
# The methods: each is chapter 4's REINFORCE with another advantage, KL and loss
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """One fine-tuning method as a choice of parts of :mod:`policy_gradient`.

    ``estimator``: a name in :data:`~lmpg_utils.policy_gradient.ESTIMATORS`.
    ``kl``: where the KL leash goes: ``"reward"`` (the sequence's k1 estimate is
    subtracted from its reward, REINFORCE and RLOO), ``"loss"`` (a k3 term added to the
    loss, GRPO) or ``"token-reward"`` (-beta k1 on every token's reward, PPO).
    ``loss``: ``"reinforce"`` (the plain surrogate on sequence log-probabilities) or
    ``"clipped"`` (the clipped ratio, per token). ``aggregate``: how per-token terms
    become one number (:data:`~lmpg_utils.policy_gradient.AGGREGATIONS`). ``epochs``:
    optimizer passes over each rollout. ``value_head``: PPO's critic. ``whiten``: the
    policy term sees per-token advantages normalised over the batch's real tokens
    (:func:`~lmpg_utils.policy_gradient.whiten`, as PPO implementations do); the
    critic still regresses on the raw returns.
    """

    name: str
    estimator: str
    kl: str
    loss: str
    aggregate: str = "token-mean"
    epochs: int = 1
    value_head: bool = False
    whiten: bool = False

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"unknown estimator {self.estimator!r}")
        if self.kl not in ("reward", "loss", "token-reward"):
            raise ValueError(
                f"kl must be reward, loss or token-reward, got {self.kl!r}"
            )
        if self.loss not in ("reinforce", "clipped"):
            raise ValueError(f"loss must be reinforce or clipped, got {self.loss!r}")
        if self.aggregate not in AGGREGATIONS:
            raise ValueError(f"aggregate must be one of {AGGREGATIONS}")
        if self.value_head != ESTIMATORS[self.estimator].needs_values:
            raise ValueError("a value head exactly when the estimator needs values")
        if self.whiten and not ESTIMATORS[self.estimator].token_level:
            raise ValueError("whiten normalises per-token advantages (gae)")


#: the methods of chapter 5, the one list of their names
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("reinforce", "moving-average", kl="reward", loss="reinforce"),
        Method("rloo", "leave-one-out", kl="reward", loss="reinforce"),
        Method(
            "grpo",
            "group-normalized",
            kl="loss",
            loss="clipped",
            aggregate="sequence-mean",
            epochs=2,
        ),
        Method(
            "dr-grpo",
            "group-mean",
            kl="loss",
            loss="clipped",
            aggregate="constant",
            epochs=2,
        ),
        Method(
            "ppo",
            "gae",
            kl="token-reward",
            loss="clipped",
            epochs=2,
            value_head=True,
            whiten=True,
        ),
    )  # fmt: skip
}


class Policy(nn.Module):
    """The GPT being fine-tuned and, for PPO, a value head on its hidden states: one
    module, so one optimizer and one gradient clip see both."""

    def __init__(self, gpt: GPT, value_head: bool = False):
        super().__init__()
        self.gpt = gpt
        self.value = ValueHead(gpt.config.d_model) if value_head else None

    def outputs(self, drawn: Samples, vocab: WordVocab) -> tuple[Tensor, Tensor | None]:
        """Per-token log-probabilities of the samples' continuations (B * k, T), with
        gradients, and the value of the state before each token (or None)."""
        sequence = torch.cat([drawn.prompts, drawn.tokens], dim=1)[:, :-1]
        hidden = self.gpt.hidden_states(sequence)[:, drawn.prompts.shape[1] - 1 :]
        logits = forbid(self.gpt.head(hidden).float(), (vocab.bos_id, vocab.pad_id))
        chosen = F.log_softmax(logits, dim=-1).gather(-1, drawn.tokens[..., None])
        log_probs = torch.where(drawn.mask, chosen.squeeze(-1), 0.0)
        values = None if self.value is None else self.value(hidden).float()
        return log_probs, values


@dataclass(frozen=True)
class Leash:
    """The settings of one fine-tuning run: the method, the KL coefficient ``beta``,
    ``k`` samples per prompt, the clip range and the value loss's weight."""

    method: Method
    beta: float
    k: int
    clip: float = 0.2
    value_coef: float = 0.5

    def __post_init__(self) -> None:
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        need = ESTIMATORS[self.method.estimator].min_samples
        if self.k < need:
            raise ValueError(f"{self.method.name} needs k >= {need}, got {self.k}")
        if not 0 < self.clip < 1:
            raise ValueError(f"clip must be in (0, 1), got {self.clip}")


def _samples_of(roll: Rollout, k: int) -> Samples:
    """The :class:`Samples` a (possibly minibatch) rollout holds."""
    return Samples(roll.src, roll.tokens[:, 1:], roll.log_probs, roll.mask, [], k)


def rollout(
    policy: Policy,
    reference: GPT,
    prompts: Tensor,
    leash: Leash,
    task: Task,
    vocab: WordVocab,
    judge: Judge,
    generator: torch.Generator | None = None,
    times: StepTimes | None = None,
) -> Rollout:
    """Sample ``leash.k`` continuations of each prompt, score them with ``judge`` and put
    the KL leash where the method wants it. ``tokens`` are the continuations after the
    prompts' last token; ``rewards`` (B, k) are the judge's with the KL subtracted when
    the method folds it into the reward. ``times``, when given, gets the seconds spent
    sampling and scoring (the judge, the reference and the value head)."""
    with torch.no_grad():
        began = time.perf_counter()
        drawn = sample(policy.gpt, prompts, leash.k, task, vocab, generator)
        sampled = time.perf_counter()
        reference_log_probs = token_log_probs(reference, drawn, vocab)
        score = rewards(judge, drawn.texts, task).to(prompts.device)
        kl_tokens = torch.where(drawn.mask, drawn.log_probs - reference_log_probs, 0.0)
        kl = kl_tokens.sum(dim=1)
        values = policy.outputs(drawn, vocab)[1] if policy.value is not None else None
    if times is not None:
        times.sampling += sampled - began
        times.reward += time.perf_counter() - sampled
        times.samples += len(drawn.texts)
    method = leash.method
    sequence_rewards = score - leash.beta * kl if method.kl != "loss" else score
    token_rewards = None
    if method.kl == "token-reward":
        token_rewards = terminal_rewards(score, drawn.mask) - leash.beta * kl_tokens
    return Rollout(
        tokens=torch.cat([drawn.prompts[:, -1:], drawn.tokens], dim=1),
        src=drawn.prompts,
        rewards=sequence_rewards.view(-1, leash.k),
        greedy_rewards=None,
        log_probs=drawn.log_probs,
        mask=drawn.mask,
        decoding=Decoding(
            leash.k, task.max_new_tokens, vocab.bos_id, vocab.eos_id, vocab.pad_id
        ),
        hypotheses=drawn.texts,
        ref_log_probs=reference_log_probs,
        values=values,
        token_rewards=token_rewards,
        stats={
            "score": float(score.mean()),
            "kl": float(kl.mean()),
            "length": float(drawn.lengths.double().mean()),
        },
    )


def loss(
    policy: Policy, roll: Rollout, advantages: Tensor, leash: Leash, task: Task,
    vocab: WordVocab,
) -> tuple[Tensor, dict[str, Tensor]]:  # fmt: skip
    """The method's loss on a rollout (or a minibatch of it): the policy term, plus
    GRPO's k3 term and PPO's value loss."""
    method = leash.method
    log_probs, values = policy.outputs(_samples_of(roll, leash.k), vocab)
    constant = task.max_new_tokens if method.aggregate == "constant" else None
    if method.loss == "reinforce":
        policy_term = reinforce_loss(log_probs.sum(dim=1).view(-1, leash.k), advantages)
    else:
        token_level = ESTIMATORS[method.estimator].token_level
        weights = advantages if token_level else advantages.reshape(-1)
        if method.whiten:
            weights = whiten(advantages, roll.mask)
        policy_term = clipped_ratio_loss(
            log_probs,
            roll.log_probs,
            weights,
            roll.mask,
            clip=leash.clip,
            aggregate=method.aggregate,
            constant=constant,
        )
    total, stats = policy_term, {"policy_loss": policy_term.detach()}
    if method.kl == "loss":
        k3 = kl_penalty(log_probs, roll.ref_log_probs, roll.mask, "k3", reduce="none")
        kl_term = aggregate_tokens(k3, roll.mask, method.aggregate, constant)
        total = total + leash.beta * kl_term
        stats["k3"] = kl_term.detach()
    if values is not None:
        returns = torch.where(roll.mask, advantages + roll.values, 0.0)
        critic = value_loss(values, roll.values, returns, roll.mask, clip=leash.clip)
        total = total + leash.value_coef * critic
        stats["value_loss"] = critic.detach()
    return total, stats


@dataclass
class FineTuned:
    """A fine-tuned policy, its training history and its held-out evaluations."""

    policy: Policy
    history: FineTuneHistory
    evaluations: list[Evaluation]  # at history.steps

    @property
    def final(self) -> Evaluation:
        return self.evaluations[-1]


def prompt_batches(
    prompts: Tensor, per_batch: int, generator: torch.Generator
) -> Iterator[Tensor]:
    """Endless batches of ``per_batch`` prompts, reshuffled every pass."""
    if not 1 <= per_batch <= len(prompts):
        raise ValueError(f"per_batch must be in 1..{len(prompts)}, got {per_batch}")
    while True:
        order = torch.randperm(len(prompts), generator=generator)
        for start in range(0, len(order) - per_batch + 1, per_batch):
            yield prompts[order[start : start + per_batch].to(prompts.device)]


def fine_tune(
    reference: GPT,
    leash: Leash,
    task: Task,
    vocab: WordVocab,
    proxy: Judge,
    gold: Judge,
    train_prompts: Tensor,
    eval_prompts: Tensor,
    steps: int,
    prompts_per_update: int,
    lr: float,
    eval_every: int,
    eval_samples: int,
    seed: int,
    eval_seed: int,
    start: Evaluation | None = None,
    world: World = SINGLE,
) -> FineTuned:
    """Fine-tune a copy of ``reference`` with ``leash.method`` against the ``proxy``
    judge for ``steps`` updates of ``prompts_per_update`` prompts, and evaluate it on
    ``eval_prompts`` (proxy, gold, KL, ...) every ``eval_every`` updates with the
    sampling seed ``eval_seed`` (the same random numbers for every policy). ``start``:
    the reference's evaluation under that seed, when already known (PPO's critic then
    starts at its mean proxy reward, else at 0). ``reference`` is frozen in place
    (``requires_grad`` off). With several processes (``world``) each
    rank samples for its share of each update's prompts (which must split evenly),
    with a generator of its own, and the update is the global batch's
    (:func:`~lmpg_utils.policy_gradient.policy_update_loop`)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the value head's initial weights
    policy = Policy(copy.deepcopy(reference), leash.method.value_head).eval()
    policy.requires_grad_(True)  # the copy of a reference frozen by an earlier run
    reference.requires_grad_(False)
    if policy.value is not None and start is not None:
        # the critic starts at the reference's mean reward rather than at 0: its first
        # losses then do not swamp the policy's gradient in the trunk they share
        with torch.no_grad():
            policy.value.linear.bias.fill_(start.proxy)
    evaluations = [] if start is None else [start]

    def evaluate_policy(model: nn.Module) -> float:
        evaluations.append(
            evaluate(model.gpt, reference, eval_prompts, eval_samples, task, vocab,
                     proxy, gold, seed=eval_seed)
        )  # fmt: skip
        return evaluations[-1].proxy

    sampler = distributed.rank_generator(generator, seed, world)
    token_mean = leash.method.aggregate == "token-mean"
    history = policy_update_loop(
        policy,
        prompt_batches(train_prompts, prompts_per_update, generator),
        lambda model, batch, times: rollout(
            model, reference, batch, leash, task, vocab, proxy, sampler, times
        ),
        ESTIMATORS[leash.method.estimator],
        lambda model, batch, roll, advantages: loss(
            model, roll, advantages, leash, task, vocab
        ),
        make_optimizer(policy, lr, weight_decay=0.0),
        steps,
        evaluate_policy,
        eval_every,
        start_value=None if start is None else start.proxy,
        epochs=leash.method.epochs,
        generator=generator,
        world=world,
        # what the loss averages over: real tokens, or sequences
        loss_items=(lambda roll: float(roll.mask.sum())) if token_mean else None,
    )
    return FineTuned(policy, history, evaluations)


def gradient_noise(
    reference: GPT,
    prompts: Tensor,
    methods: Sequence[str],
    k: int,
    task: Task,
    vocab: WordVocab,
    judge: Judge,
    draws: int,
    seed: int,
) -> dict[str, float]:
    """How noisy each method's first policy gradient is at the reference, on fixed
    prompts: for ``draws`` rollouts (shared by all methods, ``k`` samples per prompt),
    the gradient of each method's loss, and then the total variance of those gradients
    over the draws divided by the squared norm of their mean (noise per unit of signal,
    so methods whose advantages differ in scale compare fairly). Methods whose
    estimator needs a history or values (REINFORCE's moving average, PPO's critic) have
    no defined first gradient and are refused; ``"none"`` is plain REINFORCE. The
    squared norm of the mean is corrected for its own noise; a method whose mean is
    still lost in the noise at this many ``draws`` gets ``inf``."""
    if draws < 2:
        raise ValueError(f"draws must be at least 2, got {draws}")
    leashes = {}
    for name in methods:
        if name == "none":
            leashes[name] = Leash(Method("none", "none", "reward", "reinforce"), 0.0, k)
            continue
        method = METHODS[name]
        estimator = ESTIMATORS[method.estimator]
        if estimator.needs_history or estimator.needs_values:
            raise ValueError(
                f"{name} has no first gradient without a history or values"
            )
        leashes[name] = Leash(method, 0.0, k)
    generator = torch.Generator().manual_seed(seed)
    policy = Policy(copy.deepcopy(reference)).eval()
    policy.requires_grad_(True)
    gradients: dict[str, list[Tensor]] = {name: [] for name in leashes}
    for _ in range(draws):
        roll = rollout(policy, reference, prompts, next(iter(leashes.values())), task,
                       vocab, judge, generator)  # fmt: skip
        for name, leash in leashes.items():
            advantages = ESTIMATORS[leash.method.estimator].rollout_advantages(roll)
            policy.zero_grad(set_to_none=True)
            loss(policy, roll, advantages, leash, task, vocab)[0].backward()
            gradients[name].append(flat_grad(policy))
    noise = {}
    for name, rows in gradients.items():
        stacked = torch.stack(rows).double()
        variance = float(stacked.var(dim=0).sum())
        # |mean|^2 overestimates |E g|^2 by variance / draws: remove that bias, or a
        # noisy method's ratio could never exceed ``draws``
        signal = float(stacked.mean(dim=0).square().sum()) - variance / draws
        noise[name] = variance / signal if signal > 0 else math.inf
    return noise
