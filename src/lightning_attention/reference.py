"""Exact references: the definition, token by token, and the naive chunked form.

Both are plain differentiable torch (autograd gives their gradients), run in float64 when given float64
(float32 otherwise), and support everything the public ops do: initial state, final state, reverse,
varlen ``cu_seqlens``, K != V. They are slow by design and are the truth every engine is tested against.

Per (sequence, head), with ``lam = exp(g)``::

    S_t = lam * S_{t-1} + k_t^T v_t          o_t = scale * q_t S_t          S_0 = h0, final_state = S_T

``reverse=True`` scans t = T..1 with the same update.

Shapes: q, k ``[B, T, H, K]``; v ``[B, T, H, V]``; g_gamma ``[H]``; initial_state ``[N, H, K, V]``
(N = B, or the number of sequences with ``cu_seqlens``); returns ``(o [B, T, H, V], final_state or None)``.
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


def _run(step_fn, q, k, v, g_gamma, scale, initial_state, output_final_state, reverse, cu_seqlens):
    dtype = _compute_dtype(q, k, v, initial_state)
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    lam_log = g_gamma.to(dtype=dtype, device=q.device)
    outs, finals = [], []
    for b, start, end, n in _sequences(q, cu_seqlens):
        sl = slice(start, end)
        qs, ks, vs = (x[b, sl].to(dtype).transpose(0, 1) for x in (q, k, v))  # [H, L, D]
        if reverse:
            qs, ks, vs = (x.flip(1) for x in (qs, ks, vs))
        state = (
            initial_state[n].to(dtype)
            if initial_state is not None
            else torch.zeros(H, K, V, dtype=dtype, device=q.device)
        )
        o, state = step_fn(qs, ks, vs, lam_log, scale, state)
        if reverse:
            o = o.flip(1)
        outs.append(o.transpose(0, 1))  # [L, H, V]
        finals.append(state)
    if not outs:  # B == 0
        empty_state = torch.zeros(0, H, K, V, dtype=dtype, device=q.device)
        return q.new_zeros(B, T, H, V), (empty_state if output_final_state else None)
    o = (torch.stack(outs) if cu_seqlens is None else torch.cat(outs)[None]).to(q.dtype)
    return o, (torch.stack(finals) if output_final_state else None)


def _token_loop(q, k, v, g, scale, state):
    """q, k: [H, L, K]; v: [H, L, V]; state: [H, K, V]."""
    lam = torch.exp(g)[:, None, None]
    outs = []
    # unbind, not q[:, t]: autograd turns each indexing into a zero tensor of the full [H, L, D] size, which makes
    # the backward O(L^2); unbind's backward is one stack.
    for q_t, k_t, v_t in zip(q.unbind(1), k.unbind(1), v.unbind(1)):
        state = lam * state + k_t[:, :, None] * v_t[:, None, :]
        outs.append(scale * torch.einsum("hk,hkv->hv", q_t, state))
    o = torch.stack(outs, dim=1) if outs else q.new_zeros(q.shape[0], 0, v.shape[-1])
    return o, state


def _naive_chunks(chunk_size):
    def step(q, k, v, g, scale, state):
        """One chunk at a time with the closed form of the design notes (local index i, j = 0..L-1)::

        O  = scale * (diag(lam^(i+1)) Q S + ((Q K^T) * M) V),   M_ij = lam^(i-j) if i >= j else 0
        S' = lam^L S + (diag(lam^(L-1-j)) K)^T V
        """
        outs = []
        g = g[:, None, None]
        for start in range(0, q.shape[1], chunk_size):
            qc, kc, vc = (x[:, start : start + chunk_size] for x in (q, k, v))
            L = qc.shape[1]
            i = torch.arange(L, dtype=q.dtype, device=q.device)
            diff = i[:, None] - i[None, :]
            # Select, never multiply, the masked entries: exp(g * (i - j)) for i < j overflows.
            mask = torch.where(diff >= 0, torch.exp(g * diff.clamp(min=0)), torch.zeros((), dtype=q.dtype))
            q_decay = torch.exp(g * (i + 1)[:, None])  # [H, L, 1]
            k_decay = torch.exp(g * (L - 1 - i)[:, None])
            intra = ((qc @ kc.transpose(1, 2)) * mask) @ vc
            inter = (qc * q_decay) @ state
            outs.append(scale * (intra + inter))
            state = torch.exp(g * L) * state + (kc * k_decay).transpose(1, 2) @ vc
        o = torch.cat(outs, dim=1) if outs else q.new_zeros(q.shape[0], 0, v.shape[-1])
        return o, state

    return step


def recurrent_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g_gamma: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    reverse: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The definition, one token at a time (see the module docstring for shapes)."""
    return _run(_token_loop, q, k, v, g_gamma, scale, initial_state, output_final_state, reverse, cu_seqlens)


def chunk_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g_gamma: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    reverse: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The naive chunked form, one chunk at a time (see the module docstring for shapes)."""
    step = _naive_chunks(chunk_size)
    return _run(step, q, k, v, g_gamma, scale, initial_state, output_final_state, reverse, cu_seqlens)
