"""The chunked Triton engine: forward and backward (the serving prefill into cache slots runs its scan: decode.py).

With a scalar decay per head every decay factor is closed-form (lam^(i-j), lam^C), so the running state
never needs to leave the chip: one program per (segment, head, V-block) walks its chunks in order
(chunk_scan.py). No per-chunk state is stored.

    forward   o, final = scan(q, k, v, h0, shift 0)                                       1 launch
    backward  dq       = scan(do, v, k, h0^T, shift 0)                                    1 launch
              dk, dv, dh0 from the reverse scan of D = sum q^T do                          1 launch
              - heads up to 64 x 64 (padded): one fused kernel reading q, k, v, do once (chunk_bwd.py);
              - larger heads with K == V: dv = scan(k, q, do) and its transposed twin dk = scan(v, do, q) in
                one launch (chunk_scan.scan(transposed=...)); K != V: those two as two launches.
              (The fused kernel spills at 128 x 128 and loses to the scans:
              benchmarks/results/h100/kernel_choices.md.)

When sequences x heads x V-blocks cannot fill the GPU, every sequence is cut into segments and a first
pass computes each segment's local state (chunk_state.py), which the scan's programs fold into the state
they start from: 2 launches instead of 1, and k, v are read twice. The backward's dq scan needs the transposes
of the forward's local states: the eager op keeps them from the forward (forward_saving; a few MiB), saving a
pass over k and v (benchmarks/results/h100/kernel_choices.md).
Sequences never share a chunk (varlen ``cu_seqlens``; a varlen call reads ``cu_seqlens`` on the host once to
plan the segments).

Per-token gates ``g [B, T, H]`` (fla's Simple GLA; added to g_gamma) run the same launches with the decays of the
gates' cumulative sums per chunk (chunk_scan.py), and the backward returns dg: dk, dv first, whose dv scan (or
fused kernel) stores G_t = v_t . dv_t, then the dq scan, which takes F_t = q_t . dq_t (both without the token's own
pair, in fp32) and stores the running sum of G - F in scan order, so that
dg_t = <h0, dh0> + sum over s before t of (G_s - F_s) (chunk_gates.py: the contract's sum, no final state needed).
Extra traffic against g_gamma: the gates (4 bytes per token and head per launch), the dq scan's read of q and the
dv scan's of v (the latter from L2 in the paired launch, where the twin reads v), and dg's partial sums (4 bytes per
token, head and V-block, twice).

Layout: q, k ``[B, T, H, K]``, v ``[B, T, H, V]``, states ``[N, H, K, V]`` fp32 (see engines/base.py for the
contract). Accumulation and states are fp32; fp32 inputs multiply as torch.get_float32_matmul_precision()
says (3xTF32 under torch's default "highest", TF32 under "high"; _common.dot_precision).
float64 inputs, and head dims K or V above 256, run on the torch engine. The op's ``chunk_size`` is accepted
for any power of two and mapped to the kernels' 64 (results agree within rounding).
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from lightning_attention import _validation as val
from lightning_attention.engines.base import engine_keywords
from lightning_attention.engines.triton._common import plan_segments, sequence_bounds
from lightning_attention.engines.triton.chunk_bwd import dkdv, use_fused_dkdv
from lightning_attention.engines.triton.chunk_gates import gate_gradient
from lightning_attention.engines.triton.chunk_scan import MAX_DIM, RowDots, scan, scan_programs_per_segment
from lightning_attention.engines.triton.chunk_state import LocalStates, local_states
from lightning_attention.engines.triton.options import options

__all__ = ["ENGINE", "TritonChunkEngine"]


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[B, T, H, D] -> contiguous [B * T, H, D] (a view when already contiguous)."""
    return x.contiguous().reshape(-1, x.shape[2], x.shape[3])


def _scan(
    q, k, v, out, g, bounds, *, scale, k_scale=1.0, reverse, shift, state_in, state_out=None,
    transposed=None, locals_swapped=False, saved_locals=None, gates=None, dots=None,
):  # fmt: skip
    """One scan (engines/base.py contract) over rows ``[R, H, D]``, splitting sequences when that fills the GPU;
    ``transposed = (q_b, out_b)`` adds its twin ``out_b = scan(q_b, v, k)`` (chunk_scan.scan).
    On split sequences it folds the local states of (k, v), or with ``locals_swapped`` the transposes of those of
    (v, k): the backward's dq scan = scan(do, v, k) folds the forward's (k, v) states, computed the same way, so
    that the forward can hand them over (``saved_locals``: their LocalStates.storage) and both give the same bits.
    ``gates`` fp32 ``[R, H]``: per-token log gates; ``dots``: chunk_scan.RowDots (in mode 2 its segment totals are
    allocated here where the plan splits). Returns (plan, the local states it folded or None, dots)."""
    paired = transposed is not None
    pps = scan_programs_per_segment(q.shape[1], q.shape[2], v.shape[2], q.dtype, q.device, paired=paired)
    plan = plan_segments(bounds, pps, q.device)
    # Split sequences: one set of local states serves both scans (the twin reads them transposed).
    locals_ = None
    if plan.split:
        gated = dict(gates=gates, shift=shift)
        if not locals_swapped:
            locals_ = local_states(k, v, g, plan, k_scale=k_scale, reverse=reverse, **gated)
        elif saved_locals is not None:
            locals_ = LocalStates.view(saved_locals, plan.num_segments, q.shape[1], k.shape[2], v.shape[2],
                                       gates is not None)  # fmt: skip
        else:
            locals_ = local_states(v, k, g, plan, k_scale=k_scale, reverse=reverse, **gated)
        if dots is not None and dots.mode == 2:
            nv = dots.out.shape[0]
            totals = torch.empty(plan.num_segments, nv, q.shape[1], dtype=torch.float32, device=q.device)
            dots = dataclasses.replace(dots, totals=totals)
    scan(
        q, k, v, out, g, plan, scale=scale, k_scale=k_scale, reverse=reverse, shift=shift, transposed=transposed,
        state_in=state_in, local_states=locals_, local_states_transposed=locals_swapped and locals_ is not None,
        state_out=state_out, gates=gates, dots=dots,
    )  # fmt: skip
    return plan, locals_, dots


