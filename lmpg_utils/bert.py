"""BERT's two pre-training objectives, the small BERT model, and fine-tuning (chapter 3).

* :func:`mask_tokens`: masked-LM corruption exactly as BERT does it. Each position that
  is neither a special token nor padding is *chosen* with probability 15%; a chosen
  position becomes ``[MASK]`` 80% of the time, a random non-special token 10% and stays
  unchanged 10%. Labels are the original ids at chosen positions and ``-100`` (ignored
  by the loss) everywhere else, so the loss is :math:`-\\sum_{i\\in M}\\log P(w_i\\mid\\tilde x)`.
* :func:`make_nsp_pairs` / :func:`encode_pairs`: next-sentence-prediction pairs
  ``[CLS] A [SEP] B [SEP]`` with segment ids 0 for ``[CLS] A [SEP]`` and 1 for ``B [SEP]``.
  Pairs longer than the model's maximum are truncated BERT's way, one token at a time
  from the end of the longer side, and the number of truncated pairs is reported.
* :class:`BertModel`: the shared :class:`~lmpg_utils.transformer.TransformerEncoder` with
  segment embeddings, an MLM head (dense, GELU, LayerNorm, then a decoder tied to the
  token embeddings plus a bias) and an NSP head on the pooled ``[CLS]`` vector.
* :class:`BertClassifier` and :func:`fine_tune`: a classification head on ``[CLS]``.

This module takes verses as any objects with ``book``, ``chapter``, ``index`` and
``text`` attributes; it does not load data itself.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .tokenization import CLS, MASK, PAD, SEP, BPETokenizer
from .training import TrainHistory, train
from .transformer import TransformerConfig, TransformerEncoder, init_weights

IGNORE_INDEX = -100
NEGATIVE_KINDS: tuple[str, ...] = ("random", "other_book", "same_chapter")

# Masking actions recorded per position by :func:`mask_tokens`.
NOT_CHOSEN, MASKED, RANDOM, KEPT = 0, 1, 2, 3


# ---------------------------------------------------------------------------------
# Special tokens


@dataclass(frozen=True)
class SpecialIds:
    """Ids of the tokens BERT needs, the vocabulary size, and every special id."""

    pad: int
    cls: int
    sep: int
    mask: int
    vocab_size: int
    specials: tuple[int, ...]

    @classmethod
    def from_tokenizer(cls, tokenizer: BPETokenizer) -> SpecialIds:
        """Read the ids from a :class:`~lmpg_utils.tokenization.BPETokenizer` trained with BERT's specials."""
        specials = tuple(
            sorted(
                tokenizer.tokenizer.get_vocab(with_added_tokens=True)[t]
                for t in _special_strings(tokenizer)
            )
        )
        return cls(
            pad=tokenizer.id(PAD),
            cls=tokenizer.id(CLS),
            sep=tokenizer.id(SEP),
            mask=tokenizer.id(MASK),
            vocab_size=len(tokenizer),
            specials=specials,
        )

    def __post_init__(self) -> None:
        for name in ("pad", "cls", "sep", "mask"):
            value = getattr(self, name)
            if not 0 <= value < self.vocab_size:
                raise ValueError(
                    f"{name} id {value} is outside the vocabulary of size {self.vocab_size}"
                )
            if value not in self.specials:
                raise ValueError(
                    f"{name} id {value} must be listed among the special ids {self.specials}"
                )
        if len(self.specials) >= self.vocab_size:
            raise ValueError("the vocabulary has no ordinary (non-special) token")

    def ordinary_ids(self) -> Tensor:
        """All non-special ids: what a random replacement is drawn from."""
        keep = torch.ones(self.vocab_size, dtype=torch.bool)
        keep[list(self.specials)] = False
        return torch.nonzero(keep).squeeze(1)


def _special_strings(tokenizer: BPETokenizer) -> list[str]:
    added = tokenizer.tokenizer.get_added_tokens_decoder()
    return [token.content for token in added.values() if token.special]


