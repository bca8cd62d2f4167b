"""Context parallelism on GPUs: correctness at real sizes and scaling of forward+backward over 1, 2, 4 GPUs.

Run under torchrun, one process per GPU (benchmarks/context_parallel.sh runs 1, 2 and 4 and the report)::

    torchrun --standalone --nproc_per_node=4 benchmarks/bench_context_parallel.py --out OUT/cp_P4.json
    python benchmarks/bench_context_parallel.py --report OUT [--results benchmarks/results]
        # -> OUT/context_parallel.md, and a copy in benchmarks/results/<card>x<GPUs>/context_parallel.md

Per launch (P = world size):
  check   B=1, T=--check-tokens, H=32, D=128, bf16, with h0 and final state, one sequence, packed documents
          (1 to T/4 tokens, one empty), and the packed documents with per-token gates g (float32 log-sigmoid
          gates plus 'tnl' g_gamma): every rank's shard of o, dq, dk, dv (dg) and the final states / dh0 against
          the float64 torch engine on the full axis, judged against the single-GPU op in bf16 on the same inputs
          (the library's tolerance rule: err <= 2 x baseline + 1e-6).
  bench   forward+backward at each T: one sequence (--tokens with the 'tnl' decay, --no-decay-tokens with g = 0,
          --gates-tokens with per-token gates as in the check) and packed documents (--packed-tokens: lengths
          drawn uniformly from --doc-lengths, seeded, crossing the shard boundaries). For each: the single-GPU op
          on this rank's shard alone (its documents only; no communication: the ideal), then context parallelism
          over the P ranks; median over --iters, the
          slowest rank. With P = 1 the first is the single-GPU baseline. Out-of-memory is caught and reported.
  costs   the call-signature exchange (collectives.agree: the check that ranks agree, once per forward) and one
          state all-gather, alone, median over --exchange-iters.
Results go to one JSON per launch (rank 0), rewritten after each measurement so a killed launch keeps what it did.
``--device cpu`` runs the same on CPU with gloo (the torch engine) at tiny sizes: a smoke test of this script.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import subprocess
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from lightning_attention import chunk_simple_gla, decay
from lightning_attention.bench.environment import card_folder, environment
from lightning_attention.distributed import collectives, context_parallel_simple_gla, local_state
from lightning_attention.distributed.plan import ShardPlan
from lightning_attention.testing import make_inputs

H, D = 32, 128
DEVICE = torch.device("cuda")  # --device cpu (gloo, torch engine) is for a smoke test of this script only
LAYER_IDX, NUM_LAYERS = 2, 8  # 'tnl' layer 2 of 8: head 0 undecayed, the others decaying
TOKENS = [131072, 524288, 1048576, 4194304]
#: Context parallelism is skipped where the shard alone already used more of the card than this: a rank running
#: out of memory inside a collective would leave the others waiting until the process group's timeout.
MEMORY_MARGIN = 0.92


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def pick_backend(wanted: str) -> tuple[str, str]:
    """("triton", "") when the Triton engine imports and runs a small call here, else ("torch", why).
    ``wanted``: "auto" (Triton on CUDA), or "torch" / "triton" to force one (CPU: Triton needs TRITON_INTERPRET=1)."""
    if wanted == "torch" or (wanted == "auto" and DEVICE.type != "cuda"):
        return "torch", "asked for" if wanted == "torch" else "CPU smoke test"
    try:
        from lightning_attention.engines import get_engine, resolve_backend

        backend = resolve_backend("triton" if wanted == "triton" else "auto", DEVICE)
        if backend != "triton":
            return "torch", "Triton not importable"
        get_engine("triton", "chunk")
        q, k, v, _ = make_inputs(1, 256, 2, 64, dtype=torch.bfloat16, device=DEVICE)
        chunk_simple_gla(q, k, v, g_gamma=torch.full((2,), -0.1, device=DEVICE), backend="triton")
        sync()
        return "triton", ""
    except Exception as exc:  # any failure of the Triton path: measure the torch engine instead, and say so
        first_line = str(exc).splitlines()[0][:160] if str(exc) else ""
        return "torch", f"Triton engine failed: {type(exc).__name__}: {first_line}"


def shard_bounds(T: int, rank: int, world: int) -> tuple[int, int]:
    return T * rank // world, T * (rank + 1) // world


def packed_documents(T: int, low: int, high: int) -> tuple[int, ...]:
    """``cu_seqlens`` values of documents with lengths uniform in [low, high] (seeded), the last cut at T."""
    rng = random.Random(T)
    bounds = [0]
    while bounds[-1] < T:
        bounds.append(min(T, bounds[-1] + rng.randint(low, high)))
    return tuple(bounds)


def global_rel_errs(pairs: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]], group) -> dict[str, tuple]:
    """Relative errors over the whole sharded tensor: ``(err(cp, ref64), err(single, ref64), err(cp, single))``.
    Each entry is ``(cp, ref64, single)`` on this rank; squared norms are summed over the group."""
    names = sorted(pairs)
    sums = torch.zeros(len(names), 4, dtype=torch.float64, device=DEVICE)
    for i, name in enumerate(names):
        cp, ref, single = (t.double() for t in pairs[name])
        sums[i] = torch.stack([(cp - ref).norm(), (single - ref).norm(), (cp - single).norm(), ref.norm()]) ** 2
    dist.all_reduce(sums, group=group)
    out = {}
    for i, name in enumerate(names):
        den = sums[i, 3].sqrt().item()
        out[name] = tuple((sums[i, j].sqrt().item() / den) if den > 0 else 0.0 for j in range(3))
    return out


def gate_values(T: int, seed: int) -> torch.Tensor:
    """Per-token log gates ``[1, T, H]`` float32: log-sigmoid of a unit normal (between about -4 and 0)."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    return torch.nn.functional.logsigmoid(torch.randn(1, T, H, device=DEVICE, generator=gen))


