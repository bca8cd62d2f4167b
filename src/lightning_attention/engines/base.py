"""The scan primitive every engine implements, and the forward/backward algebra built on it.

A *scan* computes, per sequence and head, with ``lam = exp(g)`` and 1-based positions t = 1..T::

    S_t   = lam^(t - 1 + state_offset) S0 + sum_{j <= t} lam^(t - j) k_j^T v_j
    o_t   = scale * q_t S_t
    final = lam^T S0 + lam^(1 - state_offset) * sum_{j <= T} lam^(T - j) k_j^T v_j

``state_offset = 1`` is the forward convention (S0 = h0 is decayed once before the first token, and
``final = S_T``). ``state_offset = 0`` is the backward's: dS_T (``dht``) enters undecayed, and ``final`` is
the state gradient decayed once more, which is exactly ``dh0`` (and ``dht`` itself for an empty sequence).
``reverse=True`` runs t = T..1 (per sequence with ``cu_seqlens``).

Backward of ``o, final = scan(q, k, v, h0, offset=1)`` with upstream ``do``, ``dht`` (design notes)::

    D_t = lam D_{t+1} + scale q_t^T do_t,  D_T = dht + scale q_T^T do_T
    dq  = scan(do, v, k, h0^T, offset=1, scale)                  (dq_t = scale do_t S_t^T)
    dv, dh0 = scan(k, scale*q, do, dht,   offset=0, 1, reversed) (dv_t = k_t D_t, dh0 = lam D_1)
    dk  = scan(v, do, scale*q, dht^T, offset=0, 1, reversed)     (dk_t = D_t v_t)

Shapes: q, k ``[B, T, H, K]``, v ``[B, T, H, V]``, g_gamma float32 ``[H]``, S0 ``[N, H, K, V]`` or None,
cu_seqlens int ``[N + 1]`` or None (then N = B). ``o`` has q's dtype, ``final`` the state dtype.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from lightning_attention._validation import ScanConfig

__all__ = ["Scan", "Engine", "ScanEngine", "LengthRoutedEngine", "tokens_per_sequence"]


class Scan(Protocol):
    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        g_gamma: torch.Tensor,
        scale: float,
        state: torch.Tensor | None,
        state_offset: int,
        reverse: bool,
        cu_seqlens: torch.Tensor | None,
        chunk_size: int,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


class Engine(Protocol):
    """What ops.py calls: forward returns (o, final_state); backward returns (dq, dk, dv, dh0 or None).

    An engine may also define ``forward_saving(...)`` (forward's arguments) returning ``(o, final_state, saved)``
    and accept ``backward(..., saved=saved)``: ``saved`` (a tensor or None) is a result of the forward that the
    backward would otherwise compute again. ops.py's eager path keeps it between the two; the backward must give
    the same result without it (the torch.compile custom ops save nothing)."""

    def forward(self, q, k, v, g_gamma, cfg: ScanConfig, initial_state, cu_seqlens): ...

    def backward(self, q, k, v, g_gamma, cfg: ScanConfig, initial_state, cu_seqlens, do, dht): ...


def transpose_state(state: torch.Tensor | None) -> torch.Tensor | None:
    return None if state is None else state.transpose(-1, -2)


class ScanEngine:
    """An engine made of one scan function: the forward is one scan, the backward three."""

    def __init__(self, scan: Callable[..., tuple[torch.Tensor, torch.Tensor]]):
        self.scan = scan

    def forward(self, q, k, v, g_gamma, cfg: ScanConfig, initial_state, cu_seqlens):
        return self.scan(q, k, v, g_gamma, cfg.scale, initial_state, 1, cfg.reverse, cu_seqlens, cfg.chunk_size)

    def backward(self, q, k, v, g_gamma, cfg: ScanConfig, initial_state, cu_seqlens, do, dht):
        scan, C = self.scan, cfg.chunk_size
        dq, _ = scan(do, v, k, g_gamma, cfg.scale, transpose_state(initial_state), 1, cfg.reverse, cu_seqlens, C)
        # Scale q once (in the state dtype) so the state-gradient scans carry scale inside D, as D_t does.
        q_scaled = q.to(torch.promote_types(q.dtype, torch.float32)) * cfg.scale
        dv, dh0 = scan(k, q_scaled, do, g_gamma, 1.0, dht, 0, not cfg.reverse, cu_seqlens, C)
        dk, _ = scan(v, do, q_scaled, g_gamma, 1.0, transpose_state(dht), 0, not cfg.reverse, cu_seqlens, C)
        return dq, dk, dv, (dh0 if initial_state is not None else None)


def tokens_per_sequence(q: torch.Tensor, cu_seqlens: torch.Tensor | None) -> float:
    """Mean tokens per sequence, from shapes only (no device sync): T, or T / N for packed sequences."""
    if cu_seqlens is None:
        return q.shape[1]
    return q.shape[1] / max(cu_seqlens.numel() - 1, 1)


class LengthRoutedEngine:
    """The recurrent op's rule: a token-loop engine for short sequences, the chunked engine above a threshold
    (same math, same results within rounding), so a long prompt through the recurrent op costs what the chunked
    op costs. The threshold is read at call time (``max_tokens()``), in mean tokens per sequence."""

    def __init__(self, short: Engine, long: Engine, max_tokens: Callable[[], float]):
        self.short, self.long, self.max_tokens = short, long, max_tokens

    def pick(self, q: torch.Tensor, cu_seqlens: torch.Tensor | None) -> Engine:
        return self.short if tokens_per_sequence(q, cu_seqlens) <= self.max_tokens() else self.long

    def forward(self, q, k, v, g_gamma, cfg: ScanConfig, initial_state, cu_seqlens):
        return self.pick(q, cu_seqlens).forward(q, k, v, g_gamma, cfg, initial_state, cu_seqlens)

    def backward(self, q, k, v, g_gamma, cfg: ScanConfig, initial_state, cu_seqlens, do, dht):
        return self.pick(q, cu_seqlens).backward(q, k, v, g_gamma, cfg, initial_state, cu_seqlens, do, dht)
