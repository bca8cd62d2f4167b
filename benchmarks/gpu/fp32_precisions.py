"""fp32 products at other Triton input precisions than the shipped ones, checked (check_chunk.py) and timed in one
process: ``python benchmarks/gpu/fp32_precisions.py HIGH HIGHEST TMA_WARPS`` runs what
torch.set_float32_matmul_precision("high") / ("highest") select (shipped: tf32 / tf32x3) as HIGH / HIGHEST
(e.g. bf16x3 / bf16x6), the fp32 TMA scans on TMA_WARPS warps. Session 6 (chunk.md): both slower."""

import dataclasses
import runpy
import sys

import torch

from lightning_attention.engines.triton import _common, chunk_bwd, chunk_scan, chunk_state

high, highest, warps = sys.argv[1], sys.argv[2], int(sys.argv[3])
shipped_precision = _common.dot_precision


def dot_precision(dtype):
    p = shipped_precision(dtype)
    if dtype != torch.float32:
        return p
    return {"tf32": high, "tf32x3": highest}[p]


for m in (chunk_scan, chunk_bwd, chunk_state):
    m.dot_precision = dot_precision
shipped_config = chunk_scan.scan_config
chunk_scan.scan_config = lambda *a: (
    dataclasses.replace(shipped_config(*a), tma_warps=warps) if a[2] == torch.float32 else shipped_config(*a)
)
sys.path.insert(0, "benchmarks/gpu")
import check_chunk as c  # noqa: E402

c.check(f"fp32 high={high}", 4, 8192, 8, 128, 128, torch.float32, fp32_precision="high")
c.check(f"fp32 highest={highest}", 4, 8192, 8, 128, 128, torch.float32, fp32_precision="highest")
sys.argv = ["bench_chunk.py", "--out", "", "--providers", "ours", "--shapes", "4x8192x32x128:fp32"]
runpy.run_path("benchmarks/bench_chunk.py", run_name="__main__")
