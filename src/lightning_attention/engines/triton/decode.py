"""Decode step on a slot-indexed state cache, in Triton: one launch per step, the cache updated in place.

Row n of the batch (one new token of one sequence) owns slot ``s = slot_ids[n]`` of the cache; per head h::

    S      = state_cache[s, h]                            [K, V]  (float32 or bfloat16, accumulated in float32)
    S      = lam_h S + k_n^T v_n                          (lam_h = exp(g_gamma[h]))
    o[n,h] = scale q_n S                                  [V]
    state_cache[s, h] = S

Shapes: q, k ``[N, H, K]``, v ``[N, H, V]``, state_cache ``[num_slots, H, K, V]`` contiguous, slot_ids int
``[N]``, o ``[N, H, V]`` in q's dtype. A row with slot -1 is padding (fixed-size batches for CUDA graphs): its
output is zero and no slot is touched. The kernel also skips any other slot outside ``[0, num_slots)``, so an
unchecked bad id can never read or write outside the cache (serving.py reports it as an error when it checks).

Traffic: the touched state slots dominate (read + written once; q, k, v, o are N x H x (2K + 2V) elements),
so the step is memory-bound and its floor is ``2 * N * H * K * V * bytes(cache dtype) / bandwidth``. A
bfloat16 cache halves it. Each program owns one (row, head, V-block) tile of K x BV, whole along K because
o needs the sum over K (walked in BK-row blocks to bound the registers).

The varlen prefill (:func:`prefill_into_slots`) runs the chunked engine's slot-indexed kernel when it
exists and sequences are long, else the fused recurrent kernel's slot mode (engines/triton/recurrent.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lightning_attention.engines.base import tokens_per_sequence
from lightning_attention.engines.triton import chunk, recurrent
from lightning_attention.engines.triton._common import cdiv, next_power_of_2

__all__ = ["DECODE_CONFIGS", "decode_step", "prefill_into_slots"]

#: (BV, BK, num_warps) per cache dtype: each program owns a K x BV tile of one slot and head, walked in
#: BK-row blocks. Tuned on H100 (benchmarks/bench_decode.py --sweep, benchmarks/results/decode_sweep_h100.md):
#: fp32 (128, 64, 8) ran at 1.055x / 1.021x the floor at N = 64 / 256 (the first guess, (32, 128, 4): 1.16x / 1.14x);
#: bf16 (128, 128, 4) at 1.10x / 1.03x (first guess (64, 128, 4): 1.16x / 1.11x).
DECODE_CONFIGS = {torch.float32: (128, 64, 8), torch.bfloat16: (128, 128, 4)}


@triton.jit
def _decode_kernel(
    q,
    k,
    v,
    o,
    state_cache,
    slot_ids,
    g_gamma,
    scale,
    num_slots,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
):
    i_nh, i_v = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    slot = tl.load(slot_ids + i_n).to(tl.int64)

    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    p_o = o + i_nh.to(tl.int64) * V + o_v
    if (slot < 0) | (slot >= num_slots):
        tl.store(p_o, tl.zeros([BV], dtype=p_o.dtype.element_ty), mask=m_v)
    else:
        lam = tl.exp(tl.load(g_gamma + i_h).to(tl.float32))
        b_v = tl.load(v + i_nh.to(tl.int64) * V + o_v, mask=m_v, other=0).to(tl.float32)
        b_o = tl.zeros([BV], dtype=tl.float32)
        # K is walked in BK-row blocks (unrolled, so the blocks' loads can all be in flight at once); o sums them.
        for i_k in tl.static_range(0, K, BK):
            o_k = i_k + tl.arange(0, BK)
            m_k = o_k < K
            m_h = m_k[:, None] & m_v[None, :]
            p_h = state_cache + (slot * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :]
            b_h = tl.load(p_h, mask=m_h, other=0).to(tl.float32)
            b_q = tl.load(q + i_nh.to(tl.int64) * K + o_k, mask=m_k, other=0).to(tl.float32)
            b_k = tl.load(k + i_nh.to(tl.int64) * K + o_k, mask=m_k, other=0).to(tl.float32)
            b_h = lam * b_h + b_k[:, None] * b_v[None, :]
            b_o += tl.sum(b_h * b_q[:, None], axis=0)
            tl.store(p_h, b_h.to(p_h.dtype.element_ty), mask=m_h)
        tl.store(p_o, (b_o * scale).to(p_o.dtype.element_ty), mask=m_v)


def decode_step(q, k, v, state_cache, slot_ids, g_gamma, scale, config=None):
    """One decode step (see the module docstring); inputs already validated by serving.py. Returns o.

    ``config``: ``(BV, BK, num_warps)`` to override :data:`DECODE_CONFIGS` (benchmark sweeps).
    """
    N, H, K = q.shape
    V = v.shape[-1]
    q, k, v = (x.contiguous() for x in (q, k, v))
    o = torch.empty_like(v, dtype=q.dtype)
    if N * H == 0:
        return o
    BV, BK, num_warps = config if config is not None else DECODE_CONFIGS[state_cache.dtype]
    BV = min(BV, next_power_of_2(V))
    BK = min(BK, next_power_of_2(K))
    grid = (N * H, cdiv(V, BV))
    _decode_kernel[grid](
        q,
        k,
        v,
        o,
        state_cache,
        slot_ids,
        g_gamma,
        float(scale),
        state_cache.shape[0],
        H=H,
        K=K,
        V=V,
        BK=BK,
        BV=BV,
        num_warps=num_warps,
    )
    return o


def prefill_into_slots(q, k, v, g_gamma, scale, cu_seqlens, state_cache, slot_ids, use_initial_state, g=None):
    """Varlen prefill into cache slots, one launch (arguments as recurrent.recurrent_into_slots; ``g``: per-token
    log gates ``[1, T, H]`` or None). Returns o.

    Long prompts (mean length above recurrent.RECURRENT_TRITON_MAX_T) run the chunked kernel, short ones the
    token loop: the same routing rule as the recurrent op.
    """
    args = (q, k, v, g_gamma, scale, cu_seqlens, state_cache, slot_ids, use_initial_state)
    if tokens_per_sequence(q, cu_seqlens) > recurrent.RECURRENT_TRITON_MAX_T:
        return chunk.prefill_into_slots(*args, g=g)
    chunk.check_gates(g, q)
    return recurrent.recurrent_into_slots(*args, g=None if g is None else g.float())
