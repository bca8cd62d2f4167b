"""The public serving API (lightning_attention.serving): prefill, decode, multi-token decode, commit, error reporting.

Behaviour through both backends (the Triton one on CUDA, or on CPU through the interpreter), validation errors
before any kernel runs, the contract for bad indices that the host never reads (skipped, recorded in the device's
error word, raised by check_errors or at the next call), the custom-op registration (mutated cache, fake
implementations), and tracing under torch.compile. On a GPU (``-m gpu``): no call synchronises, and CUDA graphs
capture and replay the calls, bad indices included. Numerical accuracy of each engine is tested in
tests/engines/*/test_decode.py; here whole flows are compared with one pass of the float64 reference (rel err
<= 2e-3 for float32 inputs) or with each other.
"""

import pytest
import torch

from lightning_attention import _validation as val
from lightning_attention import decay, serving
from lightning_attention.reference import chunk_reference
from lightning_attention.testing import assert_rel_close, make_inputs
from tests.decode_reference import decode_reference

H, K, V = 4, 8, 16
G_GAMMA = decay.g_gamma(H, 0, 4)  # g = 0 (no decay), -2, -4, -6
NUM_SLOTS = 5


@pytest.fixture(params=["torch", "triton"])
def backend_device(request):
    if request.param == "torch":
        return "torch", "cpu"
    return "triton", request.getfixturevalue("triton_device")


@pytest.fixture
def device_resident(monkeypatch):
    """Treat every index tensor as GPU-resident (its values unreadable without a sync), as on a GPU: the calls must
    then never check index values on the host, and the kernels report bad ones instead."""
    monkeypatch.setattr(val, "values_readable", lambda t: False)

    def host_check_called(*args):
        raise AssertionError("a device-resident index tensor was read on the host")

    for name in ("_slot_id_errors", "_length_errors"):
        monkeypatch.setattr(serving, name, host_check_called)
    monkeypatch.setattr(val, "cu_seqlens_bounds", host_check_called)
    yield
    serving.check_errors()  # nothing left over for the next test


def _decode_inputs(n, seed=0, device="cpu", tokens=None):
    q, k, v, _ = make_inputs(n, tokens or 1, H, K, V, seed=seed, device=device)
    return (q, k, v) if tokens else [x[:, 0] for x in (q, k, v)]


def test_prefill_then_decode_equals_one_chunked_pass(backend_device):
    """Two requests prefilled into slots (one continues a cached state), then decode steps with a padding row:
    every output and the final states equal one pass over the whole sequences; other slots untouched."""
    backend, device = backend_device
    lengths, steps = [70, 9], 3
    cu = torch.tensor([0, lengths[0], sum(lengths)])
    q, k, v, h0 = make_inputs(1, sum(lengths), H, K, V, initial_state=True, num_seqs=2, seed=1)
    cache = serving.new_state_cache(NUM_SLOTS, H, K, V, device=device)
    cache.copy_(torch.randn(NUM_SLOTS, H, K, V))
    cache[3] = h0[0].to(device)
    before = cache.cpu()
    slots = torch.tensor([3, 1])
    use = torch.tensor([True, False])
    g = G_GAMMA.to(device)
    o_pre = serving.lightning_attn_prefill(
        q.to(device), k.to(device), v.to(device), cu.to(device), cache, slots, g, use_initial_state=use, backend=backend
    ).cpu()
    decode_slots = torch.tensor([1, -1, 3])
    outs = []
    for step in range(steps):
        dq, dk, dv = _decode_inputs(3, seed=10 + step, device=device)
        outs.append((dq.cpu(), dk.cpu(), dv.cpu(), serving.lightning_attn_decode(dq, dk, dv, cache, decode_slots, g, backend=backend).cpu()))
    assert all(torch.equal(o[1], torch.zeros(H, V)) for *_, o in outs)
    for n, (row, slot) in enumerate(((2, 3), (0, 1))):
        seq = slice(int(cu[n]), int(cu[n + 1]))
        whole = [torch.cat([x[0, seq]] + [s[i][row : row + 1] for s in outs])[None] for i, x in enumerate((q, k, v))]
        start = (h0[0:1] if use[n] else torch.zeros(1, H, K, V)).double()
        o_ref, final_ref = chunk_reference(*(x.double() for x in whole), G_GAMMA, None, start, True)
        got = torch.cat([o_pre[0, seq]] + [s[3][row : row + 1] for s in outs])[None]
        assert_rel_close(got, o_ref, 2e-3, f"o of sequence {n}")
        assert_rel_close(cache[slot].cpu()[None], final_ref, 2e-3, f"state of sequence {n}")
    for other in (0, 2, 4):
        assert torch.equal(cache[other].cpu(), before[other])


