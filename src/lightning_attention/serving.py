"""Serving API: decode steps and a varlen prefill on a slot-indexed state cache (continuous batching).

A serving engine keeps one recurrent state per running sequence in a cache per layer::

    state_cache [num_slots, H, K, V]   float32 (default) or bfloat16, contiguous, updated IN PLACE

and tells each call which slot every sequence of the batch owns (``slot_ids``). Per sequence and head, with
``lam = exp(g_gamma[h])``, the same recurrence as every other op of the library::

    S = lam * S + k^T v        o = scale * q S

* :func:`lightning_attn_prefill` runs a packed batch of prompts (``cu_seqlens``), each starting from its
  slot's state (or from zero, per sequence), and writes each final state into its slot. One kernel launch.
* :func:`lightning_attn_decode` runs one new token per sequence: ``q, k [N, H, K]``, ``v [N, H, V]``;
  slot -1 marks a padding row (fixed-size batches for CUDA graphs): output zero, no slot touched. One launch,
  no copy of the cache.

Both are ``torch.library`` custom ops (``lightning_attention::decode`` / ``::prefill``) that declare the
cache as mutated and have fake implementations, so they work under ``torch.compile``. No backward.

bfloat16 cache: half the memory traffic of a decode step. The state is read into float32, updated, and rounded
to bfloat16 once per step when stored, so each step adds one rounding error (2^-9 relative) of the *state*.
Those errors add up like a random walk over the head's memory (about 1 / (1 - exp(g)) tokens), so the cost
depends on the decay. Measured over 10,000 steps (``benchmarks/bench_decode.py --accuracy``,
benchmarks/results/decode_bf16_accuracy_*.md; rel err vs the float64 recurrence; float32 cache: <= 2e-6):

* heads with g <= -1: state error ~1.7e-3 (about one rounding), flat in the step count;
* MiniMax layer 0: state error from 2e-3 (fastest head, g = -0.5) to 1.9e-2 (slowest, g = -2^-8, a memory of
  ~256 tokens); o error 1.5e-2 over all heads after 10,000 steps;
* a head without decay (g = 0, head 0 of the "tnl" schedule): the state is a growing sum and its error grows
  like sqrt(steps): o error 1e-2 after 100 steps, 3.5e-2 after 1,000, 1e-1 after 10,000.

Use the float32 cache (the default) when heads decay slowly or not at all and generations are long.

Multi-token decode (several new tokens per sequence, e.g. speculative verification or a chunked prompt):
:func:`lightning_attn_prefill` with ``use_initial_state=True`` is exactly that, with per-sequence lengths in
``cu_seqlens`` (a length of 0 leaves the slot's state as it is).

Slot-id checks (range, and no slot twice in one call; prefill allows no padding): free when ``slot_ids`` is
a CPU tensor (the usual case: the scheduler builds them on the host; they are copied to the device after the
check, without blocking: from pinned memory that copy is asynchronous, so leave such a tensor unchanged until
the step has run). For ``slot_ids`` already on the GPU, checking reads them back: one device->host sync per call
(it waits for all queued GPU work: benchmarks/bench_decode.py times the eager call with host ids, device ids
unchecked and device ids checked), skipped with ``check_slots=False``, during CUDA-graph
capture and under ``torch.compile``. Unchecked, the kernels still never touch memory outside the cache (an
out-of-range slot is skipped like padding), but a slot given twice is a data race with an undefined result.
"""

from __future__ import annotations

from typing import Union

import torch

from lightning_attention import _validation as val
from lightning_attention.engines import autocast_off, resolve_backend

__all__ = ["PADDING_SLOT", "new_state_cache", "lightning_attn_decode", "lightning_attn_prefill"]

#: Slot id of a padding row in a decode batch.
PADDING_SLOT = -1

_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# Custom ops: the cache is declared mutated, outputs are fresh tensors.


def _engine(backend: str):
    if backend == "triton":
        from lightning_attention.engines.triton import decode
    else:
        from lightning_attention.engines.cpu import decode
    return decode


