"""Serving API: decode steps, speculative (multi-token) decode and a varlen prefill on a slot-indexed state cache.

A serving engine keeps one recurrent state per running sequence in a cache per layer::

    state_cache [num_slots, H, K, V]   float32 (default) or bfloat16, contiguous, updated IN PLACE

and tells each call which slot every sequence of the batch owns (``slot_ids``). Per sequence and head, with the
log decay ``a = g_gamma[h]`` (plus a per-token gate ``g`` where given), the recurrence of every other op::

    S = exp(a) S + k^T v        o = scale * q S

* :func:`lightning_attn_decode`: one new token per sequence, ``q, k [N, H, K]``, ``v [N, H, V]``; slot -1 marks a
  padding row (fixed-size batches for CUDA graphs): output zero, no slot touched.
* :func:`lightning_attn_decode_multi`: L = 1..MAX_DECODE_TOKENS new tokens per sequence, ``q, k [N, L, H, K]``,
  optional per-row ``lengths [N]``; each slot's state is read once and written once (or, with
  ``update_cache=False``, only read).
* :func:`lightning_attn_commit`: advance each slot by the accepted prefix of the tokens a read-only call ran.
* :func:`lightning_attn_prefill`: a packed batch of prompts (``cu_seqlens``), each from its slot's state (or from
  zero, per sequence), final states written into the slots.

Every call is one or two kernel launches and is a ``torch.library`` custom op (``lightning_attention::decode``,
``::decode_multi``, ``::verify``, ``::commit``, ``::prefill``) that declares the cache mutated where it is written
and has a fake implementation, so it works under ``torch.compile`` and in CUDA graphs. No backward.

Speculative decoding (drafts verified in one pass): run the L draft tokens read-only, pick the accepted prefix
of each row from their outputs, then commit it::

    o = lightning_attn_decode_multi(q, k, v, cache, slots, g_gamma, update_cache=False)   # cache only read
    accepted = ...                                                                          # [N] in 0..L, any device
    lightning_attn_commit(k, v, cache, slots, g_gamma, accepted)                           # 0 keeps the slot as it was

The commit recomputes each state from its slot and the accepted tokens' k, v (the same float32 operations in the
same order as the read-only pass: the committed state is bit for bit the state after the accepted token), so
nothing but the drafts' k, v (which the caller has) is kept between the calls, and a rejected draft never reaches
the cache. State traffic per speculative step: one read (verify), one read and one write (commit): 1.5x a
single-token step, for any L (keeping the L intermediate states instead would write L states more).

Bad indices: no sync, never outside the cache, never silent. Index tensors (``slot_ids``, ``lengths``,
``accepted_lengths``, ``cu_seqlens``) on the CPU are checked on the host before anything runs (a ValueError
naming the row), for free; a CPU ``slot_ids`` is then copied to the device without blocking (from pinned memory
the copy is asynchronous: leave the tensor unchanged until the step has run). Index tensors on the GPU are never
read by the host: the kernels check them. A row whose slot is outside ``[0, num_slots)`` (other than the decode
padding -1), repeats the slot of an earlier row of the call, or whose length is outside ``[0, L]`` is skipped
(decode output zero, its slot not touched; of rows naming one slot the first is served), and a prefill whose
``cu_seqlens`` is not 0-based, non-decreasing and ending at T runs no sequence into the cache. Each skip is
recorded in an *error word* on the device (which call, which row, the bad value), and the kernel also sets a
flag in pinned host memory. The first serving call that starts after the GPU has run the failing one sees that
flag (a host read, no sync) and raises the ValueError, before running; :func:`check_errors` raises it right
away (one sync: call it after your own per-step sync, e.g. the sampled tokens' copy to the host, or every few
steps). Inside a CUDA graph only :func:`check_errors` runs Python: call it after the replays. The checks cost
no host time; on the GPU, every program of a row scans the slot ids of the rows before it (from L2) to find
repeats: 1.6% (fp32 cache) to 3% (bf16) of the step's bytes at N = 1024, 0.1-0.2% at N = 64 (docs/serving.md).
The torch backend (CPU, or CUDA without Triton) reads its index tensors on the host, so it checks them there and
raises before running.

bfloat16 cache: half the memory traffic of a decode step. The state is read into float32, updated, and rounded
to bfloat16 once per call when stored, so each call adds one rounding error (2^-9 relative) of the *state*.
Those errors add up like a random walk over the head's memory (about 1 / (1 - exp(g)) tokens), so the cost
depends on the decay. Measured over 10,000 steps (``benchmarks/bench_decode.py --accuracy``,
benchmarks/results/<card>/decode_bf16_accuracy.md; rel err vs the float64 recurrence; float32 cache: <= 2e-6):

* heads with g <= -1: state error ~1.7e-3 (about one rounding), flat in the step count;
* MiniMax layer 0: state error from 2e-3 (fastest head, g = -0.5) to 1.9e-2 (slowest, g = -2^-8, a memory of
  ~256 tokens); o error 1.5e-2 over all heads after 10,000 steps;
* a head without decay (g = 0, head 0 of the "tnl" schedule): the state is a growing sum and its error grows
  like sqrt(steps): o error 1e-2 after 100 steps, 3.5e-2 after 1,000, 1e-1 after 10,000.

Use the float32 cache (the default) when heads decay slowly or not at all and generations are long.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Union

import torch

from lightning_attention import _validation as val
from lightning_attention.engines import autocast_off, resolve_backend

__all__ = [
    "PADDING_SLOT",
    "MAX_DECODE_TOKENS",
    "new_state_cache",
    "lightning_attn_decode",
    "lightning_attn_decode_multi",
    "lightning_attn_commit",
    "lightning_attn_prefill",
    "check_errors",
]

#: Slot id of a padding row in a decode batch.
PADDING_SLOT = -1

#: Most new tokens per row of one multi-token decode call (the kernel unrolls them); longer inputs are prefills.
MAX_DECODE_TOKENS = 8

_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# The error word of each device (engines/triton/decode.py writes it; the host reads it here).


@dataclass
class _DeviceErrors:
    word: torch.Tensor  # int32, engines.triton.decode.ERROR_WORD fields, on the device
    doorbell: torch.Tensor  # int32 [1]: 1 once anything was reported; pinned host memory on CUDA
    bell: object  # numpy view of doorbell (a host read without torch's overhead); None if it lives on the GPU


_ERRORS: dict[torch.device, _DeviceErrors] = {}
#: What each call id was (op, N, L or T, num_slots): the last _KEPT_CALLS calls, and the last _KEPT_CAPTURED calls
#: captured in CUDA graphs (replays report the id given at capture, however long ago that was).
_CALLS: OrderedDict[int, tuple] = OrderedDict()
_CAPTURED_CALLS: OrderedDict[int, tuple] = OrderedDict()
_KEPT_CALLS, _KEPT_CAPTURED = 4096, 65536
_call_ids = itertools.count(1)


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _errors_on(device: torch.device) -> _DeviceErrors:
    """The device's error word and doorbell, made on first use (never inside a CUDA-graph capture: the capture
    would record its zeroing and reset it at every replay)."""
    errors = _ERRORS.get(device)
    if errors is not None:
        return errors
    if _capturing(device):
        raise RuntimeError(
            f"lightning_attention.serving: run one serving call on {device} (or new_state_cache(device=...)) before "
            "capturing a CUDA graph: its error word is allocated on first use, which a capture must not record"
        )
    from lightning_attention.engines.triton.decode import doorbell_reachable, new_error_word

    doorbell = torch.zeros(1, dtype=torch.int32, pin_memory=device.type == "cuda")
    if device.type == "cuda" and not doorbell_reachable(doorbell):
        # (Never seen: a platform without unified addressing.) Errors then surface through check_errors only.
        doorbell = torch.zeros(1, dtype=torch.int32, device=device)
    bell = doorbell.numpy() if doorbell.device.type == "cpu" else None
    errors = _ERRORS[device] = _DeviceErrors(new_error_word(device), doorbell, bell)
    return errors


def _error_sink(device: torch.device, call: tuple):
    """An ErrorSink for one call on ``device`` described by ``call`` = (op, N, L or T, num_slots)."""
    from lightning_attention.engines.triton.decode import ErrorSink

    errors = _errors_on(device)
    call_id = next(_call_ids) % (2**31 - 1) + 1
    calls, kept = (_CAPTURED_CALLS, _KEPT_CAPTURED) if _capturing(device) else (_CALLS, _KEPT_CALLS)
    calls[call_id] = call
    if len(calls) > kept:
        calls.popitem(last=False)
    return ErrorSink(errors.word, errors.doorbell, call_id)


def _raise_pending(device: torch.device) -> None:
    """Raise what the GPU reported since the last check, when the doorbell says there is something (no sync)."""
    errors = _ERRORS.get(device)
    if errors is not None and errors.bell is not None and errors.bell[0] != 0:
        check_errors(device)


def check_errors(device: Union[str, torch.device, None] = None) -> None:
    """Raise a ValueError for every bad index the kernels skipped since the last check (on ``device``, or on every
    device used), and reset. One sync per device (with its current stream: the serving calls' kernels must have
    been queued there). Call it outside compiled regions (it reads a tensor)."""
    if device is None:
        devices = list(_ERRORS)
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        devices = [dev]
    for dev in devices:
        errors = _ERRORS.get(dev)
        if errors is None:
            continue
        values = errors.word.tolist()
        errors.doorbell.zero_()
        if values[0] != 0:
            errors.word.zero_()
            raise ValueError(_describe(dev, values))


def _describe(device: torch.device, values: list[int]) -> str:
    from lightning_attention.engines.triton.decode import ERROR_WORD, ErrorKind

    field = dict(zip(ERROR_WORD, values))
    kinds = {
        ErrorKind.OUT_OF_RANGE: "slot outside the cache",
        ErrorKind.REPEATED: "slot repeated within a call",
        ErrorKind.BAD_LENGTH: "length outside [0, L]",
        ErrorKind.BAD_CU_SEQLENS: "bad cu_seqlens",
    }
    seen = ", ".join(text for bit, text in kinds.items() if field["FLAGS"] & bit)
    call = _CAPTURED_CALLS.get(field["CALL"]) or _CALLS.get(field["CALL"])
    if call is None:
        where, size, num_slots = f"call #{field['CALL']} (no longer recorded)", "?", "num_slots"
    else:
        op, N, size, num_slots = call
        where = f"lightning_attention::{op} call #{field['CALL']} (N={N}, {'T' if op == 'prefill' else 'L'}={size}, cache of {num_slots} slots)"  # noqa: E501
    row, value = field["ROW"], field["VALUE"]
    detail = {
        ErrorKind.OUT_OF_RANGE: f"row {row} has slot {value}, outside [0, {num_slots})"
        + ("" if call is not None and call[0] == "prefill" else " (-1 = padding)"),
        ErrorKind.REPEATED: f"row {row} has slot {value}, already named by an earlier row (which was served)",
        ErrorKind.BAD_LENGTH: f"row {row} has length {value}, outside [0, L={size}]",
        ErrorKind.BAD_CU_SEQLENS: (
            f"cu_seqlens[{row}] = {value}: offsets must start at 0, never decrease and end at T={size}; no "
            "sequence of the call reached the cache"
        ),
    }[field["KIND"]]
    return (
        f"lightning_attention.serving on {device}: {field['COUNT']} bad index report(s) since the last check "
        f"({seen}); those rows were skipped and their slots left as they were. First: {where}: {detail}."
    )


# ---------------------------------------------------------------------------------------------------------------
# Engine calls: the custom ops' bodies, and the eager path (the public functions, after validation).


def _engine(backend: str):
    if backend == "triton":
        from lightning_attention.engines.triton import decode
    else:
        from lightning_attention.engines.cpu import decode
    return decode


def _tokens(op, q, k, v, state_cache, slot_ids, g_gamma, scale, backend, g, lengths, update_cache, write_o):
    """Decode of q, k, v ``[N, L, H, *]`` or ``[N, H, *]`` (one token), index values checked where readable and
    ids on the device. The Triton path runs no torch op that autograd or autocast would touch (only allocations),
    so it skips their contexts: their ~10 us of host time matter to a small decode step."""
    options = dict(g=g, lengths=lengths, update_cache=update_cache, write_o=write_o)
    if backend == "triton":
        L = q.shape[1] if q.dim() == 4 else 1
        errors = _error_sink(state_cache.device, (op, q.shape[0], L, state_cache.shape[0]))
        return _engine(backend).decode_tokens(q, k, v, state_cache, slot_ids, g_gamma, scale, errors=errors, **options)
    with autocast_off(q.device), torch.no_grad():
        return _engine(backend).decode_tokens(q, k, v, state_cache, slot_ids, g_gamma, scale, **options)


def _prefill(q, k, v, cu_seqlens, state_cache, slot_ids, use_initial_state, g_gamma, scale, backend, g=None):
    args = (q, k, v, g_gamma, scale, cu_seqlens, state_cache, slot_ids, use_initial_state)
    with autocast_off(q.device), torch.no_grad():
        if backend == "torch":
            return _engine(backend).prefill_into_slots(*args, g=g)
        errors = _error_sink(state_cache.device, ("prefill", slot_ids.shape[0], q.shape[1], state_cache.shape[0]))
        return _engine(backend).prefill_into_slots(*args, errors, g=g)


def _readable(t: torch.Tensor, backend: str) -> bool:
    """Whether the host checks ``t``'s values: free for a CPU tensor; the torch engine reads them anyway."""
    return backend == "torch" or val.values_readable(t)