def test_gated_prefill_then_decode_equals_one_chunked_pass(backend_device):
    """Per-token gates g (fla's Simple GLA) through prefill and decode: the outputs and final states equal the
    float64 reference over the whole sequences with the same gates."""
    backend, device = backend_device
    lengths, steps = [70, 9], 2
    cu = torch.tensor([0, lengths[0], sum(lengths)])
    q, k, v, _ = make_inputs(1, sum(lengths), H, K, V, seed=2)
    gates = -torch.rand(1, sum(lengths), H, generator=torch.Generator().manual_seed(3))
    cache = serving.new_state_cache(NUM_SLOTS, H, K, V, device=device)
    slots, g_gamma = torch.tensor([3, 1]), G_GAMMA.to(device)
    o_pre = serving.lightning_attn_prefill(
        *(x.to(device) for x in (q, k, v, cu)), cache, slots, g_gamma, use_initial_state=False, g=gates.to(device),
        backend=backend,
    ).cpu()  # fmt: skip
    outs = []
    for step in range(steps):
        dq, dk, dv = _decode_inputs(2, seed=10 + step, device=device)
        dg = -torch.rand(2, H, generator=torch.Generator().manual_seed(20 + step))
        o = serving.lightning_attn_decode(dq, dk, dv, cache, slots, g_gamma, g=dg.to(device), backend=backend)
        outs.append((dq.cpu(), dk.cpu(), dv.cpu(), dg, o.cpu()))
    for n in range(2):
        seq = slice(int(cu[n]), int(cu[n + 1]))
        whole = [torch.cat([x[0, seq]] + [s[i][n : n + 1] for s in outs])[None] for i, x in enumerate((q, k, v))]
        whole_g = torch.cat([gates[0, seq]] + [s[3][n : n + 1] for s in outs])[None]
        o_ref, final_ref = chunk_reference(*(x.double() for x in whole), G_GAMMA, None, None, True, g=whole_g.double())
        got = torch.cat([o_pre[0, seq]] + [s[4][n : n + 1] for s in outs])[None]
        assert_rel_close(got, o_ref, 2e-3, f"o of sequence {n}")
        assert_rel_close(cache[int(slots[n])].cpu()[None], final_ref, 2e-3, f"state of sequence {n}")


def test_speculative_steps_equal_single_token_decode(backend_device):
    """Speculative decoding through the public API: verify 4 drafts read-only, commit accepted prefixes (4, 0, 2,
    and a padding row), verify the next drafts from there. Every output of a verified-and-accepted token equals
    the single-token decode of the same tokens, and the committed states equal the single-token path's (float32
    both: summation order only, 1e-5 relative; gates included)."""
    backend, device = backend_device
    L, slots, accepted = 4, torch.tensor([2, 0, -1, 4]), torch.tensor([4, 0, 1, 2])
    cache = torch.randn(NUM_SLOTS, H, K, V).to(device)
    by_step = cache.clone()
    g_gamma = G_GAMMA.to(device)
    for rnd in range(2):
        q, k, v = _decode_inputs(4, seed=20 + rnd, device=device, tokens=L)
        g = (-torch.rand(4, L, H, generator=torch.Generator().manual_seed(rnd))).to(device)
        before = cache.clone()
        o = serving.lightning_attn_decode_multi(q, k, v, cache, slots, g_gamma, 0.5, g=g, update_cache=False, backend=backend)
        assert torch.equal(cache, before), "the read-only pass wrote the cache"
        serving.lightning_attn_commit(k, v, cache, slots, g_gamma, accepted, g=g, backend=backend)
        for t in range(L):
            step_slots = torch.tensor([int(s) if t < a else -1 for s, a in zip(slots, accepted)])
            o_t = serving.lightning_attn_decode(q[:, t], k[:, t], v[:, t], by_step, step_slots, g_gamma, 0.5, g=g[:, t], backend=backend)  # noqa: E501
            for n in range(4):
                if step_slots[n] >= 0:
                    assert_rel_close(o[n, t], o_t[n], 1e-5, f"o of row {n}, token {t}")
        assert_rel_close(cache, by_step, 1e-5, "states")
    assert torch.equal(cache[[1, 3]], before[[1, 3]])


