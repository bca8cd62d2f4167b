"""Chunked scan in torch (the fast CPU engine; also runs on CUDA tensors when Triton is absent).

Per chunk of C tokens (local i, j = 0..C-1, S the state entering the chunk), all chunks at once::

    O_intra = ((Q K^T) * M) V,    M_ij = lam^(i-j) if i >= j else 0       [B, H, N, C, V]
    A_n     = (diag(lam^(C-1-j)) K)^T V                                   chunk-local states [B, H, N, K, V]
    S_(n+1) = lam^C S_n + A_n                                             the only sequential step, N small
    O       = O_intra + diag(lam^(i+1)) Q S_n

The last partial chunk (T not a multiple of C) is the same computation with C = its length, so the final
state is decayed exactly T times and never touches padding. Memory: O(T * C + (T / C) * K * V) per head.

Backward (fused: one pass for dq, dk and dv instead of engines/base.py's three scans). With dO already
multiplied by the scale, P = (Q K^T) * M, W = (dO V^T) * M, S_n the forward state entering chunk n (S_0 = h0)
and G_n the state gradient that reaches the *last* token of chunk n from beyond it (G_last = dht)::

    dQ      = W K + diag(lam^(i+1)) dO S_n^T
    dK      = W^T Q + diag(lam^(C-1-i)) V G_n^T
    dV      = P^T dO + diag(lam^(C-1-i)) K G_n
    G_(n-1) = lam^C G_n + (diag(lam^(i+1)) Q)^T dO,        dh0 = G_(-1)

P and W serve both the row (dq) and the column (dk, dv) direction, and the one right-to-left state pass G serves
dk and dv: 10 batched matmuls per chunk instead of the 12-14 of three separate scans, and no time flips.
"""

from __future__ import annotations

import functools

import torch

from lightning_attention.engines.base import ScanEngine
from lightning_attention.engines.cpu._common import run_backward, run_scan


def _decay_matrices(g: torch.Tensor, C: int):
    """M [H, C, C], q_decay = lam^(i+1) [H, C, 1], k_decay = lam^(C-1-j) [H, C, 1], lam^C [H, 1, 1]."""
    i = torch.arange(C, dtype=g.dtype, device=g.device)
    g3 = g[:, None, None]
    diff = i[:, None] - i[None, :]
    # Select, never multiply: exp(g * (i - j)) for i < j is exp(positive) and can be inf.
    mask = torch.where(diff >= 0, torch.exp(g3 * diff.clamp(min=0)), torch.zeros((), dtype=g.dtype, device=g.device))
    return mask, torch.exp(g3 * (i + 1)[:, None]), torch.exp(g3 * (C - 1 - i)[:, None]), torch.exp(g3 * C)


