"""Stages: per-segment local states and the scan across segments (only when sequences are split).

When too few (sequence, head, block) programs exist to fill the GPU, each sequence is cut into segments
(_common.plan_segments) and the state entering every segment is computed first:

    pass 1 (local)   A_s = k_scale * sum_{j in s} lam^(e_s - j) k_j^T v_j         (e_s: the segment's last token)
    pass 2 (passing) S_in(first) = S0,  S_in(s+1) = lam^(len_s - e) S_in(s) + A_s  (e = SHIFT on the first segment)
                     final = lam^SHIFT S_end   (S0 for an empty sequence)

after which the scan of chunk_scan.py (or the fused backward of chunk_bwd.py) runs every segment in
parallel from its S_in. The same combine rule is what context parallelism needs across devices.
Shapes: k ``[R, H, DK]``, v ``[R, H, DV]``; buffer ``[S, H, DK, DV]`` fp32 (A_s, overwritten by S_in(s)).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lightning_attention.engines.triton._common import (
    CHUNK,
    SegmentPlan,
    block_dim,
    cdiv,
    chunk_rows,
    dot_precision,
    load_rows,
    load_state_block,
    mma,
    program_block,
    segment_bounds,
    state_strides,
    store_state_block,
)

#: State block and launch of the two passes (blocks are independent here; K = 256 never meets one tl.dot).
#: Measured on H100 (benchmarks/results/chunk_NOTES.md): pass 1 at 1 x 32768 x 8 x 128 bf16 takes 0.051 ms
#: with 64 x 64 blocks and 4 stages (the k, v read alone: 0.045), 0.058 with 64 x 32, 0.056 with 128 x 64.
_STATE_BLOCK_K = 64
_STATE_BLOCK_V = 64
_LOCAL_WARPS = 4
_LOCAL_STAGES = 4


@triton.jit
def _local_state_kernel(
    k, v, g_gamma, buf, segments, k_scale, H,
    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
    REVERSE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    NV: tl.constexpr = (DV + BV - 1) // BV
    NK: tl.constexpr = (DK + BK - 1) // BK
    i_v, i_k, i_h, i_s = program_block(tl.program_id(0), H, NK, NV)
    start, end, seq, first = segment_bounds(segments, i_s, REVERSE)
    g = tl.load(g_gamma + i_h)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < DK, o_v < DV
    k, v = k + i_h * DK, v + i_h * DV
    state = tl.zeros([BK, BV], dtype=tl.float32)
    length = end - start
    # Every token's weight is closed-form (lam^(tokens after it in the segment)), so the loop is a plain
    # reduction into one accumulator, with no rescaling of it between chunks: the tensor-core products of
    # successive chunks overlap like a GEMM's K loop (on H100 at 1 x 32768 x 8 x 128 bf16: 0.085 -> 0.058 ms).
    for c in range(0, tl.cdiv(length, C)):
        rows, valid = chunk_rows(start, end, c, C, REVERSE)
        b_k = load_rows(k, rows, valid, H * DK, o_k, m_k)
        b_v = load_rows(v, rows, valid, H * DV, o_v, m_v)
        after = (length - 1 - c * C - tl.arange(0, C)).to(tl.float32)
        weight = tl.where(valid, tl.exp(g * tl.maximum(after, 0.0)), 0.0) * k_scale
        state = mma(tl.trans(b_k), (b_v * weight[:, None]).to(b_v.dtype), PRECISION, state)
    # buf is contiguous [S, H, DK, DV]
    store_state_block(
        buf, state, i_s, i_h, H * DK * DV, DK * DV, DV, 1, o_k, o_v, m_k[:, None] & m_v[None, :], buf, False
    )


@triton.jit
def _state_passing_kernel(
    g_gamma, buf, segments, seq_offsets, state_in, state_out, slot_ids, slot_used, H,
    si_n, si_h, si_k, si_v, so_n, so_h, so_k, so_v,
    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    REVERSE: tl.constexpr, SHIFT: tl.constexpr, HAS_STATE_IN: tl.constexpr, STORE_STATE_OUT: tl.constexpr,
    USE_SLOTS: tl.constexpr,
):  # fmt: skip
    NV: tl.constexpr = (DV + BV - 1) // BV
    NK: tl.constexpr = (DK + BK - 1) // BK
    i_v, i_k, i_h, i_n = program_block(tl.program_id(0), H, NK, NV)
    g = tl.load(g_gamma + i_h)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_state = (o_k < DK)[:, None] & (o_v < DV)[None, :]
    state = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_STATE_IN:
        state = load_state_block(
            state_in, i_n, i_h, si_n, si_h, si_k, si_v, o_k, o_v, m_state, slot_ids, slot_used, USE_SLOTS
        )
    s_lo = tl.load(seq_offsets + i_n)
    s_hi = tl.load(seq_offsets + i_n + 1)
    total = 0
    for idx in range(0, s_hi - s_lo):
        if REVERSE:
            i_s = s_hi - 1 - idx
        else:
            i_s = s_lo + idx
        start, end, seq, first = segment_bounds(segments, i_s, REVERSE)
        length = (end - start).to(tl.int32)
        shift = SHIFT * first
        p = buf + i_s.to(tl.int64) * (H * DK * DV) + i_h * (DK * DV) + o_k[:, None] * DV + o_v[None, :]
        local = tl.load(p, mask=m_state, other=0)
        tl.store(p, state, mask=m_state)
        state = state * tl.exp(g * tl.maximum(length - shift, 0).to(tl.float32)) + local
        total += length
    if STORE_STATE_OUT:
        final = state * tl.exp(g * (SHIFT * (total > 0)).to(tl.float32))
        store_state_block(state_out, final, i_n, i_h, so_n, so_h, so_k, so_v, o_k, o_v, m_state, slot_ids, USE_SLOTS)


def segment_states(
    k: torch.Tensor,
    v: torch.Tensor,
    g_gamma: torch.Tensor,
    plan: SegmentPlan,
    *,
    k_scale: float = 1.0,
    reverse: bool,
    shift: int,
    state_in: torch.Tensor | None,
    state_out: torch.Tensor | None = None,
    slot_ids: torch.Tensor | None = None,
    slot_used: torch.Tensor | None = None,
) -> torch.Tensor:
    """Passes 1 and 2: returns S_in, fp32 ``[S, H, DK, DV]``, the state entering each segment of ``plan``
    (``state_out`` [N, H, DK, DV], if given, receives each sequence's final state)."""
    H, DK, DV = k.shape[1], k.shape[2], v.shape[2]
    BK, BV = min(block_dim(DK), _STATE_BLOCK_K), min(block_dim(DV), _STATE_BLOCK_V)
    blocks = cdiv(DK, BK) * cdiv(DV, BV)
    buf = torch.empty(plan.num_segments, H, DK, DV, dtype=torch.float32, device=k.device)
    _local_state_kernel[(plan.num_segments * H * blocks,)](
        k, v, g_gamma, buf, plan.segments, float(k_scale), H,
        DK=DK, DV=DV, BK=BK, BV=BV, C=CHUNK, REVERSE=bool(reverse), PRECISION=dot_precision(k.dtype),
        num_warps=_LOCAL_WARPS, num_stages=_LOCAL_STAGES,
    )  # fmt: skip
    _state_passing_kernel[(plan.num_seqs * H * blocks,)](
        g_gamma, buf, plan.segments, plan.seq_offsets, state_in, state_out, slot_ids, slot_used, H,
        *state_strides(state_in), *state_strides(state_out),
        DK=DK, DV=DV, BK=BK, BV=BV, REVERSE=bool(reverse), SHIFT=int(shift),
        HAS_STATE_IN=state_in is not None, STORE_STATE_OUT=state_out is not None, USE_SLOTS=slot_ids is not None,
        num_warps=4,
    )  # fmt: skip
    return buf
