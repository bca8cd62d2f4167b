"""Decode steps (one or several tokens per sequence) and the varlen prefill on a slot-indexed state cache, in Triton.

Row n of a decode batch (L new tokens of one sequence; L is unrolled in the kernel) owns slot ``s = slot_ids[n]`` of
the cache; per head h, for its first ``lengths[n]`` tokens t (all L without ``lengths``), with the log decay
``a_t = g_gamma[h] + g[n, t, h]`` (``g`` optional)::

    S      = state_cache[s, h]                            [K, V]  (float32 or bfloat16, accumulated in float32)
    S      = exp(a_t) S + k_t^T v_t                       (t = 0 .. lengths[n] - 1, in order)
    o[n,t] = scale q_t S                                  [V]     (zero for t >= lengths[n])
    state_cache[s, h] = S                                          (UPDATE_CACHE only: once, after the last token)

Shapes: q, k ``[N, L, H, K]``, v ``[N, L, H, V]``, g ``[N, L, H]``, state_cache ``[num_slots, H, K, V]`` contiguous,
slot_ids and lengths int ``[N]``, o ``[N, L, H, V]`` in q's dtype (one token per row: ``[N, H, *]``, the same memory
layout, and o ``[N, H, V]``). The serving API runs three variants of the one
kernel: a decode step or several (write o, update the cache), a read-only pass (o only: the verification of
speculative drafts) and a commit (update the cache by each row's accepted prefix, no o).

Traffic: the touched state slots dominate (read once, written at most once, whatever L: the state stays in
registers across the tokens), so the kernel is memory-bound and its floor is ``2 * N * H * K * V * bytes(cache)
/ bandwidth`` (half that read-only). Each program owns one (row, head, V-block) tile of K x BV, walked down K in
BK-row blocks (o sums over K; each block's state advances through all L tokens before the next block loads).

Bad indices never touch memory outside the cache and never vanish: a row whose slot is outside
``[0, num_slots)`` (other than padding, -1), whose slot repeats an earlier row's, or whose length is outside
``[0, L]`` is skipped (o zero, no slot touched; of repeated rows the first is served) and reported in the
device's *error word* (ERROR_WORD below), with no host read. The varlen prefill checks ``cu_seqlens`` the same
way before it runs (:func:`prefill_into_slots`). serving.py turns the word into a ValueError.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from lightning_attention.engines.base import tokens_per_sequence
from lightning_attention.engines.triton import recurrent, tuning
from lightning_attention.engines.triton._common import SegmentPlan, cdiv, next_power_of_2, sm_count
from lightning_attention.engines.triton.chunk_scan import MAX_DIM, scan

__all__ = [
    "DecodeConfig",
    "decode_config",
    "ErrorKind",
    "ERROR_WORD",
    "ErrorSink",
    "new_error_word",
    "doorbell_reachable",
    "decode_tokens",
    "prefill_into_slots",
]

# ---------------------------------------------------------------------------------------------------------------
# Tiles per card


@dataclass(frozen=True)
class DecodeConfig:
    """Tiles of the decode kernel for one card and cache dtype.

    block_v: V columns per program.  block_k: K rows per step of the program's walk down K.  num_warps.
    programs_per_sm: the launcher halves block_v (down to 16) while the grid has fewer programs than this many
    per SM, so that a small batch (N = 1: H programs at block_v = V) still spreads over the whole GPU.
    """

    block_v: int
    block_k: int
    num_warps: int
    programs_per_sm: int = 4


@tuning.cached
def decode_config(cache_dtype: torch.dtype, device: torch.device, multi_token: bool = False) -> DecodeConfig:
    """The decode tiles for a cache of ``cache_dtype`` on ``device``'s card (tuning.py, cases "float32" and
    "bfloat16"; on H100 within 1.02-1.10x of the bandwidth floor at N = 64 and 256: benchmarks/results/h100/
    serving.md). ``multi_token``: for rows of several tokens (each program chains one reduction over K per
    token, so the best tiles can differ): the case "<dtype>-multi" where the card's table has one, else the
    one-token tiles. ``python -m lightning_attention tune`` measures both for the present card."""
    case = str(cache_dtype).removeprefix("torch.")
    entry = multi_token and tuning.find("decode", f"{case}-multi", device)
    return DecodeConfig(**(entry or tuning.lookup("decode", case, device)))


# ---------------------------------------------------------------------------------------------------------------
# The error word


class ErrorKind:
    """Bits of the error word's FLAGS field: what was wrong with a skipped row."""

    OUT_OF_RANGE = 1  # slot outside [0, num_slots) and not padding (-1)
    REPEATED = 2  # slot already used by an earlier row of the call
    BAD_LENGTH = 4  # length outside [0, L]
    BAD_CU_SEQLENS = 8  # prefill offsets not 0-based, decreasing, or not ending at T