def test_multi_token_decode_is_prefill_from_the_cached_state(backend_device):
    """Several new tokens per sequence (lengths 3, 0, 2) through the prefill with use_initial_state=True, and
    through lightning_attn_decode_multi with lengths == the same tokens one decode step at a time; the slot of
    the empty sequence keeps its exact bits. All float32 from the same states: summation order only (1e-5)."""
    backend, device = backend_device
    lengths, slots = [3, 0, 2], torch.tensor([4, 0, 2])
    q, k, v, _ = make_inputs(1, sum(lengths), H, K, V, seed=6, device=device)
    cu = torch.tensor([0, 3, 3, 5], device=device)
    g = G_GAMMA.to(device)
    start = torch.randn(NUM_SLOTS, H, K, V).to(device)
    by_prefill, by_decode, by_multi = start.clone(), start.clone(), start.clone()
    o_prefill = serving.lightning_attn_prefill(q, k, v, cu, by_prefill, slots, g, backend=backend)
    starts = [0, 3, 3]
    rows = [[starts[n] + min(t, max(lengths[n] - 1, 0)) for t in range(3)] for n in range(3)]
    tokens = [x[0][torch.tensor(rows)] for x in (q, k, v)]  # [N, 3, H, D]; tokens past a length are repeats
    o_multi = serving.lightning_attn_decode_multi(*tokens, by_multi, slots, g, lengths=torch.tensor(lengths), backend=backend)
    for step in range(max(lengths)):
        step_slots = torch.tensor([int(s) if step < n else -1 for s, n in zip(slots, lengths)])
        o = serving.lightning_attn_decode(*(x[:, step] for x in tokens), by_decode, step_slots, g, backend=backend)
        for n in range(3):
            if step < lengths[n]:
                assert_rel_close(o[n], o_prefill[0, starts[n] + step], 1e-5, f"o of sequence {n}, token {step}")
                assert_rel_close(o_multi[n, step], o[n], 1e-5, f"multi o of sequence {n}, token {step}")
    assert_rel_close(by_decode, by_prefill, 1e-5, "states")
    assert_rel_close(by_multi, by_prefill, 1e-5, "multi states")
    assert torch.equal(by_prefill[0], start[0]) and torch.equal(by_multi[0], start[0]), "the empty sequence changed its slot"


def test_inputs_other_than_the_cache_are_not_modified():
    q, k, v = _decode_inputs(2, seed=2, tokens=3)
    slots, g_gamma, lengths, g = torch.tensor([0, 4]), G_GAMMA.clone(), torch.tensor([3, 1]), -torch.rand(2, 3, H)
    before = [t.clone() for t in (q, k, v, slots, g_gamma, lengths, g)]
    cache = torch.randn(NUM_SLOTS, H, K, V)
    serving.lightning_attn_decode(q[:, 0], k[:, 0], v[:, 0], cache, slots, g_gamma, g=g[:, 0], backend="torch")
    serving.lightning_attn_decode_multi(q, k, v, cache, slots, g_gamma, g=g, lengths=lengths, backend="torch")
    serving.lightning_attn_commit(k, v, cache, slots, g_gamma, lengths, g=g, backend="torch")
    for now, then in zip((q, k, v, slots, g_gamma, lengths, g), before):
        assert torch.equal(now, then)


def test_bool_and_tensor_use_initial_state_agree():
    q, k, v, _ = make_inputs(1, 12, H, K, V, seed=3)
    cu = torch.tensor([0, 5, 12])
    start = torch.randn(NUM_SLOTS, H, K, V)
    results = []
    for use in (False, torch.tensor([False, False])):
        cache = start.clone()
        results.append((serving.lightning_attn_prefill(q, k, v, cu, cache, torch.tensor([2, 0]), G_GAMMA, 0.5, use), cache))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=0)


def _decode_args():
    q, k, v = _decode_inputs(3, seed=4)
    return dict(q=q, k=k, v=v, state_cache=torch.zeros(NUM_SLOTS, H, K, V), slot_ids=torch.tensor([0, -1, 2]), g_gamma=G_GAMMA)


def _rejected(call, args, error, match, cache) -> None:
    """``call(**args)`` raises ``error`` matching ``match`` and leaves ``cache`` as it was."""
    snapshot = cache.clone() if isinstance(cache, torch.Tensor) else None
    with pytest.raises(error, match=match):
        call(**args, backend="torch")
    if snapshot is not None:
        assert torch.equal(cache, snapshot), "the cache changed although the call was rejected"


