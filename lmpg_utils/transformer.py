"""Transformer building blocks and the three model shapes the book trains.

* :class:`TransformerEncoder`: bidirectional stack (BERT in chapter 3, the source
  side of the translation model in chapter 4).
* :class:`GPT`: decoder-only causal language model (chapter 2).
* :class:`EncoderDecoder`: the original Transformer shape for translation (chapter 4).

All blocks are pre-LN: ``x + Attention(LayerNorm(x))`` then ``x + FFN(LayerNorm(x))``,
with a final LayerNorm, which trains stably without a long warm-up.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from .attention import KVCache, MultiHeadAttention


@dataclass
class TransformerConfig:
    """Sizes of a Transformer model. ``num_segments`` > 0 adds segment embeddings (BERT)."""

    vocab_size: int
    d_model: int = 128
    num_heads: int = 4
    num_layers: int = 2
    d_ff: int = 512
    max_len: int = 256
    dropout: float = 0.1
    positional: str = "learned"
    num_segments: int = 0
    num_decoder_layers: int | None = None

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "d_model",
            "num_heads",
            "num_layers",
            "d_ff",
            "max_len",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.num_heads:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}"
            )
        if self.positional not in ("learned", "sinusoidal"):
            raise ValueError(
                f"positional must be 'learned' or 'sinusoidal', got {self.positional!r}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ModelSizes:
    """The sizes of a Transformer without its vocabulary, which comes from the data.

    An experiment's ``Config`` nests one of these (``config.model``) instead of copying
    the fields; :meth:`with_vocab` makes the :class:`TransformerConfig` a model is built
    from. The same checks as :class:`TransformerConfig` run on creation.
    """

    d_model: int = 128
    num_heads: int = 4
    num_layers: int = 2
    d_ff: int = 512
    max_len: int = 256
    dropout: float = 0.1
    positional: str = "learned"
    num_decoder_layers: int | None = None

    def __post_init__(self) -> None:
        self.with_vocab(1)

    def with_vocab(self, vocab_size: int, num_segments: int = 0) -> TransformerConfig:
        """The full model config for a vocabulary of ``vocab_size`` tokens."""
        return TransformerConfig(
            vocab_size=vocab_size, num_segments=num_segments, **asdict(self)
        )


class SinusoidalPositionalEncoding(nn.Module):
    """Fixed encodings PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] = cos(...)."""

    def __init__(self, d_model: int, max_len: int):
        super().__init__()
        position = torch.arange(max_len).unsqueeze(1)
        frequency = torch.exp(
            torch.arange(0, d_model, 2) * (-math.log(10000.0) / d_model)
        )
        table = torch.zeros(max_len, d_model)
        table[:, 0::2] = torch.sin(position * frequency)
        table[:, 1::2] = torch.cos(position * frequency)[:, : d_model // 2]
        self.register_buffer("table", table, persistent=False)

    def forward(self, length: int, offset: int = 0) -> Tensor:
        return self.table[offset : offset + length]


class LearnedPositionalEmbedding(nn.Module):
    """One trained vector per position."""

    def __init__(self, d_model: int, max_len: int):
        super().__init__()
        self.embedding = nn.Embedding(max_len, d_model)

    def forward(self, length: int, offset: int = 0) -> Tensor:
        positions = torch.arange(
            offset, offset + length, device=self.embedding.weight.device
        )
        return self.embedding(positions)


class FeedForward(nn.Module):
    """Position-wise ``Linear -> GELU -> Linear``."""

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d_model, d_ff),
            nn.GELU(),
            nn.Linear(d_ff, d_model),
            nn.Dropout(dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    """Pre-LN block: self-attention, optional cross-attention, feed-forward, each with a residual."""

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        d_ff: int,
        dropout: float = 0.0,
        cross_attention: bool = False,
    ):
        super().__init__()
        self.norm_self = nn.LayerNorm(d_model)
        self.self_attn = MultiHeadAttention(d_model, num_heads, dropout)
        self.norm_cross = nn.LayerNorm(d_model) if cross_attention else None
        self.cross_attn = (
            MultiHeadAttention(d_model, num_heads, dropout) if cross_attention else None
        )
        self.norm_ff = nn.LayerNorm(d_model)
        self.ff = FeedForward(d_model, d_ff, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: Tensor,
        padding_mask: Tensor | None = None,
        is_causal: bool = False,
        memory: Tensor | None = None,
        memory_padding_mask: Tensor | None = None,
        cache: KVCache | None = None,
        cross_cache: KVCache | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        attended, weights = self.self_attn(
            self.norm_self(x),
            key_padding_mask=padding_mask,
            is_causal=is_causal,
            cache=cache,
            need_weights=need_weights,
        )
        x = x + self.dropout(attended)
        if self.cross_attn is not None:
            if memory is None:
                raise ValueError(
                    "this block has cross-attention: pass the encoder output as memory"
                )
            attended, _ = self.cross_attn(
                self.norm_cross(x),
                memory,
                key_padding_mask=memory_padding_mask,
                cache=cross_cache,
            )
            x = x + self.dropout(attended)
        return x + self.ff(self.norm_ff(x)), weights


def _check_ids(ids: Tensor, vocab_size: int, max_len: int, offset: int = 0) -> None:
    if ids.dim() != 2:
        raise ValueError(
            f"token ids must be (batch, length), got shape {tuple(ids.shape)}"
        )
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"empty batch: token ids have shape {tuple(ids.shape)}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"token ids must be integers, got dtype {ids.dtype}")
    if offset + ids.shape[1] > max_len:
        raise ValueError(
            f"sequence of length {offset + ids.shape[1]} exceeds the model's max_len {max_len}"
        )
    if offset > 0:
        # a KV-cached decoding step: the ids are the model's own samples, and reading
        # their range back would cost one host sync per generated token on a GPU
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(
            f"token id {low if low < 0 else high} is outside the vocabulary of size {vocab_size}"
        )


class Embeddings(nn.Module):
    """Token (+ segment) + position embeddings, scaled by sqrt(d_model) for sinusoidal positions."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.token = nn.Embedding(config.vocab_size, config.d_model)
        self.segment = (
            nn.Embedding(config.num_segments, config.d_model)
            if config.num_segments
            else None
        )
        if config.positional == "learned":
            self.position: nn.Module = LearnedPositionalEmbedding(
                config.d_model, config.max_len
            )
        else:
            self.position = SinusoidalPositionalEncoding(config.d_model, config.max_len)
        self.dropout = nn.Dropout(config.dropout)
        self.scale = (
            math.sqrt(config.d_model) if config.positional == "sinusoidal" else 1.0
        )

    def forward(
        self, ids: Tensor, segment_ids: Tensor | None = None, offset: int = 0
    ) -> Tensor:
        _check_ids(ids, self.config.vocab_size, self.config.max_len, offset)
        x = self.token(ids) * self.scale + self.position(ids.shape[1], offset)
        if self.segment is not None:
            if segment_ids is None:
                segment_ids = torch.zeros_like(ids)
            if segment_ids.shape != ids.shape:
                raise ValueError(
                    f"segment_ids shape {tuple(segment_ids.shape)} != ids shape {tuple(ids.shape)}"
                )
            x = x + self.segment(segment_ids)
        return self.dropout(x)


