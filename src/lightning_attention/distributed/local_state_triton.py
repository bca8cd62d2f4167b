"""Triton kernel for a shard's decay-weighted outer-product sum (see local_state.py for the math).

    out[b, h] = sum_j w_j a[b, j, h]^T c[b, j, h],   w_j = exp(g[h] * e_j), e_j = base + j (ASCENDING) or base - j
                                                     or (PER_TOKEN) w_j = w[b, j, h] given

a ``[B, L, H, K]``, c ``[B, L, H, V]`` contiguous, fp16/bf16; w ``[B, L, H]`` fp32; out ``[B, H, K, V]`` fp32.

One program per (segment of tokens, batch x head, K-block x V-block): it walks its segment BT tokens at a
time, accumulating ``(a * w)^T c`` in fp32 (``a * w`` rounded to the input dtype for the tensor-core
product, as the chunked kernels round their decayed operands); the per-segment partials are summed after.
Segments exist only to fill the GPU when B * H is small (one long sequence per rank is the point of context
parallelism). With a constant decay, tokens whose fp32 weight is exactly 0 (``g * e_j < -104``) are neither read
nor added: for a decaying head the work is a window at one end of the shard, and the sum is unchanged. Per-token
weights are known only once read, so every token is read (one pass over the run's a and c).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lightning_attention.engines.triton._common import cdiv, dot_precision, mma, next_power_of_2, sm_count

__all__ = ["triton_decayed_outer_sum", "triton_weighted_outer_sum"]

#: exp(-x) is 0 in fp32 for x > ~103.97 (below the smallest denormal); 110 leaves a margin for rounding.
UNDERFLOW = 110.0
#: Programs to aim for per SM when splitting the tokens into segments ...
PROGRAMS_PER_SM = 4
#: ... and the longest segment: with decaying heads most programs find nothing to do, so the few heads that
#: decay slowly (g = 0: every token) must still be spread over many programs. Partials: fp32 K x V per segment.
MAX_SEGMENT = 4096
BLOCK_T = 64


@triton.jit
def decayed_outer_sum_kernel(
    a_ptr, c_ptr, g_ptr, w_ptr, out_ptr, L, base, seg_len,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    ASCENDING: tl.constexpr, PER_TOKEN: tl.constexpr, CUTOFF: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    i_s, i_bh, i_kv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    i_k, i_v = i_kv // tl.cdiv(V, BV), i_kv % tl.cdiv(V, BV)
    start = i_s * seg_len
    end = tl.minimum(start + seg_len, L)
    if not PER_TOKEN:
        g = tl.load(g_ptr + i_h).to(tl.float32)
        # Keep only tokens with g * e_j >= -CUTOFF, i.e. e_j <= reach (reach ~1e32 when g == 0: nothing skipped).
        reach = CUTOFF / tl.maximum(-g, 1e-30)
        if ASCENDING:  # e_j = base + j  ->  j <= reach - base
            end = tl.minimum(end.to(tl.float32), tl.floor(reach - base) + 1.0).to(tl.int32)
        else:  # e_j = base - j  ->  j >= base - reach
            start = tl.maximum(start.to(tl.float32), tl.ceil(base - reach)).to(tl.int32)

    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    p_a = a_ptr + i_b.to(tl.int64) * L * H * K + i_h * K
    p_c = c_ptr + i_b.to(tl.int64) * L * H * V + i_h * V
    p_w = w_ptr + i_b.to(tl.int64) * L * H + i_h
    b_acc = tl.zeros([BK, BV], dtype=tl.float32)
    for t0 in range(start, end, BT):
        o_t = t0 + tl.arange(0, BT)
        m_t = o_t < end
        rows = o_t.to(tl.int64)
        b_a = tl.load(p_a + rows[:, None] * (H * K) + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_c = tl.load(p_c + rows[:, None] * (H * V) + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
        if PER_TOKEN:
            b_w = tl.load(p_w + rows * H, mask=m_t, other=0.0)
        else:
            if ASCENDING:
                e = base + o_t.to(tl.float32)
            else:
                e = base - o_t.to(tl.float32)
            # Select, never multiply: past the shard e_j can be negative and exp(g * e_j) inf. The clamp keeps
            # those masked lanes finite too (no overflow, no inf even in the discarded branch).
            b_w = tl.where(m_t, tl.exp(g * tl.maximum(e, 0.0)), 0.0)
        b_aw = (b_a.to(tl.float32) * b_w[:, None]).to(b_c.dtype)
        b_acc += mma(tl.trans(b_aw), b_c, PRECISION)
    p_out = out_ptr + (i_s * tl.num_programs(1) + i_bh).to(tl.int64) * K * V
    tl.store(p_out + o_k[:, None] * V + o_v[None, :], b_acc, mask=m_k[:, None] & m_v[None, :])


def triton_decayed_outer_sum(
    a: torch.Tensor, c: torch.Tensor, g: torch.Tensor, base: int, ascending: bool
) -> torch.Tensor:
    """a ``[B, L, H, K]``, c ``[B, L, H, V]`` (fp16/bf16, L >= 1), g ``[H]`` -> fp32 ``[B, H, K, V]``."""
    return _launch(a, c, g=g.float().contiguous(), base=base, ascending=ascending)


def triton_weighted_outer_sum(a: torch.Tensor, c: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """a ``[B, L, H, K]``, c ``[B, L, H, V]`` (fp16/bf16, L >= 1), w ``[B, L, H]`` -> fp32 ``[B, H, K, V]``."""
    return _launch(a, c, w=w.float().contiguous())


def _launch(a, c, g=None, base: int = 0, ascending: bool = True, w=None) -> torch.Tensor:
    """One of the two weightings: ``g`` (constant decay, with ``base`` and ``ascending``) or ``w`` (per token)."""
    B, L, H, K = a.shape
    V = c.shape[-1]
    a, c = a.contiguous(), c.contiguous()
    BK = max(16, min(128, next_power_of_2(K)))
    BV = max(16, min(128, next_power_of_2(V)))
    tiles = cdiv(K, BK) * cdiv(V, BV)
    wanted = cdiv(PROGRAMS_PER_SM * sm_count(a.device), B * H * tiles)
    seg_len = cdiv(cdiv(L, max(1, min(wanted, cdiv(L, BLOCK_T)))), BLOCK_T) * BLOCK_T
    seg_len = min(seg_len, MAX_SEGMENT)
    segments = cdiv(L, seg_len)
    partial = torch.empty(segments, B * H, K, V, dtype=torch.float32, device=a.device)
    per_token = w is not None
    decayed_outer_sum_kernel[(segments, B * H, tiles)](
        a, c, w if per_token else g, w if per_token else g, partial, L, float(base), seg_len,
        H=H, K=K, V=V, BT=BLOCK_T, BK=BK, BV=BV, ASCENDING=ascending, PER_TOKEN=per_token, CUTOFF=UNDERFLOW,
        PRECISION=dot_precision(a.dtype),
        num_warps=8 if BK * BV >= 128 * 64 else 4,
    )  # fmt: skip
    return partial.sum(0).view(B, H, K, V)
