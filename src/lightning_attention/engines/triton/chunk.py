"""The chunked Triton engine: forward, backward, and the serving prefill into a slot-indexed state cache.

With a scalar decay per head every decay factor is closed-form (lam^(i-j), lam^C), so the running state
never needs to leave the chip: one program per (segment, head, V-block) walks its chunks in order
(chunk_scan.py). No per-chunk state is stored.

    forward   o, final = scan(q, k, v, h0, offset 1)                                      1 launch
    backward  dq       = scan(do, v, k, h0^T, offset 1)                                   1 launch
              dk, dv, dh0 from the reverse scan of D = sum q^T do                          1 launch
              - heads up to 64 x 64 (padded): one fused kernel reading q, k, v, do once (chunk_bwd.py);
              - larger heads with K == V: dv = scan(k, q, do) and its transposed twin dk = scan(v, do, q) in
                one launch (chunk_scan.scan(transposed=...)); K != V: those two as two launches.
              (The fused kernel spills at 128 x 128 and loses to the scans: benchmarks/results/chunk_NOTES.md.)

When sequences x heads x V-blocks cannot fill the GPU, every sequence is cut into segments and a first
pass computes each segment's local state (chunk_state.py), which the scan's programs fold into the state
they start from: 2 launches instead of 1, and k, v are read twice. The backward's dq scan needs the transposes
of the forward's local states: the eager op keeps them from the forward (forward_saving; a few MiB), saving a
pass over k and v (H100: 1x32768x8x128 bf16 fwd+bwd 0.574 -> 0.530 ms, benchmarks/results/chunk_NOTES.md).
Sequences never share a chunk (varlen ``cu_seqlens``; a varlen call reads ``cu_seqlens`` on the host once to
plan the segments).

Layout: q, k ``[B, T, H, K]``, v ``[B, T, H, V]``, states ``[N, H, K, V]`` fp32 (see engines/base.py for the
contract). Accumulation and states are fp32; fp32 inputs multiply as torch.get_float32_matmul_precision()
says (3xTF32 under torch's default "highest", TF32 under "high"; _common.dot_precision).
float64 inputs, and head dims K or V above 256, run on the torch engine. The op's ``chunk_size`` is accepted
for any power of two and mapped to the kernels' 64 (results agree within rounding).
"""

from __future__ import annotations

import torch

from lightning_attention import _validation as val
from lightning_attention.engines.triton._common import plan_segments, sequence_bounds
from lightning_attention.engines.triton.chunk_bwd import dkdv, use_fused_dkdv
from lightning_attention.engines.triton.chunk_scan import MAX_DIM, scan, scan_programs_per_segment
from lightning_attention.engines.triton.chunk_state import local_states

__all__ = ["ENGINE", "TritonChunkEngine", "prefill_into_slots"]

