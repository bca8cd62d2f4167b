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


def _gates(kind, B, T, seed):
    """[B, T, H] float32 log gates: "random" log-sigmoid gates (fla's tests' distribution, spread 2x wider), "strong"
    -20 per token (exp underflows within a chunk: the cumulative sum reaches -1280 in 64 tokens), "zero"."""
    if kind == "strong":
        return torch.full((B, T, H), -20.0)
    if kind == "zero":
        return torch.zeros(B, T, H)
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.functional.logsigmoid(2 * torch.randn(B, T, H, generator=gen, dtype=torch.float64)).float()


#: which decays a case uses: the constant g_gamma, per-token g, or both (they add).
DECAYS = {"g_gamma": (False, True), "g": (True, False), "g+g_gamma": (True, True)}


def _run_with_grads(fn, q, k, v, h0, do, dht, g=None, **kwargs):
    """o, final and the gradients of sum(o * do) + sum(final * dht) w.r.t. q, k, v, h0 (and g when given)."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, h0) + ((g,) if g is not None else ())]
    gate = {} if g is None else {"g": leaves[4]}
    o, final = fn(*leaves[:3], initial_state=leaves[3], output_final_state=True, **gate, **kwargs)
    loss = (o.double() * do.double()).sum() + (final.double() * dht.double()).sum()
    return (o, final, *torch.autograd.grad(loss, leaves))


@functools.lru_cache(maxsize=None)
def _case(B, T, dtype, reverse=False, cu_seqlens=None, decays="g_gamma", gate_kind="random"):
    """Inputs in ``dtype`` plus (float64 reference results, same-dtype baseline results), cached across ops."""
    cu = _varlen(cu_seqlens)
    num_seqs = None if cu is None else len(cu_seqlens) - 1
    q, k, v, h0 = make_inputs(B, T, H, K, V, dtype=dtype, initial_state=True, num_seqs=num_seqs, seed=T)
    gen = torch.Generator().manual_seed(T + 1)
    do = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64).to(dtype)
    dht = torch.randn(h0.shape, generator=gen, dtype=torch.float64).to(h0.dtype)
    with_g, with_g_gamma = DECAYS[decays]
    g = _gates(gate_kind, B, T, seed=T + 2) if with_g else None
    args = dict(reverse=reverse, cu_seqlens=cu, g_gamma=G_GAMMA if with_g_gamma else None)
    ref64 = _run_with_grads(
        recurrent_reference, q.double(), k.double(), v.double(), h0.double(), do, dht,
        None if g is None else g.double(), **args,
    )  # fmt: skip
    baseline = _run_with_grads(recurrent_reference, q, k, v, h0, do, dht, g, **args)
    return (q, k, v, h0, do, dht, g, args), ref64, baseline


NAMES = ("o", "final_state", "dq", "dk", "dv", "dh0", "dg")


def _check_against_reference(op, B, T, dtype, reverse=False, cu_seqlens=None, decays="g_gamma", gate_kind="random",
                             **op_kwargs):  # fmt: skip
    (q, k, v, h0, do, dht, g, args), ref64, baseline = _case(B, T, dtype, reverse, cu_seqlens, decays, gate_kind)
    results = _run_with_grads(functools.partial(op, **op_kwargs), q, k, v, h0, do, dht, g, **args)
    assert results[0].dtype == dtype and results[1].dtype == torch.float32
    assert len(results) == len(ref64)
    for name, got, want, base in zip(NAMES, results, ref64, baseline):
        assert got.dtype == base.dtype, name
        assert bool(torch.isfinite(got).all()), name
        assert_matches_baseline(got, want, base, name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 63, 64, 65, 1000])
@pytest.mark.parametrize("op", OPS)
def test_matches_reference(op, T, dtype):
    """h0 and the final state's gradient always on; T around the chunk size and spanning many chunks."""
    _check_against_reference(op, 2, T, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 63, 64, 65, 1000])
@pytest.mark.parametrize("op", OPS)
def test_gated_matches_reference(op, T, dtype):
    """Per-token gates g together with g_gamma: o, final state, dq, dk, dv, dh0 and dg (incl. dht)."""
    _check_against_reference(op, 2, T, dtype, decays="g+g_gamma")