#: int32 fields of the error word, one word per device (zero = no error since the last check):
#: FLAGS (OR of ErrorKind bits), COUNT (reports), and the first report: CALL (the call id the host passed),
#: KIND, ROW (row of the batch, or index into cu_seqlens), VALUE (the bad slot id, length or offset).
ERROR_WORD = ("FLAGS", "COUNT", "CALL", "KIND", "ROW", "VALUE")
_FLAGS = tl.constexpr(0)
_COUNT = tl.constexpr(1)
_CALL = tl.constexpr(2)
_KIND = tl.constexpr(3)
_ROW = tl.constexpr(4)
_VALUE = tl.constexpr(5)
_OUT_OF_RANGE = tl.constexpr(ErrorKind.OUT_OF_RANGE)
_REPEATED = tl.constexpr(ErrorKind.REPEATED)
_BAD_LENGTH = tl.constexpr(ErrorKind.BAD_LENGTH)
_BAD_CU_SEQLENS = tl.constexpr(ErrorKind.BAD_CU_SEQLENS)


@dataclass(frozen=True)
class ErrorSink:
    """Where a launch reports bad indices: ``word`` int32 [len(ERROR_WORD)] on the device, ``doorbell`` int32 [1]
    that the host can read without a sync (pinned host memory on CUDA), set to 1 with every report, and ``call``,
    the id (> 0) the host gave this call."""

    word: torch.Tensor
    doorbell: torch.Tensor
    call: int


def new_error_word(device: torch.device) -> torch.Tensor:
    return torch.zeros(len(ERROR_WORD), dtype=torch.int32, device=device)


@triton.jit
def _clear_kernel(doorbell):
    tl.store(doorbell, 0)


def doorbell_reachable(doorbell: torch.Tensor) -> bool:
    """Whether kernels can store into ``doorbell``, a pinned host tensor (device-accessible under unified
    addressing, i.e. on every 64-bit CUDA platform; Triton refuses a pointer the driver does not map), tried with
    one tiny launch."""
    try:
        _clear_kernel[(1,)](doorbell)
    except ValueError:
        return False
    return True


@triton.jit
def _report(errors, doorbell, call, kind, row, value):
    """Record one bad row (scalars) in the error word; the first report of all keeps its call, kind, row and value."""
    tl.atomic_or(errors + _FLAGS, kind)
    tl.atomic_add(errors + _COUNT, 1)
    if tl.atomic_cas(errors + _CALL, 0, call) == 0:
        tl.store(errors + _KIND, kind)
        tl.store(errors + _ROW, row)
        tl.store(errors + _VALUE, value)
    tl.store(doorbell, 1)


@triton.jit
def _repeats_earlier_row(slot_ids, slot, i_n, BN: tl.constexpr):
    """Whether a row before ``i_n`` names ``slot``: a scan of the earlier ids (from L2), BN at a time."""
    hits = 0
    for start in range(0, i_n, BN):
        o_n = start + tl.arange(0, BN)
        earlier = tl.load(slot_ids + o_n, mask=o_n < i_n, other=-1)
        hits += tl.sum((earlier == slot).to(tl.int32))
    return hits > 0