#: dk and dv of equal-sized heads from one launch of the scan and its transposed twin (chunk_scan.scan).
PAIRED_DKDV = True


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[B, T, H, D] -> contiguous [B * T, H, D] (a view when already contiguous)."""
    return x.contiguous().reshape(-1, x.shape[2], x.shape[3])


def _scan(
    q, k, v, out, g, bounds, *, scale, k_scale=1.0, reverse, shift, state_in, state_out=None, slots=(None, None),
    transposed=None, locals_swapped=False, saved_locals=None,
):  # fmt: skip
    """One scan (engines/base.py contract) over rows ``[R, H, D]``, splitting sequences when that fills the GPU;
    ``transposed = (q_b, out_b)`` adds its twin ``out_b = scan(q_b, v, k)`` (chunk_scan.scan).
    On split sequences it folds the local states of (k, v), or with ``locals_swapped`` the transposes of those of
    (v, k): the backward's dq scan = scan(do, v, k) folds the forward's (k, v) states, computed the same way, so
    that the forward can hand them over (``saved_locals``) and both give the same bits. Returns the local states
    it folded (None when no sequence was split)."""
    slot_ids, slot_used = slots
    pps = scan_programs_per_segment(q.shape[1], q.shape[2], v.shape[2], q.dtype, paired=transposed is not None)
    plan = plan_segments(bounds, pps, q.device)
    # Split sequences: one set of local states serves both scans (the twin reads them transposed).
    locals_ = None
    if plan.split:
        if not locals_swapped:
            locals_ = local_states(k, v, g, plan, k_scale=k_scale, reverse=reverse)
        elif saved_locals is not None:
            locals_ = saved_locals
        else:
            locals_ = local_states(v, k, g, plan, k_scale=k_scale, reverse=reverse)
    scan(
        q, k, v, out, g, plan, scale=scale, k_scale=k_scale, reverse=reverse, shift=shift, transposed=transposed,
        state_in=state_in, local_states=locals_, local_states_transposed=locals_swapped and locals_ is not None,
        state_out=state_out, slot_ids=slot_ids, slot_used=slot_used,
    )  # fmt: skip
    return locals_


def _dkdv(q, k, v, do, dk, dv, g, bounds, *, scale, reverse, dht, dh0):
    """dk, dv (and dh0) from the state-gradient scan D, run in direction ``reverse``."""
    if use_fused_dkdv(q.shape[2], v.shape[2]):
        plan = plan_segments(bounds, q.shape[1], q.device)
        locals_ = local_states(q, do, g, plan, k_scale=scale, reverse=reverse) if plan.split else None
        dkdv(
            q, k, v, do, dk, dv, g, plan, scale=scale, reverse=reverse, state_in=dht, local_states=locals_,
            state_out=dh0,
        )  # fmt: skip
        return
    common = dict(scale=1.0, k_scale=scale, reverse=reverse, shift=1)
    if PAIRED_DKDV and q.shape[2] == v.shape[2]:
        _scan(k, q, do, dv, g, bounds, **common, state_in=dht, state_out=dh0, transposed=(v, dk))
        return
    _scan(k, q, do, dv, g, bounds, **common, state_in=dht, state_out=dh0)
    _scan(v, do, q, dk, g, bounds, **common, state_in=None if dht is None else dht.transpose(-1, -2))


class TritonChunkEngine:
    """engines/base.Engine on the Triton kernels (CUDA tensors, or CPU under TRITON_INTERPRET=1)."""

    @staticmethod
    def _torch_engine(q: torch.Tensor, v: torch.Tensor):
        """The torch engine where the kernels do not apply (float64, K or V > MAX_DIM), else None."""
        if q.dtype == torch.float64 or max(q.shape[-1], v.shape[-1]) > MAX_DIM:
            from lightning_attention.engines.cpu.chunk import ENGINE as TORCH_ENGINE

            return TORCH_ENGINE
        return None

    def forward(self, q, k, v, g_gamma, cfg: val.ScanConfig, initial_state, cu_seqlens):
        return self.forward_saving(q, k, v, g_gamma, cfg, initial_state, cu_seqlens)[:2]

    def forward_saving(self, q, k, v, g_gamma, cfg: val.ScanConfig, initial_state, cu_seqlens):
        """forward, and what the backward may reuse (``saved``): the forward's local states of (k, v) where it
        split sequences and the backward's dq scan has the same segments, else None."""
        if (fallback := self._torch_engine(q, v)) is not None:
            return (*fallback.forward(q, k, v, g_gamma, cfg, initial_state, cu_seqlens), None)
        B, T, H, K = q.shape
        V = v.shape[-1]
        bounds = sequence_bounds(B, T, cu_seqlens)
        o = torch.empty(B * T, H, V, dtype=q.dtype, device=q.device)
        final = None
        if cfg.output_final_state:
            final = torch.empty(len(bounds) - 1, H, K, V, dtype=torch.float32, device=q.device)
        g = g_gamma.float().contiguous()
        locals_ = _scan(
            _rows(q), _rows(k), _rows(v), o, g, bounds,
            scale=cfg.scale, reverse=cfg.reverse, shift=0, state_in=initial_state, state_out=final,
        )  # fmt: skip
        return o.view(B, T, H, V), final, locals_ if _dq_shares_segments(H, K, V, q.dtype) else None

    def backward(self, q, k, v, g_gamma, cfg: val.ScanConfig, initial_state, cu_seqlens, do, dht, saved=None):
        """``saved``: forward_saving's, or None (then what it holds is computed again)."""
        if (fallback := self._torch_engine(q, v)) is not None:
            return fallback.backward(q, k, v, g_gamma, cfg, initial_state, cu_seqlens, do, dht)
        B, T, H, K = q.shape
        V = v.shape[-1]
        bounds = sequence_bounds(B, T, cu_seqlens)
        q2, k2, v2, do2 = _rows(q), _rows(k), _rows(v), _rows(do.to(q.dtype))
        g = g_gamma.float().contiguous()
        dq, dk, dv = torch.empty_like(q2), torch.empty_like(k2), torch.empty_like(v2)
        dh0 = torch.empty_like(initial_state, dtype=torch.float32) if initial_state is not None else None
        h0_t = None if initial_state is None else initial_state.transpose(-1, -2)
        # On split sequences dq = scan(do, v, k) folds the forward's local states of (k, v), read transposed, where
        # its segments are the forward's: the eager path saved them (one pass over k and v fewer); the custom op of
        # torch.compile saves nothing (ops.py says why), so _scan computes them as the forward did.
        _scan(
            do2, v2, k2, dq, g, bounds, scale=cfg.scale, reverse=cfg.reverse, shift=0, state_in=h0_t,
            locals_swapped=_dq_shares_segments(H, K, V, q.dtype), saved_locals=saved,
        )  # fmt: skip
        _dkdv(q2, k2, v2, do2, dk, dv, g, bounds, scale=cfg.scale, reverse=not cfg.reverse, dht=dht, dh0=dh0)
        return dq.view(q.shape), dk.view(k.shape), dv.view(v.shape), dh0