@pytest.mark.parametrize(
    "decays, gate_kind, dtype",
    [
        pytest.param("g", "random", torch.float32, id="g-alone"),
        pytest.param("g", "random", torch.bfloat16, id="g-alone-bf16"),
        pytest.param("g", "strong", torch.float32, id="g=-20"),
        pytest.param("g+g_gamma", "strong", torch.bfloat16, id="g=-20+g_gamma-bf16"),
        pytest.param("g", "zero", torch.float32, id="g=0"),
        pytest.param("g+g_gamma", "zero", torch.float16, id="g=0+g_gamma-fp16"),
    ],
)
@pytest.mark.parametrize("op", OPS)
def test_gate_kinds_match_reference(op, decays, gate_kind, dtype):
    """g alone, g = -20 per token (every decay across a token underflows; dg is ~1e-9 of the token's own pair, which
    a cancelling formula would lose entirely) and g = 0 (no decay: plain causal linear attention)."""
    _check_against_reference(op, 2, 150, dtype, decays=decays, gate_kind=gate_kind)


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
@pytest.mark.parametrize("decays", ["g_gamma", "g+g_gamma"])
@pytest.mark.parametrize("op", OPS)
def test_reverse_and_varlen_match_reference(op, decays, T, reverse, cu_seqlens, dtype):
    B = 2 if cu_seqlens is None else 1
    _check_against_reference(op, B, T, dtype, reverse, cu_seqlens, decays)


@pytest.mark.parametrize("decays", ["g_gamma", "g"])
@pytest.mark.parametrize("chunk_size", [16, 32, 128])
def test_chunk_sizes_match_reference(chunk_size, decays):
    _check_against_reference(chunk_simple_gla, 1, 300, torch.float32, False, (0, 0, 1, 100, 100, 229, 300), decays,
                             chunk_size=chunk_size)  # fmt: skip


# One full-Jacobian check per op without and with gates (every entry of every gradient by finite differences:
# a projection can hide an error in a gradient that contributes little to it); the other cases use
# fast_mode: gradcheck then compares the analytical and numerical vector-Jacobian products along random directions,
# which a wrong gradient entry fails just the same, at a fraction of the cost.
GRADCHECK_CASES = [
    pytest.param(dict(T=37, h0=True, final=True), id="h0-final"),
    pytest.param(dict(T=37, fast_mode=True), id="o-only-fast"),
    pytest.param(dict(T=37, h0=True, final=True, reverse=True, fast_mode=True), id="h0-final-reverse-fast"),
    pytest.param(dict(T=37, h0=True, final=True, cu_seqlens=(0, 0, 1, 20, 37), fast_mode=True), id="varlen-fast"),
    pytest.param(dict(T=37, h0=True, final=True, reverse=True, cu_seqlens=(0, 16, 16, 37), fast_mode=True),
                 id="varlen-reverse-fast"),
    pytest.param(dict(T=70, h0=True, final=True, fast_mode=True), id="T70-fast"),
    # Per-token gates (dg by finite differences too), with and without g_gamma; dg is also checked entry by entry
    # in float64 against the closed form in tests/engines/cpu (1e-12).
    pytest.param(dict(T=37, g=True, fast_mode=True), id="g-o-only-fast"),
    pytest.param(dict(T=37, h0=True, final=True, g=True), id="g-h0-final"),
    pytest.param(dict(T=37, h0=True, final=True, g=True, g_gamma=False, reverse=True,
                      cu_seqlens=(0, 0, 1, 20, 37), fast_mode=True), id="g-alone-varlen-reverse-fast"),
    pytest.param(dict(T=70, h0=True, final=True, g=True, fast_mode=True), id="g-T70-fast"),
]


