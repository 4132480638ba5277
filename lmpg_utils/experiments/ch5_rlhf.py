"""Chapter 5's main run: RL fine-tuning of chapter 2's GPT against a learned reward.

The policy and the frozen reference are chapter 2's cached GPT; the proxy judge (the
reward model) and the gold judge are chapter 3's pre-trained BERT fine-tuned to tell
the book groups apart, on different verses (:mod:`lmpg_utils.judges`). One run
fine-tunes with one method (:data:`lmpg_utils.rlhf.METHODS`) at one KL coefficient
``beta`` and reports the held-out proxy and gold rewards, the KL to the reference and
the diversity of the continuations before and after::

    python -m lmpg_utils run rlhf --set method=grpo --set beta=0.05 --seed 0
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .. import bert, configs, distributed, judges, rlhf
from .. import language_modeling as lm
from ..distributed import SINGLE, World
from ..tokenization import WordVocab
from ..transformer import GPT

NAME = "rlhf"


@dataclass(frozen=True)
class Config:
    """One fine-tuning run; the models it starts from come from the profile."""

    profile: str = "quick"
    method: str = "rloo"
    beta: float = 0.05  # the KL coefficient
    steps: int = 60  # policy updates
    prompts_per_update: int = 8
    samples: int = 4  # continuations per prompt (the group of RLOO and GRPO)
    lr: float = 3e-4
    clip: float = 0.2
    value_coef: float = 0.5
    task: rlhf.Task = rlhf.Task()
    train_prompts: int = 2000  # prompts from the train split
    eval_prompts: int = 64  # held-out prompts from the valid split
    eval_samples: int = 2
    eval_every: int = 10
    eval_seed: int = 1000
    proxy: judges.JudgeConfig = judges.PROXY_JUDGE["quick"]
    gold: judges.JudgeConfig = judges.GOLD_JUDGE["quick"]
    # the models chapters 2 and 3 cached: the same settings find the same files
    vocab_size: int = lm.GPT_VOCAB_SIZES["quick"]
    gpt: lm.GPTTraining = lm.GPT_PROFILES["quick"]
    pretraining: bert.Pretraining = bert.PRETRAINING["quick"]

    def __post_init__(self) -> None:
        configs.check_profile(self.profile)
        if self.method not in rlhf.METHODS:
            raise ValueError(
                f"method must be one of {', '.join(rlhf.METHODS)}, got {self.method!r}"
            )
        for name in (
            "steps",
            "prompts_per_update",
            "samples",
            "train_prompts",
            "eval_prompts",
            "eval_samples",
            "eval_every",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.prompts_per_update > self.train_prompts:
            raise ValueError("prompts_per_update must not exceed train_prompts")
        self.leash()  # beta, clip and samples against the method

    def leash(self, method: str | None = None, beta: float | None = None) -> rlhf.Leash:
        """The method's settings (another ``method`` or ``beta`` when given)."""
        return rlhf.Leash(
            rlhf.METHODS[method or self.method],
            self.beta if beta is None else beta,
            self.samples,
            self.clip,
            self.value_coef,
        )


PROFILES: dict[str, Config] = {
    "quick": Config(),
    "full": Config(
        profile="full",
        steps=200,
        prompts_per_update=32,
        lr=1e-4,
        eval_prompts=256,
        eval_every=20,
        proxy=judges.PROXY_JUDGE["full"],
        gold=judges.GOLD_JUDGE["full"],
        vocab_size=lm.GPT_VOCAB_SIZES["full"],
        gpt=lm.GPT_PROFILES["full"],
        pretraining=bert.PRETRAINING["full"],
    ),
}


@dataclass
class Setup:
    """What every run of the chapter shares: the reference GPT and its vocabulary, the
    two judges, and the train and held-out prompts."""

    config: Config
    reference: GPT
    vocab: WordVocab
    proxy: judges.Judge
    gold: judges.Judge
    train_prompts: torch.Tensor
    eval_prompts: torch.Tensor
    device: torch.device
    world: World = SINGLE
    _start: dict[int, rlhf.Evaluation] = field(default_factory=dict, repr=False)

    def start(self) -> rlhf.Evaluation:
        """The reference's held-out evaluation (computed once)."""
        if self.config.eval_seed not in self._start:
            self._start[self.config.eval_seed] = self.evaluate(self.reference)
        return self._start[self.config.eval_seed]

    def evaluate(self, model: GPT) -> rlhf.Evaluation:
        """``model`` on the held-out prompts, with the config's sampling seed."""
        c = self.config
        return rlhf.evaluate(model, self.reference, self.eval_prompts, c.eval_samples,
                             c.task, self.vocab, self.proxy, self.gold, c.eval_seed)  # fmt: skip

    def fine_tune(
        self,
        seed: int,
        method: str | None = None,
        beta: float | None = None,
        steps: int | None = None,
    ) -> rlhf.FineTuned:
        """One fine-tuning run from the reference (``method``, ``beta`` and ``steps``
        default to the config's), data-parallel over :attr:`world`."""
        c = self.config
        steps = c.steps if steps is None else steps
        return rlhf.fine_tune(
            self.reference, c.leash(method, beta), c.task, self.vocab, self.proxy,
            self.gold, self.train_prompts, self.eval_prompts, steps,
            c.prompts_per_update, c.lr, c.eval_every, c.eval_samples, seed,
            c.eval_seed, start=self.start(), world=self.world,
        )  # fmt: skip


