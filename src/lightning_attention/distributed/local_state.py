"""A shard's local state for context parallelism: a decay-weighted sum of outer products over its tokens.

Per (batch b, head h), with a weight ``w_j`` per token::

    out[b, h] = sum_j w_j[b, h] a[b, j, h]^T c[b, j, h]          a [B, L, H, K], c [B, L, H, V] -> [B, H, K, V]

A constant log decay g per head (:func:`decayed_outer_sum`): ``w_j = exp(g[h] * e_j)`` with exponents
``e_j = base + j`` (``ascending``) or ``e_j = base - j``, all >= 0. The forward's A_r is (a, c) = (k, v) with
e_j = L - 1 - j; the backward's Bhat_r is (q, do) with e_j = j + 1 (mirrored for reverse scans).

Per-token log decays ``x [B, L, H]`` (:func:`gated_outer_sum`, gates ``g + g_gamma``): ``w_j = exp(X_j)`` with
``X_j`` the sum of x from the end the sums start at (token 0 when ``ascending``, token L - 1 otherwise) up to j,
j included or not (``inclusive``). A_r is the exclusive sum towards the scan's end (the gates after token j),
Bhat_r the inclusive sum from the scan's start; a constant x = g is the case above. The sums run in float64 from
their starting end, never as a difference of two long cumulative sums (whose rounding grows with the run's length
where the weight itself is near 1), and are rounded after exp.

Result float32 (float64 for float64 inputs). Half-precision CUDA inputs run the Triton kernel of
local_state_triton.py (reads a and c once; with a constant decay it skips the tokens whose weight underflows to 0).
Everything else (CPU, fp32, fp64, no Triton) runs in torch in the state dtype.
"""

from __future__ import annotations

import warnings

import torch

from lightning_attention import _validation as val
from lightning_attention.engines import triton_available

__all__ = [
    "decayed_outer_sum",
    "gated_outer_sum",
    "gate_weights",
    "torch_decayed_outer_sum",
    "torch_weighted_outer_sum",
    "triton_status",
]

#: None until the Triton kernel first runs; then "ok", or why it failed (the torch path is used from then on).
_TRITON_STATUS: str | None = None


def triton_status() -> str | None:
    """How the Triton kernel fared on its first call in this process (None: not called yet)."""
    return _TRITON_STATUS


def _on_triton(a: torch.Tensor, kernel_call, torch_call) -> torch.Tensor:
    """``kernel_call()`` for half-precision CUDA inputs while the kernel works here, else ``torch_call()``."""
    global _TRITON_STATUS
    use_triton = a.is_cuda and a.dtype in (torch.float16, torch.bfloat16) and a.shape[1] > 0 and triton_available()
    if use_triton and _TRITON_STATUS == "ok":
        return kernel_call()
    if use_triton and _TRITON_STATUS is None:
        try:  # first call: a kernel that cannot compile here must not take context parallelism down with it
            out = kernel_call()
            _TRITON_STATUS = "ok"
            return out
        except Exception as exc:
            _TRITON_STATUS = f"failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})"
            warnings.warn(f"context parallel local-state kernel {_TRITON_STATUS}; using torch", stacklevel=3)
    return torch_call()


def decayed_outer_sum(a: torch.Tensor, c: torch.Tensor, g: torch.Tensor, base: int, ascending: bool) -> torch.Tensor:
    """See the module docstring. a ``[B, L, H, K]``, c ``[B, L, H, V]``, g ``[H]`` (<= 0)."""

    def kernel_call():
        from lightning_attention.distributed.local_state_triton import triton_decayed_outer_sum

        return triton_decayed_outer_sum(a, c, g, base, ascending)

    return _on_triton(a, kernel_call, lambda: torch_decayed_outer_sum(a, c, g, base, ascending))


def gate_weights(log_decay: torch.Tensor, ascending: bool, inclusive: bool, dtype: torch.dtype) -> torch.Tensor:
    """``w_j = exp(X_j)`` of the module docstring: log decays ``[B, L, H]`` -> weights ``[B, L, H]`` in ``dtype``."""
    x = log_decay.to(torch.float64)
    if not ascending:
        x = x.flip(1)
    sums = x.cumsum(1)
    if not inclusive:  # shift by one token rather than subtract x: exact, and no cancellation
        sums = torch.nn.functional.pad(sums[:, :-1], (0, 0, 1, 0))
    if not ascending:
        sums = sums.flip(1)
    return torch.exp(sums).to(dtype)


def gated_outer_sum(
    a: torch.Tensor, c: torch.Tensor, log_decay: torch.Tensor, ascending: bool, inclusive: bool
) -> torch.Tensor:
    """See the module docstring. a ``[B, L, H, K]``, c ``[B, L, H, V]``, log_decay ``[B, L, H]`` (any float dtype)."""
    sdt = val.state_dtype(a)

    def kernel_call():
        from lightning_attention.distributed.local_state_triton import triton_weighted_outer_sum

        return triton_weighted_outer_sum(a, c, gate_weights(log_decay, ascending, inclusive, torch.float32))

    return _on_triton(
        a, kernel_call, lambda: torch_weighted_outer_sum(a, c, gate_weights(log_decay, ascending, inclusive, sdt))
    )


def torch_decayed_outer_sum(a, c, g, base: int, ascending: bool) -> torch.Tensor:
    sdt = val.state_dtype(a)
    L = a.shape[1]
    j = torch.arange(L, device=a.device, dtype=sdt)
    exponents = base + j if ascending else base - j
    weights = torch.exp(g.to(sdt)[None, :] * exponents[:, None])  # [L, H]
    return torch_weighted_outer_sum(a, c, weights[None])


def torch_weighted_outer_sum(a, c, weights: torch.Tensor) -> torch.Tensor:
    """``sum_j w_j a_j^T c_j`` in the state dtype; weights ``[B or 1, L, H]``."""
    sdt = val.state_dtype(a)
    return torch.einsum("blhk,blhv->bhkv", a.to(sdt) * weights.to(sdt)[..., None], c.to(sdt))
