"""Recurrent op vs chunked op across T, the recurrent kernel's tile sweep, and prefill vs the chunked op (CUDA).

1. Forward of the fused recurrent kernel alone (token loop), the chunked engine, and the public recurrent op
   (which routes to the chunked engine above RECURRENT_TRITON_MAX_T tokens per sequence) for T = 64..8192;
   forward + backward of the public recurrent op vs the chunked op. The crossover T is where the loop first
   loses to the chunked engine: the routing threshold in engines/triton/recurrent.py.
2. ``--sweep``: (state tile, num_warps) of the recurrent kernel at a short T.
3. Prefill into cache slots (lightning_attn_prefill: reads the initial states from the slots, writes the
   final states back) vs chunk_simple_gla on the same packed batch with initial_state and final state tensors
   (which leaves the gather/scatter to the caller): long prompts and many short ones.

    python benchmarks/bench_recurrent.py [--sweep] [--out DIR]     (writes DIR/<card>/recurrent.md and .json)
    TRITON_INTERPRET=1 python benchmarks/bench_recurrent.py --smoke    (checks the script on the CPU;
                                                                       tests/bench/test_recurrent.py)

Timers, the smoke mode and the device are those of :mod:`lightning_attention.bench.serving`.
"""

from __future__ import annotations

import argparse

import torch

from lightning_attention import decay, serving
from lightning_attention._validation import ScanConfig
from lightning_attention.bench import serving as common
from lightning_attention.bench.environment import Table, environment, header, publish
from lightning_attention.engines.triton import recurrent, tuning
from lightning_attention.ops import chunk_simple_gla, fused_recurrent_simple_gla

K = V = 128
T_SWEEP = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
TRAIN_FROM_T = 1024  # forward + backward timed from this T on
SHAPES = ((4, 16), (16, 32))  # (B, H)
TILE_SWEEP = [(4096, 4), (2048, 2), (2048, 4), (4096, 8), (8192, 8), (1024, 1)]
TILE_SHAPE = (4, 16, 256)  # (B, H, T) of the tile sweep
#: (sequences, tokens each, H)
PREFILL_CASES = ((8, 2048, 32), (64, 128, 32), (128, 64, 32), (128, 32, 32), (256, 16, 32))


def smoke_mode() -> None:
    global K, V, T_SWEEP, TRAIN_FROM_T, SHAPES, TILE_SWEEP, TILE_SHAPE, PREFILL_CASES
    common.smoke_mode()
    K = V = 16
    T_SWEEP, TRAIN_FROM_T, SHAPES, PREFILL_CASES = (8, 24), 24, ((1, 2),), ((2, 24, 2),)
    TILE_SWEEP, TILE_SHAPE = TILE_SWEEP[:2], (1, 2, 8)


def _ms(fn) -> float:
    return common.bench_ms(fn, warmup=10, rep=60)


def _inputs(B, T, H, seed=0, requires_grad=False):
    gen = torch.Generator(device=common.DEVICE).manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, K, device=common.DEVICE, generator=gen).bfloat16() for _ in range(3))
    h0 = torch.randn(B, H, K, V, device=common.DEVICE, generator=gen)
    for t in (q, k, v, h0):
        t.requires_grad_(requires_grad)
    return q, k, v, h0


def _fwd_bwd(op, q, k, v, h0, g_gamma):
    o, final = op(q, k, v, g_gamma=g_gamma, initial_state=h0, output_final_state=True)
    torch.autograd.backward((o, final), (torch.ones_like(o), torch.ones_like(final)))


