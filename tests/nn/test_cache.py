"""LightningCache: per-layer states, reordering for beam search, reset, bad updates."""

import pytest
import torch

from lightning_attention.nn import LightningAttention, LightningCache


def test_layers_fill_their_own_slots_and_size_is_constant():
    torch.manual_seed(0)
    layers = [LightningAttention(32, 4, layer_idx=i, num_layers=3, chunk_size=16, backend="torch") for i in range(3)]
    cache = LightningCache()
    x = torch.randn(2, 10, 32)
    for layer in layers:
        x = layer(x, cache=cache)
    assert len(cache) == 3 and all(i in cache for i in range(3))
    assert cache.num_sequences == 2
    size = cache.nbytes
    assert size == 3 * 2 * 4 * 8 * 8 * 4  # layers x N x H x K x V x float32
    for _ in range(5):
        y = torch.randn(2, 1, 32)
        for layer in layers:
            y = layer(y, cache=cache)
    assert cache.nbytes == size, "the state does not grow with the number of decoded tokens"


def test_select_reorders_every_layer():
    cache = LightningCache()
    states = {i: torch.randn(3, 2, 4, 4) for i in (0, 2)}
    for i, s in states.items():
        cache.update(i, s)
    cache.select(torch.tensor([2, 0, 0]))
    for i, s in states.items():
        assert torch.equal(cache.get(i), s[[2, 0, 0]])


def test_reset_and_empty():
    cache = LightningCache()
    assert cache.get(0) is None and cache.num_sequences is None and cache.nbytes == 0
    cache.update(0, torch.zeros(1, 1, 2, 2))
    cache.seen_tokens = 7
    cache.reset()
    assert len(cache) == 0 and cache.seen_tokens == 0 and cache.get(0) is None


@pytest.mark.parametrize(
    "state, match",
    [
        pytest.param(torch.zeros(2, 2, 2), r"\[N, H, K, V\]", id="3d"),
        pytest.param([0.0], r"\[N, H, K, V\]", id="not-a-tensor"),
        pytest.param(torch.zeros(3, 1, 2, 2), "sequences", id="other-batch"),
    ],
)
def test_bad_update_raises(state, match):
    cache = LightningCache()
    cache.update(0, torch.zeros(2, 1, 2, 2))
    with pytest.raises(ValueError, match=match):
        cache.update(0, state)
