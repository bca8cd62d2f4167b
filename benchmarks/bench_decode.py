"""Serving benchmark: ``python benchmarks/bench_decode.py [--sweep] [--out DIR] [--smoke] [--accuracy]``.

:mod:`lightning_attention.bench.serving` (also ``python -m lightning_attention bench --serving``): decode steps,
multi-token decode and prefill against the bandwidth floor, the decode tile sweep, and ``--accuracy`` (bf16 vs fp32
cache over many steps). Results: benchmarks/results/<card>/serving.md and decode_bf16_accuracy.md.
"""

from lightning_attention.bench.serving import main

if __name__ == "__main__":
    raise SystemExit(main())
