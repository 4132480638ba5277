"""Chapters 1 and 2's task: word-level language modelling of the World English Bible.

Every model of these chapters (Kneser-Ney n-grams, the LSTMs, the GPT) reads the same
data under the same contract, so their numbers sit in one table:

- the words of each verse, over one closed vocabulary built on the training verses
  (:func:`word_data`); a word outside it is the ``<unk>`` event;
- each verse is scored independently, framed as ``<s> w_1 .. w_n </s>``
  (:func:`frame`): a model reads ``<s> w_1 .. w_n`` and predicts ``w_1 .. w_n </s>``;
- perplexity is ``exp(total negative log-likelihood / number of predicted events)``
  (:func:`perplexity_of`).

A verse longer than the GPT's context (a handful in the corpus) is scored in
consecutive windows of ``max_len`` predictions, each window starting from the last
token of the previous one (:func:`windows`); every event is still predicted exactly
once. All test verses fit in one window of the chapters' contexts, so their scores are
exact.

Chapter 2's GPT is trained once per configuration, seed and code version and cached
(:func:`cached_gpt`). :data:`GPT_PROFILES` and :data:`GPT_VOCAB_SIZES` hold its settings
in each profile, and later chapters load it with :func:`load_gpt`, not through an
experiment.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from . import caching, configs, corpora, distributed, runtime
from .distributed import SINGLE, World
from .generation import generate
from .neural_lm import BidirectionalLSTMCloze, LSTMLanguageModel
from .ngram import KneserNeyLM
from .tokenization import WordVocab, pad_batch
from .training import (
    TrainHistory,
    autocast_dtype,
    bucketed_batches,
    resolve_precision,
    save_checkpoint,
    train,
)
from .transformer import GPT, ModelSizes

# ---------------------------------------------------------------------------- data


@dataclass
class WordLMData:
    """Word ids per verse (no ``<s>``/``</s>``; models add them) for each split, and
    the vocabulary."""

    vocab: WordVocab
    train: list[list[int]]
    valid: list[list[int]]
    test: list[list[int]]

    def unknown_rate(self, split: str = "test") -> float:
        """The share of the words of ``split`` that are ``<unk>``."""
        sentences = getattr(self, corpora.check_split(split))
        total = sum(len(s) for s in sentences)
        return sum(w == self.vocab.unk_id for s in sentences for w in s) / total


def check_settings(vocab_size: int, ngram_orders: Sequence[int]) -> None:
    """The checks of the settings that chapters 1 and 2 share: a ``ValueError`` that
    names the bad one."""
    if vocab_size < 10:
        raise ValueError(f"vocab_size must be at least 10, got {vocab_size}")
    if not ngram_orders or min(ngram_orders) < 1:
        raise ValueError(
            f"ngram_orders must be a non-empty list of orders >= 1, got {ngram_orders}"
        )


@functools.lru_cache(maxsize=4)
def word_data(vocab_size: int) -> WordLMData:
    """The WEB verses as word ids, over the ``vocab_size`` most frequent words of the
    training split (cached per process)."""
    if vocab_size < 10:
        raise ValueError(f"vocab_size must be at least 10, got {vocab_size}")
    verses = corpora.load_bible_verses()
    by_split = {s: [v.text for v in verses if v.split == s] for s in corpora.SPLITS}
    vocab = WordVocab.build(by_split["train"], max_size=vocab_size)
    encoded = {s: [vocab.encode(t) for t in texts] for s, texts in by_split.items()}
    return WordLMData(vocab, encoded["train"], encoded["valid"], encoded["test"])


def frame(sentence: list[int], vocab: WordVocab) -> list[int]:
    """``<s> sentence </s>``."""
    return [vocab.bos_id, *sentence, vocab.eos_id]


def batch_iterator(
    sentences: list[list[int]],
    vocab: WordVocab,
    batch_size: int,
    generator: torch.Generator,
) -> Iterator[Tensor]:
    """Endless framed, padded training batches; verses of similar length are batched
    together to limit padding."""
    return bucketed_batches(
        [frame(s, vocab) for s in sentences], batch_size, vocab.pad_id, generator
    )


def length_batches(
    lengths: Sequence[int], max_tokens: int, max_rows: int | None = None
) -> Iterator[list[int]]:
    """Indices of sequences grouped by similar length for evaluation: at most
    ``max_tokens`` padded positions (and ``max_rows`` rows, if given) a batch.

    The indices are sorted by length (ties in input order), so the newest sequence is
    the longest of its batch; a sequence longer than ``max_tokens`` gets a batch alone.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    batch: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        full = max_rows is not None and len(batch) >= max_rows
        if batch and (full or lengths[index] * (len(batch) + 1) > max_tokens):
            yield batch
            batch = []
        batch.append(index)
    if batch:
        yield batch


