"""Chunked scan in torch (the fast CPU engine; also runs on CUDA tensors when Triton is absent).

Per chunk of C tokens (local i, j = 0..C-1, S the state entering the chunk), all chunks at once::

    O_intra = ((Q K^T) * M) V,    M_ij = lam^(i-j) if i >= j else 0       [B, H, N, C, V]
    A_n     = (diag(lam^(C-1-j)) K)^T V                                   chunk-local states [B, H, N, K, V]
    S_(n+1) = lam^C S_n + A_n                                             the only sequential step, N small
    O       = O_intra + diag(lam^(i+1)) Q S_n

The last partial chunk (T not a multiple of C) is the same computation with C = its length, so the final
state is decayed exactly T times and never touches padding. Memory: O(T * C + (T / C) * K * V) per head.
"""

from __future__ import annotations

import torch

from lightning_attention.engines.base import ScanEngine
from lightning_attention.engines.cpu._common import run_scan


def _decay_matrices(g: torch.Tensor, C: int):
    """M [H, C, C], q_decay = lam^(i+1) [H, C, 1], k_decay = lam^(C-1-j) [H, C, 1], lam^C [H, 1, 1]."""
    i = torch.arange(C, dtype=g.dtype, device=g.device)
    g3 = g[:, None, None]
    diff = i[:, None] - i[None, :]
    # Select, never multiply: exp(g * (i - j)) for i < j is exp(positive) and can be inf.
    mask = torch.where(diff >= 0, torch.exp(g3 * diff.clamp(min=0)), torch.zeros((), dtype=g.dtype, device=g.device))
    return mask, torch.exp(g3 * (i + 1)[:, None]), torch.exp(g3 * (C - 1 - i)[:, None]), torch.exp(g3 * C)


def _equal_chunks(q, k, v, g, C, state):
    """q, k: [B, H, N*C, K], v: [B, H, N*C, V]; state [B, H, K, V] entering the first chunk."""
    B, H, T, K = q.shape
    N = T // C
    qc, kc, vc = (x.reshape(B, H, N, C, x.shape[-1]) for x in (q, k, v))
    mask, q_decay, k_decay, chunk_decay = _decay_matrices(g, C)
    o = ((qc @ kc.transpose(-1, -2)) * mask[:, None]) @ vc
    local = (kc * k_decay[:, None]).transpose(-1, -2) @ vc  # [B, H, N, K, V]
    states = torch.empty_like(local)
    for n in range(N):
        states[:, :, n] = state
        state = chunk_decay * state + local[:, :, n]
    o = o + (qc * q_decay[:, None]) @ states
    return o.reshape(B, H, T, -1), state


def chunk_scan_from_zero(q, k, v, g, chunk_size: int = 64):
    B, H, T, K = q.shape
    state = q.new_zeros(B, H, K, v.shape[-1])
    full = T - T % chunk_size
    outs = []
    if full:
        o, state = _equal_chunks(q[:, :, :full], k[:, :, :full], v[:, :, :full], g, chunk_size, state)
        outs.append(o)
    if T > full:
        o, state = _equal_chunks(q[:, :, full:], k[:, :, full:], v[:, :, full:], g, T - full, state)
        outs.append(o)
    if not outs:
        return q.new_zeros(B, H, 0, v.shape[-1]), state
    return (torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]), state


def chunk_scan(q, k, v, g_gamma, scale, state, state_offset, reverse, cu_seqlens, chunk_size):
    """The scan contract of engines/base.py, chunked."""

    def dense(q, k, v, g):
        return chunk_scan_from_zero(q, k, v, g, chunk_size)

    return run_scan(dense, q, k, v, g_gamma, scale, state, state_offset, reverse, cu_seqlens)


ENGINE = ScanEngine(chunk_scan)
