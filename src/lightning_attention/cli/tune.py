"""python -m lightning_attention tune: measure the Triton kernels' launch configurations on the present card.

For every case of the launch table (engines/triton/tuning.py) the command times a few candidate configurations on
a workload that takes that case, keeps the fastest, and writes the card's own table to
``tuning.user_table_path(card)`` (``$LIGHTNING_ATTENTION_TUNING_DIR`` or ~/.cache/lightning_attention/tuning), which
the library reads from then on in preference to the shipped table; ``python -m lightning_attention check`` prints
which table is in use. Nothing is tuned implicitly at run time: only this command measures.

Workloads (bf16 unless named): the chunked op's forward + backward for the scans (pointer loads at heads of 64,
TMA loads at 128 and 256 where the card has them; gated ones with per-token gates; fp32 under "highest" and
"high") and the fused dk/dv kernel, the decode step at N = 64 and 256 for each cache dtype (one token per row,
and four and eight: the "-multi" cases), and the recurrent kernel's forward. A case timed on several workloads
keeps the entry that is best over all of them (:func:`choose`), and a candidate that does not fit the card (a
launch falling back to fewer stages) is skipped.
``--smoke`` runs every step at tiny sizes with one candidate each (on the CPU through the Triton interpreter:
the timings mean nothing there; CI runs it to keep the command working).
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Callable

from lightning_attention.engines.triton.tuning import DECODE_TILES

#: Candidates per field group; the shipped entry is always measured too.
POINTER_CANDIDATES = [dict(num_warps=w, num_stages=s) for w in (4, 8) for s in (2, 3, 4)]
TMA_CANDIDATES = [dict(tma_warps=w, tma_stages=s) for w in (4, 8) for s in (2, 3, 4)]
DKDV_CANDIDATES = [dict(num_warps=w, num_stages=s) for w in (4, 8) for s in (1, 2, 3)]
DECODE_CANDIDATES = [dict(block_v=bv, block_k=bk, num_warps=w) for bv, bk, w in DECODE_TILES]
RECURRENT_CANDIDATES = [dict(state_tile=t, num_warps=w) for t in (2048, 4096, 8192) for w in (2, 4, 8)]
MULTI_TOKENS = (4, 8)  # tokens per row of the multi-token decode workloads


@dataclasses.dataclass
class Workload:
    """One timed call for one table case: ``kernel``, ``case``, the candidates' field values, and a function
    building the call (``make(smoke) -> callable``)."""

    kernel: str
    case: str
    label: str
    candidates: list[dict]
    make: Callable[[bool], Callable[[], object]]
    fallback_case: str | None = None  # the case whose entry is the starting one where no table has ``case``


def _chunk_call(B, T, H, D, dtype_name, gated=False, precision="highest", tma=True):
    """The chunked op's forward + backward at B x T x H x D (``tma``: False runs pointer loads)."""

    def make(smoke: bool):
        import torch

        from lightning_attention import decay
        from lightning_attention.engines.triton import options
        from lightning_attention.ops import chunk_simple_gla

        b, t, h, d = (1, 70, 2, D) if smoke else (B, T, H, D)
        dtype = getattr(torch, dtype_name)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        gen = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(b, t, h, d, device=device, dtype=dtype, generator=gen).requires_grad_() for _ in "qkv")
        g_gamma = decay.g_gamma(h, 2, 8, device=device)
        gates = -torch.rand(b, t, h, device=device, generator=gen) if gated else None
        do = torch.randn_like(q)
        routes = options.OPTIONS if tma else dataclasses.replace(options.OPTIONS, tma_head_dims=(), tma_fp32_head_dims=())

        def call():
            saved, options.OPTIONS = options.OPTIONS, routes
            previous = torch.get_float32_matmul_precision()
            torch.set_float32_matmul_precision(precision)
            try:
                o, _ = chunk_simple_gla(q, k, v, g=gates, g_gamma=g_gamma, backend="triton")
                torch.autograd.grad(o, (q, k, v), do)
            finally:
                options.OPTIONS = saved
                torch.set_float32_matmul_precision(previous)

        return call

    return make


