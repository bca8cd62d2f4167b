"""The LightningAttention layer eager vs ``torch.compile``: ``python benchmarks/bench_compile.py [--device cuda]``.

:mod:`lightning_attention.bench.compile`; writes benchmarks/results/<card>/compile.md (``cpu`` on the CPU).
"""

from lightning_attention.bench.compile import main

if __name__ == "__main__":
    raise SystemExit(main())
