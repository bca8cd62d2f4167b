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
    pytest.param(0, False, None, id="forward"),
    pytest.param(1, False, None, id="shift1"),
    pytest.param(0, True, None, id="reverse"),
    pytest.param(1, True, None, id="shift1-reverse"),
    pytest.param(0, False, (0, 0, 1, 9, 23), id="varlen-empty-len1"),
    pytest.param(1, True, (0, 14, 14, 23), id="varlen-shift1-reverse"),
]
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.bfloat16, id="bf16"),
]


def _to(device, *tensors):
    return [None if t is None else t.to(device) for t in tensors]


def _triton_scan(device, q, k, v, g, scale, s0, shift=0, reverse=False, cu_seqlens=None):
    """The Triton scan on ``device``; results back on the CPU."""
    q, k, v, g, s0, cu = _to(device, q, k, v, g, s0, cu_seqlens)
    o, final = triton_recurrent.recurrent_scan(q, k, v, g, scale, s0, shift, reverse, cu, 64)
    return o.cpu(), final.cpu()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shift, reverse, cu_seqlens", SCAN_CASES)
def test_scan_contract_matches_closed_form(triton_device, shift, reverse, cu_seqlens, dtype):
    """o and final of the scan primitive (engines/base.py), with a non-zero S0 and the strongest decays."""
    cu = None if cu_seqlens is None else torch.tensor(cu_seqlens)
    B, N = (2, 2) if cu is None else (1, len(cu_seqlens) - 1)
    q, k, v, s0 = make_inputs(B, 23, H, K, V, dtype=dtype, initial_state=True, num_seqs=N, seed=1 - shift)
    args = (G_GAMMA, 0.7, s0, shift, reverse, cu)
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
    monkeypatch.setattr(triton_recurrent.ENGINE, "max_tokens", 1 << 20)
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
    o_base, final_base = torch_recurrent.recurrent_scan(q, k, v, g, 1.0, h0, 0, False, None, 64)
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
    assert engine.pick(short, None) is triton_recurrent.TOKEN_LOOP
    assert engine.pick(long, two_seqs) is triton_recurrent.TOKEN_LOOP
    assert engine.pick(long, None) is triton_chunk.ENGINE


def test_routed_long_sequence_matches_reference(triton_device, monkeypatch):
    """Past the threshold the op gives the same results (on the chunked engine)."""
    monkeypatch.setattr(triton_recurrent.ENGINE, "max_tokens", 16)
    q, k, v, h0 = make_inputs(1, 70, H, K, V, initial_state=True)
    q_d, k_d, v_d, g_d, h0_d = _to(triton_device, q, k, v, G_GAMMA, h0)
    o, final = fused_recurrent_simple_gla(
        q_d, k_d, v_d, g_gamma=g_d, initial_state=h0_d, output_final_state=True, backend="triton"
    )
    o_ref, final_ref = recurrent_reference(q.double(), k.double(), v.double(), G_GAMMA, None, h0.double(), True)
    o_base, final_base = recurrent_reference(q, k, v, G_GAMMA, None, h0, True)
    assert_matches_baseline(o.cpu(), o_ref, o_base, "o")
    assert_matches_baseline(final.cpu(), final_ref, final_base, "final")


# ---------------------------------------------------------------------------------------------------------------
# Per-token gates g [B, T, H] (added to g_gamma): the token loop's forward, both state offsets, and the engine.


def _gated_scan(q, k, v, a, scale, s0, shift, reverse, cu_seqlens, dtype):
    """The scan contract with per-token log decays a [B, T, H] in ``dtype``, token by token (engines/base.py):
    shift 0: S_t = exp(a_t) S_{t-1} + k_t^T v_t; shift 1: S_t = S'_{t-1} + k_t^T v_t, S'_t = exp(a_t) S_t."""
    q, k, v, a = (x.to(dtype) for x in (q, k, v, a))
    B, T, H, _ = q.shape
    spans = [(b, 0, T, b) for b in range(B)] if cu_seqlens is None else [
        (0, s, e, n) for n, (s, e) in enumerate(zip(cu_seqlens.tolist()[:-1], cu_seqlens.tolist()[1:]))]  # fmt: skip
    o = torch.zeros(B, T, H, v.shape[-1], dtype=dtype)
    finals = []
    for b, start, end, n in spans:
        state = s0[n].to(dtype).clone()
        for t in (range(end - 1, start - 1, -1) if reverse else range(start, end)):
            lam = torch.exp(a[b, t])[:, None, None]
            state = (lam * state if shift == 0 else state) + k[b, t, :, :, None] * v[b, t, :, None, :]
            o[b, t] = scale * torch.einsum("hk,hkv->hv", q[b, t], state)
            if shift == 1:
                state = lam * state
        finals.append(state)
    return o, torch.stack(finals)


