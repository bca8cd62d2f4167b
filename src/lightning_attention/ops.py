"""Public functional API: validation, engine dispatch, and the torch.library custom operators.

Simple GLA with fla's signatures. Per sequence and head, with the log decay of token t
``a_t = g[b, t, h] + g_gamma[h]`` (per-token gates ``g``, a constant per head ``g_gamma``; either or both may be
absent, neither means no decay)::

    S_t = exp(a_t) * S_{t-1} + k_t^T v_t          o_t = scale * q_t S_t          S_0 = initial_state

Lightning Attention is the case of a constant ``g_gamma`` from a decay recipe (decay.py).

Layout (fla's): q, k ``[B, T, H, K]``, v ``[B, T, H, V]``, g ``[B, T, H]``, states ``[N, H, K, V]`` (``[N, H, V, K]``
with ``state_v_first``) float32 (float64 for float64 inputs), N = B, or the number of packed sequences when
``cu_seqlens`` is given (then B must be 1). Head-first tensors ``[B, H, T, K]`` cannot be told apart from
``[B, T, H, K]`` by shape: transpose them first (``q.transpose(1, 2)``). Every op returns ``(o, final_state)``;
``final_state`` is None unless ``output_final_state=True``. ``o`` has q's dtype. Inputs are never modified.
Gradients reach q, k, v, g and initial_state; g_gamma is a constant. docs/fla_compat.md lists every difference
from fla's ops.

Validation runs before any kernel, without a device sync per call: the *values* of ``cu_seqlens`` are checked up
front for a CPU tensor and, for a CUDA one, where an engine reads it on the host anyway (the chunked kernels'
launch plan, from ``cu_seqlens_cpu`` when given); kernels that read it on the device clamp every row to the
tensors. ``g_gamma``'s values are checked once per tensor and in-place version (decay.g_gamma's results are known
good); ``g``'s values are not checked (any finite gate is computed exactly).

``torch.autocast`` does not apply inside the ops: they compute in their inputs' dtype with float32 states, exactly
as outside an autocast region (bf16 q, k, v from autocast projections give bf16 ``o``; no input is cast).
"""

from __future__ import annotations

import functools
import warnings
from typing import Optional

import torch

from lightning_attention import decay
from lightning_attention import _validation as val
from lightning_attention.engines import autocast_off, get_engine, resolve_backend
from lightning_attention.engines.base import engine_keywords

__all__ = [
    "chunk_simple_gla",
    "fused_recurrent_simple_gla",
    "chunk_lightning_attn",
    "fused_recurrent_lightning_attn",
]

_EMPTY = (0,)


def _scan_forward(
    algorithm, q, k, v, g, g_gamma, initial_state, cu_seqlens, cu_seqlens_cpu, scale, reverse, chunk_size,
    output_final_state, backend,
):  # fmt: skip
    """The engine's forward (shared by the custom op and the eager path): ``(o, final or None, saved)``, where
    ``saved`` is what an engine with ``forward_saving`` (engines/base.py) lets its backward reuse, or None."""
    cfg = val.ScanConfig(scale, reverse, chunk_size, output_final_state)
    engine = get_engine(backend, algorithm)
    extra = engine_keywords(g, cu_seqlens_cpu)
    with autocast_off(q.device):
        if hasattr(engine, "forward_saving"):
            o, final, saved = engine.forward_saving(q, k, v, g_gamma, cfg, initial_state, cu_seqlens, **extra)
        else:
            (o, final), saved = engine.forward(q, k, v, g_gamma, cfg, initial_state, cu_seqlens, **extra), None
    return o, (final if output_final_state else None), saved


def _scan_backward(
    algorithm, q, k, v, g, g_gamma, initial_state, cu_seqlens, cu_seqlens_cpu, do, dht, scale, reverse, chunk_size,
    backend, saved=None,
):  # fmt: skip
    """The engine's backward: ``(dq, dk, dv, dh0 or None, dg or None)``."""
    cfg = val.ScanConfig(scale, reverse, chunk_size, True)
    engine = get_engine(backend, algorithm)
    extra = engine_keywords(g, cu_seqlens_cpu)
    if saved is not None:
        extra["saved"] = saved
    with autocast_off(q.device):
        grads = engine.backward(q, k, v, g_gamma, cfg, initial_state, cu_seqlens, do, dht, **extra)
    # An engine without per-token gates may return the four gradients of engines/base.py without dg.
    return (*grads, None) if len(grads) == 4 else tuple(grads)


