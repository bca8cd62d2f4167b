"""The public serving API (lightning_attention.serving): prefill + decode on a slot-indexed state cache.

Behaviour through both backends (the Triton one on CUDA, or on CPU through the interpreter), validation
errors before any kernel runs, the custom-op registration (mutated cache, fake implementations), and tracing
under torch.compile. Numerical accuracy of each engine is tested in tests/engines/*/test_decode.py; here the
whole flow is compared with one chunked pass of the float64 reference (rel err <= 2e-3 for float32 inputs).
"""

import pytest
import torch

from lightning_attention import decay, serving
from lightning_attention.reference import chunk_reference
from lightning_attention.testing import assert_rel_close, make_inputs

H, K, V = 4, 8, 16
G_GAMMA = decay.g_gamma(H, 0, 4)  # g = 0 (no decay), -2, -4, -6
NUM_SLOTS = 5


@pytest.fixture(params=["torch", "triton"])
def backend_device(request):
    if request.param == "torch":
        return "torch", "cpu"
    return "triton", request.getfixturevalue("triton_device")


def _decode_inputs(n, seed=0, device="cpu"):
    q, k, v, _ = make_inputs(n, 1, H, K, V, seed=seed, device=device)
    return [x[:, 0] for x in (q, k, v)]


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


def test_inputs_other_than_the_cache_are_not_modified():
    q, k, v = _decode_inputs(2, seed=2)
    slots, g = torch.tensor([0, 4]), G_GAMMA.clone()
    before = [t.clone() for t in (q, k, v, slots, g)]
    cache = torch.randn(NUM_SLOTS, H, K, V)
    serving.lightning_attn_decode(q, k, v, cache, slots, g, backend="torch")
    for now, then in zip((q, k, v, slots, g), before):
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


@pytest.mark.parametrize(
    "change, error, match",
    [
        pytest.param(lambda a: a.update(q=a["q"][None]), ValueError, "q must have 3 dims", id="q-4d"),
        pytest.param(lambda a: a.update(k=a["k"][:, :, :4]), ValueError, "q, k must be", id="k-shape"),
        pytest.param(lambda a: a.update(v=a["v"][:2]), ValueError, "v \\[N, H, V\\]", id="v-rows"),
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
        pytest.param(lambda a: a.update(g_gamma=-G_GAMMA), ValueError, "<= 0", id="g-positive"),
    ],
)
def test_decode_validation(change, error, match):
    args = _decode_args()
    change(args)
    cache = args["state_cache"]
    snapshot = cache.clone() if isinstance(cache, torch.Tensor) else None
    with pytest.raises(error, match=match):
        serving.lightning_attn_decode(**args, backend="torch")
    if snapshot is not None:
        assert torch.equal(cache, snapshot), "the cache changed although the call was rejected"


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
        pytest.param(lambda a: a.update(q=a["q"].double(), k=a["k"].double(), v=a["v"].double()), TypeError, "float16, bfloat16, float32", id="fp64"),
    ],
)
def test_prefill_validation(change, error, match):
    args = _prefill_args()
    change(args)
    with pytest.raises(error, match=match):
        serving.lightning_attn_prefill(**args, backend="torch")
    assert torch.equal(args["state_cache"], torch.zeros(NUM_SLOTS, H, K, V))


@pytest.mark.parametrize(
    "ids, padding, valid",
    [
        pytest.param([0, -1, 4, -1], True, True, id="padding-ok"),
        pytest.param([0, -1, 4, 0], True, False, id="repeat"),
        pytest.param([0, 5], True, False, id="too-big"),
        pytest.param([0, -1], False, False, id="padding-not-allowed"),
    ],
)
def test_device_resident_slot_check(ids, padding, valid):
    """The check used for GPU-resident slot ids (one device sync) agrees with the host one."""
    t = torch.tensor(ids)
    assert serving._device_ids_are_valid(t, NUM_SLOTS, padding) is valid
    assert (serving._slot_id_errors(ids, NUM_SLOTS, padding) is None) is valid


def test_custom_ops_declare_the_mutated_cache():
    for op in (torch.ops.lightning_attention.decode, torch.ops.lightning_attention.prefill):
        mutated = [a.name for a in op.default._schema.arguments if a.alias_info is not None and a.alias_info.is_write]
        assert mutated == ["state_cache"]
    args = _decode_args()
    torch.library.opcheck(
        serving.decode_op,
        (args["q"], args["k"], args["v"], torch.randn(NUM_SLOTS, H, K, V), args["slot_ids"], G_GAMMA, 0.5, "torch"),
    )
    p = _prefill_args()
    torch.library.opcheck(
        serving.prefill_op,
        (p["q"], p["k"], p["v"], p["cu_seqlens"], torch.randn(NUM_SLOTS, H, K, V), p["slot_ids"],
         torch.tensor([True, False]), G_GAMMA, 0.5, "torch"),
    )


