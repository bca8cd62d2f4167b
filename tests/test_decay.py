"""Decay recipes: exact numbers of both schedules, the transformers MiniMax slope, and input validation."""

import math

import pytest
import torch

from lightning_attention import decay


LAYERS = [
    pytest.param(1, 0, 1, id="H1-L1"),
    pytest.param(8, 0, 8, id="H8-first-layer"),
    pytest.param(8, 7, 8, id="H8-last-layer"),
    pytest.param(16, 5, 24, id="H16-mid-layer"),
    pytest.param(64, 40, 80, id="H64-L80"),
]


@pytest.mark.parametrize("num_heads, layer_idx, num_layers", LAYERS)
def test_tnl_numbers(num_heads, layer_idx, num_layers):
    g = decay.g_gamma(num_heads, layer_idx, num_layers, schedule="tnl")
    expected = [-(8 / num_heads) * (1 - layer_idx / num_layers) * h for h in range(num_heads)]
    assert g.dtype == torch.float32 and g.shape == (num_heads,)
    torch.testing.assert_close(g, torch.tensor(expected, dtype=torch.float32), rtol=0, atol=0)
    assert g[0].item() == 0.0, "head 0 of the tnl schedule has no decay"
    assert bool((g <= 0).all())


@pytest.mark.parametrize("num_heads, layer_idx, num_layers", LAYERS)
def test_minimax_numbers(num_heads, layer_idx, num_layers):
    g = decay.g_gamma(num_heads, layer_idx, num_layers, schedule="minimax")
    r = 2 ** (-8 / num_heads)
    factor = 1 - layer_idx / (num_layers - 1 + 1e-5) + 1e-5
    expected = torch.tensor([-(r ** (h + 1)) * factor for h in range(num_heads)], dtype=torch.float64)
    assert g.dtype == torch.float32 and g.shape == (num_heads,)
    # The recipe is computed in float32 (like transformers): r's rounding error (half an ulp, 2**-24 relative)
    # is multiplied by the exponent h + 1, plus a couple of roundings of the power and the product.
    rel = ((g.double() - expected) / expected).abs()
    allowed = (torch.arange(num_heads, dtype=torch.float64) + 4) * 2.0**-24
    assert bool((rel <= allowed).all()), f"relative error {rel.max().item():.2e} above float32 rounding"
    assert bool((g < 0).all()), "every minimax head decays (the last layer keeps a 1e-5 factor)"


@pytest.mark.parametrize(
    "num_heads, layer_idx, num_layers",
    [
        pytest.param(8, 0, 4, id="H8-layer0"),
        pytest.param(8, 3, 4, id="H8-last-layer"),
        pytest.param(64, 17, 80, id="H64-L80"),
    ],
)
def test_minimax_matches_transformers(num_heads, layer_idx, num_layers):
    """Bit-identical to transformers' MiniMaxLightningAttention.get_slope_rate (built from a tiny config)."""
    pytest.importorskip("transformers")
    from transformers import MiniMaxConfig
    from transformers.models.minimax.modeling_minimax import MiniMaxLightningAttention

    head_dim = 4
    config = MiniMaxConfig(
        hidden_size=num_heads * head_dim,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        head_dim=head_dim,
        num_hidden_layers=num_layers,
        intermediate_size=8,
        block_size=16,
    )
    module = MiniMaxLightningAttention(config, layer_idx)
    slope = module.get_slope_rate().reshape(-1)  # transformers applies exp(-slope * n)
    g = decay.g_gamma(num_heads, layer_idx, num_layers, schedule="minimax")
    torch.testing.assert_close(g, -slope.to(torch.float32), rtol=0, atol=0)


@pytest.mark.parametrize(
    "schedule, head_dim, expected",
    [
        pytest.param("tnl", 64, 0.125, id="tnl-K64"),
        pytest.param("tnl", 128, 128**-0.5, id="tnl-K128"),
        pytest.param("minimax", 128, 1.0, id="minimax"),
    ],
)
def test_default_scale(schedule, head_dim, expected):
    assert math.isclose(decay.default_scale(schedule, head_dim), expected, rel_tol=0, abs_tol=0)


def test_device_argument():
    g = decay.g_gamma(4, 0, 2, device="meta")
    assert g.device.type == "meta" and g.dtype == torch.float32


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        pytest.param((0, 0, 4), {}, ValueError, "num_heads", id="H0"),
        pytest.param((-3, 0, 4), {}, ValueError, "num_heads", id="H-negative"),
        pytest.param((4, 0, 0), {}, ValueError, "num_layers", id="L0"),
        pytest.param((4, 4, 4), {}, ValueError, "layer_idx", id="layer-idx-too-large"),
        pytest.param((4, -1, 4), {}, ValueError, "layer_idx", id="layer-idx-negative"),
        pytest.param((4.0, 0, 4), {}, TypeError, "num_heads", id="H-float"),
        pytest.param((4, 0.5, 4), {}, TypeError, "layer_idx", id="layer-idx-float"),
        pytest.param((4, 0, "4"), {}, TypeError, "num_layers", id="L-str"),
        pytest.param((4, True, 4), {}, TypeError, "layer_idx", id="layer-idx-bool"),
        pytest.param((4, 0, 4), {"schedule": "lightning"}, ValueError, r"schedule.*'tnl', 'minimax'", id="schedule"),
    ],
)
def test_invalid_arguments(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        decay.g_gamma(*args, **kwargs)


def test_default_scale_unknown_schedule():
    with pytest.raises(ValueError, match=r"schedule.*'tnl', 'minimax'"):
        decay.default_scale("fla", 64)
