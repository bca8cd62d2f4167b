"""The Triton decode kernel (one or several tokens per row), its index checks, tiles, and the slot-indexed prefill
(engines/triton/decode.py, recurrent.recurrent_into_slots).

Runs on CUDA when present, else on CPU through the Triton interpreter at small shapes (``triton_device``).
Truth is the float64 recurrence (tests/decode_reference.py); float32 results are judged relative to the same
recurrence in float32 (lightning_attention.testing). A bfloat16 cache element must be within one rounding of the
exact update: 2^-8 relative when rounding to nearest (GPU), 2^-7 toward zero (the interpreter, see rounding.py).
"""

import pytest
import torch

from lightning_attention import decay
from lightning_attention.reference import recurrent_reference
from lightning_attention.testing import assert_matches_baseline, assert_rel_close, make_inputs, strongest_decays
from tests.decode_reference import decode_reference

triton_decode = pytest.importorskip("lightning_attention.engines.triton.decode")
from lightning_attention.engines.triton import recurrent as triton_recurrent  # noqa: E402

H, K, V = 4, 16, 32
G_GAMMA = decay.g_gamma(H, 0, 4)  # g = 0 (no decay), -2, -4, -6
NUM_SLOTS = 6
SPLIT_TILES = triton_decode.DecodeConfig(block_v=16, block_k=8, num_warps=2)  # V and K each in two blocks
FIELDS = dict((name, i) for i, name in enumerate(triton_decode.ERROR_WORD))


def _sink(device):
    return triton_decode.ErrorSink(
        triton_decode.new_error_word(device), torch.zeros(1, dtype=torch.int32, device=device), call=7
    )


def _tokens(n, L, seed):
    q, k, v, _ = make_inputs(n, L, H, K, V, seed=seed)
    return q, k, v


def _guarded(cache, device):
    """A copy of ``cache`` on ``device`` between two guard slots of random values, and a check that they are unchanged
    (nothing written outside the cache)."""
    guard = torch.randn(2, *cache.shape[1:]).to(cache.dtype)
    storage = torch.cat([guard[:1], cache, guard[1:]]).to(device)
    guards = storage[[0, -1]].clone()

    def check():
        torch.testing.assert_close(storage[[0, -1]], guards, rtol=0, atol=0, msg="written outside the cache")

    return storage[1:-1], check


def _run(device, q, k, v, cache, slots, scale, config=None, **options):
    """The kernel on ``device``; returns (o or None, cache, error word, doorbell) on the CPU."""
    sink = _sink(device)
    dev = [x.to(device) if isinstance(x, torch.Tensor) else x for x in (q, k, v)]
    dev_cache, check_guards = _guarded(cache, device)
    for key in ("g", "lengths"):
        if options.get(key) is not None:
            options[key] = options[key].to(device)
    args = (*dev, dev_cache, slots.to(device), G_GAMMA.to(device), scale)
    if config is None:
        o = triton_decode.decode_tokens(*args, errors=sink, **options)
    else:
        o = triton_decode._launch(*args, sink, config, fill_grid=False, **options)
    check_guards()
    return (None if o is None else o.cpu()), dev_cache.cpu(), sink.word.cpu(), int(sink.doorbell.cpu()[0])


def _untouched(slots):
    return [s for s in range(NUM_SLOTS) if s not in slots]


