"""Serving benchmark: decode, multi-token decode, prefill, and the decode tile sweep, against the bandwidth floor.

``python -m lightning_attention bench --serving [--sweep]`` or ``python benchmarks/bench_decode.py [--sweep]``
(CUDA). H = 64 heads, K = V = 128, bf16 q/k/v, cache of 4N slots, every index tensor on the GPU, default calls::

    floor = touched state bytes / copy bandwidth     (2 * N*H*K*V * bytes(cache): read + written; a read-only pass 1x)

with the copy bandwidth measured on the same card (bytes read + written), so ``time / floor`` is the fraction of
attainable bandwidth. Sections:

1. Decode step, N in DECODE_BATCHES, fp32 and bf16 caches: the default call eager (triton.testing.do_bench:
   GPU time with the launch gaps of a host-bound call; L2 flushed between calls), its host time per call, and
   GRAPH_STEPS calls replayed as a CUDA graph (GPU time per step; the steps rotate over enough caches that
   the touched states never sit in L2). Also the kernel without its repeated-slot check (that check's cost).
2. Multi-token decode, L in MULTI_TOKENS at N in MULTI_BATCHES: the updating call, the read-only pass and the
   commit of all L tokens (CUDA graph), each against one single-token step.
3. Prefill into slots of PREFILL_CASES (sequences x tokens) vs the chunked op on the same packed tokens
   (chunk_simple_gla from initial states to final states; it reads cu_seqlens on the host, so it is timed
   eagerly only).
4. ``--sweep``: the decode kernel's tiles (SWEEP_CANDIDATES, explicit, no grid filling) per cache dtype and N;
   the best per N, and the decode entry they suggest for this card's launch table (engines/triton/tuning.py).

Output: a markdown table printed as it grows, and ``<out>/<card>/serving.md`` + ``serving.json`` stamped with
the card, driver, torch and triton versions (:mod:`lightning_attention.bench.environment`; card: h100, h200, ...).

``--accuracy`` (CPU by default): 10,000 decode steps from a zero state, float32 vs bfloat16 cache, against the
float64 recurrence; rel err of o per step and of the final state (``<out>/<card>/decode_bf16_accuracy.md``).
``--smoke``: every section at tiny shapes on the CPU through the Triton interpreter (host timers, numbers
meaningless): checks the script (tests/bench/test_serving.py).
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch

from lightning_attention import decay, serving
from lightning_attention.bench.environment import Table, copy_bandwidth, environment, header, write_results
from lightning_attention.engines.triton.tuning import DECODE_TILES
from lightning_attention.ops import chunk_simple_gla
from lightning_attention.reference import recurrent_reference
from lightning_attention.testing import rel_err

TITLE = "Serving: decode, multi-token decode and prefill into cache slots against the bandwidth floor"
H, K, V = 64, 128, 128
DECODE_BATCHES = (1, 16, 64, 256, 1024)
MULTI_BATCHES = (64, 256)
MULTI_TOKENS = (1, 2, 4, 8)
PREFILL_CASES = ((256, 16), (64, 128), (8, 2048))  # (sequences, tokens each)
CACHE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
#: (block_v, block_k, num_warps) tried by --sweep: the tune command's decode candidates.
SWEEP_CANDIDATES = list(DECODE_TILES)
SLOTS_PER_ROW = 4  # cache slots per decode row
GRAPH_STEPS = 16
L2_BYTES = 1 << 28  # graph replays rotate over caches until the touched states exceed this (any L2 today)
#: "cuda", or "cpu" for a --smoke run through the Triton interpreter at tiny shapes.
DEVICE = "cuda"
IN_DTYPE = torch.bfloat16
BACKEND = "auto"  # of the public calls ("triton" in smoke mode: the CPU's default would be the torch engine)


def smoke_mode() -> None:
    """Tiny shapes on the CPU (Triton interpreter), host timers: checks the script runs, measures nothing."""
    global H, K, V, DECODE_BATCHES, MULTI_BATCHES, MULTI_TOKENS, PREFILL_CASES, SWEEP_CANDIDATES, DEVICE, IN_DTYPE
    global BACKEND, GRAPH_STEPS
    os.environ.setdefault("TRITON_INTERPRET", "1")
    GRAPH_STEPS = 2
    H, K, V, DEVICE, IN_DTYPE, BACKEND = 2, 16, 16, "cpu", torch.float32, "triton"
    DECODE_BATCHES, MULTI_BATCHES, MULTI_TOKENS, PREFILL_CASES = (1, 3), (2,), (1, 2), ((2, 3), (1, 20))
    SWEEP_CANDIDATES = SWEEP_CANDIDATES[:2]


# ---------------------------------------------------------------------------------------------------------------
# Timing and records


def bench_ms(fn, warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds per call: triton.testing.do_bench on CUDA, one host-timed call in smoke mode."""
    if DEVICE == "cpu":
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def graph_ms(steps: list) -> float:
    """GPU milliseconds per step of ``steps`` (callables) captured in one CUDA graph, median of 20 replays; the
    host time of the steps in smoke mode."""
    if DEVICE == "cpu":
        start = time.perf_counter()
        for step in steps:
            step()
        return (time.perf_counter() - start) * 1e3 / len(steps)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for step in steps[:2]:
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for step in steps:
            step()
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(steps))
    del graph
    return sorted(times)[len(times) // 2]


def host_us(fn, reps: int = 50) -> float:
    """Host microseconds per call of a loop of ``reps`` calls (launch and validation overhead, no sync inside)."""
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)
    fn()
    sync()
    reps = reps if DEVICE == "cuda" else 1
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    elapsed = time.perf_counter() - start
    sync()
    return elapsed * 1e6 / reps


