"""Context parallelism: one sequence split over the ranks of a process group, exact forward and backward.

Rank r (in scan order) holds tokens ``[start_r, start_r + L_r)`` of every sequence of the batch. With
``lam = exp(g)`` per head, the whole cross-shard dependency is one ``[K, V]`` state per (sequence, head)::

    A_r         = sum_j lam^(L_r - 1 - j) k_j^T v_j              the shard's local state, from zero (j 0-based)
    S_in(0)     = h0 (or 0),   S_in(r + 1) = lam^(L_r) S_in(r) + A_r
    o (shard r) = scan(q, k, v, state=S_in(r))                   final_state = S_in(P)

so the forward is: A_r (distributed/local_state.py: one read of k, v, or only the last ~110/|g| tokens of
a decaying head) -> all-gather the A's (B*H*K*V floats per rank) -> the combine above (P tiny steps, done
redundantly on every rank) -> the engine's scan with initial state S_in(r). The backward is the mirror
image, right to left (D = gradient of the state, engines/base.py)::

    Bhat_r      = scale * sum_t lam^t q_t^T do_t                 (t 1-based) the shard's own state gradient
    D_in(P - 1) = sum over ranks of d final_state,   D_in(r - 1) = lam^(L_r) D_in(r) + Bhat_r
    dq, dk, dv  = engine backward with initial_state = S_in(r), dht = D_in(r)

Communication per call: one all-gather of per-rank states forward, one of state gradients backward
(independent of T). It is not overlapped with compute: each step needs the previous one's result, and the
gathers are a few MiB (tens of microseconds over NVLink); overlapping them would need a second pass over
the shard (scan from zero, then add ``lam^t q_t S_in``), which costs more than it hides.

``reverse=True`` scans every sequence from its last token to its first: the state flows from the last rank
to the first, with the same algebra in mirrored positions.

Replicated tensors (``initial_state`` in, ``final_state`` out) follow autograd through a differentiable
all-gather: the gradients of ``final_state`` received on all ranks are summed, and each rank's gradient for
its copy of ``initial_state`` is its share (summed over the group it is the gradient of the sum of all ranks'
losses, which is what data/context-parallel gradient reduction does for a replicated parameter). Chaining
calls (``initial_state`` = an earlier call's ``final_state``) is therefore exact.

Shapes per rank: q, k ``[B, L_r, H, K]``, v ``[B, L_r, H, V]``, states ``[B, H, K, V]`` float32 (float64 for
float64 inputs). ``L_r`` may differ between ranks (even 0); B, H, K, V, dtype and options must not.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from lightning_attention import _validation as val
from lightning_attention.distributed.local_state import decayed_outer_sum
from lightning_attention.engines import get_engine, resolve_backend
from lightning_attention.ops import _lightning_args

__all__ = ["context_parallel_simple_gla", "context_parallel_lightning_attn"]

# ---------------------------------------------------------------------------------------------------------
# Communication.
# ---------------------------------------------------------------------------------------------------------


def _gather(local: torch.Tensor, group, world_size: int) -> torch.Tensor:
    """All-gather a flat tensor: returns ``[world_size, numel]`` (rank order of ``group``)."""
    if world_size == 1:
        return local[None]
    out = local.new_empty(world_size * local.numel())
    gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather_single(out, local.contiguous(), group=group)
    return out.view(world_size, -1)


# ---------------------------------------------------------------------------------------------------------
# Autograd function.
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """Everything fixed for one call: scan config, backend, and this rank's place in scan order."""

    cfg: val.ScanConfig
    backend: str
    group: object
    world_size: int
    position: int  # index of this rank's shard in scan order (rank, or world_size - 1 - rank when reversed)

    def scan_order(self, per_rank: torch.Tensor) -> torch.Tensor:
        """Reorder a gathered ``[P, ...]`` tensor from rank order to scan order."""
        return per_rank.flip(0) if self.cfg.reverse else per_rank


def _per_head(decay: torch.Tensor) -> torch.Tensor:
    """``[H]`` -> ``[1, H, 1, 1]`` to multiply ``[B, H, K, V]`` states."""
    return decay[None, :, None, None]


