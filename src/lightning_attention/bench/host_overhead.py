"""Host (Python) overhead of the public chunked op on CUDA: where the time goes when the GPU work is small.

Prints, at one small shape: do_bench medians of the op and of the engine alone, the host time to enqueue one
call (no synchronisation: if it exceeds the GPU time, the op is host-bound), and a cProfile of 200 calls.
``--tma-ab``: instead, the host time of each launch of the forward and backward with TMA loads on and off,
alternating in one process (rounds of 200 calls; separate processes differed by up to 60 us on the device host).
``--autograd``: where the eager op's fwd+bwd spends host time beyond its engine calls: the backward's own time
measured inside it (PyTorch runs it in its autograd worker thread), against the same engine call from the main
thread, and a cProfile taken in that worker thread.

    python benchmarks/bench_host_overhead.py [--tma-ab | --autograd] [BxTxHxD ...]   (default 8x4096x16x64)

A diagnostic: it prints and writes no result file.
"""

from __future__ import annotations

import cProfile
import dataclasses
import pstats
import sys
import time

import torch
import triton.testing

from lightning_attention import _validation as val
from lightning_attention import decay
from lightning_attention.engines.triton.chunk import ENGINE
from lightning_attention.ops import chunk_simple_gla


def _enqueue_us(fn, n=200) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - start) / n * 1e6
    torch.cuda.synchronize()
    return host


def _inputs(B: int, T: int, H: int, D: int):
    """bf16 q, k, v, do ``[B, T, H, D]``, g_gamma, the engine's ScanConfig, and leaf copies of q, k, v."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(4))
    g = decay.g_gamma(H, 2, 8, device="cuda")
    leaves = tuple(t.clone().requires_grad_() for t in (q, k, v))
    return q, k, v, do, g, val.ScanConfig(scale=D**-0.5), leaves


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    modes = {"--tma-ab": tma_ab, "--autograd": autograd_thread}
    run = next((modes[a] for a in argv if a in modes), profile_shape)
    for shape in [a for a in argv if a not in modes] or ["8x4096x16x64"]:
        run(*map(int, shape.split("x")))
    return 0


def autograd_thread(B: int, T: int, H: int, D: int, n: int = 200) -> None:
    """Host time of the eager op's fwd+bwd split into: the forward call, the backward's body (timed inside it,
    in autograd's thread), and the rest (autograd's engine around it); the engine's backward from the main thread
    for comparison; then a cProfile of the backward's body in the worker thread."""
    from lightning_attention import ops

    q, k, v, do, g, cfg, (qg, kg, vg) = _inputs(B, T, H, D)
    inner, profiler = [], [None]
    body = ops._EagerScan.backward

    def timed_backward(ctx, *grads):
        if profiler[0] is not None:
            profiler[0].enable()
        start = time.perf_counter()
        result = body(ctx, *grads)
        inner.append(time.perf_counter() - start)
        if profiler[0] is not None:
            profiler[0].disable()
        return result

    ops._EagerScan.backward = staticmethod(timed_backward)
    try:
        fwd = lambda: chunk_simple_gla(qg, kg, vg, g_gamma=g, backend="triton")[0]  # noqa: E731
        fwd_bwd = lambda: torch.autograd.grad(fwd(), (qg, kg, vg), do)  # noqa: E731
        print(f"{torch.cuda.get_device_name()} {B}x{T}x{H}x{D} bf16: host us per call ({n} calls)")
        print(f"  op fwd (requires_grad)      {_enqueue_us(fwd, n):8.1f}")
        inner.clear()
        total = _enqueue_us(fwd_bwd, n)
        body_us = sum(inner[1:]) / max(len(inner) - 1, 1) * 1e6  # (the first call is _enqueue_us's warm-up)
        print(f"  op fwd+bwd                  {total:8.1f}   of which the backward's body {body_us:8.1f}")
        engine_bwd = lambda: ENGINE.backward(q, k, v, g, cfg, None, None, do, None)  # noqa: E731
        print(f"  engine bwd, main thread     {_enqueue_us(engine_bwd, n):8.1f}")
        profiler[0] = cProfile.Profile()
        for _ in range(n):
            fwd_bwd()
        torch.cuda.synchronize()
        print(f"== cProfile of the backward's body in autograd's thread, {n} calls, by own time")
        pstats.Stats(profiler[0]).sort_stats("tottime").print_stats(18)
    finally:
        ops._EagerScan.backward = staticmethod(body)


