"""The shard's decayed outer-product sum: torch path against float64, Triton kernel (interpreter on CPU)."""

from __future__ import annotations

import os

import pytest
import torch

from lightning_attention.distributed.local_state import decayed_outer_sum, torch_decayed_outer_sum
from lightning_attention.testing import assert_matches_baseline, make_inputs

# g per head: no decay, mild, and strong enough that most of a shard's weights underflow to exactly 0 in fp32.
G = torch.tensor([0.0, -0.05, -2.0, -8.0])


@pytest.mark.parametrize(
    "ascending, base",
    [
        pytest.param(False, 299, id="A_r"),
        pytest.param(True, 1, id="Bhat_r"),
        pytest.param(True, 0, id="A_r-reverse"),
        pytest.param(False, 300, id="Bhat_r-reverse"),
    ],
)
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
def test_torch_path_matches_float64(dtype, ascending, base):
    a, _, c, _ = make_inputs(2, 300, 4, 8, 12, dtype=dtype)
    exact = torch_decayed_outer_sum(a.double(), c.double(), G, base, ascending)
    out = decayed_outer_sum(a, c, G, base, ascending)
    assert out.dtype == torch.float32 and out.shape == (2, 4, 8, 12)
    # The same-dtype baseline: the definition term by term in fp32 (a python loop over tokens).
    j = torch.arange(300, dtype=torch.float32)
    w = torch.exp(G[None, :] * (base + j if ascending else base - j)[:, None])
    terms = (torch.einsum("bhk,bhv->bhkv", a[:, t].float() * w[t, None, :, None], c[:, t].float()) for t in range(300))
    baseline = sum(terms)
    assert_matches_baseline(out, exact, baseline, name="state")


def test_empty_shard_is_zero():
    a, _, c, _ = make_inputs(1, 0, 2, 4)
    assert torch.equal(decayed_outer_sum(a, c, G[:2], 0, True), torch.zeros(1, 2, 4, 4))


def _round_like_triton(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 -> dtype as the kernel's ``.to(dtype)`` does: round to nearest even on GPUs, but the CPU
    interpreter (triton 3.6) truncates fp32 -> bf16, which doubles the rounding error."""
    if dtype == torch.bfloat16 and x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return (x.contiguous().view(torch.int32) & ~0xFFFF).view(torch.float32).to(dtype)
    return x.to(dtype)


@pytest.mark.parametrize(
    "B, L, K, V",
    [pytest.param(1, 300, 16, 16, id="segments"), pytest.param(2, 77, 20, 12, id="odd-dims"),
     pytest.param(1, 5, 32, 16, id="short")],
)
@pytest.mark.parametrize("ascending", [pytest.param(False, id="descending"), pytest.param(True, id="ascending")])
@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")])
def test_triton_kernel(triton_device, dtype, ascending, B, L, K, V):
    from lightning_attention.distributed.local_state_triton import triton_decayed_outer_sum

    a, _, c, _ = make_inputs(B, L, 4, K, V, dtype=dtype, device=triton_device)
    g = G.to(triton_device)
    base = 1 if ascending else L - 1
    out = triton_decayed_outer_sum(a, c, g, base, ascending)
    exact = torch_decayed_outer_sum(a.double(), c.double(), g, base, ascending)
    # The kernel rounds a * w to the input dtype for the tensor-core product (module docstring); the baseline
    # does the same rounding, then sums exactly.
    j = torch.arange(L, dtype=torch.float32, device=triton_device)
    w = torch.exp(g[None, :] * (base + j if ascending else base - j)[:, None])
    rounded = _round_like_triton((a.float() * w[None, :, :, None]), dtype)
    baseline = torch.einsum("blhk,blhv->bhkv", rounded.double(), c.double())
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    # Per head, so that a wrong cut-off on a strongly decaying head (weights of all but a few tokens are 0
    # in fp32 and are skipped) cannot hide behind the undecayed head's larger norm.
    for h in range(4):
        assert_matches_baseline(out[:, h], exact[:, h], baseline[:, h], name=f"state of head {h} (g={G[h].item()})")