# ---------------------------------------------------------------------------------------------------------------
# Problems


def _state_bytes(N: int, cache_dtype: torch.dtype) -> int:
    return N * H * K * V * torch.empty((), dtype=cache_dtype).element_size()


def _tokens(N: int, L: int, seed: int):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    q, k = (torch.randn(N, L, H, K, device=DEVICE, generator=gen).to(IN_DTYPE) for _ in range(2))
    v = torch.randn(N, L, H, V, device=DEVICE, generator=gen).to(IN_DTYPE)
    return q, k, v


def _caches(N: int, cache_dtype: torch.dtype, count: int = 1, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    return [
        (torch.randn(SLOTS_PER_ROW * N, H, K, V, device=DEVICE, generator=gen) * 0.1).to(cache_dtype)
        for _ in range(count)
    ]


def _slots(N: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    return torch.randperm(SLOTS_PER_ROW * N, device=DEVICE, generator=gen)[:N].to(torch.int32)


def _ring(N: int, cache_dtype: torch.dtype) -> int:
    """Caches a graph rotates over so that the touched states of consecutive steps exceed L2_BYTES."""
    return max(1, min(GRAPH_STEPS, math.ceil(L2_BYTES / _state_bytes(N, cache_dtype)))) if DEVICE == "cuda" else 1


# ---------------------------------------------------------------------------------------------------------------
# Sections


def _section(table: Table, title: str, columns: str) -> None:
    """A section's heading and the column heads of its table (``columns``: "a | b | c")."""
    table.add("", f"## {title}", "", f"| {columns} |", "|" + "---|" * (columns.count("|") + 1))


def _record(rows: list, table: Table, row: dict, *cells) -> None:
    """One measurement: ``row`` for the JSON, ``cells`` as a line of the markdown table."""
    rows.append(row)
    table.add("| " + " | ".join(map(str, cells)) + " |")


def bench_decode(bw: float, g_gamma: torch.Tensor, rows: list, table: Table) -> None:
    from lightning_attention.engines.triton import decode  # here: --smoke sets TRITON_INTERPRET before Triton loads

    title = f"Decode step (H={H}, K=V={K}, {str(IN_DTYPE)[6:]} q/k/v, slot ids on the GPU, default call)"
    _section(table, title, "N | cache | floor us | eager us | x floor | graph us/step | x floor | host us/call | "
                           "no repeat check us | tiles (BV, BK, warps)")  # fmt: skip
    for N in DECODE_BATCHES:
        for name, dtype in CACHE_DTYPES.items():
            q, k, v = (x[:, 0] for x in _tokens(N, 1, seed=N))
            caches = _caches(N, dtype, _ring(N, dtype))
            slots = _slots(N)
            floor_us = _state_bytes(N, dtype) * 2 / bw * 1e6
            call = lambda c: serving.lightning_attn_decode(q, k, v, c, slots, g_gamma, backend=BACKEND)  # noqa: E731
            eager_us = 1e3 * bench_ms(lambda: call(caches[0]))
            graph_us = 1e3 * graph_ms([lambda c=caches[i % len(caches)]: call(c) for i in range(GRAPH_STEPS)])
            call_host_us = host_us(lambda: call(caches[0]))
            config = decode.decode_config(dtype, caches[0].device)
            sink = serving._error_sink(caches[0].device, ("decode", N, 1, caches[0].shape[0]))
            unchecked_us = 1e3 * bench_ms(
                lambda: decode._launch(q[:, None], k[:, None], v[:, None], caches[0], slots, g_gamma, K**-0.5, sink,
                                       config, check_repeats=False)  # fmt: skip
            )
            block_v = decode._fill_block_v(config, N * H, V, caches[0].device)
            tiles = (block_v, min(config.block_k, K), config.num_warps)
            _record(
                rows, table,
                dict(section="decode", N=N, cache=name, floor_us=floor_us, eager_us=eager_us, graph_us=graph_us,
                     host_us=call_host_us, no_repeat_check_us=unchecked_us, tiles=tiles),
                N, name, f"{floor_us:.1f}", f"{eager_us:.1f}", f"{eager_us / floor_us:.3f}", f"{graph_us:.1f}",
                f"{graph_us / floor_us:.3f}", f"{call_host_us:.1f}", f"{unchecked_us:.1f}", tiles,
            )  # fmt: skip
            del caches


def bench_multi(bw: float, g_gamma: torch.Tensor, rows: list, table: Table) -> None:
    title = "Multi-token decode (CUDA graph, us per call; ratio to one single-token step of the same N and cache)"
    _section(table, title, "N | cache | L | 1 step us | decode_multi us | x step | read-only us | x step | commit us | "
                           "x step | read-only + commit x step | floor us (read + write)")  # fmt: skip
    for N in MULTI_BATCHES:
        for name, dtype in CACHE_DTYPES.items():
            caches = _caches(N, dtype, _ring(N, dtype))
            slots = _slots(N)
            ring = [caches[i % len(caches)] for i in range(GRAPH_STEPS)]
            q1, k1, v1 = (x[:, 0] for x in _tokens(N, 1, seed=1))
            step = lambda c: serving.lightning_attn_decode(q1, k1, v1, c, slots, g_gamma, backend=BACKEND)  # noqa: E731
            step_us = 1e3 * graph_ms([lambda c=c: step(c) for c in ring])
            floor_us = _state_bytes(N, dtype) * 2 / bw * 1e6
            for L in MULTI_TOKENS:
                q, k, v = _tokens(N, L, seed=L)
                accepted = torch.full((N,), L, dtype=torch.int32, device=DEVICE)
                calls = [
                    lambda c: serving.lightning_attn_decode_multi(q, k, v, c, slots, g_gamma, backend=BACKEND),
                    lambda c: serving.lightning_attn_decode_multi(q, k, v, c, slots, g_gamma, update_cache=False,
                                                                  backend=BACKEND),  # fmt: skip
                    lambda c: serving.lightning_attn_commit(k, v, c, slots, g_gamma, accepted, backend=BACKEND),
                ]
                times = [1e3 * graph_ms([lambda c=c, call=call: call(c) for c in ring]) for call in calls]
                ratios = [cell for t in times for cell in (f"{t:.1f}", f"{t / step_us:.2f}")]
                _record(
                    rows, table,
                    dict(section="multi", N=N, cache=name, L=L, step_us=step_us, multi_us=times[0],
                         read_only_us=times[1], commit_us=times[2], floor_us=floor_us),
                    N, name, L, f"{step_us:.1f}", *ratios, f"{(times[1] + times[2]) / step_us:.2f}", f"{floor_us:.1f}",
                )  # fmt: skip
            del caches


def bench_prefill(bw: float, g_gamma: torch.Tensor, rows: list, table: Table) -> None:
    _section(table, "Prefill into slots vs the chunked op (fp32 cache, initial states from the slots; ms)",
             "sequences x tokens | prefill eager | prefill graph | chunked op eager | prefill / chunked (eager)")
    for N, L in PREFILL_CASES:
        q, k, v = (x.reshape(1, N * L, H, -1) for x in _tokens(N, L, seed=3))
        cu = torch.arange(0, N * L + 1, L, device=DEVICE, dtype=torch.int32)
        cache = _caches(N, torch.float32)[0]
        slots = _slots(N)
        h0 = cache[slots.long()].clone()

        def prefill():
            return serving.lightning_attn_prefill(q, k, v, cu, cache, slots, g_gamma, backend=BACKEND)

        eager = bench_ms(prefill)
        graph = graph_ms([prefill] * 4)
        chunked = bench_ms(lambda: chunk_simple_gla(q, k, v, g_gamma=g_gamma, initial_state=h0, output_final_state=True,
                                                    cu_seqlens=cu, backend=BACKEND))  # fmt: skip
        _record(
            rows, table, dict(section="prefill", N=N, L=L, prefill_ms=eager, prefill_graph_ms=graph, chunk_ms=chunked),
            f"{N} x {L}", f"{eager:.3f}", f"{graph:.3f}", f"{chunked:.3f}", f"{eager / chunked:.2f}",
        )  # fmt: skip
        del cache


def bench_sweep(bw: float, g_gamma: torch.Tensor, rows: list, table: Table) -> None:
    from lightning_attention.engines.triton import decode  # here: --smoke sets TRITON_INTERPRET before Triton loads

    tiles = " | ".join(map(str, SWEEP_CANDIDATES))
    _section(table, "Decode tile sweep (kernel us, do_bench; block_v as given, no grid filling)",
             f"cache | N | {tiles} | best | x floor")
    for name, dtype in CACHE_DTYPES.items():
        for N in DECODE_BATCHES:
            q, k, v = _tokens(N, 1, seed=N)
            cache = _caches(N, dtype)[0]
            slots = _slots(N)
            sink = serving._error_sink(cache.device, ("decode", N, 1, cache.shape[0]))
            times = []
            for bv, bk, warps in SWEEP_CANDIDATES:
                config = decode.DecodeConfig(block_v=bv, block_k=bk, num_warps=warps)
                times.append(1e3 * bench_ms(
                    lambda: decode._launch(q, k, v, cache, slots, g_gamma, K**-0.5, sink, config, fill_grid=False),
                    warmup=5, rep=40,
                ))  # fmt: skip
            i = min(range(len(times)), key=times.__getitem__)
            floor_us = _state_bytes(N, dtype) * 2 / bw * 1e6
            _record(
                rows, table,
                dict(section="sweep", cache=name, N=N, times_us=dict(zip(map(str, SWEEP_CANDIDATES), times)),
                     best=SWEEP_CANDIDATES[i], floor_us=floor_us),
                name, N, *(f"{t:.1f}" for t in times), SWEEP_CANDIDATES[i], f"{times[i] / floor_us:.3f}",
            )  # fmt: skip
            del cache
    # The entry: the tile with the least sum of x-floor ratios over the targets' batches (N = 64 and 256).
    target_ns = [n for n in DECODE_BATCHES if n in (64, 256)] or [max(DECODE_BATCHES)]
    entries = []
    for name in CACHE_DTYPES:
        sweeps = [r for r in rows if r["section"] == "sweep" and r["cache"] == name and r["N"] in target_ns]
        score = {c: sum(r["times_us"][str(c)] / r["floor_us"] for r in sweeps) for c in SWEEP_CANDIDATES}
        bv, bk, warps = min(score, key=score.get)
        dtype = "float32" if name == "fp32" else "bfloat16"
        entries.append(f'"{dtype}": dict(block_v={bv}, block_k={bk}, num_warps={warps})')
    card = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    table.add("", f"Suggested decode entry of {card!r}'s launch table (least summed x floor at N = {target_ns}): "
                  f"`\"decode\": {{{', '.join(entries)}}}`")  # fmt: skip


def run(out_dir: str | None = "benchmarks/results", sweep: bool = False) -> str | None:
    """All sections (the sweep with ``sweep``); writes ``<out_dir>/<card>/serving.md`` and ``serving.json``.
    Returns the markdown's path."""
    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("the serving benchmark needs a CUDA device (or --smoke)")
    env = environment(DEVICE)
    bw = copy_bandwidth(DEVICE)
    rows: list = []
    table = Table()
    table.add(*header(TITLE, env, f"copy bandwidth (read + write): {bw / 1e12:.2f} TB/s"))
    payload = dict(environment=env, copy_bandwidth_Bps=bw, H=H, K=K, V=V, rows=rows)
    sections = [bench_decode, bench_multi, bench_prefill] + ([bench_sweep] if sweep else [])
    path = None
    g_gamma = decay.g_gamma(H, 0, 24, device=DEVICE)  # layer 0 of 24 ("tnl"): every head but the first decays
    for section in sections:
        section(bw, g_gamma, rows, table)
        serving.check_errors()  # a bad index in a section's calls raises here, before its numbers are written
        if out_dir:  # after every section, so that a run cut off by a time limit still leaves its rows
            path = write_results(out_dir, "serving", env, table, payload)
    return path


def bench_accuracy(out_dir: str | None, device: str, steps: int) -> None:
    """float32 vs bfloat16 cache over ``steps`` decode steps, against the float64 recurrence."""
    N, heads, dim = 4, 8, 32
    backend = "triton" if device == "cuda" else "torch"
    checkpoints = [t for t in (1, 10, 100, 1000) if t < steps] + [steps]
    env = environment(device)
    table = Table()
    table.add(
        *header(
            "Decode accuracy: float32 vs bfloat16 state cache against the float64 recurrence", env,
            f"{steps} decode steps, N={N}, H={heads}, K=V={dim}, unit-normal q, k, v, scale K^-0.5, backend {backend}",
        ),
        "| schedule | cache | " + " | ".join(f"rel err o @{t}" for t in checkpoints)
        + " | rel err final state | worst head (state) |",
        "|---|---|" + "---|" * (len(checkpoints) + 2),
    )
    rows = []
    for schedule in ("tnl", "minimax"):
        g = decay.g_gamma(heads, 0, 24, schedule)
        scale = dim**-0.5
        gen = torch.Generator().manual_seed(1)
        q, k, v = (torch.randn(N, steps, heads, dim, generator=gen).to(device) for _ in range(3))
        g = g.to(device)
        o_ref, s_ref = (x.cpu() for x in recurrent_reference(q.double(), k.double(), v.double(), g, scale, None, True))
        for name, dtype in CACHE_DTYPES.items():
            cache = torch.zeros(N, heads, dim, dim, dtype=dtype, device=device)
            slots = torch.arange(N, device=device)
            outs = [serving.lightning_attn_decode(q[:, t], k[:, t], v[:, t], cache, slots, g, scale, backend=backend)
                    for t in range(steps)]  # fmt: skip
            o = torch.stack(outs, dim=1).cpu()
            errs = [rel_err(o[:, t - 1], o_ref[:, t - 1]) for t in checkpoints]
            state = cache.float().cpu()
            per_head = [rel_err(state[:, h], s_ref[:, h]) for h in range(heads)]
            rows.append(dict(schedule=schedule, cache=name, o_err_at=dict(zip(checkpoints, errs)),
                             state_err=rel_err(state, s_ref), state_err_per_head=per_head))  # fmt: skip
            worst = max(per_head)
            table.add(f"| {schedule} | {name} | " + " | ".join(f"{e:.2e}" for e in errs)
                      + f" | {rel_err(state, s_ref):.2e} | {worst:.2e} (head {per_head.index(worst)}) |")  # fmt: skip
    if out_dir:
        write_results(out_dir, "decode_bf16_accuracy", env, table, dict(environment=env, steps=steps, rows=rows))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sweep", action="store_true", help="also time every decode tile in SWEEP_CANDIDATES")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU interpreter: checks the script")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--out", default="benchmarks/results", help="results root ('' for none)")
    parser.add_argument("--accuracy", action="store_true", help="bf16 vs fp32 cache error over many steps")
    parser.add_argument("--device", default="cpu", help="device for --accuracy (cpu: torch path, cuda: Triton)")
    parser.add_argument("--steps", type=int, default=10_000, help="decode steps of --accuracy")
    args = parser.parse_args(argv)
    if args.smoke:
        smoke_mode()
    if args.accuracy:
        bench_accuracy(args.out or None, args.device, args.steps)
    else:
        run(args.out or None, args.sweep)
    return 0
