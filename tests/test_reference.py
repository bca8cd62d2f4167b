"""The exact references agree with each other and with an independent closed form, in float64.

recurrent_reference (token loop) and chunk_reference (naive chunked form) are the truth every engine is judged
against, so they are themselves checked against tests/closed_form.py: explicit powers of lam, no recurrence.
"""

import pytest
import torch

from lightning_attention.reference import chunk_reference, recurrent_reference
from lightning_attention.testing import assert_rel_close, make_inputs
from tests.closed_form import closed_form_scan

# fp64 agreement of three different summation orders: a few hundred ulps at most.
TOL = 1e-12

# Head 0 without decay, a moderate head and the strongest "tnl" decay (g = -8: lam^64 underflows).
G_GAMMA = torch.tensor([0.0, -0.3, -8.0])

CASES = [
    pytest.param(dict(B=2, T=37), id="plain"),
    pytest.param(dict(B=2, T=37, h0=True), id="h0"),
    pytest.param(dict(B=1, T=37, h0=True, reverse=True), id="h0-reverse"),
    pytest.param(dict(B=1, T=1), id="T1"),
    pytest.param(dict(B=1, T=40, h0=True, cu_seqlens=[0, 0, 1, 17, 17, 40]), id="varlen-empty-len1"),
    pytest.param(dict(B=1, T=40, h0=True, reverse=True, cu_seqlens=[0, 1, 23, 23, 40]), id="varlen-reverse"),
]


def _inputs(B, T, h0=False, reverse=False, cu_seqlens=None, K=5, V=3):
    cu = None if cu_seqlens is None else torch.tensor(cu_seqlens)
    num_seqs = None if cu is None else len(cu_seqlens) - 1
    q, k, v, state = make_inputs(B, T, 3, K, V, dtype=torch.float64, initial_state=h0, num_seqs=num_seqs, seed=T)
    return q, k, v, state, reverse, cu


def _reference_runs(q, k, v, state, reverse, cu):
    yield "recurrent", recurrent_reference(q, k, v, G_GAMMA, 0.7, state, True, reverse, cu)
    for chunk_size in (1, 5, 16, 64):
        yield f"chunk{chunk_size}", chunk_reference(q, k, v, G_GAMMA, 0.7, state, True, reverse, cu, chunk_size)


@pytest.mark.parametrize("case", CASES)
def test_references_match_closed_form(case):
    q, k, v, state, reverse, cu = _inputs(**case)
    o_ref, final_ref = closed_form_scan(q, k, v, G_GAMMA, 0.7, state, 1, reverse, cu)
    for name, (o, final) in _reference_runs(q, k, v, state, reverse, cu):
        assert o.dtype == torch.float64 and final.dtype == torch.float64
        assert_rel_close(o, o_ref, TOL, f"{name} o")
        assert_rel_close(final, final_ref, TOL, f"{name} final_state")


@pytest.mark.parametrize("case", CASES)
def test_reference_gradients_match_closed_form(case):
    q, k, v, state, reverse, cu = _inputs(**case)
    leaves = [t.requires_grad_() for t in (q, k, v, state) if t is not None]
    gen = torch.Generator().manual_seed(1)
    o_ref, final_ref = closed_form_scan(q, k, v, G_GAMMA, 0.7, state, 1, reverse, cu)
    do = torch.randn(o_ref.shape, generator=gen, dtype=torch.float64)
    dht = torch.randn(final_ref.shape, generator=gen, dtype=torch.float64)
    expected = torch.autograd.grad((o_ref * do).sum() + (final_ref * dht).sum(), leaves)
    for name, (o, final) in _reference_runs(q, k, v, state, reverse, cu):
        grads = torch.autograd.grad((o * do).sum() + (final * dht).sum(), leaves)
        for leaf_name, grad, want in zip("qkvh", grads, expected):
            assert_rel_close(grad, want, TOL, f"{name} d{leaf_name}")


def test_k_dim_differs_from_v_dim():
    q, k, v, state, _, _ = _inputs(B=1, T=20, h0=True, K=7, V=2)
    o, final = recurrent_reference(q, k, v, G_GAMMA, None, state, True)
    assert o.shape == (1, 20, 3, 2) and final.shape == (1, 3, 7, 2)
    o_ref, final_ref = closed_form_scan(q, k, v, G_GAMMA, 7**-0.5, state)  # scale=None means K ** -0.5
    assert_rel_close(o, o_ref, TOL, "o")
    assert_rel_close(final, final_ref, TOL, "final_state")


def test_definition_by_hand():
    """One head, K = V = 1, three tokens: the recurrence written out (lam = 0.5, h0 = 2, scale = 1)."""
    q = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64).reshape(1, 3, 1, 1)
    k = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64).reshape(1, 3, 1, 1)
    v = torch.tensor([4.0, 2.0, 8.0], dtype=torch.float64).reshape(1, 3, 1, 1)
    g = torch.tensor([-0.6931471805599453])  # log(0.5)
    h0 = torch.full((1, 1, 1, 1), 2.0, dtype=torch.float64)
    states = [0.5 * 2.0 + 1.0 * 4.0]  # 5
    states.append(0.5 * states[-1] - 1.0 * 2.0)  # 0.5
    states.append(0.5 * states[-1] + 0.5 * 8.0)  # 4.25
    expected_o = torch.tensor([1.0 * 5.0, 2.0 * 0.5, 3.0 * 4.25], dtype=torch.float64).reshape(1, 3, 1, 1)
    for o, final in (
        recurrent_reference(q, k, v, g, 1.0, h0, True),
        chunk_reference(q, k, v, g, 1.0, h0, True, chunk_size=2),
    ):
        torch.testing.assert_close(o, expected_o, rtol=1e-7, atol=0)
        torch.testing.assert_close(final, torch.full_like(h0, 4.25), rtol=1e-7, atol=0)


@pytest.mark.parametrize("reference", [recurrent_reference, chunk_reference], ids=["recurrent", "chunk"])
def test_low_precision_inputs_compute_in_float32(reference):
    q, k, v, state, _, _ = _inputs(B=1, T=20, h0=True)
    o, final = reference(q.bfloat16(), k.bfloat16(), v.bfloat16(), G_GAMMA, None, state.float(), True)
    assert o.dtype == torch.bfloat16 and final.dtype == torch.float32
    o_ref, final_ref = closed_form_scan(q.bfloat16(), k.bfloat16(), v.bfloat16(), G_GAMMA, 5**-0.5, state.float())
    assert_rel_close(o, o_ref, 2**-8, "o (bf16 output rounding)")
    assert_rel_close(final, final_ref, 1e-6, "final_state (float32 accumulation)")
