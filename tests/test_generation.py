"""Sampling rules, cached vs. uncached generation, translation decoding and sequence scoring."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmpg_utils.generation import (
    generate,
    pick_next,
    sequence_log_probs,
    target_mask,
    translate,
)
from lmpg_utils.transformer import GPT, EncoderDecoder, TransformerConfig

PAD, BOS, EOS = 0, 2, 3


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _gpt(**overrides) -> GPT:
    values = dict(
        vocab_size=40,
        d_model=32,
        num_heads=4,
        num_layers=2,
        d_ff=64,
        max_len=40,
        dropout=0.0,
    )
    values.update(overrides)
    return GPT(TransformerConfig(**values)).eval()


def test_pick_next_greedy_top_k_and_temperature():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 0.0]])
    assert pick_next(logits, temperature=0).tolist() == [1, 0]
    generator = torch.Generator().manual_seed(0)
    # top_k=1 is greedy whatever the temperature
    assert pick_next(
        logits, temperature=5.0, top_k=1, generator=generator
    ).tolist() == [1, 0]
    # top_k=2 never picks outside the two best
    draws = torch.stack(
        [pick_next(logits, 1.0, top_k=2, generator=generator) for _ in range(200)]
    )
    assert set(draws[:, 0].tolist()) <= {1, 3} and set(draws[:, 0].tolist()) == {1, 3}
    # a low temperature concentrates, a high one spreads
    cold = torch.stack(
        [pick_next(logits[:1], 0.2, generator=generator) for _ in range(300)]
    )
    hot = torch.stack(
        [pick_next(logits[:1], 5.0, generator=generator) for _ in range(300)]
    )
    assert (cold == 1).float().mean() > 0.95
    assert (hot == 1).float().mean() < 0.6


def test_sampling_frequencies_follow_softmax():
    logits = torch.tensor([[1.0, 0.0, -1.0]])
    generator = torch.Generator().manual_seed(1)
    draws = torch.cat([pick_next(logits.expand(1000, 3), 1.0, generator=generator)])
    freq = torch.bincount(draws, minlength=3).float() / 1000
    assert torch.allclose(freq, torch.softmax(logits[0], -1), atol=0.05)


def test_pick_next_rejects_bad_settings():
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        pick_next(torch.zeros(1, 3), temperature=-1)
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        pick_next(torch.zeros(1, 3), top_k=0)


@pytest.mark.parametrize("temperature, top_k", [(0.0, None), (0.8, 5)])
def test_cached_generation_equals_uncached(temperature, top_k):
    model = _gpt()
    prompt = torch.randint(4, 40, (3, 4))
    fast = generate(
        model,
        prompt,
        12,
        temperature,
        top_k,
        use_cache=True,
        generator=torch.Generator().manual_seed(7),
    )
    slow = generate(
        model,
        prompt,
        12,
        temperature,
        top_k,
        use_cache=False,
        generator=torch.Generator().manual_seed(7),
    )
    assert fast.shape == (3, 16)
    assert torch.equal(fast[:, :4], prompt)
    assert torch.equal(fast, slow)


def test_greedy_generation_follows_argmax():
    model = _gpt(positional="sinusoidal")
    prompt = torch.randint(4, 40, (2, 3))
    tokens = generate(model, prompt, 5, temperature=0)
    with torch.no_grad():
        logits = model(tokens[:, :-1])
    assert torch.equal(logits[:, 2:].argmax(-1), tokens[:, 3:])


def test_generate_keeps_training_mode_and_rejects_bad_input():
    model = _gpt()
    model.train()
    generate(model, torch.full((1, 1), BOS), 2)
    assert model.training
    with pytest.raises(
        ValueError, match=r"non-empty \(batch, length\) tensor, got shape \(0, 3\)"
    ):
        generate(model, torch.zeros(0, 3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="exceeds max_len 40"):
        generate(model, torch.full((1, 30), BOS), 11)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):
        generate(model, torch.full((1, 3), BOS), -1)


def _seq2seq() -> EncoderDecoder:
    config = TransformerConfig(
        vocab_size=30,
        d_model=32,
        num_heads=4,
        num_layers=1,
        d_ff=64,
        max_len=30,
        dropout=0.0,
    )
    return EncoderDecoder(config).eval()


def test_translate_pads_after_eos_and_scores_consistently():
    model = _seq2seq()
    with torch.no_grad():  # make EOS likely so rows end at different times
        model.head.weight[EOS] += 0.15
    src = torch.randint(4, 30, (6, 5))
    src[2, 3:] = PAD
    generator = torch.Generator().manual_seed(3)
    tokens = translate(
        model, src, BOS, EOS, PAD, max_len=12, temperature=1.0, generator=generator
    )
    assert tokens.shape[0] == 6 and tokens.shape[1] <= 13
    assert torch.all(tokens[:, 0] == BOS)
    mask = target_mask(tokens, EOS, PAD)
    for row, keep in zip(tokens[:, 1:], mask, strict=True):
        ended = (row == EOS).nonzero()
        if len(ended):
            first = int(ended[0])
            assert keep[: first + 1].all() and not keep[first + 1 :].any()
            assert torch.all(row[first + 1 :] == PAD)
    logp, counts = sequence_log_probs(model, src, tokens, EOS, PAD)
    assert torch.equal(counts, mask.sum(1))
    # PAD and BOS are never sampled, so every row holds real tokens up to its first EOS
    assert not (tokens[:, 1:][mask] == PAD).any() and not (tokens[:, 1:] == BOS).any()
    # the same numbers by hand, one row at a time, over the policy's vocabulary (no PAD, no BOS)
    for b in range(6):
        n = int(counts[b])
        with torch.no_grad():
            logits = model(src[b : b + 1], tokens[b : b + 1, :n])[0]
        logits[:, [PAD, BOS]] = float("-inf")
        manual = F.log_softmax(logits, -1).gather(-1, tokens[b, 1 : n + 1, None]).sum()
        assert torch.allclose(logp[b], manual, atol=1e-4)
    assert logp.requires_grad


def test_per_token_log_probs_and_sampling_time_log_probs_agree():
    model = _seq2seq()
    with torch.no_grad():
        model.head.weight[EOS] += 0.15
    src = torch.randint(4, 30, (5, 4))
    generator = torch.Generator().manual_seed(4)
    sampled, at_sampling = translate(
        model, src, BOS, EOS, PAD, 10, 1.0, generator=generator, return_log_probs=True
    )
    again = translate(
        model, src, BOS, EOS, PAD, 10, 1.0, generator=torch.Generator().manual_seed(4)
    )
    assert torch.equal(sampled, again)  # asking for log-probs changes no draw
    sums, counts = sequence_log_probs(model, src, sampled, EOS, PAD)
    terms, mask = sequence_log_probs(model, src, sampled, EOS, PAD, per_token=True)
    assert terms.shape == mask.shape == at_sampling.shape == (5, sampled.shape[1] - 1)
    assert torch.equal(mask, target_mask(sampled, EOS, PAD))
    assert torch.equal(mask.sum(1), counts) and torch.allclose(terms.sum(1), sums)
    assert torch.all(terms[~mask] == 0) and torch.all(at_sampling[~mask] == 0)
    # the decoder's own log-probs are the teacher-forced ones (no dropout)
    assert torch.allclose(at_sampling, terms.detach(), atol=1e-5)
    assert bool((at_sampling[mask] < 0).all())
    with pytest.raises(ValueError, match="max_len"):
        translate(model, src, BOS, EOS, PAD, 0)


def test_sampling_and_scoring_use_the_same_policy():
    """The first sampled token's frequencies match exp(sequence_log_probs), even when the raw
    model puts most of its mass on PAD and BOS (which the policy forbids)."""
    model = _seq2seq()
    boost = torch.zeros(model.head.weight.shape[0])
    boost[[PAD, BOS]] = 8.0  # large PAD and BOS logits on every decoding path
    model.head.register_forward_hook(lambda module, inputs, output: output + boost)
    src = torch.randint(4, 30, (1, 5))
    draws = 4000
    tokens = translate(
        model,
        src.expand(draws, -1),
        BOS,
        EOS,
        PAD,
        max_len=1,
        temperature=1.0,
        generator=torch.Generator().manual_seed(0),
    )
    with (
        torch.no_grad()
    ):  # the raw model really prefers PAD/BOS: the test would catch an unmasked scorer
        raw = F.softmax(model(src, tokens[:1, :1])[0, 0], -1)
    assert raw[[PAD, BOS]].sum() > 0.9
    first = tokens[:, 1]
    assert not ((first == PAD) | (first == BOS)).any()
    vocab = model.head.weight.shape[0]
    candidates = torch.tensor([t for t in range(vocab) if t not in (PAD, BOS)])
    pairs = torch.stack(
        [torch.full_like(candidates, BOS), candidates], dim=1
    )  # (V - 2, 2): BOS, token
    with torch.no_grad():
        logp, _ = sequence_log_probs(
            model, src.expand(len(candidates), -1), pairs, EOS, PAD
        )
        forbidden, _ = sequence_log_probs(
            model, src, torch.tensor([[BOS, BOS]]), EOS, PAD
        )
    assert forbidden.item() == float("-inf")
    prob = torch.zeros(vocab, dtype=torch.float64)
    prob[candidates] = logp.exp().double()
    assert torch.isclose(prob.sum(), torch.tensor(1.0, dtype=torch.float64), atol=1e-5)
    counts = torch.bincount(first, minlength=vocab).double()
    frequency = counts / draws
    se = (prob * (1 - prob) / draws).sqrt()
    z = ((frequency - prob).abs() / se)[candidates]
    assert z.max() < 5, (
        f"sampled frequencies differ from exp(sequence_log_probs) by {z.max():.1f} SE"
    )


def test_greedy_translation_is_deterministic_and_rejects_empty_sources():
    model = _seq2seq()
    src = torch.randint(4, 30, (2, 5))
    a = translate(model, src, BOS, EOS, PAD, max_len=8)
    assert torch.equal(a, translate(model, src, BOS, EOS, PAD, max_len=8))
    bad = src.clone()
    bad[1] = PAD
    with pytest.raises(ValueError, match=r"source rows \[1\] are empty"):
        translate(model, bad, BOS, EOS, PAD, max_len=8)
    with pytest.raises(ValueError, match="non-empty"):
        translate(model, src[:0], BOS, EOS, PAD, max_len=8)


def test_target_mask_by_hand():
    tokens = torch.tensor(
        [[BOS, 5, 6, EOS, PAD], [BOS, 7, EOS, 8, EOS], [BOS, 5, 6, 7, 8]]
    )
    assert target_mask(tokens, EOS, PAD).tolist() == [
        [True, True, True, False],
        [True, True, False, False],
        [True, True, True, True],
    ]


def test_sampled_translations_never_contain_padding_or_bos_before_eos():
    """A sampled PAD would end a row silently and its log-probability would not match the sample."""
    from lmpg_utils.generation import target_mask, translate
    from lmpg_utils.transformer import EncoderDecoder, TransformerConfig

    torch.manual_seed(0)
    model = EncoderDecoder(
        TransformerConfig(
            vocab_size=12, d_model=16, num_heads=2, num_layers=1, d_ff=32, dropout=0.0
        )
    )
    src = torch.randint(4, 12, (64, 5))
    out = translate(
        model,
        src,
        bos_id=2,
        eos_id=3,
        pad_id=0,
        max_len=12,
        temperature=2.0,
        generator=torch.Generator().manual_seed(0),
    )
    body = out[:, 1:]
    valid = target_mask(out, eos_id=3, pad_id=0)
    ended = (body == 3).cumsum(1) > 0
    assert not bool(((body == 0) & ~ended).any())  # no PAD before the EOS
    assert not bool((body == 2).any())  # BOS is never generated
    assert bool((valid.sum(1) > 0).all())


def _tiny_gpt(seed: int = 0):
    from lmpg_utils.transformer import GPT, TransformerConfig

    torch.manual_seed(seed)
    return GPT(TransformerConfig(vocab_size=12, d_model=16, num_heads=2, num_layers=1,
                                 d_ff=32, max_len=16, dropout=0.0)).eval()  # fmt: skip


def test_sampled_continuations_are_scored_by_the_same_policy():
    from lmpg_utils.generation import continuation_log_probs, sample_continuations

    model = _tiny_gpt()
    prompts = torch.tensor([[1, 5, 6], [1, 7, 8], [1, 9, 4]])
    generator = torch.Generator().manual_seed(0)
    tokens, log_probs, mask = sample_continuations(
        model, prompts, 8, eos_id=2, pad_id=0, forbidden=(1,), generator=generator
    )
    assert tokens.shape == log_probs.shape == mask.shape and tokens.shape[0] == 3
    assert not bool(((tokens == 1) | ((tokens == 0) & mask)).any())  # never BOS/PAD
    for row in range(3):  # mask: up to and including the first EOS, PAD after it
        ends = (tokens[row] == 2).nonzero()
        length = int(ends[0]) + 1 if len(ends) else tokens.shape[1]
        assert mask[row].tolist() == [True] * length + [False] * (
            tokens.shape[1] - length
        )
        assert bool((tokens[row, length:] == 0).all())
    scored = continuation_log_probs(
        model, prompts, tokens, mask, pad_id=0, forbidden=(1,)
    )
    assert torch.allclose(scored, log_probs, atol=1e-5)
    assert bool((log_probs[~mask] == 0).all()) and bool((log_probs[mask] < 0).all())
    scored.sum().backward()  # differentiable, and finite despite PAD after EOS
    assert all(
        torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None
    )


def test_sampling_continuations_rejects_what_does_not_fit():
    from lmpg_utils.generation import sample_continuations

    model = _tiny_gpt()
    with pytest.raises(ValueError, match="max_len"):
        sample_continuations(model, torch.ones(2, 10, dtype=torch.long), 8, 2, 0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        sample_continuations(model, torch.ones(2, 3, dtype=torch.long), 0, 2, 0)