class _ContextParallelScan(torch.autograd.Function):
    """forward(q, k, v, initial_state, g, plan) -> (o, final_state or None); engines pick their own precision,
    so an enclosing ``torch.autocast`` region is switched off inside (it would round the fp32 states)."""

    @staticmethod
    def forward(ctx, q, k, v, initial_state, g, plan: _Plan):
        with torch.autocast(q.device.type, enabled=False):
            return _ContextParallelScan._forward(ctx, q, k, v, initial_state, g, plan)

    @staticmethod
    def backward(ctx, do, dfinal):
        with torch.autocast(do.device.type, enabled=False):
            return _ContextParallelScan._backward(ctx, do, dfinal)

    @staticmethod
    def _forward(ctx, q, k, v, initial_state, g, plan: _Plan):
        B, L, H, K = q.shape
        V = v.shape[-1]
        sdt = val.state_dtype(q)
        p, P = plan.position, plan.world_size

        # A_r: the token the scan processes last is decayed 0 times, the one before it once, ...
        rev = plan.cfg.reverse
        local_state = decayed_outer_sum(k, v, g, 0 if rev else L - 1, ascending=rev)
        length = torch.full((1,), L, dtype=sdt, device=q.device)
        gathered = plan.scan_order(_gather(torch.cat([local_state.flatten(), length]), plan.group, P))
        states = gathered[:, :-1].view(P, B, H, K, V)
        lengths = gathered[:, -1]  # [P], shard lengths in scan order
        decays = torch.exp(g.to(sdt)[None, :] * lengths[:, None])  # [P, H] = lam^(L_s)

        def step(state, s):  # S_in(s + 1) from S_in(s); None stands for a zero state
            return states[s] if state is None else _per_head(decays[s]) * state + states[s]

        state_in = initial_state.to(sdt) if initial_state is not None else None
        for s in range(p):
            state_in = step(state_in, s)
        final = None
        if plan.cfg.output_final_state:
            final = state_in
            for s in range(p, P):
                final = step(final, s)

        engine = get_engine(plan.backend, "chunk")
        o, _ = engine.forward(q, k, v, g, replace(plan.cfg, output_final_state=False), state_in, None)

        ctx.save_for_backward(q, k, v, g, state_in, lengths, decays)
        ctx.plan = plan
        ctx.has_initial_state = initial_state is not None
        return o, final

    @staticmethod
    def _backward(ctx, do, dfinal):
        q, k, v, g, state_in, lengths, decays = ctx.saved_tensors
        do = do.contiguous()
        plan = ctx.plan
        p, P = plan.position, plan.world_size
        B, L, H, K = q.shape
        V = v.shape[-1]
        sdt = val.state_dtype(q)
        has_final = plan.cfg.output_final_state
        if has_final and dfinal is None:
            dfinal = q.new_zeros(B, H, K, V, dtype=sdt)

        # Bhat_r: the token the scan processes first sees S_in decayed once, the next twice, ...
        rev = plan.cfg.reverse
        own_grad = plan.cfg.scale * decayed_outer_sum(q, do, g, L if rev else 1, ascending=not rev)
        packed = torch.cat([own_grad.flatten(), dfinal.to(sdt).flatten()]) if has_final else own_grad.flatten()
        gathered = plan.scan_order(_gather(packed, plan.group, P))
        state_grads = gathered[:, : own_grad.numel()].view(P, B, H, K, V)

        # D_in(P - 1) = summed final-state gradients; D_in(s - 1) = lam^(L_s) D_in(s) + Bhat_s.
        dstate = gathered[:, own_grad.numel() :].sum(0).view(B, H, K, V) if has_final else None
        for s in range(P - 1, p, -1):
            dstate = state_grads[s] if dstate is None else _per_head(decays[s]) * dstate + state_grads[s]

        engine = get_engine(plan.backend, "chunk")
        dq, dk, dv = engine.backward(q, k, v, g, plan.cfg, state_in, None, do, dstate)[:3]

        dh0 = None
        if ctx.has_initial_state and ctx.needs_input_grad[3]:
            # This rank's share: its outputs see h0 through lam^(tokens before the shard) S_in, and its
            # copy of the final state through lam^T h0.
            before = lengths[:p].sum()
            dh0 = _per_head(torch.exp(g.to(sdt) * before)) * own_grad
            if has_final:
                dh0 = dh0 + _per_head(torch.exp(g.to(sdt) * lengths.sum())) * dfinal.to(sdt)
        return dq, dk, dv, dh0, None, None


