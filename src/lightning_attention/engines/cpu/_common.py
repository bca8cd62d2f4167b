"""Plumbing shared by the torch engines: layout, dtype, varlen, reverse and the initial-state term.

A torch engine supplies ``scan_dense(q, k, v, g, state) -> (o, S)`` over dense ``[B, H, T, D]`` tensors in the
compute dtype, unscaled, starting from ``state`` ``[B, H, K, V]`` (or zero for None) with the forward convention
(``state_offset = 1``: the state is decayed once before the first token)::

    o_t = lam^t q_t S0 + sum_{j <= t} lam^(t - j) (q_t . k_j) v_j          S = lam^T S0 + sum_{j <= T} lam^(T - j) k_j^T v_j

For ``state_offset = 0`` (the backward's convention of engines/base.py) the engine runs from zero and the S0
terms, linear in S0, are added here in closed form (never as S0 / lam, which overflows for a strong decay)::

    o_t   += lam^(t - 1) q_t S0           final = lam^T S0 + lam * S
"""

from __future__ import annotations

from typing import Callable

import torch

from lightning_attention._validation import cu_seqlens_bounds

DenseScan = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _scan_dense(scan_dense: DenseScan, q, k, v, g, state, state_offset, reverse):
    """q, k: [B, H, T, K]; v: [B, H, T, V] in the compute dtype; state [B, H, K, V] or None; g [H]."""
    if reverse:
        q, k, v = (x.flip(2) for x in (q, k, v))
    if state_offset == 1:
        o, final = scan_dense(q, k, v, g, state)
    else:
        T = q.shape[2]
        o, final = scan_dense(q, k, v, g, None)
        g4 = g[None, :, None, None]
        final = final * torch.exp(g4)
        if state is not None:
            t = torch.arange(T, dtype=q.dtype, device=q.device)
            o = o + (q * torch.exp(g4 * t[:, None])) @ state  # token t (0-based) has seen t decays of S0
            final = final + torch.exp(g4 * T) * state
    if reverse:
        o = o.flip(2)
    return o, final


def _map_sequences(fn, cu_seqlens, tokens, states):
    """``fn(*tokens, *states) -> (token_outputs, state_outputs)`` on the whole batch, or once per packed sequence.

    tokens: ``[B, H, T, D]`` tensors, sliced along T per sequence; states: ``[N, H, K, V]`` tensors or None, sliced
    along N. With ``cu_seqlens`` the per-sequence results are concatenated along T and N again.
    """
    if cu_seqlens is None:
        return fn(*tokens, *states)
    bounds = cu_seqlens_bounds(cu_seqlens, tokens[0].shape[2])
    token_outs, state_outs = [], []
    for n, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        seq_tokens = (x[:, :, start:end] for x in tokens)
        seq_states = (None if s is None else s[n : n + 1] for s in states)
        t_out, s_out = fn(*seq_tokens, *seq_states)
        token_outs.append(t_out)
        state_outs.append(s_out)
    return (
        tuple(torch.cat(parts, dim=2) for parts in zip(*token_outs)),
        tuple(torch.cat(parts) for parts in zip(*state_outs)),
    )


def _to_dense(dtype, *tensors):
    """[B, T, H, D] in any dtype -> contiguous [B, H, T, D] in the compute dtype."""
    return tuple(x.to(dtype).transpose(1, 2).contiguous() for x in tensors)


def _from_dense(x, dtype):
    """[B, H, T, D] -> contiguous [B, T, H, D] in ``dtype``."""
    return x.transpose(1, 2).to(dtype).contiguous()


def run_scan(scan_dense: DenseScan, q, k, v, g_gamma, scale, state, state_offset, reverse, cu_seqlens):
    """The scan contract of engines/base.py for a dense torch ``scan_dense``."""
    dtype = compute_dtype(q, k, v, state)
    state = None if state is None else state.to(dtype)

    def one(q, k, v, s0):
        o, final = _scan_dense(scan_dense, q, k, v, g_gamma.to(dtype), s0, state_offset, reverse)
        return (o,), (final,)

    (o,), (final,) = _map_sequences(one, cu_seqlens, _to_dense(dtype, q, k, v), (state,))
    return _from_dense(o * scale, q.dtype), final


#: ``dense_backward(q, k, v, do, g, h0, dht) -> (dq, dk, dv, dh0)`` over ``[B, H, T, D]`` tensors in the compute
#: dtype, forward direction, ``do`` already multiplied by the scale; h0 / dht ``[B, H, K, V]`` or None.
DenseBackward = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]


def run_backward(dense_backward: DenseBackward, q, k, v, g_gamma, scale, initial_state, cu_seqlens, do, dht, reverse):
    """Layout, dtype, varlen and reverse around a dense fused backward (the counterpart of :func:`run_scan`).

    Returns ``dq, dk, dv`` in q's, k's and v's dtypes and ``dh0 [N, H, K, V]`` in the compute dtype (the gradient
    of the initial state, equal to ``dht`` for empty sequences).
    """
    dtype = compute_dtype(q, k, v, initial_state)
    g = g_gamma.to(dtype)
    h0, dht = (None if s is None else s.to(dtype) for s in (initial_state, dht))
    q_, k_, v_, do_ = _to_dense(dtype, q, k, v, do)
    do_ = do_ * scale  # the state gradient carries the scale (D_t = lam D_{t+1} + scale q_t^T do_t)

    def one(q, k, v, do, h0, dht):
        if reverse:
            q, k, v, do = (x.flip(2) for x in (q, k, v, do))
        dq, dk, dv, dh0 = dense_backward(q, k, v, do, g, h0, dht)
        if reverse:
            dq, dk, dv = (x.flip(2) for x in (dq, dk, dv))
        return (dq, dk, dv), (dh0,)

    (dq, dk, dv), (dh0,) = _map_sequences(one, cu_seqlens, (q_, k_, v_, do_), (h0, dht))
    return _from_dense(dq, q.dtype), _from_dense(dk, k.dtype), _from_dense(dv, v.dtype), dh0
