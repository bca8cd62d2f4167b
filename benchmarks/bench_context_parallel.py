"""Context parallelism on GPUs, one launch: correctness at real size and forward+backward scaling (torchrun).

    torchrun --standalone --nproc_per_node=4 benchmarks/bench_context_parallel.py --out OUT/cp_P4.json
    python benchmarks/bench_context_parallel.py --report OUT --results benchmarks/results

:mod:`lightning_attention.bench.context_parallel`; benchmarks/context_parallel.sh runs 1, 2 and 4 GPUs and the report
(benchmarks/results/<card>x<GPUs>/context_parallel.md).
"""

from lightning_attention.bench.context_parallel import main

if __name__ == "__main__":
    raise SystemExit(main())
