"""The shard's decayed outer-product sum, constant decay and per-token gates: torch path against float64, Triton
kernel (interpreter on CPU)."""

from __future__ import annotations

import os

import pytest
import torch

from lightning_attention.distributed.local_state import (
    decayed_outer_sum,
    gate_weights,
    gated_outer_sum,
    torch_decayed_outer_sum,
    torch_weighted_outer_sum,
)
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


def _gates(B: int, L: int) -> torch.Tensor:
    """Per-token log decays ``[B, L, 4]``: head 0 undecayed, then log-sigmoid gates of growing strength (head 3
    reaches -20 per token, so most of its weights underflow)."""
    gen = torch.Generator().manual_seed(3)
    strength = torch.tensor([0.0, 0.05, 1.0, 8.0])
    return torch.nn.functional.logsigmoid(torch.randn(B, L, 4, generator=gen, dtype=torch.float64)) * strength


@pytest.mark.parametrize(
    "ascending, inclusive",
    [
        pytest.param(False, False, id="A_r"),
        pytest.param(True, True, id="Bhat_r"),
        pytest.param(True, False, id="A_r-reverse"),
        pytest.param(False, True, id="Bhat_r-reverse"),
    ],
)
def test_gate_weights_are_the_gates_summed_from_one_end(ascending, inclusive):
    x = _gates(2, 9)
    w = gate_weights(x, ascending, inclusive, torch.float64)
    for j in range(9):
        span = range(0, j + inclusive) if ascending else range(j + 1 - inclusive, 9)
        expected = torch.exp(sum((x[:, i] for i in span), torch.zeros(2, 4, dtype=torch.float64)))
        assert torch.allclose(w[:, j], expected, rtol=1e-14, atol=0), f"token {j}"


def test_a_constant_gate_is_the_constant_decay():
    a, _, c, _ = make_inputs(2, 50, 4, 8, 12, dtype=torch.float64)
    x = G.double()[None, None, :].expand(2, 50, 4)
    for ascending, inclusive, base in ((False, False, 49), (True, True, 1), (True, False, 0), (False, True, 50)):
        gated = gated_outer_sum(a, c, x, ascending, inclusive)
        constant = torch_decayed_outer_sum(a, c, G, base, ascending)
        torch.testing.assert_close(gated, constant, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
def test_gated_torch_path_matches_float64(dtype):
    a, _, c, _ = make_inputs(2, 300, 4, 8, 12, dtype=dtype)
    x = _gates(2, 300)
    out = gated_outer_sum(a, c, x, False, False)
    assert out.dtype == torch.float32 and out.shape == (2, 4, 8, 12)
    exact = torch_weighted_outer_sum(a.double(), c.double(), gate_weights(x, False, False, torch.float64))
    # The same-dtype baseline: the definition term by term in fp32, each weight exp of the fp32 sum of the gates
    # after the token.
    x32 = x.float()
    terms = []
    for t in range(300):
        w = torch.exp(x32[:, t + 1 :].sum(1))
        terms.append(torch.einsum("bhk,bhv->bhkv", a[:, t].float() * w[..., None], c[:, t].float()))
    assert_matches_baseline(out, exact, sum(terms), name="state")


@pytest.mark.parametrize(
    "B, L, K, V", [pytest.param(1, 300, 16, 16, id="segments"), pytest.param(2, 77, 20, 12, id="odd-dims")]
)
@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")])
def test_triton_kernel_per_token_weights(triton_device, dtype, B, L, K, V):
    from lightning_attention.distributed.local_state_triton import triton_weighted_outer_sum

    a, _, c, _ = make_inputs(B, L, 4, K, V, dtype=dtype, device=triton_device)
    w = gate_weights(_gates(B, L), True, True, torch.float32).to(triton_device)
    out = triton_weighted_outer_sum(a, c, w)
    exact = torch_weighted_outer_sum(a.double(), c.double(), w.double())
    rounded = _round_like_triton(a.float() * w[..., None], dtype)
    baseline = torch.einsum("blhk,blhv->bhkv", rounded.double(), c.double())
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    for h in range(4):
        assert_matches_baseline(out[:, h], exact[:, h], baseline[:, h], name=f"state of head {h}")
