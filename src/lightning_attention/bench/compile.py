"""LightningAttention layer, eager vs ``torch.compile``: forward and forward+backward time, compile time, memory.

The attention op is a custom op, opaque to the compiler: what compiling can win is the code *around* it (the
qkv activation, RMSNorm over heads, sigmoid gate, the layout copies), which inductor fuses. The benchmark shows
how much that is, what the one-off compilation costs, and that the compiled layer has no graph break.

Per shape ``B x T x hidden / heads`` and precision it reports:
    compile_s        first forward+backward of the compiled layer from an empty compile cache (tracing + inductor
                     codegen), minus one warm eager step
    eager / compiled forward and forward+backward ms: median over repeats (CPU: wall clock after a warm-up,
                     or process CPU time with --threads 1, robust on a shared machine; CUDA: triton.testing.do_bench)
    speedup          eager / compiled, forward+backward
    peak MiB         (CUDA) peak memory of forward+backward above the inputs and weights
    graphs / breaks  dynamo graphs compiled, graph breaks (must be 1 / 0)

Precisions: "fp32" (float32 weights and input), "bf16" (bfloat16 weights and input), "autocast" (float32 weights,
``torch.autocast(bfloat16)``: mixed-precision training). States are float32 in every case.

    python benchmarks/bench_compile.py [--threads 1]          # CPU: benchmarks/results/cpu/compile.md and .json
    python benchmarks/bench_compile.py --device cuda            # 3 shapes x (bf16, autocast), ~3-5 min:
                                                                # benchmarks/results/<card>/compile.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch._dynamo.utils import counters
from torch._inductor.utils import fresh_cache

from lightning_attention.bench.environment import environment, header, load_average, publish
from lightning_attention.nn import LightningAttention

# (B, T, hidden, heads): head_dim = hidden / heads.
SHAPES = {
    "cpu": [(2, 512, 256, 4), (2, 2048, 256, 4), (1, 4096, 512, 8)],
    "cuda": [(4, 2048, 2048, 16), (4, 8192, 2048, 16), (1, 32768, 1024, 8)],
}
PRECISIONS = {"cpu": ["fp32"], "cuda": ["bf16", "autocast"]}
LAYER_IDX, NUM_LAYERS = 2, 8


def _environment(device: str) -> dict:
    """The stamp of the result; on the CPU also torch's thread count and the load average (a shared machine's)."""
    env = environment(device)
    if device == "cpu":
        env.update(torch_threads=str(torch.get_num_threads()), load_1min=f"{load_average():.1f}")
    return env


def _cpu_clock():
    """Wall clock, except with one torch thread: then the process's CPU time, which is the compute time and is
    not inflated when other processes share the cores."""
    return time.process_time if torch.get_num_threads() == 1 else time.perf_counter


def _time_ms(fn, device: str, reps: int) -> float:
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10, rep=max(reps, 50), return_mode="median")
    clock = _cpu_clock()
    fn()
    times = []
    for _ in range(reps):
        start = clock()
        fn()
        times.append((clock() - start) * 1e3)
    return statistics.median(times)


def _peak_mib(fn, device: str) -> float | None:
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bench_case(B, T, hidden, heads, precision, device, backend, compile_mode, reps) -> dict:
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    layer = LightningAttention(
        hidden, heads, layer_idx=LAYER_IDX, num_layers=NUM_LAYERS, backend=backend, device=device, dtype=dtype
    )
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, hidden, generator=gen).to(device, dtype).requires_grad_()
    grad_out = torch.randn(B, T, hidden, generator=gen).to(device, torch.bfloat16 if precision != "fp32" else dtype)
    params = [x] + list(layer.parameters())

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(layer, fullgraph=True, mode=compile_mode)

    def steps(module):
        def forward():
            with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "autocast"):
                return module(x)

        def forward_backward():
            return torch.autograd.grad(forward(), params, grad_out)

        return forward, forward_backward

    eager_fwd, eager_fwdbwd = steps(layer)
    comp_fwd, comp_fwdbwd = steps(compiled)

    eager_fwdbwd()  # warm-up: the engine's own kernels are JIT-compiled here, not counted as torch.compile's
    _sync(device)
    start = time.perf_counter()
    eager_fwdbwd()
    _sync(device)
    eager_once = time.perf_counter() - start
    start = time.perf_counter()
    comp_fwdbwd()
    _sync(device)
    compile_s = time.perf_counter() - start - eager_once
    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())

    row = {
        "shape": f"{B}x{T}x{hidden}/{heads}",
        "precision": precision,
        "compile_s": round(compile_s, 2),
        "eager_fwd_ms": _time_ms(eager_fwd, device, reps),
        "compiled_fwd_ms": _time_ms(comp_fwd, device, reps),
        "eager_fwdbwd_ms": _time_ms(eager_fwdbwd, device, reps),
        "compiled_fwdbwd_ms": _time_ms(comp_fwdbwd, device, reps),
        "eager_peak_mib": _peak_mib(eager_fwdbwd, device),
        "compiled_peak_mib": _peak_mib(comp_fwdbwd, device),
        "graphs": graphs,
        "graph_breaks": breaks,
    }
    row["speedup_fwdbwd"] = row["eager_fwdbwd_ms"] / row["compiled_fwdbwd_ms"]
    return row


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def to_markdown(rows: list[dict], env: dict, args) -> list[str]:
    if args.device == "cuda":
        clock = "triton.testing.do_bench"
    else:
        clock = "process CPU time, 1 thread" if _cpu_clock() is time.process_time else "wall clock"
    columns = [
        "shape", "precision", "compile_s", "eager_fwd_ms", "compiled_fwd_ms", "eager_fwdbwd_ms",
        "compiled_fwdbwd_ms", "speedup_fwdbwd", "eager_peak_mib", "compiled_peak_mib", "graphs", "graph_breaks",
    ]  # fmt: skip
    note = (
        f"Backend {args.backend!r}, compile mode {args.mode!r}, decay 'minimax' layer {LAYER_IDX} of {NUM_LAYERS}; "
        f"shape = B x T x hidden / heads; times are medians (ms; {clock}); compile_s is the wall time of the first "
        "compiled forward+backward minus one eager one, from an empty compile cache (the first row also pays "
        "inductor's start-up). The attention op is a custom op, opaque to the compiler: compiled and eager run the "
        "same attention kernels, and the difference is the code around them (activation, RMSNorm, gate, copies)."
    )
    lines = header(f"LightningAttention layer: eager vs torch.compile ({args.device})", env, note)
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(_fmt(row[c]) for c in columns) + " |" for row in rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default="benchmarks/results", help="results root: <out>/<card>/compile.md ('': none)")
    parser.add_argument("--backend", default="auto", help="engine backend of the layer: auto, torch, triton")
    parser.add_argument("--mode", default=None, help="torch.compile mode (default, reduce-overhead, max-autotune...)")
    parser.add_argument("--precisions", nargs="*", default=None, help="subset of fp32, bf16, autocast")
    parser.add_argument("--shapes", nargs="*", default=None, help="BxTxHIDDEN/HEADS, e.g. 2x2048x256/4")
    parser.add_argument("--reps", type=int, default=10, help="timed repeats per measurement (CPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device found")

    shapes = SHAPES[args.device]
    if args.shapes:
        shapes = []
        for text in args.shapes:
            dims, heads = text.split("/")
            shapes.append((*(int(d) for d in dims.split("x")), int(heads)))
    env = _environment(args.device)
    rows = []
    for precision in args.precisions or PRECISIONS[args.device]:
        for B, T, hidden, heads in shapes:
            # An empty compile cache per case: compile_s includes code generation, never a cache hit.
            with fresh_cache():
                row = bench_case(B, T, hidden, heads, precision, args.device, args.backend, args.mode, args.reps)
            rows.append(row)
            print(json.dumps(rows[-1]), flush=True)
    return publish(args.out, "compile", env, to_markdown(rows, env, args), {"environment": env, "rows": rows})


if __name__ == "__main__":
    raise SystemExit(main())
