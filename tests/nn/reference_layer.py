"""The LightningAttention layer's formula written out in float64, with the attention from the token-loop
reference (lightning_attention.reference), for tests of the layer and of the models built on it."""

from __future__ import annotations

import torch

from lightning_attention.nn.layer import ACTIVATIONS
from lightning_attention.reference import recurrent_reference


def float64_params(layer: torch.nn.Module, requires_grad: bool = False) -> dict[str, torch.Tensor]:
    return {
        name: p.detach().double().clone().requires_grad_(requires_grad) for name, p in layer.named_parameters()
    }


def reference_layer(layer, x, params=None, initial_state=None, cu_seqlens=None):
    """``x [B, T, hidden]`` -> ``(out [B, T, hidden], final_state [N, H, D, D])`` in float64.

    ``params``: float64 tensors by parameter name (default: the layer's, detached)."""
    p = float64_params(layer) if params is None else params
    x = x.double()
    B, T, _ = x.shape
    H, D = layer.num_heads, layer.head_dim
    qkv = ACTIVATIONS[layer.activation](x @ p["qkv_proj.weight"].T).view(B, T, H, 3 * D)
    q, k, v = qkv[..., :D], qkv[..., D : 2 * D], qkv[..., 2 * D :]
    state = None if initial_state is None else initial_state.double()
    o, final = recurrent_reference(
        q, k, v, layer.g_gamma().double(), layer.scale, state, output_final_state=True, cu_seqlens=cu_seqlens
    )
    o = o.reshape(B, T, H * D)
    normed = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + layer.norm.eps) * p["norm.weight"]
    gate = torch.sigmoid(x @ p["output_gate.weight"].T)
    return (gate * normed) @ p["out_proj.weight"].T, final