GATED_SCAN_CASES = [
    pytest.param(0, False, None, id="forward"),
    pytest.param(1, True, None, id="shift1-reverse"),
    pytest.param(0, True, (0, 0, 1, 9, 23), id="varlen-empty-len1-reverse"),
    pytest.param(1, False, (0, 14, 14, 23), id="varlen-shift1"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shift, reverse, cu_seqlens", GATED_SCAN_CASES)
def test_gated_scan_contract(triton_device, shift, reverse, cu_seqlens, dtype):
    """o and final of the scan primitive with per-token gates (g + g_gamma, the strongest decays among them)."""
    from tests.engines.triton.test_chunk_gates import gates

    cu = None if cu_seqlens is None else torch.tensor(cu_seqlens)
    B, N = (2, 2) if cu is None else (1, len(cu_seqlens) - 1)
    q, k, v, s0 = make_inputs(B, 23, H, K, V, dtype=dtype, initial_state=True, num_seqs=N, seed=8 - shift)
    g = gates("random", B, 23, H)
    a = g + G_GAMMA
    q_d, k_d, v_d, g_d, gg_d, s0_d, cu_d = _to(triton_device, q, k, v, g, G_GAMMA, s0, cu)
    o, final = triton_recurrent.recurrent_scan(q_d, k_d, v_d, gg_d, 0.7, s0_d, shift, reverse, cu_d, 64, g=g_d)
    args = (0.7, s0, shift, reverse, cu)
    o_ref, final_ref = _gated_scan(q, k, v, a, *args, torch.float64)
    o_base, final_base = _gated_scan(q, k, v, a, *args, torch.float32)
    assert o.dtype == dtype and final.dtype == torch.float32
    assert_matches_baseline(o.cpu(), o_ref, round_like_kernel(o_base, dtype, triton_device), "o")
    assert_matches_baseline(final.cpu(), final_ref, final_base, "final")


def test_gated_engine_forward_loop_backward_chunked(triton_device, monkeypatch):
    """The recurrent engine with gates: the token loop's forward, the chunked engine's backward (dg included),
    both against the float64 reference (varlen with an empty sequence, reverse, h0 and dht)."""
    from tests.engines.triton.test_chunk_gates import gates

    from lightning_attention._validation import ScanConfig

    monkeypatch.setattr(triton_recurrent.ENGINE, "max_tokens", 1 << 20)
    cu = torch.tensor([0, 5, 5, 21])
    q, k, v, h0 = make_inputs(1, 21, H, K, V, initial_state=True, num_seqs=3, seed=3)
    g = gates("random", 1, 21, H)
    gen = torch.Generator().manual_seed(4)
    do, dht = torch.randn(1, 21, H, V, generator=gen), torch.randn(3, H, K, V, generator=gen)
    cfg = ScanConfig(scale=0.5, reverse=True, output_final_state=True)
    args = _to(triton_device, q, k, v, G_GAMMA, h0, cu, g, do, dht)
    engine = triton_recurrent.TOKEN_LOOP
    o, final = engine.forward(*args[:4], cfg, *args[4:6], g=args[6])
    grads = engine.backward(*args[:4], cfg, *args[4:6], *args[7:], g=args[6])
    leaves = [t.double().requires_grad_() for t in (q, k, v, h0, g)]
    o_ref, final_ref = recurrent_reference(*leaves[:3], G_GAMMA.double(), 0.5, leaves[3], True, True, cu, g=leaves[4])
    grads_ref = torch.autograd.grad((o_ref * do.double()).sum() + (final_ref * dht.double()).sum(), leaves)
    leaves32 = [t.detach().float().requires_grad_() for t in leaves]
    o_b, final_b = recurrent_reference(*leaves32[:3], G_GAMMA, 0.5, leaves32[3], True, True, cu, g=leaves32[4])
    grads_b = torch.autograd.grad((o_b * do).sum() + (final_b * dht).sum(), leaves32)
    for name, got, want, base in zip(("o", "final", "dq", "dk", "dv", "dh0", "dg"), (o, final, *grads),
                                     (o_ref, final_ref, *grads_ref), (o_b, final_b, *grads_b)):  # fmt: skip
        assert_matches_baseline(got.cpu(), want, base, name, floor=1e-5)


def test_slot_mode_with_gates(triton_device):
    """recurrent_into_slots with per-token gates: starts from the named slots (or zero), writes them back."""
    from tests.engines.triton.test_chunk_gates import gates

    cu = torch.tensor([0, 3, 3, 12], dtype=torch.int32)
    q, k, v, _ = make_inputs(1, 12, H, K, V, seed=9)
    g = gates("random", 1, 12, H)
    cache = torch.randn(4, H, K, V, generator=torch.Generator().manual_seed(2))
    slots, use = torch.tensor([3, 0, 1]), torch.tensor([True, True, False])
    h0 = cache[slots] * use[:, None, None, None]
    args = _to(triton_device, q, k, v, G_GAMMA, cu, cache, slots, use, g)
    o = triton_recurrent.recurrent_into_slots(*args[:4], 0.5, *args[4:8], g=args[8])
    o_ref, final_ref = recurrent_reference(q.double(), k.double(), v.double(), G_GAMMA.double(), 0.5, h0.double(), True,
                                           False, cu, g=g.double())  # fmt: skip
    torch.testing.assert_close(o.cpu().double(), o_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(args[5][slots.to(triton_device)].cpu().double(), final_ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(args[5][2].cpu(), cache[2])  # the slot no sequence names