def _decode(q, k, v, state_cache, slot_ids, g_gamma, scale, backend):
    """The decode step itself (the custom op's body, and the eager path: see lightning_attn_decode)."""
    with autocast_off(q.device), torch.no_grad():
        return _engine(backend).decode_step(q, k, v, state_cache, slot_ids, g_gamma, scale)


def _prefill(q, k, v, cu_seqlens, state_cache, slot_ids, use_initial_state, g_gamma, scale, backend):
    with autocast_off(q.device), torch.no_grad():
        return _engine(backend).prefill_into_slots(
            q, k, v, g_gamma, scale, cu_seqlens, state_cache, slot_ids, use_initial_state
        )


@torch.library.custom_op("lightning_attention::decode", mutates_args=("state_cache",))
def decode_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state_cache: torch.Tensor,
    slot_ids: torch.Tensor,
    g_gamma: torch.Tensor,
    scale: float,
    backend: str,
) -> torch.Tensor:
    return _decode(q, k, v, state_cache, slot_ids, g_gamma, scale, backend)


@decode_op.register_fake
def _(q, k, v, state_cache, slot_ids, g_gamma, scale, backend):
    return q.new_empty(q.shape[0], q.shape[1], v.shape[-1])


@torch.library.custom_op("lightning_attention::prefill", mutates_args=("state_cache",))
def prefill_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    state_cache: torch.Tensor,
    slot_ids: torch.Tensor,
    use_initial_state: torch.Tensor,
    g_gamma: torch.Tensor,
    scale: float,
    backend: str,
) -> torch.Tensor:
    return _prefill(q, k, v, cu_seqlens, state_cache, slot_ids, use_initial_state, g_gamma, scale, backend)


@prefill_op.register_fake
def _(q, k, v, cu_seqlens, state_cache, slot_ids, use_initial_state, g_gamma, scale, backend):
    return q.new_empty(*q.shape[:3], v.shape[-1])


# ---------------------------------------------------------------------------------------------------------------
# Validation specific to the slot-indexed cache (the rest is lightning_attention._validation).


def _check_decode_qkv(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name} must have 3 dims [N, H, D] (one new token per sequence), got {val.shape_str(t)}")
    if k.shape != q.shape or v.shape[:2] != q.shape[:2]:
        raise ValueError(
            f"q, k must be [N, H, K] and v [N, H, V]: q {val.shape_str(q)}, k {val.shape_str(k)}, v {val.shape_str(v)}"
        )
    _check_common_dtype_device(q, k, v)