# ---------------------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _decode_kernel(
    q, k, v, o, g, state_cache, slot_ids, lengths, g_gamma, errors, doorbell, scale, num_slots, call,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, L: tl.constexpr, LP: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, BN: tl.constexpr,
    UPDATE_CACHE: tl.constexpr, CHECK_REPEATS: tl.constexpr,
):  # fmt: skip
    i_nh, i_v = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    leader = (i_h == 0) & (i_v == 0)  # one program per row reports its errors

    # Which rows run: padding (-1) silently skipped, every other bad index skipped and reported. A skipped row
    # computes like the others (from a zero state) but stores no state and a zero o.
    slot = tl.load(slot_ids + i_n).to(tl.int64)
    in_range = (slot >= 0) & (slot < num_slots)
    if leader & (slot != -1) & ~in_range:
        _report(errors, doorbell, call, _OUT_OF_RANGE, i_n, slot.to(tl.int32))
    live = in_range
    if lengths is not None:
        n_tokens = tl.load(lengths + i_n).to(tl.int32)
        good_length = (n_tokens >= 0) & (n_tokens <= L)
        if leader & ~good_length:
            _report(errors, doorbell, call, _BAD_LENGTH, i_n, n_tokens)
        live = live & good_length
    else:
        n_tokens = L

    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    o_l = tl.arange(0, LP)
    b_o = tl.zeros([LP, BV], dtype=tl.float32)  # row t: o of token t, summed over the K blocks
    first_token = i_n.to(tl.int64) * L
    g_head = tl.load(g_gamma + i_h).to(tl.float32)
    # K is walked in BK-row blocks (unrolled, so the blocks' loads can all be in flight at once); each block
    # advances through all L tokens in registers, then is stored once.
    for i_k in tl.static_range(0, K, BK):
        o_k = i_k + tl.arange(0, BK)
        m_k = o_k < K
        m_h = m_k[:, None] & m_v[None, :]
        p_h = state_cache + (slot * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :]
        b_h = tl.load(p_h, mask=m_h & in_range, other=0).to(tl.float32)
        if CHECK_REPEATS:
            if i_k == 0:  # here, so that the scan of the earlier ids overlaps the first block's load
                repeated = in_range & _repeats_earlier_row(slot_ids, slot, i_n, BN)
                if leader & repeated:
                    _report(errors, doorbell, call, _REPEATED, i_n, slot.to(tl.int32))
                live = live & ~repeated
        for t in tl.static_range(L):
            token = (first_token + t) * H + i_h
            runs = t < n_tokens  # tokens past the row's length leave the state as it is (decay 1, k v = 0)
            b_k = tl.load(k + token * K + o_k, mask=m_k & runs, other=0).to(tl.float32)
            b_v = tl.load(v + token * V + o_v, mask=m_v & runs, other=0).to(tl.float32)
            log_decay = g_head
            if g is not None:
                log_decay += tl.load(g + token).to(tl.float32)
            decay = tl.where(runs, tl.exp(log_decay), 1.0)
            b_h = decay * b_h + b_k[:, None] * b_v[None, :]
            if o is not None:
                b_q = tl.load(q + token * K + o_k, mask=m_k & runs, other=0).to(tl.float32)
                b_o += tl.where(o_l[:, None] == t, tl.sum(b_h * b_q[:, None], axis=0)[None, :], 0.0)
        if UPDATE_CACHE:
            tl.store(p_h, b_h.to(p_h.dtype.element_ty), mask=m_h & live)
    if o is not None:
        p_o = o + ((first_token + o_l[:, None]) * H + i_h) * V + o_v[None, :]
        b_o = tl.where(live, b_o * scale, 0.0)
        tl.store(p_o, b_o.to(p_o.dtype.element_ty), mask=(o_l[:, None] < L) & m_v[None, :])


