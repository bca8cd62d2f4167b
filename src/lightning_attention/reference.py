"""Exact references: the definition, token by token, and the naive chunked form.

Both are plain differentiable torch (autograd gives their gradients, ``dg`` included), run in float64 when given
float64 (float32 otherwise), and support everything the public ops do: per-token gates, initial state, final
state, reverse, varlen ``cu_seqlens``, K != V. They are slow by design and are the truth every engine is tested
against.

Per (sequence, head), with the log decay of token t ``a_t = g_gamma[h] + g[t, h]`` (either may be absent)::

    S_t = exp(a_t) * S_{t-1} + k_t^T v_t          o_t = scale * q_t S_t          S_0 = h0, final_state = S_T

``reverse=True`` scans t = T..1 with the same update (token t's own gate: the time-flipped sequence).

Shapes: q, k ``[B, T, H, K]``; v ``[B, T, H, V]``; g_gamma ``[H]``; g ``[B, T, H]``; initial_state
``[N, H, K, V]`` (N = B, or the number of sequences with ``cu_seqlens``); returns
``(o [B, T, H, V], final_state or None)``.
"""

from __future__ import annotations

import torch

from lightning_attention._validation import cu_seqlens_bounds

__all__ = ["recurrent_reference", "chunk_reference"]


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _sequences(q: torch.Tensor, cu_seqlens: torch.Tensor | None):
    """Yield (batch index, start, end, state index) for every independent sequence."""
    if cu_seqlens is None:
        for b in range(q.shape[0]):
            yield b, 0, q.shape[1], b
    else:
        bounds = cu_seqlens_bounds(cu_seqlens, q.shape[1])
        for n in range(len(bounds) - 1):
            yield 0, bounds[n], bounds[n + 1], n


def _log_decays(g_gamma, g, q, dtype):
    """Per-token log decay ``[B, T, H]`` in ``dtype``: g_gamma broadcast over tokens plus g (either may be None)."""
    B, T, H, _ = q.shape
    a = torch.zeros(B, T, H, dtype=dtype, device=q.device)
    if g_gamma is not None:
        a = a + g_gamma.to(dtype=dtype, device=q.device)
    if g is not None:
        a = a + g.to(dtype=dtype, device=q.device)
    return a


def _run(step_fn, q, k, v, g_gamma, g, scale, initial_state, output_final_state, reverse, cu_seqlens):
    dtype = _compute_dtype(q, k, v, initial_state)
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    log_decay = _log_decays(g_gamma, g, q, dtype)
    outs, finals = [], []
    for b, start, end, n in _sequences(q, cu_seqlens):
        sl = slice(start, end)
        qs, ks, vs = (x[b, sl].to(dtype).transpose(0, 1) for x in (q, k, v))  # [H, L, D]
        a = log_decay[b, sl].transpose(0, 1)  # [H, L]
        if reverse:
            qs, ks, vs, a = (x.flip(1) for x in (qs, ks, vs, a))
        state = (
            initial_state[n].to(dtype)
            if initial_state is not None
            else torch.zeros(H, K, V, dtype=dtype, device=q.device)
        )
        o, state = step_fn(qs, ks, vs, a, scale, state)
        if reverse:
            o = o.flip(1)
        outs.append(o.transpose(0, 1))  # [L, H, V]
        finals.append(state)
    if not outs:  # B == 0
        empty_state = torch.zeros(0, H, K, V, dtype=dtype, device=q.device)
        return q.new_zeros(B, T, H, V), (empty_state if output_final_state else None)
    o = (torch.stack(outs) if cu_seqlens is None else torch.cat(outs)[None]).to(q.dtype)
    return o, (torch.stack(finals) if output_final_state else None)


