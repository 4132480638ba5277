"""Special token ids and BERT's masked-LM corruption (chapter 3).

:func:`mask_tokens` corrupts a batch exactly as BERT does. Each position that is neither
a special token nor padding is *chosen* with probability 15%; a chosen position becomes
``[MASK]`` 80% of the time, a random non-special token 10% and stays unchanged 10%.
Labels are the original ids at chosen positions and ``-100`` (ignored by the loss)
everywhere else, so the loss is :math:`-\\sum_{i\\in M}\\log P(w_i\\mid\\tilde x)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..tokenization import CLS, MASK, PAD, SEP, BPETokenizer

IGNORE_INDEX = -100

# Masking actions recorded per position by :func:`mask_tokens`.
NOT_CHOSEN, MASKED, RANDOM, KEPT = 0, 1, 2, 3


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
    check_known_ids(ids, special.vocab_size)
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


def check_known_ids(ids: Tensor, vocab_size: int) -> None:
    """``ValueError`` naming the first id of ``ids`` outside ``0..vocab_size - 1``."""
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        raise ValueError(
            f"unknown token id {bad}: the vocabulary has ids 0..{vocab_size - 1}"
        )
