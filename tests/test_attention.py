"""Attention from the formula against PyTorch, masks, the KV cache and bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmpg_utils.attention import (
    KVCache,
    MultiHeadAttention,
    scaled_dot_product_attention,
)

ATOL = 1e-5


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _qkv(batch=3, heads=2, length_q=5, length_k=7, d_k=8, d_v=6):
    return (
        torch.randn(batch, heads, length_q, d_k),
        torch.randn(batch, heads, length_k, d_k),
        torch.randn(batch, heads, length_k, d_v),
    )


def test_formula_by_hand_on_a_tiny_example():
    q = torch.tensor([[1.0, 0.0]])
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    v = torch.tensor([[10.0], [20.0]])
    out, weights = scaled_dot_product_attention(q, k, v)
    a = math.exp(1 / math.sqrt(2))
    expected_w = torch.tensor([[a / (a + 1), 1 / (a + 1)]])
    assert torch.allclose(weights, expected_w, atol=1e-6)
    assert torch.allclose(out, expected_w @ v, atol=1e-5)


def test_matches_torch_sdpa_without_mask():
    q, k, v = _qkv()
    ours, weights = scaled_dot_product_attention(q, k, v)
    theirs = F.scaled_dot_product_attention(q, k, v)
    assert torch.allclose(ours, theirs, atol=ATOL)
    assert torch.allclose(weights.sum(-1), torch.ones(3, 2, 5), atol=1e-6)


def test_matches_torch_sdpa_causal():
    q, k, v = _qkv(length_q=6, length_k=6)
    ours, weights = scaled_dot_product_attention(q, k, v, is_causal=True)
    theirs = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.allclose(ours, theirs, atol=ATOL)
    # no weight on the future
    assert float(weights.triu(diagonal=1).abs().max()) == 0.0


def test_matches_torch_sdpa_bool_and_float_masks():
    q, k, v = _qkv()
    mask = torch.rand(3, 1, 5, 7) > 0.4
    mask[..., 0] = True  # every query sees at least one key
    ours, weights = scaled_dot_product_attention(q, k, v, attn_mask=mask)
    theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.allclose(ours, theirs, atol=ATOL)
    assert float(weights.masked_select(~mask.expand_as(weights)).abs().max()) == 0.0
    additive = torch.randn(5, 7)
    ours, _ = scaled_dot_product_attention(q, k, v, attn_mask=additive)
    assert torch.allclose(
        ours, F.scaled_dot_product_attention(q, k, v, attn_mask=additive), atol=ATOL
    )


def test_custom_scale():
    q, k, v = _qkv()
    ours, _ = scaled_dot_product_attention(q, k, v, scale=0.3)
    assert torch.allclose(
        ours, F.scaled_dot_product_attention(q, k, v, scale=0.3), atol=ATOL
    )


def _mha_pair(d_model=16, heads=4):
    reference = nn.MultiheadAttention(d_model, heads, batch_first=True)
    ours = MultiHeadAttention(d_model, heads).load_from_torch(reference)
    return ours.eval(), reference.eval()


@pytest.mark.parametrize("use_sdpa", [True, False])
def test_multi_head_matches_torch_with_padding_and_causal_masks(use_sdpa):
    ours, reference = _mha_pair()
    ours.use_sdpa = use_sdpa
    x = torch.randn(3, 6, 16)
    padding = torch.zeros(3, 6, dtype=torch.bool)
    padding[0, 4:] = True
    padding[2, 5:] = True
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    with torch.no_grad():
        # self-attention with padding only
        theirs, _ = reference(x, x, x, key_padding_mask=padding, need_weights=False)
        assert torch.allclose(ours(x, key_padding_mask=padding)[0], theirs, atol=ATOL)
        # causal (PyTorch's attn_mask is True where attention is NOT allowed)
        theirs, _ = reference(x, x, x, attn_mask=~causal, need_weights=False)
        assert torch.allclose(ours(x, is_causal=True)[0], theirs, atol=ATOL)
        assert torch.allclose(ours(x, attn_mask=causal)[0], theirs, atol=ATOL)
        # both
        theirs, _ = reference(
            x, x, x, key_padding_mask=padding, attn_mask=~causal, need_weights=False
        )
        assert torch.allclose(
            ours(x, key_padding_mask=padding, is_causal=True)[0], theirs, atol=ATOL
        )


def test_cross_attention_and_weights_match_torch():
    ours, reference = _mha_pair()
    x, memory = torch.randn(2, 4, 16), torch.randn(2, 9, 16)
    padding = torch.zeros(2, 9, dtype=torch.bool)
    padding[1, 6:] = True
    with torch.no_grad():
        theirs, their_weights = reference(
            x, memory, memory, key_padding_mask=padding, average_attn_weights=False
        )
        out, weights = ours(x, memory, key_padding_mask=padding, need_weights=True)
    assert torch.allclose(out, theirs, atol=ATOL)
    assert torch.allclose(weights, their_weights, atol=ATOL)
    assert weights.shape == (2, 4, 4, 9)
    assert float(weights[1, :, :, 6:].abs().max()) == 0.0


def test_sdpa_path_equals_formula_path_with_gradients():
    fast = MultiHeadAttention(32, 4, use_sdpa=True)
    slow = MultiHeadAttention(32, 4, use_sdpa=False)
    slow.load_state_dict(fast.state_dict())
    x = torch.randn(2, 7, 32, requires_grad=True)
    padding = torch.tensor([[False] * 7, [False] * 5 + [True] * 2])
    out_fast, _ = fast(x, key_padding_mask=padding, is_causal=True)
    out_slow, _ = slow(x, key_padding_mask=padding, is_causal=True)
    assert torch.allclose(out_fast, out_slow, atol=ATOL)
    (g_fast,) = torch.autograd.grad(out_fast.square().sum(), x)
    (g_slow,) = torch.autograd.grad(out_slow.square().sum(), x)
    assert torch.allclose(g_fast, g_slow, atol=1e-4)


def test_kv_cache_incremental_equals_full_causal():
    attention = MultiHeadAttention(16, 2).eval()
    x = torch.randn(2, 6, 16)
    with torch.no_grad():
        full, _ = attention(x, is_causal=True)
        cache = KVCache()
        first, _ = attention(x[:, :3], is_causal=True, cache=cache)  # a prompt of 3
        steps = [
            attention(x[:, i : i + 1], is_causal=True, cache=cache)[0]
            for i in range(3, 6)
        ]
    assert len(cache) == 6
    assert torch.allclose(torch.cat([first, *steps], dim=1), full, atol=ATOL)


def test_static_cache_is_filled_once():
    attention = MultiHeadAttention(16, 2).eval()
    x, memory = torch.randn(2, 3, 16), torch.randn(2, 5, 16)
    cache = KVCache(static=True)
    with torch.no_grad():
        a, _ = attention(x, memory, cache=cache)
        b, _ = attention(
            x, torch.zeros_like(memory), cache=cache
        )  # memory ignored: cached
    assert len(cache) == 5
    assert torch.allclose(a, b)
    cache.reorder(torch.tensor([1, 1, 0]))
    assert cache.key.shape[0] == 3


# ---- bad input --------------------------------------------------------------------------


def test_heads_must_divide_d_model():
    with pytest.raises(ValueError, match="d_model=10 is not divisible by num_heads=4"):
        MultiHeadAttention(10, 4)
    with pytest.raises(ValueError, match="positive"):
        MultiHeadAttention(0, 1)


@pytest.mark.parametrize(
    "shapes, message",
    [
        (
            ((2, 3, 4), (2, 3, 5), (2, 3, 4)),
            r"query dim 4 != key dim 5 \(shapes \(2, 3, 4\), \(2, 3, 5\)\)",
        ),
        (((2, 3, 4), (2, 3, 4), (2, 4, 4)), r"key length 3 != value length 4"),
        (
            ((2, 3, 4), (3, 3, 4), (3, 3, 4)),
            r"batch dims of query \(2, 3, 4\), key \(3, 3, 4\)",
        ),
        (((4,), (3, 4), (3, 4)), r"at least 2 dims"),
        (((0, 3, 4), (0, 3, 4), (0, 3, 4)), r"empty input: query \(0, 3, 4\)"),
        (((2, 3, 4), (2, 0, 4), (2, 0, 4)), r"empty input"),
    ],
)
def test_formula_rejects_bad_shapes(shapes, message):
    q, k, v = (torch.randn(*s) for s in shapes)
    with pytest.raises(ValueError, match=message):
        scaled_dot_product_attention(q, k, v)


def test_formula_rejects_bad_masks():
    q, k, v = torch.randn(2, 3, 4), torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    with pytest.raises(
        ValueError,
        match=r"attn_mask of shape \(3, 3\) does not broadcast to the scores' shape \(2, 3, 5\)",
    ):
        scaled_dot_product_attention(
            q, k, v, attn_mask=torch.ones(3, 3, dtype=torch.bool)
        )
    with pytest.raises(ValueError, match="must be bool .* got dtype torch.int64"):
        scaled_dot_product_attention(
            q, k, v, attn_mask=torch.ones(3, 5, dtype=torch.long)
        )


def test_multi_head_rejects_bad_input():
    attention = MultiHeadAttention(16, 4)
    x = torch.randn(2, 5, 16)
    with pytest.raises(
        ValueError, match=r"query must be \(batch, length, 16\), got \(2, 5, 8\)"
    ):
        attention(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match=r"query must be"):
        attention(torch.randn(5, 16))
    with pytest.raises(ValueError, match=r"empty batch: query has shape \(0, 5, 16\)"):
        attention(torch.randn(0, 5, 16))
    with pytest.raises(
        ValueError, match=r"key_value must be \(batch=2, length, 16\), got \(3, 5, 16\)"
    ):
        attention(x, torch.randn(3, 5, 16))
    with pytest.raises(
        ValueError,
        match=r"key_padding_mask must have shape \(batch, key_length\) = \(2, 5\), got \(2, 4\)",
    ):
        attention(x, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_padding_mask must be bool"):
        attention(x, key_padding_mask=torch.zeros(2, 5))
    with pytest.raises(
        ValueError,
        match=r"attn_mask of shape \(3, 3\) does not broadcast to .* \(2, 4, 5, 5\)",
    ):
        attention(x, attn_mask=torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask must be bool"):
        attention(x, attn_mask=torch.ones(5, 5, dtype=torch.int32))


def test_load_from_torch_rejects_size_mismatch():
    with pytest.raises(ValueError, match="size mismatch"):
        MultiHeadAttention(16, 4).load_from_torch(
            nn.MultiheadAttention(16, 2, batch_first=True)
        )