# ------------------------------------------------------------ scoring, perplexity


def perplexity_of(nll: float, events: int) -> float:
    """``exp(nll / events)``: the perplexity of ``events`` predictions whose negative
    log-likelihoods (nats) sum to ``nll``."""
    if events <= 0:
        raise ValueError("no events to compute a perplexity over")
    return math.exp(nll / events)


def summed_nll(token_log_probs: Sequence[Sequence[float]]) -> tuple[float, int]:
    """The total negative log-likelihood of per-event log-probabilities (one list per
    sentence) and the number of events: the arguments of :func:`perplexity_of`."""
    return -sum(sum(t) for t in token_log_probs), sum(len(t) for t in token_log_probs)


@dataclass(frozen=True)
class Scorer:
    """How one model scores framed, right-padded batches for :func:`token_log_probs`.

    ``score(batch)`` returns, for a (B, T) batch of ``<s> w_1 .. w_n </s>`` rows on
    ``device``, the log-probability of each predicted event of each row, left-aligned:
    the words, then ``</s>`` if ``predicts_end``.
    """

    score: Callable[[Tensor], Tensor]
    device: torch.device
    predicts_end: bool


def lstm_scorer(model: LSTMLanguageModel) -> Scorer:
    """log P(w_i | w_<i) for each word and ``</s>`` (puts ``model`` in eval mode)."""
    model.eval()

    def score(batch: Tensor) -> Tensor:
        log_probs, _ = model(batch[:, :-1])
        return log_probs.gather(-1, batch[:, 1:, None]).squeeze(-1)

    return Scorer(score, next(model.parameters()).device, predicts_end=True)


def cloze_scorer(model: BidirectionalLSTMCloze, pad_id: int) -> Scorer:
    """log P(w_i | all other words) for each word, the pseudo-log-likelihood terms
    (puts ``model`` in eval mode)."""
    model.eval()

    def score(batch: Tensor) -> Tensor:
        lengths = (batch != pad_id).sum(dim=1)
        return model(batch, lengths).gather(-1, batch[:, 1:-1, None]).squeeze(-1)

    return Scorer(score, next(model.parameters()).device, predicts_end=False)


@torch.no_grad()
def token_log_probs(
    scorer: Scorer,
    sentences: list[list[int]],
    vocab: WordVocab,
    max_tokens: int = 8192,
) -> list[list[float]]:
    """Per-event log-probabilities of every sentence under ``scorer``, in input order.

    Sentences are framed and batched by length, at most ``max_tokens`` padded positions
    a batch (this bounds the memory of the (batch, length, vocab) log-probabilities).
    """
    results: list[list[float]] = [[] for _ in sentences]
    lengths = [len(s) + 2 for s in sentences]
    for indices in length_batches(lengths, max_tokens):
        batch = pad_batch([frame(sentences[i], vocab) for i in indices], vocab.pad_id)
        log_probs = scorer.score(batch.to(scorer.device))
        for row, i in enumerate(indices):
            events = len(sentences[i]) + int(scorer.predicts_end)
            results[i] = log_probs[row, :events].tolist()
    return results


# ---------------------------------------------------------------- baselines


@dataclass
class NgramChoice:
    """Kneser-Ney models of several orders, and the order best on validation."""

    order: int
    model: KneserNeyLM
    valid_by_order: dict[int, float]


def best_ngram(data: WordLMData, orders: Sequence[int]) -> NgramChoice:
    """Fit a Kneser-Ney model of each order on the training verses and keep the one
    with the lowest validation perplexity (counted on the CPU)."""
    if not orders or min(orders) < 1:
        raise ValueError(
            f"orders must be a non-empty list of orders >= 1, got {orders}"
        )
    vocab = data.vocab
    models, valid = {}, {}
    for order in sorted(set(orders)):
        models[order] = KneserNeyLM(order, len(vocab), vocab.bos_id, vocab.eos_id)
        models[order].fit(data.train)
        valid[order] = models[order].perplexity(data.valid)
    best = min(valid, key=valid.get)
    return NgramChoice(best, models[best], valid)


