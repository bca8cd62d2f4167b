"""The public scan ops under faults and at length: a NaN in one packed sequence stays in that sequence, and a
262,144-token sequence stays finite and exact (forward and every gradient) on the CPU."""

import pytest
import torch

from lightning_attention.ops import chunk_simple_gla, fused_recurrent_simple_gla
from lightning_attention.reference import chunk_reference
from lightning_attention.testing import assert_matches_baseline, make_inputs, strongest_decays

#: "tnl" layer 0's first and last heads (g = 0: no decay, the state a growing sum; g = -7: lam^64 underflows in
#: float32) and "minimax" layer 0's (g = -0.5 and -2^-8).
G_GAMMA = torch.cat([strongest_decays()["tnl"][[0, -1]], strongest_decays()["minimax"][[0, -1]]])

OPS = [
    pytest.param(chunk_simple_gla, id="chunk"),
    pytest.param(fused_recurrent_simple_gla, id="recurrent"),
]


def _forward_backward(op, q, k, v, h0, **kwargs):
    """o, final state and the gradients of q, k, v, h0 for upstream gradients of all ones."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, h0)]
    o, final = op(q=leaves[0], k=leaves[1], v=leaves[2], initial_state=leaves[3], output_final_state=True, **kwargs)
    grads = torch.autograd.grad((o, final), leaves, (torch.ones_like(o), torch.ones_like(final)))
    return o, final, *grads


@pytest.mark.parametrize("reverse", [pytest.param(False, id="forward"), pytest.param(True, id="reverse")])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("op", OPS)
def test_nan_in_one_packed_sequence_stays_there(request, op, backend, reverse):
    """Sequence 2 of 5 (lengths 40, 0, 70, 1, 30; tokens 40..110) holds NaN in q, k and v: the other sequences'
    outputs, final states and gradients are bit for bit those of the same call without the NaN (the same launches:
    any read across a sequence boundary, or a zero multiplying a NaN instead of selecting, would show)."""
    device = "cpu" if backend == "torch" else request.getfixturevalue("triton_device")
    cu = torch.tensor([0, 40, 40, 110, 111, 141], device=device)
    q, k, v, h0 = make_inputs(1, 141, 2, 16, 24, initial_state=True, num_seqs=5, device=device)
    g = G_GAMMA[[0, 3]].to(device)
    kwargs = dict(g_gamma=g, cu_seqlens=cu, reverse=reverse, backend=backend)
    clean = _forward_backward(op, q, k, v, h0, **kwargs)
    poisoned = [t.clone() for t in (q, k, v)]
    for t in poisoned:
        t[:, 40:110] = float("nan")
    dirty = _forward_backward(op, *poisoned, h0, **kwargs)
    tokens = torch.cat([torch.arange(0, 40), torch.arange(110, 141)]).to(device)
    states = torch.tensor([0, 1, 3, 4], device=device)
    for name, a, b in zip(("o", "dq", "dk", "dv"), (dirty[0], *dirty[2:5]), (clean[0], *clean[2:5])):
        assert torch.equal(a[:, tokens], b[:, tokens]), f"{name} of the clean sequences changed"
        assert bool(torch.isnan(a[:, 40:110]).any()), f"{name}: the poisoned sequence should show its NaN"
    for name, a, b in (("final_state", dirty[1], clean[1]), ("dh0", dirty[5], clean[5])):
        assert torch.equal(a[states], b[states]), f"{name} of the clean sequences changed"


def test_sequence_of_262144_tokens_is_finite_and_exact():
    """2^18 tokens (4,096 chunks) in bf16 on the torch engine, the four heads of G_GAMMA, an initial state and the
    final state's gradient: o and the final state against the float64 chunked reference, relative to the same
    reference in float32 on the same inputs with o rounded to bf16 (the tolerance policy of tests/test_ops.py); the
    gradients of q, k, v and h0 finite (their values are checked against autograd of the reference at shorter
    lengths: tests/test_ops.py, tests/test_ops_properties.py; the reference's autograd is quadratic in T).
    Head 0 (g = 0) sums all 2^18 outer products into its state."""
    T = 1 << 18
    q, k, v, h0 = make_inputs(1, T, 4, 16, 16, dtype=torch.bfloat16, initial_state=True)
    got = _forward_backward(chunk_simple_gla, q, k, v, h0, g_gamma=G_GAMMA, backend="torch")
    for name, t in zip(("o", "final_state", "dq", "dk", "dv", "dh0"), got):
        assert bool(torch.isfinite(t).all()), f"{name} is not finite"
    with torch.no_grad():
        o64, final64 = chunk_reference(q.double(), k.double(), v.double(), G_GAMMA, initial_state=h0.double(),
                                       output_final_state=True)  # fmt: skip
        o32, final32 = chunk_reference(q.float(), k.float(), v.float(), G_GAMMA, initial_state=h0,
                                       output_final_state=True)  # fmt: skip
    assert_matches_baseline(got[0], o64, o32.bfloat16(), "o")
    assert_matches_baseline(got[1], final64, final32, "final_state")
