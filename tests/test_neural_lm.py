"""Chapter 1's neural models: the cloze model never sees the word it predicts; losses count the right events."""

from __future__ import annotations

import pytest
import torch

from lmpg_utils.neural_lm import (
    BidirectionalLSTMCloze,
    LSTMLanguageModel,
    LSTMSizes,
    cloze_batch_loss,
    lm_batch_loss,
)
from lmpg_utils.tokenization import pad_batch

V = 40


def framed(rows):
    return pad_batch([[2, *r, 3] for r in rows], 0)


def test_lstm_log_probs_are_normalised_and_step_by_step_matches_whole_sequence():
    torch.manual_seed(0)
    model = LSTMLanguageModel(V, 16, 24, dropout=0.0, cutoffs=(10, 20)).eval()
    ids = framed([[5, 6, 7, 8]])
    with torch.no_grad():
        whole, _ = model(ids)
        assert torch.allclose(
            whole.exp().sum(-1), torch.ones(1, ids.shape[1]), atol=1e-5
        )
        state, steps = None, []
        for i in range(ids.shape[1]):
            out, state = model(ids[:, i : i + 1], state)
            steps.append(out)
    assert torch.allclose(torch.cat(steps, 1), whole, atol=1e-5)


def test_cloze_prediction_of_a_word_does_not_depend_on_that_word():
    torch.manual_seed(0)
    model = BidirectionalLSTMCloze(V, 16, 24, dropout=0.0, cutoffs=(10, 20)).eval()
    a = pad_batch([[2, 5, 6, 7, 8, 3], [2, 9, 10, 3]], 0)
    b = a.clone()
    b[0, 2] = 11  # change word 2 of the first sentence
    lengths = (a != 0).sum(1)
    with torch.no_grad():
        pa, pb = model(a, lengths), model(b, lengths)
    assert torch.allclose(
        pa[0, 1], pb[0, 1], atol=1e-6
    )  # prediction for position 2 unchanged
    assert not torch.allclose(pa[0, 0], pb[0, 0], atol=1e-4)  # its neighbours see it
    # Padding after a shorter sentence does not leak into its predictions.
    alone = model(pad_batch([[2, 9, 10, 3]], 0), torch.tensor([4]))
    with torch.no_grad():
        assert torch.allclose(alone[0], pa[1, :2], atol=1e-5)


def test_losses_count_words_and_end_markers_but_not_padding():
    lm = LSTMLanguageModel(V, 8, 16, cutoffs=(10, 20))
    cloze = BidirectionalLSTMCloze(V, 8, 8, cutoffs=(10, 20))
    batch = framed([[5, 6, 7], [8]])
    loss, events = lm_batch_loss(lm, batch)
    assert events == (3 + 1) + (1 + 1)  # words plus </s>
    loss, words = cloze_batch_loss(cloze, batch)
    assert words == 3 + 1 and torch.isfinite(loss)


def test_bad_input():
    with pytest.raises(ValueError, match="positive"):
        LSTMLanguageModel(0)
    with pytest.raises(ValueError, match="non-empty"):
        LSTMLanguageModel(V, 8, 8)(torch.zeros(0, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="length >= 3"):
        BidirectionalLSTMCloze(V, 8, 8)(torch.tensor([[2, 3]]), torch.tensor([2]))
    with pytest.raises(ValueError, match="d_hidden must be positive"):
        LSTMSizes(d_hidden=0)
    with pytest.raises(ValueError, match="dropout"):
        LSTMSizes(dropout=1.0)
