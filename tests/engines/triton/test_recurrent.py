"""The fused recurrent Triton engine: the scan contract, the public recurrent op (forward and backward), routing.

Runs on CUDA when present, else on CPU through the Triton interpreter at small shapes (``triton_device``).
Tolerances: results are compared with float64 truth on the same (already rounded) inputs, relative to a
same-dtype torch baseline (lightning_attention.testing): the torch token-loop engine for the scan contract,
the torch backend of the same public op for forward + backward, both run in float32 on the same inputs (as
the kernel accumulates) and rounded to the output dtype the way the kernel stores (rounding.py).
"""

import functools

import pytest
import torch

from lightning_attention import decay
from lightning_attention.engines.cpu import recurrent as torch_recurrent
from lightning_attention.ops import fused_recurrent_simple_gla
from lightning_attention.reference import recurrent_reference
from lightning_attention.testing import assert_matches_baseline, make_inputs, strongest_decays
from tests.closed_form import closed_form_scan
from tests.engines.triton.rounding import round_like_kernel

triton_recurrent = pytest.importorskip("lightning_attention.engines.triton.recurrent")
triton_chunk = pytest.importorskip("lightning_attention.engines.triton.chunk")

H, K, V = 3, 16, 8  # K != V
# "tnl", layer 0 of 3 heads: g = 0 (no decay), -8/3, -16/3 (lam^64 underflows in float32).
G_GAMMA = decay.g_gamma(H, 0, 3)

SCAN_CASES = [
    pytest.param(1, False, None, id="forward"),
    pytest.param(0, False, None, id="offset0"),
    pytest.param(1, True, None, id="reverse"),
    pytest.param(0, True, None, id="offset0-reverse"),
    pytest.param(1, False, (0, 0, 1, 9, 23), id="varlen-empty-len1"),
    pytest.param(0, True, (0, 14, 14, 23), id="varlen-offset0-reverse"),
]
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.bfloat16, id="bf16"),
]


def _to(device, *tensors):
    return [None if t is None else t.to(device) for t in tensors]


def _triton_scan(device, q, k, v, g, scale, s0, state_offset=1, reverse=False, cu_seqlens=None):
    """The Triton scan on ``device``; results back on the CPU."""
    q, k, v, g, s0, cu = _to(device, q, k, v, g, s0, cu_seqlens)
    o, final = triton_recurrent.recurrent_scan(q, k, v, g, scale, s0, state_offset, reverse, cu, 64)
    return o.cpu(), final.cpu()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("state_offset, reverse, cu_seqlens", SCAN_CASES)
def test_scan_contract_matches_closed_form(triton_device, state_offset, reverse, cu_seqlens, dtype):
    """o and final of the scan primitive (engines/base.py), with a non-zero S0 and the strongest decays."""
    cu = None if cu_seqlens is None else torch.tensor(cu_seqlens)
    B, N = (2, 2) if cu is None else (1, len(cu_seqlens) - 1)
    q, k, v, s0 = make_inputs(B, 23, H, K, V, dtype=dtype, initial_state=True, num_seqs=N, seed=state_offset)
    args = (G_GAMMA, 0.7, s0, state_offset, reverse, cu)
    o, final = _triton_scan(triton_device, q, k, v, *args)
    o_ref, final_ref = closed_form_scan(q, k, v, *args)
    o_base, final_base = torch_recurrent.recurrent_scan(q.float(), k.float(), v.float(), *args, 64)
    o_base = round_like_kernel(o_base, dtype, triton_device)
    assert o.dtype == dtype and final.dtype == torch.float32
    assert_matches_baseline(o, o_ref, o_base, "o")
    assert_matches_baseline(final, final_ref, final_base, "final")


def test_scan_float64_is_exact(triton_device):
    q, k, v, s0 = make_inputs(2, 19, H, K, V, dtype=torch.float64, initial_state=True)
    o, final = _triton_scan(triton_device, q, k, v, G_GAMMA, 0.5, s0)
    o_ref, final_ref = closed_form_scan(q, k, v, G_GAMMA, 0.5, s0)
    assert final.dtype == torch.float64
    torch.testing.assert_close(o, o_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(final, final_ref, rtol=1e-12, atol=1e-12)


def _with_grads(op, q, k, v, h0, do, dht, **kwargs):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, h0)]
    o, final = op(*leaves[:3], initial_state=leaves[3], output_final_state=True, **kwargs)
    loss = (o.double() * do.double()).sum() + (final.double() * dht.double()).sum()
    return [t.detach().cpu() for t in (o, final, *torch.autograd.grad(loss, leaves))]