@pytest.mark.parametrize(
    "change, error, match",
    [
        pytest.param(lambda a: a.update(q=a["q"][None]), ValueError, "q must have 3 dims", id="q-4d"),
        pytest.param(lambda a: a.update(k=a["k"][:, :, :4]), ValueError, "q, k \\[N, H, K\\]", id="k-shape"),
        pytest.param(lambda a: a.update(v=a["v"][:2]), ValueError, "v \\[N, H, V\\]: q", id="v-rows"),
        pytest.param(lambda a: a.update(v=a["v"].double()), TypeError, "one dtype", id="v-dtype"),
        pytest.param(lambda a: a.update(state_cache=a["state_cache"].half()), TypeError, "float32 or bfloat16", id="cache-fp16"),
        pytest.param(lambda a: a.update(state_cache=a["state_cache"][:, :2]), ValueError, "num_slots, H=4", id="cache-heads"),
        pytest.param(
            lambda a: a.update(state_cache=a["state_cache"].transpose(2, 3).contiguous().transpose(2, 3)),
            ValueError, "contiguous", id="cache-strided",
        ),
        pytest.param(lambda a: a.update(state_cache=a["state_cache"].tolist()), TypeError, "state_cache must be", id="cache-list"),
        pytest.param(lambda a: a.update(slot_ids=a["slot_ids"].float()), TypeError, "int32 or int64", id="slots-float"),
        pytest.param(lambda a: a.update(slot_ids=a["slot_ids"][:2]), ValueError, "slot_ids must be \\[N=3\\]", id="slots-short"),
        pytest.param(lambda a: a.update(slot_ids=torch.tensor([0, 5, 1])), ValueError, "out of range: \\[5\\]", id="slot-too-big"),
        pytest.param(lambda a: a.update(slot_ids=torch.tensor([0, -2, 1])), ValueError, "out of range: \\[-2\\]", id="slot-negative"),
        pytest.param(lambda a: a.update(slot_ids=torch.tensor([2, -1, 2])), ValueError, "repeated: \\[2\\]", id="slot-twice"),
        pytest.param(lambda a: a.update(g_gamma=-G_GAMMA), ValueError, "<= 0", id="g_gamma-positive"),
        pytest.param(lambda a: a.update(g=torch.zeros(3, 1, H)), ValueError, "g must be \\[N, H\\]", id="g-shape"),
        pytest.param(lambda a: a.update(g=torch.zeros(3, H, dtype=torch.int32)), TypeError, "g must be a floating", id="g-int"),
        pytest.param(lambda a: a.update(check_slots=False), TypeError, "check_slots", id="unknown-keyword"),
    ],
)
def test_decode_validation(change, error, match):
    args = _decode_args()
    change(args)
    _rejected(serving.lightning_attn_decode, args, error, match, args["state_cache"])


def _multi_args(L=3):
    q, k, v = _decode_inputs(3, seed=5, tokens=L)
    return dict(q=q, k=k, v=v, state_cache=torch.zeros(NUM_SLOTS, H, K, V), slot_ids=torch.tensor([0, -1, 2]), g_gamma=G_GAMMA)


@pytest.mark.parametrize(
    "change, error, match",
    [
        pytest.param(lambda a: a.update(q=a["q"][:, 0]), ValueError, "q must have 4 dims", id="q-3d"),
        pytest.param(lambda a: a.update(**{x: a[x][:, :0] for x in "qkv"}), ValueError, "1 to 8 tokens", id="L-0"),
        pytest.param(lambda a: a.update(**{x: a[x].repeat(1, 3, 1, 1) for x in "qkv"}), ValueError, "1 to 8 tokens", id="L-9"),
        pytest.param(lambda a: a.update(v=a["v"][:, :2]), ValueError, "v \\[N, L, H, V\\]: q", id="v-tokens"),
        pytest.param(lambda a: a.update(lengths=torch.tensor([1, 2])), ValueError, "lengths must be \\[N=3\\]", id="lengths-short"),
        pytest.param(lambda a: a.update(lengths=torch.tensor([1.0, 2, 3])), TypeError, "int32 or int64", id="lengths-float"),
        pytest.param(lambda a: a.update(lengths=torch.tensor([1, 4, 0])), ValueError, "\\(row, length\\) out of range: \\[\\(1, 4\\)\\]", id="length-4"),  # noqa: E501
        pytest.param(lambda a: a.update(lengths=torch.tensor([-1, 0, 0])), ValueError, "out of range: \\[\\(0, -1\\)\\]", id="length-negative"),  # noqa: E501
        pytest.param(lambda a: a.update(g=torch.zeros(3, H)), ValueError, "g must be \\[N, L, H\\]", id="g-shape"),
        pytest.param(lambda a: a.update(slot_ids=torch.tensor([1, 1, -1])), ValueError, "repeated: \\[1\\]", id="slot-twice"),
    ],
)
def test_decode_multi_validation(change, error, match):
    args = _multi_args()
    change(args)
    _rejected(serving.lightning_attn_decode_multi, args, error, match, args["state_cache"])


