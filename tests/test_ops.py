"""The public ops against the exact references: gradients, dtypes, lengths, varlen, reverse, both schedules.

Tolerances (see lightning_attention.testing): a result in dtype X is compared with the float64 reference on the
*same* (already rounded) inputs, relative to a same-dtype baseline. The baseline is the token-loop reference
called on the dtype-X inputs: it accumulates in float32 (the best any implementation of these ops can do) and
rounds o and the input gradients to dtype X at the end, exactly where the ops do. Its error is therefore the
unavoidable part (output rounding, float32 accumulation over T tokens); the ops may be at most 2x worse.
A pure-bf16 recurrence would be a far weaker yardstick (its state error grows with T), so it is not used.
"""

import functools

import pytest
import torch

from lightning_attention import decay
from lightning_attention.ops import (
    chunk_lightning_attn,
    chunk_simple_gla,
    fused_recurrent_lightning_attn,
    fused_recurrent_simple_gla,
)
from lightning_attention.reference import chunk_reference, recurrent_reference
from lightning_attention.testing import assert_matches_baseline, make_inputs, strongest_decays

H, K, V = 4, 16, 8  # K != V throughout
# "tnl", layer 0 of 4: g = 0 (no decay), -2, -4, -6 (lam^64 underflows in float32).
G_GAMMA = decay.g_gamma(H, 0, 4)

OPS = [
    pytest.param(chunk_simple_gla, id="chunk"),
    pytest.param(fused_recurrent_simple_gla, id="recurrent"),
]
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.float16, id="fp16"),
]


def _varlen(cu_seqlens):
    return None if cu_seqlens is None else torch.tensor(cu_seqlens)


def _run_with_grads(fn, q, k, v, h0, do, dht, **kwargs):
    """o, final and the gradients of sum(o * do) + sum(final * dht) w.r.t. q, k, v, h0."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, h0)]
    o, final = fn(*leaves[:3], initial_state=leaves[3], output_final_state=True, **kwargs)
    loss = (o.double() * do.double()).sum() + (final.double() * dht.double()).sum()
    return (o, final, *torch.autograd.grad(loss, leaves))


@functools.lru_cache(maxsize=None)
def _case(B, T, dtype, reverse=False, cu_seqlens=None):
    """Inputs in ``dtype`` plus (float64 reference results, same-dtype baseline results), cached across ops."""
    cu = _varlen(cu_seqlens)
    num_seqs = None if cu is None else len(cu_seqlens) - 1
    q, k, v, h0 = make_inputs(B, T, H, K, V, dtype=dtype, initial_state=True, num_seqs=num_seqs, seed=T)
    gen = torch.Generator().manual_seed(T + 1)
    do = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64).to(dtype)
    dht = torch.randn(h0.shape, generator=gen, dtype=torch.float64).to(h0.dtype)
    args = dict(reverse=reverse, cu_seqlens=cu)
    reference = functools.partial(recurrent_reference, g_gamma=G_GAMMA)
    ref64 = _run_with_grads(reference, q.double(), k.double(), v.double(), h0.double(), do, dht, **args)
    baseline = _run_with_grads(reference, q, k, v, h0, do, dht, **args)
    return (q, k, v, h0, do, dht, args), ref64, baseline


def _check_against_reference(op, B, T, dtype, reverse=False, cu_seqlens=None, **op_kwargs):
    (q, k, v, h0, do, dht, args), ref64, baseline = _case(B, T, dtype, reverse, cu_seqlens)
    results = _run_with_grads(functools.partial(op, g_gamma=G_GAMMA, **op_kwargs), q, k, v, h0, do, dht, **args)
    assert results[0].dtype == dtype and results[1].dtype == torch.float32
    for name, got, want, base in zip(("o", "final_state", "dq", "dk", "dv", "dh0"), results, ref64, baseline):
        assert got.dtype == base.dtype, name
        assert_matches_baseline(got, want, base, name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 63, 64, 65, 1000])
@pytest.mark.parametrize("op", OPS)
def test_matches_reference(op, T, dtype):
    """h0 and the final state's gradient always on; T around the chunk size and spanning many chunks."""
    _check_against_reference(op, 2, T, dtype)


@pytest.mark.parametrize("dtype", DTYPES[:2])
@pytest.mark.parametrize(
    "T, reverse, cu_seqlens",
    [
        pytest.param(150, True, None, id="reverse"),
        pytest.param(300, False, (0, 0, 1, 100, 100, 229, 300), id="varlen-empty-len1"),
        pytest.param(300, True, (0, 65, 66, 66, 300), id="varlen-reverse"),
        pytest.param(40, False, (0, 1, 1, 2, 40), id="varlen-short"),
    ],
)
@pytest.mark.parametrize("op", OPS)
def test_reverse_and_varlen_match_reference(op, T, reverse, cu_seqlens, dtype):
    B = 2 if cu_seqlens is None else 1
    _check_against_reference(op, B, T, dtype, reverse, cu_seqlens)