# ---------------------------------------------------------------------------------
# Masked language model corruption


@dataclass
class MaskedTokens:
    """Output of :func:`mask_tokens`.

    ``input_ids`` is the corrupted input :math:`\\tilde x`; ``labels`` holds the original
    id at chosen positions and ``-100`` elsewhere; ``action`` records what happened at
    each position (``NOT_CHOSEN``, ``MASKED``, ``RANDOM`` or ``KEPT``).
    """

    input_ids: Tensor
    labels: Tensor
    action: Tensor


def mask_tokens(
    ids: Tensor,
    special: SpecialIds,
    generator: torch.Generator | None = None,
    mask_prob: float = 0.15,
    mask_ratio: float = 0.8,
    random_ratio: float = 0.1,
) -> MaskedTokens:
    """BERT's masked-LM corruption of a batch of token ids ``(B, L)``.

    Every position whose id is not special (``[CLS]``, ``[SEP]``, padding, ...) is chosen
    independently with probability ``mask_prob``. A chosen position is replaced by
    ``[MASK]`` with probability ``mask_ratio``, by a uniformly drawn non-special token
    with probability ``random_ratio`` (which may by chance equal the original), and is
    otherwise left unchanged. Random numbers come from ``generator`` (on the CPU).
    """
    if ids.dim() != 2:
        raise ValueError(
            f"token ids must be (batch, length), got shape {tuple(ids.shape)}"
        )
    if ids.numel() == 0:
        raise ValueError(f"empty batch: token ids have shape {tuple(ids.shape)}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"token ids must be integers, got dtype {ids.dtype}")
    if not 0.0 < mask_prob <= 1.0:
        raise ValueError(f"mask_prob must be in (0, 1], got {mask_prob}")
    if mask_ratio < 0 or random_ratio < 0 or mask_ratio + random_ratio > 1.0:
        raise ValueError(
            f"need mask_ratio, random_ratio >= 0 with sum <= 1, got {mask_ratio}, {random_ratio}"
        )
    _check_known(ids, special.vocab_size)
    device = ids.device
    ids = ids.cpu().long()
    eligible = ~torch.isin(ids, torch.tensor(special.specials))
    chosen = (torch.rand(ids.shape, generator=generator) < mask_prob) & eligible
    which = torch.rand(ids.shape, generator=generator)
    to_mask = chosen & (which < mask_ratio)
    to_random = chosen & (which >= mask_ratio) & (which < mask_ratio + random_ratio)
    ordinary = special.ordinary_ids()
    random_ids = ordinary[torch.randint(len(ordinary), ids.shape, generator=generator)]

    corrupted = ids.clone()
    corrupted[to_mask] = special.mask
    corrupted[to_random] = random_ids[to_random]
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX))
    action = torch.full_like(ids, NOT_CHOSEN)
    action[chosen] = KEPT
    action[to_mask] = MASKED
    action[to_random] = RANDOM
    return MaskedTokens(corrupted.to(device), labels.to(device), action.to(device))


def masking_statistics(
    ids: Tensor, masked: MaskedTokens, special: SpecialIds
) -> dict[str, float | int]:
    """Measured fractions of a :func:`mask_tokens` call, with the counts behind them."""
    eligible = ~torch.isin(ids.cpu(), torch.tensor(special.specials))
    action = masked.action.cpu()
    chosen = action != NOT_CHOSEN
    n_eligible, n_chosen = int(eligible.sum()), int(chosen.sum())
    if n_chosen == 0:
        raise ValueError(
            "no position was chosen: the sample is too small to measure anything"
        )
    return {
        "eligible": n_eligible,
        "chosen": n_chosen,
        "chosen_fraction": n_chosen / n_eligible,
        "mask_fraction": int((action == MASKED).sum()) / n_chosen,
        "random_fraction": int((action == RANDOM).sum()) / n_chosen,
        "kept_fraction": int((action == KEPT).sum()) / n_chosen,
        "special_chosen": int((chosen & ~eligible).sum()),
    }