@pytest.mark.parametrize(
    "change, error, match",
    [
        pytest.param(lambda a: a.update(accepted_lengths=None), TypeError, "accepted_lengths must be a torch.Tensor", id="no-lengths"),  # noqa: E501
        pytest.param(lambda a: a.update(accepted_lengths=torch.tensor([0, 4, 1])), ValueError, "out of range: \\[\\(1, 4\\)\\]", id="length-4"),  # noqa: E501
        pytest.param(lambda a: a.update(k=a["k"][:, :2]), ValueError, "k \\[N, L, H, K\\], v \\[N, L, H, V\\]: k \\(3, 2", id="k-tokens"),  # noqa: E501
    ],
)
def test_commit_validation(change, error, match):
    a = _multi_args()
    args = dict(k=a["k"], v=a["v"], state_cache=a["state_cache"], slot_ids=a["slot_ids"], g_gamma=G_GAMMA,
                accepted_lengths=torch.tensor([1, 2, 3]))  # fmt: skip
    change(args)
    _rejected(serving.lightning_attn_commit, args, error, match, args["state_cache"])


def _prefill_args():
    q, k, v, _ = make_inputs(1, 10, H, K, V, seed=5)
    return dict(
        q=q, k=k, v=v, cu_seqlens=torch.tensor([0, 4, 10]), state_cache=torch.zeros(NUM_SLOTS, H, K, V),
        slot_ids=torch.tensor([1, 3]), g_gamma=G_GAMMA,
    )


@pytest.mark.parametrize(
    "change, error, match",
    [
        pytest.param(lambda a: a.update(cu_seqlens=None), ValueError, "cu_seqlens is required", id="no-cu"),
        pytest.param(lambda a: a.update(cu_seqlens=torch.tensor([0, 4, 9])), ValueError, "must equal T=10", id="cu-end"),
        pytest.param(lambda a: a.update(slot_ids=torch.tensor([1, -1])), ValueError, "\\[0, 5\\)", id="no-padding"),
        pytest.param(lambda a: a.update(slot_ids=torch.tensor([3, 3])), ValueError, "repeated", id="slot-twice"),
        pytest.param(lambda a: a.update(slot_ids=torch.tensor([1])), ValueError, "\\[N=2\\]", id="slots-short"),
        pytest.param(lambda a: a.update(use_initial_state=torch.tensor([1, 0])), TypeError, "bool", id="use-int"),
        pytest.param(lambda a: a.update(use_initial_state=torch.tensor([True])), ValueError, "\\[N=2\\]", id="use-short"),
        pytest.param(lambda a: a.update(q=a["q"].double(), k=a["k"].double(), v=a["v"].double()), TypeError, "float16, bfloat16, float32", id="fp64"),  # noqa: E501
        pytest.param(lambda a: a.update(g=torch.zeros(1, 9, H)), ValueError, "g must be \\[1, T, H\\]", id="g-shape"),
        pytest.param(lambda a: a.update(g=torch.zeros(1, 10, H, dtype=torch.int32)), TypeError, "g must be a floating", id="g-int"),  # noqa: E501
    ],
)
def test_prefill_validation(change, error, match):
    args = _prefill_args()
    change(args)
    _rejected(serving.lightning_attn_prefill, args, error, match, args["state_cache"])


# ---------------------------------------------------------------------------------------------------------------
# Bad indices the host never reads: skipped, reported through the error word.


def test_bad_device_indices_are_skipped_and_raised_by_check_errors(triton_device, device_resident):
    """Decode with an out-of-range and a repeated slot: nothing raises during the call, the bad rows touch no
    slot (output zero), the good rows run; check_errors raises once, naming the call, row and slot; then it is
    silent (reset)."""
    q, k, v = _decode_inputs(4, seed=7, device=triton_device)
    cache = torch.randn(NUM_SLOTS, H, K, V).to(triton_device)
    before = cache.clone()
    slots = torch.tensor([1, 7, 3, 1], device=triton_device)
    o = serving.lightning_attn_decode(q, k, v, cache, slots, G_GAMMA.to(triton_device), backend="triton")
    assert torch.equal(o[[1, 3]].cpu(), torch.zeros(2, H, V)) and bool((o[[0, 2]] != 0).all())
    assert torch.equal(cache[[0, 2, 4]], before[[0, 2, 4]]) and not torch.equal(cache[1], before[1])
    with pytest.raises(ValueError, match=r"2 bad index report.*lightning_attention::decode call #\d+ \(N=4, L=1, cache of 5 slots\): row (1 has slot 7, outside \[0, 5\) \(-1 = padding\)|3 has slot 1, already named by an earlier row)"):  # noqa: E501
        serving.check_errors()
    serving.check_errors()


