"""Public functional API: validation, engine dispatch, and the torch.library custom operators.

Lightning Attention is linear attention with one fixed scalar decay per head. Per sequence and head, with
``lam = exp(g_gamma[h])``::

    S_t = lam * S_{t-1} + k_t^T v_t          o_t = scale * q_t S_t          S_0 = initial_state

Layout (fla's): q, k ``[B, T, H, K]``, v ``[B, T, H, V]``, states ``[N, H, K, V]`` float32 (float64 for float64
inputs), N = B, or the number of packed sequences when ``cu_seqlens`` is given (then B must be 1).
Head-first tensors ``[B, H, T, K]`` cannot be told apart from ``[B, T, H, K]`` by shape: transpose them first
(``q.transpose(1, 2)``). Every op returns ``(o, final_state)``; ``final_state`` is None unless
``output_final_state=True``. ``o`` has q's dtype. Inputs are never modified.

Validation runs before any kernel, without a device sync per call: the *values* of ``cu_seqlens`` are checked up
front for a CPU tensor and, for a CUDA one, where an engine reads it on the host anyway (the chunked kernels'
launch plan); kernels that read it on the device clamp every row to the tensors. ``g_gamma``'s values are checked
once per tensor and in-place version (decay.g_gamma's results are known good).

``torch.autocast`` does not apply inside the ops: they compute in their inputs' dtype with float32 states, exactly
as outside an autocast region (bf16 q, k, v from autocast projections give bf16 ``o``; no input is cast).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from lightning_attention import decay
from lightning_attention import _validation as val
from lightning_attention.engines import autocast_off, get_engine, resolve_backend

__all__ = [
    "chunk_simple_gla",
    "fused_recurrent_simple_gla",
    "chunk_lightning_attn",
    "fused_recurrent_lightning_attn",
]

_EMPTY = (0,)


def _scan_forward(algorithm, q, k, v, g_gamma, initial_state, cu_seqlens, scale, reverse, chunk_size, output_final_state, backend):
    """The engine's forward (shared by the custom op and the eager path): ``(o, final or None, saved)``, where
    ``saved`` is what an engine with ``forward_saving`` (engines/base.py) lets its backward reuse, or None."""
    cfg = val.ScanConfig(scale, reverse, chunk_size, output_final_state)
    engine = get_engine(backend, algorithm)
    with autocast_off(q.device):
        if hasattr(engine, "forward_saving"):
            o, final, saved = engine.forward_saving(q, k, v, g_gamma, cfg, initial_state, cu_seqlens)
        else:
            (o, final), saved = engine.forward(q, k, v, g_gamma, cfg, initial_state, cu_seqlens), None
    return o, (final if output_final_state else None), saved


def _scan_backward(
    algorithm, q, k, v, g_gamma, initial_state, cu_seqlens, do, dht, scale, reverse, chunk_size, backend, saved=None
):
    """The engine's backward: ``(dq, dk, dv, dh0 or None)``."""
    cfg = val.ScanConfig(scale, reverse, chunk_size, True)
    engine = get_engine(backend, algorithm)
    reuse = {} if saved is None else {"saved": saved}
    with autocast_off(q.device):
        return engine.backward(q, k, v, g_gamma, cfg, initial_state, cu_seqlens, do, dht, **reuse)