@functools.lru_cache(maxsize=None)
def _op_case(dtype, reverse, cu_seqlens, device):
    cu = None if cu_seqlens is None else torch.tensor(cu_seqlens)
    B, N = (2, 2) if cu is None else (1, len(cu_seqlens) - 1)
    q, k, v, h0 = make_inputs(B, 21, H, K, V, dtype=dtype, initial_state=True, num_seqs=N, seed=5)
    gen = torch.Generator().manual_seed(6)
    do = torch.randn(v.shape, generator=gen, dtype=torch.float64).to(dtype)
    dht = torch.randn(h0.shape, generator=gen, dtype=torch.float64).to(h0.dtype)
    kwargs = dict(g_gamma=G_GAMMA, reverse=reverse, cu_seqlens=cu)
    ref64 = _with_grads(recurrent_reference, *(x.double() for x in (q, k, v, h0)), do, dht, **kwargs)
    baseline = _with_grads(
        fused_recurrent_simple_gla, q.float(), k.float(), v.float(), h0, do.float(), dht, backend="torch", **kwargs
    )
    # o, dq, dk, dv are rounded to the input dtype; final_state and dh0 stay float32.
    baseline = [round_like_kernel(t, dtype, device) if i not in (1, 5) else t for i, t in enumerate(baseline)]
    return (q, k, v, h0, do, dht, cu), ref64, baseline


@pytest.mark.parametrize(
    "dtype, reverse, cu_seqlens",
    [
        pytest.param(torch.float32, False, None, id="fp32"),
        pytest.param(torch.float32, True, (0, 7, 7, 21), id="fp32-varlen-reverse"),
        pytest.param(torch.bfloat16, False, (0, 1, 21), id="bf16-varlen"),
    ],
)
def test_public_op_forward_backward(triton_device, monkeypatch, dtype, reverse, cu_seqlens):
    """fused_recurrent_simple_gla(backend="triton") through the token loop (the routing threshold raised so that
    these 21-token inputs stay on it): o, final_state and dq, dk, dv, dh0 (incl. dht)."""
    monkeypatch.setattr(triton_recurrent, "RECURRENT_TRITON_MAX_T", 1 << 20)
    (q, k, v, h0, do, dht, cu), ref64, baseline = _op_case(dtype, reverse, cu_seqlens, triton_device)
    q, k, v, h0, do, dht, cu = _to(triton_device, q, k, v, h0, do, dht, cu)
    got = _with_grads(
        fused_recurrent_simple_gla, q, k, v, h0, do, dht, g_gamma=G_GAMMA.to(triton_device), reverse=reverse,
        cu_seqlens=cu, backend="triton",
    )
    for name, result, want, base in zip(("o", "final_state", "dq", "dk", "dv", "dh0"), got, ref64, baseline):
        assert result.dtype == base.dtype, name
        assert_matches_baseline(result, want, base, name)


@pytest.mark.parametrize("schedule", ["tnl", "minimax"])
def test_strongest_decays_are_finite_and_exact(triton_device, schedule):
    g = strongest_decays()[schedule]
    q, k, v, h0 = make_inputs(1, 40, g.shape[0], 4, 4, initial_state=True)
    o, final = _triton_scan(triton_device, q, k, v, g, 1.0, h0)
    o_ref, final_ref = recurrent_reference(q.double(), k.double(), v.double(), g, 1.0, h0.double(), True)
    o_base, final_base = torch_recurrent.recurrent_scan(q, k, v, g, 1.0, h0, 1, False, None, 64)
    assert bool(torch.isfinite(o).all()) and bool(torch.isfinite(final).all())
    assert_matches_baseline(o, o_ref, o_base, "o")
    assert_matches_baseline(final, final_ref, final_base, "final")


def test_empty_sequence_passes_the_state_through(triton_device):
    q, k, v, s0 = make_inputs(2, 0, H, K, V, initial_state=True)
    o, final = _triton_scan(triton_device, q, k, v, G_GAMMA, 1.0, s0)
    assert o.shape == (2, 0, H, V)
    torch.testing.assert_close(final, s0, rtol=0, atol=0)


def test_routing_rule():
    """Mean tokens per sequence above RECURRENT_TRITON_MAX_T -> the chunked engine, else the token loop."""
    threshold = triton_recurrent.RECURRENT_TRITON_MAX_T
    short = torch.empty(1, threshold, 1, 1)
    long = torch.empty(1, threshold + 1, 1, 1)
    two_seqs = torch.tensor([0, 1, threshold + 1])  # mean length (threshold + 1) / 2: the loop
    engine = triton_recurrent.ENGINE
    assert engine.pick(short, None) is triton_recurrent._RECURRENT
    assert engine.pick(long, two_seqs) is triton_recurrent._RECURRENT
    assert engine.pick(long, None) is triton_chunk.ENGINE


def test_routed_long_sequence_matches_reference(triton_device, monkeypatch):
    """Past the threshold the op gives the same results (on the chunked engine)."""
    monkeypatch.setattr(triton_recurrent, "RECURRENT_TRITON_MAX_T", 16)
    q, k, v, h0 = make_inputs(1, 70, H, K, V, initial_state=True)
    q_d, k_d, v_d, g_d, h0_d = _to(triton_device, q, k, v, G_GAMMA, h0)
    o, final = fused_recurrent_simple_gla(
        q_d, k_d, v_d, g_gamma=g_d, initial_state=h0_d, output_final_state=True, backend="triton"
    )
    o_ref, final_ref = recurrent_reference(q.double(), k.double(), v.double(), G_GAMMA, None, h0.double(), True)
    o_base, final_base = recurrent_reference(q, k, v, G_GAMMA, None, h0, True)
    assert_matches_baseline(o.cpu(), o_ref, o_base, "o")
    assert_matches_baseline(final.cpu(), final_ref, final_base, "final")