@pytest.mark.parametrize("case", GRADCHECK_CASES)
@pytest.mark.parametrize("op", OPS)
def test_gradcheck(op, case):
    """Finite differences in float64, including d(initial_state), the final state's gradient (dht) and dg.
    The chunked op runs with chunk_size=16 so that T=37 spans two full chunks and a partial one; the recurrent
    op takes its token loop for T <= 64 and its chunked path at T=70 (and for every backward with g)."""
    cu = _varlen(case.get("cu_seqlens"))
    num_seqs = None if cu is None else len(case["cu_seqlens"]) - 1
    q, k, v, h0 = make_inputs(1, case["T"], 2, 3, 2, dtype=torch.float64, requires_grad=True, num_seqs=num_seqs,
                              initial_state=case.get("h0", False))
    g_gamma = torch.tensor([0.0, -0.7]) if case.get("g_gamma", True) else None
    gen = torch.Generator().manual_seed(3)
    gates = torch.nn.functional.logsigmoid(torch.randn(1, case["T"], 2, generator=gen, dtype=torch.float64))
    extra = dict(chunk_size=16) if op is chunk_simple_gla else {}
    inputs = [q, k, v] + ([h0] if h0 is not None else []) + ([gates.requires_grad_()] if case.get("g") else [])

    def fn(q, k, v, *rest):
        h0 = rest[0] if case.get("h0") else None
        g = rest[-1] if case.get("g") else None
        o, final = op(q, k, v, g, g_gamma, scale=0.6, initial_state=h0, output_final_state=case.get("final", False),
                      reverse=case.get("reverse", False), cu_seqlens=cu, **extra)  # fmt: skip
        return (o, final) if final is not None else o

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
    o_simple, final_simple = simple(q, k, v, g_gamma=g, scale=scale, initial_state=h0, output_final_state=True)
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
    torch.testing.assert_close(o, simple(q, k, v, g_gamma=decay.g_gamma(H, 1, 3, "tnl"))[0], rtol=0, atol=0)
    o, _ = lightning(q, k, v, 1, 3, scale=0.25, schedule="minimax")
    minimax = decay.g_gamma(H, 1, 3, "minimax")
    torch.testing.assert_close(o, simple(q, k, v, g_gamma=minimax, scale=0.25)[0], rtol=0, atol=0)


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
    g = torch.zeros(2, 0, H, requires_grad=True)
    o, final = op(q, k, v, g, G_GAMMA, initial_state=h0, output_final_state=True)
    assert o.shape == (2, 0, H, V) and o.dtype == q.dtype
    torch.testing.assert_close(final, h0, rtol=0, atol=0)
    dht = torch.randn_like(h0)
    dq, dk, dv, dh0, dg = torch.autograd.grad((final * dht).sum() + o.sum(), (q, k, v, h0, g))
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape and dg.shape == g.shape
    torch.testing.assert_close(dh0, dht, rtol=0, atol=0)
    _, final = op(q, k, v, g_gamma=G_GAMMA, output_final_state=True)
    torch.testing.assert_close(final, torch.zeros(2, H, K, V), rtol=0, atol=0)


@pytest.mark.parametrize("T", [0, 1, 70])
@pytest.mark.parametrize("op", OPS)
def test_empty_batch(op, T):
    """B == 0 (an empty batch, e.g. a serving step with no running sequence): empty outputs and gradients."""
    q, k, v, h0 = make_inputs(0, T, H, K, V, requires_grad=True, initial_state=True)
    g = torch.zeros(0, T, H, requires_grad=True)
    o, final = op(q, k, v, g, G_GAMMA, initial_state=h0, output_final_state=True)
    assert o.shape == (0, T, H, V) and final.shape == (0, H, K, V)
    grads = torch.autograd.grad(o.sum() + final.sum(), (q, k, v, h0, g), allow_unused=False)
    assert [t.shape for t in grads] == [t.shape for t in (q, k, v, h0, g)]


@pytest.mark.parametrize("op", OPS)
def test_inputs_not_modified(op):
    cu_seqlens = torch.tensor([0, 0, 1, 70, 130])
    q, k, v, h0 = make_inputs(1, 130, H, K, V, requires_grad=True, initial_state=True, num_seqs=4)
    g_gamma = G_GAMMA.clone()
    g = _gates("random", 1, 130, seed=0).requires_grad_()
    before = [t.detach().clone() for t in (q, k, v, h0, g, g_gamma, cu_seqlens)]
    o, final = op(q, k, v, g, g_gamma, initial_state=h0, output_final_state=True, reverse=True, cu_seqlens=cu_seqlens)
    do, dht = torch.randn_like(o), torch.randn_like(final)
    before += [do.clone(), dht.clone()]
    torch.autograd.backward((o, final), (do, dht))
    for i, (now, then) in enumerate(zip((q, k, v, h0, g, g_gamma, cu_seqlens, do, dht), before)):
        assert torch.equal(now.detach(), then), f"input {i} was modified"


