"""CPU benchmark: forward + backward of the chunked torch engine vs the token-loop definition.

Times ``chunk_simple_gla(..., backend="torch")`` (forward, then backward with the final state's gradient) against
autograd through :func:`lightning_attention.reference.recurrent_reference` (the token loop, the way a linear
attention recurrence is usually written in plain PyTorch) on the same float32 inputs, with a fixed number of
threads. Each time is the median of several runs after a warm-up run, which also checks the two results against
each other (relative error of o and dq), so a fast wrong engine cannot post a number.

    python -m lightning_attention bench --device cpu     (or python benchmarks/bench_cpu.py [--threads 2 1] [--out DIR])

Writes ``<out>/cpu/chunk.md`` (the chunked op on the CPU) with the machine (CPU model, cores, load average while it
ran), the versions and the table. On a shared machine the load average matters: the token loop issues ~10 tiny ops
per token, and with more torch threads than idle cores every one of them can wait for a descheduled thread.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch

from lightning_attention import decay
from lightning_attention.bench.environment import environment, header, load_average, publish
from lightning_attention.ops import chunk_simple_gla
from lightning_attention.reference import recurrent_reference
from lightning_attention.testing import make_inputs, rel_err

#: (B, T, H, D): the headline shape first.
SHAPES = [(1, 4096, 4, 64), (1, 1024, 4, 64), (2, 2048, 8, 64), (1, 8192, 2, 128)]
LAYER_IDX, NUM_LAYERS = 2, 8  # "tnl" decay of layer 2 of 8
TITLE = "CPU benchmark: chunked torch engine vs token loop (forward + backward, float32)"


def _fwd_bwd(fn, q, k, v, h0, g):
    """One forward + backward; returns (o, dq) for the cross-check."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v, h0)]
    o, final = fn(*leaves[:3], g_gamma=g, initial_state=leaves[3], output_final_state=True)
    torch.autograd.backward((o, final), (torch.ones_like(o), torch.ones_like(final)))
    return o.detach(), leaves[0].grad


def _median_seconds(fn, repeats: int) -> tuple[float, float]:
    """Median wall-clock and median process CPU seconds (all threads) of ``fn()``."""
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def run(threads: int, repeats: int, loop_repeats: int, shapes=SHAPES):
    torch.set_num_threads(threads)
    rows = []
    for B, T, H, D in shapes:
        q, k, v, h0 = make_inputs(B, T, H, D, initial_state=True)
        g = decay.g_gamma(H, LAYER_IDX, NUM_LAYERS)
        chunk = lambda: _fwd_bwd(functools.partial(chunk_simple_gla, backend="torch"), q, k, v, h0, g)  # noqa: E731
        loop = lambda: _fwd_bwd(recurrent_reference, q, k, v, h0, g)  # noqa: E731
        (o_chunk, dq_chunk), (o_loop, dq_loop) = chunk(), loop()  # warm-up and cross-check
        err = max(rel_err(o_chunk, o_loop), rel_err(dq_chunk, dq_loop))
        t_chunk = _median_seconds(chunk, repeats)
        t_loop = _median_seconds(loop, loop_repeats)
        rows.append((threads, (B, T, H, D), t_chunk, t_loop, err))
        print(f"threads={threads} B={B} T={T} H={H} D={D}: chunk {t_chunk[0] * 1e3:.1f} ms, token loop "
              f"{t_loop[0] * 1e3:.1f} ms, speed-up {t_loop[0] / t_chunk[0]:.1f}x "
              f"(CPU time: {t_loop[1] / t_chunk[1]:.1f}x), rel. difference {err:.1e}", flush=True)  # fmt: skip
    return rows


def to_markdown(rows, env: dict, repeats: int, loop_repeats: int, load_before: float, load_after: float) -> list[str]:
    notes = (
        f"load average (1 min) before / after the run: {load_before:.1f} / {load_after:.1f}; threads = "
        f"torch.set_num_threads; median of {repeats} runs (token loop: {loop_repeats}) after one warm-up.",
        "chunk: `chunk_simple_gla(backend=\"torch\")`, chunk_size 64, with h0 and the final state's gradient; "
        "token loop: autograd through `lightning_attention.reference.recurrent_reference`, same inputs. "
        f"Decay: \"tnl\", layer {LAYER_IDX} of {NUM_LAYERS}; K = V = D; rel. difference = max relative error of o "
        "and dq between the two. wall = median wall-clock time; CPU = median process CPU time (all threads), which "
        "a busy shared machine distorts less than wall-clock time.",
    )
    lines = header(TITLE, env, *notes) + [
        "| threads | B | T | H | D | chunk wall (ms) | token loop wall (ms) | speed-up wall | chunk CPU (ms) "
        "| token loop CPU (ms) | speed-up CPU | rel. difference |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for threads, (B, T, H, D), t_chunk, t_loop, err in rows:
        lines.append(
            f"| {threads} | {B} | {T} | {H} | {D} | {t_chunk[0] * 1e3:.1f} | {t_loop[0] * 1e3:.1f} | "
            f"{t_loop[0] / t_chunk[0]:.1f}x | {t_chunk[1] * 1e3:.1f} | {t_loop[1] * 1e3:.1f} | "
            f"{t_loop[1] / t_chunk[1]:.1f}x | {err:.1e} |"
        )
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[2], help="torch thread counts to run")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs of the chunked engine")
    parser.add_argument("--loop-repeats", type=int, default=3, help="timed runs of the (slow) token loop")
    parser.add_argument("--shapes", nargs="+", default=None, help="BxTxHxD each (default: SHAPES)")
    parser.add_argument("--out", default="benchmarks/results", help="results root: <out>/cpu/chunk.md ('' for none)")
    args = parser.parse_args(argv)
    load_before = load_average()
    shapes = SHAPES if not args.shapes else [tuple(int(x) for x in s.split("x")) for s in args.shapes]
    rows = [row for threads in args.threads for row in run(threads, args.repeats, args.loop_repeats, shapes)]
    env = environment("cpu")
    lines = to_markdown(rows, env, args.repeats, args.loop_repeats, load_before, load_average())
    return publish(args.out, "chunk", env, lines)


if __name__ == "__main__":
    raise SystemExit(main())
