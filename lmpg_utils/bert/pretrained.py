"""Chapter 3's tokenizer and its pre-trained BERT, trained once and cached.

:func:`load_or_pretrain` loads the pre-trained model when the same settings, seed,
tokenizer and code made it before (see :mod:`lmpg_utils.caching`), and otherwise
pre-trains it now and caches it. Later chapters reuse it from here, not through an
experiment.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .. import caching, corpora
from ..tokenization import BPETokenizer
from ..training import save_checkpoint
from ..transformer import TransformerConfig
from .data import EncodedBatch
from .masking import SpecialIds
from .model import BertModel
from .training import PretrainHistory, pretrain

#: the cache kind of the pre-trained model
CACHE_KIND = "ch3-bert"


def train_bible_tokenizer(vocab_size: int) -> BPETokenizer:
    """A BPE tokenizer of ``vocab_size`` tokens (BERT's specials included), trained on
    the train-split verses of the Bible; deterministic."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return BPETokenizer.train(
        [v.text for v in corpora.load_bible_verses("train")], vocab_size
    )


@dataclass
class PretrainedBert:
    """The pre-trained model (in eval mode), its training history, the seconds its
    pre-training took, and whether it came from the cache."""

    model: BertModel
    history: PretrainHistory
    seconds: float
    cached: bool


def load_or_pretrain(
    model_config: TransformerConfig,
    data: EncodedBatch,
    special: SpecialIds,
    tokenizer: BPETokenizer,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    warmup_steps: int,
    seed: int,
    device: torch.device | str,
    cache_settings: Mapping[str, Any],
    progress: bool = True,
) -> PretrainedBert:
    """The BERT pre-trained by :func:`~lmpg_utils.bert.training.pretrain` on ``data``,
    on ``device``: loaded from the cache, or pre-trained now (weights drawn on the CPU
    after ``torch.manual_seed(seed)``) and cached.

    ``cache_settings`` (JSON-able) names the model in the cache together with ``seed``
    and a hash of ``tokenizer``: it must hold every setting that made ``data`` and the
    training (the caller's configuration, flattened).
    """
    key = caching.artifact_key(
        CACHE_KIND,
        dict(
            cache_settings,
            tokenizer=hashlib.sha256(tokenizer.to_str().encode()).hexdigest(),
        ),
        seed,
    )
    path = caching.artifact_path(key)
    with caching.exclusive(path):
        stored = caching.load_current(path, key)
        if stored is not None:
            model = BertModel(model_config).to(device)
            model.load_state_dict(stored["state_dict"])
            model.eval()
            record = json.loads(stored["extra"]["history"])
            return PretrainedBert(
                model,
                PretrainHistory.from_dict(record),
                float(record["pretrain_seconds"]),
                cached=True,
            )
        torch.manual_seed(seed)
        model = BertModel(model_config).to(device)
        began = time.perf_counter()
        history = pretrain(
            model,
            data,
            special,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            warmup_steps=warmup_steps,
            seed=seed,
            progress=progress,
        )
        seconds = time.perf_counter() - began
        record = dict(history.to_dict(), pretrain_seconds=seconds)
        save_checkpoint(
            path,
            model,
            dict(cache_settings),
            caching.tag({"history": json.dumps(record)}, key),
        )
    model.eval()
    return PretrainedBert(model, history, seconds, cached=False)
