"""Stage: per-segment local states (only when sequences are split).

When too few (sequence, head, block) programs exist to fill the GPU, each sequence is cut into segments
(_common.plan_segments) and every segment's local state is computed first, from a zero state:

    A_s = k_scale * sum_{j in s} lam^(e_s - j) k_j^T v_j         (e_s: the segment's last token in scan order)

The scan of chunk_scan.py (or the fused backward of chunk_bwd.py) then runs every segment in parallel; each
program first folds the local states of the segments before its own into the state it starts from,
S_in(first) = S0, S_in(s+1) = lam^(len_s - e) S_in(s) + A_s (e = SHIFT on the first segment;
_common.fold_earlier_segments), and the sequence's last segment writes the final state. The same combine
rule is what context parallelism needs across devices. Nothing reads A of a sequence's last segment in scan
order, so the pass skips those segments (zero blocks): (n - 1) / n of k and v are read for n segments.
Per-token gates: lam^(e_s - j) becomes exp(sum of the log decays after token j in the segment), and the pass
also stores each segment's total log decay, by which the scans' fold carries the state across it.
Shapes: k ``[R, H, DK]``, v ``[R, H, DV]``; A ``[S, H, DK, DV]`` fp32; totals ``[S, H]`` fp32 (log2-scaled).
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
    cdiv,
    chunk_rows,
    dot_precision,
    fewer_stages,
    fitting,
    is_last_segment,
    gated_decays,
    load_gates,
    load_rows,
    mma,
    program_block,
    segment_bounds,
    store_state_block,
    tf32_operand,
)

#: State block and launch of the pass (blocks are independent here; K = 256 never meets one tl.dot).
#: 64 x 64 blocks run the pass close to the time of reading k and v alone (benchmarks/results/h100/kernel_choices.md).
_STATE_BLOCK_K = 64
_STATE_BLOCK_V = 64
_LOCAL_WARPS = 4
_LOCAL_STAGES = 4


@triton.jit
def _local_state_kernel(
    k, v, g_gamma, buf, segments, k_scale, R, H, gates, totals,
    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
    REVERSE: tl.constexpr, PRECISION: tl.constexpr, SHIFT: tl.constexpr,
):  # fmt: skip
    HAS_G: tl.constexpr = gates is not None
    NV: tl.constexpr = (DV + BV - 1) // BV
    NK: tl.constexpr = (DK + BK - 1) // BK
    i_v, i_k, i_h, i_s = program_block(tl.program_id(0), H, NK, NV)
    start, end, seq, first = segment_bounds(segments, i_s, R, REVERSE)
    g = tl.load(g_gamma + i_h)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < DK, o_v < DV
    k, v = k + i_h * DK, v + i_h * DV
    state = tl.zeros([BK, BV], dtype=tl.float32)
    # The last segment of a sequence in scan order hands its state to no later one (the scans fold only the
    # segments before their own): its programs read nothing and store a zero block.
    length = tl.where(is_last_segment(segments, i_s, REVERSE), 0, end - start)
    if HAS_G:
        # Per-token gates: a token's weight is exp(the log decays after it in the segment). The chunks are walked
        # from the segment's end, carrying the sum of the later chunks' decays (log2-scaled), so that every weight
        # is again known when its chunk is read and the loop stays a plain reduction.
        n_chunks = tl.cdiv(length, C)
        after = tl.zeros([], dtype=tl.float32)
        for i in range(0, n_chunks):
            c = n_chunks - 1 - i
            rows, valid = chunk_rows(start, end, c, C, REVERSE)
            b_k = load_rows(k, rows, valid, H * DK, o_k, m_k)
            b_v = load_rows(v, rows, valid, H * DV, o_v, m_v)
            at_start = (c * C + tl.arange(0, C) == 0) & (first != 0)
            a = load_gates(gates, g, rows, valid, at_start, R, H, i_h, SHIFT, REVERSE)
            # (weights from the pair sums of _common.gate_sums: the exponent of the tokens near the segment's end
            # is small however large the chunk's sums are)
            exact: tl.constexpr = b_v.dtype == tl.float32
            _, k_decay, block_decay, hi, lo = gated_decays(a, tl.minimum(length - c * C, C), C, False, exact)
            weight = k_decay * tl.exp2(after) * k_scale
            b_v = tf32_operand((b_v * weight[:, None]).to(b_v.dtype), PRECISION)
            state = mma(tl.trans(tf32_operand(b_k, PRECISION)), b_v, PRECISION, state)
            last = tl.arange(0, C) == tl.minimum(length - c * C, C) - 1
            after += tl.sum(tl.where(last, hi, 0.0), axis=0)
            if exact:
                after += tl.sum(tl.where(last, lo, 0.0), axis=0)
        tl.store(totals + i_s * H + i_h, after, mask=(i_k == 0) & (i_v == 0))
    else:
        # Every token's weight is closed-form (lam^(tokens after it in the segment)), so the loop is a plain
        # reduction into one accumulator, with no rescaling of it between chunks: the tensor-core products of
        # successive chunks overlap like a GEMM's K loop (kernel_choices.md: a third faster than rescaling).
        for c in range(0, tl.cdiv(length, C)):
            rows, valid = chunk_rows(start, end, c, C, REVERSE)
            b_k = load_rows(k, rows, valid, H * DK, o_k, m_k)
            b_v = load_rows(v, rows, valid, H * DV, o_v, m_v)
            after = (length - 1 - c * C - tl.arange(0, C)).to(tl.float32)
            weight = tl.where(valid, tl.exp(g * tl.maximum(after, 0.0)), 0.0) * k_scale
            b_v = tf32_operand((b_v * weight[:, None]).to(b_v.dtype), PRECISION)
            state = mma(tl.trans(tf32_operand(b_k, PRECISION)), b_v, PRECISION, state)
    # buf is contiguous [S, H, DK, DV]
    store_state_block(
        buf, state, i_s, i_h, H * DK * DV, DK * DV, DV, 1, o_k, o_v, m_k[:, None] & m_v[None, :], buf, False
    )


@dataclass(frozen=True)
class LocalStates:
    """Pass 1's results: ``states`` fp32 ``[S, H, DK, DV]`` and, with per-token gates, ``totals`` fp32 ``[S, H]``
    (each segment's total log decay, log2-scaled), both views of one contiguous buffer ``storage`` (what the
    forward hands to the backward: engines/base.py's ``saved`` is one tensor)."""

    states: torch.Tensor
    totals: torch.Tensor | None
    storage: torch.Tensor

    @classmethod
    def allocate(cls, segments: int, heads: int, dk: int, dv: int, gated: bool, device) -> LocalStates:
        n = segments * heads * dk * dv
        storage = torch.empty(n + (segments * heads if gated else 0), dtype=torch.float32, device=device)
        return cls.view(storage, segments, heads, dk, dv, gated)

    @classmethod
    def view(cls, storage: torch.Tensor, segments: int, heads: int, dk: int, dv: int, gated: bool) -> LocalStates:
        """The states (``[S, H, DK, DV]``) and totals in ``storage`` (``allocate``'s)."""
        n = segments * heads * dk * dv
        totals = storage[n:].view(segments, heads) if gated else None
        return cls(storage[:n].view(segments, heads, dk, dv), totals, storage)


def local_states(
    k: torch.Tensor, v: torch.Tensor, g_gamma: torch.Tensor, plan: SegmentPlan, *, k_scale: float = 1.0,
    reverse: bool, gates: torch.Tensor | None = None, shift: int = 0,
) -> LocalStates:  # fmt: skip
    """Pass 1: A_s, fp32 contiguous ``[S, H, DK, DV]``, the local state of every segment of ``plan`` (from a zero
    state, in scan direction ``reverse``), for the scans' :func:`_common.fold_earlier_segments`; zero for each
    sequence's last segment in scan order, which no scan reads. ``gates`` fp32 ``[R, H]`` (per-token log gates,
    added to g_gamma; ``shift``: the scan's SHIFT, whose gates are shifted by one token, _common.load_gates):
    the weights come from the gates, and each segment's total log decay is returned too (not for the last
    segments, which no scan reads)."""
    H, DK, DV = k.shape[1], k.shape[2], v.shape[2]
    BK, BV = min(block_dim(DK), _STATE_BLOCK_K), min(block_dim(DV), _STATE_BLOCK_V)
    blocks = cdiv(DK, BK) * cdiv(DV, BV)
    out = LocalStates.allocate(plan.num_segments, H, DK, DV, gates is not None, k.device)
    precision = dot_precision(k.dtype)

    key = ("local_states", k.device, DK, DV, k.dtype, precision, gates is not None)
    for attempt in fitting(key, fewer_stages(_LOCAL_STAGES)):
        with attempt:
            _local_state_kernel[(plan.num_segments * H * blocks,)](
                k, v, g_gamma, out.states, plan.segments, float(k_scale), k.shape[0], H, gates, out.totals,
                DK=DK, DV=DV, BK=BK, BV=BV, C=CHUNK, REVERSE=bool(reverse), PRECISION=precision, SHIFT=int(shift),
                num_warps=_LOCAL_WARPS, num_stages=attempt.variant,
            )  # fmt: skip
    return out