@triton.jit
def _admit_kernel(
    cu_seqlens, slot_ids, use_initial_state, segments, safe_slots, slot_used, errors, doorbell,
    num_slots, N, T, call, BN: tl.constexpr,
):  # fmt: skip
    """Prefill admission, one program per sequence n: checks cu_seqlens (all of it: a bad offset rejects every
    sequence) and the sequence's slot (range, repeats), reports what is wrong, and writes what the prefill
    kernels read: the segment table row (start, end, n, flags: bit 0 first segment, bit 1 last, which stores the
    final state: cleared for a rejected sequence), its slot (-1 when rejected) and whether its state is read."""
    i_n = tl.program_id(0)
    first_bad = N + 1
    for start in range(0, N + 1, BN):
        o_c = start + tl.arange(0, BN)
        m_c = o_c <= N
        offset = tl.load(cu_seqlens + o_c, mask=m_c, other=0).to(tl.int64)
        before = tl.load(cu_seqlens + o_c - 1, mask=m_c & (o_c > 0), other=0).to(tl.int64)
        bad = m_c & (((o_c == 0) & (offset != 0)) | (offset < before) | ((o_c == N) & (offset != T)))
        first_bad = tl.minimum(first_bad, tl.min(tl.where(bad, o_c, N + 1)))
    cu_ok = first_bad > N
    if (i_n == 0) & ~cu_ok:
        _report(errors, doorbell, call, _BAD_CU_SEQLENS, first_bad, tl.load(cu_seqlens + first_bad).to(tl.int32))

    slot = tl.load(slot_ids + i_n).to(tl.int64)
    in_range = (slot >= 0) & (slot < num_slots)
    if ~in_range:
        _report(errors, doorbell, call, _OUT_OF_RANGE, i_n, slot.to(tl.int32))
    repeated = in_range & _repeats_earlier_row(slot_ids, slot, i_n, BN)
    if repeated:
        _report(errors, doorbell, call, _REPEATED, i_n, slot.to(tl.int32))
    live = cu_ok & in_range & ~repeated

    row = segments + i_n * 4
    tl.store(row, tl.load(cu_seqlens + i_n).to(tl.int32))
    tl.store(row + 1, tl.load(cu_seqlens + i_n + 1).to(tl.int32))
    tl.store(row + 2, i_n)
    tl.store(row + 3, tl.where(live, 3, 1))
    tl.store(safe_slots + i_n, tl.where(live, slot, -1).to(tl.int32))
    tl.store(slot_used + i_n, (live & (tl.load(use_initial_state + i_n) != 0)).to(tl.int32))


# ---------------------------------------------------------------------------------------------------------------
# Launchers


def _fill_block_v(config: DecodeConfig, rows: int, V: int, device: torch.device) -> int:
    """config.block_v (at most V's power of two), halved down to 16 while the grid is below
    ``programs_per_sm`` programs per SM."""
    block_v = min(config.block_v, next_power_of_2(V))
    target = config.programs_per_sm * sm_count(device)
    while block_v > 16 and rows * cdiv(V, block_v) < target:
        block_v //= 2
    return block_v


def _launch(
    q, k, v, state_cache, slot_ids, g_gamma, scale, errors: ErrorSink, config: DecodeConfig, *, g=None,
    lengths=None, update_cache=True, write_o=True, fill_grid=True, check_repeats=True,
):  # fmt: skip
    """The decode kernel with explicit tiles (``fill_grid=False``: config.block_v as given; the benchmark's sweep
    calls this). Arguments as :func:`decode_tokens`. Returns o (None without ``write_o``)."""
    N, H, K = q.shape[0], q.shape[-2], q.shape[-1]
    L = q.shape[1] if q.dim() == 4 else 1
    V = v.shape[-1]
    q, k, v = (x.contiguous() for x in (q, k, v))
    o = torch.empty(*q.shape[:-1], V, dtype=q.dtype, device=q.device) if write_o else None
    if N * H == 0:
        return o
    block_v = _fill_block_v(config, N * H, V, q.device) if fill_grid else min(config.block_v, next_power_of_2(V))
    grid = (N * H, cdiv(V, block_v))
    _decode_kernel[grid](
        q, k, v, o, g if g is None else g.contiguous(), state_cache, slot_ids, lengths, g_gamma, errors.word,
        errors.doorbell, float(scale), state_cache.shape[0], errors.call,
        H=H, K=K, V=V, L=L, LP=max(2, next_power_of_2(L)), BK=min(config.block_k, next_power_of_2(K)), BV=block_v,
        BN=min(1024, next_power_of_2(N)), UPDATE_CACHE=update_cache, CHECK_REPEATS=check_repeats,
        num_warps=config.num_warps,
    )  # fmt: skip
    return o


