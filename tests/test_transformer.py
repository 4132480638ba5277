"""Positional encodings, the pre-LN block, the encoder, GPT and the encoder-decoder."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lmpg_utils.transformer import (
    GPT,
    EncoderDecoder,
    FeedForward,
    LearnedPositionalEmbedding,
    SinusoidalPositionalEncoding,
    TransformerBlock,
    TransformerConfig,
    TransformerEncoder,
    count_parameters,
)


def _config(**overrides) -> TransformerConfig:
    values = dict(
        vocab_size=50,
        d_model=32,
        num_heads=4,
        num_layers=2,
        d_ff=64,
        max_len=24,
        dropout=0.0,
    )
    values.update(overrides)
    return TransformerConfig(**values)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_sinusoidal_table_follows_the_formula():
    table = SinusoidalPositionalEncoding(8, 20)(20)
    pos, i = 7, 2
    assert math.isclose(
        float(table[pos, 2 * i]), math.sin(pos / 10000 ** (2 * i / 8)), abs_tol=1e-6
    )
    assert math.isclose(
        float(table[pos, 2 * i + 1]), math.cos(pos / 10000 ** (2 * i / 8)), abs_tol=1e-6
    )
    assert torch.equal(SinusoidalPositionalEncoding(8, 20)(3, offset=5), table[5:8])
    # odd widths work too
    assert SinusoidalPositionalEncoding(7, 4)(4).shape == (4, 7)


def test_learned_positions_are_trainable_and_offset():
    positions = LearnedPositionalEmbedding(8, 10)
    assert torch.equal(positions(3, offset=4), positions.embedding.weight[4:7])
    assert positions.embedding.weight.requires_grad


def test_block_is_pre_ln_with_residuals():
    block = TransformerBlock(16, 4, 32).eval()
    x = torch.randn(2, 5, 16)
    attended, _ = block.self_attn(block.norm_self(x))
    h = x + attended
    expected = h + block.ff(block.norm_ff(h))
    out, weights = block(x)
    assert torch.allclose(out, expected, atol=1e-6)
    assert weights is None
    _, weights = block(x, need_weights=True)
    assert weights.shape == (2, 4, 5, 5)


def test_cross_attention_block_requires_memory():
    block = TransformerBlock(16, 4, 32, cross_attention=True)
    with pytest.raises(ValueError, match="pass the encoder output as memory"):
        block(torch.randn(2, 5, 16))


def test_feed_forward_is_position_wise():
    ff = FeedForward(8, 16).eval()
    x = torch.randn(2, 5, 8)
    assert torch.allclose(ff(x)[:, 3], ff(x[:, 3:4])[:, 0], atol=1e-6)


@pytest.mark.parametrize("positional", ["learned", "sinusoidal"])
def test_encoder_ignores_padding(positional):
    encoder = TransformerEncoder(_config(positional=positional)).eval()
    ids = torch.randint(4, 50, (2, 8))
    padding = torch.zeros(2, 8, dtype=torch.bool)
    padding[0, 5:] = True
    ids[0, 5:] = 0
    other = ids.clone()
    other[0, 5:] = 17  # change what sits under the padding
    a, b = encoder(ids, padding), encoder(other, padding)
    assert a.shape == (2, 8, 32)
    assert torch.allclose(a[0, :5], b[0, :5], atol=1e-5)
    assert torch.allclose(a[1], b[1], atol=1e-6)


def test_encoder_is_bidirectional_and_uses_positions():
    encoder = TransformerEncoder(_config()).eval()
    ids = torch.randint(4, 50, (1, 6))
    changed = ids.clone()
    changed[0, 5] = (ids[0, 5] + 1) % 46 + 4
    # changing the last token changes the first position's output (attention looks right)
    assert not torch.allclose(encoder(ids)[0, 0], encoder(changed)[0, 0], atol=1e-4)
    # permuting tokens does not just permute outputs: positions matter
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    assert not torch.allclose(encoder(ids[:, perm]), encoder(ids)[:, perm], atol=1e-3)


def test_segment_embeddings():
    encoder = TransformerEncoder(_config(num_segments=2)).eval()
    ids = torch.randint(4, 50, (2, 6))
    segments = torch.tensor([[0, 0, 0, 1, 1, 1]] * 2)
    assert not torch.allclose(
        encoder(ids, segment_ids=segments), encoder(ids), atol=1e-4
    )
    with pytest.raises(ValueError, match="segment_ids shape"):
        encoder(ids, segment_ids=segments[:, :3])


def test_gpt_is_causal_and_ties_embeddings():
    model = GPT(_config()).eval()
    ids = torch.randint(4, 50, (2, 10))
    changed = ids.clone()
    changed[:, 6:] = 5
    a, b = model(ids), model(changed)
    assert a.shape == (2, 10, 50)
    assert torch.allclose(
        a[:, :6], b[:, :6], atol=1e-5
    )  # the past does not see the future
    assert not torch.allclose(a[:, 6:], b[:, 6:], atol=1e-4)
    assert model.head.weight is model.embeddings.token.weight
    expected = sum(
        p.numel() for p in model.parameters()
    )  # parameters() already de-duplicates
    assert count_parameters(model) == expected
    assert count_parameters(model) < sum(p.numel() for p in model.state_dict().values())


def test_gpt_cache_equals_full_forward_and_weights_are_causal():
    model = GPT(_config(positional="sinusoidal")).eval()
    ids = torch.randint(4, 50, (2, 9))
    with torch.no_grad():
        full, weights = model(ids, need_weights=True)
        cache = model.new_cache()
        parts = [model(ids[:, :4], cache=cache)] + [
            model(ids[:, i : i + 1], cache=cache) for i in range(4, 9)
        ]
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)
    assert len(weights) == 2 and weights[0].shape == (2, 4, 9, 9)
    assert float(weights[0].triu(1).abs().max()) == 0.0
    assert torch.allclose(weights[1].sum(-1), torch.ones(2, 4, 9), atol=1e-5)


def test_encoder_decoder_shapes_causality_and_cache():
    config = _config(num_decoder_layers=1)
    model = EncoderDecoder(config).eval()
    assert len(model.decoder_blocks) == 1 and len(model.encoder.blocks) == 2
    src = torch.randint(4, 50, (2, 7))
    src[1, 5:] = 0
    tgt = torch.randint(4, 50, (2, 6))
    tgt[:, 0] = 2
    logits = model(src, tgt)
    assert logits.shape == (2, 6, 50)
    changed = tgt.clone()
    changed[:, 4:] = 9
    assert torch.allclose(model(src, changed)[:, :4], logits[:, :4], atol=1e-5)
    # the source matters (cross-attention)
    other_src = src.clone()
    other_src[0, 0] = (src[0, 0] + 1) % 46 + 4
    assert not torch.allclose(model(other_src, tgt)[0], logits[0], atol=1e-4)
    # incremental decoding with the cache equals the teacher-forced pass
    padding = src == 0
    memory = model.encode(src, padding)
    cache = model.new_cache()
    with torch.no_grad():
        steps = [
            model.decode(tgt[:, i : i + 1], memory, padding, cache=cache)
            for i in range(6)
        ]
    assert torch.allclose(torch.cat(steps, dim=1), logits, atol=1e-5)
    assert model.head.weight is model.encoder.embeddings.token.weight


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(d_model=30, num_heads=4), "d_model=30 is not divisible by num_heads=4"),
        (dict(vocab_size=0), "vocab_size must be positive"),
        (dict(positional="rotary"), "positional must be"),
        (dict(dropout=1.0), "dropout must be in"),
    ],
)
def test_config_rejects_bad_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        _config(**overrides)


def test_models_reject_bad_ids():
    model = GPT(_config())
    with pytest.raises(ValueError, match=r"empty batch: token ids have shape \(0, 5\)"):
        model(torch.zeros(0, 5, dtype=torch.long))
    with pytest.raises(
        ValueError, match=r"must be \(batch, length\), got shape \(5,\)"
    ):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="must be integers"):
        model(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="exceeds the model's max_len 24"):
        model(torch.zeros(1, 25, dtype=torch.long))
    with pytest.raises(
        ValueError, match="token id 50 is outside the vocabulary of size 50"
    ):
        model(torch.full((1, 3), 50))


def test_cached_decoding_steps_do_not_read_ids_back():
    """A meta tensor has no values: reading its range raises, so this passes only when
    the per-token path (offset > 0) skips the host-side range check."""
    from lmpg_utils.transformer import _check_ids

    ids = torch.zeros(2, 1, dtype=torch.long, device="meta")
    _check_ids(ids, vocab_size=50, max_len=24, offset=3)
    with pytest.raises((RuntimeError, NotImplementedError)):
        _check_ids(ids, vocab_size=50, max_len=24, offset=0)


def test_config_round_trips_through_dict():
    config = _config(positional="sinusoidal")
    assert TransformerConfig(**config.to_dict()) == config
    assert isinstance(GPT(config).embeddings.position, nn.Module)