def test_a_reported_error_stops_the_next_call_before_it_runs(triton_device, device_resident):
    """Once the GPU has run a call with a bad length, the next serving call (any op) raises at its start, from the
    host-visible doorbell, without a sync and without running: the cache stays as it was."""
    q, k, v = _decode_inputs(2, seed=8, device=triton_device, tokens=2)
    cache = torch.randn(NUM_SLOTS, H, K, V).to(triton_device)
    g = G_GAMMA.to(triton_device)
    slots = torch.tensor([0, 3], device=triton_device)
    serving.lightning_attn_decode_multi(q, k, v, cache, slots, g, lengths=torch.tensor([2, 5], device=triton_device), backend="triton")  # noqa: E501
    if triton_device == "cuda":
        torch.cuda.synchronize()
    before = cache.clone()
    with pytest.raises(ValueError, match=r"decode_multi call #\d+ \(N=2, L=2, cache of 5 slots\): row 1 has length 5, outside \[0, L=2\]"):  # noqa: E501
        serving.lightning_attn_decode(q[:, 0], k[:, 0], v[:, 0], cache, slots, g, backend="triton")
    assert torch.equal(cache, before)
    serving.lightning_attn_decode(q[:, 0], k[:, 0], v[:, 0], cache, slots, g, backend="triton")
    assert not torch.equal(cache, before)


def test_bad_device_cu_seqlens_runs_no_sequence(triton_device, device_resident):
    """A prefill whose device-resident cu_seqlens decreases writes no slot and is reported with the offset."""
    q, k, v, _ = make_inputs(1, 10, H, K, V, seed=9, device=triton_device)
    cache = torch.randn(NUM_SLOTS, H, K, V).to(triton_device)
    before = cache.clone()
    cu = torch.tensor([0, 6, 4, 10], device=triton_device)
    serving.lightning_attn_prefill(q, k, v, cu, cache, torch.tensor([0, 1, 2]), G_GAMMA.to(triton_device), backend="triton")
    assert torch.equal(cache, before)
    with pytest.raises(ValueError, match=r"prefill call #\d+ \(N=3, T=10, cache of 5 slots\): cu_seqlens\[2\] = 4: offsets must start at 0"):  # noqa: E501
        serving.check_errors(triton_device)


def test_error_word_exists_before_a_capture(monkeypatch):
    """The error word is made on a device's first call (or by new_state_cache), never inside a CUDA-graph capture,
    which would record its zeroing into the graph: a first call under capture gets a clear error instead."""
    device = torch.device("meta")  # a device no call has used
    monkeypatch.setattr(serving, "_capturing", lambda dev: True)
    with pytest.raises(RuntimeError, match="before capturing a CUDA graph"):
        serving._errors_on(device)
    assert device not in serving._ERRORS


# ---------------------------------------------------------------------------------------------------------------
# Custom ops and torch.compile


def _op_samples(backend, device):
    """(op, positional args, index of the cache or None) for every serving op, with padding rows and lengths."""
    g_gamma = G_GAMMA.to(device)
    gen = torch.Generator().manual_seed(3)
    cache = torch.randn(NUM_SLOTS, H, K, V, generator=gen).to(device)
    q1, k1, v1 = (x.to(device) for x in _decode_inputs(3, seed=11))
    q, k, v = (x.to(device) for x in _decode_inputs(3, seed=12, tokens=3))
    slots = torch.tensor([2, -1, 0], device=device)
    lengths = torch.tensor([3, 1, 2], device=device)
    g = -torch.rand(3, 3, H, generator=gen).to(device)
    p = _prefill_args()
    yield serving.decode_op, (q1, k1, v1, cache, slots, g_gamma, 0.5, backend, g[:, 0]), 3
    yield serving.decode_multi_op, (q, k, v, cache, slots, g_gamma, 0.5, backend, g, lengths), 3
    yield serving.verify_op, (q, k, v, cache, slots, g_gamma, 0.5, backend, None, lengths), None
    yield serving.commit_op, (k, v, cache, slots, lengths, g_gamma, backend, g), 2
    prefill_args = (p["q"], p["k"], p["v"], p["cu_seqlens"], cache, p["slot_ids"], torch.tensor([True, False]))
    yield serving.prefill_op, tuple(x.to(device) for x in prefill_args) + (g_gamma, 0.5, backend), 4


