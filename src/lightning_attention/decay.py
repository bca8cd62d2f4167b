"""Decay recipes: turn (num_heads, layer_idx, num_layers) into a per-head log-decay ``g_gamma``.

This is the one place where layer indices become numbers. Every engine takes ``g_gamma`` (natural-log
decay per head, float32 ``[H]``, all entries ``<= 0``); the decay applied per token is ``exp(g_gamma[h])``.

Schedules
---------
``"tnl"`` (default; TransNormerLLM, the same numbers as fla's lightning ops)::

    g_gamma[h] = -(8 / H) * (1 - layer_idx / num_layers) * h            h = 0..H-1

Head 0 has ``g = 0``: no decay, plain causal linear attention. Default scale ``K ** -0.5``.

``"minimax"`` (MiniMax-Text-01, transformers' ``MiniMaxLightningAttention``)::

    r = 2 ** (-8 / H)
    g_gamma[h] = -(r ** (h + 1)) * (1 - layer_idx / (num_layers - 1 + 1e-5) + 1e-5)

used with ``scale = 1`` (see :data:`DEFAULT_SCALE`).
"""

from __future__ import annotations

import torch

from lightning_attention._validation import mark_g_gamma_checked

__all__ = ["SCHEDULES", "DEFAULT_SCALE", "g_gamma", "default_scale"]

SCHEDULES = ("tnl", "minimax")

#: The scale each schedule is used with: ``None`` means ``head_dim ** -0.5``.
DEFAULT_SCALE = {"tnl": None, "minimax": 1.0}


def _check_schedule(schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")


def g_gamma(
    num_heads: int,
    layer_idx: int,
    num_layers: int,
    schedule: str = "tnl",
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Per-head natural-log decay for one layer.

    Args:
        num_heads: H >= 1.
        layer_idx: 0 <= layer_idx < num_layers.
        num_layers: total number of layers of the model, >= 1.
        schedule: one of :data:`SCHEDULES`.
        device: where to put the result.

    Returns:
        float32 tensor ``[H]`` with every entry ``<= 0``.
    """
    _check_schedule(schedule)
    for name, value in (("num_heads", num_heads), ("layer_idx", layer_idx), ("num_layers", num_layers)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if not 0 <= layer_idx < num_layers:
        raise ValueError(f"layer_idx must satisfy 0 <= layer_idx < num_layers={num_layers}, got {layer_idx}")

    heads = torch.arange(num_heads, dtype=torch.float64)
    if schedule == "tnl":
        g = -(8.0 / num_heads) * (1.0 - layer_idx / num_layers) * heads
    else:
        # Computed in float32 exactly as transformers does (base ** (h + 1), then * factor), so that our
        # decay is bit-identical to the checkpoints' reference implementation.
        base = 1 / (2 ** (8 / num_heads))
        rate = base ** (torch.arange(num_heads, dtype=torch.float32) + 1)
        factor = 1 - layer_idx / (num_layers - 1 + 1e-5) + 1e-5
        g = -(rate * factor)
    return mark_g_gamma_checked(g.to(dtype=torch.float32, device=device))


def default_scale(schedule: str, head_dim: int) -> float:
    """The scale a schedule is used with: ``head_dim ** -0.5`` for "tnl", ``1.0`` for "minimax"."""
    _check_schedule(schedule)
    scale = DEFAULT_SCALE[schedule]
    return head_dim**-0.5 if scale is None else scale
