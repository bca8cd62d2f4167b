"""Engine selection: which implementation runs a scan on which device.

Backends:
    "torch"  : chunked torch engine (engines/cpu), any device; the recurrent algorithm runs token by token
               up to RECURRENT_MAX_T tokens per sequence (mean) and chunked above (base.LengthRoutedEngine).
    "triton" : Triton kernels (engines/triton) on CUDA; on CPU only under TRITON_INTERPRET=1 (tests).
    "auto"   : "triton" for CUDA tensors when Triton is importable, else "torch".
"""

from __future__ import annotations

import contextlib
import importlib.util

import torch

from lightning_attention.engines.base import Engine
from lightning_attention.engines.cpu.recurrent import RECURRENT_MAX_T

__all__ = [
    "BACKENDS",
    "ALGORITHMS",
    "RECURRENT_MAX_T",
    "resolve_backend",
    "get_engine",
    "triton_available",
    "autocast_off",
]

BACKENDS = ("auto", "torch", "triton")
ALGORITHMS = ("chunk", "recurrent")


# Looked up once at import: torch.compile cannot trace importlib (it would break the graph on every call).
_TRITON_FOUND = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _TRITON_FOUND


def autocast_off(device: torch.device):
    """Context for running an engine: the engines pick their own precision (fp32 state and accumulation, outputs
    in the inputs' dtype). Without this an enclosing ``torch.autocast`` region reaches the engines' internal
    matmuls and runs them in bf16/fp16, rounding the fp32 state. The ops deliberately register no autocast rule
    either: it would cast the fp32 state down too. Outside autocast it is a null context: entering
    ``torch.autocast`` costs more host time than a small launch."""
    if not torch.is_autocast_enabled(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn "auto" into a concrete backend for ``device``; check that the requested one can run there."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    triton_ok = triton_available()
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_ok else "torch"
    if backend == "triton":
        if not triton_ok:
            raise ValueError("backend='triton' needs the triton package (pip install lightning-attention[gpu])")
        from lightning_attention.engines.triton.options import interpreting

        if device.type != "cuda" and not interpreting():
            raise ValueError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got device {device}")
    return backend


def get_engine(backend: str, algorithm: str) -> Engine:
    """``backend`` already resolved (see :func:`resolve_backend`); ``algorithm`` in :data:`ALGORITHMS`."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    if backend == "torch":
        from lightning_attention.engines.cpu import chunk, recurrent
    else:
        from lightning_attention.engines.triton import chunk, recurrent
    return chunk.ENGINE if algorithm == "chunk" else recurrent.ENGINE