def decode_tokens(
    q, k, v, state_cache, slot_ids, g_gamma, scale, *, errors: ErrorSink, g=None, lengths=None, update_cache=True,
    write_o=True,
):  # fmt: skip
    """L tokens per row from each row's slot (see the module docstring), one launch. Inputs validated by serving.py;
    index values are checked here, on the device.

    Args:
        q, k: ``[N, L, H, K]``, or ``[N, H, K]`` for one token (the same memory layout); v: ``[N, L, H, V]``
            (``[N, H, V]``); state_cache ``[num_slots, H, K, V]`` float32/bfloat16, contiguous.
        slot_ids: int ``[N]`` on the device (-1 = padding).  g_gamma: float32 ``[H]``.
        g: ``[N, L, H]`` (``[N, H]``) or None.
        lengths: int ``[N]`` tokens to run per row (0..L), or None for all L.
        update_cache: store each row's state after its last token.  write_o: compute o.
        errors: where bad indices are reported.

    Returns:
        o ``[N, L, H, V]`` (``[N, H, V]``) in q's dtype (None without ``write_o``).
    """
    config = decode_config(state_cache.dtype, state_cache.device, multi_token=q.dim() == 4 and q.shape[1] > 1)
    return _launch(
        q, k, v, state_cache, slot_ids, g_gamma, scale, errors, config, g=g, lengths=lengths,
        update_cache=update_cache, write_o=write_o,
    )  # fmt: skip


def prefill_into_slots(q, k, v, g_gamma, scale, cu_seqlens, state_cache, slot_ids, use_initial_state, errors, g=None):
    """Varlen prefill into cache slots; no host read of any index tensor. Returns o ``[1, T, H, V]``.

    q, k ``[1, T, H, K]``, v ``[1, T, H, V]``, cu_seqlens int ``[N + 1]``, state_cache ``[num_slots, H, K, V]``
    float32/bfloat16 contiguous, slot_ids int ``[N]``, use_initial_state bool ``[N]``, g ``[1, T, H]`` per-token
    log gates or None, all on q's device.

    One admission launch checks cu_seqlens and the slots (reported to ``errors``; a rejected sequence's slot is not
    touched, a bad cu_seqlens rejects every sequence) and writes the segment table, then one scan launch: the
    chunked engine's scan (chunk_scan.py) for long prompts (mean length above recurrent.ENGINE.max_tokens,
    the recurrent op's routing rule; heads up to MAX_DIM), else the fused recurrent kernel's slot mode. The table
    has one segment per sequence: splitting a long prompt over several programs needs its length on the host.
    """
    N = cu_seqlens.numel() - 1
    T, H, K, V = q.shape[1], q.shape[2], q.shape[3], v.shape[3]
    device = q.device
    gates = None if g is None else g.float().contiguous()
    segments = torch.empty(N, 4, dtype=torch.int32, device=device)
    safe_slots = torch.empty(N, dtype=torch.int32, device=device)
    slot_used = torch.empty(N, dtype=torch.int32, device=device)
    _admit_kernel[(N,)](
        cu_seqlens, slot_ids, use_initial_state, segments, safe_slots, slot_used, errors.word, errors.doorbell,
        state_cache.shape[0], N, T, errors.call, BN=min(1024, next_power_of_2(N + 1)),
    )  # fmt: skip
    if tokens_per_sequence(q, cu_seqlens) <= recurrent.ENGINE.max_tokens or max(K, V) > MAX_DIM:
        return recurrent.recurrent_into_slots(
            q, k, v, g_gamma, scale, cu_seqlens, state_cache, safe_slots, slot_used, g=gates
        )
    plan = SegmentPlan(segments, seq_offsets=segments, num_segments=N, num_seqs=N, split=False)  # (no offsets read)
    o = torch.empty(T, H, V, dtype=q.dtype, device=device)
    rows = [x.contiguous().reshape(T, H, x.shape[3]) for x in (q, k, v)]
    scan(
        *rows, o, g_gamma.contiguous(), plan, scale=scale, reverse=False, shift=0, state_in=state_cache,
        state_out=state_cache, slot_ids=safe_slots, slot_used=slot_used,
        gates=None if gates is None else gates.reshape(T, H),
    )  # fmt: skip
    return o.view(1, T, H, V)
