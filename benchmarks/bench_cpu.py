"""CPU benchmark of the chunked torch engine vs the token loop: see lightning_attention/bench_cpu.py."""

from lightning_attention.bench_cpu import main

if __name__ == "__main__":
    raise SystemExit(main())