def _decode_call(N, cache_dtype_name, L=1):
    """One decode step of N rows, or with ``L`` > 1 a multi-token decode of L tokens per row."""

    def make(smoke: bool):
        import torch

        from lightning_attention import decay, serving

        n, H, K, V = (2, 2, 16, 32) if smoke else (N, 64, 128, 128)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        gen = torch.Generator(device=device).manual_seed(0)
        tokens = (n, L) if L > 1 else (n,)
        q, k, v = (torch.randn(*tokens, H, D, device=device, dtype=torch.bfloat16, generator=gen) for D in (K, K, V))
        cache = serving.new_state_cache(4 * n, H, K, V, dtype=getattr(torch, cache_dtype_name), device=device)
        slots = torch.arange(0, 4 * n, 4, device=device)
        g_gamma = decay.g_gamma(H, 0, 24, device=device)
        run = serving.lightning_attn_decode_multi if L > 1 else serving.lightning_attn_decode
        return lambda: run(q, k, v, cache, slots, g_gamma, backend="triton")

    return make


def _recurrent_call():
    def make(smoke: bool):
        import torch

        from lightning_attention import decay
        from lightning_attention.ops import fused_recurrent_simple_gla

        B, T, H, D = (1, 9, 2, 16) if smoke else (4, 16, 16, 128)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        gen = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(B, T, H, D, device=device, dtype=torch.bfloat16, generator=gen) for _ in "qkv")
        g_gamma = decay.g_gamma(H, 2, 8, device=device)
        return lambda: fused_recurrent_simple_gla(q, k, v, g_gamma=g_gamma, backend="triton")

    return make


def workloads() -> list[Workload]:
    """Every case of the launch table with the workload that times it (the fields each candidate varies)."""
    scans = [
        ("16bit", "pointer 8x4096x16x64", POINTER_CANDIDATES, _chunk_call(8, 4096, 16, 64, "bfloat16")),
        ("16bit", "TMA 4x8192x32x128", TMA_CANDIDATES, _chunk_call(4, 8192, 32, 128, "bfloat16")),
        ("16bit-gated", "pointer 8x4096x16x64, g", POINTER_CANDIDATES, _chunk_call(8, 4096, 16, 64, "bfloat16", True)),
        ("16bit-gated", "TMA 4x8192x32x128, g", TMA_CANDIDATES, _chunk_call(4, 8192, 32, 128, "bfloat16", True)),
        ("16bit-k256", "pointer 2x8192x16x256", POINTER_CANDIDATES, _chunk_call(2, 8192, 16, 256, "bfloat16", tma=False)),
        ("16bit-k256", "TMA 2x8192x16x256", TMA_CANDIDATES, _chunk_call(2, 8192, 16, 256, "bfloat16")),
        ("fp32", "TMA 8x4096x16x64 fp32", TMA_CANDIDATES, _chunk_call(8, 4096, 16, 64, "float32")),
        ("fp32-tf32-k128", "TMA 4x8192x32x128 fp32 tf32", TMA_CANDIDATES,
         _chunk_call(4, 8192, 32, 128, "float32", precision="high")),
    ]  # fmt: skip
    out = [Workload("scan", case, label, candidates, make) for case, label, candidates, make in scans]
    out += [
        Workload("dkdv", "16bit", "fused dk/dv 8x4096x16x64", DKDV_CANDIDATES, _chunk_call(8, 4096, 16, 64, "bfloat16")),
        Workload("dkdv", "fp32", "fused dk/dv 8x4096x16x64 fp32", DKDV_CANDIDATES,
                 _chunk_call(8, 4096, 16, 64, "float32")),
    ]  # fmt: skip
    for dtype_name in ("float32", "bfloat16"):
        for N in (64, 256):
            out.append(Workload("decode", dtype_name, f"decode N={N}", DECODE_CANDIDATES, _decode_call(N, dtype_name)))
        for N, L in itertools.product((64, 256), MULTI_TOKENS):
            out.append(Workload("decode", f"{dtype_name}-multi", f"decode N={N} L={L}", DECODE_CANDIDATES,
                                _decode_call(N, dtype_name, L), fallback_case=dtype_name))  # fmt: skip
    out.append(Workload("recurrent", "any", "token loop 4x16x16x128", RECURRENT_CANDIDATES, _recurrent_call()))
    return out


def _time_ms(fn, smoke: bool) -> float:
    if smoke:  # one call: under the interpreter it only checks that the candidate runs
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=50, return_mode="median")


def measure(workload: Workload, base: dict, smoke: bool) -> list[tuple[dict, float | None]]:
    """(entry, milliseconds or None where it did not fit the card) for the shipped entry ``base`` and each candidate
    applied to it."""
    from triton.runtime.errors import OutOfResources

    from lightning_attention.engines.triton import _common, tuning

    call = workload.make(smoke)
    candidates = workload.candidates[:1] if smoke else workload.candidates
    entries = [base] + [e for e in ({**base, **c} for c in candidates) if e != base]
    results = []
    for entry in entries:
        table = tuning.CardTable("candidate", (0, 0), 0, {workload.kernel: {workload.case: entry}})
        _common._FIRST_FITTING.clear()
        try:
            with tuning.using(table):
                ms = _time_ms(call, smoke)
                fitted = all(first == 0 for first in _common._FIRST_FITTING.values())
        except OutOfResources:
            ms, fitted = None, False
        results.append((entry, ms if fitted else None))
    _common._FIRST_FITTING.clear()
    return results