def check(T: int, backend: str, rank: int, world: int, packed: bool, gated: bool = False) -> dict:
    """Correctness of o, dq, dk, dv (dg), final state, dh0 at B=1, T, H, D bf16 (see module docstring);
    ``packed``: documents of 1 to T/4 tokens and one empty, across the shard boundaries; ``gated``: per-token
    gates too."""
    g = decay.g_gamma(H, LAYER_IDX, NUM_LAYERS, device=DEVICE)
    gates = gate_values(T, 3) if gated else None
    bounds = packed_documents(T, 1, T // 4) if packed else (0, T)
    if packed:
        bounds = (*bounds[:2], bounds[1], *bounds[2:])  # an empty document after the first
    cu = torch.tensor(bounds, dtype=torch.int32, device=DEVICE) if packed else None
    N = len(bounds) - 1
    q, k, v, h0 = make_inputs(1, T, H, D, dtype=torch.bfloat16, device=DEVICE, seed=1, initial_state=True, num_seqs=N)
    gen = torch.Generator(device=DEVICE).manual_seed(2)
    do = torch.randn(1, T, H, D, device=DEVICE, generator=gen).to(torch.bfloat16)
    dfinal = torch.randn(world, N, H, D, D, device=DEVICE, generator=gen)  # a different weight per rank
    start, end = shard_bounds(T, rank, world)

    def full(dtype, engine):
        leaves = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v)]
        leaves.append(h0.detach().to(torch.float64 if dtype == torch.float64 else h0.dtype).requires_grad_(True))
        if gated:
            leaves.append(gates.to(torch.float64 if dtype == torch.float64 else gates.dtype).requires_grad_(True))
        o, final = chunk_simple_gla(
            *leaves[:3], leaves[4] if gated else None, g, initial_state=leaves[3], output_final_state=True,
            cu_seqlens=cu, backend=engine,
        )  # fmt: skip
        grads = torch.autograd.grad((o, final), leaves, (do.to(dtype), dfinal.sum(0).to(final.dtype)))
        return o.detach(), final.detach(), grads

    shard = [t[:, start:end].clone().requires_grad_(True) for t in (q, k, v)]  # q, k, v: no grad
    my_h0 = h0.clone().requires_grad_(True)
    my_gates = gates[:, start:end].clone().requires_grad_(True) if gated else None
    o, final = context_parallel_simple_gla(
        *shard, my_gates, g, initial_state=my_h0, output_final_state=True, cu_seqlens=cu, backend=backend
    )
    leaves = (*shard, my_h0) + ((my_gates,) if gated else ())
    grads = torch.autograd.grad((o, final), leaves, (do[:, start:end], dfinal[rank]))
    dh0 = grads[3].clone()
    dist.all_reduce(dh0)  # the parts sum to the full gradient
    o_one, final_one, g_one = full(torch.bfloat16, backend)
    o_ref, final_ref, g_ref = full(torch.float64, "torch")  # last: the largest
    sl = slice(start, end)
    pairs = {"o": (o, o_ref[:, sl], o_one[:, sl])}
    for i, name in ((0, "dq"), (1, "dk"), (2, "dv"), (4, "dg"))[: 4 if gated else 3]:
        pairs[name] = (grads[i], g_ref[i][:, sl], g_one[i][:, sl])
    errs = global_rel_errs(pairs, None)
    replicated = (("final", final, final_ref, final_one), ("dh0 (sum over ranks)", dh0, g_ref[3], g_one[3]))
    for name, cp, ref, one in replicated:
        errs[name] = (rel(cp, ref), rel(one, ref), rel(cp, one))
    return {
        name: {"cp_vs_ref64": e[0], "single_vs_ref64": e[1], "cp_vs_single": e[2], "ok": e[0] <= 2 * e[1] + 1e-6}
        for name, e in errs.items()
    }


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    den = ref.norm().item()
    return (a - ref).norm().item() / den if den > 0 else (a - ref).norm().item()