def _decode_indices(slot_ids, lengths, num_tokens, state_cache, backend):
    """Host checks of the readable index tensors, then both on the cache's device (see the module docstring)."""
    device = state_cache.device
    _raise_pending(device)
    if _readable(slot_ids, backend):
        _raise_if(_slot_id_errors(slot_ids.tolist(), state_cache.shape[0], allow_padding=True))
    if lengths is not None and _readable(lengths, backend):
        _raise_if(_length_errors(lengths.tolist(), num_tokens))
    return _on(slot_ids, device), None if lengths is None else _on(lengths, device)


def _on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``, copied without blocking from the CPU (no dispatcher call when it is there already)."""
    return t if t.device == device else t.to(device, non_blocking=True)


def _prefill_indices(cu_seqlens, slot_ids, state_cache, num_tokens, backend, check_cu_seqlens: bool):
    """As _decode_indices for a prefill. cu_seqlens values are checked where readable when ``check_cu_seqlens``
    (the eager path's _validation.check_cu_seqlens has done it; the torch engine does it as it reads them)."""
    device = state_cache.device
    _raise_pending(device)
    if check_cu_seqlens and val.values_readable(cu_seqlens):
        val.cu_seqlens_bounds(cu_seqlens, num_tokens)
    if _readable(slot_ids, backend):
        _raise_if(_slot_id_errors(slot_ids.tolist(), state_cache.shape[0], allow_padding=False))
    return _on(slot_ids, device)


# ---------------------------------------------------------------------------------------------------------------
# Custom ops: the cache is declared mutated where it is written, outputs are fresh tensors.


def _define_decode_op(name: str, update_cache: bool):
    """The custom op ``lightning_attention::<name>`` of a decode call, one token per row (``q [N, H, K]``) or L
    (``q [N, L, H, K]``; ``lengths``), the cache declared mutated when ``update_cache``, and its body (the eager
    path: index values checked where readable, then the engine)."""

    def body(q, k, v, state_cache, slot_ids, g_gamma, scale, backend, g=None, lengths=None):
        num_tokens = q.shape[1] if q.dim() == 4 else 1
        slot_ids, lengths = _decode_indices(slot_ids, lengths, num_tokens, state_cache, backend)
        return _tokens(name, q, k, v, state_cache, slot_ids, g_gamma, scale, backend, g, lengths, update_cache, True)

    @torch.library.custom_op(f"lightning_attention::{name}", mutates_args=("state_cache",) if update_cache else ())
    def op(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        state_cache: torch.Tensor,
        slot_ids: torch.Tensor,
        g_gamma: torch.Tensor,
        scale: float,
        backend: str,
        g: Optional[torch.Tensor] = None,
        lengths: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        return body(q, k, v, state_cache, slot_ids, g_gamma, scale, backend, g, lengths)

    @op.register_fake
    def _(q, k, v, state_cache, slot_ids, g_gamma, scale, backend, g=None, lengths=None):
        return q.new_empty(*q.shape[:-1], v.shape[-1])

    return op, body


decode_op, _decode = _define_decode_op("decode", update_cache=True)
decode_multi_op, _decode_multi = _define_decode_op("decode_multi", update_cache=True)
verify_op, _verify = _define_decode_op("verify", update_cache=False)


def _commit(k, v, state_cache, slot_ids, accepted_lengths, g_gamma, backend, g=None):
    slot_ids, lengths = _decode_indices(slot_ids, accepted_lengths, k.shape[1], state_cache, backend)
    _tokens("commit", k, k, v, state_cache, slot_ids, g_gamma, 1.0, backend, g, lengths, True, False)


@torch.library.custom_op("lightning_attention::commit", mutates_args=("state_cache",))
def commit_op(
    k: torch.Tensor,
    v: torch.Tensor,
    state_cache: torch.Tensor,
    slot_ids: torch.Tensor,
    accepted_lengths: torch.Tensor,
    g_gamma: torch.Tensor,
    backend: str,
    g: Optional[torch.Tensor] = None,
) -> None:
    _commit(k, v, state_cache, slot_ids, accepted_lengths, g_gamma, backend, g)


@commit_op.register_fake
def _(k, v, state_cache, slot_ids, accepted_lengths, g_gamma, backend, g=None):
    return None


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
    g: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    slot_ids = _prefill_indices(cu_seqlens, slot_ids, state_cache, q.shape[1], backend, check_cu_seqlens=True)
    return _prefill(q, k, v, cu_seqlens, state_cache, slot_ids, use_initial_state, g_gamma, scale, backend, g)


@prefill_op.register_fake
def _(q, k, v, cu_seqlens, state_cache, slot_ids, use_initial_state, g_gamma, scale, backend, g=None):
    return q.new_empty(*q.shape[:3], v.shape[-1])


# ---------------------------------------------------------------------------------------------------------------
# Validation specific to the slot-indexed cache (the rest is lightning_attention._validation).


def _check_decode_qkv(q, k, v, multi: bool) -> None:
    """Decode inputs ``[N, H, D]`` (``multi``: ``[N, L, H, D]``); q None for a commit (no queries)."""
    dims, layout = (4, "[N, L, H, D] (L new tokens per row)") if multi else (3, "[N, H, D] (one new token per row)")
    named = [(name, t) for name, t in (("q", q), ("k", k), ("v", v)) if name != "q" or q is not None]
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != dims:
            raise ValueError(f"{name} must have {dims} dims {layout}, got {val.shape_str(t)}")
    if (q is not None and k.shape != q.shape) or v.shape[:-1] != k.shape[:-1]:
        layouts = " [N, L, H, K], v [N, L, H, V]" if multi else " [N, H, K], v [N, H, V]"
        wanted = ("q, k" if q is not None else "k") + layouts
        raise ValueError(f"{wanted}: " + ", ".join(f"{name} {val.shape_str(t)}" for name, t in named))
    if multi and not 1 <= k.shape[1] <= MAX_DECODE_TOKENS:
        raise ValueError(
            f"k must have 1 to {MAX_DECODE_TOKENS} tokens per row (L, dim 1; longer inputs are prefills), "
            f"got {val.shape_str(k)}"
        )
    _check_common_dtype_device(k if q is None else q, k, v)


def _check_common_dtype_device(q, k, v) -> None:
    if q.dtype not in _INPUT_DTYPES or not (q.dtype == k.dtype == v.dtype):
        raise TypeError(
            f"q, k, v must share one dtype of float16, bfloat16, float32: "
            f"q {val.shape_str(q)}, k {val.shape_str(k)}, v {val.shape_str(v)}"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device: q {val.shape_str(q)}, k {val.shape_str(k)}, v {val.shape_str(v)}")


def _check_gates(g, shape: tuple[int, ...], layout: str, device) -> None:
    if g is None:
        return
    if not isinstance(g, torch.Tensor) or not g.is_floating_point():
        raise TypeError(f"g must be a floating tensor {layout} or None, got {val.shape_str(g) if isinstance(g, torch.Tensor) else type(g).__name__}")  # noqa: E501
    if tuple(g.shape) != shape:
        raise ValueError(f"g must be {layout} = {list(shape)}, got {val.shape_str(g)}")
    if g.device != device:
        raise ValueError(f"g must be on q's device {device}, got {val.shape_str(g)}")


def _check_index(t, name: str, num_ids: int, device, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 or int64, got {val.shape_str(t)}")
    if tuple(t.shape) != (num_ids,):
        raise ValueError(f"{name} must be [N={num_ids}] ({what}), got {val.shape_str(t)}")
    if t.device != device and t.device.type != "cpu":
        raise ValueError(f"{name} must be on q's device {device} or on the CPU, got {val.shape_str(t)}")


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


def _length_errors(lengths: list[int], num_tokens: int) -> str | None:
    bad = [(row, n) for row, n in enumerate(lengths) if not 0 <= n <= num_tokens]
    if bad:
        return f"lengths must be in [0, L={num_tokens}]; (row, length) out of range: {bad[:16]}"
    return None


def _raise_if(error: str | None) -> None:
    if error:
        raise ValueError(error)


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
    """A zeroed state cache ``[num_slots, H, K, V]`` (float32 or bfloat16) for one layer. On a GPU it also sets up
    that device's error word, so that the first serving call may be captured in a CUDA graph."""
    if dtype not in val.CACHE_DTYPES:
        raise TypeError(f"dtype must be float32 or bfloat16, got {dtype}")
    V = head_k_dim if head_v_dim is None else head_v_dim
    cache = torch.zeros(num_slots, num_heads, head_k_dim, V, dtype=dtype, device=device)
    if cache.device.type == "cuda" and resolve_backend("auto", cache.device) == "triton":
        _errors_on(cache.device)
    return cache


def lightning_attn_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state_cache: torch.Tensor,
    slot_ids: torch.Tensor,
    g_gamma: torch.Tensor,
    scale: float | None = None,
    *,
    g: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """One decode step for a batch of sequences, each owning one slot of ``state_cache``. No backward.

    Args:
        q, k: ``[N, H, K]``; v: ``[N, H, V]``; float16, bfloat16 or float32, one dtype, one device.
        state_cache: ``[num_slots, H, K, V]`` float32 or bfloat16, contiguous, on q's device; rows
            ``slot_ids`` are updated in place (``S = exp(g_gamma + g) S + k^T v``).
        slot_ids: int32/int64 ``[N]`` on q's device or the CPU: the slot of each row, distinct,
            in ``[0, num_slots)``, or -1 for a padding row (output zero, no slot touched). Bad ids: see the
            module docstring (never a sync; rows skipped and reported).
        g_gamma: ``[H]`` natural-log decay per head, ``<= 0``.
        scale: multiplies ``q S``; default ``K ** -0.5``.
        g: optional ``[N, H]`` log decay of this step per row and head (a data-dependent gate), added to g_gamma.
        backend: "auto", "torch" or "triton" (see :mod:`lightning_attention.engines`).

    Returns:
        ``o [N, H, V]`` in q's dtype.
    """
    _check_decode_qkv(q, k, v, multi=False)
    num_slots = val.check_state_cache(state_cache, q, v)
    N, H, K = q.shape
    g_gamma = val.check_g_gamma(g_gamma, H, q.device)
    scale = val.check_scale(scale, K)
    _check_gates(g, (N, H), "[N, H]", q.device)
    _check_index(slot_ids, "slot_ids", N, q.device, "one slot per sequence")
    backend = resolve_backend(backend, q.device)
    # Compiled graphs record the custom op (which declares the cache mutation); eager calls skip the dispatcher,
    # whose ~250 us of host time per call (measured on H100 for the scan ops) exceeds a small decode step.
    run = decode_op if torch.compiler.is_compiling() else _decode
    return run(q, k, v, state_cache, slot_ids, g_gamma, scale, backend, g)


def _check_multi(q, k, v, state_cache, slot_ids, g_gamma, scale, g, lengths, lengths_name, backend):
    """Checks of a multi-token call (q None for a commit; ``lengths`` optional unless named accepted_lengths);
    returns (g_gamma float32, scale, backend)."""
    _check_decode_qkv(q, k, v, multi=True)
    val.check_state_cache(state_cache, k, v)
    N, L, H, K = k.shape
    g_gamma = val.check_g_gamma(g_gamma, H, k.device)
    scale = val.check_scale(scale, K)
    _check_gates(g, (N, L, H), "[N, L, H]", k.device)
    _check_index(slot_ids, "slot_ids", N, k.device, "one slot per sequence")
    if lengths is not None or lengths_name == "accepted_lengths":
        _check_index(lengths, lengths_name, N, k.device, f"tokens per row, 0..L={L}")
    return g_gamma, scale, resolve_backend(backend, k.device)


def lightning_attn_decode_multi(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state_cache: torch.Tensor,
    slot_ids: torch.Tensor,
    g_gamma: torch.Tensor,
    scale: float | None = None,
    *,
    g: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    update_cache: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """L new tokens per sequence in one launch (speculative drafts, multi-token prediction). No backward.

    Token t of row n sees the state after tokens 0..t of its row, exactly as L single-token steps would (the
    state stays float32 in registers across the tokens: a bfloat16 cache is rounded once per call, not per token).

    Args:
        q, k: ``[N, L, H, K]``; v: ``[N, L, H, V]`` (1 <= L <= MAX_DECODE_TOKENS); float16, bfloat16 or float32.
        state_cache, slot_ids, g_gamma, scale, backend: as :func:`lightning_attn_decode`.
        g: optional ``[N, L, H]`` log decay per row, token and head, added to g_gamma.
        lengths: optional int ``[N]`` (q's device or the CPU): row n runs its first ``lengths[n]`` tokens (0..L);
            its outputs past that are zero and its state advances by those tokens only.
        update_cache: False reads the cache and writes nothing (verification of drafts: commit the accepted
            prefix with :func:`lightning_attn_commit`).

    Returns:
        ``o [N, L, H, V]`` in q's dtype.
    """
    g_gamma, scale, backend = _check_multi(q, k, v, state_cache, slot_ids, g_gamma, scale, g, lengths, "lengths", backend)  # noqa: E501
    if torch.compiler.is_compiling():
        run = decode_multi_op if update_cache else verify_op
    else:
        run = _decode_multi if update_cache else _verify
    return run(q, k, v, state_cache, slot_ids, g_gamma, scale, backend, g, lengths)


def lightning_attn_commit(
    k: torch.Tensor,
    v: torch.Tensor,
    state_cache: torch.Tensor,
    slot_ids: torch.Tensor,
    g_gamma: torch.Tensor,
    accepted_lengths: torch.Tensor,
    *,
    g: torch.Tensor | None = None,
    backend: str = "auto",
) -> None:
    """Advance each row's slot by the first ``accepted_lengths[n]`` of the tokens that a read-only
    :func:`lightning_attn_decode_multi` (``update_cache=False``) ran from it; 0 keeps the slot as it was.

    Args:
        k, v, g, slot_ids, g_gamma: those of the read-only call (``k [N, L, H, K]``, ``v [N, L, H, V]``).
        accepted_lengths: int ``[N]`` in 0..L, on q's device or the CPU (e.g. straight from the sampler).

    The committed state is the one the read-only call computed after the last accepted token, bit for bit, as
    long as the slot did not change in between.
    """
    g_gamma, _, backend = _check_multi(
        None, k, v, state_cache, slot_ids, g_gamma, 1.0, g, accepted_lengths, "accepted_lengths", backend
    )
    if torch.compiler.is_compiling():
        commit_op(k, v, state_cache, slot_ids, accepted_lengths, g_gamma, backend, g)
        return
    _commit(k, v, state_cache, slot_ids, accepted_lengths, g_gamma, backend, g)


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
    g: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Prefill a packed batch of sequences into their cache slots. No backward; no host read of GPU tensors.

    Sequence n (tokens ``cu_seqlens[n]:cu_seqlens[n + 1]``) starts from ``state_cache[slot_ids[n]]`` (from zero
    where ``use_initial_state[n]`` is False: a new request; True continues a cached one, e.g. a chunked
    prompt) and its final state is written into that slot.

    Args:
        q, k: ``[1, T, H, K]``; v: ``[1, T, H, V]`` (sequences packed along T); float16, bfloat16 or float32.
        cu_seqlens: int32/int64 ``[N + 1]`` offsets on q's device, 0-based, non-decreasing, last == T.
        state_cache: ``[num_slots, H, K, V]`` float32 or bfloat16, contiguous, on q's device.
        slot_ids: int32/int64 ``[N]``, distinct, in ``[0, num_slots)`` (no padding), q's device or the CPU.
        g_gamma: ``[H]`` natural-log decay per head, ``<= 0``.
        scale: default ``K ** -0.5``.
        use_initial_state: a bool for all sequences, or a bool tensor ``[N]``.
        g: optional per-token log gates ``[1, T, H]`` (fla's Simple GLA ``g``), added to g_gamma.
        backend: as :func:`lightning_attn_decode`. Bad values of GPU-resident cu_seqlens or slot_ids: see the
            module docstring.

    Returns:
        ``o [1, T, H, V]`` in q's dtype.
    """
    val.check_qkv(q, k, v)
    _check_common_dtype_device(q, k, v)
    if cu_seqlens is None:
        raise ValueError("cu_seqlens is required: prefill runs a packed batch of sequences, q [1, T, H, K]")
    num_seqs = val.check_cu_seqlens(cu_seqlens, q)
    val.check_state_cache(state_cache, q, v)
    H, K = q.shape[2], q.shape[3]
    g_gamma = val.check_g_gamma(g_gamma, H, q.device)
    scale = val.check_scale(scale, K)
    _check_index(slot_ids, "slot_ids", num_seqs, q.device, "one slot per sequence")
    use = _check_use_initial_state(use_initial_state, num_seqs, q.device)
    _check_gates(g, tuple(q.shape[:3]), "[1, T, H]", q.device)
    backend = resolve_backend(backend, q.device)
    if torch.compiler.is_compiling():  # (as in lightning_attn_decode)
        return prefill_op(q, k, v, cu_seqlens, state_cache, slot_ids, use, g_gamma, scale, backend, g)
    slot_ids = _prefill_indices(cu_seqlens, slot_ids, state_cache, q.shape[1], backend, check_cu_seqlens=False)
    return _prefill(q, k, v, cu_seqlens, state_cache, slot_ids, use, g_gamma, scale, backend, g)
