"""Fused recurrent scan in Triton: one program walks one (sequence, head, V-block) token by token, its
slice of the state held in registers for the whole sequence.

The scan contract of engines/base.py, per sequence and head (lam_t = exp(a_t), a_t = g_gamma + g_t with per-token
gates g, else g_gamma; 1-based t = 1..L in scan order)::

    shift = 0:  S_t = lam_t S_{t-1} + k_t^T v_t,    o_t = scale q_t S_t,   final = S_L      (S_0 = S0)
    shift = 1:  S_t = S_{t-1}' + k_t^T v_t,         o_t = scale q_t S_t,   S_t' = lam_t S_t,  final = S_L'

(shift 1 is the backward's: the incoming state enters undecayed and the final one is decayed once more.)
``reverse`` walks t = L..1. Shapes: q, k ``[B, T, H, K]``, v ``[B, T, H, V]`` (any float dtypes, read as the
state dtype), g ``[B, T, H]`` or None, o ``[B, T, H, V]`` in q's dtype, states ``[N, H, K, V]`` float32 (float64
for float64 inputs). The engine's backward with gates is the chunked engine's (the same math, and dg).

The same kernel reads the initial state from, and writes the final state into, an indexed *slot* of a state
cache ``[num_slots, H, K, V]`` (float32 or bfloat16, accumulated in float32): that is the varlen prefill of
the serving API (engines/triton/decode.py), one launch over a packed batch.

Each program reads all of q, k for its head (V / BV times over the grid) and keeps a K x BV state: the work
per token is K * BV multiply-adds, a short dependency chain that the chunked kernels avoid. For long
sequences the engine below therefore routes to the chunked engine (same math; see RECURRENT_TRITON_MAX_T).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lightning_attention.engines.base import LengthRoutedEngine, ScanEngine, engine_keywords
from lightning_attention.engines.cpu._common import compute_dtype
from lightning_attention.engines.triton import chunk, tuning
from lightning_attention.engines.triton._common import cdiv, next_power_of_2

__all__ = [
    "RECURRENT_TRITON_MAX_T",
    "TOKEN_LOOP",
    "recurrent_config",
    "recurrent_scan",
    "recurrent_into_slots",
    "ENGINE",
]

#: Mean tokens per sequence above which the Triton recurrent op runs the chunked engine (engines/triton/chunk.py)
#: instead of the token loop. Measured on H100 (benchmarks/bench_recurrent.py, K = V = 128, bf16;
#: benchmarks/results/h100/recurrent.md): the loop does ~K * BV dependent multiply-adds per token (0.6 us per
#: token at B=4, H=16) and ties with the one-chunk chunked kernel at T = 16 (1.04x; 0.60x at B=16, H=32), but is
#: 1.5-1.9x slower at T = 32 and 12-18x at T = 8192. So the loop only serves very short inputs (a few decode
#: tokens per sequence, short prefills), where its single launch without a segment plan wins.
RECURRENT_TRITON_MAX_T = 16


@tuning.cached
def recurrent_config(device: torch.device) -> tuple[int, int]:
    """(state tile elements K x BV per program, num_warps) on ``device``'s card (tuning.py). On H100 4096 fp32
    elements at 4 warps, ~32 registers per thread for the state: more columns per program re-read q and k less
    often but make fewer programs (benchmarks/results/h100/recurrent.md, the sweep)."""
    entry = tuning.lookup("recurrent", "any", device)
    return entry["state_tile"], entry["num_warps"]


def _block_v(K: int, V: int, state_tile: int) -> int:
    BK = next_power_of_2(K)
    return max(16, min(next_power_of_2(V), state_tile // BK))


@triton.jit
def _recurrent_kernel(
    q,
    k,
    v,
    o,
    h0,
    ht,
    slot_ids,
    use_h0,
    cu_seqlens,
    g_gamma,
    gates,
    scale,
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    ACC: tl.constexpr,
    SHIFT: tl.constexpr,
    REVERSE: tl.constexpr,
):
    i_nh, i_v = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    if cu_seqlens is not None:
        # Offsets read on the device are clamped to the T packed rows: nothing checks them on the host here
        # (ops.py checks them where it can without a device sync), and a bad one must not move a load or store
        # outside the tensors. A decreasing pair is an empty sequence.
        bos = tl.minimum(tl.maximum(tl.load(cu_seqlens + i_n).to(tl.int64), 0), T)
        eos = tl.minimum(tl.maximum(tl.load(cu_seqlens + i_n + 1).to(tl.int64), bos), T)
    else:
        bos = i_n.to(tl.int64) * T
        eos = bos + T
    L = eos - bos
    slot = tl.load(slot_ids + i_n).to(tl.int64) if slot_ids is not None else i_n.to(tl.int64)
    live = slot >= 0  # slot -1: a sequence the serving prefill rejected (engines/triton/decode.py); no state touched

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_h = m_k[:, None] & m_v[None, :]
    o_h = (slot * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :]
    log_lam = tl.load(g_gamma + i_h).to(ACC)
    lam = tl.exp(log_lam)

    b_h = tl.zeros([BK, BV], dtype=ACC)
    if h0 is not None:
        b_h = tl.load(h0 + o_h, mask=m_h & live, other=0).to(ACC)
        if use_h0 is not None:
            # Select, never multiply: an unused cache slot may hold anything, NaN included.
            b_h = tl.where(tl.load(use_h0 + i_n) != 0, b_h, 0.0)

    # Token pointers at the first position walked; `step` moves them one token (backwards when reversed).
    start = eos - 1 if REVERSE else bos
    step = -H if REVERSE else H
    p_q = q + (start * H + i_h) * K + o_k
    p_k = k + (start * H + i_h) * K + o_k
    p_v = v + (start * H + i_h) * V + o_v
    p_o = o + (start * H + i_h) * V + o_v
    # Token t + 1 is loaded while token t is computed: the loads do not depend on the state, so their latency
    # leaves the per-token dependency chain.
    has_token = L > 0
    b_q = tl.load(p_q, mask=m_k & has_token, other=0).to(ACC)
    b_k = tl.load(p_k, mask=m_k & has_token, other=0).to(ACC)
    b_v = tl.load(p_v, mask=m_v & has_token, other=0).to(ACC)
    if gates is not None:  # the token's decay exp(g_gamma + g_t), gates [B * T, H]
        p_g = gates + start * H + i_h
        b_lam = tl.exp(log_lam + tl.load(p_g, mask=has_token, other=0).to(ACC))
    for t in range(0, L):
        has_next = t + 1 < L
        n_q = tl.load(p_q + step * K, mask=m_k & has_next, other=0).to(ACC)
        n_k = tl.load(p_k + step * K, mask=m_k & has_next, other=0).to(ACC)
        n_v = tl.load(p_v + step * V, mask=m_v & has_next, other=0).to(ACC)
        if gates is not None:
            decay = b_lam
            b_lam = tl.exp(log_lam + tl.load(p_g + step, mask=has_next, other=0).to(ACC))
            p_g += step
        else:
            decay = lam
        if SHIFT == 0:
            b_h = decay * b_h + b_k[:, None] * b_v[None, :]
        else:
            b_h = b_h + b_k[:, None] * b_v[None, :]
        b_o = tl.sum(b_h * b_q[:, None], axis=0) * scale
        tl.store(p_o, b_o.to(p_o.dtype.element_ty), mask=m_v)
        if SHIFT == 1:
            b_h = decay * b_h
        b_q, b_k, b_v = n_q, n_k, n_v
        p_q += step * K
        p_k += step * K
        p_v += step * V
        p_o += step * V
    tl.store(ht + o_h, b_h.to(ht.dtype.element_ty), mask=m_h & live)


def _launch(
    q, k, v, g_gamma, scale, h0, final, *, shift, reverse, cu_seqlens, slot_ids=None, use_h0=None, g=None
):  # fmt: skip
    """Run the kernel; writes ``o`` (returned) and ``final`` (rows ``slot_ids`` of it when given) in place."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    q, k, v = (x.contiguous() for x in (q, k, v))
    o = torch.empty_like(v, dtype=q.dtype)
    acc = tl.float64 if compute_dtype(q, k, v, h0) == torch.float64 else tl.float32
    state_tile, num_warps = recurrent_config(q.device)
    BK, BV = next_power_of_2(K), _block_v(K, V, state_tile)
    if N * H == 0:
        return o
    grid = (N * H, cdiv(V, BV))  # N * H first: grid dims 1 and 2 are limited to 65535
    _recurrent_kernel[grid](
        q,
        k,
        v,
        o,
        h0,
        final,
        slot_ids,
        use_h0,
        cu_seqlens,
        g_gamma,
        None if g is None else g.contiguous(),
        float(scale),
        T,
        H=H,
        K=K,
        V=V,
        BK=BK,
        BV=BV,
        ACC=acc,
        SHIFT=shift,
        REVERSE=bool(reverse),
        num_warps=num_warps,
    )
    return o


