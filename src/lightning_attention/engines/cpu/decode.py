"""Decode step and varlen prefill on a slot-indexed state cache, in torch (CPU; any device without Triton).

Same contract as engines/triton/decode.py. Decode, per row n with slot s = slot_ids[n] (-1 = padding) and
head h::

    S = lam_h state_cache[s, h] + k_n^T v_n,    o[n, h] = scale q_n S,    state_cache[s, h] = S

Prefill: sequence n of a packed batch starts from ``state_cache[slot_ids[n]]`` (zero where
``use_initial_state[n]`` is False), runs the chunked torch engine, and writes its final state back. The cache
(float32 or bfloat16) is read into float32, updated there, and rounded once per step when stored.

Shapes: decode q, k ``[N, H, K]``, v ``[N, H, V]`` -> o ``[N, H, V]``; prefill q, k ``[1, T, H, K]``,
v ``[1, T, H, V]``, cu_seqlens ``[N + 1]`` -> o ``[1, T, H, V]``; state_cache ``[num_slots, H, K, V]``.
"""

from __future__ import annotations

import torch

from lightning_attention._validation import ScanConfig
from lightning_attention.engines.cpu import chunk

__all__ = ["decode_step", "prefill_into_slots"]


def decode_step(q, k, v, state_cache, slot_ids, g_gamma, scale):
    """One decode step; updates ``state_cache`` in place and returns o (zero rows for padding)."""
    N, H, K = q.shape
    o = q.new_zeros(N, H, v.shape[-1])
    # Like the Triton kernel, rows whose slot is outside the cache are skipped (padding is -1).
    rows = ((slot_ids >= 0) & (slot_ids < state_cache.shape[0])).nonzero().squeeze(1).to(q.device)
    slots = slot_ids.to(q.device)[rows].long()
    lam = torch.exp(g_gamma.float())[None, :, None, None]
    qr, kr, vr = (x[rows].float() for x in (q, k, v))
    state = lam * state_cache[slots].float() + kr[..., :, None] * vr[..., None, :]
    o[rows] = (scale * torch.einsum("nhk,nhkv->nhv", qr, state)).to(o.dtype)
    state_cache[slots] = state.to(state_cache.dtype)
    return o


def prefill_into_slots(q, k, v, g_gamma, scale, cu_seqlens, state_cache, slot_ids, use_initial_state):
    """Varlen prefill into cache slots (slot ids distinct, in range); updates the cache in place, returns o."""
    slots = slot_ids.to(state_cache.device).long()
    use = use_initial_state.to(state_cache.device)[:, None, None, None]
    # Select, never multiply: an unused slot may hold anything, NaN included.
    h0 = torch.where(use, state_cache[slots].float(), torch.zeros((), device=state_cache.device))
    cfg = ScanConfig(float(scale), reverse=False, chunk_size=64, output_final_state=True)
    o, final = chunk.ENGINE.forward(q, k, v, g_gamma, cfg, h0, cu_seqlens)
    state_cache[slots] = final.to(state_cache.dtype)
    return o