@pytest.mark.parametrize("config", [pytest.param(None, id="default-tiles"), pytest.param(SPLIT_TILES, id="2x2-tiles")])
@pytest.mark.parametrize(
    "slots",
    [
        pytest.param([3, 0, 5], id="dense"),
        pytest.param([-1, 2, -1, 4, -1], id="padding"),
        pytest.param([-1, -1], id="all-padding"),
    ],
)
def test_decode_step_fp32_cache(triton_device, slots, config):
    """One token per row: o and the updated slots vs the recurrence; padding rows give zero, every slot not named
    keeps its exact bits, and padding is no error."""
    slot_ids = torch.tensor(slots, dtype=torch.int32)
    q, k, v = _tokens(len(slots), 1, seed=len(slots))
    cache = torch.randn(NUM_SLOTS, H, K, V)
    o, after, word, bell = _run(triton_device, q, k, v, cache, slot_ids, 0.4, config)
    rows = [i for i, s in enumerate(slots) if s >= 0]
    used = [s for s in slots if s >= 0]
    padding = [i for i in range(len(slots)) if i not in rows]
    assert o.dtype == q.dtype and torch.equal(o[padding], torch.zeros(len(padding), 1, H, V))
    assert torch.equal(after[_untouched(used)], cache[_untouched(used)])
    assert not word.any() and bell == 0
    if rows:
        r = torch.tensor(rows)
        o_ref, s_ref = decode_reference(q[r], k[r], v[r], cache[used].double(), G_GAMMA, 0.4)
        o_base, s_base = decode_reference(q[r], k[r], v[r], cache[used], G_GAMMA, 0.4)
        assert_matches_baseline(o[r], o_ref, o_base, "o")
        assert_matches_baseline(after[used], s_ref, s_base, "state")


def test_decode_step_bf16_cache_and_inputs(triton_device):
    slots = torch.tensor([4, -1, 1], dtype=torch.int64)
    q, k, v = (x.bfloat16() for x in _tokens(3, 1, seed=7))
    cache = torch.randn(NUM_SLOTS, H, K, V).to(torch.bfloat16)
    lam = torch.exp(G_GAMMA.double())[:, None, None]
    exact = lam * cache[[4, 1]].double() + k[[0, 2], 0].double()[..., None] * v[[0, 2], 0].double()[..., None, :]
    o, after, _, _ = _run(triton_device, q, k, v, cache, slots, 1.0)
    rounding = 2.0**-8 if triton_device == "cuda" else 2.0**-7
    err = (after[[4, 1]].double() - exact).abs()
    assert bool((err <= rounding * exact.abs() + 1e-6).all()), f"max rel err {(err / exact.abs()).max():.2e}"
    assert torch.equal(after[[0, 2, 3, 5]], cache[[0, 2, 3, 5]])
    o_ref = torch.einsum("nhk,nhkv->nhv", q[[0, 2], 0].double(), exact)
    assert_rel_close(o[[0, 2], 0], o_ref, 2.0**-7, "o (from the float32 state, rounded once to bf16)")
    assert torch.equal(o[1], torch.zeros(1, H, V, dtype=torch.bfloat16))


@pytest.mark.parametrize("config", [pytest.param(None, id="default-tiles"), pytest.param(SPLIT_TILES, id="2x2-tiles")])
@pytest.mark.parametrize("gated", [pytest.param(False, id="g_gamma"), pytest.param(True, id="g_gamma+g")])
def test_multi_token_decode_equals_the_recurrence(triton_device, gated, config):
    """L = 5 tokens per row with per-row lengths (0, 5, 2, and a padding row) and per-token gates: o of every
    token and each slot's final state vs the token-by-token recurrence in float64; outputs past a row's length are
    zero; an empty row keeps its slot's exact bits."""
    L, slots, lengths = 5, torch.tensor([2, 5, -1, 0]), torch.tensor([0, 5, 3, 2])
    q, k, v = _tokens(4, L, seed=11)
    g = -torch.rand(4, L, H, generator=torch.Generator().manual_seed(1)) * 3 if gated else None
    cache = torch.randn(NUM_SLOTS, H, K, V)
    o, after, word, _ = _run(triton_device, q, k, v, cache, slots, 0.3, config, g=g, lengths=lengths)
    live, used = [1, 3], [5, 0]
    r = torch.tensor(live)
    g_live = None if g is None else g[r]
    o_ref, s_ref = decode_reference(q[r], k[r], v[r], cache[used].double(), G_GAMMA, 0.3, g_live, lengths[r])
    o_base, s_base = decode_reference(q[r], k[r], v[r], cache[used], G_GAMMA, 0.3, g_live, lengths[r])
    assert_matches_baseline(o[r], o_ref, o_base, "o")
    assert_matches_baseline(after[used], s_ref, s_base, "state")
    assert torch.equal(o[3, 2:], torch.zeros(L - 2, H, V)) and torch.equal(o[[0, 2]], torch.zeros(2, L, H, V))
    assert torch.equal(after[[1, 2, 3, 4]], cache[[1, 2, 3, 4]]) and not word.any()