def _define_scan_op(algorithm: str):
    """Register ``lightning_attention::{algorithm}_scan`` (+ its backward op) as custom ops with autograd.

    Custom ops cannot return None: an absent final state / dh0 is an empty tensor of shape (0,).
    """
    fwd_name = f"lightning_attention::{algorithm}_scan"
    bwd_name = f"lightning_attention::{algorithm}_scan_backward"

    def _empty_state(q):
        return q.new_empty(_EMPTY, dtype=val.state_dtype(q))

    @torch.library.custom_op(fwd_name, mutates_args=())
    def scan(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        g_gamma: torch.Tensor,
        initial_state: Optional[torch.Tensor],
        cu_seqlens: Optional[torch.Tensor],
        scale: float,
        reverse: bool,
        chunk_size: int,
        output_final_state: bool,
        backend: str,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # (Nothing is saved for the backward op: a custom op's outputs need shapes that its fake implementation can
        # tell from the inputs' shapes, and what the engine saves is shaped by the segment plan: the GPU's size and,
        # for packed sequences, cu_seqlens' values.)
        o, final, _ = _scan_forward(
            algorithm, q, k, v, g_gamma, initial_state, cu_seqlens, scale, reverse, chunk_size, output_final_state, backend
        )
        return o, (final if final is not None else _empty_state(q))

    @scan.register_fake
    def _(q, k, v, g_gamma, initial_state, cu_seqlens, scale, reverse, chunk_size, output_final_state, backend):
        B, T, H, K = q.shape
        N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
        o = q.new_empty(B, T, H, v.shape[-1])
        shape = (N, H, K, v.shape[-1]) if output_final_state else _EMPTY
        return o, q.new_empty(shape, dtype=val.state_dtype(q))

    @torch.library.custom_op(bwd_name, mutates_args=())
    def scan_backward(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        g_gamma: torch.Tensor,
        initial_state: Optional[torch.Tensor],
        cu_seqlens: Optional[torch.Tensor],
        do: torch.Tensor,
        dht: Optional[torch.Tensor],
        scale: float,
        reverse: bool,
        chunk_size: int,
        backend: str,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        dq, dk, dv, dh0 = _scan_backward(
            algorithm, q, k, v, g_gamma, initial_state, cu_seqlens, do, dht, scale, reverse, chunk_size, backend
        )
        return dq, dk, dv, (dh0 if dh0 is not None else _empty_state(q))

    @scan_backward.register_fake
    def _(q, k, v, g_gamma, initial_state, cu_seqlens, do, dht, scale, reverse, chunk_size, backend):
        dh0 = torch.empty_like(initial_state) if initial_state is not None else _empty_state(q)
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dh0

    def setup_context(ctx, inputs, output):
        q, k, v, g_gamma, initial_state, cu_seqlens, scale, reverse, chunk_size, _, backend = inputs
        ctx.save_for_backward(q, k, v, g_gamma, initial_state, cu_seqlens)
        ctx.config = (scale, reverse, chunk_size, backend)

    def backward(ctx, do, dht):
        q, k, v, g_gamma, initial_state, cu_seqlens = ctx.saved_tensors
        scale, reverse, chunk_size, backend = ctx.config
        if dht is not None and dht.numel() == 0:
            dht = None
        dq, dk, dv, dh0 = scan_backward(
            q, k, v, g_gamma, initial_state, cu_seqlens, do, dht, scale, reverse, chunk_size, backend
        )
        return dq, dk, dv, None, (dh0 if initial_state is not None else None), None, None, None, None, None, None

    scan.register_autograd(backward, setup_context=setup_context)
    return scan


chunk_scan_op = _define_scan_op("chunk")
recurrent_scan_op = _define_scan_op("recurrent")


class _EagerScan(torch.autograd.Function):
    """The eager path: the same engine calls as the custom ops, without the dispatcher's per-call cost.

    Measured on H100 (benchmarks/gpu/host_overhead.py, 8x4096x16x64 bf16): through the custom op, a forward
    cost ~250 us of host time on top of the engine's ~100 us, so small shapes were host-bound. The custom ops
    serve torch.compile / export (they are what a traced graph records) and torch.library.opcheck.
    """

    @staticmethod
    def forward(ctx, algorithm, q, k, v, g_gamma, initial_state, cu_seqlens, scale, reverse, chunk_size, output_final_state, backend):  # noqa: E501
        o, final, saved = _scan_forward(
            algorithm, q, k, v, g_gamma, initial_state, cu_seqlens, scale, reverse, chunk_size, output_final_state, backend
        )
        ctx.save_for_backward(q, k, v, g_gamma, initial_state, cu_seqlens, saved)
        ctx.config = (algorithm, scale, reverse, chunk_size, backend)
        return o, final

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g_gamma, initial_state, cu_seqlens, saved = ctx.saved_tensors
        algorithm, scale, reverse, chunk_size, backend = ctx.config
        dq, dk, dv, dh0 = _scan_backward(
            algorithm, q, k, v, g_gamma, initial_state, cu_seqlens, do, dht, scale, reverse, chunk_size, backend, saved
        )
        return None, dq, dk, dv, None, (dh0 if initial_state is not None else None), *(None,) * 6


_OPS = {"chunk": chunk_scan_op, "recurrent": recurrent_scan_op}


def _run(algorithm, q, k, v, g_gamma, scale, initial_state, output_final_state, reverse, cu_seqlens, chunk_size, backend):
    g, scale, chunk_size = val.check_scan_inputs(q, k, v, g_gamma, scale, initial_state, cu_seqlens, chunk_size)
    backend = resolve_backend(backend, q.device)
    args = (q, k, v, g, initial_state, cu_seqlens, scale, bool(reverse), chunk_size, bool(output_final_state), backend)
    if torch.compiler.is_compiling():
        o, final = _OPS[algorithm](*args)
        return o, (final if output_final_state else None)
    return _EagerScan.apply(algorithm, *args)


def chunk_simple_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g_gamma: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
    *,
    reverse: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Simple GLA with a constant per-head decay, chunked (parallel) form: the training/prefill op.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; one floating dtype, one device.
        g_gamma: ``[H]`` natural-log decay per head, ``<= 0`` (decay ``exp(g_gamma)``), no gradient.
        scale: multiplies ``q S``; default ``K ** -0.5``.
        initial_state: ``[N, H, K, V]`` float32 (float64 for float64 inputs), differentiable.
        output_final_state: also return ``final_state [N, H, K, V]``.
        cu_seqlens: int32/int64 ``[N + 1]`` offsets of packed sequences (B == 1), 0-based, last == T.
        chunk_size: tokens per chunk, a power of two >= 16.
        reverse: scan from the last token to the first.
        backend: "auto", "torch" or "triton" (see :mod:`lightning_attention.engines`).

    Returns:
        ``(o [B, T, H, V] in q's dtype, final_state [N, H, K, V] or None)``.
    """
    return _run("chunk", q, k, v, g_gamma, scale, initial_state, output_final_state, reverse, cu_seqlens, chunk_size, backend)


def fused_recurrent_simple_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g_gamma: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    reverse: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Simple GLA with a constant per-head decay, recurrent form: the inference op (same math as the chunked one).

    Same arguments and returns as :func:`chunk_simple_gla`. Short sequences run token by token with the
    state held on chip; long ones are routed to the chunked kernels internally (same results within
    rounding, and no 10x slowdown for a long prompt): the threshold in mean tokens per sequence is
    :data:`lightning_attention.engines.RECURRENT_MAX_T` (torch) and
    :data:`lightning_attention.engines.triton.recurrent.RECURRENT_TRITON_MAX_T` (Triton).
    """
    return _run("recurrent", q, k, v, g_gamma, scale, initial_state, output_final_state, reverse, cu_seqlens, 64, backend)


@functools.lru_cache(maxsize=1024)
def _cached_g_gamma(num_heads: int, layer_idx: int, num_layers: int, schedule: str, device: torch.device):
    """decay.g_gamma built once per (layer, device): building it on the host and copying it to a GPU on
    every call costs a stream sync (~0.15 ms measured on an H100). Never handed to callers to mutate."""
    return decay.g_gamma(num_heads, layer_idx, num_layers, schedule=schedule, device=device)


def _lightning_args(q, layer_idx, num_layers, scale, kwargs, op_name, allowed):
    extra = {key: kwargs.pop(key) for key in allowed if key in kwargs}
    val.check_no_extra_kwargs(op_name, kwargs)
    schedule = extra.pop("schedule", "tnl")
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        val.check_qkv(q, q, q)
    if torch.compiler.is_compiling():  # traced once into the graph as a constant
        g = decay.g_gamma(q.shape[2], layer_idx, num_layers, schedule=schedule, device=q.device)
    else:
        g = _cached_g_gamma(q.shape[2], layer_idx, num_layers, schedule, q.device)
    if scale is None:
        scale = decay.default_scale(schedule, q.shape[-1])
    return g, scale, extra


def chunk_lightning_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layer_idx: int,
    num_layers: int,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Lightning Attention, chunked form, with fla's signature (switch by changing the import).

    The decay comes from :func:`lightning_attention.decay.g_gamma` (``num_heads = H`` of q).
    Keyword options: ``chunk_size`` (64), ``schedule`` ("tnl", fla's numbers; or "minimax"), ``reverse``,
    ``backend``. ``scale`` defaults to the schedule's (``K ** -0.5`` for "tnl", 1 for "minimax").
    Shapes and returns as :func:`chunk_simple_gla`. Unknown keyword arguments raise TypeError.
    """
    g, scale, extra = _lightning_args(
        q, layer_idx, num_layers, scale, kwargs, "chunk_lightning_attn", ("chunk_size", "schedule", "reverse", "backend")
    )
    return chunk_simple_gla(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, **extra)


def fused_recurrent_lightning_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layer_idx: int,
    num_layers: int,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    reverse: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Lightning Attention, recurrent form, with fla's signature. Options: ``schedule``, ``backend``.

    See :func:`chunk_lightning_attn` for the decay and scale, :func:`fused_recurrent_simple_gla` for the rest.
    """
    g, scale, extra = _lightning_args(
        q, layer_idx, num_layers, scale, kwargs, "fused_recurrent_lightning_attn", ("schedule", "backend")
    )
    return fused_recurrent_simple_gla(q, k, v, g, scale, initial_state, output_final_state, reverse, cu_seqlens, **extra)
