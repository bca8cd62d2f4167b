"""Context parallelism: sequences split along T over the ranks of a process group, exact forward and backward.

Rank r holds tokens ``[start_r, start_r + L_r)`` of the token axis: of every batch row (each row one sequence),
or of the packed axis of ``cu_seqlens`` (documents that may start, end or span any number of shards). Where the
scan crosses from one shard into the next it carries one ``[K, V]`` state per (sequence, head). With
``x_t = g[t] + g_gamma`` the log decay of token t (``g`` the per-token gates, or absent: ``x_t = g_gamma``) and
``Lam(run) = exp(sum of x over the run)`` the decay across a run of tokens, that state is linear in the shards it
passed through (plan.py names the runs)::

    A_r       = sum_j exp(x_(j+1) + ... + x_(n-1)) k_j^T v_j   local state of the shard's tail run (n tokens, j
                                                               0-based in scan order), from zero
    S_out(r)  = Lam(tail run) X + A_r                          X = S_out(previous shard) if the sequence spans
                                                               shard r, else the sequence's initial state (or 0)
    o (shard) = scan(q, k, v, g, initial state S_out(previous) for the head run, initial_state for the others)

(a constant decay lam = exp(g_gamma): A_r = sum_j lam^(n - 1 - j) k_j^T v_j, Lam = lam^n). So the forward is:
exchange the call signature (collectives.py) -> A_r (local_state.py: one read of the tail run's k, v, or with a
constant decay of its last ~110/|g_gamma| tokens) -> all-gather the A's (one state per rank; with gates each with
its Lam, ``[R, H]``) -> the chain above (a few tiny steps, redundantly on every rank) -> the engine's scan of the
shard. The backward is the mirror image, against the scan direction (engines/base.py names D, the state
gradient)::

    Bhat_r    = scale * sum_t exp(x_1 + ... + x_t) q_t^T do_t  the head run's own state gradient (t 1-based in scan
                                                               order)
    D(r)      = Lam(head run of the next shard) Z + Bhat_next  gradient of S_out(r); Z = D(next) if the sequence
                                                               spans it, else its final-state gradient summed over
                                                               the ranks (or 0)
    dq, dk, dv, dg = engine backward with the forward's initial states and dht = D(r) for the tail run

Each direction makes one all-gather of one state per rank, whatever T or the number of documents (packed
documents: only the one crossing each boundary carries a state; no collective per document); the forward also
exchanges the call signature first, and with packed documents and ``output_final_state`` all-reduces the
documents' final states (collectives.py).

Gates need no term beyond the engine's dg. Shard r's gates act only inside its own scan, the map
``(S_in, q, k, v, g of the shard) -> (o of the shard, S_out(r))``: A_r and Lam(tail run) are parts of S_out(r),
and everything later sees the gates only through S_out(r). So for a token t of the shard
``dL/dg_t = d/dg_t [ loss of o (shard) + <S_out(r), D(r)> ]`` at fixed S_in, and that is what the engine's backward
returns given S_in as the initial state and D(r) as dht: its dg includes ``<S_T, dht>`` and the pairs of dht with
the shard's tokens (docs/DESIGN.md, "Accuracy of dg"), i.e. the gradient through A_r and Lam(tail run). Bhat_r
and Lam(head run) are parts of D(r - 1), an adjoint, not a function the gates of shard r feed forward into.
tests/distributed/test_context_parallel.py checks dg against autograd through the float64 reference on the whole
sequence.

Overlap. The exchange is not overlapped with compute. Forward: the shard's scan needs S_in for its first token;
splitting it into a scan from zero plus ``lam^t q_t S_in`` added afterwards costs a third pass over q and o for
every undecayed head, more than the gather it would hide. Backward: the engine's dq scan does not need D and
could run during the gather, but the engine computes dq, dk, dv in one call (one fused kernel for small heads).
On 4x H100 at 512k tokens the state all-gather takes 100 us of a 14.5 ms step (0.7%,
benchmarks/results/h100x4/context_parallel.md): the most overlap could save.

Replicated tensors (``initial_state`` in, ``final_state`` out) follow autograd through the exchange: the
gradients of ``final_state`` received on all ranks are summed, and each rank returns a part of the gradient of
``initial_state`` such that the parts summed over the group are the whole gradient (what data/context-parallel
gradient reduction does for a replicated tensor). Without ``cu_seqlens`` rank r's part is the gradient of its own
loss, ``Lam(tokens before the shard) Bhat_r + Lam(all tokens) dfinal_r``; with ``cu_seqlens`` a document's whole
gradient is on the rank holding its first scanned token (a document without tokens: on the first rank of the scan).
Chaining calls (``initial_state`` = an earlier call's ``final_state``) is therefore exact.

Shapes per rank: q, k ``[B, L_r, H, K]``, v ``[B, L_r, H, V]``, g ``[B, L_r, H]``, states ``[N, H, K, V]`` float32
(float64 for float64 inputs), N = B, or the number of documents with ``cu_seqlens`` (then B = 1).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from lightning_attention import _validation as val
from lightning_attention import decay
from lightning_attention.distributed import collectives
from lightning_attention.distributed.local_state import decayed_outer_sum, gated_outer_sum
from lightning_attention.distributed.plan import Run, ShardPlan
from lightning_attention.engines import get_engine, resolve_backend
from lightning_attention.engines.base import engine_keywords

__all__ = ["context_parallel_simple_gla", "context_parallel_lightning_attn"]


@dataclass(frozen=True)
class _Call:
    """Everything fixed for one call: scan config, engine, group, and where the shards and sequences lie."""

    cfg: val.ScanConfig
    backend: str
    group: object
    plan: ShardPlan
    local_cu_seqlens: torch.Tensor | None  # this shard's documents (packed), on q's device
    local_cu_seqlens_cpu: torch.Tensor | None  # the same offsets on the host (the engines plan from it)

    @property
    def rows(self) -> int | None:
        """Rows of an exchanged state: 1 (the one document crossing a boundary) when packed; None = all B rows."""
        return 1 if self.plan.packed else None


def _log_decays(g: torch.Tensor | None, g_gamma: torch.Tensor) -> torch.Tensor | None:
    """Per-token log decays ``x = g + g_gamma`` ``[B, L, H]`` in float64 (the engines sum gates in float64 too,
    engines/cpu/_common.py), or None without gates."""
    return None if g is None else g.to(torch.float64) + g_gamma.to(torch.float64)


def _run_rows(run: Run, L: int, reverse: bool, head: bool) -> tuple[slice, bool]:
    """The shard rows of a run at one end, and whether the scan enters it along the token axis (``ascending``:
    the head run's weights accumulate from the shard's first token, the tail run's from its last, in scan order)."""
    ascending = head != reverse
    return (slice(0, run.length) if ascending else slice(L - run.length, L)), ascending


def _run_sum(a, c, g_gamma: torch.Tensor, log_decay, run: Run, reverse: bool, head: bool) -> torch.Tensor:
    """Decay-weighted ``sum a^T c`` over a run at one end of the shard, in scan order (module docstring): the head
    run weighs its t-th scanned token (1-based) exp(x_1 + ... + x_t), the tail run its j-th (0-based)
    exp(x_(j+1) + ... + x_(n-1)); a constant decay makes those lam^t and lam^(n - 1 - j)."""
    rows, ascending = _run_rows(run, a.shape[1], reverse, head)
    if log_decay is not None:
        return gated_outer_sum(a[:, rows], c[:, rows], log_decay[:, rows], ascending, inclusive=head)
    n = run.length
    base = (1 if ascending else n) if head else (0 if ascending else n - 1)
    return decayed_outer_sum(a[:, rows], c[:, rows], g_gamma, base, ascending)


def _run_decay(log_decay: torch.Tensor, run: Run, reverse: bool, head: bool, dtype: torch.dtype) -> torch.Tensor:
    """Lam of a run at one end of the shard with gates: ``exp(sum of x over the run)`` ``[B, H]`` in ``dtype``."""
    rows, _ = _run_rows(run, log_decay.shape[1], reverse, head)
    return torch.exp(log_decay[:, rows].sum(1)).to(dtype)


def _constant_decays(g_gamma: torch.Tensor, lengths: list[int], dtype: torch.dtype) -> torch.Tensor:
    """Lam of runs of ``lengths`` tokens under the constant decay: ``lam^n`` per run and head, ``[P, 1, H]``."""
    n = torch.tensor(lengths, dtype=torch.float64, device=g_gamma.device)
    return torch.exp(n[:, None, None] * g_gamma.to(torch.float64)).to(dtype)


def _gather(parts: list[torch.Tensor], call: _Call, step: str) -> list[torch.Tensor]:
    """All-gather tensors of one dtype in one collective: each as ``[P, *its shape]`` (group rank order)."""
    flat = torch.cat([p.reshape(-1) for p in parts])
    gathered = collectives.all_gather_rows(flat, call.group, call.plan.world_size, step)
    out, offset = [], 0
    for p in parts:
        out.append(gathered[:, offset : offset + p.numel()].reshape(-1, *p.shape))
        offset += p.numel()
    return out


def _exchange(call, state, log_decay, run: Run, head: bool, g_gamma, extra, step):
    """All-gather each rank's run state ``[R, H, K, V]`` and, with gates, its run's Lam ``[R, H]`` (one collective,
    with ``extra`` tensors appended). Returns ``(states [P, R, H, K, V], Lam [P, R or 1, H], extra gathered)``;
    a constant decay's Lam comes from the run lengths, known everywhere."""
    plan, sdt = call.plan, state.dtype
    parts = [state, *extra]
    if log_decay is not None:
        parts.append(_run_decay(log_decay, run, call.cfg.reverse, head, sdt))
    gathered = _gather(parts, call, step)
    if log_decay is not None:
        decays = gathered.pop()
    else:
        runs = plan.head if head else plan.tail
        decays = _constant_decays(g_gamma, [runs(r).length for r in range(plan.world_size)], sdt)
    return gathered[0], decays, gathered[1:]


def _rows(state: torch.Tensor | None, seq: int | None, call: _Call) -> torch.Tensor | None:
    """The rows of a per-sequence ``[N, H, K, V]`` tensor that one exchanged state stands for."""
    if state is None or call.rows is None:
        return state
    return state[seq : seq + 1]


def _chain(states, start, ranks, decays):
    """``state <- Lam_r * state + states[r]`` over ``ranks`` (decays ``[P, R or 1, H]``); ``start`` None stands for
    zero."""
    state = start
    for r in ranks:
        state = states[r] if state is None else decays[r][:, :, None, None] * state + states[r]
    return state


def _shard_states(call: _Call, per_seq, crossing, L: int, head: bool):
    """The per-sequence states the engine takes for this shard: initial states (forward, ``head``) or final-state
    gradients (backward). Rows of the replicated ``per_seq`` ``[N, H, K, V]`` (or None: zeros) for the shard's
    sequences, the head or tail run's replaced by the exchanged ``crossing`` state where it crosses the boundary.
    Returns None where the engine needs none."""
    if not call.plan.packed:
        return crossing if crossing is not None else per_seq
    if L == 0 or (per_seq is None and crossing is None):
        return None
    seqs = call.plan.local_seqs(call.plan.rank)
    if per_seq is not None:
        states = per_seq[seqs.start : seqs.stop].clone()
    else:
        states = crossing.new_zeros(len(seqs), *crossing.shape[1:])
    if crossing is not None:
        states[0 if head != call.cfg.reverse else -1] = crossing[0]  # the run's place in scan order
    return states


class _ContextParallelScan(torch.autograd.Function):
    """forward(q, k, v, initial_state, g, g_gamma, call) -> (o, final_state or None); g ``[B, L, H]`` in the state
    dtype or None. Engines pick their own precision, so an enclosing ``torch.autocast`` region is switched off
    inside (it would round the fp32 states)."""

    @staticmethod
    def forward(ctx, q, k, v, initial_state, g, g_gamma, call: _Call):
        with torch.autocast(q.device.type, enabled=False):
            return _ContextParallelScan._forward(ctx, q, k, v, initial_state, g, g_gamma, call)

    @staticmethod
    def backward(ctx, do, dfinal):
        with torch.autocast(do.device.type, enabled=False):
            return _ContextParallelScan._backward(ctx, do, dfinal)

    @staticmethod
    def _forward(ctx, q, k, v, initial_state, g, g_gamma, call: _Call):
        plan, cfg = call.plan, call.cfg
        rank, rev = plan.rank, cfg.reverse
        B, L, H, K = q.shape
        V = v.shape[-1]
        sdt = val.state_dtype(q)
        head, tail = plan.head(rank), plan.tail(rank)
        rows = call.rows or B
        final_by_chain = cfg.output_final_state and not plan.packed
        log_decay = _log_decays(g, g_gamma)

        # A_r, where a later shard needs it (and, one sequence per row, for the final state).
        if tail.open or final_by_chain:
            tail_state = _run_sum(k, v, g_gamma, log_decay, tail, rev, head=False)
        else:
            tail_state = q.new_zeros(rows, H, K, V, dtype=sdt)
        states, decays, _ = _exchange(call, tail_state, log_decay, tail, False, g_gamma, [], "forward state all-gather")

        # The state entering the shard's head run: from where its sequence began, through every shard it spans.
        state_in = None
        if head.open:
            chain = plan.chain_to(rank)
            start = _rows(initial_state, plan.tail(chain[0]).seq, call)
            state_in = _chain(states, None if start is None else start.to(sdt), chain, decays)

        local_h0 = _shard_states(call, initial_state, state_in, L, head=True)

        saved = None
        local_final = None
        if L == 0:
            o = q.new_zeros(B, 0, H, V)
        else:
            engine = get_engine(call.backend, "chunk")
            local_cfg = replace(cfg, output_final_state=cfg.output_final_state and plan.packed)
            scan_args = dict(
                g_gamma=g_gamma, cfg=local_cfg, initial_state=local_h0, cu_seqlens=call.local_cu_seqlens,
                **engine_keywords(g, call.local_cu_seqlens_cpu),
            )  # fmt: skip
            if hasattr(engine, "forward_saving"):
                o, local_final, saved = engine.forward_saving(q, k, v, **scan_args)
            else:
                o, local_final = engine.forward(q, k, v, **scan_args)

        final = None
        if final_by_chain:
            start = None if initial_state is None else initial_state.to(sdt)
            final = _chain(states, start, plan.scan_order(), decays)
            if final is initial_state:  # no tokens at all: a new tensor, not the input
                final = final.clone()
        elif cfg.output_final_state:
            final = _packed_finals(call, local_final, initial_state, q, V, tail)

        ctx.save_for_backward(q, k, v, g, g_gamma, local_h0, saved)
        ctx.call = call
        ctx.has_initial_state = initial_state is not None
        return o, final

    @staticmethod
    def _backward(ctx, do, dfinal):
        q, k, v, g, g_gamma, local_h0, saved = ctx.saved_tensors
        call = ctx.call
        plan, cfg = call.plan, call.cfg
        rank, rev = plan.rank, cfg.reverse
        B, L, H, K = q.shape
        V = v.shape[-1]
        sdt = val.state_dtype(q)
        do = do.contiguous()
        head, tail = plan.head(rank), plan.tail(rank)
        rows = call.rows or B
        N = plan.num_seqs if plan.packed else B
        has_final = cfg.output_final_state
        wants_dh0 = ctx.has_initial_state and ctx.needs_input_grad[3]
        if has_final and dfinal is None:
            dfinal = q.new_zeros(N, H, K, V, dtype=sdt)
        log_decay = _log_decays(g, g_gamma)

        # Bhat_r, where an earlier shard needs it (and, one sequence per row, for this rank's part of dh0).
        if head.open or (wants_dh0 and not plan.packed):
            head_grad = cfg.scale * _run_sum(q, do, g_gamma, log_decay, head, rev, head=True)
        else:
            head_grad = q.new_zeros(rows, H, K, V, dtype=sdt)
        extra = [dfinal.to(sdt)] if has_final else []
        head_grads, decays, dfinals = _exchange(
            call, head_grad, log_decay, head, True, g_gamma, extra, "backward state-gradient all-gather"
        )
        dfinal_sum = dfinals[0].sum(0) if has_final else None

        # The gradient reaching the shard's tail run: from where its sequence ends, back through every shard
        # it spans.
        dstate = None
        if tail.open:
            chain = plan.chain_from(rank)
            start = _rows(dfinal_sum, plan.head(chain[0]).seq, call)
            dstate = _chain(head_grads, start, chain, decays)

        dht = _shard_states(call, dfinal_sum, dstate, L, head=False)

        dg = None
        if L == 0:
            dq, dk, dv, local_dh0 = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), None
            dg = None if g is None else torch.zeros_like(g)
        else:
            engine = get_engine(call.backend, "chunk")
            reuse = {} if saved is None else {"saved": saved}
            dq, dk, dv, local_dh0, dg = engine.backward(
                q, k, v, g_gamma=g_gamma, cfg=cfg, initial_state=local_h0, cu_seqlens=call.local_cu_seqlens, do=do,
                dht=dht, **engine_keywords(g, call.local_cu_seqlens_cpu), **reuse,
            )  # fmt: skip

        dh0 = None
        if wants_dh0 and not plan.packed:
            # This rank's loss sees h0 through Lam(tokens scanned before the shard) S_in, and through its copy of
            # the final state, Lam(all tokens) h0. One sequence per row: every shard is one run, head = tail.
            order = plan.scan_order()
            before = decays[order[: order.index(rank)]].prod(0)
            dh0 = before[:, :, None, None] * head_grad
            if has_final:
                dh0 = dh0 + decays.prod(0)[:, :, None, None] * dfinal.to(sdt)
        elif wants_dh0:
            dh0 = _packed_dh0(call, local_dh0, dfinal_sum, q, V, head)
        return dq, dk, dv, dh0, dg, None, None


