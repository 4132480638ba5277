"""Chapter 4's task: translating Spanish Bible verses into English with an encoder-decoder.

The data are the verse-aligned Reina-Valera 1909 (Spanish) and World English Bible,
aligned by book, chapter and verse (:func:`corpora.load_verse_pairs`) and split by
chapter exactly like chapters 1-3 (:func:`load_pairs`).

* :func:`train_tokenizer` learns one BPE vocabulary for both languages (the model
  shares its embedding table between the two sides).
* :class:`EncodedPairs` holds token ids; :meth:`EncodedPairs.batches` yields shuffled
  padded batches of a number of pairs forever, :meth:`EncodedPairs.token_batches`
  batches of about a number of target tokens.
* :func:`mle_loss` is maximum likelihood with teacher forcing and label smoothing.
* :class:`StartConfig` defines the MLE start; :func:`prepare` trains it once per config,
  seed and code version (:func:`train_start`), caches it under
  :meth:`StartConfig.key`, and returns a :class:`Setup`: the data, the tokenizer, the
  start, a weak early snapshot (for the reward-hacking section), and the device every
  model, batch and reward lives on.
* Evaluation: :func:`evaluate` (greedy translations scored with corpus BLEU and chrF),
  :func:`expected_reward` (the objective policy gradient maximizes, on held-out
  verses), :func:`teacher_forced_stats` and :func:`position_accuracy` (exposure bias).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from . import caching, corpora, distributed, runtime
from .distributed import SINGLE, World
from .generation import translate
from .metrics import corpus_bleu, corpus_chrf, sentence_rewards
from .policy_gradient import Decoding, Rollout, StepTimes, rollout
from .tokenization import BPETokenizer, pad_batch
from .training import (
    autocast_dtype,
    average_states,
    resolve_precision,
    save_checkpoint,
    train,
)
from .transformer import EncoderDecoder, ModelSizes

#: the corpus the MLE start is trained on (part of its cache key)
CORPUS = "rv1909-web"


def train_tokenizer(pairs: Sequence[tuple[str, str]], vocab_size: int) -> BPETokenizer:
    """One BPE vocabulary learned from both sides of ``pairs`` (Spanish and English)."""
    if not pairs:
        raise ValueError("cannot train a tokenizer on no pairs")
    texts = [es for es, _ in pairs] + [en for _, en in pairs]
    return BPETokenizer.train(
        texts, vocab_size, specials=("<pad>", "<unk>", "<s>", "</s>")
    )


@dataclass
class EncodedPairs:
    """Sources (Spanish ids, no BOS/EOS), targets (English ids framed by BOS ... EOS) and raw texts."""

    sources: list[list[int]]
    targets: list[list[int]]
    source_texts: list[str]
    reference_texts: list[str]
    pad_id: int
    dropped: int = 0

    @classmethod
    def build(
        cls,
        tokenizer: BPETokenizer,
        pairs: Sequence[tuple[str, str]],
        max_tokens: int = 64,
    ) -> EncodedPairs:
        """Encode ``(source, target)`` pairs; pairs longer than ``max_tokens`` on either side
        are dropped and counted in ``dropped``."""
        if not pairs:
            raise ValueError("no pairs to encode")
        empty = [
            i for i, (es, en) in enumerate(pairs) if not es.strip() or not en.strip()
        ]
        if empty:
            raise ValueError(f"pairs {empty[:5]} have an empty source or reference")
        src = tokenizer.encode_batch([es for es, _ in pairs])
        tgt = tokenizer.encode_batch(
            [en for _, en in pairs], add_bos=True, add_eos=True
        )
        keep = [
            i
            for i in range(len(pairs))
            if len(src[i]) <= max_tokens and len(tgt[i]) <= max_tokens
        ]
        return cls(
            [src[i] for i in keep],
            [tgt[i] for i in keep],
            [pairs[i][0] for i in keep],
            [pairs[i][1] for i in keep],
            tokenizer.pad_id,
            len(pairs) - len(keep),
        )

    def __len__(self) -> int:
        return len(self.sources)

    def subset(self, indices: Sequence[int]) -> EncodedPairs:
        return EncodedPairs(
            [self.sources[i] for i in indices],
            [self.targets[i] for i in indices],
            [self.source_texts[i] for i in indices],
            [self.reference_texts[i] for i in indices],
            self.pad_id,
        )

    def batch(self, indices: Sequence[int]) -> tuple[Tensor, Tensor, list[int]]:
        """Padded ``(src, tgt)`` tensors for the given indices, and the indices."""
        indices = list(indices)
        return (
            pad_batch([self.sources[i] for i in indices], self.pad_id),
            pad_batch([self.targets[i] for i in indices], self.pad_id),
            indices,
        )

    def token_batches(
        self, max_tokens: int, generator: torch.Generator
    ) -> Iterator[tuple[Tensor, Tensor, list[int]]]:
        """Shuffled batches forever, each holding about ``max_tokens`` padded target tokens.

        Pairs of similar target length share a batch (sorted within chunks of the
        shuffled order), so little of each batch is padding, and every batch carries
        about the same number of tokens whatever the sentence lengths.
        """
        longest = max(len(t) for t in self.targets)
        if max_tokens < longest:
            raise ValueError(
                f"max_tokens={max_tokens} is below the longest target ({longest} tokens)"
            )
        while True:
            order = torch.randperm(len(self), generator=generator).tolist()
            chunk = max(1, 100 * max_tokens // longest)
            for start in range(0, len(order), chunk):
                block = sorted(
                    order[start : start + chunk],
                    key=lambda i: (len(self.targets[i]), len(self.sources[i])),
                )
                groups, current, width = [], [], 0
                for i in block:
                    width_with = max(width, len(self.targets[i]))
                    if current and width_with * (len(current) + 1) > max_tokens:
                        groups.append(current)
                        current, width_with = [], len(self.targets[i])
                    current.append(i)
                    width = width_with
                if current:
                    groups.append(current)
                for g in torch.randperm(len(groups), generator=generator).tolist():
                    yield self.batch(groups[g])

    def batches(
        self, batch_size: int, generator: torch.Generator
    ) -> Iterator[tuple[Tensor, Tensor, list[int]]]:
        """Shuffled batches forever (a new permutation every epoch, from ``generator``)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if len(self) == 0:
            raise ValueError("no pairs to batch")
        while True:
            order = torch.randperm(len(self), generator=generator).tolist()
            for start in range(0, len(order), batch_size):
                yield self.batch(order[start : start + batch_size])


