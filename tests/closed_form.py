"""An independent float64 closed form of the scan contract (engines/base.py), shared by the tests.

Per sequence and head, lam = exp(g), 1-based positions t = 1..L, built from explicit powers of lam
(no recurrence, no chunks)::

    o_t   = scale * ( lam^(t - shift) q_t S0 + sum_{j <= t} lam^(t - j) (q_t . k_j) v_j )
    final = lam^L S0 + lam^shift * sum_{j <= L} lam^(L - j) k_j^T v_j

``shift=0`` is the public forward (o_t = scale q_t S_t, final = S_T). ``reverse`` runs the same formulas
on the time-flipped sequence. Differentiable (autograd gives the exact gradients).

With per-token gates ``g [B, T, H]`` (forward convention only), the log decay of token t is a_t = g_gamma + g_t
and, with the inclusive prefix sums A_t = a_1 + ... + a_t of the sequence (never factored into exp(A_t) exp(-A_j),
which overflows for strong gates)::

    o_t   = scale * ( exp(A_t) q_t S0 + sum_{j <= t} exp(A_t - A_j) (q_t . k_j) v_j )
    final = exp(A_L) S0 + sum_{j <= L} exp(A_L - A_j) k_j^T v_j
"""

from __future__ import annotations

import torch


def _powers(lam: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    """lam [H] ** exponent [...] -> [H, ...]; exponents < 0 give 0 (the causal mask), selected, not multiplied."""
    lam = lam.reshape(-1, *([1] * exponent.dim()))
    return torch.where(exponent >= 0, lam ** exponent.clamp(min=0), torch.zeros((), dtype=lam.dtype))


def _one_sequence(q, k, v, g, scale, state, shift):
    """q, k [L, H, K], v [L, H, V] float64, state [H, K, V] or None -> o [L, H, V], final [H, K, V]."""
    L, H, K = q.shape
    lam = torch.exp(g.double())
    t = torch.arange(1, L + 1, dtype=torch.float64)
    decay = _powers(lam, t[:, None] - t[None, :])  # [H, t, j]
    scores = torch.einsum("thk,jhk->htj", q, k) * decay
    o = torch.einsum("htj,jhv->thv", scores, v)
    kv_decay = _powers(lam, L - t) * lam[:, None] ** shift  # [H, j]
    final = torch.einsum("hj,jhk,jhv->hkv", kv_decay, k, v)
    if state is not None:
        q_decay = _powers(lam, t - shift)  # [H, t]
        o = o + torch.einsum("ht,thk,hkv->thv", q_decay, q, state)
        final = final + lam[:, None, None] ** L * state
    return scale * o, final


def _one_gated_sequence(q, k, v, a, scale, state):
    """q, k [L, H, K], v [L, H, V], log decays a [L, H] float64, state [H, K, V] or None -> o [L, H, V], final.

    Every exponent is the sum of the decays a pair spans, built as a masked sum of ``a`` rather than as a
    difference of prefix sums: then autograd's dg adds only the pairs that span each token, with no cancelling
    terms (a difference of prefix sums loses 7 digits of dg to cancellation at g = -20 per token, even in fp64)."""
    L = q.shape[0]
    t = torch.arange(L)
    spans = ((t[None, :, None] < t[None, None, :]) & (t[None, None, :] <= t[:, None, None])).double()  # [t, j, s]
    pair = torch.einsum("tjs,sh->htj", spans, a)  # sum of a over (j, t]
    causal = (t[:, None] >= t[None, :])
    decay = torch.where(causal, torch.exp(torch.where(causal, pair, 0.0)), 0.0)
    o = torch.einsum("htj,thk,jhk,jhv->thv", decay, q, k, v)
    to_end = torch.einsum("js,sh->hj", (t[:, None] < t[None, :]).double(), a)  # sum of a over (j, L)
    final = torch.einsum("hj,jhk,jhv->hkv", torch.exp(to_end), k, v)
    if state is not None:
        from_start = torch.einsum("ts,sh->ht", (t[None, :] <= t[:, None]).double(), a)  # sum of a over [0, t]
        o = o + torch.einsum("ht,thk,hkv->thv", torch.exp(from_start), q, state)
        final = final + torch.exp(a.sum(0))[:, None, None] * state
    return scale * o, final


def closed_form_scan(q, k, v, g_gamma, scale, state=None, shift=0, reverse=False, cu_seqlens=None, g=None):
    """q, k [B, T, H, K], v [B, T, H, V], g_gamma [H] (or None with g), g [B, T, H] or None, state [N, H, K, V]
    or None -> (o, final [N, H, K, V]), everything float64."""
    if g is not None and shift != 0:
        raise ValueError("the gated closed form is written for the forward convention (shift=0)")
    q, k, v = (x.double() for x in (q, k, v))
    state = None if state is None else state.double()
    if cu_seqlens is None:
        spans = [(b, 0, q.shape[1]) for b in range(q.shape[0])]
    else:
        bounds = cu_seqlens.tolist()
        spans = [(0, bounds[n], bounds[n + 1]) for n in range(len(bounds) - 1)]
    outs, finals = [], []
    if g is not None:
        a = g.double() + (0.0 if g_gamma is None else g_gamma.double())
    for n, (b, start, end) in enumerate(spans):
        qs, ks, vs = (x[b, start:end] for x in (q, k, v))
        s0 = None if state is None else state[n]
        if g is None:
            if reverse:
                qs, ks, vs = (x.flip(0) for x in (qs, ks, vs))
            o, final = _one_sequence(qs, ks, vs, g_gamma, scale, s0, shift)
        else:
            a_s = a[b, start:end]
            if reverse:
                qs, ks, vs, a_s = (x.flip(0) for x in (qs, ks, vs, a_s))
            o, final = _one_gated_sequence(qs, ks, vs, a_s, scale, s0)
        outs.append(o.flip(0) if reverse else o)
        finals.append(final)
    o = torch.stack(outs) if cu_seqlens is None else torch.cat(outs)[None]
    return o, torch.stack(finals)


# --- engine-level checks shared by tests/engines/*: one scan function or engine against the closed form ---

# Head 0 without decay, a moderate head, and g = -8 (lam^64 underflows to 0 in float32).
G_GAMMA = torch.tensor([0.0, -0.4, -8.0])
SCALE = 0.7
# float64 scans agree with the closed form up to summation order: a few hundred ulps.
FP64_TOL = 1e-12


def scan_case_params():
    """pytest params of (T, with_state, shift, reverse, cu_seqlens) covering the contract."""
    import pytest

    cases = []
    for shift in (0, 1):
        cases += [
            pytest.param(37, False, shift, False, None, id=f"shift{shift}-zero-state"),
            pytest.param(37, True, shift, False, None, id=f"shift{shift}-state"),
            pytest.param(37, True, shift, True, None, id=f"shift{shift}-state-reverse"),
            pytest.param(1, True, shift, False, None, id=f"shift{shift}-T1"),
            pytest.param(0, True, shift, False, None, id=f"shift{shift}-T0"),
            pytest.param(50, True, shift, False, (0, 0, 1, 33, 33, 50), id=f"shift{shift}-varlen"),
            pytest.param(50, True, shift, True, (0, 17, 18, 50), id=f"shift{shift}-varlen-reverse"),
        ]
    return cases


def scan_inputs(T, with_state, cu_seqlens, dtype=torch.float64, K=5, V=3):
    from lightning_attention.testing import make_inputs

    cu = None if cu_seqlens is None else torch.tensor(cu_seqlens)
    B = 2 if cu is None else 1
    num_seqs = None if cu is None else len(cu_seqlens) - 1
    q, k, v, state = make_inputs(B, T, G_GAMMA.shape[0], K, V, dtype=dtype, initial_state=with_state,
                                 num_seqs=num_seqs, seed=T + 7)
    return q, k, v, state, cu


def assert_scan_matches_closed_form(scan, T, with_state, shift, reverse, cu_seqlens, chunk_size=64):
    """A scan function (engines/base.py's Scan) in float64 against the closed form."""
    from lightning_attention.testing import assert_rel_close

    q, k, v, state, cu = scan_inputs(T, with_state, cu_seqlens)
    o, final = scan(q, k, v, G_GAMMA, SCALE, state, shift, reverse, cu, chunk_size)
    o_ref, final_ref = closed_form_scan(q, k, v, G_GAMMA, SCALE, state, shift, reverse, cu)
    assert o.shape == q.shape[:3] + (v.shape[-1],) and o.dtype == q.dtype
    assert final.shape == final_ref.shape and final.dtype == torch.float64
    assert_rel_close(o, o_ref, FP64_TOL, "o")
    assert_rel_close(final, final_ref, FP64_TOL, "final")


def assert_engine_backward_matches_closed_form(engine, T, reverse, cu_seqlens, chunk_size=64, gates=None):
    """engine.backward in float64 against autograd through the closed form, dht included: dq, dk, dv, dh0, and dg
    with per-token ``gates`` (a :data:`GATE_KINDS` name). At g = -20 dg is ~1e-9 of the token's own pair: a formula
    that cancels that pair fails here by orders of magnitude."""
    from lightning_attention._validation import ScanConfig
    from lightning_attention.testing import assert_rel_close

    q, k, v, state, cu = scan_inputs(T, True, cu_seqlens)
    g = None if gates is None else scan_gates(gates, *q.shape[:2])
    leaves = [t.requires_grad_() for t in (q, k, v, state, g) if t is not None]
    o_ref, final_ref = closed_form_scan(q, k, v, G_GAMMA, SCALE, state, 0, reverse, cu, g=g)
    gen = torch.Generator().manual_seed(3)
    do = torch.randn(o_ref.shape, generator=gen, dtype=torch.float64)
    dht = torch.randn(final_ref.shape, generator=gen, dtype=torch.float64)
    expected = torch.autograd.grad((o_ref * do).sum() + (final_ref * dht).sum(), leaves)
    cfg = ScanConfig(SCALE, reverse, chunk_size, True)
    with torch.no_grad():
        grads = engine.backward(q, k, v, G_GAMMA, cfg, state, cu, do, dht, **({} if g is None else {"g": g}))
    assert len(grads) == 5 and (grads[4] is None) == (g is None)
    for name, grad, want in zip(("dq", "dk", "dv", "dh0", "dg"), grads, expected):
        assert grad.shape == want.shape and grad.dtype == torch.float64, name
        assert_rel_close(grad, want, FP64_TOL, name)


# --- per-token gates g [B, T, H]: the same engine-level checks ---

#: gate kinds of the gated engine checks (tests/test_reference.py's): log-sigmoid gates, -20 per token, 0.
GATE_KINDS = ("random", "strong", "zero")


def scan_gates(kind, B, T, seed=11):
    """[B, T, H] float64 log gates for the engine checks (H = len(G_GAMMA))."""
    H = G_GAMMA.shape[0]
    if kind == "strong":
        return torch.full((B, T, H), -20.0, dtype=torch.float64)
    if kind == "zero":
        return torch.zeros(B, T, H, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.functional.logsigmoid(2 * torch.randn(B, T, H, generator=gen, dtype=torch.float64))


def gated_token_loop(q, k, v, g_gamma, scale, state, shift, reverse, cu_seqlens, g):
    """The scan contract of engines/base.py written out token by token, for any gates and both shifts (float64):
    shift 0: S_p = exp(a_p) S_{p-1} + k_p^T v_p; shift 1: S_p = S'_{p-1} + k_p^T v_p, S'_p = exp(a_p) S_p."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    a = g.double() + g_gamma.double()
    spans = [(b, 0, T) for b in range(B)] if cu_seqlens is None else [
        (0, s, e) for s, e in zip(cu_seqlens.tolist()[:-1], cu_seqlens.tolist()[1:])]
    o = torch.zeros(B, T, H, V, dtype=torch.float64)
    finals = []
    for n, (b, start, end) in enumerate(spans):
        S = torch.zeros(H, K, V, dtype=torch.float64) if state is None else state[n].double()
        order = range(end - 1, start - 1, -1) if reverse else range(start, end)
        for t in order:
            decay = torch.exp(a[b, t])[:, None, None]
            if shift == 0:
                S = decay * S + k[b, t].double()[:, :, None] * v[b, t].double()[:, None, :]
                o[b, t] = scale * torch.einsum("hk,hkv->hv", q[b, t].double(), S)
            else:
                S = S + k[b, t].double()[:, :, None] * v[b, t].double()[:, None, :]
                o[b, t] = scale * torch.einsum("hk,hkv->hv", q[b, t].double(), S)
                S = decay * S
        finals.append(S)
    return o, torch.stack(finals)


def assert_gated_scan_matches_definition(scan, T, with_state, shift, reverse, cu_seqlens, gates, chunk_size=64):
    """A scan function with per-token gates, in float64, against :func:`gated_token_loop`."""
    from lightning_attention.testing import assert_rel_close

    q, k, v, state, cu = scan_inputs(T, with_state, cu_seqlens)
    g = scan_gates(gates, *q.shape[:2])
    o, final = scan(q, k, v, G_GAMMA, SCALE, state, shift, reverse, cu, chunk_size, g=g)
    o_ref, final_ref = gated_token_loop(q, k, v, G_GAMMA, SCALE, state, shift, reverse, cu, g)
    assert o.dtype == q.dtype and final.dtype == torch.float64
    assert bool(torch.isfinite(o).all()) and bool(torch.isfinite(final).all())
    assert_rel_close(o, o_ref, FP64_TOL, "o")
    assert_rel_close(final, final_ref, FP64_TOL, "final")
