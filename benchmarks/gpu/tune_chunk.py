"""One-off tuning sweep for the chunked Triton engine (run on the device; results go into the config functions).

Times forward (scan kernel configs: V-block, warps, pipeline stages), backward (fused dk/dv kernel: warps,
stages) and the segment policy (programs per SM) at the benchmark shapes, with triton.testing.do_bench
(median ms). The winners are written by hand into chunk_scan.scan_config, chunk_bwd.dkdv_config and
_common.SegmentPolicy: nothing autotunes at run time.

    python benchmarks/gpu/tune_chunk.py
"""

from __future__ import annotations

import itertools

import torch
import triton.testing

from lightning_attention import _validation as val
from lightning_attention import decay
from lightning_attention.engines.triton import _common, chunk_bwd, chunk_scan
from lightning_attention.engines.triton.chunk import ENGINE

from lightning_attention.bench import SHAPES as BENCH_SHAPES

#: The benchmark's shapes that have distinct kernel configurations (D, dtype) and segment plans.
SHAPES = [s for s in BENCH_SHAPES if s[1] in (8192, 32768, 4096) and s[:2] != (4, 32768)]


def _inputs(B, T, H, D, dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(B, T, H, D, device="cuda", dtype=dtype, generator=gen) for _ in range(4))
    return q, k, v, do, decay.g_gamma(H, 2, 8, device="cuda")


def _time(fn) -> float:
    try:
        return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")
    except Exception as e:  # a config that does not compile (e.g. out of shared memory) is skipped
        print(f"    failed: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
        return float("inf")


def main() -> None:
    cfg = val.ScanConfig(scale=128**-0.5)
    default_scan, default_dkdv = chunk_scan.scan_config, chunk_bwd.dkdv_config
    for B, T, H, D, dtype in SHAPES:
        q, k, v, do, g = _inputs(B, T, H, D, dtype)
        print(f"== {B}x{T}x{H}x{D} {dtype}", flush=True)
        fwd = lambda: ENGINE.forward(q, k, v, g, cfg, None, None)  # noqa: E731
        bwd = lambda: ENGINE.backward(q, k, v, g, cfg, None, None, do, None)  # noqa: E731
        best = (float("inf"), None)
        for bv, warps, stages in itertools.product((32, 64, 128), (4, 8), (1, 2, 3)):
            if bv > _common.block_dim(D) or (bv == 32 and D <= 128):
                continue
            conf = chunk_scan.ScanConfig(bv, warps, stages)
            chunk_scan.scan_config = lambda dk, dv, dt, conf=conf: conf
            ms = _time(fwd)
            print(f"  fwd {conf}: {ms:.3f} ms", flush=True)
            best = min(best, (ms, conf), key=lambda x: x[0])
        chunk_scan.scan_config = lambda dk, dv, dt, conf=best[1]: conf
        print(f"  best fwd {best[1]} {best[0]:.3f} ms  (default {default_scan(D, D, dtype)})")
        if chunk_bwd.use_fused_dkdv(D, D):
            for warps, stages in itertools.product((4, 8), (1, 2, 3)):
                conf = chunk_bwd.DkDvConfig(warps, stages)
                chunk_bwd.dkdv_config = lambda dk, dv, dt, conf=conf: conf
                print(f"  bwd {conf}: {_time(bwd):.3f} ms", flush=True)
            chunk_bwd.dkdv_config = default_dkdv
        else:
            print(f"  bwd (two scans): {_time(bwd):.3f} ms")
        if B * H <= 16:
            for pps in (0.5, 1.0, 2.0, 4.0):
                _common.POLICY = _common.SegmentPolicy(pps)
                print(f"  policy {pps}: fwd {_time(fwd):.3f} ms bwd {_time(bwd):.3f} ms", flush=True)
            _common.POLICY = _common.SegmentPolicy()
        chunk_scan.scan_config = default_scan
        del q, k, v, do
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