def _row_dots_buffer(rows: int, heads: int, dk: int, dv: int, dtype: torch.dtype, device) -> torch.Tensor:
    """fp32 ``[NV, R, H]`` for the row dots of a scan with heads (dk, dv) (NV: its V-blocks)."""
    nv = scan_programs_per_segment(1, dk, dv, dtype, device)
    return torch.empty(nv, rows, heads, dtype=torch.float32, device=device)


def _dkdv(q, k, v, do, dk, dv, g, bounds, *, scale, reverse, dht, dh0, gates=None):
    """dk, dv (and dh0) from the state-gradient scan D, run in direction ``reverse``. With per-token ``gates``,
    returns G fp32 ``[n, R, H]`` (summed over n: G_t = v_t . dv_t without the token's own pair), else None."""
    R, H = q.shape[0], q.shape[1]
    if use_fused_dkdv(q.shape[2], v.shape[2], gated=gates is not None):
        plan = plan_segments(bounds, q.shape[1], q.device)
        locals_ = None
        if plan.split:
            locals_ = local_states(q, do, g, plan, k_scale=scale, reverse=reverse, gates=gates, shift=1)
        dots = None if gates is None else torch.empty(1, R, H, dtype=torch.float32, device=q.device)
        dkdv(
            q, k, v, do, dk, dv, g, plan, scale=scale, reverse=reverse, state_in=dht, local_states=locals_,
            state_out=dh0, gates=gates, dots=dots,
        )  # fmt: skip
        return dots
    common = dict(scale=1.0, k_scale=scale, reverse=reverse, shift=1, gates=gates)
    dots = None
    if gates is not None:  # G from the dv scan: v_t . dv_t
        dots = RowDots(v, _row_dots_buffer(R, H, k.shape[2], v.shape[2], q.dtype, q.device), 1)
    if options().paired_dkdv and q.shape[2] == v.shape[2]:
        _scan(k, q, do, dv, g, bounds, **common, state_in=dht, state_out=dh0, transposed=(v, dk), dots=dots)
    else:
        _scan(k, q, do, dv, g, bounds, **common, state_in=dht, state_out=dh0, dots=dots)
        _scan(v, do, q, dk, g, bounds, **common, state_in=None if dht is None else dht.transpose(-1, -2))
    return None if dots is None else dots.out


