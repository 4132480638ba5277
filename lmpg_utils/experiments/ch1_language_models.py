"""Chapter 1's main run: a Kneser-Ney n-gram model against a small LSTM on the same
English text.

Both models are word-level over one vocabulary built on the training verses of the
World English Bible, and both score each held-out verse independently from ``<s>``,
predicting every word and the closing ``</s>`` (the contract of
:mod:`lmpg_utils.language_modeling`), so their perplexities are comparable. A
bidirectional cloze LSTM is trained beside them for the chapter's pseudo-likelihood
comparison.

The run has three steps: fit the n-grams and pick the order on validation (on the CPU),
train or load the two LSTMs (on ``device``; cached, so chapter 2 can put them in its
table without training them again), and evaluate.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .. import caching, configs, corpora, distributed, runtime
from .. import language_modeling as lm
from ..distributed import SINGLE, World
from ..neural_lm import (
    BidirectionalLSTMCloze,
    LSTMLanguageModel,
    LSTMSizes,
    cloze_batch_loss,
    lm_batch_loss,
)
from ..ngram import KneserNeyLM
from ..tokenization import WordVocab
from ..training import save_checkpoint, train

NAME = "lm"


@dataclass(frozen=True)
class Config:
    """Sizes and budgets of chapter 1's run. ``eval_every`` 0 evaluates the LSTM eight
    times during training."""

    profile: str = "quick"
    vocab_size: int = 6000
    ngram_orders: tuple[int, ...] = (3, 4, 5)
    model: LSTMSizes = LSTMSizes()
    batch_size: int = 64
    lr: float = 5e-3
    lstm_steps: int = 500
    cloze_steps: int = 200
    eval_every: int = 0

    def __post_init__(self) -> None:
        configs.check_profile(self.profile)
        lm.check_settings(self.vocab_size, self.ngram_orders)
        for name in ("batch_size", "lstm_steps", "cloze_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0, got {self.eval_every}")


PROFILES = {
    "quick": Config(),
    # sized to about 9 minutes on a Colab T4 in fp32 by a FLOPs estimate
    # (benchmarks/estimate_full_profiles.py; not yet run on a GPU)
    "full": Config(
        profile="full",
        vocab_size=12000,
        model=LSTMSizes(d_embed=256, d_hidden=1024, dropout=0.3),
        lstm_steps=8000,
        cloze_steps=4000,
        lr=2e-3,
    ),
}


@dataclass
class Result:
    """Everything chapter 1 reports; the trained models are kept for the notebook.
    ``seconds`` holds the time of each model's fitting or training, ``total_seconds``
    the whole run's."""

    config: Config
    seed: int
    device: str
    test_perplexity: dict[str, float]
    valid_perplexity: dict[str, float]
    ngram_valid_by_order: dict[int, float]
    test_unknown_rate: float
    seconds: dict[str, float]
    lstm_tokens_per_s: float
    total_seconds: float
    ngram: KneserNeyLM | None = field(default=None, repr=False)
    lstm: LSTMLanguageModel | None = field(default=None, repr=False)
    cloze: BidirectionalLSTMCloze | None = field(default=None, repr=False)
    lstm_curve: tuple[list[int], list[float]] = field(default=([], []), repr=False)

    def summary(self) -> dict:
        """Plain numbers, JSON-serialisable (what the command line prints)."""
        return {
            **configs.summary_header(
                NAME, self.config, self.seed, self.device, self.total_seconds
            ),
            "test_perplexity": self.test_perplexity,
            "valid_perplexity": self.valid_perplexity,
            "ngram_valid_by_order": {
                str(k): v for k, v in self.ngram_valid_by_order.items()
            },
            "test_unknown_rate": self.test_unknown_rate,
            "model_seconds": self.seconds,
            "lstm_tokens_per_s": self.lstm_tokens_per_s,
        }


@dataclass
class NeuralModels:
    """The two trained LSTMs, with what their training measured."""

    lstm: LSTMLanguageModel = field(repr=False)
    cloze: BidirectionalLSTMCloze = field(repr=False)
    seconds: dict[str, float]
    tokens_per_s: float
    curve: tuple[list[int], list[float]]


def _cache_key(config: Config, seed: int) -> dict:
    """The key of the cached LSTMs: every setting but the n-gram orders (the n-grams
    are not cached), flat, and the corpus parser's version."""
    settings = {
        "vocab_size": config.vocab_size,
        "d_embed": config.model.d_embed,
        "d_hidden": config.model.d_hidden,
        "batch_size": config.batch_size,
        "lr": config.lr,
        "lstm_steps": config.lstm_steps,
        "cloze_steps": config.cloze_steps,
        "dropout": config.model.dropout,
        "eval_every": config.eval_every,
        "corpus_parser": corpora.PARSER_VERSION,
    }
    return caching.artifact_key("ch1-models", settings, seed)


def _lstm_perplexity(
    model: LSTMLanguageModel, sentences: list[list[int]], vocab: WordVocab
) -> float:
    """The LSTM's perplexity of ``sentences`` (every word and ``</s>``, from ``<s>``)."""
    scores = lm.token_log_probs(lm.lstm_scorer(model), sentences, vocab)
    return lm.perplexity_of(*lm.summed_nll(scores))


