"""Decode step on a slot-indexed state cache: time vs the memory floor, and the bf16-cache accuracy cost.

Timing (CUDA): one decode step of N sequences, H heads, K = V head dims, float32 or bfloat16 cache::

    floor = bytes / copy bandwidth,   bytes = 2 * N*H*K*V * bytes(cache)        (touched slots read + written)
                                           + N*H*(2K + V) * bytes(in) + N*H*V * bytes(out)   (q, k, v, o)

The copy bandwidth is measured on the same card (a large device-to-device copy, bytes read + written), so
``time / floor`` is the fraction of attainable bandwidth. Each step is timed three ways: the kernel through
``triton.testing.do_bench`` (median; the launch overlaps the previous step), the public API in a CUDA graph
of 16 steps (replay time / 16: no launch gaps), and the public API eagerly from the host with slot ids on
the host, on the device unchecked, and on the device checked (one device->host sync: its cost).

Accuracy (``--accuracy``, CPU by default): 10,000 decode steps from a zero state, float32 vs bfloat16 cache,
against the float64 recurrence over the same tokens; rel err of o per step and of the final state.

    python benchmarks/bench_decode.py [--sweep] [--out DIR]
    python benchmarks/bench_decode.py --accuracy [--device cuda] [--steps 10000] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import time

import torch

from lightning_attention import decay, serving
from lightning_attention.reference import recurrent_reference
from lightning_attention.testing import rel_err

H, K, V = 64, 128, 128
BATCHES = (64, 256)
CACHE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SWEEP = [(64, 128, 4), (64, 128, 2), (64, 64, 4), (64, 64, 2), (64, 32, 2), (128, 128, 4), (128, 64, 4), (128, 64, 8),
         (128, 32, 8), (128, 128, 8), (128, 128, 16)]
GRAPH_STEPS = 16
#: "cuda", or "cpu" for a --smoke run of the script's logic through the Triton interpreter at tiny shapes.
DEVICE = "cuda"


def smoke_mode() -> None:
    """Tiny shapes on the CPU (Triton interpreter), host timers: checks the script runs, measures nothing."""
    global H, K, V, BATCHES, SWEEP, DEVICE
    os.environ.setdefault("TRITON_INTERPRET", "1")
    H, K, V, BATCHES, SWEEP, DEVICE = 2, 16, 16, (2,), SWEEP[:2], "cpu"


def bench_ms(fn, warmup: int = 25, rep: int = 200) -> float:
    """Median milliseconds per call: triton.testing.do_bench on CUDA, a host timer in smoke mode."""
    if DEVICE == "cpu":
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def environment() -> dict:
    """Card, driver and library versions recorded with every number."""
    env = {"torch": torch.__version__, "python": platform.python_version(), "host": platform.node()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        env["card"] = torch.cuda.get_device_name()
        env["driver"] = _driver_version()
        env["cuda"] = torch.version.cuda
    else:
        env["card"] = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return env


def _driver_version() -> str | None:
    try:
        import subprocess

        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
        )
        return out.stdout.strip() or None
    except OSError:
        return None


def copy_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy, counting bytes read plus bytes written."""
    src = torch.randn(2**28 if DEVICE == "cuda" else 2**20, device=DEVICE)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


class Table(list):
    """Markdown lines, printed as they are added (a run cut short by its time limit still shows them)."""

    def add(self, *lines: str) -> None:
        for line in lines:
            print(line, flush=True)
            self.append(line)


def write_results(out_dir: str | None, name: str, payload: dict, table: list[str]) -> None:
    """With ``out_dir``, write ``name.json`` (payload) and ``name.md`` (the table under the environment)."""
    text = "\n".join(table)
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
            json.dump(payload, f, indent=1)
        env = payload["environment"]
        header = f"# {name}\n\n{env['card']}, driver {env.get('driver')}, torch {env['torch']}, triton {env['triton']}\n\n"
        with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
            f.write(header + text + "\n")


def _decode_problem(N: int, cache_dtype: torch.dtype, num_slots: int, seed: int = 0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    q, k, v = (torch.randn(N, H, K, device=DEVICE, generator=gen) for _ in range(3))
    cache = torch.randn(num_slots, H, K, V, device=DEVICE, generator=gen).to(cache_dtype)
    slots = torch.randperm(num_slots, device=DEVICE, generator=gen)[:N].to(torch.int32)
    g = decay.g_gamma(H, 0, 24, device=DEVICE)
    return q, k, v, cache, slots, g


def _floor_bytes(N: int, cache_dtype: torch.dtype, in_bytes: int = 4) -> int:
    state = N * H * K * V * torch.empty((), dtype=cache_dtype).element_size()
    return 2 * state + N * H * (2 * K + V) * in_bytes + N * H * V * in_bytes


def _graph_ms(step) -> float:
    """Per-step time of GRAPH_STEPS captured steps replayed (median of 20 replays); NaN in smoke mode."""
    if DEVICE == "cpu":
        return float("nan")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(GRAPH_STEPS):
            step()
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / GRAPH_STEPS)
    return sorted(times)[len(times) // 2]


def _host_ms(step, reps: int = 50) -> float:
    """Wall time per call from the host, synchronised at the end (launch + validation overhead included)."""
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)
    step()
    sync()
    start = time.perf_counter()
    for _ in range(reps):
        step()
    sync()
    return (time.perf_counter() - start) * 1e3 / reps