def mle_loss(
    model: EncoderDecoder,
    src: Tensor,
    tgt: Tensor,
    pad_id: int,
    label_smoothing: float = 0.1,
) -> tuple[Tensor, int]:
    """Teacher-forced cross-entropy with label smoothing, averaged over target tokens.

    ``tgt`` (B, T) is BOS ... EOS padded; the model reads ``tgt[:, :-1]`` and predicts
    ``tgt[:, 1:]``. Returns ``(loss, number of target tokens)``.
    """
    if src.shape[0] != tgt.shape[0]:
        raise ValueError(f"batch sizes differ: src {src.shape[0]}, tgt {tgt.shape[0]}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    logits = model(src, tgt[:, :-1], pad_id=pad_id)
    gold = tgt[:, 1:]
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        gold.reshape(-1),
        ignore_index=pad_id,
        label_smoothing=label_smoothing,
    )
    return loss, int((gold != pad_id).sum())


@torch.no_grad()
def teacher_forced_stats(
    model: EncoderDecoder, data: EncodedPairs, batch_size: int = 128
) -> dict[str, float]:
    """Teacher-forced token accuracy and NLL (nats/token, no smoothing) of the references."""
    model.eval()
    correct = total = 0
    nll = 0.0
    device = next(model.parameters()).device
    for start in range(0, len(data), batch_size):
        src, tgt, _ = data.batch(range(start, min(len(data), start + batch_size)))
        src, tgt = src.to(device), tgt.to(device)
        logits = model(src, tgt[:, :-1], pad_id=data.pad_id)
        gold = tgt[:, 1:]
        mask = gold != data.pad_id
        nll += float(
            F.cross_entropy(logits.transpose(1, 2).float(), gold, reduction="none")[
                mask
            ].sum()
        )
        correct += int(((logits.argmax(-1) == gold) & mask).sum())
        total += int(mask.sum())
    return {"token_accuracy": correct / total, "nll": nll / total}


