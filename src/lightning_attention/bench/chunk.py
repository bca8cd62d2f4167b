"""Benchmark of the chunked op on CUDA (``python -m lightning_attention bench``, ``python benchmarks/bench_chunk.py``).

For each shape ``B x T x H x D`` (K = V = D) it times, with ``triton.testing.do_bench`` (median, ms):
forward and forward+backward of this library's Triton engine, fla's ``chunk_lightning_attn`` and
OpenNLPLab's ``lightning_attn_func`` when importable, and torch SDPA (causal, flash backend) as a softmax
reference point; and with per-token gates ``g [B, T, H]`` (log-sigmoid of a normal sample, fp32, its gradient
computed too): this library's op with ``g`` ("ours_g") and fla's ``chunk_simple_gla`` with ``g`` ("fla_g").
It reports the bandwidth floor (forward: q, k, v read + o written = 4 tensor passes;
forward+backward: 11 passes) at the card's measured copy bandwidth, and the peak memory of forward+backward
above the inputs. Each call is timed as called (eager) and replayed as a CUDA graph (GPU time). Outputs: one
printed table, and ``<out_dir>/<card>/chunk.md`` + ``chunk.png`` (GPU time vs T), stamped with the card, driver,
torch and triton versions (:mod:`lightning_attention.bench.environment`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import torch

from lightning_attention import decay
from lightning_attention.bench.environment import copy_bandwidth, environment, header, write_results

__all__ = ["SHAPES", "run", "parse_shape"]

#: (B, T, H, D, dtype) -- the issue's shapes.
SHAPES = [
    (4, 2048, 32, 128, torch.bfloat16),
    (4, 8192, 32, 128, torch.bfloat16),
    (4, 32768, 32, 128, torch.bfloat16),
    (1, 32768, 8, 128, torch.bfloat16),
    (1, 131072, 8, 128, torch.bfloat16),
    (8, 4096, 16, 64, torch.bfloat16),
    (2, 8192, 16, 256, torch.bfloat16),
    (4, 8192, 32, 128, torch.float32),
]
LAYER_IDX, NUM_LAYERS = 2, 8  # decay of layer 2 of 8 ("tnl"): every head but the first decays


@dataclass
class Result:
    provider: str
    fwd_ms: float | None = None
    fwdbwd_ms: float | None = None
    peak_mb: float | None = None
    note: str = ""
    fwd_graph_ms: float | None = None  # replayed as a CUDA graph: GPU time without the host's launch cost
    fwdbwd_graph_ms: float | None = None


@dataclass
class Row:
    shape: tuple
    dtype: torch.dtype
    floor_fwd_ms: float
    floor_fwdbwd_ms: float
    results: list[Result] = field(default_factory=list)


#: Providers that take the per-token gates (their forward+backward also computes dg).
GATED = ("ours_g", "fla_g")


def _providers() -> dict[str, Callable | str]:
    """name -> fn(q, k, v, g_gamma, gates) -> o in [B, T, H, D] layout, or a string saying why it is missing;
    the providers in GATED use ``gates`` ``[B, T, H]``, the others ``g_gamma`` ``[H]``.

    The decays are computed once per shape, outside the timed region (``decay.g_gamma`` builds g_gamma on the
    host, and a host-to-device copy inside the loop would synchronise every call)."""
    from lightning_attention.ops import chunk_simple_gla

    out: dict[str, Callable | str] = {
        "ours": lambda q, k, v, g, gates: chunk_simple_gla(q, k, v, g_gamma=g, backend="triton")[0],
        "ours_g": lambda q, k, v, g, gates: chunk_simple_gla(q, k, v, g=gates, backend="triton")[0],
    }
    try:
        from fla.ops.lightning_attn import chunk_lightning_attn as fla_chunk

        out["fla"] = lambda q, k, v, g, gates: fla_chunk(q, k, v, LAYER_IDX, NUM_LAYERS)[0]
    except Exception as e:  # optional comparison: record why it is absent
        out["fla"] = f"not importable: {type(e).__name__}: {e}"[:120]
    try:
        from fla.ops.simple_gla import chunk_simple_gla as fla_simple_gla

        out["fla_g"] = lambda q, k, v, g, gates: fla_simple_gla(q, k, v, g=gates)[0]
    except Exception as e:
        out["fla_g"] = f"not importable: {type(e).__name__}: {e}"[:120]
    try:
        from lightning_attn.ops import lightning_attn_func

        def opennlp(q, k, v, g, gates):  # head-first layout; decay rates s with lam = exp(-s)
            o = lightning_attn_func(*(x.transpose(1, 2) for x in (q, k, v)), (-g).view(-1, 1, 1))
            return o.transpose(1, 2)

        out["lightning_attn"] = opennlp
    except Exception as e:
        out["lightning_attn"] = f"not importable: {type(e).__name__}: {e}"[:120]

    def sdpa(q, k, v, g, gates):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
            o = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, is_causal=True)
        return o.transpose(1, 2)

    out["sdpa_flash"] = sdpa
    return out


@dataclass
class Inputs:
    """One shape's tensors: q, k, v ``[B, T, H, D]`` and ``do`` (requiring grad: q, k, v), g_gamma ``[H]`` and the
    per-token gates ``[B, T, H]`` fp32 (requiring grad)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    do: torch.Tensor
    g_gamma: torch.Tensor
    gates: torch.Tensor


