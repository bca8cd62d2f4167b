"""Stage: the gradient of the per-token gates, dg, from the backward scans' row dots (split sequences only).

Per sequence and head, with F_t = q_t . dq_t and G_t = v_t . dv_t, both without the token's own pair (docs/DESIGN.md,
"Accuracy of dg"; computed in fp32 by the dv and dq scans, chunk_scan.RowDots), the contract's
dg_t = sum over s at or after t in scan order of (F_s - G_s) + <final_state, dht> is, summed the other way::

    dg_t = <h0, dh0> + sum over s before t in scan order of (G_s - F_s)

(the two differ by the total over the sequence, sum_s (F_s - G_s) + <S_T, dht> - <h0, dh0>, which is zero: every
pair of the output and of the final state is counted once in F and once in G, the initial state's by <h0, dh0>).
So dg needs no final state, and its running sum runs in the direction the dq scan walks: each dq program
stores, per token of its segment and V-block, <h0, dh0> (V-block 0) plus the exclusive running sum of G minus its
V-block's F. Summed over the V-blocks that is dg where a sequence is one segment; a split sequence adds to every
token the sums of the segments before its own, which this stage does (one program per segment and row tile).
Shapes: the dq scan's dots ``[NV, R, H]``, totals ``[S, NV, H]``, dg ``[R, H]``, fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lightning_attention.engines.triton._common import (
    SegmentPlan,
    cdiv,
    next_power_of_2,
    segment_bounds,
    segments_before,
)

__all__ = ["gate_gradient"]

#: Rows per program of the combining pass.
_ROWS = 64


@triton.jit
def _combine_kernel(
    dots, totals, dg, seq_offsets, segments, R, H, NV: tl.constexpr, BH: tl.constexpr, RT: tl.constexpr,
    REVERSE: tl.constexpr,
):  # fmt: skip
    i_s, i_t = tl.program_id(0), tl.program_id(1)
    start, end, seq, _ = segment_bounds(segments, i_s, R, REVERSE)
    o_h = tl.arange(0, BH)
    m_h = o_h < H
    n_before, j_first, j_step = segments_before(seq_offsets, seq, i_s, REVERSE)
    carry = tl.zeros([BH], dtype=tl.float32)
    for idx in range(0, n_before):
        j = j_first + j_step * idx
        for b in tl.static_range(NV):
            carry += tl.load(totals + (j * NV + b) * H + o_h, mask=m_h, other=0.0)
    rows = start + i_t * RT + tl.arange(0, RT).to(tl.int64)
    m = (rows < end)[:, None] & m_h[None, :]
    offsets = rows[:, None] * H + o_h[None, :]
    acc = tl.zeros([RT, BH], dtype=tl.float32) + carry[None, :]
    for b in tl.static_range(NV):
        acc += tl.load(dots + b * R * H + offsets, mask=m, other=0.0)
    tl.store(dg + offsets, acc, mask=m)


def gate_gradient(
    dots: torch.Tensor, totals: torch.Tensor | None, plan: SegmentPlan, *, reverse: bool
) -> torch.Tensor:
    """dg fp32 ``[R, H]`` from the dq scan's row dots ``[NV, R, H]`` and, where ``plan`` (the dq scan's) splits
    sequences, its segment sums ``totals`` ``[S, NV, H]``; ``reverse`` is the dq scan's direction."""
    nv, R, H = dots.shape
    if totals is None:
        return dots[0] if nv == 1 else dots.sum(0)
    dg = torch.empty(R, H, dtype=torch.float32, device=dots.device)
    grid = (plan.num_segments, max(1, cdiv(plan.longest, _ROWS)))
    _combine_kernel[grid](
        dots, totals, dg, plan.seq_offsets, plan.segments, R, H,
        NV=nv, BH=next_power_of_2(H), RT=_ROWS, REVERSE=bool(reverse),
    )  # fmt: skip
    return dg
