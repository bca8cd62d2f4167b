"""Benchmark the chunked op: ``python benchmarks/bench_chunk.py [--shapes 4x8192x32x128 ...]``.

Thin wrapper over :mod:`lightning_attention.bench` (also ``python -m lightning_attention bench``): times forward
and forward+backward against the bandwidth floor, fla, OpenNLPLab lightning-attn and torch SDPA, prints one
table and writes benchmarks/results/chunk.md and chunk.png.
"""

import argparse
import sys

from lightning_attention.cli import bench as cli_bench

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli_bench.add_arguments(parser)
    sys.exit(cli_bench.run(parser.parse_args()))
