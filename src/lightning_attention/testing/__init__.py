"""Input factories and tolerance helpers shared by tests and benchmarks (one copy, not one per file).

Tolerance policy (FlashAttention's): a fast path in dtype X is judged against the float64 reference
*relative to* what plain torch in the same dtype X achieves on the same inputs::

    rel_err(fast, ref64) <= factor * rel_err(torch_same_dtype, ref64) + floor

where ``rel_err(a, b) = ||a - b|| / ||b||`` over the whole tensor. ``floor`` absorbs the case where the
baseline is (nearly) exact, e.g. float64.
"""

from __future__ import annotations

import torch

__all__ = ["make_inputs", "rel_err", "assert_rel_close", "assert_matches_baseline", "strongest_decays"]


def make_inputs(
    B: int,
    T: int,
    H: int,
    K: int,
    V: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    requires_grad: bool = False,
    initial_state: bool = False,
    num_seqs: int | None = None,
):
    """Random q, k, v ``[B, T, H, K/V]`` of realistic magnitude (unit normal; q, k scaled like a trained
    model's post-activation features, not shrunk by 0.01), and optionally h0 ``[N, H, K, V]`` float32
    (float64 for float64 inputs). Returns ``(q, k, v, h0 or None)``."""
    V = K if V is None else V
    gen = torch.Generator(device="cpu").manual_seed(seed)
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32

    def rand(*shape, dt=dtype):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dt)

    q, k, v = rand(B, T, H, K), rand(B, T, H, K), rand(B, T, H, V)
    h0 = rand(num_seqs if num_seqs is not None else B, H, K, V, dt=state_dtype) if initial_state else None
    if requires_grad:
        for t in (q, k, v, h0):
            if t is not None:
                t.requires_grad_(True)
    return q, k, v, h0


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """||a - ref|| / ||ref|| in float64 (0 when both are empty or zero); inf if a has NaN/inf."""
    a64, r64 = a.detach().double(), ref.detach().double()
    if a64.shape != r64.shape:
        raise AssertionError(f"shape mismatch {tuple(a64.shape)} vs {tuple(r64.shape)}")
    if not torch.isfinite(a64).all():
        return float("inf")
    den = r64.norm().item()
    num = (a64 - r64).norm().item()
    return num / den if den > 0 else num


def assert_rel_close(a: torch.Tensor, ref: torch.Tensor, tol: float, name: str = "tensor") -> None:
    err = rel_err(a, ref)
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e}"


def assert_matches_baseline(
    fast: torch.Tensor,
    ref64: torch.Tensor,
    baseline: torch.Tensor,
    name: str = "tensor",
    factor: float = 2.0,
    floor: float = 1e-6,
) -> None:
    """``rel_err(fast, ref64) <= factor * rel_err(baseline, ref64) + floor`` (see module docstring)."""
    err, base = rel_err(fast, ref64), rel_err(baseline, ref64)
    assert err <= factor * base + floor, (
        f"{name}: relative error {err:.3e} > {factor} x same-dtype torch baseline {base:.3e} + {floor:.0e}"
    )


def strongest_decays() -> dict[str, torch.Tensor]:
    """g_gamma with the fastest-decaying head of each schedule (layer 0), for finiteness tests."""
    from lightning_attention.decay import g_gamma

    return {"tnl": g_gamma(8, 0, 8, "tnl"), "minimax": g_gamma(8, 0, 8, "minimax")}
