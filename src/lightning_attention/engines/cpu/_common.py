"""Plumbing shared by the torch engines: layout, dtype, log decays, varlen, reverse and the initial-state term.

A torch engine supplies ``scan_dense(q, k, v, log_decay, state) -> (o, S)`` over dense ``[B, H, T, D]`` tensors in
the compute dtype, unscaled, starting from ``state`` ``[B, H, K, V]`` (or zero for None) with the forward
convention (``shift = 0``: the state is decayed by the first token's gate). ``log_decay`` is either
``[H]`` (one constant per head, ``g_gamma``) or ``[B, H, T]`` float64 (per token, ``g_gamma + g``; see
:func:`dense_log_decays`). With A_t the sum of the log decays of tokens 1..t::

    o_t = exp(A_t) q_t S0 + sum_{j <= t} exp(A_t - A_j) (q_t . k_j) v_j      S = exp(A_T) S0 + sum_j exp(A_T - A_j) k_j^T v_j

For ``shift = 1`` (the backward's convention of engines/base.py) the state enters undecayed and the final
state is decayed once more: with per-token decays that is the forward scan of the decays shifted by one token
(the first one 0), its final state times exp(a_T). With a constant decay the S0 terms, linear in S0, are added
here in closed form instead (never as S0 / lam, which overflows for a strong decay)::

    o_t   += lam^(t - 1) q_t S0           final = lam^T S0 + lam * S
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from lightning_attention._validation import cu_seqlens_bounds

DenseScan = Callable[..., tuple[torch.Tensor, torch.Tensor]]


#: The compute dtype set by :func:`computing_in` (None: the engine's own rule).
_PINNED_DTYPE: torch.dtype | None = None


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 for float64 inputs, else float32 (or the dtype pinned by :func:`computing_in`)."""
    if _PINNED_DTYPE is not None:
        return _PINNED_DTYPE
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


@contextlib.contextmanager
def computing_in(dtype: torch.dtype):
    """Within the context the torch engine computes in ``dtype`` (e.g. bfloat16) instead of float32: plain torch in
    the inputs' dtype, the same-dtype baseline of the tolerance policy (lightning_attention.testing) that
    ``python -m lightning_attention check`` and the tests judge the kernels by. Not thread-safe."""
    global _PINNED_DTYPE
    saved, _PINNED_DTYPE = _PINNED_DTYPE, dtype
    try:
        yield
    finally:
        _PINNED_DTYPE = saved


