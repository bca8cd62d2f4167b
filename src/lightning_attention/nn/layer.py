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

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

from lightning_attention import decay
from lightning_attention._validation import check_initial_state, mark_g_gamma_checked, shape_str, state_dtype
from lightning_attention.engines import autocast_off
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

    def reset_parameters(self) -> None:
        """Weight back to ones (after ``to_empty()`` of a model built on the meta device)."""
        with torch.no_grad():
            self.weight.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = x.to(torch.promote_types(x.dtype, torch.float32))
        normed = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class _Shared:
    """Holds an object that copies of the module share rather than copy: a process group cannot be deep-copied
    (``copy.deepcopy(model)`` would fail)."""

    __slots__ = ("value",)

    def __init__(self, value) -> None:
        self.value = value

    def __deepcopy__(self, memo) -> _Shared:
        return self


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
        context_parallel_group: a ``torch.distributed`` process group to split the token axis over (context
            parallelism): each rank passes its consecutive slice ``[B, T_r, hidden]``, and every scan runs
            :func:`lightning_attention.distributed.context_parallel_simple_gla` (``cu_seqlens``, the whole packed
            axis's, and ``initial_state`` supported; ``attention_mask`` is not: pack with ``cu_seqlens``).
            None (default): the single-device ops. An attribute, so it can be set after construction.
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
        context_parallel_group=None,
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
        self._context_parallel_group = _Shared(context_parallel_group)
        # The decay is not a tensor of the module (no buffer, nothing in state_dict): it is computed from the
        # numbers above on first use per device. So model.to(torch.bfloat16) cannot round it, and a layer built
        # on the meta device (from_pretrained, FSDP2's meta init + to_empty()) has nothing left to fill.
        self._g_gamma_on: dict[tuple, torch.Tensor] = {}

        inner = num_heads * head_dim
        factory = {"device": device, "dtype": dtype}
        self.qkv_proj = nn.Linear(hidden_size, 3 * inner, bias=False, **factory)
        self.output_gate = nn.Linear(hidden_size, inner, bias=False, **factory)
        self.norm = RMSNorm(inner, eps=norm_eps, **factory)
        self.out_proj = nn.Linear(inner, hidden_size, bias=False, **factory)

    @property
    def context_parallel_group(self):
        """The process group the token axis is split over, or None (see the class docstring)."""
        return self._context_parallel_group.value

    @context_parallel_group.setter
    def context_parallel_group(self, group) -> None:
        self._context_parallel_group = _Shared(group)

    def reset_parameters(self) -> None:
        """Initialise the parameters as the constructor does (the projections as ``nn.Linear``, in the same order,
        so the same seed gives the same weights; the norm weight to ones). For a layer built on the meta device:
        ``layer.to_empty(device=...)`` then ``layer.reset_parameters()``."""
        for module in (self.qkv_proj, self.output_gate, self.norm, self.out_proj):
            module.reset_parameters()

    def g_gamma(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """This layer's per-head log-decay, float32 ``[H]`` on ``device`` (cached per device)."""
        device = torch.device(device)
        recipe = (self.num_heads, self.layer_idx, self.num_layers)
        if torch.compiler.is_compiling():
            # Traced into the graph as a constant, never through the cache: dynamo would guard on the dict's
            # keys, and the next eager call filling it would force a recompile (seen on CUDA: 2 graphs, not 1).
            return decay.g_gamma(*recipe, schedule=self.schedule, device=device)
        key = (device, *recipe, self.schedule)
        cached = self._g_gamma_on.get(key)
        if cached is None:
            # Computed on the host whatever the default device (a torch.device("meta") context included), so
            # every device gets the recipe's exact float32 numbers; marked as checked, so no op reads them back.
            with torch.device("cpu"):
                host = decay.g_gamma(*recipe, schedule=self.schedule)
            cached = mark_g_gamma_checked(host.to(device))
            if not isinstance(cached, FakeTensor):  # a fake tensor (FakeTensorMode) must not outlive its mode
                self._g_gamma_on[key] = cached
        return cached

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
                are (left, right or inside), never reach the state: they neither decay nor feed it, and their
                output is zero. Handled in tensor operations only (see :meth:`_scan_padded`): no host sync, one
                graph under torch.compile / torch.export.
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
        if self.context_parallel_group is not None:
            from lightning_attention.distributed import context_parallel_simple_gla

            if attention_mask is not None:
                raise ValueError(
                    "attention_mask is not supported with context_parallel_group: pack the sequences along T and "
                    "pass cu_seqlens (of the whole packed axis) instead"
                )
            return context_parallel_simple_gla(
                q, k, v, g_gamma=g, scale=self.scale, initial_state=initial_state,
                output_final_state=output_final_state, group=self.context_parallel_group, cu_seqlens=cu_seqlens,
                chunk_size=self.chunk_size, backend=self.backend,
            )  # fmt: skip
        if attention_mask is not None:
            return self._scan_padded(q, k, v, g, initial_state, attention_mask, output_final_state)
        return self._op(initial_state)(
            q, k, v, g_gamma=g, scale=self.scale, initial_state=initial_state,
            output_final_state=output_final_state, cu_seqlens=cu_seqlens,
        )

    def _op(self, initial_state):
        """The scan that starts from ``initial_state``: the chunked op from zero (training, prefill), the recurrent
        op from a cached state (decoding)."""
        if initial_state is None:
            return functools.partial(chunk_simple_gla, chunk_size=self.chunk_size, backend=self.backend)
        return functools.partial(fused_recurrent_simple_gla, backend=self.backend)

    def _scan_padded(self, q, k, v, g, initial_state, attention_mask, output_final_state):
        """The scan of a padded batch (``attention_mask [B, T]``, nonzero = real token), exact for padding anywhere
        (left, right, holes, all pads), with or without an initial state, in tensor operations only: no value of
        the mask is read on the host, so it is one graph under torch.compile and torch.export, and never syncs.

        Zeroing the padded tokens alone is not exact: a zero token still decays the state. But from a zero state,
        zero tokens *before* every real token leave the state at zero whatever their decay. So each row is
        reordered by a stable sort that puts its padding first and keeps its real tokens in order, the padded
        q, k, v are zeroed, and the scan runs from zero: its outputs and final state are those of the real tokens
        alone. An initial state ``h0 [N, H, K, V]`` cannot go through the scan (the padding would decay it); its
        part is added in closed form: the n-th real token of a row reads ``lam^n h0``, and the row's final state
        gains ``lam^L h0`` (L real tokens). Padded positions output zero.
        """
        if initial_state is not None:
            check_initial_state(initial_state, q, v, q.shape[0])
        real = attention_mask != 0
        order = torch.argsort(real.to(torch.int32), dim=1, stable=True)  # [B, T]: padding first, then real tokens
        real_sorted = torch.gather(real, 1, order)[..., None, None]

        def sort(x):
            x = torch.gather(x, 1, order[..., None, None].expand_as(x))
            return torch.where(real_sorted, x, torch.zeros((), dtype=x.dtype, device=x.device))

        o_sorted, final_state = self._op(None)(
            sort(q), sort(k), sort(v), g_gamma=g, scale=self.scale, output_final_state=output_final_state
        )
        o = torch.gather(o_sorted, 1, torch.argsort(order, dim=1)[..., None, None].expand_as(o_sorted))
        if initial_state is None:
            return o, final_state
        # h0's part in the state dtype (float32, float64 for float64 inputs; autocast off, as in the ops):
        # lam^n = exp(g * n).
        wide = state_dtype(q)
        with autocast_off(q.device):
            seen = real.cumsum(1)  # [B, T]: real tokens up to and including t
            lam_n = torch.exp(g.to(wide) * seen[..., None].to(wide))  # [B, T, H]
            q_h0 = torch.einsum("bthk,bhkv->bthv", q.to(wide), initial_state.to(wide))  # [B, T, H, V]
            from_h0 = q_h0 * (self.scale * lam_n[..., None])
            from_h0 = torch.where(real[..., None, None], from_h0, torch.zeros((), dtype=wide, device=q.device))
            o = (o.to(wide) + from_h0).to(o.dtype)
            if final_state is not None:
                lam_total = torch.exp(g.to(wide) * real.sum(1, keepdim=True).to(wide))  # [B, H]
                final_state = final_state + lam_total[..., None, None] * initial_state
        return o, final_state

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