def _shipped_decode_tiles():
    from lightning_attention.engines.triton import tuning

    return [
        pytest.param(case, entry, id=f"{tuning.card_slug(card)}-{case}")
        for card, table in tuning.SHIPPED.items()
        for case, entry in table.entries.get("decode", {}).items()
    ]


@pytest.mark.parametrize("case, entry", _shipped_decode_tiles())
def test_shipped_decode_tiles_at_heads_of_128(triton_device, case, entry):
    """Every decode tile of the shipped launch tables, as given (no grid filling), at K = V = 128 with the cache
    dtype of its case, one token or (a "-multi" case) four per row with per-token gates: o and the final states
    vs the float64 recurrence (a bf16 cache element within one rounding of it, as in
    test_decode_step_bf16_cache_and_inputs)."""
    dtype_name, _, multi = case.partition("-")
    cache_dtype, L, dim = getattr(torch, dtype_name), 4 if multi else 1, 128
    slots = torch.tensor([3, 0])
    q, k, v, _ = make_inputs(2, L, H, dim, dim, seed=5)
    g = -torch.rand(2, L, H, generator=torch.Generator().manual_seed(5)) if multi else None
    cache = torch.randn(NUM_SLOTS, H, dim, dim).to(cache_dtype)
    config = triton_decode.DecodeConfig(**entry)
    o, after, word, _ = _run(triton_device, q, k, v, cache, slots, 0.5, config, g=g)
    o_ref, s_ref = decode_reference(q, k, v, cache[slots].double(), G_GAMMA, 0.5, g)
    o_base, s_base = decode_reference(q, k, v, cache[slots].float(), G_GAMMA, 0.5, g)
    assert_matches_baseline(o.reshape(o_ref.shape), o_ref, o_base, "o")
    if cache_dtype == torch.float32:
        assert_matches_baseline(after[slots], s_ref, s_base, "state")
    else:
        rounding = 2.0**-8 if triton_device == "cuda" else 2.0**-7
        err = (after[slots].double() - s_ref).abs()
        assert bool((err <= rounding * s_ref.abs() + 1e-5).all()), f"max abs err {err.max():.2e}"
    assert not word.any()


@pytest.mark.parametrize("L", [2, 5, 8])
def test_multi_token_decode_with_k_in_two_blocks_and_strong_gates(triton_device, L):
    """K and V each in two blocks of 16, per-token gates from 0 to strongly negative (-20 per token plus g_gamma)
    and per-row lengths: o and the final states vs the float64 recurrence."""
    k_dim, v_dim = 32, 32
    config = triton_decode.DecodeConfig(block_v=16, block_k=16, num_warps=2)
    slots, lengths = torch.tensor([4, 1, 3]), torch.tensor([L, 1, L - 1])
    q, k, v, _ = make_inputs(3, L, H, k_dim, v_dim, seed=L)
    g = -torch.rand(3, L, H, generator=torch.Generator().manual_seed(L)) * torch.tensor([0.0, 1.0, 20.0, 3.0])
    cache = torch.randn(NUM_SLOTS, H, k_dim, v_dim)
    o, after, word, _ = _run(triton_device, q, k, v, cache, slots, 0.25, config, g=g, lengths=lengths)
    o_ref, s_ref = decode_reference(q, k, v, cache[slots].double(), G_GAMMA, 0.25, g, lengths)
    o_base, s_base = decode_reference(q, k, v, cache[slots], G_GAMMA, 0.25, g, lengths)
    assert_matches_baseline(o, o_ref, o_base, "o")
    assert_matches_baseline(after[slots], s_ref, s_base, "state")
    assert torch.equal(o[1, 1:], torch.zeros(L - 1, H, v_dim)) and not word.any()


