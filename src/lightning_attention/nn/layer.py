"""LightningAttention: the token-mixing layer of MiniMax-Text-01 / TransNormerLLM, on the library's ops.

Per token x ``[hidden]`` (shapes for a batch ``[B, T, ...]``)::

    q, k, v = split(act(x W_qkv))                       W_qkv [hidden, H * 3D]; per head the columns are q | k | v
    o       = lightning_attention(q, k, v, g_gamma)     [B, T, H, D], decay exp(g_gamma[h]) from decay.g_gamma
    y       = (RMSNorm(o over all H * D heads) * sigmoid(x W_gate)) W_out      [B, T, hidden]

Parameter names and shapes (``qkv_proj``, ``output_gate``, ``norm``, ``out_proj``) are those of transformers'
``MiniMaxLightningAttention``, so its weights load unchanged. The attention itself is only ever computed by
:func:`lightning_attention.ops.chunk_simple_gla` (training, prefill) and
:func:`lightning_attention.ops.fused_recurrent_simple_gla` (continuing from a cached state: decoding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_attention import decay
from lightning_attention._validation import shape_str
from lightning_attention.nn.cache import LightningCache
from lightning_attention.ops import chunk_simple_gla, fused_recurrent_simple_gla

__all__ = ["LightningAttention", "RMSNorm", "ACTIVATIONS"]

#: Activations applied to the fused q, k, v projection (MiniMax uses SiLU).
ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu, "identity": lambda x: x}


class RMSNorm(nn.Module):
    """``weight * (x / sqrt(mean(x^2) + eps))`` over the last dim. Statistics in float32 (float64 for float64),
    the normalised value cast back to x's dtype before the weight (as transformers' ``MiniMaxRMSNorm``, so bf16
    models agree)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, device=None, dtype=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = x.to(torch.promote_types(x.dtype, torch.float32))
        normed = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def _pack_plan(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For a ``[B, T]`` padding mask (nonzero = real token): flat indices of the real tokens in ``B * T`` order,
    and int32 ``cu_seqlens [B + 1]`` of the packed rows."""
    keep = attention_mask.reshape(-1) != 0
    lengths = (attention_mask != 0).sum(1)
    cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    return keep.nonzero().squeeze(1), cu_seqlens


class LightningAttention(nn.Module):
    """Lightning Attention token mixer (MiniMax-Text-01 / TransNormerLLM layer).

    Args:
        hidden_size: model width.
        num_heads: H.
        head_dim: D per head (q, k and v); default ``hidden_size // num_heads``.
        layer_idx, num_layers: position of this layer in the model; they set the decay
            (:func:`lightning_attention.decay.g_gamma`).
        schedule: decay recipe, "minimax" (default, transformers' MiniMax numbers) or "tnl".
        scale: multiplies ``q S``; default the schedule's (1 for "minimax", ``D ** -0.5`` for "tnl").
        activation: applied to the fused qkv projection, one of :data:`ACTIVATIONS` (default "silu").
        chunk_size: tokens per chunk of the chunked op.
        backend: "auto" (Triton kernels on CUDA, torch elsewhere), "torch" or "triton".
        norm_eps: epsilon of the RMSNorm over all heads.
        device, dtype: where and in which dtype to create the parameters.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int | None = None,
        layer_idx: int = 0,
        num_layers: int = 1,
        *,
        schedule: str = "minimax",
        scale: float | None = None,
        activation: str = "silu",
        chunk_size: int = 64,
        backend: str = "auto",
        norm_eps: float = 1e-6,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if head_dim is None:
            if hidden_size % num_heads:
                raise ValueError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}: pass head_dim")
            head_dim = hidden_size // num_heads
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.hidden_size, self.num_heads, self.head_dim = hidden_size, num_heads, head_dim
        self.layer_idx, self.num_layers = layer_idx, num_layers
        self.schedule, self.activation = schedule, activation
        self.scale = decay.default_scale(schedule, head_dim) if scale is None else float(scale)
        self.chunk_size, self.backend = chunk_size, backend
        # Kept outside the module's buffers so that model.to(torch.bfloat16) cannot round the decay; copies
        # per device are made on first (eager) use.
        self._g_gamma_host = decay.g_gamma(num_heads, layer_idx, num_layers, schedule=schedule)
        self._g_gamma_on: dict[torch.device, torch.Tensor] = {}

        inner = num_heads * head_dim
        factory = {"device": device, "dtype": dtype}
        self.qkv_proj = nn.Linear(hidden_size, 3 * inner, bias=False, **factory)
        self.output_gate = nn.Linear(hidden_size, inner, bias=False, **factory)
        self.norm = RMSNorm(inner, eps=norm_eps, **factory)
        self.out_proj = nn.Linear(inner, hidden_size, bias=False, **factory)

    def g_gamma(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """This layer's per-head log-decay, float32 ``[H]`` on ``device`` (cached per device)."""
        device = torch.device(device)
        if torch.compiler.is_compiling():
            # Traced into the graph as a constant, never through the cache: dynamo would guard on the dict's
            # keys, and the next eager call filling it would force a recompile (seen on CUDA: 2 graphs, not 1).
            return decay.g_gamma(self.num_heads, self.layer_idx, self.num_layers, schedule=self.schedule, device=device)
        if device not in self._g_gamma_on:
            self._g_gamma_on[device] = self._g_gamma_host.to(device)
        return self._g_gamma_on[device]

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: LightningCache | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mix tokens.

        Args:
            hidden_states: ``[B, T, hidden]``.
            attention_mask: ``[B, T]`` padding mask (nonzero = real token) or None. Padded tokens, wherever they
                are (left, right or inside), are removed before the scan: they neither decay nor feed the state,
                and their output is zero.
            cache: a :class:`LightningCache`. The scan continues from this layer's cached state (the recurrent
                decode path) or from zero, and the new state ``[N, H, D, D]`` is stored back.
            cu_seqlens: int ``[N + 1]`` offsets of sequences packed along T (B == 1); not with attention_mask.

        Returns:
            ``[B, T, hidden]`` in hidden_states' dtype (or the autocast dtype).
        """
        if cache is not None and not isinstance(cache, LightningCache):
            raise TypeError(f"cache must be a LightningCache or None, got {type(cache).__name__}")
        initial_state = cache.get(self.layer_idx) if cache is not None else None
        out, final_state = self.forward_with_state(
            hidden_states, initial_state, attention_mask, cu_seqlens, output_final_state=cache is not None
        )
        if cache is not None:
            cache.update(self.layer_idx, final_state)
        return out

    def forward_with_state(
        self,
        hidden_states: torch.Tensor,
        initial_state: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        output_final_state: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`forward` with the state passed explicitly (for caches other than :class:`LightningCache`).

        ``initial_state``: ``[N, H, D, D]`` float32 (float64 for float64 inputs) or None (zero). Continuing from
        a state runs the recurrent op (decode path), starting from zero the chunked op. Returns
        ``(output [B, T, hidden], final_state [N, H, D, D] or None)``.
        """
        self._check_inputs(hidden_states, attention_mask, cu_seqlens)
        B, T, _ = hidden_states.shape
        H, D = self.num_heads, self.head_dim
        qkv = ACTIVATIONS[self.activation](self.qkv_proj(hidden_states)).view(B, T, H, 3, D)
        q, k, v = qkv.unbind(3)
        o, final_state = self._scan(q, k, v, initial_state, attention_mask, cu_seqlens, output_final_state)
        o = self.norm(o.reshape(B, T, H * D))
        return self.out_proj(torch.sigmoid(self.output_gate(hidden_states)) * o), final_state

    def _scan(self, q, k, v, initial_state, attention_mask, cu_seqlens, output_final_state):
        """q, k, v ``[B, T, H, D]`` -> ``(o [B, T, H, D], final_state)`` through the public ops."""
        g = self.g_gamma(q.device)
        if initial_state is None:
            options = {"chunk_size": self.chunk_size, "backend": self.backend}
            op = chunk_simple_gla
        else:
            options = {"backend": self.backend}
            op = fused_recurrent_simple_gla
        if attention_mask is not None and bool((attention_mask == 0).any()):
            # Zeroing padded tokens is not enough: a zero token still decays the state (it would shrink a cached
            # state, or the prompt's state under right padding). Packing each row's real tokens as one varlen
            # sequence keeps padding out of the scan wherever it is.
            B, T, H, D = q.shape
            index, cu_seqlens = _pack_plan(attention_mask)
            packed = [x.reshape(B * T, H, -1).index_select(0, index).unsqueeze(0) for x in (q, k, v)]
            o_packed, final_state = op(
                *packed, g_gamma=g, scale=self.scale, initial_state=initial_state,
                output_final_state=output_final_state, cu_seqlens=cu_seqlens, **options,
            )
            o = o_packed.new_zeros(B * T, H, v.shape[-1]).index_copy(0, index, o_packed[0])
            return o.view(B, T, H, -1), final_state
        return op(
            q, k, v, g_gamma=g, scale=self.scale, initial_state=initial_state,
            output_final_state=output_final_state, cu_seqlens=cu_seqlens, **options,
        )

    def _check_inputs(self, hidden_states, attention_mask, cu_seqlens) -> None:
        if not isinstance(hidden_states, torch.Tensor):
            raise TypeError(f"hidden_states must be a torch.Tensor, got {type(hidden_states).__name__}")
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(
                f"hidden_states must be [B, T, hidden_size={self.hidden_size}], got {shape_str(hidden_states)}"
            )
        if attention_mask is None:
            return
        if cu_seqlens is not None:
            raise ValueError("pass either attention_mask (padded batch) or cu_seqlens (packed batch), not both")
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"attention_mask must be a torch.Tensor or None, got {type(attention_mask).__name__}")
        if tuple(attention_mask.shape) != tuple(hidden_states.shape[:2]):
            raise ValueError(
                f"attention_mask must be [B, T] = {list(hidden_states.shape[:2])} (nonzero = real token), "
                f"got {shape_str(attention_mask)}"
            )
        if attention_mask.device != hidden_states.device:
            raise ValueError(f"attention_mask must be on {hidden_states.device}, got {shape_str(attention_mask)}")

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
            f"layer_idx={self.layer_idx}/{self.num_layers}, schedule={self.schedule!r}, scale={self.scale:g}, "
            f"activation={self.activation!r}, chunk_size={self.chunk_size}, backend={self.backend!r}"
        )