@torch.no_grad()
def translate_texts(
    model: EncoderDecoder,
    tokenizer: BPETokenizer,
    sources: Sequence[Sequence[int]],
    max_len: int = 48,
    batch_size: int = 128,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> list[str]:
    """Decode encoded Spanish ``sources`` to English strings (greedy unless ``temperature`` > 0)."""
    if len(sources) == 0:
        raise ValueError("no sources to translate")
    outputs: list[str] = []
    device = next(model.parameters()).device
    for start in range(0, len(sources), batch_size):
        src = pad_batch(sources[start : start + batch_size], tokenizer.pad_id).to(
            device
        )
        tokens = translate(
            model,
            src,
            tokenizer.bos_id,
            tokenizer.eos_id,
            tokenizer.pad_id,
            max_len,
            temperature=temperature,
            generator=generator,
        )
        outputs.extend(tokenizer.decode(row) for row in tokens.tolist())
    return outputs


# --------------------------------------------------------------------------------------
# The MLE start
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StartConfig:
    """Everything that defines (and keys) the cached MLE start.

    Verses of at most ``train_words`` words a side for training and ``eval_words`` for
    validation and test; pairs longer than ``max_tokens`` BPE tokens a side are dropped.
    The model (``model``) has ``max_tokens + 2`` positions in both profiles. Training: ``mle_steps``
    updates of about ``mle_batch_tokens`` target tokens, peak rate ``mle_lr`` after
    ``mle_warmup`` steps of warm-up, then linear decay to zero; ``average_last``
    snapshots averaged; ``weak_step`` is the step of the weak early snapshot that the
    reward-hacking section starts from; ``seed`` seeds the training.
    """

    train_words: int
    eval_words: int
    vocab_size: int
    model: ModelSizes
    max_tokens: int
    mle_steps: int
    mle_batch_tokens: int
    mle_lr: float
    mle_warmup: int
    mle_precision: str
    average_last: int
    label_smoothing: float
    weak_step: int
    seed: int

    def __post_init__(self) -> None:
        for name in (
            "train_words",
            "eval_words",
            "mle_steps",
            "mle_batch_tokens",
            "average_last",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 < self.weak_step < self.mle_steps:
            raise ValueError(
                f"weak_step must lie in (0, mle_steps), got {self.weak_step}"
            )
        if self.model.max_len < self.max_tokens:
            raise ValueError(
                f"model.max_len ({self.model.max_len}) must hold the longest pair "
                f"(max_tokens={self.max_tokens})"
            )
        if self.mle_batch_tokens < self.max_tokens:
            raise ValueError(
                "batch token budgets must hold the longest pair "
                f"({self.max_tokens} tokens)"
            )
        autocast_dtype(self.mle_precision, "cpu")  # names an unknown precision

    def key(self, device_type: str = "cpu") -> dict[str, Any]:
        """The cache key of the start: these settings, the corpus, the seed, torch and
        the code. Model sizes are flattened; ``max_len``, ``positional`` and
        ``num_decoder_layers`` enter only when they differ from what the key first
        implied (``max_tokens + 2``, learned positions, as many decoder layers as
        encoder layers), so the keys of the starts trained then still hold. An ``auto``
        precision enters as what it means on ``device_type`` (bf16 or fp32)."""
        sizes = self.model
        config: dict[str, Any] = {
            "train_words": self.train_words,
            "eval_words": self.eval_words,
            "vocab_size": self.vocab_size,
            "d_model": sizes.d_model,
            "num_heads": sizes.num_heads,
            "num_layers": sizes.num_layers,
            "d_ff": sizes.d_ff,
            "dropout": sizes.dropout,
            "max_tokens": self.max_tokens,
            "mle_steps": self.mle_steps,
            "mle_batch_tokens": self.mle_batch_tokens,
            "mle_lr": self.mle_lr,
            "mle_warmup": self.mle_warmup,
            "mle_precision": resolve_precision(self.mle_precision, device_type),
            "average_last": self.average_last,
            "label_smoothing": self.label_smoothing,
            "weak_step": self.weak_step,
            "corpus_parser": corpora.PARSER_VERSION,
            "corpus": CORPUS,
        }
        if sizes.max_len != self.max_tokens + 2:
            config["max_len"] = sizes.max_len
        if sizes.positional != "learned":
            config["positional"] = sizes.positional
        if sizes.num_decoder_layers is not None:
            config["num_decoder_layers"] = sizes.num_decoder_layers
        return caching.artifact_key("ch4-mle-start", config, self.seed)


class TaskConfig(Protocol):
    """What the translation task reads from an experiment's (frozen dataclass) config:
    the start it builds on, the longest translation it decodes (``max_len``), the
    reward (``reward``: ``bleu`` or ``chrf``, with ``length_penalty``), and how the
    expected reward is estimated (``reward_samples`` samples of each of the first
    ``valid_sources`` validation sources)."""

    @property
    def start(self) -> StartConfig: ...

    max_len: int
    reward: str
    length_penalty: float
    valid_sources: int
    reward_samples: int


def load_pairs(start: StartConfig) -> dict[str, list[tuple[str, str]]]:
    """(Spanish, English) verse pairs per split: training verses of at most ``train_words``
    words a side, validation and test verses of at most ``eval_words``."""
    return {
        split: [(p.es, p.en) for p in corpora.load_verse_pairs(split, words)]
        for split, words in (
            ("train", start.train_words),
            ("valid", start.eval_words),
            ("test", start.eval_words),
        )
    }


def translator(
    start: StartConfig, vocab_size: int, state: dict | None = None
) -> EncoderDecoder:
    """The start's encoder-decoder for a vocabulary of ``vocab_size`` tokens, on the
    CPU, freshly initialized or holding ``state``."""
    model = EncoderDecoder(start.model.with_vocab(vocab_size))
    if state is not None:
        model.load_state_dict(state)
    return model


def train_start(
    start: StartConfig,
    tokenizer: BPETokenizer,
    data: EncodedPairs,
    device: torch.device,
    progress: bool = False,
    world: World = SINGLE,
) -> tuple[dict, dict, dict]:
    """Train the MLE start: token-budget batches, linear warm-up and decay to zero, bf16
    autocast where asked, and the average of ``average_last`` snapshots taken evenly over
    the last fifth of training (1: the final weights; averaging five cost about one BLEU
    point in calibration, since the rate already decays to zero). The weak snapshot is
    taken after update ``weak_step``. Returns (start state, weak snapshot, history).
    With several processes (``world``) every rank draws the same token-budget batches
    and trains on its rows of each (:func:`lmpg_utils.training.train`)."""
    generator = runtime.set_seed(start.seed)
    model = translator(start, len(tokenizer)).to(device)
    last = start.mle_steps
    spacing = max(1, start.mle_steps // (5 * start.average_last))
    keep_at = {last - i * spacing for i in range(start.average_last)}
    snapshots: dict[int, dict] = {}

    def on_step(step: int, m: torch.nn.Module) -> None:
        if step == start.weak_step or step in keep_at:
            snapshots[step] = {k: v.detach().clone() for k, v in m.state_dict().items()}

    history = train(
        model,
        data.token_batches(start.mle_batch_tokens, generator),
        lambda m, b: mle_loss(
            m,
            b[0].to(device),
            b[1].to(device),
            tokenizer.pad_id,
            start.label_smoothing,
        ),
        max_steps=start.mle_steps,
        lr=start.mle_lr,
        warmup_steps=start.mle_warmup,
        decay="linear",
        precision=start.mle_precision,
        on_step=on_step,
        progress=progress,
        description="MLE start",
        world=world,
    )
    averaged = average_states([snapshots[s] for s in sorted(keep_at)])
    record = {
        "steps": history.steps,
        "losses": history.losses,
        "tokens_per_second": history.items_per_second,
        "seconds": history.seconds,
        "averaged_steps": sorted(keep_at),
    }
    return averaged, snapshots[start.weak_step], record


@dataclass
class Setup:
    """The translation task ready to fine-tune: the config it was prepared under,
    tokenizer, encoded splits, the MLE start's weights and how long it took to get
    them, the weak snapshot, and the device every model, batch and reward lives on."""

    config: TaskConfig
    tokenizer: BPETokenizer
    train: EncodedPairs
    valid: EncodedPairs
    test: EncodedPairs
    start_state: dict
    weak_state: dict
    mle_seconds: float
    mle_history: dict
    cached: bool
    device: torch.device
    _start_rewards: dict = field(default_factory=dict, repr=False)

    def split(self, name: str) -> EncodedPairs:
        """The encoded pairs of split ``name`` (``train``, ``valid`` or ``test``)."""
        return {"train": self.train, "valid": self.valid, "test": self.test}[
            corpora.check_split(name)
        ]

    def start_reward(self, state: dict | None = None) -> float:
        """:func:`expected_reward` of the MLE start (``state`` None) or of the weak snapshot,
        computed once: every fine-tuning run from that state begins at this value, since
        the validation rollout uses a fixed sampling seed."""
        name = (
            "start" if state is None else "weak" if state is self.weak_state else None
        )
        if name is None:  # any other state: not kept
            return expected_reward(self.new_model(state), self)
        if name not in self._start_rewards:
            self._start_rewards[name] = expected_reward(self.new_model(state), self)
        return self._start_rewards[name]

    def with_config(self, **changes: Any) -> Setup:
        """The same data and start under a config with other fine-tuning settings (for
        example ``length_penalty=0.0``); the start rewards are computed afresh for it."""
        config = dataclasses.replace(self.config, **changes)
        clash = sorted(
            name
            for name in changes
            if dataclasses.replace(self.config, **{name: changes[name]}).start
            != self.config.start
        )
        if clash:
            raise ValueError(
                f"{', '.join(clash)} define the cached start; change them in the "
                "config and prepare again"
            )
        return dataclasses.replace(self, config=config, _start_rewards={})

    def new_model(self, state: dict | None = None) -> EncoderDecoder:
        """A translator holding the start's weights (or ``state``), on the device, in
        eval mode."""
        start = self.start_state if state is None else state
        model = translator(self.config.start, len(self.tokenizer), start)
        return model.to(self.device).eval()

    def decode(self, ids: Sequence[int]) -> str:
        """English text of target token ids."""
        return self.tokenizer.decode(ids)

    def reward_fn(
        self,
        sources: Sequence[str],
        hypotheses: Sequence[str],
        references: Sequence[str],
    ) -> list[float]:
        """The config's sentence reward of each hypothesis against its reference (the
        sources are not read: this reward compares with the reference only)."""
        return sentence_rewards(
            hypotheses, references, self.config.reward, self.config.length_penalty
        )

    def decoding(self, samples: int, greedy_baseline: bool = False) -> Decoding:
        """Sampling ``samples`` translations per source of up to ``max_len`` tokens."""
        tok = self.tokenizer
        return Decoding(
            samples,
            self.config.max_len,
            tok.bos_id,
            tok.eos_id,
            tok.pad_id,
            greedy_baseline,
        )

    def rollout(
        self,
        model: EncoderDecoder,
        pairs: EncodedPairs,
        decoding: Decoding,
        generator: torch.Generator | None = None,
        times: StepTimes | None = None,
    ) -> Rollout:
        """:func:`policy_gradient.rollout` of ``pairs`` (sources padded onto the device),
        scored with :meth:`reward_fn`."""
        src = pad_batch(pairs.sources, self.tokenizer.pad_id).to(self.device)
        return rollout(
            model,
            src,
            pairs.source_texts,
            pairs.reference_texts,
            decoding,
            self.decode,
            self.reward_fn,
            generator=generator,
            times=times,
        )


def prepare(
    config: TaskConfig,
    *,
    device: str | torch.device,
    progress: bool = False,
    world: World = SINGLE,
) -> Setup:
    """Data, tokenizer and MLE start of ``config.start`` (loaded from the cache, else
    trained and saved), on ``device``. With several processes (``world``) rank 0 reads
    and writes the cache and trains the tokenizer, and sends them to the others; the
    MLE start trains data-parallel (:func:`train_start`)."""
    device = torch.device(device)
    start = config.start
    # the precision it trains in, not "auto", names the start
    start = dataclasses.replace(
        start, mle_precision=resolve_precision(start.mle_precision, device.type)
    )
    splits = load_pairs(start)
    key = start.key(device.type)
    path = caching.artifact_path(key)
    weak_path = path.with_name(path.stem + "-weak.pt")
    with caching.shared_entry([path, weak_path], key, world) as (data, weak):
        cached = data is not None and weak is not None
        if cached:
            tokenizer = BPETokenizer.from_str(data["extra"]["tokenizer"])
            start_state, weak_state = data["state_dict"], weak["state_dict"]
            history = json.loads(data["extra"]["history"])
        else:
            trained = None
            if world.is_main:  # one tokenizer, sent to the other ranks
                trained = train_tokenizer(splits["train"], start.vocab_size)
            text = distributed.from_main(
                None if trained is None else trained.to_str(), world
            )
            tokenizer = trained if world.is_main else BPETokenizer.from_str(text)
        encoded = {
            s: EncodedPairs.build(tokenizer, p, max_tokens=start.max_tokens)
            for s, p in splits.items()
        }
        if not cached:
            start_state, weak_state, history = train_start(
                start, tokenizer, encoded["train"], device, progress, world
            )
        if not cached and world.is_main:
            extra = {"tokenizer": tokenizer.to_str(), "history": json.dumps(history)}
            metadata = dataclasses.asdict(start)
            vocab = len(tokenizer)
            save_checkpoint(
                weak_path,
                translator(start, vocab, weak_state),
                metadata,
                caching.tag({}, key),
            )
            save_checkpoint(
                path,
                translator(start, vocab, start_state),
                metadata,
                caching.tag(extra, key),
            )
    return Setup(
        config,
        tokenizer,
        encoded["train"],
        encoded["valid"],
        encoded["test"],
        start_state,
        weak_state,
        float(history["seconds"]),
        history,
        cached,
        device,
    )


# --------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------


@dataclass
class Evaluation:
    """Corpus BLEU and chrF of greedy translations of a split, the length ratio
    (hypothesis / reference, BLEU's tokens), sacrebleu's signatures and the texts."""

    bleu: float
    chrf: float
    length_ratio: float
    bleu_signature: str
    chrf_signature: str
    hypotheses: list[str]


def evaluate(model: EncoderDecoder, setup: Setup, split: str = "test") -> Evaluation:
    """Greedy translations of a split scored with corpus BLEU and chrF (sacrebleu)."""
    data = setup.split(split)
    hyps = translate_texts(
        model, setup.tokenizer, data.sources, max_len=setup.config.max_len
    )
    bleu = corpus_bleu(hyps, data.reference_texts)
    chrf = corpus_chrf(hyps, data.reference_texts)
    return Evaluation(
        bleu.score, chrf.score, bleu.length_ratio, bleu.signature, chrf.signature, hyps
    )


def validation_rewards(
    model: EncoderDecoder, setup: Setup, samples: int | None = None, seed: int = 1234
) -> Tensor:
    """Rewards (sources, samples) of ``samples`` (default ``reward_samples``) sampled
    translations of the first ``valid_sources`` validation sources, with a fixed
    sampling seed."""
    config = setup.config
    data = setup.valid.subset(range(min(len(setup.valid), config.valid_sources)))
    generator = torch.Generator().manual_seed(seed)
    decoding = setup.decoding(samples or config.reward_samples)
    return setup.rollout(model, data, decoding, generator).rewards


def expected_reward(
    model: EncoderDecoder, setup: Setup, samples: int | None = None, seed: int = 1234
) -> float:
    """The objective policy gradient maximizes, estimated on held-out data: the mean of
    :func:`validation_rewards`."""
    return float(validation_rewards(model, setup, samples, seed).mean())


def expected_reward_se(
    model: EncoderDecoder, setup: Setup, samples: int | None = None, seed: int = 1234
) -> float:
    """Standard error of :func:`expected_reward` (from the spread of per-source mean rewards)."""
    per_source = validation_rewards(model, setup, samples, seed).mean(dim=1)
    return float(per_source.std() / per_source.numel() ** 0.5)


@torch.no_grad()
def position_accuracy(
    model: EncoderDecoder, setup: Setup, split: str = "valid", positions: int = 10
) -> dict:
    """Exposure bias, per target position (BPE tokens): teacher-forced accuracy (the model
    sees the reference prefix) against free-running accuracy (greedy decoding from its own
    prefix; a position counts as right when the greedy token equals the reference token
    there). Returns arrays over positions 1..``positions`` and the mean teacher-forced
    NLL/accuracy (:func:`teacher_forced_stats`)."""
    data = setup.split(split)
    tok = setup.tokenizer
    model.eval()
    tf_right = torch.zeros(positions)
    free_right = torch.zeros(positions)
    counts = torch.zeros(positions)
    for first in range(0, len(data), 128):
        src, tgt, _ = data.batch(range(first, min(len(data), first + 128)))
        src, tgt = src.to(setup.device), tgt.to(setup.device)
        gold = tgt[:, 1:]
        tf = model(src, tgt[:, :-1], pad_id=tok.pad_id).argmax(-1)
        free = translate(
            model, src, tok.bos_id, tok.eos_id, tok.pad_id, setup.config.max_len
        )[:, 1:]
        width = min(positions, gold.shape[1])
        if free.shape[1] < width:
            free = F.pad(free, (0, width - free.shape[1]), value=tok.pad_id)
        mask = (gold[:, :width] != tok.pad_id).float()
        tf_hits = (tf[:, :width] == gold[:, :width]).float() * mask
        free_hits = (free[:, :width] == gold[:, :width]).float() * mask
        tf_right[:width] += tf_hits.sum(0).to(tf_right.device)
        free_right[:width] += free_hits.sum(0).to(free_right.device)
        counts[:width] += mask.sum(0).to(counts.device)
    counts = counts.clamp_min(1)
    stats = teacher_forced_stats(model, data)
    return {
        "teacher_forced": (tf_right / counts).tolist(),
        "free_running": (free_right / counts).tolist(),
        "token_accuracy": stats["token_accuracy"],
        "nll": stats["nll"],
    }
