"""Plumbing shared by the torch engines: layout, dtype, varlen, reverse and the initial-state term.

A torch engine only supplies ``scan_from_zero(q, k, v, g) -> (o, S)`` over dense ``[B, H, T, D]`` tensors in
the compute dtype, starting from a zero state, unscaled::

    o_t = sum_{j <= t} lam^(t - j) (q_t . k_j) v_j          S = sum_{j <= T} lam^(T - j) k_j^T v_j

Everything else of the scan contract (engines/base.py) is linear in S0 and added here in closed form::

    o_t   += lam^(t - 1 + offset) q_t S0           final = lam^T S0 + lam^(1 - offset) S
"""

from __future__ import annotations

from typing import Callable

import torch

DenseScan = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _scan_dense(scan_from_zero: DenseScan, q, k, v, g, state, state_offset, reverse):
    """q, k: [B, H, T, K]; v: [B, H, T, V] in the compute dtype; state [B, H, K, V] or None; g [H]."""
    if reverse:
        q, k, v = (x.flip(2) for x in (q, k, v))
    T = q.shape[2]
    o, final = scan_from_zero(q, k, v, g)
    g4 = g[None, :, None, None]
    final = final * torch.exp(g4 * (1 - state_offset))
    if state is not None:
        t = torch.arange(T, dtype=q.dtype, device=q.device)
        q_decay = torch.exp(g4 * (t[:, None] + state_offset))  # token t (0-based) has seen t + offset decays of S0
        o = o + (q * q_decay) @ state
        final = final + torch.exp(g4 * T) * state
    if reverse:
        o = o.flip(2)
    return o, final


def run_scan(scan_from_zero: DenseScan, q, k, v, g_gamma, scale, state, state_offset, reverse, cu_seqlens):
    """The scan contract of engines/base.py for a dense torch ``scan_from_zero``."""
    dtype = compute_dtype(q, k, v, state)
    out_dtype = q.dtype
    B, T, H, _ = q.shape
    V = v.shape[-1]
    g = g_gamma.to(dtype)
    q, k, v = (x.to(dtype).transpose(1, 2) for x in (q, k, v))  # [B, H, T, D]
    state = None if state is None else state.to(dtype)
    if cu_seqlens is None:
        o, final = _scan_dense(scan_from_zero, q, k, v, g, state, state_offset, reverse)
    else:
        bounds = cu_seqlens.tolist()
        o = q.new_empty(1, H, T, V)
        finals = []
        for n, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
            sl = slice(start, end)
            s0 = None if state is None else state[n : n + 1]
            o[:, :, sl], f_n = _scan_dense(scan_from_zero, q[:, :, sl], k[:, :, sl], v[:, :, sl], g, s0, state_offset, reverse)
            finals.append(f_n)
        final = torch.cat(finals)
    return (o * scale).transpose(1, 2).to(out_dtype).contiguous(), final