def make_inputs(B, T, H, D, dtype, device="cuda") -> Inputs:
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v, do = (torch.randn(B, T, H, D, device=device, dtype=dtype, generator=gen) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_(True)
    gates = torch.nn.functional.logsigmoid(torch.randn(B, T, H, device=device, generator=gen)).requires_grad_(True)
    return Inputs(q, k, v, do, decay.g_gamma(H, LAYER_IDX, NUM_LAYERS, device=device), gates)


def calls(name: str, fn, x: Inputs) -> tuple[Callable, Callable]:
    """(forward, forward+backward) of provider ``name`` on ``x``: what is timed (gated providers: dg too)."""

    def forward():
        return fn(x.q, x.k, x.v, x.g_gamma, x.gates)

    wrt = (x.q, x.k, x.v, x.gates) if name in GATED else (x.q, x.k, x.v)

    def fwdbwd():
        return torch.autograd.grad(forward(), wrt, x.do)

    return forward, fwdbwd


def _measure(name, fn, x: Inputs) -> Result:
    import triton.testing

    res = Result("")
    forward, fwdbwd = calls(name, fn, x)
    res.fwd_ms = triton.testing.do_bench(forward, warmup=25, rep=100, return_mode="median")
    res.fwdbwd_ms = triton.testing.do_bench(fwdbwd, warmup=25, rep=100, return_mode="median")
    # Small shapes are host-bound in eager mode (Python and launch cost per call exceed the GPU time); a CUDA
    # graph replays the same kernels without it, as torch.compile(mode="reduce-overhead") or a serving engine's
    # graphs would. Providers that cannot be captured keep "-".
    try:
        res.fwd_graph_ms = triton.testing.do_bench_cudagraph(forward, rep=100, return_mode="median")
        res.fwdbwd_graph_ms = triton.testing.do_bench_cudagraph(fwdbwd, rep=100, return_mode="median")
    except Exception as e:  # noqa: BLE001 (reported in the table's note)
        res.note = f"no CUDA graph: {type(e).__name__}"
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    grads = fwdbwd()
    torch.cuda.synchronize()
    res.peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    del grads
    return res


def run_shape(B, T, H, D, dtype, providers, bandwidth) -> Row:
    elem = torch.finfo(dtype).bits // 8
    one_pass = B * T * H * D * elem
    row = Row((B, T, H, D), dtype, 4 * one_pass / bandwidth * 1e3, 11 * one_pass / bandwidth * 1e3)
    x = make_inputs(B, T, H, D, dtype)
    for name, fn in providers.items():
        if isinstance(fn, str):
            row.results.append(Result(name, note=fn))
            continue
        if name == "sdpa_flash" and dtype == torch.float32:
            row.results.append(Result(name, note="flash needs fp16/bf16"))
            continue
        # fp32: ours follows torch.get_float32_matmul_precision() (the default "highest" = 3xTF32), fla always
        # multiplies in TF32; our fp32 rows are timed under both settings.
        precisions = ("highest", "high") if name in ("ours", "ours_g") and dtype == torch.float32 else (None,)
        for precision in precisions:
            row.results.append(_measure_provider(name, fn, x, precision))
    return row


def _measure_provider(name, fn, x: Inputs, precision: str | None) -> Result:
    previous = torch.get_float32_matmul_precision()
    if precision is not None:
        torch.set_float32_matmul_precision(precision)
    try:
        res = _measure(name, fn, x)
        res.provider = name if precision is None else f"{name} ({'3xTF32' if precision == 'highest' else 'TF32'})"
    except Exception as e:  # a competitor that fails at a shape is reported, not fatal
        res = Result(name, note=f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:120])
        torch.cuda.empty_cache()
    finally:
        torch.set_float32_matmul_precision(previous)
    return res


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