def choose(results: list[list[tuple[dict, float | None]]]) -> tuple[dict, list[float]] | None:
    """The entry one case keeps, from its workloads' :func:`measure` results (the same entries in the same order
    in each): of the entries that fit every workload, the one whose times, each relative to the fastest on its
    workload, sum least, so that no single workload decides alone (a tile best at one batch size but twice as slow
    at another loses). Returns (entry, its ms per workload), or None where no entry fits them all."""
    entries = [entry for entry, _ in results[0]]
    times = [[workload[i][1] for workload in results] for i in range(len(entries))]
    fitting = [i for i, row in enumerate(times) if all(ms is not None for ms in row)]
    if not fitting:
        return None
    fastest = [min(times[i][w] for i in fitting) for w in range(len(results))]
    best = min(fitting, key=lambda i: sum(ms / low for ms, low in zip(times[i], fastest)))
    return entries[best], times[best]


def add_arguments(parser) -> None:
    parser.add_argument("--kernels", nargs="*", default=None, help="subset of: scan dkdv decode recurrent")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one candidate each (checks the command)")
    parser.add_argument("--dry-run", action="store_true", help="measure and print, write no table")
    parser.add_argument("--out", default="", help="also write <out>/<card>/tuning.md (e.g. benchmarks/results)")


def run(args) -> int:
    import os

    import torch

    from lightning_attention.engines.triton import tuning
    from lightning_attention.engines.triton.options import interpreting

    if not torch.cuda.is_available() and not (args.smoke and interpreting()):
        print("tune: needs a CUDA device (or --smoke under TRITON_INTERPRET=1)")
        return 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else (0, 0)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0
    shipped = tuning.table_for(device) if device.type == "cuda" else next(iter(tuning.SHIPPED.values()))
    chosen: dict[str, dict[str, dict]] = {}
    lines = [
        f"# Launch table measured on {card}",
        "",
        f"`python -m lightning_attention tune{' --smoke' if args.smoke else ''}`; torch {torch.__version__}. "
        "Starting table: " + shipped.card + f" ({shipped.source}). Times in ms (median, do_bench).",
        "",
        "| kernel | case | workload | starting entry ms | best entry | best ms | gain |",
        "|---|---|---|---|---|---|---|",
    ]
    selected = [w for w in workloads() if not args.kernels or w.kernel in args.kernels]
    # Consecutive workloads of one case varying the same fields are judged together; a case's next group (e.g. the
    # TMA fields after the pointer-load ones) starts from the entry the group before chose.
    groups = itertools.groupby(selected, key=lambda w: (w.kernel, w.case, tuple(sorted(w.candidates[0]))))
    for (kernel, case, _), group in groups:
        group = list(group)
        fallback = group[0].fallback_case
        base = (
            chosen.get(kernel, {}).get(case)
            or tuning.find(kernel, case, device)
            or chosen.get(kernel, {}).get(fallback)
            or tuning.lookup(kernel, fallback or case, device)
        )
        results = [measure(workload, dict(base), args.smoke) for workload in group]
        picked = choose(results)
        if picked is None:
            print(f"{kernel:9} {case:15} {group[0].label}: no candidate fits; keeping the table's")
            continue
        best, best_times = picked
        chosen.setdefault(kernel, {})[case] = best
        for workload, result, best_ms in zip(group, results, best_times):
            base_ms = result[0][1]
            gain = f"{base_ms / best_ms:.3f}x" if base_ms else "-"
            row = (f"| {kernel} | {case} | {workload.label} | {'-' if base_ms is None else f'{base_ms:.3f}'} | "
                   f"`{best}` | {best_ms:.3f} | {gain} |")  # fmt: skip
            lines.append(row)
            print(row)
    table = tuning.CardTable(card, tuple(capability), sms, chosen)
    if not args.dry_run and chosen:
        path = tuning.write_user_table(table)
        lines += ["", f"Written to {path}; `python -m lightning_attention check` reports the table in use."]
        print(lines[-1])
    if args.out:
        from lightning_attention.bench.environment import card_folder

        folder = os.path.join(args.out, card_folder(card))
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "tuning.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0
