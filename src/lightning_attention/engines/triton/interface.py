"""The Triton engines, by algorithm: "chunk" (chunk.py) and "recurrent" (recurrent.py)."""

from __future__ import annotations

from lightning_attention.engines.base import Engine


def get_engine(algorithm: str) -> Engine:
    if algorithm == "chunk":
        from lightning_attention.engines.triton.chunk import ENGINE
    else:
        from lightning_attention.engines.triton.recurrent import ENGINE
    return ENGINE
