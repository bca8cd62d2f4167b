"""Every collective of context-parallel attention, each failing with a message that says what happened.

Per forward call: one all-gather of a few integers per rank (the *call signature*: shard length, shapes, dtype,
options, whether per-token gates ``g`` are given and their dtype, fingerprints of ``g_gamma`` and ``cu_seqlens``,
one read on the host), then one all-gather of one ``[R, H, K, V]`` state per rank (with ``g``: and the ``[R, H]``
decay over the run it stands for). Per backward: one all-gather of one state gradient per rank (with ``g``: and its
``[R, H]`` decay; plus the final-state gradients when ``final_state`` was returned). Packed sequences with
``output_final_state=True`` add one all-reduce of the ``[N, H, K, V]`` final states in the forward.

The signature exchange comes first so that ranks that disagree never enter a collective whose size depends on
what they disagree on (that would hang, or silently mix tensors): every rank compares the same gathered table
and raises the same ValueError, naming the field and each rank's value. A rank whose own arguments fail
validation still takes part, flagged, and every rank raises that rank's error. Its cost: one tiny all-gather and
one device-to-host read per forward (collective latency plus one pipeline bubble; on CPU/gloo see
benchmarks/bench_context_parallel.py, which times it alone, and docs/distributed.md).

A failed collective (a rank that exited, or did not reach the same call within the group's timeout) raises a
RuntimeError naming the step; with gloo that happens as soon as the peer's connection drops, or after the
group's ``timeout``. With NCCL a collective on a dead peer blocks until the NCCL watchdog ends the process after
the group's ``timeout``, unless ``TORCH_NCCL_BLOCKING_WAIT=1`` is set (then the wait raises here as well).
"""

from __future__ import annotations

import struct
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["Signature", "agree", "all_gather_rows", "all_reduce_sum", "collective"]

#: Bumped whenever the signature layout or the exchange protocol changes: ranks running different versions of
#: the library are told so instead of misreading each other's fields.
PROTOCOL = 2

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_DEVICE_TYPES = ("cpu", "cuda")
_HASH_BASE, _HASH_MOD = 1_000_003, (1 << 61) - 1


@contextmanager
def collective(step: str):
    """Turns a process-group failure inside the block into a RuntimeError that names ``step``."""
    try:
        yield
    except RuntimeError as exc:  # DistBackendError / DistNetworkError are RuntimeErrors
        raise RuntimeError(
            f"context parallel attention: the {step} failed: a rank of the group exited, or did not reach the same "
            "call within the process group's timeout. Every rank of the group must call the op (and run its "
            f"backward) in the same order. Process group error: {str(exc).strip()[:500]}"
        ) from exc


def all_gather_rows(local: torch.Tensor, group, world_size: int, step: str) -> torch.Tensor:
    """All-gather a tensor's elements: ``[world_size, numel]`` in the group's rank order."""
    flat = local.reshape(-1)
    if world_size == 1:
        return flat[None]
    out = flat.new_empty(world_size * flat.numel())
    gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    with collective(step):
        gather_single(out, flat.contiguous(), group=group)
    return out.view(world_size, -1)


def all_reduce_sum(t: torch.Tensor, group, world_size: int, step: str) -> torch.Tensor:
    """Sum ``t`` over the group, in place; returns it."""
    if world_size > 1:
        with collective(step):
            dist.all_reduce(t, group=group)
    return t


# ---------------------------------------------------------------------------------------------------------
# The call signature.
# ---------------------------------------------------------------------------------------------------------


def _float_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def fingerprint(values) -> int:
    """A polynomial hash of a sequence of ints (mod 2^61 - 1): equal sequences, equal fingerprints."""
    h = 0
    for x in values:
        h = (h * _HASH_BASE + int(x)) % _HASH_MOD
    return h


#: g_gamma tensor -> (its version, its fingerprint): a layer passes the same tensor on every call.
_FINGERPRINTS = WeakIdKeyDictionary()


def device_fingerprint(x: torch.Tensor) -> torch.Tensor:
    """Two int64 fingerprints of a float32 tensor's bits, computed where it lives (no host read): ``[2]``.
    Computed once per tensor and in-place version."""
    known = _FINGERPRINTS.get(x)
    if known is not None and known[0] == x._version:
        return known[1]
    bits = x.detach().float().contiguous().view(torch.int32).to(torch.int64)
    weights = torch.arange(1, bits.numel() + 1, device=x.device, dtype=torch.int64)
    fingerprint = torch.stack([bits.sum(), (bits * weights).sum()])
    _FINGERPRINTS[x] = (x._version, fingerprint)
    return fingerprint


@dataclass(frozen=True)
class Signature:
    """What every rank must agree on, and the one thing that may differ (``tokens``, this rank's shard length).

    The host part is a row of int64; ``g_gamma``'s fingerprint is computed on its device and appended, so the
    whole row goes through one all-gather and one host read."""

    tokens: int
    batch: int
    heads: int
    k_dim: int
    v_dim: int
    dtype: torch.dtype
    device_type: str
    initial_state: bool
    output_final_state: bool
    reverse: bool
    chunk_size: int
    scale: float
    num_seqs: int  # -1: no cu_seqlens
    cu_seqlens: int  # fingerprint of the values (0 without)
    needs_grad: bool
    gates: torch.dtype | None  # g's dtype, None: no per-token gates

    def row(self) -> list[int]:
        dtype = _DTYPES.index(self.dtype) if self.dtype in _DTYPES else -2
        device = _DEVICE_TYPES.index(self.device_type) if self.device_type in _DEVICE_TYPES else -2
        gates = -1 if self.gates is None else (_DTYPES.index(self.gates) if self.gates in _DTYPES else -2)
        return [
            PROTOCOL, 0, self.tokens, self.batch, self.heads, self.k_dim, self.v_dim, dtype, device,
            int(self.initial_state), int(self.output_final_state), int(self.reverse), self.chunk_size,
            _float_bits(self.scale), self.num_seqs, self.cu_seqlens, int(self.needs_grad), gates,
        ]  # fmt: skip


