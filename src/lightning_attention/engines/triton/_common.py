"""Helpers shared by the chunked Triton kernels: token addressing, decay factors, state blocks, the segment plan.

Every kernel walks one *segment* of one sequence chunk by chunk (C tokens at a time), in scan order
(t = start..end-1, or end-1..start with ``REVERSE``), with the running state on chip. A segment table
(int32 ``[S, 4]``: start row, end row, sequence index, flags) lists the segments; flags bit 0 marks the
first segment of its sequence in memory order, bit 1 the last (so the first in scan order is bit 0 for a
forward scan and bit 1 for a reverse one). Rows index the flattened ``[B * T]`` (or packed ``[T]``) axis.

When a sequence is split into several segments (too few sequences x heads to fill the GPU), a first pass
computes each segment's local state (chunk_state.py) and every program folds those of the segments before
its own into the state it starts from (:func:`fold_earlier_segments`). The state entering the first segment
is ``initial_state`` with the scan's ``SHIFT`` (engines/base.py's shift): it reaches local position i through
``lam^(i + 1 - SHIFT)``.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from lightning_attention._validation import cu_seqlens_bounds
from lightning_attention.engines.triton.options import interpreting, options

#: Tokens per chunk inside the kernels. Any chunk size gives the same result up to rounding; 64 is the
#: measured best on H100 (the op's ``chunk_size`` argument is accepted and mapped to it).
CHUNK = 64


# ----------------------------------------------------------------------------------------------------------
# Device-side helpers
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def program_block(pid, H, NK: tl.constexpr, NV: tl.constexpr):
    """Split a flat program id into (V-block, K-block, head, row): V-blocks vary fastest, so programs that
    read the same q/k rows run together and share them through L2."""
    i_v = pid % NV
    i_k = (pid // NV) % NK
    i_h = (pid // (NV * NK)) % H
    return i_v, i_k, i_h, pid // (NV * NK * H)


@triton.jit
def segment_bounds(segments, i_s, R, REVERSE: tl.constexpr):
    """(start, end, sequence index, is first segment of its sequence in scan order) of segment ``i_s``.

    Rows are clamped to ``[0, R)`` (R rows in the token tensors): the host checks cu_seqlens before building the
    table, and this keeps a kernel inside its tensors whatever the table holds."""
    start = tl.minimum(tl.maximum(tl.load(segments + i_s * 4).to(tl.int64), 0), R)
    end = tl.minimum(tl.maximum(tl.load(segments + i_s * 4 + 1).to(tl.int64), start), R)
    seq = tl.load(segments + i_s * 4 + 2)
    flags = tl.load(segments + i_s * 4 + 3)
    if REVERSE:
        first = (flags >> 1) & 1
    else:
        first = flags & 1
    return start, end, seq, first


@triton.jit
def is_last_segment(segments, i_s, REVERSE: tl.constexpr):
    """Whether segment ``i_s`` is the last of its sequence in scan order (its program writes the final state)."""
    flags = tl.load(segments + i_s * 4 + 3)
    if REVERSE:
        return (flags & 1) != 0
    else:
        return ((flags >> 1) & 1) != 0


@triton.jit
def segments_before(seq_offsets, seq, i_s, REVERSE: tl.constexpr):
    """(n, j_first, j_step): the segments of sequence ``seq`` before segment ``i_s`` in scan order are
    ``j_first + j_step * idx`` for idx < n, from the sequence's first in scan order on."""
    lo = tl.load(seq_offsets + seq)
    hi = tl.load(seq_offsets + seq + 1)
    if REVERSE:
        return hi - 1 - i_s, hi - 1, -1
    else:
        return i_s - lo, lo, 1