def unigram_perplexity(
    train: list[list[int]], test: list[list[int]], vocab: WordVocab
) -> float:
    """Perplexity of word frequencies alone (no context), counted on ``train``, on the
    same events.

    Every vocabulary word occurs in ``train`` (the vocabulary is built there), so no
    event gets probability zero.
    """
    counts = torch.bincount(
        torch.tensor([w for s in train for w in (*s, vocab.eos_id)]),
        minlength=len(vocab),
    ).double()
    log_p = (counts / counts.sum()).log()
    events = torch.tensor([w for s in test for w in (*s, vocab.eos_id)])
    if len(events) == 0:
        raise ValueError("no events to score")
    if bool(torch.isinf(log_p[events]).any()):
        raise ValueError(
            "a test event never occurs in train: the unigram model gives it "
            "probability zero"
        )
    return perplexity_of(-float(log_p[events].sum()), len(events))


def seen_ngram_rate(
    train: list[list[int]], test: list[list[int]], vocab: WordVocab, n: int = 4
) -> float:
    """Fraction of the test verses' n-grams (framed with ``<s>``s and ``</s>``) that
    occur verbatim in ``train``."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")

    def grams(sentences: list[list[int]]) -> Iterator[tuple[int, ...]]:
        for s in sentences:
            framed = [vocab.bos_id] * (n - 1) + list(s) + [vocab.eos_id]
            for i in range(len(framed) - n + 1):
                yield tuple(framed[i : i + n])

    seen = set(grams(train))
    test_grams = list(grams(test))
    if not test_grams:
        raise ValueError("no test n-grams")
    return sum(g in seen for g in test_grams) / len(test_grams)


# --------------------------------------------------------------------- the GPT


def windows(sentence: list[int], vocab: WordVocab, context: int) -> list[list[int]]:
    """Frame ``sentence`` as ``<s> .. </s>`` and cut it into pieces of at most
    ``context + 1`` tokens.

    Consecutive pieces overlap by one token, so each piece's inputs are ``piece[:-1]``,
    its targets ``piece[1:]``, and every target of the framed verse appears once.
    """
    if context < 1:
        raise ValueError(f"context must be >= 1, got {context}")
    framed = frame(sentence, vocab)
    return [
        framed[start : start + context + 1]
        for start in range(0, len(framed) - 1, context)
    ]


def all_windows(
    sentences: list[list[int]], vocab: WordVocab, context: int
) -> list[list[int]]:
    """:func:`windows` of every sentence, in order."""
    return [piece for s in sentences for piece in windows(s, vocab, context)]


def lm_loss(model: GPT, batch: Tensor, pad_id: int) -> tuple[Tensor, int]:
    """Mean next-token cross-entropy over the non-padding targets of a padded batch,
    and their count.

    Padding sits to the right, so with causal attention no real position attends to it.
    """
    inputs, targets = batch[:, :-1], batch[:, 1:]
    logits = model(inputs)
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        targets.reshape(-1),
        ignore_index=pad_id,
    )
    return loss, int((targets != pad_id).sum())


@torch.no_grad()
def total_nll(
    model: GPT,
    sentences: list[list[int]],
    vocab: WordVocab,
    batch_size: int = 128,
    max_tokens: int = 8192,
) -> tuple[float, int]:
    """Total negative log-likelihood (nats) of ``sentences`` under the GPT, and the
    event count.

    Batches hold at most ``batch_size`` windows and ``max_tokens`` padded positions
    (this bounds the memory of the (batch, length, vocab) logits).
    """
    if not sentences:
        raise ValueError("no sentences to score")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pieces = all_windows(sentences, vocab, model.config.max_len)
    nll, count = 0.0, 0
    for indices in length_batches([len(p) for p in pieces], max_tokens, batch_size):
        batch = pad_batch([pieces[i] for i in indices], vocab.pad_id).to(device)
        logits = model(batch[:, :-1]).float()
        targets = batch[:, 1:]
        losses = F.cross_entropy(
            logits.transpose(1, 2), targets, ignore_index=vocab.pad_id, reduction="sum"
        )
        nll += float(losses)
        count += int((targets != vocab.pad_id).sum())
    model.train(was_training)
    return nll, count


def gpt_perplexity(model: GPT, sentences: list[list[int]], vocab: WordVocab) -> float:
    """The perplexity of ``sentences`` under the GPT: every word and the closing
    ``</s>`` of each verse, from ``<s>``."""
    return perplexity_of(*total_nll(model, sentences, vocab))


def sample_verses(
    model: GPT,
    vocab: WordVocab,
    count: int = 5,
    max_new_tokens: int = 40,
    temperature: float = 0.8,
    top_k: int | None = 40,
    generator: torch.Generator | None = None,
    prompt: str | None = None,
) -> list[str]:
    """Sample ``count`` verses (batched, with the KV cache), each cut at its first
    ``</s>``."""
    if count <= 0:
        raise ValueError(f"count must be positive, got {count}")
    device = next(model.parameters()).device
    start = vocab.encode(prompt or "", add_bos=True)
    max_new_tokens = min(max_new_tokens, model.config.max_len - len(start))
    prompt_ids = torch.tensor([start] * count, device=device)
    tokens = generate(
        model,
        prompt_ids,
        max_new_tokens,
        temperature,
        top_k,
        use_cache=True,
        generator=generator,
    )
    texts = []
    for row in tokens.tolist():
        body = row[1:]
        if vocab.eos_id in body:
            body = body[: body.index(vocab.eos_id)]
        texts.append(vocab.decode(body))
    return texts


@torch.no_grad()
def attention_weights(model: GPT, ids: list[int]) -> list[Tensor]:
    """Each layer's attention weights (heads, L, L) for one sequence of ids, on the
    CPU for plotting."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    _, weights = model(torch.tensor([ids], device=device), need_weights=True)
    model.train(was_training)
    return [w[0].cpu() for w in weights]