def test_eager_calls_equal_the_custom_ops(backend_device):
    """Eager calls skip the dispatcher (the custom ops are what compiled graphs record): identical outputs and
    cache updates, decode (with a padding row) and prefill (one sequence from its slot, one from zero)."""
    backend, device = backend_device
    d = {key: t.to(device) for key, t in _decode_args().items()}
    caches = [torch.randn(NUM_SLOTS, H, K, V, generator=torch.Generator().manual_seed(3)).to(device) for _ in range(2)]
    o_eager = serving.lightning_attn_decode(d["q"], d["k"], d["v"], caches[0], d["slot_ids"], d["g_gamma"], 0.5, backend=backend)
    o_op = serving.decode_op(d["q"], d["k"], d["v"], caches[1], d["slot_ids"], d["g_gamma"], 0.5, backend)
    assert torch.equal(o_eager, o_op) and torch.equal(caches[0], caches[1])
    p = {key: t.to(device) for key, t in _prefill_args().items()}
    use = torch.tensor([True, False], device=device)
    o_eager = serving.lightning_attn_prefill(
        p["q"], p["k"], p["v"], p["cu_seqlens"], caches[0], p["slot_ids"], p["g_gamma"], 0.5, use, backend=backend
    )
    o_op = serving.prefill_op(p["q"], p["k"], p["v"], p["cu_seqlens"], caches[1], p["slot_ids"], use, p["g_gamma"], 0.5, backend)
    assert torch.equal(o_eager, o_op) and torch.equal(caches[0], caches[1])


def test_decode_traces_under_torch_compile():
    """fullgraph tracing works (fake implementation, no value checks while compiling); the cache is updated."""

    def step(q, k, v, cache, slots):
        return serving.lightning_attn_decode(q, k, v, cache, slots, G_GAMMA, backend="torch")

    args = _decode_args()
    eager_cache = torch.randn(NUM_SLOTS, H, K, V)
    compiled_cache = eager_cache.clone()
    o_eager = step(args["q"], args["k"], args["v"], eager_cache, args["slot_ids"])
    o_compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(
        args["q"], args["k"], args["v"], compiled_cache, args["slot_ids"]
    )
    torch.testing.assert_close(o_compiled, o_eager, rtol=0, atol=0)
    torch.testing.assert_close(compiled_cache, eager_cache, rtol=0, atol=0)


def test_multi_token_decode_is_prefill_from_the_cached_state(backend_device):
    """Several new tokens per sequence (lengths 3, 0, 2) through the prefill with use_initial_state=True ==
    the same tokens one decode step at a time (padding rows where a sequence has no token left); the slot of
    the empty sequence keeps its exact bits. Both paths are float32 from the same states: only summation
    order differs (1e-5 relative)."""
    backend, device = backend_device
    lengths, slots = [3, 0, 2], torch.tensor([4, 0, 2])
    q, k, v, _ = make_inputs(1, sum(lengths), H, K, V, seed=6, device=device)
    cu = torch.tensor([0, 3, 3, 5], device=device)
    g = G_GAMMA.to(device)
    start = torch.randn(NUM_SLOTS, H, K, V).to(device)
    by_prefill, by_decode = start.clone(), start.clone()
    o_prefill = serving.lightning_attn_prefill(q, k, v, cu, by_prefill, slots, g, backend=backend)
    starts = [0, 3, 3]
    for step in range(max(lengths)):
        rows = [starts[n] + step if step < lengths[n] else 0 for n in range(3)]
        step_slots = torch.tensor([int(s) if step < n else -1 for s, n in zip(slots, lengths)])
        o = serving.lightning_attn_decode(q[0, rows], k[0, rows], v[0, rows], by_decode, step_slots, g, backend=backend)
        for n in range(3):
            if step < lengths[n]:
                assert_rel_close(o[n], o_prefill[0, starts[n] + step], 1e-5, f"o of sequence {n}, token {step}")
    assert_rel_close(by_decode, by_prefill, 1e-5, "states")
    assert torch.equal(by_prefill[0], start[0]), "the empty sequence changed its slot"


def test_new_state_cache():
    cache = serving.new_state_cache(3, H, K, dtype=torch.bfloat16)
    assert cache.shape == (3, H, K, K) and cache.dtype == torch.bfloat16 and not cache.any()
    assert serving.new_state_cache(2, H, K, V).shape == (2, H, K, V)
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        serving.new_state_cache(2, H, K, V, dtype=torch.float16)
