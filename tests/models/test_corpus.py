"""The demo corpus: pydoc topics as bytes, the held-out split, training windows and the unigram baseline."""

import math

import pytest
import torch

from lightning_attention.models import corpus


def test_pydoc_topics_text_is_the_documented_corpus():
    text = corpus.pydoc_topics_text()
    assert len(text) > 400_000
    assert "The \"with\" statement" in text or "with statement" in text
    assert text == corpus.pydoc_topics_text(), "deterministic order"


@pytest.mark.parametrize(
    "text", [pytest.param("def f(x):\n    return x", id="ascii"), pytest.param("λ → ∞", id="utf8")]
)
def test_encode_decode_round_trip(text):
    ids = corpus.encode(text)
    assert ids.dtype == torch.int64 and int(ids.max()) < 256 and len(ids) == len(text.encode())
    assert corpus.decode(ids) == text


def test_split_holdout_is_a_contiguous_tail():
    tokens = torch.arange(1000)
    train, held_out = corpus.split_holdout(tokens, 0.1)
    assert len(held_out) == 100 and torch.equal(torch.cat([train, held_out]), tokens)
    with pytest.raises(ValueError, match="holdout_fraction"):
        corpus.split_holdout(tokens, 1.0)


def test_random_windows_targets_are_next_tokens():
    tokens = torch.arange(500)
    inputs, targets = corpus.random_windows(tokens, 6, 32, torch.Generator().manual_seed(0))
    assert inputs.shape == targets.shape == (6, 32)
    assert torch.equal(targets, inputs + 1)
    with pytest.raises(ValueError, match="seq_len"):
        corpus.random_windows(tokens[:10], 2, 10, torch.Generator())


def test_unigram_loss_by_hand():
    train, held_out = torch.tensor([0, 0, 1]), torch.tensor([0, 1])
    # add-one smoothed counts over a vocabulary of 4: [3, 2, 1, 1] / 7
    expected = -(math.log(3 / 7) + math.log(2 / 7)) / 2
    assert corpus.unigram_loss(train, held_out, vocab_size=4) == pytest.approx(expected, rel=1e-12)