#: Row layout: (column, what it means in an error message). Column 1 is the status (0 ok, 1 invalid arguments),
#: column 2 the shard length; the two g_gamma fingerprint columns come last.
_FIELDS = {
    "protocol": (0, "the library's context-parallel protocol version (different lightning_attention versions)"),
    "shape": ((3, 4, 5, 6), "q's B, H, K and v's V ([B, H, K, V])"),
    "dtype": (7, "the dtype of q, k, v"),
    "device": (8, "the device type of q, k, v"),
    "initial_state": (9, "whether initial_state is given"),
    "output_final_state": (10, "output_final_state"),
    "reverse": (11, "reverse"),
    "chunk_size": (12, "chunk_size"),
    "scale": (13, "scale"),
    "cu_seqlens": ((14, 15), "cu_seqlens (the number of sequences, then a fingerprint of the values)"),
    "needs_grad": (16, "whether the inputs require grad (every rank must run the backward, or none)"),
    "gates": (17, "whether g (per-token gates) is given, and its dtype"),
    "g_gamma": ((18, 19), "g_gamma's values (a fingerprint of its bits)"),
}
_STATUS, _TOKENS, _ROW_LENGTH = 1, 2, 20


def _show(field: str, cols, row: list[int]) -> str:
    if field == "shape":
        return "[" + ", ".join(str(row[c]) for c in cols) + "]"
    if field in ("dtype", "gates"):
        i = row[cols]
        if field == "gates" and i == -1:
            return "no g"
        return str(_DTYPES[i]).replace("torch.", "") if 0 <= i < len(_DTYPES) else "other"
    if field == "device":
        i = row[cols]
        return _DEVICE_TYPES[i] if 0 <= i < len(_DEVICE_TYPES) else "other"
    if field == "scale":
        return f"{struct.unpack('<d', struct.pack('<q', row[cols]))[0]:g}"
    if field in ("initial_state", "output_final_state", "reverse", "needs_grad"):
        return str(bool(row[cols]))
    if isinstance(cols, tuple):
        return "/".join(str(row[c]) for c in cols)
    return str(row[cols])


def _disagreements(table: list[list[int]]) -> list[str]:
    out = []
    for field, (cols, meaning) in _FIELDS.items():
        shown = [_show(field, cols, row) for row in table]
        if len(set(shown)) > 1:
            per_rank = ", ".join(f"rank {r}: {s}" for r, s in enumerate(shown[:8]))
            more = f", ... ({len(shown)} ranks)" if len(shown) > 8 else ""
            out.append(f"{meaning}: {per_rank}{more}")
    return out


def agree(signature: Signature | None, g_gamma: torch.Tensor | None, device: torch.device, group, world_size: int,
          rank: int, error: Exception | None = None) -> list[int]:  # fmt: skip
    """Exchange the call signature; returns every rank's shard length (group rank order).

    ``signature`` None with ``error``: this rank's arguments failed validation; it still takes part, and every
    rank raises that error (with the rank named). Otherwise raises ValueError on every rank if any field differs.
    """
    if signature is None:
        row = torch.full((_ROW_LENGTH,), -1, dtype=torch.int64, device=device)
        row[0], row[_STATUS] = PROTOCOL, 1
    else:
        host = torch.tensor(signature.row(), dtype=torch.int64)
        row = torch.cat([host.to(device), device_fingerprint(g_gamma).to(device)])
    gathered = all_gather_rows(row, group, world_size, "exchange of the call signature").tolist()

    failed = [r for r, row in enumerate(gathered) if row[_STATUS] == 1]
    if failed:
        message = f"{type(error).__name__}: {error}" if error is not None else None
        with collective("exchange of argument errors"):
            messages = [None] * world_size
            if world_size > 1:
                dist.all_gather_object(messages, message, group=group)
            else:
                messages = [message]
        first = failed[0]
        kind, _, text = messages[first].partition(": ")
        exc_type = {"TypeError": TypeError, "ValueError": ValueError}.get(kind, RuntimeError)
        others = f" (also rejected on ranks {failed[1:]})" if len(failed) > 1 else ""
        raise exc_type(
            f"{text} [context parallel: rank {first} of {world_size} rejected its arguments{others}; every rank of "
            "the group raises this error]"
        ) from error
    problems = _disagreements(gathered)
    if problems:
        raise ValueError(
            "context parallel attention: the ranks of the group disagree on "
            + "; ".join(problems)
            + ". Every rank must pass the same B, H, K, V, dtype, g_gamma, scale, options, initial_state presence, g "
            "presence and dtype, and cu_seqlens; only the shard length (q.shape[1] and g.shape[1]) may differ."
        )
    return [row[_TOKENS] for row in gathered]