@dataclass(frozen=True)
class GPTTraining:
    """The sizes and training budget of chapter 2's GPT; the vocabulary comes from the
    data. ``valid_subset`` verses of the validation split are scored every
    ``eval_every`` steps (0: only at the end)."""

    model: ModelSizes = ModelSizes(max_len=128)
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 100
    steps: int = 3000
    weight_decay: float = 0.01
    eval_every: int = 0
    valid_subset: int = 300
    # auto: bf16 autocast where it is fast (runtime.default_precision), else fp32; on
    # this book's CPU bf16 trains 1.8x faster to the same validation loss
    precision: str = "auto"

    def __post_init__(self) -> None:
        for name in ("batch_size", "steps", "valid_subset"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.model.max_len < 2:
            raise ValueError(
                f"model.max_len must be at least 2, got {self.model.max_len}"
            )
        if self.model.num_decoder_layers is not None:
            raise ValueError(
                "model.num_decoder_layers must be None: a GPT has no decoder stack"
            )
        autocast_dtype(self.precision, "cpu")  # names the precision if it is unknown

    def cache_config(self) -> dict:
        """The settings that determine the trained model, flat, as its cache key has
        always held them."""
        sizes = asdict(self.model)
        del sizes["num_decoder_layers"]  # always None for a GPT
        budget = asdict(self)
        del budget["model"]
        return {**sizes, **budget}


#: the vocabulary size of chapters 1 and 2 (and of the GPT) in each profile
GPT_VOCAB_SIZES: dict[str, int] = {"quick": 6000, "full": 12000}

#: the sizes and budget of chapter 2's GPT in each profile
GPT_PROFILES: dict[str, GPTTraining] = {
    # about 9 minutes on 2 CPU cores: 3,000 steps of 64 verses
    "quick": GPTTraining(eval_every=300),
    # minutes on a GPU: a 6-layer model, many epochs, more regularisation
    "full": GPTTraining(
        model=ModelSizes(
            d_model=384,
            num_heads=6,
            num_layers=6,
            d_ff=1536,
            max_len=256,
            dropout=0.2,
        ),
        lr=1e-3,
        warmup_steps=400,
        steps=8000,
        batch_size=64,
        eval_every=1000,
        valid_subset=2605,
    ),
}


def train_gpt(
    training: GPTTraining,
    data: WordLMData,
    *,
    seed: int,
    device: torch.device,
    progress: bool = True,
    world: World = SINGLE,
) -> tuple[GPT, TrainHistory]:
    """Train a GPT from scratch on ``data`` on ``device``; returns it in eval mode.

    With several processes (``world``) every rank builds the same model and batch
    stream from ``seed`` and trains on its rows of each batch
    (:func:`lmpg_utils.training.train`): the global batch is ``training.batch_size``,
    which must be a multiple of ``world.size``.
    """
    distributed.check_divisible(training.batch_size, world, "gpt.batch_size")
    vocab = data.vocab
    generator = runtime.set_seed(seed)
    model = GPT(training.model.with_vocab(len(vocab))).to(device)
    pieces = all_windows(data.train, vocab, training.model.max_len)
    batches = (
        b.to(device)
        for b in bucketed_batches(pieces, training.batch_size, vocab.pad_id, generator)
    )
    subset = data.valid[: training.valid_subset]

    def mean_nll(m: GPT) -> float:
        nll, count = total_nll(m, subset, vocab)
        return nll / count

    history = train(
        model,
        batches,
        lambda m, b: lm_loss(m, b, vocab.pad_id),
        max_steps=training.steps,
        lr=training.lr,
        warmup_steps=training.warmup_steps,
        weight_decay=training.weight_decay,
        eval_fn=mean_nll,
        eval_every=training.eval_every,
        progress=progress,
        description="GPT",
        precision=training.precision,
        world=world,
    )
    model.eval()
    return model, history


@dataclass
class TrainedGPT:
    """A GPT from :func:`cached_gpt`, its vocabulary, its training history and whether
    it was loaded."""

    model: GPT = field(repr=False)
    vocab: WordVocab = field(repr=False)
    history: TrainHistory = field(repr=False)
    cached: bool


def cached_gpt(
    training: GPTTraining,
    data: WordLMData,
    *,
    profile: str,
    seed: int,
    device: str | torch.device,
    progress: bool = True,
    world: World = SINGLE,
) -> TrainedGPT:
    """The GPT of ``training`` on ``data``: trained once per settings, seed and code
    version, then loaded from the cache, on ``device`` and in eval mode.

    ``profile`` names the profile the settings came from; it is part of the cache key
    (so that chapter 2's cached models are found under the key they were saved with).

    With several processes (``world``), rank 0 alone reads and writes the cache (and
    holds its lock): it sends what it found to the other ranks, which then need no
    shared disk; when nothing was cached, every rank trains and rank 0 saves. The
    number of processes is not part of the key: training on several is the same
    optimisation as on one (:func:`train_gpt`), so one key names both.
    """
    device = torch.device(device)
    # the precision it trains in, not "auto", names the model
    training = replace(
        training, precision=resolve_precision(training.precision, device.type)
    )
    vocab = data.vocab
    key = caching.artifact_key(
        "ch2-gpt",
        dict(training.cache_config(), data_profile=profile, vocab_size=len(vocab)),
        seed,
    )
    path = caching.artifact_path(key)
    # two notebooks may ask at once: train once; under torchrun rank 0 alone locks
    with caching.shared_entry([path], key, world) as (stored,):
        if stored is not None:
            model = GPT(training.model.with_vocab(len(vocab))).to(device)
            model.load_state_dict(stored["state_dict"])
            model.eval()
            history = TrainHistory.from_dict(json.loads(stored["extra"]["history"]))
            return TrainedGPT(model, vocab, history, cached=True)
        model, history = train_gpt(
            training, data, seed=seed, device=device, progress=progress, world=world
        )
        if world.is_main:
            extra = {"history": json.dumps(history.to_dict())}
            save_checkpoint(path, model, key["config"], caching.tag(extra, key))
    return TrainedGPT(model, vocab, history, cached=False)


def load_gpt(
    profile: str,
    *,
    seed: int,
    device: str | torch.device,
    progress: bool = True,
    training: GPTTraining | None = None,
    vocab_size: int | None = None,
    world: World = SINGLE,
) -> TrainedGPT:
    """Chapter 2's GPT of ``profile`` and ``seed`` with its vocabulary, on ``device`` and
    in eval mode: loaded from the cache, or trained now (minutes) and cached.

    ``training`` and ``vocab_size`` default to the profile's (:data:`GPT_PROFILES`,
    :data:`GPT_VOCAB_SIZES`); other values name another model under the same profile
    (as chapter 2's ``--set`` does). ``world``: see :func:`cached_gpt`.
    """
    if training is None:
        training = configs.profile_config(GPT_PROFILES, profile)
    if vocab_size is None:
        vocab_size = configs.profile_config(GPT_VOCAB_SIZES, profile)
    return cached_gpt(
        training,
        word_data(vocab_size),
        profile=profile,
        seed=seed,
        device=device,
        progress=progress,
        world=world,
    )