def dense_log_decays(g_gamma: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
    """``g_gamma`` [H] when there are no per-token gates, else ``g_gamma + g`` as dense ``[B, H, T]`` float64.

    Per-token decays are summed in float64 whatever the compute dtype: the chunked engine differences their
    chunk-local cumulative sums (b_i - b_j), and in float32 a sum of 64 gates of magnitude ~1 already carries an
    absolute error far above that of a gate itself (docs/DESIGN.md, "Per-token gates"). The decay factors are
    rounded to the compute dtype after exp."""
    if g is None:
        return g_gamma
    return g.transpose(1, 2).to(torch.float64) + g_gamma.to(device=g.device, dtype=torch.float64)[None, :, None]


def _shifted(log_decay: torch.Tensor) -> torch.Tensor:
    """[B, H, T] per-token decays moved one token later, 0 first: the shift-1 scan as a shift-0 scan."""
    return torch.nn.functional.pad(log_decay[..., :-1], (1, 0))


def _scan_dense(scan_dense: DenseScan, q, k, v, log_decay, state, shift, reverse):
    """q, k: [B, H, T, K]; v: [B, H, T, V] in the compute dtype; state [B, H, K, V] or None; log_decay [H] or
    [B, H, T]."""
    per_token = log_decay.dim() == 3
    if reverse:
        q, k, v = (x.flip(2) for x in (q, k, v))
        log_decay = log_decay.flip(2) if per_token else log_decay
    if shift == 0:
        o, final = scan_dense(q, k, v, log_decay, state)
    elif per_token:
        o, final = scan_dense(q, k, v, _shifted(log_decay), state)
        if q.shape[2]:
            final = final * torch.exp(log_decay[..., -1, None, None]).to(final.dtype)
    else:
        T = q.shape[2]
        o, final = scan_dense(q, k, v, log_decay, None)
        g4 = log_decay[None, :, None, None]
        final = final * torch.exp(g4)
        if state is not None:
            t = torch.arange(T, dtype=q.dtype, device=q.device)
            o = o + (q * torch.exp(g4 * t[:, None])) @ state  # token t (0-based) has seen t decays of S0
            final = final + torch.exp(g4 * T) * state
    if reverse:
        o = o.flip(2)
    return o, final


def _map_sequences(fn, cu_seqlens, tokens, states, log_decay=None):
    """``fn(*tokens, *states, log_decay) -> (token_outputs, state_outputs)`` on the whole batch, or once per packed
    sequence.

    tokens: ``[B, H, T, ...]`` tensors, sliced along T per sequence; states: ``[N, H, K, V]`` tensors or None, sliced
    along N; log_decay: ``[H]`` (passed whole) or ``[B, H, T]`` (sliced along T). ``cu_seqlens`` is read on the host
    (a CPU copy avoids a device sync). With ``cu_seqlens`` the per-sequence results are concatenated along T and N.
    """
    if cu_seqlens is None:
        return fn(*tokens, *states, log_decay)
    bounds = cu_seqlens_bounds(cu_seqlens, tokens[0].shape[2])
    per_token = log_decay is not None and log_decay.dim() == 3
    token_outs, state_outs = [], []
    for n, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        seq_tokens = (x[:, :, start:end] for x in tokens)
        seq_states = (None if s is None else s[n : n + 1] for s in states)
        seq_decay = log_decay[:, :, start:end] if per_token else log_decay
        t_out, s_out = fn(*seq_tokens, *seq_states, seq_decay)
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
    """[B, H, T, ...] -> contiguous [B, T, H, ...] in ``dtype``."""
    return x.transpose(1, 2).to(dtype).contiguous()


def run_scan(scan_dense: DenseScan, q, k, v, g_gamma, scale, state, shift, reverse, cu_seqlens, g=None):
    """The scan contract of engines/base.py for a dense torch ``scan_dense``."""
    dtype = compute_dtype(q, k, v, state)
    state = None if state is None else state.to(dtype)
    log_decay = dense_log_decays(g_gamma.to(dtype), g)

    def one(q, k, v, s0, log_decay):
        o, final = _scan_dense(scan_dense, q, k, v, log_decay, s0, shift, reverse)
        return (o,), (final,)

    (o,), (final,) = _map_sequences(one, cu_seqlens, _to_dense(dtype, q, k, v), (state,), log_decay)
    return _from_dense(o * scale, q.dtype), final


#: ``dense_backward(q, k, v, do, log_decay, h0, dht) -> (dq, dk, dv, dh0, dg or None)`` over ``[B, H, T, D]``
#: tensors in the compute dtype, forward direction, ``do`` already multiplied by the scale; h0 / dht
#: ``[B, H, K, V]`` or None; dg ``[B, H, T]`` for per-token decays.
DenseBackward = Callable[..., tuple[torch.Tensor, ...]]


def run_backward(
    dense_backward: DenseBackward, q, k, v, g_gamma, scale, initial_state, cu_seqlens, do, dht, reverse, g=None
):
    """Layout, dtype, varlen and reverse around a dense fused backward (the counterpart of :func:`run_scan`).

    Returns ``dq, dk, dv`` in q's, k's and v's dtypes, ``dh0 [N, H, K, V]`` in the compute dtype (the gradient
    of the initial state, equal to ``dht`` for empty sequences) and ``dg [B, T, H]`` in the compute dtype (None
    without per-token gates).
    """
    dtype = compute_dtype(q, k, v, initial_state)
    log_decay = dense_log_decays(g_gamma.to(dtype), g)
    h0, dht = (None if s is None else s.to(dtype) for s in (initial_state, dht))
    q_, k_, v_, do_ = _to_dense(dtype, q, k, v, do)
    do_ = do_ * scale  # the state gradient carries the scale (D_t = lam D_{t+1} + scale q_t^T do_t)

    def one(q, k, v, do, h0, dht, log_decay):
        per_token = log_decay.dim() == 3
        if reverse:
            q, k, v, do = (x.flip(2) for x in (q, k, v, do))
            log_decay = log_decay.flip(2) if per_token else log_decay
        dq, dk, dv, dh0, dg = dense_backward(q, k, v, do, log_decay, h0, dht)
        grads = (dq, dk, dv) if dg is None else (dq, dk, dv, dg)
        if reverse:
            grads = tuple(x.flip(2) for x in grads)
        return grads, (dh0,)

    grads, (dh0,) = _map_sequences(one, cu_seqlens, (q_, k_, v_, do_), (h0, dht), log_decay)
    dq, dk, dv = (_from_dense(x, t.dtype) for x, t in zip(grads[:3], (q, k, v)))
    dg = _from_dense(grads[3], dtype) if g is not None else None
    return dq, dk, dv, dh0, dg