@triton.jit
def fold_earlier_segments(
    state, local_states, seq_offsets, segments, i_s, seq, i_h, g, l_s, l_h, l_k, l_v, o_k, o_v, mask, R,
    SHIFT: tl.constexpr, REVERSE: tl.constexpr, gate_totals=None, H=1, HAS_G: tl.constexpr = False,
):  # fmt: skip
    """The state entering segment ``i_s`` of sequence ``seq``: ``state`` (the sequence's initial state, fp32
    ``[BK, BV]``) carried across the segments before it in scan order, S <- lam^(len - e) S + A_s, with the
    local states A_s of chunk_state.py (strides l_*; e = SHIFT on the sequence's first segment). Each program
    folds its own prefix (a few blocks from L2), so no launch is spent on the scan across segments.
    HAS_G (per-token gates): a segment carries the state by exp(its total log decay), ``gate_totals`` fp32
    ``[S, H]`` (log2-scaled) from the same pass as A_s."""
    n_before, j_first, j_step = segments_before(seq_offsets, seq, i_s, REVERSE)
    for idx in range(0, n_before):
        j = j_first + j_step * idx
        start, end, _, first = segment_bounds(segments, j, R, REVERSE)
        ptrs = local_states + j.to(tl.int64) * l_s + i_h * l_h + o_k[:, None] * l_k + o_v[None, :] * l_v
        if HAS_G:
            carried = tl.exp2(tl.load(gate_totals + j * H + i_h))
        else:
            carried = tl.exp(g * tl.maximum(end - start - SHIFT * first, 0).to(tl.float32))
        state = state * carried + tl.load(ptrs, mask=mask, other=0)
    return state


@triton.jit
def chunk_rows(start, end, c, C: tl.constexpr, REVERSE: tl.constexpr):
    """Memory rows of chunk ``c`` of segment [start, end) in scan order, and which of them exist."""
    pos = c * C + tl.arange(0, C)
    valid = pos < end - start
    if REVERSE:
        rows = end - 1 - pos
    else:
        rows = start + pos
    return rows, valid


@triton.jit
def load_rows(ptr, rows, valid, row_stride, cols, col_mask):
    """Tile ``ptr[rows, cols]`` (zero where a row or column does not exist)."""
    return tl.load(ptr + rows[:, None] * row_stride + cols[None, :], mask=valid[:, None] & col_mask[None, :], other=0)


@triton.jit
def store_rows(ptr, value, rows, valid, row_stride, cols, col_mask):
    tl.store(
        ptr + rows[:, None] * row_stride + cols[None, :],
        value.to(ptr.dtype.element_ty),
        mask=valid[:, None] & col_mask[None, :],
    )


@triton.jit
def mma(a, b, PRECISION: tl.constexpr, acc=None):
    """``acc + a @ b`` (``a @ b`` without acc) with fp32 accumulation. PRECISION "upcast": multiply in fp32
    (exact for 16-bit operands), used for bf16 under the CPU interpreter, whose bf16 tl.dot returns garbage
    (triton 3.6)."""
    if PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc=acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc=acc, input_precision=PRECISION)


@triton.jit
def tf32_operand(x, PRECISION: tl.constexpr):
    """``x`` as the operand of a one-pass "tf32" product: fp32 tiles rounded to the nearest TF32 value (10-bit
    mantissa, ties to even; NaN kept); anything else unchanged. The tensor cores read an fp32 operand's top 19
    bits, i.e. round toward zero: a bias of about -3.5e-4 per operand which, chained through the state (K^T V,
    then Q S), made our outputs' error 3.6x that of cuBLAS's round-to-nearest TF32. Applied where a tile is in
    registers anyway (computed; transposed on its way to shared memory, as TF32 products need for operands
    contracted over tokens; every tile of the pointer-load dk/dv kernel). q and k feeding the tensor cores
    straight from shared memory stay truncated: rounding them too matched cuBLAS exactly but took 9% longer
    (errors with and without: benchmarks/results/h100/kernel_choices.md)."""
    if PRECISION == "tf32" and x.dtype == tl.float32:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0xFFF + ((bits >> 13) & 1)) & -0x2000
        return tl.where(x == x, bits.to(tl.float32, bitcast=True), x)
    else:
        return x


@triton.jit
def tile_positions(C: tl.constexpr, FLIP: tl.constexpr = False):
    """Scan position of each row of a chunk's tile: the row index, or (FLIP: a reverse scan's tile loaded in
    memory order, as TMA loads it) C - 1 - the row index."""
    i = tl.arange(0, C)
    if FLIP:
        i = C - 1 - i
    return i


@triton.jit
def intra_decay(g, C: tl.constexpr, FLIP: tl.constexpr = False):
    """M [C, C]: lam^(i - j) for scan positions i >= j, else 0 (selected, never multiplied: lam^(negative) can be
    inf). Rows and columns are tile rows (see :func:`tile_positions`)."""
    i = tile_positions(C, FLIP)
    diff = i[:, None] - i[None, :]
    return tl.where(diff >= 0, tl.exp(g * tl.maximum(diff, 0).to(tl.float32)), 0.0)


