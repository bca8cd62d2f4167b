"""python -m lightning_attention bench: time the chunked op on the GPU against the bandwidth floor and others.

The logic lives in :mod:`lightning_attention.bench` (so it works from an installed package);
benchmarks/bench_chunk.py is the same entry point for a source checkout.
"""

from __future__ import annotations


def add_arguments(parser):
    parser.add_argument(
        "--shapes",
        nargs="*",
        default=None,
        help="shapes BxTxHxD[:bf16|fp16|fp32] (default: the standard list in lightning_attention.bench.SHAPES)",
    )
    parser.add_argument(
        "--providers",
        nargs="*",
        default=None,
        help="subset of: ours fla lightning_attn sdpa_flash (default: all that import)",
    )
    parser.add_argument("--out", default="benchmarks/results", help="folder for chunk.md and chunk.png ('' for none)")


def run(args) -> int:
    import torch

    if not torch.cuda.is_available():
        print("bench: needs a CUDA device (none found)")
        return 1
    from lightning_attention import bench

    shapes = None if not args.shapes else [bench.parse_shape(s) for s in args.shapes]
    bench.run(out_dir=args.out or None, shapes=shapes, providers=args.providers)
    return 0
