"""The chunked op on CUDA: ``python benchmarks/bench_chunk.py [--shapes 4x8192x32x128 ...] [--providers ...]``.

The same entry point as ``python -m lightning_attention bench`` (:mod:`lightning_attention.bench.chunk`): forward
and forward+backward against the bandwidth floor, fla, OpenNLPLab lightning-attn and torch SDPA; one table,
written to benchmarks/results/<card>/chunk.md and chunk.png. On a machine without CUDA it runs the CPU benchmark.
"""

import argparse
import sys

from lightning_attention.cli import bench

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench.add_arguments(parser)
    sys.exit(bench.run(parser.parse_args()))
