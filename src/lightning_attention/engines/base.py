"""The scan primitive every engine implements, the engine interface ops.py calls, and the algebra between them.

Per sequence and head, the log decay of scan position p (1-based, p = 1..L in scan order) is
``a_p = g_gamma[h] + g[token p, h]`` (``g`` per-token gates ``[B, T, H]``, or absent: then ``a_p = g_gamma[h]``).
A *scan* computes::

    shift = 0 (forward):  S_p = exp(a_p) S_{p-1} + k_p^T v_p,   o_p = scale q_p S_p,   final = S_L     (S_0 = S0)
    shift = 1 (backward): S_p = S'_{p-1} + k_p^T v_p,          o_p = scale q_p S_p,   S'_p = exp(a_p) S_p,
                          final = S'_L                                                            (S'_0 = S0)

``shift = 0`` is the public forward (S0 = h0 is decayed by the first token's gate, ``final = S_T``).
``shift = 1`` is the backward's: dS_T (``dht``) enters undecayed, and ``final`` is the state gradient decayed once
more, which is exactly ``dh0`` (and ``dht`` itself for an empty sequence). In the forward's terms, its gates are
shifted by one token (S_p = exp(a_{p-1}) S_{p-1} + ..., a_0 = 0) and its final state is decayed by a_L.
``reverse=True`` runs the scan from the last token to the first (per sequence with ``cu_seqlens``); each token
keeps its own gate.

Backward of ``o, final = scan(q, k, v, h0, shift=0)`` with upstream ``do``, ``dht`` (docs/DESIGN.md), in scan
order, with D_t the gradient of S_t::

    D_t = exp(a_{t+1}) D_{t+1} + scale q_t^T do_t,  D_T = dht + scale q_T^T do_T
    dq  = scan(do, v, k, h0^T, shift=0, scale)                  (dq_t = scale do_t S_t^T)
    dv, dh0 = scan(k, scale*q, do, dht,   shift=1, 1, reversed) (dv_t = k_t D_t, dh0 = exp(a_1) D_1)
    dk  = scan(v, do, scale*q, dht^T, shift=1, 1, reversed)     (dk_t = D_t v_t)
    dg_t = < D_t, S_t - k_t^T v_t >                              (per-token gates only)

The three scans give dq, dk, dv and dh0 for any gates; ``dg`` needs the states themselves, so only the chunked
engines compute it (their fused backwards; docs/DESIGN.md "Accuracy of dg").

Shapes: q, k ``[B, T, H, K]``, v ``[B, T, H, V]``, g_gamma float32 ``[H]`` (always a tensor: zeros when the user
gives only ``g``), g ``[B, T, H]`` contiguous in the state dtype or None, S0 ``[N, H, K, V]`` (any strides) or
None, cu_seqlens int ``[N + 1]`` or None (then N = B). ``o`` has q's dtype, ``final`` the state dtype: float32,
float64 for float64 inputs (the torch engines).
"""

from __future__ import annotations

from typing import Protocol

import torch

from lightning_attention._validation import ScanConfig

__all__ = ["Scan", "Engine", "ScanEngine", "LengthRoutedEngine", "tokens_per_sequence", "engine_keywords"]


class Scan(Protocol):
    """One scan of the module docstring's recurrence with ``shift`` 0 or 1 (what :class:`ScanEngine` is built
    from): returns ``(o, final_state)``."""

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        g_gamma: torch.Tensor,
        scale: float,
        state: torch.Tensor | None,
        shift: int,
        reverse: bool,
        cu_seqlens: torch.Tensor | None,
        chunk_size: int,
        g: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


class Engine(Protocol):
    """What ops.py calls::

        forward(q, k, v, g_gamma, cfg, initial_state, cu_seqlens, g=None, cu_seqlens_cpu=None) -> (o, final_state)
        backward(q, k, v, g_gamma, cfg, initial_state, cu_seqlens, do, dht, g=None, cu_seqlens_cpu=None)
            -> (dq, dk, dv, dh0 or None, dg or None)

    ``dq, dk, dv`` have q's, k's, v's dtypes; ``dh0`` the state dtype (None exactly when ``initial_state`` is
    None); ``dg`` is ``[B, T, H]`` in the state dtype, None exactly when ``g`` is None. ``do`` has o's shape,
    ``dht`` the final state's (or None).

    ``cu_seqlens_cpu``: None, or a CPU int tensor holding ``cu_seqlens``' values (ops.py checked its shape and, where
    readable without a sync, its values). An engine that reads the sequence bounds on the host (a launch plan, a
    per-sequence loop) reads them from it instead of from ``cu_seqlens``, so a CUDA ``cu_seqlens`` costs no device
    sync; kernels that read offsets on the device keep reading ``cu_seqlens``. ops.py passes ``g`` and
    ``cu_seqlens_cpu`` only when they are given, so an engine built before them still serves the calls without them.

    An engine may also define ``forward_saving(...)`` (forward's arguments) returning ``(o, final_state, saved)``
    and accept ``backward(..., saved=saved)``: ``saved`` (a tensor or None) is a result of the forward that the
    backward would otherwise compute again. ops.py's eager path keeps it between the two; the backward must give
    the same result without it (the torch.compile custom ops save nothing)."""

    def forward(self, q, k, v, g_gamma, cfg: ScanConfig, initial_state, cu_seqlens, g=None, cu_seqlens_cpu=None): ...

    def backward(
        self, q, k, v, g_gamma, cfg: ScanConfig, initial_state, cu_seqlens, do, dht, g=None, cu_seqlens_cpu=None
    ): ...