def test_custom_ops_declare_the_mutated_cache():
    ops = torch.ops.lightning_attention
    for op in (ops.decode, ops.decode_multi, ops.verify, ops.commit, ops.prefill):
        mutated = [a.name for a in op.default._schema.arguments if a.alias_info is not None and a.alias_info.is_write]
        assert mutated == ([] if op is ops.verify else ["state_cache"])
    for op, args, _ in _op_samples("torch", "cpu"):
        torch.library.opcheck(op, args)


def test_opcheck_triton_interpreter(triton_device):
    """opcheck through the Triton engine (the interpreter on CPU): the kernels write only what the schema says."""
    for op, args, _ in _op_samples("triton", triton_device):
        torch.library.opcheck(op, args)


def test_eager_calls_equal_the_custom_ops(backend_device):
    """Eager calls skip the dispatcher (the custom ops are what compiled graphs record): identical outputs and
    cache updates for every op."""
    backend, device = backend_device
    calls = {
        serving.decode_op: lambda q, k, v, c, s, gg, sc, b, g: serving.lightning_attn_decode(q, k, v, c, s, gg, sc, g=g, backend=b),  # noqa: E501
        serving.decode_multi_op: lambda q, k, v, c, s, gg, sc, b, g, n: serving.lightning_attn_decode_multi(q, k, v, c, s, gg, sc, g=g, lengths=n, backend=b),  # noqa: E501
        serving.verify_op: lambda q, k, v, c, s, gg, sc, b, g, n: serving.lightning_attn_decode_multi(q, k, v, c, s, gg, sc, g=g, lengths=n, update_cache=False, backend=b),  # noqa: E501
        serving.commit_op: lambda k, v, c, s, n, gg, b, g: serving.lightning_attn_commit(k, v, c, s, gg, n, g=g, backend=b),
        serving.prefill_op: lambda q, k, v, cu, c, s, u, gg, sc, b: serving.lightning_attn_prefill(q, k, v, cu, c, s, gg, sc, u, backend=b),  # noqa: E501
    }
    for op, args, cache_index in _op_samples(backend, device):
        results = []
        for run in (op, calls[op]):
            run_args = list(args)
            if cache_index is not None:
                run_args[cache_index] = args[cache_index].clone()
            results.append((run(*run_args), run_args[cache_index] if cache_index is not None else None))
        (o_op, cache_op), (o_eager, cache_eager) = results
        assert (o_op is None and o_eager is None) or torch.equal(o_op, o_eager), op
        assert cache_index is None or torch.equal(cache_op, cache_eager), op


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_calls_trace_under_torch_compile(compiler):
    """One fullgraph function of a decode step, a read-only multi-token pass and its commit (fake implementations,
    no value checks while compiling): the same outputs and cache as eager, bit for bit (the graph has no arithmetic
    of its own, only the opaque ops and the write-back of the mutated cache)."""

    def step(q, k, v, cache, slots, lengths):
        o1 = serving.lightning_attn_decode(q[:, 0], k[:, 0], v[:, 0], cache, slots, G_GAMMA, backend="torch")
        o = serving.lightning_attn_decode_multi(q, k, v, cache, slots, G_GAMMA, update_cache=False, backend="torch")
        serving.lightning_attn_commit(k, v, cache, slots, G_GAMMA, lengths, backend="torch")
        return o1, o

    a = _multi_args()
    lengths = torch.tensor([3, 0, 1])
    eager_cache = torch.randn(NUM_SLOTS, H, K, V)
    compiled_cache = eager_cache.clone()
    expected = step(a["q"], a["k"], a["v"], eager_cache, a["slot_ids"], lengths)
    got = torch.compile(step, backend=compiler, fullgraph=True)(a["q"], a["k"], a["v"], compiled_cache, a["slot_ids"], lengths)
    for x, y in zip((*got, compiled_cache), (*expected, eager_cache)):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_compiled_calls_check_host_indices_when_they_run():
    """Under torch.compile the public function's checks are traced away; the op checks CPU index values when it
    runs, before touching the cache."""
    a = _decode_args()

    def step(q, k, v, cache, slots):
        return serving.lightning_attn_decode(q, k, v, cache, slots, G_GAMMA, backend="torch")

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    compiled(a["q"], a["k"], a["v"], a["state_cache"], a["slot_ids"])
    before = a["state_cache"].clone()
    with pytest.raises(ValueError, match="out of range: \\[9\\]"):
        compiled(a["q"], a["k"], a["v"], a["state_cache"], torch.tensor([0, 9, 1]))
    assert torch.equal(a["state_cache"], before)


