"""The Triton decode step and slot-indexed prefill (engines/triton/decode.py, recurrent.recurrent_into_slots).

Runs on CUDA when present, else on CPU through the Triton interpreter at small shapes (``triton_device``).
Truth is the float64 recurrence; float32 results are judged relative to the same recurrence in float32
(lightning_attention.testing). A bfloat16 cache element must be within one rounding of the exact update:
2^-8 relative when rounding to nearest (GPU), 2^-7 toward zero (the interpreter, see rounding.py).
"""

import pytest
import torch

from lightning_attention import decay
from lightning_attention.reference import recurrent_reference
from lightning_attention.testing import assert_matches_baseline, assert_rel_close, make_inputs, strongest_decays

triton_decode = pytest.importorskip("lightning_attention.engines.triton.decode")
from lightning_attention.engines.triton import recurrent as triton_recurrent  # noqa: E402

H, K, V = 4, 16, 32
G_GAMMA = decay.g_gamma(H, 0, 4)  # g = 0 (no decay), -2, -4, -6
NUM_SLOTS = 6


def _token(n, seed):
    q, k, v, _ = make_inputs(n, 1, H, K, V, seed=seed)
    return [x[:, 0] for x in (q, k, v)]


def _exact_update(cache, slots, k, v, g):
    """float64 lam * S + k^T v for the rows' slots."""
    lam = torch.exp(g.double())[:, None, None]
    return lam * cache[slots].double() + k.double()[..., None] * v.double()[..., None, :]


@pytest.mark.parametrize(
    "config",
    [
        pytest.param(None, id="default-tiles"),
        pytest.param((16, 8, 2), id="2x2-tiles"),  # V and K each split in two blocks
    ],
)
@pytest.mark.parametrize(
    "slots",
    [
        pytest.param([3, 0, 5], id="dense"),
        pytest.param([-1, 2, -1, 4, -1], id="padding"),
        pytest.param([-1, -1], id="all-padding"),
    ],
)
def test_decode_step_fp32_cache(triton_device, slots, config):
    """o and the updated slots; padding rows give zero and every slot not named keeps its exact bits."""
    slot_ids = torch.tensor(slots, dtype=torch.int32)
    q, k, v = _token(len(slots), seed=len(slots))
    cache = torch.randn(NUM_SLOTS, H, K, V)
    before = cache.clone()
    dev_cache = cache.to(triton_device)
    o = triton_decode.decode_step(
        *(x.to(triton_device) for x in (q, k, v)), dev_cache, slot_ids.to(triton_device), G_GAMMA.to(triton_device), 0.4,
        config=config,
    ).cpu()
    cache = dev_cache.cpu()
    rows = [i for i, s in enumerate(slots) if s >= 0]
    used = [s for s in slots if s >= 0]
    untouched = [s for s in range(NUM_SLOTS) if s not in used]
    assert o.dtype == q.dtype and torch.equal(o[[i for i in range(len(slots)) if i not in rows]], torch.zeros(len(slots) - len(rows), H, V))
    assert torch.equal(cache[untouched], before[untouched])
    if rows:
        r = torch.tensor(rows)
        args = (q[r, None], k[r, None], v[r, None], G_GAMMA, 0.4)
        o_ref, s_ref = recurrent_reference(*(x.double() for x in args[:3]), *args[3:], before[used].double(), True)
        o_base, s_base = recurrent_reference(*args, before[used], True)
        assert_matches_baseline(o[r], o_ref[:, 0], o_base[:, 0], "o")
        assert_matches_baseline(cache[used], s_ref, s_base, "state")


def test_decode_step_bf16_cache_and_inputs(triton_device):
    slots = torch.tensor([4, -1, 1], dtype=torch.int64)
    q, k, v = _token(3, seed=7)
    cache = torch.randn(NUM_SLOTS, H, K, V).to(torch.bfloat16)
    before = cache.clone()
    exact = _exact_update(before, slots[[0, 2]], k[[0, 2]], v[[0, 2]], G_GAMMA)
    dev_cache = cache.to(triton_device)
    o = triton_decode.decode_step(
        *(x.to(triton_device) for x in (q, k, v)), dev_cache, slots.to(triton_device), G_GAMMA.to(triton_device), 1.0
    ).cpu()
    cache = dev_cache.cpu()
    rounding = 2.0**-8 if triton_device == "cuda" else 2.0**-7
    err = (cache[[4, 1]].double() - exact).abs()
    assert bool((err <= rounding * exact.abs() + 1e-6).all()), f"max rel err {(err / exact.abs()).max():.2e}"
    assert torch.equal(cache[[0, 2, 3, 5]], before[[0, 2, 3, 5]])
    o_ref = torch.einsum("nhk,nhkv->nhv", q[[0, 2]].double(), exact)
    assert_rel_close(o[[0, 2]], o_ref, 1e-6, "o (from the float32 state, before rounding)")
    assert torch.equal(o[1], torch.zeros(H, V))