def _packed_finals(call: _Call, local_final, initial_state, q, V, tail: Run) -> torch.Tensor:
    """Every document's final state on every rank: each rank adds those of the documents whose last scanned
    token it holds (one all-reduce); a document without tokens keeps its initial state."""
    plan = call.plan
    sdt = val.state_dtype(q)
    N, H, K = plan.num_seqs, q.shape[2], q.shape[3]
    final = q.new_zeros(N, H, K, V, dtype=sdt)
    seqs = plan.local_seqs(plan.rank)
    b = plan.seq_bounds
    for i, n in enumerate(seqs):
        if b[n + 1] > b[n] and not (tail.open and n == tail.seq):
            final[n] = local_final[i]
    collectives.all_reduce_sum(final, call.group, plan.world_size, "all-reduce of the documents' final states")
    empty = [n for n in range(N) if b[n + 1] == b[n]]
    if empty and initial_state is not None:
        final[empty] = initial_state[empty].to(sdt)
    return final


def _packed_dh0(call: _Call, local_dh0, dfinal_sum, q, V, head: Run) -> torch.Tensor:
    """Each document's whole initial-state gradient on the rank holding its first scanned token (which the
    engine's dh0 already is: its dht carried every later shard's gradient); a document without tokens: its
    summed final-state gradient, on the first rank of the scan."""
    plan = call.plan
    N, H, K = plan.num_seqs, q.shape[2], q.shape[3]
    dh0 = q.new_zeros(N, H, K, V, dtype=val.state_dtype(q))
    b = plan.seq_bounds
    for i, n in enumerate(plan.local_seqs(plan.rank)):
        if b[n + 1] > b[n] and not (head.open and n == head.seq):
            dh0[n] = local_dh0[i]
    if dfinal_sum is not None and plan.scan_order()[0] == plan.rank:
        empty = [n for n in range(N) if b[n + 1] == b[n]]
        dh0[empty] = dfinal_sum[empty]
    return dh0