@triton.jit
def chunk_decays(g, c, length, first_shift, C: tl.constexpr, FLIP: tl.constexpr = False):
    """Decay factors of chunk ``c`` of a segment of ``length`` tokens (n = tokens in this chunk), per tile row
    (scan position i of a row: :func:`tile_positions`).

    Returns (q_decay [C] = lam^(i + 1 - e): how the entering state reaches position i;
    k_decay [C] = lam^(n - 1 - j) for j < n else 0: how token j reaches the chunk's end state;
    block_decay = lam^(n - e): how the entering state reaches the end), with e = first_shift on chunk 0.
    """
    i = tile_positions(C, FLIP)
    n = tl.minimum(length - c * C, C).to(tl.int32)
    e = tl.where(c == 0, first_shift, 0)
    q_decay = tl.exp(g * (i + 1 - e).to(tl.float32))
    k_decay = tl.where(i < n, tl.exp(g * tl.maximum(n - 1 - i, 0).to(tl.float32)), 0.0)
    block_decay = tl.exp(g * tl.maximum(n - e, 0).to(tl.float32))
    return q_decay, k_decay, block_decay


#: log2(e): the gated decays are exponentiated as exp2 of log2-scaled sums (one multiply per token, not per pair).
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def load_gates(gates, g, rows, valid, at_start, R, H, i_h, SHIFT: tl.constexpr, REVERSE: tl.constexpr):
    """Per-token log decays a'_p [C] of a chunk's tile rows: g_gamma (``g``) + gates[row, i_h], 0 where a row does
    not exist. SHIFT (the shift = 1 scans of engines/base.py): the gate of the token before in scan order
    (memory row - 1, or + 1 for a reverse scan) and 0 at the sequence's first position (``at_start``), so that
    the incoming state enters undecayed and every other step is the forward's recurrence with shifted gates.
    (Rows outside the R rows of ``gates [R, H]`` are never read, whatever the segment table says.)"""
    if SHIFT:
        if REVERSE:
            rows = rows + 1
        else:
            rows = rows - 1
        valid = valid & (at_start == 0) & (rows >= 0) & (rows < R)
    a = tl.load(gates + rows * H + i_h, mask=valid, other=0.0)
    return tl.where(valid, a + g, 0.0)


@triton.jit
def _two_sum(a_hi, a_lo, b_hi, b_lo):
    """(hi, lo) + (hi, lo) with hi's rounding error carried in lo (Knuth's two-sum)."""
    s = a_hi + b_hi
    b_virtual = s - a_hi
    err = (a_hi - (s - b_virtual)) + (b_hi - b_virtual)
    return s, err + (a_lo + b_lo)


@triton.jit
def gate_sums(a, C: tl.constexpr, FLIP: tl.constexpr = False, EXACT: tl.constexpr = True):
    """Inclusive cumulative sums in scan order of a chunk's log decays a [C] (tile rows, :func:`tile_positions`),
    log2-scaled: b = hi + lo, with (EXACT) hi's rounding errors carried in lo (b to about fp32 eps^2 |b|), else
    lo = hi (unused) and b = hi.

    Why pairs: M_ij = exp(b_i - b_j) near the diagonal is O(1) however large |b| grows along the chunk (-1850 in
    log2 units for gates of -20), and a difference of two rounded sums loses eps |b| in the exponent (2^-13 there;
    7e-6 for gates of about -1). hi_i - hi_j is exact when the two are within a factor 2 (Sterbenz), so the
    exponent (hi_i - hi_j) + (lo_i - lo_j) keeps fp32 accuracy relative to itself, as a masked sum of the gates
    would. Needed where the decays meet fp32 operands; a 16-bit operand's rounding (2^-9, 2^-12) is larger."""
    if EXACT:
        hi, lo = tl.associative_scan((a * LOG2E, tl.zeros_like(a)), 0, _two_sum, reverse=FLIP)
    else:
        hi = tl.cumsum(a * LOG2E, axis=0, reverse=FLIP)
        lo = hi
    return hi, lo