def bench_timing(out_dir: str | None, sweep: bool) -> None:
    from lightning_attention.engines.triton import decode

    env = environment()
    bw = copy_bandwidth()
    rows, table = [], Table()
    table.add(
        f"copy bandwidth (read + write): {bw / 1e12:.2f} TB/s",
        "",
        "| N | cache | floor us | kernel us (do_bench) | x floor | graph us/step | x floor | eager host us: host ids / device unchecked / device checked |",
        "|---|---|---|---|---|---|---|---|",
    )
    for N in BATCHES:
        for name, dtype in CACHE_DTYPES.items():
            q, k, v, cache, slots, g = _decode_problem(N, dtype, num_slots=2 * N)
            floor_us = _floor_bytes(N, dtype) / bw * 1e6
            scale = K**-0.5
            kernel_us = 1e3 * bench_ms(lambda: decode.decode_step(q, k, v, cache, slots, g, scale))
            api = lambda ids, check=False: serving.lightning_attn_decode(  # noqa: E731
                q, k, v, cache, ids, g, scale, check_slots=check
            )
            graph_us = 1e3 * _graph_ms(lambda: api(slots))
            host_ids = slots.cpu()
            reps = 30 if DEVICE == "cuda" else 1
            host = [1e3 * _host_ms(lambda: api(host_ids), reps), 1e3 * _host_ms(lambda: api(slots), reps),
                    1e3 * _host_ms(lambda: api(slots, True), reps)]
            row = dict(N=N, cache=name, floor_us=floor_us, kernel_us=kernel_us, graph_us=graph_us,
                       host_ids_us=host[0], device_ids_unchecked_us=host[1], device_ids_checked_us=host[2],
                       config=decode.DECODE_CONFIGS[dtype])
            rows.append(row)
            table.add(
                f"| {N} | {name} | {floor_us:.1f} | {kernel_us:.1f} | {kernel_us / floor_us:.3f} | {graph_us:.1f} | "
                f"{graph_us / floor_us:.3f} | {host[0]:.1f} / {host[1]:.1f} / {host[2]:.1f} |"
            )
            if sweep:
                for config in SWEEP:
                    us = 1e3 * bench_ms(
                        lambda: decode.decode_step(q, k, v, cache, slots, g, scale, config=config), warmup=10, rep=100
                    )
                    rows.append(dict(N=N, cache=name, sweep_config=config, kernel_us=us, floor_us=floor_us))
                    table.add(f"| {N} | {name} sweep BV={config[0]} BK={config[1]} warps={config[2]} | {floor_us:.1f} | {us:.1f} | "
                                 f"{us / floor_us:.3f} | | | |")
            del q, k, v, cache
    bf16_speedup = {
        N: next(r["kernel_us"] for r in rows if r["N"] == N and r["cache"] == "fp32" and "sweep_config" not in r)
        / next(r["kernel_us"] for r in rows if r["N"] == N and r["cache"] == "bf16" and "sweep_config" not in r)
        for N in BATCHES
    }
    table.add("", "bf16 cache speed-up over fp32 (kernel): " + ", ".join(f"N={n}: {s:.2f}x" for n, s in bf16_speedup.items()))
    payload = dict(environment=env, copy_bandwidth_Bps=bw, H=H, K=K, V=V, rows=rows, bf16_speedup=bf16_speedup)
    write_results(out_dir, "decode_" + env["card"], payload, table)


def bench_accuracy(out_dir: str | None, device: str, steps: int) -> None:
    """float32 vs bfloat16 cache over ``steps`` decode steps, against the float64 recurrence."""
    N, heads, dim = 4, 8, 32
    backend = "triton" if device == "cuda" else "torch"
    checkpoints = [t for t in (1, 10, 100, 1000) if t < steps] + [steps]
    table = Table()
    table.add(
        f"{steps} decode steps, N={N}, H={heads}, K=V={dim}, unit-normal q, k, v, scale K^-0.5, backend {backend}",
        "",
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
            outs = [serving.lightning_attn_decode(q[:, t], k[:, t], v[:, t], cache, slots, g, scale,
                                                  backend=backend, check_slots=False) for t in range(steps)]
            o = torch.stack(outs, dim=1).cpu()
            errs = [rel_err(o[:, t - 1], o_ref[:, t - 1]) for t in checkpoints]
            state = cache.float().cpu()
            per_head = [rel_err(state[:, h], s_ref[:, h]) for h in range(heads)]
            rows.append(dict(schedule=schedule, cache=name, o_err_at=dict(zip(checkpoints, errs)),
                             state_err=rel_err(state, s_ref), state_err_per_head=per_head))
            table.add(f"| {schedule} | {name} | " + " | ".join(f"{e:.2e}" for e in errs)
                         + f" | {rel_err(state, s_ref):.2e} | {max(per_head):.2e} (head {per_head.index(max(per_head))}) |")
    env = environment()
    write_results(out_dir, f"decode_bf16_accuracy_{device}", dict(environment=env, steps=steps, rows=rows), table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accuracy", action="store_true", help="bf16 vs fp32 cache error over many steps")
    parser.add_argument("--device", default="cpu", help="device for --accuracy (cpu: torch path, cuda: Triton)")
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--sweep", action="store_true", help="also time every (BV, BK, num_warps) in SWEEP")
    parser.add_argument("--out", default=None, help="write <name>.json and <name>.md here")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU interpreter: checks the script")
    args = parser.parse_args()
    if args.smoke:
        smoke_mode()
    if args.accuracy:
        bench_accuracy(args.out, args.device, args.steps)
    else:
        bench_timing(args.out, args.sweep)


if __name__ == "__main__":
    main()