def bench_t_sweep(rows, table):
    chunk_engine = recurrent.chunk.ENGINE
    table.add("| B | H | T | loop fwd ms | chunked fwd ms | loop / chunked | recurrent op fwd ms "
              "| op / chunked op fwd+bwd |",
              "|---|---|---|---|---|---|---|---|")
    for B, H in SHAPES:
        g = decay.g_gamma(H, 0, 24, device=common.DEVICE)
        cfg = ScanConfig(K**-0.5, False, 64, True)
        for T in T_SWEEP:
            q, k, v, h0 = _inputs(B, T, H)
            loop = _ms(lambda: recurrent.TOKEN_LOOP.forward(q, k, v, g, cfg, h0, None))
            chunked = _ms(lambda: chunk_engine.forward(q, k, v, g, cfg, h0, None))
            op = _ms(lambda: fused_recurrent_simple_gla(q, k, v, g_gamma=g, initial_state=h0, output_final_state=True))
            ratio_train = None
            if T >= TRAIN_FROM_T:
                qg, kg, vg, hg = _inputs(B, T, H, requires_grad=True)
                # Alternated and repeated, best of 3 each: at small B*H both ops run the same kernels and host
                # overhead decides, so one median each measured a 1.34x "difference" that was noise.
                times = {op_fn: [] for op_fn in (fused_recurrent_simple_gla, chunk_simple_gla)}
                for _ in range(3):
                    for op_fn in times:
                        times[op_fn].append(_ms(lambda: _fwd_bwd(op_fn, qg, kg, vg, hg, g)))
                ratio_train = min(times[fused_recurrent_simple_gla]) / min(times[chunk_simple_gla])
            rows.append(dict(B=B, H=H, T=T, loop_ms=loop, chunk_ms=chunked, op_ms=op,
                             op_over_chunk_fwd_bwd=ratio_train))
            train = "" if ratio_train is None else f"{ratio_train:.2f}"
            table.add(f"| {B} | {H} | {T} | {loop:.3f} | {chunked:.3f} | {loop / chunked:.2f} | {op:.3f} | {train} |")
        same = [r for r in rows if r.get("B") == B and r.get("H") == H]
        crossover = next((r["T"] for r in same if r["loop_ms"] > r["chunk_ms"]), None)
        table.add(f"| {B} | {H} | crossover (first T where the loop is slower): {crossover} | | | | | |")


def bench_tile_sweep(rows, table):
    B, H, T = TILE_SHAPE
    g = decay.g_gamma(H, 0, 24, device=common.DEVICE)
    cfg = ScanConfig(K**-0.5, False, 64, True)
    q, k, v, h0 = _inputs(B, T, H)
    table.add("", f"recurrent kernel tile sweep, B={B} H={H} T={T}", "", "| state tile | warps | fwd ms |",
              "|---|---|---|")
    for state_tile, num_warps in TILE_SWEEP:
        candidate = {"recurrent": {"any": dict(state_tile=state_tile, num_warps=num_warps)}}
        with tuning.using(tuning.CardTable("candidate", (0, 0), 0, candidate)):
            ms = _ms(lambda: recurrent.TOKEN_LOOP.forward(q, k, v, g, cfg, h0, None))
        rows.append(dict(tile_sweep=(state_tile, num_warps), T=T, B=B, H=H, loop_ms=ms))
        table.add(f"| {state_tile} | {num_warps} | {ms:.3f} |")


def bench_prefill(rows, table):
    table.add("", "prefill into slots vs chunk_simple_gla (initial_state + final state tensors), bf16 inputs, "
              "fp32 cache",
              "", "| sequences x tokens | H | prefill ms | chunked op ms | ratio |", "|---|---|---|---|---|")
    dev = common.DEVICE
    for N, L, H in PREFILL_CASES:
        g = decay.g_gamma(H, 0, 24, device=dev)
        q, k, v, _ = _inputs(1, N * L, H)
        cu = torch.arange(0, N * L + 1, L, device=dev, dtype=torch.int32)
        cache = torch.randn(2 * N, H, K, V, device=dev)
        slots = torch.randperm(2 * N, device=dev)[:N]
        use = torch.ones(N, dtype=torch.bool, device=dev)
        h0 = torch.randn(N, H, K, V, device=dev)
        prefill = _ms(lambda: serving.lightning_attn_prefill(q, k, v, cu, cache, slots, g, None, use))
        chunked = _ms(lambda: chunk_simple_gla(q, k, v, g_gamma=g, initial_state=h0, output_final_state=True,
                                               cu_seqlens=cu))
        rows.append(dict(prefill_N=N, L=L, H=H, prefill_ms=prefill, chunk_ms=chunked))
        table.add(f"| {N} x {L} | {H} | {prefill:.3f} | {chunked:.3f} | {prefill / chunked:.2f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true", help="also sweep the recurrent kernel's tile")
    parser.add_argument("--out", default="benchmarks/results", help="results root ('' for none)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU interpreter: checks the script")
    args = parser.parse_args(argv)
    if args.smoke:
        smoke_mode()
    env = environment(common.DEVICE)
    rows, table = [], Table()
    notes = f"threshold RECURRENT_TRITON_MAX_T = {recurrent.RECURRENT_TRITON_MAX_T}, K = V = {K}, bf16 inputs"
    table.add(*header("Recurrent op: token loop vs chunked kernels", env, notes))
    bench_t_sweep(rows, table)
    if args.sweep:
        bench_tile_sweep(rows, table)
    bench_prefill(rows, table)
    return publish(args.out, "recurrent", env, table, dict(environment=env, rows=rows), echo=False)


if __name__ == "__main__":
    raise SystemExit(main())