def block_stack(
    config: TransformerConfig, layers: int, cross_attention: bool = False
) -> nn.ModuleList:
    """``layers`` Transformer blocks of ``config``'s sizes (the body of every model here)."""
    return nn.ModuleList(
        TransformerBlock(
            config.d_model,
            config.num_heads,
            config.d_ff,
            config.dropout,
            cross_attention=cross_attention,
        )
        for _ in range(layers)
    )


class TransformerEncoder(nn.Module):
    """Bidirectional encoder: embeddings, ``num_layers`` blocks, final LayerNorm. Returns hidden states."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.blocks = block_stack(config, config.num_layers)
        self.norm = nn.LayerNorm(config.d_model)

    def forward(
        self,
        ids: Tensor,
        padding_mask: Tensor | None = None,
        segment_ids: Tensor | None = None,
    ) -> Tensor:
        """``ids`` (B, L) -> hidden states (B, L, d_model). ``padding_mask`` is True at padding."""
        x = self.embeddings(ids, segment_ids)
        for block in self.blocks:
            x, _ = block(x, padding_mask=padding_mask)
        return self.norm(x)


class GPT(nn.Module):
    """Decoder-only causal language model with tied input/output embeddings."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.blocks = block_stack(config, config.num_layers)
        self.norm = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.head.weight = self.embeddings.token.weight
        self.apply(init_weights)

    def new_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.blocks]

    def _trunk(
        self, ids: Tensor, cache: list[KVCache] | None, need_weights: bool
    ) -> tuple[Tensor, list[Tensor | None]]:
        offset = len(cache[0]) if cache else 0
        x = self.embeddings(ids, offset=offset)
        all_weights = []
        for i, block in enumerate(self.blocks):
            x, weights = block(
                x,
                is_causal=True,
                cache=cache[i] if cache else None,
                need_weights=need_weights,
            )
            all_weights.append(weights)
        return self.norm(x), all_weights

    def hidden_states(self, ids: Tensor, cache: list[KVCache] | None = None) -> Tensor:
        """The final-normed hidden states (B, L, d_model) for ``ids`` (B, L).

        ``self.head(hidden_states(ids))`` are exactly :meth:`forward`'s logits; a
        :class:`ValueHead` reads the same states (PPO's value function on the policy's
        trunk). With ``cache``, ``ids`` continue the cached prefix.
        """
        return self._trunk(ids, cache, need_weights=False)[0]

    def forward(
        self,
        ids: Tensor,
        cache: list[KVCache] | None = None,
        need_weights: bool = False,
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Next-token logits (B, L, vocab) for ``ids`` (B, L).

        With ``cache`` (from :meth:`new_cache`), ``ids`` continue the cached prefix.
        With ``need_weights`` also returns each layer's attention weights.
        """
        hidden, all_weights = self._trunk(ids, cache, need_weights)
        logits = self.head(hidden)
        return (logits, all_weights) if need_weights else logits


class ValueHead(nn.Module):
    """A scalar value per position, ``V = w . h + b``, read from hidden states ``h``.

    PPO's critic: on :meth:`GPT.hidden_states` (B, L, d_model) it returns (B, L), the
    value of the state after each token. Initialised like the rest of the models
    (normal(0, 0.02) weight, zero bias).
    """

    def __init__(self, d_model: int):
        super().__init__()
        if d_model <= 0:
            raise ValueError(f"d_model must be positive, got {d_model}")
        self.linear = nn.Linear(d_model, 1)
        self.apply(init_weights)

    def forward(self, hidden: Tensor) -> Tensor:
        """``hidden`` (..., d_model) -> values (...)."""
        if hidden.dim() < 1 or hidden.shape[-1] != self.linear.in_features:
            raise ValueError(
                f"hidden states must end in d_model={self.linear.in_features}, "
                f"got shape {tuple(hidden.shape)}"
            )
        return self.linear(hidden).squeeze(-1)


class EncoderDecoder(nn.Module):
    """Encoder-decoder Transformer with one shared (source+target) vocabulary and tied embeddings."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.encoder = TransformerEncoder(config)
        self.decoder_embeddings = Embeddings(config)
        self.decoder_embeddings.token = (
            self.encoder.embeddings.token
        )  # shared vocabulary, shared table
        layers = config.num_decoder_layers or config.num_layers
        self.decoder_blocks = block_stack(config, layers, cross_attention=True)
        self.decoder_norm = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.head.weight = self.encoder.embeddings.token.weight
        self.apply(init_weights)

    def encode(self, src: Tensor, src_padding_mask: Tensor) -> Tensor:
        return self.encoder(src, padding_mask=src_padding_mask)

    def new_cache(self) -> tuple[list[KVCache], list[KVCache]]:
        """Self-attention caches and (static) cross-attention caches for incremental decoding."""
        return [KVCache() for _ in self.decoder_blocks], [
            KVCache(static=True) for _ in self.decoder_blocks
        ]

    def decode(
        self,
        tgt: Tensor,
        memory: Tensor,
        src_padding_mask: Tensor,
        tgt_padding_mask: Tensor | None = None,
        cache: tuple[list[KVCache], list[KVCache]] | None = None,
    ) -> Tensor:
        """Logits (B, T, vocab) for the target prefix ``tgt`` given encoder ``memory``."""
        offset = len(cache[0][0]) if cache else 0
        x = self.decoder_embeddings(tgt, offset=offset)
        for i, block in enumerate(self.decoder_blocks):
            x, _ = block(
                x,
                padding_mask=tgt_padding_mask,
                is_causal=True,
                memory=memory,
                memory_padding_mask=src_padding_mask,
                cache=cache[0][i] if cache else None,
                cross_cache=cache[1][i] if cache else None,
            )
        return self.head(self.decoder_norm(x))

    def forward(self, src: Tensor, tgt_in: Tensor, pad_id: int = 0) -> Tensor:
        """Teacher-forced logits: ``src`` (B, S), ``tgt_in`` (B, T) starting with BOS."""
        src_padding_mask = src == pad_id
        memory = self.encode(src, src_padding_mask)
        return self.decode(
            tgt_in, memory, src_padding_mask, tgt_padding_mask=tgt_in == pad_id
        )


def init_weights(module: nn.Module) -> None:
    """GPT-2 style initialisation: normal(0, 0.02) weights, zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)


def count_parameters(model: nn.Module) -> int:
    """Number of distinct trainable parameters (tied weights counted once)."""
    return sum(
        p.numel()
        for p in model.parameters()  # a tied weight is listed once
        if p.requires_grad
    )
