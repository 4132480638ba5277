"""Chapter 2's main run: a small GPT trained on the same English words as chapter 1.

The data, vocabulary and perplexity contract are those of
:mod:`lmpg_utils.language_modeling` (each verse framed as ``<s> w_1 .. w_n </s>``,
perplexity over every word and ``</s>``), with the same vocabulary size as chapter 1's
profile of the same name, so the GPT's number sits in one table with the n-gram's and
the LSTM's. The GPT is trained once and cached (:func:`~lmpg_utils.language_modeling.load_gpt`),
then scored next to the Kneser-Ney model picked on validation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .. import configs
from .. import language_modeling as lm
from ..distributed import SINGLE, World
from ..tokenization import WordVocab
from ..training import TrainHistory
from ..transformer import GPT, count_parameters

NAME = "gpt"


@dataclass(frozen=True)
class Config:
    """Chapter 2's run: the word data's vocabulary size, the GPT's sizes and budget
    (``gpt``), and the n-gram orders of the baseline."""

    profile: str = "quick"
    vocab_size: int = lm.GPT_VOCAB_SIZES["quick"]
    gpt: lm.GPTTraining = lm.GPTTraining()
    ngram_orders: tuple[int, ...] = (3, 4, 5)

    def __post_init__(self) -> None:
        configs.check_profile(self.profile)
        lm.check_settings(self.vocab_size, self.ngram_orders)


#: the GPT of each profile is :data:`lmpg_utils.language_modeling.GPT_PROFILES`'s
PROFILES = {
    name: Config(profile=name, vocab_size=lm.GPT_VOCAB_SIZES[name], gpt=training)
    for name, training in lm.GPT_PROFILES.items()
}


@dataclass
class Result:
    """What chapter 2 reports; the trained model is kept for samples and attention
    maps. ``training_seconds`` is the GPT's training time, measured when it was
    trained (also when it was loaded from the cache); ``total_seconds`` is this run's,
    and ``world_size`` the number of processes that ran it."""

    config: Config
    seed: int
    device: str
    vocab_size: int
    num_parameters: int
    val_loss: float
    valid_perplexity: float
    test_perplexity: float
    tokens_per_s: float
    training_seconds: float
    total_seconds: float
    steps_done: int
    ngram_order: int
    ngram_test_perplexity: float
    cached: bool
    history: TrainHistory = field(repr=False)
    world_size: int = 1
    model: GPT | None = field(default=None, repr=False)
    vocab: WordVocab | None = field(default=None, repr=False)

    def summary(self) -> dict:
        """Plain numbers, JSON-serialisable (what the command line prints)."""
        return {
            **configs.summary_header(
                NAME,
                self.config,
                self.seed,
                self.device,
                self.total_seconds,
                self.world_size,
            ),
            "vocab_size": self.vocab_size,
            "num_parameters": self.num_parameters,
            "steps": self.steps_done,
            "val_loss": self.val_loss,
            "valid_perplexity": self.valid_perplexity,
            "test_perplexity": self.test_perplexity,
            "ngram_order": self.ngram_order,
            "ngram_test_perplexity": self.ngram_test_perplexity,
            "tokens_per_s": self.tokens_per_s,
            "training_seconds": self.training_seconds,
            "cached": self.cached,
        }


def prepare_models(
    config: Config,
    *,
    seed: int,
    device: str | torch.device,
    progress: bool = True,
    world: World = SINGLE,
) -> None:
    """Train (or find in the cache) the GPT that chapter 2 and later chapters load;
    data-parallel over the processes of ``world`` under ``torchrun``."""
    lm.load_gpt(
        config.profile,
        training=config.gpt,
        vocab_size=config.vocab_size,
        seed=seed,
        device=device,
        progress=progress,
        world=world,
    )


def run(
    config: Config,
    *,
    seed: int,
    device: str | torch.device,
    progress: bool = True,
    world: World = SINGLE,
) -> Result:
    """Train or load the chapter's GPT on ``device``, score it on the validation and
    test verses, and fit chapter 1's Kneser-Ney baseline on the same data.

    ``val_loss`` is the mean NLL per event on the whole validation split (nats);
    periodic evaluations during training use the first ``valid_subset`` verses.

    Under ``torchrun`` (``world`` of several processes) the GPT trains data-parallel,
    the same optimisation as in one process (``gpt.batch_size`` is the global batch and
    must be a multiple of the number of processes); rank 0 alone reads and writes the
    cache. The scores are computed on every rank, on the same weights, so every rank
    returns the same ``Result``.
    """
    began = time.perf_counter()
    trained = lm.load_gpt(
        config.profile,
        training=config.gpt,
        vocab_size=config.vocab_size,
        seed=seed,
        device=device,
        progress=progress,
        world=world,
    )
    data = lm.word_data(config.vocab_size)
    vocab = data.vocab
    nll, count = lm.total_nll(trained.model, data.valid, vocab)
    val_loss = nll / count
    test_perplexity = lm.gpt_perplexity(trained.model, data.test, vocab)
    ngrams = lm.best_ngram(data, config.ngram_orders)
    return Result(
        config=config,
        seed=seed,
        device=str(torch.device(device)),
        vocab_size=len(vocab),
        num_parameters=count_parameters(trained.model),
        val_loss=val_loss,
        valid_perplexity=lm.perplexity_of(nll, count),
        test_perplexity=test_perplexity,
        tokens_per_s=trained.history.items_per_second,
        training_seconds=trained.history.seconds,
        total_seconds=time.perf_counter() - began,
        steps_done=len(trained.history.steps),
        ngram_order=ngrams.order,
        ngram_test_perplexity=ngrams.model.perplexity(data.test),
        cached=trained.cached,
        history=trained.history,
        world_size=world.size,
        model=trained.model,
        vocab=vocab,
    )