def _check_common_dtype_device(q, k, v) -> None:
    if q.dtype not in _INPUT_DTYPES or not (q.dtype == k.dtype == v.dtype):
        raise TypeError(
            f"q, k, v must share one dtype of float16, bfloat16, float32: "
            f"q {val.shape_str(q)}, k {val.shape_str(k)}, v {val.shape_str(v)}"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device: q {val.shape_str(q)}, k {val.shape_str(k)}, v {val.shape_str(v)}")


def _slot_id_errors(ids: list[int], num_slots: int, allow_padding: bool) -> str | None:
    low = PADDING_SLOT if allow_padding else 0
    bad = sorted({s for s in ids if not low <= s < num_slots})
    if bad:
        padding = " (-1 = padding)" if allow_padding else ""
        return f"slot_ids must be in [{low}, {num_slots}){padding}; out of range: {bad[:16]}"
    used = [s for s in ids if s >= 0]
    if len(set(used)) != len(used):
        twice = sorted({s for s in used if used.count(s) > 1})
        return f"slot_ids must not repeat a slot within one call (each sequence owns its slot); repeated: {twice[:16]}"
    return None


def _device_ids_are_valid(slot_ids: torch.Tensor, num_slots: int, allow_padding: bool) -> bool:
    """All checks in device ops, read back once: one device->host sync."""
    ids = slot_ids.long()
    in_range = ((ids >= (PADDING_SLOT if allow_padding else 0)) & (ids < num_slots)).all()
    ordered = ids.sort().values
    repeats = ((ordered[1:] == ordered[:-1]) & (ordered[1:] >= 0)).any()
    return bool(in_range & ~repeats)


def _check_slot_ids(slot_ids, num_ids: int, num_slots: int, device, allow_padding: bool, check: bool) -> torch.Tensor:
    """Returns slot_ids on ``device``; values checked when that costs no sync, or when ``check`` allows one."""
    if not isinstance(slot_ids, torch.Tensor):
        raise TypeError(f"slot_ids must be a torch.Tensor, got {type(slot_ids).__name__}")
    if slot_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"slot_ids must be int32 or int64, got {val.shape_str(slot_ids)}")
    if tuple(slot_ids.shape) != (num_ids,):
        raise ValueError(f"slot_ids must be [N={num_ids}] (one slot per sequence), got {val.shape_str(slot_ids)}")
    if slot_ids.device != device and slot_ids.device.type != "cpu":
        raise ValueError(f"slot_ids must be on q's device {device} or on the CPU, got {val.shape_str(slot_ids)}")
    if val.values_readable(slot_ids):
        error = _slot_id_errors(slot_ids.tolist(), num_slots, allow_padding)
    elif check and not torch.compiler.is_compiling() and not _capturing(slot_ids):
        valid = _device_ids_are_valid(slot_ids, num_slots, allow_padding)
        error = None if valid else _slot_id_errors(slot_ids.tolist(), num_slots, allow_padding)
    else:
        error = None
    if error:
        raise ValueError(error)
    return slot_ids.to(device, non_blocking=True)


def _capturing(t: torch.Tensor) -> bool:
    return t.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _check_use_initial_state(use_initial_state, num_seqs: int, device) -> torch.Tensor:
    if isinstance(use_initial_state, bool):
        return torch.full((num_seqs,), use_initial_state, dtype=torch.bool, device=device)
    if not isinstance(use_initial_state, torch.Tensor) or use_initial_state.dtype != torch.bool:
        raise TypeError(
            f"use_initial_state must be a bool or a bool tensor [N={num_seqs}], got "
            f"{val.shape_str(use_initial_state) if isinstance(use_initial_state, torch.Tensor) else type(use_initial_state).__name__}"
        )
    if tuple(use_initial_state.shape) != (num_seqs,):
        raise ValueError(f"use_initial_state must be [N={num_seqs}], got {val.shape_str(use_initial_state)}")
    return use_initial_state.to(device, non_blocking=True)


# ---------------------------------------------------------------------------------------------------------------
# Public API


def new_state_cache(
    num_slots: int,
    num_heads: int,
    head_k_dim: int,
    head_v_dim: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device, None] = None,
) -> torch.Tensor:
    """A zeroed state cache ``[num_slots, H, K, V]`` (float32 or bfloat16) for one layer."""
    if dtype not in val.CACHE_DTYPES:
        raise TypeError(f"dtype must be float32 or bfloat16, got {dtype}")
    V = head_k_dim if head_v_dim is None else head_v_dim
    return torch.zeros(num_slots, num_heads, head_k_dim, V, dtype=dtype, device=device)


