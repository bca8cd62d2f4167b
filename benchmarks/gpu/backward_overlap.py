"""How much of the backward's GPU time is kernel boundaries and tails: the dq scan and the paired dk/dv launch
timed alone, in sequence (the engine's backward) and side by side on two streams (CUDA graphs, GPU time).

    python benchmarks/gpu/backward_overlap.py [BxTxHxD ...]   (default 4x2048x32x128 4x8192x32x128)

A measurement only: the engine runs its launches on the caller's stream.
"""

from __future__ import annotations

import sys

import torch
import triton.testing

from lightning_attention import _validation as val
from lightning_attention import decay
from lightning_attention.engines.triton import chunk
from lightning_attention.engines.triton._common import sequence_bounds


def main() -> None:
    for shape in sys.argv[1:] or ["4x2048x32x128", "4x8192x32x128"]:
        run(*map(int, shape.split("x")))


def run(B: int, T: int, H: int, D: int) -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(4))
    g = decay.g_gamma(H, 2, 8, device="cuda")
    cfg = val.ScanConfig(scale=D**-0.5)
    rows = [t.reshape(-1, H, D) for t in (q, k, v, do)]
    dq, dk, dv = (torch.empty_like(rows[0]) for _ in range(3))
    bounds = sequence_bounds(B, T, None)
    side = torch.cuda.Stream()

    def dq_scan():
        chunk._scan(rows[3], rows[2], rows[1], dq, g, bounds, scale=cfg.scale, reverse=False, shift=0, state_in=None)

    def dkdv():
        chunk._dkdv(*rows[:3], rows[3], dk, dv, g, bounds, scale=cfg.scale, reverse=True, dht=None, dh0=None)

    def both_streams():
        main = torch.cuda.current_stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            dq_scan()
        dkdv()
        main.wait_stream(side)

    cases = {
        "engine backward": lambda: chunk.ENGINE.backward(q, k, v, g, cfg, None, None, do, None),
        "dq scan alone": dq_scan,
        "dk/dv launch alone": dkdv,
        "dq then dk/dv": lambda: (dq_scan(), dkdv()),
        "side by side (2 streams)": both_streams,
    }
    print(f"{torch.cuda.get_device_name()} {B}x{T}x{H}x{D} bf16, GPU time (CUDA graph), ms")
    for name, fn in cases.items():
        ms = triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
        print(f"  {name:26s} {ms:.4f}", flush=True)


if __name__ == "__main__":
    main()