class TritonChunkEngine:
    """engines/base.Engine on the Triton kernels (CUDA tensors, or CPU under TRITON_INTERPRET=1).

    Per-token gates ``g`` (fp32 ``[B, T, H]``, added to g_gamma) take the same kernels with the decays of their
    cumulative sums per chunk (g_contract.md; the g_gamma-only kernels are unchanged where ``g`` is None), and the
    backward returns dg (chunk_gates.py: from row dots of the dv and dq scans, no final state needed)."""

    @staticmethod
    def _torch_engine(q: torch.Tensor, v: torch.Tensor):
        """The torch engine where the kernels do not apply (float64, K or V > MAX_DIM), else None."""
        if q.dtype == torch.float64 or max(q.shape[-1], v.shape[-1]) > MAX_DIM:
            from lightning_attention.engines.cpu.chunk import ENGINE as TORCH_ENGINE

            return TORCH_ENGINE
        return None

    def forward(self, q, k, v, g_gamma, cfg: val.ScanConfig, initial_state, cu_seqlens, g=None, cu_seqlens_cpu=None):
        return self.forward_saving(q, k, v, g_gamma, cfg, initial_state, cu_seqlens, g, cu_seqlens_cpu)[:2]

    def forward_saving(
        self, q, k, v, g_gamma, cfg: val.ScanConfig, initial_state, cu_seqlens, g=None, cu_seqlens_cpu=None
    ):  # fmt: skip
        """forward, and what the backward may reuse (``saved``): the forward's local states of (k, v) (with the
        segments' total decays, for gates: LocalStates.storage) where it split sequences and the backward's dq
        scan has the same segments, else None."""
        if (fallback := self._torch_engine(q, v)) is not None:
            extra = engine_keywords(g, cu_seqlens_cpu)
            return (*fallback.forward(q, k, v, g_gamma, cfg, initial_state, cu_seqlens, **extra), None)
        B, T, H, K = q.shape
        V = v.shape[-1]
        bounds = sequence_bounds(B, T, cu_seqlens_cpu if cu_seqlens_cpu is not None else cu_seqlens)
        o = torch.empty(B * T, H, V, dtype=q.dtype, device=q.device)
        final = None
        if cfg.output_final_state:
            final = torch.empty(len(bounds) - 1, H, K, V, dtype=torch.float32, device=q.device)
        _, locals_, _ = _scan(
            _rows(q), _rows(k), _rows(v), o, g_gamma.float().contiguous(), bounds,
            scale=cfg.scale, reverse=cfg.reverse, shift=0, state_in=initial_state, state_out=final,
            gates=_gate_rows(g),
        )  # fmt: skip
        saved = locals_.storage if locals_ is not None and _dq_shares_segments(q, v) else None
        return o.view(B, T, H, V), final, saved

    def backward(
        self, q, k, v, g_gamma, cfg: val.ScanConfig, initial_state, cu_seqlens, do, dht, g=None, cu_seqlens_cpu=None,
        saved=None,
    ):  # fmt: skip
        """``saved``: forward_saving's, or None (then what it holds is computed again). Returns (dq, dk, dv, dh0
        or None, dg fp32 [B, T, H] or None)."""
        if (fallback := self._torch_engine(q, v)) is not None:
            extra = engine_keywords(g, cu_seqlens_cpu)
            return fallback.backward(q, k, v, g_gamma, cfg, initial_state, cu_seqlens, do, dht, **extra)
        B, T, H, K = q.shape
        V = v.shape[-1]
        bounds = sequence_bounds(B, T, cu_seqlens_cpu if cu_seqlens_cpu is not None else cu_seqlens)
        q2, k2, v2, do2 = _rows(q), _rows(k), _rows(v), _rows(do.to(q.dtype))
        gg = g_gamma.float().contiguous()
        gates = _gate_rows(g)
        dq, dk, dv = torch.empty_like(q2), torch.empty_like(k2), torch.empty_like(v2)
        dh0 = torch.empty_like(initial_state, dtype=torch.float32) if initial_state is not None else None
        h0_t = None if initial_state is None else initial_state.transpose(-1, -2)
        # On split sequences dq = scan(do, v, k) folds the forward's local states of (k, v), read transposed, where
        # its segments are the forward's: the eager path saved them (one pass over k and v fewer); the custom op of
        # torch.compile saves nothing (ops.py says why), so _scan computes them as the forward did.
        dq_scan = dict(
            scale=cfg.scale, reverse=cfg.reverse, shift=0, state_in=h0_t,
            locals_swapped=_dq_shares_segments(q, v), saved_locals=saved, gates=gates,
        )  # fmt: skip
        dkdv_scan = dict(scale=cfg.scale, reverse=not cfg.reverse, dht=dht, dh0=dh0, gates=gates)
        if gates is None:
            _scan(do2, v2, k2, dq, gg, bounds, **dq_scan)
            _dkdv(q2, k2, v2, do2, dk, dv, gg, bounds, **dkdv_scan)
            return dq.view(q.shape), dk.view(k.shape), dv.view(v.shape), dh0, None
        # Per-token gates: dk, dv first (their G and dh0 enter the dq scan's running sum of dg: chunk_gates.py).
        g_dots = _dkdv(q2, k2, v2, do2, dk, dv, gg, bounds, **dkdv_scan)
        h0_dh0 = None if initial_state is None else torch.linalg.vecdot(
            initial_state.float().flatten(2), dh0.flatten(2))  # fmt: skip
        dots = RowDots(q2, _row_dots_buffer(B * T, H, V, K, q.dtype, q.device), 2, g_dots, h0_dh0)
        plan, _, dots = _scan(do2, v2, k2, dq, gg, bounds, **dq_scan, dots=dots)
        dg = gate_gradient(dots.out, dots.totals, plan, reverse=cfg.reverse)
        return dq.view(q.shape), dk.view(k.shape), dv.view(v.shape), dh0, dg.view(B, T, H)


def _gate_rows(g: torch.Tensor | None) -> torch.Tensor | None:
    """Per-token log gates ``[B, T, H]`` as the kernels read them: fp32 contiguous ``[B * T, H]``."""
    return None if g is None else g.float().contiguous().reshape(-1, g.shape[-1])


def _dq_shares_segments(q: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the backward's dq scan (K and V swapped) plans the forward's segments: as many programs each."""
    H, K, V = q.shape[2], q.shape[3], v.shape[3]
    programs = functools.partial(scan_programs_per_segment, H, dtype=q.dtype, device=q.device)
    return programs(K, V) == programs(V, K)


ENGINE = TritonChunkEngine()