def test_read_only_pass_and_commit_give_the_state_after_the_accepted_tokens(triton_device):
    """Speculative decoding: the read-only pass leaves the cache bit for bit, its outputs are those of the updating
    pass, and committing each row's accepted prefix writes the very state an updating pass of that many tokens
    writes (bit for bit: the same operations in the same order), 0 keeping the slot."""
    L, slots, accepted = 4, torch.tensor([1, 3, 4]), torch.tensor([4, 0, 2])
    q, k, v = _tokens(3, L, seed=12)
    g = -torch.rand(3, L, H, generator=torch.Generator().manual_seed(2))
    cache = torch.randn(NUM_SLOTS, H, K, V)
    o_peek, after_peek, _, _ = _run(triton_device, q, k, v, cache, slots, 0.5, g=g, update_cache=False)
    o_all, _, _, _ = _run(triton_device, q, k, v, cache, slots, 0.5, g=g)
    assert torch.equal(after_peek, cache) and torch.equal(o_peek, o_all)
    none, committed, word, _ = _run(triton_device, k, k, v, cache, slots, 1.0, g=g, lengths=accepted, write_o=False)
    _, prefix, _, _ = _run(triton_device, q, k, v, cache, slots, 0.5, g=g, lengths=accepted)
    assert none is None and torch.equal(committed, prefix) and not word.any()
    assert torch.equal(committed[3], cache[3]) and not torch.equal(committed[1], cache[1])


@pytest.mark.parametrize(
    "slots, lengths, reports",
    [
        pytest.param([0, 6, 2], None, [("OUT_OF_RANGE", 1, 6)], id="too-big"),
        pytest.param([-5, 1], None, [("OUT_OF_RANGE", 0, -5)], id="negative"),
        pytest.param([3, 1, 3, 3], None, [("REPEATED", 2, 3), ("REPEATED", 3, 3)], id="repeated-later-rows"),
        pytest.param([0, 1, 2], [2, 3, -1], [("BAD_LENGTH", 1, 3), ("BAD_LENGTH", 2, -1)], id="bad-lengths"),
    ],
)
def test_bad_indices_are_skipped_and_reported(triton_device, slots, lengths, reports):
    """A bad row never reads or writes the cache (o zero) and is recorded in the error word and the doorbell: every
    kind in FLAGS, a count, and one of the reports in full (call, kind, row, value: whichever program reported
    first); the good rows run as usual (of repeated rows, the first)."""
    L = 2
    slot_ids = torch.tensor(slots)
    lengths = None if lengths is None else torch.tensor(lengths)
    q, k, v = _tokens(len(slots), L, seed=13)
    cache = torch.randn(NUM_SLOTS, H, K, V)
    o, after, word, bell = _run(triton_device, q, k, v, cache, slot_ids, 1.0, lengths=lengths)
    bad_rows = [row for _, row, _ in reports]
    good = [i for i in range(len(slots)) if i not in bad_rows]
    good_slots = [slots[i] for i in good]
    assert torch.equal(o[bad_rows], torch.zeros(len(bad_rows), L, H, V))
    assert torch.equal(after[_untouched(good_slots)], cache[_untouched(good_slots)])
    n = None if lengths is None else lengths[good]
    o_ref, s_ref = decode_reference(q[good], k[good], v[good], cache[good_slots].double(), G_GAMMA, 1.0, None, n)
    assert_rel_close(after[good_slots], s_ref, 1e-5, "good rows' states")
    assert_rel_close(o[good], o_ref, 1e-5, "good rows' o")
    expected = {(getattr(triton_decode.ErrorKind, kind), row, value) for kind, row, value in reports}
    flags = 0
    for kind, _, _ in expected:
        flags |= kind
    assert word[FIELDS["FLAGS"]] == flags and word[FIELDS["COUNT"]] == len(reports) and bell == 1
    assert word[FIELDS["CALL"]] == 7 and tuple(int(word[FIELDS[f]]) for f in ("KIND", "ROW", "VALUE")) in expected