@pytest.mark.parametrize("chunk_size", [16, 32, 128])
def test_chunk_sizes_match_reference(chunk_size):
    _check_against_reference(chunk_simple_gla, 1, 300, torch.float32, False, (0, 0, 1, 100, 100, 229, 300), chunk_size=chunk_size)


GRADCHECK_CASES = [
    pytest.param(dict(T=37), id="o-only"),
    pytest.param(dict(T=37, h0=True, final=True), id="h0-final"),
    pytest.param(dict(T=37, h0=True, final=True, reverse=True), id="h0-final-reverse"),
    pytest.param(dict(T=37, h0=True, final=True, cu_seqlens=(0, 0, 1, 20, 37)), id="varlen"),
    pytest.param(dict(T=37, h0=True, final=True, reverse=True, cu_seqlens=(0, 16, 16, 37)), id="varlen-reverse"),
    pytest.param(dict(T=70, h0=True, final=True, fast_mode=True), id="T70-fast"),
]


@pytest.mark.parametrize("case", GRADCHECK_CASES)
@pytest.mark.parametrize("op", OPS)
def test_gradcheck(op, case):
    """Finite differences in float64, including d(initial_state) and the final state's gradient (dht).
    The chunked op runs with chunk_size=16 so that T=37 spans two full chunks and a partial one; the recurrent
    op takes its token loop for T <= 64 and its chunked path at T=70."""
    cu = _varlen(case.get("cu_seqlens"))
    num_seqs = None if cu is None else len(case["cu_seqlens"]) - 1
    q, k, v, h0 = make_inputs(1, case["T"], 2, 3, 2, dtype=torch.float64, requires_grad=True, num_seqs=num_seqs,
                              initial_state=case.get("h0", False))
    g = torch.tensor([0.0, -0.7])
    extra = dict(chunk_size=16) if op is chunk_simple_gla else {}

    def fn(q, k, v, *h0):
        o, final = op(q, k, v, g, scale=0.6, initial_state=h0[0] if h0 else None,
                      output_final_state=case.get("final", False), reverse=case.get("reverse", False),
                      cu_seqlens=cu, **extra)
        return (o, final) if final is not None else o

    inputs = (q, k, v) if h0 is None else (q, k, v, h0)
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=case.get("fast_mode", False))


SCHEDULES = [
    pytest.param("tnl", 0, id="tnl-layer0"),
    pytest.param("tnl", 5, id="tnl-layer5"),
    pytest.param("minimax", 0, id="minimax-layer0"),
    pytest.param("minimax", 5, id="minimax-layer5"),
]
LIGHTNING = [
    pytest.param(chunk_lightning_attn, chunk_simple_gla, id="chunk"),
    pytest.param(fused_recurrent_lightning_attn, fused_recurrent_simple_gla, id="recurrent"),
]


@pytest.mark.parametrize("lightning, simple", LIGHTNING)
@pytest.mark.parametrize("schedule, layer_idx", SCHEDULES)
def test_lightning_ops_are_simple_gla_with_the_schedule(lightning, simple, schedule, layer_idx):
    num_layers = 6
    q, k, v, h0 = make_inputs(1, 100, H, K, V, initial_state=True)
    g = decay.g_gamma(H, layer_idx, num_layers, schedule=schedule)
    scale = decay.default_scale(schedule, K)
    o, final = lightning(q, k, v, layer_idx, num_layers, initial_state=h0, output_final_state=True, schedule=schedule)
    o_simple, final_simple = simple(q, k, v, g, scale=scale, initial_state=h0, output_final_state=True)
    torch.testing.assert_close(o, o_simple, rtol=0, atol=0)
    torch.testing.assert_close(final, final_simple, rtol=0, atol=0)

    o_ref, final_ref = recurrent_reference(q.double(), k.double(), v.double(), g, scale, h0.double(), True)
    o_base, final_base = recurrent_reference(q, k, v, g, scale, h0, True)
    assert_matches_baseline(o, o_ref, o_base, "o")
    assert_matches_baseline(final, final_ref, final_base, "final_state")


@pytest.mark.parametrize("lightning, simple", LIGHTNING)
def test_lightning_defaults_and_explicit_scale(lightning, simple):
    q, k, v, _ = make_inputs(1, 20, H, K, V)
    o, final = lightning(q, k, v, 1, 3)
    assert final is None
    torch.testing.assert_close(o, simple(q, k, v, decay.g_gamma(H, 1, 3, "tnl"))[0], rtol=0, atol=0)
    o, _ = lightning(q, k, v, 1, 3, scale=0.25, schedule="minimax")
    torch.testing.assert_close(o, simple(q, k, v, decay.g_gamma(H, 1, 3, "minimax"), scale=0.25)[0], rtol=0, atol=0)