TITLE = "Chunked Lightning Attention: forward / forward+backward (ms, median of triton.testing.do_bench)"


def table(rows: list[Row]) -> list[str]:
    """The markdown table of ``rows``: column heads, then per shape its floor and one line per provider."""
    lines = [
        "| shape BxTxHxD | dtype | provider | fwd ms | fwd+bwd ms | fwd / floor | fwd+bwd / floor | "
        "fwd ms (graph) | fwd+bwd ms (graph) | peak MiB | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        shape = "x".join(map(str, row.shape))
        dt = str(row.dtype).replace("torch.", "")
        lines.append(
            f"| {shape} | {dt} | floor | {row.floor_fwd_ms:.3f} | {row.floor_fwdbwd_ms:.3f} | 1.00 | 1.00 | | | | |"
        )
        for r in row.results:
            rf = "-" if r.fwd_ms is None else f"{r.fwd_ms / row.floor_fwd_ms:.2f}"
            rb = "-" if r.fwdbwd_ms is None else f"{r.fwdbwd_ms / row.floor_fwdbwd_ms:.2f}"
            peak = "-" if r.peak_mb is None else f"{r.peak_mb:.0f}"
            graph = [_fmt(r.fwd_graph_ms), _fmt(r.fwdbwd_graph_ms)]
            cells = [shape, dt, r.provider, _fmt(r.fwd_ms), _fmt(r.fwdbwd_ms), rf, rb, *graph, peak, r.note]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def to_markdown(rows: list[Row], env: dict[str, str], bandwidth: float) -> list[str]:
    """The result: its header (environment, command, copy bandwidth, what the columns mean), then the table."""
    notes = (
        f"copy bandwidth: {bandwidth / 1e12:.2f} TB/s",
        f"Decay: 'tnl' layer {LAYER_IDX} of {NUM_LAYERS}; *_g rows: per-token gates g [B, T, H] fp32 (log-sigmoid of "
        "N(0, 1)), dg computed too. Floor = bytes / copy bandwidth (fwd 4 passes, fwd+bwd 11). "
        "Peak MiB = peak memory of fwd+bwd above the inputs. Eager columns include the host's Python and launch "
        "cost per call; (graph) columns replay the call as a CUDA graph (GPU time).",
    )
    return header(TITLE, env, *notes) + table(rows)


def plot(rows: list[Row], path: str, env: dict[str, str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # GPU time (the CUDA-graph replay) where a provider has it: the eager time of a small shape is the host's.
    series: dict[tuple, dict[str, list]] = {}
    for row in rows:
        B, T, H, D = row.shape
        family = (B, H, D, str(row.dtype).replace("torch.", ""))
        for r in row.results:
            graph = r.fwdbwd_graph_ms is not None
            fwd, fwdbwd = (r.fwd_graph_ms, r.fwdbwd_graph_ms) if graph else (r.fwd_ms, r.fwdbwd_ms)
            if fwdbwd is not None:
                series.setdefault(family, {}).setdefault(r.provider, []).append((T, fwd, fwdbwd))
        series.setdefault(family, {}).setdefault("floor", []).append((T, row.floor_fwd_ms, row.floor_fwdbwd_ms))
    fig, axes = plt.subplots(1, 2, figsize=(16, 5.5))
    colors = {  # one per provider
        "ours": "C0", "ours (3xTF32)": "C0", "ours (TF32)": "C4", "fla": "C1", "lightning_attn": "C2",
        "sdpa_flash": "C3", "ours_g": "C5", "ours_g (3xTF32)": "C5", "ours_g (TF32)": "C8", "fla_g": "C6",
        "floor": "k",
    }  # fmt: skip
    markers = "osD^vP*X"  # one per shape family (B, H, D, dtype)
    for i, (family, provs) in enumerate(series.items()):
        B, H, D, dt = family
        for name, pts in provs.items():
            pts.sort()
            line = ":" if name == "floor" else "-"
            style = dict(color=colors.get(name), marker=markers[i % len(markers)], linestyle=line)
            for ax, idx in zip(axes, (1, 2)):
                ax.plot([p[0] for p in pts], [p[idx] for p in pts], label=f"{name} B{B} H{H} D{D} {dt}", **style)
    for ax, title in zip(axes, ("forward", "forward+backward")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("T (tokens per sequence)")
        ax.set_ylabel("ms (GPU time: CUDA graph replay; eager where none)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(f"{env['card']}, driver {env['driver']}, torch {env['torch']}, triton {env['triton']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _write(rows: list[Row], root: str, env: dict[str, str], bandwidth: float, plot_too: bool = True) -> str:
    """``root/<card>/chunk.md`` (and ``chunk.png`` beside it) of ``rows``; returns the markdown's path."""
    path = write_results(root, "chunk", env, to_markdown(rows, env, bandwidth))
    if plot_too:
        try:
            plot(rows, os.path.join(os.path.dirname(path), "chunk.png"), env)
        except ImportError:
            print("matplotlib missing: no plot written")
    return path


def run(out_dir: str | None = "benchmarks/results", shapes=None, providers: list[str] | None = None) -> list[Row]:
    """Run the benchmark, print the table, and write ``<out_dir>/<card>/chunk.md`` and ``chunk.png`` (if
    ``out_dir``)."""
    if not torch.cuda.is_available():
        raise RuntimeError("the benchmark needs a CUDA device")
    env = environment()
    bandwidth = copy_bandwidth()
    all_providers = _providers()
    chosen = {k: v for k, v in all_providers.items() if providers is None or k in providers}
    rows = []
    print("\n".join(to_markdown(rows, env, bandwidth)), flush=True)
    for B, T, H, D, dtype in shapes or SHAPES:
        rows.append(run_shape(B, T, H, D, dtype, chosen, bandwidth))
        print("\n".join(table(rows[-1:])[2:]), flush=True)
        if out_dir:  # after every shape, so that a run cut off by a time limit still leaves its rows
            _write(rows, out_dir, env, bandwidth, plot_too=False)
    if out_dir:
        print(f"written: {_write(rows, out_dir, env, bandwidth)}")
    return rows


def parse_shape(text: str) -> tuple:
    """'4x8192x32x128' or '4x8192x32x128:fp32' -> (B, T, H, D, dtype)."""
    dims, _, dt = text.partition(":")
    B, T, H, D = (int(x) for x in dims.split("x"))
    dtype = {"": torch.bfloat16, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dt]
    if min(B, T, H, D) < 1:
        raise ValueError(f"bad shape {text!r}")
    return B, T, H, D, dtype