def test_compiled_calls_report_device_indices(triton_device, device_resident):
    """A compiled decode with device-resident ids runs the kernel's checks: a bad id is skipped and reported."""
    q, k, v = _decode_inputs(3, seed=15, device=triton_device)
    cache = torch.randn(NUM_SLOTS, H, K, V).to(triton_device)
    g = G_GAMMA.to(triton_device)

    def step(q, k, v, cache, slots):
        return serving.lightning_attn_decode(q, k, v, cache, slots, g, backend="triton")

    o = torch.compile(step, backend="aot_eager", fullgraph=True)(q, k, v, cache, torch.tensor([0, 1, 6], device=triton_device))
    assert torch.equal(o[2].cpu(), torch.zeros(H, V))
    with pytest.raises(ValueError, match="row 2 has slot 6"):
        serving.check_errors()


def test_new_state_cache():
    cache = serving.new_state_cache(3, H, K, dtype=torch.bfloat16)
    assert cache.shape == (3, H, K, K) and cache.dtype == torch.bfloat16 and not cache.any()
    assert serving.new_state_cache(2, H, K, V).shape == (2, H, K, V)
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        serving.new_state_cache(2, H, K, V, dtype=torch.float16)


# ---------------------------------------------------------------------------------------------------------------
# On a GPU: no call synchronises; CUDA graphs capture the calls, error reporting included.


def _gpu_problem(N=4, L=3, seed=30):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q, k = (torch.randn(N, L, H, K, device="cuda", generator=gen) for _ in range(2))
    v = torch.randn(N, L, H, V, device="cuda", generator=gen)
    cache = serving.new_state_cache(2 * N, H, K, V, device="cuda")
    cache.copy_(torch.randn(2 * N, H, K, V, device="cuda", generator=gen))
    return q, k, v, cache, G_GAMMA.cuda()


@pytest.mark.gpu
def test_default_calls_never_synchronise():
    """Every serving call with GPU-resident indices, under torch's sync debug mode set to error: any
    synchronising CUDA call inside them raises. Both prefill routes (short: token loop; long: chunked). The calls
    run once before (kernels compiled, tensors built: building a GPU tensor from a list synchronises)."""
    q, k, v, cache, g = _gpu_problem()
    slots = torch.tensor([1, -1, 6, 3], device="cuda")
    lengths = torch.tensor([3, 0, 2, 1], device="cuda")
    prefill_slots = torch.tensor([1, 6, 3, 0], device="cuda")
    p_q, p_k, p_v, _ = make_inputs(1, 300, H, K, V, device="cuda", seed=31)
    offsets = [torch.tensor(cu, device="cuda") for cu in ([0, 5, 5, 12, 20], [0, 100, 100, 250, 300])]

    def calls():
        for cu, T in zip(offsets, (20, 300)):
            serving.lightning_attn_prefill(p_q[:, :T], p_k[:, :T], p_v[:, :T], cu, cache, prefill_slots, g)
        serving.lightning_attn_decode(q[:, 0], k[:, 0], v[:, 0], cache, slots, g)
        serving.lightning_attn_decode_multi(q, k, v, cache, slots, g, lengths=lengths)
        serving.lightning_attn_decode_multi(q, k, v, cache, slots, g, update_cache=False)
        serving.lightning_attn_commit(k, v, cache, slots, g, lengths)

    calls()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        calls()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    serving.check_errors()


@pytest.mark.gpu
def test_cuda_graph_replays_calls_and_reports_bad_ids():
    """A decode step, a read-only pass and a commit captured in one CUDA graph with device-resident ids: replays
    equal eager calls; after bad ids are written into the captured id tensor a replay skips those rows, and
    check_errors names the captured call."""
    q, k, v, cache, g = _gpu_problem()
    slots = torch.tensor([1, -1, 6, 3], device="cuda")
    accepted = torch.tensor([2, 0, 3, 1], device="cuda")
    eager_cache = cache.clone()

    def step(cache):
        o1 = serving.lightning_attn_decode(q[:, 0], k[:, 0], v[:, 0], cache, slots, g)
        o = serving.lightning_attn_decode_multi(q, k, v, cache, slots, g, update_cache=False)
        serving.lightning_attn_commit(k, v, cache, slots, g, accepted)
        return o1, o

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step(cache.clone())  # warm-up: compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step(cache)
    expected = step(eager_cache)
    graph.replay()
    for got, want in zip((*outs, cache), (*expected, eager_cache)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    serving.check_errors()
    before = cache.clone()
    slots.copy_(torch.tensor([1, 9, 6, 6], device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(cache[[0, 2, 4, 5, 7]], before[[0, 2, 4, 5, 7]])
    with pytest.raises(ValueError, match=r"call #\d+ \(N=4, L=[13], cache of 8 slots\)"):
        serving.check_errors()
