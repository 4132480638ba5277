"""Chapter 3's tokenizer and its pre-trained BERT, trained once and cached.

:class:`Pretraining` holds everything that determines the pre-trained model, and
:data:`PRETRAINING` its settings in each profile. :func:`load_pretrained` loads the
model when the same settings, seed, tokenizer and code made it before (see
:mod:`lmpg_utils.caching`), and otherwise pre-trains it now and caches it. Later
chapters reuse it from here, not through an experiment.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

import torch

from .. import caching, corpora, distributed
from ..distributed import SINGLE, World
from ..tokenization import BPETokenizer
from ..training import save_checkpoint
from ..transformer import ModelSizes, TransformerConfig
from .data import EncodedBatch, check_sentence_task, encode_nsp, pretraining_pairs
from .masking import SpecialIds
from .model import BertModel
from .training import PretrainHistory, pretrain

#: the cache kind of the pre-trained model
CACHE_KIND = "ch3-bert"


@dataclass(frozen=True)
class Pretraining:
    """The tokenizer size, encoder sizes, objectives, data and budget of BERT's
    pre-training; the defaults are the ``quick`` profile with BERT's objectives (masked
    LM + next-sentence prediction). ``sentence_task`` replaces NSP by ALBERT's
    sentence-order prediction (``"sop"``) or drops it (``"none"``; see
    :func:`~lmpg_utils.bert.data.pretraining_pairs`). Step budgets (not wall clock)
    keep results reproducible."""

    vocab_size: int = 4000  # BPE tokens, BERT's specials included
    # The encoder; BERT adds two segments (sentence A and B) to it. Fixed sinusoidal
    # positions and no dropout: in a CPU budget of a few thousand steps, learned
    # position embeddings leave the "predict frequent tokens" plateau much later.
    model: ModelSizes = ModelSizes(
        d_model=128,
        num_heads=4,
        num_layers=2,
        d_ff=256,
        max_len=64,
        dropout=0.0,
        positional="sinusoidal",
    )
    pairs: int = 20000  # NSP pairs from the train split
    # 2,400 steps: the NSP loss sits at ln 2 for the first 1,000-1,500 steps (seeds
    # 0-2); 1,200 steps left NSP at chance for seed 1 (0.501) and let it start for others.
    steps: int = 2400
    batch_size: int = 32  # pairs per step
    lr: float = 2e-3  # peak learning rate
    warmup_steps: int = 30
    sentence_task: str = "nsp"  # next to the masked LM: "nsp", "sop" or "none"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "pairs", "steps", "batch_size", "lr"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        check_sentence_task(self.sentence_task)
        if self.batch_size > self.pairs:
            raise ValueError(
                f"batch_size ({self.batch_size}) must not exceed pairs ({self.pairs})"
            )
        if not isinstance(self.model, ModelSizes):
            raise ValueError(f"model must be ModelSizes, got {type(self.model)}")
        if self.model.max_len < 3:
            raise ValueError(
                f"model.max_len must be at least 3 ([CLS] A [SEP]), got "
                f"{self.model.max_len}"
            )
        if self.model.num_decoder_layers is not None:
            raise ValueError(
                "model.num_decoder_layers must be None: BERT is an encoder, got "
                f"{self.model.num_decoder_layers}"
            )

    def model_config(self) -> TransformerConfig:
        """The encoder's full configuration: the sizes, the tokenizer's vocabulary and
        two segments."""
        return self.model.with_vocab(self.vocab_size, num_segments=2)

    def cache_settings(self) -> dict[str, Any]:
        """The settings that name the pre-trained model in the cache (with the seed and
        the tokenizer's hash), flat, under the names the cache has always used."""
        sizes = self.model
        return {
            "vocab_size": self.vocab_size,
            "d_model": sizes.d_model,
            "num_heads": sizes.num_heads,
            "num_layers": sizes.num_layers,
            "d_ff": sizes.d_ff,
            "max_len": sizes.max_len,
            "dropout": sizes.dropout,
            "positional": sizes.positional,
            "pretrain_pairs": self.pairs,
            "pretrain_steps": self.steps,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "warmup_steps": self.warmup_steps,
            "sentence_task": self.sentence_task,
        }


#: the pre-training of each profile
PRETRAINING: dict[str, Pretraining] = {
    # minutes on 2 CPU cores; the defaults above explain its choices
    "quick": Pretraining(),
    "full": Pretraining(
        vocab_size=8000,
        model=ModelSizes(
            d_model=256,
            num_heads=8,
            num_layers=4,
            d_ff=1024,
            max_len=128,
            dropout=0.1,
            positional="learned",
        ),
        pairs=300_000,
        steps=5000,  # about 10 min on a Colab T4 (benchmarks/estimate_full_profiles.py)
        batch_size=128,
        lr=1e-3,
        warmup_steps=500,
    ),
}


def train_bible_tokenizer(vocab_size: int) -> BPETokenizer:
    """A BPE tokenizer of exactly ``vocab_size`` tokens (BERT's specials included),
    trained on the train-split verses of the Bible; deterministic. A size the verses
    cannot fill is a ``ValueError``."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    tokenizer = BPETokenizer.train(
        [v.text for v in corpora.load_bible_verses("train")], vocab_size
    )
    if len(tokenizer) != vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens, {vocab_size} were asked for"
        )
    return tokenizer


def pretraining_data(
    pretraining: Pretraining, tokenizer: BPETokenizer, special: SpecialIds, seed: int
) -> EncodedBatch:
    """The encoded pairs that BERT is pre-trained on, labelled for its sentence task
    (``is_next``; for SOP, in order): drawn from the train-split verses with ``seed``
    (:func:`~lmpg_utils.bert.data.pretraining_pairs`)."""
    pairs = pretraining_pairs(
        corpora.load_bible_verses("train"),
        pretraining.pairs,
        seed,
        pretraining.sentence_task,
    )
    return encode_nsp(tokenizer, pairs, special, pretraining.model.max_len)


@dataclass
class PretrainedBert:
    """The pre-trained model (in eval mode), its tokenizer and special ids, its
    training history, the seconds its pre-training took, and whether it came from the
    cache."""

    model: BertModel
    tokenizer: BPETokenizer
    special: SpecialIds
    history: PretrainHistory
    seconds: float
    cached: bool


def tokenizer_hash(tokenizer: BPETokenizer) -> str:
    """SHA-256 (hex) of the tokenizer's serialised form: part of the cache keys of the
    models that read its ids."""
    return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()


def load_pretrained(
    pretraining: Pretraining,
    *,
    seed: int,
    device: torch.device | str,
    progress: bool = True,
    world: World = SINGLE,
) -> PretrainedBert:
    """The BERT of ``pretraining`` and ``seed`` on ``device``, in eval mode: loaded from
    the cache, or pre-trained now and cached.

    With several processes (``world``) rank 0 reads and writes the cache and sends what
    it found; when nothing was, every rank pre-trains data-parallel (:func:`pretrain`).

    ``seed`` draws the NSP pairs (:func:`pretraining_data`), the initial weights (on the
    CPU, after ``torch.manual_seed(seed)``), the batches and the masks. The cache key
    holds :meth:`Pretraining.cache_settings`, the seed and the tokenizer's hash.
    """
    tokenizer = train_bible_tokenizer(pretraining.vocab_size)
    special = SpecialIds.from_tokenizer(tokenizer)
    settings = pretraining.cache_settings()
    digest = tokenizer_hash(tokenizer)
    if distributed.from_main(digest, world) != digest:
        raise RuntimeError(
            f"rank {world.rank} trained another tokenizer than rank 0: the ranks must "
            "read the same Bible text (the same sword-text-web package)"
        )
    key = caching.artifact_key(CACHE_KIND, dict(settings, tokenizer=digest), seed)
    path = caching.artifact_path(key)
    with caching.shared_entry([path], key, world) as (stored,):
        if stored is not None:
            model = BertModel(pretraining.model_config()).to(device)
            model.load_state_dict(stored["state_dict"])
            model.eval()
            record = json.loads(stored["extra"]["history"])
            return PretrainedBert(
                model,
                tokenizer,
                special,
                PretrainHistory.from_dict(record),
                float(record["pretrain_seconds"]),
                cached=True,
            )
        data = pretraining_data(pretraining, tokenizer, special, seed)
        torch.manual_seed(seed)
        model = BertModel(pretraining.model_config()).to(device)
        began = time.perf_counter()
        history = pretrain(
            model,
            data,
            special,
            steps=pretraining.steps,
            batch_size=pretraining.batch_size,
            lr=pretraining.lr,
            warmup_steps=pretraining.warmup_steps,
            seed=seed,
            progress=progress,
            world=world,
            sentence_task=pretraining.sentence_task,
        )
        seconds = time.perf_counter() - began
        record = dict(history.to_dict(), pretrain_seconds=seconds)
        if world.is_main:
            save_checkpoint(
                path, model, settings, caching.tag({"history": json.dumps(record)}, key)
            )
    model.eval()
    return PretrainedBert(model, tokenizer, special, history, seconds, cached=False)
