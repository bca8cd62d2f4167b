"""Stage: the chunked scan with the state on chip (forward output, and the backward's dq).

One program per (segment, head, V-block) walks its segment's chunks in scan order. Per chunk of C tokens
(local i, j in scan order; S the state entering the chunk, fp32 ``[K, BV]`` in registers)::

    O  = scale * ( ((Q K^T * k_scale) . M) V  +  diag(lam^(i+1-e)) Q S ),     M_ij = lam^(i-j) if i >= j else 0
    S' = lam^(n-e) S + k_scale * (diag(lam^(n-1-j)) K)^T V                      (n tokens in this chunk)

``e = SHIFT`` on the first chunk of a sequence (the shift of engines/base.py: 0 for the forward, 1 for the
backward's state-gradient scans, where dht enters undecayed), else 0. Nothing per chunk is written
to memory: HBM traffic is q, k, v read once and o written once per V-block.
The final state is ``lam^SHIFT S`` (``S0`` itself for an empty sequence).

Split sequences: a program first folds the local states of the segments before its own into its entering
state (_common.fold_earlier_segments), and the sequence's last segment writes the final state. Paired launch
(the backward's dv and dk): every program has a twin running the transposed scan (k and v swapped, the state
transposed) over the same rows, so that the rows both read come from L2 once.

Per-token gates (``gates`` [R, H] fp32, added to g_gamma; HAS_G): lam^(i-j) becomes exp(b_i - b_j), with b the
inclusive cumulative sums of the chunk's log decays in scan order (fp32, log2-scaled; _common.gated_decays):
q_decay exp(b_i), k_decay exp(b_last - b_j), the chunk's decay exp(b_last), M masked on the exponent before exp.
A SHIFT scan reads each token's predecessor's gate (_common.load_gates), and split sequences fold the local
states with each segment's total decay. The backward's dq and dv scans also give dg's per-token row dots
(RowDots): their intra-chunk product leaves out each token's own pair, the dot is taken from the fp32
accumulator, then the pairs are added by a product with the diagonal.

K is one block (DK <= 128) or two halves of 128 whose products are summed (DK <= 256; see MAX_DIM). 16-bit
heads of 128 and 256, and fp32 heads of 64 and 128, on sm_90+ load whole chunks through TMA descriptors built in
the kernel (uses_tma).
Shapes: q, k ``[R, H, DK]``, v ``[R, H, DV]``, o ``[R, H, DV]`` (R = B * T rows, contiguous);
states ``[N, H, DK, DV]`` with any strides (so a transposed state needs no copy).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from lightning_attention.engines.triton._common import (
    CHUNK,
    SegmentPlan,
    block_dim,
    cdiv,
    chunk_decays,
    chunk_gate_decays,
    chunk_rows,
    descriptor_scratch,
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
    tile_positions,
    tma_chunk_rows,
)
from lightning_attention.engines.triton import tuning
from lightning_attention.engines.triton.chunk_state import LocalStates
from lightning_attention.engines.triton.options import interpreting, options


#: Largest K the scan holds (two halves of 128). V is blocked, but the backward's dk scan uses V as its K.
MAX_DIM = 256


@dataclass(frozen=True)
class ScanLaunchConfig:
    """How a scan launches (one entry of the card's table, tuning.py): V columns per program, warps and pipeline
    stages of the pointer-load loop, and of the TMA loop where it runs (``tma_warps``, ``tma_stages``)."""

    block_v: int
    num_warps: int
    num_stages: int
    tma_stages: int
    tma_warps: int
    chunk: int = CHUNK

    def warps(self, tma: bool) -> int:
        return self.tma_warps if tma else self.num_warps


def scan_case(dk: int, dtype: torch.dtype, precision: str, gated: bool) -> str:
    """The table case of a scan (tuning.py): 16-bit inputs ("16bit"; with per-token gates "16bit-gated", whose
    pointer-load tiles spill at 4 warps and not at 8), two K halves ("16bit-k256", K > 128), fp32 inputs ("fp32"),
    and fp32 heads above 64 under one-pass TF32 ("fp32-tf32-k128": operands rounded to TF32 in registers,
    _common.tf32_operand, which spill at one warpgroup)."""
    if dtype == torch.float32:
        return "fp32-tf32-k128" if precision == "tf32" and dk > 64 else "fp32"
    if block_dim(dk) >= 256:
        return "16bit-k256"
    return "16bit-gated" if gated else "16bit"


@tuning.cached
def scan_config(
    dk: int, dv: int, dtype: torch.dtype, device: torch.device, precision: str | None = None, gated: bool = False
) -> ScanLaunchConfig:
    """The scan's launch configuration on ``device``'s card (tuning.py; nothing autotunes at run time).
    ``precision``: the products' (default _common.dot_precision(dtype)).

    On H100: 16-bit tiles run 4 warps (about 245 registers per thread, no spills) with 3 stages: as fast as 2
    stages (where two programs fit one SM), faster on split sequences. Two K halves and fp32 tiles take 8 warps on
    pointer loads (fp32: one stage, to fit shared memory). Through TMA the tiles wait in shared memory, not
    registers, and one warpgroup runs them faster than two despite 80-170 bytes of spills: with two, each 64-row
    product is split into n32 instructions and the scores cross between the warpgroups through shared memory
    every chunk; fp32 heads of 128 under one-pass TF32 are the exception (benchmarks/results/h100/
    kernel_choices.md). Registers, spills and shared memory of the shipped configurations are checked in CI
    (testing/kernel_resources.py)."""
    case = scan_case(dk, dtype, precision or dot_precision(dtype), gated)
    return ScanLaunchConfig(**tuning.lookup("scan", case, device))


@triton.jit
def _advance_chunk(b_q0, b_k0, b_q1, b_k1, b_v, state0, state1, mask, q_decay, k_decay, block_decay, k_scale,
                   PRECISION: tl.constexpr, TWO_K: tl.constexpr, b_hi=None, b_lo=None, C: tl.constexpr = 64,
                   FLIP: tl.constexpr = False, HAS_G: tl.constexpr = False, STRICT: tl.constexpr = False,
                   K_SCALED: tl.constexpr = True):
    """One chunk: (unscaled output [C, BV], the state after the chunk, the diagonal's operand). ``b_q1``, ``b_k1``,
    ``state1``: the second K half (TWO_K), else unused.

    Order and operand choices keep registers low enough for 4 warps without spills (measured on H100: ~245
    registers; 0.42 ms vs 0.58 ms at 4x8192x32x128 bf16, where 8 warps were no faster): the state is advanced
    first and only its low-precision copy (a shared-memory operand) stays live for Q S; the per-token decays
    scale V (the smaller tile) and the Q S product, so Q and K feed the tensor cores straight from shared memory.

    HAS_G: ``mask`` is unused; M comes from the chunk's gate sums ``b_hi + b_lo`` (_common.gated_mask), made while
    the Q S product runs and before the scores' accumulator is live (registers: kernel_resources). STRICT
    (per-token gates, the scans whose row dots give dg): the output leaves out each token's own pair, and the
    diagonal matrix of k_scale * (q_i . k_i) is returned as a product operand, for the caller to add the pairs
    (``_row_dots``) after taking the row dots (else q_decay is returned in its place, unused).
    """
    s_low0 = tf32_operand(state0.to(b_v.dtype), PRECISION)
    if TWO_K:
        s_low1 = tf32_operand(state1.to(b_v.dtype), PRECISION)
    v_weighted = tf32_operand((b_v * (k_decay * k_scale)[:, None]).to(b_v.dtype), PRECISION)
    state0 = mma(tl.trans(tf32_operand(b_k0, PRECISION)), v_weighted, PRECISION, state0 * block_decay)
    if TWO_K:
        state1 = mma(tl.trans(tf32_operand(b_k1, PRECISION)), v_weighted, PRECISION, state1 * block_decay)
    b_o = mma(b_q0, s_low0, PRECISION)
    if HAS_G:
        if TWO_K:
            b_o = mma(b_q1, s_low1, PRECISION, b_o)
        mask = gated_mask(b_hi, b_lo, C, FLIP, b_v.dtype == tl.float32, STRICT)
        if K_SCALED:  # (the forward and dq scans have k_scale = 1: a product of the tile saved)
            mask = mask * k_scale
        scores = mma(b_q0, tl.trans(b_k0), PRECISION)
        if TWO_K:
            scores = mma(b_q1, tl.trans(b_k1), PRECISION, scores)
    else:
        scores = mma(b_q0, tl.trans(b_k0), PRECISION)
        if TWO_K:
            b_o = mma(b_q1, s_low1, PRECISION, b_o)
            scores = mma(b_q1, tl.trans(b_k1), PRECISION, scores)
    diag = q_decay
    if STRICT:
        eye = tl.arange(0, C)[:, None] == tl.arange(0, C)[None, :]
        diag = tl.where(eye, scores, 0.0)
        if K_SCALED:
            diag = diag * k_scale
        diag = tf32_operand(diag.to(b_v.dtype), PRECISION)
    weighted_scores = tf32_operand((scores * mask).to(b_v.dtype), PRECISION)
    b_o = mma(weighted_scores, tf32_operand(b_v, PRECISION), PRECISION, b_o * q_decay[:, None])
    return b_o, state0, state1, diag


@triton.jit
def _row_dots(
    b_o, diag, b_v, b_x, running, offset, dot_out, dot_in, rows, valid, scale, i_v, i_h, role, R, H, used,
    DOTS: tl.constexpr, NDOT_IN: tl.constexpr, FLIP: tl.constexpr, C: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """The per-token gates' row dots of a STRICT chunk (see scan()): dot_i = scale * x_i . out_i without the token's
    own pair, in fp32 from the accumulator (``b_x``: x's tile, like the output's); then the own pairs are added to
    the output, a product of ``diag`` (_advance_chunk's) with V (a shared-memory operand). DOTS = 1:
    the dots are stored (``dot_out[i_v, row, head]``; role 0 of a paired launch). DOTS = 2: the dot is
    subtracted from the sum of the NDOT_IN slices of ``dot_in`` (V-block 0 only), and the running exclusive sum
    of that in scan order within the segment, plus ``offset``, is stored. Returns (output, running sum).

    The exclusive sum is the inclusive one minus the row's own term, which is exact only where that term is not
    much larger than the sum: true for every row's but the sequence's last (in scan order), whose G_t holds the
    final-state gradient's own pair (weight 1, while dg may be ~1e-9 of it at g = -20). No dg reads the last
    row's term (each sums the rows before its own), so rows outside ``used`` [C] enter as 0."""
    dots = tl.sum(b_x.to(tl.float32) * b_o, axis=1) * scale
    b_o = mma(diag, tf32_operand(b_v, PRECISION), PRECISION, b_o)
    p_out = dot_out + i_v * R * H + rows * H + i_h
    if DOTS == 1:
        tl.store(p_out, dots, mask=valid & (role == 0))
    else:
        local = -dots
        for s in tl.static_range(NDOT_IN):
            local += tl.load(dot_in + s * R * H + rows * H + i_h, mask=valid & (i_v == 0), other=0.0)
        local = tl.where(valid & used, local, 0.0)
        inclusive = tl.cumsum(local, axis=0, reverse=FLIP)
        tl.store(p_out, offset + (running + (inclusive - local)), mask=valid)
        running += tl.sum(local, axis=0)
    return b_o, running


@triton.jit
def _scan_setup(
    q, k, v, o, q_b, o_b, g_gamma, state_in, local_states, seq_offsets, segments, slot_ids, slot_used, R, H,
    si_n, si_h, si_k, si_v, gates, gate_totals, dot_x, dot_offset,
    DK: tl.constexpr, DV: tl.constexpr, BKH: tl.constexpr, TWO_K: tl.constexpr, BV: tl.constexpr,
    REVERSE: tl.constexpr, SHIFT: tl.constexpr, LOCALS_T: tl.constexpr, DOTS: tl.constexpr,
):  # fmt: skip
    """Where a program of either scan kernel starts: its block and its role's operands, as five tuples
    ``ptrs`` (q, k, v, o, dot_x: row pointers at the program's head), ``ids`` (V-block, twin role, head, segment,
    sequence, whether the segment is its sequence's first), ``span`` (the segment's start, end, length, the
    first chunk's shift, the sequence's last position in the segment or -1), ``tile`` (K and V offsets and masks of
    the program's tile) and ``carry`` (the state entering the segment, K halves 0 and 1, the row dots' running sum
    and per-sequence offset, and the head's log decay g)."""
    NV: tl.constexpr = (DV + BV - 1) // BV
    PAIRED: tl.constexpr = q_b is not None
    i_v, role, i_h, i_s = program_block(tl.program_id(0), H, 2 if PAIRED else 1, NV)
    # Strides of a local state in chunk_state's contiguous [S, H, DK, DV] buffer, or (LOCALS_T) in a [S, H, DV, DK]
    # one, read transposed: the backward's dq scan reuses the forward's local states of (k, v).
    if LOCALS_T:
        l_k, l_v = 1, DK
    else:
        l_k, l_v = DV, 1
    if PAIRED:
        # Role 1 runs the transposed scan: q_b against the state S^T = sum v^T k, i.e. k and v swapped (DK == DV).
        # Arithmetic, not branches: a stride of 1 is a compile-time constant that a branch could not reassign.
        is_b = role == 1
        q, o = tl.where(is_b, q_b, q), tl.where(is_b, o_b, o)
        k, v = tl.where(is_b, v, k), tl.where(is_b, k, v)
        si_k, si_v = si_k + role * (si_v - si_k), si_v + role * (si_k - si_v)
        l_k, l_v = l_k + role * (l_v - l_k), l_v + role * (l_k - l_v)
    start, end, seq, first = segment_bounds(segments, i_s, R, REVERSE)
    g = tl.load(g_gamma + i_h)

    o_k0 = tl.arange(0, BKH)
    o_k1 = BKH + o_k0
    o_v = i_v * BV + tl.arange(0, BV)
    m_k0, m_k1, m_v = o_k0 < DK, o_k1 < DK, o_v < DV
    m_s0, m_s1 = m_k0[:, None] & m_v[None, :], m_k1[:, None] & m_v[None, :]
    q, k = q + i_h * DK, k + i_h * DK
    v, o = v + i_h * DV, o + i_h * DV

    state0 = tl.zeros([BKH, BV], dtype=tl.float32)
    state1 = tl.zeros([BKH, BV], dtype=tl.float32)
    if state_in is not None:
        state0 = load_state_block(
            state_in, seq, i_h, si_n, si_h, si_k, si_v, o_k0, o_v, m_s0, slot_ids, slot_used, slot_ids is not None
        )
        if TWO_K:
            state1 = load_state_block(
                state_in, seq, i_h, si_n, si_h, si_k, si_v, o_k1, o_v, m_s1, slot_ids, slot_used, slot_ids is not None
            )
    if local_states is not None:
        l_s, l_h = H * DK * DV, DK * DV
        state0 = fold_earlier_segments(
            state0, local_states, seq_offsets, segments, i_s, seq, i_h, g, l_s, l_h, l_k, l_v, o_k0, o_v, m_s0, R,
            SHIFT, REVERSE, gate_totals, H, gates is not None,
        )  # fmt: skip
        if TWO_K:
            state1 = fold_earlier_segments(
                state1, local_states, seq_offsets, segments, i_s, seq, i_h, g, l_s, l_h, l_k, l_v, o_k1, o_v, m_s1, R,
                SHIFT, REVERSE, gate_totals, H, gates is not None,
            )  # fmt: skip
    length = end - start
    shift = SHIFT * first
    # Row dots (DOTS, per-token gates): the running sum within the segment, and the per-sequence offset added to
    # every stored sum (V-block 0 only).
    running = tl.zeros([], dtype=tl.float32)
    offset = tl.zeros([], dtype=tl.float32)
    last_pos = tl.where(is_last_segment(segments, i_s, REVERSE), length - 1, -1)  # the sequence's last token
    if DOTS == 2:
        dot_x = dot_x + i_h * DV
        if dot_offset is not None:
            offset = tl.load(dot_offset + seq * H + i_h, mask=i_v == 0, other=0.0)
    elif DOTS == 1:
        dot_x = dot_x + i_h * DV
    else:
        dot_x = v  # (unused; a tuple holds no None)
    return (
        (q, k, v, o, dot_x),
        (i_v, role, i_h, i_s, seq, first),
        (start, end, length, shift, last_pos),
        (o_k0, o_k1, o_v, m_k0, m_k1, m_v, m_s0, m_s1),
        (state0, state1, running, offset, g),
    )


@triton.jit
def _scan_finish(
    state_out, state0, state1, running, g, ids, span, tile, gates, segments, slot_ids, dot_totals, H,
    so_n, so_h, so_k, so_v, DV: tl.constexpr, BV: tl.constexpr, TWO_K: tl.constexpr, REVERSE: tl.constexpr,
    SHIFT: tl.constexpr, DOTS: tl.constexpr,
):  # fmt: skip
    """After a program's last chunk: its segment's row-dot sum (split sequences) and, by the sequence's last
    segment, the final state (``state_out`` given)."""
    i_v, role, i_h, i_s, seq, _ = ids
    start, end, length, _, _ = span
    o_k0, o_k1, o_v, _, _, _, m_s0, m_s1 = tile
    NV: tl.constexpr = (DV + BV - 1) // BV
    if DOTS == 2 and dot_totals is not None:  # split sequences: the segment's sum ([S, NV, H]), added by later ones
        tl.store(dot_totals + (i_s * NV + i_v) * H + i_h, running)
    if state_out is not None:
        if gates is not None:
            # final_decay = exp(a_last) with SHIFT (the state leaves decayed by the last token's own gate)
            if REVERSE:
                last = start
            else:
                last = end - 1
            a_last = tl.load(gates + last * H + i_h, mask=(length > 0) & (SHIFT == 1), other=0.0) + g
            final_decay = tl.exp(tl.where((length > 0) & (SHIFT == 1), a_last, 0.0))
        else:
            final_decay = tl.exp(g * (SHIFT * (length > 0)).to(tl.float32))
        writer = (role == 0) & is_last_segment(segments, i_s, REVERSE)
        m_s0, m_s1 = m_s0 & writer, m_s1 & writer
        store_state_block(
            state_out, state0 * final_decay, seq, i_h, so_n, so_h, so_k, so_v, o_k0, o_v, m_s0, slot_ids,
            slot_ids is not None,
        )  # fmt: skip
        if TWO_K:
            store_state_block(
                state_out, state1 * final_decay, seq, i_h, so_n, so_h, so_k, so_v, o_k1, o_v, m_s1, slot_ids,
                slot_ids is not None,
            )  # fmt: skip


@triton.jit
def _pointer_chunk(
    c, ptrs, ids, span, tile, state0, state1, running, offset, g, mask, k_scale, scale, gates, dot_out, dot_in, R,
    H, DK: tl.constexpr, DV: tl.constexpr, TWO_K: tl.constexpr, C: tl.constexpr, REVERSE: tl.constexpr,
    SHIFT: tl.constexpr, PRECISION: tl.constexpr, DOTS: tl.constexpr, NDOT_IN: tl.constexpr,
    K_SCALED: tl.constexpr,
):  # fmt: skip
    """Chunk ``c`` through masked pointer loads (rows in scan order): writes its output rows, returns the state
    after it (both K halves with TWO_K; ``state1`` is returned unchanged otherwise) and the row dots' running sum
    (DOTS). Arguments as :func:`_scan_setup` returns them."""
    q, k, v, o, dot_x = ptrs
    i_v, role, i_h, _, _, first = ids
    start, end, length, shift, last_pos = span
    o_k0, o_k1, o_v, m_k0, m_k1, m_v, _, _ = tile
    HAS_G: tl.constexpr = gates is not None
    rows, valid = chunk_rows(start, end, c, C, REVERSE)
    if HAS_G:
        q_decay, k_decay, block_decay, b_hi, b_lo = chunk_gate_decays(
            gates, g, rows, valid, c, length, first, R, H, i_h, C, SHIFT, REVERSE, False,
            q.dtype.element_ty == tl.float32,
        )
    else:
        q_decay, k_decay, block_decay = chunk_decays(g, c, length, shift, C)
        b_hi, b_lo = q_decay, q_decay
    b_v = load_rows(v, rows, valid, H * DV, o_v, m_v)
    b_q0 = load_rows(q, rows, valid, H * DK, o_k0, m_k0)
    b_k0 = load_rows(k, rows, valid, H * DK, o_k0, m_k0)
    if TWO_K:
        b_q1 = load_rows(q, rows, valid, H * DK, o_k1, m_k1)
        b_k1 = load_rows(k, rows, valid, H * DK, o_k1, m_k1)
        b_o, state0, state1, diag = _advance_chunk(
            b_q0, b_k0, b_q1, b_k1, b_v, state0, state1, mask, q_decay, k_decay, block_decay, k_scale,
            PRECISION, True, b_hi, b_lo, C, False, HAS_G, DOTS != 0, K_SCALED,
        )  # fmt: skip
    else:  # (state1 is not carried through the loop when unused: 64 registers)
        b_o, state0, _, diag = _advance_chunk(
            b_q0, b_k0, b_q0, b_k0, b_v, state0, state0, mask, q_decay, k_decay, block_decay, k_scale,
            PRECISION, False, b_hi, b_lo, C, False, HAS_G, DOTS != 0, K_SCALED,
        )  # fmt: skip
    if DOTS != 0:
        used = c * C + tl.arange(0, C) != last_pos
        b_x = load_rows(dot_x, rows, valid & (role == 0), H * DV, o_v, m_v)
        b_o, running = _row_dots(
            b_o, diag, b_v, b_x, running, offset, dot_out, dot_in, rows, valid, scale, i_v, i_h, role, R, H,
            used, DOTS, NDOT_IN, False, C, PRECISION,
        )  # fmt: skip
    store_rows(o, b_o * scale, rows, valid, H * DV, o_v, m_v)
    return state0, state1, running


@triton.jit
def _tma_chunk(
    c, descs, o, ids, span, tile, state0, state1, running, offset, g, mask, k_scale, scale, gates, dot_out, dot_in,
    R, H, DV: tl.constexpr, BKH: tl.constexpr, TWO_K: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
    REVERSE: tl.constexpr, SHIFT: tl.constexpr, PRECISION: tl.constexpr, DOTS: tl.constexpr,
    NDOT_IN: tl.constexpr, K_SCALED: tl.constexpr, PARTIAL: tl.constexpr,
):  # fmt: skip
    """Chunk ``c`` through TMA boxes of one head (``descs``: q, k, v, o, x descriptors): as :func:`_pointer_chunk`.
    PARTIAL: the segment's partial last chunk, whose box reaches outside the segment; its k and v rows there are
    zeroed (q's rows there only make outputs that are not stored: its output rows go through masked pointer
    stores, whole chunks' through the o descriptor)."""
    q_desc, k_desc, v_desc, o_desc, x_desc = descs
    i_v, role, i_h, _, _, first = ids
    start, end, length, shift, last_pos = span
    _, _, o_v, _, _, m_v, _, _ = tile
    HAS_G: tl.constexpr = gates is not None
    if HAS_G:
        row, rows, valid = tma_chunk_rows(start, end, c, C, REVERSE)
        q_decay, k_decay, block_decay, b_hi, b_lo = chunk_gate_decays(
            gates, g, rows, valid, c, length, first, R, H, i_h, C, SHIFT, REVERSE, REVERSE,
            q_desc.dtype == tl.float32,
        )  # fmt: skip
    else:
        q_decay, k_decay, block_decay = chunk_decays(g, c, length, shift, C, REVERSE)
        row, rows, valid = tma_chunk_rows(start, end, c, C, REVERSE)
        b_hi, b_lo = q_decay, q_decay
    b_q0 = q_desc.load([row, 0])
    b_k0 = k_desc.load([row, 0])
    b_v = v_desc.load([row, i_v * BV])
    if PARTIAL:
        b_k0 = tl.where(valid[:, None], b_k0, 0.0).to(b_q0.dtype)
        b_v = tl.where(valid[:, None], b_v, 0.0).to(b_q0.dtype)
    if TWO_K:
        b_q1 = q_desc.load([row, BKH])
        b_k1 = k_desc.load([row, BKH])
        if PARTIAL:
            b_k1 = tl.where(valid[:, None], b_k1, 0.0).to(b_q0.dtype)
        b_o, state0, state1, diag = _advance_chunk(
            b_q0, b_k0, b_q1, b_k1, b_v, state0, state1, mask, q_decay, k_decay, block_decay, k_scale, PRECISION,
            True, b_hi, b_lo, C, REVERSE, HAS_G, DOTS != 0, K_SCALED,
        )  # fmt: skip
    else:
        b_o, state0, _, diag = _advance_chunk(
            b_q0, b_k0, b_q0, b_k0, b_v, state0, state0, mask, q_decay, k_decay, block_decay, k_scale, PRECISION,
            False, b_hi, b_lo, C, REVERSE, HAS_G, DOTS != 0, K_SCALED,
        )  # fmt: skip
    if DOTS != 0:
        used = c * C + tile_positions(C, REVERSE) != last_pos
        b_o, running = _row_dots(
            b_o, diag, b_v, x_desc.load([row, i_v * BV]), running, offset, dot_out, dot_in, rows, valid, scale, i_v,
            i_h, role, R, H, used, DOTS, NDOT_IN, REVERSE, C, PRECISION,
        )  # fmt: skip
    if not PARTIAL:
        o_desc.store([row, i_v * BV], (b_o * scale).to(o_desc.dtype))
    else:
        store_rows(o, b_o * scale, rows, valid, H * DV, o_v, m_v)
    return state0, state1, running


# The two scan kernels take the same arguments (the TMA one adds TMA_STAGES). Optional tensors are None where
# unused, which the kernels test at compile time: ``state_in`` (read the entering state), ``local_states``
# (split sequences: fold the earlier segments'), ``state_out`` (write the final state), ``slot_ids`` and
# ``slot_used`` (state rows are cache slots), ``q_b`` and ``o_b`` (a paired launch's transposed twin), ``gates``
# (per-token gates), ``dot_*`` (the row dots of DOTS).
# K is held as one block of BKH, or (TWO_K, for K > 128) two halves whose products are summed: tiles of K = 256 in
# one tl.dot fault on H100 with triton 3.6.


@triton.jit
def _scan_kernel(
    q, k, v, o, q_b, o_b, g_gamma, state_in, state_out, local_states, seq_offsets, segments,
    slot_ids, slot_used, scale, k_scale, R, H,
    si_n, si_h, si_k, si_v, so_n, so_h, so_k, so_v,
    gates, gate_totals, dot_x, dot_out, dot_in, dot_offset, dot_totals,
    DK: tl.constexpr, DV: tl.constexpr, BKH: tl.constexpr, TWO_K: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
    REVERSE: tl.constexpr, SHIFT: tl.constexpr, PRECISION: tl.constexpr, LOCALS_T: tl.constexpr,
    DOTS: tl.constexpr, NDOT_IN: tl.constexpr, K_SCALED: tl.constexpr,
):  # fmt: skip
    """The scan through masked pointer loads: any head size up to MAX_DIM, any alignment."""
    ptrs, ids, span, tile, carry = _scan_setup(
        q, k, v, o, q_b, o_b, g_gamma, state_in, local_states, seq_offsets, segments, slot_ids, slot_used, R, H,
        si_n, si_h, si_k, si_v, gates, gate_totals, dot_x, dot_offset, DK, DV, BKH, TWO_K, BV, REVERSE, SHIFT,
        LOCALS_T, DOTS,
    )  # fmt: skip
    state0, state1, running, offset, g = carry
    if gates is not None:
        mask = g  # (unused: the gated mask is made per chunk)
    else:
        mask = intra_decay(g, C) * k_scale
    _, _, length, _, _ = span
    for c in range(0, tl.cdiv(length, C)):
        state0, state1, running = _pointer_chunk(
            c, ptrs, ids, span, tile, state0, state1, running, offset, g, mask, k_scale, scale, gates, dot_out,
            dot_in, R, H, DK, DV, TWO_K, C, REVERSE, SHIFT, PRECISION, DOTS, NDOT_IN, K_SCALED,
        )  # fmt: skip
    _scan_finish(
        state_out, state0, state1, running, g, ids, span, tile, gates, segments, slot_ids, dot_totals, H,
        so_n, so_h, so_k, so_v, DV, BV, TWO_K, REVERSE, SHIFT, DOTS,
    )  # fmt: skip


@triton.jit
def _scan_tma_kernel(
    q, k, v, o, q_b, o_b, g_gamma, state_in, state_out, local_states, seq_offsets, segments,
    slot_ids, slot_used, scale, k_scale, R, H,
    si_n, si_h, si_k, si_v, so_n, so_h, so_k, so_v,
    gates, gate_totals, dot_x, dot_out, dot_in, dot_offset, dot_totals,
    DK: tl.constexpr, DV: tl.constexpr, BKH: tl.constexpr, TWO_K: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
    REVERSE: tl.constexpr, SHIFT: tl.constexpr, PRECISION: tl.constexpr, LOCALS_T: tl.constexpr,
    DOTS: tl.constexpr, NDOT_IN: tl.constexpr, K_SCALED: tl.constexpr, TMA_STAGES: tl.constexpr,
):  # fmt: skip
    """The scan through TMA boxes (uses_tma: exact head dims, aligned rows, sm_90+; a faster loop body:
    kernel_choices.md). A box holds a chunk's rows in memory order, so a reverse scan's tile is flipped against
    its scan order (FLIP decays and mask). Whole chunks need no masks, and leave through TMA stores; a partial last
    chunk is peeled off the loop (PARTIAL) so that the loop stays one straight body for the pipeliner.
    Descriptors are built per program in Triton's global scratch (descriptor_scratch), from this role's pointers
    (a paired twin's k and v are swapped): host-built descriptors made the eager call host-bound
    (kernel_choices.md). One head per descriptor, so a box never reaches into the next head."""
    ptrs, ids, span, tile, carry = _scan_setup(
        q, k, v, o, q_b, o_b, g_gamma, state_in, local_states, seq_offsets, segments, slot_ids, slot_used, R, H,
        si_n, si_h, si_k, si_v, gates, gate_totals, dot_x, dot_offset, DK, DV, BKH, TWO_K, BV, REVERSE, SHIFT,
        LOCALS_T, DOTS,
    )  # fmt: skip
    state0, state1, running, offset, g = carry
    q, k, v, o, dot_x = ptrs
    q_desc = tl.make_tensor_descriptor(q, [R, DK], [H * DK, 1], [C, BKH])
    k_desc = tl.make_tensor_descriptor(k, [R, DK], [H * DK, 1], [C, BKH])
    v_desc = tl.make_tensor_descriptor(v, [R, DV], [H * DV, 1], [C, BV])
    o_desc = tl.make_tensor_descriptor(o, [R, DV], [H * DV, 1], [C, BV])
    x_desc = tl.make_tensor_descriptor(dot_x, [R, DV], [H * DV, 1], [C, BV]) if DOTS != 0 else v_desc
    descs = (q_desc, k_desc, v_desc, o_desc, x_desc)
    if gates is not None:
        mask = g  # (unused: the gated mask is made per chunk)
    else:
        mask = intra_decay(g, C, REVERSE) * k_scale
    _, _, length, _, _ = span
    n_whole = length // C
    for c in tl.range(0, n_whole, num_stages=TMA_STAGES):
        state0, state1, running = _tma_chunk(
            c, descs, o, ids, span, tile, state0, state1, running, offset, g, mask, k_scale, scale, gates, dot_out,
            dot_in, R, H, DV, BKH, TWO_K, BV, C, REVERSE, SHIFT, PRECISION, DOTS, NDOT_IN, K_SCALED, False,
        )  # fmt: skip
    if n_whole * C < length:
        state0, state1, running = _tma_chunk(
            n_whole, descs, o, ids, span, tile, state0, state1, running, offset, g, mask, k_scale, scale, gates,
            dot_out, dot_in, R, H, DV, BKH, TWO_K, BV, C, REVERSE, SHIFT, PRECISION, DOTS, NDOT_IN, K_SCALED, True,
        )  # fmt: skip
    _scan_finish(
        state_out, state0, state1, running, g, ids, span, tile, gates, segments, slot_ids, dot_totals, H,
        so_n, so_h, so_k, so_v, DV, BV, TWO_K, REVERSE, SHIFT, DOTS,
    )  # fmt: skip


@dataclass(frozen=True)
class RowDots:
    """The row dots a scan with per-token gates computes for dg, besides its output (docs/DESIGN.md "Accuracy of
    dg"): for each token, ``scale * x_t . out_t`` where ``out_t`` leaves out the token's own pair (q_t . k_t) v_t,
    in fp32 before ``out`` is rounded to its dtype.

    mode 1 (the backward's dv scan, x = v: G_t = v_t . dv_t^strict): ``out[i_v, row, head]`` = the dot over the
    columns of V-block i_v (role 0 only in a paired launch).
    mode 2 (the dq scan, x = q: F_t = q_t . dq_t^strict): with ``L_t = sum of inputs[:, row, head] - F_t``,
    ``out[i_v, row, head]`` = ``offset[seq, head]`` (V-block 0 only) + the exclusive sum of L over the tokens
    before t in scan order within t's segment (its V-block's part of F); where the plan splits sequences,
    ``totals[segment, i_v, head]`` = the segment's sum of L.

    Shapes: x like the scan's out ``[R, H, DV]``; out fp32 ``[NV, R, H]`` (NV = V-blocks of the launch); inputs fp32
    ``[n, R, H]``; offset fp32 ``[N, H]`` or None; totals fp32 ``[S, NV, H]``."""

    x: torch.Tensor | None
    out: torch.Tensor | None
    mode: int
    inputs: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    totals: torch.Tensor | None = None

    def check(self, rows: int, heads: int, nv: int, plan: SegmentPlan) -> None:
        if tuple(self.out.shape) != (nv, rows, heads) or self.out.dtype != torch.float32:
            raise ValueError(f"row dots out must be float32 [{nv}, {rows}, {heads}], got {tuple(self.out.shape)}")
        if self.mode == 2 and plan.split != (self.totals is not None):
            raise ValueError("row dot totals must be given exactly when the plan splits sequences")


def scan(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    g_gamma: torch.Tensor,
    plan: SegmentPlan,
    *,
    scale: float,
    k_scale: float = 1.0,
    reverse: bool,
    shift: int,
    state_in: torch.Tensor | None,
    local_states: torch.Tensor | None = None,
    state_out: torch.Tensor | None = None,
    slot_ids: torch.Tensor | None = None,
    slot_used: torch.Tensor | None = None,
    transposed: tuple[torch.Tensor, torch.Tensor] | None = None,
    local_states_transposed: bool = False,
    gates: torch.Tensor | None = None,
    dots: RowDots | None = None,
) -> None:
    """Launch the scan over ``plan``'s segments, writing ``out`` (and ``state_out`` if given) in place.

    q, k ``[R, H, DK]``; v, out ``[R, H, DV]`` contiguous; g_gamma fp32 [H]; state_in ``[N, H, DK, DV]`` or
    None; state_out ``[N, H, DK, DV]`` or None. With ``slot_ids`` int [N] the state rows are cache slots
    (state_in read where ``slot_used``, else zero). ``local_states`` (required when ``plan.split``):
    chunk_state.local_states of (k, v) over the plan (states contiguous ``[S, H, DK, DV]`` fp32); with
    ``local_states_transposed``, those of (v, k) instead, ``[S, H, DV, DK]``, read transposed (their transposes
    are the states needed: the backward's dq scan = scan(do, v, k) reuses the forward's).

    ``transposed = (q_b, out_b)`` (needs DK == DV) also runs, in the same launch, the scan of q_b against the
    transposed state (``out_b = scan(q_b, v, k)``, state_in transposed, no state_out): the backward's dk next to
    its dv. Each program of one scan has a twin of the other reading the same k and v rows at the same time,
    so those come from L2 once.

    ``gates`` fp32 ``[R, H]`` (per-token log gates, added to g_gamma): the decays come from their cumulative sums
    per chunk, and split sequences fold the local states with their segments' total decays (local_states of the
    same gates, and ``shift``). ``dots`` (needs gates): the row dots of dg (:class:`RowDots`).
    """
    H, DK, DV = q.shape[1], q.shape[2], v.shape[2]
    if local_states is not None and (gates is not None) != (local_states.totals is not None):
        raise ValueError("local_states must carry their segments' total decays exactly when gates are given")
    if dots is not None and (gates is None or slot_ids is not None):
        raise ValueError("row dots need per-token gates and no slots")
    if transposed is not None and (DK != DV or slot_ids is not None):
        raise ValueError(f"a transposed twin needs DK == DV and no slots, got DK={DK}, DV={DV}")
    if plan.split != (local_states is not None):
        raise ValueError("local_states must be given exactly when the plan splits sequences")
    if local_states_transposed and transposed is not None:
        raise ValueError("a paired launch reads its local states untransposed")
    q_b, out_b = transposed if transposed is not None else (None, None)
    precision = dot_precision(q.dtype)
    cfg = scan_config(DK, DV, q.dtype, q.device, precision, gated=gates is not None)
    nv = cdiv(DV, cfg.block_v)
    # (A twin has q's dtype and head size, so only its rows' alignment is left to check; outputs leave through
    # TMA stores, so theirs too.)
    dot_x = None if dots is None else dots.x
    tma = uses_tma(q, k, v) and all(_tma_aligned(t) for t in (out, q_b, out_b, dot_x) if t is not None)
    grid = (plan.num_segments * H * nv * (2 if transposed is not None else 1),)
    if dots is not None:
        dots.check(q.shape[0], H, nv, plan)
    d = dots or RowDots(None, None, 0)
    locals_ = local_states if local_states is not None else LocalStates(None, None, None)

    key = ("scan", q.device, DK, DV, q.dtype, precision, transposed is not None, tma, gates is not None, d.mode)
    for attempt in fitting(key, launch_variants(cfg, tma)):
        use_tma, num_warps, num_stages = attempt.variant
        constexprs = scan_constexprs(
            DK, DV, cfg, precision, reverse=reverse, shift=shift, use_tma=use_tma,
            locals_transposed=local_states_transposed, dots_mode=d.mode,
            dot_inputs=0 if d.inputs is None else d.inputs.shape[0], k_scaled=float(k_scale) != 1.0,
        )  # fmt: skip
        with attempt, descriptor_scratch(q.device) if use_tma else contextlib.nullcontext():
            scan_kernel(use_tma)[grid](
                q, k, v, out, q_b, out_b, g_gamma, state_in, state_out, locals_.states,
                plan.seq_offsets, plan.segments, slot_ids, slot_used,
                float(scale), float(k_scale), q.shape[0], H,
                *state_strides(state_in), *state_strides(state_out),
                gates, locals_.totals, d.x, d.out, d.inputs, d.offset, d.totals,
                **constexprs, num_warps=num_warps, num_stages=num_stages,
            )  # fmt: skip


def scan_kernel(use_tma: bool) -> triton.JITFunction:
    """The scan kernel of a launch: through TMA boxes, or masked pointer loads."""
    return _scan_tma_kernel if use_tma else _scan_kernel


def scan_constexprs(
    DK: int, DV: int, cfg: ScanLaunchConfig, precision: str, *, reverse: bool, shift: int, use_tma: bool,
    locals_transposed: bool = False, dots_mode: int = 0, dot_inputs: int = 0, k_scaled: bool = False,
) -> dict:  # fmt: skip
    """The compile-time arguments of :func:`scan_kernel` for one launch besides its optional tensors (which
    specialise it by being None or not): the launch of :func:`scan` and the sm_90 build check of
    testing/kernel_resources.py both take them from here."""
    return dict(
        DK=DK, DV=DV, BKH=min(block_dim(DK), 128), TWO_K=block_dim(DK) > 128, BV=cfg.block_v, C=cfg.chunk,
        REVERSE=bool(reverse), SHIFT=int(shift), PRECISION=precision, LOCALS_T=bool(locals_transposed),
        DOTS=dots_mode, NDOT_IN=dot_inputs, K_SCALED=k_scaled, **(dict(TMA_STAGES=cfg.tma_stages) if use_tma else {}),
    )  # fmt: skip


def launch_variants(cfg: ScanLaunchConfig, tma: bool) -> list[tuple[bool, int, int]]:
    """(TMA, warps, pipeline stages) to launch a scan with, in order: the configuration tuned on H100, then ones
    needing less shared memory per block, for GPUs that have less (_common.fitting). The tuned TMA scans
    need 184-224 KiB on H100, 120-160 KiB on consumer Blackwell (sm_120, 99 KiB per block) and 289 KiB for fp32
    on B200 (227 KiB); the pointer scans 64-176 KiB on H100 but 48-80 KiB for the mma.sync GPUs (sm_80-sm_89,
    sm_120), whose limit is 99 KiB except A100's 163 (testing/kernel_resources.py --arch N). So: TMA as tuned,
    then pointer loads with fewer and fewer stages."""
    variants = [(True, cfg.warps(True), cfg.num_stages)] if tma else []
    return variants + [(False, cfg.num_warps, stages) for stages in fewer_stages(cfg.num_stages)]


@functools.cache
def _capability(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def uses_tma(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether a scan of these rows loads (and stores whole chunks) through TMA: a head size in the options'
    ``tma_head_dims`` (16-bit inputs) or ``tma_fp32_head_dims`` (fp32; options.py), DV a multiple of the V-block
    (the tiles measured and tested), 16-byte aligned contiguous rows (TMA's rule for a descriptor's base and row
    stride), and a Hopper-class GPU (or the CPU interpreter, which runs the same path)."""
    DK, DV = q.shape[2], v.shape[2]
    routes = options()
    head_dims = routes.tma_fp32_head_dims if q.dtype == torch.float32 else routes.tma_head_dims
    if DK not in head_dims or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    if DV % scan_config(DK, DV, q.dtype, q.device).block_v:
        return False
    if not (_tma_aligned(q) and _tma_aligned(k) and _tma_aligned(v)):
        return False
    if q.device.type == "cuda":
        return _capability(q.device.index if q.device.index is not None else torch.cuda.current_device()) >= 9
    return interpreting()


def _tma_aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % 16 == 0 and t.is_contiguous()


def scan_programs_per_segment(
    num_heads: int, dk: int, dv: int, dtype: torch.dtype, device: torch.device, paired: bool = False
) -> int:
    """Programs of one segment (``paired``: with the transposed twin scan)."""
    return num_heads * cdiv(dv, scan_config(dk, dv, dtype, device).block_v) * (2 if paired else 1)
