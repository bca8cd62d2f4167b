"""Token-by-token scan in torch: the CPU recurrent engine, for short sequences (decode, T <= a few chunks).

    S_t = exp(a_t) S_{t-1} + k_t^T v_t,    o_t = q_t S_t       (from S_0 = the given state, or 0; see _common.py)

with a_t the log decay of token t (a constant per head, or per token). Vectorised over batch and heads, one small
batched op per token; its backward is the same scan on other inputs (engines/base.py; with per-token gates the
chunked engine's backward, which forms dg), so nothing is recorded per token.
"""

from __future__ import annotations

import torch

from lightning_attention.engines.base import LengthRoutedEngine, ScanEngine
from lightning_attention.engines.cpu import chunk
from lightning_attention.engines.cpu._common import run_scan


def recurrent_scan_dense(q, k, v, log_decay, state):
    """Unscaled scan from ``state`` [B, H, K, V] or None (engines/cpu/_common.py's DenseScan); log_decay [H] or
    [B, H, T]."""
    B, H, T, K = q.shape
    V = v.shape[-1]
    if log_decay.dim() == 1:
        decay = torch.exp(log_decay)[None, :, None, None].expand(B, H, T, 1)
    else:
        decay = torch.exp(log_decay).to(q.dtype)[..., None]  # [B, H, T, 1]
    state = state.clone() if state is not None else q.new_zeros(B, H, K, V)
    o = q.new_empty(B, H, T, V)
    for t in range(T):
        state = torch.baddbmm(
            (decay[:, :, t, :, None] * state).reshape(B * H, K, V),
            k[:, :, t].reshape(B * H, K, 1),
            v[:, :, t].reshape(B * H, 1, V),
        ).view(B, H, K, V)
        o[:, :, t] = (q[:, :, t, None, :] @ state).squeeze(-2)
    return o, state


def recurrent_scan(q, k, v, g_gamma, scale, state, shift, reverse, cu_seqlens, chunk_size, g=None):
    """The scan contract of engines/base.py, one token at a time (chunk_size is unused)."""
    return run_scan(recurrent_scan_dense, q, k, v, g_gamma, scale, state, shift, reverse, cu_seqlens, g)


#: Above this many tokens per sequence (mean) the torch recurrent op runs the chunked scan: a token loop costs a
#: few small kernel calls per token, the chunked form a few large ones per 64 tokens.
RECURRENT_MAX_T = 64

TOKEN_LOOP = ScanEngine(recurrent_scan, host_bounds=True)

#: The recurrent op's engine: the token loop up to ``ENGINE.max_tokens`` tokens per sequence, chunked above.
ENGINE = LengthRoutedEngine(TOKEN_LOOP, chunk.ENGINE, RECURRENT_MAX_T)