def test_repeat_check_off_only_drops_the_report(triton_device):
    """check_repeats=False (the benchmark's measure of the check's cost): repeated rows run, nothing is reported."""
    q, k, v = _tokens(2, 1, seed=14)
    cache = torch.randn(NUM_SLOTS, H, K, V)
    sink = _sink(triton_device)
    dev = [x.to(triton_device) for x in (q, k, v, cache, torch.tensor([2, 2]), G_GAMMA)]
    config = triton_decode.decode_config(torch.float32, torch.device(triton_device))
    o = triton_decode._launch(*dev, 1.0, sink, config, check_repeats=False).cpu()
    assert not sink.word.cpu().any() and bool((o != 0).all())


@pytest.mark.parametrize(
    "rows, expected",
    [pytest.param(1, 16, id="one-row"), pytest.param(8, 32, id="8-rows"), pytest.param(64, 128, id="fills")],
)
def test_small_batches_split_v_to_fill_the_gpu(rows, expected):
    """The grid of a small batch gets narrower V-blocks until it has programs_per_sm programs per SM (8 nominal SMs
    on the CPU: 32 programs), never below 16 columns."""
    config = triton_decode.DecodeConfig(block_v=128, block_k=64, num_warps=8, programs_per_sm=4)
    assert triton_decode._fill_block_v(config, rows, 128, torch.device("cpu")) == expected


@pytest.mark.parametrize("shape, multi", [((3, 1), False), ((3, 1, 1), False), ((3, 4, 1), True)])
def test_rows_of_several_tokens_take_the_cards_multi_token_tiles(monkeypatch, shape, multi):
    """decode_tokens launches rows of several tokens with the table's "-multi" case, one-token rows (either
    layout) with the one-token case."""
    from lightning_attention.engines.triton import tuning

    one, several = dict(block_v=32, block_k=16, num_warps=2), dict(block_v=16, block_k=16, num_warps=2)
    table = tuning.CardTable("test", (0, 0), 0, {"decode": {"float32": one, "float32-multi": several}})
    launched = []
    monkeypatch.setattr(triton_decode, "_launch", lambda *args, **kw: launched.append(args[8]))
    q = torch.zeros(*shape[:-1], H, K)
    v = torch.zeros(*shape[:-1], H, V)
    with tuning.using(table):
        triton_decode.decode_tokens(q, q, v, torch.zeros(NUM_SLOTS, H, K, V), torch.arange(3), G_GAMMA, 1.0,
                                    errors=_sink("cpu"))  # fmt: skip
    assert launched == [triton_decode.DecodeConfig(**(several if multi else one))]


def _check_prefill(device, schedule, cache_dtype, lengths, slot_ids, cu_seqlens=None):
    """Varlen prefill from cached states (one fresh request, one empty sequence), strongest decays: o and the
    final states vs the float64 recurrence for the sequences admitted; slots not written are untouched (their NaN
    garbage never read); returns the error word."""
    g = strongest_decays()[schedule]
    heads = g.shape[0]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    q, k, v, h0 = make_inputs(1, int(cu[-1]), heads, 8, 8, initial_state=True, num_seqs=len(lengths), seed=9)
    slots = torch.tensor(slot_ids)
    admitted = [n for n, s in enumerate(slot_ids) if 0 <= s < NUM_SLOTS and s not in slot_ids[:n]]
    use = torch.tensor([True, False, True, True])
    cache = torch.full((NUM_SLOTS, heads, 8, 8), float("nan"))
    cache[slots[admitted]] = h0[admitted]
    cache = cache.to(cache_dtype)
    sink = _sink(device)
    dev_cache, check_guards = _guarded(cache, device)
    given_cu = cu if cu_seqlens is None else torch.tensor(cu_seqlens)
    dev = [x.to(device) for x in (q, k, v, g)]
    o = triton_decode.prefill_into_slots(
        *dev, 0.5, given_cu.to(device), dev_cache, slots.to(device), use.to(device), sink
    ).cpu()
    check_guards()
    after, word = dev_cache.cpu(), sink.word.cpu()
    written = [] if cu_seqlens is not None else [slot_ids[n] for n in admitted]
    kept = _untouched(written)
    torch.testing.assert_close(after[kept], cache[kept], rtol=0, atol=0, equal_nan=True, msg="slots not written")
    if not written:
        return word
    h0 = torch.where(use[:, None, None, None], cache[slots.clamp(0, NUM_SLOTS - 1)].float(), 0.0)
    o_ref, final_ref = recurrent_reference(q.double(), k.double(), v.double(), g, 0.5, h0.double(), True, cu_seqlens=cu)
    rows = torch.cat([torch.arange(int(cu[n]), int(cu[n + 1])) for n in admitted])
    assert_rel_close(o[:, rows], o_ref[:, rows], 2e-3, "o")
    if cache_dtype == torch.float32:
        o_base, final_base = recurrent_reference(q, k, v, g, 0.5, h0, True, cu_seqlens=cu)
        assert_matches_baseline(o[:, rows], o_ref[:, rows], o_base[:, rows], "o")
        assert_matches_baseline(after[written], final_ref[admitted], final_base[admitted], "final state")
    else:
        assert_rel_close(after[written], final_ref[admitted], 2.0**-7, "final state (one bf16 rounding)")
    return word


