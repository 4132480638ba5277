"""Chapter 1's main run: a Kneser-Ney n-gram model against a small LSTM on the same English text.

Both models are word-level over one vocabulary built on the training verses of the
World English Bible, and both score each held-out verse independently from ``<s>``,
predicting every word and the closing ``</s>``. Perplexity is
``exp(total negative log-likelihood / number of predicted events)``; unknown words
are the ``<unk>`` event (a closed vocabulary), so the numbers are comparable.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import torch

from .. import caching, corpora, runtime
from ..neural_lm import (
    BidirectionalLSTMCloze,
    LSTMLanguageModel,
    cloze_batch_loss,
    lm_batch_loss,
    pad_batch,
)
from ..ngram import KneserNeyLM
from ..tokenization import WordVocab
from ..training import bucketed_batches, save_checkpoint, train


@dataclass(frozen=True)
class LanguageModelConfig:
    """Sizes and budgets of chapter 1's run."""

    vocab_size: int = 6000
    ngram_orders: tuple[int, ...] = (3, 4, 5)
    d_embed: int = 128
    d_hidden: int = 256
    batch_size: int = 64
    lr: float = 5e-3
    lstm_steps: int = 500
    cloze_steps: int = 200
    dropout: float = 0.1
    eval_every: int = 0

    def __post_init__(self) -> None:
        if self.vocab_size < 10:
            raise ValueError(f"vocab_size must be at least 10, got {self.vocab_size}")
        if not self.ngram_orders or min(self.ngram_orders) < 1:
            raise ValueError(
                f"ngram_orders must be a non-empty list of orders >= 1, got {self.ngram_orders}"
            )
        for name in ("batch_size", "lstm_steps", "cloze_steps", "d_embed", "d_hidden"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


CONFIGS = {
    "quick": LanguageModelConfig(),
    "full": LanguageModelConfig(
        vocab_size=12000,
        d_embed=256,
        d_hidden=1024,
        lstm_steps=12000,
        cloze_steps=6000,
        dropout=0.3,
        lr=2e-3,
    ),
}


def config_for(profile: str | None = None) -> LanguageModelConfig:
    """The configuration of a profile (``quick`` or ``full``; default from the runtime)."""
    return CONFIGS[runtime.get_profile(profile)]


@dataclass
class WordLMData:
    """Word ids per verse (no ``<s>``/``</s>``; models add them) for each split, and the vocabulary."""

    vocab: WordVocab
    train: list[list[int]]
    valid: list[list[int]]
    test: list[list[int]]

    def unknown_rate(self, split: str = "test") -> float:
        sentences = getattr(self, corpora.check_split(split))
        total = sum(len(s) for s in sentences)
        return sum(w == self.vocab.unk_id for s in sentences for w in s) / total


@functools.lru_cache(maxsize=4)
def _word_data(vocab_size: int) -> WordLMData:
    verses = corpora.load_bible_verses()
    by_split = {s: [v.text for v in verses if v.split == s] for s in corpora.SPLITS}
    vocab = WordVocab.build(by_split["train"], max_size=vocab_size)
    encoded = {s: [vocab.encode(t) for t in texts] for s, texts in by_split.items()}
    return WordLMData(vocab, encoded["train"], encoded["valid"], encoded["test"])


def prepare_word_data(profile: str | None = None) -> WordLMData:
    """The WEB verses as word ids, vocabulary from the training split (size set by the profile)."""
    return _word_data(config_for(profile).vocab_size)


def frame(sentence: list[int], vocab: WordVocab) -> list[int]:
    """``<s> sentence </s>``."""
    return [vocab.bos_id, *sentence, vocab.eos_id]


def batch_iterator(
    sentences: list[list[int]],
    vocab: WordVocab,
    batch_size: int,
    generator: torch.Generator,
) -> Iterator[torch.Tensor]:
    """Endless framed, padded batches; verses of similar length are batched together to limit padding."""
    return bucketed_batches(
        [frame(s, vocab) for s in sentences], batch_size, vocab.pad_id, generator
    )


def _length_batches(sentences: list[list[int]], max_tokens: int) -> Iterator[list[int]]:
    """Indices of sentences grouped by similar length, at most ``max_tokens`` padded positions a batch."""
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    batch: list[int] = []
    for index in order:
        width = len(sentences[index]) + 2
        if batch and width * (len(batch) + 1) > max_tokens:
            yield batch
            batch = []
        batch.append(index)
    if batch:
        yield batch


@torch.no_grad()
def lstm_token_log_probs(
    model: LSTMLanguageModel,
    sentences: list[list[int]],
    vocab: WordVocab,
    max_tokens: int = 8192,
) -> list[list[float]]:
    """Per-event log-probabilities (each word, then ``</s>``) of every sentence under the LSTM, in input order."""
    model.eval()
    results: list[list[float]] = [[] for _ in sentences]
    for indices in _length_batches(sentences, max_tokens):
        batch = pad_batch([frame(sentences[i], vocab) for i in indices], vocab.pad_id)
        batch = batch.to(next(model.parameters()).device)
        all_log_probs, _ = model(batch[:, :-1])
        log_probs = all_log_probs.gather(-1, batch[:, 1:, None]).squeeze(-1)
        for row, i in enumerate(indices):
            results[i] = log_probs[row, : len(sentences[i]) + 1].tolist()
    return results


@torch.no_grad()
def cloze_token_log_probs(
    model: BidirectionalLSTMCloze,
    sentences: list[list[int]],
    vocab: WordVocab,
    max_tokens: int = 8192,
) -> list[list[float]]:
    """log P(w_i | all other words) for every word of every sentence (the pseudo-log-likelihood terms)."""
    model.eval()
    results: list[list[float]] = [[] for _ in sentences]
    for indices in _length_batches(sentences, max_tokens):
        batch = pad_batch([frame(sentences[i], vocab) for i in indices], vocab.pad_id)
        batch = batch.to(next(model.parameters()).device)
        lengths = (batch != vocab.pad_id).sum(dim=1)
        log_probs = model(batch, lengths).gather(-1, batch[:, 1:-1, None]).squeeze(-1)
        for row, i in enumerate(indices):
            results[i] = log_probs[row, : len(sentences[i])].tolist()
    return results


def perplexity_of(token_log_probs: list[list[float]]) -> float:
    """exp(-mean log-probability over all events)."""
    count = sum(len(t) for t in token_log_probs)
    if count == 0:
        raise ValueError("no events to compute a perplexity over")
    return math.exp(-sum(sum(t) for t in token_log_probs) / count)


@dataclass
class LanguageModelResults:
    """Everything chapter 1 reports; the trained models are kept for the notebook."""

    config: LanguageModelConfig
    seed: int
    test_perplexity: dict[str, float]
    valid_perplexity: dict[str, float]
    ngram_valid_by_order: dict[int, float]
    test_unknown_rate: float
    seconds: dict[str, float]
    lstm_tokens_per_s: float
    device: str
    ngram: KneserNeyLM | None = field(default=None, repr=False)
    lstm: LSTMLanguageModel | None = field(default=None, repr=False)
    cloze: BidirectionalLSTMCloze | None = field(default=None, repr=False)
    lstm_curve: tuple[list[int], list[float]] = field(default=([], []), repr=False)

    def summary(self) -> dict:
        """Plain numbers, JSON-serialisable (what the command line prints)."""
        return {
            "profile_config": asdict(self.config),
            "seed": self.seed,
            "device": self.device,
            "test_perplexity": self.test_perplexity,
            "valid_perplexity": self.valid_perplexity,
            "ngram_valid_by_order": {
                str(k): v for k, v in self.ngram_valid_by_order.items()
            },
            "test_unknown_rate": self.test_unknown_rate,
            "seconds": self.seconds,
            "lstm_tokens_per_s": self.lstm_tokens_per_s,
        }


def _cache_key(config: LanguageModelConfig, seed: int) -> dict:
    neural = {
        k: v for k, v in asdict(config).items() if k != "ngram_orders"
    }  # the n-grams are not cached
    return caching.artifact_key(
        "ch1-models", {**neural, "corpus_parser": corpora.PARSER_VERSION}, seed
    )


def run_language_models(
    profile: str | None = None,
    seed: int = 0,
    config: LanguageModelConfig | None = None,
    use_cache: bool = True,
    progress: bool = True,
    device: str | torch.device | None = None,
) -> LanguageModelResults:
    """Fit Kneser-Ney n-grams (the order is picked on validation) and train the LSTM and the cloze model.

    The trained neural models are cached in the user cache directory, keyed by the
    configuration and seed, so chapter 2 can put them in its table without training
    them again; ``use_cache=False`` always trains. The LSTMs train and are evaluated on
    ``device`` (default: :func:`runtime.get_device`); the n-grams are counted on the CPU.
    """
    config = config or config_for(profile)
    device = runtime.get_device(str(device) if device is not None else None)
    runtime.set_seed(seed)
    data = _word_data(config.vocab_size)
    vocab = data.vocab
    seconds: dict[str, float] = {}

    began = time.perf_counter()
    by_order = {}
    models = {}
    for order in sorted(set(config.ngram_orders)):
        models[order] = KneserNeyLM(order, len(vocab), vocab.bos_id, vocab.eos_id).fit(
            data.train
        )
        by_order[order] = models[order].perplexity(data.valid)
    best_order = min(by_order, key=by_order.get)
    ngram = models[best_order]
    seconds["ngram"] = time.perf_counter() - began

    key = _cache_key(config, seed)
    path = caching.artifact_path(key)
    lstm = LSTMLanguageModel(
        len(vocab), config.d_embed, config.d_hidden, dropout=config.dropout
    ).to(device)
    cloze = BidirectionalLSTMCloze(
        len(vocab), config.d_embed, config.d_hidden, dropout=config.dropout
    ).to(device)
    with caching.exclusive(path):  # chapters 1 and 2 may ask at once: train once
        cached = caching.load_current(path, key) if use_cache else None
        if cached is not None:
            state = cached["state_dict"]
            for name, model in (("lstm", lstm), ("cloze", cloze)):
                model.load_state_dict(
                    {
                        k[len(name) + 1 :]: v
                        for k, v in state.items()
                        if k.startswith(name + ".")
                    }
                )
            extra = cached["extra"]
            seconds.update(extra["seconds"])
            tokens_per_s = extra["tokens_per_s"]
            curve = (extra["curve_steps"], extra["curve_values"])
        else:
            generator = runtime.set_seed(seed)
            valid_subset = data.valid[:400]

            def valid_ppl(model: LSTMLanguageModel) -> float:
                return perplexity_of(lstm_token_log_probs(model, valid_subset, vocab))

            history = train(
                lstm,
                batch_iterator(data.train, vocab, config.batch_size, generator),
                lambda m, b: lm_batch_loss(m, b.to(device), vocab.pad_id),
                max_steps=config.lstm_steps,
                lr=config.lr,
                warmup_steps=50,
                eval_fn=valid_ppl,
                eval_every=config.eval_every or max(1, config.lstm_steps // 8),
                progress=progress,
                description="LSTM LM",
            )
            seconds["lstm"] = history.seconds
            tokens_per_s = history.items_per_second
            curve = (history.eval_steps, history.eval_values)
            history = train(
                cloze,
                batch_iterator(data.train, vocab, config.batch_size, generator),
                lambda m, b: cloze_batch_loss(m, b.to(device), vocab.pad_id),
                max_steps=config.cloze_steps,
                lr=config.lr,
                warmup_steps=50,
                progress=progress,
                description="bidirectional cloze",
            )
            seconds["cloze"] = history.seconds
            save_checkpoint(
                path,
                torch.nn.ModuleDict({"lstm": lstm, "cloze": cloze}),
                asdict(config),
                caching.tag(
                    {
                        "seconds": {k: v for k, v in seconds.items() if k != "ngram"},
                        "tokens_per_s": tokens_per_s,
                        "curve_steps": list(curve[0]),
                        "curve_values": list(curve[1]),
                    },
                    key,
                ),
            )
    lstm.eval()
    cloze.eval()

    test_perplexity = {
        f"kneser_ney_{best_order}gram": ngram.perplexity(data.test),
        "lstm": perplexity_of(lstm_token_log_probs(lstm, data.test, vocab)),
    }
    valid_perplexity = {
        f"kneser_ney_{best_order}gram": by_order[best_order],
        "lstm": perplexity_of(lstm_token_log_probs(lstm, data.valid, vocab)),
    }
    return LanguageModelResults(
        config=config,
        seed=seed,
        test_perplexity=test_perplexity,
        valid_perplexity=valid_perplexity,
        ngram_valid_by_order=by_order,
        test_unknown_rate=data.unknown_rate("test"),
        seconds=seconds,
        lstm_tokens_per_s=tokens_per_s,
        device=str(device),
        ngram=ngram,
        lstm=lstm,
        cloze=cloze,
        lstm_curve=curve,
    )