# ---------------------------------------------------------------------------------------------------------
# Public API.
# ---------------------------------------------------------------------------------------------------------


def _check_group(group, device: torch.device | None):
    """Returns ``(rank in group, world size)``. These errors are raised before any exchange (a rank that cannot
    communicate cannot tell the others)."""
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
    if dist.get_backend(group) == "nccl" and device is not None and device.type != "cuda":
        raise ValueError(f"group uses the NCCL backend, which needs CUDA tensors; q is on {device}")
    return rank, dist.get_world_size(group)


def _exchange_device(q, group) -> torch.device:
    """Where the signature exchange runs: q's device, or (q unusable) the one the group's backend needs."""
    if isinstance(q, torch.Tensor):
        return q.device
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _context_parallel(
    q, k, v, g, decay_of, initial_state, output_final_state, group, cu_seqlens, reverse, chunk_size, backend
):  # fmt: skip
    """Validate (every rank takes part in the signature exchange, even with invalid arguments), plan, run.
    ``decay_of()`` -> ``(g_gamma or None, scale or None)``, called inside the validation."""
    rank, world_size = _check_group(group, q.device if isinstance(q, torch.Tensor) else None)
    error = signature = fingerprinted = None
    try:
        g_gamma, scale = decay_of()
        checked_g_gamma, scale, chunk_size = val.check_scan_inputs(q, k, v, g_gamma, scale, None, None, chunk_size, g=g)
        # The caller's g_gamma, not its validated copy: its fingerprint is kept per tensor (a layer passes the same
        # one). None is no constant decay, the same as zeros.
        fingerprinted = checked_g_gamma if g_gamma is None else g_gamma
        num_seqs, cu_host, cu_fingerprint = q.shape[0], None, 0
        if cu_seqlens is not None:
            num_seqs = val.check_cu_seqlens_layout(cu_seqlens, q)
            cu_host = cu_seqlens.detach().cpu()
            cu_fingerprint = collectives.fingerprint(cu_host.tolist())
        val.check_initial_state(initial_state, q, v, num_seqs)
        backend = resolve_backend(backend, q.device)
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (q, k, v, g, initial_state)
        )
        signature = collectives.Signature(
            tokens=q.shape[1], batch=q.shape[0], heads=q.shape[2], k_dim=q.shape[3], v_dim=v.shape[3],
            dtype=q.dtype, device_type=q.device.type, initial_state=initial_state is not None,
            output_final_state=bool(output_final_state), reverse=bool(reverse), chunk_size=chunk_size, scale=scale,
            num_seqs=num_seqs if cu_seqlens is not None else -1, cu_seqlens=cu_fingerprint, needs_grad=needs_grad,
            gates=None if g is None else g.dtype,
        )  # fmt: skip
    except (TypeError, ValueError) as exc:
        error = exc
    device = _exchange_device(q, group)
    lengths = collectives.agree(signature, fingerprinted, device, group, world_size, rank, error)

    bounds = None
    if cu_seqlens is not None:  # equal on every rank (the exchange compared fingerprints): any error is too
        try:
            bounds = val.cu_seqlens_bounds(cu_host, sum(lengths))
        except ValueError as exc:
            raise ValueError(f"{exc} [context parallel: T is the whole axis, the shard lengths {lengths} summed]") from None
    plan = ShardPlan(tuple(lengths), bounds, bool(reverse), rank)
    local_cu = local_cu_cpu = None
    if plan.packed and q.shape[1] > 0:
        local_cu_cpu = torch.tensor(plan.local_bounds(rank), dtype=torch.int32)
        local_cu = local_cu_cpu.to(q.device)
    cfg = val.ScanConfig(scale, bool(reverse), chunk_size, bool(output_final_state))
    call = _Call(cfg, backend, group, plan, local_cu, local_cu_cpu)
    if g is not None:  # outside the Function, so that autograd hands dg back in g's own dtype
        g = g.to(val.state_dtype(q)).contiguous()
    return _ContextParallelScan.apply(q, k, v, initial_state, g, checked_g_gamma, call)