def recurrent_scan(q, k, v, g_gamma, scale, state, shift, reverse, cu_seqlens, chunk_size, g=None):
    """The scan contract of engines/base.py, token by token on the GPU (chunk_size is unused). ``g``: per-token
    log gates ``[B, T, H]`` (read as the state dtype; added to g_gamma) or None."""
    B, T, H, K = q.shape
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    final = q.new_empty(N, H, K, v.shape[-1], dtype=compute_dtype(q, k, v, state))
    h0 = None if state is None else state.to(final.dtype).contiguous()
    g_gamma = g_gamma.to(device=q.device, dtype=torch.float32).contiguous()
    return _launch(
        q, k, v, g_gamma, scale, h0, final, shift=shift, reverse=reverse, cu_seqlens=cu_seqlens, g=g
    ), final


def recurrent_into_slots(q, k, v, g_gamma, scale, cu_seqlens, state_cache, slot_ids, use_initial_state, g=None):
    """Varlen forward that starts sequence n from ``state_cache[slot_ids[n]]`` (or zero where
    ``use_initial_state[n]`` is False) and writes its final state back into that slot, in place. One launch.

    q, k ``[1, T, H, K]``, v ``[1, T, H, V]``, cu_seqlens int ``[N + 1]``, state_cache ``[num_slots, H, K, V]``
    float32/bfloat16 contiguous, slot_ids int ``[N]`` distinct and in range, or -1 for a sequence whose state is
    neither read nor written (checked by the caller), use_initial_state bool/int ``[N]``, g ``[1, T, H]`` per-token
    log gates or None. Returns o ``[1, T, H, V]`` in q's dtype.
    """
    g_gamma = g_gamma.to(device=q.device, dtype=torch.float32).contiguous()
    return _launch(
        q,
        k,
        v,
        g_gamma,
        scale,
        state_cache,
        state_cache,
        shift=0,
        reverse=False,
        cu_seqlens=cu_seqlens,
        slot_ids=slot_ids,
        use_h0=use_initial_state,
        g=g,
    )


