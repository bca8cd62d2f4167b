"""Serving benchmark: ``python benchmarks/bench_decode.py [--sweep] [--out DIR] [--smoke]``.

Thin wrapper over :mod:`lightning_attention.bench_serving` (also ``python -m lightning_attention bench --serving``):
decode steps, multi-token decode and prefill against the bandwidth floor, the decode tile sweep, and
``--accuracy`` (bf16 vs fp32 cache over many steps). Results: benchmarks/results/<card>/serving.md.
"""

import sys

from lightning_attention import bench_serving

if __name__ == "__main__":
    sys.exit(bench_serving.main())