@triton.jit
def gated_decays(a, n, C: tl.constexpr, FLIP: tl.constexpr = False, EXACT: tl.constexpr = True):
    """Decay factors of a chunk from its log decays a'_p [C] (tile rows; n tokens in the chunk, a' = 0 past them):
    with b = :func:`gate_sums` (hi, lo), returns (q_decay = exp(b_i), k_decay = exp(b_last - b_j) for j < n else 0,
    block_decay = exp(b_last), hi, lo) -- the per-token counterparts of :func:`chunk_decays`; :func:`gated_mask`
    makes M from (hi, lo). b_last is b's own entry at position n - 1, so the last token's weight is exactly 1."""
    pos = tile_positions(C, FLIP)
    hi, lo = gate_sums(a, C, FLIP, EXACT)
    last = pos == n - 1
    hi_last = tl.sum(tl.where(last, hi, 0.0), axis=0)
    if EXACT:
        lo_last = tl.sum(tl.where(last, lo, 0.0), axis=0)
        q_decay = tl.exp2(hi + lo)
        k_decay = tl.where(pos < n, tl.exp2((hi_last - hi) + (lo_last - lo)), 0.0)
        block_decay = tl.exp2(hi_last + lo_last)
    else:
        q_decay = tl.exp2(hi)
        k_decay = tl.where(pos < n, tl.exp2(hi_last - hi), 0.0)
        block_decay = tl.exp2(hi_last)
    return q_decay, k_decay, block_decay, hi, lo


@triton.jit
def chunk_gate_decays(
    gates, g, rows, valid, c, length, first, R, H, i_h, C: tl.constexpr, SHIFT: tl.constexpr,
    REVERSE: tl.constexpr, FLIP: tl.constexpr = False, EXACT: tl.constexpr = True,
):  # fmt: skip
    """:func:`gated_decays` of chunk ``c`` of a segment of ``length`` tokens (tile rows ``rows``, ``valid``;
    ``first``: the segment is its sequence's first in scan order), its gates read by :func:`load_gates`."""
    at_start = (c * C + tile_positions(C, FLIP) == 0) & (first != 0)
    a = load_gates(gates, g, rows, valid, at_start, R, H, i_h, SHIFT, REVERSE)
    return gated_decays(a, tl.minimum(length - c * C, C), C, FLIP, EXACT)


@triton.jit
def gated_mask(
    hi, lo, C: tl.constexpr, FLIP: tl.constexpr = False, EXACT: tl.constexpr = True, STRICT: tl.constexpr = False
):  # fmt: skip
    """M [C, C] = exp(b_i - b_j) for scan positions i >= j (STRICT: i > j), else 0 (b = hi + lo: :func:`gate_sums`).
    The mask is applied on the exponent before exp (exp2(-inf) = 0): b_i - b_j > 0 for i < j could overflow, and
    b is never split into exp(b_i) * exp(-b_j) (b reaches -1280 in a chunk of gates -20: exp(-b_j) = inf)."""
    pos = tile_positions(C, FLIP)
    if STRICT:
        causal = pos[:, None] > pos[None, :]
    else:
        causal = pos[:, None] >= pos[None, :]
    exponent = hi[:, None] - hi[None, :]
    if EXACT:
        exponent += lo[:, None] - lo[None, :]
    return tl.exp2(tl.where(causal, exponent, float("-inf")))


@triton.jit
def tma_chunk_rows(start, end, c, C: tl.constexpr, REVERSE: tl.constexpr):
    """First memory row of chunk ``c``'s box (a reverse scan's chunks end at ``end - c * C``; a partial chunk's
    box reaches before ``start`` or past ``end``), the box's rows, and which of them belong to the segment."""
    if REVERSE:
        base = end - (c + 1) * C
    else:
        base = start + c * C
    rows = base + tl.arange(0, C)
    return base.to(tl.int32), rows, (rows >= start) & (rows < end)


@triton.jit
def state_block_ptrs(ptr, row, i_h, s_n, s_h, s_k, s_v, o_k, o_v):
    return ptr + row.to(tl.int64) * s_n + i_h * s_h + o_k[:, None] * s_k + o_v[None, :] * s_v


@triton.jit
def load_state_block(ptr, row, i_h, s_n, s_h, s_k, s_v, o_k, o_v, mask, slot_ids, slot_used, USE_SLOTS: tl.constexpr):
    """fp32 block of state ``row`` (or, with USE_SLOTS, of cache slot slot_ids[row] if slot_used[row], else 0)."""
    if USE_SLOTS:
        use = tl.load(slot_used + row) != 0
        row = tl.load(slot_ids + row)
        mask = mask & use
    p = state_block_ptrs(ptr, row, i_h, s_n, s_h, s_k, s_v, o_k, o_v)
    return tl.load(p, mask=mask, other=0).to(tl.float32)


