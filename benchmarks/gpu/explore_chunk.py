"""Design exploration for the chunked Triton engine (device only; notes in benchmarks/results/chunk_NOTES.md).

Answers, at the issue's main shape (4 x 8192 x 32 x 128 bf16) and a few others:
1. ``stream``: how fast the scan's access pattern can go with no math at all (one program per (sequence, head,
   V-block) walking 64-row chunks, reading q, k, v and writing o), for V-blocks of 64 (q, k read twice) and 128.
2. ``fwd``: the forward scan over (V-block, warps, stages, chunk), with registers / spills / shared memory.
3. ``bwd``: the backward's two launches (dq scan, fused dk/dv) alone, in sequence, and on two CUDA streams.
4. ``candidates``: at every benchmark shape, the forward's candidate configs, the backward with the fused dk/dv
   kernel vs two scans, and the segment policy where sequences are split.
5. ``dkdv`` (session 3): the backward's dk/dv routes at every bf16 benchmark shape: the fused kernel (heads up
   to 128), the scan with its transposed twin in one launch (K == V), two scans.
6. ``split`` (session 3): sequences split into segments (few heads): the one-wave segment count against the
   session-2 planner, at 3 stages (one program per SM) and 2 stages (two per SM).
7. ``splitparts``: the split forward's time per pass, for a few block shapes of the local-state pass.
8. ``fp32``: forward configs for fp32 inputs under TF32, each in its own process (tiles of 32 may fault).
9. ``--ncu``: one forward and one backward at the main shape, for Nsight Compute (see run_explore.sh).

    python benchmarks/gpu/explore_chunk.py [stream] [fwd] [bwd] [candidates] [dkdv] [split] [fp32] | --ncu
"""

from __future__ import annotations

import itertools
import sys

import torch
import triton
import triton.language as tl
import triton.testing

from lightning_attention import _validation as val
from lightning_attention import decay
import os

from lightning_attention.engines.triton import _common, chunk_bwd, chunk_scan
from lightning_attention.engines.triton import chunk as chunk_engine
from lightning_attention.engines.triton.chunk import ENGINE, _dkdv, _rows, _scan

MAIN = (4, 8192, 32, 128)
OTHERS = [(4, 2048, 32, 128), (1, 32768, 8, 128), (8, 4096, 16, 64)]


def _time(fn) -> float:
    try:
        return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
    except Exception as e:  # a config that does not compile (e.g. out of shared memory) is skipped
        print(f"    failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}", flush=True)
        return float("inf")


def _inputs(B, T, H, D, dtype=torch.bfloat16):
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(B, T, H, D, device="cuda", dtype=dtype, generator=gen) for _ in range(4))
    return q, k, v, do, decay.g_gamma(H, 2, 8, device="cuda")


def _floor_ms(nbytes: int, bw: float) -> float:
    return nbytes / bw * 1e3


def _kernel_stats(jit_fn) -> str:
    """Registers, spills and shared memory of the most recently compiled variant of ``jit_fn``."""
    try:
        kernels = [k for cache in jit_fn.device_caches.values() for k in cache[0].values()]
        k = kernels[-1]
        return f"regs {k.n_regs} spills {k.n_spills} smem {k.metadata.shared // 1024} KiB"
    except Exception as e:  # diagnostics only
        return f"(stats unavailable: {type(e).__name__})"


