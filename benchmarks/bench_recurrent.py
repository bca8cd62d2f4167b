"""Recurrent op vs chunked op across T, the recurrent kernel's tiles, prefill vs the chunked op (CUDA).

``python benchmarks/bench_recurrent.py [--sweep] [--out DIR]``: :mod:`lightning_attention.bench.recurrent`;
writes benchmarks/results/<card>/recurrent.md.
"""

from lightning_attention.bench.recurrent import main

if __name__ == "__main__":
    raise SystemExit(main())