def _token_loop(q, k, v, a, scale, state):
    """q, k: [H, L, K]; v: [H, L, V]; a: [H, L] log decays; state: [H, K, V]."""
    outs = []
    # unbind, not q[:, t]: autograd turns each indexing into a zero tensor of the full [H, L, D] size, which makes
    # the backward O(L^2); unbind's backward is one stack.
    for q_t, k_t, v_t, a_t in zip(q.unbind(1), k.unbind(1), v.unbind(1), a.unbind(1)):
        state = torch.exp(a_t)[:, None, None] * state + k_t[:, :, None] * v_t[:, None, :]
        outs.append(scale * torch.einsum("hk,hkv->hv", q_t, state))
    o = torch.stack(outs, dim=1) if outs else q.new_zeros(q.shape[0], 0, v.shape[-1])
    return o, state


def _span_sums(a):
    """For log decays a [H, L] of one chunk: (pair [H, L, L], the decay sum over (j, i] for i >= j, else 0;
    from_start [H, L], over [0, i]; to_end [H, L], over (j, L)).

    Masked sums of ``a``, not differences of its prefix sums b_i - b_j: equal in exact arithmetic, but autograd
    through a difference adds and subtracts the same large terms, and at g = -20 per token dg keeps only 7 digits
    of 16 in float64. A masked sum's gradient adds only the pairs spanning each token."""
    L = a.shape[1]
    i = torch.arange(L, device=a.device)
    spans = (i[None, :, None] < i[None, None, :]) & (i[None, None, :] <= i[:, None, None])  # [i, j, s]
    pair = torch.einsum("ijs,hs->hij", spans.to(a.dtype), a)
    from_start = a @ (i[:, None] <= i[None, :]).to(a.dtype)  # [H, L]: sum over s <= i
    to_end = a @ (i[:, None] > i[None, :]).to(a.dtype)  # [H, L]: sum over s > j
    return pair, from_start, to_end


def _naive_chunks(chunk_size):
    def step(q, k, v, a, scale, state):
        """One chunk at a time with the closed form of the design notes (local index i, j = 0..L-1, b the
        inclusive cumulative sum of the log decays inside the chunk)::

        O  = scale * (diag(exp(b_i)) Q S + ((Q K^T) * M) V),   M_ij = exp(b_i - b_j) if i >= j else 0
        S' = exp(b_last) S + (diag(exp(b_last - b_j)) K)^T V
        """
        outs = []
        for start in range(0, q.shape[1], chunk_size):
            qc, kc, vc = (x[:, start : start + chunk_size] for x in (q, k, v))
            pair, from_start, to_end = _span_sums(a[:, start : start + chunk_size])
            L = qc.shape[1]
            i = torch.arange(L, device=q.device)
            causal = i[:, None] >= i[None, :]
            # Selected, never multiplied: exp of a masked entry could be inf (inf * 0 = NaN) for positive gates.
            mask = torch.where(causal, torch.exp(torch.where(causal, pair, 0.0)), 0.0)
            intra = ((qc @ kc.transpose(1, 2)) * mask) @ vc
            inter = (qc * torch.exp(from_start)[..., None]) @ state
            outs.append(scale * (intra + inter))
            total = a[:, start : start + chunk_size].sum(1)
            state = torch.exp(total)[:, None, None] * state + (kc * torch.exp(to_end)[..., None]).transpose(1, 2) @ vc
        o = torch.cat(outs, dim=1) if outs else q.new_zeros(q.shape[0], 0, v.shape[-1])
        return o, state

    return step


def recurrent_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g_gamma: torch.Tensor | None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    reverse: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    *,
    g: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The definition, one token at a time (see the module docstring for shapes). ``g_gamma`` and ``g`` may each
    be None (no decay from it)."""
    return _run(_token_loop, q, k, v, g_gamma, g, scale, initial_state, output_final_state, reverse, cu_seqlens)


def chunk_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g_gamma: torch.Tensor | None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    reverse: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
    *,
    g: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The naive chunked form, one chunk at a time (see the module docstring for shapes). ``g_gamma`` and ``g``
    may each be None (no decay from it)."""
    step = _naive_chunks(chunk_size)
    return _run(step, q, k, v, g_gamma, g, scale, initial_state, output_final_state, reverse, cu_seqlens)