def test_out_of_range_slot_is_skipped(triton_device):
    """An unchecked bad id (check_slots=False on the GPU) never reads or writes outside the cache."""
    q, k, v = _token(2, seed=8)
    cache = torch.randn(NUM_SLOTS, H, K, V, device=triton_device)
    before = cache.clone()
    slots = torch.tensor([NUM_SLOTS, -5], device=triton_device)
    o = triton_decode.decode_step(*(x.to(triton_device) for x in (q, k, v)), cache, slots, G_GAMMA.to(triton_device), 1.0)
    assert torch.equal(o.cpu(), torch.zeros(2, H, V)) and torch.equal(cache, before)


def _check_prefill(device, prefill, schedule, cache_dtype, lengths):
    """Varlen prefill from cached states (one fresh request, one empty sequence), strongest decays: o and the
    final states vs the float64 recurrence; slots not named are untouched (their NaN garbage never read)."""
    g = strongest_decays()[schedule]
    heads = g.shape[0]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    q, k, v, h0 = make_inputs(1, int(cu[-1]), heads, 8, 8, initial_state=True, num_seqs=len(lengths), seed=9)
    slots = torch.tensor([2, 5, 0, 3])
    use = torch.tensor([True, False, True, True])
    cache = torch.full((NUM_SLOTS, heads, 8, 8), float("nan"))
    cache[slots] = h0
    cache = cache.to(cache_dtype)
    h0 = torch.where(use[:, None, None, None], cache[slots].float(), 0.0)
    dev = [x.to(device) for x in (q, k, v, g, cu)]
    dev_cache = cache.to(device)
    o = prefill(*dev[:4], 0.5, dev[4], dev_cache, slots.to(device), use.to(device)).cpu()
    after = dev_cache.cpu()
    o_ref, final_ref = recurrent_reference(q.double(), k.double(), v.double(), g, 0.5, h0.double(), True, cu_seqlens=cu)
    assert_rel_close(o, o_ref, 2e-3, "o")
    if cache_dtype == torch.float32:
        o_base, final_base = recurrent_reference(q, k, v, g, 0.5, h0, True, cu_seqlens=cu)
        assert_matches_baseline(o, o_ref, o_base, "o")
        assert_matches_baseline(after[slots], final_ref, final_base, "final state")
    else:
        assert_rel_close(after[slots], final_ref, 2.0**-7, "final state (one bf16 rounding)")
    assert bool(torch.isnan(after[[1, 4]].float()).all()), "slots not named were written"


SCHEDULES_AND_CACHES = [
    pytest.param("tnl", torch.float32, id="tnl-fp32-cache"),
    pytest.param("minimax", torch.float32, id="minimax-fp32-cache"),
    pytest.param("tnl", torch.bfloat16, id="tnl-bf16-cache"),
]


@pytest.mark.parametrize("schedule, cache_dtype", SCHEDULES_AND_CACHES)
def test_recurrent_kernel_prefill_into_slots(triton_device, schedule, cache_dtype):
    _check_prefill(triton_device, triton_recurrent.recurrent_into_slots, schedule, cache_dtype, [40, 1, 0, 23])


@pytest.mark.parametrize("schedule, cache_dtype", SCHEDULES_AND_CACHES)
def test_prefill_routed_to_the_chunked_kernel(triton_device, monkeypatch, schedule, cache_dtype):
    """Long prompts run the chunked engine's prefill (issue 8): lengths crossing several 64-token chunks."""
    monkeypatch.setattr(triton_recurrent, "RECURRENT_TRITON_MAX_T", 0)
    _check_prefill(triton_device, triton_decode.prefill_into_slots, schedule, cache_dtype, [200, 1, 0, 67])
