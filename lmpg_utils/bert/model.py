"""The small BERT of chapter 3 and its classifier.

* :class:`BertModel`: the shared :class:`~lmpg_utils.transformer.TransformerEncoder` with
  segment embeddings, an MLM head (dense, GELU, LayerNorm, then a decoder tied to the
  token embeddings plus a bias) and an NSP head on the pooled ``[CLS]`` vector.
* :class:`BertClassifier`: a classification head on the same pooled vector.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..transformer import TransformerConfig, TransformerEncoder, init_weights


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
