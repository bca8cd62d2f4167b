"""Heads of K = V = 256 (two K halves) through TMA: configurations against the shipped pointer path.

One configuration per process (tiles of 32 along a head dim have faulted on H100 with some warp counts; a fault
must not take the other rows with it). Prints GPU time (CUDA graph) of forward and forward+backward at
2x8192x16x256 bf16 and the largest relative error of o, dq, dk, dv against the pointer path's run in the same
process.

    python benchmarks/gpu/k256_tma.py BV WARPS STAGES TMA_STAGES|pointer
"""

from __future__ import annotations

import sys

import torch
import triton.testing

from lightning_attention import chunk_simple_gla, decay
from lightning_attention.engines.triton import chunk_scan
from lightning_attention.testing import rel_err


def run(q, k, v, g, do):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    o, _ = chunk_simple_gla(q, k, v, g_gamma=g, backend="triton")
    o.backward(do)
    return [o.detach(), q.grad, k.grad, v.grad]


def main() -> None:
    bv, warps, stages, tma = sys.argv[1:5]
    B, T, H, D = 2, 8192, 16, 256
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(4))
    g = decay.g_gamma(H, 2, 8, device="cuda")
    chunk_scan.TMA_HEAD_DIMS = ()
    base = run(q, k, v, g, do)
    shipped = chunk_scan.scan_config
    cfg = chunk_scan.ScanConfig(int(bv), int(warps), int(stages), tma_stages=int(tma) if tma != "pointer" else 4)
    chunk_scan.scan_config = lambda dk, dv, dtype: cfg if dk == 256 else shipped(dk, dv, dtype)
    chunk_scan.TMA_HEAD_DIMS = () if tma == "pointer" else (128, 256)
    got = run(q, k, v, g, do)
    torch.cuda.synchronize()
    err = max(rel_err(a, b) for a, b in zip(got, base))
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    fwd = triton.testing.do_bench_cudagraph(lambda: chunk_simple_gla(q, k, v, g_gamma=g, backend="triton"))
    fwd_bwd = triton.testing.do_bench_cudagraph(
        lambda: torch.autograd.grad(chunk_simple_gla(qg, kg, vg, g_gamma=g, backend="triton")[0], (qg, kg, vg), do)
    )
    print(f"{torch.cuda.get_device_name()} {B}x{T}x{H}x{D} {cfg} tma={tma}: fwd {fwd:.3f} ms  fwd+bwd "
          f"{fwd_bwd:.3f} ms  max rel err vs pointer path {err:.2e}", flush=True)


if __name__ == "__main__":
    main()
