"""The chunked torch engine vs the token loop on the CPU: ``python benchmarks/bench_cpu.py [--threads 2 1]``.

:mod:`lightning_attention.bench.cpu` (also ``python -m lightning_attention bench --device cpu``); writes
benchmarks/results/cpu/chunk.md.
"""

from lightning_attention.bench.cpu import main

if __name__ == "__main__":
    raise SystemExit(main())