def time_fwd_bwd(fn, q, k, v, do, iters: int, collective: bool, gates=None) -> float:
    """Median seconds of fn + backward on this rank (2 warm-ups first; with ``gates``, fn(q, k, v, gates) and dg
    too). ``collective``: fn communicates, so the ranks start each step together (a barrier); a local fn never
    waits for other ranks."""
    inputs = (q, k, v) if gates is None else (q, k, v, gates)

    def step():
        o = fn(*inputs)
        torch.autograd.grad(o, inputs, do)

    for _ in range(2):
        step()
    times = []
    for _ in range(iters):
        if collective:
            dist.barrier()
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def slowest(seconds: float | None) -> float | None:
    """Max over ranks; None (failed) anywhere -> None everywhere."""
    t = torch.tensor([float("inf") if seconds is None else seconds], device=DEVICE, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return None if t.item() == float("inf") else t.item()


#: Decays timed: the benchmark's schedule, and no decay at all (g = 0: the local-state pass must read every
#: token of every head, its worst case).
DECAYS = {
    "tnl": lambda: decay.g_gamma(H, LAYER_IDX, NUM_LAYERS, device=DEVICE),
    "none": lambda: torch.zeros(H, device=DEVICE),
}


def bench(T: int, layout: str, backend: str, rank: int, world: int, iters: int, doc_lengths) -> dict:
    """``layout``: "tnl" / "none" (one sequence, that decay), "gates" (one sequence, 'tnl' decay and per-token
    gates) or "packed" (documents, 'tnl' decay)."""
    g = DECAYS["none" if layout == "none" else "tnl"]()
    start, end = shard_bounds(T, rank, world)
    out = {"tokens": T, "layout": layout}
    cu = local_cu = None
    if layout == "packed":
        bounds = packed_documents(T, *doc_lengths)
        out["documents"] = len(bounds) - 1
        cu = torch.tensor(bounds, dtype=torch.int32, device=DEVICE)
        plan = ShardPlan(tuple(e - s for s, e in (shard_bounds(T, r, world) for r in range(world))), bounds, False, rank)
        local_cu = torch.tensor(plan.local_bounds(rank), dtype=torch.int32, device=DEVICE) if end > start else None
    try:  # generated on the device: make_inputs draws float64 on the host, slow at a million tokens
        q, k, v, do = (torch.randn(1, end - start, H, D, device=DEVICE, dtype=torch.bfloat16) for _ in range(4))
        for t in (q, k, v):
            t.requires_grad_(True)
        gates = gate_values(end - start, rank).requires_grad_(True) if layout == "gates" else None
    except torch.cuda.OutOfMemoryError:
        q = k = v = do = gates = None

    def timed(fn, run: bool, collective: bool) -> float | None:
        """Slowest rank's median seconds, None if out of memory on any rank (or not run)."""
        seconds = None
        if run:
            try:
                seconds = time_fwd_bwd(fn, q, k, v, do, iters, collective, gates)
            except torch.cuda.OutOfMemoryError:
                seconds = None
            empty_cache()
        return slowest(seconds)

    def local_fn(q, k, v, gates=None):  # 1) the single-GPU op on this rank's shard alone: the ideal
        return chunk_simple_gla(q, k, v, gates, g, cu_seqlens=local_cu, backend=backend)[0]

    def cp_fn(q, k, v, gates=None):  # 2) context parallel over the group
        return context_parallel_simple_gla(q, k, v, gates, g, cu_seqlens=cu, backend=backend)[0]

    out["local_s"] = timed(local_fn, q is not None, False)
    room = memory_room()
    if DEVICE.type == "cuda":
        out["local_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    # Skipped (None) where any rank could not run its shard alone, or nearly filled its card doing so, so that
    # no rank is left waiting in a collective.
    out["cp_s"] = timed(cp_fn, out["local_s"] is not None and room, True)
    if DEVICE.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    return out


def memory_room() -> bool:
    """Every rank's peak so far stayed under MEMORY_MARGIN of its card (always True on CPU)."""
    fits = 1.0
    if DEVICE.type == "cuda":
        fits = float(torch.cuda.max_memory_allocated() < MEMORY_MARGIN * torch.cuda.get_device_properties(DEVICE).total_memory)
    t = torch.tensor([fits], device=DEVICE)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t.item() == 1.0


def empty_cache() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()


def median_seconds(fn, iters: int) -> float:
    times = []
    for _ in range(iters):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return slowest(sorted(times)[len(times) // 2])


def exchange_costs(world: int, rank: int, iters: int) -> dict:
    """The per-call collectives alone: the call-signature exchange (an all-gather of a few int64 and one host
    read, as every forward does it) and one all-gather of the forward's state (B=1: H*D*D fp32)."""
    g = decay.g_gamma(H, LAYER_IDX, NUM_LAYERS, device=DEVICE)
    signature = collectives.Signature(
        tokens=524288 // world, batch=1, heads=H, k_dim=D, v_dim=D, dtype=torch.bfloat16, device_type=DEVICE.type,
        initial_state=False, output_final_state=False, reverse=False, chunk_size=64, scale=D**-0.5, num_seqs=-1,
        cu_seqlens=0, needs_grad=True, gates=None,
    )  # fmt: skip
    state = torch.randn(1, H, D, D, device=DEVICE)
    agree = lambda: collectives.agree(signature, g, DEVICE, None, world, rank)  # noqa: E731
    gather = lambda: collectives.all_gather_rows(state, None, world, "benchmark all-gather")  # noqa: E731
    for fn in (agree, gather):
        fn()  # warm-up
    return {"signature_s": median_seconds(agree, iters), "state_allgather_s": median_seconds(gather, iters)}


def run_launch(args) -> None:
    global DEVICE, H, D
    H, D = args.heads, args.head_dim
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if args.device == "cuda":
        DEVICE = torch.device("cuda", local_rank)
        torch.cuda.set_device(DEVICE)
        dist.init_process_group("nccl", device_id=DEVICE, timeout=timedelta(seconds=180))
    else:
        DEVICE = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timedelta(seconds=180))
    rank, world = dist.get_rank(), dist.get_world_size()
    backend, note = pick_backend(args.backend)
    flag = torch.tensor([1 if backend == "triton" else 0], device=DEVICE)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)  # every rank must use the same engine
    if flag.item() == 0 and backend == "triton":
        backend, note = "torch", "Triton engine failed on another rank"
    result = {
        "world_size": world,
        "shape": f"B=1, H={H}, D={D}, bf16",
        "backend": backend,
        "backend_note": note,
        "local_state_kernel": None,
        **environment(DEVICE),  # card, driver, torch, triton, python
        "nccl": nccl_version(),
        "command": "torchrun --standalone --nproc_per_node={} {}".format(world, " ".join(sys.argv)),
        "doc_lengths": list(args.doc_lengths),
        "check": None,
        "bench": {},
    }

    def save():
        result["local_state_kernel"] = local_state.triton_status() or "not used (torch)"
        if rank == 0:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)

    if rank == 0:
        print(f"[P={world}] backend={backend} {note}", flush=True)
    result.update(exchange_costs(world, rank, args.exchange_iters))
    save()
    if args.check_tokens:
        result["check_tokens"] = args.check_tokens
        result["check"] = {}
        for layout in ("one sequence", "packed documents", "packed documents, gates"):
            t0 = time.time()
            errs = check(args.check_tokens, backend, rank, world, layout != "one sequence", layout.endswith("gates"))
            result["check"].update({f"{layout}: {name}": e for name, e in errs.items()})
            if rank == 0:
                print(f"[P={world}] check {layout} T={args.check_tokens} in {time.time() - t0:.1f}s: {errs}", flush=True)
            empty_cache()
            save()
    runs = [(T, "tnl") for T in args.tokens] + [(T, "none") for T in args.no_decay_tokens]
    runs += [(T, "gates") for T in args.gates_tokens]
    runs += [(T, "packed") for T in args.packed_tokens]
    for T, layout in runs:
        t0 = time.time()
        key = f"{T}-{layout}"
        result["bench"][key] = bench(T, layout, backend, rank, world, args.iters, args.doc_lengths)
        if rank == 0:
            print(f"[P={world}] {key}: {result['bench'][key]} ({time.time() - t0:.1f}s)", flush=True)
        save()
    dist.barrier()
    dist.destroy_process_group()


def nccl_version() -> str:
    try:
        version = torch.cuda.nccl.version()
    except Exception as exc:  # no NCCL in this build (CPU smoke test)
        return f"n/a ({type(exc).__name__})"
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def gpu_lines() -> list[str]:
    try:
        text = subprocess.run(
            ["nvidia-smi", "--query-gpu=index,name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        text = f"nvidia-smi failed: {exc}"
    return text.splitlines() or ["nvidia-smi printed nothing"]


LAYOUT_NAMES = {
    "tnl": "one sequence, 'tnl' decay",
    "none": "one sequence, no decay",
    "gates": "one sequence, 'tnl' decay and per-token gates",
    "packed": "packed documents, 'tnl' decay",
}


def _launches(out_dir: str) -> dict[int, dict]:
    """World size -> the JSON of that launch, from ``out_dir/cp_P*.json``."""
    launches = {}
    for path in sorted(glob.glob(os.path.join(out_dir, "cp_P*.json"))):
        with open(path) as f:
            data = json.load(f)
        launches[data["world_size"]] = data
    return launches


def results_folder(out_dir: str) -> str | None:
    """The results folder of the launches in ``out_dir``: their card and the most GPUs of a launch ("h100x4");
    None without a launch."""
    launches = _launches(out_dir)
    if not launches:
        return None
    most = max(launches)
    return card_folder(launches[most]["card"], most)


def report(out_dir: str) -> str:
    """Markdown from the launches' JSON files in ``out_dir`` (written there as context_parallel.md)."""
    launches = _launches(out_dir)
    shapes = sorted({data.get("shape", "") for data in launches.values()})
    lines = [f"# Context parallelism: forward+backward scaling over GPUs ({'; '.join(shapes) or 'no results'})", ""]
    lines += ["GPUs (nvidia-smi: index, name, memory, driver):", ""] + [f"- {line}" for line in gpu_lines()] + [""]
    if not launches:
        return "\n".join(lines + ["No launch produced results (see context_parallel.log)."]) + "\n"
    any_launch = next(iter(launches.values()))
    lines.append(
        f"torch {any_launch['torch']}, triton {any_launch.get('triton', '?')}, Python {any_launch.get('python', '?')}, "
        f"NCCL {any_launch['nccl']}, driver {any_launch.get('driver', '?')}, "
        f"card seen by torch: {any_launch['card']}. Made by benchmarks/context_parallel.sh; each launch:"
    )
    lines += ["", "```"] + [data.get("command", "?") for _, data in sorted(launches.items())] + ["```", ""]
    for P, data in sorted(launches.items()):
        note = f" ({data['backend_note']})" if data["backend_note"] else ""
        costs = ""
        if P > 1 and "signature_s" in data:
            costs = (
                f"; call-signature exchange {data['signature_s'] * 1e6:.0f} us, "
                f"state all-gather {data['state_allgather_s'] * 1e6:.0f} us"
            )
            step = data["bench"].get("524288-tnl", {}).get("cp_s")
            if step:
                costs += f" (the exchange is {data['signature_s'] / step * 100:.2f}% of the 512k step)"
        lines.append(f"- P={P}: engine **{data['backend']}**{note}; local-state kernel (Triton): "
                     f"{data['local_state_kernel']}{costs}")  # fmt: skip
    low, high = any_launch.get("doc_lengths", ["?", "?"])
    lines += [
        "",
        f"Decay 'tnl' = layer {LAYER_IDX} of {NUM_LAYERS} (head 0 undecayed, the rest decaying); 'no decay' = g = 0 "
        f"for every head (worst case of the local-state pass); gates: float32 log-sigmoid gates per token added to "
        "'tnl' (fwd+bwd includes dg); packed documents: lengths uniform in [{low}, {high}] "
        "(seeded), across the shard boundaries. Times: median fwd+bwd of the slowest rank. 'shard alone' = the "
        "single-GPU op on one rank's shard (its documents) alone, no communication: the ideal for P GPUs. "
        "Speedup = tokens/s of CP on P GPUs / tokens/s of the single-GPU op on 1 GPU at the same T and layout. "
        "'skipped' = not run: a shard alone ran out of memory, or came within "
        f"{(1 - MEMORY_MARGIN) * 100:.0f}% of the card.",
        "",
        "| T | layout | GPUs | shard alone (ms) | context parallel (ms) | CP overhead vs shard alone "
        "| Mtokens/s | speedup vs 1 GPU | peak GiB (rank 0) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    order = {"tnl": 0, "gates": 1, "packed": 2, "none": 3}
    keys = {
        key: (order.get(r.get("layout", r.get("decay")), len(order)), r["tokens"])
        for data in launches.values()
        for key, r in data["bench"].items()
    }
    for key in sorted(keys, key=keys.get):
        base = launches.get(1, {}).get("bench", {}).get(key, {}).get("local_s")
        T, layout = key.split("-")
        for P, data in sorted(launches.items()):
            r = data["bench"].get(key)
            name = LAYOUT_NAMES.get(layout, layout)
            if r is None:
                lines.append(f"| {T} | {name} | {P} | not run | not run | | | | |")
                continue
            if "documents" in r:
                name += f" ({r['documents']} documents)"
            local, cp = r["local_s"], r["cp_s"]
            fmt = lambda s: "OOM" if s is None else f"{s * 1e3:.2f}"  # noqa: E731
            cp_cell = fmt(cp) if local is not None and cp is not None else ("skipped" if local is not None else "OOM")
            over = "" if local is None or cp is None else f"{(cp / local - 1) * 100:+.1f}%"
            rate = "" if cp is None else f"{r['tokens'] / cp / 1e6:.1f}"
            speed = "" if cp is None or base is None else f"{base / cp:.2f}x"
            peak = f"{r['peak_gib']:.1f}" if "peak_gib" in r else ""
            cells = [r["tokens"], name, P, fmt(local), cp_cell, over, rate, speed, peak]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
    lines += ["", "## Correctness at real size (relative errors over the whole sequence)", ""]
    lines += [
        "| GPUs | T | tensor | CP vs fp64 | single-GPU op vs fp64 | CP vs single-GPU op | CP <= 2x single + 1e-6 |",
        "|---|---|---|---|---|---|---|",
    ]
    for P, data in sorted(launches.items()):
        for name, e in (data.get("check") or {}).items():
            lines.append(
                f"| {P} | {data['check_tokens']} | {name} | {e['cp_vs_ref64']:.2e} | {e['single_vs_ref64']:.2e} | "
                f"{e['cp_vs_single']:.2e} | {'yes' if e['ok'] else 'NO'} |"
            )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="cp.json", help="JSON file for this launch (rank 0 writes it)")
    parser.add_argument("--tokens", type=int, nargs="*", default=TOKENS, help="sequence lengths to time")
    parser.add_argument("--no-decay-tokens", type=int, nargs="*", default=[524288], help="also time these with g = 0")
    parser.add_argument(
        "--gates-tokens", type=int, nargs="*", default=[524288], help="also time these with per-token gates g"
    )
    parser.add_argument(
        "--packed-tokens", type=int, nargs="*", default=[524288, 1048576], help="packed-document batches to time"
    )
    parser.add_argument("--doc-lengths", type=int, nargs=2, default=(8192, 65536), metavar=("MIN", "MAX"))
    parser.add_argument(
        "--check-tokens",
        type=int,
        default=65536,
        help="T of the correctness check (0: skip); its float64 torch reference keeps K x V states per chunk "
        "(tens of GB at 128k tokens, H=32, D=128)",
    )
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--exchange-iters", type=int, default=50, help="repeats of the collectives timed alone")
    parser.add_argument("--backend", choices=["auto", "torch", "triton"], default="auto")
    parser.add_argument("--heads", type=int, default=H)
    parser.add_argument("--head-dim", type=int, default=D)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: gloo smoke test of this script")
    parser.add_argument("--report", metavar="OUT_DIR", help="only write OUT_DIR/context_parallel.md from cp_P*.json")
    parser.add_argument(
        "--results", metavar="ROOT", default="", help="with --report: also ROOT/<card>x<GPUs>/context_parallel.md"
    )
    args = parser.parse_args()
    if args.report:
        text = report(args.report)
        paths = [os.path.join(args.report, "context_parallel.md")]
        folder = results_folder(args.report)
        if args.results and folder:
            paths.append(os.path.join(args.results, folder, "context_parallel.md"))
        for path in paths:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(text)
        print(text + f"written: {', '.join(paths)}")
        return 0
    run_launch(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
