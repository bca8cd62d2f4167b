"""Run transformers' MiniMax models (``MiniMaxForCausalLM``, ``MiniMaxModel``, ...) on lightning-attention.

One call, ``use_lightning_attention(model)``, swaps every ``MiniMaxLightningAttention`` of the model for a
:class:`MiniMaxLightningAttentionAdapter`: our :class:`~lightning_attention.nn.LightningAttention` layer with
transformers' call signature and per-layer ``MiniMaxCache`` state. Forward, backward and ``generate()`` then run the
chunked op for prompts and the recurrent op for decoding steps; full-attention layers, MoE blocks and everything
else are left as they are. It can be applied to a built or loaded model, or inside construction (a subclass's
``post_init``), on the meta device included.

What transformers sees is its own layer: the adapter *is* a ``MiniMaxLightningAttention`` (a subclass), holding the
very parameter and buffer objects of the layer it replaces and its hooks. So ``state_dict()`` keys and values are the
stock model's (``slope_rate``, ``query_decay``, ``key_decay`` and ``diagonal_decay`` included: checkpoints load in
stock transformers and back), transformers' ``_init_weights`` fills those buffers after meta-device construction as
it does for its own layer, and ``output_attentions`` / ``_can_record_outputs`` record the adapter where they record
the stock layer. The computation never reads those buffers: the decay comes from the config
(:func:`lightning_attention.decay.g_gamma`, float32 whatever the model dtype).

Differences from transformers' own layer (docs/transformers.md): states, and the per-layer
``attentions`` output (which for linear attention is the layer's final state ``[B, H, D, D]``, as in transformers),
are float32 whatever the model dtype; padding never reaches the state (transformers zeroes padded tokens, which
still decay a cached state).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers.models.minimax.modeling_minimax import MiniMaxLightningAttention

from lightning_attention.nn.layer import LightningAttention

__all__ = ["use_lightning_attention", "MiniMaxLightningAttentionAdapter"]

# transformers' activation names -> ours (ACT2FN's "gelu" is the exact erf form, as F.gelu).
_HF_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "relu": "relu", "linear": "identity"}

# The torch hooks a module can carry (forward hooks are how transformers records outputs): the adapter takes over
# the replaced layer's, so hooks installed before the swap keep firing.
_HOOK_DICTS = (
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks",
)


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


class MiniMaxLightningAttentionAdapter(MiniMaxLightningAttention, LightningAttention):
    """Drop-in replacement of transformers' ``MiniMaxLightningAttention``: same class for transformers (a subclass),
    same parameters, buffers, signature and cache; the computation is :class:`LightningAttention`'s.

    transformers' class comes first in the bases only so that ``isinstance`` and transformers' own methods
    (``get_slope_rate``, ``decay_factors``: how its ``_init_weights`` fills the buffers) apply; its constructor is
    not run (this one builds :class:`LightningAttention`'s modules under the same names) and :meth:`forward` is
    overridden. Every other method comes from :class:`LightningAttention` (the two share no other name).

    Args: those of :class:`LightningAttention` (with ``schedule="minimax"``; transformers' names for the first five
    are ``hidden_size``, ``num_attention_heads``, ``head_dim``, ``layer_idx``, ``num_hidden_layers``), and
    ``block_size``, transformers' ``config.block_size`` (the length of its decay buffers).
    """

    layer_type = "linear_attention"
    #: transformers' checkpoint buffers, kept (same objects, same values) though the computation never reads them.
    _DECAY_BUFFERS = ("slope_rate", "query_decay", "key_decay", "diagonal_decay")

    def __init__(self, *args, block_size: int, **kwargs) -> None:
        LightningAttention.__init__(self, *args, schedule="minimax", **kwargs)
        # The attributes transformers' methods read.
        self.num_attention_heads, self.num_hidden_layers, self.block_size = self.num_heads, self.num_layers, block_size
        for name, value in zip(self._DECAY_BUFFERS, self._stock_decay_buffers(kwargs.get("device"))):
            self.register_buffer(name, value)

    def _stock_decay_buffers(self, device=None) -> tuple[torch.Tensor, ...]:
        """transformers' checkpoint buffers by transformers' own methods (so the numbers are its, bit for bit):
        ``slope_rate [H, 1, 1]``, ``query_decay`` and ``key_decay [H, block_size, 1]``,
        ``diagonal_decay [1, H, block_size, block_size]``."""
        if "device" in inspect.signature(self.get_slope_rate).parameters:
            slope_rate = self.get_slope_rate(device=device)
        else:  # older transformers (5.17) takes no device: its factors are computed on the CPU, then moved
            slope_rate = self.get_slope_rate()
        buffers = (slope_rate, *self.decay_factors(slope_rate))
        return buffers if device is None else tuple(buffer.to(device) for buffer in buffers)

    def reset_parameters(self) -> None:
        """:meth:`LightningAttention.reset_parameters`, and the checkpoint buffers recomputed (after ``to_empty()``
        of a model built on the meta device; transformers' ``init_weights()`` does the same for the buffers)."""
        super().reset_parameters()
        with torch.no_grad():
            for name, value in zip(self._DECAY_BUFFERS, self._stock_decay_buffers(self.slope_rate.device)):
                getattr(self, name).copy_(value)

    def forward(  # type: ignore[override]  (transformers' signature)
        self,
        hidden_states: torch.Tensor,
        position_embeddings=None,
        attention_mask: torch.Tensor | None = None,
        cache=None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``hidden_states [B, T, hidden]``, ``attention_mask`` ``[B, T]`` or None (transformers passes the 2D
        padding mask to linear-attention layers), ``cache`` (or ``past_key_values``) a ``MiniMaxCache`` or None.

        Returns ``(output [B, T, hidden], final state [B, H, D, D] float32)`` like transformers' layer (whose
        second output is what ``output_attentions`` records for linear-attention layers)."""
        if cache is None:
            cache = kwargs.get("past_key_values")
        out, state = self.forward_with_state(
            hidden_states, _cached_state(cache, self.layer_idx), attention_mask, output_final_state=True
        )
        if cache is not None:
            cache.set_linear_cache(self.layer_idx, state)
        return out, state

    @classmethod
    def from_minimax(cls, module: nn.Module, config, *, backend: str = "auto", chunk_size: int = 64):
        """The adapter of a transformers ``MiniMaxLightningAttention``: it adopts the module's parameters, buffers
        and hooks (the same objects: nothing is copied, and references held elsewhere, such as optimizers, tied
        weights or recording hooks, stay valid). Works on the meta device too."""
        act = getattr(config, "hidden_act", "silu")
        if act not in _HF_ACTIVATIONS:
            raise ValueError(f"config.hidden_act={act!r} is not supported; supported: {sorted(_HF_ACTIVATIONS)}")
        adapter = cls(
            config.hidden_size,
            module.num_attention_heads,
            module.head_dim,
            module.layer_idx,
            module.num_hidden_layers,
            block_size=module.block_size,
            activation=_HF_ACTIVATIONS[act],
            chunk_size=chunk_size,
            backend=backend,
            norm_eps=module.norm.variance_epsilon,
            device="meta",
        )
        adapter.load_state_dict(module.state_dict(keep_vars=True), strict=True, assign=True)
        for name in _HOOK_DICTS:
            setattr(adapter, name, getattr(module, name))
        return adapter.train(module.training)


def use_lightning_attention(model: nn.Module, *, backend: str = "auto", chunk_size: int = 64) -> nn.Module:
    """Make a transformers MiniMax model run its lightning-attention layers on lightning-attention's ops.

    Args:
        model: a transformers MiniMax model (``MiniMaxForCausalLM``, ``MiniMaxModel``, ...), modified in place:
            built, loaded, or still being constructed (e.g. from a subclass's ``post_init``), on any device
            including meta.
        backend: "auto" (Triton kernels on CUDA, torch elsewhere), "torch" or "triton".
        chunk_size: tokens per chunk of the chunked op.

    Returns:
        ``model`` itself. Calling it again is a no-op (already adapted layers are kept).

    Raises:
        ValueError: the model has no MiniMax lightning-attention layer.
    """
    targets = [
        (name, m) for name, m in model.named_modules()
        if isinstance(m, MiniMaxLightningAttention) and not isinstance(m, MiniMaxLightningAttentionAdapter)
    ]
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