@triton.jit
def store_state_block(ptr, value, row, i_h, s_n, s_h, s_k, s_v, o_k, o_v, mask, slot_ids, USE_SLOTS: tl.constexpr):
    if USE_SLOTS:
        row = tl.load(slot_ids + row)
    p = state_block_ptrs(ptr, row, i_h, s_n, s_h, s_k, s_v, o_k, o_v)
    tl.store(p, value.to(ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------
# Host-side helpers
# ----------------------------------------------------------------------------------------------------------


#: Smallest tile edge. Tiles of 16 or 32 along a head dim with some warp/stage counts raised illegal memory
#: accesses on H100 (triton 3.6); every configuration in the config functions was run there with edges >= 64.
MIN_BLOCK = 64


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the launch code. (triton.cdiv and triton.next_power_of_2 are constexpr functions whose
    host calls cost ~3 us each, and a backward would make 22 of them.)"""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def block_dim(d: int) -> int:
    """Padded block for a head dim: a power of two >= MIN_BLOCK (masks cover the padding)."""
    return max(MIN_BLOCK, next_power_of_2(d))


@contextlib.contextmanager
def descriptor_scratch(device: torch.device):
    """Give Triton's launcher an allocator for the global scratch of in-kernel tensor descriptors
    (``tl.make_tensor_descriptor``: each program writes its descriptors there) while a kernel launches.

    Triton asks the allocator set by ``triton.set_allocator``, a context variable: a thread that never set one
    (PyTorch's autograd worker runs every backward) has none. A caller's own allocator is left in place; where
    there is none, scratch comes from PyTorch's caching allocator (stream-ordered, so freeing it after the
    launch is safe, and CUDA-graph capture records it like any tensor). ``triton.runtime._allocation`` is
    private: triton is pinned (3.6), and tests/engines/triton cover this path on the GPU."""
    from triton.runtime import _allocation

    if device.type != "cuda" or _allocation._allocator.get() is not _allocation._NULL_ALLOCATOR:
        yield
        return
    token = _allocation._allocator.set(_torch_scratch)
    try:
        yield
    finally:
        _allocation._allocator.reset(token)


def _torch_scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    # Triton launches on the current device; the caching allocator's blocks are 512-byte aligned.
    if alignment > 512:
        raise RuntimeError(f"descriptor scratch needs {alignment}-byte alignment; the caching allocator gives 512")
    return torch.empty(size, dtype=torch.uint8, device="cuda")


#: Per launch site and shape key: the index of the first launch variant that fit the device (:func:`fitting`).
_FIRST_FITTING: dict[tuple, int] = {}


class LaunchAttempt:
    """One variant of a launch (:func:`fitting`): the launch inside ``with attempt:`` either fits (``fitted``) or
    raises OutOfResources, which is swallowed unless this is the last variant."""

    def __init__(self, variant, last: bool):
        self.variant, self.last, self.fitted = variant, last, False

    def __enter__(self) -> LaunchAttempt:
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        self.fitted = kind is None
        return kind is not None and issubclass(kind, OutOfResources) and not self.last


def fitting(key: tuple, variants: list):
    """Attempts at a launch over ``variants``, starting from the one that fit last time for ``key`` (the device, and
    what sets the kernel's resources: shapes, dtype, precision); the loop ends after the first launch that fits::

        for attempt in fitting(key, variants):
            with attempt:
                kernel[grid](..., **options_of(attempt.variant))

    The configurations are tuned on H100; a GPU with less shared memory per block (consumer Blackwell and Ada:
    99 KiB) cannot load some of them, and Triton raises OutOfResources as the kernel loads, before it runs (its
    autotuner skips such configurations the same way). Later variants must need less; the last one's error is
    raised."""
    for i in range(_FIRST_FITTING.get(key, 0), len(variants)):
        attempt = LaunchAttempt(variants[i], last=i + 1 == len(variants))
        yield attempt
        if attempt.fitted:
            _FIRST_FITTING[key] = i
            return


def fewer_stages(num_stages: int) -> list[int]:
    """Pipeline depths to fall back through: ``num_stages`` down to 1 (each stage holds one more set of tiles)."""
    return list(range(num_stages, 0, -1))


def state_strides(state: torch.Tensor | None) -> tuple[int, int, int, int]:
    """Strides of a ``[N, H, K, V]`` state (zeros for None), so transposed views need no copy."""
    return (0, 0, 0, 0) if state is None else tuple(state.stride())


def dot_precision(dtype: torch.dtype) -> str:
    """Tensor-core precision of the kernels' products. 16-bit inputs: native (see :func:`mma` for bf16 under the
    interpreter). fp32 inputs follow ``torch.get_float32_matmul_precision()``, as torch's own matmuls do:
    "highest" (torch's default): three tf32 products per dot, fp32-level accuracy; "high" or "medium": one tf32
    product (about 1e-3 relative error, several times faster; benchmarks/results/h100/chunk.md).
    Read at launch, after TRITON_INTERPRET is set."""
    if dtype == torch.bfloat16 and interpreting():
        return "upcast"
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "tf32x3"
    return "tf32"  # (the precision flag only affects fp32 operands)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a nominal 8 for the CPU interpreter)."""
    if device.type != "cuda":
        return 8
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@dataclass(frozen=True)
class SegmentPlan:
    """segments: int32 [S, 4] (start, end, seq, flags) on the device; seq_offsets: int32 [N + 1] (segments of
    sequence n are rows seq_offsets[n]:seq_offsets[n + 1]); split: whether any sequence has > 1 segment;
    longest: the rows of the longest segment."""

    segments: torch.Tensor
    seq_offsets: torch.Tensor
    num_segments: int
    num_seqs: int
    split: bool
    longest: int = 0


def sequence_bounds(batch: int, seq_len: int, cu_seqlens: torch.Tensor | None) -> tuple[int, ...]:
    """Row offsets [N + 1] of the sequences on the flattened token axis (one host read of cu_seqlens, checked)."""
    if cu_seqlens is None:
        return tuple(b * seq_len for b in range(batch + 1))
    return cu_seqlens_bounds(cu_seqlens, seq_len)


def _segment_tokens(
    lengths: tuple[int, ...], programs_per_segment: int, sms: int, chunk: int, programs_per_sm: float
) -> int:
    """Segment length in tokens (a multiple of the chunk), or 0 for no split.

    ``slots`` segments run at once (all SMs busy); the chunks are spread evenly over them, as many segments as
    fit one wave (benchmarks/results/h100/kernel_choices.md, "Segment rule"). No split unless it at least halves
    the longest sequence's walk."""
    chunks = [math.ceil(n / chunk) for n in lengths]
    total, longest = sum(chunks), max(chunks, default=0)
    slots = max(1, int(sms * programs_per_sm) // programs_per_segment)
    per_slot = max(1, math.ceil(total / slots))
    return 0 if 2 * per_slot > longest else per_slot * chunk


@functools.lru_cache(maxsize=64)
def _plan(
    bounds: tuple[int, ...], programs_per_segment: int, sms: int, device: torch.device, programs_per_sm: float
) -> SegmentPlan:
    lengths = tuple(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    seg = _segment_tokens(lengths, programs_per_segment, sms, CHUNK, programs_per_sm)
    rows, offsets = [], [0]
    for n, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        cuts = list(range(a, b, seg)) if seg and b > a else [a]
        for s, lo in enumerate(cuts):
            hi = min(b, lo + seg) if seg else b
            rows.append((lo, hi, n, int(s == 0) | (int(s == len(cuts) - 1) << 1)))
        offsets.append(len(rows))
    segments = torch.tensor(rows, dtype=torch.int32).reshape(-1, 4).to(device)
    seq_offsets = torch.tensor(offsets, dtype=torch.int32).to(device)
    longest = max((hi - lo for lo, hi, _, _ in rows), default=0)
    return SegmentPlan(segments, seq_offsets, len(rows), len(lengths), len(rows) > len(lengths), longest)


def plan_segments(bounds: tuple[int, ...], programs_per_segment: int, device: torch.device) -> SegmentPlan:
    """Split the sequences (row offsets ``bounds``) into segments so that segments x ``programs_per_segment``
    programs fill the GPU. Plans are cached: a training loop with fixed shapes builds one once."""
    return _plan(bounds, programs_per_segment, sm_count(device), device, options().programs_per_sm)