@pytest.mark.parametrize(
    "lightning, bad_kwarg",
    [
        pytest.param(chunk_lightning_attn, "head_first", id="chunk-head_first"),
        pytest.param(fused_recurrent_lightning_attn, "chunk_size", id="recurrent-chunk_size"),
        pytest.param(fused_recurrent_lightning_attn, "gk", id="recurrent-gk"),
    ],
)
def test_lightning_unknown_kwargs_raise(lightning, bad_kwarg):
    q, k, v, _ = make_inputs(1, 4, H, K, V)
    with pytest.raises(TypeError, match=bad_kwarg):
        lightning(q, k, v, 0, 2, **{bad_kwarg: 1})


@pytest.mark.parametrize("lightning", [p.values[0] for p in LIGHTNING], ids=["chunk", "recurrent"])
def test_lightning_unknown_schedule_raises(lightning):
    q, k, v, _ = make_inputs(1, 4, H, K, V)
    with pytest.raises(ValueError, match="schedule"):
        lightning(q, k, v, 0, 2, schedule="fla")


@pytest.mark.parametrize("op", OPS)
def test_empty_sequence(op):
    """T == 0: empty o, final_state == initial_state, and its gradient passes straight through (dh0 == dht)."""
    q, k, v, h0 = make_inputs(2, 0, H, K, V, requires_grad=True, initial_state=True)
    o, final = op(q, k, v, G_GAMMA, initial_state=h0, output_final_state=True)
    assert o.shape == (2, 0, H, V) and o.dtype == q.dtype
    torch.testing.assert_close(final, h0, rtol=0, atol=0)
    dht = torch.randn_like(h0)
    dq, dk, dv, dh0 = torch.autograd.grad((final * dht).sum() + o.sum(), (q, k, v, h0))
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    torch.testing.assert_close(dh0, dht, rtol=0, atol=0)
    _, final = op(q, k, v, G_GAMMA, output_final_state=True)
    torch.testing.assert_close(final, torch.zeros(2, H, K, V), rtol=0, atol=0)


@pytest.mark.parametrize("T", [0, 1, 70])
@pytest.mark.parametrize("op", OPS)
def test_empty_batch(op, T):
    """B == 0 (an empty batch, e.g. a serving step with no running sequence): empty outputs and gradients."""
    q, k, v, h0 = make_inputs(0, T, H, K, V, requires_grad=True, initial_state=True)
    o, final = op(q, k, v, G_GAMMA, initial_state=h0, output_final_state=True)
    assert o.shape == (0, T, H, V) and final.shape == (0, H, K, V)
    grads = torch.autograd.grad(o.sum() + final.sum(), (q, k, v, h0), allow_unused=False)
    assert [g.shape for g in grads] == [t.shape for t in (q, k, v, h0)]


@pytest.mark.parametrize("op", OPS)
def test_inputs_not_modified(op):
    cu_seqlens = torch.tensor([0, 0, 1, 70, 130])
    q, k, v, h0 = make_inputs(1, 130, H, K, V, requires_grad=True, initial_state=True, num_seqs=4)
    g = G_GAMMA.clone()
    before = [t.detach().clone() for t in (q, k, v, h0, g, cu_seqlens)]
    o, final = op(q, k, v, g, initial_state=h0, output_final_state=True, reverse=True, cu_seqlens=cu_seqlens)
    do, dht = torch.randn_like(o), torch.randn_like(final)
    before += [do.clone(), dht.clone()]
    torch.autograd.backward((o, final), (do, dht))
    for i, (now, then) in enumerate(zip((q, k, v, h0, g, cu_seqlens, do, dht), before)):
        assert torch.equal(now.detach(), then), f"input {i} was modified"


@pytest.mark.parametrize("schedule", ["tnl", "minimax"])
def test_long_sequence_strongest_decay_is_finite_and_exact(schedule):
    """T = 65536 with the first and last head of each schedule's layer 0 (8 heads): "tnl" pairs g = 0 (no decay)
    with g = -7 (lam^64 underflows to 0 in float32), "minimax" its strongest head g = -0.5 with its weakest.
    Finite forward and backward, and equal to the naive chunked reference."""
    g = strongest_decays()[schedule][[0, -1]]
    T = 65536
    q, k, v, h0 = make_inputs(1, T, 2, 4, 2, requires_grad=True, initial_state=True)
    o, final = chunk_simple_gla(q, k, v, g, initial_state=h0, output_final_state=True)
    (o.sum() + final.sum()).backward()
    for name, t in (("o", o), ("final_state", final), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad), ("dh0", h0.grad)):
        assert bool(torch.isfinite(t).all()), f"{name} is not finite"
    with torch.no_grad():
        o_ref, final_ref = chunk_reference(q.double(), k.double(), v.double(), g, None, h0.double(), True)
        o_base, final_base = chunk_reference(q, k, v, g, None, h0, True)
    assert_matches_baseline(o, o_ref, o_base, "o")
    assert_matches_baseline(final, final_ref, final_base, "final_state")