def context_parallel_simple_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    g_gamma: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    group: dist.ProcessGroup | None = None,
    *,
    cu_seqlens: torch.Tensor | None = None,
    reverse: bool = False,
    chunk_size: int = 64,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`lightning_attention.chunk_simple_gla` on a token axis sharded over a process group.

    Call it on every rank of ``group`` (default: the world) with that rank's consecutive slice of the token
    axis: rank r holds tokens ``[start_r, start_r + L_r)``, ranks in ascending order along T. The result on each
    rank is that rank's slice of the single-device op's output (within rounding), forward and backward.

    Args:
        q, k: ``[B, L_r, H, K]``; v: ``[B, L_r, H, V]``: this rank's shard. ``L_r`` may differ between ranks
            (even 0); everything else must be the same on all ranks: it is checked, and a mismatch raises the
            same ValueError on every rank.
        g: ``[B, L_r, H]`` per-token natural-log forget gates of this rank's tokens, any floating dtype,
            differentiable (``dg`` in g's dtype), or None; given on every rank or on none, in one dtype. As for
            :func:`lightning_attention.chunk_simple_gla` (fla's order: ``g`` 4th, ``g_gamma`` 5th); a ``[H]``
            tensor here is an error pointing to ``g_gamma=``.
        g_gamma: ``[H]`` constant log decay per head, ``<= 0``, the same on every rank; adds to ``g``. None: no
            constant decay.
        scale: default ``K ** -0.5``.
        initial_state: ``[N, H, K, V]`` float32 (float64 for float64 inputs), the state before each sequence,
            identical on every rank. Gradient: a part on each rank, summing over the group to the whole
            gradient (module docstring).
        output_final_state: return the state after each sequence ``[N, H, K, V]``, the same on every rank; its
            gradients from all ranks are summed.
        group: the process group the tokens are split over (NCCL with CUDA tensors, or gloo).
        cu_seqlens: int ``[N + 1]`` offsets of documents packed along the *whole* token axis (B = 1), the same
            tensor on every rank (the one the single-device op would take for the concatenated shards): 0-based,
            non-decreasing, last == ``sum of L_r``. A document may start, end or span any number of shards.
            On q's device; its values are read on the host once per call.
        reverse: scan each sequence from its last token to its first (the state flows from the last rank down).
        chunk_size, backend: as for :func:`lightning_attention.chunk_simple_gla`; the local work runs on
            ``engines.get_engine(backend, "chunk")``.

    Returns:
        ``(o [B, L_r, H, V] in q's dtype, final_state [N, H, K, V] or None)``.

    Collectives per call: a signature exchange and one state all-gather forward, one all-gather backward, and
    with ``cu_seqlens`` and ``output_final_state`` one all-reduce of the final states (collectives.py). ``g`` adds
    no collective: each all-gather carries one ``[R, H]`` decay per rank more.
    """
    return _context_parallel(
        q, k, v, g, lambda: (g_gamma, scale), initial_state, output_final_state, group, cu_seqlens, reverse,
        chunk_size, backend,
    )  # fmt: skip


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
    *,
    cu_seqlens: torch.Tensor | None = None,
    schedule: str = "tnl",
    reverse: bool = False,
    chunk_size: int = 64,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`lightning_attention.chunk_lightning_attn` on a token axis sharded over a process group.

    The decay comes from ``(layer_idx, num_layers, schedule)`` through :func:`lightning_attention.decay.g_gamma`
    and ``scale`` defaults to the schedule's, as in :func:`lightning_attention.chunk_lightning_attn`. Everything
    else as :func:`context_parallel_simple_gla`.
    """

    def decay_of():
        val.check_qkv(q, k, v)
        g = decay.g_gamma(q.shape[2], layer_idx, num_layers, schedule=schedule, device=q.device)
        return g, decay.default_scale(schedule, q.shape[-1]) if scale is None else scale

    return _context_parallel(
        q, k, v, None, decay_of, initial_state, output_final_state, group, cu_seqlens, reverse, chunk_size, backend
    )
