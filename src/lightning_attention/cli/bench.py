"""python -m lightning_attention bench: time the ops on the available device.

On CUDA: the chunked op against the bandwidth floor, fla, OpenNLPLab's kernel and SDPA
(:mod:`lightning_attention.bench.chunk`; benchmarks/bench_chunk.py is the same entry point); with ``--serving``, the
serving calls (decode, multi-token decode, prefill; ``--sweep``: the decode tiles) against their floor
(:mod:`lightning_attention.bench.serving`; benchmarks/bench_decode.py). On CPU: the chunked torch engine against
the token-loop definition (:mod:`lightning_attention.bench.cpu`). Results: ``<out>/<card>/<topic>.md``.
"""

from __future__ import annotations


def add_arguments(parser):
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="auto: CUDA if present")
    parser.add_argument(
        "--shapes",
        nargs="*",
        default=None,
        help="shapes BxTxHxD[:bf16|fp16|fp32] (default: lightning_attention.bench.chunk.SHAPES; bench.cpu.SHAPES "
        "on CPU)",
    )
    parser.add_argument(
        "--providers",
        nargs="*",
        default=None,
        help="subset of: ours ours_g fla fla_g lightning_attn sdpa_flash (default: all that import)",
    )
    parser.add_argument(
        "--out", default="benchmarks/results", help="results root: <out>/<card>/chunk.md and chunk.png ('' for none)"
    )
    parser.add_argument(
        "--serving", action="store_true", help="the serving benchmark instead (CUDA): <out>/<card>/serving.md"
    )
    parser.add_argument("--sweep", action="store_true", help="with --serving: also sweep the decode tiles")


def run(args) -> int:
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if args.serving:
        if device != "cuda" or not torch.cuda.is_available():
            print("bench --serving: needs a CUDA device (benchmarks/bench_decode.py --smoke checks it on the CPU)")
            return 1
        from lightning_attention.bench import serving

        return serving.main((["--sweep"] if args.sweep else []) + ["--out", args.out])
    if device == "cpu":
        from lightning_attention.bench import cpu

        cpu_args = ["--out", args.out, "--threads", str(torch.get_num_threads())]
        return cpu.main(cpu_args + (["--shapes", *args.shapes] if args.shapes else []))
    if not torch.cuda.is_available():
        print("bench: --device cuda needs a CUDA device (none found)")
        return 1
    from lightning_attention.bench import chunk

    shapes = None if not args.shapes else [chunk.parse_shape(s) for s in args.shapes]
    chunk.run(out_dir=args.out or None, shapes=shapes, providers=args.providers)
    return 0