@triton.jit
def _stream_kernel(q, k, v, o, T, H, DK: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr, C: tl.constexpr):
    NV: tl.constexpr = DV // BV
    pid = tl.program_id(0)
    i_v, i_h, i_b = pid % NV, (pid // NV) % H, pid // (NV * H)
    o_k, o_v, o_c = tl.arange(0, DK), i_v * BV + tl.arange(0, BV), tl.arange(0, C)
    base = i_b.to(tl.int64) * T * H
    for c in range(0, tl.cdiv(T, C)):
        rows = base + (c * C + o_c) * H + i_h
        b_q = tl.load(q + rows[:, None] * DK + o_k[None, :])
        b_k = tl.load(k + rows[:, None] * DK + o_k[None, :])
        b_v = tl.load(v + rows[:, None] * DV + o_v[None, :])
        extra = tl.sum(b_q.to(tl.float32) + b_k.to(tl.float32), axis=1)
        tl.store(o + rows[:, None] * DV + o_v[None, :], (b_v.to(tl.float32) + extra[:, None]).to(o.dtype.element_ty))


@triton.jit
def _tma_stream_kernel(q_desc, k_desc, v_desc, o_desc, T, H, DK: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr,
                       C: tl.constexpr, STAGES: tl.constexpr):
    """_stream_kernel with TMA loads and stores (host tensor descriptors over [B * T, H * D])."""
    NV: tl.constexpr = DV // BV
    pid = tl.program_id(0)
    i_v, i_h, i_b = pid % NV, (pid // NV) % H, pid // (NV * H)
    for c in tl.range(0, T // C, num_stages=STAGES):
        row = i_b * T + c * C
        b_q = q_desc.load([row, i_h * DK])
        b_k = k_desc.load([row, i_h * DK])
        b_v = v_desc.load([row, i_h * DV + i_v * BV])
        extra = tl.sum(b_q.to(tl.float32) + b_k.to(tl.float32), axis=1)
        o_desc.store([row, i_h * DV + i_v * BV], (b_v.to(tl.float32) + extra[:, None]).to(o_desc.dtype))


@triton.jit
def _tma_scan_kernel(q_desc, k_desc, v_desc, o_desc, g_gamma, scale, T, H, DK: tl.constexpr, DV: tl.constexpr,
                     BV: tl.constexpr, C: tl.constexpr, STAGES: tl.constexpr):
    """The forward scan's loop body (chunk_scan._scan_kernel: dense, forward, no states) with TMA loads/stores:
    does the access path, not the math, set the scan's 1.18x?"""
    NV: tl.constexpr = DV // BV
    pid = tl.program_id(0)
    i_v, i_h, i_b = pid % NV, (pid // NV) % H, pid // (NV * H)
    g = tl.load(g_gamma + i_h)
    state = tl.zeros([DK, BV], dtype=tl.float32)
    mask = _common.intra_decay(g, C)
    for c in tl.range(0, T // C, num_stages=STAGES):
        row = i_b * T + c * C
        q_decay, k_decay, block_decay = _common.chunk_decays(g, c, T, 0, C)
        b_q = q_desc.load([row, i_h * DK])
        b_k = k_desc.load([row, i_h * DK])
        b_v = v_desc.load([row, i_h * DV + i_v * BV])
        s_low = state.to(b_v.dtype)
        v_weighted = (b_v * k_decay[:, None]).to(b_v.dtype)
        state = _common.mma(tl.trans(b_k), v_weighted, "tf32", state * block_decay)
        b_o = _common.mma(b_q, s_low, "tf32")
        scores = _common.mma(b_q, tl.trans(b_k), "tf32")
        b_o = _common.mma((scores * mask).to(b_v.dtype), b_v, "tf32", b_o * q_decay[:, None])
        o_desc.store([row, i_h * DV + i_v * BV], (b_o * scale).to(o_desc.dtype))


def explore_tma(bw: float) -> None:
    """TMA (host tensor descriptors) against the pointer loads: the no-math stream and the forward scan body."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    B, T, H, D = MAIN
    q, k, v, _, g = _inputs(B, T, H, D)
    o, o_ref = torch.empty_like(v), torch.empty_like(v)
    floor = _floor_ms(4 * q.numel() * q.element_size(), bw)
    flat = lambda t: t.view(B * T, H * D)  # noqa: E731
    cfg = val.ScanConfig(scale=D**-0.5)
    o_ref = ENGINE.forward(q, k, v, g, cfg, None, None)[0]
    print(f"== TMA {B}x{T}x{H}x{D} bf16, floor {floor:.3f} ms; engine forward {_time(lambda: ENGINE.forward(q, k, v, g, cfg, None, None)):.3f}", flush=True)
    for bv, warps, stages in itertools.product((64, 128), (4, 8), (2, 3, 4)):
        qd, kd = TensorDescriptor.from_tensor(flat(q), [64, D]), TensorDescriptor.from_tensor(flat(k), [64, D])
        vd, od = TensorDescriptor.from_tensor(flat(v), [64, bv]), TensorDescriptor.from_tensor(flat(o), [64, bv])
        grid = (B * H * (D // bv),)
        args = dict(DK=D, DV=D, BV=bv, C=64, STAGES=stages, num_warps=warps)
        t_stream = _time(lambda: _tma_stream_kernel[grid](qd, kd, vd, od, T, H, **args))
        t_scan = _time(lambda: _tma_scan_kernel[grid](qd, kd, vd, od, g, cfg.scale, T, H, **args))
        diff = ((o.float() - o_ref.float()).norm() / o_ref.float().norm()).item()
        print(f"  BV={bv} warps={warps} stages={stages}: stream {t_stream:.3f} ms ({t_stream / floor:.2f}x), "
              f"scan {t_scan:.3f} ms ({t_scan / floor:.2f}x, diff vs engine {diff:.1e})  {_kernel_stats(_tma_scan_kernel)}", flush=True)


def explore_stream(bw: float) -> None:
    B, T, H, D = MAIN
    q, k, v, _, _ = _inputs(B, T, H, D)
    o = torch.empty_like(v)
    floor = _floor_ms(4 * q.numel() * q.element_size(), bw)
    print(f"== stream (no math) {B}x{T}x{H}x{D} bf16, floor {floor:.3f} ms", flush=True)
    for bv, warps, stages in itertools.product((64, 128), (4, 8), (1, 2, 3)):
        grid = (B * H * (D // bv),)
        ms = _time(lambda: _stream_kernel[grid](q, k, v, o, T, H, DK=D, DV=D, BV=bv, C=64, num_warps=warps, num_stages=stages))
        print(f"  BV={bv} warps={warps} stages={stages}: {ms:.3f} ms = {ms / floor:.2f}x floor  {_kernel_stats(_stream_kernel)}", flush=True)


def explore_fwd(bw: float) -> None:
    cfg = val.ScanConfig(scale=128**-0.5)
    default = chunk_scan.scan_config
    for shape in [MAIN] + OTHERS:
        B, T, H, D = shape
        q, k, v, _, g = _inputs(B, T, H, D)
        floor = _floor_ms(4 * q.numel() * q.element_size(), bw)
        print(f"== fwd {B}x{T}x{H}x{D} bf16, floor {floor:.3f} ms; default {default(D, D, q.dtype)}", flush=True)
        configs = itertools.product((64, 128), (4, 8), (1, 2, 3), (64, 128))
        if shape != MAIN:  # the main shape's sweep picks the candidates; here the plausible ones
            configs = [(64, 4, 3, 64), (64, 8, 3, 64), (64, 4, 1, 64), (128, 8, 2, 64), (64, 8, 2, 128), (128, 8, 2, 128)]
        for bv, warps, stages, chunk in configs:
            if bv > _common.block_dim(D):
                continue
            conf = chunk_scan.ScanConfig(bv, warps, stages, chunk)
            chunk_scan.scan_config = lambda dk, dv, dt, conf=conf: conf
            ms = _time(lambda: ENGINE.forward(q, k, v, g, cfg, None, None))
            print(f"  {conf}: {ms:.3f} ms = {ms / floor:.2f}x  {_kernel_stats(chunk_scan._scan_kernel)}", flush=True)
        for pps in (2.0, 4.0):
            _common.POLICY = _common.SegmentPolicy(pps)
            for bv in (64, 128):
                conf = chunk_scan.ScanConfig(bv, 8, 2 if bv == 128 else 3)
                chunk_scan.scan_config = lambda dk, dv, dt, conf=conf: conf
                ms = _time(lambda: ENGINE.forward(q, k, v, g, cfg, None, None))
                print(f"  policy {pps} {conf}: {ms:.3f} ms = {ms / floor:.2f}x", flush=True)
        _common.POLICY = _common.SegmentPolicy()
        chunk_scan.scan_config = default


def explore_bwd(bw: float) -> None:
    cfg = val.ScanConfig(scale=128**-0.5)
    side = torch.cuda.Stream()
    for shape in [MAIN] + OTHERS:
        B, T, H, D = shape
        q, k, v, do, g = _inputs(B, T, H, D)
        floor = _floor_ms(7 * q.numel() * q.element_size(), bw)
        bounds = _common.sequence_bounds(B, T, None)
        q2, k2, v2, do2 = _rows(q), _rows(k), _rows(v), _rows(do)
        dq, dk, dv = torch.empty_like(q2), torch.empty_like(k2), torch.empty_like(v2)
        s = cfg.scale

        def dq_scan():
            _scan(do2, v2, k2, dq, g, bounds, scale=s, reverse=False, shift=0, state_in=None)

        def dkdv():
            _dkdv(q2, k2, v2, do2, dk, dv, g, bounds, scale=s, reverse=True, dht=None, dh0=None)

        def both_streams():
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                dq_scan()
            dkdv()
            torch.cuda.current_stream().wait_stream(side)

        t_dq, t_dkdv = _time(dq_scan), _time(dkdv)
        t_seq = _time(lambda: ENGINE.backward(q, k, v, g, cfg, None, None, do, None))
        t_par = _time(both_streams)
        print(f"== bwd {B}x{T}x{H}x{D} bf16 (floor {floor:.3f} ms): dq {t_dq:.3f}, dkdv {t_dkdv:.3f}, engine {t_seq:.3f}, "
              f"two streams {t_par:.3f} ms  {_kernel_stats(chunk_bwd._dkdv_kernel)}", flush=True)
        if shape == MAIN:
            default = chunk_bwd.dkdv_config
            for warps, stages, chunk in itertools.product((4, 8), (1, 2, 3), (64, 128)):
                conf = chunk_bwd.DkDvConfig(warps, stages, chunk)
                chunk_bwd.dkdv_config = lambda dk_, dv_, dt, conf=conf: conf
                print(f"  dkdv {conf}: {_time(dkdv):.3f} ms  {_kernel_stats(chunk_bwd._dkdv_kernel)}", flush=True)
            chunk_bwd.dkdv_config = default


def explore_candidates(bw: float) -> None:
    from lightning_attention.bench import SHAPES

    cfg = val.ScanConfig(scale=128**-0.5)
    default_scan, default_fused = chunk_scan.scan_config, chunk_engine.use_fused_dkdv
    only = os.environ.get("SHAPES")  # e.g. "4x8192x32x128:bfloat16,2x8192x16x256:bfloat16"
    for B, T, H, D, dtype in SHAPES:
        if only and f"{B}x{T}x{H}x{D}:{str(dtype)[6:]}" not in only.split(","):
            continue
        q, k, v, do, g = _inputs(B, T, H, D, dtype)
        nbytes = q.numel() * q.element_size()
        ffwd, fbwd = _floor_ms(4 * nbytes, bw), _floor_ms(7 * nbytes, bw)
        print(f"== {B}x{T}x{H}x{D} {dtype}: floors fwd {ffwd:.3f} bwd {fbwd:.3f} ms; default {default_scan(D, D, dtype)}", flush=True)
        fwd = lambda: ENGINE.forward(q, k, v, g, cfg, None, None)  # noqa: E731
        bwd = lambda: ENGINE.backward(q, k, v, g, cfg, None, None, do, None)  # noqa: E731
        configs = [tuple(map(int, c.split("/"))) for c in os.environ.get("CONFIGS", "64/4/2,64/4/3,64/8/3,64/4/1,64/8/1").split(",")]
        for bv, warps, stages in configs:
            if bv > _common.block_dim(D):
                continue
            conf = chunk_scan.ScanConfig(bv, warps, stages)
            chunk_scan.scan_config = lambda dk, dv, dt, conf=conf: conf
            ms = _time(fwd)
            print(f"  fwd {conf}: {ms:.3f} ms = {ms / ffwd:.2f}x  {_kernel_stats(chunk_scan._scan_kernel)}", flush=True)
        chunk_scan.scan_config = default_scan
        print(f"  fwd default: {_time(fwd):.3f} ms; bwd default: {_time(bwd):.3f} ms", flush=True)
        if max(_common.block_dim(D), 64) <= 128:
            for fused in (True, False):
                chunk_engine.use_fused_dkdv = lambda dk, dv, fused=fused: fused
                ms = _time(bwd)
                print(f"  bwd {'fused dk/dv' if fused else 'two scans'}: {ms:.3f} ms = {ms / fbwd:.2f}x", flush=True)
            chunk_engine.use_fused_dkdv = default_fused
        if B * H <= 16:
            for pps in (1.0, 1.5, 2.0):
                _common.POLICY = _common.SegmentPolicy(pps)
                print(f"  policy {pps}: fwd {_time(fwd):.3f} ms bwd {_time(bwd):.3f} ms", flush=True)
            _common.POLICY = _common.SegmentPolicy()
        del q, k, v, do
        torch.cuda.empty_cache()


def explore_dkdv(bw: float) -> None:
    from lightning_attention.bench import SHAPES

    cfg = val.ScanConfig(scale=128**-0.5)
    defaults = chunk_engine.use_fused_dkdv, chunk_engine.PAIRED_DKDV
    routes = {"fused": (True, False), "paired": (False, True), "two scans": (False, False)}
    for B, T, H, D, dtype in SHAPES:
        if dtype != torch.bfloat16:
            continue
        q, k, v, do, g = _inputs(B, T, H, D, dtype)
        fbwd = _floor_ms(7 * q.numel() * q.element_size(), bw)
        bounds = _common.sequence_bounds(B, T, None)
        q2, k2, v2, do2 = _rows(q), _rows(k), _rows(v), _rows(do)
        dq, dk, dv = torch.empty_like(q2), torch.empty_like(k2), torch.empty_like(v2)
        s = cfg.scale
        t_dq = _time(lambda: _scan(do2, v2, k2, dq, g, bounds, scale=s, reverse=False, shift=0, state_in=None))
        line = f"== dkdv {B}x{T}x{H}x{D}: bwd floor {fbwd:.3f} ms, dq scan {t_dq:.3f}"
        for name, (fused, paired) in routes.items():
            if fused and _common.block_dim(D) > 128:
                continue
            chunk_engine.use_fused_dkdv = lambda dk_, dv_, fused=fused: fused
            chunk_engine.PAIRED_DKDV = paired
            t = _time(lambda: _dkdv(q2, k2, v2, do2, dk, dv, g, bounds, scale=s, reverse=True, dht=None, dh0=None))
            t_bwd = _time(lambda: ENGINE.backward(q, k, v, g, cfg, None, None, do, None))
            line += f" | {name}: dkdv {t:.3f}, bwd {t_bwd:.3f} ({t_bwd / fbwd:.2f}x)"
        chunk_engine.use_fused_dkdv, chunk_engine.PAIRED_DKDV = defaults
        print(line, flush=True)
        del q, k, v, do, q2, k2, v2, do2, dq, dk, dv
        torch.cuda.empty_cache()


def _session2_segment_tokens(lengths, programs_per_segment, sms, chunk, policy):
    """The planner before session 3: ceil(chunks x programs / SMs) chunks per segment (9 segments of 16
    programs at 1 x 32768 x 8 heads: 144 programs on 132 SMs)."""
    import math

    chunks = [math.ceil(n / chunk) for n in lengths]
    total, longest = sum(chunks), max(chunks, default=0)
    fair = max(1, math.ceil(total * programs_per_segment / max(1, int(sms * policy.programs_per_sm))))
    return 0 if longest <= 2 * fair else fair * chunk


def explore_split(bw: float) -> None:
    cfg = val.ScanConfig(scale=128**-0.5)
    default_scan, default_tokens = chunk_scan.scan_config, _common._segment_tokens
    for B, T, H, D in [(1, 32768, 8, 128), (1, 131072, 8, 128), (1, 8192, 32, 128), (2, 16384, 4, 128)]:
        q, k, v, do, g = _inputs(B, T, H, D)
        nbytes = q.numel() * q.element_size()
        ffwd, fbwd = _floor_ms(4 * nbytes, bw), _floor_ms(7 * nbytes, bw)
        print(f"== split {B}x{T}x{H}x{D}: floors fwd {ffwd:.3f} bwd {fbwd:.3f} ms", flush=True)
        for planner, tokens in (("one-wave", default_tokens), ("session-2", _session2_segment_tokens)):
            for stages, per_sm in ((3, 1.0), (2, 2.0), (2, 1.0)):
                _common._segment_tokens = tokens
                _common.POLICY = _common.SegmentPolicy(per_sm)
                _common._plan.cache_clear()
                conf = chunk_scan.ScanConfig(64, 4, stages)
                chunk_scan.scan_config = lambda dk, dv, dt, conf=conf: conf
                plan = _common.plan_segments(_common.sequence_bounds(B, T, None), H * 2, q.device)
                t_f = _time(lambda: ENGINE.forward(q, k, v, g, cfg, None, None))
                t_b = _time(lambda: ENGINE.backward(q, k, v, g, cfg, None, None, do, None))
                print(f"  {planner:9s} stages {stages} programs/SM {per_sm}: {plan.num_segments} segments; "
                      f"fwd {t_f:.3f} ({t_f / ffwd:.2f}x) bwd {t_b:.3f} ({t_b / fbwd:.2f}x)", flush=True)
        _common._segment_tokens, _common.POLICY = default_tokens, _common.SegmentPolicy()
        chunk_scan.scan_config = default_scan
        _common._plan.cache_clear()
        del q, k, v, do
        torch.cuda.empty_cache()


def explore_configs(bw: float) -> None:
    """Forward and backward (every scan of both with the same configuration) per scan config BV/warps/stages/chunk
    (env CONFIGS), at the shapes of env SHAPES (default: the main one and 8x4096x16x64)."""
    cfg = val.ScanConfig(scale=128**-0.5)
    default = chunk_scan.scan_config
    shapes = os.environ.get("SHAPES", "4x8192x32x128,8x4096x16x64").split(",")
    configs = os.environ.get("CONFIGS", "64/4/3/64,128/8/2/32,128/8/3/32,64/4/3/32,64/4/4/32,64/4/2/32").split(",")
    for shape in shapes:
        B, T, H, D = map(int, shape.split("x"))
        q, k, v, do, g = _inputs(B, T, H, D)
        nbytes = q.numel() * q.element_size()
        ffwd, fbwd = _floor_ms(4 * nbytes, bw), _floor_ms(7 * nbytes, bw)
        print(f"== configs {shape} bf16: floors fwd {ffwd:.3f} bwd {fbwd:.3f} ms", flush=True)
        ref = ENGINE.forward(q, k, v, g, cfg, None, None)[0]
        for conf, tma in itertools.product(configs, os.environ.get("TMA", "1").split(",")):
            bv, warps, stages, chunk, *tma_stages = map(int, conf.split("/"))
            if bv > _common.block_dim(D):
                continue
            c = chunk_scan.ScanConfig(bv, warps, stages, chunk, *tma_stages)
            chunk_scan.scan_config = lambda dk, dv, dt, c=c: c
            chunk_scan.TMA = tma == "1"
            out = ENGINE.forward(q, k, v, g, cfg, None, None)[0]
            diff = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            t_f = _time(lambda: ENGINE.forward(q, k, v, g, cfg, None, None))
            stats = _kernel_stats(chunk_scan._scan_kernel)
            t_b = _time(lambda: ENGINE.backward(q, k, v, g, cfg, None, None, do, None))
            print(f"  {conf} TMA={tma}: fwd {t_f:.3f} ({t_f / ffwd:.2f}x) bwd {t_b:.3f} ({t_b / fbwd:.2f}x) "
                  f"fwd+bwd {t_f + t_b:.3f}  diff {diff:.1e}  {stats}", flush=True)
        chunk_scan.scan_config, chunk_scan.TMA = default, True
        del q, k, v, do
        torch.cuda.empty_cache()


def _kernel_times(fn, reps: int = 20) -> str:
    """Mean CUDA time per call of each kernel ``fn`` launches (torch.profiler), e.g. the split path's passes."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    rows = [e for e in prof.key_averages() if e.device_type.name == "CUDA" and e.count >= reps]
    return ", ".join(f"{e.key[:28]} {e.device_time_total / reps / 1e3:.3f}" for e in rows)


def explore_split_parts(bw: float) -> None:
    """Where the split forward's time goes: local states (pass 1), state passing (pass 2), the scan (pass 3),
    for a few pass-1 block shapes."""
    from lightning_attention.engines.triton import chunk_state

    cfg = val.ScanConfig(scale=128**-0.5)
    names = ("_STATE_BLOCK_K", "_STATE_BLOCK_V", "_LOCAL_WARPS", "_LOCAL_STAGES")
    default = tuple(getattr(chunk_state, n) for n in names)
    configs = [tuple(map(int, c.split("/"))) for c in os.environ.get("LOCAL_CONFIGS", "64/32/4/2").split(",")]
    for B, T, H, D in [(1, 32768, 8, 128), (1, 131072, 8, 128), (2, 16384, 4, 128)]:
        q, k, v, do, g = _inputs(B, T, H, D)
        nbytes = q.numel() * q.element_size()
        ffwd, fbwd = _floor_ms(4 * nbytes, bw), _floor_ms(7 * nbytes, bw)
        print(f"== split parts {B}x{T}x{H}x{D}: floors fwd {ffwd:.3f} (k, v pass {ffwd / 2:.3f}) bwd {fbwd:.3f} ms", flush=True)
        for conf in configs:
            for n, value in zip(names, conf):
                setattr(chunk_state, n, value)
            fwd = lambda: ENGINE.forward(q, k, v, g, cfg, None, None)  # noqa: E731
            t_b = _time(lambda: ENGINE.backward(q, k, v, g, cfg, None, None, do, None))
            print(f"  pass-1 {'/'.join(map(str, conf))} (BK/BV/warps/stages): fwd {_time(fwd):.3f} ms, bwd {t_b:.3f}; "
                  f"fwd kernels (ms) {_kernel_times(fwd)}", flush=True)
        for n, value in zip(names, default):
            setattr(chunk_state, n, value)
        del q, k, v, do
        torch.cuda.empty_cache()


FP32_CONFIGS = ["64/8/1/64", "64/4/1/64", "64/8/1/32", "64/4/2/32", "32/8/1/32", "32/4/2/32", "32/8/2/64", "32/4/1/32"]


def explore_fp32(bw: float) -> None:
    import subprocess

    for conf in os.environ.get("FP32_CONFIGS", ",".join(FP32_CONFIGS)).split(","):
        proc = subprocess.run([sys.executable, __file__, "fp32one", conf], capture_output=True, text=True, timeout=120)
        out = (proc.stdout.strip().splitlines() or [""])[-1]
        print(f"  fp32 {conf}: {out if proc.returncode == 0 else 'FAILED ' + proc.stderr.strip()[-200:]}", flush=True)


def fp32_one(conf: str) -> None:
    """One fp32 forward config at the main shape under TF32 (precision "high"), checked against the default."""
    from lightning_attention.bench import copy_bandwidth

    torch.set_float32_matmul_precision("high")
    bv, warps, stages, chunk = map(int, conf.split("/"))
    cfg = val.ScanConfig(scale=128**-0.5)
    q, k, v, _, g = _inputs(*MAIN, dtype=torch.float32)
    ref, _ = ENGINE.forward(q, k, v, g, cfg, None, None)
    conf_ = chunk_scan.ScanConfig(bv, warps, stages, chunk)
    chunk_scan.scan_config = lambda dk, dv, dt: conf_
    out, _ = ENGINE.forward(q, k, v, g, cfg, None, None)
    err = ((out - ref).norm() / ref.norm()).item()
    ms = _time(lambda: ENGINE.forward(q, k, v, g, cfg, None, None))
    floor = _floor_ms(4 * q.numel() * 4, copy_bandwidth())
    print(f"fwd {ms:.3f} ms = {ms / floor:.2f}x floor, rel diff vs default {err:.1e}  {_kernel_stats(chunk_scan._scan_kernel)}")


def ncu_target() -> None:
    cfg = val.ScanConfig(scale=128**-0.5)
    q, k, v, do, g = _inputs(*MAIN)
    ENGINE.forward(q, k, v, g, cfg, None, None)
    ENGINE.backward(q, k, v, g, cfg, None, None, do, None)
    torch.cuda.synchronize()


def main() -> None:
    if "--ncu" in sys.argv:
        return ncu_target()
    if sys.argv[1:2] == ["fp32one"]:
        return fp32_one(sys.argv[2])
    from lightning_attention.bench import copy_bandwidth

    bw = copy_bandwidth()
    if os.environ.get("F32_PRECISION"):  # "highest" (tf32x3) or "high" (tf32) for fp32 inputs
        torch.set_float32_matmul_precision(os.environ["F32_PRECISION"])
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    steps = sys.argv[1:] or ["stream", "fwd", "bwd"]
    for step in steps:
        steps_fns = {
            "stream": explore_stream, "fwd": explore_fwd, "bwd": explore_bwd, "candidates": explore_candidates,
            "dkdv": explore_dkdv, "split": explore_split, "fp32": explore_fp32, "splitparts": explore_split_parts,
            "configs": explore_configs, "tma": explore_tma,
        }  # fmt: skip
        steps_fns[step](bw)


if __name__ == "__main__":
    main()
