"""The Triton engine's routing options, read from the environment in one place.

A kernel's launch configuration (tiles, warps, stages) belongs to its module's config function; the options here
choose *which* kernels and load paths a call takes. Every one of them gives the same results within rounding (the
tests run each route), so they exist to pick the fastest route per case and to let tests and benchmarks run the
others: replace the whole object (``dataclasses.replace(options.OPTIONS, ...)``), never a module constant.

Environment (read once, at import): ``LIGHTNING_ATTENTION_TMA=0`` turns TMA loads off, ``=1`` extends them to
16-bit heads of 64. ``TRITON_INTERPRET=1`` (Triton's own switch) runs the kernels on the CPU through the
interpreter: :func:`interpreting`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["TritonOptions", "OPTIONS", "options", "interpreting"]


@dataclass(frozen=True)
class TritonOptions:
    """Routes of the Triton engine (the measurements behind each: benchmarks/results/h100/kernel_choices.md).

    tma_head_dims: 16-bit head sizes K whose scans load whole chunks through TMA descriptors (faster at 128 and 256;
        heads of 64 are no faster and pay the descriptors' host time).
    tma_fp32_head_dims: the same for fp32 inputs (a chunk's fp32 boxes of K = 256 would not fit shared memory twice).
    paired_dkdv: dk and dv of equal-sized heads from one launch of the scan and its transposed twin (they read k
        and v from L2 once), else two launches.
    fused_dkdv_with_gates: per-token gates take the fused dk/dv kernel for heads up to 64 x 64 (its gated variant
        spills; the paired scans do not), else the scans.
    programs_per_sm: scan programs that run at once on one SM, which sets when sequences are split into segments
        (1 for the shipped 128-dim configurations: 136 KiB of shared memory each, 184 KiB through TMA).
    """

    tma_head_dims: tuple[int, ...] = (128, 256)
    tma_fp32_head_dims: tuple[int, ...] = (64, 128)
    paired_dkdv: bool = True
    fused_dkdv_with_gates: bool = False
    programs_per_sm: float = 1.0

    @classmethod
    def from_environment(cls) -> "TritonOptions":
        switch = os.environ.get("LIGHTNING_ATTENTION_TMA", "")
        if switch == "0":
            return cls(tma_head_dims=(), tma_fp32_head_dims=())
        if switch == "1":
            return cls(tma_head_dims=(64, 128, 256))
        return cls()


#: The options in use. Read at every call (``options()``), so that replacing it takes effect at once.
OPTIONS = TritonOptions.from_environment()


def options() -> TritonOptions:
    return OPTIONS


def interpreting() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``), read at call time: the
    tests set it after import."""
    return os.environ.get("TRITON_INTERPRET") == "1"
