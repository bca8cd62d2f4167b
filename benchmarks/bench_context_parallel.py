"""Context parallelism on GPUs: correctness at real sizes and scaling of forward+backward over 1, 2, 4 GPUs.

Run under torchrun, one process per GPU (benchmarks/gpu/context_parallel.sh runs 1, 2 and 4 and the report)::

    torchrun --standalone --nproc_per_node=4 benchmarks/bench_context_parallel.py --out cp_P4.json
    python benchmarks/bench_context_parallel.py --report OUT_DIR      # -> OUT_DIR/context_parallel.md

Per launch (P = world size):
  check  B=1, T=--check-tokens, H=32, D=128, bf16, with h0 and final state: every rank's shard of o, dq, dk,
         dv and the final state / dh0 against the float64 torch engine on the full sequence, judged against the
         single-GPU op in bf16 on the same inputs (the library's tolerance rule: err <= 2 x baseline + 1e-6).
  bench  for each T (--tokens with the 'tnl' decay, --no-decay-tokens with g = 0): forward+backward of the
         single-GPU op on this rank's shard alone (no communication: the ideal), then of context parallelism
         over the P ranks; median over --iters, the slowest rank.
         With P = 1 the first is the single-GPU baseline. Out-of-memory is caught and reported per T.
Results go to one JSON per launch (rank 0), rewritten after each measurement so a killed launch keeps what it did.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from lightning_attention import chunk_simple_gla, decay
from lightning_attention.distributed import context_parallel_simple_gla
from lightning_attention.distributed import local_state
from lightning_attention.testing import make_inputs

H, D = 32, 128
DEVICE = torch.device("cuda")  # --device cpu (gloo, torch engine) is for a smoke test of this script only
LAYER_IDX, NUM_LAYERS = 2, 8  # 'tnl' layer 2 of 8: head 0 undecayed, the others decaying
TOKENS = [131072, 524288, 1048576]


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


def check(T: int, backend: str, rank: int, world: int) -> dict:
    """Correctness of o, dq, dk, dv, final state, dh0 at B=1, T, H, D bf16 (see module docstring)."""
    g = decay.g_gamma(H, LAYER_IDX, NUM_LAYERS, device=DEVICE)
    q, k, v, h0 = make_inputs(1, T, H, D, dtype=torch.bfloat16, device=DEVICE, seed=1, initial_state=True)
    gen = torch.Generator(device=DEVICE).manual_seed(2)
    do = torch.randn(1, T, H, D, device=DEVICE, generator=gen).to(torch.bfloat16)
    dfinal = torch.randn(world, 1, H, D, D, device=DEVICE, generator=gen)  # a different weight per rank
    start, end = shard_bounds(T, rank, world)

    def full(dtype, engine):
        leaves = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v)]
        leaves.append(h0.detach().to(torch.float64 if dtype == torch.float64 else h0.dtype).requires_grad_(True))
        o, final = chunk_simple_gla(
            *leaves[:3], g_gamma=g, initial_state=leaves[3], output_final_state=True, backend=engine
        )
        grads = torch.autograd.grad((o, final), leaves, (do.to(dtype), dfinal.sum(0).to(final.dtype)))
        return o.detach(), final.detach(), grads

    shard = [t[:, start:end].clone().requires_grad_(True) for t in (q, k, v)]  # q, k, v: no grad
    my_h0 = h0.clone().requires_grad_(True)
    o, final = context_parallel_simple_gla(*shard, g, None, my_h0, True, backend=backend)
    grads = torch.autograd.grad((o, final), (*shard, my_h0), (do[:, start:end], dfinal[rank]))
    dh0 = grads[3].clone()
    dist.all_reduce(dh0)  # the shares sum to the full gradient
    o_one, final_one, g_one = full(torch.bfloat16, backend)
    o_ref, final_ref, g_ref = full(torch.float64, "torch")  # last: the largest
    sl = slice(start, end)
    pairs = {"o": (o, o_ref[:, sl], o_one[:, sl])}
    for i, name in enumerate(("dq", "dk", "dv")):
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


def time_fwd_bwd(fn, q, k, v, do, iters: int, collective: bool) -> float:
    """Median seconds of fn + backward on this rank (2 warm-ups first). ``collective``: fn communicates, so
    the ranks start each step together (a barrier); a local fn never waits for other ranks."""

    def step():
        o = fn(q, k, v)
        torch.autograd.grad(o, (q, k, v), do)

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


def bench(T: int, decay_name: str, backend: str, rank: int, world: int, iters: int) -> dict:
    g = DECAYS[decay_name]()
    start, end = shard_bounds(T, rank, world)
    out = {"tokens": T, "decay": decay_name}
    try:  # generated on the device: make_inputs draws float64 on the host, slow at a million tokens
        q, k, v, do = (torch.randn(1, end - start, H, D, device=DEVICE, dtype=torch.bfloat16) for _ in range(4))
        for t in (q, k, v):
            t.requires_grad_(True)
    except torch.cuda.OutOfMemoryError:
        q = k = v = do = None
    def timed(fn, run: bool, collective: bool) -> float | None:
        """Slowest rank's median seconds, None if out of memory on any rank (or not run)."""
        seconds = None
        if run:
            try:
                seconds = time_fwd_bwd(fn, q, k, v, do, iters, collective)
            except torch.cuda.OutOfMemoryError:
                seconds = None
            empty_cache()
        return slowest(seconds)

    # 1) the single-GPU op on this rank's shard alone: the ideal (no communication, no cross-shard work).
    out["local_s"] = timed(lambda *x: chunk_simple_gla(*x, g_gamma=g, backend=backend)[0], q is not None, False)
    # 2) context parallel over the group; skipped (OOM) if any rank could not run its shard alone, so that
    #    no rank is left waiting in a collective.
    cp_fn = lambda *x: context_parallel_simple_gla(*x, g, backend=backend)[0]  # noqa: E731
    out["cp_s"] = timed(cp_fn, out["local_s"] is not None, True)
    if DEVICE.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    return out