def _check_known(ids: Tensor, vocab_size: int) -> None:
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        raise ValueError(
            f"unknown token id {bad}: the vocabulary has ids 0..{vocab_size - 1}"
        )


# ---------------------------------------------------------------------------------
# Next-sentence prediction pairs


class VerseLike(Protocol):
    book: str
    chapter: int
    index: int
    text: str


@dataclass(frozen=True)
class SentencePair:
    """Sentence A, sentence B, and whether B really follows A (``is_next``)."""

    a: str
    b: str
    is_next: bool


def make_nsp_pairs(
    verses: Sequence[VerseLike],
    negatives: str = "random",
    p_next: float = 0.5,
    seed: int = 0,
    limit: int | None = None,
) -> list[SentencePair]:
    """Next-sentence pairs from verses in canonical order.

    Each verse that has a successor in its chapter becomes sentence A once (in a
    shuffled order, at most ``limit`` of them). With probability ``p_next`` B is that
    successor (IsNext); otherwise B is a NotNext verse drawn according to ``negatives``:

    * ``"random"``: any verse outside A's chapter (BERT's "random sentence from the corpus");
    * ``"other_book"``: a verse from a different book (a change of topic);
    * ``"same_chapter"``: a verse of A's own chapter at least two verses away from A
      (same topic, so only coherence can tell it apart).

    Raises ``ValueError`` on an unknown ``negatives`` kind, an empty verse text, or
    when no pair can be formed.
    """
    if negatives not in NEGATIVE_KINDS:
        raise ValueError(
            f"unknown negatives kind {negatives!r}; valid kinds are: {', '.join(NEGATIVE_KINDS)}"
        )
    if not 0.0 <= p_next <= 1.0:
        raise ValueError(f"p_next must be in [0, 1], got {p_next}")
    for verse in verses:
        if not verse.text.strip():
            raise ValueError(
                f"empty text in verse {verse.book} {verse.chapter} (index {verse.index})"
            )
    rng = random.Random(seed)
    chapters: dict[tuple[str, int], list[int]] = {}
    for position, verse in enumerate(verses):
        chapters.setdefault((verse.book, verse.chapter), []).append(position)
    anchors = [
        p
        for p in range(len(verses) - 1)
        if (verses[p].book, verses[p].chapter)
        == (verses[p + 1].book, verses[p + 1].chapter)
        and verses[p + 1].index == verses[p].index + 1
    ]
    if negatives == "same_chapter":  # A needs a verse two or more away in its chapter
        anchors = [
            p
            for p in anchors
            if len(chapters[(verses[p].book, verses[p].chapter)]) >= 4
        ]
    if not anchors:
        raise ValueError(
            f"no next-sentence pair can be formed from {len(verses)} verses"
        )
    rng.shuffle(anchors)
    if limit is not None:
        anchors = anchors[:limit]
    books = sorted({v.book for v in verses})
    if negatives == "other_book" and len(books) < 2:
        raise ValueError("negatives='other_book' needs verses from at least two books")
    pairs = []
    for p in anchors:
        a = verses[p]
        if rng.random() < p_next:
            pairs.append(SentencePair(a.text, verses[p + 1].text, True))
            continue
        while True:
            if negatives == "same_chapter":
                q = rng.choice(chapters[(a.book, a.chapter)])
                ok = abs(verses[q].index - a.index) >= 2
            else:
                q = rng.randrange(len(verses))
                b = verses[q]
                ok = (
                    b.book != a.book
                    if negatives == "other_book"
                    else (b.book, b.chapter) != (a.book, a.chapter)
                )
            if ok:
                break
        pairs.append(SentencePair(a.text, verses[q].text, False))
    return pairs


# ---------------------------------------------------------------------------------
# Encoding to tensors


