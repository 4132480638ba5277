"""Chapter 2's main run: a small GPT trained on the same English words as chapter 1.

The data, vocabulary and perplexity contract are chapter 1's
(:func:`~lmpg_utils.experiments.language_models.prepare_word_data`): each verse is
framed as ``<s> w_1 .. w_n </s>``; the model reads ``<s> w_1 .. w_n`` and predicts
``w_1 .. w_n </s>``; perplexity is ``exp(total NLL / number of predicted events)``
with ``<unk>`` predicted like any word. The GPT's number therefore sits in the same
table as the n-gram's and the LSTM's.

A verse longer than the model's context (a handful in the corpus) is scored in
consecutive windows of ``max_len`` predictions, each window starting from the last
token of the previous one; every event is still predicted exactly once. All test
verses fit in one window of the configured context, so their scores are exact.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import caching, runtime
from ..generation import generate
from ..neural_lm import pad_batch
from ..ngram import KneserNeyLM
from ..tokenization import WordVocab
from ..training import TrainHistory, bucketed_batches, save_checkpoint, train
from ..transformer import GPT, TransformerConfig, count_parameters
from .language_models import prepare_word_data


@dataclass(frozen=True)
class GPTExperimentConfig:
    """Model sizes and training budget of chapter 2's GPT (the data's vocabulary size
    comes from chapter 1's profile)."""

    d_model: int = 128
    num_heads: int = 4
    num_layers: int = 2
    d_ff: int = 512
    max_len: int = 128
    dropout: float = 0.1
    positional: str = "learned"
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 100
    steps: int = 3000
    weight_decay: float = 0.01
    eval_every: int = 0
    valid_subset: int = 300
    precision: str = "fp32"

    def __post_init__(self) -> None:
        for name in (
            "d_model",
            "num_heads",
            "num_layers",
            "d_ff",
            "max_len",
            "batch_size",
            "steps",
            "valid_subset",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_len < 2:
            raise ValueError(f"max_len must be at least 2, got {self.max_len}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        # the model's own checks (divisibility, positional kind, dropout range)
        self.model_config(10)

    def model_config(self, vocab_size: int) -> TransformerConfig:
        return TransformerConfig(
            vocab_size=vocab_size,
            d_model=self.d_model,
            num_heads=self.num_heads,
            num_layers=self.num_layers,
            d_ff=self.d_ff,
            max_len=self.max_len,
            dropout=self.dropout,
            positional=self.positional,
        )


CONFIGS = {
    # trained once (cached), about 9 minutes on 2 CPU cores: 3,000 steps of 64 verses
    "quick": GPTExperimentConfig(eval_every=300),
    # minutes on a GPU: a 6-layer model, many epochs, more regularisation
    "full": GPTExperimentConfig(
        d_model=384,
        num_heads=6,
        num_layers=6,
        d_ff=1536,
        max_len=256,
        dropout=0.2,
        lr=1e-3,
        warmup_steps=400,
        steps=8000,
        batch_size=64,
        eval_every=1000,
        valid_subset=2605,
    ),
}


def config_for(profile: str | None = None) -> GPTExperimentConfig:
    """The configuration of a profile (``quick`` or ``full``; default from the runtime)."""
    return CONFIGS[runtime.get_profile(profile)]


def windows(sentence: list[int], vocab: WordVocab, context: int) -> list[list[int]]:
    """Frame ``sentence`` as ``<s> .. </s>`` and cut it into pieces of at most ``context + 1`` tokens.

    Consecutive pieces overlap by one token, so each piece's inputs are ``piece[:-1]``,
    its targets ``piece[1:]``, and every target of the framed verse appears once.
    """
    if context < 1:
        raise ValueError(f"context must be >= 1, got {context}")
    framed = [vocab.bos_id, *sentence, vocab.eos_id]
    return [
        framed[start : start + context + 1]
        for start in range(0, len(framed) - 1, context)
    ]


def all_windows(
    sentences: list[list[int]], vocab: WordVocab, context: int
) -> list[list[int]]:
    """:func:`windows` of every sentence, in order."""
    return [piece for s in sentences for piece in windows(s, vocab, context)]


def batch_iterator(
    pieces: list[list[int]], batch_size: int, pad_id: int, generator: torch.Generator
) -> Iterator[Tensor]:
    """Endless shuffled, padded batches; pieces of similar length share a batch to limit padding."""
    return bucketed_batches(pieces, batch_size, pad_id, generator)


def lm_loss(model: GPT, batch: Tensor, pad_id: int) -> tuple[Tensor, int]:
    """Mean next-token cross-entropy over the non-padding targets of a padded batch, and their count.

    Padding sits to the right, so with causal attention no real position ever attends to it.
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
    """Total negative log-likelihood (nats) of ``sentences`` under the chapter-1 contract, and the event count.

    Batches hold at most ``batch_size`` pieces and ``max_tokens`` padded positions (this
    bounds the memory of the (batch, length, vocab) logits).
    """
    if not sentences:
        raise ValueError("no sentences to score")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pieces = sorted(all_windows(sentences, vocab, model.config.max_len), key=len)
    batches: list[list[list[int]]] = [[]]
    for (
        piece
    ) in pieces:  # sorted by length: the newest piece is the longest in its batch
        if batches[-1] and (
            len(batches[-1]) >= batch_size
            or (len(batches[-1]) + 1) * len(piece) > max_tokens
        ):
            batches.append([])
        batches[-1].append(piece)
    nll, count = 0.0, 0
    for chunk in batches:
        batch = pad_batch(chunk, vocab.pad_id).to(device)
        logits = model(batch[:, :-1]).float()
        targets = batch[:, 1:]
        losses = F.cross_entropy(
            logits.transpose(1, 2), targets, ignore_index=vocab.pad_id, reduction="sum"
        )
        nll += float(losses)
        count += int((targets != vocab.pad_id).sum())
    model.train(was_training)
    return nll, count


def perplexity(model: GPT, sentences: list[list[int]], vocab: WordVocab) -> float:
    """``exp(total NLL / events)``: every word and the closing ``</s>`` of each verse, from ``<s>``."""
    nll, count = total_nll(model, sentences, vocab)
    return math.exp(nll / count)


def unigram_perplexity(
    train: list[list[int]], test: list[list[int]], vocab: WordVocab
) -> float:
    """Perplexity of word frequencies alone (no context), counted on ``train``, on the same events.

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
            "a test event never occurs in train: the unigram model gives it probability zero"
        )
    return math.exp(-float(log_p[events].mean()))


def seen_ngram_rate(
    train: list[list[int]], test: list[list[int]], vocab: WordVocab, n: int = 4
) -> float:
    """Fraction of the test verses' n-grams (framed with ``<s>``s and ``</s>``) that occur verbatim in ``train``."""
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
    """Sample ``count`` verses (batched, with the KV cache), each cut at its first ``</s>``."""
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
    """Each layer's attention weights (heads, L, L) for one sequence of ids (computed from the formula)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    _, weights = model(torch.tensor([ids], device=device), need_weights=True)
    model.train(was_training)
    return [w[0].cpu() for w in weights]  # reporting: the notebook plots them


@dataclass
class GPTResults:
    """What chapter 2 reports; the trained model is kept for samples and attention maps."""

    config: GPTExperimentConfig
    seed: int
    vocab_size: int
    num_parameters: int
    val_loss: float
    valid_perplexity: float
    test_perplexity: float
    tokens_per_s: float
    seconds: float
    steps_done: int
    device: str
    ngram_order: int
    ngram_test_perplexity: float
    cached: bool
    history: TrainHistory = field(repr=False)
    model: GPT | None = field(default=None, repr=False)
    vocab: WordVocab | None = field(default=None, repr=False)

    def summary(self) -> dict:
        """Plain numbers, JSON-serialisable (what the command line prints)."""
        return {
            "profile_config": asdict(self.config),
            "seed": self.seed,
            "vocab_size": self.vocab_size,
            "num_parameters": self.num_parameters,
            "steps": self.steps_done,
            "device": self.device,
            "val_loss": self.val_loss,
            "valid_perplexity": self.valid_perplexity,
            "test_perplexity": self.test_perplexity,
            "ngram_order": self.ngram_order,
            "ngram_test_perplexity": self.ngram_test_perplexity,
            "tokens_per_s": self.tokens_per_s,
            "seconds": self.seconds,
            "cached": self.cached,
        }


def ngram_baseline(data, orders: tuple[int, ...] = (3, 4, 5)) -> tuple[int, float]:
    """Chapter 1's Kneser-Ney baseline on the same data: the order best on validation and its test perplexity."""
    models = {
        n: KneserNeyLM(n, len(data.vocab), data.vocab.bos_id, data.vocab.eos_id).fit(
            data.train
        )
        for n in orders
    }
    best = min(orders, key=lambda n: models[n].perplexity(data.valid))
    return best, models[best].perplexity(data.test)


def train_gpt(
    config: GPTExperimentConfig,
    data,
    seed: int,
    device: torch.device,
    progress: bool = True,
) -> tuple[GPT, TrainHistory]:
    """Train the chapter's GPT from scratch on chapter 1's word data."""
    vocab = data.vocab
    generator = runtime.set_seed(seed)
    model = GPT(config.model_config(len(vocab))).to(device)
    pieces = all_windows(data.train, vocab, config.max_len)
    batches = (
        b.to(device)
        for b in batch_iterator(pieces, config.batch_size, vocab.pad_id, generator)
    )
    subset = data.valid[: config.valid_subset]

    def eval_fn(m: GPT) -> float:
        nll, count = total_nll(m, subset, vocab)
        return nll / count

    history = train(
        model,
        batches,
        lambda m, b: lm_loss(m, b, vocab.pad_id),
        max_steps=config.steps,
        lr=config.lr,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        eval_fn=eval_fn,
        eval_every=config.eval_every,
        progress=progress,
        description="GPT",
        precision=config.precision,
    )
    model.eval()
    return model, history


def run_gpt(
    profile: str | None = None,
    seed: int = 0,
    config: GPTExperimentConfig | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
    cache: bool = True,
) -> GPTResults:
    """The chapter's GPT (trained once per config, seed and code version, then loaded
    from the cache), scored on the test verses next to chapter 1's Kneser-Ney model.

    ``val_loss`` is the mean NLL per event on the whole validation split (nats);
    periodic evaluations during training use the first ``valid_subset`` verses.
    ``cache=False`` always trains (what the unit tests do).
    """
    profile = runtime.get_profile(profile)
    config = config or config_for(profile)
    device = runtime.get_device(str(device) if device is not None else None)
    data = prepare_word_data(profile)
    vocab = data.vocab
    began = time.perf_counter()
    key = caching.artifact_key(
        "ch2-gpt",
        dict(asdict(config), data_profile=profile, vocab_size=len(vocab)),
        seed,
    )
    path = caching.artifact_path(key)
    with caching.exclusive(path):
        stored = caching.load_current(path, key) if cache else None
        if stored is not None:
            model = GPT(config.model_config(len(vocab))).to(device)
            model.load_state_dict(stored["state_dict"])
            model.eval()
            record = json.loads(stored["extra"]["history"])
            history = TrainHistory.from_dict(record)
        else:
            model, history = train_gpt(config, data, seed, device, progress)
            if cache:
                extra = {"history": json.dumps(history.to_dict())}
                save_checkpoint(path, model, asdict(config), caching.tag(extra, key))
    nll, count = total_nll(model, data.valid, vocab)
    val_loss = nll / count
    test_ppl = perplexity(model, data.test, vocab)
    order, ngram_ppl = ngram_baseline(data)
    return GPTResults(
        config=config,
        seed=seed,
        vocab_size=len(vocab),
        num_parameters=count_parameters(model),
        val_loss=val_loss,
        valid_perplexity=math.exp(val_loss),
        test_perplexity=test_ppl,
        tokens_per_s=history.items_per_second,
        seconds=history.seconds if stored is not None else time.perf_counter() - began,
        steps_done=len(history.steps),
        device=str(device),
        ngram_order=order,
        ngram_test_perplexity=ngram_ppl,
        cached=stored is not None,
        history=history,
        model=model,
        vocab=vocab,
    )


def with_steps(config: GPTExperimentConfig, steps: int) -> GPTExperimentConfig:
    """A copy of ``config`` with another step budget (for smoke tests and sweeps)."""
    return replace(
        config, steps=steps, warmup_steps=min(config.warmup_steps, max(1, steps // 10))
    )