def empty_cache() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()


def state_gather_seconds(world: int, iters: int = 50) -> float:
    """One all-gather of the forward's packed per-rank state (B=1: H*D*D + 1 fp32), median seconds."""
    buf = torch.randn(H * D * D + 1, device=DEVICE)
    out = torch.empty(world * buf.numel(), device=DEVICE)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    times = []
    for _ in range(iters):
        sync()
        t0 = time.perf_counter()
        gather(out, buf)
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


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
        "torch": torch.__version__,
        "nccl": nccl_version(),
        "card": torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu",
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
    if world > 1:
        result["state_allgather_s"] = state_gather_seconds(world)
    save()
    if args.check_tokens:
        t0 = time.time()
        result["check"] = check(args.check_tokens, backend, rank, world)
        result["check_tokens"] = args.check_tokens
        if rank == 0:
            print(f"[P={world}] check T={args.check_tokens} in {time.time() - t0:.1f}s: {result['check']}", flush=True)
        empty_cache()
        save()
    runs = [(T, "tnl") for T in args.tokens] + [(T, "none") for T in args.no_decay_tokens]
    for T, decay_name in runs:
        t0 = time.time()
        key = f"{T}-{decay_name}"
        result["bench"][key] = bench(T, decay_name, backend, rank, world, args.iters)
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


def report(out_dir: str) -> str:
    """Markdown from the launches' JSON files in ``out_dir`` (written there as context_parallel.md)."""
    launches = {}
    for path in sorted(glob.glob(os.path.join(out_dir, "cp_P*.json"))):
        with open(path) as f:
            data = json.load(f)
        launches[data["world_size"]] = data
    shapes = sorted({data.get("shape", "") for data in launches.values()})
    lines = [f"# Context parallelism: forward+backward scaling over GPUs ({'; '.join(shapes) or 'no results'})", ""]
    lines += ["GPUs (nvidia-smi):", ""] + [f"- {line}" for line in gpu_lines()] + [""]
    if not launches:
        return "\n".join(lines + ["No launch produced results (see context_parallel.log)."]) + "\n"
    any_launch = next(iter(launches.values()))
    lines.append(f"torch {any_launch['torch']}, NCCL {any_launch['nccl']}, card seen by torch: {any_launch['card']}.")
    for P, data in sorted(launches.items()):
        note = f" ({data['backend_note']})" if data["backend_note"] else ""
        gather = f", state all-gather {data['state_allgather_s'] * 1e6:.0f} us" if "state_allgather_s" in data else ""
        lines.append(
            f"- P={P}: engine **{data['backend']}**{note}; "
            f"local-state kernel (Triton): {data['local_state_kernel']}{gather}"
        )
    lines += [
        "",
        f"Decay 'tnl' = layer {LAYER_IDX} of {NUM_LAYERS} (head 0 undecayed, the rest decaying); 'none' = g = 0 "
        "for every head (worst case of the local-state pass). Times: median fwd+bwd of the slowest rank. "
        "'local' = the single-GPU op on one rank's shard alone (no communication): the ideal for P GPUs. "
        "Speedup = tokens/s of CP on P GPUs / tokens/s of the single-GPU op on 1 GPU at the same T.",
        "",
        "| T | decay | GPUs | single-GPU op on the shard (ms) | context parallel (ms) | CP overhead vs shard alone "
        "| Mtokens/s | speedup vs 1 GPU | peak GiB (rank 0) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    keys = {key: (r["decay"] != "tnl", r["tokens"]) for data in launches.values() for key, r in data["bench"].items()}
    for key in sorted(keys, key=keys.get):
        base = launches.get(1, {}).get("bench", {}).get(key, {}).get("local_s")
        T, decay_name = key.split("-")
        for P, data in sorted(launches.items()):
            r = data["bench"].get(key)
            if r is None:
                lines.append(f"| {T} | {decay_name} | {P} | not run | not run | | | | |")
                continue
            T = r["tokens"]
            local, cp = r["local_s"], r["cp_s"]
            fmt = lambda s: "OOM" if s is None else f"{s * 1e3:.2f}"  # noqa: E731
            over = "" if local is None or cp is None else f"{(cp / local - 1) * 100:+.1f}%"
            rate = "" if cp is None else f"{T / cp / 1e6:.1f}"
            speed = "" if cp is None or base is None else f"{base / cp:.2f}x"
            peak = f"{r['peak_gib']:.1f}" if "peak_gib" in r else ""
            cells = [T, decay_name, P, fmt(local), fmt(cp), over, rate, speed, peak]
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
        "--check-tokens",
        type=int,
        default=65536,
        help="T of the correctness check (0: skip); its float64 torch reference keeps K x V states per chunk "
        "(tens of GB at 128k tokens, H=32, D=128)",
    )
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--backend", choices=["auto", "torch", "triton"], default="auto")
    parser.add_argument("--heads", type=int, default=H)
    parser.add_argument("--head-dim", type=int, default=D)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: gloo smoke test of this script")
    parser.add_argument("--report", metavar="OUT_DIR", help="only write OUT_DIR/context_parallel.md from cp_P*.json")
    args = parser.parse_args()
    if args.report:
        text = report(args.report)
        with open(os.path.join(args.report, "context_parallel.md"), "w") as f:
            f.write(text)
        print(text)
        return 0
    run_launch(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