# ---------------------------------------------------------------------------------------------------------
# Public API.
# ---------------------------------------------------------------------------------------------------------


def _check_group(group, device: torch.device):
    """Returns ``(group, rank in group, world size)``."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "context parallel attention needs torch.distributed: call torch.distributed.init_process_group "
            "first (e.g. under torchrun)"
        )
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of `group`: call the op only on the group's ranks")
    if dist.get_backend(group) == "nccl" and device.type != "cuda":
        raise ValueError(f"group uses the NCCL backend, which needs CUDA tensors; q is on {device}")
    return group, rank, dist.get_world_size(group)


def context_parallel_simple_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g_gamma: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    group: dist.ProcessGroup | None = None,
    *,
    reverse: bool = False,
    chunk_size: int = 64,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`lightning_attention.chunk_simple_gla` on a sequence sharded along T over a process group.

    Call it on every rank of ``group`` (default: the world) with that rank's consecutive slice of the
    sequence: rank r holds tokens ``[start_r, start_r + L_r)``, ranks in ascending order along T. The result
    on each rank is that rank's slice of the single-device op's output (within rounding), forward and backward.

    Args:
        q, k: ``[B, L_r, H, K]``; v: ``[B, L_r, H, V]``: this rank's shard. ``L_r`` may differ between ranks;
            B, H, K, V, dtype and every other argument must be the same on all ranks (not checked: a
            mismatch raises inside the collective or hangs, as with any collective).
        g_gamma: ``[H]`` log decay per head, ``<= 0``.
        scale: default ``K ** -0.5``.
        initial_state: ``[B, H, K, V]`` float32 (float64 for float64 inputs), the state before the whole
            sequence, identical on every rank (each rank reads its own copy). Gradient: this rank's share;
            the sum over the group is the full gradient (module docstring).
        output_final_state: return the state after the whole sequence, the same on every rank; its
            gradients from all ranks are summed.
        group: the process group the sequence is split over (NCCL with CUDA tensors, or gloo).
        reverse: scan each sequence from its last token (on the last rank) to its first.
        chunk_size, backend: as for :func:`lightning_attention.chunk_simple_gla`; the local work runs on
            ``engines.get_engine(backend, "chunk")``.

    Returns:
        ``(o [B, L_r, H, V] in q's dtype, final_state [B, H, K, V] or None)``.

    Varlen (``cu_seqlens``) is not supported: every batch row is one sequence spanning all shards.
    """
    g, scale, chunk_size = val.check_scan_inputs(q, k, v, g_gamma, scale, initial_state, None, chunk_size)
    backend = resolve_backend(backend, q.device)
    group, rank, world_size = _check_group(group, q.device)
    cfg = val.ScanConfig(scale, bool(reverse), chunk_size, bool(output_final_state))
    position = world_size - 1 - rank if reverse else rank
    plan = _Plan(cfg, backend, group, world_size, position)
    return _ContextParallelScan.apply(q, k, v, initial_state, g, plan)


def context_parallel_lightning_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layer_idx: int,
    num_layers: int,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    group: dist.ProcessGroup | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`lightning_attention.chunk_lightning_attn` on a sequence sharded along T over a process group.

    The decay comes from ``(layer_idx, num_layers)`` as in :func:`lightning_attention.chunk_lightning_attn`;
    keyword options ``chunk_size``, ``schedule``, ``reverse``, ``backend``. Everything else as
    :func:`context_parallel_simple_gla`.
    """
    g, scale, extra = _lightning_args(
        q, layer_idx, num_layers, scale, kwargs, "context_parallel_lightning_attn",
        ("chunk_size", "schedule", "reverse", "backend"),
    )
    return context_parallel_simple_gla(q, k, v, g, scale, initial_state, output_final_state, group, **extra)
