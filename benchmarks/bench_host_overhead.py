"""Host (Python) overhead of the chunked op on CUDA: ``python benchmarks/bench_host_overhead.py [--tma-ab |
--autograd] [BxTxHxD ...]``; :mod:`lightning_attention.bench.host_overhead` (prints; writes no result file)."""

from lightning_attention.bench.host_overhead import main

if __name__ == "__main__":
    raise SystemExit(main())