def _chunked(x: torch.Tensor, C: int):
    """Contiguous [B, H, T, D] -> views [B, H, n, c, D]: the full chunks (c = C), then the partial last one."""
    B, H, T, D = x.shape
    full = T - T % C
    parts = []
    if full:
        parts.append(x[:, :, :full].view(B, H, full // C, C, D))
    if T > full:
        parts.append(x[:, :, full:].view(B, H, 1, T - full, D))
    return parts


def _pass_states(local: torch.Tensor, chunk_decay: torch.Tensor, state: torch.Tensor, reverse: bool = False):
    """The sequential step: ``state <- chunk_decay * state + local[n]`` over the chunks n (last to first if
    ``reverse``). local [B, H, N, K, V], chunk_decay [H, 1, 1]. Returns (state entering each chunk, final state)."""
    entering = torch.empty_like(local)
    chunks = range(local.shape[2] - 1, -1, -1) if reverse else range(local.shape[2])
    for n in chunks:
        entering[:, :, n] = state
        state = torch.addcmul(local[:, :, n], chunk_decay, state)
    return entering, state


def _zero_state(q: torch.Tensor, V: int) -> torch.Tensor:
    B, H, _, K = q.shape
    return q.new_zeros(B, H, K, V)


def _join(parts: list[torch.Tensor]) -> torch.Tensor:
    """[B, H, n, c, D] per part -> [B, H, T, D] (no copy for a single part)."""
    flat = [x.flatten(2, 3) for x in parts]
    return flat[0] if len(flat) == 1 else torch.cat(flat, dim=2)


def chunk_scan_dense(q, k, v, g, state, chunk_size: int = 64):
    """Unscaled scan from ``state`` (engines/cpu/_common.py's DenseScan); q, k, v contiguous [B, H, T, D]."""
    state = state if state is not None else _zero_state(q, v.shape[-1])
    outs = []
    for qc, kc, vc in zip(*(_chunked(x, chunk_size) for x in (q, k, v))):
        mask, q_decay, k_decay, chunk_decay = _decay_matrices(g, qc.shape[3])
        o = ((qc @ kc.transpose(-1, -2)) * mask[:, None]) @ vc
        local = (kc * k_decay[:, None]).transpose(-1, -2) @ vc  # [B, H, n, K, V]
        states, state = _pass_states(local, chunk_decay, state)
        outs.append(o.add_((qc * q_decay[:, None]) @ states))
    if not outs:
        return q.new_zeros(*q.shape[:3], v.shape[-1]), state.clone()
    return _join(outs), state


def chunk_backward_dense(q, k, v, do, g, h0, dht, chunk_size: int = 64):
    """Fused backward (module docstring); run_backward's DenseBackward. ``do`` carries the scale."""
    V = v.shape[-1]
    parts = list(zip(*(_chunked(x, chunk_size) for x in (q, k, v, do))))
    decays = [_decay_matrices(g, qc.shape[3]) for qc, _, _, _ in parts]
    dq, dk, dv, w_t = [], [], [], []
    state = h0 if h0 is not None else _zero_state(q, V)
    for (qc, kc, vc, doc), (mask, q_decay, k_decay, chunk_decay) in zip(parts, decays):
        local = (kc * k_decay[:, None]).transpose(-1, -2) @ vc
        states, state = _pass_states(local, chunk_decay, state)
        w = (doc @ vc.transpose(-1, -2)) * mask[:, None]
        dq.append((w @ kc).add_((doc * q_decay[:, None]) @ states.transpose(-1, -2)))
        w_t.append(w.transpose(-1, -2))
    grad_state = dht if dht is not None else _zero_state(q, V)
    for index in range(len(parts) - 1, -1, -1):
        (qc, kc, vc, doc), (mask, q_decay, k_decay, chunk_decay) = parts[index], decays[index]
        local = (qc * q_decay[:, None]).transpose(-1, -2) @ doc
        grad_states, grad_state = _pass_states(local, chunk_decay, grad_state, reverse=True)
        p_t = ((qc @ kc.transpose(-1, -2)) * mask[:, None]).transpose(-1, -2)
        dk.insert(0, (w_t[index] @ qc).add_((vc * k_decay[:, None]) @ grad_states.transpose(-1, -2)))
        dv.insert(0, (p_t @ doc).add_((kc * k_decay[:, None]) @ grad_states))
    if not parts:  # T == 0: dh0 = dht, as a new tensor (a custom op's output may not alias its input)
        return q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape), grad_state.clone()
    return _join(dq), _join(dk), _join(dv), grad_state


def chunk_scan(q, k, v, g_gamma, scale, state, state_offset, reverse, cu_seqlens, chunk_size):
    """The scan contract of engines/base.py, chunked."""
    dense = functools.partial(chunk_scan_dense, chunk_size=chunk_size)
    return run_scan(dense, q, k, v, g_gamma, scale, state, state_offset, reverse, cu_seqlens)


class ChunkEngine(ScanEngine):
    """Forward: one chunked scan. Backward: the fused chunked backward of the module docstring."""

    def backward(self, q, k, v, g_gamma, cfg, initial_state, cu_seqlens, do, dht):
        dense = functools.partial(chunk_backward_dense, chunk_size=cfg.chunk_size)
        dq, dk, dv, dh0 = run_backward(
            dense, q, k, v, g_gamma, cfg.scale, initial_state, cu_seqlens, do, dht, cfg.reverse
        )
        return dq, dk, dv, (dh0 if initial_state is not None else None)


ENGINE = ChunkEngine(chunk_scan)