def tokenize_texts(tokenizer: BPETokenizer, texts: Sequence[str]) -> list[list[int]]:
    """BPE ids of each text; an empty (or all-space) text is a ``ValueError``."""
    texts = list(texts)
    if not texts:
        raise ValueError("no texts to tokenize")
    for i, text in enumerate(texts):
        if not text or not text.strip():
            raise ValueError(f"text {i} is empty")
    return tokenizer.encode_batch(texts)


def truncate_pair(
    a: Sequence[int], b: Sequence[int], max_tokens: int
) -> tuple[list[int], list[int], bool]:
    """BERT's rule: while ``len(a) + len(b) > max_tokens`` drop the last token of the longer side.

    Ties drop from ``b``. Returns the truncated sides and whether anything was dropped.
    """
    if max_tokens < 2:
        raise ValueError(
            f"max_tokens must be at least 2 (one token a side), got {max_tokens}"
        )
    a, b = list(a), list(b)
    truncated = False
    while len(a) + len(b) > max_tokens:
        (a if len(a) > len(b) else b).pop()
        truncated = True
    return a, b, truncated


@dataclass
class EncodedBatch:
    """Padded model inputs: ids, segment ids, padding mask (True = pad) and optional labels.

    ``truncated`` counts the sequences that had to be shortened to fit ``max_len``.
    """

    ids: Tensor
    segment_ids: Tensor
    padding_mask: Tensor
    labels: Tensor | None
    truncated: int

    def __len__(self) -> int:
        return self.ids.shape[0]

    def select(self, index: Tensor | Sequence[int]) -> EncodedBatch:
        """Rows ``index`` (trailing all-padding columns are kept; harmless)."""
        index = torch.as_tensor(index, dtype=torch.long)
        labels = self.labels[index] if self.labels is not None else None
        return EncodedBatch(
            self.ids[index],
            self.segment_ids[index],
            self.padding_mask[index],
            labels,
            0,
        )

    def to(self, device: torch.device | str) -> EncodedBatch:
        labels = self.labels.to(device) if self.labels is not None else None
        return EncodedBatch(
            self.ids.to(device),
            self.segment_ids.to(device),
            self.padding_mask.to(device),
            labels,
            self.truncated,
        )


def _pad(
    rows: list[list[int]], segments: list[list[int]], pad_id: int
) -> tuple[Tensor, Tensor, Tensor]:
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    seg = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (row, s) in enumerate(zip(rows, segments, strict=True)):
        ids[i, : len(row)] = torch.tensor(row)
        seg[i, : len(s)] = torch.tensor(s)
    return ids, seg, ids == pad_id


def encode_pairs(
    a_ids: Sequence[Sequence[int]],
    b_ids: Sequence[Sequence[int]],
    special: SpecialIds,
    max_len: int,
    labels: Sequence[int] | None = None,
) -> EncodedBatch:
    """``[CLS] A [SEP] B [SEP]`` with segment ids 0 for ``[CLS] A [SEP]`` and 1 for ``B [SEP]``.

    Pairs longer than ``max_len`` are truncated with :func:`truncate_pair` (never
    silently: the count is in ``EncodedBatch.truncated``). An empty side or an unknown
    token id raises ``ValueError``.
    """
    if len(a_ids) != len(b_ids):
        raise ValueError(
            f"{len(a_ids)} first sentences but {len(b_ids)} second sentences"
        )
    if not a_ids:
        raise ValueError("no sentence pairs to encode")
    if labels is not None and len(labels) != len(a_ids):
        raise ValueError(f"{len(labels)} labels for {len(a_ids)} pairs")
    rows, segments, truncated = [], [], 0
    for i, (a, b) in enumerate(zip(a_ids, b_ids, strict=True)):
        if not a or not b:
            raise ValueError(f"pair {i} has an empty sentence")
        _check_known(torch.tensor(list(a) + list(b)), special.vocab_size)
        a, b, cut = truncate_pair(a, b, max_len - 3)
        truncated += cut
        rows.append([special.cls, *a, special.sep, *b, special.sep])
        segments.append([0] * (len(a) + 2) + [1] * (len(b) + 1))
    ids, seg, padding = _pad(rows, segments, special.pad)
    return EncodedBatch(
        ids,
        seg,
        padding,
        None if labels is None else torch.tensor(list(labels)),
        truncated,
    )