def _define_scan_op(algorithm: str):
    """Register ``lightning_attention::{algorithm}_scan`` (+ its backward op) as custom ops with autograd.

    Custom ops cannot return None: an absent final state / dh0 / dg is an empty tensor of shape (0,).
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
        g: Optional[torch.Tensor],
        g_gamma: torch.Tensor,
        initial_state: Optional[torch.Tensor],
        cu_seqlens: Optional[torch.Tensor],
        cu_seqlens_cpu: Optional[torch.Tensor],
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
            algorithm, q, k, v, g, g_gamma, initial_state, cu_seqlens, cu_seqlens_cpu, scale, reverse, chunk_size,
            output_final_state, backend,
        )  # fmt: skip
        return o, (final if final is not None else _empty_state(q))

    @scan.register_fake
    def _(q, k, v, g, g_gamma, initial_state, cu_seqlens, cu_seqlens_cpu, scale, reverse, chunk_size,
          output_final_state, backend):  # fmt: skip
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
        g: Optional[torch.Tensor],
        g_gamma: torch.Tensor,
        initial_state: Optional[torch.Tensor],
        cu_seqlens: Optional[torch.Tensor],
        cu_seqlens_cpu: Optional[torch.Tensor],
        do: torch.Tensor,
        dht: Optional[torch.Tensor],
        scale: float,
        reverse: bool,
        chunk_size: int,
        backend: str,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        dq, dk, dv, dh0, dg = _scan_backward(
            algorithm, q, k, v, g, g_gamma, initial_state, cu_seqlens, cu_seqlens_cpu, do, dht, scale, reverse,
            chunk_size, backend,
        )  # fmt: skip
        empty = _empty_state(q)
        return dq, dk, dv, (dh0 if dh0 is not None else empty), (dg if dg is not None else empty.clone())

    @scan_backward.register_fake
    def _(q, k, v, g, g_gamma, initial_state, cu_seqlens, cu_seqlens_cpu, do, dht, scale, reverse, chunk_size,
          backend):  # fmt: skip
        dh0 = torch.empty_like(initial_state) if initial_state is not None else _empty_state(q)
        dg = torch.empty_like(g) if g is not None else _empty_state(q)
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dh0, dg

    def setup_context(ctx, inputs, output):
        q, k, v, g, g_gamma, initial_state, cu_seqlens, cu_seqlens_cpu, scale, reverse, chunk_size, _, backend = inputs
        ctx.save_for_backward(q, k, v, g, g_gamma, initial_state, cu_seqlens, cu_seqlens_cpu)
        ctx.config = (scale, reverse, chunk_size, backend)

    def backward(ctx, do, dht):
        q, k, v, g, g_gamma, initial_state, cu_seqlens, cu_seqlens_cpu = ctx.saved_tensors
        scale, reverse, chunk_size, backend = ctx.config
        if dht is not None and dht.numel() == 0:
            dht = None
        dq, dk, dv, dh0, dg = scan_backward(
            q, k, v, g, g_gamma, initial_state, cu_seqlens, cu_seqlens_cpu, do, dht, scale, reverse, chunk_size,
            backend,
        )  # fmt: skip
        dh0 = dh0 if initial_state is not None else None
        return dq, dk, dv, (dg if g is not None else None), None, dh0, *(None,) * 7

    scan.register_autograd(backward, setup_context=setup_context)
    return scan


chunk_scan_op = _define_scan_op("chunk")
recurrent_scan_op = _define_scan_op("recurrent")


class _EagerScan(torch.autograd.Function):
    """The eager path: the same engine calls as the custom ops, without the dispatcher's per-call cost.

    Through the custom op a forward costs ~250 us of host time on top of the engine's ~100 us (H100,
    8x4096x16x64 bf16, benchmarks/bench_host_overhead.py), so small shapes would be host-bound. The custom ops
    serve torch.compile / export (they are what a traced graph records) and torch.library.opcheck.
    """

    @staticmethod
    def forward(ctx, algorithm, q, k, v, g, g_gamma, initial_state, cu_seqlens, cu_seqlens_cpu, scale, reverse,
                chunk_size, output_final_state, backend):  # fmt: skip
        o, final, saved = _scan_forward(
            algorithm, q, k, v, g, g_gamma, initial_state, cu_seqlens, cu_seqlens_cpu, scale, reverse, chunk_size,
            output_final_state, backend,
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, g, g_gamma, initial_state, cu_seqlens, cu_seqlens_cpu, saved)
        ctx.config = (algorithm, scale, reverse, chunk_size, backend)
        return o, final

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, g_gamma, initial_state, cu_seqlens, cu_seqlens_cpu, saved = ctx.saved_tensors
        algorithm, scale, reverse, chunk_size, backend = ctx.config
        dq, dk, dv, dh0, dg = _scan_backward(
            algorithm, q, k, v, g, g_gamma, initial_state, cu_seqlens, cu_seqlens_cpu, do, dht, scale, reverse,
            chunk_size, backend, saved,
        )  # fmt: skip
        dh0 = dh0 if initial_state is not None else None
        return None, dq, dk, dv, (dg if g is not None else None), None, dh0, *(None,) * 7


_OPS = {"chunk": chunk_scan_op, "recurrent": recurrent_scan_op}

#: The options of the public simple_gla ops beyond fla's named parameters, passed as keywords (fla's ``**kwargs``).
_CHUNK_OPTIONS = ("chunk_size", "reverse", "backend")
_RECURRENT_OPTIONS = ("cu_seqlens_cpu", "backend")


def _run(
    algorithm, q, k, v, g, g_gamma, scale, initial_state, output_final_state, reverse, state_v_first, cu_seqlens,
    cu_seqlens_cpu, chunk_size, backend,
):  # fmt: skip
    """Validate, bring the gates and states into the engines' layout and dtype, and run the op.

    ``g`` becomes ``[B, T, H]`` contiguous in the state dtype and ``initial_state`` ``[N, H, K, V]`` in the state
    dtype (a transposed view for ``state_v_first``): these conversions happen outside the autograd Function / custom
    op, so autograd hands ``dg`` and ``dh0`` back in the caller's dtype and layout."""
    g_gamma, scale, chunk_size = val.check_scan_inputs(
        q, k, v, g_gamma, scale, initial_state, cu_seqlens, chunk_size, g=g, state_v_first=bool(state_v_first),
        cu_seqlens_cpu=cu_seqlens_cpu,
    )
    backend = resolve_backend(backend, q.device)
    state_dtype = val.state_dtype(q)
    if g is not None:
        g = g.to(state_dtype).contiguous()
    if initial_state is not None:
        initial_state = (initial_state.transpose(-1, -2) if state_v_first else initial_state).to(state_dtype)
    args = (q, k, v, g, g_gamma, initial_state, cu_seqlens, cu_seqlens_cpu, scale, bool(reverse), chunk_size,
            bool(output_final_state), backend)  # fmt: skip
    if torch.compiler.is_compiling():
        o, final = _OPS[algorithm](*args)
        final = final if output_final_state else None
    else:
        o, final = _EagerScan.apply(algorithm, *args)
    if final is not None and state_v_first:
        final = final.transpose(-1, -2)
    return o, final