def transpose_state(state: torch.Tensor | None) -> torch.Tensor | None:
    return None if state is None else state.transpose(-1, -2)


class ScanEngine:
    """An engine made of one scan function: the forward is one scan, the backward three (no ``dg``: see the module
    docstring; :class:`LengthRoutedEngine` sends gated backwards to a chunked engine).

    ``host_bounds``: the scan reads ``cu_seqlens`` only on the host (the torch scans loop over sequences in Python),
    so a host copy ``cu_seqlens_cpu`` can stand in for it. A scan that reads offsets on the device (a Triton kernel)
    keeps ``cu_seqlens``."""

    def __init__(self, scan: Scan, host_bounds: bool = False):
        self.scan = scan
        self.host_bounds = host_bounds

    def _offsets(self, cu_seqlens, cu_seqlens_cpu):
        return cu_seqlens_cpu if self.host_bounds and cu_seqlens_cpu is not None else cu_seqlens

    def forward(self, q, k, v, g_gamma, cfg: ScanConfig, initial_state, cu_seqlens, g=None, cu_seqlens_cpu=None):
        cu = self._offsets(cu_seqlens, cu_seqlens_cpu)
        gates = {} if g is None else {"g": g}
        return self.scan(q, k, v, g_gamma, cfg.scale, initial_state, 0, cfg.reverse, cu, cfg.chunk_size, **gates)

    def backward(
        self, q, k, v, g_gamma, cfg: ScanConfig, initial_state, cu_seqlens, do, dht, g=None, cu_seqlens_cpu=None
    ):
        if g is not None:
            raise NotImplementedError("the three-scan backward has no dg: run a chunked engine's backward")
        scan, C, cu = self.scan, cfg.chunk_size, self._offsets(cu_seqlens, cu_seqlens_cpu)
        dq, _ = scan(do, v, k, g_gamma, cfg.scale, transpose_state(initial_state), 0, cfg.reverse, cu, C)
        # Scale q once (in the state dtype) so the state-gradient scans carry scale inside D, as D_t does.
        q_scaled = q.to(torch.promote_types(q.dtype, torch.float32)) * cfg.scale
        dv, dh0 = scan(k, q_scaled, do, g_gamma, 1.0, dht, 1, not cfg.reverse, cu, C)
        dk, _ = scan(v, do, q_scaled, g_gamma, 1.0, transpose_state(dht), 1, not cfg.reverse, cu, C)
        return dq, dk, dv, (dh0 if initial_state is not None else None), None


def tokens_per_sequence(q: torch.Tensor, cu_seqlens: torch.Tensor | None) -> float:
    """Mean tokens per sequence, from shapes only (no device sync): T, or T / N for packed sequences."""
    if cu_seqlens is None:
        return q.shape[1]
    return q.shape[1] / max(cu_seqlens.numel() - 1, 1)


def engine_keywords(g, cu_seqlens_cpu) -> dict:
    """The optional engine keywords that are set: callers pass ``g`` and ``cu_seqlens_cpu`` only when given
    (:class:`Engine`)."""
    extra = {} if g is None else {"g": g}
    if cu_seqlens_cpu is not None:
        extra["cu_seqlens_cpu"] = cu_seqlens_cpu
    return extra


class LengthRoutedEngine:
    """The recurrent op's rule: a token-loop engine for short sequences, the chunked engine above a threshold
    (same math, same results within rounding), so a long prompt through the recurrent op costs what the chunked
    op costs. ``max_tokens``: the threshold in mean tokens per sequence (an attribute, read at every call).

    With per-token gates the backward always runs the chunked engine's: ``dg`` needs the per-token states, which
    the chunked backward forms anyway and a token loop would have to store or recompute token by token (the
    recurrent op serves inference; its backward exists for completeness and costs what the chunked one costs)."""

    def __init__(self, short: Engine, long: Engine, max_tokens: int):
        self.short, self.long, self.max_tokens = short, long, max_tokens

    def pick(self, q: torch.Tensor, cu_seqlens: torch.Tensor | None) -> Engine:
        return self.short if tokens_per_sequence(q, cu_seqlens) <= self.max_tokens else self.long

    def forward(self, q, k, v, g_gamma, cfg: ScanConfig, initial_state, cu_seqlens, g=None, cu_seqlens_cpu=None):
        return self.pick(q, cu_seqlens).forward(
            q, k, v, g_gamma, cfg, initial_state, cu_seqlens, **engine_keywords(g, cu_seqlens_cpu)
        )

    def backward(
        self, q, k, v, g_gamma, cfg: ScanConfig, initial_state, cu_seqlens, do, dht, g=None, cu_seqlens_cpu=None
    ):
        engine = self.long if g is not None else self.pick(q, cu_seqlens)
        return engine.backward(
            q, k, v, g_gamma, cfg, initial_state, cu_seqlens, do, dht, **engine_keywords(g, cu_seqlens_cpu)
        )