class TokenLoopEngine(ScanEngine):
    """engines/base.ScanEngine on the token-loop kernel, with per-token gates: their forward is the loop, their
    backward the chunked engine's (the same math; the loop has no dg). Without gates, the base engine's."""

    def forward(self, q, k, v, g_gamma, cfg, initial_state, cu_seqlens, g=None, cu_seqlens_cpu=None):
        return self.scan(q, k, v, g_gamma, cfg.scale, initial_state, 0, cfg.reverse, cu_seqlens, cfg.chunk_size, g=g)

    def backward(self, q, k, v, g_gamma, cfg, initial_state, cu_seqlens, do, dht, g=None, cu_seqlens_cpu=None):
        if g is not None:
            extra = engine_keywords(g, cu_seqlens_cpu)
            return chunk.ENGINE.backward(q, k, v, g_gamma, cfg, initial_state, cu_seqlens, do, dht, **extra)
        return super().backward(q, k, v, g_gamma, cfg, initial_state, cu_seqlens, do, dht)


TOKEN_LOOP = TokenLoopEngine(recurrent_scan)

#: The recurrent op's engine: the token loop up to ``ENGINE.max_tokens`` tokens per sequence, chunked above.
ENGINE = LengthRoutedEngine(TOKEN_LOOP, chunk.ENGINE, RECURRENT_TRITON_MAX_T)
