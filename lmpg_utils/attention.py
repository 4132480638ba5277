"""Scaled dot-product and multi-head attention.

``scaled_dot_product_attention`` is written straight from the formula

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V

and is the lesson and the test oracle. :class:`MultiHeadAttention` is the module the
models train with: by default it calls PyTorch's fused
``torch.nn.functional.scaled_dot_product_attention``; with ``use_sdpa=False`` (or when
the attention weights are asked for) it calls the from-formula version. The two agree
to float32 round-off, which chapter 2 checks.

Mask conventions follow PyTorch: ``attn_mask`` is boolean with ``True`` = may attend
(or a float mask added to the scores); ``key_padding_mask`` is boolean with ``True`` =
padding, ignored (as in ``nn.MultiheadAttention``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _check_mask(mask: Tensor, scores_shape: tuple[int, ...], name: str) -> None:
    """A mask must be bool or float and broadcast to the (..., query_length, key_length) scores."""
    scores_shape = torch.Size(scores_shape)
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise ValueError(
            f"{name} must be bool (True = attend) or floating point, got dtype {mask.dtype}"
        )
    try:
        if torch.broadcast_shapes(mask.shape, scores_shape) != scores_shape:
            raise RuntimeError
    except RuntimeError:
        raise ValueError(
            f"{name} of shape {tuple(mask.shape)} does not broadcast to the scores' shape {tuple(scores_shape)}"
        ) from None


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Attention from the formula; returns ``(output, weights)``.

    Shapes: ``query`` (..., L, d_k), ``key`` (..., S, d_k), ``value`` (..., S, d_v);
    output (..., L, d_v), weights (..., L, S). ``is_causal`` lets query ``i`` see keys
    ``0..i`` (top-left aligned, like PyTorch's). ``scale`` defaults to ``1/sqrt(d_k)``.
    """
    if query.dim() < 2 or key.dim() < 2 or value.dim() < 2:
        raise ValueError(
            "query, key and value need at least 2 dims, got "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(
            f"query dim {query.shape[-1]} != key dim {key.shape[-1]} "
            f"(shapes {tuple(query.shape)}, {tuple(key.shape)})"
        )
    if key.shape[-2] != value.shape[-2]:
        raise ValueError(
            f"key length {key.shape[-2]} != value length {value.shape[-2]} "
            f"(shapes {tuple(key.shape)}, {tuple(value.shape)})"
        )
    try:
        torch.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2])
    except RuntimeError:
        raise ValueError(
            f"batch dims of query {tuple(query.shape)}, key {tuple(key.shape)} and "
            f"value {tuple(value.shape)} do not match"
        ) from None
    if query.shape[-2] == 0 or key.shape[-2] == 0 or query.numel() == 0:
        raise ValueError(
            f"empty input: query {tuple(query.shape)}, key {tuple(key.shape)}"
        )
    d_k = query.shape[-1]
    scale = 1.0 / math.sqrt(d_k) if scale is None else scale
    scores = torch.matmul(query, key.transpose(-2, -1)) * scale  # (..., L, S)
    if is_causal:
        L, S = scores.shape[-2:]
        allowed = torch.ones(L, S, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    if attn_mask is not None:
        _check_mask(attn_mask, scores.shape, "attn_mask")
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    weights = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    return torch.matmul(weights, value), weights


class KVCache:
    """Keys and values of the positions seen so far, for one attention layer.

    Tensors are (batch, heads, length, head_dim). ``static`` caches (cross-attention
    over a fixed encoder output) are filled once and never grow.
    """

    def __init__(self, static: bool = False):
        self.key: Tensor | None = None
        self.value: Tensor | None = None
        self.static = static

    def __len__(self) -> int:
        return 0 if self.key is None else self.key.shape[-2]

    def append(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        if self.key is None:
            self.key, self.value = key, value
        else:
            self.key = torch.cat([self.key, key], dim=-2)
            self.value = torch.cat([self.value, value], dim=-2)
        return self.key, self.value

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows ``index`` (used when sequences are dropped or repeated)."""
        if self.key is not None:
            self.key = self.key.index_select(0, index)
            self.value = self.value.index_select(0, index)


class MultiHeadAttention(nn.Module):
    """Multi-head attention: ``Concat(head_1..head_h) W^O`` with ``head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V)``.

    The per-head projections are stored stacked in one ``nn.Linear`` each for Q, K
    and V (head ``i`` owns output rows ``i*d_head:(i+1)*d_head``).
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        use_sdpa: bool = True,
    ):
        super().__init__()
        if d_model <= 0 or num_heads <= 0:
            raise ValueError(
                f"d_model and num_heads must be positive, got {d_model} and {num_heads}"
            )
        if d_model % num_heads != 0:
            raise ValueError(
                f"d_model={d_model} is not divisible by num_heads={num_heads}"
            )
        self.d_model, self.num_heads, self.d_head = (
            d_model,
            num_heads,
            d_model // num_heads,
        )
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)
        self.dropout = dropout
        self.use_sdpa = use_sdpa

    def _split(self, x: Tensor) -> Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.d_head).transpose(1, 2)

    def forward(
        self,
        query: Tensor,
        key_value: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
        cache: KVCache | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Attend from ``query`` (B, L, d_model) to ``key_value`` (B, S, d_model; default: self-attention).

        ``key_padding_mask`` (B, S) marks padding keys with ``True``; ``attn_mask``
        (L, S) or (B, 1|H, L, S) is True where attention is allowed. With a
        ``cache``, new keys/values are appended (self-attention) or computed once
        (static cross-attention) and causal masking is aligned to the end of the
        cached sequence. Returns ``(output, weights or None)``.
        """
        if query.dim() != 3 or query.shape[-1] != self.d_model:
            raise ValueError(
                f"query must be (batch, length, {self.d_model}), got {tuple(query.shape)}"
            )
        if query.shape[0] == 0 or query.shape[1] == 0:
            raise ValueError(f"empty batch: query has shape {tuple(query.shape)}")
        source = query if key_value is None else key_value
        if (
            source.dim() != 3
            or source.shape[0] != query.shape[0]
            or source.shape[-1] != self.d_model
        ):
            raise ValueError(
                f"key_value must be (batch={query.shape[0]}, length, {self.d_model}), got {tuple(source.shape)}"
            )
        q = self._split(self.q_proj(query))
        if cache is not None and cache.static and len(cache) > 0:
            k, v = cache.key, cache.value
        else:
            k, v = self._split(self.k_proj(source)), self._split(self.v_proj(source))
            if cache is not None:
                k, v = cache.append(k, v)
        length_q, length_k = q.shape[-2], k.shape[-2]

        mask = None
        if is_causal and length_q != length_k:
            # Queries are the last length_q positions: query i sees keys up to i + offset.
            offset = length_k - length_q
            mask = torch.ones(
                length_q, length_k, dtype=torch.bool, device=q.device
            ).tril(offset)
            is_causal = False
        if key_padding_mask is not None:
            if key_padding_mask.dtype != torch.bool:
                raise ValueError(
                    f"key_padding_mask must be bool (True = padding), got dtype {key_padding_mask.dtype}"
                )
            if key_padding_mask.shape != (q.shape[0], length_k):
                raise ValueError(
                    "key_padding_mask must have shape (batch, key_length) = "
                    f"{(q.shape[0], length_k)}, got {tuple(key_padding_mask.shape)}"
                )
            keep = ~key_padding_mask[:, None, None, :]
            mask = keep if mask is None else mask & keep
        if attn_mask is not None:
            if attn_mask.dtype != torch.bool:
                raise ValueError(
                    f"attn_mask must be bool (True = attend), got dtype {attn_mask.dtype}"
                )
            _check_mask(
                attn_mask, (q.shape[0], self.num_heads, length_q, length_k), "attn_mask"
            )
            mask = attn_mask if mask is None else mask & attn_mask
        if mask is not None and is_causal:
            mask = (
                mask
                & torch.ones(
                    length_q, length_k, dtype=torch.bool, device=q.device
                ).tril()
            )
            is_causal = False

        dropout = self.dropout if self.training else 0.0
        if self.use_sdpa and not need_weights:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal
            )
            weights = None
        else:
            out, weights = scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout
            )
        out = out.transpose(1, 2).reshape(query.shape[0], length_q, self.d_model)
        return self.out_proj(out), weights

    @torch.no_grad()
    def load_from_torch(self, reference: nn.MultiheadAttention) -> MultiHeadAttention:
        """Copy the weights of a ``batch_first`` ``nn.MultiheadAttention`` with the same sizes."""
        if reference.embed_dim != self.d_model or reference.num_heads != self.num_heads:
            raise ValueError(
                f"size mismatch: ours d_model={self.d_model}, heads={self.num_heads}; "
                f"theirs {reference.embed_dim}, {reference.num_heads}"
            )
        w_q, w_k, w_v = reference.in_proj_weight.chunk(3)
        b_q, b_k, b_v = reference.in_proj_bias.chunk(3)
        for layer, w, b in (
            (self.q_proj, w_q, b_q),
            (self.k_proj, w_k, b_k),
            (self.v_proj, w_v, b_v),
        ):
            layer.weight.copy_(w)
            layer.bias.copy_(b)
        self.out_proj.weight.copy_(reference.out_proj.weight)
        self.out_proj.bias.copy_(reference.out_proj.bias)
        return self
