"""Benchmarks of the ops, one module per op family; benchmarks/bench_<name>.py and ``python -m lightning_attention
bench`` are their entry points, and their results go to ``benchmarks/results/<card>/<topic>.md``.

- chunk.py: the chunked op on CUDA against the bandwidth floor, fla, OpenNLPLab's kernel and SDPA.
- cpu.py: the chunked torch engine against the token-loop definition, on the CPU.
- serving.py: decode, multi-token decode and prefill into cache slots against their floor; the decode tile sweep;
  the bf16 cache's accuracy over many steps.
- recurrent.py: the recurrent op (token loop) against the chunked op across T; the recurrent kernel's tiles.
- context_parallel.py: context parallelism over 1, 2, 4 GPUs (torchrun), correctness at real size and scaling.
- compile.py: the LightningAttention layer eager against ``torch.compile``.
- host_overhead.py: where the host's time goes in a small call (a diagnostic: prints, writes no result).
- environment.py: what every result is stamped with (card, driver, versions), the copy bandwidth, the folder per
  card, and the markdown/JSON writing.

Submodules are imported on use: ``import lightning_attention.bench.chunk``.
"""
