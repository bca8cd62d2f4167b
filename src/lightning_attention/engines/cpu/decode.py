"""Decode steps and the varlen prefill on a slot-indexed state cache, in torch (CPU; any device without Triton).

Same contract as engines/triton/decode.py. Decode, per row n with slot s = slot_ids[n] (-1 = padding: skipped)
and head h, for its first ``lengths[n]`` tokens t (all L without ``lengths``), with ``a_t = g_gamma[h] + g[n, t, h]``::

    S = exp(a_t) S + k_t^T v_t,    o[n, t, h] = scale q_t S    (S starts as state_cache[s, h]; o zero past lengths[n])

and ``state_cache[s, h] = S`` after the row's last token when the cache is updated. Prefill: sequence n of a
packed batch starts from ``state_cache[slot_ids[n]]`` (zero where ``use_initial_state[n]`` is False), runs the
chunked torch engine, and writes its final state back. The cache (float32 or bfloat16) is read into float32,
updated there, and rounded once per call when stored.

Index values (slots in range and distinct, lengths in [0, L], cu_seqlens) are checked by the caller on the host
(serving.py): this engine reads them there anyway.

Shapes: decode q, k ``[N, L, H, K]``, v ``[N, L, H, V]``, g ``[N, L, H]``, lengths ``[N]`` -> o ``[N, L, H, V]``
(one token: ``[N, H, *]``, g ``[N, H]``);
prefill q, k ``[1, T, H, K]``, v ``[1, T, H, V]``, cu_seqlens ``[N + 1]`` -> o ``[1, T, H, V]``;
state_cache ``[num_slots, H, K, V]``.
"""

from __future__ import annotations

import torch

from lightning_attention._validation import ScanConfig
from lightning_attention.engines.cpu import chunk

__all__ = ["decode_tokens", "prefill_into_slots"]


def decode_tokens(
    q, k, v, state_cache, slot_ids, g_gamma, scale, *, g=None, lengths=None, update_cache=True, write_o=True
):
    """L tokens per row from each row's slot; updates ``state_cache`` in place when ``update_cache``. Returns o
    (zero rows for padding and for tokens past a row's length; None without ``write_o``). One token per row may
    also come as q, k ``[N, H, K]``, v ``[N, H, V]``, g ``[N, H]`` (o ``[N, H, V]``)."""
    if q.dim() == 3:
        gates = None if g is None else g[:, None]
        o = decode_tokens(
            q[:, None], k[:, None], v[:, None], state_cache, slot_ids, g_gamma, scale, g=gates, lengths=lengths,
            update_cache=update_cache, write_o=write_o,
        )  # fmt: skip
        return None if o is None else o[:, 0]
    N, L, H, K = q.shape
    device = state_cache.device
    o = q.new_zeros(N, L, H, v.shape[-1]) if write_o else None
    rows = (slot_ids >= 0).nonzero().squeeze(1).to(device)
    slots = slot_ids.to(device)[rows].long()
    n_tokens = lengths.to(device)[rows] if lengths is not None else torch.full_like(rows, L)
    state = state_cache[slots].float()
    for t in range(L):
        runs = (t < n_tokens)[:, None, None, None]
        log_decay = g_gamma.float()[None, :] + (g[rows, t].float() if g is not None else 0.0)
        # Tokens past a row's length leave its state as it is: decay 1, k^T v = 0 (so the bits stay).
        decay = torch.where(runs, torch.exp(log_decay)[..., None, None], 1.0)
        kv = k[rows, t].float()[..., :, None] * v[rows, t].float()[..., None, :]
        state = decay * state + torch.where(runs, kv, 0.0)
        if write_o:
            o_t = scale * torch.einsum("nhk,nhkv->nhv", q[rows, t].float(), state)
            o[rows, t] = torch.where(runs[..., 0], o_t, 0.0).to(o.dtype)
    if update_cache:
        state_cache[slots] = state.to(state_cache.dtype)
    return o


def prefill_into_slots(q, k, v, g_gamma, scale, cu_seqlens, state_cache, slot_ids, use_initial_state, g=None):
    """Varlen prefill into cache slots (slot ids distinct, in range; ``g`` per-token log gates ``[1, T, H]`` or
    None); updates the cache in place, returns o."""
    slots = slot_ids.to(state_cache.device).long()
    use = use_initial_state.to(state_cache.device)[:, None, None, None]
    # Select, never multiply: an unused slot may hold anything, NaN included.
    h0 = torch.where(use, state_cache[slots].float(), torch.zeros((), device=state_cache.device))
    cfg = ScanConfig(float(scale), reverse=False, chunk_size=64, output_final_state=True)
    o, final = chunk.ENGINE.forward(q, k, v, g_gamma, cfg, h0, cu_seqlens, g=g)
    state_cache[slots] = final.to(state_cache.dtype)
    return o
