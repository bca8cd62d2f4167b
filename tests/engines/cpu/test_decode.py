"""The torch decode (one or several tokens per row) and varlen prefill on a slot-indexed state cache
(engines/cpu/decode.py).

Truth is the float64 reference over whole sequences (tests/decode_reference.py for rows with lengths and gates).
Tolerances: float32 results relative to the same reference run in float32 (lightning_attention.testing); the
issue's absolute bar for prefill (rel err <= 2e-3 for float32 inputs); a bfloat16 cache element within one
rounding (2^-8 relative) of the exact update.
"""

import pytest
import torch

from lightning_attention import decay
from lightning_attention.engines.cpu import decode
from lightning_attention.reference import chunk_reference, recurrent_reference
from lightning_attention.testing import assert_matches_baseline, assert_rel_close, make_inputs, strongest_decays
from tests.decode_reference import decode_reference

H, K, V = 4, 8, 16
G_GAMMA = decay.g_gamma(H, 0, 4)  # g = 0 (no decay), -2, -4, -6
NUM_SLOTS = 7


def _per_token(x):
    """[N, L, H, D] -> list of L single-token decode inputs [N, 1, H, D]."""
    return list(x.split(1, dim=1))


def test_decode_steps_equal_the_recurrence():
    """L decode steps from cached states == the recurrence over those L tokens from the same states."""
    N, L = 3, 12
    q, k, v, h0 = make_inputs(N, L, H, K, V, initial_state=True, seed=1)
    slots = torch.tensor([5, 0, 3])
    cache = torch.randn(NUM_SLOTS, H, K, V, dtype=torch.float32)
    cache[slots] = h0
    outs = [decode.decode_tokens(*x, cache, slots, G_GAMMA, 0.3) for x in zip(*map(_per_token, (q, k, v)))]
    o = torch.cat(outs, dim=1)
    o_ref, final_ref = recurrent_reference(q.double(), k.double(), v.double(), G_GAMMA, 0.3, h0.double(), True)
    o_base, final_base = recurrent_reference(q, k, v, G_GAMMA, 0.3, h0, True)
    assert_matches_baseline(o, o_ref, o_base, "o")
    assert_matches_baseline(cache[slots], final_ref, final_base, "state")


def test_padding_rows_are_zero_and_touch_nothing():
    q, k, v, _ = make_inputs(4, 1, H, K, V, seed=2)
    cache = torch.randn(NUM_SLOTS, H, K, V)
    before = cache.clone()
    slots = torch.tensor([-1, 2, -1, 6])
    o = decode.decode_tokens(q, k, v, cache, slots, G_GAMMA, 1.0)
    assert torch.equal(o[[0, 2]], torch.zeros(2, 1, H, V))
    untouched = [s for s in range(NUM_SLOTS) if s not in (2, 6)]
    assert torch.equal(cache[untouched], before[untouched])
    o_ref, state_ref = recurrent_reference(
        q[[1, 3]].double(), k[[1, 3]].double(), v[[1, 3]].double(), G_GAMMA, 1.0, before[[2, 6]].double(), True
    )
    assert_rel_close(o[[1, 3]], o_ref, 1e-6, "o")
    assert_rel_close(cache[[2, 6]], state_ref, 1e-6, "state")


def test_bf16_cache_is_one_rounding_of_the_exact_update():
    q, k, v, _ = make_inputs(3, 1, H, K, V, seed=3)
    cache = torch.randn(NUM_SLOTS, H, K, V).to(torch.bfloat16)
    slots = torch.tensor([1, 4, 0])
    exact = torch.exp(G_GAMMA.double())[:, None, None] * cache[slots].double() + k[:, 0].double()[..., None] * v[:, 0].double()[..., None, :]  # noqa: E501
    o = decode.decode_tokens(q, k, v, cache, slots, G_GAMMA, 0.5)
    err = (cache[slots].double() - exact).abs()
    assert bool((err <= 2.0**-8 * exact.abs() + 1e-6).all()), f"max rel err {(err / exact.abs()).max():.2e}"
    o_ref = 0.5 * torch.einsum("nhk,nhkv->nhv", q[:, 0].double(), exact)
    assert_rel_close(o[:, 0], o_ref, 1e-6, "o (from the float32 state, before rounding)")