def _models(
    config: Config, seed: int, device: torch.device, progress: bool, world: World
):
    """The reference GPT and the two judges. Under ``torchrun`` the GPT and the BERT
    under the judges train data-parallel; rank 0 alone fine-tunes the small judges,
    and the other ranks then load them from the cache (a disk they share)."""
    gpt = lm.load_gpt(config.profile, seed=seed, device=device, progress=progress,
                      training=config.gpt, vocab_size=config.vocab_size, world=world)  # fmt: skip
    if world.size > 1:  # the judges' BERT, pre-trained data-parallel when not cached
        bert.load_pretrained(config.pretraining, seed=seed, device=device,
                             progress=progress, world=world)  # fmt: skip
    with distributed.main_first(world):
        proxy, gold = (
            judges.cached_judge(judge, config.pretraining, pretraining_seed=seed,
                                vocab=gpt.vocab, device=device, progress=progress)
            for judge in (config.proxy, config.gold)
        )  # fmt: skip
    return gpt, proxy, gold


def prepare(
    config: Config,
    *,
    seed: int,
    device: str | torch.device,
    progress: bool = True,
    world: World = SINGLE,
) -> Setup:
    """Load (or train and cache) the GPT and the judges of ``seed``, and draw the
    prompts; the setup fine-tunes over the processes of ``world``."""
    device = torch.device(device)
    gpt, proxy, gold = _models(config, seed, device, progress, world)
    vocab = gpt.vocab
    c = config
    train = rlhf.make_prompts(vocab, "train", c.task, c.train_prompts, seed).to(device)
    held_out = rlhf.make_prompts(vocab, "valid", c.task, c.eval_prompts, seed)
    return Setup(config, gpt.model.eval(), vocab, proxy, gold, train,
                 held_out.to(device), device, world)  # fmt: skip


def prepare_models(
    config: Config,
    *,
    seed: int,
    device: str | torch.device,
    progress: bool = True,
    world: World = SINGLE,
) -> None:
    """Train (or find in the cache) the GPT, the pre-trained BERT and the two judges."""
    _models(config, seed, torch.device(device), progress, world)


@dataclass
class Result:
    """One run: the held-out evaluation before and after, and the learning curve."""

    config: Config
    seed: int
    device: str
    start: rlhf.Evaluation
    end: rlhf.Evaluation
    fine_tuned: rlhf.FineTuned
    seconds: float
    world_size: int = 1

    def summary(self) -> dict:
        """Plain numbers, JSON-serialisable (what the command line prints)."""
        history = self.fine_tuned.history
        return {
            **configs.summary_header(
                NAME,
                self.config,
                self.seed,
                self.device,
                self.seconds,
                self.world_size,
            ),
            "method": self.config.method,
            "beta": self.config.beta,
            "reward_start": self.start.proxy,
            "reward_end": self.end.proxy,
            "reward_end_se": self.end.proxy_se,
            "gold_reward_start": self.start.gold,
            "gold_reward_end": self.end.gold,
            "gold_target_share_start": self.start.gold_target_share,
            "gold_target_share_end": self.end.gold_target_share,
            "kl_end": self.end.kl,
            "kl_end_se": self.end.kl_se,
            "distinct_2_start": self.start.distinct_2,
            "distinct_2": self.end.distinct_2,
            "reference_perplexity_end": self.end.reference_perplexity,
            "training_seconds": history.total_seconds,
            "examples_end": self.end.examples,
        }


def run(
    config: Config,
    *,
    seed: int,
    device: str | torch.device,
    progress: bool = True,
    world: World = SINGLE,
) -> Result:
    """Fine-tune chapter 2's GPT with ``config.method`` at ``config.beta`` and evaluate
    it on held-out prompts against both judges; data-parallel under ``torchrun``."""
    began = time.perf_counter()
    setup = prepare(config, seed=seed, device=device, progress=progress, world=world)
    start = setup.start()
    tuned = setup.fine_tune(seed)
    return Result(config, seed, str(setup.device), start, tuned.final, tuned,
                  time.perf_counter() - began, world.size)  # fmt: skip