def lightning_attn_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state_cache: torch.Tensor,
    slot_ids: torch.Tensor,
    g_gamma: torch.Tensor,
    scale: float | None = None,
    *,
    backend: str = "auto",
    check_slots: bool = True,
) -> torch.Tensor:
    """One decode step for a batch of sequences, each owning one slot of ``state_cache``. No backward.

    Args:
        q, k: ``[N, H, K]``; v: ``[N, H, V]``; float16, bfloat16 or float32, one dtype, one device.
        state_cache: ``[num_slots, H, K, V]`` float32 or bfloat16, contiguous, on q's device; rows
            ``slot_ids`` are updated in place (``S = exp(g) S + k^T v``).
        slot_ids: int32/int64 ``[N]`` on q's device or the CPU: the slot of each row, distinct,
            in ``[0, num_slots)``, or -1 for a padding row (output zero, no slot touched).
        g_gamma: ``[H]`` natural-log decay per head, ``<= 0``.
        scale: multiplies ``q S``; default ``K ** -0.5``.
        backend: "auto", "torch" or "triton" (see :mod:`lightning_attention.engines`).
        check_slots: check GPU-resident slot ids (one device sync); see the module docstring.

    Returns:
        ``o [N, H, V]`` in q's dtype.
    """
    _check_decode_qkv(q, k, v)
    num_slots = val.check_state_cache(state_cache, q, v)
    H, K = q.shape[1], q.shape[2]
    g = val.check_g_gamma(g_gamma, H, q.device)
    scale = val.check_scale(scale, K)
    slot_ids = _check_slot_ids(slot_ids, q.shape[0], num_slots, q.device, allow_padding=True, check=check_slots)
    backend = resolve_backend(backend, q.device)
    # Compiled graphs record the custom op (which declares the cache mutation); eager calls skip the dispatcher,
    # whose ~250 us of host time per call (measured on H100 for the scan ops) exceeds a small decode step.
    step = decode_op if torch.compiler.is_compiling() else _decode
    return step(q, k, v, state_cache, slot_ids, g, scale, backend)


def lightning_attn_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    state_cache: torch.Tensor,
    slot_ids: torch.Tensor,
    g_gamma: torch.Tensor,
    scale: float | None = None,
    use_initial_state: Union[bool, torch.Tensor] = True,
    *,
    backend: str = "auto",
    check_slots: bool = True,
) -> torch.Tensor:
    """Prefill a packed batch of sequences into their cache slots, in one launch. No backward.

    Sequence n (tokens ``cu_seqlens[n]:cu_seqlens[n + 1]``) starts from ``state_cache[slot_ids[n]]`` (from zero
    where ``use_initial_state[n]`` is False: a new request; True continues a cached one, e.g. a chunked
    prompt) and its final state is written into that slot.

    Args:
        q, k: ``[1, T, H, K]``; v: ``[1, T, H, V]`` (sequences packed along T); float16, bfloat16 or float32.
        cu_seqlens: int32/int64 ``[N + 1]`` offsets, 0-based, last == T.
        state_cache: ``[num_slots, H, K, V]`` float32 or bfloat16, contiguous, on q's device.
        slot_ids: int32/int64 ``[N]``, distinct, in ``[0, num_slots)`` (no padding), q's device or the CPU.
        g_gamma: ``[H]`` natural-log decay per head, ``<= 0``.
        scale: default ``K ** -0.5``.
        use_initial_state: a bool for all sequences, or a bool tensor ``[N]``.
        backend, check_slots: as :func:`lightning_attn_decode`.

    Returns:
        ``o [1, T, H, V]`` in q's dtype.
    """
    val.check_qkv(q, k, v)
    _check_common_dtype_device(q, k, v)
    if cu_seqlens is None:
        raise ValueError("cu_seqlens is required: prefill runs a packed batch of sequences, q [1, T, H, K]")
    num_seqs = val.check_cu_seqlens(cu_seqlens, q)
    num_slots = val.check_state_cache(state_cache, q, v)
    H, K = q.shape[2], q.shape[3]
    g = val.check_g_gamma(g_gamma, H, q.device)
    scale = val.check_scale(scale, K)
    slot_ids = _check_slot_ids(slot_ids, num_seqs, num_slots, q.device, allow_padding=False, check=check_slots)
    use = _check_use_initial_state(use_initial_state, num_seqs, q.device)
    backend = resolve_backend(backend, q.device)
    run = prefill_op if torch.compiler.is_compiling() else _prefill  # (as in lightning_attn_decode)
    return run(q, k, v, cu_seqlens, state_cache, slot_ids, use, g, scale, backend)
