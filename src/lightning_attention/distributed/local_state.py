"""A shard's local state for context parallelism: a decay-weighted sum of outer products over its tokens.

Per (batch b, head h), with exponents ``e_j = base + j`` (``ascending``) or ``e_j = base - j``, all >= 0::

    out[b, h] = sum_j exp(g[h] * e_j) a[b, j, h]^T c[b, j, h]          a [B, L, H, K], c [B, L, H, V] -> [B, H, K, V]

The forward's A_r is (a, c) = (k, v) with e_j = L - 1 - j; the backward's Bhat_r is (q, do) with e_j = j + 1
(mirrored for reverse scans). Result float32 (float64 for float64 inputs).

Half-precision CUDA inputs run the Triton kernel of local_state_triton.py (reads a and c once, skips the
tokens whose weight underflows to 0). Everything else (CPU, fp32, fp64, no Triton) runs in torch in the
state dtype.
"""

from __future__ import annotations

import warnings

import torch

from lightning_attention import _validation as val
from lightning_attention.engines import triton_available

__all__ = ["decayed_outer_sum", "torch_decayed_outer_sum", "triton_status"]

#: None until the Triton kernel first runs; then "ok", or why it failed (the torch path is used from then on).
_TRITON_STATUS: str | None = None


def triton_status() -> str | None:
    """How the Triton kernel fared on its first call in this process (None: not called yet)."""
    return _TRITON_STATUS


def decayed_outer_sum(a: torch.Tensor, c: torch.Tensor, g: torch.Tensor, base: int, ascending: bool) -> torch.Tensor:
    """See the module docstring. a ``[B, L, H, K]``, c ``[B, L, H, V]``, g ``[H]`` (<= 0)."""
    global _TRITON_STATUS
    use_triton = a.is_cuda and a.dtype in (torch.float16, torch.bfloat16) and a.shape[1] > 0 and triton_available()
    if use_triton and _TRITON_STATUS in (None, "ok"):
        from lightning_attention.distributed.local_state_triton import triton_decayed_outer_sum

        if _TRITON_STATUS == "ok":
            return triton_decayed_outer_sum(a, c, g, base, ascending)
        try:  # first call: a kernel that cannot compile here must not take context parallelism down with it
            out = triton_decayed_outer_sum(a, c, g, base, ascending)
            _TRITON_STATUS = "ok"
            return out
        except Exception as exc:
            _TRITON_STATUS = f"failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})"
            warnings.warn(f"context parallel local-state kernel {_TRITON_STATUS}; using torch", stacklevel=2)
    return torch_decayed_outer_sum(a, c, g, base, ascending)


def torch_decayed_outer_sum(a, c, g, base: int, ascending: bool) -> torch.Tensor:
    sdt = val.state_dtype(a)
    L = a.shape[1]
    j = torch.arange(L, device=a.device, dtype=sdt)
    exponents = base + j if ascending else base - j
    weights = torch.exp(g.to(sdt)[None, :] * exponents[:, None])  # [L, H]
    return torch.einsum("blhk,blhv->bhkv", a.to(sdt) * weights[None, :, :, None], c.to(sdt))
