"""Registers, spill bytes and shared memory of the chunked engine's kernels for a GPU target, without a GPU.

``triton.compile`` builds a kernel for the target (sm_90 by default) with the argument specialisation a real
launch would get (16-byte divisible pointers, ``H`` divisible by 16, absent states as None), and the cuobjdump
that ships with Triton reads the registers and the stack (spill) bytes from the cubin. On H100 this matched the
driver's own report for the forward scan (243 registers, 124 KiB of shared memory, no spills).

The engine's speed depends on these numbers (a spilling scan ran 20-40% slower on H100), and a configuration
whose shared memory exceeds the card's limit fails at launch; tests/engines/triton/test_kernel_resources.py
checks the shipped configurations in CI through this module, in a subprocess (it needs the compiled kernels,
not the interpreter's).

    python -m lightning_attention.testing.kernel_resources [--arch 90] [--json] [--stages N] [--no-tma] [--no-gates]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass

import torch

#: Largest shared memory one block may use, by compute capability (bytes, the opt-in maximum): H100/H200,
#: B200, consumer Blackwell (RTX 50xx; sm_121 too), Ada (sm_89) and A100.
SHARED_MEMORY_LIMIT = {90: 232448, 100: 232448, 120: 101376, 89: 101376, 80: 166912}

_TRITON_DTYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}

#: The configurations checked are those of the first shipped table (H100: tuning.SHIPPED), which the
#: kernels' config functions serve to a non-CUDA device.
_TABLE_DEVICE = torch.device("cpu")
#: The i32 stride arguments of a state_in / state_out pair, shared by both kernels' signatures.
_STATE_STRIDES = {name: "i32" for name in ("si_n", "si_h", "si_k", "si_v", "so_n", "so_h", "so_k", "so_v")}


@dataclass(frozen=True)
class Resources:
    kernel: str
    dk: int
    dv: int
    dtype: str
    config: str
    registers: int
    spill_bytes: int
    shared_bytes: int


def _compile(kernel, signature: dict, constexprs: dict, num_warps: int, num_stages: int, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(signature)
    aligned = [n for n, t in signature.items() if t.startswith("*") or n == "H"]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    source = ASTSource(kernel, signature, constexprs, attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=num_warps, num_stages=num_stages))


def _registers_and_stack(cubin: bytes) -> tuple[int, int]:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        report = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
    match = re.search(r"REG:(\d+)\s+STACK:(\d+)", report)
    if match is None:
        raise RuntimeError(f"no resource line in cuobjdump's report: {report[-300:]}")
    return int(match.group(1)), int(match.group(2))


def _signature(pointers: dict[str, str], scalars: dict[str, str], constexprs: dict) -> dict:
    return {**pointers, **scalars, **{name: "constexpr" for name in constexprs}}


#: Per-token gate variants of the scan (``gates`` of scan_resources): the scan's DOTS mode (chunk_scan.RowDots).
GATE_MODES = {"g": 0, "gdots": 1, "gsums": 2}


def scan_resources(
    dk: int, dv: int, dtype: torch.dtype, arch: int = 90, paired: bool = False, tma: bool = False,
    reverse: bool = False, precision: str | None = None, num_stages: int | None = None, gates: str | None = None,
) -> Resources:
    """The forward launch of chunk_scan.scan_kernel (no states, no slots) with its shipped configuration
    (``paired``: the backward's dk/dv launch, a scan and its transposed twin; ``tma``: whole chunks through TMA
    descriptors, chunk_scan.uses_tma; ``reverse``: a reverse-order scan, as the backward's dk and dv;
    ``precision``: the products' precision instead of _common.dot_precision's, e.g. "tf32" for fp32 under
    torch.set_float32_matmul_precision("high"); ``num_stages``: the pointer loads' pipeline depth instead of
    the configuration's, as the launch fallbacks of _common.fitting use; ``gates``: per-token gates, a key
    of GATE_MODES: "g" the forward's decays, "gdots" with the dv scan's row dots, "gsums" with the dq scan's
    running sums of dg, with the initial state's offset)."""
    from lightning_attention.engines.triton import _common, chunk_scan

    mode = GATE_MODES[gates] if gates else 0
    cfg = chunk_scan.scan_config(dk, dv, dtype, _TABLE_DEVICE, precision, gated=gates is not None)
    t = f"*{_TRITON_DTYPE[dtype]}"
    constexprs = dict(
        state_in=None, state_out=None, local_states=None, slot_ids=None, slot_used=None, gate_totals=None,
        dot_totals=None,
        # The reverse-order scans stand for the backward's dk and dv: shifted gates, k_scale = scale.
        **chunk_scan.scan_constexprs(
            dk, dv, cfg, precision or _common.dot_precision(dtype), reverse=reverse, shift=int(reverse),
            use_tma=tma, dots_mode=mode, dot_inputs=2 if mode == 2 else 0, k_scaled=reverse,
        ),
        **({} if paired else dict(q_b=None, o_b=None)),
        **({} if gates else dict(gates=None)),
        **({} if mode else dict(dot_x=None, dot_out=None)),
        **({} if mode == 2 else dict(dot_in=None, dot_offset=None)),
    )  # fmt: skip
    pointers = dict(q=t, k=t, v=t, o=t, g_gamma="*fp32", seq_offsets="*i32", segments="*i32")
    pointers.update(dict(q_b=t, o_b=t) if paired else {})
    pointers.update(dict(gates="*fp32") if gates else {})
    pointers.update(dict(dot_x=t, dot_out="*fp32") if mode else {})
    pointers.update(dict(dot_in="*fp32", dot_offset="*fp32") if mode == 2 else {})
    scalars = dict(scale="fp32", k_scale="fp32", R="i32", H="i32", **_STATE_STRIDES)
    kernel = chunk_scan.scan_kernel(tma)
    signature = _signature(pointers, scalars, constexprs)
    signature = {name: signature[name] for name in kernel.arg_names}
    stages = num_stages or cfg.num_stages
    compiled = _compile(kernel, signature, constexprs, cfg.warps(tma), stages, arch)
    registers, stack = _registers_and_stack(compiled.asm["cubin"])
    name = "scan" + ("_paired" if paired else "") + ("_tma" if tma else "") + ("_reverse" if reverse else "")
    name += f"_{precision}" if precision else ""
    name += f"_{gates}" if gates else ""
    return Resources(name, dk, dv, str(dtype)[6:], str(cfg), registers, stack, compiled.metadata.shared)


def dkdv_resources(
    dk: int, dv: int, dtype: torch.dtype, arch: int = 90, num_stages: int | None = None, gates: bool = False
) -> Resources:
    """The fused dk/dv kernel (chunk_bwd._dkdv_kernel, no states) with its shipped configuration (``gates``:
    with per-token gates and the row dots of dg)."""
    from lightning_attention.engines.triton import _common, chunk_bwd

    cfg = chunk_bwd.dkdv_config(dtype, _TABLE_DEVICE)
    t = f"*{_TRITON_DTYPE[dtype]}"
    constexprs = dict(
        state_in=None, state_out=None, local_states=None, DK=dk, DV=dv, BK=_common.block_dim(dk),
        BV=_common.block_dim(dv), C=cfg.chunk, REVERSE=True, PRECISION=_common.dot_precision(dtype), gate_totals=None,
        **({} if gates else dict(gates=None, dot_out=None)),
    )  # fmt: skip
    pointers = dict(q=t, k=t, v=t, do=t, dk=t, dv=t, g_gamma="*fp32", seq_offsets="*i32", segments="*i32")
    pointers.update(dict(gates="*fp32", dot_out="*fp32") if gates else {})
    scalars = dict(scale="fp32", R="i32", H="i32", **_STATE_STRIDES)
    signature = _signature(pointers, scalars, constexprs)
    signature = {name: signature[name] for name in chunk_bwd._dkdv_kernel.arg_names}
    stages = num_stages or cfg.num_stages
    compiled = _compile(chunk_bwd._dkdv_kernel, signature, constexprs, cfg.num_warps, stages, arch)
    registers, stack = _registers_and_stack(compiled.asm["cubin"])
    name = "dkdv_g" if gates else "dkdv"
    return Resources(name, dk, dv, str(dtype)[6:], str(cfg), registers, stack, compiled.metadata.shared)


def local_state_resources(
    dk: int, dv: int, dtype: torch.dtype, arch: int = 90, num_stages: int | None = None, gates: bool = False
) -> Resources:
    """The local-state pass of split sequences (chunk_state._local_state_kernel) with its shipped launch
    (``gates``: per-token gates, and the segments' total decays)."""
    from lightning_attention.engines.triton import _common, chunk_state

    t = f"*{_TRITON_DTYPE[dtype]}"
    bk = min(_common.block_dim(dk), chunk_state._STATE_BLOCK_K)
    bv = min(_common.block_dim(dv), chunk_state._STATE_BLOCK_V)
    constexprs = dict(
        DK=dk, DV=dv, BK=bk, BV=bv, C=_common.CHUNK, REVERSE=False, PRECISION=_common.dot_precision(dtype),
        SHIFT=0, **({} if gates else dict(gates=None, totals=None)),
    )  # fmt: skip
    pointers = dict(k=t, v=t, g_gamma="*fp32", buf="*fp32", segments="*i32")
    pointers.update(dict(gates="*fp32", totals="*fp32") if gates else {})
    signature = _signature(pointers, dict(k_scale="fp32", R="i32", H="i32"), constexprs)
    signature = {name: signature[name] for name in chunk_state._local_state_kernel.arg_names}
    stages = num_stages or chunk_state._LOCAL_STAGES
    compiled = _compile(chunk_state._local_state_kernel, signature, constexprs, chunk_state._LOCAL_WARPS, stages, arch)
    registers, stack = _registers_and_stack(compiled.asm["cubin"])
    config = f"BK={bk}, BV={bv}, num_warps={chunk_state._LOCAL_WARPS}, num_stages={stages}"
    name = "local_state_g" if gates else "local_state"
    return Resources(name, dk, dv, str(dtype)[6:], config, registers, stack, compiled.metadata.shared)


#: (kernel, K, V, dtype) reported by default: the benchmark's head sizes and dtypes.
DEFAULT_CASES = [
    ("scan", 128, 128, torch.bfloat16),
    ("scan", 64, 64, torch.bfloat16),
    ("scan", 128, 64, torch.float16),
    ("scan", 256, 256, torch.bfloat16),
    ("scan", 128, 128, torch.float32),
    ("scan_paired", 128, 128, torch.bfloat16),
    ("scan_tma", 128, 128, torch.bfloat16),
    ("scan_tma", 64, 64, torch.bfloat16),
    ("scan_tma", 256, 256, torch.bfloat16),
    ("scan_tma_reverse", 128, 128, torch.bfloat16),
    ("scan_paired_tma_reverse", 128, 128, torch.bfloat16),
    ("scan_paired_tma_reverse", 256, 256, torch.bfloat16),
    ("scan_tma", 128, 128, torch.float32),
    ("scan_tma_tf32", 128, 128, torch.float32),
    ("scan_tma_tf32", 64, 64, torch.float32),
    ("scan_paired_tma_reverse_tf32", 128, 128, torch.float32),
    ("dkdv", 64, 64, torch.bfloat16),
    ("dkdv", 64, 64, torch.float32),
    ("local_state", 128, 128, torch.bfloat16),
    ("local_state", 128, 128, torch.float32),
    # per-token gates: the forward ("g"), the dq scan ("gsums") and the dk/dv launch ("gdots") of the shipped paths,
    # the fused dk/dv kernel (options.TritonOptions.fused_dkdv_with_gates) and the local-state pass
    ("scan_g", 128, 128, torch.bfloat16),
    ("scan_g", 64, 64, torch.bfloat16),
    ("scan_gsums", 128, 128, torch.bfloat16),
    ("scan_paired_reverse_gdots", 64, 64, torch.bfloat16),
    ("scan_paired_reverse_gdots", 128, 128, torch.bfloat16),
    ("scan_tma_g", 128, 128, torch.bfloat16),
    ("scan_tma_gsums", 128, 128, torch.bfloat16),
    ("scan_paired_tma_reverse_gdots", 128, 128, torch.bfloat16),
    ("scan_tma_g", 256, 256, torch.bfloat16),
    ("scan_tma_gsums", 256, 256, torch.bfloat16),
    ("scan_paired_tma_reverse_gdots", 256, 256, torch.bfloat16),
    ("scan_tma_g", 128, 128, torch.float32),
    ("scan_tma_tf32_gsums", 128, 128, torch.float32),
    ("scan_paired_tma_reverse_tf32_gdots", 128, 128, torch.float32),
    ("dkdv_g", 64, 64, torch.bfloat16),
    ("local_state_g", 128, 128, torch.bfloat16),
    ("local_state_g", 128, 128, torch.float32),
]


_SCAN_FLAGS = {"paired", "tma", "reverse", "tf32", *GATE_MODES}


def is_gated(kernel: str) -> bool:
    """Whether a DEFAULT_CASES kernel name is a per-token gate variant."""
    return kernel.endswith("_g") or kernel.split("_")[-1] in GATE_MODES


def case_resources(kernel: str, dk: int, dv: int, dtype: torch.dtype, arch: int, num_stages: int | None) -> Resources:
    """A DEFAULT_CASES row: "dkdv", "local_state" (with "_g": per-token gates), or "scan" with the flags its name
    carries in scan_resources' order ("scan_paired_tma_reverse_tf32": the paired, TMA, reverse-order scan under
    TF32; a last flag "g", "gdots" or "gsums": per-token gates, GATE_MODES)."""
    if kernel in ("dkdv", "dkdv_g"):
        return dkdv_resources(dk, dv, dtype, arch, num_stages=num_stages, gates=kernel == "dkdv_g")
    if kernel in ("local_state", "local_state_g"):
        return local_state_resources(dk, dv, dtype, arch, num_stages=num_stages, gates=kernel == "local_state_g")
    flags = kernel.split("_")
    gates = [f for f in flags if f in GATE_MODES]
    if flags[0] != "scan" or not set(flags[1:]) <= _SCAN_FLAGS or len(gates) > 1:
        raise ValueError(f"unknown kernel case {kernel!r}")
    row = scan_resources(
        dk, dv, dtype, arch, paired="paired" in flags, tma="tma" in flags, reverse="reverse" in flags,
        precision="tf32" if "tf32" in flags else None, num_stages=num_stages, gates=gates[0] if gates else None,
    )  # fmt: skip
    if row.kernel != kernel:  # flags out of scan_resources' order would name the row differently
        raise ValueError(f"kernel case {kernel!r} is spelled {row.kernel!r}")
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100 / H200)")
    parser.add_argument("--json", action="store_true", help="one JSON list instead of a table")
    parser.add_argument("--stages", type=int, default=None, help="pointer loads' pipeline depth for every kernel")
    parser.add_argument("--no-tma", action="store_true", help="leave out the TMA scans (pointer kernels only)")
    parser.add_argument("--no-gates", action="store_true", help="leave out the per-token gate variants")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: this compiles the kernels, the interpreter does not")
    cases = [
        case for case in DEFAULT_CASES
        if not (args.no_tma and "tma" in case[0]) and not (args.no_gates and is_gated(case[0]))
    ]  # fmt: skip
    rows = [case_resources(kernel, dk, dv, dtype, args.arch, args.stages) for kernel, dk, dv, dtype in cases]
    if args.json:
        print(json.dumps([asdict(r) for r in rows]))
        return 0
    limit = SHARED_MEMORY_LIMIT.get(args.arch)
    print(f"sm_{args.arch}: shared memory limit {limit} bytes per block")
    print("| kernel | K | V | dtype | config | registers | spill bytes | shared KiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.kernel} | {r.dk} | {r.dv} | {r.dtype} | {r.config} | {r.registers} | {r.spill_bytes} | {r.shared_bytes / 1024:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
