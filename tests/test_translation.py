"""Translation helpers: tokenizer, batching, MLE loss; and the decoding utilities they rely on."""

import pytest
import torch

from lmpg_utils.generation import sequence_log_probs, target_mask, translate
from lmpg_utils.tokenization import pad_batch
from lmpg_utils.transformer import EncoderDecoder, TransformerConfig
from lmpg_utils.translation import (
    EncodedPairs,
    mle_loss,
    teacher_forced_stats,
    train_tokenizer,
    translate_texts,
)

PAIRS = [
    ("Ich habe Hunger.", "I am hungry."),
    ("Das Haus ist groß.", "The house is big."),
    ("Wir gehen nach Hause.", "We are going home."),
    ("Er liest ein Buch.", "He is reading a book."),
    ("Sie trinkt Kaffee.", "She drinks coffee."),
] * 4


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(PAIRS, 120)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = TransformerConfig(
        vocab_size=len(tokenizer),
        d_model=32,
        num_heads=4,
        num_layers=1,
        d_ff=64,
        max_len=40,
        dropout=0.0,
    )
    return EncoderDecoder(config).eval()


def test_tokenizer_round_trip_both_languages(tokenizer):
    for de, en in PAIRS[:5]:
        assert tokenizer.decode(tokenizer.encode(de)) == de
        assert tokenizer.decode(tokenizer.encode(en)) == en


def test_encoded_pairs_and_batches(tokenizer):
    data = EncodedPairs.build(tokenizer, PAIRS)
    assert len(data) == len(PAIRS)
    assert (
        data.targets[0][0] == tokenizer.bos_id
        and data.targets[0][-1] == tokenizer.eos_id
    )
    src, tgt, idx = next(data.batches(3, torch.Generator().manual_seed(0)))
    assert src.shape[0] == tgt.shape[0] == len(idx) == 3
    with pytest.raises(ValueError, match="empty source"):
        EncodedPairs.build(tokenizer, [("", "hello")])
    with pytest.raises(ValueError, match="empty sequence"):
        pad_batch([[1, 2], []], 0)


def test_mle_loss_counts_tokens_and_matches_nll(tokenizer, model):
    data = EncodedPairs.build(tokenizer, PAIRS[:5])
    src, tgt, _ = data.batch(range(5))
    loss, count = mle_loss(model, src, tgt, tokenizer.pad_id, label_smoothing=0.0)
    assert count == int((tgt[:, 1:] != tokenizer.pad_id).sum())
    stats = teacher_forced_stats(model, data)
    assert stats["nll"] == pytest.approx(float(loss.detach()), rel=1e-4)
    with pytest.raises(ValueError, match="label_smoothing"):
        mle_loss(model, src, tgt, tokenizer.pad_id, label_smoothing=1.0)


def test_incremental_decoding_matches_teacher_forcing(tokenizer, model):
    data = EncodedPairs.build(tokenizer, PAIRS[:5])
    src, _, _ = data.batch(range(5))
    tokens = translate(
        model, src, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, max_len=8
    )
    # greedy decoding picks the argmax of the teacher-forced logits at every step before EOS
    logits = model(src, tokens[:, :-1], pad_id=tokenizer.pad_id)
    mask = target_mask(tokens, tokenizer.eos_id, tokenizer.pad_id)
    assert torch.equal(logits.argmax(-1)[mask], tokens[:, 1:][mask])


def test_sequence_log_prob_is_sum_of_step_log_probs(tokenizer, model):
    data = EncodedPairs.build(tokenizer, PAIRS[:3])
    src, _, _ = data.batch(range(3))
    g = torch.Generator().manual_seed(1)
    tokens = translate(
        model,
        src,
        tokenizer.bos_id,
        tokenizer.eos_id,
        tokenizer.pad_id,
        max_len=6,
        temperature=1.0,
        generator=g,
    )
    logp, counts = sequence_log_probs(
        model, src, tokens, tokenizer.eos_id, tokenizer.pad_id
    )
    forbidden = torch.tensor([tokenizer.pad_id, tokenizer.bos_id])
    for row in range(3):
        total, n = 0.0, 0
        for t in range(1, tokens.shape[1]):
            logits = model(
                src[row : row + 1], tokens[row : row + 1, :t], pad_id=tokenizer.pad_id
            )[0, -1]
            logits = logits.masked_fill(
                torch.isin(torch.arange(len(logits)), forbidden), float("-inf")
            )
            step = torch.log_softmax(
                logits, -1
            )  # the policy: PAD and BOS are never chosen
            total += float(step[tokens[row, t]].detach())
            n += 1
            if int(tokens[row, t]) == tokenizer.eos_id:
                break
        assert float(logp[row].detach()) == pytest.approx(total, abs=1e-4)
        assert int(counts[row]) == n


def test_translate_texts_and_empty_sources(tokenizer, model):
    data = EncodedPairs.build(tokenizer, PAIRS[:2])
    out = translate_texts(model, tokenizer, data.sources, max_len=5)
    assert len(out) == 2 and all(isinstance(s, str) for s in out)
    with pytest.raises(ValueError, match="no sources"):
        translate_texts(model, tokenizer, [], max_len=5)
    with pytest.raises(ValueError, match="empty"):
        translate(
            model,
            torch.full((2, 3), tokenizer.pad_id),
            tokenizer.bos_id,
            tokenizer.eos_id,
            tokenizer.pad_id,
            4,
        )


def test_token_batches_respect_the_budget_and_cover_an_epoch(tokenizer):
    data = EncodedPairs.build(tokenizer, PAIRS)
    longest = max(len(t) for t in data.targets)
    budget = 2 * longest
    batches = data.token_batches(budget, torch.Generator().manual_seed(0))
    seen = []
    while len(seen) < len(data):
        src, tgt, idx = next(batches)
        assert tgt.numel() <= budget and src.shape[0] == len(idx)
        seen += idx
    assert sorted(seen) == list(
        range(len(data))
    )  # the first epoch holds every pair once
    with pytest.raises(ValueError, match="longest target"):
        next(data.token_batches(longest - 1, torch.Generator()))


def test_long_pairs_are_dropped_and_counted(tokenizer):
    data = EncodedPairs.build(tokenizer, PAIRS, max_tokens=4)
    assert data.dropped > 0 and len(data) + data.dropped == len(PAIRS)
