"""LightningLM: decode-path generation equals one chunked forward, padded and packed batches, checkpoints."""

import pytest
import torch

from lightning_attention.models import LightningLM, LMConfig
from lightning_attention.testing import assert_rel_close

EXACT = 1e-10  # float64 end to end: only summation order differs (see tests/nn/test_layer.py)


def small_lm(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    config = LMConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, chunk_size=16, backend="torch")
    return LightningLM(config).to(dtype).eval()


def prompt_ids(B, T, seed=1):
    return torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("temperature", [pytest.param(0.0, id="greedy"), pytest.param(1.0, id="sampled")])
def test_generate_logits_equal_full_forward(temperature):
    model = small_lm()
    prompt = prompt_ids(2, 19)
    gen = torch.Generator().manual_seed(3)
    out = model.generate(prompt, 30, temperature=temperature, top_k=10, generator=gen)
    assert out.tokens.shape == (2, 49) and out.logits.shape == (2, 30, 64)
    assert torch.equal(out.tokens[:, :19], prompt)
    full = model(out.tokens[:, :-1])[:, 18:]
    assert_rel_close(out.logits, full, EXACT, "decode-path logits")
    if temperature == 0.0:
        assert torch.equal(out.tokens[:, 19:], out.logits.argmax(-1))


def test_left_padded_generate_equals_each_row_alone():
    model = small_lm()
    prompt = prompt_ids(2, 17)
    mask = torch.ones(2, 17, dtype=torch.long)
    mask[1, :8] = 0
    out = model.generate(prompt, 12, temperature=0.0, attention_mask=mask)
    for b, start in enumerate((0, 8)):
        alone = model.generate(prompt[b : b + 1, start:], 12, temperature=0.0)
        assert torch.equal(out.tokens[b, 17:], alone.tokens[0, 17 - start :])
        assert_rel_close(out.logits[b], alone.logits[0], EXACT, f"row {b} logits")


def test_packed_forward_equals_separate_forwards():
    model = small_lm()
    bounds = [0, 9, 30, 41]
    ids = prompt_ids(1, bounds[-1])
    packed = model(ids, cu_seqlens=torch.tensor(bounds))
    for start, end in zip(bounds[:-1], bounds[1:]):
        assert_rel_close(packed[:, start:end], model(ids[:, start:end]), EXACT, f"sequence {start}:{end}")


def test_checkpoint_round_trip(tmp_path):
    model = small_lm(torch.float32)
    ids = prompt_ids(1, 12)
    path = tmp_path / "lm.pt"
    torch.save(model.checkpoint(step=3), path)
    for source in (path, model.checkpoint()):
        loaded = LightningLM.from_checkpoint(source).eval()
        assert loaded.config == model.config
        assert torch.equal(loaded(ids), model(ids))
    assert torch.load(path, weights_only=True)["step"] == 3


def test_default_config_shape():
    config = LMConfig()
    assert (config.num_layers, config.hidden_size, config.vocab_size) == (4, 256, 256)
    assert config.mlp_size == 704 and config.mlp_size % 64 == 0


@pytest.mark.parametrize(
    "call, match",
    [
        pytest.param(lambda m: m(torch.zeros(5, dtype=torch.long)), r"\[B, T\]", id="1d-ids"),
        pytest.param(lambda m: m.generate(torch.zeros(1, 2, dtype=torch.long), -1), "max_new_tokens", id="negative"),
    ],
)
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call(small_lm())