SCHEDULES_AND_CACHES = [
    pytest.param("tnl", torch.float32, id="tnl-fp32-cache"),
    pytest.param("minimax", torch.float32, id="minimax-fp32-cache"),
    pytest.param("tnl", torch.bfloat16, id="tnl-bf16-cache"),
]
ROUTES = [
    pytest.param(16, [40, 1, 0, 23], id="recurrent-kernel"),  # mean length 16: the token loop
    pytest.param(0, [200, 1, 0, 67], id="chunked-kernel"),  # lengths crossing several 64-token chunks
]


@pytest.mark.parametrize("max_loop_tokens, lengths", ROUTES)
@pytest.mark.parametrize("schedule, cache_dtype", SCHEDULES_AND_CACHES)
def test_prefill_into_slots(triton_device, monkeypatch, schedule, cache_dtype, max_loop_tokens, lengths):
    monkeypatch.setattr(triton_recurrent.ENGINE, "max_tokens", max_loop_tokens)
    word = _check_prefill(triton_device, schedule, cache_dtype, lengths, [2, 5, 0, 3])
    assert not word.any()


@pytest.mark.parametrize("max_loop_tokens, lengths", ROUTES)
def test_prefill_rejects_bad_slots(triton_device, monkeypatch, max_loop_tokens, lengths):
    """An out-of-range slot and a repeat (of the first sequence's slot) are skipped and reported; the other two
    sequences land in their slots."""
    monkeypatch.setattr(triton_recurrent.ENGINE, "max_tokens", max_loop_tokens)
    word = _check_prefill(triton_device, "tnl", torch.float32, lengths, [2, 9, 0, 2])
    kinds = triton_decode.ErrorKind
    assert word[FIELDS["FLAGS"]] == kinds.OUT_OF_RANGE | kinds.REPEATED and word[FIELDS["COUNT"]] == 2


@pytest.mark.parametrize("max_loop_tokens, lengths", ROUTES)
@pytest.mark.parametrize(
    "shift, bad_index",
    [
        pytest.param((1, 0, 0, 0, 0), 0, id="not-0-based"),
        pytest.param((0, 0, -2, 0, 0), 2, id="decreasing"),
        pytest.param((0, 0, 0, 0, 5), 4, id="past-T"),
    ],
)
def test_prefill_rejects_bad_cu_seqlens(triton_device, monkeypatch, max_loop_tokens, lengths, shift, bad_index):
    """cu_seqlens read on the device only: a bad offset runs no sequence into the cache (every slot keeps its
    bits), reads and writes nothing outside the tensors, and is reported with its index and value."""
    monkeypatch.setattr(triton_recurrent.ENGINE, "max_tokens", max_loop_tokens)
    cu = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    cu = [c + s for c, s in zip(cu, shift)]
    word = _check_prefill(triton_device, "tnl", torch.float32, lengths, [2, 5, 0, 3], cu_seqlens=cu)
    assert word[FIELDS["FLAGS"]] == triton_decode.ErrorKind.BAD_CU_SEQLENS
    assert (int(word[FIELDS["ROW"]]), int(word[FIELDS["VALUE"]])) == (bad_index, cu[bad_index])