@pytest.mark.parametrize("schedule", ["tnl", "minimax"])
def test_long_sequence_strongest_decay_is_finite_and_exact(schedule):
    """T = 65536 with the first and last head of each schedule's layer 0 (8 heads): "tnl" pairs g = 0 (no decay)
    with g = -7 (lam^64 underflows to 0 in float32), "minimax" its strongest head g = -0.5 with its weakest.
    Finite forward and backward, and equal to the naive chunked reference."""
    g = strongest_decays()[schedule][[0, -1]]
    T = 65536
    q, k, v, h0 = make_inputs(1, T, 2, 4, 2, requires_grad=True, initial_state=True)
    o, final = chunk_simple_gla(q, k, v, g_gamma=g, initial_state=h0, output_final_state=True)
    (o.sum() + final.sum()).backward()
    for name, t in (("o", o), ("final_state", final), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad), ("dh0", h0.grad)):
        assert bool(torch.isfinite(t).all()), f"{name} is not finite"
    with torch.no_grad():
        o_ref, final_ref = chunk_reference(q.double(), k.double(), v.double(), g, None, h0.double(), True)
        o_base, final_base = chunk_reference(q, k, v, g, None, h0, True)
    assert_matches_baseline(o, o_ref, o_base, "o")
    assert_matches_baseline(final, final_ref, final_base, "final_state")


# ---------------------------------------------------------------------------------------------------------------
# fla's signatures: parameter order, state_v_first, cu_seqlens_cpu, low-precision initial states, no decay.


@pytest.mark.parametrize("op", OPS)
def test_fla_positional_order(op):
    """q, k, v, g, g_gamma, scale, initial_state, output_final_state, ... by position, as fla's callers write them."""
    (q, k, v, h0, do, dht, g, args), _, _ = _case(1, 70, torch.float32, decays="g+g_gamma")
    by_keyword = op(q, k, v, g=g, g_gamma=G_GAMMA, scale=0.3, initial_state=h0, output_final_state=True)
    by_position = op(q, k, v, g, G_GAMMA, 0.3, h0, True)
    for got, want in zip(by_position, by_keyword):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("op", OPS)
def test_no_decay_without_g_and_g_gamma(op):
    """Neither g nor g_gamma: no decay at all (fla's behaviour), i.e. g_gamma = 0."""
    q, k, v, h0 = make_inputs(1, 70, H, K, V, initial_state=True)
    o, final = op(q, k, v, initial_state=h0, output_final_state=True)
    o_zero, final_zero = op(q, k, v, g_gamma=torch.zeros(H), initial_state=h0, output_final_state=True)
    torch.testing.assert_close(o, o_zero, rtol=0, atol=0)
    torch.testing.assert_close(final, final_zero, rtol=0, atol=0)


@pytest.mark.parametrize("op", OPS)
def test_state_v_first(op):
    """state_v_first: initial_state, final_state and their gradients in the [N, H, V, K] layout; the final state is
    a transposed view of the [K, V] result. Same numbers as the default layout, transposed."""
    (q, k, v, h0, do, dht, g, args), ref64, baseline = _case(1, 150, torch.float32, cu_seqlens=(0, 1, 80, 150),
                                                             decays="g+g_gamma")  # fmt: skip
    h0_vk, dht_vk = h0.transpose(-1, -2).contiguous(), dht.transpose(-1, -2).contiguous()
    results = _run_with_grads(functools.partial(op, state_v_first=True), q, k, v, h0_vk, do, dht_vk, g, **args)
    o, final, *grads = results
    assert final.shape == h0_vk.shape and grads[3].shape == h0_vk.shape
    assert final.transpose(-1, -2).is_contiguous()  # a view of the engine's [K, V] state, no copy
    transposed = [o, final.transpose(-1, -2), *grads[:3], grads[3].transpose(-1, -2), grads[4]]
    for name, got, want, base in zip(NAMES, transposed, ref64, baseline):
        assert_matches_baseline(got, want, base, name)