def encode_single(
    ids_list: Sequence[Sequence[int]],
    special: SpecialIds,
    max_len: int,
    labels: Sequence[int] | None = None,
) -> EncodedBatch:
    """``[CLS] A [SEP]`` (segment 0) for classification; too long sequences lose their end (counted)."""
    if not ids_list:
        raise ValueError("no sentences to encode")
    if labels is not None and len(labels) != len(ids_list):
        raise ValueError(f"{len(labels)} labels for {len(ids_list)} sentences")
    if max_len < 3:
        raise ValueError(f"max_len must be at least 3, got {max_len}")
    rows, truncated = [], 0
    for i, a in enumerate(ids_list):
        if not a:
            raise ValueError(f"sentence {i} is empty")
        _check_known(torch.tensor(list(a)), special.vocab_size)
        truncated += len(a) > max_len - 2
        rows.append([special.cls, *list(a)[: max_len - 2], special.sep])
    ids, seg, padding = _pad(rows, [[0] * len(r) for r in rows], special.pad)
    return EncodedBatch(
        ids,
        seg,
        padding,
        None if labels is None else torch.tensor(list(labels)),
        truncated,
    )


# ---------------------------------------------------------------------------------
# The model


class BertModel(nn.Module):
    """Encoder with segment embeddings, a pooler on ``[CLS]``, an MLM head and an NSP head.

    MLM head: ``h -> LayerNorm(GELU(W h + b)) -> E^T (.) + b_vocab`` where ``E`` is the
    token embedding table (tied). NSP head: ``softmax(W_nsp tanh(W_p h_[CLS] + b_p) + b_nsp)``
    over {IsNext, NotNext}, computed from the joint encoding of the pair.
    """

    def __init__(self, config: TransformerConfig):
        super().__init__()
        if config.num_segments != 2:
            raise ValueError(
                f"BERT needs num_segments=2 (sentence A and B), got {config.num_segments}"
            )
        self.config = config
        d = config.d_model
        self.encoder = TransformerEncoder(config)
        self.pooler = nn.Sequential(nn.Linear(d, d), nn.Tanh())
        self.mlm_transform = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.LayerNorm(d))
        self.mlm_bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.nsp_head = nn.Linear(d, 2)
        self.apply(init_weights)

    def encode(
        self,
        ids: Tensor,
        segment_ids: Tensor | None = None,
        padding_mask: Tensor | None = None,
    ) -> Tensor:
        """Hidden states (B, L, d_model) of the joint encoding."""
        return self.encoder(ids, padding_mask=padding_mask, segment_ids=segment_ids)

    def pooled(self, hidden: Tensor) -> Tensor:
        """``tanh(W h_[CLS] + b)``: the sequence vector both NSP and fine-tuning classify."""
        return self.pooler(hidden[:, 0])

    def mlm_logits(self, hidden: Tensor) -> Tensor:
        """Vocabulary logits for hidden states of any leading shape (..., d_model)."""
        return (
            self.mlm_transform(hidden) @ self.encoder.embeddings.token.weight.T
            + self.mlm_bias
        )

    def nsp_logits(self, hidden: Tensor) -> Tensor:
        """(B, 2) logits; class 0 = IsNext, class 1 = NotNext (BERT's convention)."""
        return self.nsp_head(self.pooled(hidden))

    def forward(
        self,
        ids: Tensor,
        segment_ids: Tensor | None = None,
        padding_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """MLM logits (B, L, vocab) at every position and NSP logits (B, 2)."""
        hidden = self.encode(ids, segment_ids, padding_mask)
        return self.mlm_logits(hidden), self.nsp_logits(hidden)


def nsp_targets(is_next: Tensor) -> Tensor:
    """NSP class ids from booleans: IsNext -> 0, NotNext -> 1."""
    return (~is_next.bool()).long()


@dataclass
class PretrainingBatch:
    """A masked NSP batch: corrupted ids, segments, padding, MLM labels and NSP targets."""

    ids: Tensor
    segment_ids: Tensor
    padding_mask: Tensor
    mlm_labels: Tensor
    nsp_labels: Tensor


def make_pretraining_batch(
    batch: EncodedBatch, special: SpecialIds, generator: torch.Generator | None = None
) -> PretrainingBatch:
    """Mask an encoded NSP batch (labels = ``is_next`` booleans) for :func:`pretraining_loss`."""
    if batch.labels is None:
        raise ValueError("the NSP batch needs labels (is_next)")
    masked = mask_tokens(batch.ids, special, generator)
    return PretrainingBatch(
        masked.input_ids,
        batch.segment_ids,
        batch.padding_mask,
        masked.labels,
        nsp_targets(batch.labels),
    )


def pretraining_loss(
    model: BertModel, batch: PretrainingBatch
) -> tuple[Tensor, Tensor, Tensor]:
    """``(MLM + NSP, MLM, NSP)``: MLM is the mean cross-entropy over chosen positions only."""
    hidden = model.encode(batch.ids, batch.segment_ids, batch.padding_mask)
    chosen = batch.mlm_labels != IGNORE_INDEX
    if not bool(chosen.any()):
        mlm = hidden.sum() * 0.0
    else:
        mlm = F.cross_entropy(
            model.mlm_logits(hidden[chosen]), batch.mlm_labels[chosen]
        )
    nsp = F.cross_entropy(model.nsp_logits(hidden), batch.nsp_labels)
    return mlm + nsp, mlm, nsp


def pretrain(
    model: BertModel,
    data: EncodedBatch,
    special: SpecialIds,
    steps: int,
    batch_size: int,
    lr: float,
    warmup_steps: int = 100,
    seed: int = 0,
    progress: bool = True,
    eval_fn: Callable[[nn.Module], float] | None = None,
    eval_every: int = 0,
) -> TrainHistory:
    """Pre-train on encoded NSP pairs with fresh (dynamic) masking for every batch.

    ``eval_fn``/``eval_every`` are passed to :func:`~lmpg_utils.training.train`.

    Returns the training history; ``history.losses`` is the total loss, and the
    per-objective losses are in ``history.mlm_losses`` / ``history.nsp_losses``.
    """
    if batch_size <= 0 or batch_size > len(data):
        raise ValueError(f"batch_size must be in 1..{len(data)}, got {batch_size}")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    mlm_losses: list[float] = []
    nsp_losses: list[float] = []

    def batches() -> Iterator[PretrainingBatch]:
        while True:
            order = torch.randperm(len(data), generator=generator)
            for start in range(0, len(order) - batch_size + 1, batch_size):
                part = data.select(order[start : start + batch_size])
                part = _trim(part)
                yield _to_device(
                    make_pretraining_batch(part, special, generator), device
                )

    def loss_fn(m: nn.Module, batch: PretrainingBatch) -> tuple[Tensor, int]:
        total, mlm, nsp = pretraining_loss(m, batch)  # type: ignore[arg-type]
        mlm_losses.append(mlm.item())
        nsp_losses.append(nsp.item())
        return total, int((batch.mlm_labels != IGNORE_INDEX).sum())

    history = train(
        model,
        batches(),
        loss_fn,
        max_steps=steps,
        lr=lr,
        warmup_steps=warmup_steps,
        progress=progress,
        description="pre-train",
        eval_fn=eval_fn,
        eval_every=eval_every,
    )
    history.mlm_losses = mlm_losses  # type: ignore[attr-defined]
    history.nsp_losses = nsp_losses  # type: ignore[attr-defined]
    return history


def _trim(batch: EncodedBatch) -> EncodedBatch:
    """Drop the all-padding columns at the end of a batch."""
    length = int((~batch.padding_mask).sum(1).max())
    labels = batch.labels
    return EncodedBatch(
        batch.ids[:, :length],
        batch.segment_ids[:, :length],
        batch.padding_mask[:, :length],
        labels,
        batch.truncated,
    )


def _to_device(batch: PretrainingBatch, device: torch.device) -> PretrainingBatch:
    return PretrainingBatch(
        *(
            getattr(batch, f).to(device)
            for f in ("ids", "segment_ids", "padding_mask", "mlm_labels", "nsp_labels")
        )
    )


# ---------------------------------------------------------------------------------
# Evaluation


MLM_KINDS: tuple[str, ...] = ("masked", "random", "kept")


@torch.no_grad()
def evaluate_pretraining(
    model: BertModel,
    data: EncodedBatch,
    special: SpecialIds,
    seed: int = 1234,
    batch_size: int = 256,
    baseline_token: int | None = None,
) -> dict[str, float | int]:
    """Held-out MLM accuracy (over chosen positions, with a fixed masking seed) and NSP accuracy.

    Also returns ``mlm_labels`` (the number of scored positions), ``nsp_majority``
    (accuracy of always answering the majority class), and per kind of chosen position
    (``masked``: the input shows ``[MASK]``; ``random``: a different token; ``kept``:
    the original token, including random draws that hit it) ``mlm_accuracy_KIND`` and
    ``mlm_count_KIND``; with ``baseline_token``, ``mlm_baseline_KIND`` is the accuracy of
    always guessing that token.
    """
    if data.labels is None:
        raise ValueError("the evaluation pairs need labels (is_next)")
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    mlm_right = mlm_total = nsp_right = 0
    by_kind = {k: [0, 0, 0] for k in MLM_KINDS}  # right, count, baseline right
    predictions: list[Tensor] = []
    targets: list[Tensor] = []
    for start in range(0, len(data), batch_size):
        part = _trim(data.select(range(start, min(start + batch_size, len(data)))))
        batch = _to_device(make_pretraining_batch(part, special, generator), device)
        hidden = model.encode(batch.ids, batch.segment_ids, batch.padding_mask)
        chosen = batch.mlm_labels != IGNORE_INDEX
        guess = model.mlm_logits(hidden[chosen]).argmax(-1)
        gold = batch.mlm_labels[chosen]
        mlm_right += int((guess == gold).sum())
        mlm_total += int(chosen.sum())
        shown = batch.ids[chosen]
        kinds = {"masked": shown == special.mask, "kept": shown == gold}
        kinds["random"] = ~(kinds["masked"] | kinds["kept"])
        for kind, where in kinds.items():
            by_kind[kind][0] += int((guess[where] == gold[where]).sum())
            by_kind[kind][1] += int(where.sum())
            if baseline_token is not None:
                by_kind[kind][2] += int((gold[where] == baseline_token).sum())
        predictions.append(guess.cpu())
        targets.append(batch.mlm_labels[chosen].cpu())
        nsp_right += int(
            (model.nsp_logits(hidden).argmax(-1) == batch.nsp_labels).sum()
        )
    is_next = data.labels.float().mean().item()
    out: dict[str, float | int] = {
        "mlm_accuracy": mlm_right / max(1, mlm_total),
        "mlm_labels": mlm_total,
        "nsp_accuracy": nsp_right / len(data),
        "nsp_majority": max(is_next, 1 - is_next),
        "pairs": len(data),
    }
    for kind, (right, count, base) in by_kind.items():
        out[f"mlm_accuracy_{kind}"] = right / max(1, count)
        out[f"mlm_count_{kind}"] = count
        if baseline_token is not None:
            out[f"mlm_baseline_{kind}"] = base / max(1, count)
    return out


def masked_targets(
    data: EncodedBatch, special: SpecialIds, seed: int = 1234, batch_size: int = 256
) -> Tensor:
    """The original ids at the positions :func:`evaluate_pretraining` scores (same seed, same order)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, len(data), batch_size):
        part = _trim(data.select(range(start, min(start + batch_size, len(data)))))
        batch = make_pretraining_batch(part, special, generator)
        out.append(batch.mlm_labels[batch.mlm_labels != IGNORE_INDEX])
    return torch.cat(out)


def most_frequent_token(
    ids: Tensor | Sequence[Sequence[int]], special: SpecialIds
) -> tuple[int, float]:
    """The most frequent non-special token in ``ids`` (a tensor or lists of ids) and its frequency there."""
    if isinstance(ids, Tensor):
        flat = ids.reshape(-1).long()
    else:
        flat = torch.tensor([i for row in ids for i in row], dtype=torch.long)
    _check_known(flat, special.vocab_size)
    counts = torch.bincount(flat, minlength=special.vocab_size)
    counts[list(special.specials)] = 0
    total = int(counts.sum())
    if total == 0:
        raise ValueError("no ordinary token to count")
    top = int(counts.argmax())
    return top, int(counts[top]) / total


# ---------------------------------------------------------------------------------
# Fine-tuning


class BertClassifier(nn.Module):
    """A classification head on the pooled ``[CLS]`` vector of a :class:`BertModel`."""

    def __init__(self, bert: BertModel, num_classes: int, dropout: float = 0.1):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"need at least 2 classes, got {num_classes}")
        self.bert = bert
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(bert.config.d_model, num_classes)
        init_weights(self.head)

    def forward(
        self,
        ids: Tensor,
        segment_ids: Tensor | None = None,
        padding_mask: Tensor | None = None,
    ) -> Tensor:
        """Class logits (B, num_classes)."""
        hidden = self.bert.encode(ids, segment_ids, padding_mask)
        return self.head(self.dropout(self.bert.pooled(hidden)))


def fine_tune(
    model: BertClassifier,
    data: EncodedBatch,
    steps: int,
    batch_size: int,
    lr: float,
    warmup_steps: int = 10,
    seed: int = 0,
    progress: bool = False,
) -> TrainHistory:
    """Train every weight of ``model`` with cross-entropy on the labelled ``data``."""
    if data.labels is None:
        raise ValueError("fine-tuning data needs labels")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    size = min(batch_size, len(data))

    def batches() -> Iterator[EncodedBatch]:
        while True:
            order = torch.randperm(len(data), generator=generator)
            for start in range(0, len(order) - size + 1, size):
                yield _trim(data.select(order[start : start + size])).to(device)

    def loss_fn(m: nn.Module, batch: EncodedBatch) -> tuple[Tensor, int]:
        return F.cross_entropy(
            m(batch.ids, batch.segment_ids, batch.padding_mask), batch.labels
        ), len(batch)

    # The MLM and NSP heads get no gradient here; AdamW skips parameters whose grad is None.
    return train(
        model,
        batches(),
        loss_fn,
        max_steps=steps,
        lr=lr,
        warmup_steps=warmup_steps,
        progress=progress,
        description="fine-tune",
    )


@torch.no_grad()
def classifier_accuracy(
    model: BertClassifier, data: EncodedBatch, batch_size: int = 256
) -> float:
    """Accuracy of ``model`` on the labelled ``data``."""
    if data.labels is None:
        raise ValueError("evaluation data needs labels")
    model.eval()
    device = next(model.parameters()).device
    right = 0
    for start in range(0, len(data), batch_size):
        part = _trim(data.select(range(start, min(start + batch_size, len(data))))).to(
            device
        )
        right += int(
            (
                model(part.ids, part.segment_ids, part.padding_mask).argmax(-1)
                == part.labels
            ).sum()
        )
    return right / len(data)
