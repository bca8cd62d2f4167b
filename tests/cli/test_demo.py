"""``python -m lightning_attention demo`` end to end with a tiny model, and the checks it relies on."""

import sys

import pytest
import torch

from lightning_attention.__main__ import main
from lightning_attention.cli import demo
from lightning_attention.models import LightningLM, LMConfig

# A tiny model that still learns context in about a second on 2 cores: 200 steps reach ~17% below the unigram
# baseline (a model without context cannot go below it at all); the demo's own bar is 10%.
TINY = [
    "--layers", "1", "--hidden", "64", "--heads", "2", "--batch-size", "16", "--seq-len", "32", "--lr", "2e-2",
    "--eval-tokens", "4096", "--sample-tokens", "16", "--no-progress",
]


@pytest.mark.parametrize(
    "device", [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda-bf16-triton", marks=pytest.mark.gpu)]
)
def test_demo_end_to_end(tmp_path, capsys, device):
    checkpoint = tmp_path / "out" / "lm.pt"
    code = main(["demo", *TINY, "--device", device, "--steps", "200", "--checkpoint", str(checkpoint)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "demo OK" in out and "decode path vs chunked forward: max |diff|" in out
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["val_loss"] < 0.9 * saved["unigram_loss"] and len(saved["train_losses"]) == 200
    model = LightningLM.from_checkpoint(saved)
    assert model.config.hidden_size == 64 and model.config.num_layers == 1
    assert (tmp_path / "out" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_fails_loudly_when_the_model_did_not_learn(tmp_path, capsys):
    paths = ["--checkpoint", str(tmp_path / "lm.pt"), "--plot", str(tmp_path / "p.png")]
    code = main(["demo", *TINY, "--device", "cpu", "--steps", "1", *paths])
    err = capsys.readouterr().err
    assert code == 1
    assert "demo FAILED" in err and "did not learn" in err


def test_decode_check_passes_on_the_decode_path_and_catches_an_error():
    torch.manual_seed(0)
    model = LightningLM(LMConfig(hidden_size=32, num_layers=2, num_heads=2, chunk_size=16, backend="torch")).eval()
    prompt = torch.randint(0, 256, (1, 21), generator=torch.Generator().manual_seed(1))
    out = model.generate(prompt, 40, temperature=0.0)
    check = demo.check_decode_path(model, out.tokens, out.logits, torch.float32)
    assert check.passed and check.max_abs_diff < 1e-4
    # A decode path that lost one token's worth of state in the middle (what a wrong decay power does) must fail.
    broken = out.logits.clone()
    broken[:, 20:] += 1e-3 * broken[:, 20:].abs().max()
    assert not demo.check_decode_path(model, out.tokens, broken, torch.float32).passed


def test_plot_is_skipped_without_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert demo.save_plot(tmp_path / "loss.png", [3.0, 2.0], 2.0, 3.0) is False
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert not (tmp_path / "loss.png").exists()


@pytest.mark.parametrize("step, expected", [pytest.param(0, 0.1, id="warmup-start"), pytest.param(9, 1.0, id="peak"),
                                            pytest.param(99, 0.1, id="end")])
def test_learning_rate_schedule(step, expected):
    assert demo._lr_at(step, 100, 1.0) == pytest.approx(expected, abs=1e-3)