@pytest.mark.parametrize("max_loop_tokens", [pytest.param(16, id="recurrent-kernel"), pytest.param(0, id="chunked-kernel")])
def test_prefill_into_slots_with_gates(triton_device, monkeypatch, max_loop_tokens):
    """Per-token gates g [1, T, H] (with g_gamma) through both prefill routes: outputs and the slots' final states
    against the float64 reference started from the slots' states; slots not named keep their bits."""
    monkeypatch.setattr(triton_recurrent.ENGINE, "max_tokens", max_loop_tokens)
    cu = torch.tensor([0, 50, 50, 120, 190])
    q, k, v, _ = make_inputs(1, 190, H, K, V, seed=5)
    gates = -torch.rand(1, 190, H, generator=torch.Generator().manual_seed(6)) * 2
    cache = torch.randn(NUM_SLOTS, H, K, V, generator=torch.Generator().manual_seed(3))
    slots, use = torch.tensor([4, 0, 2, 5]), torch.tensor([True, True, False, True])
    h0 = torch.where(use[:, None, None, None], cache[slots], 0.0)
    dev = lambda *xs: [x.to(triton_device) for x in xs]  # noqa: E731
    dev_cache, sink = cache.to(triton_device), _sink(triton_device)
    o = triton_decode.prefill_into_slots(
        *dev(q, k, v, G_GAMMA), 0.5, *dev(cu), dev_cache, *dev(slots, use), sink, g=gates.to(triton_device)
    ).cpu()
    assert not sink.word.cpu().any()
    exact = [x.double() for x in (q, k, v, G_GAMMA)]
    o_ref, final_ref = recurrent_reference(*exact, 0.5, h0.double(), True, cu_seqlens=cu, g=gates.double())
    o_base, final_base = recurrent_reference(q, k, v, G_GAMMA, 0.5, h0, True, cu_seqlens=cu, g=gates)
    assert_matches_baseline(o, o_ref, o_base, "o")
    assert_matches_baseline(dev_cache.cpu()[slots], final_ref, final_base, "final state")
    assert torch.equal(dev_cache.cpu()[[1, 3]], cache[[1, 3]])


def test_prefill_into_slots_with_tma_heads(triton_device, monkeypatch):
    """bf16 heads of 64 through the chunked route's TMA loads read and write the slots as the op does with a
    gathered initial state."""
    from lightning_attention import chunk_simple_gla
    from tests.engines.triton.test_chunk import use_options

    use_options(monkeypatch, tma_head_dims=(64, 128))
    monkeypatch.setattr(triton_recurrent.ENGINE, "max_tokens", 0)
    cu = torch.tensor([0, 50, 50, 120, 190], device=triton_device)
    q, k, v, _ = make_inputs(1, 190, 2, 64, 64, dtype=torch.bfloat16, device=triton_device)
    cache = torch.randn(6, 2, 64, 64, generator=torch.Generator().manual_seed(3)).to(triton_device)
    slots = torch.tensor([4, 0, 2, 5], device=triton_device)
    use = torch.tensor([True, True, False, True], device=triton_device)
    g_gamma = G_GAMMA[:2].to(triton_device)
    h0 = cache[slots] * use[:, None, None, None]
    ref_o, ref_final = chunk_simple_gla(
        q, k, v, g_gamma=g_gamma, initial_state=h0, output_final_state=True, cu_seqlens=cu, backend="triton"
    )
    o = triton_decode.prefill_into_slots(q, k, v, g_gamma, 64**-0.5, cu, cache, slots, use, _sink(triton_device))
    assert_rel_close(o.float().cpu(), ref_o.float().cpu(), 1e-6, "o")
    assert_rel_close(cache[slots].cpu(), ref_final.cpu(), 1e-6, "final state")
