"""Chunked scan in torch (the fast CPU engine; also runs on CUDA tensors when Triton is absent).

Per chunk of C tokens (local i, j = 0..C-1, S the state entering the chunk), all chunks at once. With b_i the
chunk-local inclusive cumulative sum of the log decays (b_i = (i + 1) g for a constant decay g)::

    O_intra = ((Q K^T) * M) V,    M_ij = exp(b_i - b_j) if i >= j else 0      [B, H, N, C, V]
    A_n     = (diag(exp(b_last - b_j)) K)^T V                                 chunk-local states [B, H, N, K, V]
    S_(n+1) = exp(b_last) S_n + A_n                                           the only sequential step, N small
    O       = O_intra + diag(exp(b_i)) Q S_n

The last partial chunk (T not a multiple of C) is the same computation with C = its length, so the final
state is decayed exactly T times and never touches padding. Memory: O(T * C + (T / C) * K * V) per head.
M is masked by selection on the exponent before exp (``where(i >= j, exp(where(i >= j, b_i - b_j, 0)), 0)``):
exp(b_i - b_j) for i < j is exp(positive), inf for strong decays, and inf * 0 = NaN. The exponents are never
split into exp(b_i) * exp(-b_j) (exp(-b_j) overflows at g = -20 per token: b reaches -1280 in a chunk).
A constant decay gives every factor in closed form from (i - j) g; per-token decays (engines/cpu/_common.py:
float64 sums) give them from float64 chunk-local cumulative sums, rounded to the compute dtype after exp.

Backward (fused: one pass for dq, dk and dv instead of engines/base.py's three scans). With dO already
multiplied by the scale, P = (Q K^T) * M, W = (dO V^T) * M, S_n the forward state entering chunk n (S_0 = h0)
and G_n the state gradient that reaches the *last* token of chunk n from beyond it (G_last = dht)::

    dQ      = W K + diag(exp(b_i)) dO S_n^T
    dK      = W^T Q + diag(exp(b_last - b_i)) V G_n^T
    dV      = P^T dO + diag(exp(b_last - b_i)) K G_n
    G_(n-1) = exp(b_last) G_n + (diag(exp(b_i)) Q)^T dO,        dh0 = G_(-1)

P and W serve both the row (dq) and the column (dk, dv) direction, and the one right-to-left state pass G serves
dk and dv: 10 batched matmuls per chunk instead of the 12-14 of three separate scans, and no time flips.

dg (per-token decays): dg_t = < D_t, S_t - k_t^T v_t >, the sum over the pairs (source i at or after t, key j
before t) that span token t, each weighted by the decay between them (docs/DESIGN.md, "Accuracy of dg"). Per
chunk they split into four sums that the pass above already holds, none of which contains a token's own pair
(the O(1) term that cancels when dg is formed from complete dq and dk):

    i, j in the chunk:           sum_{i >= t > j} E_ij,  E = (Q K^T) * W       (2-D prefix/suffix sums of E)
    i in the chunk, j before:    sum_{i >= t} q_i . (dQ_inter)_i               (S_n, h0 included)
    i beyond, j in the chunk:    sum_{j < t} k_j . (dK_inter)_j                (G_n, dht included)
    i beyond, j before:          exp(b_last) < G_n, S_n >

Nothing is carried across chunks beyond S_n and G_n, so dg needs no sequence-long cumulative sum, and the pair
of dht with the last token (weight 1, spanning no token) never enters a sum to be cancelled later.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from lightning_attention.engines.base import ScanEngine
from lightning_attention.engines.cpu._common import run_backward, run_scan


class _Decays(NamedTuple):
    """Decay factors of one part of the chunks, broadcastable against its ``[B, H, n, c, ...]`` views.

    mask ``M_ij`` [.., c, c]; q_decay ``exp(b_i)`` [.., c, 1]; k_decay ``exp(b_last - b_j)`` [.., c, 1];
    chunk_decay ``exp(b_last)``: [H, 1, 1] for a constant decay (the same for every chunk), [B, H, n, 1, 1] per
    token (see :func:`_pass_states`)."""

    mask: torch.Tensor
    q_decay: torch.Tensor
    k_decay: torch.Tensor
    chunk_decay: torch.Tensor


def _constant_decays(g: torch.Tensor, C: int) -> _Decays:
    """From a constant log decay g [H]: M [H, 1, C, C], lam^(i+1) and lam^(C-1-j) [H, 1, C, 1], lam^C [H, 1, 1]."""
    i = torch.arange(C, dtype=g.dtype, device=g.device)
    g3 = g[:, None, None]
    diff = i[:, None] - i[None, :]
    # Select, never multiply: exp(g * (i - j)) for i < j is exp(positive) and can be inf.
    mask = torch.where(diff >= 0, torch.exp(g3 * diff.clamp(min=0)), torch.zeros((), dtype=g.dtype, device=g.device))
    q_decay, k_decay = torch.exp(g3 * (i + 1)[:, None]), torch.exp(g3 * (C - 1 - i)[:, None])
    return _Decays(mask[:, None], q_decay[:, None], k_decay[:, None], torch.exp(g3 * C))


def _gated_decays(a: torch.Tensor, dtype: torch.dtype) -> _Decays:
    """From per-token log decays a [B, H, n, c] (float64, one part of the chunks): M [B, H, n, c, c], the token
    factors [B, H, n, c, 1], exp(b_last) [B, H, n, 1, 1], in ``dtype``."""
    b = a.cumsum(-1)  # chunk-local, inclusive
    c = a.shape[-1]
    causal = torch.ones(c, c, dtype=torch.bool, device=a.device).tril()
    exponent = torch.where(causal, b[..., :, None] - b[..., None, :], 0.0).to(dtype)
    mask = torch.where(causal, torch.exp(exponent), torch.zeros((), dtype=dtype, device=a.device))
    last = b[..., -1:]
    q_decay, k_decay = torch.exp(b).to(dtype)[..., None], torch.exp(last - b).to(dtype)[..., None]
    return _Decays(mask, q_decay, k_decay, torch.exp(last).to(dtype)[..., None])


def _chunked(x: torch.Tensor, C: int):
    """Contiguous [B, H, T, ...] -> views [B, H, n, c, ...]: the full chunks (c = C), then the partial last one."""
    B, H, T = x.shape[:3]
    rest = x.shape[3:]
    full = T - T % C
    parts = []
    if full:
        parts.append(x[:, :, :full].view(B, H, full // C, C, *rest))
    if T > full:
        parts.append(x[:, :, full:].view(B, H, 1, T - full, *rest))
    return parts


def _parts(tensors, log_decay: torch.Tensor, C: int):
    """``[(views of tensors, _Decays)]`` per part of the chunks (full chunks, then the partial last one)."""
    views = list(zip(*(_chunked(x, C) for x in tensors)))
    dtype = tensors[0].dtype
    if log_decay.dim() == 1:
        return [(part, _constant_decays(log_decay, part[0].shape[3])) for part in views]
    return [(part, _gated_decays(a, dtype)) for part, a in zip(views, _chunked(log_decay, C))]


def _pass_states(local: torch.Tensor, chunk_decay: torch.Tensor, state: torch.Tensor, reverse: bool = False):
    """The sequential step: ``state <- chunk_decay[n] * state + local[n]`` over the chunks n (last to first if
    ``reverse``). local [B, H, N, K, V]; chunk_decay [H, 1, 1] (every chunk) or [B, H, N, 1, 1].
    Returns (state entering each chunk, final state)."""
    entering = torch.empty_like(local)
    chunks = range(local.shape[2] - 1, -1, -1) if reverse else range(local.shape[2])
    per_chunk = chunk_decay.dim() == 5
    for n in chunks:
        entering[:, :, n] = state
        state = torch.addcmul(local[:, :, n], chunk_decay[:, :, n] if per_chunk else chunk_decay, state)
    return entering, state


def _zero_state(q: torch.Tensor, V: int) -> torch.Tensor:
    B, H, _, K = q.shape
    return q.new_zeros(B, H, K, V)


def _join(parts: list[torch.Tensor]) -> torch.Tensor:
    """[B, H, n, c, ...] per part -> [B, H, T, ...] (no copy for a single part)."""
    flat = [x.flatten(2, 3) for x in parts]
    return flat[0] if len(flat) == 1 else torch.cat(flat, dim=2)


def chunk_scan_dense(q, k, v, log_decay, state, chunk_size: int = 64):
    """Unscaled scan from ``state`` (engines/cpu/_common.py's DenseScan); q, k, v contiguous [B, H, T, D]."""
    state = state if state is not None else _zero_state(q, v.shape[-1])
    outs = []
    for (qc, kc, vc), d in _parts((q, k, v), log_decay, chunk_size):
        o = ((qc @ kc.transpose(-1, -2)) * d.mask) @ vc
        local = (kc * d.k_decay).transpose(-1, -2) @ vc  # [B, H, n, K, V]
        states, state = _pass_states(local, d.chunk_decay, state)
        outs.append(o.add_((qc * d.q_decay) @ states))
    if not outs:
        return q.new_zeros(*q.shape[:3], v.shape[-1]), state.clone()
    return _join(outs), state


def _suffix_sum(x: torch.Tensor) -> torch.Tensor:
    """Inclusive sums from each position to the end of the last dim."""
    return x.flip(-1).cumsum(-1).flip(-1)


def _spanning_sums(e_t: torch.Tensor) -> torch.Tensor:
    """e_t [.., c (j), c (i)], the transpose of the pair terms E_ij of one chunk -> [.., c]: for each t the sum of
    E_ij over i >= t > j (pairs with i <= j are never read: selected away, not subtracted)."""
    pairs = torch.triu(e_t, diagonal=1)  # j < i
    sums = _suffix_sum(pairs.cumsum(-2))  # [j, i]: sum over j' <= j and i' >= i
    return torch.nn.functional.pad(sums.diagonal(offset=1, dim1=-2, dim2=-1), (1, 0))  # t = j + 1, i = t


def chunk_backward_dense(q, k, v, do, log_decay, h0, dht, chunk_size: int = 64):
    """Fused backward (module docstring); run_backward's DenseBackward. ``do`` carries the scale.
    Returns (dq, dk, dv, dh0, dg [B, H, T] for per-token decays, else None)."""
    V = v.shape[-1]
    per_token = log_decay.dim() == 3
    parts = _parts((q, k, v, do), log_decay, chunk_size)
    dq, dk, dv, dg, w_t = [], [], [], [], []
    from_before, entering = [], []  # per-token decays: dg's pairs (chunk, before it), and S_n
    state = h0 if h0 is not None else _zero_state(q, V)
    for (qc, kc, vc, doc), d in parts:
        local = (kc * d.k_decay).transpose(-1, -2) @ vc
        states, state = _pass_states(local, d.chunk_decay, state)
        w = (doc @ vc.transpose(-1, -2)) * d.mask
        q_inter = (doc * d.q_decay) @ states.transpose(-1, -2)
        if per_token:
            from_before.append(_suffix_sum((qc * q_inter).sum(-1)))
            entering.append(states)
        dq.append((w @ kc).add_(q_inter))
        w_t.append(w.transpose(-1, -2))
    grad_state = dht if dht is not None else _zero_state(q, V)
    for index in range(len(parts) - 1, -1, -1):
        (qc, kc, vc, doc), d = parts[index]
        local = (qc * d.q_decay).transpose(-1, -2) @ doc
        grad_states, grad_state = _pass_states(local, d.chunk_decay, grad_state, reverse=True)
        qk = qc @ kc.transpose(-1, -2)
        p_t = (qk * d.mask).transpose(-1, -2)
        k_inter = (vc * d.k_decay) @ grad_states.transpose(-1, -2)
        dk.insert(0, (w_t[index] @ qc).add_(k_inter))
        dv.insert(0, (p_t @ doc).add_((kc * d.k_decay) @ grad_states))
        if per_token:
            within = _spanning_sums(qk.transpose(-1, -2) * w_t[index])
            to_beyond = torch.nn.functional.pad((kc * k_inter).sum(-1)[..., :-1].cumsum(-1), (1, 0))
            across = (grad_states * entering[index]).sum((-1, -2))[..., None] * d.chunk_decay[..., 0]
            dg.insert(0, within + from_before[index] + to_beyond + across)
    if not parts:  # T == 0: dh0 = dht, as a new tensor (a custom op's output may not alias its input)
        empty_dg = q.new_zeros(q.shape[:3]) if per_token else None
        return q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape), grad_state.clone(), empty_dg
    return _join(dq), _join(dk), _join(dv), grad_state, (_join(dg) if per_token else None)


def chunk_scan(q, k, v, g_gamma, scale, state, shift, reverse, cu_seqlens, chunk_size, g=None):
    """The scan contract of engines/base.py, chunked."""
    dense = functools.partial(chunk_scan_dense, chunk_size=chunk_size)
    return run_scan(dense, q, k, v, g_gamma, scale, state, shift, reverse, cu_seqlens, g)


class ChunkEngine(ScanEngine):
    """Forward: one chunked scan. Backward: the fused chunked backward of the module docstring, dg included."""

    def backward(
        self, q, k, v, g_gamma, cfg, initial_state, cu_seqlens, do, dht, g=None, cu_seqlens_cpu=None
    ):
        dense = functools.partial(chunk_backward_dense, chunk_size=cfg.chunk_size)
        dq, dk, dv, dh0, dg = run_backward(
            dense, q, k, v, g_gamma, cfg.scale, initial_state, self._offsets(cu_seqlens, cu_seqlens_cpu), do, dht,
            cfg.reverse, g,
        )  # fmt: skip
        return dq, dk, dv, (dh0 if initial_state is not None else None), dg


ENGINE = ChunkEngine(chunk_scan, host_bounds=True)