def tma_ab(B: int, T: int, H: int, D: int, rounds: int = 5) -> None:
    """Host enqueue time per call with TMA on / off, alternating, median of ``rounds`` rounds; then a cProfile
    of the backward's paired launch with TMA on, by cumulative time (Triton's launch path included)."""
    from lightning_attention.engines.triton import chunk, options
    from lightning_attention.engines.triton._common import sequence_bounds

    q, k, v, do, g, cfg, (qg, kg, vg) = _inputs(B, T, H, D)
    rows = [t.reshape(-1, H, D) for t in (q, k, v, do)]
    outs = [torch.empty_like(rows[0]) for _ in range(3)]
    bounds = sequence_bounds(B, T, None)
    common = dict(scale=1.0, k_scale=cfg.scale, reverse=True, shift=1, state_in=None)
    cases = {
        "engine fwd": lambda: ENGINE.forward(q, k, v, g, cfg, None, None),
        "engine bwd": lambda: ENGINE.backward(q, k, v, g, cfg, None, None, do, None),
        "dq scan": lambda: chunk._scan(rows[3], rows[2], rows[1], outs[0], g, bounds, scale=cfg.scale,
                                       reverse=False, shift=0, state_in=None),
        "dk/dv launch": lambda: chunk._scan(rows[1], rows[0], rows[3], outs[1], g, bounds, **common,
                                            transposed=(rows[2], outs[2])),
        "op fwd+bwd": lambda: torch.autograd.grad(
            chunk_simple_gla(qg, kg, vg, g_gamma=g, backend="triton")[0], (qg, kg, vg), do
        ),
    }  # fmt: skip
    shipped = options.OPTIONS
    times = {(name, tma): [] for name in cases for tma in (True, False)}
    for _ in range(rounds):
        for tma in (True, False):
            options.OPTIONS = shipped if tma else dataclasses.replace(shipped, tma_head_dims=())
            for name, fn in cases.items():
                times[name, tma].append(_enqueue_us(fn))
    options.OPTIONS = shipped
    print(f"{torch.cuda.get_device_name()} {B}x{T}x{H}x{D} bf16: host enqueue per call (us), median of {rounds}")
    for name in cases:
        on, off = (sorted(times[name, tma])[rounds // 2] for tma in (True, False))
        print(f"  {name:14s} TMA {on:8.1f}   pointers {off:8.1f}")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(200):
        cases["dk/dv launch"]()
    prof.disable()
    torch.cuda.synchronize()
    print("== cProfile, 200 x the paired dk/dv launch with TMA, by cumulative time")
    pstats.Stats(prof).sort_stats("cumulative").print_stats(25)


def profile_shape(B: int, T: int, H: int, D: int) -> None:
    q, k, v, do, g, cfg, (qg, kg, vg) = _inputs(B, T, H, D)
    cases = {
        "engine fwd": lambda: ENGINE.forward(q, k, v, g, cfg, None, None),
        "op fwd (no grad)": lambda: chunk_simple_gla(q, k, v, g_gamma=g, backend="triton"),
        "op fwd (requires_grad)": lambda: chunk_simple_gla(qg, kg, vg, g_gamma=g, backend="triton"),
        "engine bwd": lambda: ENGINE.backward(q, k, v, g, cfg, None, None, do, None),
        "op fwd+bwd": lambda: torch.autograd.grad(chunk_simple_gla(qg, kg, vg, g_gamma=g, backend="triton")[0], (qg, kg, vg), do),
    }
    print(f"{torch.cuda.get_device_name()} {B}x{T}x{H}x{D} bf16")
    for name, fn in cases.items():
        ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        print(f"  {name:24s} do_bench {ms * 1e3:8.1f} us   host enqueue {_enqueue_us(fn):8.1f} us", flush=True)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as tprof:
        for _ in range(50):
            cases["op fwd+bwd"]()
        torch.cuda.synchronize()
    print("== torch.profiler, 50 x op fwd+bwd, by self CPU time (CUDA runtime calls included)")
    print(tprof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=50))
    for name in ("op fwd (requires_grad)", "op fwd+bwd"):
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(200):
            cases[name]()
        prof.disable()
        torch.cuda.synchronize()
        print(f"== cProfile, 200 x {name}, by own time")
        pstats.Stats(prof).sort_stats("tottime").print_stats(14)


if __name__ == "__main__":
    raise SystemExit(main())