def _train(
    config: Config,
    data: lm.WordLMData,
    lstm: LSTMLanguageModel,
    cloze: BidirectionalLSTMCloze,
    *,
    seed: int,
    device: torch.device,
    progress: bool,
) -> NeuralModels:
    """Train the LSTM language model, then the cloze model, from one seeded stream of
    batches."""
    vocab = data.vocab
    generator = runtime.set_seed(seed)
    valid_subset = data.valid[:400]
    history = train(
        lstm,
        lm.batch_iterator(data.train, vocab, config.batch_size, generator),
        lambda m, b: lm_batch_loss(m, b.to(device), vocab.pad_id),
        max_steps=config.lstm_steps,
        lr=config.lr,
        warmup_steps=50,
        eval_fn=lambda m: _lstm_perplexity(m, valid_subset, vocab),
        eval_every=config.eval_every or max(1, config.lstm_steps // 8),
        progress=progress,
        description="LSTM LM",
    )
    seconds = {"lstm": history.seconds}
    tokens_per_s = history.items_per_second
    curve = (history.eval_steps, history.eval_values)
    history = train(
        cloze,
        lm.batch_iterator(data.train, vocab, config.batch_size, generator),
        lambda m, b: cloze_batch_loss(m, b.to(device), vocab.pad_id),
        max_steps=config.cloze_steps,
        lr=config.lr,
        warmup_steps=50,
        progress=progress,
        description="bidirectional cloze",
    )
    seconds["cloze"] = history.seconds
    return NeuralModels(lstm, cloze, seconds, tokens_per_s, curve)


def train_or_load_lstms(
    config: Config,
    data: lm.WordLMData,
    *,
    seed: int,
    device: torch.device,
    progress: bool = True,
) -> NeuralModels:
    """The LSTM language model and the cloze model of ``config``, on ``device`` and in
    eval mode: trained once per settings, seed and code version, then loaded."""
    vocab = data.vocab
    sizes = config.model
    runtime.set_seed(seed)  # the initial weights
    lstm = LSTMLanguageModel(
        len(vocab), sizes.d_embed, sizes.d_hidden, dropout=sizes.dropout
    ).to(device)
    cloze = BidirectionalLSTMCloze(
        len(vocab), sizes.d_embed, sizes.d_hidden, dropout=sizes.dropout
    ).to(device)
    key = _cache_key(config, seed)
    path = caching.artifact_path(key)
    with caching.exclusive(path):  # chapters 1 and 2 may ask at once: train once
        cached = caching.load_current(path, key)
        if cached is not None:
            state = cached["state_dict"]
            for name, model in (("lstm", lstm), ("cloze", cloze)):
                prefix = name + "."
                model.load_state_dict(
                    {
                        k[len(prefix) :]: v
                        for k, v in state.items()
                        if k.startswith(prefix)
                    }
                )
            extra = cached["extra"]
            models = NeuralModels(
                lstm,
                cloze,
                dict(extra["seconds"]),
                extra["tokens_per_s"],
                (extra["curve_steps"], extra["curve_values"]),
            )
        else:
            models = _train(
                config, data, lstm, cloze, seed=seed, device=device, progress=progress
            )
            extra = {
                "seconds": models.seconds,
                "tokens_per_s": models.tokens_per_s,
                "curve_steps": list(models.curve[0]),
                "curve_values": list(models.curve[1]),
            }
            save_checkpoint(
                path,
                torch.nn.ModuleDict({"lstm": lstm, "cloze": cloze}),
                key["config"],
                caching.tag(extra, key),
            )
    lstm.eval()
    cloze.eval()
    return models


def prepare_models(
    config: Config,
    *,
    seed: int,
    device: str | torch.device,
    progress: bool = True,
    world: World = SINGLE,
) -> None:
    """Train (or find in the cache) the two LSTMs that the chapters load. They are
    small and not trained data-parallel: under ``torchrun`` rank 0 trains them and the
    other ranks then load them from the cache (a disk they share)."""
    data = lm.word_data(config.vocab_size)
    with distributed.main_first(world):
        train_or_load_lstms(
            config, data, seed=seed, device=torch.device(device), progress=progress
        )


def run(
    config: Config,
    *,
    seed: int,
    device: str | torch.device,
    progress: bool = True,
    world: World = SINGLE,
) -> Result:
    """Fit the Kneser-Ney n-grams (the order is picked on validation), train or load
    the LSTM and the cloze model on ``device``, and score both language models on the
    validation and test verses."""
    distributed.require_single(world, "chapter 1's LSTM training (run lm)")
    began = time.perf_counter()
    device = torch.device(device)
    data = lm.word_data(config.vocab_size)

    ngram_began = time.perf_counter()
    ngrams = lm.best_ngram(data, config.ngram_orders)
    seconds = {"ngram": time.perf_counter() - ngram_began}

    neural = train_or_load_lstms(
        config, data, seed=seed, device=device, progress=progress
    )
    seconds.update(neural.seconds)

    ngram_name = f"kneser_ney_{ngrams.order}gram"
    test_perplexity = {
        ngram_name: ngrams.model.perplexity(data.test),
        "lstm": _lstm_perplexity(neural.lstm, data.test, data.vocab),
    }
    valid_perplexity = {
        ngram_name: ngrams.valid_by_order[ngrams.order],
        "lstm": _lstm_perplexity(neural.lstm, data.valid, data.vocab),
    }
    return Result(
        config=config,
        seed=seed,
        device=str(device),
        test_perplexity=test_perplexity,
        valid_perplexity=valid_perplexity,
        ngram_valid_by_order=ngrams.valid_by_order,
        test_unknown_rate=data.unknown_rate("test"),
        seconds=seconds,
        lstm_tokens_per_s=neural.tokens_per_s,
        total_seconds=time.perf_counter() - began,
        ngram=ngrams.model,
        lstm=neural.lstm,
        cloze=neural.cloze,
        lstm_curve=neural.curve,
    )
