"""Run transformers' MiniMax models (``MiniMaxForCausalLM``, ``MiniMaxModel``, ...) on lightning-attention.

One call, ``use_lightning_attention(model)``, swaps every ``MiniMaxLightningAttention`` of the model for a
:class:`MiniMaxLightningAttentionAdapter`: our :class:`~lightning_attention.nn.LightningAttention` layer with
transformers' call signature, holding the *same* parameter objects (so optimizers, tied weights and
``state_dict()`` parameter names are unchanged) and reading/writing the per-layer state of transformers'
``MiniMaxCache``. Forward, backward and ``generate()`` then run the chunked op for prompts and the recurrent
op for decoding steps; full-attention layers, MoE blocks and everything else are left as they are.

Differences from transformers' own layer: states are float32 whatever the model dtype (transformers keeps them
in the activations' dtype), padding inside a chunk that continues from a cache is dropped instead of decaying the
state, and the constant decay buffers (``slope_rate``, ``query_decay``, ...) are not kept: they are recomputed
from the config by transformers when a saved model is loaded back.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_attention.nn.layer import LightningAttention

__all__ = ["use_lightning_attention", "MiniMaxLightningAttentionAdapter"]

# transformers' activation names -> ours (ACT2FN's "gelu" is the exact erf form, as F.gelu).
_HF_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "relu": "relu", "linear": "identity"}


def _cached_state(cache, layer_idx: int) -> torch.Tensor | None:
    """The state a ``MiniMaxCache`` holds for ``layer_idx``; None before the layer's first step (transformers
    stores ``[]`` for layers it has not reached, and the cache may have fewer entries than layers)."""
    if cache is None:
        return None
    states = getattr(cache, "linear_cache", None)
    if states is None:
        raise TypeError(f"MiniMax linear-attention layers need a MiniMaxCache, got {type(cache).__name__}")
    state = states[layer_idx] if layer_idx < len(states) else None
    return state if isinstance(state, torch.Tensor) else None


class MiniMaxLightningAttentionAdapter(LightningAttention):
    """Drop-in replacement of transformers' ``MiniMaxLightningAttention`` (same parameters, signature, cache)."""

    layer_type = "linear_attention"

    def forward(  # type: ignore[override]  (transformers' signature, not LightningAttention's)
        self,
        hidden_states: torch.Tensor,
        position_embeddings=None,
        attention_mask: torch.Tensor | None = None,
        cache=None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``hidden_states [B, T, hidden]``, ``attention_mask`` ``[B, T]`` or None (transformers passes the 2D
        padding mask to linear-attention layers), ``cache`` a ``MiniMaxCache`` or None.
        Returns ``(output [B, T, hidden], state [B, H, D, D] or None)`` like transformers' layer."""
        if cache is None:
            cache = kwargs.get("past_key_values")
        out, state = self.forward_with_state(
            hidden_states, _cached_state(cache, self.layer_idx), attention_mask, output_final_state=cache is not None
        )
        if cache is not None:
            cache.set_linear_cache(self.layer_idx, state)
        return out, state

    @classmethod
    def from_minimax(cls, module: nn.Module, config, *, backend: str = "auto", chunk_size: int = 64):
        """Build the adapter around the parameters of a transformers ``MiniMaxLightningAttention``."""
        act = getattr(config, "hidden_act", "silu")
        if act not in _HF_ACTIVATIONS:
            raise ValueError(f"config.hidden_act={act!r} is not supported; supported: {sorted(_HF_ACTIVATIONS)}")
        adapter = cls(
            config.hidden_size,
            module.num_attention_heads,
            module.head_dim,
            module.layer_idx,
            module.num_hidden_layers,
            schedule="minimax",
            activation=_HF_ACTIVATIONS[act],
            chunk_size=chunk_size,
            backend=backend,
            norm_eps=module.norm.variance_epsilon,
            device="meta",
        )
        # assign=True adopts the very Parameter objects: nothing is copied, and references held elsewhere
        # (optimizers, tied or shared weights) stay valid.
        adapter.load_state_dict(dict(module.named_parameters()), strict=True, assign=True)
        return adapter.train(module.training)


def use_lightning_attention(model: nn.Module, *, backend: str = "auto", chunk_size: int = 64) -> nn.Module:
    """Make a transformers MiniMax model run its lightning-attention layers on lightning-attention's ops.

    Args:
        model: a transformers MiniMax model (``MiniMaxForCausalLM``, ``MiniMaxModel``, ...), modified in place.
        backend: "auto" (Triton kernels on CUDA, torch elsewhere), "torch" or "triton".
        chunk_size: tokens per chunk of the chunked op.

    Returns:
        ``model`` itself. Calling it again is a no-op (already adapted layers are kept).

    Raises:
        ValueError: the model has no MiniMax lightning-attention layer.
    """
    from transformers.models.minimax.modeling_minimax import MiniMaxLightningAttention

    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, MiniMaxLightningAttention)]
    already = any(isinstance(m, MiniMaxLightningAttentionAdapter) for m in model.modules())
    if not targets and not already:
        raise ValueError(f"model ({type(model).__name__}) has no MiniMaxLightningAttention layer to replace")
    config = model.config
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        adapter = MiniMaxLightningAttentionAdapter.from_minimax(module, config, backend=backend, chunk_size=chunk_size)
        setattr(parent, child, adapter)
    return model
