"""Stage: dk and dv in one pass, from the state gradient D held on chip (the backward's reverse scan).

D_t = lam D_{t+1} + scale q_t^T do_t (D_T = dht + scale q_T^T do_T, entering undecayed), dk_t = D_t v_t,
dv_t = k_t D_t. One program per (segment, head) holds the whole D ``[K, V]`` (fp32) and walks the chunks in
the scan direction opposite to the forward's. Per chunk (local i, j in that order, D entering the chunk)::

    dv = ((K Q^T) . M) dO * scale + diag(lam^(i+1-e)) K D          M_ij = lam^(i-j) if i >= j else 0
    dk = ((V dO^T) . M) Q * scale + diag(lam^(i+1-e)) V D^T
    D' = lam^(n-e) D + scale (diag(lam^(n-1-j)) Q)^T dO            dh0 = lam D_1 (dht for an empty sequence)

q, k, v, do are read once and dk, dv written once: no per-chunk state, no second scan for dk.
Used for small heads (see use_fused_dkdv); larger heads use two scans of chunk_scan.py. With per-token gates the
decays come from the gates' sums (chunk_scan.py), the D scan reading each token's predecessor's gate, and dv's
intra-chunk product leaves out each token's own pair until G_t = v_t . dv_t (dg's row dot) is stored.
Shapes: q, k, dk ``[R, H, DK]``; v, do, dv ``[R, H, DV]``; dht, dh0 ``[N, H, DK, DV]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from lightning_attention.engines.triton._common import (
    CHUNK,
    SegmentPlan,
    block_dim,
    chunk_decays,
    chunk_gate_decays,
    chunk_rows,
    dot_precision,
    fewer_stages,
    fitting,
    fold_earlier_segments,
    gated_mask,
    intra_decay,
    is_last_segment,
    load_rows,
    load_state_block,
    mma,
    program_block,
    segment_bounds,
    state_strides,
    store_rows,
    store_state_block,
    tf32_operand,
)
from lightning_attention.engines.triton import tuning
from lightning_attention.engines.triton.chunk_state import LocalStates
from lightning_attention.engines.triton.options import options

#: Largest padded K * V the fused kernel takes: at 64 x 64 it ties with the scans, at 128 x 128 it spills and loses
#: (benchmarks/results/h100/kernel_choices.md, "Fused dk/dv kernel"); sizes in between were not measured and take
#: the scans, whose speed is known.
FUSED_MAX_STATE = 64 * 64


@dataclass(frozen=True)
class DkDvConfig:
    num_warps: int
    num_stages: int
    chunk: int = CHUNK


@tuning.cached
def dkdv_config(dtype: torch.dtype, device: torch.device) -> DkDvConfig:
    """The fused kernel's launch configuration on ``device``'s card (tuning.py): cases "16bit" and "fp32"."""
    return DkDvConfig(**tuning.lookup("dkdv", "fp32" if dtype == torch.float32 else "16bit", device))


def use_fused_dkdv(dk: int, dv: int, gated: bool = False) -> bool:
    """Whether the fused kernel runs (else two scans of chunk_scan.py, which read q and do twice but run at the
    forward kernel's efficiency; benchmarks/results/h100/kernel_choices.md); ``gated``: with per-token gates,
    which take the scans unless the options say otherwise (options.TritonOptions.fused_dkdv_with_gates)."""
    return block_dim(dk) * block_dim(dv) <= FUSED_MAX_STATE and (options().fused_dkdv_with_gates or not gated)


@triton.jit
def _dkdv_kernel(
    q, k, v, do, dk, dv, g_gamma, state_in, state_out, local_states, seq_offsets, segments,
    scale, R, H,
    si_n, si_h, si_k, si_v, so_n, so_h, so_k, so_v,
    gates, gate_totals, dot_out,
    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
    REVERSE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    HAS_G: tl.constexpr = gates is not None
    _, _, i_h, i_s = program_block(tl.program_id(0), H, 1, 1)
    start, end, seq, first = segment_bounds(segments, i_s, R, REVERSE)
    g = tl.load(g_gamma + i_h)
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_k, m_v = o_k < DK, o_v < DV
    m_state = m_k[:, None] & m_v[None, :]
    q, k, dk = q + i_h * DK, k + i_h * DK, dk + i_h * DK
    v, do, dv = v + i_h * DV, do + i_h * DV, dv + i_h * DV

    state = tl.zeros([BK, BV], dtype=tl.float32)
    if state_in is not None:
        state = load_state_block(
            state_in, seq, i_h, si_n, si_h, si_k, si_v, o_k, o_v, m_state, segments, segments, False
        )
    if local_states is not None:
        state = fold_earlier_segments(
            state, local_states, seq_offsets, segments, i_s, seq, i_h, g, H * DK * DV, DK * DV, DV, 1, o_k, o_v,
            m_state, R, 1, REVERSE, gate_totals, H, HAS_G,
        )  # fmt: skip
    if HAS_G:
        mask = g  # (unused: the gated mask is made per chunk)
    else:
        mask = intra_decay(g, C) * scale
    length = end - start
    for c in range(0, tl.cdiv(length, C)):
        rows, valid = chunk_rows(start, end, c, C, REVERSE)
        # (pointer loads put every tile in registers: all four are rounded for TF32 products, see tf32_operand)
        b_q = tf32_operand(load_rows(q, rows, valid, H * DK, o_k, m_k), PRECISION)
        b_k = tf32_operand(load_rows(k, rows, valid, H * DK, o_k, m_k), PRECISION)
        b_v = tf32_operand(load_rows(v, rows, valid, H * DV, o_v, m_v), PRECISION)
        b_do = tf32_operand(load_rows(do, rows, valid, H * DV, o_v, m_v), PRECISION)
        if HAS_G:
            q_decay, k_decay, block_decay, b_hi, b_lo = chunk_gate_decays(
                gates, g, rows, valid, c, length, first, R, H, i_h, C, 1, REVERSE, False, b_q.dtype == tl.float32
            )
            chunk_mask = gated_mask(b_hi, b_lo, C, False, b_q.dtype == tl.float32) * scale
        else:
            q_decay, k_decay, block_decay = chunk_decays(g, c, length, first, C)
            chunk_mask = mask
        b_state = tf32_operand(state.to(b_q.dtype), PRECISION)

        kq = mma(b_k, tl.trans(b_q), PRECISION)
        if HAS_G:
            # dv without each token's own pair, G_t = v_t . dv_t (dg's row dot, fp32), then the own pairs added
            eye = tl.arange(0, C)[:, None] == tl.arange(0, C)[None, :]
            diag = tf32_operand(tl.where(eye, kq * scale, 0.0).to(b_do.dtype), PRECISION)
            scores = tf32_operand((kq * tl.where(eye, 0.0, chunk_mask)).to(b_do.dtype), PRECISION)
        else:
            scores = tf32_operand((kq * chunk_mask).to(b_do.dtype), PRECISION)
        b_dv = mma(scores, b_do, PRECISION)
        b_dv += mma(tf32_operand((b_k * q_decay[:, None]).to(b_k.dtype), PRECISION), b_state, PRECISION)
        if HAS_G:
            tl.store(dot_out + rows * H + i_h, tl.sum(b_v.to(tl.float32) * b_dv, axis=1), mask=valid)
            b_dv = mma(diag, b_do, PRECISION, b_dv)
        store_rows(dv, b_dv, rows, valid, H * DV, o_v, m_v)

        scores = tf32_operand((mma(b_v, tl.trans(b_do), PRECISION) * chunk_mask).to(b_q.dtype), PRECISION)
        b_dk = mma(scores, b_q, PRECISION)
        b_dk += mma(tf32_operand((b_v * q_decay[:, None]).to(b_v.dtype), PRECISION), tl.trans(b_state), PRECISION)
        store_rows(dk, b_dk, rows, valid, H * DK, o_k, m_k)

        b_qd = tf32_operand((b_q * (k_decay * scale)[:, None]).to(b_q.dtype), PRECISION)
        state = state * block_decay + mma(tl.trans(b_qd), b_do, PRECISION)
    if state_out is not None:
        if HAS_G:  # dh0 = exp(a_1) D_1: the gate of the D scan's last token (the forward's first)
            if REVERSE:
                last = start
            else:
                last = end - 1
            a_last = tl.load(gates + last * H + i_h, mask=length > 0, other=0.0) + g
            final = state * tl.exp(tl.where(length > 0, a_last, 0.0))
        else:
            final = state * tl.exp(g * (length > 0).to(tl.float32))
        m_out = m_state & is_last_segment(segments, i_s, REVERSE)
        store_state_block(state_out, final, seq, i_h, so_n, so_h, so_k, so_v, o_k, o_v, m_out, segments, False)


def dkdv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    do: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    g_gamma: torch.Tensor,
    plan: SegmentPlan,
    *,
    scale: float,
    reverse: bool,
    state_in: torch.Tensor | None,
    local_states: LocalStates | None = None,
    state_out: torch.Tensor | None = None,
    gates: torch.Tensor | None = None,
    dots: torch.Tensor | None = None,
) -> None:
    """Write dk, dv (and dh0 into ``state_out`` if given). ``reverse`` is the direction of the D scan (the
    opposite of the forward's); ``state_in`` is dht ``[N, H, K, V]`` or None; ``local_states`` (when
    ``plan.split``) chunk_state.local_states of (q, do) with k_scale = scale (and, with gates, shift = 1).
    ``gates`` fp32 ``[R, H]``: per-token log gates; then ``dots`` fp32 ``[1, R, H]`` receives G_t = v_t . dv_t
    without the token's own pair (chunk_scan.RowDots, mode 1)."""
    if (gates is None) != (dots is None):
        raise ValueError("the fused dk/dv kernel writes row dots exactly when it has per-token gates")
    H, DK, DV = q.shape[1], q.shape[2], v.shape[2]
    cfg = dkdv_config(q.dtype, q.device)
    precision = dot_precision(q.dtype)

    locals_ = local_states if local_states is not None else LocalStates(None, None, None)
    key = ("dkdv", q.device, DK, DV, q.dtype, precision, gates is not None)
    for attempt in fitting(key, fewer_stages(cfg.num_stages)):
        with attempt:
            _dkdv_kernel[(plan.num_segments * H,)](
                q, k, v, do, dk, dv, g_gamma, state_in, state_out, locals_.states, plan.seq_offsets, plan.segments,
                float(scale), q.shape[0], H, *state_strides(state_in), *state_strides(state_out),
                gates, locals_.totals, dots,
                DK=DK, DV=DV, BK=block_dim(DK), BV=block_dim(DV), C=cfg.chunk,
                REVERSE=bool(reverse), PRECISION=precision, num_warps=cfg.num_warps, num_stages=attempt.variant,
            )  # fmt: skip