@pytest.mark.parametrize("op", OPS)
def test_cu_seqlens_cpu_replaces_the_host_read(monkeypatch, op):
    """With cu_seqlens_cpu the engines plan from the host copy: the (here pretend-device) cu_seqlens is never read
    on the host, and the results equal those without the copy bit for bit."""
    (q, k, v, h0, do, dht, g, args), _, _ = _case(1, 300, torch.float32, cu_seqlens=(0, 0, 1, 100, 100, 229, 300),
                                                  decays="g+g_gamma")  # fmt: skip
    plain = _run_with_grads(op, q, k, v, h0, do, dht, g, **args)
    from lightning_attention import _validation

    device_cu = args["cu_seqlens"].clone()
    host_cu = device_cu.clone()
    read = []
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(_validation, "values_readable", lambda t: t is not device_cu)
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: read.append(t is device_cu) or real_tolist(t))
    kwargs = dict(args, cu_seqlens=device_cu, cu_seqlens_cpu=host_cu)
    with_copy = _run_with_grads(op, q, k, v, h0, do, dht, g, **kwargs)
    assert read and not any(read), "the device cu_seqlens was read on the host"
    for got, want in zip(with_copy, plain):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("h0_dtype", [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")])
@pytest.mark.parametrize("op", OPS)
def test_low_precision_initial_state(op, h0_dtype):
    """An fp16/bf16 initial_state is accepted as fla accepts it: computed in float32 (the same results as its
    float32 copy), final_state float32, and its gradient returned in its own dtype."""
    (q, k, v, h0, do, dht, g, args), _, _ = _case(2, 70, torch.bfloat16, decays="g+g_gamma")
    h0_low = h0.to(h0_dtype)
    low = _run_with_grads(op, q, k, v, h0_low, do, dht, g, **args)
    wide = _run_with_grads(op, q, k, v, h0_low.float(), do, dht, g, **args)
    assert low[1].dtype == torch.float32 and low[5].dtype == h0_dtype
    for i, (got, want) in enumerate(zip(low, wide)):
        torch.testing.assert_close(got, want.to(got.dtype), rtol=0, atol=0, msg=NAMES[i])


def test_recurrent_accepts_fla_deprecated_transpose_state_layout():
    """fla's fused_recurrent_simple_gla maps its deprecated ``transpose_state_layout`` to state_v_first (with a
    DeprecationWarning) and rejects both at once; so does ours."""
    q, k, v, h0 = make_inputs(1, 20, H, K, V, initial_state=True)
    h0_vk = h0.transpose(-1, -2).contiguous()
    with pytest.warns(DeprecationWarning, match="state_v_first"):
        o, final = fused_recurrent_simple_gla(q, k, v, g_gamma=G_GAMMA, initial_state=h0_vk, output_final_state=True,
                                              transpose_state_layout=True)  # fmt: skip
    o_ref, final_ref = fused_recurrent_simple_gla(q, k, v, g_gamma=G_GAMMA, initial_state=h0_vk,
                                                  output_final_state=True, state_v_first=True)  # fmt: skip
    torch.testing.assert_close(o, o_ref, rtol=0, atol=0)
    torch.testing.assert_close(final, final_ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="not both"):
        fused_recurrent_simple_gla(q, k, v, state_v_first=True, transpose_state_layout=True)


@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float64, id="fp64")])
@pytest.mark.parametrize("op", OPS)
def test_gradient_of_g_has_g_dtype(op, dtype):
    """dg comes back in g's own dtype (computed in the state dtype)."""
    q, k, v, _ = make_inputs(1, 20, H, K, V)
    g = _gates("random", 1, 20, seed=1).to(dtype).requires_grad_()
    o, _ = op(q, k, v, g)
    (dg,) = torch.autograd.grad(o.sum(), g)
    assert dg.dtype == dtype and dg.shape == g.shape and bool(torch.isfinite(dg).all())