def _dq_shares_segments(num_heads: int, dk: int, dv: int, dtype: torch.dtype) -> bool:
    """Whether the backward's dq scan (K and V swapped) plans the forward's segments: as many programs each."""
    return scan_programs_per_segment(num_heads, dk, dv, dtype) == scan_programs_per_segment(num_heads, dv, dk, dtype)


ENGINE = TritonChunkEngine()


def prefill_into_slots(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g_gamma: torch.Tensor,
    scale: float | None,
    cu_seqlens: torch.Tensor | None,
    state_cache: torch.Tensor,
    slot_ids: torch.Tensor,
    use_initial_state: torch.Tensor,
) -> torch.Tensor:
    """Varlen prefill (forward only, no autograd) that reads and writes a slot-indexed state cache in place.

    Sequence n of the packed batch starts from ``state_cache[slot_ids[n]]`` if ``use_initial_state[n]``, else
    from zero, and its final state is written to ``state_cache[slot_ids[n]]`` (cast to the cache's dtype).
    No gather or scatter copies: the kernels index the cache directly. Slots not named are untouched.

    Args:
        q, k: ``[1, T, H, K]``; v: ``[1, T, H, V]`` (fp16/bf16/fp32, one dtype); ``[B, T, ...]`` without cu_seqlens.
        g_gamma: ``[H]`` log-decay per head, ``<= 0``.  scale: multiplies ``q S``; None for ``K ** -0.5``.
        cu_seqlens: int32/int64 ``[N + 1]`` offsets of the packed sequences (read on the host once), or None
            for N = B sequences of T tokens.
        state_cache: ``[num_slots, H, K, V]`` fp32 or bf16, contiguous; updated in place.
        slot_ids: int ``[N]``, distinct slots (two sequences writing one slot would race).
        use_initial_state: bool ``[N]``.

    Returns:
        o ``[B, T, H, V]`` in q's dtype.
    """
    val.check_qkv(q, k, v)
    num_seqs = val.check_cu_seqlens(cu_seqlens, q)
    H, K, V = q.shape[2], q.shape[3], v.shape[3]
    if q.dtype == torch.float64:
        raise TypeError(f"prefill_into_slots supports fp16, bf16 and fp32 inputs, got {val.shape_str(q)}")
    if max(K, V) > MAX_DIM:
        raise ValueError(
            f"prefill_into_slots supports head dims K, V <= {MAX_DIM}, got q {val.shape_str(q)}, v {val.shape_str(v)}"
        )
    val.check_state_cache(state_cache, q, v)
    for name, t, dtypes in (
        ("slot_ids", slot_ids, (torch.int32, torch.int64)),
        ("use_initial_state", use_initial_state, (torch.bool,)),
    ):
        if not isinstance(t, torch.Tensor) or t.dtype not in dtypes or tuple(t.shape) != (num_seqs,):
            got = val.shape_str(t) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a {'/'.join(map(str, dtypes))} tensor of shape [N={num_seqs}], got {got}")
    for name, t in (("slot_ids", slot_ids), ("use_initial_state", use_initial_state)):
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {val.shape_str(t)}")
    g = val.check_g_gamma(g_gamma, H, q.device).contiguous()
    scale = val.check_scale(scale, K)
    B, T = q.shape[:2]
    bounds = sequence_bounds(B, T, cu_seqlens)
    o = torch.empty(B * T, H, V, dtype=q.dtype, device=q.device)
    _scan(
        _rows(q), _rows(k), _rows(v), o, g, bounds, scale=scale, reverse=False, shift=0,
        state_in=state_cache, state_out=state_cache, slots=(slot_ids, use_initial_state),
    )  # fmt: skip
    return o.view(B, T, H, V)
