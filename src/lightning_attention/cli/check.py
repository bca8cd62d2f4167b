"""python -m lightning_attention check: every available backend against the float64 reference, as a table.

For each backend that can run here ("torch" always; "triton" on CUDA, or on CPU when TRITON_INTERPRET=1 was set
before start-up), both ops (chunk, recurrent) run forward and backward on a few small cases (initial state and
final-state gradient, reverse, varlen with empty and length-1 sequences, K != V, both sides of the recurrent op's
token-loop/chunked switch). Each result is compared with the token-loop reference in float64 on the same inputs.

A row is ok when every output and gradient passes the test suite's tolerance policy
(:mod:`lightning_attention.testing`): relative error at most 2x that of a same-dtype torch baseline, plus 1e-6.
The baseline is plain torch computing in the input dtype: for float32 the token-loop reference; for bfloat16 /
float16 the torch chunked engine with its compute dtype pinned to that dtype (FlashAttention's convention, and
tests/engines/triton's), because GPU kernels legitimately feed bf16/fp16 operands to their matmuls while the torch
engine accumulates everything in float32. One documented exception: Triton's CPU interpreter rounds
float32 -> bfloat16 toward zero (not to nearest, as GPUs do; see tests/engines/triton/rounding.py), which doubles
the worst-case error of every bfloat16 rounding in the kernel, so triton-on-CPU bfloat16 rows allow 4x instead of
2x. The table shows the largest absolute errors. Exit code 1 if any row
fails or errors.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

DTYPES = ("float32", "bfloat16", "float16")
BACKENDS = ("torch", "triton")
H, K, V = 4, 16, 8  # K != V on purpose
FACTOR, FLOOR = 2.0, 1e-6


@dataclass(frozen=True)
class Case:
    """One shape/option combination; ``cu_seqlens`` packs sequences into B = 1."""

    name: str
    B: int
    T: int
    initial_state: bool = True
    reverse: bool = False
    cu_seqlens: tuple[int, ...] | None = None


CASES = (
    Case("B2 T100 o only", 2, 100, initial_state=False),
    Case("B2 T100 h0", 2, 100),
    Case("B1 T100 h0 reverse", 1, 100, reverse=True),
    Case("varlen [0,0,1,40,100] h0", 1, 100, cu_seqlens=(0, 0, 1, 40, 100)),
    Case("B2 T37 h0", 2, 37),  # the recurrent op's token loop (<= engines.RECURRENT_MAX_T tokens per sequence)
)


def add_arguments(parser):
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="input dtype (default float32)")
    parser.add_argument(
        "--backend", choices=("all",) + BACKENDS, default="all", help="backend to check (default: all available)"
    )


def _backend_device(backend: str):
    """(device, None) if ``backend`` can run on this machine, else (None, reason)."""
    import torch

    if backend == "torch":
        return "cpu", None
    from lightning_attention import engines
    from lightning_attention.engines.triton.options import interpreting

    if torch.cuda.is_available():
        device = "cuda"
    elif interpreting():
        device = "cpu"
    else:
        return None, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU through the interpreter)"
    try:
        for algorithm in engines.ALGORITHMS:
            engines.get_engine("triton", algorithm)
    except Exception as exc:  # the Triton engine is optional: report why it is skipped, check the rest
        return None, f"engine does not import: {type(exc).__name__}: {exc}"
    return device, None


def _run(op, inputs, case: Case, backend, do, dht, g_gamma):
    """Run ``op`` (a public op or the reference) and return [o, final?, dq, dk, dv, dh0?]."""
    import torch

    from lightning_attention.ops import chunk_simple_gla, fused_recurrent_simple_gla

    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    q, k, v, h0 = leaves
    cu = None if case.cu_seqlens is None else torch.tensor(case.cu_seqlens, device=q.device)
    kwargs = dict(initial_state=h0, output_final_state=h0 is not None, reverse=case.reverse, cu_seqlens=cu)
    if op in (chunk_simple_gla, fused_recurrent_simple_gla):
        kwargs["backend"] = backend
    o, final = op(q, k, v, g_gamma=g_gamma.to(q.device), **kwargs)
    outputs = [o] + ([final] if final is not None else [])
    loss = (o.double() * do.to(o.device).double()).sum()
    if final is not None:
        loss = loss + (final.double() * dht.to(final.device).double()).sum()
    grads = torch.autograd.grad(loss, [t for t in leaves if t is not None])
    return [t.detach().cpu() for t in (*outputs, *grads)]


def _factor(backend: str, device: str, dtype) -> float:
    """2x the baseline's error; 4x for bfloat16 under the Triton interpreter (it rounds toward zero)."""
    import torch

    interpreted_bf16 = backend == "triton" and device == "cpu" and dtype == torch.bfloat16
    return FACTOR * (2 if interpreted_bf16 else 1)