def _options(op_name: str, kwargs: dict, allowed: tuple[str, ...]) -> dict:
    """Our keyword options out of fla's ``**kwargs``; any other keyword is a TypeError naming it."""
    options = {key: kwargs.pop(key) for key in allowed if key in kwargs}
    val.check_no_extra_kwargs(op_name, kwargs)
    return options


def chunk_simple_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    g_gamma: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    cu_seqlens_cpu: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Simple GLA, chunked (parallel) form: the training/prefill op. fla's signature and parameter order.

    Per sequence and head, with the log decay of token t ``a_t = g[t] + g_gamma`` (either may be absent; neither
    means no decay)::

        S_t = exp(a_t) * S_{t-1} + k_t^T v_t          o_t = scale * q_t S_t          S_0 = initial_state

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; one floating dtype, one device.
        g: ``[B, T, H]`` per-token natural-log forget gates (typically ``<= 0``, e.g. ``logsigmoid``), any floating
            dtype, differentiable (``dg`` in g's dtype). Values are not checked: any finite value is computed exactly
            as the recurrence says, so positive gates grow the state and can overflow as the definition does.
        g_gamma: ``[H]`` constant natural-log decay per head, ``<= 0``; a constant (no gradient). Adds to ``g``.
        scale: multiplies ``q S``; default ``K ** -0.5``.
        initial_state: ``[N, H, K, V]`` (``[N, H, V, K]`` with ``state_v_first``), any floating dtype, computed in
            float32 (float64 for float64 inputs); differentiable (its gradient in its own dtype).
        output_final_state: also return ``final_state``.
        state_v_first: states (``initial_state``, ``final_state``, their gradients) in the ``[V, K]`` layout; the
            final state is then a transposed view of the ``[K, V]`` result (no copy).
        cu_seqlens: int32/int64 ``[N + 1]`` offsets of packed sequences (B == 1), 0-based, last == T.
        cu_seqlens_cpu: a CPU copy of ``cu_seqlens`` (same values): the engines plan from it, so a CUDA
            ``cu_seqlens`` costs no device sync.
        **kwargs: ``chunk_size`` (tokens per chunk, a power of two >= 16; default 64), ``reverse`` (scan from the
            last token to the first; default False), ``backend`` ("auto", "torch" or "triton", see
            :mod:`lightning_attention.engines`). Any other keyword raises TypeError.

    Returns:
        ``(o [B, T, H, V] in q's dtype, final_state [N, H, K, V] (or [N, H, V, K]) float32, or None)``.
    """
    options = _options("chunk_simple_gla", kwargs, _CHUNK_OPTIONS)
    return _run(
        "chunk", q, k, v, g, g_gamma, scale, initial_state, output_final_state, options.get("reverse", False),
        state_v_first, cu_seqlens, cu_seqlens_cpu, options.get("chunk_size", 64), options.get("backend", "auto"),
    )  # fmt: skip


def fused_recurrent_simple_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    g_gamma: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    reverse: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Simple GLA, recurrent form: the inference op (same math as :func:`chunk_simple_gla`). fla's signature.

    Same arguments and returns as :func:`chunk_simple_gla`; ``reverse`` is a named parameter here (fla's order).
    ``**kwargs``: ``cu_seqlens_cpu`` and ``backend`` as for the chunked op; fla's deprecated
    ``transpose_state_layout`` is ``state_v_first`` (DeprecationWarning; both at once is a ValueError). Short
    sequences run token by token with the state held on chip; long ones are routed to the chunked kernels internally
    (same results within rounding, and no 10x slowdown for a long prompt): the threshold in mean tokens per
    sequence is :data:`lightning_attention.engines.RECURRENT_MAX_T` (torch) and
    :data:`lightning_attention.engines.triton.recurrent.RECURRENT_TRITON_MAX_T` (Triton). With ``g`` the backward
    runs the chunked engine's (engines/base.LengthRoutedEngine).
    """
    if "transpose_state_layout" in kwargs:
        if state_v_first:
            raise ValueError("pass state_v_first or the deprecated transpose_state_layout, not both")
        warnings.warn("transpose_state_layout is deprecated: use state_v_first", DeprecationWarning, stacklevel=2)
        state_v_first = kwargs.pop("transpose_state_layout")
    options = _options("fused_recurrent_simple_gla", kwargs, _RECURRENT_OPTIONS)
    return _run(
        "recurrent", q, k, v, g, g_gamma, scale, initial_state, output_final_state, reverse, state_v_first,
        cu_seqlens, options.get("cu_seqlens_cpu"), 64, options.get("backend", "auto"),
    )  # fmt: skip


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
    return _run(
        "chunk", q, k, v, None, g, scale, initial_state, output_final_state, extra.get("reverse", False), False,
        cu_seqlens, None, extra.get("chunk_size", 64), extra.get("backend", "auto"),
    )  # fmt: skip


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
    return _run(
        "recurrent", q, k, v, None, g, scale, initial_state, output_final_state, reverse, False, cu_seqlens, None,
        64, extra.get("backend", "auto"),
    )  # fmt: skip