@pytest.mark.parametrize("gated", [pytest.param(False, id="g_gamma"), pytest.param(True, id="g_gamma+g")])
def test_multi_token_rows_with_lengths_and_gates(gated):
    """L = 6 tokens per row, lengths 6, 0 and 3 and a padding row, optional per-token gates: o and the states vs
    the recurrence in float64; zero past each length; the read-only pass leaves the cache, the commit of each row's
    prefix gives the updating pass's state bit for bit."""
    L, slots, lengths = 6, torch.tensor([3, 5, -1, 1]), torch.tensor([6, 0, 4, 3])
    q, k, v, h0 = make_inputs(4, L, H, K, V, initial_state=True, seed=6)
    g = -3 * torch.rand(4, L, H, generator=torch.Generator().manual_seed(3)) if gated else None
    cache = torch.randn(NUM_SLOTS, H, K, V)
    cache[slots[[0, 1, 3]]] = h0[[0, 1, 3]]
    before = cache.clone()
    o_peek = decode.decode_tokens(q, k, v, cache, slots, G_GAMMA, 0.7, g=g, lengths=lengths, update_cache=False)
    assert torch.equal(cache, before)
    o = decode.decode_tokens(q, k, v, cache, slots, G_GAMMA, 0.7, g=g, lengths=lengths)
    assert torch.equal(o, o_peek)
    live = [0, 1, 3]
    o_ref, s_ref = decode_reference(q[live], k[live], v[live], h0[live].double(), G_GAMMA, 0.7,
                                    None if g is None else g[live], lengths[live])  # fmt: skip
    o_base, s_base = decode_reference(q[live], k[live], v[live], h0[live], G_GAMMA, 0.7,
                                      None if g is None else g[live], lengths[live])  # fmt: skip
    assert_matches_baseline(o[live], o_ref, o_base, "o")
    assert_matches_baseline(cache[slots[live]], s_ref, s_base, "states")
    assert torch.equal(o[2], torch.zeros(L, H, V)) and torch.equal(o[3, 3:], torch.zeros(L - 3, H, V))
    assert torch.equal(cache[5], before[5]), "a row of length 0 changed its slot"
    committed = before.clone()
    assert decode.decode_tokens(k, k, v, committed, slots, G_GAMMA, 1.0, g=g, lengths=lengths, write_o=False) is None
    assert torch.equal(committed, cache)


@pytest.mark.parametrize("schedule", ["tnl", "minimax"])
def test_prefill_then_decode_equals_one_pass(schedule):
    """Prefill (lengths crossing many 64-token chunks, non-zero cached states, one fresh request) then decode
    steps == one chunked pass over each whole sequence, with the strongest decays of the schedule."""
    g = strongest_decays()[schedule]
    heads = g.shape[0]
    lengths, steps = [130, 1, 64, 257], 3
    N = len(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    q, k, v, h0 = make_inputs(1, int(cu[-1]), heads, K, V, initial_state=True, num_seqs=N, seed=4)
    dq, dk, dv, _ = make_inputs(N, steps, heads, K, V, seed=5)
    slots = torch.tensor([6, 2, 0, 3])
    use = torch.tensor([True, True, False, True])
    cache = torch.full((NUM_SLOTS, heads, K, V), float("nan"))  # unused slots hold garbage: never read
    cache[slots] = h0
    o_pre = decode.prefill_into_slots(q, k, v, g, 0.5, cu, cache, slots, use)
    o_dec = torch.cat(
        [decode.decode_tokens(*x, cache, slots, g, 0.5) for x in zip(*map(_per_token, (dq, dk, dv)))], dim=1
    )
    h0_used = torch.where(use[:, None, None, None], h0, 0.0)
    for n in range(N):
        seq = slice(int(cu[n]), int(cu[n + 1]))
        whole = [torch.cat([x[0, seq], y[n]])[None] for x, y in ((q, dq), (k, dk), (v, dv))]
        o_ref, final_ref = chunk_reference(*(x.double() for x in whole), g, 0.5, h0_used[n : n + 1].double(), True)
        got = torch.cat([o_pre[0, seq], o_dec[n]])[None]
        assert_rel_close(got, o_ref, 2e-3, f"o of sequence {n}")
        o_base, _ = chunk_reference(*whole, g, 0.5, h0_used[n : n + 1], True)
        assert_matches_baseline(got, o_ref, o_base, f"o of sequence {n}")
        assert_rel_close(cache[slots[n]][None], final_ref, 2e-3, f"state of sequence {n}")
    assert bool(torch.isnan(cache[[1, 4, 5]]).all()), "slots not named were written"