def _check_case(op, case: Case, backend: str, device: str, dtype):
    """Returns (max abs err of outputs, max abs err of gradients, ok)."""
    import functools

    import torch

    from lightning_attention import decay
    from lightning_attention.engines.cpu._common import computing_in
    from lightning_attention.reference import recurrent_reference
    from lightning_attention.testing import make_inputs, rel_err

    num_seqs = None if case.cu_seqlens is None else len(case.cu_seqlens) - 1
    q, k, v, h0 = make_inputs(case.B, case.T, H, K, V, dtype=dtype, initial_state=case.initial_state, num_seqs=num_seqs)
    g_gamma = decay.g_gamma(H, 0, 4)  # "tnl" layer 0: g = 0 (no decay) down to -6
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(case.B, case.T, H, V, generator=gen, dtype=torch.float64).to(dtype)
    dht = None if h0 is None else torch.randn(h0.shape, generator=gen, dtype=torch.float64).to(h0.dtype)

    run_case = functools.partial(_run, case=case, do=do, dht=dht, g_gamma=g_gamma)
    ref64 = run_case(recurrent_reference, [None if t is None else t.double() for t in (q, k, v, h0)], backend=None)
    if dtype == torch.float32:
        baseline = run_case(recurrent_reference, [q, k, v, h0], backend=None)
    else:
        with computing_in(dtype):
            baseline = run_case(op, [q, k, v, h0], backend="torch")
    moved = [None if t is None else t.to(device) for t in (q, k, v, h0)]
    got = run_case(op, moved, backend=backend)

    num_outputs = 2 if h0 is not None else 1
    errors = [(a.double() - r).abs().max().item() if a.numel() else 0.0 for a, r in zip(got, ref64)]
    factor = _factor(backend, device, dtype)
    ok = all(
        a.shape == r.shape and rel_err(a, r) <= factor * rel_err(b, r) + FLOOR for a, r, b in zip(got, ref64, baseline)
    )
    return max(errors[:num_outputs]), max(errors[num_outputs:]), ok


def run(args) -> int:
    import torch

    from lightning_attention.ops import chunk_simple_gla, fused_recurrent_simple_gla

    dtype = getattr(torch, args.dtype)
    backends = BACKENDS if args.backend == "all" else (args.backend,)
    print(f"lightning-attention check: torch {torch.__version__}, dtype {args.dtype}, reference: float64 token loop")
    header = f"{'backend':8} {'op':10} {'case':26} {'fwd max abs err':>16} {'grad max abs err':>17}  ok"
    print(header)
    print("-" * len(header))
    failures = 0
    for backend in backends:
        device, reason = _backend_device(backend)
        if device is None:
            print(f"{backend:8} skipped: {reason}")
            continue
        if backend == "triton":
            from lightning_attention.engines.triton import tuning

            print(f"{backend:8} launch table: {tuning.describe(torch.device(device))}")
        if _factor(backend, device, dtype) != FACTOR:
            print(f"{backend:8} note: Triton interpreter rounds bfloat16 toward zero; tolerance 4x the baseline")
        for op_name, op in (("chunk", chunk_simple_gla), ("recurrent", fused_recurrent_simple_gla)):
            for case in CASES:
                try:
                    fwd_err, grad_err, ok = _check_case(op, case, backend, device, dtype)
                except Exception as exc:  # one broken case must not hide the others
                    print(f"{backend:8} {op_name:10} {case.name:26} ERROR {type(exc).__name__}: {exc}")
                    failures += 1
                    continue
                failures += not ok
                print(f"{backend:8} {op_name:10} {case.name:26} {fwd_err:16.3e} {grad_err:17.3e}  {'ok' if ok else 'FAIL'}")
    print("all checks passed" if not failures else f"{failures} check(s) FAILED")
    return 1 if failures else 0
