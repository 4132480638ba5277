"""Small recurrent language models for chapter 1.

* :class:`LSTMLanguageModel` is autoregressive: it reads ``<s> w_1 .. w_{n}`` left to
  right and predicts ``w_1 .. w_n </s>``, so the product of its conditionals is a
  normalised probability of the sentence, P(S) = prod_i P(w_i | w_<i).
* :class:`BidirectionalLSTMCloze` predicts each word from both sides,
  P(w_i | w_<i, w_>i) (the masked-LM conditional), from a forward state that has read
  ``w_<i`` and a backward state that has read ``w_>i``. Its conditionals do not
  multiply to a probability of the sentence; their log-sum is the
  *pseudo-log-likelihood*.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class LSTMSizes:
    """The sizes shared by chapter 1's two LSTMs (:class:`LSTMLanguageModel` and
    :class:`BidirectionalLSTMCloze`); the vocabulary comes from the data."""

    d_embed: int = 128
    d_hidden: int = 256
    dropout: float = 0.1

    def __post_init__(self) -> None:
        for name in ("d_embed", "d_hidden"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


class LSTMLanguageModel(nn.Module):
    """Word-level LSTM language model.

    The output layer is an *adaptive softmax* (Grave et al. 2017): frequent words
    get a full-size head, rare words share smaller clusters. It is still an exact,
    normalised distribution over the whole vocabulary, but several times cheaper
    to train on a CPU than a full softmax, since word frequencies are Zipfian.
    """

    def __init__(
        self,
        vocab_size: int,
        d_embed: int = 128,
        d_hidden: int = 256,
        num_layers: int = 1,
        dropout: float = 0.1,
        cutoffs: tuple[int, ...] = (1000, 3000),
    ):
        super().__init__()
        if min(vocab_size, d_embed, d_hidden, num_layers) <= 0:
            raise ValueError(
                "vocab_size, d_embed, d_hidden and num_layers must be positive"
            )
        cutoffs = tuple(c for c in cutoffs if c < vocab_size - 1)
        self.vocab_size = vocab_size
        self.embedding = nn.Embedding(vocab_size, d_embed)
        self.lstm = nn.LSTM(
            d_embed,
            d_hidden,
            num_layers,
            batch_first=True,
            dropout=dropout if num_layers > 1 else 0.0,
        )
        self.dropout = nn.Dropout(dropout)
        self.output = nn.AdaptiveLogSoftmaxWithLoss(
            d_hidden, vocab_size, list(cutoffs) or [vocab_size // 2], div_value=4.0
        )

    def hidden_states(
        self, ids: Tensor, state: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """LSTM outputs (B, T, d_hidden) after reading ``ids``, and the final state."""
        if ids.dim() != 2 or ids.numel() == 0:
            raise ValueError(
                f"ids must be a non-empty (batch, length) tensor, got shape {tuple(ids.shape)}"
            )
        hidden, state = self.lstm(self.dropout(self.embedding(ids)), state)
        return self.dropout(hidden), state

    def forward(
        self, ids: Tensor, state: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Next-token log-probabilities (B, T, V) at every position, and the final LSTM state."""
        hidden, state = self.hidden_states(ids, state)
        log_probs = self.output.log_prob(hidden.reshape(-1, hidden.shape[-1]))
        return log_probs.view(*ids.shape, self.vocab_size), state


class BidirectionalLSTMCloze(nn.Module):
    """Predicts every word from its left and right context at once (a masked-LM conditional).

    Input ``<s> w_1 .. w_n </s>``; the forward LSTM state at ``i - 1`` has read
    ``w_<i`` and the backward state at ``i + 1`` has read ``w_>i``, so the prediction
    of ``w_i`` never sees ``w_i`` itself.
    """

    def __init__(
        self,
        vocab_size: int,
        d_embed: int = 128,
        d_hidden: int = 256,
        dropout: float = 0.1,
        cutoffs: tuple[int, ...] = (1000, 3000),
    ):
        super().__init__()
        cutoffs = tuple(c for c in cutoffs if c < vocab_size - 1)
        self.vocab_size = vocab_size
        self.embedding = nn.Embedding(vocab_size, d_embed)
        self.forward_lstm = nn.LSTM(d_embed, d_hidden, batch_first=True)
        self.backward_lstm = nn.LSTM(d_embed, d_hidden, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.output = nn.AdaptiveLogSoftmaxWithLoss(
            2 * d_hidden, vocab_size, list(cutoffs) or [vocab_size // 2], div_value=4.0
        )

    def context_states(self, ids: Tensor, lengths: Tensor) -> Tensor:
        """For the words at positions 1..T-2 of framed, right-padded ``ids``: [left state; right state]."""
        if ids.dim() != 2 or ids.shape[1] < 3:
            raise ValueError(
                f"ids must be (batch, length >= 3) framed by <s> and </s>, got {tuple(ids.shape)}"
            )
        embedded = self.dropout(self.embedding(ids))
        left, _ = self.forward_lstm(embedded)
        # Reverse each sequence within its own length so padding stays at the end.
        positions = torch.arange(ids.shape[1], device=ids.device)
        reverse_index = (lengths[:, None] - 1 - positions[None, :]).clamp(min=0)
        reversed_embedded = embedded.gather(
            1, reverse_index[..., None].expand_as(embedded)
        )
        right_reversed, _ = self.backward_lstm(reversed_embedded)
        right = right_reversed.gather(
            1, reverse_index[..., None].expand(-1, -1, right_reversed.shape[-1])
        )
        return self.dropout(
            torch.cat([left[:, :-2], right[:, 2:]], dim=-1)
        )  # word i sees left[i-1], right[i+1]

    def forward(self, ids: Tensor, lengths: Tensor) -> Tensor:
        """Log-probabilities (B, T-2, V) of the words at positions 1..T-2 given all the other words."""
        context = self.context_states(ids, lengths)
        return self.output.log_prob(context.reshape(-1, context.shape[-1])).view(
            *context.shape[:2], self.vocab_size
        )


def lm_batch_loss(
    model: LSTMLanguageModel, batch: Tensor, pad_id: int = 0
) -> tuple[Tensor, int]:
    """Mean next-token cross-entropy of a framed batch (``<s> .. </s>`` + padding) and the event count."""
    hidden, _ = model.hidden_states(batch[:, :-1])
    targets = batch[:, 1:]
    keep = targets != pad_id
    result = model.output(
        hidden[keep], targets[keep]
    )  # adaptive softmax: computes only the clusters it needs
    return result.loss, int(keep.sum())


def cloze_batch_loss(
    model: BidirectionalLSTMCloze, batch: Tensor, pad_id: int = 0
) -> tuple[Tensor, int]:
    """Mean cross-entropy of predicting each word from both sides (the ``</s>`` frame is not predicted)."""
    lengths = (batch != pad_id).sum(dim=1)
    context = model.context_states(batch, lengths)
    targets = batch[:, 1:-1]
    positions = torch.arange(1, batch.shape[1] - 1, device=batch.device)
    keep = positions[None, :] < (
        lengths[:, None] - 1
    )  # words only: not </s>, not padding
    return model.output(context[keep], targets[keep]).loss, int(keep.sum())
